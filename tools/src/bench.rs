//! `cargo xtask bench`: dns-proxy side by side with the direct path and with the classic
//! design (iptables REDIRECT to dnsdist), in one run, several rounds interleaved.
//!
//! Each configuration gets a topology of its own: dnsperf as a workload (in the test cgroup, in
//! the client namespace) and the upstream (`test-upstream`, a minimal responder that answers
//! every query at once) in the server namespace behind a veth pair. The same upstream, the
//! same query file and the same dnsperf settings for every row.
//!
//! The cached rows ask about 1,000 names over and over, through a cache: the agent's
//! (`--cache-size`), dnsdist's packet cache behind the same iptables redirect, and, with no
//! interception, a caching upstream (dnsdist with its packet cache, in the server namespace in
//! front of `test-upstream`).
use std::{
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use fixtures::{
    ANSWER_IP, Agent, PROXY_LISTEN, Process, SERVER_IP, Topology, must, status_kib, wait_for,
};

use crate::race::{PROXY_UID, REDIRECT_PORT, field, install_classic_rules};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Config {
    /// No interception: the physical ceiling.
    Direct,
    /// No interception, and the least relay there is (`bare-relay`, tools/src/bin) between
    /// dnsperf and the upstream, which dnsperf asks directly: the ceiling of any user-space
    /// proxy on this machine.
    BareRelay,
    /// dns-proxy's eBPF redirect and forwarder.
    Agent,
    /// The same with every query logged, with its workload, to a dnstap file (`--dnstap`):
    /// issue 17's budget.
    AgentDnstap,
    /// The same with everything that watches queries on: `--dnstap` to a file, `--metrics`
    /// (the table of names each workload resolved) and `--workload-metrics`.
    AgentLogging,
    /// iptables REDIRECT (with the owner exemption) to dnsdist.
    IptablesDnsdist,
}

/// The configurations of the cached rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CachedConfig {
    /// No interception, to a caching upstream: the ceiling.
    DirectToCache,
    /// dns-proxy with `--cache-size`.
    AgentCache,
    /// iptables REDIRECT to dnsdist with its packet cache.
    IptablesDnsdistCache,
}

impl CachedConfig {
    pub const ALL: [CachedConfig; 3] = [
        CachedConfig::DirectToCache,
        CachedConfig::AgentCache,
        CachedConfig::IptablesDnsdistCache,
    ];

    pub fn name(self) -> &'static str {
        match self {
            CachedConfig::DirectToCache => "direct to a cache",
            CachedConfig::AgentCache => "agent cache",
            CachedConfig::IptablesDnsdistCache => "dnsdist cache",
        }
    }
}

/// Entries of every cache in the cached rows: room for all the names asked.
const CACHE_ENTRIES: u32 = 10_000;
/// Names the cached rows ask, over and over.
const CACHED_NAMES: u32 = 1_000;

impl Config {
    pub const ALL: [Config; 6] = [
        Config::Direct,
        Config::BareRelay,
        Config::Agent,
        Config::AgentDnstap,
        Config::AgentLogging,
        Config::IptablesDnsdist,
    ];
    /// The rows of `Rows::Logging`.
    pub const LOGGING: [Config; 3] = [Config::Agent, Config::AgentDnstap, Config::AgentLogging];

    pub fn name(self) -> &'static str {
        match self {
            Config::Direct => "direct",
            Config::BareRelay => "bare relay",
            Config::Agent => "agent",
            Config::AgentDnstap => "agent+dnstap",
            Config::AgentLogging => "agent+all logs",
            Config::IptablesDnsdist => "iptables+dnsdist",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Settings {
    pub rounds: u32,
    /// Each dnsperf run's length.
    pub duration: Duration,
    /// Offered loads for the latency-under-load rows, queries/s.
    pub loads: Vec<u32>,
    /// Lookups per syscall-cost measurement.
    pub syscall_lookups: u32,
    /// Queries in flight for the memory measurement.
    pub inflight: u32,
    /// Which rows to measure.
    pub rows: Rows,
}

/// The rows a run measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Rows {
    #[default]
    All,
    /// Without caches: the relay, and the memory with queries in flight.
    Uncached,
    /// Through caches only.
    Cached,
    /// The plain agent and the agent logging (issue 17's budget): the closed loop only, so
    /// that the rows compared run seconds apart.
    Logging,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            rounds: 3,
            duration: Duration::from_secs(4),
            loads: vec![5_000, 20_000],
            syscall_lookups: 20_000,
            inflight: 10_000,
            rows: Rows::All,
        }
    }
}

/// The helper binaries of the `tests` crate a run needs.
pub struct Tools<'a> {
    /// The agent binary (a release build: it is the one measured).
    pub agent: &'a Path,
    pub test_upstream: &'a Path,
    pub syscall_cost: &'a Path,
    pub bare_relay: &'a Path,
}

