//! The conntrack race this product exists to remove, reproduced side by side with the agent:
//! the topology of the original incident (a workload and its DNS proxy in one network
//! namespace, the DNS server in another), lookups made the way resolvers make them, and three
//! ways of intercepting them. Used by `cargo xtask race` and by the e2e tests (tests/tests/e2e/race.rs).
use std::{
    fmt::Write as _,
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use fixtures::{Agent, DnsServer, Process, SERVER_IP, Topology, must, wait_for};

/// The uid the classic forwarder runs as, which the iptables owner match exempts.
pub const PROXY_UID: u32 = 1053;
/// The port iptables REDIRECTs DNS to, in the classic modes.
pub(crate) const REDIRECT_PORT: u16 = 8053;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `-t nat ... --dport 53 -j REDIRECT` with an `--uid-owner` exemption for the forwarder.
    Iptables,
    /// The same, plus raw-table NOTRACK for the forwarder's own DNS traffic (the usual fix).
    IptablesNotrack,
    /// No iptables: dns-proxy's eBPF redirect and forwarder.
    Agent,
}

impl Mode {
    pub const ALL: [Mode; 3] = [Mode::Iptables, Mode::IptablesNotrack, Mode::Agent];

    pub fn name(self) -> &'static str {
        match self {
            Mode::Iptables => "iptables",
            Mode::IptablesNotrack => "iptables+notrack",
            Mode::Agent => "agent",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|mode| mode.name() == text)
    }
}

#[derive(Debug, Clone)]
pub struct Settings {
    pub lookups: u32,
    /// The workload namespace's ephemeral port range; narrower makes the race frequent.
    pub port_range: Option<(u16, u16)>,
    /// Each lookup's timeout (no retries), as a resolver's.
    pub timeout: Duration,
}

/// The helper binaries (from the `tests` crate) a run needs.
pub struct Tools<'a> {
    pub classic_forwarder: &'a Path,
    pub lookup_load: &'a Path,
}

#[derive(Debug, Clone)]
pub struct Outcome {
    pub mode: Mode,
    pub lookups: u64,
    pub answered: u64,
    pub failed: u64,
    pub p50: Duration,
    pub p99: Duration,
    /// Queries the proxy received from its own upstream sockets.
    pub looped: u64,
    /// conntrack entries for UDP port 53 in the workload's namespace after the run.
    pub conntrack_entries: usize,
}

impl Outcome {
    pub fn failure_percent(&self) -> f64 {
        if self.lookups == 0 {
            return 0.0;
        }
        100.0 * self.failed as f64 / self.lookups as f64
    }
}

/// Runs `settings.lookups` lookups through `mode` in a topology of its own, which is removed
/// afterwards.
pub fn run(mode: Mode, settings: &Settings, tools: &Tools<'_>) -> Outcome {
    let topology = Topology::new();
    let _server = DnsServer::start(&topology);
    let workload_ns = &topology.client.name;
    if let Some((low, high)) = settings.port_range {
        must(Command::new("ip").args([
            "netns",
            "exec",
            workload_ns,
            "sysctl",
            "-q",
            &format!("net.ipv4.ip_local_port_range={low} {high}"),
        ]));
    }

    let interceptor = match mode {
        Mode::Iptables | Mode::IptablesNotrack => {
            install_classic_rules(workload_ns, mode == Mode::IptablesNotrack);
            Interceptor::Classic(start_classic_forwarder(&topology, settings, tools))
        }
        Mode::Agent => Interceptor::Agent(Agent::start(&topology, &[])),
    };

    let server = format!("{SERVER_IP}:53");
    let count = settings.lookups.to_string();
    let timeout_ms = settings.timeout.as_millis().to_string();
    let lookup_load = tools.lookup_load.to_str().expect("UTF-8 path");
    let output = must(&mut topology.workload(lookup_load, &[&server, &count, &timeout_ms]));
    let load = String::from_utf8_lossy(&output.stdout).into_owned();

    let looped = interceptor.stop_and_count_loops();
    let conntrack = must(Command::new("ip").args([
        "netns",
        "exec",
        workload_ns,
        "conntrack",
        "-L",
        "-p",
        "udp",
        "--dport",
        "53",
    ]));
    let conntrack_entries = String::from_utf8_lossy(&conntrack.stdout).lines().count();

    Outcome {
        mode,
        lookups: field(&load, "lookups"),
        answered: field(&load, "answered"),
        failed: field(&load, "failed"),
        p50: Duration::from_micros(field(&load, "p50_us")),
        p99: Duration::from_micros(field(&load, "p99_us")),
        looped,
        conntrack_entries,
    }
}

