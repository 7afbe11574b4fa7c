//! A limit per client: how many UDP queries (or TCP connections) one client may have open at
//! once, so that one flooding workload fills its own share and not the whole agent's.
//!
//! A client is the workload the kernel recorded for the block address its query reached (its
//! cgroup, which no other workload's socket can send to that address as: the programs refuse
//! another cgroup's address), from the source address it came from. So a container forging a
//! neighbour's source address charges a share of its own, and a host-network container its
//! own, not the node's. The source counts too because a raw datagram passes no cgroup hook: a
//! pod with `CAP_NET_RAW` could send to a neighbour's address from its own, and charged the
//! neighbour's share until it held all of it (an adversary dropped 80 % of a neighbour's
//! lookups, to every server, so); now it charges a share of the neighbour's cgroup and its own
//! address, which the neighbour never uses. The processes of the agent's own namespace are
//! one source, whatever local address they send from (the listeners decide:
//! [`LOCAL_CLIENT`]). A workload has a share for at most [`SOURCES_PER_WORKLOAD`] source
//! addresses at once, and one more for all its others together ([`OTHER_SOURCES`]): a pod
//! with `CAP_NET_RAW` can send from addresses it does not own (`IP_TRANSPARENT`), through its
//! own block address, where the node does not check sources, and took a share for each (an
//! adversary: 60,000 sources, the agent filled to twice `--max-inflight`, half a neighbour's
//! lookups lost). Where no workload is recorded (a server's shared address, when the table is
//! full), a client is its source address alone.
//!
//! Beside the fixed limit, a fair share: `--max-inflight` divided by the clients that hold
//! something. A client within it is admitted even when the agent-wide limit is reached by
//! others (up to twice that limit, which bounds memory), so a few flooding clients cannot
//! push the rest out. At twice the limit, a UDP query of a client within its share takes the
//! place of the oldest of the client furthest past its own share (by what it holds now)
//! ([`ClientSlot::past_fair_share`]): clients that each came within their share while fewer
//! clients held something can fill twice the limit together (helper-163: 20 cgroups, each
//! under its share as it came, held 8,192 queries to a silent server, and a neighbour holding
//! nothing lost every lookup for 5 s). Where every client holds one query and none is past
//! its share (at least twice `--max-inflight` clients, so the share is one), a client holding
//! nothing takes the place of the oldest: otherwise such a crowd, each with a query to a
//! server that never answers, kept every newcomer out until their queries timed out
//! (helper-164: 160 cgroups against `--max-inflight 64`).
use foldhash::{HashMap, fast::RandomState};
use std::{
    hash::BuildHasher,
    net::{IpAddr, Ipv4Addr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
};

/// The key of every client of the agent's own network namespace with no workload recorded:
/// one share, however many local addresses they send from.
pub const LOCAL_CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// Who a limit counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Client {
    /// A workload, by the id of the cgroup the kernel recorded for its query, from a source
    /// address.
    Workload { cgroup: u64, source: IpAddr },
    /// A source address, where no workload is recorded.
    Address(IpAddr),
}

/// Independent locks, so the UDP threads seldom wait on one another.
const SHARDS: usize = 16;

/// Source addresses a workload holds a share of its own for at once: a pod's IPv4 and IPv6
/// addresses, and a neighbour or two sending to its block address raw.
pub const SOURCES_PER_WORKLOAD: u32 = 4;

/// The source that stands for all a workload's others, past [`SOURCES_PER_WORKLOAD`].
pub const OTHER_SOURCES: IpAddr = IpAddr::V4(Ipv4Addr::UNSPECIFIED);

/// Counts per client. A client is in the table only while it holds something, so the table is
/// no larger than what the agent-wide limits let be open.
#[derive(Debug)]
pub struct PerClientLimit {
    limit: u32,
    shards: [Mutex<HashMap<Client, u32>>; SHARDS],
    /// Per workload (cgroup id), the sources of its own it holds a share for now (not
    /// [`OTHER_SOURCES`]). Locked inside a shard's lock, never the other way round.
    sources: Mutex<HashMap<u64, u32>>,
    /// Clients in the table: those that hold something now.
    active: AtomicUsize,
    /// Keyed, so no client can choose addresses that all land in one shard.
    hasher: RandomState,
}

/// Where a client stood against its fair share as it asked for one more.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// It held nothing: within any share.
    HoldingNothing,
    /// It held something, and less than its share.
    WithinItsShare,
    /// It held its share or more.
    AtOrPastItsShare,
}

