//! Reading the addresses and ports of an IPv4 or IPv6 packet in a cgroup_skb program, whose
//! data starts at the IP header.
use aya_ebpf::programs::SkBuffContext;
use dns_proxy_common::{AF_INET, AF_INET6};

/// What the egress program needs of a packet. Addresses as in `Endpoint::addr`, ports in
/// network byte order.
pub struct Flow {
    pub family: u16,
    pub protocol: u8,
    pub src_addr: [u32; 4],
    pub dst_addr: [u32; 4],
    pub src_port: u16,
    pub dst_port: u16,
}

const IPV6_HEADER_LEN: usize = 40;

impl Flow {
    /// `None` unless the packet is IPv4 (unfragmented, or its first fragment) or IPv6 whose
    /// first header is the transport's (DNS traffic carries no extension headers).
    #[inline(always)]
    pub fn parse(ctx: &SkBuffContext) -> Option<Self> {
        let first: u8 = ctx.load(0).ok()?;
        match first >> 4 {
            4 => Self::parse_ipv4(ctx),
            6 => Self::parse_ipv6(ctx),
            _ => None,
        }
    }

    #[inline(always)]
    fn parse_ipv4(ctx: &SkBuffContext) -> Option<Self> {
        let header: [u8; 20] = ctx.load(0).ok()?;
        let header_len = usize::from(header[0] & 0x0f) * 4;
        // A non-first fragment carries no ports.
        let fragment_offset = u16::from_be_bytes([header[6], header[7]]) & 0x1fff;
        if header_len < 20 || fragment_offset != 0 {
            return None;
        }
        let ports: [u8; 4] = ctx.load(header_len).ok()?;
        let word = |at: usize| {
            u32::from_ne_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]])
        };
        Some(Self {
            family: AF_INET,
            protocol: header[9],
            src_addr: [word(12), 0, 0, 0],
            dst_addr: [word(16), 0, 0, 0],
            src_port: u16::from_ne_bytes([ports[0], ports[1]]),
            dst_port: u16::from_ne_bytes([ports[2], ports[3]]),
        })
    }

    #[inline(always)]
    fn parse_ipv6(ctx: &SkBuffContext) -> Option<Self> {
        let header: [u32; 10] = ctx.load(0).ok()?;
        let next_header: u8 = ctx.load(6).ok()?;
        let ports: [u16; 2] = ctx.load(IPV6_HEADER_LEN).ok()?;
        Some(Self {
            family: AF_INET6,
            protocol: next_header,
            src_addr: [header[2], header[3], header[4], header[5]],
            dst_addr: [header[6], header[7], header[8], header[9]],
            src_port: ports[0],
            dst_port: ports[1],
        })
    }
}
