//! Command line and the validated configuration it becomes.
use std::{
    ffi::OsString,
    net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    path::PathBuf,
    time::Duration,
};

use clap::{Args, Parser, Subcommand};
use dns_proxy_common::{AddressBlock, MAX_EXCLUDED_CGROUPS, MAX_EXCLUDED_SERVERS, ServerPrefix};

use crate::{dns::cache::CacheSettings, dnstap::DnstapTarget};

/// Transparent DNS redirection with eBPF: each workload's lookup goes through this proxy to the
/// server the workload asked for, and the answer comes back from that server's address.
#[derive(Debug, Parser)]
#[command(name = "dns-proxy", version)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Attach the redirect to a cgroup and serve the redirected queries until SIGINT/SIGTERM.
    Run(RunArgs),
    /// Run one command with its DNS redirected through an agent of its own, scoped to a fresh
    /// cgroup that holds only that command (and what it starts). Nothing else on the host is
    /// touched. Exits with the command's status; SIGTERM is passed on to it.
    Exec(ExecArgs),
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// cgroup v2 directory whose processes (and descendants) are redirected: the sockets they
    /// make there, which keep that cgroup wherever they are used from (a socket made before
    /// its process moved in is not). Default: the root of the cgroup2 filesystem found in
    /// /proc/self/mountinfo.
    #[arg(long, value_name = "PATH", env = "DNS_PROXY_CGROUP")]
    pub cgroup: Option<PathBuf>,

    /// cgroup v2 directory whose processes, and those of every cgroup below it, are never
    /// redirected: a local stub resolver or node-local cache, say. Repeat it for several
    /// (in the environment variable, separate them with commas).
    #[arg(
        long = "exclude-cgroup",
        value_name = "PATH",
        env = "DNS_PROXY_EXCLUDE_CGROUPS",
        value_delimiter = ','
    )]
    pub exclude_cgroups: Vec<PathBuf>,

    /// Address the redirected queries are sent to and the proxy listens on (UDP and TCP).
    /// Must be a concrete IPv4 address reachable by the workloads.
    #[arg(
        long,
        value_name = "ADDR:PORT",
        default_value = "127.0.0.1:8053",
        env = "DNS_PROXY_LISTEN"
    )]
    pub listen: SocketAddr,

    /// Start while another agent serves the same block and port, and take over from it: this
    /// one gets every new lookup once it is ready, the other answers what it already has until
    /// it is stopped, and no lookup meets a moment with no agent. Without it, such an agent is
    /// an error, as is any second agent on a cgroup another one redirects. With it, an agent
    /// on another port serves nothing until the other stops, then serves new lookups without a
    /// gap. For restarts without a gap (a DaemonSet's `maxSurge: 1`).
    #[arg(
        long,
        env = "DNS_PROXY_TAKEOVER",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub takeover: bool,

    #[command(flatten)]
    pub proxy: ProxyArgs,
}

#[derive(Debug, Args)]
pub struct ExecArgs {
    /// Address the command's queries are sent to and the proxy listens on. Default: 127.0.0.1
    /// on a port the kernel picks, so it never collides with a running agent.
    #[arg(long, value_name = "ADDR:PORT", default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,

    #[command(flatten)]
    pub proxy: ProxyArgs,

    /// The command to run, and its arguments, after `--`.
    #[arg(value_name = "COMMAND", required = true, last = true)]
    pub command: Vec<OsString>,
}

/// Settings that `run` and `exec` share.
#[derive(Debug, Args)]
pub struct ProxyArgs {
    /// Where IPv6 sockets' queries go (UDP and TCP). Default: [::1] on the --listen port when
    /// --listen is a loopback address and the host has IPv6. Otherwise (node mode, with pods
    /// in their own namespaces, where ::1 would be each pod's own) IPv6 lookups are left alone
    /// unless this is given.
    #[arg(long, value_name = "[ADDR]:PORT", env = "DNS_PROXY_LISTEN6")]
    pub listen6: Option<SocketAddr>,

    /// The IPv4 addresses redirected sockets are sent to, one per server they asked (the
    /// address encodes the server), on the --listen port. A loopback block (host mode) serves
    /// this network namespace only; any other block (node mode) serves other namespaces too
    /// and is routed `local` on `lo` by the agent. Default: 127.53.0.0/16 with a loopback
    /// --listen, else 169.254.53.0/24.
    #[arg(long, value_name = "ADDR/LEN", env = "DNS_PROXY_REDIRECT_BLOCK")]
    pub redirect_block: Option<AddressBlock>,