/// One thing a client holds; given back when dropped.
#[derive(Debug)]
pub struct ClientSlot {
    limits: Arc<PerClientLimit>,
    client: Client,
    /// What the client held before this one.
    held_before: u32,
}

impl ClientSlot {
    /// Whether the client, before this one, held less than its fair share of `total`.
    pub fn within_fair_share(&self, total: usize) -> bool {
        (self.held_before as usize) < self.limits.fair_share(total)
    }

    /// Where the client stood against its fair share of `total` as this one came.
    pub fn standing(&self, total: usize) -> Standing {
        if self.held_before == 0 {
            Standing::HoldingNothing
        } else if self.within_fair_share(total) {
            Standing::WithinItsShare
        } else {
            Standing::AtOrPastItsShare
        }
    }

    /// By how much its client is past its fair share of `total` now: what it holds now, not
    /// when this one came (helper-169: a client that had held two and let one go was taken
    /// for past its share, and its only connection closed before another's older one).
    pub fn past_fair_share(&self, total: usize) -> usize {
        self.limits.past_fair_share(self.client, total)
    }

    /// The client it counts against.
    pub fn client(&self) -> Client {
        self.client
    }

    /// Whether its client is a source address alone (no workload recorded), and not the
    /// agent's own namespace: one that a packet socket names at will.
    pub fn is_a_source_alone(&self) -> bool {
        matches!(self.client, Client::Address(source) if source != LOCAL_CLIENT)
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        self.limits.release(self.client);
    }
}

