//! The UDP listener: each redirected query is forwarded, unaltered, to the server its client
//! asked for, and the answer is relayed back unaltered.
//!
//! Queries leave from a pool of upstream sockets, each bound to a random port and replaced by
//! a fresh one (a new random port) after [`USES_PER_SOCKET`] queries. An answer is relayed
//! only if it arrives on the socket its query left from, from the address and port the query
//! went to, with the query's ID and the very bytes of its question; anything else is counted
//! and dropped. Nothing is made per query (no task, socket or buffer): the receive loop
//! forwards, each pool socket's reader relays its answers, and a sweeper expires what was not
//! answered in time. Datagrams move in batches, a `recvmmsg` or `sendmmsg` each (see
//! [`mmsg`]): the queries of one batch leave together from one pool socket, and
//! the answers one reader finds go back to their clients together.
use std::{
    cell::{Cell, RefCell},
    collections::{HashMap, hash_map::Entry},
    hash::{BuildHasher, RandomState},
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsFd, BorrowedFd, OwnedFd},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use socket2::{Domain, Socket, Type};
use tokio::{io::Interest, net::UdpSocket};

use super::{
    OriginalDestinations,
    admission::{Admission, Route, Transport},
    cache::{self, Cache, CacheKey, CacheableQuery, Cached},
    coalesce::{Coalescer, Joined, Waiter},
    per_client::{ClientSlot, PerClientLimit},
    query_log::{Asked, QueryLog},
    stats::Stats,
    wire,
    workload_stats::WorkloadStats,
};
use crate::{
    drain::{self, Deadline},
    log_limit::RateLimited,
    resolutions::Resolutions,
    workload::WorkloadNames,
};

#[cfg(feature = "fuzzing")]
mod fuzz;
pub(crate) mod mmsg;
#[cfg(test)]
mod tests;

use mmsg::{Arrival, LOOPBACK_IFINDEX, ReceivedBatch};

/// Upstream sockets per address family, opened as queries need them. A query goes out on one
/// chosen at random, so an off-path attacker must hit one of these random ports as well as the
/// query's ID and question.
const POOL_SIZE: usize = 16;
/// Queries a pool socket carries before a fresh one, on a new random port, takes its place:
/// the ports keep changing, and the cost of a socket is shared by this many queries.
pub const USES_PER_SOCKET: u32 = 128;
/// How often a retired pool socket checks whether its last query is settled, so it can close.
const RETIRED_CHECK: Duration = Duration::from_millis(250);
/// How long a client waits for the upstream before it gets a stale answer, if the cache holds
/// one within --serve-stale: RFC 8767's client response timer.
pub const STALE_AFTER: Duration = Duration::from_millis(1800);

#[derive(Debug, Clone)]
pub struct ForwardSettings {
    /// Forward everything here instead of to each query's original destination.
    pub upstream_override: Option<SocketAddr>,
    pub upstream_timeout: Duration,
    pub max_inflight: usize,
    /// Shared by every UDP proxy of the agent: queries in flight per client address.
    pub per_client: Arc<PerClientLimit>,
    /// The answer cache (`--cache-size`), shared by every listener; `None`: off.
    pub cache: Option<Arc<Cache>>,
    /// Names the workloads of the cgroups that ask, for the log; `None`: cgroup ids only.
    pub workloads: Option<Arc<WorkloadNames>>,
    /// The dnstap log (`--dnstap`); `None`: off.
    pub query_log: Option<Arc<QueryLog>>,
    /// The names each workload resolved (`/v1/resolutions`); `None`: not kept.
    pub resolutions: Option<Arc<Resolutions>>,
    /// Queries by workload (`--workload-metrics`); `None`: off.
    pub workload_stats: Option<Arc<WorkloadStats>>,
    /// With the cache on, the queries identical ones wait on, shared by every listener.
    pub in_flight: Arc<Coalescer>,
}

/// A query on its way: which pool socket it left from, where to, with which ID.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct PendingKey {
    /// The pool socket's [`PoolSocket::id`].
    socket: u64,
    upstream: SocketAddr,
    id: u16,
}

/// What the answer to a pending query needs.
#[derive(Debug)]
struct Pending {
    /// The pool socket it left from, which stays open until this is settled.
    socket: Arc<PoolSocket>,
    /// The cgroup that asked (0: not recorded).
    cgroup: u64,
    client: SocketAddr,
    original: SocketAddr,
    /// Where the query was sent (the block address that names `original`): the answer
    /// leaves from there, so the client's connected socket takes it.
    reply_from: IpAddr,
    /// A keyed hash of the query's question ([`wire::hash_question`]): an answer that has a
    /// question must ask the same one, letter case aside.
    question: u64,
    started: Instant,
    /// "name=... type=..." when debug logging is on.
    description: Option<String>,
    /// What the cache needs at its answer: `None` with the cache off, or for a query the
    /// cache does not answer.
    cached: Option<Box<CachedQuery>>,
    /// Counts against the client's --max-inflight-per-client until this is settled.
    _client_slot: ClientSlot,
}

