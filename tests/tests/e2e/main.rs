//! End to end, in the real kernel: the real agent attached to a test cgroup, real DNS servers
//! (dnsmasq, unbound) in a namespace of their own, real clients as workloads. Needs root:
//! without, the first test ends the run with one line saying what to run instead. One binary
//! with modules, so it links once. What each module covers: tests/README.md.
mod attribution;
mod cache;
mod clients;
mod containers;
mod foundation;
mod hardening;
mod node;
mod operations;
mod race;
mod redirect;
mod upstreams;

use std::{
    io::{BufRead as _, BufReader},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use tests::{
    ANSWER_IP, Agent, DnsServer, Harness, PROXY_LISTEN, Placement, SECOND_ANSWER_IP,
    SECOND_SERVER_IP, SERVER_IP, Topology, agent_binary, attached_map_entries, dig, must, wait_for,
};

const PROBE: &str = env!("CARGO_BIN_EXE_dns-probe");
const STEADY: &str = env!("CARGO_BIN_EXE_steady-lookups");
const HOSTILE: &str = env!("CARGO_BIN_EXE_hostile-client");

/// The agent's log line for `name`, waited for briefly (it is written after the answer is sent).
fn forwarded(agent: &Agent, name: &str) -> String {
    wait_for(
        &format!("the agent to log the query for {name}"),
        Duration::from_secs(5),
        || agent.query_line(name),
    )
}

/// Whether a query line names cgroup `cgroup`'s workload: by its path once the agent has named
/// it, by its id (the cgroup's inode) before.
fn attributed_to(line: &str, cgroup: &std::path::Path) -> bool {
    let Some((_, workload)) = line.rsplit_once(" workload=") else {
        return false;
    };
    let name = cgroup.file_name().unwrap().to_string_lossy();
    let id = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(cgroup).unwrap());
    workload.ends_with(&format!("/{name}")) || workload == format!("cgroup-id={id}")
}

/// Waits up to 5 s for the agent to log a line holding `text` (it logs what it notices of
/// the host: routes, addresses).
fn wait_for_log(agent: &Agent, text: &str) {
    wait_for(
        &format!("the agent to log {text:?}"),
        Duration::from_secs(10),
        || agent.log().contains(text).then_some(()),
    );
}

fn assert_answered(result: Result<String, String>, what: &str) {
    let output = result.unwrap_or_else(|err| panic!("{what} failed:\n{err}"));
    assert!(
        output.contains(&ANSWER_IP.to_string()),
        "{what}: no {ANSWER_IP} in:\n{output}"
    );
}

/// A cgroup below the test cgroup, made with its parents (removed with it).
fn child_cgroup(topology: &Topology, relative: &str) -> std::path::PathBuf {
    let path = topology.cgroup.path.join(relative);
    std::fs::create_dir_all(&path).unwrap_or_else(|err| panic!("mkdir {}: {err}", path.display()));
    path
}

/// Runs the probe as a workload against SERVER_IP:53; returns its `source=... answer=...` line.
fn probe(topology: &Topology, mode: &str, name: &str) -> String {
    probe_at(topology, mode, &format!("{SERVER_IP}:53"), name, &[])
}

