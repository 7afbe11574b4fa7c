//! The kernel's table of servers as the daemon sees it: which origin each block address
//! names, when each index last carried a query, forgetting the origins of cgroups that are
//! gone (never one a socket is still connected to), and the kernel's refusal of an index
//! whose server's port was found closed.
use std::{
    error::Error as _,
    net::{IpAddr, SocketAddr},
};

use aya::{
    Ebpf,
    maps::{HashMap, MapData},
};
use dns_proxy_common::{AF_INET, AF_INET6, Origin, names, server_key};

use super::{Block, EbpfError, take_array, take_map};
use crate::time_namespace::read_clock;

/// The kernel's table of servers (`SERVERS`), and the blocks whose addresses index it.
pub struct ServerTable {
    /// `SERVERS`: read once per index by each listener ([`CachedServers`]).
    map: std::sync::Mutex<HashMap<MapData, u32, Origin>>,
    /// `SERVER_INDEX`, written only to forget origins of cgroups that are gone.
    reverse: std::sync::Mutex<HashMap<MapData, Origin, u32>>,
    block4: Block,
    block6: Option<Block>,
    /// When a query last came through each index (seconds since `started`; 0: not since this
    /// agent started), by [`server_key`].
    last_seen: Box<[std::sync::atomic::AtomicU32]>,
    started: u64,
    /// Bumped each time origins are forgotten: what a listener read of the table before is
    /// then stale (a forgotten index may name another origin now).
    generation: std::sync::atomic::AtomicU64,
    /// The table at the last check: an index gone or changed since was forgotten by another
    /// agent sharing the table (during a takeover), which bumps `generation` here too.
    last_seen_table: std::sync::Mutex<std::collections::HashMap<u32, Origin>>,
    /// Forgotten indexes still held ([`FORGOTTEN`]): the origin each named (if this agent
    /// forgot it) and how many checks have seen it so.
    held_forgotten: std::sync::Mutex<std::collections::HashMap<u32, (Option<Origin>, u8)>>,
    /// `REFUSING`: until when `sk_lookup` refuses UDP datagrams to each index.
    refusing: std::sync::Mutex<aya::maps::Array<MapData, u64>>,
    /// With the cache on, until when (`CLOCK_MONOTONIC` ns; 0: never) the agent itself
    /// refuses the queries to each index that the cache cannot answer, by [`server_key`]:
    /// made at the first such refusal, so that an agent that never refuses holds nothing.
    refused_here: std::sync::OnceLock<Box<[std::sync::atomic::AtomicU64]>>,
    /// `CONNECTED`: socket cookie → the server key of the index it is connected to.
    connected: std::sync::Mutex<HashMap<MapData, u64, u32>>,
    /// `CONNECTED_PER_CGROUP`: cgroup id → notes of `CONNECTED` charged to it; only read
    /// here, entries at 0 removed, and lowered by the charges whose note is gone.
    connected_counts: std::sync::Mutex<HashMap<MapData, u64, u64>>,
    /// `CONNECTED_CHARGE`: socket cookie → the cgroup its note is charged to; here only the
    /// charges whose note is gone are removed ([`ServerTable::release_orphaned_charges`]).
    connected_charges: std::sync::Mutex<HashMap<MapData, u64, u64>>,
    /// `CGROUP_ORIGINS`: cgroup id → slots the programs charged it; only read here, and
    /// entries of cgroups that are gone removed.
    shares: std::sync::Mutex<HashMap<MapData, u64, u64>>,
    /// `CGROUP_ADJUST`: cgroup id → what the walk adds to its `CGROUP_ORIGINS`.
    corrections: std::sync::Mutex<HashMap<MapData, u64, i64>>,
    /// The shared origins the last walk found unused: forgotten if this one does too.
    unused_shared: std::sync::Mutex<std::collections::HashSet<(u32, Origin)>>,
    /// The IPv4 servers in the table at start and read from it since, for the source each
    /// is sent from ([`super::DirectSources`]); `servers4_grew` is told of each new one.
    servers4: std::sync::Mutex<std::collections::BTreeSet<std::net::Ipv4Addr>>,
    /// Those noted since [`take_new_servers4`](Self::take_new_servers4) last took them.
    new_servers4: std::sync::Mutex<Vec<std::net::Ipv4Addr>>,
    servers4_grew: tokio::sync::Notify,
}

