//! Reading the addresses and ports of an IPv4 packet in a cgroup_skb program, whose data
//! starts at the IP header.
use aya_ebpf::programs::SkBuffContext;

/// What the egress program needs of a packet. Addresses and ports in network byte order.
pub struct Ports {
    pub protocol: u8,
    pub src_addr: u32,
    pub dst_addr: u32,
    pub src_port: u16,
    pub dst_port: u16,
}

impl Ports {
    /// `None` unless the packet is IPv4, unfragmented (or its first fragment) and long enough.
    #[inline(always)]
    pub fn parse(ctx: &SkBuffContext) -> Option<Self> {
        let header: [u8; 20] = ctx.load(0).ok()?;
        if header[0] >> 4 != 4 {
            return None;
        }
        let header_len = usize::from(header[0] & 0x0f) * 4;
        // A non-first fragment carries no ports.
        let fragment_offset = u16::from_be_bytes([header[6], header[7]]) & 0x1fff;
        if header_len < 20 || fragment_offset != 0 {
            return None;
        }
        let ports: [u8; 4] = ctx.load(header_len).ok()?;
        Some(Self {
            protocol: header[9],
            src_addr: u32::from_ne_bytes([header[12], header[13], header[14], header[15]]),
            dst_addr: u32::from_ne_bytes([header[16], header[17], header[18], header[19]]),
            src_port: u16::from_ne_bytes([ports[0], ports[1]]),
            dst_port: u16::from_ne_bytes([ports[2], ports[3]]),
        })
    }
}