/// Latency percentiles, in microseconds.
#[derive(Debug, Clone, Copy, Default)]
pub struct Latency {
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
}

/// One configuration's measurements in one round.
#[derive(Debug, Clone)]
pub struct Measurement {
    pub config: Config,
    /// The closed loop, the offered loads and the CPU they cost (0 for direct).
    pub throughput: Throughput,
    /// One query outstanding at a time.
    pub single: Latency,
    /// The proxy's peak resident memory over the round, MiB (0 for direct).
    pub peak_rss_mib: f64,
    /// The client's syscall time per lookup of a fresh socket (median), nanoseconds: all of
    /// it, and `connect`, `send` and `recv` alone.
    pub syscall_ns: f64,
    pub connect_ns: f64,
    pub send_ns: f64,
    pub recv_ns: f64,
}

/// The interception a configuration puts between dnsperf and the upstream.
enum Interceptor {
    None,
    /// `bare-relay` on [`BARE_RELAY_LISTEN`], which dnsperf asks instead of the upstream.
    BareRelay(Process),
    Agent(Agent),
    Dnsdist(Process, PathBuf),
    /// The agent writing a dnstap log to this file.
    LoggingAgent(Agent, PathBuf),
    /// The caching upstream of the direct cached row: nothing intercepts.
    CachingUpstream {
        _process: Process,
        conf: PathBuf,
    },
}

impl Interceptor {
    fn start(
        config: Config,
        topology: &Topology,
        tools: &Tools<'_>,
        extra_agent_args: &[&str],
    ) -> Self {
        match config {
            Config::Direct => Interceptor::None,
            Config::BareRelay => {
                let mut command = topology.client.nsenter();
                command
                    .arg(tools.bare_relay)
                    .args([BARE_RELAY_LISTEN, &format!("{SERVER_IP}:53")]);
                let relay = Process::spawn(&mut command);
                wait_until_answered("the bare relay", || {
                    topology.outsider("dig", &READY_DIG_BARE_RELAY)
                });
                Interceptor::BareRelay(relay)
            }
            Config::Agent => Interceptor::Agent(start_agent(topology, tools, extra_agent_args)),
            Config::AgentDnstap | Config::AgentLogging => {
                let log = std::env::temp_dir().join(format!("{}-dnstap.log", topology.tag));
                let mut args = vec![format!("--dnstap=file:{}", log.display())];
                if config == Config::AgentLogging {
                    args.push("--metrics=127.0.0.1:9253".to_owned());
                    args.push("--workload-metrics=64".to_owned());
                }
                args.extend(extra_agent_args.iter().map(|arg| arg.to_string()));
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                Interceptor::LoggingAgent(start_agent(topology, tools, &args), log)
            }
            Config::IptablesDnsdist => {
                install_classic_rules(&topology.client.name, false);
                let (process, conf) = start_dnsdist(topology, false);
                Interceptor::Dnsdist(process, conf)
            }
        }
    }

    fn start_cached(config: CachedConfig, topology: &Topology, tools: &Tools<'_>) -> Self {
        match config {
            CachedConfig::DirectToCache => {
                let (process, conf) = start_caching_upstream(topology);
                Interceptor::CachingUpstream {
                    _process: process,
                    conf,
                }
            }
            CachedConfig::AgentCache => Interceptor::Agent(start_agent(
                topology,
                tools,
                &[&format!("--cache-size={CACHE_ENTRIES}")],
            )),
            CachedConfig::IptablesDnsdistCache => {
                install_classic_rules(&topology.client.name, false);
                let (process, conf) = start_dnsdist(topology, true);
                Interceptor::Dnsdist(process, conf)
            }
        }
    }

    fn pid(&mut self) -> Option<u32> {
        match self {
            // The caching upstream is not a proxy of the client's: nothing to charge it.
            Interceptor::None | Interceptor::CachingUpstream { .. } => None,
            Interceptor::Agent(agent) | Interceptor::LoggingAgent(agent, _) => {
                Some(agent.process().id())
            }
            Interceptor::Dnsdist(process, _) | Interceptor::BareRelay(process) => {
                Some(process.id())
            }
        }
    }

    /// Where dnsperf sends its queries: the upstream, as a workload asks it, but for the
    /// bare relay, which is asked directly.
    fn target(&self) -> String {
        match self {
            Interceptor::BareRelay(_) => BARE_RELAY_LISTEN.to_owned(),
            _ => format!("{SERVER_IP}:53"),
        }
    }

