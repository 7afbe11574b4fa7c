//! Binding the sockets the agent serves on: per address, a UDP socket for each UDP thread
//! (one SO_REUSEPORT group) and a TCP listener on the same port; the sockets that hold the
//! blocks' first addresses; the metrics listener. What `--takeover` joins and what it keeps
//! out is decided here.
use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    os::fd::AsFd as _,
    time::Duration,
};

use tokio::net::TcpListener;

use super::{LOG, RunError};
use crate::{
    config::{Listen6, RunConfig},
    dns::stats::Stats,
    drain,
    ebpf::ListenerFds,
    host, udp_threads,
    udp_threads::bind_reuseport_group,
};
use std::sync::{Arc, atomic::Ordering};

/// The sockets the proxy serves on: UDP and TCP on the IPv4 address, and on the IPv6 one
/// where there is one.
pub(super) struct Listeners {
    /// Per address, a UDP socket for each UDP thread.
    pub(super) udp: Vec<Vec<std::net::UdpSocket>>,
    pub(super) tcp: Vec<TcpListener>,
    /// Where IPv4 clients are sent (the port the kernel picked, for port 0).
    pub(super) v4: SocketAddrV4,
    /// `None` when IPv6 is not redirected.
    pub(super) v6: Option<SocketAddrV6>,
    /// Sockets that hold the blocks' first addresses (see `lock_blocks`).
    locks: Vec<socket2::Socket>,
    /// Whether another agent's listeners were there, and these joined them (`--takeover`).
    pub(super) joined_another_agent: bool,
    /// The blocks' routes this start made: removed again if it fails.
    pub(super) routes: Vec<host::AddedRoute>,
}

impl Listeners {
    /// The sockets, for the kernel's `LISTENERS` map, with the metrics listener if there is one.
    pub(super) fn fds<'a>(&'a self, metrics: Option<&'a TcpListener>) -> ListenerFds<'a> {
        let udp = |n: usize| {
            self.udp
                .get(n)
                .map(|group| group.iter().map(|socket| socket.as_fd()).collect())
                .unwrap_or_default()
        };
        ListenerFds {
            tcp4: self.tcp[0].as_fd(),
            tcp6: self.tcp.get(1).map(|tcp| tcp.as_fd()),
            udp4: udp(0),
            udp6: udp(1),
            metrics: metrics
                .and_then(|listener| Some((listener.local_addr().ok()?, listener.as_fd()))),
        }
    }

    /// Binds the listeners (`udp_threads`: how many UDP sockets on each address) and the
    /// blocks' locks, and says whether this agent takes over from another (`--takeover`).
    pub(super) async fn bind(config: &RunConfig, udp_threads: usize) -> Result<Self, RunError> {
        let mut listeners = Self {
            udp: Vec::new(),
            tcp: Vec::new(),
            v4: config.listen,
            v6: None,
            locks: Vec::new(),
            joined_another_agent: false,
            routes: Vec::new(),
        };
        // First the block's route: the listen address may be the block's first.
        host::check_block_is_free("--redirect-block", config.block4)?;
        listeners
            .routes
            .extend(host::route_block_here(config.block4)?);
        if let SocketAddr::V4(v4) = listeners
            .bind_pair(
                SocketAddr::V4(config.listen),
                udp_threads,
                config.takeover,
                false,
            )
            .await?
        {
            listeners.v4 = v4;
        }
        // An IPv6 listen address in the block (its first, say) is only routed here.
        let in_block6 = |v6: SocketAddrV6| config.block6.contains(IpAddr::V6(*v6.ip()));
        let bound_v6 = |addr| match addr {
            SocketAddr::V6(v6) => Some(v6),
            SocketAddr::V4(_) => None,
        };
        match config.listen6 {
            Listen6::Required(v6) => {
                host::check_block_is_free("--redirect-block6", config.block6)?;
                listeners
                    .routes
                    .extend(host::route_block_here(config.block6)?);
                listeners.v6 = bound_v6(
                    listeners
                        .bind_pair(
                            SocketAddr::V6(v6),
                            udp_threads,
                            config.takeover,
                            in_block6(v6),
                        )
                        .await?,
                );
            }
            Listen6::IfAvailable(v6) if host::ipv6_is_off() => log::warn!(
                target: LOG,
                "IPv6 is off on this host (net.ipv6.conf.lo.disable_ipv6): {v6} not served, \
                 IPv6 lookups are left alone"
            ),
            Listen6::IfAvailable(v6) => {
                host::check_block_is_free("--redirect-block6", config.block6)?;
                // Taken back with the IPv6 it was for, if there is none after all.
                let mut route6 = None;
                let bound = match host::route_block_here(config.block6) {
                    Ok(route) => {
                        route6 = route;
                        listeners
                            .bind_pair(
                                SocketAddr::V6(v6),
                                udp_threads,
                                config.takeover,
                                in_block6(v6),
                            )
                            .await
                    }
                    Err(host::HostError::Route { source, .. }) => Err(RunError::Listen {
                        addr: SocketAddr::V6(v6),
                        source,
                    }),
                    Err(err) => Err(err.into()),
                };
                match bound {
                    Ok(bound) => {
                        listeners.v6 = bound_v6(bound);
                        listeners.routes.extend(route6);
                    }
                    Err(RunError::Listen { source, .. })
                        if matches!(
                            source.kind(),
                            io::ErrorKind::AddrNotAvailable | io::ErrorKind::Unsupported
                        ) || source.raw_os_error() == Some(libc::EAFNOSUPPORT) =>
                    {
                        log::warn!(
                            target: LOG,
                            "no IPv6 on this host ({v6}: {source}): IPv6 lookups are left alone"
                        );
                    }
                    Err(err) => return Err(err),
                }
            }
            Listen6::Off => log::info!(
                target: LOG,
                "IPv6 lookups are left alone: --listen {} is not a loopback address and no \
                 --listen6 was given",
                config.listen
            ),
        }
        listeners.lock_blocks(config)?;
        if listeners.joined_another_agent {
            log::info!(
                target: LOG,
                "another agent serves {}: taking over from it (it answers what it has until it \
                 is stopped; new lookups come here once this agent is ready)",
                listeners.v4
            );
        } else if config.takeover {
            log::info!(target: LOG, "no agent serves {} yet: nothing to take over", listeners.v4);
        }
        Ok(listeners)
    }

