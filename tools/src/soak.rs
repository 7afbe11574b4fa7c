//! `cargo xtask soak`: the agent under mixed clients for a long while (UDP, TCP, large
//! answers, a failing upstream), every lookup's outcome counted, and its memory and file
//! descriptors sampled. It passes if no lookup the upstream answers went unanswered and
//! neither RSS nor descriptors grew after the warm-up.
use std::{
    fmt::Write as _,
    fs,
    path::Path,
    process::Stdio,
    thread,
    time::{Duration, Instant},
};

use fixtures::{
    DnsServer, Netns, Process, SECOND_SERVER_IP, SERVER_IP, Topology, http_get, metric, status_kib,
};

use crate::bench::start_agent_binary;

pub struct Settings {
    pub duration: Duration,
    /// Pause between one thread's lookups (TCP kinds pause five times as long).
    pub interval: Duration,
}

pub struct Tools<'a> {
    pub agent: &'a Path,
    pub soak_client: &'a Path,
    pub bad_upstream: &'a Path,
}

/// Where the agent serves metrics, in the client namespace.
const METRICS: &str = "127.0.0.1:9253";
/// RSS may move this much after warm-up (allocator noise) and still count as flat.
const RSS_SLACK_KIB: u64 = 2048;
/// Descriptors may differ this much: the upstream sockets open and retire as queries come
/// (one per query in flight to a server without connected sockets, up to 16 connected per
/// family and thread, and retired ones until their last query settles).
const FD_SLACK: u64 = 40;

struct Sample {
    at: Duration,
    rss_kib: u64,
    fds: u64,
}

/// bad-upstream, silent, on SECOND_SERVER_IP:53 in `server`: the soaks' failing upstream.
pub(crate) fn start_failing_upstream(server: &Netns, bad_upstream: &Path) -> Process {
    let mut bad = server.command(bad_upstream.to_str().expect("UTF-8"));
    bad.args([&format!("{SECOND_SERVER_IP}:53"), "silent"])
        .stdout(Stdio::null());
    Process::spawn(&mut bad)
}

/// RSS (KiB) and open descriptors of a process.
pub(crate) fn resources(pid: u32) -> (u64, u64) {
    let fds = fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |dir| dir.count() as u64);
    (status_kib(pid, "VmRSS"), fds)
}

fn sample(pid: u32, at: Duration) -> Sample {
    let (rss_kib, fds) = resources(pid);
    Sample { at, rss_kib, fds }
}