/// The most IPv4 servers [`ServerTable::servers4`] keeps: as many as the table has indexes
/// for. It keeps those the table names at each walk, so no workload can fill it for good and
/// push out the servers the host asks.
const MAX_SERVERS4_NOTED: usize = dns_proxy_common::MAX_INDEX as usize + 1;

/// How long UDP datagrams to an index whose server's port was found closed are refused by the
/// kernel: long enough that a client's next lookups read the error itself, short enough that
/// a server back on its port is asked again soon.
const REFUSE_CLOSED_SERVER_FOR: std::time::Duration = std::time::Duration::from_secs(2);

/// Until when (`CLOCK_MONOTONIC` ns) a refusal made now lasts: the kernel's and the agent's.
fn refused_until() -> u64 {
    let for_ns = u64::try_from(REFUSE_CLOSED_SERVER_FOR.as_nanos()).unwrap_or(u64::MAX);
    crate::time_namespace::kernel_monotonic_ns().saturating_add(for_ns)
}

/// The cgroup id a forgotten origin is rewritten with: its index stays taken (the kernel
/// gives new origins only free slots) and names no origin to the listeners, until each has
/// dropped what it read of the table. Freed then: [`FORGOTTEN_HELD_FOR`].
const FORGOTTEN: u64 = u64::MAX;

/// The `bpf()` update flags that add an element only if it is not there, and change one only
/// if it is (uapi `bpf.h`).
const BPF_NOEXIST: u64 = 1;
const BPF_EXIST: u64 = 2;

/// How many checks a forgotten index is held for before it is freed: the listeners drop what
/// they read at their next query, and an agent sharing the table (during a takeover), which
/// checks as often, sees it forgotten at its next check.
pub const FORGOTTEN_HELD_FOR: u8 = 2;

/// What [`ServerTable::forget_departed`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Forgotten {
    /// Origins forgotten now: of cgroups that are gone, or shared ones no pair uses any more.
    pub forgotten: usize,
    /// Indexes forgotten at earlier checks, freed now for new origins.
    pub freed: usize,
    /// Origins in the table after.
    pub kept: usize,
    /// Entries that take a slot after: the origins, and the indexes forgotten but not yet
    /// freed.
    pub occupied: usize,
}

impl ServerTable {
    /// The table's maps, taken from the loaded object, for the blocks the agent serves.
    pub(super) fn take(
        ebpf: &mut Ebpf,
        block4: Block,
        block6: Option<Block>,
    ) -> Result<Self, EbpfError> {
        let table = Self {
            map: std::sync::Mutex::new(take_map(ebpf, names::SERVERS)?),
            reverse: std::sync::Mutex::new(take_map(ebpf, names::SERVER_INDEX)?),
            block4,
            block6,
            last_seen: (0..2 * (dns_proxy_common::MAX_INDEX as usize + 1))
                .map(|_| std::sync::atomic::AtomicU32::new(0))
                .collect(),
            started: coarse_seconds(),
            generation: std::sync::atomic::AtomicU64::new(0),
            last_seen_table: std::sync::Mutex::default(),
            held_forgotten: std::sync::Mutex::default(),
            refusing: std::sync::Mutex::new(take_array(ebpf, names::REFUSING)?),
            refused_here: std::sync::OnceLock::new(),
            connected: std::sync::Mutex::new(take_map(ebpf, names::CONNECTED)?),
            connected_counts: std::sync::Mutex::new(take_map(ebpf, names::CONNECTED_PER_CGROUP)?),
            connected_charges: std::sync::Mutex::new(take_map(ebpf, names::CONNECTED_CHARGE)?),
            shares: std::sync::Mutex::new(take_map(ebpf, names::CGROUP_ORIGINS)?),
            corrections: std::sync::Mutex::new(take_map(ebpf, names::CGROUP_ADJUST)?),
            unused_shared: std::sync::Mutex::default(),
            servers4: std::sync::Mutex::default(),
            new_servers4: std::sync::Mutex::default(),
            servers4_grew: tokio::sync::Notify::new(),
        };
        let counts = table.read_counts();
        let entries: Vec<(u32, Origin)> = table.table().iter().filter_map(Result::ok).collect();
        table.settle_charges(&counts, &entries);
        for (_, origin) in &entries {
            if origin.cgroup_id != FORGOTTEN
                && let Some(server) = origin.server.to_socket_addr()
            {
                table.note_server(server);
            }
        }
        Ok(table)
    }

