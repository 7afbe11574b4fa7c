//! The running agents of one block, as every one of them sees them: two pinned maps beside
//! the table of servers, so that an agent taking over from another (`run --takeover`) and the
//! one it replaces work side by side.
//!
//! - `AGENT_CGROUPS` (cgroup id, read by the programs): no agent's programs redirect any
//!   agent's own queries. Without it the old agent's programs would send the new agent's
//!   upstream queries back to a proxy, and round again.
//! - `AGENTS` (start stamp -> cgroup and heartbeat, read by the agents): which agent is the
//!   newest alive, so that a replaced agent stops answering `/readyz` with 200 (a DaemonSet's
//!   surge pod must not be reported ready by the agent it replaces), and which
//!   `AGENT_CGROUPS` entries belong to no agent alive (a killed agent cannot remove its own).
//!
//! Only agents that can open the pinned maps (root, in a `0700` state directory) write them.
//!
//! A heartbeat says an agent is alive for 30 s after it was killed, and says nothing of where
//! it runs. So each agent also holds a name in its network namespace while it runs (an
//! abstract unix socket, `dns-proxy/agent/<start stamp>`, which the kernel frees however the
//! agent exits): an agent that is gone, or runs in another namespace (where it replaces no
//! one: `sk_lookup` steers within one namespace), is not taken for one that replaced this
//! one, or that this one takes over from. Agents of versions before it, whose records do not
//! say they hold a name, are judged by their heartbeat alone.
use std::{collections::HashSet, sync::Mutex, time::Duration};

use aya::maps::{HashMap, MapData};
use dns_proxy_common::{
    AGENT_FILLS_SERVING, AGENT_NAMED, AGENT_STEERING, AGENT_TELLS_STEERING, AgentCgroup,
    AgentRecord, MAX_AGENTS, names,
};
use socket2::Socket;

use crate::local_names;

/// How often an agent says it is alive.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(2);
/// An agent silent this long is gone: killed, or stopped without cleaning up.
const STALE_AFTER: Duration = Duration::from_secs(30);
/// An agent silent this long whose name no one holds in this namespace is gone sooner: an
/// agent that runs says it is alive every [`HEARTBEAT_INTERVAL`], wherever it runs, and a
/// killed one's name is freed by the kernel. Without it, agents killed in a tight loop (a
/// crash loop) filled `AGENTS` (64 records) within 30 s, and the next start failed.
const GONE_IF_UNNAMED_AFTER: Duration = Duration::from_secs(6);

#[derive(Debug, thiserror::Error)]
#[error("eBPF map {map}: {source}{}", hint(source))]
pub struct AgentsError {
    map: &'static str,
    source: Box<aya::maps::MapError>,
}

/// This agent's entry among the running agents; dropping it removes the entry.
pub struct Agents {
    cgroups: Mutex<HashMap<MapData, u64, AgentCgroup>>,
    records: Mutex<HashMap<MapData, u64, AgentRecord>>,
    /// This agent's start stamp (`CLOCK_BOOTTIME`): the newest agent has the largest.
    stamp: u64,
    cgroup_id: u64,
    /// The port it serves: only an agent on the same port replaces it.
    port: u16,
    /// Held while this agent runs; `None` if it could not be bound (then its record says so).
    name: Option<Socket>,
    /// What [`refresh_replaced`](Self::refresh_replaced) last found: read by `/readyz`, which
    /// must not wait on the kernel's socket list on the main runtime.
    newer_alive: std::sync::atomic::AtomicBool,
    /// Whether this agent's `sk_lookup` steers the block to listeners that serve.
    steering: std::sync::atomic::AtomicBool,
}

