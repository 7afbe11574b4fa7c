//! The table of queries in flight: each is keyed by the pool socket it left from, the upstream
//! it went to and its ID, and holds what its answer needs. An answer takes its query out of
//! the table only if it arrives on that socket, from that upstream, with that ID and the very
//! question asked (letter case aside); anything else is counted and dropped.
use std::{
    cmp::Reverse,
    collections::VecDeque,
    hash::BuildHasher,
    net::{IpAddr, SocketAddr},
    os::fd::AsFd,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use foldhash::{HashMap, HashSet};

use super::{
    UdpProxy,
    cached::{CachedQuery, Recipient},
    pool::{PoolSocket, Stray},
};
use crate::dns::{
    Moment, OriginalDestinations,
    per_client::{Client, ClientSlot, PerClientLimit, Standing},
    stats::Stats,
    wire,
};

/// A query on its way: which pool socket it left from, where to, with which ID.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) struct PendingKey {
    /// The pool socket's [`PoolSocket::id`].
    socket: u64,
    pub(super) upstream: SocketAddr,
    /// The ID it went upstream with.
    pub(super) id: u16,
}

impl PendingKey {
    pub(super) fn new(socket: u64, upstream: SocketAddr, id: u16) -> Self {
        Self {
            socket,
            upstream,
            id,
        }
    }
}

/// What the answer to a pending query needs.
#[derive(Debug)]
pub(super) struct Pending {
    /// The pool socket it left from, which stays open until this is settled.
    pub(super) socket: Arc<PoolSocket>,
    /// The cgroup that asked (0: not recorded).
    pub(super) cgroup: u64,
    pub(super) client: SocketAddr,
    /// The client's own ID, when the query went upstream with one of the agent's
    /// ([`super::UdpProxy::register_query`]): its answer gets it back.
    pub(super) client_id: Option<u16>,
    pub(super) original: SocketAddr,
    /// Where the query was sent (the block address that names `original`): the answer
    /// leaves from there, so the client's connected socket takes it.
    pub(super) reply_from: IpAddr,
    /// A keyed hash of the query's question ([`wire::hash_question`]): an answer that has a
    /// question must ask the same one, letter case aside.
    pub(super) question: u64,
    /// When its query arrived (or, sent again on its own after waiting on another, was sent).
    pub(super) started: Moment,
    /// "name=... type=..." when debug logging is on.
    pub(super) description: Option<String>,
    /// What the cache needs at its answer: `None` with the cache off, or for a query the
    /// cache does not answer.
    pub(super) cached: Option<Box<CachedQuery>>,
    /// Counts against the client's --max-inflight-per-client until this is settled.
    pub(super) _client_slot: ClientSlot,
    /// Its socket's [`PoolSocket::strays`] when it was sent: more by its answer, and the
    /// answer may be a forged one that won the race, so it is not kept nor shared.
    pub(super) strays_at_send: u32,
    /// Whether nothing stray that could pass for its answer had come when its answer was
    /// matched (set then: a copy of the answer later in the same batch is such a stray).
    pub(super) answer_trusted: bool,
}

impl Pending {
    /// Whether nothing stray that could pass for its answer (a forged answer or error with
    /// a wrong guess of its ID) came on its socket since it was sent.
    pub(super) fn nothing_stray_since_sent(&self) -> bool {
        self.socket.strays(self.question) == self.strays_at_send
    }

    /// Its client, answered through `proxy`'s listener.
    pub(super) fn recipient<'a, D>(&self, proxy: &'a UdpProxy<D>) -> Recipient<'a> {
        Recipient {
            cgroup: self.cgroup,
            client: self.client,
            original: self.original,
            reply_from: self.reply_from,
            listener: proxy.socket.as_fd(),
            started: self.started,
        }
    }
}

