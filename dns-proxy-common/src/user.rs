//! The userspace side: `aya::Pod` for every map type, and the one place where the kernel's
//! network-order words become `std::net` types and back.
extern crate std;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

use crate::{AF_INET, AF_INET6, Endpoint, FlowKey, RedirectTarget, SocketRecord};

// SAFETY: all four are #[repr(C)], Copy, made only of integers, and have no implicit padding
// (sizes are asserted in lib.rs), so any bit pattern is a valid value.
unsafe impl aya::Pod for Endpoint {}
unsafe impl aya::Pod for FlowKey {}
unsafe impl aya::Pod for SocketRecord {}
unsafe impl aya::Pod for RedirectTarget {}

/// The kernel keeps an IPv4 address as the u32 whose in-memory bytes are the octets.
fn ipv4_to_words(ip: Ipv4Addr) -> [u32; 4] {
    [u32::from_ne_bytes(ip.octets()), 0, 0, 0]
}

fn ipv6_to_words(ip: Ipv6Addr) -> [u32; 4] {
    let o = ip.octets();
    core::array::from_fn(|i| {
        u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]])
    })
}

fn words_to_ipv6(words: [u32; 4]) -> Ipv6Addr {
    let mut octets = [0u8; 16];
    for (chunk, word) in octets.chunks_exact_mut(4).zip(words) {
        chunk.copy_from_slice(&word.to_ne_bytes());
    }
    Ipv6Addr::from(octets)
}

fn ip_to_words(ip: IpAddr) -> ([u32; 4], u16) {
    match ip {
        IpAddr::V4(v4) => (ipv4_to_words(v4), AF_INET),
        IpAddr::V6(v6) => (ipv6_to_words(v6), AF_INET6),
    }
}

fn words_to_ip(words: [u32; 4], family: u16) -> Option<IpAddr> {
    match family {
        AF_INET => Some(IpAddr::V4(Ipv4Addr::from(words[0].to_ne_bytes()))),
        AF_INET6 => Some(IpAddr::V6(words_to_ipv6(words))),
        _ => None,
    }
}

impl From<SocketAddr> for Endpoint {
    fn from(addr: SocketAddr) -> Self {
        let (words, family) = ip_to_words(addr.ip());
        Self {
            addr: words,
            port: addr.port().to_be(),
            family,
        }
    }
}

impl Endpoint {
    /// The endpoint as a socket address; `None` for an unset or unknown family. A v4-mapped
    /// IPv6 address (what a dual-stack socket uses for an IPv4 server) comes out as IPv4.
    pub fn to_socket_addr(&self) -> Option<SocketAddr> {
        let ip = match words_to_ip(self.addr, self.family)? {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
            v4 => v4,
        };
        Some(SocketAddr::new(ip, u16::from_be(self.port)))
    }
}

impl FlowKey {
    /// The key under which the kernel records the client that reached the proxy from
    /// `client` over `protocol` ([`crate::IPPROTO_UDP`] or [`crate::IPPROTO_TCP`]).
    pub fn new(client: SocketAddr, protocol: u8) -> Self {
        // A v4-mapped peer on a dual-stack listener is an IPv4 client to the kernel side.
        let ip = match client.ip() {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
            v4 => v4,
        };
        let (words, family) = ip_to_words(ip);
        Self {
            client_addr: words,
            client_port: client.port().to_be(),
            family: family as u8,
            protocol,
        }
    }
}