/// What the cache did with a query.
enum FromCache {
    /// Answered it, had it wait for an identical query's answer, or dropped it (its client
    /// at its limit).
    Handled,
    /// Holds no live answer: the query goes to the upstream, whose answer is kept.
    Forward(Box<CachedQuery>, ClientSlot),
    /// Off, or not for such a query.
    NotCached,
}

/// A query the cache could answer, on its way to the upstream.
#[derive(Debug)]
struct CachedQuery {
    query: CacheableQuery,
    /// The client's header and question ([`CacheableQuery::head`]), for a stale answer.
    head: Box<[u8]>,
    /// The cache held an expired answer within --serve-stale when the query came.
    stale_kept: bool,
    /// Its client has had that stale answer: the upstream's now only refreshes the cache.
    served_stale: bool,
    /// Identical queries wait on this one; `None` if it went alone.
    leading: Option<Leading>,
}

/// A query that identical ones wait on ([`Coalescer`]). Finished when dropped, which leaves
/// its waiters unanswered: they retry, as after a lost datagram.
#[derive(Debug)]
struct Leading {
    in_flight: Arc<Coalescer>,
    key: Option<CacheKey>,
}

impl Leading {
    /// Its waiters, now that it is settled.
    fn finish(mut self) -> Vec<Waiter> {
        let key = self.key.take().expect("finished once");
        self.in_flight.finish(&key)
    }

    /// Its waiters, who get a stale answer; from now on identical queries get one at once.
    fn serve_stale(&self) -> Vec<Waiter> {
        self.key
            .as_ref()
            .map(|key| self.in_flight.serve_stale(key))
            .unwrap_or_default()
    }
}

impl Drop for Leading {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            self.in_flight.finish(&key);
        }
    }
}

/// A query answered from the cache: its answer goes out with the batch's others, in one
/// `sendmmsg`.
struct CacheHit {
    answer: Vec<u8>,
    cgroup: u64,
    client: SocketAddr,
    original: SocketAddr,
    reply_from: IpAddr,
    started: Instant,
}

/// What forwarding a batch of queries gathers, kept from one batch to the next.
#[derive(Default)]
struct Forwarding {
    /// The queries going upstream.
    outgoing: Vec<Outgoing>,
    /// The queries answered from the cache.
    hits: Vec<CacheHit>,
}

/// Whom a cached, stale or shared answer goes to.
#[derive(Debug, Clone, Copy)]
struct Recipient<'a> {
    /// The cgroup that asked (0: not recorded), for the log.
    cgroup: u64,
    client: SocketAddr,
    original: SocketAddr,
    reply_from: IpAddr,
    /// The listener its query reached.
    listener: BorrowedFd<'a>,
    started: Instant,
}

impl CachedQuery {
    /// Whether the upstream's `answer` goes to the client: not if the client has had a stale
    /// answer already, nor if the upstream failed and a stale answer is kept to go instead.
    fn relays(&self, answer: &[u8]) -> bool {
        let stale_instead = self.stale_kept && is_failure(answer);
        !self.served_stale && !stale_instead
    }
}

/// A query whose client is served a stale answer, its upstream being late.
struct Overdue<'a> {
    to: Recipient<'a>,
    query: CacheableQuery,
    head: Box<[u8]>,
    /// The clients of identical queries that waited on it.
    waiters: Vec<Waiter>,
}

impl Waiter {
    fn recipient(&self) -> Recipient<'_> {
        Recipient {
            cgroup: self.cgroup,
            client: self.client,
            original: self.original,
            reply_from: self.reply_from,
            listener: self.listener.as_fd(),
            started: self.started,
        }
    }
}

/// What the query log says of a UDP query.
fn udp_asked(client: SocketAddr, server: SocketAddr, cgroup: u64) -> Asked {
    Asked {
        transport: crate::dnstap::Transport::Udp,
        client,
        server,
        cgroup,
    }
}

/// Whether `answer` says the upstream failed (SERVFAIL or REFUSED): a stale answer, if the
/// cache holds one, serves the client better (RFC 8767 §4).
fn is_failure(answer: &[u8]) -> bool {
    const SERVFAIL: u8 = 2;
    const REFUSED: u8 = 5;
    matches!(wire::header_rcode(answer), Some(SERVFAIL | REFUSED))
}

/// Where an answer to a cached query came from, for the metrics and the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CacheSource {
    Hit,
    Stale,
    Coalesced,
}

impl CacheSource {
    fn as_str(self) -> &'static str {
        match self {
            Self::Hit => "hit",
            Self::Stale => "stale",
            Self::Coalesced => "coalesced",
        }
    }
}

/// One upstream socket of a pool.
struct PoolSocket {
    /// Unique among all the proxy's pool sockets, ever.
    id: u64,
    socket: UdpSocket,
    /// Queries sent from it.
    uses: AtomicU32,
    /// Queries sent from it and not yet settled.
    outstanding: AtomicUsize,
    /// Replaced in its pool: its reader ends once nothing is outstanding.
    retired: AtomicBool,
}

impl PoolSocket {
    /// A fresh socket on a random port of `any` (`0.0.0.0:0` or `[::]:0`).
    fn open(next_id: &AtomicU64, any: SocketAddr) -> io::Result<Arc<Self>> {
        Ok(Arc::new(Self {
            id: next_id.fetch_add(1, Ordering::Relaxed),
            socket: pool_socket(any)?,
            uses: AtomicU32::new(0),
            outstanding: AtomicUsize::new(0),
            retired: AtomicBool::new(false),
        }))
    }
}