/// The queries in flight on one listener, by key, each client's in the order they came, and
/// all of them in that order: making room at twice --max-inflight looks at the clients
/// holding two or more queries here (tens, where a few flood; at most
/// [`MOST_CLIENTS_LOOKED_AT`]), and else takes the oldest query, not at every query
/// (thousands) nor at every client. A search of every query for each one admitted there held
/// a UDP thread for over 1.5 s under 40 workloads flooding a server that never answers
/// (helper-190), and the debug build read half of such a flood (e2e
/// `forty_workloads_flooding_at_twice_the_limit_leave_the_agent_reading_and_a_neighbour_resolving`);
/// a search of every client, where frames forged from a new source each were each a client
/// holding one, had the agent read 2,000 datagrams a second, and neighbours lost lookups
/// (helper-193; e2e `frames_to_a_shared_address_from_a_new_source_each_do_not_take_the_agent`).
#[derive(Default)]
pub(super) struct PendingTable {
    queries: HashMap<PendingKey, InFlight>,
    by_client: HashMap<Client, Arrivals>,
    /// The clients holding two or more queries on this listener.
    holding_several: HashSet<Client>,
    /// Every query in the order it came; those settled since stay until they reach the front,
    /// or until they outnumber the live ones (by more than [`SETTLED_KEPT`]).
    arrivals: VecDeque<(u64, PendingKey)>,
    /// The next query's place in the order of arrival on this listener.
    next_arrival: u64,
    /// Places made for clients known by their source address alone in the current second
    /// (when it began, and how many).
    source_alone_places: Option<(Instant, u32)>,
}

/// Where a query's client stands as it asks: against its fair share, and whether it is known
/// by its source address alone ([`ClientSlot::is_a_source_alone`]).
#[derive(Debug, Clone, Copy)]
pub(super) struct Asking {
    standing: Standing,
    source_alone: bool,
}

impl Asking {
    /// How the client of `slot` asks, its fair share one of `max`.
    pub(super) fn of(slot: &ClientSlot, max: usize) -> Self {
        Self {
            standing: slot.standing(max),
            source_alone: slot.is_a_source_alone(),
        }
    }
}

/// The places at twice `--max-inflight` a listener makes in a second for clients known by
/// their source address alone (no workload recorded): frames from a packet socket
/// (`CAP_NET_RAW`, which a pod has by default) reach a server's shared address from any source
/// they name, each a client holding nothing, and each place made costs a query forgotten and
/// an upstream socket. Past these, such a client's query is dropped as at the limit, and the
/// clients of workloads (which cannot forge more than a few sources) still get theirs.
pub(super) const SOURCE_ALONE_PLACES_PER_SECOND: u32 = 1000;

/// The most clients holding several queries that making room looks at: all of them, unless an
/// adversary made thousands (a forged source's each sent twice), when these stand for the rest.
const MOST_CLIENTS_LOOKED_AT: usize = 256;

struct InFlight {
    arrival: u64,
    pending: Pending,
}

/// Settled arrivals a client's order may keep beyond as many as it has live: few, since a
/// client that holds one query for long and many clients each holding one are the cases
/// where it counts (an adversary: 4,000 clients each holding one cost 1.3 KB each with 16).
const SETTLED_KEPT: usize = 4;

/// One client's queries on one listener, in the order they came. Those settled since stay
/// until they reach the front, or until they outnumber the live ones (by more than
/// [`SETTLED_KEPT`]), so that taking one out costs no search.
#[derive(Default)]
struct Arrivals {
    order: VecDeque<(u64, PendingKey)>,
    live: usize,
}

impl Arrivals {
    /// The first of its queries still in flight, after dropping the settled ones before it.
    fn oldest(&mut self, queries: &HashMap<PendingKey, InFlight>) -> Option<(u64, PendingKey)> {
        while let Some(&(arrival, key)) = self.order.front() {
            if is_current(queries, arrival, &key) {
                return Some((arrival, key));
            }
            self.order.pop_front();
        }
        None
    }
}

/// Whether `key`, which arrived `arrival`th, is still in flight (and not a later query under
/// the same key).
fn is_current(queries: &HashMap<PendingKey, InFlight>, arrival: u64, key: &PendingKey) -> bool {
    queries
        .get(key)
        .is_some_and(|query| query.arrival == arrival)
}

