//! The `/metrics` page: at each scrape, [`catalog::METRICS`] read from the agent's sources and
//! written with prometheus-client's encoder. Nothing here names a metric.
use std::{fmt, sync::Arc};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, MetricEncoder},
};

use super::catalog::{self, Metric, Read, Sample, Scrape};
use crate::{
    dns::{cache::Cache, query_log::QueryLog, stats::Stats, workload_stats::WorkloadStats},
    ebpf::KernelCounters,
    workload::WorkloadNames,
};

/// Everything a scrape reads.
#[derive(Debug)]
pub struct AgentCollector {
    pub stats: Arc<Stats>,
    pub kernel: Arc<KernelCounters>,
    /// `None` with the cache off: its metrics are then left out.
    pub cache: Option<Arc<Cache>>,
    /// `None` without `--dnstap`: its metrics are then left out.
    pub query_log: Option<Arc<QueryLog>>,
    /// `None` without `--workload-metrics`: its metrics are then left out.
    pub workloads: Option<(Arc<WorkloadStats>, Arc<WorkloadNames>)>,
}

impl AgentCollector {
    fn scrape(&self) -> Scrape<'_> {
        let workloads = self.workloads.as_ref().map(|(counts, names)| {
            let (by_cgroup, others) = counts.snapshot();
            let named = by_cgroup.into_iter().map(|(cgroup, queries)| {
                let name = names
                    .full(cgroup)
                    .map_or_else(|| format!("cgroup-id={cgroup}"), |full| full.to_string());
                (name, queries)
            });
            let mut workloads = one_series_per_name(named);
            workloads.push(("other".to_owned(), others));
            workloads
        });
        Scrape {
            stats: &self.stats,
            kernel: self.kernel.read(),
            cache: self.cache.as_ref().map(|cache| cache.counts()),
            dnstap: self.query_log.as_ref().map(|log| log.counters()),
            workloads,
        }
    }
}

/// Sums the counts of cgroups that share a name: a cgroup made anew under a removed one's path
/// (every restart of a systemd unit), or two whose names only differ in bytes that are not
/// UTF-8. A page with two series of one label set is invalid, and Prometheus drops them.
fn one_series_per_name(counts: impl Iterator<Item = (String, u64)>) -> Vec<(String, u64)> {
    let mut by_name = std::collections::BTreeMap::new();
    for (name, queries) in counts {
        *by_name.entry(name).or_insert(0) += queries;
    }
    by_name.into_iter().collect()
}

impl Collector for AgentCollector {
    fn encode(&self, encoder: DescriptorEncoder<'_>) -> fmt::Result {
        encode(&self.scrape(), encoder)
    }
}

/// Writes every metric `scrape` has a source for.
pub fn encode(scrape: &Scrape<'_>, mut encoder: DescriptorEncoder<'_>) -> fmt::Result {
    for metric in catalog::METRICS {
        match metric.read {
            Read::Counter(read) => write(metric, &mut encoder, read(scrape), |m, value| {
                m.encode_counter::<Vec<(String, String)>, _, u64>(value, None)
            })?,
            Read::Gauge(read) => write(metric, &mut encoder, read(scrape), |m, value| {
                m.encode_gauge(value)
            })?,
            Read::Histogram(read) => write(metric, &mut encoder, read(scrape), |m, value| {
                m.encode_histogram::<Vec<(String, String)>>(
                    value.sum,
                    value.count,
                    &value.buckets,
                    None,
                )
            })?,
        }
    }
    Ok(())
}

/// Writes `metric`'s descriptor and its `samples`, each value with `value`; nothing when its
/// source is off (`None`).
fn write<T>(
    metric: &Metric,
    encoder: &mut DescriptorEncoder<'_>,
    samples: Option<Vec<Sample<'_, T>>>,
    value: impl Fn(&mut MetricEncoder<'_>, &T) -> fmt::Result,
) -> fmt::Result {
    let Some(samples) = samples else {
        return Ok(());
    };
    let kind = metric.read.metric_type();
    let mut descriptor = encoder.encode_descriptor(metric.name, metric.help, None, kind)?;
    for sample in samples {
        if metric.labels.is_empty() {
            value(&mut descriptor, &sample.value)?;
        } else {
            let labels: Vec<(&str, &str)> =
                metric.labels.iter().copied().zip(sample.labels).collect();
            value(&mut descriptor.encode_family(&labels)?, &sample.value)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use prometheus_client::registry::Registry;

    use super::*;

    /// A collector over a fixed scrape: every source on, each counter counted once.
    #[derive(Debug, Default)]
    struct Fixed(Stats);

    impl Collector for Fixed {
        fn encode(&self, encoder: DescriptorEncoder<'_>) -> fmt::Result {
            encode(&catalog::tests::scrape(&self.0, true), encoder)
        }
    }

    #[test]
    fn cgroups_that_share_a_name_are_one_series() {
        let counts = [
            ("cgroup=/a/re".to_owned(), 2),
            ("docker=0123".to_owned(), 1),
            ("cgroup=/a/re".to_owned(), 3),
        ];
        assert_eq!(
            one_series_per_name(counts.into_iter()),
            [
                ("cgroup=/a/re".to_owned(), 5),
                ("docker=0123".to_owned(), 1)
            ]
        );
    }

    #[test]
    fn the_page_shows_each_metric_of_the_catalog_with_its_type_and_help() {
        let mut registry = Registry::with_prefix(catalog::PREFIX);
        registry.register_collector(Box::new(Fixed::default()));
        let mut page = String::new();
        prometheus_client::encoding::text::encode(&mut page, &registry).unwrap();
        let described: Vec<&str> = page
            .lines()
            .filter(|line| line.starts_with("# TYPE "))
            .collect();
        let expected: Vec<String> = catalog::METRICS
            .iter()
            .map(|m| {
                format!(
                    "# TYPE dns_proxy_{} {}",
                    m.name,
                    m.read.metric_type().as_str()
                )
            })
            .collect();
        assert_eq!(described, expected, "{page}");
        for metric in catalog::METRICS {
            let help = format!("# HELP dns_proxy_{} {}", metric.name, metric.help);
            assert!(page.contains(&help), "{help}\n{page}");
        }
        for series in [
            "dns_proxy_answers_total{protocol=\"tcp\",rcode=\"NXDOMAIN\"} 1",
            "dns_proxy_dropped_total{protocol=\"udp\",reason=\"foreign_loopback\"} 0",
            "dns_proxy_tcp_connections_total 0",
            "dns_proxy_workload_queries_total{workload=\"other\"} 2",
            "dns_proxy_cache_entries 0",
            "dns_proxy_inflight_queries{protocol=\"udp\"} 0",
            "dns_proxy_query_duration_seconds_bucket{le=\"+Inf\",protocol=\"tcp\"} 0",
            "dns_proxy_kernel_impersonation_refused_total 1",
        ] {
            assert!(page.contains(series), "{series}\n{page}");
        }
    }
}
