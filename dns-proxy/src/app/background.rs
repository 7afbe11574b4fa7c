//! The agent's background tasks, beside the listeners: the heartbeat that tells other agents
//! this one is alive, the walk that forgets the origins of cgroups that are gone, the excluded
//! trees kept excluded when made anew, the watch on the other cgroups named on the command
//! line (a redirected cgroup that is gone, the agent's own), as routes change, the source of
//! redirected sockets and the blocks' routes
//! (the redirect is switched off while a block is not routed here), and the word to the
//! programs that the agent runs (they send nothing to one that stopped).
use std::{
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use dns_proxy_common::AddressBlock;

use super::LOG;
use crate::{
    agents,
    agents::HEARTBEAT_INTERVAL,
    cgroup,
    cgroup::Cgroup,
    dns::{stats::Stats, workload_stats::WorkloadStats},
    drain,
    ebpf::{
        AliveAt, AttachedLinks, DirectSources, Exclusions, FORGOTTEN_HELD_FOR, FoundSources,
        RedirectSwitch, ServerTable, Serving, TreesMade,
    },
    host,
    log_limit::RateLimited,
    metrics::{Readiness, WedgedThread},
    redirect_lock::RedirectLock,
    route_changes::RouteChanges,
    time_namespace, workload,
};

/// How often the cgroups named on the command line are looked at. The excluded trees are looked
/// at besides as soon as a directory is made or removed above one ([`TreesMade`]).
const WATCH_CGROUPS_EVERY: Duration = Duration::from_secs(1);

/// Each look at the excluded trees that the kernel woke owes a pause of this many times the
/// CPU it took, paid back by the time that passes ([`LookDebt`]): a workload that makes and
/// removes directories beside an excluded path without pause (in a subtree delegated to it)
/// keeps the agent looking a twentieth of the time at most, however many trees there are.
const EXCLUDED_LOOKS_COST_SHARE: u32 = 20;

/// What the looks may owe before the next one pauses: a burst of changes (services starting
/// at boot, a restart's removal then making of a cgroup) is looked at at once, change by
/// change. A look at a few trees takes about 0.15 ms of CPU here: 30 of them back to back.
const EXCLUDED_LOOKS_ALLOWANCE: Duration = Duration::from_millis(100);

/// How often the agent tells its programs that it runs (`ALIVE_AT`). They take it for stopped
/// after [`dns_proxy_common::UNRESPONSIVE_AFTER_NS`] (3 s) without: six in a row missed.
const SAY_RUNNING_EVERY: Duration = Duration::from_millis(500);

/// How often each UDP thread notes that it runs.
const UDP_THREAD_TICK: Duration = Duration::from_millis(250);

/// A UDP thread that has not noted it runs for this long is taken for wedged: the agent stops
/// saying it runs, since a third of the lookups (those its listener gets) would be lost.
const UDP_THREAD_WEDGED_AFTER: Duration = Duration::from_millis(1500);

/// What tells the programs that the agent runs: the map, and the UDP threads that must run.
pub(super) struct Running {
    pub alive_at: AliveAt,
    pub udp_threads: Vec<tokio::runtime::Handle>,
}

/// The cgroups the agent keeps an eye on.
pub(super) struct Watched {
    /// The redirected cgroup (`--cgroup`).
    pub target: Cgroup,
    /// The agent's links to it.
    pub links: Arc<AttachedLinks>,
    /// The excluded trees (`--exclude-cgroup`), kept excluded by a task of their own.
    pub exclusions: Option<Exclusions>,
    /// The agent's own cgroup, which it must not leave.
    pub agent: Cgroup,
    /// The cgroup2 mount that shows the agent's own cgroup.
    pub agent_mount: cgroup::Cgroup2Mount,
    /// Fired when the agent is out of its own cgroup and cannot go back, or a background task
    /// failed: it stops, so that its service manager starts it anew.
    pub stranded: drain::Signal,
}

/// Starts the heartbeat, the forgetting of the origins of cgroups that are gone (named from
/// `root`), the watch on the `watched` cgroups, and the watch on `routing` as routes change,
/// until `stop`.
#[expect(
    clippy::too_many_arguments,
    reason = "one of each thing the tasks watch; a struct would only name them again"
)]
pub(super) fn start(
    agents: &Arc<agents::Agents>,
    pins: host::Pins,
    serving: Arc<Serving>,
    redirect_lock: &Arc<RedirectLock>,
    servers: &Arc<ServerTable>,
    stats: Arc<Stats>,
    workload_stats: Option<Arc<WorkloadStats>>,
    root: PathBuf,
    mut watched: Watched,
    routing: Option<Routing>,
    running: Option<Running>,
    readiness: &Arc<Readiness>,
    stop: &drain::Signal,
) {
    let failed = watched.stranded.clone();
    let spawn = |name, ends_early, task| spawn_watched(name, ends_early, task, stop, &failed);
    if let Some(exclusions) = watched.exclusions.take().filter(|trees| !trees.is_empty()) {
        let task = keep_excluded(exclusions, stop.clone());
        spawn(
            "keeping the excluded cgroups excluded",
            false,
            Box::pin(task),
        );
    }
    if let Some(running) = running {
        let task = say_running(running, Arc::clone(readiness), stop.clone());
        spawn("saying the agent runs", false, Box::pin(task));
    }
    if let Some(routing) = routing {
        let task = keep_routing(
            routing,
            Arc::clone(servers),
            Arc::clone(readiness),
            stop.clone(),
        );
        spawn("watching the blocks' routes", false, Box::pin(task));
    }
    let task = keep_alive(
        Arc::clone(agents),
        Arc::new(pins),
        serving,
        Arc::clone(redirect_lock),
        Arc::clone(readiness),
        stop.clone(),
    );
    spawn("the heartbeat", false, Box::pin(task));
    // Ends once it holds the lock.
    let task = take_lock_when_free(Arc::clone(redirect_lock), stop.clone());
    spawn("taking the redirect lock", true, Box::pin(task));
    let task = forget_departed(
        Arc::clone(servers),
        stats,
        workload_stats,
        root,
        stop.clone(),
    );
    spawn("forgetting departed cgroups", false, Box::pin(task));
    let task = watch_cgroups(watched, Arc::clone(readiness), stop.clone());
    spawn("watching the cgroups", false, Box::pin(task));
}