impl PendingTable {
    pub(super) fn len(&self) -> usize {
        self.queries.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.queries.is_empty()
    }

    pub(super) fn contains_key(&self, key: &PendingKey) -> bool {
        self.queries.contains_key(key)
    }

    pub(super) fn get(&self, key: &PendingKey) -> Option<&Pending> {
        self.queries.get(key).map(|query| &query.pending)
    }

    #[cfg(test)]
    pub(super) fn iter(&self) -> impl Iterator<Item = (&PendingKey, &Pending)> {
        self.queries
            .iter()
            .map(|(key, query)| (key, &query.pending))
    }

    #[cfg(test)]
    pub(super) fn values(&self) -> impl Iterator<Item = &Pending> {
        self.queries.values().map(|query| &query.pending)
    }

    pub(super) fn values_mut(&mut self) -> impl Iterator<Item = &mut Pending> {
        self.queries.values_mut().map(|query| &mut query.pending)
    }

    /// The arrivals kept, settled ones included: what the order costs in memory.
    #[cfg(test)]
    pub(super) fn arrivals_kept(&self) -> usize {
        self.by_client
            .values()
            .map(|arrivals| arrivals.order.len())
            .sum()
    }

    /// The arrivals kept in the order of all queries, settled ones included.
    #[cfg(test)]
    pub(super) fn all_arrivals_kept(&self) -> usize {
        self.arrivals.len()
    }

    /// Records `pending` under `key`, which must be free ([`contains_key`](Self::contains_key)).
    pub(super) fn insert(&mut self, key: PendingKey, pending: Pending) {
        let arrival = self.next_arrival;
        self.next_arrival += 1;
        let arrivals = self
            .by_client
            .entry(pending._client_slot.client())
            .or_default();
        arrivals.order.push_back((arrival, key));
        arrivals.live += 1;
        if arrivals.live == 2 {
            self.holding_several.insert(pending._client_slot.client());
        }
        self.arrivals.push_back((arrival, key));
        let replaced = self.queries.insert(key, InFlight { arrival, pending });
        debug_assert!(replaced.is_none(), "a key in flight is not reused");
    }

    pub(super) fn remove(&mut self, key: &PendingKey) -> Option<Pending> {
        let InFlight { pending, .. } = self.queries.remove(key)?;
        let client = pending._client_slot.client();
        if let Some(arrivals) = self.by_client.get_mut(&client) {
            arrivals.live -= 1;
            if arrivals.live == 1 {
                self.holding_several.remove(&client);
            }
            if arrivals.live == 0 {
                self.by_client.remove(&client);
            } else if arrivals.order.len() > 2 * arrivals.live + SETTLED_KEPT {
                // Settled ones outnumber the live: each is looked at once more, here, and
                // the room they took is given back.
                let queries = &self.queries;
                arrivals
                    .order
                    .retain(|(arrival, key)| is_current(queries, *arrival, key));
                arrivals.order.shrink_to(2 * arrivals.live + SETTLED_KEPT);
            }
        }
        // Answers come mostly in the order their queries went: those settled at the front go
        // at once, and the rest when they outnumber the live ones.
        let queries = &self.queries;
        while let Some((arrival, key)) = self.arrivals.front()
            && !is_current(queries, *arrival, key)
        {
            self.arrivals.pop_front();
        }
        if self.arrivals.len() > 2 * queries.len() + SETTLED_KEPT {
            self.arrivals
                .retain(|(arrival, key)| is_current(queries, *arrival, key));
            self.arrivals.shrink_to(2 * queries.len() + SETTLED_KEPT);
        }
        Some(pending)
    }

    /// Takes out every query `expired` says so of.
    pub(super) fn extract_if(
        &mut self,
        mut expired: impl FnMut(&Pending) -> bool,
    ) -> Vec<(PendingKey, Pending)> {
        let keys: Vec<PendingKey> = self
            .queries
            .iter()
            .filter(|(_, query)| expired(&query.pending))
            .map(|(key, _)| *key)
            .collect();
        keys.into_iter()
            .filter_map(|key| Some((key, self.remove(&key)?)))
            .collect()
    }