    /// (user + system CPU seconds, peak RSS in MiB) of the proxy so far.
    fn usage(&mut self) -> (f64, f64) {
        let Some(pid) = self.pid() else {
            return (0.0, 0.0);
        };
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).expect("the proxy's stat");
        // Fields after the command name (which may hold spaces): state is field 3; utime and
        // stime are fields 14 and 15.
        let after_name = stat.rsplit_once(')').expect("stat format").1;
        let fields: Vec<&str> = after_name.split_whitespace().collect();
        let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
        // SAFETY: sysconf takes and returns integers only; no memory of ours is involved.
        let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        let hwm_kib = status_kib(pid, "VmHWM") as f64;
        (ticks / per_second, hwm_kib / 1024.0)
    }
}

impl Drop for Interceptor {
    fn drop(&mut self) {
        if let Interceptor::Dnsdist(_, conf)
        | Interceptor::LoggingAgent(_, conf)
        | Interceptor::CachingUpstream { conf, .. } = self
        {
            let _ = fs::remove_file(conf);
        }
    }
}

/// The agent, release build, logging at info (a debug line per query would be the benchmark).
fn start_agent(topology: &Topology, tools: &Tools<'_>, extra_args: &[&str]) -> Agent {
    start_agent_binary(topology, tools.agent, extra_args)
}

/// The agent binary `agent` in the topology's client namespace, redirecting its cgroup, on
/// [`PROXY_LISTEN`], logging at info.
pub(crate) fn start_agent_binary(topology: &Topology, agent: &Path, extra_args: &[&str]) -> Agent {
    let mut command = topology.client.nsenter();
    command
        .arg(agent)
        .arg("run")
        .arg(format!("--cgroup={}", topology.cgroup.path.display()))
        .arg(format!("--listen={PROXY_LISTEN}"))
        .args(extra_args)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null());
    Agent::spawn(command)
}

/// dnsdist with its defaults, listening where REDIRECT sends the queries, forwarding to the
/// upstream, as the uid the iptables rules exempt; with its packet cache if `cache` is set
/// (only the cached rows: the others ask the upstream every time).
fn start_dnsdist(topology: &Topology, cache: bool) -> (Process, PathBuf) {
    let conf = std::env::temp_dir().join(format!("{}-dnsdist.conf", topology.tag));
    let mut config = format!(
        "setLocal(\"127.0.0.1:{REDIRECT_PORT}\")\n\
         -- Health checks patient enough for the upstream that takes a second.\n\
         newServer({{address=\"{SERVER_IP}:53\", checkTimeout=5000}})\n\
         -- REDIRECT keeps the workload's source address: accept it.\n\
         setACL({{\"0.0.0.0/0\", \"::/0\"}})\n\
         setSecurityPollSuffix(\"\")\n"
    );
    if cache {
        config.push_str(&packet_cache());
    }
    fs::write(&conf, config).expect("write the dnsdist configuration");
    let mut command = topology.client.command("setpriv");
    command
        .arg(format!("--reuid={PROXY_UID}"))
        .arg(format!("--regid={PROXY_UID}"))
        .args([
            "--clear-groups",
            "--",
            "dnsdist",
            "--supervised",
            "--disable-syslog",
        ])
        .arg("-C")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let process = Process::spawn(&mut command);
    wait_until_answered("dnsdist", || topology.workload("dig", &READY_DIG));
    (process, conf)
}

/// dnsdist's packet cache, as the cached rows configure it.
fn packet_cache() -> String {
    format!("getPool(\"\"):setCache(newPacketCache({CACHE_ENTRIES}))\n")
}

/// Where the caching upstream's own upstream (`test-upstream`) listens, in the server
/// namespace.
const BEHIND_CACHE: &str = "127.0.0.1:5300";

/// The direct cached row's upstream: dnsdist with its packet cache on the server's address,
/// in front of `test-upstream` on [`BEHIND_CACHE`] (started by the caller).
fn start_caching_upstream(topology: &Topology) -> (Process, PathBuf) {
    let conf = std::env::temp_dir().join(format!("{}-caching-upstream.conf", topology.tag));
    let config = format!(
        "setLocal(\"{SERVER_IP}:53\")\n\
         newServer({{address=\"{BEHIND_CACHE}\"}})\n\
         setACL({{\"0.0.0.0/0\", \"::/0\"}})\n\
         setSecurityPollSuffix(\"\")\n{}",
        packet_cache()
    );
    fs::write(&conf, config).expect("write the caching upstream's configuration");
    let mut command = topology.server.command("dnsdist");
    command
        .args(["--supervised", "--disable-syslog", "-C"])
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let process = Process::spawn(&mut command);
    wait_until_answered("the caching upstream", || {
        topology.outsider("dig", &READY_DIG)
    });
    (process, conf)
}

/// A lookup that tells a server (or the path to it) is up: a one-shot dig, patient enough for
/// the upstream that takes a second.
const READY_DIG: [&str; 5] = [
    "+short",
    "+tries=1",
    "+time=3",
    "@192.0.2.2",
    "ready.example.test",
];

