//! Counters of what the proxy did with each query, per protocol. Plain atomics, so counting
//! costs a query nothing that takes a lock; `crate::metrics` reads them at scrape time.
//!
//! What each counter means to an operator is declared once, with its metric, in the catalog
//! of `crate::metrics` (and docs/metrics.md, generated from it): a field here only names the
//! metric it feeds, and what the code must know to count it.
use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use super::Refusal;

/// Upper bounds of the latency histogram's buckets, in microseconds: from a loopback answer to
/// the default upstream timeout.
pub const LATENCY_BUCKETS_US: [u64; 14] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 5_000_000,
];

/// How long answered queries took, from the query's arrival to its answer's relay.
#[derive(Debug, Default)]
pub struct LatencyHistogram {
    /// Per bucket of [`LATENCY_BUCKETS_US`], then one for everything slower; not cumulative.
    buckets: [AtomicU64; LATENCY_BUCKETS_US.len() + 1],
    sum_us: AtomicU64,
    count: AtomicU64,
}

impl LatencyHistogram {
    pub fn observe(&self, latency: Duration) {
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        let bucket = LATENCY_BUCKETS_US.partition_point(|&bound| bound < us);
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// (sum in seconds, count, per-bucket counts with the last for +Inf).
    pub fn snapshot(&self) -> (f64, u64, Vec<u64>) {
        let buckets = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        let sum = self.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        (sum, self.count.load(Ordering::Relaxed), buckets)
    }
}

/// What happened to the queries of one protocol.
#[derive(Debug, Default)]
pub struct ProtocolStats {
    /// `queries_received`: each message read from a client, query or not.
    pub received: AtomicU64,
    /// `queries_forwarded`.
    pub forwarded: AtomicU64,
    /// Answers relayed to their client, whatever their header (in the log summary only).
    pub answered: AtomicU64,
    /// `answers`: by the RCODE in the header (0..=15).
    pub answered_by_rcode: [AtomicU64; 16],
    /// `inflight_queries`: up at [`Self::forwarding`], down at [`Self::settled`].
    pub inflight: AtomicU64,
    /// `query_duration_seconds`.
    pub latency: LatencyHistogram,
    /// `upstream_timeouts`: per query (UDP) or connection (TCP).
    pub upstream_timeouts: AtomicU64,
    /// `upstream_errors`: per query (UDP) or connection (TCP).
    pub upstream_errors: AtomicU64,
    /// `dropped{reason="malformed"}`.
    pub dropped_malformed: AtomicU64,
    /// `dropped{reason="not_redirected"}`.
    pub dropped_not_redirected: AtomicU64,
    /// `dropped{reason="overload"}`: at --max-inflight or --max-tcp-connections.
    pub dropped_overload: AtomicU64,
    /// `dropped{reason="client_limit"}`: at --max-inflight-per-client or
    /// --max-tcp-connections-per-client.
    pub dropped_client_limit: AtomicU64,
    /// `dropped{reason="loop"}` ([`Refusal::Loop`]).
    pub dropped_loop: AtomicU64,
    /// `dropped{reason="foreign_loopback"}` ([`Refusal::ForeignLoopback`]).
    pub dropped_foreign_loopback: AtomicU64,
    /// `dropped{reason="stray"}`: UDP only.
    pub dropped_stray: AtomicU64,
    /// `dropped{reason="stalled"}`: TCP only, connections whose client stopped reading.
    pub dropped_stalled: AtomicU64,
    /// `dropped{reason="unsendable"}`: UDP only, answers the kernel would not send to their
    /// client for another reason than a full buffer.
    pub dropped_unsendable: AtomicU64,
}

/// The proxy's counters: per protocol, and agent-wide.
#[derive(Debug, Default)]
pub struct Stats {
    pub udp: ProtocolStats,
    pub tcp: ProtocolStats,
    /// `server_table_entries`: entries that take a slot in the kernel's table of servers, as
    /// of the last walk that forgets departed origins (every minute).
    pub server_table_entries: AtomicU64,
    /// `port_holds_missing`: holds of the listen port on every address kept off by a socket
    /// already there (app/listeners.rs, `PortHold`).
    pub port_holds_missing: AtomicU64,
    /// `tcp_connections`.
    pub tcp_connections: AtomicU64,
    /// `cache_hits`.
    pub cache_hits: AtomicU64,
    /// `cache_misses`: queries the cache could have answered (forwarded instead).
    pub cache_misses: AtomicU64,
    /// `cache_stale_answers`.
    pub cache_stale: AtomicU64,
    /// `cache_coalesced`.
    pub cache_coalesced: AtomicU64,
    /// `cache_untrusted`: answers neither kept nor shared, for strays on their socket or for
    /// want of a question.
    pub cache_untrusted: AtomicU64,
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
    /// Counts a query (UDP) or connection (TCP) that could not be sent upstream because no
    /// socket could be opened for it: the agent out of open files (or the host of memory) is
    /// an overload of the agent's own, `dropped{reason="overload"}`, not the upstream's error.
    pub fn no_upstream_socket(&self, err: &std::io::Error) {
        let own = matches!(
            err.raw_os_error(),
            Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
        );
        Stats::add(if own {
            &self.dropped_overload
        } else {
            &self.upstream_errors
        });
    }

