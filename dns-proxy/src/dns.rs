//! The DNS side of the proxy: admission, the UDP and TCP listeners, forwarding, and the
//! wire-format helpers they share.
use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::{Instant, SystemTime},
};

pub mod admission;
pub mod cache;
pub mod coalesce;
pub mod observers;
pub mod per_client;
pub mod query_log;
pub mod stats;
pub mod tcp;
pub mod transfer;
pub mod udp;
pub mod wire;
pub mod workload_stats;

pub use admission::Refusal;

/// One reading of both clocks, shared by everything a batch of datagrams times, logs and
/// records: a reading per datagram and per log event showed in the UDP thread's profile, and
/// the datagrams of one `recvmmsg` arrived together anyway.
#[derive(Debug, Clone, Copy)]
pub struct Moment {
    pub instant: Instant,
    pub wall: SystemTime,
}

impl Moment {
    pub fn now() -> Self {
        Self {
            instant: Instant::now(),
            wall: SystemTime::now(),
        }
    }
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
    /// client for the per-client limits, where the kernel recorded no workload): in host mode
    /// every client is (sk_lookup lets nothing else in), in node mode one from loopback or
    /// from a block address (the route of a block picks its first address as the source; no
    /// other namespace can complete a handshake from there). A node process whose socket
    /// `connect4` bound to the node's own address is one client by that address, which all
    /// of them share.
    fn is_local_client(&self, client: IpAddr) -> bool;

    /// Has the kernel answer UDP datagrams to `reached` (where a query arrived) port
    /// unreachable for a while, as the server it names did the agent: a client connected there
    /// then reads the error itself. Nothing where there is no kernel side (unit tests).
    fn refuse_udp_for_a_while(&self, _reached: SocketAddr) {}

    /// Has the agent itself refuse the queries to `reached` that the cache cannot answer, for
    /// as long as [`refuse_udp_for_a_while`](Self::refuse_udp_for_a_while) would have the
    /// kernel refuse them all. Nothing where there is no kernel side (unit tests).
    fn refuse_here_for_a_while(&self, _reached: SocketAddr) {}

    /// Whether the agent refuses queries to `reached` now
    /// ([`refuse_here_for_a_while`](Self::refuse_here_for_a_while)).
    fn refused_here(&self, _reached: SocketAddr) -> bool {
        false
    }

    /// Notes that a query came through `reached` now, on a connection accepted earlier: its
    /// index is in use, and its origin is not forgotten while it is. Nothing where there is no
    /// kernel side (unit tests).
    fn still_in_use(&self, _reached: SocketAddr) {}
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

    fn refuse_udp_for_a_while(&self, reached: SocketAddr) {
        T::refuse_udp_for_a_while(self, reached);
    }

    fn refuse_here_for_a_while(&self, reached: SocketAddr) {
        T::refuse_here_for_a_while(self, reached);
    }

    fn refused_here(&self, reached: SocketAddr) -> bool {
        T::refused_here(self, reached)
    }

    fn still_in_use(&self, reached: SocketAddr) {
        T::still_in_use(self, reached);
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
    /// How many times a connection's use of its index was noted.
    pub uses: std::sync::atomic::AtomicUsize,
}

#[cfg(any(test, feature = "fuzzing"))]
impl FixedDestination {
    pub fn new(original: Option<SocketAddr>) -> Self {
        Self {
            original,
            proxy: None,
            uses: std::sync::atomic::AtomicUsize::new(0),
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

    fn still_in_use(&self, _reached: SocketAddr) {
        self.uses.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}
