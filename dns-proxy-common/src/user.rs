//! The userspace side: `aya::Pod` for every map type, the one place where the kernel's
//! network-order words become `std::net` types and back, and the address blocks that encode
//! server indexes.
extern crate std;

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    string::String,
};

use crate::{
    AF_INET, AF_INET6, AgentRecord, CgroupOffsets, CgroupPath, Endpoint, MAX_INDEX, Origin,
    RedirectConfig, ServingKey,
};

// aya copies map keys and values as raw bytes, which is sound for a type that is #[repr(C)],
// Copy, made only of integers (and arrays of them) and free of implicit padding: any bit
// pattern is a valid value and no byte is uninitialised. Padding is in explicit fields, and
// lib.rs asserts each size.
// SAFETY: `Endpoint` is `[u32; 4]`, `u16`, `u16`: 20 bytes, no padding (asserted).
unsafe impl aya::Pod for Endpoint {}
// SAFETY: `Origin` is an `Endpoint`, an explicit `u32` of padding and a `u64`: 32 bytes, the
// `u64` aligned at 24, no implicit padding (asserted).
unsafe impl aya::Pod for Origin {}
// SAFETY: `RedirectConfig` is integers and integer arrays laid out without gaps (an explicit
// `[u8; 2]` fills the one there would be): 64 bytes (asserted).
unsafe impl aya::Pod for RedirectConfig {}
// SAFETY: `AgentRecord` is two `u64`s, a `u16` and an explicit `[u8; 6]` of padding: 24
// bytes (asserted).
unsafe impl aya::Pod for AgentRecord {}
// SAFETY: `ServingKey` is a `u64`, a `u16`, two `u8`s and an explicit `[u8; 4]` of padding:
// 16 bytes (asserted).
unsafe impl aya::Pod for ServingKey {}
// SAFETY: `CgroupPath` is two `u32`s, a `u64` at 8 and a byte array whose length is a
// multiple of 8: no implicit padding (asserted).
unsafe impl aya::Pod for CgroupPath {}
// SAFETY: `CgroupOffsets` is four `u32`s: 16 bytes (asserted).
unsafe impl aya::Pod for CgroupOffsets {}

