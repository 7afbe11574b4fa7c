//! Coalescing (with the cache on): a query identical to one already on its way to the same
//! server (the same [`CacheKey`]) is not sent again; its client waits for that query's
//! answer, and gets it with its own ID and question.
//!
//! Shared by every UDP thread, so identical queries that the kernel spreads over the
//! listeners still make one upstream query. The thread whose query leads answers the others'
//! clients, from a duplicate of the listener each one's query reached.
use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    os::fd::OwnedFd,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use super::{
    cache::{CacheKey, CacheableQuery},
    per_client::ClientSlot,
    wire,
};

/// Clients that may wait on one query; more are forwarded on their own.
const MAX_WAITERS_PER_QUERY: usize = 256;
/// Queries of one key in flight at once that others may wait on, each with the clients that
/// asked it again; a query unlike them all goes on its own past it.
const MAX_GROUPS_PER_KEY: usize = 8;
/// The largest query a waiter keeps whole, to send on its own should the answer it waits for
/// not be for it: a plain query, padded (RFC 8467) or with a cookie, is well below it, and the
/// waiters of `--max-inflight` 4,096 keep 5 MiB of queries at most.
pub const MAX_KEPT_QUERY: usize = 1232;
/// How long after a query left identical ones may still wait on it. A client that asks again
/// later is retrying (the first query or its answer may be lost): its query goes upstream on
/// its own, as it would without the cache.
pub const COALESCE_WITHIN: Duration = Duration::from_secs(1);

/// A client whose query waits for an identical one's answer.
#[derive(Debug)]
pub struct Waiter {
    /// The cgroup that asked (0: not recorded), for the log.
    pub cgroup: u64,
    pub client: SocketAddr,
    /// The server the client asked, for the log.
    pub original: SocketAddr,
    /// Where its query arrived: the answer leaves from there.
    pub reply_from: IpAddr,
    /// The listener its query reached (a duplicate): the answer leaves through it.
    pub listener: Arc<OwnedFd>,
    pub query: CacheableQuery,
    /// Its query's header and question ([`CacheableQuery::head`]).
    pub head: Box<[u8]>,
    /// Its whole query, up to [`MAX_KEPT_QUERY`] bytes: sent on its own if the leading
    /// query's answer cannot be given to it. `None`: longer (it then goes unanswered, and
    /// its client retries).
    pub message: Option<Box<[u8]>>,
    /// When its query arrived.
    pub started: crate::dns::Moment,
    /// Counts against the client's --max-inflight-per-client until it is answered.
    pub _client_slot: ClientSlot,
}

/// What a query identical to others became.
#[derive(Debug)]
pub enum Joined {
    /// It leads: it goes to the upstream, and its group must be [`Coalescer::finish`]ed.
    Leads(Box<Waiter>, Group),
    /// It waits for the leading query's answer.
    Waits,
    /// The leading query's clients were served a stale answer while its refresh goes on
    /// (`--serve-stale`): so is this one's, at once.
    ServeStale(Box<Waiter>),
    /// Too many wait already, the query it would wait on left too long ago
    /// ([`COALESCE_WITHIN`]), its key has [`MAX_GROUPS_PER_KEY`] groups unlike it, or it is
    /// too long to keep ([`MAX_KEPT_QUERY`]) for sending on its own should an answer not be
    /// for it: it goes to the upstream on its own.
    Alone(Box<Waiter>),
}

/// Which of a key's groups a leading query leads.
pub type Group = u64;

/// A query in flight and the clients that asked it again meanwhile.
#[derive(Debug)]
struct InFlight {
    group: Group,
    /// When the leading query came.
    started: Instant,
    /// The leading query as it went upstream, and where its client cookie lies.
    query: Box<[u8]>,
    client_cookie_at: Option<usize>,
    waiters: Vec<Waiter>,
    served_stale: bool,
}

/// The queries in flight that identical ones may wait on: for each key, a group per query
/// unlike the others ([`same_query`]). Before, a key had one group, and a query unlike its
/// leader went upstream alone: one odd query for a hot name (another UDP size, padding) kept
/// every later identical query from waiting, 21 upstream queries for 21 lookups where one
/// sufficed (helper-125).
#[derive(Debug)]
pub struct Coalescer {
    in_flight: Mutex<HashMap<CacheKey, Vec<InFlight>>>,
    next_group: std::sync::atomic::AtomicU64,
    /// Waiters over all queries, bounded by `max_waiting`.
    waiting: AtomicUsize,
    max_waiting: usize,
}