    /// A DNS server whose lookups are never redirected: sockets asking it (an address, or any
    /// address of a prefix ADDR/LEN) are left alone and reach it directly, from the
    /// workload's own address. For servers that answer by the asker's address (Podman's
    /// aardvark-dns, split-horizon views, source ACLs). Repeat it for several, at most 64 (in
    /// the environment variable, separate them with commas).
    #[arg(
        long = "exclude-server",
        value_name = "ADDR[/LEN]",
        env = "DNS_PROXY_EXCLUDE_SERVERS",
        value_delimiter = ','
    )]
    pub exclude_servers: Vec<ServerPrefix>,

    /// The most servers one workload (a cgroup) may have an index of its own for in the table
    /// of servers (each server's first one also gives the server its shared index, so the
    /// workload holds up to twice as many slots). Past it, its lookups to servers new to it go
    /// by the server's shared index (their workload unknown) or direct, and are counted, so
    /// that one workload cannot fill the table that every workload's lookups need. 0: no
    /// limit. Default: a sixteenth of the smaller block's slots (its addresses less two; the
    /// IPv6 block counts if IPv6 is served), at least 4 (15 for a /24, 4,095 for a /16).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(0..=131_072), env = "DNS_PROXY_MAX_SERVERS_PER_WORKLOAD")]
    pub max_servers_per_workload: Option<u32>,

    /// The same for IPv6 sockets, on the --listen6 port; routed `local` on `lo` by the agent.
    #[arg(
        long,
        value_name = "ADDR/LEN",
        default_value = DEFAULT_BLOCK6,
        env = "DNS_PROXY_REDIRECT_BLOCK6"
    )]
    pub redirect_block6: AddressBlock,

    /// A bpffs directory for the table of servers, which outlives the agent so that a
    /// restarted one decodes the addresses sockets were sent to before. Mounted (bpffs) if
    /// nothing is mounted at /sys/fs/bpf and the agent may.
    #[arg(
        long,
        value_name = "PATH",
        default_value = "/sys/fs/bpf/dns-proxy",
        env = "DNS_PROXY_STATE_DIR"
    )]
    pub state_dir: PathBuf,

    /// Forward every query here instead of to the server its client asked for.
    #[arg(long, value_name = "ADDR:PORT", env = "DNS_PROXY_UPSTREAM")]
    pub upstream: Option<SocketAddr>,

    /// How long to wait for an upstream answer before giving up on a query. 10s: a glibc
    /// client with its default options (5 s a try, 2 tries) has given up by then, and until
    /// then takes a late answer to its first try (musl gives up after 5 s in all); raise it
    /// for clients that wait longer (resolv.conf `timeout:`, `attempts:`).
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration, env = "DNS_PROXY_UPSTREAM_TIMEOUT")]
    pub upstream_timeout: Duration,

    /// Most queries forwarded at once; beyond it new queries are dropped (and counted), which
    /// bounds memory and sockets under a flood. Clients retry. A client within its fair share
    /// passes it, up to twice it (--max-inflight-per-client).
    #[arg(long, value_name = "N", default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..=1_000_000), env = "DNS_PROXY_MAX_INFLIGHT")]
    pub max_inflight: u32,

    /// Most queries one client may have forwarded at once; beyond it that client's new
    /// queries are dropped (and counted), so one flooding workload cannot use up
    /// --max-inflight for the others. A client is a workload (the cgroup the kernel recorded
    /// for its query) from a source address, or, where none is recorded, its source address
    /// alone. A client within its fair share of --max-inflight is admitted even when others
    /// filled it (at twice --max-inflight, in place of the oldest query of the client furthest
    /// past its own share, or, for a client holding nothing where none did, the oldest).
    #[arg(long, value_name = "N", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..=1_000_000), env = "DNS_PROXY_MAX_INFLIGHT_PER_CLIENT")]
    pub max_inflight_per_client: u32,

    /// Threads that serve UDP, each with a listener of its own on the listen port
    /// (SO_REUSEPORT; the kernel spreads clients over them) and its own upstream sockets.
    /// Default: one per CPU.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=128), env = "DNS_PROXY_UDP_THREADS")]
    pub udp_threads: Option<u16>,

    /// A TCP connection with no query outstanding is closed after this long without traffic.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration, env = "DNS_PROXY_TCP_IDLE_TIMEOUT")]
    pub tcp_idle_timeout: Duration,

    /// Most TCP connections relayed at once; beyond it new ones are closed (and counted),
    /// but a client within its fair share is let in, up to twice it (there in place of a
    /// connection of the client furthest past its own share, which is closed).
    #[arg(long, value_name = "N", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..=1_000_000), env = "DNS_PROXY_MAX_TCP_CONNECTIONS")]
    pub max_tcp_connections: u32,

    /// Most TCP connections one client (a workload, as for --max-inflight-per-client) may
    /// have relayed at once; beyond it that client's new ones are closed (and counted).
    #[arg(long, value_name = "N", default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=1_000_000), env = "DNS_PROXY_MAX_TCP_CONNECTIONS_PER_CLIENT")]
    pub max_tcp_connections_per_client: u32,

    /// On SIGINT/SIGTERM, the longest time spent answering queries already on their way
    /// before the programs are detached; a second SIGINT or SIGTERM stops at once.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_duration, env = "DNS_PROXY_SHUTDOWN_TIMEOUT")]
    pub shutdown_timeout: Duration,

    /// Serve Prometheus metrics at /metrics, /healthz and /readyz, and the names each workload
    /// resolved at /v1/resolutions, over HTTP here: to root alone from this network namespace,
    /// to anyone who reaches the address from elsewhere. Default: off.
    #[arg(long, value_name = "ADDR:PORT", env = "DNS_PROXY_METRICS")]
    pub metrics: Option<SocketAddr>,

    /// Answers kept in the node-local cache, at most; 0: no cache, every query relayed byte for
    /// byte. Each entry is also budgeted 2 KiB of the cache's byte bound. With the cache on,
    /// identical UDP queries in flight to one server become one upstream query.
    #[arg(long, value_name = "N", default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=10_000_000), env = "DNS_PROXY_CACHE_SIZE")]
    pub cache_size: u32,

    /// No answer is kept longer than this, whatever its TTLs say. 30s, as NodeLocal DNSCache
    /// caps it: a changed record reaches clients within half a minute.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration, env = "DNS_PROXY_CACHE_MAX_TTL")]
    pub cache_max_ttl: Duration,

    /// How long past its expiry a cached answer may still be served (RFC 8767), to clients
    /// whose upstream fails or has not answered within 1.8 s; it is shown with TTL 30 (at
    /// most --cache-max-ttl) while the upstream is asked again. 0: never. Off by default, as in CoreDNS and NodeLocal
    /// DNSCache: an answer past its TTL may name an address that has moved; CoreDNS's
    /// `serve_stale` keeps 1h once turned on.
    #[arg(long, value_name = "DURATION", default_value = "0s", value_parser = parse_duration_or_zero, env = "DNS_PROXY_SERVE_STALE")]
    pub serve_stale: Duration,

    /// Write a dnstap log of every redirected query and the answer its client got (Frame
    /// Streams, as CoreDNS, unbound and dnsdist write it), with the workload that asked in
    /// each message's `extra`: `unix:PATH` (a reader's socket: dnstap-ldns, dnscollector...)
    /// or `file:PATH`. Lookups never wait for it: what it cannot take is dropped and counted.
    #[arg(long, value_name = "unix:PATH|file:PATH", value_parser = parse_dnstap, env = "DNS_PROXY_DNSTAP")]
    pub dnstap: Option<DnstapTarget>,

    /// Count queries by the workload that asked, on /metrics
    /// (`dns_proxy_workload_queries_total{workload}`), for the first N workloads seen that are
    /// still there (a workload whose cgroup is gone gives its place to the next, within about
    /// 3 minutes); the rest together as `other`. 0: off (the default), which keeps the page
    /// small.
    #[arg(long, value_name = "N", default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=10_000), env = "DNS_PROXY_WORKLOAD_METRICS")]
    pub workload_metrics: u32,
}

