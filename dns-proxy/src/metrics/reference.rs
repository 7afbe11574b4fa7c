//! docs/metrics.md, the operator's reference, rendered from [`catalog::METRICS`]. A unit test
//! fails when the file and the catalog disagree, and rewrites the file when asked to. Built
//! for tests only: nothing in the agent needs it.
use std::fmt::Write as _;

use super::catalog::{self, Read};
use crate::dns::stats::LATENCY_BUCKETS_US;

/// How to regenerate docs/metrics.md (the test of that name compares it with the catalog).
const REGENERATE: &str = "UPDATE_DOCS=1 cargo test -p dns-proxy metrics_reference";

/// docs/metrics.md.
pub fn render() -> String {
    let mut text = String::new();
    // Writing to a String cannot fail.
    let _ = write_reference(&mut text);
    text
}

fn write_reference(out: &mut String) -> std::fmt::Result {
    writeln!(out, "# Metrics reference")?;
    writeln!(out)?;
    writeln!(
        out,
        "<!-- Generated from dns-proxy/src/metrics/catalog.rs; do not edit. Regenerate with:\n     \
         {REGENERATE} -->"
    )?;
    writeln!(out)?;
    writeln!(
        out,
        "With `--metrics ADDR:PORT`, the agent serves these at `/metrics`, in the OpenMetrics \
         text\nformat, read at each scrape from the proxy's counters and the kernel side's \
         per-CPU counters\n(summed over the CPUs). The page carries the same help (`# HELP`). \
         The other endpoints\n(`/healthz`, `/readyz`, `/v1/resolutions`) are in \
         [operations.md](operations.md#metrics-and-health)\nand [attribution.md](attribution.md)."
    )?;
    writeln!(out)?;
    writeln!(out, "- `protocol` is `udp` or `tcp`.")?;
    writeln!(
        out,
        "- A metric shown \"with\" an option is left off the page without that option."
    )?;
    writeln!(
        out,
        "- A kernel counter that cannot be read is left off that scrape (and a warning logged)."
    )?;
    for metric in catalog::METRICS {
        if let Read::Histogram(_) = metric.read {
            let bounds: Vec<String> = LATENCY_BUCKETS_US.iter().map(|&us| duration(us)).collect();
            writeln!(
                out,
                "- The buckets of `{}_{}` end at {} and +Inf.",
                catalog::PREFIX,
                metric.name,
                bounds.join(", ")
            )?;
        }
    }
    writeln!(out)?;
    writeln!(out, "| Metric | Type | Labels | On the page | Help |")?;
    writeln!(out, "| --- | --- | --- | --- | --- |")?;
    for metric in catalog::METRICS {
        let kind = metric.read.metric_type();
        let suffix = if let Read::Counter(_) = metric.read {
            "_total"
        } else {
            ""
        };
        let labels: Vec<String> = metric.labels.iter().map(|l| format!("`{l}`")).collect();
        let on_the_page = metric
            .only_with
            .map_or_else(|| "always".to_owned(), |option| format!("with `{option}`"));
        writeln!(
            out,
            "| `{}_{}{suffix}` | {} | {} | {on_the_page} | {} |",
            catalog::PREFIX,
            metric.name,
            kind.as_str(),
            labels.join(", "),
            metric.help.replace('|', "\\|"),
        )?;
    }
    Ok(())
}

/// `us` microseconds, as "250 µs", "2.5 ms" or "1 s".
fn duration(us: u64) -> String {
    match us {
        0..1_000 => format!("{us} µs"),
        1_000..1_000_000 => format!("{} ms", us as f64 / 1e3),
        _ => format!("{} s", us as f64 / 1e6),
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn the_metrics_reference_in_docs_is_the_catalogs() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/metrics.md");
        let rendered = render();
        if std::env::var_os("UPDATE_DOCS").is_some_and(|update| update == "1") {
            std::fs::write(&path, &rendered).expect("write docs/metrics.md");
            return;
        }
        let written = std::fs::read_to_string(&path).unwrap_or_default();
        let (written_lines, rendered_lines): (Vec<_>, Vec<_>) =
            (written.lines().collect(), rendered.lines().collect());
        let lines = written_lines.len().max(rendered_lines.len());
        if let Some(line) = (0..lines).find(|&i| written_lines.get(i) != rendered_lines.get(i)) {
            panic!(
                "docs/metrics.md is not what dns-proxy/src/metrics/catalog.rs declares; at line \
                 {}:\n  file:    {:?}\n  catalog: {:?}\nRegenerate it with `{REGENERATE}`.",
                line + 1,
                written_lines.get(line),
                rendered_lines.get(line),
            );
        }
        assert_eq!(
            written, rendered,
            "Regenerate docs/metrics.md with `{REGENERATE}`."
        );
    }

    #[test]
    fn bucket_bounds_read_in_their_unit() {
        assert_eq!(duration(100), "100 µs");
        assert_eq!(duration(2_500), "2.5 ms");
        assert_eq!(duration(5_000_000), "5 s");
    }
}