/// The classic rules, in the workload's namespace only: DNS to port 53 is REDIRECTed to the
/// forwarder unless it comes from the forwarder's uid.
pub(crate) fn install_classic_rules(netns: &str, notrack: bool) {
    let mut rules = vec![
        format!("-t nat -A OUTPUT -p udp --dport 53 -m owner --uid-owner {PROXY_UID} -j RETURN"),
        format!("-t nat -A OUTPUT -p udp --dport 53 -j REDIRECT --to-ports {REDIRECT_PORT}"),
    ];
    if notrack {
        // The forwarder's queries and the server's answers bypass conntrack altogether.
        rules.push(format!(
            "-t raw -A OUTPUT -p udp --dport 53 -m owner --uid-owner {PROXY_UID} -j NOTRACK"
        ));
        rules.push("-t raw -A PREROUTING -p udp --sport 53 -j NOTRACK".to_owned());
    }
    for rule in rules {
        let iptables = ["netns", "exec", netns, "iptables", "-w"];
        must(
            Command::new("ip")
                .args(iptables)
                .args(rule.split_whitespace()),
        );
    }
}

fn start_classic_forwarder(topology: &Topology, settings: &Settings, tools: &Tools<'_>) -> Process {
    let mut command = topology.client.command("setpriv");
    command
        .arg(format!("--reuid={PROXY_UID}"))
        .arg(format!("--regid={PROXY_UID}"))
        .args(["--clear-groups", "--"])
        .arg(tools.classic_forwarder)
        // REDIRECT sends locally made packets to 127.0.0.1; answering from exactly there is
        // what lets conntrack's reverse NAT show them as from the server.
        .arg(format!("127.0.0.1:{REDIRECT_PORT}"))
        .arg(format!("{SERVER_IP}:53"))
        .arg(settings.timeout.as_millis().to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    let forwarder = Process::spawn(&mut command);
    // Ready when a lookup through the rules is answered.
    wait_for(
        "the classic forwarder to answer",
        Duration::from_secs(10),
        || {
            let lookup_load = tools.lookup_load.to_str().expect("UTF-8 path");
            let output = topology
                .workload(lookup_load, &[&format!("{SERVER_IP}:53"), "1", "500"])
                .output()
                .ok()?;
            String::from_utf8_lossy(&output.stdout)
                .contains("answered=1")
                .then_some(())
        },
    );
    forwarder
}

enum Interceptor {
    Classic(Process),
    Agent(Agent),
}

impl Interceptor {
    /// Stops the proxy and returns how many of its own queries came back to it.
    fn stop_and_count_loops(self) -> u64 {
        match self {
            Interceptor::Classic(mut forwarder) => {
                let summary = forwarder.finish_with_stdout(Duration::from_secs(10));
                field(&summary, "looped")
            }
            Interceptor::Agent(mut agent) => {
                agent.process().signal(libc::SIGTERM);
                agent.process().wait_exit(Duration::from_secs(10));
                // The agent's exit summary: "udp: ... dropped_loop=N tcp: ...".
                let log = agent.log();
                let summary = log.lines().find(|l| l.contains("stopped: udp: "));
                let summary =
                    summary.unwrap_or_else(|| panic!("no exit summary in the agent's log:\n{log}"));
                field(summary, "dropped_loop")
            }
        }
    }
}

/// The number after `name=` in a line of `key=value` fields.
pub(crate) fn field(text: &str, name: &str) -> u64 {
    let prefix = format!("{name}=");
    text.split_whitespace()
        .find_map(|kv| kv.strip_prefix(&prefix))
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(|| panic!("no {name}= in {text:?}"))
}

/// The results as one table.
pub fn table(outcomes: &[Outcome]) -> String {
    let mut table = String::from(
        "mode              lookups  answered  failed  failure %   p50 ms   p99 ms  looped  conntrack :53\n",
    );
    for o in outcomes {
        let _ = writeln!(
            table,
            "{:<16} {:>8} {:>9} {:>7} {:>9.2} {:>8.2} {:>8.2} {:>7} {:>14}",
            o.mode.name(),
            o.lookups,
            o.answered,
            o.failed,
            o.failure_percent(),
            o.p50.as_secs_f64() * 1000.0,
            o.p99.as_secs_f64() * 1000.0,
            o.looped,
            o.conntrack_entries
        );
    }
    table
}