fn parse_dnstap(text: &str) -> Result<DnstapTarget, String> {
    DnstapTarget::parse(text).map_err(|err| err.to_string())
}

/// The longest any duration flag may be: beyond it no setting makes sense (RFC 8767 suggests
/// 1 to 3 days of serve-stale), and sums of times stay far from overflowing.
const MAX_DURATION: Duration = Duration::from_secs(7 * 24 * 3600);

/// A duration that may be zero (`0` or `0s`: never).
fn parse_duration_or_zero(text: &str) -> Result<Duration, String> {
    if text.trim() == "0" {
        return Ok(Duration::ZERO);
    }
    let duration = humantime::parse_duration(text)
        .map_err(|err| format!("{err} (write it like 0, 30s or 1h)"))?;
    at_most_a_week(duration)
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    let duration = humantime::parse_duration(text)
        .map_err(|err| format!("{err} (write it like 500ms, 5s or 1m)"))?;
    if duration.is_zero() {
        return Err("must be more than zero".to_owned());
    }
    at_most_a_week(duration)
}

fn at_most_a_week(duration: Duration) -> Result<Duration, String> {
    if duration > MAX_DURATION {
        return Err("must be at most 7d".to_owned());
    }
    Ok(duration)
}

/// A configuration error: what is wrong and what to do instead.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--listen {0}: must be an IPv4 address (IPv6 clients go to --listen6)")]
    ListenNotIpv4(SocketAddr),
    #[error(
        "--listen6 {0}: must be an IPv6 address, concrete (not [::]), not an IPv4 one written as \
         IPv6 (::ffff:a.b.c.d), and with a port"
    )]
    BadListen6(SocketAddr),
    #[error("--listen {0}: the redirect target must be a concrete address, not a wildcard; try 127.0.0.1:{port}", port = .0.port())]
    ListenUnspecified(SocketAddr),
    #[error("--listen {0}: the port must not be 0: workloads are sent to this exact port")]
    ListenPortZero(SocketAddr),
    #[error(
        "--workload-metrics {0}: the counts are served on /metrics; give --metrics ADDR:PORT too"
    )]
    WorkloadMetricsWithoutMetrics(u32),
    #[error("--upstream {0}: the upstream must be a concrete address with a port")]
    BadUpstream(SocketAddr),
    #[error(
        "--upstream {0}: that is the proxy itself (its listen address, or its block on its \
         port): every query would loop; give the server to forward to"
    )]
    UpstreamIsProxy(SocketAddr),
    #[error("--upstream-timeout {0:?}: must be at least 1ms")]
    UpstreamTimeoutTooShort(Duration),
    #[error(
        "--exclude-cgroup {0}: is the --cgroup itself or holds it, which would leave nothing \
         redirected"
    )]
    ExcludesEverything(PathBuf),
    #[error(
        "--exclude-server: {0} servers given, at most {MAX_EXCLUDED_SERVERS} can be (exclude a \
         prefix that holds several instead)"
    )]
    TooManyExcludedServers(usize),
    #[error(
        "--exclude-cgroup: {0} cgroups given, at most {MAX_EXCLUDED_CGROUPS} can be (exclude \
         their common parent instead)"
    )]
    TooManyExcludedCgroups(usize),
    #[error("--metrics {0}: give a port other than 0, so scrapers can find it")]
    MetricsPortZero(SocketAddr),
    #[error("--redirect-block {0}: must be an IPv4 block")]
    Block4NotIpv4(AddressBlock),
    #[error("--redirect-block6 {0}: must be an IPv6 block")]
    Block6NotIpv6(AddressBlock),
    #[error(
        "{flag} {block}: {why}; give a block of unicast addresses (host mode: loopback, \
         127.53.0.0/16; node mode: link-local 169.254.53.0/24 or a private range; IPv6: a \
         unique local range such as fd53:6e73:6470::/112)"
    )]
    BlockNotUnicast {
        flag: &'static str,
        block: AddressBlock,
        why: &'static str,
    },
    #[error(
        "{flag} {block}: holds the listen address {listen}, which would name a server; listen \
         on the block's first address or outside it"
    )]
    BlockHoldsListen {
        flag: &'static str,
        block: AddressBlock,
        listen: SocketAddr,
    },
}

/// Bytes of the cache's bound per entry of `--cache-size`: most answers are a few hundred
/// bytes, so the entries bound it first; a cache of large answers is bound by bytes.
pub const CACHE_BYTES_PER_ENTRY: usize = 2048;

