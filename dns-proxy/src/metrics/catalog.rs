//! Every metric the agent exports, declared once: its name, type, labels, when it is on the
//! page, its help, and how a scrape reads it. The `/metrics` page ([`super::collector`]) and
//! the reference in docs/metrics.md ([`super::reference`]) are both made from [`METRICS`].
//!
//! The counting itself stays where it happens, in plain atomics ([`crate::dns::stats`], the
//! cache, the dnstap writer, the kernel's per-CPU `COUNTERS`): a query pays for no lock or
//! lookup to be counted. Only a scrape comes here.
//!
//! To add a metric: count it where it happens, add a row to [`METRICS`], then run
//! `UPDATE_DOCS=1 cargo test -p dns-proxy metrics_reference` to regenerate docs/metrics.md.
use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use dns_proxy_common::Counter;
use prometheus_client::metrics::MetricType;

use crate::{
    dns::{
        cache::CacheCounts,
        stats::{LATENCY_BUCKETS_US, ProtocolStats, Stats},
    },
    dnstap::DnstapCounters,
};

/// The prefix of every metric's name on the page.
pub const PREFIX: &str = "dns_proxy";

/// One metric, as the page, its help and docs/metrics.md show it.
pub struct Metric {
    /// Without [`PREFIX`] and, for a counter, the `_total` the page adds.
    pub name: &'static str,
    /// The names of its labels, in the order of each [`Sample`]'s values.
    pub labels: &'static [&'static str],
    /// The option without which it is left off the page; `None`: always there. (The page
    /// follows [`Metric::read`]; a test checks that the two agree.)
    #[cfg_attr(
        not(test),
        expect(dead_code, reason = "docs/metrics.md is rendered by a test")
    )]
    pub only_with: Option<&'static str>,
    pub help: &'static str,
    /// Its type, and how a scrape reads it.
    pub read: Read,
}

/// A metric's type, with how a scrape reads its samples; `None` when its source is off (its
/// [`Metric::only_with`] was not given), which leaves the metric off the page.
pub enum Read {
    Counter(for<'s> fn(&'s Scrape<'_>) -> Option<Vec<Sample<'s, u64>>>),
    Gauge(for<'s> fn(&'s Scrape<'_>) -> Option<Vec<Sample<'s, i64>>>),
    Histogram(for<'s> fn(&'s Scrape<'_>) -> Option<Vec<Sample<'s, Histogram>>>),
}

impl Read {
    pub fn metric_type(&self) -> MetricType {
        match self {
            Read::Counter(_) => MetricType::Counter,
            Read::Gauge(_) => MetricType::Gauge,
            Read::Histogram(_) => MetricType::Histogram,
        }
    }
}

/// One series of a metric: its label values, in the order of [`Metric::labels`], and its value.
#[derive(Debug)]
pub struct Sample<'s, T> {
    pub labels: Vec<&'s str>,
    pub value: T,
}

/// A histogram's value: the sum and count of what it observed, and each bucket's upper bound
/// (seconds) with its count (not cumulative; the last bound is +Inf).
#[derive(Debug)]
pub struct Histogram {
    pub sum: f64,
    pub count: u64,
    pub buckets: Vec<(f64, u64)>,
}

/// What a scrape reads, taken once at its start. The `Option`s are `None` when their source
/// is off.
pub struct Scrape<'a> {
    pub stats: &'a Stats,
    /// The kernel side's counters, summed over the CPUs; one that could not be read is missing.
    pub kernel: Vec<(Counter, u64)>,
    /// The cache's (`--cache-size`).
    pub cache: Option<CacheCounts>,
    /// The dnstap log's (`--dnstap`), once it has started.
    pub dnstap: Option<Arc<DnstapCounters>>,
    /// `--workload-metrics`: (workload, queries) for the workloads counted apart, then `other`.
    pub workloads: Option<Vec<(String, u64)>>,
}

impl Scrape<'_> {
    fn protocols(&self) -> [(&'static str, &ProtocolStats); 2] {
        [("udp", &self.stats.udp), ("tcp", &self.stats.tcp)]
    }

    /// `field` of each protocol, labelled with the protocol.
    fn by_protocol(&self, field: Field) -> Vec<Sample<'static, u64>> {
        Vec::from(self.protocols().map(|(protocol, stats)| Sample {
            labels: vec![protocol],
            value: load(field(stats)),
        }))
    }

    /// An agent-wide counter of the cache's, when the cache is on.
    fn with_cache(&self, value: u64) -> Option<Vec<Sample<'static, u64>>> {
        self.cache.map(|_| one(value))
    }

    fn kernel(&self, counter: Counter) -> Option<Vec<Sample<'static, u64>>> {
        let (_, value) = self.kernel.iter().find(|(read, _)| *read == counter)?;
        Some(one(*value))
    }
}

