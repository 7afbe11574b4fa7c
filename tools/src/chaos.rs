//! `cargo xtask soak --chaos`: the soak's mixed clients, from several network namespaces (two
//! pods and the node's own processes), plus long-lived connected sockets, while the agent is
//! restarted gracefully (by takeover: the next agent starts with `--takeover`, then the old
//! one gets SIGTERM) and killed with SIGKILL and restarted, at random intervals. It passes
//! when no lookup is lost (each client retries once, as a resolver does: a lookup in flight at
//! a SIGKILL may need that retry, nothing else should), and the agent's memory and descriptors
//! do not grow from one instance to the next.
use std::{
    fmt::Write as _,
    path::Path,
    process::Stdio,
    thread,
    time::{Duration, Instant},
};

use fixtures::{
    ANSWER_IP, Agent, DnsServer, Process, SECOND_SERVER_IP, SERVER_IP,
    node::{NODE_LISTEN, NodeTopology},
    status_kib,
};

use crate::soak::{resources, start_failing_upstream};

pub struct Tools<'a> {
    pub agent: &'a Path,
    pub soak_client: &'a Path,
    pub bad_upstream: &'a Path,
    pub hostile_client: &'a Path,
}

/// The heap may differ this much between instances (allocator noise) and still count as flat.
/// Judged by the heap (`RssAnon`), which is where a leak shows; `VmRSS` also counts the pages
/// of the binary an instance happened to run. Both are reported.
const RSS_SLACK_KIB: u64 = 4096;

/// An instance's (RSS, heap) in KiB and open descriptors.
fn instance_resources(pid: u32) -> (u64, u64, u64) {
    let (rss, fds) = resources(pid);
    (rss, status_kib(pid, "RssAnon"), fds)
}
/// Descriptors likewise (the upstream socket pools open and retire sockets as queries come).
const FD_SLACK: u64 = 40;
/// A long-lived socket's lookup: every 500 ms, retried once after 2 s on the same socket (glibc
/// waits 5 s).
const LONG_LIVED_INTERVAL_MS: u64 = 500;

/// The agent binary in the node's namespace, in node mode, as the DaemonSet runs it (taking
/// over from the agent running, if there is one).
fn start_agent(node: &NodeTopology, agent: &Path) -> Agent {
    let mut command = node.node.nsenter();
    command
        .arg(agent)
        .arg("run")
        .arg(format!("--cgroup={}", node.redirected_cgroup().display()))
        .arg(format!("--listen={NODE_LISTEN}:53"))
        .arg("--takeover")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null());
    Agent::spawn(command)
}

#[derive(Clone, Copy)]
enum Restart {
    Takeover,
    Sigkill,
}

/// The restart a lookup retried at `t` seconds came with: the nearest within 3 s before it
/// began (a lookup in flight) to 6 s after (a 2 s retry wait, and the next agent's start).
fn restart_near(t: u64, restarts: &[(u64, Restart)]) -> Option<Restart> {
    restarts
        .iter()
        .filter(|(at, _)| t + 3 >= *at && t <= at + 6)
        .min_by_key(|(at, _)| t.abs_diff(*at))
        .map(|(_, kind)| *kind)
}

/// A small pseudo-random sequence (xorshift), seeded from the clock: the restarts come at
/// different moments in every run, and the report says when.
struct Random(u64);

impl Random {
    fn next(&mut self, below: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % below
    }
}

