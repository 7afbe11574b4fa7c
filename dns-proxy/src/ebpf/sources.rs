//! The source addresses `connect4/6` give the sockets of the agent's namespace that they send
//! to the block (`SOURCES`): the ones a socket would send from toward the default route, as
//! the kernel picks them here. Kept by the agent, and again when routes or addresses change.
//!
//! Why: a socket connected to a block address gets its source from the route to the block
//! (127.0.0.1, or on a node the block's own address). `getsockname` would show it (the
//! "which address am I" idiom connects a UDP socket to a public resolver and reads it), and a
//! later `connect` of the same socket elsewhere keeps it: host mode fails with `EINVAL`, and a
//! node's datagrams would leave with a link-local source. Bound to the default route's
//! source, the socket shows and keeps what it would have had without the agent on a node
//! with one uplink; on a node with several, a server reached through another one shows the
//! default route's source instead of that uplink's (still a local address, which the kernel
//! routes from).
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use aya::maps::{Array, MapData};
use dns_proxy_common::SourceSlot;
use socket2::{Domain, SockAddr, Socket, Type};

/// Addresses only a default route reaches on a usual node (public resolvers'), on the
/// discard port: connecting a UDP socket to one sends nothing, and its local address is the
/// source the kernel picks.
const PROBE4: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(8, 8, 8, 8)), 9);
const PROBE6: SocketAddr = SocketAddr::new(
    IpAddr::V6(Ipv6Addr::new(0x2001, 0x4860, 0x4860, 0, 0, 0, 0, 0x8888)),
    9,
);

/// The `SOURCES` map and what was last written there.
pub struct DirectSources {
    map: Array<MapData, [u32; 4]>,
    written: (Option<Ipv4Addr>, Option<Ipv6Addr>),
}

impl DirectSources {
    /// Takes the map and writes this namespace's sources into it.
    pub(super) fn new(map: Array<MapData, [u32; 4]>) -> Self {
        let mut sources = Self {
            map,
            written: (None, None),
        };
        sources.refresh();
        sources
    }

    /// Writes the sources the kernel picks now toward the default route, if they changed
    /// (none, without such a route: sockets then keep the source the block's route gives).
    pub fn refresh(&mut self) {
        let now = (default_source_v4(), default_source_v6());
        if now == self.written {
            return;
        }
        let v4 = now
            .0
            .map_or([0; 4], |ip| [u32::from_ne_bytes(ip.octets()), 0, 0, 0]);
        let v6 = now.1.map_or([0; 4], |ip| words(ip.octets()));
        for (slot, value) in [(SourceSlot::V4, v4), (SourceSlot::V6, v6)] {
            if let Err(err) = self.map.set(slot as u32, value, 0) {
                log::warn!("cannot write the sources of redirected sockets: {err}");
                return;
            }
        }
        log::info!(
            "redirected sockets of this namespace send from {} (IPv4) and {} (IPv6), as toward \
             the default route",
            shown(now.0),
            shown(now.1),
        );
        self.written = now;
    }
}

fn shown(ip: Option<impl Into<IpAddr>>) -> String {
    ip.map_or_else(
        || "the block's route's source (no default route)".to_owned(),
        |ip| ip.into().to_string(),
    )
}

/// Network-order words of an IPv6 address, as the programs read `user_ip6`.
fn words(octets: [u8; 16]) -> [u32; 4] {
    std::array::from_fn(|i| {
        u32::from_ne_bytes([
            octets[4 * i],
            octets[4 * i + 1],
            octets[4 * i + 2],
            octets[4 * i + 3],
        ])
    })
}

fn default_source_v4() -> Option<Ipv4Addr> {
    match probe(PROBE4)? {
        IpAddr::V4(ip) if !ip.is_loopback() && !ip.is_unspecified() => Some(ip),
        _ => None,
    }
}

/// A link-local source is left out: binding one needs its interface, which the programs
/// do not pass.
fn default_source_v6() -> Option<Ipv6Addr> {
    match probe(PROBE6)? {
        IpAddr::V6(ip)
            if !ip.is_loopback() && !ip.is_unspecified() && !ip.is_unicast_link_local() =>
        {
            Some(ip)
        }
        _ => None,
    }
}

/// The local address of a UDP socket connected to `to`; `None` without a route there.
fn probe(to: SocketAddr) -> Option<IpAddr> {
    let socket = Socket::new(Domain::for_address(to), Type::DGRAM.cloexec(), None).ok()?;
    socket.connect(&SockAddr::from(to)).ok()?;
    Some(socket.local_addr().ok()?.as_socket()?.ip())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_are_in_network_order_as_the_programs_read_them() {
        let ip: Ipv6Addr = "2001:db8::1".parse().unwrap();
        let [first, .., last] = words(ip.octets());
        assert_eq!(first.to_ne_bytes(), [0x20, 0x01, 0x0d, 0xb8]);
        assert_eq!(last.to_ne_bytes(), [0, 0, 0, 1]);
    }
}