/// A background task, boxed so that tasks of every kind go through one [`spawn_watched`].
type Task = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// Spawns `task`, and stops the agent with an error (`failed`), to be started anew, if it
/// panics, or ends before `stop` when it should run until then (`ends_early` unset). Before,
/// a task that failed ended alone: an agent started at its cgroup's task limit (`pids.max`)
/// could not start the threads its tasks' blocking work runs on, and ran on with no
/// heartbeat, no watch on its cgroups and no forgetting, while `/readyz`, `/healthz` and the
/// watchdog said it was well; once another agent took it for gone, its own answers were
/// dropped as a stranger's (helper-122: 0 lookups of 194 answered over 60 s).
fn spawn_watched(
    name: &'static str,
    ends_early: bool,
    task: Task,
    stop: &drain::Signal,
    failed: &drain::Signal,
) {
    let task = tokio::spawn(task);
    let (stop, failed) = (stop.clone(), failed.clone());
    tokio::spawn(async move {
        let ended = task.await;
        if stop.is_stopped() || failed.is_stopped() {
            return;
        }
        match ended {
            Ok(()) if ends_early => return,
            Ok(()) => log::error!(
                target: LOG,
                "{name} stopped: stopping the agent, to be started anew"
            ),
            Err(err) => log::error!(
                target: LOG,
                "{name} failed ({err}): stopping the agent, to be started anew"
            ),
        }
        failed.stop();
    });
}

/// Tells the programs that the agent runs (`ALIVE_AT`) every [`SAY_RUNNING_EVERY`] until
/// `stop`, while every UDP thread does too: stopped, frozen or wedged, the agent says nothing,
/// and the programs soon send it nothing (lookups go direct). Logs when a UDP thread is wedged.
/// A write that fails is said once, as an error, and on `/readyz`, until one works again.
async fn say_running(running: Running, readiness: Arc<Readiness>, stop: drain::Signal) {
    let Running {
        mut alive_at,
        udp_threads,
    } = running;
    let start = tokio::time::Instant::now();
    let ticks: Vec<Arc<AtomicU64>> = udp_threads
        .iter()
        .map(|thread| {
            let tick = Arc::new(AtomicU64::new(0));
            thread.spawn(note_running(Arc::clone(&tick), start, stop.clone()));
            tick
        })
        .collect();
    let wedged_log = RateLimited::new(Duration::from_secs(10));
    let mut failing = false;
    let mut was_wedged = false;
    let mut last_look = 0;
    // The first tick at once: the agent said it runs at load, a moment ago.
    let mut every = tokio::time::interval(SAY_RUNNING_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.stopped() => return,
            _ = every.tick() => {}
        }
        let now = millis_since(start);
        let wedged_after = UDP_THREAD_WEDGED_AFTER.as_millis() as u64;
        // Late itself (the whole agent was stopped, and runs again): the UDP threads' last
        // notes are as old, and say nothing of them.
        let on_time = now.saturating_sub(last_look) <= wedged_after;
        last_look = now;
        let wedged = ticks.iter().enumerate().find_map(|(n, tick)| {
            let silent = now.saturating_sub(tick.load(Ordering::Relaxed));
            (on_time && silent > wedged_after).then_some((n, silent))
        });
        if on_time {
            let now = std::time::Instant::now();
            readiness.set_wedged_udp_thread(wedged.map(|(index, silent)| {
                WedgedThread {
                    index,
                    since: now
                        .checked_sub(Duration::from_millis(silent))
                        .unwrap_or(now),
                }
            }));
            if was_wedged && wedged.is_none() {
                log::info!(target: LOG, "every UDP thread runs again: the redirect is back on");
            }
            was_wedged = wedged.is_some();
        }
        if let Some((n, silent)) = wedged {
            wedged_log.warn(|_| {
                format!(
                    "UDP thread {n} has not run for {silent} ms: the redirect stops within 3 s \
                     (lookups go direct) until it runs again"
                )
            });
            continue;
        }
        match alive_at.now() {
            Ok(()) if failing => {
                failing = false;
                readiness.set_cannot_say_running(false);
                log::info!(target: LOG, "the programs are told that the agent runs again");
            }
            Ok(()) => {}
            Err(err) if !failing => {
                failing = true;
                readiness.set_cannot_say_running(true);
                log::error!(
                    target: LOG,
                    "cannot tell the programs that the agent runs ({err}): within 3 s they \
                     redirect nothing, and lookups go direct (Linux before 5.19 with \
                     kernel.unprivileged_bpf_disabled set refuses map writes to a process \
                     without CAP_BPF: set it to 0)"
                );
            }
            Err(_) => {}
        }
    }
}