    /// Settles what each cgroup is charged against the table, at start, before the programs
    /// are attached, and at each walk. What the programs see is the count they keep
    /// (`CGROUP_ORIGINS`, only ever added to) plus the agent's correction (`CGROUP_ADJUST`,
    /// written here alone), so that no count a program adds is overwritten (an overwrite lost
    /// the charges of pairs taken meanwhile, and a workload bursting at a walk went past its
    /// share by hundreds: helper-115). The sum is:
    /// - Raised to at least the pairs the cgroup holds. Pairs that an agent from before shares
    ///   took are charged to no one: every pair after an upgrade, those taken while such an
    ///   agent ran again (a downgrade and upgrade gave a cgroup twice its share: helper-112),
    ///   and those its programs take while it runs beside this one, during a takeover from it
    ///   (a workload took 40 pairs with a share of 15: helper-113).
    /// - Lowered to at most its pairs and the shared origins no pair asks through. A cgroup is
    ///   charged, beside its pairs, only for shared origins it made alone when its pair found
    ///   no room; once those are forgotten the charge would outlive them, and a long-lived
    ///   workload in a crowded table would lose its share for good (helper-114).
    ///
    /// `before` are the counts ([`read_counts`](Self::read_counts)) read before the table was
    /// read as `entries`; the counts are read again after it. Lowering is decided on the
    /// first, raising on the second: a pair taken meanwhile is then counted in what each
    /// decision compares, and the correction is computed from a count no larger than the
    /// programs' now, so the sum is never set below what it should be.
    fn settle_charges(
        &self,
        before: &std::collections::HashMap<u64, i64>,
        entries: &[(u32, Origin)],
    ) {
        let mut corrections = self.corrections();
        let corrected: std::collections::HashMap<u64, i64> =
            corrections.iter().filter_map(Result::ok).collect();
        let after = self.read_counts();
        let mut pairs: std::collections::HashMap<u64, i64> = std::collections::HashMap::new();
        for (_, origin) in entries {
            if origin.cgroup_id != 0 && origin.cgroup_id != FORGOTTEN {
                *pairs.entry(origin.cgroup_id).or_default() += 1;
            }
        }
        let asked: std::collections::HashSet<dns_proxy_common::Endpoint> = entries
            .iter()
            .filter(|(_, origin)| origin.cgroup_id != 0 && origin.cgroup_id != FORGOTTEN)
            .map(|(_, origin)| origin.server)
            .collect();
        let made_alone = entries
            .iter()
            .filter(|(_, origin)| origin.cgroup_id == 0 && !asked.contains(&origin.server))
            .count() as i64;
        let cgroups: std::collections::HashSet<u64> = after
            .keys()
            .chain(corrected.keys())
            .chain(pairs.keys())
            .copied()
            .collect();
        let (mut raised, mut lowered) = (0, 0);
        for cgroup_id in cgroups {
            let correction = corrected.get(&cgroup_id).copied().unwrap_or(0);
            let held = pairs.get(&cgroup_id).copied().unwrap_or(0);
            let count_after = after.get(&cgroup_id).copied().unwrap_or(0);
            let count_before = before.get(&cgroup_id).copied().unwrap_or(0);
            let settled = if count_after.saturating_add(correction) < held {
                raised += 1;
                held - count_after
            } else if count_before.saturating_add(correction) > held + made_alone {
                lowered += 1;
                held + made_alone - count_before
            } else {
                continue;
            };
            if let Err(err) = corrections.insert(cgroup_id, settled, 0) {
                log::warn!(
                    "cannot correct the charge of cgroup {cgroup_id} by {settled} slots ({}): \
                     {err}",
                    names::CGROUP_ADJUST
                );
            }
        }
        if raised > 0 {
            log::info!(
                "charged {raised} cgroups the slots they hold in the table of servers, taken \
                 by an agent that did not count them ({})",
                names::CGROUP_ADJUST
            );
        }
        if lowered > 0 {
            log::info!(
                "lowered {lowered} cgroups' charges to the slots they may still hold in the \
                 table of servers: their pairs, and the shared origins no pair asks through \
                 ({made_alone} of them) ({})",
                names::CGROUP_ADJUST
            );
        }
    }

    /// The programs' counts (`CGROUP_ORIGINS`), by cgroup id.
    fn read_counts(&self) -> std::collections::HashMap<u64, i64> {
        self.shares()
            .iter()
            .filter_map(Result::ok)
            .map(|(cgroup_id, count)| (cgroup_id, i64::try_from(count).unwrap_or(i64::MAX)))
            .collect()
    }

