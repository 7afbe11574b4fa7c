//! The agent, wired: `run` checks and enters the cgroups, binds the listeners, attaches the
//! programs, starts the DNS listeners, the metrics server and the background tasks, and at a
//! stop request shuts them down in order. Everything else is a module of its own, which this
//! one only assembles.
use std::{ffi::OsString, io, net::SocketAddr, process::ExitStatus, sync::Arc};

use tokio::net::UdpSocket;

use crate::{
    cgroup::{self, AgentCgroup, Cgroup, CgroupError, CommandCgroup},
    config::{RunConfig, Workload},
    dns::{
        cache::Cache,
        coalesce::Coalescer,
        per_client::PerClientLimit,
        query_log::QueryLog,
        stats::Stats,
        tcp::{TcpProxy, TcpSettings},
        udp::{ForwardSettings, UdpProxy},
        workload_stats::WorkloadStats,
    },
    dnstap::{self, DnstapSettings},
    drain::{self, Deadline},
    ebpf::{Block, CachedServers, EbpfError, ExcludedTree, RedirectConfig, Redirector},
    exec, host,
    metrics::{Metrics, Readiness},
    privileges,
    resolutions::Resolutions,
    shutdown::StopSignals,
    udp_threads::UdpThreads,
    workload::WorkloadNames,
};

mod background;
mod listeners;

use background::{forget_departed, keep_alive};
use listeners::{Listeners, bind_metrics_listener};

/// The target of the agent's own log lines: the crate's, as when this was lib.rs, so that the
/// lines and the filters that name them stay as they were.
const LOG: &str = "dns_proxy";

/// This host's name, for the dnstap log's `identity`.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_owned())
        .unwrap_or_default()
}

/// Why `dns-proxy run` could not start or keep running. Each says what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error("--dnstap: {0}")]
    Dnstap(String),
    #[error(transparent)]
    Ebpf(#[from] EbpfError),
    #[error("cannot listen on {addr}: {source}{hint}", hint = listen_hint(source))]
    Listen {
        addr: std::net::SocketAddr,
        source: io::Error,
    },
    #[error("cannot watch for SIGINT/SIGTERM: {0}")]
    Signals(io::Error),
    #[error("cannot start the async runtime: {0}")]
    Runtime(io::Error),
    #[error("cannot run {command:?}: {source}")]
    Spawn {
        command: OsString,
        source: io::Error,
    },
    #[error("waiting for the command: {0}")]
    Wait(io::Error),
    #[error("cannot drop capabilities after attaching: {0}")]
    DropPrivileges(io::Error),
    #[error(transparent)]
    Host(#[from] host::HostError),
    #[error("cannot hold {lock}: {source}{hint}", hint = block_hint(source))]
    BlockInUse { lock: SocketAddr, source: io::Error },
}

/// How a run ended.
#[derive(Debug)]
pub enum Outcome {
    /// Stopped by SIGINT or SIGTERM (`run`).
    Stopped,
    /// The command of `exec` exited with this status.
    CommandExited(ExitStatus),
}

fn block_hint(err: &io::Error) -> &'static str {
    if err.kind() == io::ErrorKind::AddrInUse {
        " (another dns-proxy serves this block on this port: stop it, pass --takeover to \
         replace it without a gap, or give this one another --redirect-block or port)"
    } else {
        ""
    }
}

fn listen_hint(err: &io::Error) -> &'static str {
    match err.kind() {
        io::ErrorKind::AddrInUse => {
            " (something already listens there: stop it or choose another --listen; if it is \
             another dns-proxy, --takeover replaces it without a gap)"
        }
        io::ErrorKind::AddrNotAvailable => {
            " (no interface has this address: add it, or choose another --listen)"
        }
        io::ErrorKind::PermissionDenied => " (ports below 1024 need root or CAP_NET_BIND_SERVICE)",
        _ => "",
    }
}

