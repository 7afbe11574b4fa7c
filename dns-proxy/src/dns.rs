//! The DNS side of the proxy: listeners, forwarding, and the wire-format helpers they share.
use std::{net::SocketAddr, sync::Arc, time::Duration};

mod mmsg;
pub mod per_client;
pub mod stats;
pub mod tcp;
pub mod udp;
pub mod wire;

/// While draining, a listener stops once nothing has arrived for this long and nothing is in
/// flight.
const DRAIN_QUIET: Duration = Duration::from_millis(300);

/// Why a redirected client's query is not forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Its upstream would be this proxy.
    Loop,
    /// It asked a loopback server from another network namespace (a pod asking its own
    /// 127.0.0.1:53): forwarding it would reach the agent's loopback, not the pod's.
    ForeignLoopback,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Refusal::Loop => "its upstream is this proxy",
            Refusal::ForeignLoopback => {
                "a loopback server asked from another network namespace (not forwarded: it \
                 would reach this host's loopback, not the client's)"
            }
        })
    }
}

/// Where a redirected `client`'s query to `original` goes: the operator's `upstream_override`
/// if given, else `original`, unless that would loop or let a client in another namespace
/// into this one's loopback services.
pub fn upstream_for(
    client: SocketAddr,
    original: SocketAddr,
    upstream_override: Option<SocketAddr>,
    proxy: SocketAddr,
) -> Result<SocketAddr, Refusal> {
    let upstream = upstream_override.unwrap_or(original);
    if upstream == proxy {
        return Err(Refusal::Loop);
    }
    // A client of this namespace reaches the proxy from a loopback address; one of another
    // namespace (node mode) from its own. Only the former may ask loopback servers.
    if upstream_override.is_none()
        && original.ip().to_canonical().is_loopback()
        && !client.ip().to_canonical().is_loopback()
    {
        return Err(Refusal::ForeignLoopback);
    }
    Ok(upstream)
}

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

/// A fixed answer to "where was this client headed?", for the listeners' unit tests and the
/// fuzz targets. The kernel's flow table behind the real one is exercised by the privileged
/// integration tests.
#[cfg(any(test, feature = "fuzzing"))]
pub struct FixedDestination(pub Option<SocketAddr>);

#[cfg(any(test, feature = "fuzzing"))]
impl OriginalDestinations for FixedDestination {
    fn original_destination(&self, _client: SocketAddr, _protocol: u8) -> Option<SocketAddr> {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_servers_are_only_for_clients_of_this_namespace() {
        let at = |text: &str| -> SocketAddr { text.parse().unwrap() };
        let proxy = at("169.254.20.10:53");
        let pod = at("10.0.0.7:40000");
        let host = at("127.0.0.1:40000");
        let loopback_server = at("127.0.0.53:53");
        let cluster_dns = at("10.96.0.10:53");
        assert_eq!(upstream_for(pod, cluster_dns, None, proxy), Ok(cluster_dns));
        assert_eq!(
            upstream_for(host, loopback_server, None, proxy),
            Ok(loopback_server)
        );
        assert_eq!(
            upstream_for(at("[::ffff:127.0.0.1]:40000"), loopback_server, None, proxy),
            Ok(loopback_server)
        );
        assert_eq!(
            upstream_for(pod, loopback_server, None, proxy),
            Err(Refusal::ForeignLoopback)
        );
        assert_eq!(
            upstream_for(at("[fd00::7]:40000"), at("[::1]:53"), None, proxy),
            Err(Refusal::ForeignLoopback)
        );
        // The operator's upstream is theirs to choose.
        assert_eq!(
            upstream_for(pod, loopback_server, Some(at("127.0.0.1:5353")), proxy),
            Ok(at("127.0.0.1:5353"))
        );
        assert_eq!(upstream_for(pod, proxy, None, proxy), Err(Refusal::Loop));
    }
}