    /// Holds each block's first address on its port (unless the listeners are there), so a
    /// second agent with the same block and port, elsewhere on the host, fails to start
    /// instead of taking this one's lookups, unless it was told to take over
    /// (`--takeover`): then it joins the lock.
    fn lock_blocks(&mut self, config: &RunConfig) -> Result<(), RunError> {
        let blocks = [
            Some((
                config.block4.first(),
                self.v4.port(),
                SocketAddr::V4(self.v4),
            )),
            self.v6
                .map(|v6| (config.block6.first(), v6.port(), SocketAddr::V6(v6))),
        ];
        for (first, port, listen) in blocks.into_iter().flatten() {
            let lock = SocketAddr::new(first, port);
            if lock == listen {
                continue; // the listeners hold it, bound alone first
            }
            let socket = socket2::Socket::new(
                socket2::Domain::for_address(lock),
                socket2::Type::DGRAM.cloexec(),
                None,
            )
            .and_then(|socket| {
                // The IPv6 block is only routed here, not an address of an interface.
                udp_threads::set_freebind(&socket, lock, true)?;
                // Alone first, which fails if another agent holds it; joinable after, for
                // the agent that takes over from this one.
                if !config.takeover {
                    socket.bind(&lock.into())?;
                    socket.set_reuse_port(true)?;
                    return Ok(socket);
                }
                socket.set_reuse_port(true)?;
                socket.bind(&lock.into())?;
                Ok(socket)
            })
            .map_err(|source| RunError::BlockInUse { lock, source })?;
            self.locks.push(socket);
        }
        Ok(())
    }

    /// Binds UDP (`udp_sockets` of them) and TCP on one address and port, and returns it.
    /// For port 0, the port the kernel picks for UDP, retried a few times if TCP already has
    /// it (or, in between, another UDP socket): the redirect sends both protocols to one port.
    async fn bind_pair(
        &mut self,
        addr: SocketAddr,
        udp_sockets: usize,
        take_over: bool,
        freebind: bool,
    ) -> Result<SocketAddr, RunError> {
        const PICK_ATTEMPTS: u32 = 16;
        let mut attempt = 1;
        loop {
            let failed = |addr, source| RunError::Listen { addr, source };
            let (bound, udp, joined) =
                match bind_reuseport_group(addr, udp_sockets, take_over, freebind) {
                    Ok(group) => group,
                    Err(err)
                        if addr.port() == 0
                            && err.kind() == io::ErrorKind::AddrInUse
                            && attempt < PICK_ATTEMPTS =>
                    {
                        attempt += 1;
                        continue;
                    }
                    Err(source) => return Err(failed(addr, source)),
                };
            match bind_tcp_listener(bound, freebind) {
                Ok(tcp) => {
                    self.udp.push(udp);
                    self.tcp.push(tcp);
                    self.joined_another_agent |= joined;
                    return Ok(bound);
                }
                Err(err)
                    if addr.port() == 0
                        && err.kind() == io::ErrorKind::AddrInUse
                        && attempt < PICK_ATTEMPTS =>
                {
                    attempt += 1;
                }
                Err(source) => return Err(failed(bound, source)),
            }
        }
    }
}

