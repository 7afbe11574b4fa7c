//! A DNS client that checks what a strict resolver checks: the answer must come from the
//! address and port it asked, with the query's ID.
//!
//! Usage: dns-probe MODE SERVER[,SERVER...] NAME [--hold] [--raw HEX] [--port N]
//! - `sendto`: like musl, one unconnected socket, `sendto` to every server listed, then
//!   `recvfrom`; the answer's source must be one of them;
//! - `connect`: like glibc, a connected UDP socket; `getpeername()` must name the server too;
//! - `tcp`: a TCP connection; `getpeername()` must name the server;
//! - `axfr`: a zone transfer of NAME over TCP, as a client that half-closes once it has asked:
//!   the write side is shut after the query, then every message is read until the server
//!   closes. Prints `source=ADDR messages=N` (each message must carry the query's ID).
//!
//! SERVER is `IP:PORT` or `[IPv6]:PORT`; a v4-mapped `[::ffff:a.b.c.d]:53` makes a dual-stack
//! IPv6 socket talk to an IPv4 server. `--hold` keeps the socket open after the answer until
//! standard input closes. `--raw HEX` sends that message instead of an A query for NAME.
//! `--port N` sends from local port N (UDP) instead of an ephemeral one. `--device IFNAME`
//! binds the socket to that interface first (`SO_BINDTODEVICE`, as dnsmasq's `server=IP@IF`);
//! `--unicast-if IFNAME` sends through it instead (`IP_UNICAST_IF` / `IPV6_UNICAST_IF`, as
//! systemd-resolved does for a link's own servers), and `--sticky-pktinfo IFNAME` likewise with
//! the sticky `IPV6_PKTINFO` option (IPv6 only); `--mark N` marks it (`SO_MARK`, as a VPN's
//! or a mesh's DNS forwarder does for policy routing).
//!
//! Prints `source=ADDR answer=A.B.C.D` (or `source=ADDR hex=HEX` with --raw) and exits 0, or
//! says what was wrong and exits 1.
#![expect(
    clippy::disallowed_methods,
    reason = "a synchronous test client; it resolves no names"
)]
use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream, UdpSocket},
    process::ExitCode,
    time::Duration,
};

use tests::answer::single_a_record;

const QUERY_ID: u16 = 0x5a17;
const TIMEOUT: Duration = Duration::from_secs(3);

/// The local address to send from: any address of the server's family, on `port`.
fn local_for(server: &SocketAddr, port: u16) -> SocketAddr {
    let any: std::net::IpAddr = if server.is_ipv4() {
        std::net::Ipv4Addr::UNSPECIFIED.into()
    } else {
        std::net::Ipv6Addr::UNSPECIFIED.into()
    };
    SocketAddr::new(any, port)
}

/// How the socket chooses its route (an interface, or a mark for policy routing), if it does.
#[derive(Clone, Copy)]
enum Interface<'a> {
    /// `SO_BINDTODEVICE`.
    Bound(&'a str),
    /// `IP_UNICAST_IF` / `IPV6_UNICAST_IF`.
    Unicast(&'a str),
    /// The sticky `IPV6_PKTINFO`, with the interface's index and no address.
    StickyPktinfo(&'a str),
    /// `SO_MARK`.
    Marked(u32),
}

/// Ties `socket` (of `server`'s family) to its interface, as asked.
fn choose_interface(
    socket: socket2::SockRef<'_>,
    server: SocketAddr,
    interface: Option<Interface<'_>>,
) -> Result<(), String> {
    match interface {
        None => Ok(()),
        Some(Interface::Bound(name)) => socket
            .bind_device(Some(name.as_bytes()))
            .map_err(|e| format!("SO_BINDTODEVICE {name}: {e}")),
        Some(Interface::Marked(mark)) => socket
            .set_mark(mark)
            .map_err(|e| format!("SO_MARK {mark}: {e}")),
        Some(Interface::StickyPktinfo(name)) => {
            let value = libc::in6_pktinfo {
                ipi6_addr: libc::in6_addr { s6_addr: [0; 16] },
                ipi6_ifindex: interface_index(name)?,
            };
            set_option(socket, libc::IPPROTO_IPV6, libc::IPV6_PKTINFO, &value)
                .map_err(|e| format!("IPV6_PKTINFO {name}: {e}"))
        }
        Some(Interface::Unicast(name)) => {
            // Both options take the index in network order.
            let value = interface_index(name)?.to_be();
            let (level, option) = if server.is_ipv4() {
                (libc::IPPROTO_IP, libc::IP_UNICAST_IF)
            } else {
                (libc::IPPROTO_IPV6, libc::IPV6_UNICAST_IF)
            };
            set_option(socket, level, option, &value).map_err(|e| format!("UNICAST_IF {name}: {e}"))
        }
    }
}

/// `setsockopt(level, option)` on `socket`, with `value` as it is in memory.
fn set_option<T>(
    socket: socket2::SockRef<'_>,
    level: libc::c_int,
    option: libc::c_int,
    value: &T,
) -> std::io::Result<()> {
    use std::os::fd::AsRawFd as _;
    // SAFETY: a live socket, and a value of its own size the call only reads.
    let status = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            option,
            std::ptr::from_ref(value).cast(),
            std::mem::size_of_val(value) as libc::socklen_t,
        )
    };
    match status {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    }
}