/// One of a protocol's counters.
type Field = fn(&ProtocolStats) -> &AtomicU64;

fn load(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

/// The one sample of a metric without labels.
fn one<T>(value: T) -> Vec<Sample<'static, T>> {
    vec![Sample {
        labels: Vec::new(),
        value,
    }]
}

/// The names the header RCODEs of RFC 1035 and RFC 2136 go by; the rest by number.
const RCODE_NAMES: [&str; 16] = [
    "NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN", "NOTIMP", "REFUSED", "YXDOMAIN", "YXRRSET",
    "NXRRSET", "NOTAUTH", "NOTZONE", "11", "12", "13", "14", "15",
];

/// The `reason` label of `dropped`, and the counter of each (each explained in its help).
const DROP_REASONS: [(&str, Field); 9] = [
    ("malformed", |s| &s.dropped_malformed),
    ("not_redirected", |s| &s.dropped_not_redirected),
    ("overload", |s| &s.dropped_overload),
    ("client_limit", |s| &s.dropped_client_limit),
    ("loop", |s| &s.dropped_loop),
    ("foreign_loopback", |s| &s.dropped_foreign_loopback),
    ("stray", |s| &s.dropped_stray),
    ("stalled", |s| &s.dropped_stalled),
    ("unsendable", |s| &s.dropped_unsendable),
];

