//! The agent, wired: `run` checks and enters the cgroups, binds the listeners, attaches the
//! programs, starts the DNS listeners, the metrics server and the background tasks, and at a
//! stop request shuts them down in order. Everything else is a module of its own, which this
//! one only assembles.
use std::{
    ffi::OsString,
    io,
    mem::take,
    net::SocketAddr,
    process::ExitStatus,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use tokio::net::TcpListener;

use crate::{
    agents::Agents,
    cgroup::{self, AgentCgroup, Cgroup, CgroupError, CommandCgroup},
    config::{RunConfig, Workload},
    dnstap::{self, DnstapSettings},
    drain::{self, Deadline},
    ebpf::{
        AttachedLinks, Block, CachedServers, EbpfError, ExcludedTree, KernelCounters,
        RedirectConfig, Redirector, ServerTable,
    },
    exec, host,
    metrics::{Metrics, Readiness},
    privileges,
    redirect_lock::{self, Claim, RedirectLock},
    service_manager::ServiceManager,
    shutdown::StopSignals,
    udp_threads::UdpThreads,
};

mod background;
pub(crate) use background::FORGET_DEPARTED_TEST_SETTING;
mod dns;
mod kernel_refusals;
mod listeners;

use dns::{Dns, Shared};
use listeners::{Listeners, PortHold, bind_metrics_listener};

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
    #[error("cannot listen on {addr}: {source}{hint}", hint = listen_hint(*addr, source))]
    Listen {
        addr: std::net::SocketAddr,
        source: io::Error,
    },
    #[error("cannot serve metrics on {addr}: {source}{hint}", hint = bind_hint(*addr, source, "--metrics"))]
    Metrics {
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
    #[error(transparent)]
    RedirectLock(#[from] redirect_lock::LockError),
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
    /// Stopped because it was moved out of its own cgroup and could not go back (`exec`: after
    /// stopping its command).
    Stranded,
}

fn block_hint(err: &io::Error) -> &'static str {
    if err.kind() == io::ErrorKind::AddrInUse {
        " (another dns-proxy serves this block on this port: stop it, pass --takeover to \
         replace it without a gap, or give this one another --redirect-block or port)"
    } else {
        ""
    }
}

fn listen_hint(addr: std::net::SocketAddr, err: &io::Error) -> String {
    let flag = if addr.is_ipv6() {
        "--listen6"
    } else {
        "--listen"
    };
    match err.kind() {
        io::ErrorKind::AddrInUse => format!(
            " (something already listens there: stop it or choose another {flag}; if it is \
             another dns-proxy, --takeover replaces it without a gap)"
        ),
        _ => bind_hint(addr, err, flag),
    }
}

fn bind_hint(addr: std::net::SocketAddr, err: &io::Error, flag: &str) -> String {
    match err.kind() {
        io::ErrorKind::AddrInUse => {
            format!(" (something already listens there: stop it or choose another {flag})")
        }
        io::ErrorKind::AddrNotAvailable => {
            format!(" (no interface has this address: add it, or choose another {flag})")
        }
        io::ErrorKind::PermissionDenied if addr.port() < 1024 => {
            " (ports below 1024 need root or CAP_NET_BIND_SERVICE)".to_owned()
        }
        _ => String::new(),
    }
}

/// Runs the agent until SIGINT or SIGTERM (or, for `exec`, until the command exits), then
/// stops redirecting, answers what is in flight, detaches and returns. Blocks: the cgroup work
/// happens first, then a tokio runtime of its own serves.
pub fn run(config: RunConfig) -> Result<Outcome, RunError> {
    log::info!(target: LOG, "starting with {config:?}");
    // Before any thread that serves starts: their query IDs must be unpredictable.
    host::wait_for_random_seed();
    // Not for `exec`: its command would inherit it (select() breaks past 1,024).
    if let crate::config::Workload::Cgroup { .. } = config.workload {
        // Each relayed TCP connection holds two (twice the limit, by fair share), each UDP
        // query in flight to a server without connected sockets one (as many as twice the
        // limit, by fair share), and the programs, maps, listeners and connected sockets a
        // few hundred.
        let needed = 4 * config.max_tcp_connections + 2 * config.max_inflight + 512;
        host::raise_open_file_limit(u64::try_from(needed).unwrap_or(u64::MAX));
    }
    if let Some(target) = &config.dnstap {
        dnstap::check_target(target).map_err(RunError::Dnstap)?;
    }
    let hierarchy = cgroup::cgroup2_root()?;
    // Where the agent finds its own cgroup: in a container, its own mount, not the host's.
    let agent_mount = cgroup::own_cgroup_mount()?;
    // Checked before the agent moves, so a bad path changes nothing.
    let (target, excluded_subtrees) = match &config.workload {
        Workload::Cgroup { cgroup, exclude } => {
            let target = Cgroup::open("--cgroup", cgroup.as_deref().unwrap_or(&hierarchy))?;
            let mut excluded = Vec::new();
            for path in exclude {
                // Not made yet (a stopped service's, which systemd removes): excluded once it
                // is, at the depth its path gives. A restart while it is stopped would
                // otherwise fail, and leave lookups direct until someone saw.
                if !path.exists()
                    && path.is_absolute()
                    && let Some((cgroup, level)) = Cgroup::not_made_yet("--exclude-cgroup", path)?
                {
                    excluded.push((cgroup, level));
                    continue;
                }
                let cgroup = Cgroup::open("--exclude-cgroup", path)?;
                // The configuration compared the paths as given; this compares the cgroups
                // (the default --cgroup, the hierarchy's root, included).
                if cgroup.holds(&target) {
                    return Err(CgroupError::BadCgroup {
                        flag: "--exclude-cgroup",
                        path: path.clone(),
                        reason: format!(
                            "is the --cgroup ({}) itself or holds it, which would leave nothing \
                             redirected",
                            target.path.display()
                        ),
                    }
                    .into());
                }
                let level = cgroup.level("--exclude-cgroup")?;
                excluded.push((cgroup, level));
            }
            (Some(target), excluded)
        }
        Workload::Command(_) => (None, Vec::new()),
    };
    // Before any thread or socket exists, so that all of the agent's traffic carries its cgroup.
    let agent = AgentCgroup::enter(&agent_mount)?;
    let command = match &config.workload {
        Workload::Command(argv) => Some((argv.as_slice(), CommandCgroup::create(agent.parent())?)),
        Workload::Cgroup { .. } => None,
    };
    let target = match (&target, &command) {
        (Some(target), _) => target,
        (None, Some((_, command_cgroup))) => command_cgroup.cgroup(),
        (None, None) => unreachable!("a cgroup workload has a target"),
    };
    // Where the agent could not make a cgroup of its own (read-only), its cgroup is skipped:
    // were that the redirected cgroup itself, nothing in it would be redirected.
    if agent.cgroup().id == target.id {
        return Err(CgroupError::BadCgroup {
            flag: "--cgroup",
            path: target.path.clone(),
            reason: "is the agent's own cgroup, read-only here, which the agent skips: nothing \
                     directly in it would be redirected; start the agent in another cgroup, or \
                     where it can make one below"
                .to_owned(),
        }
        .into());
    }
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
        agent_mount: &agent_mount,
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
    /// The cgroup2 mount the agent found its own cgroup in, which shows the paths
    /// `/proc/self/cgroup` names: in a container, not the redirected cgroup's hierarchy
    /// mounted beside it (the DaemonSet's `/host/cgroup`).
    agent_mount: &'a cgroup::Cgroup2Mount,
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

/// The blocks served, whose routes to this host the redirect needs: the IPv4 block (routed
/// by a route of its own, made at start by this agent or one before it, or, in 127/8, by
/// loopback's own route, which goes with `lo`'s address or with `lo` down), and the IPv6 block
/// if IPv6 is served.
fn routed_blocks(config: &RunConfig, serves_ipv6: bool) -> Vec<dns_proxy_common::AddressBlock> {
    let ipv6 = Some(config.block6).filter(|_| serves_ipv6);
    std::iter::once(config.block4).chain(ipv6).collect()
}

/// Serves until the stop request (or, for `exec`, the command's end), then shuts down in
/// order: not ready; serving on while an agent taking over is still starting; the listeners
/// stop serving as usual; the redirect is switched off (and, with another agent steering on
/// the port, every new packet steered to it); the listeners drain together until one
/// deadline, the UDP ones letting go of the block (the port's hold, then `sk_lookup`) once
/// all are quiet or a moment before it; the programs are detached; the metrics server and
/// the background tasks stop.
async fn serve(
    config: &RunConfig,
    scope: Scope<'_>,
    udp_threads: &UdpThreads,
) -> Result<Outcome, RunError> {
    // Watched from the start, so a stop request during start-up is not lost.
    let mut signals = StopSignals::new().map_err(RunError::Signals)?;
    let service_manager = ServiceManager::from_environment();
    // Held until this returns: the sockets that hold the blocks' first addresses among them.
    let mut listeners = Listeners::bind(config, udp_threads.count()).await?;
    // Removed again if the start fails from here on; kept once the agent serves.
    let routes = take(&mut listeners.routes);
    // One agent redirects a cgroup: a second would attach beside it and serve nothing.
    let redirect_lock = Arc::new(RedirectLock::take(&Claim {
        cgroup: &scope.target.path.display().to_string(),
        cgroup_id: scope.target.id,
        listen: listeners.v4,
        takeover: config.takeover,
        joined: listeners.joined_another_agent,
    })?);
    let metrics_listener = match config.metrics {
        Some(addr) => {
            // Joined only when this agent takes over from one (on its listen address, or on
            // another port, from the agent that redirects its cgroup): `--takeover` with no
            // agent to take over from (both deployments always pass it) must not join another
            // agent's port.
            let taking_over =
                listeners.joined_another_agent || redirect_lock.replaces_another_agent();
            let listener = bind_metrics_listener(addr, taking_over);
            Some(listener.map_err(|source| RunError::Metrics { addr, source })?)
        }
        None => None,
    };
    if listeners.v4.port() == 53 || listeners.v6.is_some_and(|v6| v6.port() == 53) {
        warn_of_agents_above(scope.target);
    }
    let Attached {
        mut redirector,
        servers,
        kernel_counters,
        agents,
        pins,
    } = attach(
        config,
        &scope,
        &listeners,
        metrics_listener.as_ref(),
        redirect_lock.replaces_another_agent(),
    )?;
    // Taken once `sk_lookup` steers the block: before, a datagram to a block address on the
    // port met the hold, which takes nothing, where it is refused at once while no program
    // steers (helper-181: a connected socket asking every 50 ms lost a lookup, of 20 sockets
    // each, in the 40 ms an agent took to load its programs after a SIGKILL).
    let port_hold = PortHold::take(&listeners);
    let servers = Arc::new(servers);
    let listen_addrs: Vec<SocketAddr> = std::iter::once(SocketAddr::V4(listeners.v4))
        .chain(listeners.v6.map(SocketAddr::V6))
        .collect();
    let destinations = || CachedServers::new(Arc::clone(&servers), listen_addrs.clone());
    // Paths are named from the top of the redirected cgroup's hierarchy, as the host sees it.
    let workload_root = scope
        .target
        .hierarchy_root()
        .or_else(|| cgroup::cgroup2_root().ok())
        .unwrap_or_else(|| "/sys/fs/cgroup".into());
    let shared = Shared::new(config, workload_root.clone(), redirector.own_sockets());
    let sockets = (take(&mut listeners.udp), take(&mut listeners.tcp));
    let listen = SocketAddr::V4(listeners.v4);
    let dns = Dns::start(config, &shared, sockets, udp_threads, destinations, listen)?;

    let stop_serving = drain::Signal::new();
    let serving = dns.serve(&stop_serving);
    let agents = Arc::new(agents);
    let readiness = Arc::new(Readiness::default());
    readiness.watch_for_replacement({
        let agents = Arc::clone(&agents);
        move || agents.replaced()
    });
    // The metrics server and the background tasks: stopped last, after the drain.
    let stop_background = drain::Signal::new();
    // Said before the agent is ready, not once the task first runs.
    port_hold.count_missing(&shared.stats);
    let release_hold = drain::Signal::new();
    let mut hold_kept = Some(tokio::spawn(
        port_hold.keep(release_hold.clone(), Arc::clone(&shared.stats)),
    ));
    let stranded = drain::Signal::new();
    // Read now, while the agent holds few descriptors: the links it holds to its cgroup.
    let links = AttachedLinks::find(scope.target.id).unwrap_or_else(|err| {
        log::warn!(
            "cannot read this agent's links to its cgroup: their detachment goes unseen: {err}"
        );
        AttachedLinks::default()
    });
    log::debug!(
        "watching {} links to {}",
        links.len(),
        scope.target.path.display()
    );
    let watched = background::Watched {
        target: scope.target.clone(),
        links: Arc::new(links),
        exclusions: redirector.take_exclusions(),
        agent: scope.agent.clone(),
        agent_mount: scope.agent_mount.clone(),
        stranded: stranded.clone(),
    };
    background::start(
        &agents,
        pins,
        redirector.serving(),
        &redirect_lock,
        &servers,
        Arc::clone(&shared.stats),
        shared.workload_stats.clone(),
        workload_root,
        watched,
        redirector
            .take_routing()
            .map(|(sources, switch)| background::Routing {
                sources,
                switch,
                blocks: routed_blocks(config, listeners.v6.is_some()),
                changes: shared.route_changes.clone(),
                restart: stranded.clone(),
            }),
        redirector
            .take_alive_at()
            .map(|alive_at| background::Running {
                alive_at,
                udp_threads: udp_threads.runtimes().cloned().collect(),
            }),
        &readiness,
        &stop_background,
    );
    let kernel_counters = Arc::new(kernel_counters);
    let refusals = tokio::spawn(kernel_refusals::say_kernel_refusals(
        Arc::clone(&kernel_counters),
        stop_background.clone(),
    ));
    let held_back = tokio::spawn(crate::log_limit::say_held_back_until(
        stop_background.clone(),
    ));
    if let Some(listener) = metrics_listener {
        let metrics = Metrics::new(
            Arc::clone(&shared.stats),
            kernel_counters,
            Arc::clone(&readiness),
            shared.cache.clone(),
            shared.query_log.clone(),
            shared.resolutions.clone(),
            shared.workload_stats.clone(),
        );
        let addr = listener.local_addr().map_err(|source| RunError::Listen {
            addr: listen,
            source,
        })?;
        let names_table = if shared.resolutions.is_some() {
            " and /v1/resolutions"
        } else {
            ""
        };
        log::info!(
            target: LOG,
            "serving /metrics, /healthz, /readyz{names_table} on http://{addr}"
        );
        tokio::spawn(Arc::new(metrics).serve(listener, stop_background.clone()));
    }
    if let crate::config::Workload::Cgroup { .. } = config.workload {
        host::check_open_files_left(udp_threads.runtimes().count())?;
    }
    go_live(config, &scope, udp_threads, &shared).await?;
    routes.into_iter().for_each(host::AddedRoute::keep);
    agents.set_steering(true);
    readiness.set(true);
    service_manager.ready();
    tokio::spawn(
        service_manager
            .clone()
            .feed_watchdog(Arc::clone(&readiness), stop_background.clone()),
    );
    // The line to wait for: /readyz answers 200 from here on.
    log::info!(target: LOG, "ready: redirected lookups are served");

    let outcome = until_stopped(scope.command, &mut signals, &stranded, &shared).await?;
    readiness.set(false);
    let answered_before_the_stop = shared.stats.udp.answered.load(Ordering::Relaxed);
    service_manager.stopping();
    // One deadline for all that follows. After a stop signal, a second SIGINT or SIGTERM (an
    // operator's second Ctrl-C) cuts the wait and the drain short. (Not after `exec`'s command
    // exited: a Ctrl-C reaches the agent as well as the command.)
    let deadline = Deadline::after(config.shutdown_timeout);
    let reopen_logs = || shared.query_log.as_ref().is_some_and(|log| log.reopen());
    let stopped_by_a_signal = matches!(outcome, Outcome::Stopped);
    let mut second_signal = std::pin::pin!(async {
        if stopped_by_a_signal {
            signals.next(&reopen_logs).await
        } else {
            std::future::pending().await
        }
    });
    let mut cut_short = tokio::select! {
        () = until_no_successor_is_starting(&agents, deadline) => None,
        signal = &mut second_signal => Some(signal),
    };
    // From here on this agent serves no new lookup as usual: no other agent may take it for
    // one that does, though its `sk_lookup` may steer on while it drains.
    agents.set_steering(false);
    // Nor does it put its sockets back in `SERVING`: they leave it as they close.
    redirector.serving().stop();
    stop_serving.stop();
    serving.join_all().await;
    redirector.stop_redirecting();
    redirect_lock.release();
    if cut_short.is_none() && agents.another_steers_on_port() {
        // Another agent serves the block (an older one, when a newer one that took over is
        // stopped first, or the one that took over from this one): let it have every new
        // packet, so this one's drain ends with what it has.
        redirector.stop_steering(TO_THE_OTHER_AGENT);
    }
    // All listeners drain at once, each until the same deadline. The UDP ones let go of the
    // block a moment before it, so that what was sent there just before is answered too.
    let last_answers = (config.shutdown_timeout / 5).min(LAST_ANSWERS);
    let steered_until = deadline.earlier_by(last_answers);
    let (queries, connections) = match cut_short {
        Some(_) => (0, 0),
        None => {
            if !agents.another_steers_on_port() {
                // A client connected to the block can keep the drain busy to its end.
                log::info!(
                    target: LOG,
                    "sockets sent to the block are answered until every listener is quiet, \
                     for {:.1} s at most, then refused",
                    config.shutdown_timeout.saturating_sub(last_answers).as_secs_f64()
                );
            }
            let serving_entries = redirector.serving();
            let let_go = async {
                // Before `sk_lookup` is detached, so that what is sent to the block from then
                // on is refused rather than met by the hold.
                let_go_of_the_port(&release_hold, &mut hold_kept).await;
                let another_steers = agents.another_steers_on_port();
                if !another_steers {
                    // In node mode a pod's socket is refused as it sends from now on, not by
                    // the node's rate-limited port unreachable while the listeners finish
                    // (until the deadline, with answers in flight: helper-203).
                    serving_entries.withdraw();
                }
                redirector.stop_steering(if another_steers {
                    TO_THE_OTHER_AGENT
                } else {
                    REFUSED_FROM_NOW_ON
                });
            };
            tokio::select! {
                drained = dns.drain(steered_until, deadline, let_go) => drained,
                signal = &mut second_signal => {
                    cut_short = Some(signal);
                    (0, 0)
                }
            }
        }
    };
    if let Some(signal) = cut_short {
        log::warn!(
            target: LOG,
            "{signal} again: stopping at once, without answering the lookups still in flight"
        );
    }
    if queries + connections > 0 {
        log::warn!(
            target: LOG,
            "at the shutdown deadline, {queries} UDP queries were unanswered and {connections} TCP connections open"
        );
    }
    let_go_of_the_port(&release_hold, &mut hold_kept).await;
    // An answer sent while draining may still wait unread on its client's socket, and shows
    // its server's address only while the decoding programs are attached: with no agent to
    // take over, they stay a moment longer (nothing is redirected or steered here any more).
    let answered_while_draining =
        shared.stats.udp.answered.load(Ordering::Relaxed) != answered_before_the_stop;
    let linger = UNREAD_ANSWERS.min(deadline.remaining());
    if stopped_by_a_signal
        && cut_short.is_none()
        && answered_while_draining
        && !agents.another_steers_on_port()
        && !linger.is_zero()
    {
        log::info!(
            target: LOG,
            "answers' servers are shown for {:.1} s more, to clients that read late",
            linger.as_secs_f64()
        );
        tokio::select! {
            () = tokio::time::sleep(linger) => {}
            signal = &mut second_signal => {
                log::warn!(target: LOG, "{signal} again: stopping at once");
            }
        }
    }
    if agents.another_steers_on_port() {
        redirector.unpin_the_guard_beside_another();
    } else if !agents.newer_one_starting() {
        redirector.take_the_pins_as_the_last();
    }
    drop(redirector);
    stop_background.stop();
    // The programs are detached: the refusals' last count is final, and said before "stopped",
    // as is what the rate-limited lines held back.
    let _ = refusals.await;
    let _ = held_back.await;
    log::info!(target: LOG, "stopped: {}", shared.stats.summary());
    Ok(outcome)
}

/// The most of `--shutdown-timeout` (a fifth of it) kept for answering what was sent to the
/// block just before the UDP listeners let go of it: a client connected to the block keeps a
/// listener from ever being quiet, and what it sent at the deadline would go unanswered.
const LAST_ANSWERS: Duration = Duration::from_secs(1);

/// How long the programs that show an answer's server (`recvmsg`, `getpeername`) outlast a
/// drain that sent answers, when no agent takes over: a client that reads its answer that
/// much later still sees it come from its server (a strict resolver drops one from the block).
const UNREAD_ANSWERS: Duration = Duration::from_secs(1);

/// What becomes of the block's packets once this agent's `sk_lookup` is detached, as the log
/// says it: another agent steers the block, or none does.
const TO_THE_OTHER_AGENT: &str = "the other agent gets what reaches the block";
const REFUSED_FROM_NOW_ON: &str = "what is sent to the block is refused from now on";

/// Releases the hold of the listen port (the task that keeps it, once).
async fn let_go_of_the_port(
    release: &drain::Signal,
    kept: &mut Option<tokio::task::JoinHandle<()>>,
) {
    release.stop();
    if let Some(task) = kept.take() {
        let _ = task.await;
    }
}

/// How often an agent that is stopping looks whether the one taking over steers the block.
const SUCCESSOR_POLL: Duration = Duration::from_millis(50);

/// Returns once no agent taking over from this one is still starting (it steers the block,
/// or is gone), or another agent steers the block, or `deadline` has come. Until then this
/// agent serves, redirects and steers as before: an agent taking over steers nothing until its
/// programs are loaded, and with neither steering, every packet to the block but its listen
/// address is refused (an adversarial review: 300 ms of a connected socket's lookups, with
/// the old agent stopped while the new one loaded).
///
/// Each look reads the pinned records and the kernel's list of unix sockets on this runtime
/// (a millisecond or so, while stopping only): a stop must not need a thread it may not be
/// given, as after the failure that stops the agent.
async fn until_no_successor_is_starting(agents: &Agents, deadline: Deadline) {
    let waiting = || agents.newer_one_starting() && !agents.another_steers_on_port();
    if !waiting() {
        return;
    }
    log::info!(
        target: LOG,
        "an agent taking over from this one does not steer the block yet (still starting): \
         serving until it does"
    );
    let waited = deadline
        .within(async {
            while waiting() {
                tokio::time::sleep(SUCCESSOR_POLL).await;
            }
        })
        .await;
    if waited.is_none() {
        log::warn!(
            target: LOG,
            "the agent taking over did not steer the block by the shutdown deadline: stopping"
        );
    } else if agents.another_steers_on_port() {
        log::info!(target: LOG, "the agent taking over steers the block: stopping");
    } else {
        log::warn!(
            target: LOG,
            "the agent taking over is gone before it steered the block (it failed to start, or \
             was stopped): stopping as the only agent"
        );
    }
}

/// Warns of an agent redirecting a cgroup above `target`, for an agent that listens on port 53:
/// a child cgroup's programs run first, and what they redirect to this agent's block on port
/// 53 is still a lookup to port 53 for the programs above, which redirect it again; its
/// clients then see answers come from this agent's block address.
fn warn_of_agents_above(target: &Cgroup) {
    let Some(root) = target.hierarchy_root() else {
        return;
    };
    // Resolved when it was opened, where resolving names the same directory.
    for ancestor in target.path.ancestors().skip(1) {
        if !ancestor.starts_with(&root) {
            break;
        }
        let Ok(cgroup) = Cgroup::open("--cgroup", ancestor) else {
            break;
        };
        if let Some(pid) = redirect_lock::agent_redirecting(cgroup.id) {
            let pid = pid.map_or_else(|| "pid unknown".to_owned(), |pid| format!("pid {pid}"));
            log::warn!(
                target: LOG,
                "another dns-proxy ({pid}) redirects {}, above {}: this agent listens on \
                 port 53, so that agent redirects again what this one's programs send here, and \
                 this one's clients see answers come from its block's addresses. Exclude {} \
                 from that agent (--exclude-cgroup), or listen on another port",
                ancestor.display(),
                target.path.display(),
                target.path.display()
            );
        }
    }
}

/// Attaches the programs to `scope`'s cgroups, redirecting lookups to the ports of
/// `listeners` (the state directory's pins checked first), and says what is redirected.
fn attach(
    config: &RunConfig,
    scope: &Scope<'_>,
    listeners: &Listeners,
    metrics: Option<&TcpListener>,
    replaces_an_agent: bool,
) -> Result<Attached, RunError> {
    let pins = host::prepare_state_dir(&config.state_dir, config.block4, config.block6)?;
    host::check_pins(&pins)?;
    // A takeover (of another agent's listen address, or of the lock on redirecting this
    // cgroup) with no list of agents pinned has no agent of its state directory to take over
    // from: refused before the load, which would pin a fresh, empty table. Refused after it,
    // or not at all on another port, such a start left that table pinned where a running
    // agent's pins had just been removed (the state directory removed by hand; that agent
    // pins its own again within 2 s), the running agent left it alone, and every later start
    // loaded it: sockets sent to the block before were refused for good (helper-122, 4 of 4
    // tries; helper-126, on another port).
    if (listeners.joined_another_agent || replaces_an_agent) && !host::agents_pinned(&pins) {
        let state_dir = pins.display().to_string();
        return Err(if listeners.joined_another_agent {
            crate::ebpf::EbpfError::NothingToTakeOver { state_dir }
        } else {
            crate::ebpf::EbpfError::NoAgentsPinned { state_dir }
        }
        .into());
    }
    let block4 = Block {
        addresses: config.block4,
        port: listeners.v4.port(),
    };
    let block6 = listeners.v6.map(|v6| Block {
        addresses: config.block6,
        port: v6.port(),
    });
    let attached = Redirector::attach(&RedirectConfig {
        cgroup: scope.target,
        agent_cgroup: scope.agent,
        block4,
        block6,
        excluded: scope.excluded,
        excluded_servers: &config.excluded_servers,
        max_origins_per_cgroup: config.max_servers_per_workload,
        state_dir: &pins,
        listeners: listeners.fds(metrics),
        taking_over: listeners.joined_another_agent,
        // `exec`'s cgroup goes with its command, and its agent shares the table (and the
        // pin) with the host's: its link would take the place of the host agent's.
        leave_release_attached: scope.command.is_none(),
    })?;
    if !config.excluded_servers.is_empty() {
        let servers: Vec<String> = config
            .excluded_servers
            .iter()
            .map(ToString::to_string)
            .collect();
        log::info!(
            target: LOG,
            "never redirecting lookups to {} (--exclude-server): they go direct",
            servers.join(", ")
        );
        for everything in config.excluded_servers.iter().filter(|s| s.is_everything()) {
            log::warn!(
                target: LOG,
                "--exclude-server {everything} holds every server of its family: no lookup of \
                 that family is redirected"
            );
        }
    }
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
    match config.max_servers_per_workload {
        0 => log::info!(
            target: LOG,
            "no workload's share of the table of servers is limited \
             (--max-servers-per-workload 0): one may fill it for all"
        ),
        share => log::info!(
            target: LOG,
            "each workload may have an index of its own for {share} servers in the table of \
             servers, up to {} slots with the servers' shared ones (--max-servers-per-workload); \
             past it, its lookups to servers new to it go by their shared index or direct",
            u64::from(share) * 2
        ),
    }
    let (redirector, servers, kernel_counters, agents) = attached;
    // Held once the load has pinned them: pinned again if the state directory goes.
    let pins = host::Pins::hold(&pins, redirector.link_pins())?;
    Ok(Attached {
        redirector,
        servers,
        kernel_counters,
        agents,
        pins,
    })
}

/// What [`attach`] gives: the programs attached, and the kernel state they share.
struct Attached {
    redirector: Redirector,
    servers: ServerTable,
    kernel_counters: KernelCounters,
    agents: Agents,
    /// Held, to be pinned again if they go.
    pins: host::Pins,
}

/// Once everything is bound and attached: drops privileges (not for `exec`), lets workload
/// names be resolved and starts the dnstap log.
async fn go_live(
    config: &RunConfig,
    scope: &Scope<'_>,
    udp_threads: &UdpThreads,
    shared: &Shared,
) -> Result<(), RunError> {
    if scope.command.is_none() {
        drop_privileges(udp_threads).await?;
    }
    // Only now: a thread made before dropping them would keep the capabilities (`exec` keeps
    // them for its command anyway).
    shared.workloads.allow_resolving();
    if let (Some(log), Some(target)) = (&shared.query_log, &config.dnstap) {
        let settings = DnstapSettings::new(target.clone(), host_name());
        log.start(settings)
            .map_err(|err| RunError::Dnstap(err.to_string()))?;
        log::info!(target: LOG, "writing a dnstap log of every query to {target}");
    }
    Ok(())
}

/// Waits for SIGINT or SIGTERM, or for the agent to be `stranded` out of its own cgroup
/// (`run`), or for the command to exit (`exec`, which stops it when the agent is stranded).
async fn until_stopped(
    command: Option<(&[OsString], &Cgroup)>,
    signals: &mut StopSignals,
    stranded: &drain::Signal,
    shared: &Shared,
) -> Result<Outcome, RunError> {
    // SIGHUP: the dnstap file, if any, is started anew (log rotation).
    let reopen_logs = || shared.query_log.as_ref().is_some_and(|log| log.reopen());
    Ok(match command {
        None => tokio::select! {
            signal = signals.next(&reopen_logs) => {
                log::info!(
                    target: LOG,
                    "{signal}: no longer redirecting new lookups; answering those in flight"
                );
                Outcome::Stopped
            }
            () = stranded.stopped() => {
                // Why was said where it was found: out of its own cgroup with no way back, or
                // a block it routed gone and not back.
                log::error!(
                    target: LOG,
                    "no longer redirecting new lookups; answering those in flight, then exiting \
                     with an error, to be started anew"
                );
                Outcome::Stranded
            }
        },
        Some((argv, cgroup)) => {
            let status = exec::run_command(argv, cgroup, signals, stranded).await?;
            if stranded.is_stopped() {
                log::error!(
                    target: LOG,
                    "the command exited ({status}); out of its own cgroup, with no way back: \
                     no longer redirecting; answering what is in flight, then exiting with an \
                     error"
                );
                return Ok(Outcome::Stranded);
            }
            log::info!(
                target: LOG,
                "the command exited ({status}): no longer redirecting; answering what is in flight"
            );
            Outcome::CommandExited(status)
        }
    })
}
