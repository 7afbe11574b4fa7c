//! The DNS side of the proxy: listeners, forwarding, and the wire-format helpers they share.
use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

pub mod cache;
pub mod coalesce;
pub mod per_client;
pub mod query_log;
pub mod stats;
pub mod tcp;
pub mod udp;
pub mod wire;
pub mod workload_stats;

// The UDP threads set up their listeners with it too.
pub(crate) use udp::mmsg;

/// Why a redirected client's query is not forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Its upstream would be this proxy.
    Loop,
    /// It asked a loopback or unspecified server from another network namespace (a pod asking
    /// its own 127.0.0.1:53): forwarding it would reach the agent's loopback, not the pod's.
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

/// Whether the server is one that means "this network namespace" to whoever asks it.
fn is_local_only(server: SocketAddr) -> bool {
    let ip = server.ip().to_canonical();
    ip.is_loopback() || ip.is_unspecified()
}

/// Where a redirected query to `original` goes: the operator's `upstream_override` if given,
/// else `original`, unless that would loop or let a client of another namespace into this
/// one's loopback services. `from_this_namespace`: the query came from the agent's own
/// network namespace (over the loopback device).
pub fn upstream_for(
    original: SocketAddr,
    from_this_namespace: bool,
    upstream_override: Option<SocketAddr>,
    destinations: &impl OriginalDestinations,
) -> Result<SocketAddr, Refusal> {
    let upstream = upstream_override.unwrap_or(original);
    if destinations.is_proxy(upstream) {
        return Err(Refusal::Loop);
    }
    if upstream_override.is_none() && is_local_only(original) && !from_this_namespace {
        return Err(Refusal::ForeignLoopback);
    }
    Ok(upstream)
}

/// Where a redirected client's query was headed before the kernel sent it here, and who sent
/// it. The listeners ask only this; the eBPF side answers it from the kernel's table of
/// servers (`ebpf::CachedServers`), so the DNS side does not depend on aya.
pub trait OriginalDestinations: Send + Sync + 'static {
    /// The server a redirected client asked for, and the cgroup of the task that sent its
    /// socket here (0: not recorded), from the proxy address its packet reached (a datagram's
    /// destination, a connection's local address); `None` if that address encodes no server.
    /// The kernel alone chose that address for that cgroup.
    fn origin(&self, reached: SocketAddr) -> Option<(SocketAddr, u64)>;

    /// The server alone, as [`origin`](Self::origin) says.
    fn original_destination(&self, reached: SocketAddr) -> Option<SocketAddr> {
        self.origin(reached).map(|(server, _)| server)
    }

    /// Whether `addr` is the proxy's own (one of its listeners, or an address of its blocks
    /// on its port): a query forwarded there would come back.
    fn is_proxy(&self, addr: SocketAddr) -> bool;

    /// Whether a TCP client's source says it is of the agent's own network namespace (one
    /// client for the per-client limits): in host mode every client is (sk_lookup lets
    /// nothing else in), in node mode one from loopback or from a block address (the route
    /// of a block picks its first address as the source; no other namespace can complete a
    /// handshake from there).
    fn is_local_client(&self, client: IpAddr) -> bool;
}

impl<T: OriginalDestinations> OriginalDestinations for Arc<T> {
    fn origin(&self, reached: SocketAddr) -> Option<(SocketAddr, u64)> {
        T::origin(self, reached)
    }

    fn is_proxy(&self, addr: SocketAddr) -> bool {
        T::is_proxy(self, addr)
    }

    fn is_local_client(&self, client: IpAddr) -> bool {
        T::is_local_client(self, client)
    }
}

/// A fixed answer to "where was this client headed?", for the listeners' unit tests and the
/// fuzz targets. The kernel's table behind the real one is exercised by the privileged
/// integration tests.
#[cfg(any(test, feature = "fuzzing"))]
pub struct FixedDestination {
    pub original: Option<SocketAddr>,
    /// The proxy's own address.
    pub proxy: Option<SocketAddr>,
}

#[cfg(any(test, feature = "fuzzing"))]
impl FixedDestination {
    pub fn new(original: Option<SocketAddr>) -> Self {
        Self {
            original,
            proxy: None,
        }
    }
}

#[cfg(any(test, feature = "fuzzing"))]
impl OriginalDestinations for FixedDestination {
    fn origin(&self, _reached: SocketAddr) -> Option<(SocketAddr, u64)> {
        self.original.map(|server| (server, 0))
    }

    fn is_proxy(&self, addr: SocketAddr) -> bool {
        self.proxy == Some(addr)
    }

    fn is_local_client(&self, client: IpAddr) -> bool {
        client.to_canonical().is_loopback()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_servers_are_only_for_clients_of_this_namespace() {
        let at = |text: &str| -> SocketAddr { text.parse().unwrap() };
        let proxy = FixedDestination {
            original: None,
            proxy: Some(at("169.254.20.10:53")),
        };
        let loopback_server = at("127.0.0.53:53");
        let cluster_dns = at("10.96.0.10:53");
        assert_eq!(
            upstream_for(cluster_dns, false, None, &proxy),
            Ok(cluster_dns)
        );
        assert_eq!(
            upstream_for(loopback_server, true, None, &proxy),
            Ok(loopback_server)
        );
        assert_eq!(
            upstream_for(loopback_server, false, None, &proxy),
            Err(Refusal::ForeignLoopback)
        );
        for local_only in ["[::1]:53", "0.0.0.0:53", "[::]:53", "[::ffff:127.0.0.1]:53"] {
            assert_eq!(
                upstream_for(at(local_only), false, None, &proxy),
                Err(Refusal::ForeignLoopback),
                "{local_only}"
            );
        }
        // The operator's upstream is theirs to choose.
        assert_eq!(
            upstream_for(loopback_server, false, Some(at("127.0.0.1:5353")), &proxy),
            Ok(at("127.0.0.1:5353"))
        );
        assert_eq!(
            upstream_for(at("169.254.20.10:53"), true, None, &proxy),
            Err(Refusal::Loop)
        );
    }
}