impl Coalescer {
    /// At most `max_waiting` clients wait in all (the agent's --max-inflight, say).
    pub fn new(max_waiting: usize) -> Self {
        Self {
            in_flight: Mutex::default(),
            next_group: std::sync::atomic::AtomicU64::new(0),
            waiting: AtomicUsize::new(0),
            max_waiting,
        }
    }

    /// Registers `waiter`'s query, which came `now`: it waits if the same query is in flight
    /// (or is served as that query's clients were), and otherwise leads a group of its own.
    pub fn join(&self, waiter: Waiter, now: Instant) -> Joined {
        let waiter = Box::new(waiter);
        let Some(message) = waiter.message.as_deref() else {
            return Joined::Alone(waiter);
        };
        let mut in_flight = self.lock();
        let groups = in_flight.entry(waiter.query.key.clone()).or_default();
        if let Some(group) = groups.iter_mut().find(|group| same_query(group, &waiter)) {
            if group.served_stale {
                return Joined::ServeStale(waiter);
            }
            if now.saturating_duration_since(group.started) >= COALESCE_WITHIN
                || group.waiters.len() >= MAX_WAITERS_PER_QUERY
                || self.waiting.load(Ordering::Relaxed) >= self.max_waiting
            {
                return Joined::Alone(waiter);
            }
            self.waiting.fetch_add(1, Ordering::Relaxed);
            group.waiters.push(*waiter);
            return Joined::Waits;
        }
        if groups.len() >= MAX_GROUPS_PER_KEY {
            return Joined::Alone(waiter);
        }
        let group = self.next_group.fetch_add(1, Ordering::Relaxed);
        groups.push(InFlight {
            group,
            started: now,
            query: message.into(),
            client_cookie_at: waiter.query.client_cookie_at,
            waiters: Vec::new(),
            served_stale: false,
        });
        Joined::Leads(waiter, group)
    }

    /// The query leading `group` of `key` is settled (answered, failed or timed out): returns
    /// its waiters, for the leader to answer if it can.
    pub fn finish(&self, key: &CacheKey, group: Group) -> Vec<Waiter> {
        let mut in_flight = self.lock();
        let Some(groups) = in_flight.get_mut(key) else {
            return Vec::new();
        };
        let waiters = groups
            .iter()
            .position(|in_flight| in_flight.group == group)
            .map(|at| groups.swap_remove(at).waiters)
            .unwrap_or_default();
        if groups.is_empty() {
            in_flight.remove(key);
        }
        self.waiting.fetch_sub(waiters.len(), Ordering::Relaxed);
        waiters
    }

    /// The query leading `group` of `key` is overdue and its clients get a stale answer:
    /// returns its waiters, and from now on [`join`](Self::join) says to serve the same at
    /// once to the clients that ask it again.
    pub fn serve_stale(&self, key: &CacheKey, group: Group) -> Vec<Waiter> {
        let mut in_flight = self.lock();
        let Some(leading) = in_flight
            .get_mut(key)
            .and_then(|groups| groups.iter_mut().find(|in_flight| in_flight.group == group))
        else {
            return Vec::new();
        };
        leading.served_stale = true;
        let waiters = std::mem::take(&mut leading.waiters);
        self.waiting.fetch_sub(waiters.len(), Ordering::Relaxed);
        waiters
    }