impl std::fmt::Debug for PoolSocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PoolSocket({})", self.id)
    }
}

/// The upstream sockets of one address family; only the receive loop picks and replaces them.
struct Pool {
    /// `0.0.0.0:0` or `[::]:0`.
    any: SocketAddr,
    /// Empty when this family has no sockets on this host.
    slots: Mutex<Vec<Arc<PoolSocket>>>,
}

/// The UDP side of the proxy. Cheap to share: everything lives behind one `Arc`.
pub struct UdpProxy<D> {
    socket: UdpSocket,
    /// The same listener, for other threads to answer this one's clients through: those whose
    /// queries wait on an identical one of theirs.
    shared_listener: Arc<OwnedFd>,
    local_addr: SocketAddr,
    admission: Admission<D>,
    settings: ForwardSettings,
    v4: Pool,
    v6: Pool,
    next_socket_id: AtomicU64,
    pending: Mutex<HashMap<PendingKey, Pending>>,
    /// Keys the question hashes, so no one can craft a question that collides.
    question_hasher: RandomState,
    /// Stops the pool readers and the sweeper, at the end of `drain`.
    workers: drain::Signal,
    stats: Arc<Stats>,
    overload_log: RateLimited,
    upstream_log: RateLimited,
    stray_log: RateLimited,
}

/// A UDP socket on a random port of `any` (`0.0.0.0` or `::`).
fn pool_socket(any: SocketAddr) -> io::Result<UdpSocket> {
    let domain = Domain::for_address(any);
    let socket = Socket::new(domain, Type::DGRAM.nonblocking().cloexec(), None)?;
    if any.is_ipv6() {
        // IPv4 servers are asked from the IPv4 pool.
        socket.set_only_v6(true)?;
    }
    socket.bind(&any.into())?;
    UdpSocket::from_std(socket.into())
}

/// A query of the batch being forwarded, registered as pending on `socket`.
struct Outgoing {
    /// Its index in the received batch.
    index: usize,
    socket: Arc<PoolSocket>,
    key: PendingKey,
}

/// The answers a pool reader found in one batch, before they go back to their clients.
#[derive(Default)]
struct Answers {
    received: ReceivedBatch,
    /// (index in `received`, the upstream it came from, the query it answers).
    matched: Vec<(usize, SocketAddr, Pending)>,
}

thread_local! {
    /// Where pool readers receive answers, one per worker thread: no buffer per socket or query.
    static ANSWERS: RefCell<Answers> = RefCell::default();
    /// A cheap per-thread random sequence for picking pool sockets (xorshift64*).
    static RANDOM: Cell<u64> = Cell::new(RandomState::new().hash_one(std::thread::current().id()) | 1);
}

/// Receives a batch on `socket`, which tokio saw readable. A short batch means the socket's
/// queue was empty when the kernel stopped: tokio's readiness is then cleared at once, as it
/// would be by the next call finding nothing, a syscall this saves. (A datagram that arrives
/// later wakes the socket again.)
fn receive_batch(socket: &UdpSocket, batch: &mut ReceivedBatch) -> io::Result<usize> {
    let mut count = 0;
    let received = socket.try_io(Interest::READABLE, || {
        count = batch.receive(socket.as_fd())?;
        if count < mmsg::BATCH {
            Err(io::ErrorKind::WouldBlock.into())
        } else {
            Ok(())
        }
    });
    match received {
        Err(err) if err.kind() == io::ErrorKind::WouldBlock && count == 0 => Err(err),
        Err(err) if err.kind() != io::ErrorKind::WouldBlock => Err(err),
        _ => Ok(count),
    }
}

fn random() -> u64 {
    RANDOM.with(|state| {
        let mut x = state.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        state.set(x);
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    })
}

impl Pending {
    /// Its client, answered through `proxy`'s listener.
    fn recipient<'a, D>(&self, proxy: &'a UdpProxy<D>) -> Recipient<'a> {
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

impl<D: OriginalDestinations> UdpProxy<D> {
    /// Starts the sweeper; the upstream sockets are opened as queries need them. Must run
    /// inside a tokio runtime.
    pub fn new(
        socket: UdpSocket,
        destinations: D,
        settings: ForwardSettings,
        stats: Arc<Stats>,
    ) -> io::Result<Arc<Self>> {
        let local_addr = socket.local_addr()?;
        // Each query says which block address it was sent to (its server), and the answer
        // leaves from that address.
        mmsg::receive_arrivals(socket.as_fd(), local_addr.is_ipv6())?;
        mmsg::send_from_any_address(socket.as_fd(), local_addr.is_ipv6())?;
        let shared_listener = Arc::new(socket.as_fd().try_clone_to_owned()?);
        let (upstream, per_client) = (settings.upstream_override, &settings.per_client);
        let admission = Admission::new(Transport::Udp, destinations, upstream, per_client, &stats);
        let proxy = Arc::new(Self {
            socket,
            shared_listener,
            local_addr,
            admission,
            settings,
            v4: Pool {
                any: (Ipv4Addr::UNSPECIFIED, 0).into(),
                slots: Mutex::default(),
            },
            v6: Pool {
                any: (Ipv6Addr::UNSPECIFIED, 0).into(),
                slots: Mutex::default(),
            },
            next_socket_id: AtomicU64::new(0),
            pending: Mutex::default(),
            question_hasher: RandomState::new(),
            workers: drain::Signal::new(),
            stats,
            overload_log: RateLimited::new(Duration::from_secs(10)),
            upstream_log: RateLimited::new(Duration::from_secs(10)),
            stray_log: RateLimited::new(Duration::from_secs(10)),
        });
        let sweeper = Arc::clone(&proxy);
        tokio::spawn(async move { sweeper.expire_unanswered().await });
        Ok(proxy)
    }