/// Runs the agent until SIGINT or SIGTERM (or, for `exec`, until the command exits), then
/// stops redirecting, answers what is in flight, detaches and returns. Blocks: the cgroup work
/// happens first, then a tokio runtime of its own serves.
pub fn run(config: RunConfig) -> Result<Outcome, RunError> {
    log::info!(target: LOG, "starting with {config:?}");
    if let Some(target) = &config.dnstap {
        dnstap::check_target(target).map_err(RunError::Dnstap)?;
    }
    let hierarchy = cgroup::cgroup2_root()?;
    // Checked before the agent moves, so a bad path changes nothing.
    let (target, excluded_subtrees) = match &config.workload {
        Workload::Cgroup { cgroup, exclude } => {
            let target = Cgroup::open("--cgroup", cgroup.as_deref().unwrap_or(&hierarchy))?;
            let mut excluded = Vec::new();
            for path in exclude {
                let cgroup = Cgroup::open("--exclude-cgroup", path)?;
                let level = cgroup.level("--exclude-cgroup")?;
                excluded.push((cgroup, level));
            }
            (Some(target), excluded)
        }
        Workload::Command(_) => (None, Vec::new()),
    };
    // Before any thread or socket exists, so that all of the agent's traffic carries its cgroup.
    let agent = AgentCgroup::enter(&hierarchy)?;
    let command = match &config.workload {
        Workload::Command(argv) => Some((argv.as_slice(), CommandCgroup::create(agent.parent())?)),
        Workload::Cgroup { .. } => None,
    };
    let target = match (&target, &command) {
        (Some(target), _) => target,
        (None, Some((_, command_cgroup))) => command_cgroup.cgroup(),
        (None, None) => unreachable!("a cgroup workload has a target"),
    };
    log::info!(
        target: LOG,
        "agent runs in cgroup {} (id {}); redirecting cgroup {} (id {})",
        agent.cgroup().path.display(),
        agent.cgroup().id,
        target.path.display(),
        target.id
    );
    let excluded: Vec<ExcludedTree<'_>> = excluded_subtrees
        .iter()
        .map(|(cgroup, level)| ExcludedTree {
            cgroup,
            level: *level,
        })
        .collect();
    // One thread for TCP, metrics and signals; UDP has threads of its own. Every thread that
    // exists when privileges are dropped must drop them itself: these are all known.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(RunError::Runtime)?;
    let udp_threads = UdpThreads::start(config.udp_threads).map_err(RunError::Runtime)?;
    let scope = Scope {
        target,
        agent: agent.cgroup(),
        excluded: &excluded,
        command: command
            .as_ref()
            .map(|(argv, cgroup)| (*argv, cgroup.cgroup())),
    };
    let result = runtime.block_on(serve(&config, scope, &udp_threads));
    // Every socket closes with the runtimes; then the agent may leave its cgroup.
    drop(udp_threads);
    drop(runtime);
    drop(command);
    drop(agent);
    result
}

/// Whose traffic is redirected, and what to run there (`exec`).
struct Scope<'a> {
    target: &'a Cgroup,
    /// The agent's own cgroup, never redirected.
    agent: &'a Cgroup,
    excluded: &'a [ExcludedTree<'a>],
    command: Option<(&'a [OsString], &'a Cgroup)>,
}

/// Drops every capability on every thread of the agent (this one and the UDP threads), and
/// checks in /proc that none is left. `exec` keeps them: its command runs with the rights of
/// whoever started it.
async fn drop_privileges(udp_threads: &UdpThreads) -> Result<(), RunError> {
    privileges::drop_all_on_this_thread().map_err(RunError::DropPrivileges)?;
    for runtime in udp_threads.runtimes() {
        runtime
            .spawn(async { privileges::drop_all_on_this_thread() })
            .await
            .map_err(|err| RunError::DropPrivileges(io::Error::other(err)))?
            .map_err(RunError::DropPrivileges)?;
    }
    let holding = privileges::threads_with_capabilities().map_err(RunError::DropPrivileges)?;
    if !holding.is_empty() {
        return Err(RunError::DropPrivileges(io::Error::other(format!(
            "threads {holding:?} still hold capabilities"
        ))));
    }
    privileges::make_undumpable().map_err(RunError::DropPrivileges)?;
    log::info!(
        target: LOG,
        "dropped all capabilities and became undumpable: the programs are attached and the \
         sockets bound"
    );
    Ok(())
}

