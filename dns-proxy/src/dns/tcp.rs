//! The TCP listener: each redirected connection is relayed, message by message, over a
//! connection of its own to the server its client asked for.
//!
//! Both directions run independently, so a client may pipeline queries and the server may
//! answer them in any order (RFC 7766). Messages are relayed unaltered; only their framing and
//! headers are read. Each connection is one task: a client that stalls (stops reading, or
//! sends half a message) holds up nobody else, and the watchdog closes it.
//!
//! With the cache on, a query it holds a live answer for is answered from it, in full (the
//! retry of a client whose UDP answer was truncated, say), and the upstream's answers are kept.
use std::{
    collections::HashMap,
    io,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, BufReader},
    net::{TcpListener, TcpStream},
    sync::{Mutex as AsyncMutex, Notify, Semaphore},
    time::timeout,
};
use tokio_util::task::TaskTracker;

use super::{
    Moment, OriginalDestinations,
    admission::{Admission, Route, Transport},
    cache::{Cache, CacheableQuery, Cached},
    observers::Observers,
    per_client::PerClientLimit,
    query_log::Asked,
    stats::Stats,
    transfer::Transfer,
    wire,
};
use crate::{
    drain::{self, Deadline},
    log_limit::RateLimited,
};

/// Queries one connection may have waiting for answers; past it, the proxy stops reading from
/// that client until answers come back (backpressure, and a bound on what it keeps).
const MAX_PIPELINED: usize = 64;

/// The longest a server's edns-tcp-keepalive keeps a connection idle here: a workload picks
/// its server, and with it how long its idle connections would hold the agent's.
const MAX_KEEPALIVE: Duration = Duration::from_secs(300);

#[derive(Debug, Clone)]
pub struct TcpSettings {
    pub upstream_override: Option<SocketAddr>,
    /// Connecting to the upstream, and waiting for an answer, may take this long.
    pub upstream_timeout: Duration,
    /// A connection with nothing outstanding is closed after this long without a message.
    pub idle_timeout: Duration,
    pub max_connections: usize,
    /// Connections open per client address.
    pub per_client: Arc<PerClientLimit>,
    /// The answer cache (`--cache-size`), shared with UDP; `None`: off.
    pub cache: Option<Arc<Cache>>,
    /// Who hears of each query and answer: the log, the names table, the counts by workload.
    pub observers: Observers,
}

pub struct TcpProxy<D> {
    listener: TcpListener,
    local_addr: SocketAddr,
    admission: Admission<D>,
    settings: TcpSettings,
    connections: Arc<Semaphore>,
    /// As many again, for clients within their fair share when `connections` is taken: a few
    /// clients holding every connection cannot keep the others out.
    fair_share_room: Arc<Semaphore>,
    tasks: TaskTracker,
    /// Sent at shutdown: connections close once nothing is outstanding.
    draining: drain::Signal,
    stats: Arc<Stats>,
    overload_log: RateLimited,
}

/// Why a relayed connection ended, for the debug log.
#[derive(Debug)]
enum Closed {
    ByClient,
    ByUpstream,
    Idle,
    UpstreamTimeout,
    ClientStalled,
    Draining,
    MalformedQuery,
    ClientError(io::Error),
    UpstreamError(io::Error),
}

impl std::fmt::Display for Closed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::ByClient => f.write_str("by the client"),
            Self::ByUpstream => f.write_str("by the upstream"),
            Self::Idle => f.write_str("idle"),
            Self::UpstreamTimeout => f.write_str("the upstream did not answer in time"),
            Self::ClientStalled => f.write_str("the client stopped reading its answers"),
            Self::Draining => f.write_str("shutting down"),
            Self::MalformedQuery => {
                f.write_str("the client sent something that is not a DNS query")
            }
            Self::ClientError(err) => write!(f, "client error: {err}"),
            Self::UpstreamError(err) => write!(f, "upstream error: {err}"),
        }
    }
}

/// A query waiting for its answer.
struct Pending {
    started: Instant,
    /// "name=... type=..." when debug logging is on.
    description: Option<String>,
    /// Its key in the cache, whose answer is kept there, and its header and question; `None`
    /// with the cache off, or for a query the cache does not answer.
    cacheable: Option<(CacheableQuery, Box<[u8]>)>,
    /// For a zone transfer (AXFR, IXFR), how far its answer has come: the query is pending
    /// until its last message.
    transfer: Option<Transfer>,
}

/// What both directions of one connection share.
struct Connection {
    /// The cgroup that connected (0: not recorded).
    cgroup: u64,
    client: SocketAddr,
    original: SocketAddr,
    upstream: SocketAddr,
    pending: Mutex<HashMap<u16, Pending>>,
    slots: Semaphore,
    last_activity: Mutex<Instant>,
    client_done: std::sync::atomic::AtomicBool,
    /// A query has begun to arrive and is not yet on its way: a drain must wait for it.
    reading: std::sync::atomic::AtomicBool,
    /// The client sent a query with an ID still in flight: answers to its queries cannot be
    /// told apart for sure from then on, so none is kept in the cache.
    reuses_ids: std::sync::atomic::AtomicBool,
    /// How long the server last told the client it may leave the connection idle
    /// (edns-tcp-keepalive, RFC 7828), in units of 100 ms; 0: it did not say.
    keepalive: std::sync::atomic::AtomicU16,
    /// The client asked for edns-tcp-keepalive: only then is the server's heeded.
    asked_keepalive: std::sync::atomic::AtomicBool,
    changed: Notify,
}

impl Connection {
    /// What the query log says of this connection's queries.
    fn asked(&self) -> Asked {
        Asked {
            transport: crate::dnstap::Transport::Tcp,
            client: self.client,
            server: self.original,
            cgroup: self.cgroup,
        }
    }

    fn new(cgroup: u64, client: SocketAddr, original: SocketAddr, upstream: SocketAddr) -> Self {
        Self {
            cgroup,
            client,
            original,
            upstream,
            pending: Mutex::default(),
            slots: Semaphore::new(MAX_PIPELINED),
            last_activity: Mutex::new(Instant::now()),
            client_done: false.into(),
            reading: false.into(),
            reuses_ids: false.into(),
            keepalive: 0.into(),
            asked_keepalive: false.into(),
            changed: Notify::new(),
        }
    }

    fn touch(&self) {
        *self.last_activity.lock().expect("not poisoned") = Instant::now();
        self.changed.notify_one();
    }

    fn outstanding(&self) -> usize {
        self.pending.lock().expect("not poisoned").len()
    }

    fn finished(&self) -> bool {
        self.client_done.load(std::sync::atomic::Ordering::Relaxed) && self.outstanding() == 0
    }