/// The listen port held over UDP and TCP on every address of this namespace (`0.0.0.0`, and
/// `[::]` with IPv6 served), when it is one any user may bind (at or above
/// `net.ipv4.ip_unprivileged_port_start`, as 8053 is): then no process of another user can
/// bind a block address on it, or an address of its own to send from one with `IP_PKTINFO`,
/// outside the cgroup the programs guard as well as in it. A socket connected to a block
/// address takes a datagram from there on that port for its server's answer, and
/// `getpeername` shows a connection from there as its server's (helper-166: a process of user
/// `nobody` outside `--cgroup` bound the address a connected IPv6 client was sent to, with
/// `IPV6_FREEBIND`, and the client took its forged answers, 3 lookups of 3). A privileged
/// port the kernel keeps for the privileged; none below 1024 is held (see
/// [`WELL_KNOWN_PORTS_END`]).
///
/// Joinable (`SO_REUSEPORT`, the agent's user alone) by an agent taking over. It takes no
/// datagram and no connection. A socket already on the port (another service's, or one bound
/// while no agent ran, which the agent must not be kept from starting by) keeps the hold off:
/// it is tried again every [`PORT_HOLD_RETRY`] until it is taken.
pub(super) struct PortHold {
    /// The wildcard addresses not held yet, with their socket type.
    missing: Vec<(SocketAddr, socket2::Type)>,
    held: Vec<socket2::Socket>,
}

/// Ports below this are never held, whoever may bind them: a wildcard on port 53 would keep
/// the node's own DNS services off it (helper-169: with `ip_unprivileged_port_start` at 0, as
/// in a container's namespace, a node-mode agent on port 53 held it, and a stub on
/// `127.0.0.53:53` could not bind).
const WELL_KNOWN_PORTS_END: u16 = 1024;

/// How often a hold kept off is tried again.
const PORT_HOLD_RETRY: Duration = Duration::from_secs(10);

/// The classic BPF instruction that returns a constant: with 0, the socket takes nothing.
const BPF_RET_K: u16 = (libc::BPF_RET | libc::BPF_K) as u16;

impl PortHold {
    /// Takes what it can of the hold of `listeners`' ports, and warns of the rest.
    pub(super) fn take(listeners: &Listeners) -> Self {
        let first_unprivileged = host::first_unprivileged_port();
        let v4 = SocketAddr::from((Ipv4Addr::UNSPECIFIED, listeners.v4.port()));
        let v6 = listeners
            .v6
            .map(|v6| SocketAddr::from((Ipv6Addr::UNSPECIFIED, v6.port())));
        let wildcards: Vec<SocketAddr> = std::iter::once(v4).chain(v6).collect();
        let ports: std::collections::BTreeSet<u16> =
            wildcards.iter().map(SocketAddr::port).collect();
        for port in ports {
            if port < WELL_KNOWN_PORTS_END && port >= first_unprivileged {
                log::warn!(
                    target: LOG,
                    "net.ipv4.ip_unprivileged_port_start is {first_unprivileged}: any user may \
                     bind port {port}, and answer redirected sockets as their servers from a \
                     block address; the agent does not hold a port below 1024, which the \
                     node's own services need (a DNS stub on port 53). Raise the sysctl to 1024"
                );
            }
        }
        let mut hold = Self {
            missing: wildcards
                .into_iter()
                .filter(|wildcard| wildcard.port() >= first_unprivileged.max(WELL_KNOWN_PORTS_END))
                .flat_map(|wildcard| {
                    [socket2::Type::DGRAM, socket2::Type::STREAM].map(|kind| (wildcard, kind))
                })
                .collect(),
            held: Vec::new(),
        };
        for ((wildcard, kind), err) in hold.try_the_missing() {
            log::warn!(
                target: LOG,
                "cannot hold port {port} on every address ({wildcard}/{protocol}): {err}: a \
                 socket of another process is on the port (another service's, or one bound \
                 while no agent ran), and such a socket outside --cgroup could answer \
                 redirected sockets as their servers from a block address. Trying again every \
                 {retry} s; give --listen a port nothing else uses",
                port = wildcard.port(),
                protocol = protocol(kind),
                retry = PORT_HOLD_RETRY.as_secs(),
            );
        }
        hold
    }