    /// Serves until `stop` is sent.
    pub async fn serve(self: &Arc<Self>, stop: drain::Signal) {
        let mut batch = ReceivedBatch::default();
        let mut forwarding = Forwarding::default();
        while let Some(ready) = stop.unless_stopped(self.socket.readable()).await {
            self.on_readable(ready, &mut batch, &mut forwarding);
        }
    }

    /// Graceful end: keeps answering clients that were redirected before the redirect was
    /// switched off, until nothing has arrived for a moment and nothing is in flight, or until
    /// `deadline`. Returns how many forwarded queries were still unanswered then.
    pub async fn drain(self: &Arc<Self>, deadline: Deadline) -> usize {
        let mut batch = ReceivedBatch::default();
        let mut forwarding = Forwarding::default();
        let (readable, idle) = (|| self.socket.readable(), || self.inflight() == 0);
        while let Some(ready) = deadline.next_arrival(readable, idle).await {
            self.on_readable(ready, &mut batch, &mut forwarding);
        }
        self.workers.stop();
        self.inflight()
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    fn inflight(&self) -> usize {
        self.pending.lock().expect("not poisoned").len()
    }

    /// Takes one batch of what is queued on the listener, if `ready`, and forwards it.
    fn on_readable(
        self: &Arc<Self>,
        ready: io::Result<()>,
        batch: &mut ReceivedBatch,
        forwarding: &mut Forwarding,
    ) {
        match ready.and_then(|()| receive_batch(&self.socket, batch)) {
            Ok(_) => self.forward_batch(batch, forwarding),
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
            // Nothing a datagram can do makes recv fail for long; keep serving.
            Err(err) => log::warn!("receiving on {}: {err}", self.local_addr),
        }
    }

    /// Sends the queries of redirected clients in `batch` to their upstreams: registers each,
    /// then sends each run of queries that share a pool socket with one `sendmmsg`. Those the
    /// cache answers are answered first, all with one `sendmmsg`.
    fn forward_batch(self: &Arc<Self>, batch: &ReceivedBatch, forwarding: &mut Forwarding) {
        // One random pool socket for the batch (another where its ID is taken).
        let pick = random();
        let Forwarding { outgoing, hits } = forwarding;
        outgoing.clear();
        for (index, datagram, client) in batch.iter() {
            let arrival = batch.arrival(index);
            if let Some((key, socket)) = self.register_query(datagram, client, arrival, pick, hits)
            {
                outgoing.push(Outgoing { index, socket, key });
            }
        }
        self.send_hits(hits);
        let mut run_start = 0;
        while run_start < outgoing.len() {
            let socket = &outgoing[run_start].socket;
            let run_len = outgoing[run_start..]
                .iter()
                .take_while(|query| query.socket.id == socket.id)
                .count();
            let run = &outgoing[run_start..run_start + run_len];
            mmsg::send_all(
                socket.socket.as_fd(),
                run.len(),
                |i| mmsg::Outgoing {
                    datagram: batch.datagram(run[i].index),
                    to: run[i].key.upstream,
                    from: None,
                },
                |i, err| self.forward_failed(run[i].key, &err),
            );
            run_start += run_len;
        }
    }

    /// A query the kernel would not send: the client retries, as it would after a lost
    /// datagram.
    fn forward_failed(&self, key: PendingKey, err: &io::Error) {
        let stats = &self.stats.udp;
        let pending = self.pending.lock().expect("not poisoned").remove(&key);
        if let Some(mut pending) = pending {
            pending.socket.outstanding.fetch_sub(1, Ordering::Relaxed);
            if let Some(cached) = pending.cached.take() {
                self.settle_cached(*cached, None, pending.recipient(self), false);
            }
        }
        stats.settled(1);
        Stats::add(&stats.upstream_errors);
        let upstream = key.upstream;
        self.upstream_log
            .warn(|failed| format!("sending to {upstream}: {err} ({failed} queries failed)"));
    }

    /// Records a client's datagram, if it is a query of a redirected client, as pending on a
    /// pool socket (the one `pick` chooses if it can); returns its key and socket.
    fn register_query(
        self: &Arc<Self>,
        datagram: &[u8],
        client: SocketAddr,
        arrival: Option<Arrival>,
        pick: u64,
        hits: &mut Vec<CacheHit>,
    ) -> Option<(PendingKey, Arc<PoolSocket>)> {
        let stats = &self.stats.udp;
        Stats::add(&stats.received);
        let (true, Some(id), Some(question)) = (
            wire::is_query(datagram),
            wire::message_id(datagram),
            wire::question(datagram),
        ) else {
            self.drop_malformed(datagram, client);
            return None;
        };
        // sk_lookup already refuses loopback servers' addresses to other namespaces; what
        // came over the loopback device was sent from this one.
        let local = arrival.is_some_and(|at| at.ifindex == LOOPBACK_IFINDEX);
        // The address it was sent to names its server; a listener address names none.
        let reached = arrival.map(|at| SocketAddr::new(at.destination, self.local_addr.port()));
        let Route {
            original,
            cgroup,
            upstream,
            reached,
        } = self.admission.route(client, reached, local)?;
        // Its answer leaves from there, so the client's connected socket takes it.
        let reply_from = reached.ip();
        let started = Instant::now();
        if let Some(log) = &self.settings.query_log {
            log.query(udp_asked(client, original, cgroup), datagram);
        }
        if let Some(workload_stats) = &self.settings.workload_stats {
            workload_stats.query(cgroup);
        }
        let recipient = Recipient {
            cgroup,
            client,
            original,
            reply_from,
            listener: self.shared_listener.as_fd(),
            started,
        };
        let (cached, client_slot) = match self.consult_cache(datagram, recipient, local, hits) {
            FromCache::Handled => return None,
            FromCache::Forward(cached, client_slot) => (Some(cached), client_slot),
            FromCache::NotCached => (None, self.admission.client_slot(client, local)?),
        };
        let within_fair_share = client_slot.within_fair_share(self.settings.max_inflight);
        let pool = match upstream {
            SocketAddr::V4(_) => &self.v4,
            SocketAddr::V6(_) => &self.v6,
        };
        let question = self.question_key(question);
        let description =
            log::log_enabled!(log::Level::Debug).then(|| wire::describe_query(datagram));
        let pending = |socket| Pending {
            socket,
            cgroup,
            client,
            original,
            reply_from,
            question,
            started,
            description,
            cached,
            _client_slot: client_slot,
        };
        self.register(pool, upstream, id, pending, pick, within_fair_share)
    }

    /// Answers `datagram` from the cache if it holds a live answer, or has it wait for an
    /// identical query's answer; otherwise says what its own answer is to do in the cache.
    fn consult_cache(
        &self,
        datagram: &[u8],
        to: Recipient<'_>,
        local: bool,
        hits: &mut Vec<CacheHit>,
    ) -> FromCache {
        let Some(cache) = &self.settings.cache else {
            return FromCache::NotCached;
        };
        let server = self.settings.upstream_override.unwrap_or(to.original);
        let Some(query) = CacheableQuery::parse(server, datagram) else {
            return FromCache::NotCached;
        };
        let stale_kept = match cache.lookup(&query, datagram, true, to.started) {
            Cached::Fresh(answer) => {
                hits.push(CacheHit {
                    answer,
                    cgroup: to.cgroup,
                    client: to.client,
                    original: to.original,
                    reply_from: to.reply_from,
                    started: to.started,
                });
                return FromCache::Handled;
            }
            Cached::Stale { .. } => true,
            Cached::Miss => false,
        };
        let Some(client_slot) = self.admission.client_slot(to.client, local) else {
            return FromCache::Handled;
        };
        let waiter = Waiter {
            cgroup: to.cgroup,
            client: to.client,
            original: to.original,
            reply_from: to.reply_from,
            listener: Arc::clone(&self.shared_listener),
            head: query.head(datagram).into(),
            query,
            started: to.started,
            _client_slot: client_slot,
        };
        let in_flight = &self.settings.in_flight;
        let (waiter, leading) = match in_flight.join(waiter, to.started) {
            Joined::Waits => return FromCache::Handled,
            Joined::ServeStale(waiter) => {
                self.answer_stale(&waiter.query, &waiter.head, waiter.recipient());
                return FromCache::Handled;
            }
            Joined::Leads(waiter) => {
                let key = Some(waiter.query.key.clone());
                let leading = Leading {
                    in_flight: Arc::clone(in_flight),
                    key,
                };
                (waiter, Some(leading))
            }
            Joined::Alone(waiter) => (waiter, None),
        };
        Stats::add(&self.stats.cache_misses);
        let Waiter {
            query,
            head,
            _client_slot,
            ..
        } = *waiter;
        let cached = CachedQuery {
            query,
            head,
            stale_kept,
            served_stale: false,
            leading,
        };
        FromCache::Forward(Box::new(cached), _client_slot)
    }

    /// Sends `to` the stale answer the cache holds for its query, if it still does.
    fn answer_stale(&self, query: &CacheableQuery, head: &[u8], to: Recipient<'_>) {
        let Some(cache) = &self.settings.cache else {
            return;
        };
        match cache.lookup(query, head, true, Instant::now()) {
            // A fresh answer came meanwhile, through another thread.
            Cached::Fresh(answer) => self.send_answer(&answer, to, CacheSource::Hit),
            Cached::Stale { answer, .. } => self.send_answer(&answer, to, CacheSource::Stale),
            // Evicted since: the client retries, as after a loss.
            Cached::Miss => {}
        }
    }

    /// Sends the answers the cache gave a batch's queries, with as few `sendmmsg` as the
    /// kernel takes, and empties `hits`.
    fn send_hits(&self, hits: &mut Vec<CacheHit>) {
        let mut refused = Vec::new();
        mmsg::send_all(
            self.socket.as_fd(),
            hits.len(),
            |i| mmsg::Outgoing {
                datagram: &hits[i].answer,
                to: hits[i].client,
                from: Some(hits[i].reply_from),
            },
            |i, err| {
                // The listener's send buffer is full: the client retries, as after a loss.
                Stats::add(&self.stats.udp.dropped_overload);
                log::debug!("answering {} from the cache: {err}", hits[i].client);
                refused.push(i);
            },
        );
        for (i, hit) in hits.drain(..).enumerate() {
            if refused.contains(&i) {
                continue;
            }
            let to = Recipient {
                cgroup: hit.cgroup,
                client: hit.client,
                original: hit.original,
                reply_from: hit.reply_from,
                listener: self.socket.as_fd(),
                started: hit.started,
            };
            self.answered_here(&hit.answer, to, CacheSource::Hit);
        }
    }

    /// Sends an answer made here (from the cache, or shared from an identical query's) to its
    /// client, from the address its query reached.
    fn send_answer(&self, answer: &[u8], to: Recipient<'_>, source: CacheSource) {
        let mut sent = true;
        mmsg::send_all(
            to.listener,
            1,
            |_| mmsg::Outgoing {
                datagram: answer,
                to: to.client,
                from: Some(to.reply_from),
            },
            |_, err| {
                // The listener's send buffer is full: the client retries, as after a loss.
                Stats::add(&self.stats.udp.dropped_overload);
                log::debug!("answering {} ({}): {err}", to.client, source.as_str());
                sent = false;
            },
        );
        if sent {
            self.answered_here(answer, to, source);
        }
    }

    /// Counts and logs an answer made here that went out.
    fn answered_here(&self, answer: &[u8], to: Recipient<'_>, source: CacheSource) {
        let stats = &self.stats.udp;
        if let Some(resolutions) = &self.settings.resolutions {
            resolutions.record(to.cgroup, answer);
        }
        if let Some(log) = &self.settings.query_log {
            log.response(
                udp_asked(to.client, to.original, to.cgroup),
                to.started,
                answer,
            );
        }
        match source {
            CacheSource::Hit => Stats::add(&self.stats.cache_hits),
            CacheSource::Stale => Stats::add(&self.stats.cache_stale),
            CacheSource::Coalesced => Stats::add(&self.stats.cache_coalesced),
        }
        let latency = to.started.elapsed();
        stats.answered(answer, Some(latency));
        if log::log_enabled!(log::Level::Debug) {
            log::debug!(
                "query udp client={} server={} cache={} {} rcode={} latency={latency:?} workload={}",
                to.client,
                to.original,
                source.as_str(),
                wire::describe_query(answer),
                wire::describe_rcode(answer),
                self.workload_name(to.cgroup),
            );
        }
    }

    /// The end of a query the cache could answer, whose `answer` (or none: it failed or timed
    /// out) came, and whose own client, `to`, had it relayed unless `relayed` is unset: keeps
    /// the answer and shares it with the clients that waited on it. If the upstream failed and
    /// the cache holds a stale answer, that goes to them all instead, and is kept.
    fn settle_cached(
        &self,
        cached: CachedQuery,
        answer: Option<&[u8]>,
        to: Recipient<'_>,
        relayed: bool,
    ) {
        let CachedQuery {
            query,
            head,
            stale_kept,
            served_stale,
            leading,
        } = cached;
        let stale_instead = stale_kept && answer.is_none_or(is_failure);
        if let Some(cache) = &self.settings.cache {
            match answer {
                _ if stale_instead => cache.upstream_failed(&query.key, Instant::now()),
                Some(answer) => _ = cache.store(&query, &head, answer, Instant::now()),
                None => {}
            }
        }
        if stale_instead && !served_stale && !relayed {
            self.answer_stale(&query, &head, to);
        }
        for waiter in leading.map(Leading::finish).unwrap_or_default() {
            let recipient = waiter.recipient();
            if stale_instead {
                self.answer_stale(&waiter.query, &waiter.head, recipient);
            } else if let Some(shared) = answer.and_then(|answer| {
                cache::shared_answer(answer, &head, &waiter.query, &waiter.head, true)
            }) {
                self.send_answer(&shared, recipient, CacheSource::Coalesced);
            }
        }
    }

    /// The name of cgroup `id`'s workload, for the log.
    fn workload_name(&self, id: u64) -> Arc<str> {
        WorkloadNames::name_in(self.settings.workloads.as_deref(), id)
    }

    fn drop_malformed(&self, datagram: &[u8], client: SocketAddr) {
        Stats::add(&self.stats.udp.dropped_malformed);
        log::debug!(
            "dropping {} bytes from {client}: not a DNS query",
            datagram.len()
        );
    }

    /// Starts relaying the answers that arrive on `socket`.
    fn spawn_reader(self: &Arc<Self>, socket: &Arc<PoolSocket>) {
        let (proxy, reader) = (Arc::clone(self), Arc::clone(socket));
        tokio::spawn(async move { proxy.relay_answers(&reader).await });
    }

    /// Records a query as pending on the pool socket `pick` chooses or, if a query of the same
    /// ID to the same upstream is in flight there, the next free one, and returns its key and
    /// socket. The socket first chosen is replaced by a fresh one if it has carried its share.
    /// `None` (counted) at the in-flight limit, or with no socket to use.
    fn register(
        self: &Arc<Self>,
        pool: &Pool,
        upstream: SocketAddr,
        id: u16,
        pending: impl FnOnce(Arc<PoolSocket>) -> Pending,
        pick: u64,
        within_fair_share: bool,
    ) -> Option<(PendingKey, Arc<PoolSocket>)> {
        let stats = &self.stats.udp;
        let mut slots = pool.slots.lock().expect("not poisoned");
        if slots.len() < POOL_SIZE {
            match PoolSocket::open(&self.next_socket_id, pool.any) {
                Ok(fresh) => {
                    self.spawn_reader(&fresh);
                    slots.push(fresh);
                }
                // No IPv6 on the host, or out of descriptors or ports.
                Err(err) if slots.is_empty() => {
                    drop(slots);
                    Stats::add(&stats.upstream_errors);
                    self.upstream_log.warn(|failed| {
                        format!("no socket for {upstream}: {err} ({failed} queries failed)")
                    });
                    return None;
                }
                Err(err) => log::debug!("opening another upstream socket: {err}"),
            }
        }
        let start = (pick % slots.len() as u64) as usize;
        if slots[start].uses.load(Ordering::Relaxed) >= USES_PER_SOCKET {
            match PoolSocket::open(&self.next_socket_id, pool.any) {
                Ok(fresh) => {
                    self.spawn_reader(&fresh);
                    let old = std::mem::replace(&mut slots[start], fresh);
                    old.retired.store(true, Ordering::Relaxed);
                }
                // Out of descriptors, say: keep using the old one for now.
                Err(err) => log::debug!("replacing an upstream socket: {err}"),
            }
        }
        let mut table = self.pending.lock().expect("not poisoned");
        // The limit is the agent's, over all UDP threads (which may pass it by one each). A
        // client within its fair share passes it, up to twice the limit.
        let inflight = stats.inflight.load(Ordering::Relaxed) as usize;
        let max = self.settings.max_inflight;
        if inflight < max || (within_fair_share && inflight < 2 * max) {
            for offset in 0..slots.len() {
                let socket = &slots[(start + offset) % slots.len()];
                let key = PendingKey {
                    socket: socket.id,
                    upstream,
                    id,
                };
                if let Entry::Vacant(entry) = table.entry(key) {
                    // Counted under the lock, so its answer cannot be counted first.
                    stats.forwarding();
                    entry.insert(pending(Arc::clone(socket)));
                    socket.uses.fetch_add(1, Ordering::Relaxed);
                    socket.outstanding.fetch_add(1, Ordering::Relaxed);
                    return Some((key, Arc::clone(socket)));
                }
            }
        }
        drop(table);
        drop(slots);
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

    /// Relays the answers that arrive on a pool socket to their clients, until the proxy stops
    /// or, once the socket is retired, until nothing sent from it is outstanding.
    async fn relay_answers(&self, pool_socket: &PoolSocket) {
        let (id, socket) = (pool_socket.id, &pool_socket.socket);
        // One timer for the reader's life, not one per wake-up.
        let mut retired_check = tokio::time::interval(RETIRED_CHECK);
        retired_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            if pool_socket.retired.load(Ordering::Relaxed)
                && pool_socket.outstanding.load(Ordering::Relaxed) == 0
            {
                return;
            }
            tokio::select! {
                () = self.workers.stopped() => return,
                // It may be retired while it waits here.
                _ = retired_check.tick() => continue,
                ready = socket.readable() => if let Err(err) = ready {
                    log::warn!("upstream socket {id}: {err}");
                    return;
                },
            }
            ANSWERS.with_borrow_mut(|answers| {
                match receive_batch(socket, &mut answers.received) {
                    Ok(_) => self.relay_batch(id, answers),
                    Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
                    // An ICMP error from an earlier send, say: nothing to relay.
                    Err(err) => log::debug!("upstream socket {id}: {err}"),
                }
            });
        }
    }

    /// Relays the datagrams of `answers.received`, which arrived on pool socket `socket`, that
    /// answer pending queries: all of them with as few `sendmmsg` as the kernel takes.
    fn relay_batch(&self, socket: u64, answers: &mut Answers) {
        let Answers { received, matched } = answers;
        matched.clear();
        // Answers that refresh the cache, or that a stale answer replaces: not relayed.
        let mut not_relayed = Vec::new();
        for (index, datagram, from) in received.iter() {
            if let Some(pending) = self.match_answer(socket, datagram, from) {
                if pending
                    .cached
                    .as_ref()
                    .is_none_or(|cached| cached.relays(datagram))
                {
                    matched.push((index, from, pending));
                } else {
                    not_relayed.push((index, pending));
                }
            }
        }
        for (index, mut pending) in not_relayed {
            if let Some(cached) = pending.cached.take() {
                let datagram = received.datagram(index);
                self.settle_cached(*cached, Some(datagram), pending.recipient(self), false);
            }
        }
        let stats = &self.stats.udp;
        let mut refused = Vec::new();
        mmsg::send_all(
            self.socket.as_fd(),
            matched.len(),
            |i| mmsg::Outgoing {
                datagram: received.datagram(matched[i].0),
                to: matched[i].2.client,
                from: Some(matched[i].2.reply_from),
            },
            |i, err| {
                // The listener's send buffer is full: the client retries, as after a loss.
                Stats::add(&stats.dropped_overload);
                log::debug!("relaying to {}: {err}", matched[i].2.client);
                refused.push(i);
            },
        );
        for (i, (index, from, mut pending)) in matched.drain(..).enumerate() {
            let datagram = received.datagram(index);
            let relayed = !refused.contains(&i);
            if let Some(cached) = pending.cached.take() {
                self.settle_cached(*cached, Some(datagram), pending.recipient(self), relayed);
            }
            if !relayed {
                continue;
            }
            let latency = pending.started.elapsed();
            stats.answered(datagram, Some(latency));
            if let Some(log) = &self.settings.query_log {
                let asked = udp_asked(pending.client, pending.original, pending.cgroup);
                log.response(asked, pending.started, datagram);
            }
            if let Some(resolutions) = &self.settings.resolutions {
                resolutions.record(pending.cgroup, datagram);
            }
            if let Some(description) = pending.description {
                log::debug!(
                    "query udp client={} server={} upstream={from} {description} rcode={} latency={latency:?} workload={}",
                    pending.client,
                    pending.original,
                    wire::describe_rcode(datagram),
                    self.workload_name(pending.cgroup),
                );
            }
        }
    }

    /// The pending query that `datagram`, from `from` on pool socket `socket`, answers, taken
    /// out of the table; `None` (counted) if it answers none.
    fn match_answer(&self, socket: u64, datagram: &[u8], from: SocketAddr) -> Option<Pending> {
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
            Stats::add(&stats.dropped_stray);
            self.stray_log.warn(|dropped| {
                format!("dropped {dropped} datagrams on upstream sockets that answer no query in flight (late, or spoofed)")
            });
            return None;
        };
        stats.settled(1);
        pending.socket.outstanding.fetch_sub(1, Ordering::Relaxed);
        Some(pending)
    }