/// The server on the client namespace's loopback that the kernel-side measurement asks.
const LOCAL_SERVER: &str = "127.0.0.53";
const READY_DIG_LOCAL: [&str; 5] = [
    "+short",
    "+tries=1",
    "+time=3",
    "@127.0.0.53",
    "ready.example.test",
];

/// Where the bare relay listens, in the client namespace (off the agent's port).
const BARE_RELAY_LISTEN: &str = "127.0.0.1:5300";
const READY_DIG_BARE_RELAY: [&str; 6] = [
    "+short",
    "+tries=1",
    "+time=3",
    "@127.0.0.1",
    "-p5300",
    "ready.example.test",
];

/// Waits until `dig` (a command running [`READY_DIG`]) prints the upstream's answer.
fn wait_until_answered(what: &str, dig: impl Fn() -> Command) {
    wait_for(
        &format!("{what} to answer"),
        Duration::from_secs(20),
        || {
            let output = dig().output().ok()?;
            String::from_utf8_lossy(&output.stdout)
                .contains(&ANSWER_IP.to_string())
                .then_some(())
        },
    );
}

/// The upstream every row uses.
fn start_upstream(topology: &Topology, tools: &Tools<'_>, delay_ms: u32) -> Process {
    start_upstream_on(topology, tools, delay_ms, &format!("{SERVER_IP}:53"))
}

fn start_upstream_on(
    topology: &Topology,
    tools: &Tools<'_>,
    delay_ms: u32,
    listen: &str,
) -> Process {
    let mut command = topology
        .server
        .command(tools.test_upstream.to_str().expect("UTF-8"));
    command
        .arg(listen)
        .arg(delay_ms.to_string())
        .arg(ANSWER_IP.to_string())
        .stdout(Stdio::null());
    let upstream = Process::spawn(&mut command);
    if listen.starts_with(&SERVER_IP.to_string()) {
        wait_until_answered("the upstream", || topology.outsider("dig", &READY_DIG));
    }
    upstream
}

/// The cached rows' query file: [`CACHED_NAMES`] names, which dnsperf asks over and over.
fn cached_query_file() -> PathBuf {
    let path = std::env::temp_dir().join("dns-proxy-bench-cached-queries.txt");
    let names: String = (0..CACHED_NAMES)
        .map(|i| format!("c{i}.example.test A\n"))
        .collect();
    fs::write(&path, names).expect("write the cached query file");
    path
}

/// A query file of distinct names (the upstream answers any), shared by every run.
fn query_file() -> PathBuf {
    let path = std::env::temp_dir().join("dns-proxy-bench-queries.txt");
    let names: String = (0..10_000)
        .map(|i| format!("q{i}.example.test A\n"))
        .collect();
    fs::write(&path, names).expect("write the query file");
    path
}