    fn set_reading(&self, reading: bool) {
        self.reading
            .store(reading, std::sync::atomic::Ordering::Relaxed);
        self.touch();
    }

    fn is_reading(&self) -> bool {
        self.reading.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Takes an answer off the table: the query it answers, once answered in full (at a zone
    /// transfer's last message), and when that query was asked if this is its first answer.
    fn settle(&self, id: u16, answer: &[u8]) -> (Option<Pending>, Option<Instant>) {
        let mut table = self.pending.lock().expect("not poisoned");
        let Some(pending) = table.get_mut(&id) else {
            return (None, None);
        };
        let first = pending.transfer.as_ref().is_none_or(Transfer::not_begun);
        let started = first.then_some(pending.started);
        let over = (pending.transfer.as_mut()).is_none_or(|transfer| transfer.took(answer));
        (if over { table.remove(&id) } else { None }, started)
    }

    /// Notes how long `answer`'s server says the client may leave the connection idle, if the
    /// client asked: the client sees that, relayed, and may idle on it.
    fn note_keepalive(&self, answer: &[u8]) {
        if !self
            .asked_keepalive
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            return;
        }
        if let Some(timeout) = wire::tcp_keepalive(answer) {
            self.keepalive
                .store(timeout, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// How long the connection may stay idle: `configured`, or longer if the server promised
    /// the client more, up to [`MAX_KEEPALIVE`].
    fn idle_limit(&self, configured: Duration) -> Duration {
        let promised = self.keepalive.load(std::sync::atomic::Ordering::Relaxed);
        let promised = Duration::from_millis(100 * u64::from(promised)).min(MAX_KEEPALIVE);
        configured.max(promised)
    }
}

impl<D: OriginalDestinations> TcpProxy<D> {
    pub fn new(
        listener: TcpListener,
        destinations: D,
        settings: TcpSettings,
        stats: Arc<Stats>,
    ) -> io::Result<Arc<Self>> {
        let local_addr = listener.local_addr()?;
        let (upstream, per_client) = (settings.upstream_override, &settings.per_client);
        let admission = Admission::new(Transport::Tcp, destinations, upstream, per_client, &stats);
        Ok(Arc::new(Self {
            listener,
            local_addr,
            admission,
            connections: Arc::new(Semaphore::new(settings.max_connections)),
            fair_share_room: Arc::new(Semaphore::new(settings.max_connections)),
            settings,
            tasks: TaskTracker::new(),
            draining: drain::Signal::new(),
            stats,
            overload_log: RateLimited::new(Duration::from_secs(10)),
        }))
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Accepts connections until `stop` is sent.
    pub async fn serve(self: &Arc<Self>, stop: drain::Signal) {
        while let Some(accepted) = stop.unless_stopped(self.listener.accept()).await {
            self.on_accepted(accepted).await;
        }
    }

    /// Graceful end: keeps accepting the connections redirected before the redirect was
    /// switched off, lets every connection finish what it has outstanding, and closes it.
    /// Returns how many connections were still open at `deadline`.
    pub async fn drain(self: &Arc<Self>, deadline: Deadline) -> usize {
        self.draining.stop();
        let (accept, idle) = (|| self.listener.accept(), || self.tasks.is_empty());
        while let Some(accepted) = deadline.next_arrival(accept, idle).await {
            self.on_accepted(accepted).await;
        }
        self.tasks.close();
        deadline.within(self.tasks.wait()).await;
        self.tasks.len()
    }

    async fn on_accepted(self: &Arc<Self>, accepted: io::Result<(TcpStream, SocketAddr)>) {
        match accepted {
            Ok((stream, client)) => self.handle(stream, client),
            Err(err) => {
                // Out of file descriptors, typically: back off instead of spinning.
                log::warn!("accepting on {}/tcp: {err}", self.local_addr);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    fn handle(self: &Arc<Self>, stream: TcpStream, client: SocketAddr) {
        Stats::add(&self.stats.tcp_connections);
        let stats = &self.stats.tcp;
        // The connection's local address is the one its client was sent to: it names the
        // server. sk_lookup hands the proxy a connection to a loopback server's address only
        // from this namespace: the kernel has checked where it came from.
        let reached = stream.local_addr().ok();
        let Some(Route {
            original,
            cgroup,
            upstream,
            ..
        }) = self.admission.route(client, reached, true)
        else {
            return;
        };
        // The agent's own namespace is one client, whatever local address it sends from.
        let local = self.admission.is_local_client(client.ip());
        let Some(client_slot) = self.admission.client_slot(client, cgroup, local) else {
            return;
        };
        // At the limit, a client holding less than its fair share (the limit divided among the
        // clients holding connections) is still let in, up to twice the limit (as UDP does).
        let max = self.settings.max_connections;
        let permit = match self.connections.clone().try_acquire_owned() {
            Ok(permit) => Some(permit),
            Err(_) if client_slot.within_fair_share(max) => {
                self.fair_share_room.clone().try_acquire_owned().ok()
            }
            Err(_) => None,
        };
        let Some(permit) = permit else {
            Stats::add(&stats.dropped_overload);
            self.overload_log.warn(|dropped| {
                format!(
                    "{} TCP connections open (--max-tcp-connections): refused {dropped}",
                    self.settings.max_connections
                )
            });
            return;
        };
        let proxy = Arc::clone(self);
        self.tasks.spawn(async move {
            let connection = Connection::new(cgroup, client, original, upstream);
            let closed = proxy.relay(stream, &connection).await;
            log::debug!("TCP connection client={client} server={original} upstream={upstream} closed: {closed}");
            drop((permit, client_slot));
        });
    }

    async fn relay(&self, client_stream: TcpStream, conn: &Connection) -> Closed {
        let stats = &self.stats.tcp;
        let connecting = timeout(
            self.settings.upstream_timeout,
            TcpStream::connect(conn.upstream),
        );
        let upstream_stream = match connecting.await {
            Ok(Ok(stream)) => stream,
            Ok(Err(err)) => {
                Stats::add(&stats.upstream_errors);
                reset(&client_stream);
                return Closed::UpstreamError(err);
            }
            Err(_elapsed) => {
                Stats::add(&stats.upstream_timeouts);
                return Closed::UpstreamTimeout;
            }
        };
        // Each message goes out in one write; don't let Nagle hold it back.
        let _ = client_stream.set_nodelay(true);
        let _ = upstream_stream.set_nodelay(true);
        let (mut client_read, mut client_write) = client_stream.into_split();
        let (upstream_read, upstream_write) = upstream_stream.into_split();
        let closed = self
            .relay_streams(
                conn,
                (&mut client_read, &mut client_write),
                (upstream_read, upstream_write),
            )
            .await;
        if let Closed::UpstreamError(_) = closed
            && let Ok(client_stream) = client_read.reunite(client_write)
        {
            reset(&client_stream);
        }
        closed
    }

    /// Relays one connection between its client's and its upstream's streams until either
    /// side ends it, then settles what is left.
    async fn relay_streams(
        &self,
        conn: &Connection,
        (client_read, client_write): (impl AsyncRead + Unpin, impl AsyncWrite + Unpin),
        (upstream_read, upstream_write): (impl AsyncRead + Unpin, impl AsyncWrite + Unpin),
    ) -> Closed {
        let stats = &self.stats.tcp;
        // Biased: what the client has sent is read before the watchdog may end a draining
        // connection, so a query that arrived is never closed on.
        // Written by both directions: the upstream's answers, and the cache's.
        let client_write = AsyncMutex::new(client_write);
        let closed = tokio::select! {
            biased;
            closed = self.queries(conn, BufReader::new(client_read), upstream_write, &client_write) => closed,
            closed = self.answers(conn, BufReader::new(upstream_read), &client_write) => closed,
            closed = self.watchdog(conn, &client_write) => closed,
        };
        // Queries still waiting will never be answered now.
        stats.settled(conn.outstanding() as u64);
        match &closed {
            Closed::UpstreamTimeout => Stats::add(&stats.upstream_timeouts),
            Closed::ClientStalled => Stats::add(&stats.dropped_stalled),
            Closed::UpstreamError(_) | Closed::ByUpstream if conn.outstanding() > 0 => {
                Stats::add(&stats.upstream_errors)
            }
            _ => {}
        }
        closed
    }

    /// Client to upstream: one framed query at a time, checked, then written whole (or
    /// answered from the cache, through `client_write`).
    async fn queries(
        &self,
        conn: &Connection,
        mut client: impl AsyncRead + Unpin,
        mut upstream: impl AsyncWrite + Unpin,
        client_write: &AsyncMutex<impl AsyncWrite + Unpin>,
    ) -> Closed {
        let stats = &self.stats.tcp;
        loop {
            let Ok(slot) = conn.slots.acquire().await else {
                return Closed::ByClient;
            };
            let first = match read_first_byte(&mut client).await {
                Ok(Some(first)) => first,
                Ok(None) => {
                    // The client sent all it will; its answers may still be on their way.
                    conn.client_done
                        .store(true, std::sync::atomic::Ordering::Relaxed);
                    conn.changed.notify_one();
                    return std::future::pending().await;
                }
                Err(err) => return Closed::ClientError(err),
            };
            conn.set_reading(true);
            let query = match read_rest(first, &mut client).await {
                Ok(query) => query,
                Err(err) => return Closed::ClientError(err),
            };
            Stats::add(&stats.received);
            if !wire::is_query(&query) {
                Stats::add(&stats.dropped_malformed);
                return Closed::MalformedQuery;
            }
            if wire::asks_tcp_keepalive(&query) {
                conn.asked_keepalive
                    .store(true, std::sync::atomic::Ordering::Relaxed);
            }
            let arrived = Moment::now();
            let started = arrived.instant;
            self.settings.observers.asked(conn.asked(), &query, arrived);
            let cacheable = match self.consult_cache(conn, &query, started) {
                Some(Ok((answer, stale))) => {
                    conn.set_reading(false);
                    let mut client_write = client_write.lock().await;
                    if let Err(err) = write_message(&mut *client_write, &answer).await {
                        return Closed::ClientError(err);
                    }
                    drop(client_write);
                    self.answered_from_cache(conn, &answer, stale, started);
                    continue;
                }
                Some(Err(cacheable)) => {
                    let head = cacheable.head(&query).into();
                    Some((cacheable, head))
                }
                None => None,
            };
            slot.forget(); // given back when its answer arrives
            let id = wire::message_id(&query).unwrap_or_default();
            let description =
                log::log_enabled!(log::Level::Debug).then(|| wire::describe_query(&query));
            let mut pending = Pending {
                started,
                description,
                cacheable,
                transfer: Transfer::for_query(&query),
            };
            // A client reusing an ID it is still waiting on replaces that query. Nothing tells
            // their answers apart (the first answer may be the first query's, and kept under
            // this one's key it would be served to others), nor, while answers to the earlier
            // ones may still come, those of its later queries: from then on none of this
            // connection's answers is kept in the cache.
            let replaced = {
                let mut table = conn.pending.lock().expect("not poisoned");
                if table.contains_key(&id) {
                    conn.reuses_ids
                        .store(true, std::sync::atomic::Ordering::Relaxed);
                }
                if conn.reuses_ids.load(std::sync::atomic::Ordering::Relaxed) {
                    pending.cacheable = None;
                }
                table.insert(id, pending)
            };
            if replaced.is_some() {
                // Its slot too: only one answer will find this ID now.
                stats.settled(1);
                conn.slots.add_permits(1);
            }
            stats.forwarding();
            conn.set_reading(false);
            if let Err(err) = write_message(&mut upstream, &query).await {
                return Closed::UpstreamError(err);
            }
        }
    }

    /// With the cache on, for a query it could answer: `Ok` with its answer (and whether it
    /// is stale), or `Err` with the key the upstream's answer is to be kept under. `None`: off,
    /// or not for such a query.
    ///
    /// A stale answer (`--serve-stale`) is served here only while the upstream is known to
    /// be failing (it failed to refresh it in the last 30 s): the retry of a UDP client whose
    /// stale answer came truncated, say. Otherwise the upstream is asked.
    fn consult_cache(
        &self,
        conn: &Connection,
        query: &[u8],
        now: Instant,
    ) -> Option<Result<(Vec<u8>, bool), CacheableQuery>> {
        let cache = self.settings.cache.as_ref()?;
        let server = self.settings.upstream_override.unwrap_or(conn.original);
        let cacheable = CacheableQuery::parse(server, query)?;
        match cache.lookup(&cacheable, query, false, now) {
            Cached::Fresh(answer) => Some(Ok((answer, false))),
            Cached::Stale {
                answer,
                upstream_failing: true,
            } => Some(Ok((answer, true))),
            Cached::Stale { .. } | Cached::Miss => {
                Stats::add(&self.stats.cache_misses);
                Some(Err(cacheable))
            }
        }
    }

    /// The name of cgroup `id`'s workload, for the log.
    fn workload_name(&self, id: u64) -> Arc<str> {
        self.settings.observers.workload_name(id)
    }

    fn answered_from_cache(&self, conn: &Connection, answer: &[u8], stale: bool, started: Instant) {
        conn.touch();
        let now = Moment::now();
        let latency = now.instant.saturating_duration_since(started);
        self.settings
            .observers
            .answered(conn.asked(), Some(latency), answer, now);
        Stats::add(if stale {
            &self.stats.cache_stale
        } else {
            &self.stats.cache_hits
        });
        self.stats.tcp.answered(answer, Some(latency));
        if log::log_enabled!(log::Level::Debug) {
            log::debug!(
                "query tcp client={} server={} cache={} {} rcode={} latency={latency:?} workload={}",
                conn.client,
                conn.original,
                if stale { "stale" } else { "hit" },
                wire::describe_query(answer),
                wire::describe_rcode(answer),
                self.workload_name(conn.cgroup),
            );
        }
    }

    /// Upstream to client: every framed answer, unaltered, in the order the server sends them.
    async fn answers(
        &self,
        conn: &Connection,
        mut upstream: impl AsyncRead + Unpin,
        client: &AsyncMutex<impl AsyncWrite + Unpin>,
    ) -> Closed {
        let stats = &self.stats.tcp;
        loop {
            let answer = match read_message(&mut upstream).await {
                Ok(Some(answer)) => answer,
                Ok(None) => return Closed::ByUpstream,
                Err(err) => return Closed::UpstreamError(err),
            };
            let id = wire::message_id(&answer).unwrap_or_default();
            // A zone transfer's query stays pending until its last message.
            let (pending, started) = conn.settle(id, &answer);
            if pending.is_some() {
                conn.slots.add_permits(1);
                stats.settled(1);
            }
            conn.touch();
            if let Err(err) = write_message(&mut *client.lock().await, &answer).await {
                return Closed::ClientError(err);
            }
            // Written: a draining watchdog, which waits while an answer is being written,
            // looks again.
            conn.touch();
            conn.note_keepalive(&answer);
            let now = Moment::now();
            let latency = started.map(|started| now.instant.saturating_duration_since(started));
            stats.answered(&answer, latency);
            self.settings
                .observers
                .answered(conn.asked(), latency, &answer, now);
            if let (
                Some(cache),
                Some(Pending {
                    cacheable: Some((cacheable, head)),
                    ..
                }),
            ) = (&self.settings.cache, &pending)
            {
                cache.store(cacheable, head, &answer, now.instant);
            }
            if let Some(Pending {
                description: Some(description),
                started,
                ..
            }) = pending
            {
                // A transfer's: from its query to its last message.
                log::debug!(
                    "query tcp client={} server={} upstream={} {description} rcode={} latency={:?} workload={}",
                    conn.client,
                    conn.original,
                    conn.upstream,
                    wire::describe_rcode(&answer),
                    now.instant.saturating_duration_since(started),
                    self.workload_name(conn.cgroup),
                );
            }
            if conn.finished() {
                return Closed::ByClient;
            }
        }
    }

    /// Ends the connection when it has been idle too long, when an answer is overdue, when the
    /// client is done and answered, or at shutdown once nothing is outstanding, nothing is
    /// being read and the client has been quiet for a moment, or the drain has gone on for
    /// that moment (a query it already sent is answered first).
    async fn watchdog(
        &self,
        conn: &Connection,
        client_write: &AsyncMutex<impl AsyncWrite + Unpin>,
    ) -> Closed {
        // When this connection first saw the drain.
        let mut draining_since = None;
        loop {
            if conn.finished() {
                return Closed::ByClient;
            }
            let outstanding = conn.outstanding();
            let last = *conn.last_activity.lock().expect("not poisoned");
            if self.draining.is_stopped() && draining_since.is_none() {
                draining_since = Some(Instant::now());
            }
            // An answer being written holds the client's writer (a slow client's buffer may
            // be full): it is not a gap.
            let writing = client_write.try_lock().is_err();
            let may_drain =
                draining_since.is_some() && outstanding == 0 && !conn.is_reading() && !writing;
            // A client that keeps asking is never quiet for a moment: once the drain has gone
            // on that long, its connection closes at the first gap between an answer and its
            // next query (anything it sent before is read first: the select is biased), and
            // it asks again on a new one, as RFC 7766 clients do, instead of losing a query
            // at the drain's deadline.
            let waited = draining_since.is_some_and(|since| since.elapsed() >= drain::QUIET);
            if may_drain && (last.elapsed() >= drain::QUIET || waited) {
                return Closed::Draining;
            }
            let (limit, why) = if outstanding > 0 {
                (self.settings.upstream_timeout, Closed::UpstreamTimeout)
            } else {
                (conn.idle_limit(self.settings.idle_timeout), Closed::Idle)
            };
            let deadline = tokio::time::Instant::from_std(last + limit);
            let wake = match draining_since {
                Some(since) if may_drain => deadline
                    .min(tokio::time::Instant::from_std(last + drain::QUIET))
                    .min(tokio::time::Instant::from_std(since + drain::QUIET)),
                _ => deadline,
            };
            tokio::select! {
                () = tokio::time::sleep_until(wake) => {
                    if wake == deadline
                        && *conn.last_activity.lock().expect("not poisoned") == last
                    {
                        // An answer still being written all this time: the client stopped
                        // reading, and the upstream's answers wait behind it.
                        if client_write.try_lock().is_err() {
                            return Closed::ClientStalled;
                        }
                        return why;
                    }
                }
                () = conn.changed.notified() => {}
                () = self.draining.stopped(), if !self.draining.is_stopped() => {}
            }
        }
    }
}

#[cfg(feature = "fuzzing")]
impl<D: OriginalDestinations> TcpProxy<D> {
    /// For the fuzz targets: relays one connection between in-memory streams, as a real one
    /// is once both sides are connected; returns why it ended.
    pub async fn fuzz_relay(
        &self,
        client: (impl AsyncRead + Unpin, impl AsyncWrite + Unpin),
        upstream: (impl AsyncRead + Unpin, impl AsyncWrite + Unpin),
    ) -> String {
        let server = ([192, 0, 2, 2], 53).into();
        let connection = Connection::new(0, ([192, 0, 2, 1], 40000).into(), server, server);
        let closed = self.relay_streams(&connection, client, upstream).await;
        closed.to_string()
    }

    /// For the fuzz targets: TCP queries counted as in flight.
    pub fn fuzz_inflight(&self) -> u64 {
        self.stats
            .tcp
            .inflight
            .load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Makes closing `stream` send a reset instead of an orderly end: an upstream that refused or
/// reset its connection is shown to the client as a connection that failed, not one the
/// server closed in good order after answering.
fn reset(stream: &TcpStream) {
    let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

/// Reads one length-prefixed DNS message; `None` on a clean end of stream between messages.
/// (Public for the fuzz targets, which feed it arbitrary streams.)
pub async fn read_message(reader: &mut (impl AsyncRead + Unpin)) -> io::Result<Option<Vec<u8>>> {
    match read_first_byte(reader).await? {
        Some(first) => read_rest(first, reader).await.map(Some),
        None => Ok(None),
    }
}

/// The first byte of a message; `None` on a clean end of stream. Only an end before it is
/// clean: one inside the length prefix is a stream cut mid-message, as one inside the message
/// is (found by the tcp_framing fuzz target).
async fn read_first_byte(reader: &mut (impl AsyncRead + Unpin)) -> io::Result<Option<u8>> {
    let mut first = [0u8; 1];
    if reader.read(&mut first).await? == 0 {
        return Ok(None);
    }
    Ok(Some(first[0]))
}

/// The rest of a message whose first byte was `first`.
async fn read_rest(first: u8, reader: &mut (impl AsyncRead + Unpin)) -> io::Result<Vec<u8>> {
    let mut second = [0u8; 1];
    reader.read_exact(&mut second).await?;
    let mut message = vec![0u8; usize::from(u16::from_be_bytes([first, second[0]]))];
    reader.read_exact(&mut message).await?;
    Ok(message)
}

/// Writes one length-prefixed message in a single write (partial writes are retried).
pub async fn write_message(
    writer: &mut (impl AsyncWrite + Unpin),
    message: &[u8],
) -> io::Result<()> {
    let length = u16::try_from(message.len())
        .map_err(|_| io::Error::other("DNS message over 65535 bytes"))?;
    let mut frame = Vec::with_capacity(2 + message.len());
    frame.extend_from_slice(&length.to_be_bytes());
    frame.extend_from_slice(message);
    writer.write_all(&frame).await
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use tokio::io::AsyncWriteExt as _;

    use super::*;

    use crate::dns::FixedDestination as Fixed;

    fn query(id: u16) -> Vec<u8> {
        let mut q = id.to_be_bytes().to_vec();
        q.extend_from_slice(
            b"\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x07example\x04test\x00\x00\x01\x00\x01",
        );
        q
    }

    fn answer_to(query: &[u8]) -> Vec<u8> {
        let mut answer = query.to_vec();
        answer[2] |= 0x80;
        answer.extend_from_slice(b"trailing bytes the proxy must not touch");
        answer
    }

    /// A real TCP DNS server on loopback that collects `batch` queries, then answers them in
    /// reverse order (pipelining, out of order), each answer written in two pieces.
    async fn upstream(batch: usize) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut stream, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    loop {
                        let mut queries = Vec::new();
                        for _ in 0..batch {
                            match read_message(&mut stream).await {
                                Ok(Some(q)) => queries.push(q),
                                _ => return,
                            }
                        }
                        for q in queries.iter().rev() {
                            let answer = answer_to(q);
                            let mut frame = (answer.len() as u16).to_be_bytes().to_vec();
                            frame.extend_from_slice(&answer);
                            let (head, tail) = frame.split_at(5);
                            stream.write_all(head).await.unwrap();
                            stream.flush().await.unwrap();
                            tokio::time::sleep(Duration::from_millis(5)).await;
                            stream.write_all(tail).await.unwrap();
                        }
                    }
                });
            }
        });
        addr
    }

    /// One connection relayed by `proxy` between in-memory streams: the client's end, the
    /// upstream's end, and the relay, which says why it ended.
    fn relay_in_memory(
        proxy: &Arc<TcpProxy<Fixed>>,
    ) -> (
        tokio::io::DuplexStream,
        tokio::io::DuplexStream,
        tokio::task::JoinHandle<String>,
    ) {
        let (client, proxy_client) = tokio::io::duplex(4096);
        let (proxy_upstream, upstream) = tokio::io::duplex(4096);
        let server: SocketAddr = "192.0.2.2:53".parse().unwrap();
        let proxy = Arc::clone(proxy);
        let relay = tokio::spawn(async move {
            let conn = Connection::new(0, "192.0.2.1:40000".parse().unwrap(), server, server);
            let closed = proxy
                .relay_streams(
                    &conn,
                    tokio::io::split(proxy_client),
                    tokio::io::split(proxy_upstream),
                )
                .await;
            closed.to_string()
        });
        (client, upstream, relay)
    }

    /// The drain race, deterministic: a connection is draining with nothing outstanding when
    /// a query's first byte arrives, and the rest only after the drain's quiet time. The watchdog must not close
    /// it before the query is read, forwarded and answered.
    #[tokio::test]
    async fn a_draining_connection_answers_a_query_that_has_begun_to_arrive() {
        let proxy = proxy(None, Duration::from_secs(10)).await;
        proxy.draining.stop();
        let (mut client, mut upstream, relay) = relay_in_memory(&proxy);
        let mut frame = Vec::new();
        write_message(&mut frame, &query(7)).await.unwrap();
        client.write_all(&frame[..1]).await.unwrap();
        // Longer than the drain's quiet time: only the half-read query keeps it open.
        tokio::time::sleep(drain::QUIET * 3).await;
        client.write_all(&frame[1..]).await.unwrap();
        let forwarded = timeout(Duration::from_secs(2), read_message(&mut upstream))
            .await
            .expect("the query is forwarded, not closed on")
            .unwrap()
            .expect("a whole query");
        assert_eq!(forwarded, query(7));
        write_message(&mut upstream, &answer_to(&forwarded))
            .await
            .unwrap();
        let answered = timeout(Duration::from_secs(2), read_message(&mut client))
            .await
            .expect("the answer is relayed")
            .unwrap();
        assert_eq!(answered, Some(answer_to(&forwarded)));
        // Then, with nothing outstanding and the client quiet, the drain closes it.
        let closed = timeout(Duration::from_secs(2), relay)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(closed, Closed::Draining.to_string());
    }

    /// A client that asks every 50 ms is never quiet for the drain's moment: once the drain
    /// has gone on that long, its connection closes at the next gap after an answer, every
    /// query it sent answered, instead of staying open to the drain's deadline and losing
    /// the query in flight then.
    #[tokio::test]
    async fn a_busy_connection_closes_at_a_gap_once_the_drain_has_gone_on() {
        let proxy = proxy(None, Duration::from_secs(10)).await;
        let (mut client, mut upstream, relay) = relay_in_memory(&proxy);
        tokio::spawn(async move {
            while let Ok(Some(query)) = read_message(&mut upstream).await {
                write_message(&mut upstream, &answer_to(&query))
                    .await
                    .unwrap();
            }
        });
        let mut drain_started = None;
        let (mut sent, mut answered) = (0u16, 0u16);
        while sent < 100 {
            if sent == 2 {
                proxy.draining.stop();
                drain_started = Some(Instant::now());
            }
            let mut frame = Vec::new();
            write_message(&mut frame, &query(sent)).await.unwrap();
            if client.write_all(&frame).await.is_err() {
                break; // closed: the client asks again on a new connection
            }
            sent += 1;
            match timeout(Duration::from_secs(2), read_message(&mut client)).await {
                Ok(Ok(Some(answer))) => {
                    assert_eq!(answer, answer_to(&query(sent - 1)));
                    answered += 1;
                }
                _ => break,
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let closed = timeout(Duration::from_secs(2), relay)
            .await
            .expect("closed long before the drain's deadline")
            .unwrap();
        assert_eq!(closed, Closed::Draining.to_string());
        let drained_in = drain_started.unwrap().elapsed();
        assert!(drained_in < drain::QUIET * 3, "{drained_in:?}");
        assert_eq!(
            answered, sent,
            "every query sent before the close was answered"
        );
    }

    /// An answer still being written (the client reads slowly: its buffer is full) is not a
    /// gap a drain may close at, even once the drain has gone on: the client gets all of it.
    #[tokio::test]
    async fn a_drain_never_closes_on_an_answer_being_written() {
        let proxy = proxy(None, Duration::from_secs(10)).await;
        let (mut client, mut upstream, relay) = relay_in_memory(&proxy);
        let big_answer = |query: &[u8]| {
            let mut answer = answer_to(query);
            answer.resize(6000, 0); // more than the 4 KiB the client's end buffers
            answer
        };
        tokio::spawn(async move {
            while let Ok(Some(query)) = read_message(&mut upstream).await {
                if query[..2] == [0, 1] {
                    // Late: the drain has gone on for its quiet time when this comes.
                    tokio::time::sleep(Duration::from_millis(150)).await;
                    write_message(&mut upstream, &big_answer(&query))
                        .await
                        .unwrap();
                } else {
                    write_message(&mut upstream, &answer_to(&query))
                        .await
                        .unwrap();
                }
            }
        });
        let mut frame = Vec::new();
        write_message(&mut frame, &query(0)).await.unwrap();
        client.write_all(&frame).await.unwrap();
        assert_eq!(
            read_message(&mut client).await.unwrap(),
            Some(answer_to(&query(0)))
        );
        proxy.draining.stop();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut frame = Vec::new();
        write_message(&mut frame, &query(1)).await.unwrap();
        client.write_all(&frame).await.unwrap();
        // The answer comes at about 350 ms into the drain; read it at about 500 ms.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let answer = timeout(Duration::from_secs(2), read_message(&mut client))
            .await
            .expect("the answer comes");
        assert_eq!(answer.unwrap(), Some(big_answer(&query(1))));
        let closed = timeout(Duration::from_secs(2), relay)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(closed, Closed::Draining.to_string());
    }

    /// The three messages of a zone transfer, as an authoritative server sends them.
    fn zone_transfer() -> Vec<Vec<u8>> {
        use crate::dns::transfer::tests::{a, message, soa};
        let axfr = hickory_proto::rr::RecordType::AXFR;
        vec![
            message(axfr, true, vec![soa(5), a(1)]),
            message(axfr, false, vec![a(2)]),
            message(axfr, false, vec![a(3), soa(5)]),
        ]
    }

    /// An upstream on `upstream` that sends the whole `zone_transfer` to the first query,
    /// `pause` between messages, then waits for more.
    fn transfer_server(mut upstream: tokio::io::DuplexStream, pause: Duration) {
        tokio::spawn(async move {
            read_message(&mut upstream).await.unwrap().unwrap();
            for message in zone_transfer() {
                write_message(&mut upstream, &message).await.unwrap();
                tokio::time::sleep(pause).await;
            }
            let _ = read_message(&mut upstream).await;
        });
    }

    /// A zone transfer is one query answered by many messages: a client that half-closes
    /// once it has asked (as a direct connection allows) gets every one of them, not the
    /// first alone.
    #[tokio::test]
    async fn a_client_that_half_closes_gets_a_whole_zone_transfer() {
        let proxy = proxy(None, Duration::from_secs(10)).await;
        let (mut client, upstream, relay) = relay_in_memory(&proxy);
        transfer_server(upstream, Duration::from_millis(20));
        let axfr = crate::dns::transfer::tests::query(hickory_proto::rr::RecordType::AXFR);
        write_message(&mut client, &axfr).await.unwrap();
        client.shutdown().await.unwrap();
        for message in zone_transfer() {
            let relayed = timeout(Duration::from_secs(2), read_message(&mut client)).await;
            assert_eq!(relayed.unwrap().unwrap(), Some(message));
        }
        let end = timeout(Duration::from_secs(2), read_message(&mut client)).await;
        assert_eq!(end.unwrap().unwrap(), None, "closed after the last message");
        let closed = relay.await.unwrap();
        assert_eq!(closed, Closed::ByClient.to_string());
        assert_eq!(proxy.stats.tcp.inflight.load(Ordering::Relaxed), 0);
    }

    /// A graceful stop lets a zone transfer in progress finish (within the drain's deadline)
    /// instead of closing at a gap between its messages.
    #[tokio::test]
    async fn a_drain_lets_a_zone_transfer_finish() {
        let proxy = proxy(None, Duration::from_secs(10)).await;
        let (mut client, upstream, relay) = relay_in_memory(&proxy);
        // Messages farther apart than the drain's quiet moment (and closer than the
        // upstream timeout, 500 ms).
        transfer_server(upstream, drain::QUIET + Duration::from_millis(100));
        let axfr = crate::dns::transfer::tests::query(hickory_proto::rr::RecordType::AXFR);
        write_message(&mut client, &axfr).await.unwrap();
        for (at, message) in zone_transfer().into_iter().enumerate() {
            let relayed = timeout(Duration::from_secs(2), read_message(&mut client)).await;
            assert_eq!(relayed.unwrap().unwrap(), Some(message), "message {at}");
            if at == 0 {
                proxy.draining.stop();
            }
        }
        let closed = timeout(Duration::from_secs(2), relay).await.unwrap();
        assert_eq!(closed.unwrap(), Closed::Draining.to_string());
    }

    /// A client that stops reading holds up its answers, and the ones behind them: its
    /// connection is closed as the client's doing, not counted against the upstream.
    #[tokio::test]
    async fn a_client_that_stops_reading_is_not_an_upstream_timeout() {
        let proxy = proxy(None, Duration::from_secs(10)).await;
        let (mut client, mut upstream, relay) = relay_in_memory(&proxy);
        tokio::spawn(async move {
            while let Ok(Some(query)) = read_message(&mut upstream).await {
                let mut answer = answer_to(&query);
                answer.resize(6000, 0); // more than the 4 KiB the client's end buffers
                write_message(&mut upstream, &answer).await.unwrap();
            }
        });
        for id in 0..10 {
            write_message(&mut client, &query(id)).await.unwrap();
        }
        // The client reads nothing.
        let closed = timeout(Duration::from_secs(3), relay).await.unwrap();
        assert_eq!(closed.unwrap(), Closed::ClientStalled.to_string());
        assert_eq!(proxy.stats.tcp.upstream_timeouts.load(Ordering::Relaxed), 0);
        assert_eq!(proxy.stats.tcp.dropped_stalled.load(Ordering::Relaxed), 1);
        drop(client);
    }

    /// A server's edns-tcp-keepalive (RFC 7828) reaches the client unaltered, and tells it
    /// how long it may leave the connection idle: if the client asked for it, the relay keeps
    /// the connection open that long, past its own idle timeout, as the server would. A
    /// client that did not ask is not held longer (the server should not have said it).
    #[tokio::test]
    async fn a_connection_stays_open_as_long_as_its_server_told_the_client() {
        use hickory_proto::{
            op::{Edns, Message, MessageType},
            rr::rdata::opt::EdnsOption,
        };
        // `message` with an OPT holding edns-tcp-keepalive's `data`, as a query or an answer.
        let with_keepalive = |message: &[u8], data: Vec<u8>, answer: bool| {
            let mut message = Message::from_vec(message).unwrap();
            if answer {
                message.set_message_type(MessageType::Response);
            }
            let mut edns = Edns::new();
            edns.options_mut().insert(EdnsOption::Unknown(11, data));
            message.set_edns(edns);
            message.to_vec().unwrap()
        };
        // One second, in units of 100 ms.
        let answer_to = move |query: &[u8]| with_keepalive(query, 10u16.to_be_bytes().into(), true);
        for asks in [true, false] {
            let proxy = proxy(None, Duration::from_millis(200)).await;
            let (mut client, mut upstream, relay) = relay_in_memory(&proxy);
            tokio::spawn(async move {
                while let Ok(Some(query)) = read_message(&mut upstream).await {
                    if write_message(&mut upstream, &answer_to(&query))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            });
            let asking = |id| match asks {
                true => with_keepalive(&query(id), Vec::new(), false),
                false => query(id),
            };
            write_message(&mut client, &asking(0)).await.unwrap();
            let answer = timeout(Duration::from_secs(2), read_message(&mut client)).await;
            assert_eq!(answer.unwrap().unwrap(), Some(answer_to(&asking(0))));
            let started = Instant::now();
            if asks {
                // Idle longer than the relay's own 200 ms, and asking again.
                tokio::time::sleep(Duration::from_millis(600)).await;
                write_message(&mut client, &asking(1)).await.unwrap();
                let answer = timeout(Duration::from_secs(2), read_message(&mut client)).await;
                assert_eq!(answer.unwrap().unwrap(), Some(answer_to(&asking(1))));
            }
            let closed = timeout(Duration::from_secs(3), relay).await.unwrap();
            assert_eq!(closed.unwrap(), Closed::Idle.to_string());
            let idle = started.elapsed();
            match asks {
                true => assert!(idle > Duration::from_millis(1500), "{idle:?}"),
                false => assert!(idle < Duration::from_millis(600), "{idle:?}"),
            }
        }
    }

    async fn proxy(original: Option<SocketAddr>, idle: Duration) -> Arc<TcpProxy<Fixed>> {
        proxy_with_limits(original, idle, 4, 4).await
    }

    async fn proxy_with_limits(
        original: Option<SocketAddr>,
        idle: Duration,
        max_connections: usize,
        per_client: usize,
    ) -> Arc<TcpProxy<Fixed>> {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let settings = TcpSettings {
            upstream_override: None,
            upstream_timeout: Duration::from_millis(500),
            idle_timeout: idle,
            max_connections,
            per_client: PerClientLimit::new(per_client),
            cache: None,
            observers: Observers::default(),
        };
        let proxy =
            TcpProxy::new(listener, Fixed::new(original), settings, Arc::default()).unwrap();
        let serving = Arc::clone(&proxy);
        tokio::spawn(async move { serving.serve(drain::Signal::new()).await });
        proxy
    }

    #[tokio::test]
    async fn relays_pipelined_queries_answered_out_of_order_byte_for_byte() {
        let proxy = proxy(Some(upstream(3).await), Duration::from_secs(5)).await;
        let mut client = TcpStream::connect(proxy.local_addr).await.unwrap();
        // Three queries in one write, the second split across two writes.
        let mut bytes = Vec::new();
        for id in [1u16, 2, 3] {
            let q = query(id);
            bytes.extend_from_slice(&(q.len() as u16).to_be_bytes());
            bytes.extend_from_slice(&q);
        }
        let (first, rest) = bytes.split_at(40);
        client.write_all(first).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        client.write_all(rest).await.unwrap();
        let mut answers = Vec::new();
        for _ in 0..3 {
            answers.push(read_message(&mut client).await.unwrap().unwrap());
        }
        assert_eq!(
            answers,
            vec![
                answer_to(&query(3)),
                answer_to(&query(2)),
                answer_to(&query(1))
            ]
        );
        assert_eq!(proxy.stats.tcp.answered.load(Ordering::Relaxed), 3);
    }

    #[tokio::test]
    async fn a_client_that_half_closes_still_gets_its_answers() {
        let proxy = proxy(Some(upstream(1).await), Duration::from_secs(5)).await;
        let mut client = TcpStream::connect(proxy.local_addr).await.unwrap();
        write_message(&mut client, &query(9)).await.unwrap();
        client.shutdown().await.unwrap();
        assert_eq!(
            read_message(&mut client).await.unwrap(),
            Some(answer_to(&query(9)))
        );
        assert_eq!(
            read_message(&mut client).await.unwrap(),
            None,
            "closed after the answer"
        );
    }

    #[tokio::test]
    async fn idle_connections_are_closed() {
        let proxy = proxy(Some(upstream(1).await), Duration::from_millis(200)).await;
        let mut client = TcpStream::connect(proxy.local_addr).await.unwrap();
        let started = Instant::now();
        assert_eq!(read_message(&mut client).await.unwrap(), None);
        assert!(
            started.elapsed() >= Duration::from_millis(150),
            "{:?}",
            started.elapsed()
        );
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[tokio::test]
    async fn a_stalled_client_does_not_hold_up_another() {
        let proxy = proxy(Some(upstream(1).await), Duration::from_secs(5)).await;
        // Half a length prefix, then nothing.
        let mut stalled = TcpStream::connect(proxy.local_addr).await.unwrap();
        stalled.write_all(&[0]).await.unwrap();
        let mut other = TcpStream::connect(proxy.local_addr).await.unwrap();
        write_message(&mut other, &query(5)).await.unwrap();
        let answer = timeout(Duration::from_secs(1), read_message(&mut other)).await;
        assert_eq!(answer.unwrap().unwrap(), Some(answer_to(&query(5))));
    }

    #[tokio::test]
    async fn malformed_queries_and_unknown_clients_are_closed_not_forwarded() {
        let proxy = proxy(Some(upstream(1).await), Duration::from_secs(5)).await;
        let mut client = TcpStream::connect(proxy.local_addr).await.unwrap();
        write_message(&mut client, b"not dns at all, but long enough")
            .await
            .unwrap();
        assert_eq!(read_message(&mut client).await.unwrap(), None);
        assert_eq!(proxy.stats.tcp.dropped_malformed.load(Ordering::Relaxed), 1);
        assert_eq!(proxy.stats.tcp.forwarded.load(Ordering::Relaxed), 0);

        let proxy = self::proxy(None, Duration::from_secs(5)).await;
        let mut client = TcpStream::connect(proxy.local_addr).await.unwrap();
        write_message(&mut client, &query(1)).await.unwrap();
        assert!(matches!(read_message(&mut client).await, Ok(None) | Err(_)));
        assert_eq!(
            proxy
                .stats
                .tcp
                .dropped_not_redirected
                .load(Ordering::Relaxed),
            1
        );
    }

    #[tokio::test]
    async fn an_upstream_that_refuses_resets_the_client_connection() {
        // A port nobody listens on: bound, so no other test's socket takes it, but not
        // listening, so a connection to it is refused.
        let holder = tokio::net::TcpSocket::new_v4().unwrap();
        holder.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let refused = holder.local_addr().unwrap();
        let proxy = proxy(Some(refused), Duration::from_secs(5)).await;
        let mut client = TcpStream::connect(proxy.local_addr).await.unwrap();
        write_message(&mut client, &query(1)).await.unwrap();
        // Reset, as the refusal was: not an orderly close, which looks like a server that
        // answered everything.
        let read = read_message(&mut client).await;
        assert!(
            matches!(&read, Err(err) if err.kind() == io::ErrorKind::ConnectionReset),
            "{read:?}"
        );
        assert_eq!(proxy.stats.tcp.upstream_errors.load(Ordering::Relaxed), 1);
    }

    /// A connection from `source` (any 127/8 address is this host's loopback).
    async fn connect_from(source: &str, proxy: SocketAddr) -> TcpStream {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
        socket.connect(proxy).await.unwrap()
    }

    #[tokio::test]
    async fn a_client_at_its_connection_limit_is_refused_and_local_addresses_are_one_client() {
        let proxy = proxy_with_limits(Some(upstream(1).await), Duration::from_secs(5), 8, 2).await;
        let mut held = Vec::new();
        for _ in 0..2 {
            held.push(connect_from("127.0.0.1", proxy.local_addr).await);
        }
        // Both are accepted before the third comes.
        wait_until(|| proxy.stats.tcp_connections.load(Ordering::Relaxed) == 2).await;
        let mut third = connect_from("127.0.0.1", proxy.local_addr).await;
        write_message(&mut third, &query(3)).await.unwrap();
        assert!(matches!(read_message(&mut third).await, Ok(None) | Err(_)));
        assert_eq!(
            proxy.stats.tcp.dropped_client_limit.load(Ordering::Relaxed),
            1
        );
        // Another loopback address is the same client (this namespace): no extra share.
        let mut other = connect_from("127.0.0.2", proxy.local_addr).await;
        write_message(&mut other, &query(4)).await.unwrap();
        assert!(matches!(read_message(&mut other).await, Ok(None) | Err(_)));
        assert_eq!(
            proxy.stats.tcp.dropped_client_limit.load(Ordering::Relaxed),
            2
        );
        // A connection that closes gives its client's slot back.
        drop(held.pop());
        wait_until(|| proxy.tasks.len() == 1).await;
        let mut again = connect_from("127.0.0.1", proxy.local_addr).await;
        write_message(&mut again, &query(5)).await.unwrap();
        assert_eq!(
            read_message(&mut again).await.unwrap(),
            Some(answer_to(&query(5)))
        );
    }

    async fn wait_until(mut done: impl FnMut() -> bool) {
        for _ in 0..200 {
            if done() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("not done within 2 s");
    }

    #[tokio::test]
    async fn a_stream_cut_inside_the_length_prefix_is_an_error_not_a_clean_end() {
        // What the tcp_framing fuzz target found first: one byte of a length, then the end.
        let mut cut: &[u8] = &[0x00];
        let read = read_message(&mut cut).await;
        assert!(
            matches!(&read, Err(err) if err.kind() == io::ErrorKind::UnexpectedEof),
            "{read:?}"
        );
        let mut empty: &[u8] = &[];
        assert_eq!(read_message(&mut empty).await.unwrap(), None);
        let mut whole: &[u8] = &[0, 2, 0xab, 0xcd];
        assert_eq!(
            read_message(&mut whole).await.unwrap(),
            Some(vec![0xab, 0xcd])
        );
        assert_eq!(read_message(&mut whole).await.unwrap(), None);
    }

    #[tokio::test]
    async fn a_client_reusing_an_id_gets_its_slots_back() {
        let proxy = proxy(None, Duration::from_secs(5)).await;
        let server = ([192, 0, 2, 2], 53).into();
        let connection = Connection::new(0, ([192, 0, 2, 1], 40000).into(), server, server);
        // Three queries with one ID, then the end of the client's stream.
        let mut client_bytes = Vec::new();
        for _ in 0..3 {
            write_message(&mut client_bytes, &query(7)).await.unwrap();
        }
        let (proxy_side, mut server_side) = tokio::io::duplex(4096);
        let (upstream_read, upstream_write) = tokio::io::split(proxy_side);
        let server = tokio::spawn(async move {
            for _ in 0..3 {
                read_message(&mut server_side).await.unwrap().unwrap();
            }
            // One answer: only one of the three can be matched.
            write_message(&mut server_side, &answer_to(&query(7)))
                .await
                .unwrap();
        });
        let mut client_out = Vec::new();
        let closed = proxy
            .relay_streams(
                &connection,
                (&client_bytes[..], &mut client_out),
                (upstream_read, upstream_write),
            )
            .await;
        server.await.unwrap();
        assert!(
            matches!(closed, Closed::ByClient | Closed::ByUpstream),
            "{closed}"
        );
        assert_eq!(
            read_message(&mut &client_out[..]).await.unwrap(),
            Some(answer_to(&query(7)))
        );
        assert_eq!(connection.slots.available_permits(), MAX_PIPELINED);
        assert_eq!(proxy.stats.tcp.inflight.load(Ordering::Relaxed), 0);
    }
}