    /// The keyed hash of a question that the answer check compares.
    fn question_key(&self, question: &[u8]) -> u64 {
        let mut hasher = self.question_hasher.build_hasher();
        wire::hash_question(question, &mut hasher);
        std::hash::Hasher::finish(&hasher)
    }

    /// Forgets, every so often, the queries not answered within the upstream timeout. Their
    /// clients time out, as they would have without the proxy, unless the cache holds a stale
    /// answer for them (`--serve-stale`): they get it once they have waited [`STALE_AFTER`].
    async fn expire_unanswered(&self) {
        let timeout = self.settings.upstream_timeout;
        let every = (timeout / 10).clamp(Duration::from_millis(10), Duration::from_millis(250));
        let mut ticks = tokio::time::interval(every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if self.workers.unless_stopped(ticks.tick()).await.is_none() {
                return;
            }
            let now = Instant::now();
            let (expired, overdue) = {
                let mut table = self.pending.lock().expect("not poisoned");
                let expired: Vec<(PendingKey, Pending)> = table
                    .extract_if(|_, pending| now.duration_since(pending.started) >= timeout)
                    .collect();
                let overdue: Vec<Overdue<'_>> = table
                    .values_mut()
                    .filter_map(|pending| {
                        let to = pending.recipient(self);
                        let cached = pending.cached.as_mut()?;
                        if !cached.stale_kept
                            || cached.served_stale
                            || now.duration_since(pending.started) < STALE_AFTER
                        {
                            return None;
                        }
                        cached.served_stale = true;
                        // Late enough to count as failing: a TCP retry (the stale answer may
                        // come truncated) is answered stale too.
                        if let Some(cache) = &self.settings.cache {
                            cache.upstream_failed(&cached.query.key, now);
                        }
                        let waiters = cached
                            .leading
                            .as_ref()
                            .map(Leading::serve_stale)
                            .unwrap_or_default();
                        Some(Overdue {
                            to,
                            query: cached.query.clone(),
                            head: cached.head.clone(),
                            waiters,
                        })
                    })
                    .collect();
                (expired, overdue)
            };
            for Overdue {
                to,
                query,
                head,
                waiters,
            } in overdue
            {
                self.answer_stale(&query, &head, to);
                for waiter in waiters {
                    self.answer_stale(&waiter.query, &waiter.head, waiter.recipient());
                }
            }
            let stats = &self.stats.udp;
            for (key, mut pending) in expired {
                pending.socket.outstanding.fetch_sub(1, Ordering::Relaxed);
                Stats::add(&stats.upstream_timeouts);
                if let Some(description) = &pending.description {
                    log::debug!(
                        "query udp client={} upstream={} {description} timed out after {timeout:?} workload={}",
                        pending.client,
                        key.upstream,
                        self.workload_name(pending.cgroup),
                    );
                }
                if let Some(cached) = pending.cached.take() {
                    self.settle_cached(*cached, None, pending.recipient(self), false);
                }
                stats.settled(1);
            }
        }
    }
}