/// The output of one dnsperf run as a workload.
fn dnsperf(topology: &Topology, target: &str, queries: &Path, args: &[String]) -> String {
    let (server, port) = target.rsplit_once(':').expect("ADDRESS:PORT");
    let mut all = vec![
        "-s".to_owned(),
        server.to_owned(),
        "-p".to_owned(),
        port.to_owned(),
        "-d".to_owned(),
        queries.display().to_string(),
        "-t".to_owned(),
        "2".to_owned(),
    ];
    all.extend_from_slice(args);
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    let output = must(&mut topology.workload("dnsperf", &all));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The number after `label` on its line of dnsperf's statistics.
fn statistic(output: &str, label: &str) -> f64 {
    output
        .lines()
        .find_map(|line| line.trim().strip_prefix(label))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {label:?} in dnsperf's output:\n{output}"))
}

/// Percentiles of the per-query latencies dnsperf -v prints (`> NOERROR name A 0.000123`).
fn latencies(output: &str) -> Latency {
    let mut us: Vec<f64> = output
        .lines()
        .filter(|line| line.starts_with("> "))
        .filter_map(|line| line.split_whitespace().last()?.parse::<f64>().ok())
        .map(|seconds| seconds * 1e6)
        .collect();
    assert!(!us.is_empty(), "no per-query lines in dnsperf's output");
    us.sort_by(f64::total_cmp);
    let at = |q: f64| us[((us.len() - 1) as f64 * q).round() as usize];
    Latency {
        p50: at(0.50),
        p99: at(0.99),
        p999: at(0.999),
    }
}

/// Measures one configuration in a topology of its own.
pub fn measure(config: Config, settings: &Settings, tools: &Tools<'_>) -> Measurement {
    let topology = Topology::new();
    let _upstream = start_upstream(&topology, tools, 0);
    let mut interceptor = Interceptor::start(config, &topology, tools, &[]);
    let queries = query_file();
    let seconds = settings.duration.as_secs().max(1).to_string();
    let throughput = measure_throughput(&topology, &mut interceptor, &queries, settings, 1);
    let single = latencies(&dnsperf(
        &topology,
        &interceptor.target(),
        &queries,
        &[
            "-l".into(),
            seconds.clone(),
            "-q".into(),
            "1".into(),
            "-v".into(),
        ],
    ));
    let (_, peak_rss_mib) = interceptor.usage();

    // The kernel side: lookups to a server on the client namespace's loopback, so that every
    // configuration delivers over loopback (to that server, the agent, or dnsdist) and only
    // the interception differs in the client's syscalls.
    let local = format!("{LOCAL_SERVER}:53");
    let mut command = topology.outsider(tools.test_upstream.to_str().expect("UTF-8"), &[]);
    command
        .args([local.as_str(), "0", &ANSWER_IP.to_string()])
        .stdout(Stdio::null());
    let _local_server = Process::spawn(&mut command);
    wait_until_answered("the local server", || {
        topology.outsider("dig", &READY_DIG_LOCAL)
    });
    let syscall_cost = tools.syscall_cost.to_str().expect("UTF-8");
    let server = local;
    let count = settings.syscall_lookups.to_string();
    let output = must(&mut topology.workload(syscall_cost, &[&server, &count]));
    let syscall = String::from_utf8_lossy(&output.stdout).into_owned();
    let syscall_field = |name| field(&syscall, name) as f64;

    Measurement {
        config,
        throughput,
        single,
        peak_rss_mib,
        syscall_ns: syscall_field("median_ns"),
        connect_ns: syscall_field("connect_ns"),
        send_ns: syscall_field("send_ns"),
        recv_ns: syscall_field("recv_ns"),
    }
}

/// The closed-loop and offered-load measurements of one configuration.
#[derive(Debug, Clone)]
pub struct Throughput {
    /// Closed loop (100 outstanding): queries/s answered, and the share lost.
    pub max_qps: f64,
    pub lost_percent: f64,
    /// Latency at each of `Settings::loads`.
    pub under_load: Vec<Latency>,
    /// The proxy's CPU time per 100k queries of the closed-loop run, in seconds.
    pub cpu_per_100k: f64,
}

/// After `warm_up_seconds` of load: the closed loop, as fast as answers come with 100
/// outstanding, then each offered load.
fn measure_throughput(
    topology: &Topology,
    interceptor: &mut Interceptor,
    queries: &Path,
    settings: &Settings,
    warm_up_seconds: u32,
) -> Throughput {
    let seconds = settings.duration.as_secs().max(1).to_string();
    let target = interceptor.target();
    dnsperf(
        topology,
        &target,
        queries,
        &["-l".into(), warm_up_seconds.to_string()],
    );
    let (cpu_before, _) = interceptor.usage();
    let closed = dnsperf(topology, &target, queries, &["-l".into(), seconds.clone()]);
    let (cpu_after, _) = interceptor.usage();
    let completed = statistic(&closed, "Queries completed:");
    let sent = statistic(&closed, "Queries sent:");
    let under_load = settings
        .loads
        .iter()
        .map(|qps| {
            latencies(&dnsperf(
                topology,
                &target,
                queries,
                &[
                    "-l".into(),
                    seconds.clone(),
                    "-Q".into(),
                    qps.to_string(),
                    "-v".into(),
                ],
            ))
        })
        .collect();
    Throughput {
        max_qps: statistic(&closed, "Queries per second:"),
        lost_percent: if sent > 0.0 {
            100.0 * (sent - completed) / sent
        } else {
            0.0
        },
        under_load,
        cpu_per_100k: if completed > 0.0 {
            (cpu_after - cpu_before) / completed * 100_000.0
        } else {
            0.0
        },
    }
}

/// One cached configuration's measurements in one round.
#[derive(Debug, Clone)]
pub struct CachedMeasurement {
    pub config: CachedConfig,
    pub throughput: Throughput,
}

/// Measures one cached configuration in a topology of its own, its cache warmed first.
pub fn measure_cached(
    config: CachedConfig,
    settings: &Settings,
    tools: &Tools<'_>,
) -> CachedMeasurement {
    let topology = Topology::new();
    let upstream_at = match config {
        CachedConfig::DirectToCache => BEHIND_CACHE.to_owned(),
        _ => format!("{SERVER_IP}:53"),
    };
    let _upstream = start_upstream_on(&topology, tools, 0, &upstream_at);
    let mut interceptor = Interceptor::start_cached(config, &topology, tools);
    let queries = cached_query_file();
    // A longer warm-up: every name is in the cache before the measured runs.
    let throughput = measure_throughput(&topology, &mut interceptor, &queries, settings, 2);
    CachedMeasurement { config, throughput }
}

/// The proxy's peak RSS (MiB) with `settings.inflight` queries in flight: dnsperf keeps that
/// many outstanding against an upstream that answers after a second.
pub fn peak_rss_in_flight(config: Config, settings: &Settings, tools: &Tools<'_>) -> f64 {
    let topology = Topology::new();
    let _upstream = start_upstream(&topology, tools, 1_000);
    let limit = (settings.inflight * 2).to_string();
    let args: Vec<String> = match config {
        // dnsperf is one client: its limit must not be below the agent's.
        Config::Agent => vec![
            format!("--max-inflight={limit}"),
            format!("--max-inflight-per-client={limit}"),
        ],
        _ => Vec::new(),
    };
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut interceptor = Interceptor::start(config, &topology, tools, &args);
    let queries = query_file();
    dnsperf(
        &topology,
        &interceptor.target(),
        &queries,
        &[
            "-l".into(),
            "4".into(),
            "-q".into(),
            settings.inflight.to_string(),
            "-t".into(),
            "3".into(),
        ],
    );
    interceptor.usage().1
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Runs every configuration `settings.rounds` times, interleaved, and returns the report.
pub fn run(settings: &Settings, tools: &Tools<'_>) -> String {
    if settings.rows == Rows::Logging {
        return run_logging(settings, tools);
    }
    let uncached = settings.rows != Rows::Cached;
    let cached = settings.rows != Rows::Uncached;
    let in_flight: Vec<(Config, f64)> = [Config::Agent, Config::IptablesDnsdist]
        .into_iter()
        .filter(|_| uncached)
        .map(|config| {
            eprintln!(
                "bench: memory with {} queries in flight: {}",
                settings.inflight,
                config.name()
            );
            (config, peak_rss_in_flight(config, settings, tools))
        })
        .collect();
    let mut rounds: Vec<Vec<Measurement>> = Vec::new();
    let mut cached_rounds: Vec<CachedMeasurement> = Vec::new();
    for round in 1..=settings.rounds {
        let progress = |name| eprintln!("bench: round {round}/{}: {name}", settings.rounds);
        let mut this_round = Vec::new();
        for config in Config::ALL.into_iter().filter(|_| uncached) {
            progress(config.name());
            this_round.push(measure(config, settings, tools));
        }
        rounds.push(this_round);
        for config in CachedConfig::ALL.into_iter().filter(|_| cached) {
            progress(config.name());
            cached_rounds.push(measure_cached(config, settings, tools));
        }
    }
    let mut out = String::new();
    if uncached {
        out.push_str(&report(settings, &rounds, &in_flight));
    }
    if cached {
        out.push_str(&report_cached(settings, &cached_rounds));
    }
    out
}

/// [`Rows::Logging`]: the closed loop of the plain agent and of the logging ones, round after
/// round, each in a topology of its own, and the report.
fn run_logging(settings: &Settings, tools: &Tools<'_>) -> String {
    let mut rounds: Vec<Vec<(Config, Throughput)>> = Vec::new();
    let no_loads = Settings {
        loads: Vec::new(),
        ..settings.clone()
    };
    for round in 1..=settings.rounds {
        let mut this_round = Vec::new();
        for config in Config::LOGGING {
            eprintln!(
                "bench: round {round}/{}: {}",
                settings.rounds,
                config.name()
            );
            let topology = Topology::new();
            let _upstream = start_upstream(&topology, tools, 0);
            let mut interceptor = Interceptor::start(config, &topology, tools, &[]);
            let throughput =
                measure_throughput(&topology, &mut interceptor, &query_file(), &no_loads, 1);
            this_round.push((config, throughput));
        }
        rounds.push(this_round);
    }
    let of = |config: Config, get: &dyn Fn(&Throughput) -> f64| {
        let values = rounds.iter().flatten().filter(|(c, _)| *c == config);
        median(values.map(|(_, throughput)| get(throughput)).collect())
    };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} rounds, interleaved, closed loop only (dnsperf {} s runs; dnstap logs in {}); \
         medians.\n",
        rounds.len(),
        settings.duration.as_secs(),
        std::env::temp_dir().display()
    );
    let _ = writeln!(
        out,
        "{:<17} {:>10} {:>13}",
        "config", "max qps", "cpu s/100k q"
    );
    for config in Config::LOGGING {
        let _ = writeln!(
            out,
            "{:<17} {:>10.0} {:>13.3}",
            config.name(),
            of(config, &|x| x.max_qps),
            of(config, &|x| x.cpu_per_100k)
        );
    }
    let _ = writeln!(out, "\nRatios:");
    for config in [Config::AgentDnstap, Config::AgentLogging] {
        let config_qps = |(c, throughput): &(Config, Throughput)| (*c, throughput.max_qps);
        let paired = paired_ratios(&rounds, config_qps, config, Config::Agent);
        let _ = writeln!(
            out,
            "  max qps: {}/agent {:.2} of medians; paired by round {}",
            config.name(),
            of(config, &|x| x.max_qps) / of(Config::Agent, &|x| x.max_qps),
            list_with_median(paired)
        );
    }
    out
}