/// The IPv4 block with a loopback --listen (host mode): this namespace's own, never routed.
pub const DEFAULT_HOST_BLOCK: &str = "127.53.0.0/16";
/// The IPv4 block with any other --listen (node mode): link-local, apart from NodeLocal
/// DNSCache's 169.254.20.10 and the cloud metadata address 169.254.169.254.
pub const DEFAULT_NODE_BLOCK: &str = "169.254.53.0/24";
/// The IPv6 block: a unique local /112.
pub const DEFAULT_BLOCK6: &str = "fd53:6e73:6470::/112";

/// The validated configuration of `dns-proxy run` and `dns-proxy exec`.
#[derive(Debug, Clone)]
pub struct RunConfig {
    pub workload: Workload,
    /// Port 0 (only with `exec`): a port the kernel picks.
    pub listen: SocketAddrV4,
    pub listen6: Listen6,
    /// Where IPv4 sockets are sent, one address per server.
    pub block4: AddressBlock,
    /// Where IPv6 sockets are sent, when `listen6` is not `Off`.
    pub block6: AddressBlock,
    /// Servers whose sockets are left alone.
    pub excluded_servers: Vec<ServerPrefix>,
    /// The most slots of the table one cgroup may take; 0: no limit.
    pub max_servers_per_workload: u32,
    pub state_dir: PathBuf,
    pub upstream: Option<SocketAddr>,
    pub upstream_timeout: Duration,
    pub max_inflight: usize,
    pub max_inflight_per_client: usize,
    pub udp_threads: usize,
    pub tcp_idle_timeout: Duration,
    pub max_tcp_connections: usize,
    pub max_tcp_connections_per_client: usize,
    pub shutdown_timeout: Duration,
    pub metrics: Option<SocketAddr>,
    /// The answer cache; `None`: off (`--cache-size 0`).
    pub cache: Option<CacheSettings>,
    /// The dnstap log; `None`: off.
    pub dnstap: Option<DnstapTarget>,
    /// Workloads counted apart on /metrics; 0: off.
    pub workload_metrics: usize,
    /// `run --takeover`: share the listen address with a running agent and take over from it.
    pub takeover: bool,
}

/// Whose DNS is redirected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Workload {
    /// The processes of a cgroup tree (`None`: the cgroup2 root), but for excluded subtrees.
    Cgroup {
        cgroup: Option<PathBuf>,
        exclude: Vec<PathBuf>,
    },
    /// One command, run in a fresh cgroup of its own.
    Command(Vec<OsString>),
}

/// Where IPv6 clients go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listen6 {
    /// Given by the operator: failing to listen there is an error.
    Required(SocketAddrV6),
    /// The default with a loopback --listen, `[::1]:<listen port>`: without IPv6 on the host,
    /// IPv6 is left alone.
    IfAvailable(SocketAddrV6),
    /// The default with any other --listen: IPv6 sockets are left alone.
    Off,
}

impl TryFrom<RunArgs> for RunConfig {
    type Error = ConfigError;

    fn try_from(args: RunArgs) -> Result<Self, Self::Error> {
        if args.listen.port() == 0 {
            return Err(ConfigError::ListenPortZero(args.listen));
        }
        // The --cgroup itself, or a tree holding it.
        if let Some(cgroup) = &args.cgroup
            && let Some(excluded) = (args.exclude_cgroups.iter()).find(|e| cgroup.starts_with(e))
        {
            return Err(ConfigError::ExcludesEverything(excluded.clone()));
        }
        // Refused here, before the agent touches routes or another agent's programs.
        if args.exclude_cgroups.len() > MAX_EXCLUDED_CGROUPS as usize {
            return Err(ConfigError::TooManyExcludedCgroups(
                args.exclude_cgroups.len(),
            ));
        }
        let workload = Workload::Cgroup {
            cgroup: args.cgroup,
            exclude: args.exclude_cgroups,
        };
        let config = Self::new(workload, args.listen, args.proxy)?;
        Ok(Self {
            takeover: args.takeover,
            ..config
        })
    }
}

impl TryFrom<ExecArgs> for RunConfig {
    type Error = ConfigError;

    fn try_from(args: ExecArgs) -> Result<Self, Self::Error> {
        Self::new(Workload::Command(args.command), args.listen, args.proxy)
    }
}