/// The index of the interface called `name`.
fn interface_index(name: &str) -> Result<u32, String> {
    let c_name = std::ffi::CString::new(name).map_err(|e| e.to_string())?;
    // SAFETY: a NUL-terminated name the call only reads.
    match unsafe { libc::if_nametoindex(c_name.as_ptr()) } {
        0 => Err(format!("no interface {name}")),
        index => Ok(index),
    }
}

fn expect_peer(peer: std::io::Result<SocketAddr>, server: SocketAddr) -> Result<(), String> {
    let peer = peer.map_err(|e| format!("getpeername: {e}"))?;
    if peer != server {
        return Err(format!("getpeername() says {peer}, not {server}"));
    }
    Ok(())
}

/// Sends `query` and returns the answer and the address it came from.
fn exchange(
    port: u16,
    interface: Option<Interface<'_>>,
    mode: &str,
    servers: &[SocketAddr],
    query: &[u8],
    hold: &mut Vec<Box<dyn std::any::Any>>,
) -> Result<(Vec<u8>, SocketAddr), String> {
    let first = servers[0];
    let mut buf = vec![0u8; 65_535];
    match mode {
        "sendto" | "connect" => {
            let socket =
                UdpSocket::bind(local_for(&first, port)).map_err(|e| format!("bind: {e}"))?;
            choose_interface(socket2::SockRef::from(&socket), first, interface)?;
            socket
                .set_read_timeout(Some(TIMEOUT))
                .map_err(|e| e.to_string())?;
            if mode == "sendto" {
                for server in servers {
                    socket
                        .send_to(query, server)
                        .map_err(|e| format!("sendto {server}: {e}"))?;
                }
            } else {
                socket.connect(first).map_err(|e| format!("connect: {e}"))?;
                expect_peer(socket.peer_addr(), first)?;
                socket.send(query).map_err(|e| format!("send: {e}"))?;
            }
            let (len, source) = socket
                .recv_from(&mut buf)
                .map_err(|e| format!("no answer: {e}"))?;
            hold.push(Box::new(socket));
            Ok((buf[..len].to_vec(), source))
        }
        "tcp" => {
            let socket = socket2::Socket::new(
                socket2::Domain::for_address(first),
                socket2::Type::STREAM,
                None,
            )
            .map_err(|e| format!("socket: {e}"))?;
            choose_interface(socket2::SockRef::from(&socket), first, interface)?;
            socket
                .connect_timeout(&first.into(), TIMEOUT)
                .map_err(|e| format!("connect: {e}"))?;
            let mut stream = TcpStream::from(socket);
            stream
                .set_read_timeout(Some(TIMEOUT))
                .map_err(|e| e.to_string())?;
            expect_peer(stream.peer_addr(), first)?;
            let mut frame = (query.len() as u16).to_be_bytes().to_vec();
            frame.extend_from_slice(query);
            stream.write_all(&frame).map_err(|e| format!("send: {e}"))?;
            let mut length = [0u8; 2];
            stream
                .read_exact(&mut length)
                .map_err(|e| format!("no answer: {e}"))?;
            let len = usize::from(u16::from_be_bytes(length));
            stream
                .read_exact(&mut buf[..len])
                .map_err(|e| format!("short answer: {e}"))?;
            hold.push(Box::new(stream));
            Ok((buf[..len].to_vec(), first))
        }
        other => Err(format!("unknown mode {other}")),
    }
}

