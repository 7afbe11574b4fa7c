//! Counters of what the proxy did with each query, per protocol.
use std::sync::atomic::{AtomicU64, Ordering};

/// What happened to the queries of one protocol.
#[derive(Debug, Default)]
pub struct ProtocolStats {
    /// Messages read from clients.
    pub received: AtomicU64,
    /// Queries sent to an upstream.
    pub forwarded: AtomicU64,
    /// Answers relayed to their client.
    pub answered: AtomicU64,
    /// Queries (or, for TCP, connections) whose upstream did not answer in time.
    pub upstream_timeouts: AtomicU64,
    /// Queries or connections that failed on the upstream side (refused, reset, unreachable).
    pub upstream_errors: AtomicU64,
    /// Messages that are not DNS queries.
    pub dropped_malformed: AtomicU64,
    /// Queries or connections from clients the kernel did not redirect here.
    pub dropped_not_redirected: AtomicU64,
    /// Queries or connections dropped at a limit (--max-inflight, --max-tcp-connections).
    pub dropped_overload: AtomicU64,
    /// Queries whose upstream would have been the proxy itself.
    pub dropped_loop: AtomicU64,
}

#[derive(Debug, Default)]
pub struct Stats {
    pub udp: ProtocolStats,
    pub tcp: ProtocolStats,
    /// TCP connections accepted.
    pub tcp_connections: AtomicU64,
}

impl Stats {
    pub fn add(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// One line for logs: `udp: key=value ... tcp: connections=N key=value ...`.
    pub fn summary(&self) -> String {
        format!(
            "udp: {} tcp: connections={} {}",
            self.udp.summary(),
            self.tcp_connections.load(Ordering::Relaxed),
            self.tcp.summary()
        )
    }
}

impl ProtocolStats {
    fn summary(&self) -> String {
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        format!(
            "received={} forwarded={} answered={} upstream_timeouts={} upstream_errors={} \
             dropped_malformed={} dropped_not_redirected={} dropped_overload={} dropped_loop={}",
            get(&self.received),
            get(&self.forwarded),
            get(&self.answered),
            get(&self.upstream_timeouts),
            get(&self.upstream_errors),
            get(&self.dropped_malformed),
            get(&self.dropped_not_redirected),
            get(&self.dropped_overload),
            get(&self.dropped_loop),
        )
    }
}