impl RunConfig {
    fn new(workload: Workload, listen: SocketAddr, args: ProxyArgs) -> Result<Self, ConfigError> {
        if args.workload_metrics > 0 && args.metrics.is_none() {
            return Err(ConfigError::WorkloadMetricsWithoutMetrics(
                args.workload_metrics,
            ));
        }
        let listen = match listen {
            SocketAddr::V6(_) => return Err(ConfigError::ListenNotIpv4(listen)),
            SocketAddr::V4(v4) if v4.ip().is_unspecified() => {
                return Err(ConfigError::ListenUnspecified(listen));
            }
            SocketAddr::V4(v4) => v4,
        };
        let listen6 = match args.listen6 {
            None if listen.ip().is_loopback() => {
                Listen6::IfAvailable(SocketAddrV6::new(Ipv6Addr::LOCALHOST, listen.port(), 0, 0))
            }
            None => Listen6::Off,
            Some(SocketAddr::V6(v6))
                if !v6.ip().is_unspecified()
                    && v6.ip().to_ipv4_mapped().is_none()
                    && v6.port() != 0 =>
            {
                Listen6::Required(v6)
            }
            Some(other) => return Err(ConfigError::BadListen6(other)),
        };
        // An IPv4 server written as IPv6 (::ffff:a.b.c.d) is asked as the IPv4 one it is: the
        // agent's IPv6 upstream sockets are IPv6 only.
        let upstream = args
            .upstream
            .map(|upstream| SocketAddr::new(upstream.ip().to_canonical(), upstream.port()));
        if let Some(upstream) = upstream
            && (upstream.ip().is_unspecified() || upstream.port() == 0)
        {
            return Err(ConfigError::BadUpstream(upstream));
        }
        if let Some(metrics) = args.metrics
            && metrics.port() == 0
        {
            return Err(ConfigError::MetricsPortZero(metrics));
        }
        let default_block = if listen.ip().is_loopback() {
            DEFAULT_HOST_BLOCK
        } else {
            DEFAULT_NODE_BLOCK
        };
        let block4 = args
            .redirect_block
            .unwrap_or_else(|| default_block.parse().expect("a valid default"));
        if !block4.is_ipv4() {
            return Err(ConfigError::Block4NotIpv4(block4));
        }
        if let IpAddr::V4(first) = block4.first()
            && let Some(why) = not_unicast4(first)
        {
            return Err(ConfigError::BlockNotUnicast {
                flag: "--redirect-block",
                block: block4,
                why,
            });
        }
        // The block's first address encodes no server: the listeners may use it.
        if block4.contains((*listen.ip()).into()) && block4.first() != IpAddr::V4(*listen.ip()) {
            return Err(ConfigError::BlockHoldsListen {
                flag: "--redirect-block",
                block: block4,
                listen: listen.into(),
            });
        }
        let block6 = args.redirect_block6;
        if block6.is_ipv4() {
            return Err(ConfigError::Block6NotIpv6(block6));
        }
        if let IpAddr::V6(first) = block6.first()
            && let Some(why) = not_unicast6(first)
        {
            return Err(ConfigError::BlockNotUnicast {
                flag: "--redirect-block6",
                block: block6,
                why,
            });
        }
        if let Listen6::Required(v6) | Listen6::IfAvailable(v6) = listen6
            && block6.contains((*v6.ip()).into())
            && block6.first() != IpAddr::V6(*v6.ip())
        {
            return Err(ConfigError::BlockHoldsListen {
                flag: "--redirect-block6",
                block: block6,
                listen: v6.into(),
            });
        }
        if let Some(upstream) = upstream {
            let proxy_port = upstream.port() == listen.port();
            let listens_there = match (upstream, listen6) {
                (SocketAddr::V4(v4), _) => v4 == listen,
                (SocketAddr::V6(v6), Listen6::Required(l6) | Listen6::IfAvailable(l6)) => {
                    v6.ip() == l6.ip() && v6.port() == l6.port()
                }
                (SocketAddr::V6(_), Listen6::Off) => false,
            };
            let in_a_block = block4.contains(upstream.ip()) || block6.contains(upstream.ip());
            if listens_there || (proxy_port && in_a_block) {
                return Err(ConfigError::UpstreamIsProxy(upstream));
            }
        }
        if args.upstream_timeout < Duration::from_millis(1) {
            return Err(ConfigError::UpstreamTimeoutTooShort(args.upstream_timeout));
        }
        if args.exclude_servers.len() > MAX_EXCLUDED_SERVERS as usize {
            return Err(ConfigError::TooManyExcludedServers(
                args.exclude_servers.len(),
            ));
        }
        // Said, not refused: a client is held to the agent-wide limit first (twice it, by fair
        // share), so a larger limit of its own never applies (helper-186).
        for (per_client, flag, all, all_flag) in [
            (
                args.max_inflight_per_client,
                "--max-inflight-per-client",
                args.max_inflight,
                "--max-inflight",
            ),
            (
                args.max_tcp_connections_per_client,
                "--max-tcp-connections-per-client",
                args.max_tcp_connections,
                "--max-tcp-connections",
            ),
        ] {
            if u64::from(per_client) > 2 * u64::from(all) {
                log::warn!(
                    "{flag} {per_client} is above twice {all_flag} {all}: no client reaches it"
                );
            }
        }
        // Said, not refused: an environment file may keep them while the cache is turned off.
        if args.cache_size == 0 && !args.serve_stale.is_zero() {
            log::warn!("--serve-stale has no effect without --cache-size: there is no cache");
        }
        Ok(Self {
            workload,
            listen,
            listen6,
            block4,
            block6,
            excluded_servers: args.exclude_servers,
            max_servers_per_workload: args.max_servers_per_workload.unwrap_or_else(|| {
                let block6 = (!matches!(listen6, Listen6::Off)).then_some(block6);
                default_servers_per_workload(block4, block6)
            }),
            state_dir: args.state_dir,
            upstream,
            upstream_timeout: args.upstream_timeout,
            max_inflight: args.max_inflight as usize,
            max_inflight_per_client: args.max_inflight_per_client as usize,
            udp_threads: args.udp_threads.map_or_else(
                || std::thread::available_parallelism().map_or(1, usize::from),
                usize::from,
            ),
            tcp_idle_timeout: args.tcp_idle_timeout,
            max_tcp_connections: args.max_tcp_connections as usize,
            max_tcp_connections_per_client: args.max_tcp_connections_per_client as usize,
            shutdown_timeout: args.shutdown_timeout,
            metrics: args.metrics,
            cache: (args.cache_size > 0).then(|| CacheSettings {
                max_entries: args.cache_size as usize,
                max_bytes: args.cache_size as usize * CACHE_BYTES_PER_ENTRY,
                max_ttl: args.cache_max_ttl,
                serve_stale: args.serve_stale,
            }),
            dnstap: args.dnstap,
            workload_metrics: args.workload_metrics as usize,
            takeover: false,
        })
    }
}