    /// Clients waiting now.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<CacheKey, Vec<InFlight>>> {
        self.in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// Whether `waiter`, a query with the leading one's key, is that query asked again: the same
/// bytes but for the ID, the letter case of the name (0x20 clients spell it each their own
/// way) and the client cookie (each client has its own). Only then does the upstream do with
/// the one what it would do with the other. Before, any query of the key could lead: a workload
/// led with one padded past what its server takes (dnsmasq drops UDP queries over 1,232
/// bytes), and every client waiting on it went unanswered for the upstream timeout, 5 s
/// (helper-121). It also keeps a client from waiting on a query that asked for a smaller UDP
/// size, whose answer may be truncated or lack records where its own would not.
fn same_query(leading: &InFlight, waiter: &Waiter) -> bool {
    let (leading_query, Some(query)) = (&*leading.query, waiter.message.as_deref()) else {
        return false;
    };
    let question_end = waiter.head.len();
    let cookie_at = waiter.query.client_cookie_at;
    let same = |range: std::ops::Range<usize>| leading_query.get(range.clone()) == query.get(range);
    leading_query.len() == query.len()
        && leading.client_cookie_at == cookie_at
        && same(2..wire::HEADER_LEN)
        && match cookie_at {
            Some(at) => same(question_end..at) && same(at + 8..query.len()),
            None => same(question_end..query.len()),
        }
}

#[cfg(test)]
mod tests {
    impl Coalescer {
        fn join_now(&self, waiter: Waiter) -> Joined {
            self.join(waiter, Instant::now())
        }
    }

    use super::*;
    use crate::dns::per_client::{Client, PerClientLimit};

    fn query(name: &str) -> Vec<u8> {
        crate::dns::cache::tests::query(1, name)
    }

    fn waiter(name: &str, client_port: u16) -> Waiter {
        let message = query(name);
        let parsed = CacheableQuery::parse(([192, 0, 2, 1], 53).into(), &message).unwrap();
        let client: SocketAddr = ([10, 0, 0, 1], client_port).into();
        // Any descriptor: nothing is sent here.
        let listener = std::fs::File::open("/dev/null").unwrap();
        Waiter {
            cgroup: 0,
            client,
            original: ([192, 0, 2, 1], 53).into(),
            reply_from: client.ip(),
            listener: Arc::new(listener.into()),
            head: parsed.head(&message).into(),
            message: Some(message.clone().into()),
            query: parsed,
            started: crate::dns::Moment::now(),
            _client_slot: PerClientLimit::new(100)
                .try_acquire(Client::Address(client.ip()))
                .unwrap(),
        }
    }

    #[test]
    fn the_first_query_leads_identical_ones_wait_and_finishing_hands_them_over() {
        let coalescer = Coalescer::new(100);
        let Joined::Leads(leader, group) = coalescer.join_now(waiter("a.example.test", 1)) else {
            panic!("the first leads");
        };
        for port in 2..5 {
            assert!(matches!(
                coalescer.join_now(waiter("A.Example.test", port)),
                Joined::Waits
            ));
        }
        // Another name leads on its own.
        assert!(matches!(
            coalescer.join_now(waiter("b.example.test", 9)),
            Joined::Leads(..)
        ));
        assert_eq!(coalescer.waiting(), 3);
        let waiters = coalescer.finish(&leader.query.key, group);
        let ports: Vec<u16> = waiters.iter().map(|w| w.client.port()).collect();
        assert_eq!(ports, [2, 3, 4]);
        assert_eq!(coalescer.waiting(), 0);
        // Settled: the next identical query leads again.
        assert!(matches!(
            coalescer.join_now(waiter("a.example.test", 5)),
            Joined::Leads(..)
        ));
    }

    /// A waiter for a query of `message`'s bytes.
    fn waiter_of(message: Vec<u8>, client_port: u16) -> Waiter {
        let mut waiter = waiter("a.example.test", client_port);
        let parsed = CacheableQuery::parse(([192, 0, 2, 1], 53).into(), &message).unwrap();
        waiter.head = parsed.head(&message).into();
        waiter.query = parsed;
        waiter.message = (message.len() <= MAX_KEPT_QUERY).then(|| message.into());
        waiter
    }