    /// The family and index that `reached` (where a redirected client's packet arrived)
    /// encodes, if it is one of the proxy's block addresses on its port.
    pub fn index_of(&self, reached: SocketAddr) -> Option<(u16, u32)> {
        let reached = SocketAddr::new(reached.ip().to_canonical(), reached.port());
        if let Some(index) = self.block4.index_of(reached) {
            return Some((AF_INET, index));
        }
        let index = self.block6?.index_of(reached)?;
        Some((AF_INET6, index))
    }

    /// The server of `index` of `family`'s block, and the cgroup that asked it (0: any), from
    /// the kernel's table; `None` if it has none. An index never changes its origin while in
    /// use, so callers may keep the answer.
    pub fn origin(&self, family: u16, index: u32) -> Option<(SocketAddr, u64)> {
        match self.table().get(&server_key(family, index), 0) {
            // Being forgotten, or held for sockets of a table that is gone: no server.
            Ok(origin) if origin.cgroup_id == FORGOTTEN || origin.is_stale() => None,
            Ok(origin) => {
                let server = origin.server.to_socket_addr()?;
                self.note_server(server);
                Some((server, origin.cgroup_id))
            }
            Err(aya::maps::MapError::KeyNotFound) => None,
            Err(err) => {
                log::warn!(
                    "looking up index {index} in {}: {}",
                    names::SERVERS,
                    err.source().map_or(err.to_string(), |s| s.to_string())
                );
                None
            }
        }
    }

    /// Notes `server` among the IPv4 servers asked ([`servers4`](Self::servers4)), and says
    /// so if it is new. Each listener reads an index once, so this runs once per index.
    fn note_server(&self, server: SocketAddr) {
        let IpAddr::V4(ip) = server.ip().to_canonical() else {
            return;
        };
        let mut servers4 = self
            .servers4
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Bounded: past it, sockets asking further servers take the source toward the Internet.
        let new = servers4.len() < MAX_SERVERS4_NOTED && servers4.insert(ip);
        drop(servers4);
        if new {
            self.new_servers4
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(ip);
            self.servers4_grew.notify_one();
        }
    }

    /// Keeps, of the IPv4 servers noted, those `entries` (the table) still name: a server
    /// whose indexes were all forgotten is asked by no one now.
    fn keep_servers4_of(&self, entries: &[(u32, Origin)]) {
        let named: std::collections::BTreeSet<std::net::Ipv4Addr> = entries
            .iter()
            .filter(|(_, origin)| origin.cgroup_id != FORGOTTEN && !origin.is_stale())
            .filter_map(
                |(_, origin)| match origin.server.to_socket_addr()?.ip().to_canonical() {
                    IpAddr::V4(ip) => Some(ip),
                    IpAddr::V6(_) => None,
                },
            )
            .collect();
        self.servers4
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .retain(|server| named.contains(server));
    }

    /// The IPv4 servers in the table at start and read from it since (as of the last walk,
    /// those the table still names): those the sockets of the agent's namespace may be sent
    /// from a source of their own toward ([`super::DirectSources`]).
    pub fn servers4(&self) -> Vec<std::net::Ipv4Addr> {
        self.servers4
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .copied()
            .collect()
    }