impl PerClientLimit {
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self {
            limit: u32::try_from(limit).unwrap_or(u32::MAX),
            shards: Default::default(),
            sources: Mutex::default(),
            active: AtomicUsize::new(0),
            hasher: RandomState::default(),
        })
    }

    pub fn limit(&self) -> u32 {
        self.limit
    }

    /// One more for `client`, or `None` if it holds its limit already.
    pub fn try_acquire(self: &Arc<Self>, client: Client) -> Option<ClientSlot> {
        // A v4-mapped IPv6 source is the same client as its IPv4 address.
        let client = match client {
            Client::Address(ip) => Client::Address(ip.to_canonical()),
            Client::Workload { cgroup, source } => Client::Workload {
                cgroup,
                source: source.to_canonical(),
            },
        };
        let mut counts = self.shard(client).lock().expect("not poisoned");
        if !counts.contains_key(&client)
            && let Client::Workload { cgroup, source } = client
            && source != OTHER_SOURCES
            && !self.take_source(cgroup)
        {
            // As many of its sources have a share as may: this one joins its others.
            drop(counts);
            return self.try_acquire(Client::Workload {
                cgroup,
                source: OTHER_SOURCES,
            });
        }
        let count = counts.entry(client).or_insert_with(|| {
            self.active.fetch_add(1, Ordering::Relaxed);
            0
        });
        if *count >= self.limit {
            return None;
        }
        let held_before = *count;
        *count += 1;
        Some(ClientSlot {
            limits: Arc::clone(self),
            client,
            held_before,
        })
    }

    /// By how much `client` is past its fair share of `total` now.
    pub fn past_fair_share(&self, client: Client, total: usize) -> usize {
        (self.held(client) as usize).saturating_sub(self.fair_share(total))
    }

    /// What `client` holds now.
    fn held(&self, client: Client) -> u32 {
        let counts = self.shard(client).lock().expect("not poisoned");
        counts.get(&client).copied().unwrap_or(0)
    }

    /// How many clients hold something now.
    pub fn clients(&self) -> usize {
        self.shards
            .iter()
            .map(|shard| shard.lock().expect("not poisoned").len())
            .sum()
    }

    /// `total` divided among the clients that hold something (at least 1).
    pub fn fair_share(&self, total: usize) -> usize {
        (total / self.active.load(Ordering::Relaxed).max(1)).max(1)
    }

    fn release(&self, client: Client) {
        let mut counts = self.shard(client).lock().expect("not poisoned");
        if let Some(count) = counts.get_mut(&client) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&client);
                self.active.fetch_sub(1, Ordering::Relaxed);
                if let Client::Workload { cgroup, source } = client
                    && source != OTHER_SOURCES
                {
                    self.give_source_back(cgroup);
                }
            }
        }
    }

    /// Counts one more source of `cgroup`'s with a share of its own, if it may have one
    /// ([`SOURCES_PER_WORKLOAD`]). Called under the lock of the source's shard.
    fn take_source(&self, cgroup: u64) -> bool {
        let mut sources = self.sources.lock().expect("not poisoned");
        let held = sources.entry(cgroup).or_insert(0);
        if *held >= SOURCES_PER_WORKLOAD {
            return false;
        }
        *held += 1;
        true
    }

    /// One source of `cgroup`'s no longer holds a share. Called under the lock of its shard.
    fn give_source_back(&self, cgroup: u64) {
        let mut sources = self.sources.lock().expect("not poisoned");
        if let Some(held) = sources.get_mut(&cgroup) {
            *held -= 1;
            if *held == 0 {
                sources.remove(&cgroup);
            }
        }
    }

    fn shard(&self, client: Client) -> &Mutex<HashMap<Client, u32>> {
        &self.shards[(self.hasher.hash_one(client) % SHARDS as u64) as usize]
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    #[test]
    fn each_client_has_its_own_limit_and_gets_slots_back_when_they_drop() {
        let limits = PerClientLimit::new(2);
        let a = Client::Address(Ipv4Addr::new(10, 0, 0, 1).into());
        let b = Client::Address(Ipv4Addr::new(10, 0, 0, 2).into());
        let first = limits.try_acquire(a).expect("a's first");
        let _second = limits.try_acquire(a).expect("a's second");
        assert!(limits.try_acquire(a).is_none(), "a is at its limit");
        // The same address, v4-mapped, is the same client.
        assert!(
            limits
                .try_acquire(Client::Address("::ffff:10.0.0.1".parse().unwrap()))
                .is_none()
        );
        let _other = limits.try_acquire(b).expect("b is not held back by a");
        drop(first);
        let _third = limits.try_acquire(a).expect("a got one back");
        assert_eq!(limits.clients(), 2);
        // A workload from an address is a client of its own, apart from that address alone,
        // and apart from the same workload's address from elsewhere.
        let workload = |source: &str| Client::Workload {
            cgroup: 7,
            source: source.parse().unwrap(),
        };
        let _w = limits
            .try_acquire(workload("10.0.0.1"))
            .expect("the workload's first");
        let _w2 = limits
            .try_acquire(workload("10.0.0.1"))
            .expect("the workload's second");
        assert!(limits.try_acquire(workload("::ffff:10.0.0.1")).is_none());
        let _elsewhere = limits
            .try_acquire(workload("10.0.0.9"))
            .expect("its address sent to from elsewhere is another share");
        assert_eq!(limits.clients(), 4);
    }

    /// A workload has a share of its own for at most [`SOURCES_PER_WORKLOAD`] sources at
    /// once, and one for all its others: a pod sending from addresses it does not own cannot
    /// multiply its share. A source that gives its share back makes room for another.
    #[test]
    fn a_workload_has_a_share_for_a_few_sources_and_one_for_the_rest() {
        let limits = PerClientLimit::new(2);
        let from = |n: u32| Client::Workload {
            cgroup: 7,
            source: Ipv4Addr::from(0x0a00_0000 + n).into(),
        };
        let mut held = Vec::new();
        for n in 0..SOURCES_PER_WORKLOAD {
            held.push(limits.try_acquire(from(n)).expect("a source's first"));
            held.push(limits.try_acquire(from(n)).expect("a source's second"));
            assert!(
                limits.try_acquire(from(n)).is_none(),
                "a source at its limit"
            );
        }
        held.push(limits.try_acquire(from(100)).expect("the others' first"));
        held.push(limits.try_acquire(from(101)).expect("the others' second"));
        assert!(
            limits.try_acquire(from(102)).is_none(),
            "the others' share is full"
        );
        assert_eq!(limits.clients(), SOURCES_PER_WORKLOAD as usize + 1);
        let neighbour = Client::Workload {
            cgroup: 8,
            source: Ipv4Addr::new(10, 0, 0, 1).into(),
        };
        let neighbours = limits
            .try_acquire(neighbour)
            .expect("another workload's own");
        // The first source holds nothing any more: another may have its place.
        held.drain(..2);
        let fresh = limits
            .try_acquire(from(200))
            .expect("room for another source");
        drop((held, fresh, neighbours));
        assert_eq!(limits.clients(), 0);
        assert!(limits.sources.lock().unwrap().is_empty());
    }

    #[test]
    fn a_client_holding_nothing_leaves_the_table() {
        let limits = PerClientLimit::new(4);
        for i in 0..1000u32 {
            drop(limits.try_acquire(Client::Address(Ipv4Addr::from(i).into())));
            drop(limits.try_acquire(Client::Workload {
                cgroup: i.into(),
                source: LOCAL_CLIENT,
            }));
        }
        assert_eq!(limits.clients(), 0);
    }
}
