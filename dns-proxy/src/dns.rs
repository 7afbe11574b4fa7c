//! The DNS side of the proxy: listeners, forwarding, and the wire-format helpers they share.
use std::net::SocketAddr;

pub mod stats;
pub mod udp;
pub mod wire;

/// Where a redirected client's query was headed before the kernel sent it here.
pub trait OriginalDestinations: Send + Sync + 'static {
    /// The server that `client` (the source the proxy sees) addressed over `protocol`
    /// (`IPPROTO_UDP` or `IPPROTO_TCP`); `None` if the kernel did not redirect that client.
    fn original_destination(&self, client: SocketAddr, protocol: u8) -> Option<SocketAddr>;
}

impl OriginalDestinations for crate::ebpf::FlowTable {
    fn original_destination(&self, client: SocketAddr, protocol: u8) -> Option<SocketAddr> {
        crate::ebpf::FlowTable::original_destination(self, client, protocol)
    }
}