/// The `axfr` mode: every message of a zone transfer, read after a half-close.
fn transfer(server: SocketAddr, name: &str) -> Result<String, String> {
    let mut query = tests::a_query(QUERY_ID, name);
    let qtype = query.len() - 4;
    query[qtype..qtype + 2].copy_from_slice(&252u16.to_be_bytes()); // AXFR
    let mut stream =
        TcpStream::connect_timeout(&server, TIMEOUT).map_err(|e| format!("connect: {e}"))?;
    stream
        .set_read_timeout(Some(TIMEOUT))
        .map_err(|e| e.to_string())?;
    expect_peer(stream.peer_addr(), server)?;
    let mut frame = (query.len() as u16).to_be_bytes().to_vec();
    frame.extend_from_slice(&query);
    stream.write_all(&frame).map_err(|e| format!("send: {e}"))?;
    stream
        .shutdown(std::net::Shutdown::Write)
        .map_err(|e| format!("shutdown: {e}"))?;
    let mut messages = 0;
    loop {
        let mut length = [0u8; 2];
        match stream.read_exact(&mut length) {
            Ok(()) => {}
            Err(err) if err.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(err) => return Err(format!("after {messages} messages: {err}")),
        }
        let mut message = vec![0u8; usize::from(u16::from_be_bytes(length))];
        stream
            .read_exact(&mut message)
            .map_err(|e| format!("message {messages} cut short: {e}"))?;
        if message.get(..2) != query.get(..2) {
            return Err(format!("message {messages} has the wrong ID"));
        }
        messages += 1;
    }
    Ok(format!("source={server} messages={messages}"))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

fn run(args: &[String]) -> Result<String, String> {
    let [mode, servers, name, options @ ..] = args else {
        return Err(
            "usage: dns-probe sendto|connect|tcp|axfr SERVER[,SERVER...] NAME [--hold] [--raw HEX]"
                .to_owned(),
        );
    };
    let servers: Vec<SocketAddr> = servers
        .split(',')
        .map(|s| s.parse().map_err(|_| format!("{s}: not an IP:PORT")))
        .collect::<Result<_, _>>()?;
    let (mut hold, mut raw, mut port, mut interface) = (false, None, 0, None);
    let mut options = options.iter();
    while let Some(option) = options.next() {
        match option.as_str() {
            "--hold" => hold = true,
            "--port" => {
                port = options
                    .next()
                    .and_then(|p| p.parse().ok())
                    .ok_or("--port needs a port")?
            }
            "--device" => {
                let name = options.next().ok_or("--device needs an interface")?;
                interface = Some(Interface::Bound(name.as_str()));
            }
            "--unicast-if" => {
                let name = options.next().ok_or("--unicast-if needs an interface")?;
                interface = Some(Interface::Unicast(name.as_str()));
            }
            "--sticky-pktinfo" => {
                let name = options
                    .next()
                    .ok_or("--sticky-pktinfo needs an interface")?;
                interface = Some(Interface::StickyPktinfo(name.as_str()));
            }
            "--mark" => {
                let mark = options
                    .next()
                    .and_then(|m| m.parse().ok())
                    .ok_or("--mark needs a number")?;
                interface = Some(Interface::Marked(mark));
            }
            "--raw" => {
                raw = Some(
                    options
                        .next()
                        .and_then(|h| unhex(h))
                        .ok_or("--raw needs hex")?,
                )
            }
            other => return Err(format!("unknown option {other}")),
        }
    }
    if mode == "axfr" {
        return transfer(servers[0], name);
    }
    let query = raw
        .clone()
        .unwrap_or_else(|| tests::a_query(QUERY_ID, name));
    let mut sockets = Vec::new();
    let (answer, source) = exchange(port, interface, mode, &servers, &query, &mut sockets)?;
    if !servers.contains(&source) {
        return Err(format!(
            "answer came from {source}, not from {servers:?}: musl would drop it"
        ));
    }
    if answer.get(..2) != query.get(..2) {
        return Err("answer has the wrong ID".to_owned());
    }
    let line = match raw {
        Some(_) => format!("source={source} hex={}", hex(&answer)),
        None => {
            let address = single_a_record(&answer).ok_or(format!(
                "answer has no single A record ({} bytes)",
                answer.len()
            ))?;
            format!("source={source} answer={address}")
        }
    };
    if hold {
        println!("{line}");
        let _ = std::io::stdout().flush();
        let _ = std::io::stdin().read_to_end(&mut Vec::new());
        drop(sockets);
        return Ok(String::new());
    }
    Ok(line)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(line) => {
            if !line.is_empty() {
                println!("{line}");
            }
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("{err}");
            ExitCode::FAILURE
        }
    }
}
