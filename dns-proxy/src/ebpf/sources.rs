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
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use aya::maps::{Array, MapData};
use socket2::{Domain, SockAddr, Socket, Type};

/// Where "toward the Internet" is asked: a public resolver's address, as the idiom asks, on
/// the discard port. Connecting a UDP socket sends nothing; its local address is the source
/// the kernel picks for that route.
const PROBE: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(8, 8, 8, 8)), 9);

/// The `SOURCE4` map and what was last written there.
pub struct DirectSources {
    map: Array<MapData, u32>,
    written: Option<Option<Ipv4Addr>>,
}

impl DirectSources {
    /// Takes the map and writes this namespace's source into it.
    pub(super) fn new(map: Array<MapData, u32>) -> Self {
        let mut sources = Self { map, written: None };
        sources.refresh();
        sources
    }

    /// Writes the source the kernel picks now toward the Internet, if it changed (none
    /// without a route there: sockets then keep the source the block's route gives).
    pub fn refresh(&mut self) {
        let now = source_toward_the_internet();
        if self.written == Some(now) {
            return;
        }
        let value = now.map_or(0, |ip| u32::from_ne_bytes(ip.octets()));
        if let Err(err) = self.map.set(0, value, 0) {
            log::warn!("cannot write the source of redirected sockets: {err}");
            return;
        }
        match now {
            Some(ip) => log::info!(
                "redirected IPv4 sockets of this namespace send from {ip}, as toward the Internet"
            ),
            None => log::info!(
                "redirected IPv4 sockets of this namespace send from the block route's source: \
                 no route toward the Internet"
            ),
        }
        self.written = Some(now);
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