/// `--max-servers-per-workload`'s default: a sixteenth of the smaller table's slots (a block's
/// addresses less two), of the IPv4 block's and the IPv6 one's if IPv6 is served (one share
/// counts both), at least 4. A workload asks one to three servers (a resolv.conf holds three);
/// one that asks many (a recursive resolver) has the rest of its lookups go direct, and must
/// not take the room of the others.
fn default_servers_per_workload(block4: AddressBlock, block6: Option<AddressBlock>) -> u32 {
    let slots = block6.map_or(block4.capacity(), |block6| {
        block4.capacity().min(block6.capacity())
    });
    (slots / 16).max(4)
}

/// Why a block starting at `first` cannot hold the proxy's addresses, if it cannot.
fn not_unicast4(first: std::net::Ipv4Addr) -> Option<&'static str> {
    match first.octets()[0] {
        0 => Some("addresses of 0.0.0.0/8 name \"this host\" and cannot be routed"),
        224..=239 => Some("multicast addresses"),
        240..=255 => Some("reserved (and broadcast) addresses"),
        _ => None,
    }
}

/// The same for an IPv6 block.
fn not_unicast6(first: std::net::Ipv6Addr) -> Option<&'static str> {
    let segments = first.segments();
    if first.to_ipv4_mapped().is_some() {
        Some("v4-mapped addresses are IPv4 ones (use --redirect-block)")
    } else if first.is_unspecified() {
        Some("the unspecified address :: names no host")
    } else if first.is_multicast() {
        Some("multicast addresses")
    } else if segments[0] & 0xffc0 == 0xfe80 {
        Some("link-local addresses need an interface, which the proxy's addresses have not")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_config(args: &[&str]) -> Result<RunConfig, String> {
        let argv = ["dns-proxy", "run"].iter().chain(args);
        let cli = Cli::try_parse_from(argv).map_err(|err| err.to_string())?;
        let Command::Run(run) = cli.command else {
            panic!("parsed as another command");
        };
        RunConfig::try_from(run).map_err(|err| err.to_string())
    }

    fn exec_config(args: &[&str]) -> Result<RunConfig, String> {
        let argv = ["dns-proxy", "exec"].iter().chain(args);
        let cli = Cli::try_parse_from(argv).map_err(|err| err.to_string())?;
        let Command::Exec(exec) = cli.command else {
            panic!("parsed as another command");
        };
        RunConfig::try_from(exec).map_err(|err| err.to_string())
    }

    #[test]
    fn defaults() {
        let config = run_config(&[]).unwrap();
        assert_eq!(
            config.workload,
            Workload::Cgroup {
                cgroup: None,
                exclude: vec![]
            }
        );
        assert_eq!(config.metrics, None);
        assert_eq!(config.listen, "127.0.0.1:8053".parse().unwrap());
        assert_eq!(
            config.listen6,
            Listen6::IfAvailable("[::1]:8053".parse().unwrap())
        );
        assert_eq!(config.upstream, None);
        assert_eq!(config.tcp_idle_timeout, Duration::from_secs(10));
        assert_eq!(config.max_tcp_connections, 1024);
        assert_eq!(config.upstream_timeout, Duration::from_secs(10));
        assert_eq!(config.max_inflight, 4096);
        assert_eq!(config.max_inflight_per_client, 1024);
        assert_eq!(config.max_tcp_connections_per_client, 256);
        assert_eq!(
            config.udp_threads,
            std::thread::available_parallelism().unwrap().get()
        );
    }

    #[test]
    fn a_workloads_share_of_the_table_is_a_sixteenth_of_the_block_by_default() {
        let share = |args: &[&str]| run_config(args).unwrap().max_servers_per_workload;
        assert_eq!(share(&[]), 4095, "host mode's /16");
        assert_eq!(share(&["--listen=169.254.20.10:53"]), 15, "node mode's /24");
        assert_eq!(share(&["--redirect-block=127.53.0.0/26"]), 4, "at least 4");
        assert_eq!(
            share(&["--redirect-block6=fd53:6e73:6470::/120"]),
            15,
            "one share counts both families: the smaller block's"
        );
        assert_eq!(
            share(&[
                "--listen=169.254.52.0:53",
                "--redirect-block=169.254.52.0/22",
                "--redirect-block6=fd53:6e73:6470::/120"
            ]),
            63,
            "node mode without --listen6 serves no IPv6"
        );
        assert_eq!(share(&["--max-servers-per-workload=0"]), 0, "no limit");
        assert_eq!(share(&["--max-servers-per-workload=100"]), 100);
        assert!(run_config(&["--max-servers-per-workload=200000"]).is_err());
    }

    #[test]
    fn all_flags() {
        let config = run_config(&[
            "--cgroup=/sys/fs/cgroup/unified/pods",
            "--listen=169.254.20.10:53",
            "--listen6=[fd00::53]:5353",
            "--tcp-idle-timeout=3s",
            "--max-tcp-connections=7",
            "--upstream=192.0.2.1:5353",
            "--upstream-timeout=750ms",
            "--max-inflight=10",
            "--max-inflight-per-client=5",
            "--max-tcp-connections-per-client=2",
            "--udp-threads=3",
            "--shutdown-timeout=1m",
            "--exclude-cgroup=/sys/fs/cgroup/unified/resolved",
            "--exclude-cgroup",
            "/sys/fs/cgroup/unified/cache",
            "--metrics=127.0.0.1:9253",
        ])
        .unwrap();
        assert_eq!(
            config.workload,
            Workload::Cgroup {
                cgroup: Some("/sys/fs/cgroup/unified/pods".into()),
                exclude: vec![
                    "/sys/fs/cgroup/unified/resolved".into(),
                    "/sys/fs/cgroup/unified/cache".into()
                ],
            }
        );
        assert_eq!(config.metrics, Some("127.0.0.1:9253".parse().unwrap()));
        assert_eq!(config.listen, "169.254.20.10:53".parse().unwrap());
        assert_eq!(
            config.listen6,
            Listen6::Required("[fd00::53]:5353".parse().unwrap())
        );
        assert_eq!(config.tcp_idle_timeout, Duration::from_secs(3));
        assert_eq!(config.max_tcp_connections, 7);
        assert_eq!(config.udp_threads, 3);
        assert_eq!(config.upstream, Some("192.0.2.1:5353".parse().unwrap()));
        assert_eq!(config.upstream_timeout, Duration::from_millis(750));
        assert_eq!(config.max_inflight, 10);
        assert_eq!(config.max_inflight_per_client, 5);
        assert_eq!(config.max_tcp_connections_per_client, 2);
        assert_eq!(config.shutdown_timeout, Duration::from_secs(60));
        // Node mode's default block; the IPv6 one.
        assert_eq!(config.block4, DEFAULT_NODE_BLOCK.parse().unwrap());
        assert_eq!(config.block6, DEFAULT_BLOCK6.parse().unwrap());
    }

    #[test]
    fn redirect_blocks_follow_the_mode_and_keep_the_listen_address_out() {
        let host = run_config(&[]).unwrap();
        assert_eq!(host.block4, DEFAULT_HOST_BLOCK.parse().unwrap());
        assert_eq!(host.state_dir, PathBuf::from("/sys/fs/bpf/dns-proxy"));
        let told = run_config(&[
            "--listen=169.254.20.10:53",
            "--redirect-block=10.53.0.0/20",
            "--redirect-block6=fd00:53::/120",
            "--state-dir=/run/bpf/x",
        ])
        .unwrap();
        assert_eq!(told.block4, "10.53.0.0/20".parse().unwrap());
        assert_eq!(told.block6, "fd00:53::/120".parse().unwrap());
        assert_eq!(told.state_dir, PathBuf::from("/run/bpf/x"));
        // The block's first address names no server: the listeners may sit there.
        let first = run_config(&["--listen=169.254.53.0:53"]).unwrap();
        assert_eq!(first.block4, DEFAULT_NODE_BLOCK.parse().unwrap());
        for (args, says) in [
            (
                &["--listen=169.254.53.7:53"][..],
                "which would name a server",
            ),
            (
                &["--redirect-block=fd00::/112"][..],
                "must be an IPv4 block",
            ),
            (
                &["--redirect-block6=10.0.0.0/16"][..],
                "must be an IPv6 block",
            ),
            (&["--redirect-block=127.53.0.0/8"][..], "/16 to /30"),
            (&["--redirect-block=0.0.0.0/24"][..], "cannot be routed"),
            (&["--redirect-block=224.0.53.0/24"][..], "multicast"),
            (
                &["--redirect-block6=::ffff:127.53.0.0/112"][..],
                "v4-mapped",
            ),
            (&["--redirect-block6=fe80::/112"][..], "link-local"),
            (&["--redirect-block6=ff05::/112"][..], "multicast"),
        ] {
            let err = run_config(args).unwrap_err();
            assert!(err.contains(says), "{args:?}: {err}");
        }
    }

    #[test]
    fn servers_to_leave_alone_are_addresses_or_prefixes_of_either_family() {
        assert!(run_config(&[]).unwrap().excluded_servers.is_empty());
        let config = run_config(&[
            "--exclude-server=10.88.0.1",
            "--exclude-server",
            "10.89.0.0/16",
            "--exclude-server=fd00:53::/32",
        ])
        .unwrap();
        let given: Vec<String> = config
            .excluded_servers
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(given, ["10.88.0.1/32", "10.89.0.0/16", "fd00:53::/32"]);
        let bad = run_config(&["--exclude-server=10.89.0.1/16"]).unwrap_err();
        assert!(bad.contains("bits set past the prefix"), "{bad}");
        let many: Vec<String> = (0..65)
            .map(|i| format!("--exclude-server=10.0.0.{i}"))
            .collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        let err = run_config(&many).unwrap_err();
        assert!(err.contains("65 servers given, at most 64"), "{err}");
        let exec = exec_config(&["--exclude-server=192.0.2.53", "--", "true"]).unwrap();
        assert_eq!(exec.excluded_servers.len(), 1);
    }

    #[test]
    fn exec_takes_a_command_after_the_flags_and_picks_a_free_port() {
        let config = exec_config(&["--upstream-timeout=2s", "--", "dig", "+short", "-x"]).unwrap();
        assert_eq!(
            config.workload,
            Workload::Command(vec!["dig".into(), "+short".into(), "-x".into()])
        );
        assert_eq!(config.listen, "127.0.0.1:0".parse().unwrap());
        assert_eq!(config.upstream_timeout, Duration::from_secs(2));
        assert!(exec_config(&[]).is_err(), "a command is required");
        assert!(
            exec_config(&["--cgroup=/x", "--", "true"]).is_err(),
            "exec makes its own cgroup"
        );
    }

    #[test]
    fn node_mode_leaves_ipv6_alone_unless_told() {
        // A pod redirected to ::1 would land on its own loopback.
        let node_mode = run_config(&["--listen=169.254.20.10:53"]).unwrap();
        assert_eq!(node_mode.listen6, Listen6::Off);
        let told = run_config(&["--listen=169.254.20.10:53", "--listen6=[fd00::53]:53"]).unwrap();
        assert_eq!(
            told.listen6,
            Listen6::Required("[fd00::53]:53".parse().unwrap())
        );
    }

    #[test]
    fn rejects_listen_addresses_the_kernel_side_cannot_target() {
        assert!(
            run_config(&["--listen=[::1]:8053"])
                .unwrap_err()
                .contains("IPv4")
        );
        assert!(
            run_config(&["--listen=0.0.0.0:8053"])
                .unwrap_err()
                .contains("wildcard")
        );
        assert!(
            run_config(&["--listen=127.0.0.1:0"])
                .unwrap_err()
                .contains("port must not be 0")
        );
        assert!(run_config(&["--listen=localhost:53"]).is_err());
        // An IPv4 address written as IPv6 would collide with the IPv4 listener.
        assert!(
            run_config(&["--listen6=[::ffff:127.0.0.1]:8053"])
                .unwrap_err()
                .contains("not an IPv4 one written as IPv6")
        );
    }

    /// The agent's IPv6 upstream sockets are IPv6 only: an IPv4 server written as IPv6 is
    /// asked as the IPv4 server it is (before, every UDP query to it failed), and checked as
    /// one.
    #[test]
    fn an_upstream_written_as_ipv4_mapped_ipv6_is_the_ipv4_server() {
        let config = run_config(&["--upstream=[::ffff:192.0.2.2]:53"]).unwrap();
        assert_eq!(config.upstream, Some("192.0.2.2:53".parse().unwrap()));
        for (args, says) in [
            ("--upstream=[::ffff:0.0.0.0]:53", "concrete address"),
            ("--upstream=[::ffff:127.0.0.1]:8053", "the proxy itself"),
        ] {
            let err = run_config(&[args]).unwrap_err();
            assert!(err.contains(says), "{args}: {err}");
        }
    }

    #[test]
    fn rejects_bad_upstreams_and_durations() {
        assert!(run_config(&["--upstream=0.0.0.0:53"]).is_err());
        assert!(run_config(&["--upstream=192.0.2.1:0"]).is_err());
        assert!(
            run_config(&["--upstream-timeout=0s"])
                .unwrap_err()
                .contains("more than zero")
        );
        assert!(
            run_config(&["--upstream-timeout=soon"])
                .unwrap_err()
                .contains("500ms")
        );
        for flag in ["--serve-stale", "--upstream-timeout", "--shutdown-timeout"] {
            let error = run_config(&[&format!("{flag}=584542046090y")]).unwrap_err();
            assert!(error.contains("at most 7d"), "{flag}: {error}");
        }
        assert!(run_config(&["--serve-stale=7d", "--cache-max-ttl=7d"]).is_ok());
        assert!(run_config(&["--max-inflight=0"]).is_err());
        assert!(run_config(&["--udp-threads=0"]).is_err());
        assert!(
            run_config(&["--metrics=127.0.0.1:0"])
                .unwrap_err()
                .contains("port other than 0")
        );
        assert!(
            run_config(&["--upstream-timeout=1ns"])
                .unwrap_err()
                .contains("at least 1ms")
        );
    }

    /// What would make the agent serve nothing, said at start rather than found in counters.
    #[test]
    fn rejects_an_upstream_that_is_the_proxy_and_an_exclusion_of_everything() {
        for upstream in [
            "127.0.0.1:8053",
            "[::1]:8053",
            "127.53.0.9:8053",
            "[fd53:6e73:6470::9]:8053",
        ] {
            let error = run_config(&[&format!("--upstream={upstream}")]).unwrap_err();
            assert!(error.contains("the proxy itself"), "{upstream}: {error}");
        }
        // Another port of those addresses, or a node's server: fine.
        assert!(run_config(&["--upstream=127.0.0.1:53"]).is_ok());
        assert!(run_config(&["--upstream=127.53.0.9:53"]).is_ok());
        let node = ["--listen=169.254.53.0:53", "--upstream=169.254.53.0:53"];
        assert!(run_config(&node).unwrap_err().contains("the proxy itself"));
        assert!(run_config(&["--listen=169.254.53.0:53", "--upstream=10.0.0.10:53"]).is_ok());

        let cgroup = "--cgroup=/sys/fs/cgroup/unified/pods";
        for everything in ["/sys/fs/cgroup/unified/pods/", "/sys/fs/cgroup/unified"] {
            let error = run_config(&[cgroup, &format!("--exclude-cgroup={everything}")]);
            let error = error.unwrap_err();
            assert!(
                error.contains("nothing redirected"),
                "{everything}: {error}"
            );
        }
        assert!(run_config(&[cgroup, "--exclude-cgroup=/sys/fs/cgroup/unified/pods/a"]).is_ok());
    }

    fn as_strs(flags: &[String]) -> Vec<&str> {
        flags.iter().map(String::as_str).collect()
    }

    /// More exclusions than the kernel side holds: a usage error, before anything is touched.
    #[test]
    fn rejects_more_excluded_cgroups_or_servers_than_the_kernel_side_holds() {
        let cgroups = |count: u32| -> Vec<String> {
            (0..count)
                .map(|n| format!("--exclude-cgroup=/sys/fs/cgroup/unified/system.slice/{n}"))
                .collect()
        };
        assert!(run_config(&as_strs(&cgroups(MAX_EXCLUDED_CGROUPS))).is_ok());
        let error = run_config(&as_strs(&cgroups(MAX_EXCLUDED_CGROUPS + 1))).unwrap_err();
        assert!(error.contains("65 cgroups given, at most 64"), "{error}");

        let servers = |count: u32| -> Vec<String> {
            (0..count)
                .map(|n| format!("--exclude-server=10.9.{}.{}", n / 256, n % 256))
                .collect()
        };
        assert!(run_config(&as_strs(&servers(MAX_EXCLUDED_SERVERS))).is_ok());
        let error = run_config(&as_strs(&servers(MAX_EXCLUDED_SERVERS + 1))).unwrap_err();
        assert!(error.contains("servers given, at most"), "{error}");
    }
}