/// The header of the columns [`write_throughput`] writes.
fn write_throughput_header(out: &mut String, settings: &Settings) {
    let _ = write!(out, "{:<17} {:>10} {:>7}", "config", "max qps", "lost %");
    for qps in &settings.loads {
        let _ = write!(out, " {:>23}", format!("@{qps}/s p50/p99/p99.9 us"));
    }
}

/// The median over the rounds of a [`Throughput`] measure, for one configuration.
type MedianOf<'a> = &'a dyn Fn(&dyn Fn(&Throughput) -> f64) -> f64;

/// A row's name and throughput columns: the closed loop, the share lost, and the latencies
/// at each offered load; `m` gives the median of a [`Throughput`] measure over the rounds.
fn write_throughput(out: &mut String, name: &str, settings: &Settings, m: MedianOf<'_>) {
    let _ = write!(
        out,
        "{:<17} {:>10.0} {:>7.2}",
        name,
        m(&|x| x.max_qps),
        m(&|x| x.lost_percent)
    );
    for i in 0..settings.loads.len() {
        let _ = write!(
            out,
            " {:>23}",
            format!(
                "{:.0}/{:.0}/{:.0}",
                m(&|x| x.under_load[i].p50),
                m(&|x| x.under_load[i].p99),
                m(&|x| x.under_load[i].p999)
            )
        );
    }
}