    #[test]
    fn only_the_leading_query_asked_again_waits_on_it() {
        use crate::dns::cache::tests::{query_with_options, query_with_size_and_flags};
        let coalescer = Coalescer::new(100);
        let sized = |size: u16| query_with_size_and_flags(7, "a.example.test", size, 0);
        let Joined::Leads(leader, group) = coalescer.join_now(waiter_of(sized(1232), 1)) else {
            panic!("the first leads");
        };
        // Another ID, the name in other letters: the same query.
        let mut again = sized(1232);
        again[..2].copy_from_slice(&[0x99, 0x98]);
        again[13..14].make_ascii_uppercase();
        assert!(matches!(
            coalescer.join_now(waiter_of(again, 2)),
            Joined::Waits
        ));
        // Each client's own cookie: the same query, in a group of its own.
        let cookie = |client: u8| query_with_options(7, "a.example.test", &[(10, &[client; 8])]);
        assert!(matches!(
            coalescer.join_now(waiter_of(cookie(1), 3)),
            Joined::Leads(..)
        ));
        assert!(matches!(
            coalescer.join_now(waiter_of(cookie(2), 4)),
            Joined::Waits
        ));
        // The same key, but not the same query: each leads a group of its own, which the
        // same query asked again waits on, whatever the other groups hold. Before, a query
        // unlike the leader went alone, and so did every later one like it (helper-125).
        let others = [
            sized(512),
            sized(4096),
            query_with_options(7, "a.example.test", &[(12, &[0; 64])]),
            query_with_options(7, "a.example.test", &[(10, &[1; 16])]),
        ];
        for (port, other) in (10..).zip(others.clone()) {
            assert!(matches!(
                coalescer.join_now(waiter_of(other, port)),
                Joined::Leads(..)
            ));
        }
        for (port, other) in (20..).zip(others) {
            assert!(matches!(
                coalescer.join_now(waiter_of(other, port)),
                Joined::Waits
            ));
        }
        let waiters = coalescer.finish(&leader.query.key, group);
        let ports: Vec<u16> = waiters.iter().map(|w| w.client.port()).collect();
        assert_eq!(ports, [2], "the first group's own");
        // Past eight groups of a key, a query unlike them all goes alone.
        for port in 30..33 {
            let padded =
                query_with_options(7, "a.example.test", &[(12, &vec![0; usize::from(port)])]);
            assert!(matches!(
                coalescer.join_now(waiter_of(padded, port)),
                Joined::Leads(..)
            ));
        }
        let ninth = query_with_options(7, "a.example.test", &[(12, &[0; 40])]);
        assert!(matches!(
            coalescer.join_now(waiter_of(ninth, 40)),
            Joined::Alone(_)
        ));

        // A query too long to keep neither leads nor waits: a padded query that the server
        // drops led, and every client waiting on it went unanswered (helper-121).
        let fresh = Coalescer::new(100);
        let padded = query_with_options(7, "a.example.test", &[(12, &[0; 2000])]);
        assert!(matches!(
            fresh.join_now(waiter_of(padded.clone(), 4)),
            Joined::Alone(_)
        ));
        assert!(matches!(
            fresh.join_now(waiter_of(sized(1232), 5)),
            Joined::Leads(..)
        ));
        assert!(matches!(
            fresh.join_now(waiter_of(padded, 6)),
            Joined::Alone(_)
        ));
    }

    #[test]
    fn waiters_are_bounded_per_query_and_in_all() {
        let coalescer = Coalescer::new(3);
        assert!(matches!(
            coalescer.join_now(waiter("a.example.test", 1)),
            Joined::Leads(..)
        ));
        for port in 2..5 {
            assert!(matches!(
                coalescer.join_now(waiter("a.example.test", port)),
                Joined::Waits
            ));
        }
        assert!(matches!(
            coalescer.join_now(waiter("a.example.test", 5)),
            Joined::Alone(_)
        ));
        assert_eq!(coalescer.waiting(), 3);
    }

    #[test]
    fn once_a_query_is_served_stale_identical_ones_are_served_stale_at_once() {
        let coalescer = Coalescer::new(100);
        let Joined::Leads(leader, group) = coalescer.join_now(waiter("a.example.test", 1)) else {
            panic!("the first leads");
        };
        assert!(matches!(
            coalescer.join_now(waiter("a.example.test", 2)),
            Joined::Waits
        ));
        assert_eq!(coalescer.serve_stale(&leader.query.key, group).len(), 1);
        assert_eq!(coalescer.waiting(), 0);
        assert!(matches!(
            coalescer.join_now(waiter("a.example.test", 3)),
            Joined::ServeStale(_)
        ));
        assert!(coalescer.finish(&leader.query.key, group).is_empty());
    }
}