/// The kernel keeps an IPv4 address as the u32 whose in-memory bytes are the octets.
fn ipv4_to_word(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
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

impl From<SocketAddr> for Endpoint {
    fn from(addr: SocketAddr) -> Self {
        let port = addr.port().to_be();
        match addr.ip() {
            IpAddr::V4(v4) => Self::v4(ipv4_to_word(v4), port),
            IpAddr::V6(v6) => Self::v6(ipv6_to_words(v6), port),
        }
    }
}

impl Endpoint {
    /// The endpoint as a socket address; `None` for an unset or unknown family. A v4-mapped
    /// IPv6 address (what a dual-stack socket uses for an IPv4 server) comes out as IPv4.
    pub fn to_socket_addr(&self) -> Option<SocketAddr> {
        let ip = match self.family {
            AF_INET => IpAddr::V4(Ipv4Addr::from(self.addr[0].to_ne_bytes())),
            AF_INET6 => IpAddr::V6(words_to_ipv6(self.addr)).to_canonical(),
            _ => return None,
        };
        Some(SocketAddr::new(ip, u16::from_be(self.port)))
    }
}

/// A block of addresses, one per server index: index `i` is the block's first address plus
/// `i`. IPv4 blocks are /16 to /30, IPv6 blocks /112 to /126, so an index fits in 16 bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AddressBlock {
    first: IpAddr,
    prefix_len: u8,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockError(String);

impl fmt::Display for BlockError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BlockError {}

impl AddressBlock {
    /// A block from its first address and prefix length.
    pub fn new(first: IpAddr, prefix_len: u8) -> Result<Self, BlockError> {
        let (bits, min, max) = match first {
            IpAddr::V4(_) => (32, 16, 30),
            IpAddr::V6(_) => (128, 112, 126),
        };
        if !(min..=max).contains(&prefix_len) {
            return Err(BlockError(std::format!(
                "{first}/{prefix_len}: the prefix must be /{min} to /{max} (at most 65,534 \
                 servers, at least 2)"
            )));
        }
        let block = Self { first, prefix_len };
        if block.host_part(first) != 0 {
            return Err(BlockError(std::format!(
                "{first}/{prefix_len}: the address must be the block's first (its last {} \
                 bits zero)",
                bits - prefix_len
            )));
        }
        Ok(block)
    }

    pub fn first(&self) -> IpAddr {
        self.first
    }

    pub fn prefix_len(&self) -> u8 {
        self.prefix_len
    }

    pub fn is_ipv4(&self) -> bool {
        self.first.is_ipv4()
    }

    /// The highest index: the block's size less its first and last addresses.
    pub fn capacity(&self) -> u32 {
        let bits = self.total_bits() - u32::from(self.prefix_len);
        ((1u32 << bits) - 2).min(MAX_INDEX)
    }

    /// The address of index `index` (1 to [`capacity`](Self::capacity)).
    pub fn address(&self, index: u32) -> IpAddr {
        match self.first {
            IpAddr::V4(v4) => IpAddr::V4(Ipv4Addr::from(u32::from(v4) + index)),
            IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from(u128::from(v6) + u128::from(index))),
        }
    }

    /// The index `ip` encodes, if it is an address of this block that encodes one. A
    /// v4-mapped IPv6 address counts as the IPv4 address.
    pub fn index_of(&self, ip: IpAddr) -> Option<u32> {
        let ip = ip.to_canonical();
        if ip.is_ipv4() != self.first.is_ipv4() || !self.contains(ip) {
            return None;
        }
        let index = self.host_part(ip) as u32;
        (1..=self.capacity()).contains(&index).then_some(index)
    }

    /// Whether `ip` is in the block (of the same family).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let shift = self.total_bits() - u32::from(self.prefix_len);
        match (self.first, ip.to_canonical()) {
            (IpAddr::V4(first), IpAddr::V4(ip)) => {
                u32::from(first) >> shift == u32::from(ip) >> shift
            }
            (IpAddr::V6(first), IpAddr::V6(ip)) => {
                u128::from(first) >> shift == u128::from(ip) >> shift
            }
            _ => false,
        }
    }

    fn total_bits(&self) -> u32 {
        if self.first.is_ipv4() { 32 } else { 128 }
    }

    fn host_part(&self, ip: IpAddr) -> u128 {
        let bits = self.total_bits() - u32::from(self.prefix_len);
        let mask = (1u128 << bits) - 1;
        match ip {
            IpAddr::V4(v4) => u128::from(u32::from(v4)) & mask,
            IpAddr::V6(v6) => u128::from(v6) & mask,
        }
    }
}

impl core::str::FromStr for AddressBlock {
    type Err = BlockError;

    /// `ADDR/LEN`, e.g. `127.53.0.0/16` or `fd53:6e73:6470::/112`.
    fn from_str(text: &str) -> Result<Self, BlockError> {
        let bad = || BlockError(std::format!("{text}: expected ADDRESS/PREFIX-LENGTH"));
        let (addr, len) = text.split_once('/').ok_or_else(bad)?;
        let first: IpAddr = addr.parse().map_err(|_| bad())?;
        let prefix_len: u8 = len.parse().map_err(|_| bad())?;
        Self::new(first, prefix_len)
    }
}

impl fmt::Display for AddressBlock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.first, self.prefix_len)
    }
}

/// Servers whose sockets are left alone (`--exclude-server`): an address, or a prefix of
/// either family (`ADDR/LEN`). An IPv4 prefix also holds the v4-mapped addresses of a
/// dual-stack socket asking an IPv4 server; an IPv6 prefix holds IPv6 servers only.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServerPrefix {
    addr: IpAddr,
    prefix_len: u8,
}

impl ServerPrefix {
    /// The `EXCLUDED_SERVERS` key: the prefix length in the trie's bits (the family's word
    /// always matched), and the data ([`crate::server_prefix_data`]).
    pub fn trie_key(&self) -> (u32, crate::ServerPrefixData) {
        let server = Endpoint::from(SocketAddr::new(self.addr, 0));
        let prefix_len = crate::SERVER_FAMILY_BITS + u32::from(self.prefix_len);
        (prefix_len, crate::server_prefix_data(&server))
    }

