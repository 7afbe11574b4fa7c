//! The threads that serve UDP: each runs a single-threaded tokio runtime of its own.
//!
//! A query's path (listener, upstream socket, answer) stays on one thread: each thread has its
//! own listener on the shared port (SO_REUSEPORT, so the kernel spreads clients over them),
//! its own upstream sockets and its own table of queries in flight. No thread has to wake
//! another for a query, which on a busy 2-CPU machine cost more than the forwarding itself
//! (measured in docs/performance.md), and every CPU can still serve.
use std::{io, net::SocketAddr, os::fd::AsFd as _, thread::JoinHandle};

use socket2::{Domain, Socket, Type};
use tokio::{runtime::Handle, sync::oneshot};

/// Running threads, each with a runtime; stopped and joined when dropped, which drops (and
/// closes) everything their runtimes still hold.
pub struct UdpThreads {
    threads: Vec<UdpThread>,
}

struct UdpThread {
    runtime: Handle,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl UdpThreads {
    pub fn start(count: usize) -> io::Result<Self> {
        let threads = (0..count)
            .map(|i| UdpThread::start(format!("dns-proxy-udp-{i}")))
            .collect::<io::Result<_>>()?;
        Ok(Self { threads })
    }

    /// The runtimes, one per thread, to spawn each thread's tasks on.
    pub fn runtimes(&self) -> impl Iterator<Item = &Handle> {
        self.threads.iter().map(|thread| &thread.runtime)
    }

    pub fn count(&self) -> usize {
        self.threads.len()
    }
}

impl UdpThread {
    fn start(name: String) -> io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new().name(name).spawn(move || {
            // Runs the tasks spawned on `handle` until told to stop (or the sender is gone).
            runtime.block_on(async {
                let _ = stopped.await;
            });
        })?;
        Ok(Self {
            runtime: handle,
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for UdpThread {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            log::error!("a UDP thread panicked");
        }
    }
}

/// `count` UDP sockets bound to the same `addr`, in one SO_REUSEPORT group, non-blocking, and
/// whether they joined a group that was there (another agent's, being taken over).
///
/// The group is only joined by sockets of the same user that set SO_REUSEPORT, which a second
/// agent would: so the address is first bound alone, without it, which fails if anything,
/// such an agent included, is there; only `take_over` goes on to join it. For port 0 that
/// first bind picks the port. `freebind`: the address is only routed here (an IPv6 block's),
/// which IPv6 binds only with `IPV6_FREEBIND`.
pub fn bind_reuseport_group(
    addr: SocketAddr,
    count: usize,
    take_over: bool,
    freebind: bool,
) -> io::Result<(SocketAddr, Vec<std::net::UdpSocket>, bool)> {
    let (bound, joined) = match bind_alone(addr, freebind) {
        Ok(bound) => (bound, false),
        Err(err) if take_over && err.kind() == io::ErrorKind::AddrInUse => (addr, true),
        Err(err) => return Err(err),
    };
    let group = (0..count)
        .map(|_| udp_socket(bound, true, freebind).map(std::net::UdpSocket::from))
        .collect::<io::Result<_>>()?;
    Ok((bound, group, joined))
}

/// Binds `addr` with a UDP socket without SO_REUSEPORT, which fails if any socket is there,
/// and returns where it was bound (the port the kernel picked, for port 0).
fn bind_alone(addr: SocketAddr, freebind: bool) -> io::Result<SocketAddr> {
    udp_socket(addr, false, freebind)?
        .local_addr()?
        .as_socket()
        .ok_or_else(|| io::Error::other("a UDP socket without an IP address"))
}

fn udp_socket(addr: SocketAddr, reuse_port: bool, freebind: bool) -> io::Result<Socket> {
    let socket = listener_socket(Domain::for_address(addr), Type::DGRAM)?;
    // Before the socket can receive anything: a datagram queued without its arrival
    // (destination and interface) would read as one of another namespace and be refused. The
    // kernel may steer one here as soon as `sk_lookup` finds the socket in `LISTENERS`, before
    // its proxy exists (an agent taking over, or a connected client across a restart).
    crate::dns::udp::mmsg::receive_arrivals(socket.as_fd(), addr.is_ipv6())?;
    enlarge_receive_queue(&socket);
    socket.set_reuse_port(reuse_port)?;
    set_freebind(&socket, addr, freebind)?;
    socket.bind(&addr.into())?;
    Ok(socket)
}

/// Bytes a UDP listener's receive queue may hold: about 5,000 queries, 25 ms of a flood
/// of 200,000 a second, so the thread being off its CPU for a few milliseconds (a busy
/// node's scheduler) loses none. The default, 208 KiB, holds a few hundred.
const LISTENER_RECEIVE_BUFFER: libc::c_int = 4 << 20;

/// Sets a listener's receive queue to [`LISTENER_RECEIVE_BUFFER`]: beyond `net.core.rmem_max`
/// with `CAP_NET_ADMIN` (`SO_RCVBUFFORCE`), else as far as that allows. Best effort: a
/// smaller queue only drops sooner under a flood.
fn enlarge_receive_queue(socket: &Socket) {
    let size = LISTENER_RECEIVE_BUFFER;
    let (fd, level) = (socket.as_fd(), libc::SOL_SOCKET);
    let forced = crate::dns::udp::mmsg::set_int_option(fd, level, libc::SO_RCVBUFFORCE, size);
    if forced.is_err()
        && let Err(err) = socket.set_recv_buffer_size(size as usize)
    {
        log::debug!("a listener's receive queue keeps its default size: {err}");
    }
}

/// Lets `socket` bind `addr` although no interface has it (it is only routed `local` here),
/// if `freebind`: IPv4 binds such an address anyway, IPv6 only with `IPV6_FREEBIND`.
pub fn set_freebind(socket: &Socket, addr: SocketAddr, freebind: bool) -> io::Result<()> {
    if freebind && addr.is_ipv6() {
        socket.set_freebind_v6(true)?;
    }
    Ok(())
}

/// The lowest descriptor a listening socket may have: above every descriptor the agent has
/// when it attaches its programs.
const LISTENER_FDS_FROM: libc::c_int = 256;

/// A non-blocking socket for a listener, on a descriptor above [`LISTENER_FDS_FROM`].
///
/// When the agent is killed, the kernel releases its files in the reverse order it closes
/// them, the highest descriptor first (measured here by the chaos soak, which lost lookups
/// at SIGKILLs otherwise). The listeners, on the highest descriptors, go first: they leave
/// the `LISTENERS` map, the redirect stops sending sockets to them at once, and only then
/// are the connections in flight reset, so a client's retry goes direct.
pub fn listener_socket(domain: Domain, kind: Type) -> io::Result<Socket> {
    let socket = Socket::new(domain, kind.nonblocking().cloexec(), None)?;
    match high_duplicate(std::os::fd::AsFd::as_fd(&socket)) {
        // The old descriptor closes with `socket`.
        Ok(high) => Ok(Socket::from(high)),
        // Under a descriptor limit that low, keep the socket where it is.
        Err(_) => Ok(socket),
    }
}

/// A descriptor of the listener `fd` above [`LISTENER_FDS_FROM`]: any other descriptor the
/// agent holds of a listener must be as high, or a SIGKILL would release the socket only
/// after the links ([`listener_socket`]).
pub fn high_duplicate(fd: std::os::fd::BorrowedFd<'_>) -> io::Result<std::os::fd::OwnedFd> {
    // SAFETY: `fd` is open for the call; F_DUPFD_CLOEXEC takes an integer and makes a new
    // descriptor of the same file.
    let high = unsafe {
        libc::fcntl(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            libc::F_DUPFD_CLOEXEC,
            LISTENER_FDS_FROM,
        )
    };
    if high < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `high` is a fresh descriptor nothing else owns.
    Ok(unsafe { std::os::fd::FromRawFd::from_raw_fd(high) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_group_shares_its_port_and_keeps_others_out() {
        let (bound, group, joined) =
            bind_reuseport_group("127.0.0.1:0".parse().unwrap(), 3, false, false).unwrap();
        assert!(!joined);
        assert_ne!(bound.port(), 0);
        assert_eq!(group.len(), 3);
        for socket in &group {
            assert_eq!(socket.local_addr().unwrap(), bound);
        }
        // A second agent, doing the same, is refused; one taking over joins.
        let err = bind_reuseport_group(bound, 3, false, false).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
        let (joined_at, second, joined) = bind_reuseport_group(bound, 2, true, false).unwrap();
        assert_eq!((joined_at, second.len(), joined), (bound, 2, true));
        // Taking over finds nothing to join at a free address, and says so. Not at `bound`
        // once let go: another test's socket may take that port in between (seen in CI).
        let (free, _, joined) =
            bind_reuseport_group("127.0.0.1:0".parse().unwrap(), 1, true, false).unwrap();
        assert!(!joined);
        assert_ne!(free, bound);
    }

    /// With `CAP_NET_ADMIN` (the unit tests run as root, as the agent starts), beyond
    /// `net.core.rmem_max`; the kernel doubles what it is asked for.
    #[test]
    fn listeners_get_a_receive_queue_of_thousands_of_queries() {
        let (_, group, _) =
            bind_reuseport_group("127.0.0.1:0".parse().unwrap(), 2, false, false).unwrap();
        for socket in &group {
            let size = socket2::SockRef::from(socket).recv_buffer_size().unwrap();
            assert!(size >= LISTENER_RECEIVE_BUFFER as usize, "{size}");
        }
    }

    #[test]
    fn threads_run_what_is_spawned_on_them_and_stop_when_dropped() {
        let threads = UdpThreads::start(2).unwrap();
        let names: Vec<_> = threads
            .runtimes()
            .map(|runtime| {
                let (tx, rx) = std::sync::mpsc::channel();
                runtime.spawn(async move {
                    tx.send(std::thread::current().name().map(str::to_owned))
                        .unwrap();
                });
                rx.recv().unwrap()
            })
            .collect();
        assert_eq!(
            names,
            vec![
                Some("dns-proxy-udp-0".to_owned()),
                Some("dns-proxy-udp-1".to_owned())
            ]
        );
        drop(threads);
    }
}