    /// Whether a place may be made for a client known by its source address alone now, in
    /// this second's [`SOURCE_ALONE_PLACES_PER_SECOND`].
    fn has_a_source_alone_place(&mut self, now: Instant) -> bool {
        match &mut self.source_alone_places {
            Some((since, used))
                if now.saturating_duration_since(*since) < Duration::from_secs(1) =>
            {
                *used < SOURCE_ALONE_PLACES_PER_SECOND
            }
            places => {
                *places = Some((now, 0));
                true
            }
        }
    }

    /// A place was made for a client known by its source address alone.
    fn took_a_source_alone_place(&mut self) {
        if let Some((_, used)) = &mut self.source_alone_places {
            *used += 1;
        }
    }

    /// The first query still in flight of the client furthest past its fair share of `max`
    /// (by what it holds now, on every listener), the client with the oldest such query among
    /// those as far, of the clients holding several queries here (a share is one at least);
    /// with `any_at_its_share`, if none is past its share, the oldest query here. `None` if no
    /// client is past its share.
    fn oldest_of_the_furthest_past_its_share(
        &mut self,
        limits: &PerClientLimit,
        max: usize,
        any_at_its_share: bool,
    ) -> Option<PendingKey> {
        let queries = &self.queries;
        let by_client = &mut self.by_client;
        let furthest = self
            .holding_several
            .iter()
            .take(MOST_CLIENTS_LOOKED_AT)
            .filter_map(|client| {
                let past = limits.past_fair_share(*client, max);
                if past == 0 {
                    return None;
                }
                let (arrival, key) = by_client.get_mut(client)?.oldest(queries)?;
                Some((past, Reverse(arrival), key))
            })
            .max_by_key(|(past, arrival, _)| (*past, *arrival))
            .map(|(.., key)| key);
        if furthest.is_some() || !any_at_its_share {
            return furthest;
        }
        while let Some(&(arrival, key)) = self.arrivals.front() {
            if is_current(queries, arrival, &key) {
                return Some(key);
            }
            self.arrivals.pop_front();
        }
        None
    }
}

impl<D: OriginalDestinations> UdpProxy<D> {
    /// The queries in flight on this listener.
    pub(super) fn inflight(&self) -> usize {
        self.pending.lock().expect("not poisoned").len()
    }

    /// Records a query as pending on a socket of the pool of `upstream`'s family: the one
    /// `pick` chooses among those for `upstream` ([`UdpProxy::pick_socket`]) or, if a query
    /// of the same ID to the same upstream is in flight there, the next free one; returns its
    /// key and socket. `None` (counted) at the in-flight limit, or with no socket to use.
    pub(super) fn register(
        self: &Arc<Self>,
        upstream: SocketAddr,
        id: u16,
        pending: impl FnOnce(Arc<PoolSocket>) -> Pending,
        pick: u64,
        Asking {
            standing,
            source_alone,
        }: Asking,
        now: Instant,
    ) -> Option<(PendingKey, Arc<PoolSocket>)> {
        let stats = &self.stats.udp;
        let pool = self.pool_for(upstream);
        // The limit is the agent's, over all UDP threads (which may pass it by one each). A
        // client within its fair share passes it, up to twice the limit. Checked first: a
        // query dropped here opens no socket.
        let max = self.settings.max_inflight;
        let within_fair_share = standing != Standing::AtOrPastItsShare;
        let inflight = stats.inflight.load(Ordering::Relaxed) as usize;
        // A place made is this query's, whatever another thread admitted meanwhile.
        let took_a_place = within_fair_share
            && inflight >= 2 * max
            && self.forget_one_for(standing, source_alone, now);
        if took_a_place || inflight < max || (within_fair_share && inflight < 2 * max) {
            let (slots, picked) = self.pick_socket(pool, upstream, pick, now)?;
            let mut pending = Some(pending);
            let key = |socket: &PoolSocket| PendingKey::new(socket.id(), upstream, id);
            if let Some(registered) =
                self.insert_pending(slots.candidates(&picked), key, &mut pending)
            {
                return Some(registered);
            }
            // Every socket connected to `upstream` carries a query with this ID to it: this
            // one leaves from a socket of its own.
            drop(slots);
            if picked.is_connected()
                && let Some(own) = self.open_one_off(pool, upstream)
                && let Some(registered) =
                    self.insert_pending(std::iter::once(&own), key, &mut pending)
            {
                return Some(registered);
            }
        }
        Stats::add(&stats.dropped_overload);
        self.overload_log.warn(|dropped| {
            format!(
                "{} queries in flight (--max-inflight), or the same ID to the same server on \
                 every upstream socket: dropped {dropped} queries",
                self.settings.max_inflight
            )
        });
        None
    }