/// Every metric, in the order of the page.
pub const METRICS: &[Metric] = &[
    Metric {
        name: "queries_received",
        labels: &["protocol"],
        only_with: None,
        help: "Messages read from clients: every one, those dropped included (from a client \
               the kernel did not redirect, malformed, beyond a limit).",
        read: Read::Counter(|s| Some(s.by_protocol(|p| &p.received))),
    },
    Metric {
        name: "queries_forwarded",
        labels: &["protocol"],
        only_with: None,
        help: "Queries sent to an upstream.",
        read: Read::Counter(|s| Some(s.by_protocol(|p| &p.forwarded))),
    },
    Metric {
        name: "upstream_timeouts",
        labels: &["protocol"],
        only_with: None,
        help: "Queries (UDP) or connections (TCP) whose upstream did not answer in time (not a TCP client that stopped reading its answers).",
        read: Read::Counter(|s| Some(s.by_protocol(|p| &p.upstream_timeouts))),
    },
    Metric {
        name: "upstream_errors",
        labels: &["protocol"],
        only_with: None,
        help: "Queries (UDP) or connections (TCP) that failed on the upstream side.",
        read: Read::Counter(|s| Some(s.by_protocol(|p| &p.upstream_errors))),
    },
    Metric {
        name: "answers",
        labels: &["protocol", "rcode"],
        only_with: None,
        help: "Answers sent to their clients, one per query (a zone transfer's messages count \
               once, by its first), by the RCODE in their header: by name \
               (NOERROR, SERVFAIL, NXDOMAIN...), 11 to 15 by number; an RCODE not seen yet \
               has no series. The upstream's, the cache's, and the agent's own: the REFUSED \
               it answers over UDP for an upstream it could not reach (its port closed, no \
               route), which upstream_errors counts too.",
        read: Read::Counter(|s| {
            let mut samples = Vec::new();
            for (protocol, stats) in s.protocols() {
                for (rcode, counter) in RCODE_NAMES.iter().zip(&stats.answered_by_rcode) {
                    let value = load(counter);
                    if value > 0 {
                        samples.push(Sample {
                            labels: vec![protocol, *rcode],
                            value,
                        });
                    }
                }
            }
            Some(samples)
        }),
    },
    Metric {
        name: "dropped",
        labels: &["protocol", "reason"],
        only_with: None,
        help: "Messages (UDP) or connections (TCP) dropped, by reason: malformed (not a DNS \
               query; one whose question the agent cannot read is answered FORMERR), \
               not_redirected (from a client the kernel did not redirect), overload \
               (beyond an agent-wide limit: --max-inflight, --max-tcp-connections; or no \
               socket to be had toward the upstream, the agent out of open files; or, TCP, \
               a connection closed for want of room for a large message), \
               client_limit (beyond a client's own: --max-inflight-per-client, \
               --max-tcp-connections-per-client), loop (headed back to the proxy; UDP: \
               answered REFUSED), foreign_loopback (from another network namespace to a loopback server), stray \
               (UDP: a datagram from upstream that answers no query in flight, late or forged, \
               or is no answer at all (not DNS: its query waits on, as a client asking the \
               server would), or an ICMP port unreachable about none; not one the kernel refuses: from \
               another address or port than the server an upstream socket is connected to, or \
               to a socket already closed), stalled (TCP: a \
               client that stopped reading its answers for --upstream-timeout; its connection \
               is closed), or unsendable (UDP: an answer the kernel would not send to its \
               client, for another reason than a full buffer, which is overload: no route \
               back to its source, a firewall).",
        read: Read::Counter(|s| {
            let mut samples = Vec::new();
            for (protocol, stats) in s.protocols() {
                for (reason, field) in DROP_REASONS {
                    samples.push(Sample {
                        labels: vec![protocol, reason],
                        value: load(field(stats)),
                    });
                }
            }
            Some(samples)
        }),
    },
    Metric {
        name: "tcp_connections",
        labels: &[],
        only_with: None,
        help: "TCP connections accepted.",
        read: Read::Counter(|s| Some(one(load(&s.stats.tcp_connections)))),
    },
    Metric {
        name: "workload_queries",
        labels: &["workload"],
        only_with: Some("--workload-metrics"),
        help: "Queries received, by the workload that asked (--workload-metrics: the first N \
               workloads still there; the rest, and queries whose workload was not recorded, \
               as other).",
        read: Read::Counter(|s| {
            let workloads = s.workloads.as_ref()?;
            let samples = workloads.iter().map(|(workload, queries)| Sample {
                labels: vec![workload.as_str()],
                value: *queries,
            });
            Some(samples.collect())
        }),
    },
    Metric {
        name: "dnstap_written",
        labels: &[],
        only_with: Some("--dnstap"),
        help: "dnstap messages written to the log (--dnstap): handed to its 64 KiB write \
               buffer, so when the file or the reader fails, those still in it, and for a \
               socket those in its kernel buffer (net.core.wmem_default, 208 KiB by \
               default), are lost uncounted: a reader that reads nothing takes about that \
               much (some 1,400 to 1,900 events of usual sizes) each time it connects.",
        read: Read::Counter(|s| Some(one(s.dnstap.as_ref()?.written()))),
    },
    Metric {
        name: "dnstap_dropped",
        labels: &[],
        only_with: Some("--dnstap"),
        help: "dnstap messages dropped: the log's queue was full, it had no reader, or its write failed (a full disk, a file-size limit).",
        read: Read::Counter(|s| Some(one(s.dnstap.as_ref()?.dropped()))),
    },
    Metric {
        name: "cache_hits",
        labels: &[],
        only_with: Some("--cache-size"),
        help: "Queries answered from the cache.",
        read: Read::Counter(|s| s.with_cache(load(&s.stats.cache_hits))),
    },
    Metric {
        name: "cache_misses",
        labels: &[],
        only_with: Some("--cache-size"),
        help: "Queries the cache held no live answer for, forwarded.",
        read: Read::Counter(|s| s.with_cache(load(&s.stats.cache_misses))),
    },
    Metric {
        name: "cache_stale_answers",
        labels: &[],
        only_with: Some("--cache-size"),
        help: "Expired answers served (--serve-stale) because the upstream failed or was slow.",
        read: Read::Counter(|s| s.with_cache(load(&s.stats.cache_stale))),
    },
    Metric {
        name: "cache_coalesced",
        labels: &[],
        only_with: Some("--cache-size"),
        help: "Queries that waited for an identical query's answer instead of going upstream.",
        read: Read::Counter(|s| s.with_cache(load(&s.stats.cache_coalesced))),
    },
    Metric {
        name: "cache_untrusted",
        labels: &[],
        only_with: Some("--cache-size"),
        help: "Upstream answers neither kept nor shared with identical queries, because \
               datagrams that answered nothing and could have passed for an answer to their \
               question (late, or forged answers sprayed at the socket) arrived on their \
               socket while their query was out, or because they had no question (matched \
               on their ID alone: a FORMERR, say, or a forgery); and ICMP port unreachable \
               errors that came after such datagrams, which settle their query for its own \
               client only.",
        read: Read::Counter(|s| s.with_cache(load(&s.stats.cache_untrusted))),
    },
    Metric {
        name: "cache_evictions",
        labels: &[],
        only_with: Some("--cache-size"),
        help: "Answers dropped from the cache to stay within its bounds.",
        read: Read::Counter(|s| Some(one(s.cache?.evictions))),
    },
    Metric {
        name: "cache_entries",
        labels: &[],
        only_with: Some("--cache-size"),
        help: "Answers in the cache.",
        read: Read::Gauge(|s| Some(one(s.cache?.entries as i64))),
    },
    Metric {
        name: "cache_bytes",
        labels: &[],
        only_with: Some("--cache-size"),
        help: "Bytes the cache's answers take.",
        read: Read::Gauge(|s| Some(one(s.cache?.bytes as i64))),
    },
    Metric {
        name: "inflight_queries",
        labels: &["protocol"],
        only_with: None,
        help: "Queries forwarded and not yet answered, timed out or failed.",
        read: Read::Gauge(|s| {
            let samples = s.by_protocol(|p| &p.inflight).into_iter();
            let samples = samples.map(|sample| Sample {
                labels: sample.labels,
                value: sample.value as i64,
            });
            Some(samples.collect())
        }),
    },
    Metric {
        name: "query_duration_seconds",
        labels: &["protocol"],
        only_with: None,
        help: "Time from a query's arrival to its answer's relay, for answered queries.",
        read: Read::Histogram(|s| {
            let samples = s.protocols().map(|(protocol, stats)| {
                let (sum, count, counts) = stats.latency.snapshot();
                let bounds = LATENCY_BUCKETS_US
                    .iter()
                    .map(|&us| us as f64 / 1e6)
                    .chain([f64::INFINITY]);
                Sample {
                    labels: vec![protocol],
                    value: Histogram {
                        sum,
                        count,
                        buckets: bounds.zip(counts).collect(),
                    },
                }
            });
            Some(Vec::from(samples))
        }),
    },
    Metric {
        name: "kernel_redirected",
        labels: &[],
        only_with: None,
        help: "DNS connects and sends the kernel side rewrote to the proxy.",
        read: Read::Counter(|s| s.kernel(Counter::Redirected)),
    },
    Metric {
        name: "kernel_skipped_excluded",
        labels: &[],
        only_with: None,
        help: "DNS connects and sends left alone because their cgroup is excluded.",
        read: Read::Counter(|s| s.kernel(Counter::SkippedExcluded)),
    },
    Metric {
        name: "kernel_excluded_as_made",
        labels: &[],
        only_with: None,
        help: "Cgroups made at an --exclude-cgroup path that the kernel side excluded as they \
               were made, before anything ran in them.",
        read: Read::Counter(|s| s.kernel(Counter::ExcludedAsMade)),
    },
    Metric {
        name: "kernel_exclude_made_failed",
        labels: &[],
        only_with: None,
        help: "Cgroups made at an --exclude-cgroup path that the kernel side could not exclude \
               as they were made: excluded once the agent sees them, which races their first \
               lookups.",
        read: Read::Counter(|s| s.kernel(Counter::ExcludeMadeFailed)),
    },
    Metric {
        name: "kernel_skipped_foreign_namespace",
        labels: &[],
        only_with: None,
        help: "DNS connects and sends of another network namespace left alone: a loopback or \
               unspecified server, or a proxy only its own namespace reaches.",
        read: Read::Counter(|s| s.kernel(Counter::SkippedForeignNamespace)),
    },
    Metric {
        name: "kernel_skipped_excluded_server",
        labels: &[],
        only_with: None,
        help: "DNS connects and sends left alone because their server is excluded \
               (--exclude-server): asked directly.",
        read: Read::Counter(|s| s.kernel(Counter::SkippedExcludedServer)),
    },
    Metric {
        name: "kernel_skipped_bound_device",
        labels: &[],
        only_with: None,
        help: "DNS connects and sends left alone because their socket is bound to a device \
               other than loopback (SO_BINDTODEVICE), or sends through one (IP_UNICAST_IF, the \
               sticky IPV6_PKTINFO), \
               which may not reach the proxy's addresses, or is marked (SO_MARK) for routing \
               of its own.",
        read: Read::Counter(|s| s.kernel(Counter::SkippedBoundDevice)),
    },
    Metric {
        name: "kernel_reverse_translated",
        labels: &[],
        only_with: None,
        help: "Answers and peer names shown as from the original server.",
        read: Read::Counter(|s| s.kernel(Counter::ReverseTranslated)),
    },
    Metric {
        name: "kernel_unknown_index",
        labels: &[],
        only_with: None,
        help: "Packets, answers or peer names at a proxy address whose index names no server.",
        read: Read::Counter(|s| s.kernel(Counter::UnknownIndex)),
    },
    Metric {
        name: "kernel_stale_index_held",
        labels: &[],
        only_with: None,
        help: "Proxy addresses that named no server held for the UDP sockets still connected to \
               them, under a table of servers that is gone (its bpffs lost between agents): the \
               address is given to no other server while such a socket is noted, and the \
               socket's lookups fail (port unreachable) until it connects again.",
        read: Read::Counter(|s| s.kernel(Counter::StaleIndexHeld)),
    },
    Metric {
        name: "kernel_table_full",
        labels: &[],
        only_with: None,
        help: "DNS connects and sends whose server got no index (the table, or the slots its \
               search may try, full): those sockets went direct.",
        read: Read::Counter(|s| s.kernel(Counter::TableFull)),
    },
    Metric {
        name: "kernel_shared_index",
        labels: &[],
        only_with: None,
        help: "DNS connects and sends given their server's shared index: no room in the table \
               for their workload's own, so they were redirected with their workload unknown \
               (give a larger --redirect-block).",
        read: Read::Counter(|s| s.kernel(Counter::SharedIndex)),
    },
    Metric {
        name: "kernel_workload_limit",
        labels: &[],
        only_with: None,
        help: "DNS connects and sends of a workload that had taken its share of the kernel's \
               table of servers (--max-servers-per-workload) to a server new to it: given the \
               server's shared index (their workload unknown) if it had one, else left alone \
               (direct).",
        read: Read::Counter(|s| s.kernel(Counter::WorkloadLimit)),
    },
    Metric {
        name: "kernel_connected_not_noted",
        labels: &[],
        only_with: None,
        help: "Sockets connected to a proxy address that the kernel side did not note, as \
               their workload's cgroup had 4,096 noted already, or 65,536 were noted in all: \
               once their workload's cgroup is gone, their server's index may be given to \
               another while they still use it.",
        read: Read::Counter(|s| s.kernel(Counter::ConnectedNotNoted)),
    },
    Metric {
        name: "kernel_agent_unresponsive",
        labels: &[],
        only_with: None,
        help: "DNS connects and sends of the redirected cgroup (its excluded trees included) \
               left alone (they went direct), and packets to a proxy address refused, because \
               the agent had not said it was running for 3 s: stopped, frozen or with a wedged \
               UDP thread, it would have read none of them.",
        read: Read::Counter(|s| s.kernel(Counter::AgentUnresponsive)),
    },
    Metric {
        name: "server_table_entries",
        labels: &[],
        only_with: None,
        help: "Slots taken in the kernel's table of servers, both families: origins (a server, \
               with the cgroup that asked it or shared) and indexes forgotten but not yet \
               freed, as of the last walk that forgets those of departed cgroups (every \
               minute; 0 before the first). Each family holds as many \
               as its block has addresses, less two (65,534 for a /16, 254 for a /24); past \
               that, lookups go by a server's shared index (kernel_shared_index_total) or \
               direct (kernel_table_full_total).",
        read: Read::Gauge(|s| {
            Some(one(
                s.stats.server_table_entries.load(Ordering::Relaxed) as i64
            ))
        }),
    },
    Metric {
        name: "port_holds_missing",
        labels: &[],
        only_with: None,
        help: "Holds of the listen port on every address (IPv4 and IPv6, UDP and TCP) that a \
               socket already on the port keeps off; the agent tries again every 10 s. Above \
               0, a process of that socket's user outside --cgroup may answer redirected \
               sockets as their servers from a block address (security.md, claim 1). Always 0 \
               on a port below 1024, which is not held.",
        read: Read::Gauge(|s| {
            Some(one(
                s.stats.port_holds_missing.load(Ordering::Relaxed) as i64
            ))
        }),
    },
    Metric {
        name: "kernel_closed_port_refused",
        labels: &[],
        only_with: None,
        help: "UDP datagrams to a proxy address refused by the kernel (port unreachable, as \
               the server would answer) for the 2 s after the agent found that server's port \
               closed for two questions of the workload: lookups that failed at once, as \
               asking the server directly, without reaching the agent. Not with the cache on (and \
               CAP_NET_RAW): the agent refuses them itself then, after the cache \
               (upstream_errors).",
        read: Read::Counter(|s| s.kernel(Counter::ClosedPortRefused)),
    },
    Metric {
        name: "kernel_raw_refused",
        labels: &[],
        only_with: None,
        help: "Packets a raw socket of the redirected cgroup sent to a proxy address (but \
               ICMP), dropped: nothing checks whose address a raw datagram uses, and it would be \
               charged to the workload that address belongs to.",
        read: Read::Counter(|s| s.kernel(Counter::RawRefused)),
    },
    Metric {
        name: "kernel_foreign_refused",
        labels: &[],
        only_with: None,
        help: "Packets to a proxy address dropped by sk_lookup (from another namespace to a \
               loopback server's address, or in host mode from outside it), and connects and \
               sends of a workload to a proxy address that is not its own cgroup's, refused \
               (EPERM): attempts to pass for another workload.",
        read: Read::Counter(|s| s.kernel(Counter::ForeignRefused)),
    },
    Metric {
        name: "kernel_impersonation_refused",
        labels: &[],
        only_with: None,
        help: "Binds of, or sends from, a proxy address refused to other sockets (UDP on \
               any port, TCP on the proxy's).",
        read: Read::Counter(|s| s.kernel(Counter::ImpersonationRefused)),
    },
];

