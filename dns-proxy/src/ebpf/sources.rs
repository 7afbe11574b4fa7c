//! The source address `connect4` gives the IPv4 sockets of the agent's namespace that it
//! sends to the block (`SOURCE4`): the one the kernel picks here toward the Internet. Found
//! by the agent at start, and again when routes or addresses change.
//!
//! Why: a socket connected to a block address gets its source from the route to the block
//! (127.0.0.1, or on a node the block's own address). `getsockname` would show it (the
//! "which address am I" idiom connects a UDP socket to a public resolver and reads it), and a
//! later `connect` of the same socket elsewhere keeps it: host mode fails with `EINVAL`, and a
//! node's datagrams would leave with a link-local source. Bound to the source toward the
//! Internet, the socket shows and keeps what it would have had without the agent on a node
//! with one uplink; docs/architecture.md says what differs on others.
//!
//! A host firewall may drop what such a socket sends: kube-proxy's `KUBE-FIREWALL` chain
//! drops packets to 127.0.0.0/8 from any other source, and a bound socket's queries to a
//! host-mode block are such packets (helper-131: glibc and TCP lookups all failed, with no
//! word in the log). So a source is used only once a datagram from it has reached the block.
use std::{
    io,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::Duration,
};

use aya::maps::{Array, MapData};
use socket2::{Domain, SockAddr, Socket, Type};

/// Where "toward the Internet" is asked: a public resolver's address, as the idiom asks, on
/// the discard port. Connecting a UDP socket sends nothing; its local address is the source
/// the kernel picks for that route.
const PROBE: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(8, 8, 8, 8)), 9);

/// How long a datagram from the source to the block may take over the loopback device: it is
/// there at once unless something dropped it.
const PROBE_WAIT: Duration = Duration::from_millis(500);

/// The `SOURCE4` map and what was last written there.
pub struct DirectSources {
    map: Array<MapData, u32>,
    /// An address of the IPv4 block: a datagram from the source must reach it.
    block: Ipv4Addr,
    /// What was found last, and written.
    written: Option<Found>,
}

/// What [`DirectSources::find`] found: the source toward the Internet, and whether a datagram
/// from it reached the block (`false`: dropped on the way).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Found {
    source: Option<Ipv4Addr>,
    reaches_block: bool,
}

impl DirectSources {
    /// Takes the map and writes this namespace's source into it.
    pub(super) fn new(map: Array<MapData, u32>, block: Ipv4Addr) -> Self {
        let mut sources = Self {
            map,
            block,
            written: None,
        };
        sources.write(Self::find(block));
        sources
    }

    /// The address of the block a source must reach, for [`DirectSources::find`].
    pub fn block(&self) -> Ipv4Addr {
        self.block
    }

    /// The source the kernel picks now toward the Internet, and whether the block hears it
    /// (blocking: up to [`PROBE_WAIT`] if not).
    pub fn find(block: Ipv4Addr) -> Found {
        let source = source_toward_the_internet();
        let reaches_block = source.is_none_or(|source| match reaches(source, block) {
            Ok(reached) => reached,
            Err(err) => {
                // Not known to be dropped: used, as before the check.
                log::debug!("cannot check that {source} reaches the block at {block}: {err}");
                true
            }
        });
        Found {
            source,
            reaches_block,
        }
    }

    /// Writes what [`DirectSources::find`] found, if it changed: the source, or none (sockets
    /// then keep the source the block's route gives) without a route toward the Internet or
    /// when the block does not hear that source.
    pub fn write(&mut self, found: Found) {
        if self.written == Some(found) {
            return;
        }
        let now = found.source.filter(|_| found.reaches_block);
        let value = now.map_or(0, |ip| u32::from_ne_bytes(ip.octets()));
        if let Err(err) = self.map.set(0, value, 0) {
            log::warn!("cannot write the source of redirected sockets: {err}");
            return;
        }
        match (found.source, now) {
            (_, Some(ip)) => log::info!(
                "redirected IPv4 sockets of this namespace send from {ip}, as toward the Internet"
            ),
            (Some(ip), None) => log::warn!(
                "redirected IPv4 sockets of this namespace send from the block route's source, \
                 not from {ip} as toward the Internet: a datagram from {ip} to the block ({}) \
                 was dropped on the way, by a firewall rule such as kube-proxy's \
                 KUBE-FIREWALL, which drops packets to 127.0.0.0/8 from other sources. \
                 `getsockname` shows the block route's source, and such a socket cannot be \
                 connected elsewhere off this host again",
                self.block
            ),
            (None, None) => log::info!(
                "redirected IPv4 sockets of this namespace send from the block route's source: \
                 no route toward the Internet"
            ),
        }
        self.written = Some(found);
    }
}

/// The local address of a UDP socket connected to [`PROBE`]; `None` without a route there (or
/// with a loopback one).
fn source_toward_the_internet() -> Option<Ipv4Addr> {
    let socket = Socket::new(Domain::IPV4, Type::DGRAM.cloexec(), None).ok()?;
    socket.connect(&SockAddr::from(PROBE)).ok()?;
    match socket.local_addr().ok()?.as_socket()?.ip() {
        IpAddr::V4(ip) if !ip.is_loopback() && !ip.is_unspecified() => Some(ip),
        _ => None,
    }
}

/// Whether a datagram sent from `source` reaches `block`, on a port of its own (not the
/// proxy's: nothing steers it). A firewall's `DROP` in `OUTPUT` fails the send (`EPERM`), one
/// in `INPUT` leaves the receiver waiting.
fn reaches(source: Ipv4Addr, block: Ipv4Addr) -> io::Result<bool> {
    let udp = || Socket::new(Domain::IPV4, Type::DGRAM.cloexec(), None);
    let receiver = udp()?;
    receiver.bind(&SockAddr::from(SocketAddr::from((block, 0))))?;
    let sender = udp()?;
    sender.bind(&SockAddr::from(SocketAddr::from((source, 0))))?;
    let from = sender.local_addr()?.as_socket();
    let probe = b"dns-proxy: does the block hear this source?";
    match sender.send_to(probe, &receiver.local_addr()?) {
        Ok(_) => {}
        Err(err) if err.kind() == io::ErrorKind::PermissionDenied => return Ok(false),
        Err(err) => return Err(err),
    }
    let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 64];
    let deadline = std::time::Instant::now() + PROBE_WAIT;
    loop {
        // Anything else that comes (another process of the namespace found the port) does
        // not make the wait longer.
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Ok(false);
        }
        receiver.set_read_timeout(Some(left))?;
        match receiver.recv_from(&mut buf) {
            Ok((_, sender)) if sender.as_socket() == from => return Ok(true),
            Ok(_) => continue,
            Err(err)
                if matches!(
                    err.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Ok(false);
            }
            Err(err) => return Err(err),
        }
    }
}