fn report_cached(settings: &Settings, rounds: &[CachedMeasurement]) -> String {
    let median_of = |config: CachedConfig, get: &dyn Fn(&CachedMeasurement) -> f64| {
        median(
            rounds
                .iter()
                .filter(|m| m.config == config)
                .map(get)
                .collect(),
        )
    };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\nCached: {CACHED_NAMES} names asked over and over, every cache warm ({CACHE_ENTRIES} \
         entries); medians."
    );
    write_throughput_header(&mut out, settings);
    let _ = writeln!(out, " {:>13}", "cpu s/100k q");
    for config in CachedConfig::ALL {
        let m = |get: &dyn Fn(&Throughput) -> f64| median_of(config, &|x| get(&x.throughput));
        write_throughput(&mut out, config.name(), settings, &m);
        let _ = writeln!(out, " {:>13.3}", m(&|x| x.cpu_per_100k));
    }
    let qps = |config| median_of(config, &|x| x.throughput.max_qps);
    let _ = writeln!(
        out,
        "  max qps: agent cache/dnsdist cache {:.2}, agent cache/direct to a cache {:.2}",
        qps(CachedConfig::AgentCache) / qps(CachedConfig::IptablesDnsdistCache),
        qps(CachedConfig::AgentCache) / qps(CachedConfig::DirectToCache)
    );
    for (i, load) in settings.loads.iter().enumerate() {
        let p50 = |config| median_of(config, &|x| x.throughput.under_load[i].p50);
        let _ = writeln!(
            out,
            "  p50 at {load}/s: agent cache {:.0} us, dnsdist cache {:.0} us",
            p50(CachedConfig::AgentCache),
            p50(CachedConfig::IptablesDnsdistCache)
        );
    }
    out
}

/// Medians over the rounds of one configuration's measurement `get`.
fn median_of(
    rounds: &[Vec<Measurement>],
    config: Config,
    get: impl Fn(&Measurement) -> f64,
) -> f64 {
    median(
        rounds
            .iter()
            .flat_map(|round| round.iter().filter(|m| m.config == config).map(&get))
            .collect(),
    )
}

/// `top`'s closed loop over `bottom`'s in each round, where the two ran minutes apart at
/// most: the machine's speed drifts over a run more than between neighbours.
/// `config_qps` gives each entry's configuration and closed-loop rate.
fn paired_ratios<T>(
    rounds: &[Vec<T>],
    config_qps: impl Fn(&T) -> (Config, f64),
    top: Config,
    bottom: Config,
) -> Vec<f64> {
    let qps = |round: &[T], config| {
        round
            .iter()
            .map(&config_qps)
            .find(|(c, _)| *c == config)
            .map(|(_, qps)| qps)
    };
    rounds
        .iter()
        .filter_map(|round| Some(qps(round, top)? / qps(round, bottom)?))
        .collect()
}

fn measured_qps(m: &Measurement) -> (Config, f64) {
    (m.config, m.throughput.max_qps)
}

/// "a, b, c (median m)" of ratios.
fn list_with_median(ratios: Vec<f64>) -> String {
    let listed: Vec<String> = ratios.iter().map(|r| format!("{r:.2}")).collect();
    format!("{} (median {:.2})", listed.join(", "), median(ratios))
}