/// Runs the probe as a workload; returns its output line.
fn probe_at(topology: &Topology, mode: &str, servers: &str, name: &str, extra: &[&str]) -> String {
    let mut args = vec![mode, servers, name];
    args.extend_from_slice(extra);
    let output = must(&mut topology.workload(PROBE, &args));
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

/// A `test-upstream` on `ip` in the server namespace (which has [`SERVER_IP`] already),
/// answering `answer` with TTL 60, `delay_ms` after each query; returned once it answers.
fn start_test_upstream(
    topology: &Topology,
    ip: std::net::Ipv4Addr,
    delay_ms: u32,
    answer: std::net::Ipv4Addr,
) -> tests::Process {
    if ip != SERVER_IP {
        topology.add_server_address(ip);
    }
    let mut command = topology.server.command(env!("CARGO_BIN_EXE_test-upstream"));
    command.args([
        &format!("{ip}:53"),
        &delay_ms.to_string(),
        &answer.to_string(),
    ]);
    let process = tests::Process::spawn(&mut command);
    wait_for("the upstream to answer", Duration::from_secs(10), || {
        let outsider = topology.outsider("dig", &[]);
        tests::dig_at(
            outsider,
            &ip.to_string(),
            "ready.example.test",
            &["+time=1"],
        )
        .ok()
    });
    process
}

/// Where agents started with `--metrics` serve, in the client namespace.
const METRICS: &str = "127.0.0.1:9253";

/// Held by each test that floods an agent for seconds, and by the tests that a flood beside
/// them could fail by timing alone (a window of a second or two to act in). libtest starts
/// tests in name order, two at a time on CI's two CPUs: two floods side by side each took
/// the CPU the other's steady clients need, and a test that allows a retry in a hundred
/// lookups measured the neighbour, not its agent.
fn one_flood_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static FLOODS: std::sync::Mutex<()> = std::sync::Mutex::new(());
    FLOODS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn metrics_addr() -> std::net::SocketAddr {
    METRICS.parse().unwrap()
}

/// The agent's /metrics page.
fn scrape(topology: &Topology) -> String {
    let (status, page) = tests::http_get(&topology.client, metrics_addr(), "/metrics");
    assert_eq!(status, 200, "{page}");
    page
}

/// A series' value on a scraped page; panics if it is missing.
fn value(page: &str, series: &str) -> u64 {
    tests::metric(page, series).unwrap_or_else(|| panic!("no {series} in:\n{page}")) as u64
}

/// The server table's two counters of what found no room, from a scraped page: lookups that
/// went by a shared index (their workload unknown), and connects and sends that went direct.
fn no_room_counts(page: &str) -> (u64, u64) {
    (
        value(page, "dns_proxy_kernel_shared_index_total"),
        value(page, "dns_proxy_kernel_table_full_total"),
    )
}

fn expected_probe_line() -> String {
    format!("source={SERVER_IP}:53 answer={ANSWER_IP}")
}

/// A probe to start at the same time as others, and the line it must print.
struct ConcurrentProbe {
    name: String,
    command: Command,
    expected: String,
}

/// Starts every probe at once, so that their queries are in the proxy together, then checks
/// that each one printed what it must.
fn run_together(probes: Vec<ConcurrentProbe>) {
    let running: Vec<_> = probes
        .into_iter()
        .map(|mut probe| {
            let child = probe
                .command
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("start the probe");
            (probe.name, probe.expected, child)
        })
        .collect();
    for (name, expected, child) in running {
        let output = child.wait_with_output().expect("wait for the probe");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "{name}: {stderr}");
        assert_eq!(
            String::from_utf8_lossy(&output.stdout).trim(),
            expected,
            "{name}"
        );
    }
}

/// Checks what a `hostile-client long-lived PREFIX COUNT ...` client printed and what the
/// agents that served it logged (`logs` reads them all): every lookup answered on its first
/// try, and each handled by exactly one agent, once (an agent's upstream query sent round
/// through another would be logged twice).
fn assert_long_lived_all_first_try(
    output: &str,
    prefix: &str,
    count: usize,
    logs: impl Fn() -> Vec<String>,
) {
    let lines: Vec<&str> = output.lines().collect();
    assert_eq!(lines.len(), count, "{prefix}:\n{output}");
    let retried: Vec<&&str> = lines
        .iter()
        .filter(|line| !line.contains(": answered tries=1 "))
        .collect();
    assert!(retried.is_empty(), "{prefix}: {retried:?}");
    let handled = |logs: &[String], i: usize| -> usize {
        let needle = format!(" name={prefix}-{i}.example.test. ");
        logs.iter()
            .map(|log| {
                log.lines()
                    .filter(|line| line.contains("query udp client=") && line.contains(&needle))
                    .count()
            })
            .sum()
    };
    // A lookup's line comes just after its answer: wait for every one's (a fixed pause
    // before reading them was once too short).
    let logs = wait_for(
        &format!("a query line for each of the {count} {prefix} lookups"),
        Duration::from_secs(5),
        || {
            let logs = logs();
            (0..count).all(|i| handled(&logs, i) >= 1).then_some(logs)
        },
    );
    for i in 0..count {
        let times = handled(&logs, i);
        assert_eq!(times, 1, "{prefix}-{i} was handled {times} times");
    }
}

/// `lookups=N first_try=N retried=N failed=N` as numbers.
fn steady_outcome(line: &str) -> [u64; 4] {
    numbers_of(line)
}

/// The `N` numbers of a line of `name=number` fields, in order; panics if it has not `N`.
fn numbers_of<const N: usize>(line: &str) -> [u64; N] {
    let numbers: Vec<u64> = line
        .split_whitespace()
        .filter_map(|field| field.split_once('=')?.1.parse().ok())
        .collect();
    numbers
        .try_into()
        .unwrap_or_else(|_| panic!("not {N} numbers: {line}"))
}