    /// A query or connection not forwarded, for `refusal`.
    pub fn refused(&self, refusal: Refusal) {
        Stats::add(match refusal {
            Refusal::Loop => &self.dropped_loop,
            Refusal::ForeignLoopback => &self.dropped_foreign_loopback,
        });
    }

    /// A query went to its upstream.
    pub fn forwarding(&self) {
        Stats::add(&self.forwarded);
        Stats::add(&self.inflight);
    }

    /// A forwarded query is over (answered, timed out or failed).
    pub fn settled(&self, queries: u64) {
        self.inflight.fetch_sub(queries, Ordering::Relaxed);
    }

    /// An answer reached its client, `latency` after its query arrived (`None`: an answer to
    /// no query the proxy knows of, which TCP relays anyway).
    pub fn answered(&self, answer: &[u8], latency: Option<Duration>) {
        Stats::add(&self.answered);
        if let Some(rcode) = super::wire::header_rcode(answer) {
            Stats::add(&self.answered_by_rcode[usize::from(rcode)]);
        }
        if let Some(latency) = latency {
            self.latency.observe(latency);
        }
    }

    fn summary(&self) -> String {
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        format!(
            "received={} forwarded={} answered={} upstream_timeouts={} upstream_errors={} \
             dropped_malformed={} dropped_not_redirected={} dropped_overload={} dropped_client_limit={} \
             dropped_loop={} dropped_foreign_loopback={} dropped_stray={} dropped_unsendable={}",
            get(&self.received),
            get(&self.forwarded),
            get(&self.answered),
            get(&self.upstream_timeouts),
            get(&self.upstream_errors),
            get(&self.dropped_malformed),
            get(&self.dropped_not_redirected),
            get(&self.dropped_overload),
            get(&self.dropped_client_limit),
            get(&self.dropped_loop),
            get(&self.dropped_foreign_loopback),
            get(&self.dropped_stray),
            get(&self.dropped_unsendable),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_lands_in_the_first_bucket_that_holds_it() {
        let histogram = LatencyHistogram::default();
        histogram.observe(Duration::from_micros(100)); // on a bound: that bucket (le=100us)
        histogram.observe(Duration::from_micros(101));
        histogram.observe(Duration::from_secs(60)); // beyond the last bound: +Inf
        let (sum, count, buckets) = histogram.snapshot();
        assert_eq!(count, 3);
        assert_eq!(buckets[0], 1);
        assert_eq!(buckets[1], 1);
        assert_eq!(buckets[LATENCY_BUCKETS_US.len()], 1);
        assert_eq!(buckets.iter().sum::<u64>(), 3);
        assert!((sum - 60.000201).abs() < 1e-9, "{sum}");
    }

    #[test]
    fn answers_are_counted_by_rcode() {
        let stats = ProtocolStats::default();
        let mut header = [0u8; 12];
        header[2] = 0x80; // a response
        header[3] = 3; // NXDOMAIN
        stats.answered(&header, Some(Duration::from_millis(1)));
        stats.answered(&header[..5], None); // no full header: no rcode; no query: no latency
        assert_eq!(stats.answered.load(Ordering::Relaxed), 2);
        assert_eq!(stats.answered_by_rcode[3].load(Ordering::Relaxed), 1);
        assert_eq!(stats.latency.snapshot().1, 1);
    }

    #[test]
    fn no_socket_for_want_of_open_files_is_an_overload_not_the_upstreams_error() {
        let stats = ProtocolStats::default();
        stats.no_upstream_socket(&std::io::Error::from_raw_os_error(libc::EMFILE));
        stats.no_upstream_socket(&std::io::Error::from_raw_os_error(libc::ECONNREFUSED));
        assert_eq!(stats.dropped_overload.load(Ordering::Relaxed), 1);
        assert_eq!(stats.upstream_errors.load(Ordering::Relaxed), 1);
    }
}