/// Runs the soak; returns the report and whether it passed.
pub fn run(settings: &Settings, tools: &Tools<'_>) -> (String, bool) {
    let topology = Topology::new();
    let _server = DnsServer::start(&topology);
    topology.add_server_address(SECOND_SERVER_IP);
    let _bad = start_failing_upstream(&topology.server, tools.bad_upstream);
    let mut agent = start_agent_binary(&topology, tools.agent, &[&format!("--metrics={METRICS}")]);
    let pid = agent.process().id();

    let interval = settings.interval.as_millis().to_string();
    let mut client = topology.workload(
        tools.soak_client.to_str().expect("UTF-8"),
        &[
            &format!("{SERVER_IP}:53"),
            &format!("{SECOND_SERVER_IP}:53"),
            &interval,
        ],
    );
    client.stdin(Stdio::piped()).stdout(Stdio::piped());
    let mut client = Process::spawn(&mut client);

    // A sample every 30 s (more often in a short run); warm-up is the first tenth, at least
    // 30 s, at most 2 minutes.
    let every = (settings.duration / 20).clamp(Duration::from_secs(5), Duration::from_secs(30));
    let warm_up = (settings.duration / 10).clamp(Duration::from_secs(30), Duration::from_secs(120));
    let started = Instant::now();
    let mut samples = vec![sample(pid, Duration::ZERO)];
    let mut after_warm_up = None;
    while started.elapsed() < settings.duration {
        thread::sleep(every.min(settings.duration.saturating_sub(started.elapsed())));
        let now = sample(pid, started.elapsed());
        if after_warm_up.is_none() && now.at >= warm_up {
            after_warm_up = Some(samples.len());
        }
        eprintln!(
            "soak: {:>4} s  rss {} KiB  fds {}",
            now.at.as_secs(),
            now.rss_kib,
            now.fds
        );
        samples.push(now);
    }
    let outcomes = client.finish_with_stdout(Duration::from_secs(10));
    let alive = agent.process().is_running();
    // A dead agent has no page: its counters show as missing, and the verdict says DOWN.
    let page = if alive {
        http_get(&topology.client, METRICS.parse().unwrap(), "/metrics").1
    } else {
        String::new()
    };

    let mut report = String::new();
    let _ = writeln!(
        report,
        "soak: {} s of mixed lookups through the agent\n",
        settings.duration.as_secs()
    );
    let _ = writeln!(report, "client outcomes (no retries):");
    // Lookups the upstream answers that the client did not get, and failing ones that did
    // anything but time out.
    let (mut lost, mut failing_wrong) = (0, 0);
    for line in outcomes.lines() {
        let _ = writeln!(report, "  {line}");
        let field = |name: &str| -> u64 {
            line.split_whitespace()
                .find_map(|f| f.strip_prefix(name)?.strip_prefix('=')?.parse().ok())
                .unwrap_or(0)
        };
        if !line.starts_with("failing") {
            lost += field("timeout") + field("error") + field("wrong");
        } else {
            // The failing upstream never answers: anything but a timeout is wrong.
            failing_wrong += field("answered") + field("error") + field("wrong");
        }
    }
    let _ = writeln!(report, "\nthe agent's counters:");
    for series in [
        "dns_proxy_answers_total{protocol=\"udp\",rcode=\"NOERROR\"}",
        "dns_proxy_answers_total{protocol=\"tcp\",rcode=\"NOERROR\"}",
        "dns_proxy_upstream_timeouts_total{protocol=\"udp\"}",
        "dns_proxy_upstream_errors_total{protocol=\"udp\"}",
        "dns_proxy_upstream_errors_total{protocol=\"tcp\"}",
        "dns_proxy_dropped_total{protocol=\"udp\",reason=\"overload\"}",
        "dns_proxy_dropped_total{protocol=\"udp\",reason=\"stray\"}",
        "dns_proxy_inflight_queries{protocol=\"udp\"}",
    ] {
        let value = metric(&page, series).map_or("missing".to_owned(), |v| v.to_string());
        let _ = writeln!(report, "  {series} {value}");
    }
    let first = &samples[0];
    let warm = &samples[after_warm_up.unwrap_or(samples.len() - 1)];
    let last = samples.last().expect("samples");
    let peak_after_warm_up = samples[after_warm_up.unwrap_or(0)..]
        .iter()
        .map(|s| s.rss_kib)
        .max()
        .unwrap_or(0);
    let _ = writeln!(report, "\nthe agent's resources:");
    for (what, s) in [("start", first), ("after warm-up", warm), ("end", last)] {
        let _ = writeln!(
            report,
            "  {what:<14} {:>5} s  RSS {:>6} KiB  fds {:>3}",
            s.at.as_secs(),
            s.rss_kib,
            s.fds
        );
    }
    let _ = writeln!(report, "  peak RSS after warm-up {peak_after_warm_up} KiB");
    let rss_flat = last.rss_kib <= warm.rss_kib + RSS_SLACK_KIB;
    let fds_flat = last.fds <= warm.fds + FD_SLACK;
    let passed = lost == 0 && failing_wrong == 0 && rss_flat && fds_flat && alive;
    let _ = writeln!(
        report,
        "\nverdict: {} (lookups the upstream answered but the client did not get: {lost}; \
         lookups of the failing upstream that did not time out: {failing_wrong}; RSS \
         {} after warm-up: {:+} KiB, slack {RSS_SLACK_KIB}; fds {}: {:+}, slack {FD_SLACK}; \
         agent {})",
        if passed { "PASS" } else { "FAIL" },
        if rss_flat { "flat" } else { "GREW" },
        last.rss_kib as i64 - warm.rss_kib as i64,
        if fds_flat { "flat" } else { "GREW" },
        last.fds as i64 - warm.fds as i64,
        if alive { "up" } else { "DOWN" },
    );
    (report, passed)
}