/// Notes, every [`UDP_THREAD_TICK`] until `stop`, that the UDP thread it runs on runs.
async fn note_running(tick: Arc<AtomicU64>, start: tokio::time::Instant, stop: drain::Signal) {
    loop {
        tick.store(millis_since(start), Ordering::Relaxed);
        tokio::select! {
            () = stop.stopped() => return,
            () = tokio::time::sleep(UDP_THREAD_TICK) => {}
        }
    }
}

fn millis_since(start: tokio::time::Instant) -> u64 {
    u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// Keeps the excluded trees excluded when they are made anew ([`Exclusions::refresh`]) until
/// `stop`: as soon as the kernel says a directory was made or removed above one
/// ([`TreesMade`]), and every [`WATCH_CGROUPS_EVERY`] besides (a directory above one made
/// since, the inotify watches used up).
async fn keep_excluded(mut exclusions: Exclusions, stop: drain::Signal) {
    let mut made = match TreesMade::new() {
        Ok(made) => Some(made),
        Err(err) => {
            let meanwhile = if exclusions.kernel_excludes_made() {
                "the kernel still excludes each as it is made"
            } else {
                "each is excluded when the agent next looks, within a second"
            };
            log::warn!(
                target: LOG,
                "cannot watch where excluded cgroups are made ({err}): {meanwhile}"
            );
            None
        }
    };
    let mut debt = LookDebt::new();
    let mut woken = false;
    let mut watch_failed_said = false;
    loop {
        let watches = made.as_ref().map(TreesMade::watches);
        // Off the runtime: stats and path lookups. The watches first, so that a tree made
        // meanwhile is seen by the refresh or wakes the next wait.
        let looked = tokio::task::spawn_blocking(move || {
            let cpu = || time_namespace::read_clock(libc::CLOCK_THREAD_CPUTIME_ID);
            let before = cpu();
            let failed =
                watches.and_then(|mut watches| TreesMade::watch(&mut watches, &exclusions));
            exclusions.refresh();
            // What it cost: CPU, not the time spent waiting for the cgroup filesystem's lock
            // or for a CPU on a loaded machine, which the pause after it would turn into a
            // wait for a service's cgroup made meanwhile. (Unreadable, a millisecond.)
            let cost = cpu()
                .zip(before)
                .map(|(after, before)| after.saturating_sub(before));
            (exclusions, failed, cost.unwrap_or(Duration::from_millis(1)))
        })
        .await;
        let Ok((kept, failed, cost)) = looked else {
            log::warn!(target: LOG, "keeping the excluded cgroups excluded stopped");
            return;
        };
        exclusions = kept;
        if let Some((dir, err)) = failed
            && !watch_failed_said
        {
            // Said once: it would be the same at every look.
            watch_failed_said = true;
            let meanwhile = if exclusions.kernel_excludes_made() {
                "the kernel still excludes one made there as it is made"
            } else {
                "one made there is excluded when the agent next looks, within a second, if it \
                 can look there"
            };
            log::warn!(
                target: LOG,
                "cannot watch {} for excluded cgroups made there ({err}): {meanwhile} (raise \
                 fs.inotify.max_user_watches if they are used up)",
                dir.display()
            );
        }
        if woken && let Some(pause) = debt.after_look(tokio::time::Instant::now(), cost) {
            tokio::select! {
                () = stop.stopped() => return,
                () = tokio::time::sleep(pause) => {}
            }
        }
        woken = false;
        tokio::select! {
            () = stop.stopped() => return,
            () = tokio::time::sleep(WATCH_CGROUPS_EVERY) => {}
            changed = until_changed(made.as_mut()) => match changed {
                Ok(()) => woken = true,
                Err(err) => {
                    log::warn!(
                        target: LOG,
                        "watching where excluded cgroups are made: {err}; each is excluded \
                         within a second of being made"
                    );
                    made = None;
                }
            },
        }
    }
}

/// The pause the looks woken by the kernel owe: [`EXCLUDED_LOOKS_COST_SHARE`] times the CPU of
/// each, less the time passed since; a look pauses for what is owed beyond
/// [`EXCLUDED_LOOKS_ALLOWANCE`].
struct LookDebt {
    owed: Duration,
    since: tokio::time::Instant,
}

impl LookDebt {
    fn new() -> Self {
        Self {
            owed: Duration::ZERO,
            since: tokio::time::Instant::now(),
        }
    }

    /// Adds the look that ended at `now` and took `cost` of CPU; the pause it must make.
    fn after_look(&mut self, now: tokio::time::Instant, cost: Duration) -> Option<Duration> {
        let paid = now.saturating_duration_since(self.since);
        self.owed = self.owed.saturating_sub(paid) + cost * EXCLUDED_LOOKS_COST_SHARE;
        self.since = now;
        Some(self.owed.saturating_sub(EXCLUDED_LOOKS_ALLOWANCE)).filter(|pause| !pause.is_zero())
    }
}

/// Until `made` says a directory was made or removed; never without it.
async fn until_changed(made: Option<&mut TreesMade>) -> std::io::Result<()> {
    match made {
        Some(made) => made.changed().await,
        None => std::future::pending().await,
    }
}

/// Every [`WATCH_CGROUPS_EVERY`] until `stop`: moves the agent back into its own cgroup if
/// something moved it out ([`cgroup::return_to`]), and says once, as an error and on `/readyz`, when
/// the redirected cgroup is gone or made anew (the programs stay on the old one, so nothing
/// in a new one is redirected until the agent restarts), or when the agent cannot go back.
async fn watch_cgroups(watched: Watched, readiness: Arc<Readiness>, stop: drain::Signal) {
    let Watched {
        target,
        links,
        agent,
        agent_mount,
        stranded,
        ..
    } = watched;
    let mut target_lost = false;
    let mut own_cgroup_said = false;
    let descriptors_log = RateLimited::counting(
        Duration::from_secs(60),
        "failures to keep the agent in its own cgroup",
    );
    loop {
        tokio::select! {
            () = stop.stopped() => return,
            () = tokio::time::sleep(WATCH_CGROUPS_EVERY) => {}
        }
        let (target_path, own_cgroup, mount) =
            (target.path.clone(), agent.clone(), agent_mount.clone());
        let held = Arc::clone(&links);
        let looked = tokio::task::spawn_blocking(move || {
            let own = cgroup::return_to(&own_cgroup, &mount);
            // Before the cgroup is looked at: a cgroup removed detaches its links too, and
            // one still there after they were read detached was not removed.
            let detached = held.detached();
            let now = Cgroup::open("--cgroup", &target_path).map(|cgroup| cgroup.id);
            (own, now, detached)
        })
        .await;
        let Ok((own, target_now, detached)) = looked else {
            log::warn!(target: LOG, "watching the cgroups named on the command line stopped");
            return;
        };
        if let Err(
            cgroup::CgroupError::Read { source, .. }
            | cgroup::CgroupError::EnterAgentCgroup { source, .. },
        ) = &own
            && is_out_of_descriptors(source)
        {
            // Out of file descriptors, /proc/self/cgroup could not be read, which says nothing
            // of where the agent is (it read as "out of its own cgroup" on /readyz, and as an
            // error every few seconds, during a flood of connections at a low `ulimit -n`;
            // helper-98), or the agent, moved out, could not open its cgroup to go back, which
            // it may do at a later look: not ready meanwhile, but not stopped for it.
            if matches!(own, Err(cgroup::CgroupError::EnterAgentCgroup { .. })) {
                readiness.set_outside_own_cgroup(true);
            }
            descriptors_log.warn(|times| {
                format!(
                    "cannot keep the agent in its own cgroup: {source} ({times} times); \
                     raise its limit of open files (LimitNOFILE=)"
                )
            });
        } else {
            readiness
                .set_outside_own_cgroup(matches!(own, Ok(cgroup::OwnCgroup::Lost(_)) | Err(_)));
            // Its marks keep its own programs off its sockets, but not another agent's (one
            // that takes over knows it by its cgroup alone): stopping switches the redirect
            // off at once, and its service manager starts it anew in a cgroup of its own.
            if matches!(
                own,
                Ok(cgroup::OwnCgroup::Lost(_)) | Err(cgroup::CgroupError::EnterAgentCgroup { .. })
            ) && !stranded.is_stopped()
            {
                log::error!(target: LOG, "out of its own cgroup, with no way back: stopping");
                stranded.stop();
            }
            say_where_the_agent_was(own, &agent, &mut own_cgroup_said);
        }
        let lost = target_now.as_ref().map_or(true, |id| *id != target.id);
        // Readiness first, then the log line that says why: whoever reads the line finds
        // `/readyz` already saying so.
        readiness.set_target_lost(lost);
        if !detached.is_empty() && !lost && !stranded.is_stopped() {
            // It dropped the capability to attach them again: its service manager starts it
            // anew, which does.
            log::error!(
                target: LOG,
                "programs of this agent were detached from {} by another process (links {detached:?}): \
                 new lookups go direct; stopping, to be started anew",
                target.path.display()
            );
            stranded.stop();
        }
        if lost && !target_lost {
            log::error!(
                target: LOG,
                "the redirected cgroup {} (id {}) is gone or was made anew: nothing in it is \
                 redirected now; restart the agent to redirect the new one",
                target.path.display(),
                target.id
            );
        }
        target_lost = lost;
        // Made anew (another cgroup at the path): a restarted agent attaches to it, so the
        // agent asks for one after a while. Merely gone (or renamed, which the programs
        // follow), a restart would fail at start, and leave no agent when the path comes back.
        readiness.set_target_made_anew(target_now.is_ok_and(|id| id != target.id));
    }
}

/// Gives the heap's free pages back to the system. A walk of a full table builds and drops
/// about 10 MB of maps and sets on a blocking thread, whose glibc arena kept them: an idle
/// agent's RSS went from 10.7 to 38.2 MB over its first walks (helper-98), which a memory
/// limit of 40 MiB did not hold.
fn give_back_free_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim takes no pointer and only releases memory no allocation holds.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Whether an error is the process's (or the system's) file descriptors running out.
fn is_out_of_descriptors(err: &std::io::Error) -> bool {
    matches!(err.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

/// Says where [`cgroup::return_to`] found the agent, if not in its own cgroup `agent`. Its
/// own programs know its sockets by their marks wherever it is, but another agent of the block
/// (one taking over) knows them by its cgroup alone, and would send them back to it. What
/// cannot be helped is said once (`said`) until the agent is back: it would be the same every
/// second.
fn say_where_the_agent_was(
    own: Result<cgroup::OwnCgroup, cgroup::CgroupError>,
    agent: &Cgroup,
    said: &mut bool,
) {
    match own {
        Ok(cgroup::OwnCgroup::In) => *said = false,
        Ok(cgroup::OwnCgroup::MovedBack(found)) => {
            *said = false;
            log::warn!(
                target: LOG,
                "the agent was moved out of its own cgroup {} (to {}): moved back (another \
                 agent taking over meanwhile would have sent its lookups back to it)",
                agent.path.display(),
                found.display()
            );
        }
        Ok(cgroup::OwnCgroup::Lost(_)) | Err(_) if *said => {}
        Ok(cgroup::OwnCgroup::Lost(found)) => {
            *said = true;
            log::error!(
                target: LOG,
                "the agent was moved out of its own cgroup {} (to {}), which is gone or was \
                 made anew since: it cannot go back, and an agent taking over from it would \
                 send its lookups back to it; stopping, to be started anew",
                agent.path.display(),
                found.display()
            );
        }
        Err(err) => {
            *said = true;
            log::error!(target: LOG, "cannot keep the agent in its own cgroup: {err}");
        }
    }
}

/// What the agent keeps as routes and addresses change: the source of redirected sockets,
/// and the blocks it routed here (whose routes the redirect needs), with the switch of the
/// redirect.
pub(super) struct Routing {
    pub sources: DirectSources,
    pub switch: RedirectSwitch,
    /// The blocks the agent serves, which must stay routed here.
    pub blocks: Vec<AddressBlock>,
    pub changes: RouteChanges,
    /// Fired when a block the agent routed itself has stayed unrouted for
    /// [`REROUTE_BY_RESTART_AFTER`]: it stops, and its service manager starts it anew, which
    /// routes it again.
    pub restart: drain::Signal,
}

/// How long a block the agent routed itself may stay unrouted, `lo` up, before the agent
/// stops to be started anew: it dropped the capability to route it again itself.
const REROUTE_BY_RESTART_AFTER: Duration = Duration::from_secs(30);

/// How often the source of redirected sockets is looked for again without a change of routes
/// or addresses: whether the block still hears it.
const SOURCE_RECHECK: Duration = Duration::from_secs(30);

/// After each change of routes or addresses (and once at the start, for a change between the
/// agent's first look and the start of the watch), for each server new to `servers`, and
/// every [`SOURCE_RECHECK`], until `stop`: writes the sources of redirected sockets anew
/// ([`DirectSources::find`]: a UDP `connect` toward the Internet and toward each server, and
/// a datagram from each source to the block), and
/// checks that every block is still routed here. One that is not (a program removed its
/// route, IPv6 was switched off and on, which flushes it, `lo` went down, or, for a block in
/// 127/8, `lo` lost its address) would send what the programs
/// redirect there to the default route, where no answer comes: the redirect to it is
/// switched off (that family's lookups go direct, fail-open) and the agent is not ready,
/// until the route is back. The agent cannot route it again itself: it dropped the
/// capability after start. So if a block it routed itself stays unrouted for
/// [`REROUTE_BY_RESTART_AFTER`] while `lo` is up, it stops with an error (`restart`), and its
/// service manager starts it anew, which routes the block again.
async fn keep_routing(
    mut routing: Routing,
    servers: Arc<ServerTable>,
    readiness: Arc<Readiness>,
    stop: drain::Signal,
) {
    let mut unrouted: Vec<AddressBlock> = Vec::new();
    // Since when a block the agent routed itself has been unrouted, `lo` up.
    let mut reroute_due: Option<tokio::time::Instant> = None;
    // What the last look found. A server new since is looked toward alone, and written alone:
    // a workload asking thousands of servers costs a `connect` each, not a look at every
    // server (and every block's route) at each new one (helper-165: 1 to 2.6 ms of CPU a new
    // server).
    let mut last: Option<FoundSources> = None;
    let mut only_new_servers = false;
    // The whole look is made again by then at the latest, whatever else wakes the loop.
    let mut next_whole_look = tokio::time::Instant::now();
    loop {
        let block = routing.sources.block();
        if std::mem::take(&mut only_new_servers)
            && let Some(mut found) = last.take()
        {
            let new = servers.take_new_servers4();
            let looked = tokio::task::spawn_blocking(move || {
                let more = DirectSources::find_more(block, &mut found, &new);
                (found, more)
            })
            .await;
            if let Ok((found, more)) = looked {
                routing.sources.write_more(&more);
                last = Some(found);
            }
        } else {
            drop(servers.take_new_servers4());
            let servers4 = servers.servers4();
            let looked =
                tokio::task::spawn_blocking(move || DirectSources::find(block, &servers4)).await;
            if let Ok(found) = looked {
                routing.sources.write(&found);
                last = Some(found);
            }
            next_whole_look = tokio::time::Instant::now() + SOURCE_RECHECK;
            check_the_blocks_routes(&mut routing, &readiness, &mut unrouted, &mut reroute_due)
                .await;
        }
        if !wait_for_a_change(
            &routing,
            &servers,
            &stop,
            next_whole_look,
            reroute_due,
            &mut only_new_servers,
        )
        .await
        {
            return;
        }
    }
}

/// Checks that every block is still routed here, and switches the redirect of those that
/// are not off (on again once they are), as [`keep_routing`] says.
async fn check_the_blocks_routes(
    routing: &mut Routing,
    readiness: &Readiness,
    unrouted: &mut Vec<AddressBlock>,
    reroute_due: &mut Option<tokio::time::Instant>,
) {
    let blocks = routing.blocks.clone();
    let checked = tokio::task::spawn_blocking(move || {
        // A question that fails (no reply) says nothing: the redirect is left as it is.
        let loopback_up = host::is_loopback_up().unwrap_or(true);
        let unrouted = blocks
            .into_iter()
            .filter(|block| !loopback_up || !host::is_block_routed_here(*block).unwrap_or(true))
            .collect::<Vec<_>>();
        (loopback_up, unrouted)
    })
    .await;
    if let Ok((loopback_up, now)) = checked {
        let routed_by_the_agent = now
            .iter()
            .any(|block| !block.first().to_canonical().is_loopback());
        *reroute_due = match (loopback_up && routed_by_the_agent, *reroute_due) {
            (true, None) => Some(tokio::time::Instant::now() + REROUTE_BY_RESTART_AFTER),
            (true, due) => due,
            (false, _) => None,
        };
        // Kept as it was if the switch could not be set, so that the next change tries
        // again.
        if now != *unrouted && switch_redirect(&mut routing.switch, &now, readiness) {
            *unrouted = now;
        }
    }
}

/// How long the loop of [`keep_routing`] waits after a server new to the agent, so that the
/// servers a burst of lookups brings are looked toward together.
const NEW_SERVERS_GATHERED_FOR: Duration = Duration::from_millis(100);

/// Waits, in [`keep_routing`], for a change of routes or addresses, a server new to the agent
/// (`only_new_servers` set), or `next_whole_look`; `false` once the loop is to end: at
/// `stop`, or when a block the agent routed has stayed unrouted until `reroute_due`.
async fn wait_for_a_change(
    routing: &Routing,
    servers: &ServerTable,
    stop: &drain::Signal,
    next_whole_look: tokio::time::Instant,
    reroute_due: Option<tokio::time::Instant>,
    only_new_servers: &mut bool,
) -> bool {
    let reroute = async {
        match reroute_due {
            Some(due) => tokio::time::sleep_until(due).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        () = stop.stopped() => false,
        () = routing.changes.next_change() => true,
        // A server new to the agent may be routed from another source.
        () = servers.servers4_grew() => {
            *only_new_servers = true;
            tokio::time::sleep(NEW_SERVERS_GATHERED_FOR).await;
            true
        }
        // A firewall rule that drops the source's datagrams to the block comes with no
        // change of routes (kube-proxy starting after the agent).
        () = tokio::time::sleep_until(next_whole_look) => true,
        () = reroute => {
            log::error!(
                target: LOG,
                "a block this agent routed has been unrouted for {}s, `lo` up, and the \
                 agent dropped the capability to route it again: stopping, to be started \
                 anew, which routes it",
                REROUTE_BY_RESTART_AFTER.as_secs()
            );
            routing.restart.stop();
            false
        }
    }
}

/// Switches the redirect to the blocks in `unrouted` off (the other family's stays on), and
/// on again once they are routed here, and says so; whether it could.
fn switch_redirect(
    switch: &mut RedirectSwitch,
    unrouted: &[AddressBlock],
    readiness: &Readiness,
) -> bool {
    if let Err(err) = switch.set(unrouted) {
        log::error!(target: LOG, "cannot switch the redirect: {err}");
        return false;
    }
    readiness.set_block_unrouted(!unrouted.is_empty());
    if unrouted.is_empty() {
        log::warn!(target: LOG, "the blocks are routed to this host again: redirecting");
    } else {
        let blocks: Vec<String> = unrouted.iter().map(ToString::to_string).collect();
        log::error!(
            target: LOG,
            "{} no longer routed to this host (its local route is gone, or `lo` is down): \
             redirecting nothing there, so new lookups of that family go direct, until it is \
             back (loopback's with `lo` and its address; a block's own route: the agent stops \
             to be started anew, and route it again, if it is not back within {}s)",
            blocks.join(" and "),
            REROUTE_BY_RESTART_AFTER.as_secs()
        );
    }
    true
}

/// Says this agent is alive, every [`HEARTBEAT_INTERVAL`] until `stop`, and logs once when a
/// newer agent has taken over. Clears the queue of the lock on the redirected cgroup. Pins
/// the table of servers again if its pins are gone, and is not ready while it cannot. Keeps
/// this agent's slot of `SERVING`: a lower one once it is free, one if it had none.
async fn keep_alive(
    agents: Arc<agents::Agents>,
    pins: Arc<host::Pins>,
    serving: Arc<Serving>,
    redirect_lock: Arc<RedirectLock>,
    readiness: Arc<Readiness>,
    stop: drain::Signal,
) {
    let mut replaced = false;
    let mut cannot_pin = false;
    let mut cannot_pin_links = Vec::new();
    let mut cannot_check = false;
    loop {
        tokio::select! {
            () = stop.stopped() => return,
            () = tokio::time::sleep(HEARTBEAT_INTERVAL) => {}
        }
        // Off the runtime: the map updates, binds and reads of the kernel's socket list block.
        let looked = tokio::task::spawn_blocking({
            let (agents, redirect_lock) = (Arc::clone(&agents), Arc::clone(&redirect_lock));
            let (pins, serving) = (Arc::clone(&pins), Arc::clone(&serving));
            move || {
                agents.heartbeat();
                redirect_lock.try_take();
                agents.refresh_replaced();
                let restored = pins.restore();
                // Where the table is pinned again, the links are too.
                let links = if restored.is_ok() {
                    pins.restore_links()
                } else {
                    Vec::new()
                };
                // A newer agent's pins, left by one that stopped or died before this one:
                // this one's, whose refusals run from its own last heartbeat, take their place.
                let taken_back = if !agents.another_steers_on_port() && !agents.newer_one_starting()
                {
                    pins.take_back_links()
                } else {
                    Vec::new()
                };
                (restored, links, serving.put_back(), taken_back)
            }
        })
        .await;
        let Ok((restored, links, put_back, taken_back)) = looked else {
            log::warn!(target: LOG, "the heartbeat stopped");
            return;
        };
        if !replaced && agents.replaced() {
            replaced = true;
            log::info!(
                target: LOG,
                "a newer agent has taken over: new lookups go to it; this one answers what \
                 reaches it until it is stopped (/readyz now says 503)"
            );
        }
        // Out of open files, the pins could not be looked at: nothing is known to be wrong
        // with them (helper-186: "the next agent would start with an empty one" was said of
        // a table pinned all along). Said once until a look works again.
        if let Err(err @ host::HostError::OutOfFiles { .. }) = &restored {
            if !cannot_check {
                log::warn!(target: LOG, "{err}");
            }
            cannot_check = true;
            continue;
        }
        cannot_check = false;
        let pinned = restored.is_ok();
        // As for the cgroup above: readiness before the lines that say why.
        readiness.set_unpinned(!pinned);
        match restored {
            Ok(names) if !names.is_empty() => log::warn!(
                target: LOG,
                "the pins of {} were gone ({}): pinned again, so that the next agent decodes \
                 the addresses sockets were sent to as this one does; to start a table anew, \
                 remove it while no agent runs",
                pins.dir().display(),
                names.join(", ")
            ),
            Ok(_) => {}
            // Said once until it works again: it would be the same every heartbeat.
            Err(err) if !cannot_pin => {
                log::error!(
                    target: LOG,
                    "cannot keep the table of servers pinned: {err}; the next agent would \
                     start with an empty one, and sockets sent to the block before would fail \
                     (/readyz says 503 until the pins are back)"
                );
            }
            Err(_) => {}
        }
        if pinned && cannot_pin {
            log::info!(target: LOG, "the table of servers is pinned again");
        }
        cannot_pin = !pinned;
        for (kind, restored) in &links {
            let program = kind.program;
            match restored {
                Ok(true) => log::warn!(
                    target: LOG,
                    "{program}'s pin in {} was missing: pinned, so that it stays attached when \
                     the agent stops",
                    pins.dir().display()
                ),
                // Said once until it works again (tried again every heartbeat).
                Err(err) if !cannot_pin_links.contains(&program) => log::warn!(
                    target: LOG,
                    "cannot keep {program} pinned in {}: {err}; it stays attached while the \
                     agent runs, and unless its pin is back by the stop, {} once it stops",
                    pins.dir().display(),
                    kind.without
                ),
                _ => {}
            }
        }
        cannot_pin_links = links
            .iter()
            .filter(|(_, restored)| restored.is_err())
            .map(|(kind, _)| kind.program)
            .collect();
        for program in taken_back {
            log::info!(
                target: LOG,
                "pinned {program} in {} in place of the link of an agent that serves no more",
                pins.dir().display()
            );
        }
        for port in put_back {
            log::info!(
                target: LOG,
                "took a slot of SERVING for port {port} of the block (none was free, or its \
                 entry was gone): the egress guard of any agent of this table now knows this \
                 one serves"
            );
        }
    }
}

/// Takes the lock on the redirected cgroup, if this agent does not hold it, as soon as it is
/// free: within 50 ms of the agent this one took over from letting go of it (in that moment a
/// second agent could take it), within a second of a process that is not an agent.
async fn take_lock_when_free(redirect_lock: Arc<RedirectLock>, stop: drain::Signal) {
    while let Some(wait) = redirect_lock.next_look() {
        tokio::select! {
            () = stop.stopped() => return,
            () = tokio::time::sleep(wait) => {}
        }
        let taken = tokio::task::spawn_blocking({
            let redirect_lock = Arc::clone(&redirect_lock);
            move || redirect_lock.try_take()
        })
        .await;
        if taken.is_err() {
            return;
        }
    }
}

/// How often the table of servers is checked for origins of cgroups that are gone.
const FORGET_DEPARTED_EVERY: Duration = Duration::from_secs(60);
/// Walks of the cgroup tree a cgroup must be missing from before its origins are forgotten:
/// one made while a walk passes is in the next.
const WALKS_MISSING: u8 = 3;
/// How long an origin of a cgroup that is gone must have carried no query to be forgotten.
const QUIET_BEFORE_FORGETTING: Duration = Duration::from_secs(600);

/// The variable that shortens [`forget_departed`]'s wait, for the integration tests.
pub const FORGET_DEPARTED_TEST_SETTING: &str = "DNS_PROXY_TEST_FORGET_DEPARTED";

/// Forgets, every [`FORGET_DEPARTED_EVERY`] until `stop`, the origins of cgroups that are gone
/// ([`ServerTable::forget_departed`]): pods come and go, and each asks through origins of its
/// own. `DNS_PROXY_TEST_FORGET_DEPARTED=SECONDS` (for the integration tests only) checks that
/// often and forgets what was quiet for twice that.
async fn forget_departed(
    servers: Arc<ServerTable>,
    stats: Arc<Stats>,
    workload_stats: Option<Arc<WorkloadStats>>,
    root: PathBuf,
    stop: drain::Signal,
) {
    // At least a second: 0 would walk the tree without a pause.
    let test_seconds = std::env::var(FORGET_DEPARTED_TEST_SETTING)
        .ok()
        .and_then(|seconds| seconds.parse::<u64>().ok())
        .filter(|&seconds| seconds > 0);
    let (every, quiet) = match test_seconds {
        Some(seconds) => {
            log::warn!(
                target: LOG,
                "{FORGET_DEPARTED_TEST_SETTING} is set, a setting for tests: departed cgroups' \
                 origins are forgotten {}s after their last query instead of {}s",
                2 * seconds,
                QUIET_BEFORE_FORGETTING.as_secs()
            );
            (
                Duration::from_secs(seconds),
                Duration::from_secs(2 * seconds),
            )
        }
        None => (FORGET_DEPARTED_EVERY, QUIET_BEFORE_FORGETTING),
    };
    let mut missing: std::collections::HashMap<u64, u8> = std::collections::HashMap::new();
    loop {
        tokio::select! {
            () = stop.stopped() => return,
            () = tokio::time::sleep(every) => {}
        }
        let (servers, root) = (Arc::clone(&servers), root.clone());
        let workload_stats = workload_stats.clone();
        let walked = tokio::task::spawn_blocking(move || {
            let live = workload::CgroupPaths::new(root).live_ids();
            let live = match live {
                Ok(live) => live,
                Err(err) => {
                    log::debug!(target: LOG, "walking the cgroup tree: {err}");
                    return (missing, None);
                }
            };
            let mut named = servers.cgroups();
            if let Some(stats) = &workload_stats {
                named.extend(stats.cgroups());
            }
            missing.retain(|id, _| named.contains(id));
            for id in named {
                if live.contains(&id) {
                    missing.remove(&id);
                } else {
                    *missing.entry(id).or_default() += 1;
                }
            }
            let gone = |id| {
                missing
                    .get(&id)
                    .is_some_and(|walks| *walks >= WALKS_MISSING)
            };
            if let Some(stats) = &workload_stats {
                stats.forget(gone);
            }
            let result = servers.forget_departed(gone, quiet);
            give_back_free_heap();
            (missing, Some(result))
        })
        .await;
        match walked {
            Ok((still_missing, result)) => {
                missing = still_missing;
                if let Some(result) = result {
                    stats
                        .server_table_entries
                        .store(result.occupied as u64, Ordering::Relaxed);
                    if result.forgotten > 0 {
                        log::info!(
                            target: LOG,
                            "forgot {} origins of cgroups that are gone, shared ones no pair \
                             uses, or indexes of a lost table no socket holds now ({} in the \
                             table); their indexes are held for {} more checks, then freed",
                            result.forgotten,
                            result.kept,
                            FORGOTTEN_HELD_FOR
                        );
                    }
                    if result.freed > 0 {
                        log::info!(
                            target: LOG,
                            "freed {} indexes forgotten before, for new origins",
                            result.freed
                        );
                    }
                }
            }
            Err(err) => {
                log::warn!(target: LOG, "forgetting the origins of cgroups that are gone: {err}");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn looks_pause_only_beyond_a_burst_and_look_a_twentieth_of_the_time_at_most() {
        let mut debt = LookDebt::new();
        let mut now = tokio::time::Instant::now();
        let cost = Duration::from_micros(150);
        // A burst: 30 looks back to back, each at once.
        for _ in 0..30 {
            now += cost;
            assert_eq!(debt.after_look(now, cost), None);
        }
        // Changes without pause, for good: the agent looks a twentieth of the time at most
        // (but for the allowance, owed once).
        let start = now;
        let looks = 10_000;
        for _ in 0..looks {
            now += cost;
            if let Some(pause) = debt.after_look(now, cost) {
                now += pause;
            }
        }
        let looking = cost * looks;
        assert!(
            looking * 20 <= now - start + EXCLUDED_LOOKS_ALLOWANCE,
            "{looking:?} looking in {:?}",
            now - start
        );
        // A while later, a burst is looked at at once again.
        now += EXCLUDED_LOOKS_ALLOWANCE * 2;
        assert_eq!(debt.after_look(now, cost), None);
    }
}