    /// At twice `--max-inflight`, for a client within its fair share (`standing`): forgets
    /// the oldest query in flight on this listener of the client furthest past its fair share
    /// (by what it holds now, as shares are now), as if it had timed out (its client
    /// retries, or gives up as it would on a server that never answers). For a client holding
    /// nothing, where no query is past its client's share of one, the oldest. Whether there
    /// is room now (also when this listener holds nothing).
    /// Several clients that each came within their share while fewer clients held something
    /// fill twice the limit together, and would keep a client holding nothing out until their
    /// queries time out; so would twice the limit's clients with one query each (per_client.rs).
    /// For a client known by its `source_alone`, only within
    /// [`SOURCE_ALONE_PLACES_PER_SECOND`].
    fn forget_one_for(
        self: &Arc<Self>,
        standing: Standing,
        source_alone: bool,
        now: Instant,
    ) -> bool {
        let max = self.settings.max_inflight;
        // With a share of one, a query past no share is its client's only one, at its share.
        let any_at_its_share =
            standing == Standing::HoldingNothing && self.settings.per_client.fair_share(max) == 1;
        let forgotten = {
            let mut table = self.pending.lock().expect("not poisoned");
            if table.is_empty() {
                // The other listeners hold all of it: this one passes the limit by one, as
                // each may, rather than turn a newcomer away for want of a query to take out.
                return true;
            }
            if source_alone && !table.has_a_source_alone_place(now) {
                return false;
            }
            let furthest = table.oldest_of_the_furthest_past_its_share(
                &self.settings.per_client,
                max,
                any_at_its_share,
            );
            let forgotten = furthest.and_then(|key| Some((key, table.remove(&key)?)));
            if source_alone && forgotten.is_some() {
                table.took_a_source_alone_place();
            }
            forgotten
        };
        let Some((key, mut pending)) = forgotten else {
            return false;
        };
        let stats = &self.stats.udp;
        pending.socket.settled();
        Stats::add(&stats.dropped_overload);
        if let Some(description) = &pending.description {
            log::debug!(
                target: super::LOG,
                "query udp client={} upstream={} {description} forgotten, at or past its \
                 workload's fair share, for a client within its own workload={}",
                pending.client,
                key.upstream,
                self.workload_name(pending.cgroup),
            );
        }
        if let Some(cached) = pending.cached.take() {
            let waited = self.settle_cached(*cached, None, pending.recipient(self), false);
            stats.dropped_overload.fetch_add(waited, Ordering::Relaxed);
        }
        stats.settled(1);
        true
    }