    /// The servers noted since this was last called (the whole of them is
    /// [`servers4`](Self::servers4)).
    pub fn take_new_servers4(&self) -> Vec<std::net::Ipv4Addr> {
        std::mem::take(
            &mut *self
                .new_servers4
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }

    /// Waits for a server new to [`servers4`](Self::servers4) (at once if one came since the
    /// last wait).
    pub async fn servers4_grew(&self) {
        self.servers4_grew.notified().await;
    }

    /// Has the kernel refuse UDP datagrams sent to `reached` (a block address on the proxy's
    /// port) for [`REFUSE_CLOSED_SERVER_FOR`]: `sk_lookup` drops them, so the kernel answers
    /// port unreachable and a client connected there reads `ECONNREFUSED`, as it would from
    /// the server whose port the agent just found closed. A `bpf()` call: made only on such an
    /// ICMP error, which the kernel rate-limits.
    pub fn refuse_udp_for_a_while(&self, reached: SocketAddr) {
        let Some((family, index)) = self.index_of(reached) else {
            return;
        };
        let until = refused_until();
        let mut refusing = self
            .refusing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Err(err) = refusing.set(server_key(family, index), until, 0) {
            log::warn!(
                "cannot have index {index} refused for a while ({}): {err}",
                names::REFUSING
            );
        }
    }

    /// Has the agent itself refuse queries to `reached` for [`REFUSE_CLOSED_SERVER_FOR`]
    /// (those the cache cannot answer; the kernel, which cannot tell them, is left out).
    /// Lock-free, and one slot per index, as the kernel's `REFUSING`: no workload's refusals
    /// take room from another's.
    pub fn refuse_here_for_a_while(&self, reached: SocketAddr) {
        let Some((family, index)) = self.index_of(reached) else {
            return;
        };
        let until = refused_until();
        let slots = self.refused_here.get_or_init(|| {
            (0..2 * (dns_proxy_common::MAX_INDEX as usize + 1))
                .map(|_| std::sync::atomic::AtomicU64::new(0))
                .collect()
        });
        if let Some(slot) = slots.get(server_key(family, index) as usize) {
            slot.fetch_max(until, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Whether the agent refuses queries to `reached` now
    /// ([`refuse_here_for_a_while`](Self::refuse_here_for_a_while)): an atomic load, and a
    /// clock read only for an index refused once.
    pub fn refused_here(&self, reached: SocketAddr) -> bool {
        let Some(slots) = self.refused_here.get() else {
            return false;
        };
        let Some((family, index)) = self.index_of(reached) else {
            return false;
        };
        let until = slots
            .get(server_key(family, index) as usize)
            .map_or(0, |slot| slot.load(std::sync::atomic::Ordering::Relaxed));
        until != 0 && until > crate::time_namespace::kernel_monotonic_ns()
    }

    /// Notes that a query came through `index` of `family`'s block now.
    pub fn seen(&self, family: u16, index: u32) {
        let seconds = u32::try_from(self.seconds_since_start()).unwrap_or(u32::MAX);
        if let Some(slot) = self.last_seen.get(server_key(family, index) as usize) {
            // Written once a second at most: the UDP threads share these lines.
            if slot.load(std::sync::atomic::Ordering::Relaxed) != seconds.max(1) {
                slot.store(seconds.max(1), std::sync::atomic::Ordering::Relaxed);
            }
        }
    }

    fn seconds_since_start(&self) -> u64 {
        coarse_seconds().saturating_sub(self.started)
    }

    /// Forgets the origins of cgroups that are gone, so their indexes serve new ones. `gone`
    /// says whether a cgroup id is gone for good (the caller requires it missing from several
    /// walks of the tree: a cgroup made while a walk passes is in the next). An origin is
    /// forgotten if its cgroup is gone and it has not carried a query for `quiet` (a process
    /// that moved to another cgroup keeps its connected socket, and its index, while it uses
    /// it), and no socket is connected to it. A server's shared origin (cgroup 0) is forgotten
    /// once no pair of that server is left and it is as quiet: otherwise the shared origins of
    /// every server ever asked would fill the table for good.
    ///
    /// A forgotten index is not free at once: it is rewritten as [`FORGOTTEN`], which the
    /// listeners read as no origin, and freed [`FORGOTTEN_HELD_FOR`] checks later. Freed at
    /// once, a new origin could take it before a listener dropped what it had read of it, and
    /// that listener sent the new origin's query to the old origin's server. Blocking (`bpf()`
    /// calls): call it off the async threads.
    pub fn forget_departed(
        &self,
        gone: impl Fn(u64) -> bool,
        quiet: std::time::Duration,
    ) -> Forgotten {
        let counts = self.read_counts();
        let entries: Vec<(u32, Origin)> = self.table().iter().filter_map(Result::ok).collect();
        self.keep_servers4_of(&entries);
        self.notice_changes_by_others(&entries);
        self.settle_charges(&counts, &entries);
        let freed = self.free_forgotten(&entries);
        let is_quiet = |key: u32| {
            let seen = self
                .last_seen
                .get(key as usize)
                .map_or(0, |slot| slot.load(std::sync::atomic::Ordering::Relaxed));
            // Not seen since this agent started (0): quiet since then at most. A restart or
            // takeover does not make every origin quiet at once (an agent that took over
            // forgot a departed cgroup's origins 3 minutes after its last query; helper-92).
            let now = self.seconds_since_start();
            now.saturating_sub(u64::from(seen)) >= quiet.as_secs()
        };
        let live = |origin: &Origin| origin.cgroup_id != FORGOTTEN;
        let mut held = None;
        let mut is_held = |key: u32| held.get_or_insert_with(|| self.held_keys()).contains(&key);
        // An index held for sockets of a table that is gone ([`Origin::stale`]) goes once no
        // such socket is noted as connected to it: its cgroup may live on.
        let departed: Vec<(u32, Origin)> = entries
            .iter()
            .filter(|(_, origin)| live(origin) && origin.cgroup_id != 0)
            .filter(|(key, origin)| {
                (origin.is_stale() || gone(origin.cgroup_id) && is_quiet(*key)) && !is_held(*key)
            })
            .copied()
            .collect();
        // Servers some pair still asks through: their shared origins stay.
        let departing: std::collections::HashSet<u32> =
            departed.iter().map(|(key, _)| *key).collect();
        let asked: std::collections::HashSet<dns_proxy_common::Endpoint> = entries
            .iter()
            .filter(|(key, origin)| {
                live(origin) && origin.cgroup_id != 0 && !departing.contains(key)
            })
            .map(|(_, origin)| origin.server)
            .collect();
        let unused_now: std::collections::HashSet<(u32, Origin)> = entries
            .iter()
            .filter(|(key, origin)| {
                origin.cgroup_id == 0
                    && !asked.contains(&origin.server)
                    && is_quiet(*key)
                    && !is_held(*key)
            })
            .copied()
            .collect();
        // Forgotten only once two walks in a row found it unused: a server's first pair is
        // taken just before its shared origin, so a read of the table that passed the pair's
        // slot before it was taken and the shared origin's after sees a shared origin no pair
        // asks through, and a fresh one is quiet (it carried no query yet). Forgotten at once,
        // up to 589 of a burst's new pairs were left without their server's shared index
        // (helper-115).
        let unused_shared: Vec<(u32, Origin)> = {
            let mut unused_before = self
                .unused_shared
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let twice = unused_now.intersection(&unused_before).copied().collect();
            *unused_before = unused_now;
            twice
        };
        let mut forgotten = 0;
        for (key, origin) in departed.iter().chain(&unused_shared) {
            // The table first: a program that finds the reverse entry then checks the table,
            // and takes a fresh slot when they disagree.
            let held_as_forgotten = Origin::new(origin.server, FORGOTTEN);
            if self
                .table()
                .insert(key, held_as_forgotten, BPF_EXIST)
                .is_ok()
            {
                // The next origin of this index must not inherit a refusal meant for this one.
                let _ = self
                    .refusing
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .set(*key, 0, 0);
                if let Some(slot) = self
                    .refused_here
                    .get()
                    .and_then(|slots| slots.get(*key as usize))
                {
                    slot.store(0, std::sync::atomic::Ordering::Relaxed);
                }
                let _ = self
                    .reverse
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .remove(origin);
                self.held_forgotten
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .insert(*key, (Some(*origin), 0));
                forgotten += 1;
            }
        }
        if forgotten > 0 {
            // A UDP socket that connected to one of them since `CONNECTED` was read (through
            // the reverse entry, before it went) holds it: given back.
            let now_held = self.held_keys();
            for (key, origin) in departed.iter().chain(&unused_shared) {
                if now_held.contains(key) && self.restore(*key, *origin) {
                    forgotten -= 1;
                }
            }
        }
        if forgotten > 0 {
            self.generation
                .fetch_add(1, std::sync::atomic::Ordering::Release);
        }
        let after: std::collections::HashMap<u32, Origin> =
            self.table().iter().filter_map(Result::ok).collect();
        let kept = after.values().filter(|origin| live(origin)).count();
        let occupied = after.len();
        self.forget_shares(&gone, &after);
        self.release_orphaned_charges();
        self.forget_connected_counts();
        *self
            .last_seen_table
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = after;
        Forgotten {
            forgotten,
            freed,
            kept,
            occupied,
        }
    }

    /// Removes the shares (`CGROUP_ORIGINS` and `CGROUP_ADJUST`) of cgroups that are gone
    /// and hold no pair in the table (`after`, as it is now): their ids are never used again,
    /// and the maps would otherwise keep an entry for every cgroup that ever asked a new
    /// server.
    fn forget_shares(
        &self,
        gone: &impl Fn(u64) -> bool,
        after: &std::collections::HashMap<u32, Origin>,
    ) {
        let holding: std::collections::HashSet<u64> =
            after.values().map(|origin| origin.cgroup_id).collect();
        let done = |cgroup_id: &u64| gone(*cgroup_id) && !holding.contains(cgroup_id);
        {
            let mut shares = self.shares();
            let counted: Vec<u64> = shares.keys().filter_map(Result::ok).filter(done).collect();
            for cgroup_id in counted {
                let _ = shares.remove(&cgroup_id);
            }
        }
        let mut corrections = self.corrections();
        let corrected: Vec<u64> = corrections
            .keys()
            .filter_map(Result::ok)
            .filter(done)
            .collect();
        for cgroup_id in corrected {
            let _ = corrections.remove(&cgroup_id);
        }
    }

    /// Gives back the charges whose note is gone (in `CONNECTED_CHARGE`, not in `CONNECTED`):
    /// the programs add a charge after its note and take it out before it, but the
    /// `sock_release` of an agent older than the charges takes the note out alone, and it is
    /// the one attached while such an agent runs beside a newer one's `connect4` (a takeover
    /// at the upgrade): helper-167 saw 60 to 181 charges left to one cgroup by one upgrade
    /// under load, never given back, its share of `CONNECTED` smaller for good. Each is
    /// removed, and its cgroup's count lowered, only by whoever removes it (as `sock_release`
    /// does). A program may add to a count between its read and its write here: that note
    /// goes uncounted, and its cgroup may hold one more than its share.
    fn release_orphaned_charges(&self) {
        let mut charges = self
            .connected_charges
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let orphans: Vec<(u64, u64)> = {
            let connected = self
                .connected
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            charges
                .iter()
                .filter_map(Result::ok)
                .filter(|(cookie, _)| {
                    matches!(
                        connected.get(cookie, 0),
                        Err(aya::maps::MapError::KeyNotFound)
                    )
                })
                .collect()
        };
        let mut released: std::collections::HashMap<u64, u64> = Default::default();
        for (cookie, cgroup_id) in orphans {
            if charges.remove(&cookie).is_ok() {
                *released.entry(cgroup_id).or_default() += 1;
            }
        }
        drop(charges);
        if released.is_empty() {
            return;
        }
        let mut counts = self.connected_counts();
        for (cgroup_id, n) in &released {
            if let Ok(count) = counts.get(cgroup_id, 0) {
                let _ = counts.insert(cgroup_id, count.saturating_sub(*n), 0);
            }
        }
        log::info!(
            "gave back {} charges of connected sockets whose note an older agent's sock_release \
             took out ({} cgroups)",
            released.values().sum::<u64>(),
            released.len()
        );
    }

    /// Removes the counts of `CONNECTED` notes (`CONNECTED_PER_CGROUP`) at 0 (or below), so
    /// that the map holds an entry only per cgroup with a note. Never one above 0, even of a
    /// cgroup that looks gone: the walk takes a cgroup it does not reach (deeper than it goes)
    /// for gone, and removing a count its notes still hold let one such cgroup take a share
    /// at each walk, and fill the map (helper-155: 65,536 notes from one cgroup 41 levels
    /// deep). A cgroup that is gone has its count brought to 0 by its sockets' releases. A
    /// program may add to an entry at 0 between the read and the removal: that note goes
    /// uncounted, and its cgroup may hold one more than its share.
    fn forget_connected_counts(&self) {
        let mut counts = self.connected_counts();
        let done: Vec<u64> = counts
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, count)| *count as i64 <= 0)
            .map(|(cgroup_id, _)| cgroup_id)
            .collect();
        for cgroup_id in done {
            let _ = counts.remove(&cgroup_id);
        }
    }

    /// Bumps the generation if an index was forgotten or freed by another agent sharing the
    /// table since the last check (during a takeover): what this one read may be stale.
    fn notice_changes_by_others(&self, entries: &[(u32, Origin)]) {
        let last = self
            .last_seen_table
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now: std::collections::HashMap<u32, Origin> = entries.iter().copied().collect();
        let changed = last
            .iter()
            .any(|(key, origin)| now.get(key) != Some(origin));
        if changed {
            self.generation
                .fetch_add(1, std::sync::atomic::Ordering::Release);
        }
    }

    /// Frees the indexes held as forgotten for [`FORGOTTEN_HELD_FOR`] checks (this agent's:
    /// one forgotten by an agent before it counts from this agent's first check), unless a
    /// socket is connected to one: it connected while the index was being forgotten, and the
    /// index is given back to its origin (forgotten by an agent before this one, whose origin
    /// this one does not know: to its server, as a shared origin). Returns how many were
    /// freed.
    fn free_forgotten(&self, entries: &[(u32, Origin)]) -> usize {
        let forgotten: std::collections::HashMap<u32, Origin> = entries
            .iter()
            .filter(|(_, origin)| origin.cgroup_id == FORGOTTEN)
            .copied()
            .collect();
        let due: Vec<(u32, Origin)> = {
            let mut held = self
                .held_forgotten
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            held.retain(|key, _| forgotten.contains_key(key));
            forgotten
                .iter()
                .filter_map(|(key, entry)| {
                    let (origin, checks) = held.entry(*key).or_insert((None, 0));
                    *checks += 1;
                    let origin = origin.unwrap_or(Origin::new(entry.server, 0));
                    (*checks > FORGOTTEN_HELD_FOR).then_some((*key, origin))
                })
                .collect()
        };
        if due.is_empty() {
            return 0;
        }
        let connected = self.held_keys();
        let mut freed = 0;
        for (key, origin) in due {
            if connected.contains(&key) {
                self.restore(key, origin);
                continue;
            }
            if self.table().remove(&key).is_ok() {
                self.held_forgotten
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .remove(&key);
                freed += 1;
            }
        }
        freed
    }

    /// Gives forgotten index `key` back to `origin` (a socket is connected to it); whether it
    /// was.
    fn restore(&self, key: u32, origin: Origin) -> bool {
        if self.table().insert(key, origin, BPF_EXIST).is_err() {
            return false;
        }
        // Unless the origin got another index meanwhile: both then name it.
        let _ = self
            .reverse
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(origin, key, BPF_NOEXIST);
        self.held_forgotten
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&key);
        log::info!(
            "kept index {key} for {:?}: a socket connected to it while it was being forgotten",
            origin.server.to_socket_addr()
        );
        true
    }

    /// The server keys that sockets are connected to now (`CONNECTED`).
    fn held_keys(&self) -> std::collections::HashSet<u32> {
        self.connected
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .filter_map(Result::ok)
            .map(|(_, key)| key)
            .collect()
    }

    /// Changes whenever origins were forgotten ([`forget_departed`](Self::forget_departed)):
    /// a copy of what was read of the table is good only while it stays the same.
    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Acquire)
    }

    fn table(&self) -> std::sync::MutexGuard<'_, HashMap<MapData, u32, Origin>> {
        self.map
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The cgroup ids the table's origins name (the shared 0 aside), and those charged with a
    /// share of it.
    pub fn cgroups(&self) -> std::collections::HashSet<u64> {
        let mut cgroups: std::collections::HashSet<u64> = self
            .table()
            .iter()
            .filter_map(Result::ok)
            .map(|(_, origin)| origin.cgroup_id)
            .filter(|id| *id != 0 && *id != FORGOTTEN)
            .collect();
        cgroups.extend(self.shares().keys().filter_map(Result::ok));
        cgroups.extend(self.corrections().keys().filter_map(Result::ok));
        cgroups
    }

    fn connected_counts(&self) -> std::sync::MutexGuard<'_, HashMap<MapData, u64, u64>> {
        self.connected_counts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn shares(&self) -> std::sync::MutexGuard<'_, HashMap<MapData, u64, u64>> {
        self.shares
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn corrections(&self) -> std::sync::MutexGuard<'_, HashMap<MapData, u64, i64>> {
        self.corrections
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Host mode: the IPv4 block is loopback, so only this namespace reaches the proxy.
    pub fn host_mode(&self) -> bool {
        self.block4.addresses.first().is_loopback()
    }

    /// Whether `ip` is in one of the proxy's blocks (on any port).
    pub fn is_block_ip(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.block4.addresses.contains(ip)
            || self
                .block6
                .is_some_and(|block| block.addresses.contains(ip))
    }

    /// Whether `addr` is one of the proxy's block addresses on its port.
    pub fn is_block_address(&self, addr: SocketAddr) -> bool {
        let addr = SocketAddr::new(addr.ip().to_canonical(), addr.port());
        let in_block =
            |block: Block| addr.port() == block.port && block.addresses.contains(addr.ip());
        in_block(self.block4) || self.block6.is_some_and(in_block)
    }
}

/// Seconds of the monotonic clock, read from its coarse variant: every query notes when its
/// index was seen, and a full clock reading per query showed in the UDP thread's profile.
fn coarse_seconds() -> u64 {
    // The coarse clock exists since Linux 2.6.32; the precise one counts from the same start.
    read_clock(libc::CLOCK_MONOTONIC_COARSE)
        .or_else(|| read_clock(libc::CLOCK_MONOTONIC))
        .map_or(0, |now| now.as_secs())
}