impl RedirectTarget {
    /// IPv4 clients go to `ipv4`; IPv6 clients to `ipv6`, or nowhere when it is `None`.
    pub fn new(ipv4: SocketAddrV4, ipv6: Option<SocketAddrV6>) -> Self {
        Self {
            ipv4: ipv4_to_words(*ipv4.ip())[0],
            port: ipv4.port().to_be(),
            port6: ipv6.map_or(0, |v6| v6.port().to_be()),
            ipv6: ipv6.map_or([0; 4], |v6| ipv6_to_words(*v6.ip())),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;
    use crate::IPPROTO_UDP;

    #[test]
    fn ipv4_endpoint_matches_kernel_layout_and_round_trips() {
        let addr: SocketAddr = "192.0.2.10:53".parse().unwrap();
        let endpoint = Endpoint::from(addr);
        // In memory the kernel's user_ip4 holds the octets in order, user_port is big-endian.
        assert_eq!(endpoint.addr[0].to_ne_bytes(), [192, 0, 2, 10]);
        assert_eq!(endpoint.port.to_ne_bytes(), [0, 53]);
        assert_eq!(endpoint.family, AF_INET);
        assert_eq!(endpoint.to_socket_addr(), Some(addr));
        assert_eq!(Endpoint::v4(endpoint.addr[0], endpoint.port), endpoint);
    }

    #[test]
    fn ipv6_endpoint_round_trips() {
        let addr: SocketAddr = "[2001:db8::1:2]:5353".parse().unwrap();
        let endpoint = Endpoint::from(addr);
        assert_eq!(endpoint.addr[0].to_ne_bytes(), [0x20, 0x01, 0x0d, 0xb8]);
        assert_eq!(endpoint.addr[3].to_ne_bytes(), [0, 1, 0, 2]);
        assert_eq!(endpoint.family, AF_INET6);
        assert_eq!(endpoint.to_socket_addr(), Some(addr));
    }

    #[test]
    fn unset_endpoint_has_no_socket_addr() {
        assert_eq!(Endpoint::default().to_socket_addr(), None);
        assert!(!Endpoint::default().is_set());
    }

    #[test]
    fn flow_key_treats_v4_mapped_clients_as_ipv4() {
        let plain = FlowKey::new("127.0.0.1:40000".parse().unwrap(), IPPROTO_UDP);
        let mapped = FlowKey::new("[::ffff:127.0.0.1]:40000".parse().unwrap(), IPPROTO_UDP);
        assert_eq!(plain, mapped);
        assert_eq!(plain.family, AF_INET as u8);
        assert_eq!(plain.client_port.to_ne_bytes(), 40000u16.to_be_bytes());
    }

    #[test]
    fn flow_keys_differ_by_client_address_port_and_protocol() {
        let a = FlowKey::new("10.1.0.2:40000".parse().unwrap(), IPPROTO_UDP);
        let b = FlowKey::new("10.2.0.2:40000".parse().unwrap(), IPPROTO_UDP);
        let c = FlowKey::new("10.1.0.2:40001".parse().unwrap(), IPPROTO_UDP);
        let d = FlowKey::new("10.1.0.2:40000".parse().unwrap(), crate::IPPROTO_TCP);
        assert!(a != b && a != c && a != d);
    }

    #[test]
    fn redirect_target_is_network_order() {
        let v4 = "127.0.0.1:8053".parse().unwrap();
        let target = RedirectTarget::new(v4, Some("[::1]:8054".parse().unwrap()));
        assert_eq!(target.ipv4.to_ne_bytes(), [127, 0, 0, 1]);
        assert_eq!(target.port.to_ne_bytes(), 8053u16.to_be_bytes());
        assert_eq!(target.port6.to_ne_bytes(), 8054u16.to_be_bytes());
        assert_eq!(target.ipv6[3].to_ne_bytes(), [0, 0, 0, 1]);
        let v4_only = RedirectTarget::new(v4, None);
        assert_eq!((v4_only.port6, v4_only.ipv6), (0, [0; 4]));
    }

    #[test]
    fn v4_mapped_endpoints_come_out_as_ipv4() {
        let mapped: SocketAddr = "[::ffff:192.0.2.2]:53".parse().unwrap();
        let endpoint = Endpoint::from(mapped);
        assert_eq!(endpoint.family, AF_INET6);
        assert_eq!(endpoint.addr[..3], crate::v4_mapped_prefix());
        assert_eq!(
            endpoint.to_socket_addr(),
            Some("192.0.2.2:53".parse().unwrap())
        );
    }
}