    /// Records `pending` (taken) on the first of `candidates` under whose `key` nothing is in
    /// flight; its key and socket.
    fn insert_pending<'s>(
        self: &Arc<Self>,
        candidates: impl Iterator<Item = &'s Arc<PoolSocket>>,
        key: impl Fn(&PoolSocket) -> PendingKey,
        pending: &mut Option<impl FnOnce(Arc<PoolSocket>) -> Pending>,
    ) -> Option<(PendingKey, Arc<PoolSocket>)> {
        let registered = {
            let mut table = self.pending.lock().expect("not poisoned");
            candidates.into_iter().find_map(|socket| {
                let key = key(socket);
                if table.contains_key(&key) {
                    return None;
                }
                // Counted under the lock, so its answer cannot be counted first.
                self.stats.udp.forwarding();
                let mut registered = (pending.take()?)(Arc::clone(socket));
                registered.strays_at_send = socket.strays(registered.question);
                table.insert(key, registered);
                socket.carries();
                Some((key, Arc::clone(socket)))
            })
        }?;
        self.started_on(&registered.1);
        Some(registered)
    }

    /// Moves the pending query `key` to a socket of its own: its new key and socket, or
    /// `None` if it is not pending or no socket could be opened.
    pub(super) fn move_to_one_off(
        self: &Arc<Self>,
        key: PendingKey,
    ) -> Option<(PendingKey, Arc<PoolSocket>)> {
        let socket = self.open_one_off(self.pool_for(key.upstream), key.upstream)?;
        // A fresh socket: nothing is pending under its key.
        let moved = PendingKey {
            socket: socket.id(),
            ..key
        };
        {
            let mut table = self.pending.lock().expect("not poisoned");
            let mut pending = table.remove(&key)?;
            pending.socket.settled();
            socket.carries();
            pending.strays_at_send = socket.strays(pending.question);
            pending.socket = Arc::clone(&socket);
            table.insert(moved, pending);
        }
        self.started_on(&socket);
        Some((moved, socket))
    }

    /// Counts and logs (rate-limited) a datagram or an ICMP error on an upstream socket that
    /// is about no query in flight.
    pub(super) fn count_stray(&self) {
        Stats::add(&self.stats.udp.dropped_stray);
        self.stray_log.warn(|dropped| {
            format!(
                "dropped {dropped} datagrams and ICMP errors on upstream sockets that are about \
                 no query in flight (late, or spoofed)"
            )
        });
    }

    /// The pending query that `datagram`, from `from` on pool socket `socket`, answers, taken
    /// out of the table; if it answers none (counted), what it could have been taken for.
    pub(super) fn match_answer(
        &self,
        socket: u64,
        datagram: &[u8],
        from: SocketAddr,
    ) -> Result<Pending, Stray> {
        let stats = &self.stats.udp;
        let answer_to = wire::response_id(datagram).map(|id| PendingKey {
            socket,
            upstream: from,
            id,
        });
        // An answer with no question (a FORMERR or NOTIMP from a server that does not echo
        // it) matches on socket, server and ID alone, as it would for the client.
        let question =
            wire::question(datagram).map(|q| (!q.is_empty()).then(|| self.question_key(q)));
        let pending = answer_to.and_then(|key| {
            let mut table = self.pending.lock().expect("not poisoned");
            // Only the question asked takes the slot; anything else leaves it waiting.
            match (table.get(&key), question) {
                (Some(pending), Some(asked)) if asked.is_none_or(|q| q == pending.question) => {
                    table.remove(&key)
                }
                _ => None,
            }
        });
        let Some(pending) = pending else {
            self.count_stray();
            return Err(match (answer_to, question) {
                (Some(key), Some(Some(question))) => Stray::Question {
                    id: key.id,
                    key: question,
                },
                _ => Stray::NotAnAnswer,
            });
        };
        stats.settled(1);
        pending.socket.settled();
        let mut pending = pending;
        // An answer with no question matched on its ID alone, and strays with none count
        // against nothing: it is never trusted.
        let has_question = matches!(question, Some(Some(_)));
        pending.answer_trusted = has_question && pending.nothing_stray_since_sent();
        // Only an ID of the agent's own is remembered, so that a copy of its answer is no
        // stray: a workload that picks its queries' IDs could otherwise have the socket
        // remember them, and excuse its forgeries with those IDs.
        if let (Some(key), true, Some(_)) = (answer_to, has_question, pending.client_id) {
            pending.socket.carried_answer(key.id, pending.question);
        }
        Ok(pending)
    }

    /// The keyed hash of a question that the answer check compares.
    pub(super) fn question_key(&self, question: &[u8]) -> u64 {
        let mut hasher = self.question_hasher.build_hasher();
        wire::hash_question(question, &mut hasher);
        std::hash::Hasher::finish(&hasher)
    }
}
