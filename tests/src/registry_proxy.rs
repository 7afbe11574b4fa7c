//! An HTTP proxy that lets `docker build` in the tests' Docker namespace reach the package
//! registries, and nothing else.
//!
//! The tests' dockerd lives in a network namespace with no route off the machine, so no
//! container can send a query (or anything) beyond it. An image build must still download
//! Debian packages and crates. This proxy listens inside that namespace and makes its
//! connections from the host's namespace, only to the hosts it is given, on ports 80 and 443:
//! `CONNECT host:443` (cargo, https) and absolute-form `GET http://host/...` (apt). Nothing in
//! the host's namespace changes: no veth, no route, no iptables rule.
//!
//! It resolves the registries' names with the host's resolver, as apt and cargo on the host
//! do: provisioning traffic, never a test query.
#![expect(
    clippy::disallowed_methods,
    reason = "a thread-per-connection tool outside any runtime; it resolves registry names on purpose"
)]
use std::{
    fs::File,
    io::{self, BufRead as _, BufReader, Write as _},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread,
    time::Duration,
};

/// The proxy's listener; dropping it stops accepting (open tunnels end with their peers).
pub struct RegistryProxy {
    addr: SocketAddr,
    netns: String,
    stopping: Arc<AtomicBool>,
}

impl RegistryProxy {
    /// Listens on `addr` inside the network namespace `/run/netns/<netns>`, which must have
    /// that address, and forwards to the `allowed` hosts only.
    pub fn start(netns: &str, addr: SocketAddr, allowed: &[&str]) -> io::Result<Self> {
        let namespace = File::open(format!("/run/netns/{netns}"))?;
        let (listening, listener) = mpsc::channel();
        // setns is per thread: only this one enters the namespace to bind; the connections
        // to the registries are made by threads that the host-namespace thread below spawns.
        thread::spawn(move || {
            // SAFETY: setns takes an fd and flags, no memory; `namespace` is an open file of a
            // network namespace, owned by this closure for the call, and CLONE_NEWNET asks for
            // that kind. It moves this thread only.
            let entered = unsafe { libc::setns(namespace.as_raw_fd(), libc::CLONE_NEWNET) };
            let bound = if entered == 0 {
                TcpListener::bind(addr)
            } else {
                Err(io::Error::last_os_error())
            };
            let _ = listening.send(bound);
        });
        let listener = listener
            .recv()
            .map_err(|_| io::Error::other("the proxy's listener thread died"))??;
        let stopping = Arc::new(AtomicBool::new(false));
        let allowed: Arc<Vec<String>> = Arc::new(allowed.iter().map(|h| h.to_string()).collect());
        let stop = Arc::clone(&stopping);
        thread::spawn(move || {
            for client in listener.incoming() {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(client) = client else { continue };
                let allowed = Arc::clone(&allowed);
                thread::spawn(move || {
                    if let Err(err) = serve(client, &allowed) {
                        eprintln!("registry proxy: {err}");
                    }
                });
            }
        });
        Ok(Self {
            addr,
            netns: netns.to_owned(),
            stopping,
        })
    }

    /// `http://ADDR`, for `http_proxy` and `https_proxy`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for RegistryProxy {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::Relaxed);
        // Wake the accept loop with a connection from inside the namespace.
        let addr = self.addr;
        let netns = self.netns.clone();
        let _ = thread::spawn(move || {
            if let Ok(namespace) = File::open(format!("/run/netns/{netns}")) {
                // SAFETY: setns takes an fd and flags, no memory; `namespace` is an open file
                // of a network namespace, alive for the call. It moves this thread only.
                if unsafe { libc::setns(namespace.as_raw_fd(), libc::CLONE_NEWNET) } == 0 {
                    let _ = TcpStream::connect_timeout(&addr, Duration::from_secs(1));
                }
            }
        })
        .join();
    }
}

/// One client connection: its request head names the target; anything but an allowed host on
/// port 80 or 443 is refused with 403.
fn serve(client: TcpStream, allowed: &[String]) -> io::Result<()> {
    client.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut reader = BufReader::new(client.try_clone()?);
    let mut head = Vec::new();
    loop {
        let before = head.len();
        if reader.read_until(b'\n', &mut head)? == 0 {
            return Ok(());
        }
        if head[before..] == *b"\r\n" || head[before..] == *b"\n" || head.len() > 64 * 1024 {
            break;
        }
    }
    let request_line = String::from_utf8_lossy(&head)
        .lines()
        .next()
        .unwrap_or("")
        .to_owned();
    let mut words = request_line.split_whitespace();
    let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let (host, port, tunnel) = if method == "CONNECT" {
        let (host, port) = target.rsplit_once(':').unwrap_or((target, "443"));
        (host.to_owned(), port.parse().unwrap_or(0), true)
    } else {
        let rest = target.strip_prefix("http://").unwrap_or("");
        let authority = rest.split('/').next().unwrap_or("");
        let (host, port) = match authority.rsplit_once(':') {
            Some((host, port)) => (host, port.parse().unwrap_or(0)),
            None => (authority, 80),
        };
        (host.to_owned(), port, false)
    };
    let mut client = client;
    if !allowed.iter().any(|a| a.eq_ignore_ascii_case(&host)) || !matches!(port, 80 | 443) {
        client.write_all(b"HTTP/1.1 403 Forbidden\r\nConnection: close\r\n\r\n")?;
        return Err(io::Error::other(format!("refused {method} {target}")));
    }
    let upstream = TcpStream::connect((host.as_str(), port))?;
    client.set_read_timeout(None)?;
    let mut upstream_writer = upstream.try_clone()?;
    if tunnel {
        client.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")?;
    } else {
        // Servers take the absolute form (RFC 9112 3.2.2); the rest of the stream follows.
        upstream_writer.write_all(&head)?;
    }
    // What the reader buffered past the head belongs to the upstream.
    let buffered = reader.buffer().to_vec();
    upstream_writer.write_all(&buffered)?;
    let mut from_client = reader.into_inner();
    let mut to_client = client;
    let mut from_upstream = upstream;
    let upload = thread::spawn(move || {
        let _ = io::copy(&mut from_client, &mut upstream_writer);
        let _ = upstream_writer.shutdown(Shutdown::Write);
    });
    let _ = io::copy(&mut from_upstream, &mut to_client);
    let _ = to_client.shutdown(Shutdown::Write);
    let _ = upload.join();
    Ok(())
}