    /// Whether it holds every server of its family (`0.0.0.0/0`, `::/0`).
    pub fn is_everything(&self) -> bool {
        self.prefix_len == 0
    }
}

impl core::str::FromStr for ServerPrefix {
    type Err = BlockError;

    /// `ADDR` (one server) or `ADDR/LEN`, e.g. `10.88.0.1`, `10.88.0.0/16`, `fd00::/8`.
    fn from_str(text: &str) -> Result<Self, BlockError> {
        let bad = || {
            BlockError(std::format!(
                "{text}: expected ADDRESS or ADDRESS/PREFIX-LENGTH"
            ))
        };
        let (addr, len) = match text.split_once('/') {
            Some((addr, len)) => (addr, Some(len)),
            None => (text, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| bad())?;
        if let IpAddr::V6(v6) = addr
            && v6.to_ipv4_mapped().is_some()
        {
            return Err(BlockError(std::format!(
                "{text}: write an IPv4 server as IPv4 (it covers the v4-mapped form too)"
            )));
        }
        let bits = if addr.is_ipv4() { 32 } else { 128 };
        let prefix_len = match len {
            Some(len) => len.parse::<u8>().map_err(|_| bad())?,
            None => bits,
        };
        if prefix_len > bits {
            return Err(BlockError(std::format!(
                "{text}: the prefix must be at most /{bits}"
            )));
        }
        let host_bits = u32::from(bits - prefix_len);
        let host_part = match addr {
            IpAddr::V4(v4) => u128::from(u32::from(v4)),
            IpAddr::V6(v6) => u128::from(v6),
        } & 1u128
            .checked_shl(host_bits)
            .map_or(u128::MAX, |bit| bit - 1);
        if host_part != 0 {
            return Err(BlockError(std::format!(
                "{text}: the address has bits set past the prefix (its last {host_bits} bits \
                 must be zero)"
            )));
        }
        Ok(Self { addr, prefix_len })
    }
}

impl fmt::Display for ServerPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

impl RedirectConfig {
    /// IPv4 sockets (and v4-mapped destinations) go to `block4` on `port4`; IPv6 ones to
    /// `block6` on `port6`, or nowhere when it is `None`.
    pub fn new(
        agent_netns: u64,
        redirected_cgroup: u64,
        block4: (AddressBlock, u16),
        block6: Option<(AddressBlock, u16)>,
        udp_sockets: u16,
        foreign_namespaces: bool,
        metrics: Option<SocketAddr>,
    ) -> Self {
        let (v4, port4) = block4;
        let IpAddr::V4(first4) = v4.first() else {
            unreachable!("the IPv4 block is IPv4")
        };
        let (block6_words, capacity6, port6) = match block6 {
            Some((v6, port6)) => {
                let IpAddr::V6(first6) = v6.first() else {
                    unreachable!("the IPv6 block is IPv6")
                };
                (ipv6_to_words(first6), v6.capacity(), port6.to_be())
            }
            None => ([0; 4], 0, 0),
        };
        Self {
            agent_netns,
            redirected_cgroup,
            block6: block6_words,
            block4: ipv4_to_word(first4),
            capacity4: v4.capacity(),
            capacity6,
            port4: port4.to_be(),
            port6,
            udp_sockets,
            foreign_namespaces: u8::from(foreign_namespaces),
            metrics_family: match metrics {
                Some(SocketAddr::V4(_)) => AF_INET as u8,
                Some(SocketAddr::V6(_)) => AF_INET6 as u8,
                None => 0,
            },
            metrics_port: metrics.map_or(0, |addr| addr.port()),
            _padding: [0; 2],
            metrics_addr: metrics.map_or([0; 4], |addr| Endpoint::from(addr).addr),
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.to_socket_addr() {
            Some(addr) => write!(f, "{addr}"),
            None => f.write_str("(none)"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{net::SocketAddr, string::ToString as _};

    use super::*;

    #[test]
    #[expect(deprecated, reason = "core's SipHasher, SipHash-2-4, is the reference")]
    fn siphash_2_4_is_the_reference_one() {
        use core::hash::{Hasher as _, SipHasher};

        use crate::siphash_2_4;
        let message = [
            0x0706_0504_0302_0100,
            0x0f0e_0d0c_0b0a_0908,
            0x1716_1514_1312_1110,
            0x1f1e_1d1c_1b1a_1918,
        ];
        let key = [0x0706_0504_0302_0100, 0x0f0e_0d0c_0b0a_0908];
        for (key, message) in [(key, message), ([1, 2], [u64::MAX, 0, 7, 1 << 63])] {
            let mut reference = SipHasher::new_with_keys(key[0], key[1]);
            for word in message {
                reference.write(&word.to_le_bytes());
            }
            assert_eq!(siphash_2_4(key, message), reference.finish());
        }
    }

    #[test]
    fn an_origins_slot_hash_depends_on_the_key_and_every_field() {
        use crate::Origin;
        let origin = Origin::new(
            Endpoint::from("192.0.2.10:53".parse::<SocketAddr>().unwrap()),
            7,
        );
        let key = [0x1234, 0x5678];
        let hash = origin.slot_hash(key);
        assert_ne!(origin.slot_hash([0x1234, 0x5679]), hash);
        let mut other = origin;
        other.cgroup_id = 8;
        assert_ne!(other.slot_hash(key), hash);
        let mut other = origin;
        other.server.port = 54_u16.to_be();
        assert_ne!(other.slot_hash(key), hash);
        let mut other = origin;
        other.server.addr[3] = 1;
        assert_ne!(other.slot_hash(key), hash);
    }

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
    fn local_only_servers_are_loopback_and_unspecified_of_both_families() {
        let local =
            |text: &str| Endpoint::from(text.parse::<SocketAddr>().unwrap()).is_local_only();
        for text in [
            "127.0.0.1:53",
            "127.0.0.53:53",
            "127.255.0.9:53",
            "0.0.0.0:53",
            "[::1]:53",
            "[::]:53",
        ] {
            assert!(local(text), "{text}");
        }
        for text in [
            "10.96.0.10:53",
            "128.0.0.1:53",
            "[2001:db8::1]:53",
            "[::2]:53",
        ] {
            assert!(!local(text), "{text}");
        }
        assert!(local("[::ffff:127.0.0.1]:53") && local("[::ffff:0.0.0.0]:53"));
        assert!(!local("[::ffff:10.0.0.1]:53"));
    }

    #[test]
    fn blocks_encode_indexes_as_addresses_and_back() {
        let v4: AddressBlock = "127.53.0.0/16".parse().unwrap();
        assert_eq!(v4.capacity(), 65_534);
        assert_eq!(v4.address(1), "127.53.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(v4.address(258), "127.53.1.2".parse::<IpAddr>().unwrap());
        assert_eq!(v4.index_of("127.53.1.2".parse().unwrap()), Some(258));
        assert_eq!(v4.index_of("::ffff:127.53.1.2".parse().unwrap()), Some(258));
        assert_eq!(v4.index_of("127.53.0.0".parse().unwrap()), None);
        assert_eq!(v4.index_of("127.53.255.255".parse().unwrap()), None);
        assert_eq!(v4.index_of("127.54.0.1".parse().unwrap()), None);
        assert_eq!(v4.index_of("127.0.0.1".parse().unwrap()), None);

        let node: AddressBlock = "169.254.53.0/24".parse().unwrap();
        assert_eq!(node.capacity(), 254);
        assert_eq!(node.index_of("169.254.53.254".parse().unwrap()), Some(254));

        let v6: AddressBlock = "fd53:6e73:6470::/112".parse().unwrap();
        assert_eq!(v6.capacity(), 65_534);
        assert_eq!(
            v6.address(0x102),
            "fd53:6e73:6470::102".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            v6.index_of("fd53:6e73:6470::102".parse().unwrap()),
            Some(0x102)
        );
        assert_eq!(v6.index_of("127.53.1.2".parse().unwrap()), None);
    }

    #[test]
    fn blocks_that_cannot_encode_an_index_are_refused_with_the_reason() {
        for (text, says) in [
            ("127.53.0.0/8", "/16 to /30"),
            ("127.53.0.1/16", "first"),
            ("fd00::/64", "/112 to /126"),
            ("127.53.0.0", "ADDRESS/PREFIX-LENGTH"),
        ] {
            let err = text.parse::<AddressBlock>().unwrap_err().to_string();
            assert!(err.contains(says), "{text}: {err}");
        }
    }

    #[test]
    fn redirect_config_is_network_order() {
        let config = RedirectConfig::new(
            7,
            9,
            ("127.53.0.0/16".parse().unwrap(), 8053),
            Some(("fd53:6e73:6470::/112".parse().unwrap(), 8054)),
            2,
            false,
            Some("127.0.0.1:9253".parse().unwrap()),
        );
        assert_eq!(
            (config.metrics_family, config.metrics_port),
            (AF_INET as u8, 9253)
        );
        assert_eq!(config.metrics_addr[0].to_ne_bytes(), [127, 0, 0, 1]);
        assert_eq!(config.block4.to_ne_bytes(), [127, 53, 0, 0]);
        assert_eq!(config.port4.to_ne_bytes(), 8053u16.to_be_bytes());
        assert_eq!(config.port6.to_ne_bytes(), 8054u16.to_be_bytes());
        assert_eq!(config.block6[0].to_ne_bytes(), [0xfd, 0x53, 0x6e, 0x73]);
        assert_eq!((config.capacity4, config.capacity6), (65_534, 65_534));
        let v4_only = RedirectConfig::new(
            7,
            9,
            ("169.254.53.0/24".parse().unwrap(), 53),
            None,
            2,
            true,
            None,
        );
        assert_eq!(v4_only.metrics_family, 0);
        assert_eq!(
            (v4_only.port6, v4_only.capacity6, v4_only.capacity4),
            (0, 0, 254)
        );
        assert_eq!(v4_only.foreign_namespaces, 1);
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

    #[test]
    fn excluded_servers_are_trie_keys_of_their_family() {
        let one: ServerPrefix = "10.88.0.1".parse().unwrap();
        let (len, data) = one.trie_key();
        assert_eq!(len, 32 + 32);
        assert_eq!(data[0], (AF_INET as u32).to_be());
        assert_eq!(data[1].to_ne_bytes(), [10, 88, 0, 1]);
        assert_eq!(data[2..], [0, 0, 0]);
        // A dual-stack socket's v4-mapped server is looked up as the IPv4 server it is.
        let server = Endpoint::from("10.88.0.1:53".parse::<SocketAddr>().unwrap());
        assert_eq!(crate::server_prefix_data(&server), data);

        let net: ServerPrefix = "10.88.0.0/16".parse().unwrap();
        assert_eq!(net.trie_key().0, 32 + 16);
        assert_eq!(net.to_string(), "10.88.0.0/16");
        let v6: ServerPrefix = "fd00:53::/32".parse().unwrap();
        let (len, data) = v6.trie_key();
        assert_eq!(len, 32 + 32);
        assert_eq!(data[0], (AF_INET6 as u32).to_be());
        assert_eq!(data[1].to_ne_bytes(), [0xfd, 0x00, 0x00, 0x53]);
        // Every IPv6 server, and no IPv4 one: the family word is matched in full.
        let all6: ServerPrefix = "::/0".parse().unwrap();
        assert_eq!(
            all6.trie_key(),
            (32, [(AF_INET6 as u32).to_be(), 0, 0, 0, 0])
        );
        assert!(all6.is_everything() && !v6.is_everything());
    }

    #[test]
    fn excluded_servers_that_cannot_be_meant_are_refused_with_the_reason() {
        for (text, reason) in [
            ("10.88.0.1/16", "bits set past the prefix"),
            ("10.88.0.0/33", "at most /32"),
            ("fd00::1/64", "bits set past the prefix"),
            ("::ffff:10.0.0.1", "write an IPv4 server as IPv4"),
            ("10.88.0.0:53", "expected ADDRESS"),
            ("dns.example", "expected ADDRESS"),
            ("10.88.0.0/x", "expected ADDRESS"),
        ] {
            let err = text.parse::<ServerPrefix>().unwrap_err().to_string();
            assert!(err.contains(reason), "{text}: {err}");
        }
    }
}
