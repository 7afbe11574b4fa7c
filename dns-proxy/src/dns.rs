//! The DNS side of the proxy: listeners, forwarding, and the wire-format helpers they share.
use std::{net::SocketAddr, sync::Arc, time::Duration};

mod mmsg;
pub mod stats;
pub mod tcp;
pub mod udp;
pub mod wire;

/// While draining, a listener stops once nothing has arrived for this long and nothing is in
/// flight.
const DRAIN_QUIET: Duration = Duration::from_millis(300);

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

impl<T: OriginalDestinations> OriginalDestinations for Arc<T> {
    fn original_destination(&self, client: SocketAddr, protocol: u8) -> Option<SocketAddr> {
        T::original_destination(self, client, protocol)
    }
}

/// A fixed answer to "where was this client headed?", for the listeners' unit tests. The
/// kernel's flow table behind the real one is exercised by the privileged integration tests.
#[cfg(test)]
pub(crate) struct FixedDestination(pub Option<SocketAddr>);

#[cfg(test)]
impl OriginalDestinations for FixedDestination {
    fn original_destination(&self, _client: SocketAddr, _protocol: u8) -> Option<SocketAddr> {
        self.0
    }
}
