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
    pub workloads: Option<Arc<WorkloadStats>>,
}

impl AgentCollector {
    fn scrape(&self) -> Scrape<'_> {
        let workloads = self.workloads.as_ref().map(|counts| {
            // One series per workload: its cgroups (each restart of a unit) share its place.
            let (by_name, others) = counts.snapshot();
            let mut workloads: Vec<(String, u64)> = by_name
                .into_iter()
                .map(|(name, queries)| (name.to_string(), queries))
                .collect();
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