/// Runs the chaos soak for `duration`; returns the report and whether it passed.
pub fn run(duration: Duration, interval: Duration, tools: &Tools<'_>) -> (String, bool) {
    let node = NodeTopology::new();
    let _server = DnsServer::launch(&node.server, &node.node, SERVER_IP, ANSWER_IP, true);
    node.add_server_address(SECOND_SERVER_IP);
    let _bad = start_failing_upstream(&node.server, tools.bad_upstream);
    let mut agent = start_agent(&node, tools.agent);

    let soak_client = tools.soak_client.to_str().expect("UTF-8");
    let hostile = tools.hostile_client.to_str().expect("UTF-8");
    let server = format!("{SERVER_IP}:53");
    let failing = format!("{SECOND_SERVER_IP}:53");
    let interval_ms = interval.as_millis().to_string();
    let soak_args = [server.as_str(), failing.as_str(), interval_ms.as_str(), "1"];
    let long_lived_count = (duration.as_millis() as u64 / LONG_LIVED_INTERVAL_MS).to_string();
    let interval = LONG_LIVED_INTERVAL_MS.to_string();
    let long_lived_args = |prefix: &'static str| {
        [
            "long-lived".to_owned(),
            server.clone(),
            prefix.to_owned(),
            long_lived_count.clone(),
            interval.clone(),
            "2000".to_owned(),
        ]
    };
    let spawn = |mut command: std::process::Command| {
        command.stdin(Stdio::piped()).stdout(Stdio::piped());
        Process::spawn(&mut command)
    };
    let mut clients: Vec<(&str, Process)> = vec![
        ("pod 0", spawn(node.pod(0, soak_client, &soak_args))),
        ("pod 1", spawn(node.pod(1, soak_client, &soak_args))),
        ("node", spawn(node.host(soak_client, &soak_args))),
    ];
    let pod_socket = long_lived_args("pod1-ll");
    let node_socket = long_lived_args("node-ll");
    let pod_socket: Vec<&str> = pod_socket.iter().map(String::as_str).collect();
    let node_socket: Vec<&str> = node_socket.iter().map(String::as_str).collect();
    let mut long_lived: Vec<(&str, Process)> = vec![
        (
            "pod 1, one socket",
            spawn(node.pod(1, hostile, &pod_socket)),
        ),
        ("node, one socket", spawn(node.host(hostile, &node_socket))),
    ];

    let started = Instant::now();
    let mut random = Random(
        started.elapsed().as_nanos() as u64 ^ u64::from(std::process::id()) ^ 0x9e37_79b9_7f4a_7c15,
    );
    let mut events = Vec::new();
    let mut restarts: Vec<(u64, Restart)> = Vec::new();
    let mut instances = Vec::new();
    let (mut graceful, mut killed) = (0, 0);
    // Restarts every 10 to 30 s, until 10 s before the end (the last instance serves the
    // clients' last lookups).
    while started.elapsed() + Duration::from_secs(40) < duration {
        thread::sleep(Duration::from_secs(10 + random.next(21)));
        let pid = agent.process().id();
        instances.push(instance_resources(pid));
        let at = started.elapsed().as_secs();
        if random.next(2) == 0 {
            // As a DaemonSet with `maxSurge: 1` restarts it: the next agent first, taking
            // over, then SIGTERM to this one.
            let next = start_agent(&node, tools.agent);
            agent.process().signal(libc::SIGTERM);
            let status = agent.process().wait_exit(Duration::from_secs(15));
            events.push(format!(
                "{at:>5} s  graceful restart by takeover (old agent's exit {status})"
            ));
            graceful += 1;
            restarts.push((at, Restart::Takeover));
            agent = next;
        } else {
            agent.process().signal(libc::SIGKILL);
            agent.process().wait_exit(Duration::from_secs(5));
            events.push(format!("{at:>5} s  SIGKILL and restart"));
            killed += 1;
            restarts.push((at, Restart::Sigkill));
            agent = start_agent(&node, tools.agent);
        }
    }
    thread::sleep(duration.saturating_sub(started.elapsed()));
    instances.push(instance_resources(agent.process().id()));

    let mut report = String::new();
    let _ = writeln!(
        report,
        "chaos soak: {} s of mixed lookups from two pods and the node, through an agent \
         restarted {graceful} times gracefully and {killed} times by SIGKILL\n",
        duration.as_secs()
    );
    let _ = writeln!(report, "restarts:");
    for event in &events {
        let _ = writeln!(report, "  {event}");
    }
    let _ = writeln!(report, "\nclient outcomes (one retry each):");
    let (mut lost, mut failing_wrong, mut retried) = (0u64, 0u64, 0u64);
    // When each retried lookup was, in seconds since the start.
    let mut retried_at: Vec<u64> = Vec::new();
    for (who, mut client) in clients.drain(..) {
        let outcomes = client.finish_with_stdout(Duration::from_secs(15));
        for line in outcomes.lines() {
            let _ = writeln!(report, "  {who:<18} {line}");
            let field = |name: &str| -> u64 {
                line.split_whitespace()
                    .find_map(|f| f.strip_prefix(name)?.strip_prefix('=')?.parse().ok())
                    .unwrap_or(0)
            };
            if line.starts_with("failing") {
                failing_wrong += field("answered") + field("error") + field("wrong");
            } else {
                lost += field("timeout") + field("error") + field("wrong");
                retried += field("retried");
                retried_at.extend(
                    line.split_whitespace()
                        .find_map(|f| f.strip_prefix("retried_at_s="))
                        .unwrap_or("")
                        .split(',')
                        .filter_map(|t| t.parse::<u64>().ok()),
                );
            }
        }
    }
    for (who, mut socket) in long_lived.drain(..) {
        // It ends by itself after its count; closing stdin changes nothing.
        let outcomes = socket.finish_with_stdout(Duration::from_secs(30));
        let answered = outcomes.lines().filter(|l| l.contains("answered")).count() as u64;
        let failed = outcomes.lines().filter(|l| l.contains("failed")).count() as u64;
        let second_try = outcomes.lines().filter(|l| l.contains("tries=2")).count() as u64;
        retried_at.extend(
            outcomes
                .lines()
                .filter(|l| l.contains("tries=2"))
                .filter_map(|l| l.split_once("at_ms=")?.1.trim().parse::<u64>().ok())
                .map(|ms| ms / 1000),
        );
        let _ = writeln!(
            report,
            "  {who:<18} lookups answered={answered} failed={failed} retried={second_try}"
        );
        lost += failed;
        retried += second_try;
    }
    let _ = writeln!(
        report,
        "\nthe agent's resources, each instance just before it stopped:"
    );
    for (i, (rss, heap, fds)) in instances.iter().enumerate() {
        let _ = writeln!(
            report,
            "  instance {:>2}  RSS {rss:>6} KiB  heap {heap:>6} KiB  fds {fds:>3}",
            i + 1
        );
    }
    let (_, first_heap, first_fds) = instances.first().copied().unwrap_or_default();
    let grew = instances
        .iter()
        .any(|(_, heap, fds)| *heap > first_heap + RSS_SLACK_KIB || *fds > first_fds + FD_SLACK);
    // Each retry, by the restart it came with.
    let (mut at_sigkill, mut at_takeover, mut elsewhere) = (0u64, 0u64, 0u64);
    for t in &retried_at {
        match restart_near(*t, &restarts) {
            Some(Restart::Sigkill) => at_sigkill += 1,
            Some(Restart::Takeover) => at_takeover += 1,
            None => elsewhere += 1,
        }
    }
    let untimed = retried.saturating_sub(retried_at.len() as u64);
    let _ = writeln!(
        report,
        "\nretried lookups by when they were: {at_sigkill} at a SIGKILL, {at_takeover} at a \
         takeover, {elsewhere} at no restart, {untimed} not timed"
    );
    let passed = lost == 0
        && failing_wrong == 0
        && at_takeover + elsewhere + untimed == 0
        && !grew
        && killed + graceful > 0;
    let _ = writeln!(
        report,
        "\nverdict: {} (lookups lost after their retry: {lost}; answered only on the retry: \
         {retried}, around {killed} SIGKILLs and {graceful} takeovers, none allowed but at a \
         SIGKILL; failing-upstream \
         lookups that did not time out: {failing_wrong}; resources {} across instances, \
         heap slack {RSS_SLACK_KIB} KiB and {FD_SLACK} fds)",
        if passed { "PASS" } else { "FAIL" },
        if grew { "GREW" } else { "flat" },
    );
    (report, passed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_retry_belongs_to_the_nearest_restart_around_it() {
        let restarts = [(20, Restart::Sigkill), (35, Restart::Takeover)];
        // In flight when the agent was killed, retried 2 s later.
        assert!(matches!(
            restart_near(18, &restarts),
            Some(Restart::Sigkill)
        ));
        assert!(matches!(
            restart_near(22, &restarts),
            Some(Restart::Sigkill)
        ));
        assert!(matches!(
            restart_near(34, &restarts),
            Some(Restart::Takeover)
        ));
        // Far from any restart.
        assert!(restart_near(10, &restarts).is_none());
        assert!(restart_near(27, &restarts).is_none());
        assert!(restart_near(50, &restarts).is_none());
    }
}
