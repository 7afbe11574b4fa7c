//! Counters of what the proxy did with each datagram.
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Default)]
pub struct Stats {
    /// Datagrams read from the listener.
    pub received: AtomicU64,
    /// Queries sent to an upstream.
    pub forwarded: AtomicU64,
    /// Answers relayed to their client.
    pub answered: AtomicU64,
    /// Queries whose upstream did not answer in time.
    pub upstream_timeouts: AtomicU64,
    /// Queries that failed on the upstream socket (refused, unreachable...).
    pub upstream_errors: AtomicU64,
    /// Datagrams that are not DNS queries.
    pub dropped_malformed: AtomicU64,
    /// Queries from clients the kernel did not redirect here.
    pub dropped_not_redirected: AtomicU64,
    /// Queries dropped because --max-inflight were already on their way.
    pub dropped_overload: AtomicU64,
    /// Queries whose upstream would have been the proxy itself.
    pub dropped_loop: AtomicU64,
}

impl Stats {
    pub fn add(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// One line for logs, `key=value` pairs.
    pub fn summary(&self) -> String {
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