    /// Binds each wildcard not held yet; those it could not, and why.
    fn try_the_missing(&mut self) -> Vec<((SocketAddr, socket2::Type), io::Error)> {
        let mut failed = Vec::new();
        for (wildcard, kind) in std::mem::take(&mut self.missing) {
            match hold_socket(wildcard, kind) {
                Ok(socket) => self.held.push(socket),
                Err(err) => {
                    failed.push(((wildcard, kind), err));
                    self.missing.push((wildcard, kind));
                }
            }
        }
        failed
    }

    /// Says in `stats` how much of the hold is kept off.
    pub(super) fn count_missing(&self, stats: &Stats) {
        stats
            .port_holds_missing
            .store(self.missing.len() as u64, Ordering::Relaxed);
    }

    /// Keeps the hold until `stop`, taking what was kept off as soon as it can, and says in
    /// `stats` how much is still kept off after each try ([`PortHold::count_missing`] says it
    /// first, before the agent is ready).
    pub(super) async fn keep(mut self, stop: drain::Signal, stats: Arc<Stats>) {
        while !self.missing.is_empty() {
            let retry = tokio::time::sleep(PORT_HOLD_RETRY);
            if stop.unless_stopped(retry).await.is_none() {
                return;
            }
            let tried = self.missing.clone();
            let failed = self.try_the_missing();
            self.count_missing(&stats);
            for (wildcard, kind) in tried {
                if !failed
                    .iter()
                    .any(|(kept_off, _)| *kept_off == (wildcard, kind))
                {
                    log::info!(
                        target: LOG,
                        "now holding port {} on every address ({wildcard}/{})",
                        wildcard.port(),
                        protocol(kind)
                    );
                }
            }
        }
        stop.stopped().await;
    }
}

fn protocol(kind: socket2::Type) -> &'static str {
    if kind == socket2::Type::STREAM {
        "tcp"
    } else {
        "udp"
    }
}

/// A socket of `kind` bound to `wildcard` that takes nothing (a datagram socket with a filter
/// that drops all, a stream socket that does not listen), joinable by the agent's user.
fn hold_socket(wildcard: SocketAddr, kind: socket2::Type) -> io::Result<socket2::Socket> {
    let socket =
        socket2::Socket::new(socket2::Domain::for_address(wildcard), kind.cloexec(), None)?;
    if wildcard.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    if kind == socket2::Type::DGRAM {
        socket.attach_filter(&[socket2::SockFilter::new(BPF_RET_K, 0, 0, 0)])?;
    }
    socket.set_reuse_port(true)?;
    socket.bind(&wildcard.into())?;
    Ok(socket)
}

/// A TCP listener on `addr`, as tokio's `bind` makes it (SO_REUSEADDR, a backlog of 1024),
/// on a high descriptor (see [`udp_threads::listener_socket`]), and joinable (SO_REUSEPORT)
/// by the agent that takes over from this one: the UDP group, bound first, is what keeps a
/// second agent out. Must run inside a tokio runtime.
fn bind_tcp_listener(addr: SocketAddr, freebind: bool) -> io::Result<TcpListener> {
    let socket =
        udp_threads::listener_socket(socket2::Domain::for_address(addr), socket2::Type::STREAM)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    udp_threads::set_freebind(&socket, addr, freebind)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

/// The metrics listener. Bound alone first, which fails while another agent (or anything
/// else) listens there, so a second agent cannot take this port's scrapes and probes; then
/// joinable (SO_REUSEPORT) by the agent that takes over from this one. With `take_over` it
/// joins the one there: while both run, a request reaches either (`sk_lookup` steers it to
/// the newest), and each says whether it is the one serving.
pub(super) fn bind_metrics_listener(addr: SocketAddr, take_over: bool) -> io::Result<TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM.nonblocking().cloexec(),
        None,
    )?;
    socket.set_reuse_address(true)?;
    if take_over {
        socket.set_reuse_port(true)?;
        socket.bind(&addr.into())?;
    } else {
        socket.bind(&addr.into())?;
        socket.set_reuse_port(true)?;
    }
    socket.listen(128)?;
    TcpListener::from_std(socket.into())
}