impl Agents {
    /// Removes the entries of agents that are gone, and adds this one's: it runs in cgroup
    /// `cgroup_id` and serves `port`.
    pub fn register(
        mut cgroups: HashMap<MapData, u64, AgentCgroup>,
        mut records: HashMap<MapData, u64, AgentRecord>,
        cgroup_id: u64,
        port: u16,
    ) -> Result<Self, AgentsError> {
        let stamp = boottime_ns();
        // Read in this order, and registered in the opposite one (record, then cgroup): an
        // agent registering meanwhile either has its record read here or its cgroup was not.
        let listed: Vec<u64> = cgroups.keys().filter_map(Result::ok).collect();
        let mut alive = HashSet::from([cgroup_id]);
        let mut gone = Vec::new();
        for (agent, record) in records.iter().filter_map(Result::ok) {
            if is_stale(&record, stamp) || is_gone_by_its_name(agent, &record, stamp) {
                gone.push(agent);
            } else {
                alive.insert(record.cgroup_id);
            }
        }
        for agent in gone {
            let _ = records.remove(&agent);
        }
        for cgroup in listed.into_iter().filter(|cgroup| !alive.contains(cgroup)) {
            log::debug!("forgetting the cgroup of an agent that is gone (id {cgroup})");
            let _ = cgroups.remove(&cgroup);
        }
        let name = match local_names::hold(&agent_name(stamp)) {
            Ok(name) => Some(name),
            Err(err) => {
                log::warn!(
                    "cannot hold this agent's name ({err}): others judge it by its heartbeat"
                );
                None
            }
        };
        let record = AgentRecord {
            cgroup_id,
            heartbeat_ns: stamp,
            port,
            flags: record_flags(name.is_some(), false),
            _padding: [0; 5],
        };
        records
            .insert(stamp, record, 0)
            .map_err(|source| map_error(names::AGENTS, source))?;
        cgroups
            .insert(cgroup_id, cgroup_id, 0)
            .map_err(|source| map_error(names::AGENT_CGROUPS, source))?;
        Ok(Self {
            cgroups: Mutex::new(cgroups),
            records: Mutex::new(records),
            stamp,
            cgroup_id,
            port,
            name,
            newer_alive: std::sync::atomic::AtomicBool::new(false),
            steering: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Says this agent is alive. Also puts its cgroup back, should another agent starting at
    /// the same moment have taken it for a dead one's.
    pub fn heartbeat(&self) {
        // The flag is read under the lock: a heartbeat that read it before a change must not
        // write it after the change was written.
        let mut records = lock(&self.records);
        let record = AgentRecord {
            cgroup_id: self.cgroup_id,
            heartbeat_ns: boottime_ns(),
            port: self.port,
            flags: record_flags(
                self.name.is_some(),
                self.steering.load(std::sync::atomic::Ordering::Relaxed),
            ),
            _padding: [0; 5],
        };
        if let Err(err) = records.insert(self.stamp, record, 0) {
            log::warn!("cannot update this agent's heartbeat: {err}");
        }
        drop(records);
        if let Err(err) = lock(&self.cgroups).insert(self.cgroup_id, self.cgroup_id, 0) {
            log::warn!("cannot keep this agent's cgroup excluded: {err}");
        }
    }

    /// Says, in this agent's record, whether its `sk_lookup` steers the block to listeners
    /// that serve new lookups: an agent stopping while this one takes over waits for it, and
    /// one that stops lets go of the block only to an agent that says so.
    pub fn set_steering(&self, steering: bool) {
        self.steering
            .store(steering, std::sync::atomic::Ordering::Relaxed);
        self.heartbeat();
    }

    /// Whether another agent on this port is alive (one this agent takes over from, or that
    /// took over from it). Blocks, as [`refresh_replaced`](Self::refresh_replaced) does.
    pub fn others_on_port(&self) -> bool {
        self.any_alive_on_port(|stamp, _| stamp != self.stamp)
    }

    /// Whether another agent on this port is alive and steers the block (or is of a version
    /// whose record does not say, and is taken to). Blocks, as
    /// [`refresh_replaced`](Self::refresh_replaced) does.
    pub fn another_steers_on_port(&self) -> bool {
        self.any_alive_on_port(|stamp, record| {
            stamp != self.stamp
                && (record.flags & AGENT_TELLS_STEERING == 0 || record.flags & AGENT_STEERING != 0)
        })
    }

    /// Whether an agent that started after this one, on this port, is alive and says it does
    /// not steer the block yet: one taking over, still starting. Blocks, as
    /// [`refresh_replaced`](Self::refresh_replaced) does.
    pub fn newer_one_starting(&self) -> bool {
        self.any_alive_on_port(|stamp, record| {
            stamp > self.stamp
                && record.flags & AGENT_TELLS_STEERING != 0
                && record.flags & AGENT_STEERING == 0
        })
    }

    /// Whether an agent that started after this one, on the same port, was alive at the last
    /// [`refresh_replaced`](Self::refresh_replaced): it took over.
    pub fn replaced(&self) -> bool {
        self.newer_alive.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Looks whether an agent that started after this one, on the same port, is alive. Blocks
    /// (binds and reads the kernel's socket list): call it off the async runtimes.
    pub fn refresh_replaced(&self) {
        let newer_alive = self.any_alive_on_port(|stamp, _| stamp > self.stamp);
        self.newer_alive
            .store(newer_alive, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether an agent whose start stamp and record `wanted` accepts is alive on this one's
    /// port.
    fn any_alive_on_port(&self, wanted: impl Fn(u64, &AgentRecord) -> bool) -> bool {
        let now = boottime_ns();
        let candidates: Vec<(u64, AgentRecord)> = lock(&self.records)
            .iter()
            .filter_map(Result::ok)
            .filter(|(stamp, record)| {
                wanted(*stamp, record) && record.port == self.port && !is_stale(record, now)
            })
            .collect();
        candidates.iter().any(|(stamp, record)| {
            if record.flags & AGENT_NAMED == 0 {
                return true; // an agent of a version before names: its heartbeat says
            }
            // Held by an agent where this one can see it: it runs, in this namespace. A look
            // that fails leaves the heartbeat to say.
            local_names::owner(&agent_name(*stamp))
                .map_or(true, |owner| owner.is_some_and(local_names::is_trusted))
        })
    }
}

/// An agent record's flags: every record says whether its agent steers the block.
fn record_flags(named: bool, steering: bool) -> u8 {
    let named = if named { AGENT_NAMED } else { 0 };
    let steering = if steering { AGENT_STEERING } else { 0 };
    named | AGENT_TELLS_STEERING | AGENT_FILLS_SERVING | steering
}

fn agent_name(stamp: u64) -> String {
    format!("dns-proxy/agent/{stamp}")
}

impl Drop for Agents {
    /// Only the record goes: the cgroup may hold an agent that took over (host mode shares
    /// one), and a cgroup id is never reused, so the next agent to start removes it safely.
    fn drop(&mut self) {
        let _ = lock(&self.records).remove(&self.stamp);
    }
}

fn is_stale(record: &AgentRecord, now_ns: u64) -> bool {
    now_ns.saturating_sub(record.heartbeat_ns) > STALE_AFTER.as_nanos() as u64
}

/// Whether the agent of `record` (started at `stamp`) is gone by its name: it held one, no
/// one holds it in this namespace now, and it has been silent for [`GONE_IF_UNNAMED_AFTER`]
/// (three heartbeats: an agent of another namespace, whose name is not seen here, still says
/// it is alive meanwhile). A look that fails says nothing.
fn is_gone_by_its_name(stamp: u64, record: &AgentRecord, now_ns: u64) -> bool {
    record.flags & AGENT_NAMED != 0
        && now_ns.saturating_sub(record.heartbeat_ns) > GONE_IF_UNNAMED_AFTER.as_nanos() as u64
        && matches!(local_names::owner(&agent_name(stamp)), Ok(None))
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The OS error under a map error (aya's message names the syscall alone), and what a full
/// table means.
fn hint(err: &aya::maps::MapError) -> String {
    match crate::ebpf::os_error(err) {
        Some(os) if os.raw_os_error() == Some(libc::E2BIG) => format!(
            " ({os}: the table of running agents is full, {MAX_AGENTS} records; an agent's \
             record goes once it has been silent for 30 s, or for 6 s once its name is free)"
        ),
        Some(os) => format!(" ({os})"),
        None => String::new(),
    }
}

fn map_error(map: &'static str, source: aya::maps::MapError) -> AgentsError {
    AgentsError {
        map,
        source: Box::new(source),
    }
}

/// The kernel's `CLOCK_BOOTTIME` in nanoseconds: the same clock for every process on the
/// host, whatever its time namespace, counting through suspend, and the pinned maps do not
/// outlive a boot.
fn boottime_ns() -> u64 {
    crate::time_namespace::kernel_boottime_ns()
}