async fn serve(
    config: &RunConfig,
    scope: Scope<'_>,
    udp_threads: &UdpThreads,
) -> Result<Outcome, RunError> {
    // Watched from the start, so a stop request during start-up is not lost.
    let mut signals = StopSignals::new().map_err(RunError::Signals)?;
    let listeners = Listeners::bind(config, udp_threads.count()).await?;
    if listeners.joined_another_agent {
        log::info!(
            target: LOG,
            "another agent serves {}: taking over from it (it answers what it has until it is \
             stopped; new lookups come here once this agent is ready)",
            listeners.v4
        );
    } else if config.takeover {
        log::info!(target: LOG, "no agent serves {} yet: nothing to take over", listeners.v4);
    }
    let metrics_listener = match config.metrics {
        Some(addr) => {
            Some(bind_metrics_listener(addr).map_err(|source| RunError::Listen { addr, source })?)
        }
        None => None,
    };
    let pins = host::prepare_state_dir(&config.state_dir, config.block4, config.block6)?;
    host::check_pins(&pins)?;
    let block4 = Block {
        addresses: config.block4,
        port: listeners.v4.port(),
    };
    let block6 = listeners.v6.map(|v6| Block {
        addresses: config.block6,
        port: v6.port(),
    });
    let (mut redirector, servers, kernel_counters, agents) = Redirector::attach(&RedirectConfig {
        cgroup: scope.target,
        agent_cgroup: scope.agent,
        block4,
        block6,
        excluded: scope.excluded,
        state_dir: &pins,
        listeners: listeners.fds(metrics_listener.as_ref()),
        taking_over: listeners.joined_another_agent,
    })?;
    log::info!(
        target: LOG,
        "redirecting IPv4 lookups to {} (one address per server) on port {}{}",
        block4.addresses,
        block4.port,
        block6.map_or_else(
            || "; IPv6 lookups are left alone".to_owned(),
            |block| format!(
                ", IPv6 lookups to {} on port {}",
                block.addresses, block.port
            )
        )
    );
    let servers = Arc::new(servers);
    let listen_addrs: Vec<SocketAddr> = std::iter::once(SocketAddr::V4(listeners.v4))
        .chain(listeners.v6.map(SocketAddr::V6))
        .collect();
    let destinations = || CachedServers::new(Arc::clone(&servers), listen_addrs.clone());
    let stats = Arc::new(Stats::default());
    let cache = config.cache.map(|settings| {
        log::info!(
            target: LOG,
            "caching answers: at most {} entries and {} bytes, each kept {:?} at most, served \
             stale {:?} past expiry when the upstream fails",
            settings.max_entries,
            settings.max_bytes,
            settings.max_ttl,
            settings.serve_stale
        );
        Arc::new(Cache::new(settings))
    });
    // Paths are named from the top of the redirected cgroup's hierarchy, as the host sees it.
    let workload_root = scope
        .target
        .hierarchy_root()
        .or_else(|| cgroup::cgroup2_root().ok())
        .unwrap_or_else(|| "/sys/fs/cgroup".into());
    let workloads = Arc::new(WorkloadNames::new(workload_root.clone()));
    // Served on the metrics port: kept only when there is one.
    let resolutions = config
        .metrics
        .is_some()
        .then(|| Arc::new(Resolutions::new(Arc::clone(&workloads))));
    let workload_stats = (config.workload_metrics > 0 && config.metrics.is_some())
        .then(|| Arc::new(WorkloadStats::new(config.workload_metrics)));
    let query_log = config
        .dnstap
        .is_some()
        .then(|| Arc::new(QueryLog::new(Arc::clone(&workloads))));
    let udp_settings = ForwardSettings {
        upstream_override: config.upstream,
        upstream_timeout: config.upstream_timeout,
        max_inflight: config.max_inflight,
        per_client: PerClientLimit::new(config.max_inflight_per_client),
        cache: cache.clone(),
        in_flight: Arc::new(Coalescer::new(config.max_inflight)),
        workloads: Some(Arc::clone(&workloads)),
        query_log: query_log.clone(),
        resolutions: resolutions.clone(),
        workload_stats: workload_stats.clone(),
    };
    let tcp_settings = TcpSettings {
        upstream_override: config.upstream,
        upstream_timeout: config.upstream_timeout,
        idle_timeout: config.tcp_idle_timeout,
        max_connections: config.max_tcp_connections,
        per_client: PerClientLimit::new(config.max_tcp_connections_per_client),
        cache: cache.clone(),
        workloads: Some(Arc::clone(&workloads)),
        query_log: query_log.clone(),
        resolutions: resolutions.clone(),
        workload_stats: workload_stats.clone(),
    };
    // Only a socket without an address fails here; say which listen address it was.
    let failed = |source| RunError::Listen {
        addr: SocketAddr::V4(listeners.v4),
        source,
    };
    // Each UDP proxy lives on its thread's runtime: its sockets, its readers, its sweeper.
    let mut udp = Vec::new();
    for group in listeners.udp {
        let mut local_addr = None;
        for (socket, runtime) in group.into_iter().zip(udp_threads.runtimes()) {
            let _on_its_thread = runtime.enter();
            let socket = UdpSocket::from_std(socket).map_err(failed)?;
            let proxy = UdpProxy::new(
                socket,
                destinations(),
                udp_settings.clone(),
                Arc::clone(&stats),
            )
            .map_err(failed)?;
            local_addr = Some(proxy.local_addr());
            udp.push((proxy, runtime.clone()));
        }
        if let Some(addr) = local_addr {
            log::info!(
                target: LOG,
                "serving redirected DNS on {addr}/udp ({} threads)",
                udp_threads.count()
            );
        }
    }
    let mut tcp = Vec::new();
    for listener in listeners.tcp {
        let proxy = TcpProxy::new(
            listener,
            destinations(),
            tcp_settings.clone(),
            Arc::clone(&stats),
        )
        .map_err(failed)?;
        log::info!(target: LOG, "serving redirected DNS on {}/tcp", proxy.local_addr());
        tcp.push(proxy);
    }

    let stop_serving = drain::Signal::new();
    let mut serving = tokio::task::JoinSet::new();
    for (proxy, runtime) in &udp {
        let (proxy, stop) = (Arc::clone(proxy), stop_serving.clone());
        serving.spawn_on(async move { proxy.serve(stop).await }, runtime);
    }
    for proxy in &tcp {
        let (proxy, stop) = (Arc::clone(proxy), stop_serving.clone());
        serving.spawn(async move { proxy.serve(stop).await });
    }
    let agents = Arc::new(agents);
    let readiness = Arc::new(Readiness::default());
    readiness.watch_for_replacement({
        let agents = Arc::clone(&agents);
        move || agents.replaced()
    });
    // The metrics server and the background tasks: stopped last, after the drain.
    let stop_background = drain::Signal::new();
    tokio::spawn(keep_alive(Arc::clone(&agents), stop_background.clone()));
    tokio::spawn(forget_departed(
        Arc::clone(&servers),
        workload_root.clone(),
        stop_background.clone(),
    ));
    if let Some(listener) = metrics_listener {
        let metrics = Metrics::new(
            Arc::clone(&stats),
            Arc::new(kernel_counters),
            Arc::clone(&readiness),
            cache.clone(),
            query_log.clone(),
            resolutions.clone(),
            workload_stats
                .clone()
                .map(|stats| (stats, Arc::clone(&workloads))),
        );
        log::info!(
            target: LOG,
            "serving /metrics, /healthz and /readyz on http://{}",
            listener.local_addr().map_err(failed)?
        );
        tokio::spawn(Arc::new(metrics).serve(listener, stop_background.clone()));
    }
    if scope.command.is_none() {
        drop_privileges(udp_threads).await?;
    }
    // Only now: a thread made before dropping them would keep the capabilities (`exec` keeps
    // them for its command anyway).
    workloads.allow_resolving();
    if let (Some(log), Some(target)) = (&query_log, &config.dnstap) {
        let settings = DnstapSettings::new(target.clone(), host_name());
        log.start(settings)
            .map_err(|err| RunError::Dnstap(err.to_string()))?;
        log::info!(target: LOG, "writing a dnstap log of every query to {target}");
    }
    readiness.set(true);

    let outcome = match scope.command {
        None => {
            let signal = signals.next().await;
            log::info!(
                target: LOG,
                "{signal}: no longer redirecting new lookups; answering those in flight"
            );
            Outcome::Stopped
        }
        Some((argv, cgroup)) => {
            let status = exec::run_command(argv, cgroup, &mut signals).await?;
            log::info!(
                target: LOG,
                "the command exited ({status}): no longer redirecting; answering what is in flight"
            );
            Outcome::CommandExited(status)
        }
    };
    readiness.set(false);
    stop_serving.stop();
    serving.join_all().await;

    redirector.stop_redirecting();
    if agents.others_on_port() {
        // Another agent serves the block (an older one, when a newer one that took over is
        // stopped first, or the one that took over from this one): let it have every new
        // packet, so this one's drain ends with what it has.
        redirector.stop_steering();
    }
    // All listeners drain at once, each until the same deadline.
    let deadline = Deadline::after(config.shutdown_timeout);
    let mut draining = tokio::task::JoinSet::new();
    for (proxy, runtime) in udp {
        draining.spawn_on(async move { (proxy.drain(deadline).await, 0) }, &runtime);
    }
    for proxy in tcp {
        draining.spawn(async move { (0, proxy.drain(deadline).await) });
    }
    let (mut queries, mut connections) = (0, 0);
    for (unanswered, open) in draining.join_all().await {
        queries += unanswered;
        connections += open;
    }
    if queries + connections > 0 {
        log::warn!(
            target: LOG,
            "at the shutdown deadline, {queries} UDP queries were unanswered and {connections} TCP connections open"
        );
    }
    drop(redirector);
    stop_background.stop();
    log::info!(target: LOG, "stopped: {}", stats.summary());
    Ok(outcome)
}