#[cfg(test)]
pub(super) mod tests {
    use std::collections::HashSet;

    use super::*;

    /// The label values of each of `metric`'s samples, and whether it was on the page.
    fn label_values<'s>(metric: &Metric, scrape: &'s Scrape<'_>) -> Option<Vec<Vec<&'s str>>> {
        fn values<'s, T>(samples: Vec<Sample<'s, T>>) -> Vec<Vec<&'s str>> {
            samples.into_iter().map(|sample| sample.labels).collect()
        }
        match metric.read {
            Read::Counter(read) => read(scrape).map(values),
            Read::Gauge(read) => read(scrape).map(values),
            Read::Histogram(read) => read(scrape).map(values),
        }
    }

    /// A scrape with every source on (`all`) or every optional one off, each counter of the
    /// agent's counted once.
    pub fn scrape(stats: &Stats, all: bool) -> Scrape<'_> {
        for protocol in [&stats.udp, &stats.tcp] {
            protocol.answered(&[0, 0, 0x80, 3, 0, 0, 0, 0, 0, 0, 0, 0], None);
        }
        Scrape {
            stats,
            kernel: Counter::ALL.iter().map(|&counter| (counter, 1)).collect(),
            cache: all.then(CacheCounts::default),
            dnstap: all.then(Arc::default),
            workloads: all.then(|| vec![("pod=a".to_owned(), 1), ("other".to_owned(), 2)]),
        }
    }

    #[test]
    fn each_sample_has_a_value_for_each_declared_label() {
        let stats = Stats::default();
        let scrape = scrape(&stats, true);
        for metric in METRICS {
            let samples = label_values(metric, &scrape).expect(metric.name);
            assert!(!samples.is_empty(), "{}: no samples", metric.name);
            for labels in samples {
                assert_eq!(labels.len(), metric.labels.len(), "{}", metric.name);
            }
        }
    }

    #[test]
    fn a_metric_is_left_off_the_page_exactly_when_its_option_is_off() {
        let stats = Stats::default();
        let scrape = scrape(&stats, false);
        for metric in METRICS {
            let present = label_values(metric, &scrape).is_some();
            assert_eq!(present, metric.only_with.is_none(), "{}", metric.name);
        }
    }

    #[test]
    fn names_are_unique_and_each_kernel_counter_has_one_metric() {
        let names: HashSet<_> = METRICS.iter().map(|metric| metric.name).collect();
        assert_eq!(names.len(), METRICS.len());
        let stats = Stats::default();
        for counter in Counter::ALL {
            let mut scrape = scrape(&stats, false);
            scrape.kernel = vec![(counter, 1)];
            let kernel_metrics = METRICS
                .iter()
                .filter(|metric| metric.name.starts_with("kernel_"))
                .filter(|metric| label_values(metric, &scrape).is_some())
                .count();
            assert_eq!(kernel_metrics, 1, "{counter:?}");
        }
    }

    #[test]
    fn the_help_of_dropped_explains_every_reason() {
        let dropped = METRICS.iter().find(|m| m.name == "dropped").unwrap();
        for (reason, _) in DROP_REASONS {
            assert!(
                dropped.help.contains(&format!("{reason} (")),
                "the help of dropped leaves out {reason}: {}",
                dropped.help
            );
        }
    }
}