fn report(settings: &Settings, rounds: &[Vec<Measurement>], in_flight: &[(Config, f64)]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} rounds, interleaved; medians. dnsperf {} s runs, upstream: test-upstream (answers at once).\n",
        rounds.len(),
        settings.duration.as_secs()
    );
    write_throughput_header(&mut out, settings);
    let _ = writeln!(
        out,
        " {:>17} {:>13} {:>9} {:>27}",
        "1-out p50/p99 us", "cpu s/100k q", "peak MiB", "syscall ns all/conn/send/recv"
    );
    for config in Config::ALL {
        let m = |get: &dyn Fn(&Measurement) -> f64| median_of(rounds, config, get);
        write_throughput(&mut out, config.name(), settings, &|get| {
            m(&|x| get(&x.throughput))
        });
        let _ = writeln!(
            out,
            " {:>17} {:>13.3} {:>9.1} {:>27}",
            format!("{:.0}/{:.0}", m(&|x| x.single.p50), m(&|x| x.single.p99)),
            m(&|x| x.throughput.cpu_per_100k),
            m(&|x| x.peak_rss_mib),
            format!(
                "{:.0}/{:.0}/{:.0}/{:.0}",
                m(&|x| x.syscall_ns),
                m(&|x| x.connect_ns),
                m(&|x| x.send_ns),
                m(&|x| x.recv_ns)
            )
        );
    }

    let qps = |config| median_of(rounds, config, |x| x.throughput.max_qps);
    let single = |config| median_of(rounds, config, |x| x.single.p50);
    let syscall = |config| median_of(rounds, config, |x| x.syscall_ns);
    let hooks = |config| median_of(rounds, config, |x| x.connect_ns + x.recv_ns);
    let (direct, agent, dnsdist) = (Config::Direct, Config::Agent, Config::IptablesDnsdist);
    let (dnstap, logging, bare) = (Config::AgentDnstap, Config::AgentLogging, Config::BareRelay);
    let _ = writeln!(out, "\nRatios (of medians):");
    let cpu = |config| median_of(rounds, config, |x| x.throughput.cpu_per_100k);
    for (config, what) in [
        (dnstap, "every query logged to dnstap with its workload"),
        (
            logging,
            "also the names each workload resolved, and queries counted by workload",
        ),
    ] {
        let _ = writeln!(
            out,
            "  max qps: {}/agent {:.2} ({what}; CPU per 100k queries {:.3} s against {:.3} s), \
             paired by round {}",
            config.name(),
            qps(config) / qps(agent),
            cpu(config),
            cpu(agent),
            list_with_median(paired_ratios(rounds, measured_qps, config, agent))
        );
    }
    let _ = writeln!(
        out,
        "  max qps: agent/direct {:.2}, iptables+dnsdist/direct {:.2}, agent/iptables+dnsdist {:.2}",
        qps(agent) / qps(direct),
        qps(dnsdist) / qps(direct),
        qps(agent) / qps(dnsdist)
    );
    let _ = writeln!(
        out,
        "  max qps: bare relay/direct {:.2} (the ceiling of a user-space relay here), \
         agent/bare relay {:.2}, bare relay/iptables+dnsdist {:.2}",
        qps(bare) / qps(direct),
        qps(agent) / qps(bare),
        qps(bare) / qps(dnsdist)
    );
    let _ = writeln!(
        out,
        "  max qps, paired by round: agent/iptables+dnsdist {}",
        list_with_median(paired_ratios(rounds, measured_qps, agent, dnsdist)),
    );
    let _ = writeln!(
        out,
        "  single-query p50 added over direct: agent {:.1} us, iptables+dnsdist {:.1} us, \
         bare relay {:.1} us",
        single(agent) - single(direct),
        single(dnsdist) - single(direct),
        single(bare) - single(direct)
    );
    let _ = writeln!(
        out,
        "  kernel side, client syscalls per lookup added over direct: agent {:.0} ns, \
         iptables REDIRECT {:.0} ns (ratio {:.2})",
        syscall(agent) - syscall(direct),
        syscall(dnsdist) - syscall(direct),
        (syscall(agent) - syscall(direct)) / (syscall(dnsdist) - syscall(direct))
    );
    let _ = writeln!(
        out,
        "  of which connect + recv (where connect4 and recvmsg4 run; REDIRECT's NAT is in \
         send): agent {:+.0} ns, iptables REDIRECT {:+.0} ns",
        hooks(agent) - hooks(direct),
        hooks(dnsdist) - hooks(direct)
    );
    let _ = writeln!(
        out,
        "\nPeak RSS with {} queries in flight:",
        settings.inflight
    );
    for (config, mib) in in_flight {
        let _ = writeln!(out, "  {:<17} {:.1} MiB", config.name(), mib);
    }
    out
}
