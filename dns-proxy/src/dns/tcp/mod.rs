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
    io,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncRead, AsyncWrite, BufReader},
    net::{TcpListener, TcpSocket, TcpStream},
    sync::{Mutex as AsyncMutex, Semaphore},
    time::timeout,
};
use tokio_util::task::TaskTracker;

use super::{
    Moment, OriginalDestinations,
    admission::{Admission, Route, Transport},
    cache::{Cache, CacheableQuery, Cached},
    observers::Observers,
    per_client::{PerClientLimit, Standing},
    stats::Stats,
    transfer::Transfer,
    wire,
};
use crate::{
    drain::{self, Deadline},
    ebpf::OwnSockets,
    log_limit::RateLimited,
};

mod connection;
mod framing;
mod open;
#[cfg(test)]
mod tests;

use connection::{Awaited, Closed, Connection, Pending, Progress};
use framing::{MessageBudget, NoRoom, read_first_byte, read_rest};
pub use framing::{read_message, write_message};
use open::OpenConnections;

/// Queries one connection may have waiting for answers; past it, the proxy stops reading from
/// that client until answers come back (backpressure, and a bound on what it keeps).
const MAX_PIPELINED: usize = 64;

/// Room for the large part of the messages being read or relayed, over every connection
/// (each message's first 4 KiB aside): about 1,000 messages of 64 KiB at once, an eighth of
/// it for one workload, so that nine must hold their shares to keep another's large
/// messages out. A connection that finds no room for its next large message is
/// closed, and counted as overload.
const MESSAGE_BUDGET: usize = 64 * 1024 * 1024;

/// The read buffer of each direction of a relayed connection. Small: a message larger than
/// it is read past it, and two of these for each of up to twice `--max-tcp-connections`
/// are part of what a flood of connections holds.
const READ_BUFFER: usize = 2048;

/// The send buffer of a relayed client connection, which the kernel doubles: about the
/// largest DNS message twice over (see where it is set).
const CLIENT_SEND_BUFFER: usize = 64 * 1024;

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
    /// Where upstream connections are marked as the agent's own, so that no program of its
    /// redirects them wherever the agent is.
    pub own_sockets: OwnSockets,
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
    /// Every connection relayed now: at twice the limit, one gives way to a client within
    /// its fair share.
    open: Arc<OpenConnections>,
    tasks: TaskTracker,
    /// Room for large messages, over every connection.
    budget: MessageBudget,
    /// Sent at shutdown: connections close once nothing is outstanding.
    draining: drain::Signal,
    stats: Arc<Stats>,
    /// Connections refused at --max-tcp-connections, and connections closed for want of room
    /// for a large message: two causes, so two lines, each with its own count.
    connection_limit_log: RateLimited,
    message_room_log: RateLimited,
    /// Failed accepts (out of open files, typically) come as fast as connections do.
    accept_log: RateLimited,
    /// Upstreams that left queries or a connect unanswered (helper-186: a server gone silent
    /// was only counted).
    timeout_log: RateLimited,
}

/// A connection to `upstream` from a socket marked as the agent's own before it connects.
async fn connect_upstream(upstream: SocketAddr, own_sockets: &OwnSockets) -> io::Result<TcpStream> {
    let socket = if upstream.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    own_sockets.mark(&socket);
    socket.connect(upstream).await
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
        let admission = Admission::new(Transport::Tcp, destinations, upstream, per_client, &stats)
            .naming(settings.observers.workloads.clone());
        Ok(Arc::new(Self {
            listener,
            local_addr,
            admission,
            connections: Arc::new(Semaphore::new(settings.max_connections)),
            fair_share_room: Arc::new(Semaphore::new(settings.max_connections)),
            open: OpenConnections::new(settings.max_connections, Arc::clone(&settings.per_client)),
            settings,
            tasks: TaskTracker::new(),
            budget: MessageBudget::new(MESSAGE_BUDGET),
            draining: drain::Signal::new(),
            stats,
            connection_limit_log: RateLimited::counting(
                Duration::from_secs(10),
                "TCP connections refused at --max-tcp-connections",
            ),
            message_room_log: RateLimited::counting(
                Duration::from_secs(10),
                "TCP connections closed for want of room for a large message",
            ),
            accept_log: RateLimited::counting(Duration::from_secs(10), "TCP accepts failed"),
            timeout_log: RateLimited::counting(
                Duration::from_secs(10),
                "TCP queries or connects unanswered by their upstream within --upstream-timeout",
            ),
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
                let local_addr = self.local_addr;
                self.accept_log.warn(|failed| {
                    format!("accepting on {local_addr}/tcp: {err} ({failed} accepts failed)")
                });
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
        // clients holding connections) is still let in, up to twice the limit (as UDP does),
        // and there in place of another's connection (open.rs), whose own ends at once.
        let standing = client_slot.standing(self.settings.max_connections);
        let within_fair_share = standing != Standing::AtOrPastItsShare;
        let permit = match self.connections.clone().try_acquire_owned() {
            Ok(permit) => Some(Some(permit)),
            Err(_) if within_fair_share => match self.fair_share_room.clone().try_acquire_owned() {
                Ok(permit) => Some(Some(permit)),
                Err(_) => self.open.close_one_for(standing).then_some(None),
            },
            Err(_) => None,
        };
        let Some(permit) = permit else {
            Stats::add(&stats.dropped_overload);
            self.connection_limit_log.warn(|dropped| {
                format!(
                    "{} TCP connections open (--max-tcp-connections): refused {dropped}",
                    self.settings.max_connections
                )
            });
            return;
        };
        let mut connection = Connection::new(cgroup, client, original, upstream);
        connection.reached = reached;
        let connection = Arc::new(connection);
        let registered = self.open.add(Arc::clone(&connection), client_slot);
        let proxy = Arc::clone(self);
        self.tasks.spawn(async move {
            let closed = proxy.relay(stream, &connection).await;
            log::debug!("TCP connection client={client} server={original} upstream={upstream} closed: {closed}");
            drop((permit, registered));
        });
    }

    async fn relay(&self, client_stream: TcpStream, conn: &Connection) -> Closed {
        let stats = &self.stats.tcp;
        let connecting = timeout(
            self.settings.upstream_timeout,
            connect_upstream(conn.upstream, &self.settings.own_sockets),
        );
        let connecting = async {
            tokio::select! {
                connected = connecting => Some(connected),
                () = conn.give_way.stopped() => None,
            }
        };
        let upstream_stream = match connecting.await {
            None => {
                Stats::add(&stats.dropped_overload);
                return Closed::GaveWay;
            }
            Some(Ok(Ok(stream))) => stream,
            Some(Ok(Err(err))) => {
                stats.no_upstream_socket(&err);
                reset(&client_stream);
                return Closed::UpstreamError(err);
            }
            Some(Err(_elapsed)) => {
                self.timed_out(conn.upstream, 1);
                return Closed::UpstreamTimeout;
            }
        };
        // Each message goes out in one write; don't let Nagle hold it back.
        let _ = client_stream.set_nodelay(true);
        let _ = upstream_stream.set_nodelay(true);
        // Answers a client has not read wait in this buffer, which the kernel would grow to
        // `tcp_wmem`'s maximum (4 MiB) for each of up to `--max-tcp-connections`: a client
        // that pipelines queries and never reads held that much of the host's TCP memory. A
        // fixed one holds the largest message about twice over; past it the relay waits, and
        // a client that reads nothing is closed as stalled.
        let _ = socket2::SockRef::from(&client_stream).set_send_buffer_size(CLIENT_SEND_BUFFER);
        let (mut client_read, mut client_write) = client_stream.into_split();
        let (upstream_read, upstream_write) = upstream_stream.into_split();
        let closed = self
            .relay_streams(
                conn,
                (&mut client_read, &mut client_write),
                (AckAtOnce(upstream_read), upstream_write),
            )
            .await;
        let upstream_reset = conn
            .upstream_reset
            .load(std::sync::atomic::Ordering::Relaxed);
        match closed {
            Closed::UpstreamError(_) => reset_halves(client_read, client_write),
            Closed::ByUpstream if upstream_reset => reset_halves(client_read, client_write),
            // The client is gone, or is to be let go of at once.
            Closed::ClientError(_)
            | Closed::ClientStalled
            | Closed::GaveWay
            | Closed::NoRoomForMessage => {}
            _ => close_in_good_order(&mut client_read, &mut client_write).await,
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
        let client_write = AsyncMutex::new(Progress {
            inner: client_write,
            conn,
        });
        // Every byte of an answer counts as activity: a large answer that comes slowly is on
        // its way, not overdue. (A query must come whole within the idle timeout of its first
        // byte, as Go's and so CoreDNS's servers want it within 2 s.)
        let upstream_read = Progress {
            inner: upstream_read,
            conn,
        };
        let closed = tokio::select! {
            biased;
            closed = self.queries(conn, BufReader::with_capacity(READ_BUFFER, client_read), upstream_write, &client_write) => closed,
            closed = self.answers(conn, BufReader::with_capacity(READ_BUFFER, upstream_read), &client_write) => closed,
            closed = self.watchdog(conn, &client_write) => closed,
            () = conn.give_way.stopped() => Closed::GaveWay,
        };
        // Queries still waiting will never be answered now.
        stats.settled(conn.outstanding() as u64);
        match &closed {
            Closed::NoRoomForMessage => {
                Stats::add(&stats.dropped_overload);
                self.message_room_log.warn(|closed| {
                    format!(
                        "no room for a large TCP message ({} MiB for all clients, an eighth \
                         for one): closed {closed} connections that sent or were sent one",
                        MESSAGE_BUDGET >> 20
                    )
                });
            }
            Closed::UpstreamTimeout => self.timed_out(conn.upstream, 1),
            Closed::GaveWay => Stats::add(&stats.dropped_overload),
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
                    conn.client_sent_all();
                    return std::future::pending().await;
                }
                Err(err) => return Closed::ClientError(err),
            };
            conn.set_reading(true);
            let query =
                match read_rest(first, &mut client, Some((&self.budget, conn.room_holder()))).await
                {
                    Ok(query) => query,
                    Err(err) if NoRoom::is(&err) => {
                        return Closed::NoRoomForMessage;
                    }
                    // The client ended inside a message (sent part of one, then half-closed):
                    // the queries before it still get their answers, as a server's would
                    // (helper-184: dnsmasq and Unbound answered all, the agent none).
                    Err(err) if err.kind() == io::ErrorKind::UnexpectedEof => {
                        conn.client_sent_all();
                        return std::future::pending().await;
                    }
                    Err(err) => return Closed::ClientError(err),
                };
            Stats::add(&stats.received);
            if wire::is_dso_response(&query) {
                // The client's response to a request of its server's (a DSO session, RFC
                // 8490): relayed, and no answer awaited.
                conn.set_reading(false);
                if let Err(err) = write_message(&mut upstream, &query).await {
                    return upstream_takes_no_more(conn, &err).await;
                }
                continue;
            }
            if !wire::is_query(&query) {
                // Nothing more is read (what follows may not be framed as the client thinks),
                // but the queries before it still get their answers, as a server's would.
                Stats::add(&stats.dropped_malformed);
                conn.set_reading(false);
                // One with a query's header is answered FORMERR first, as by a server, so
                // its client reads why (UDP does the same: `answer_malformed`).
                if let Some(formerr) = wire::format_error(&query) {
                    let started = Moment::now();
                    self.settings.observers.asked(conn.asked(), &query, started);
                    let mut client_write = client_write.lock().await;
                    if let Err(err) = write_message(&mut *client_write, &formerr).await {
                        return Closed::ClientError(err);
                    }
                    drop(client_write);
                    let now = Moment::now();
                    let latency = now.instant.saturating_duration_since(started.instant);
                    let observers = &self.settings.observers;
                    observers.answered(conn.asked(), Some(started), &formerr, now);
                    stats.answered(&formerr, Some(latency));
                }
                conn.sent_malformed
                    .store(true, std::sync::atomic::Ordering::Relaxed);
                conn.client_sent_all();
                return std::future::pending().await;
            }
            // The kernel notes no TCP socket as holding its index: each query is its use,
            // so a busy connection's origin is never forgotten (helper-130: ten minutes after
            // the accept, a departed cgroup's connection lost it, and `getpeername` named
            // whichever server took its index next).
            if let Some(reached) = conn.reached {
                self.admission.still_in_use(reached);
            }
            if wire::asks_tcp_keepalive(&query) {
                conn.asked_keepalive
                    .store(true, std::sync::atomic::Ordering::Relaxed);
            }
            let started = Moment::now();
            self.settings.observers.asked(conn.asked(), &query, started);
            let cacheable = match self.consult_cache(conn, &query, started.instant) {
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
                cacheable,
                awaited: [Awaited {
                    started,
                    description,
                    transfer: Transfer::for_query(&query),
                }]
                .into(),
            };
            // A client reusing an ID it is still waiting on awaits one more answer to it.
            // Nothing tells their answers apart (the first answer may be the first query's,
            // and kept under this one's key it would be served to others), nor, while answers
            // to the earlier ones may still come, those of its later queries: from then on
            // none of this connection's answers is kept in the cache. Each answer is relayed
            // before the connection counts as answered (a client that half-closed after two
            // such queries got one answer, then the end; helper-91).
            {
                let mut table = conn.pending.lock().expect("not poisoned");
                match table.get_mut(&id) {
                    Some(earlier) => {
                        conn.reuses_ids
                            .store(true, std::sync::atomic::Ordering::Relaxed);
                        earlier.cacheable = None;
                        earlier.awaited.extend(pending.awaited);
                    }
                    None => {
                        if conn.reuses_ids.load(std::sync::atomic::Ordering::Relaxed) {
                            pending.cacheable = None;
                        }
                        table.insert(id, pending);
                    }
                }
            }
            stats.forwarding();
            conn.set_reading(false);
            if let Err(err) = write_message(&mut upstream, &query).await {
                return upstream_takes_no_more(conn, &err).await;
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

    fn answered_from_cache(&self, conn: &Connection, answer: &[u8], stale: bool, started: Moment) {
        conn.touch();
        let now = Moment::now();
        let latency = now.instant.saturating_duration_since(started.instant);
        self.settings
            .observers
            .answered(conn.asked(), Some(started), answer, now);
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
            let answer = match read_first_byte(&mut upstream).await {
                Ok(Some(first)) => {
                    read_rest(
                        first,
                        &mut upstream,
                        Some((&self.budget, conn.room_holder())),
                    )
                    .await
                }
                Ok(None) => return Closed::ByUpstream,
                Err(err) => Err(err),
            };
            let answer = match answer {
                Ok(answer) => answer,
                Err(err) if NoRoom::is(&err) => {
                    return Closed::NoRoomForMessage;
                }
                Err(err) => return Closed::UpstreamError(err),
            };
            // The server's messages are the connection's use too: a DNS Push subscriber
            // (RFC 8765) asks once, then only hears (helper-132: its origin was forgotten, and
            // `getpeername` named another workload's server).
            if let Some(reached) = conn.reached {
                self.admission.still_in_use(reached);
            }
            if wire::is_dso_request(&answer) {
                // A request of the server's own (a DSO session's): it answers no query.
                conn.touch();
                if let Err(err) = write_message(&mut *client.lock().await, &answer).await {
                    return Closed::ClientError(err);
                }
                conn.touch();
                conn.note_keepalive(&answer);
                continue;
            }
            let id = wire::message_id(&answer).unwrap_or_default();
            // A zone transfer's query stays pending until its last message.
            let connection::Settled {
                answered,
                done: pending,
                started,
                finished,
            } = conn.settle(id, &answer);
            if answered {
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
            let latency =
                started.map(|started| now.instant.saturating_duration_since(started.instant));
            // Counted once per query, at its first message: a zone transfer's later ones
            // answer no more queries (helper-133: one AXFR counted 29 answers).
            if latency.is_some() {
                stats.answered(&answer, latency);
            }
            self.settings
                .observers
                .answered(conn.asked(), started, &answer, now);
            if let (
                Some(cache),
                Some(Pending {
                    cacheable: Some((cacheable, head)),
                    ..
                }),
            ) = (&self.settings.cache, &pending)
            {
                cache.store(cacheable, head, &answer, false, now.instant);
            }
            if let Some(Awaited {
                description: Some(description),
                started,
                ..
            }) = finished
            {
                // A transfer's: from its query to its last message.
                log::debug!(
                    "query tcp client={} server={} upstream={} {description} rcode={} latency={:?} workload={}",
                    conn.client,
                    conn.original,
                    conn.upstream,
                    wire::describe_rcode(&answer),
                    now.instant.saturating_duration_since(started.instant),
                    self.workload_name(conn.cgroup),
                );
            }
            if conn.finished() {
                return conn.why_finished();
            }
        }
    }

    /// Ends the connection when it has been idle too long, when an answer is overdue, when the
    /// client is done and answered, or at shutdown once nothing is outstanding, nothing is
    /// being read and the client has been quiet for a moment, or the drain has gone on for
    /// that moment (a query it already sent is answered first).
    ///
    /// On a connection that stays busy, a query unanswered for `--upstream-timeout` (while
    /// no answer waits for the client) is forgotten as a UDP one is, and its slot given back:
    /// a server that never answers some queries would otherwise fill the connection's
    /// [`MAX_PIPELINED`] with them, and the client's later queries, which it would answer,
    /// waited unread until the connection was closed as overdue (helper-168: 470 of 1,900
    /// answerable queries lost on one connection with 1 query in 20 never answered; none
    /// directly).
    async fn watchdog(
        &self,
        conn: &Connection,
        client_write: &AsyncMutex<impl AsyncWrite + Unpin>,
    ) -> Closed {
        // When this connection first saw the drain.
        let mut draining_since = None;
        loop {
            if conn.finished() {
                return conn.why_finished();
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
            let timeout = self.settings.upstream_timeout;
            // Not while an answer waits for the client to take it: the answers behind it wait
            // in the upstream's socket, not at the server.
            let oldest = conn.oldest_unanswered().filter(|_| !writing);
            let overdue = oldest.map(|oldest| tokio::time::Instant::from_std(oldest + timeout));
            let wake = match draining_since {
                Some(since) if may_drain => deadline
                    .min(tokio::time::Instant::from_std(last + drain::QUIET))
                    .min(tokio::time::Instant::from_std(since + drain::QUIET)),
                _ => deadline,
            };
            let wake = overdue.map_or(wake, |overdue| wake.min(overdue));
            tokio::select! {
                () = tokio::time::sleep_until(wake) => {
                    if let Some(oldest) = oldest
                        && Some(wake) == overdue
                        && wake < deadline
                    {
                        // The oldest at least; any others overdue by now at the next turn.
                        let forgotten = conn.forget_unanswered_since(oldest);
                        conn.slots.add_permits(forgotten);
                        self.stats.tcp.settled(forgotten as u64);
                        self.timed_out(conn.upstream, forgotten as u64);
                        continue;
                    }
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

/// The upstream's side of a relayed connection, acknowledging what it reads at once. The relay
/// writes each query as it comes, answers arriving meanwhile, so the kernel takes the
/// connection for an interactive one and delays its ACKs (by up to 40 ms); a server with
/// Nagle's algorithm on (unbound, dnsmasq) then holds each pipelined answer back until the one
/// before is acknowledged. 20 pipelined queries to unbound took 44 ms through the agent
/// against 0.6 ms direct (helper-123). `TCP_QUICKACK` lasts until the kernel decides again,
/// so it is set after every read.
struct AckAtOnce(tokio::net::tcp::OwnedReadHalf);

impl AsyncRead for AckAtOnce {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        context: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = std::pin::Pin::new(&mut self.0).poll_read(context, buf);
        if matches!(polled, std::task::Poll::Ready(Ok(()))) && buf.filled().len() > before {
            let _ = socket2::SockRef::from(self.0.as_ref()).set_tcp_quickack(true);
        }
        polled
    }
}

impl<D: OriginalDestinations> TcpProxy<D> {
    /// `events` queries (or a connect) `upstream` left unanswered within --upstream-timeout:
    /// counted, and said in the log at most every 10 s.
    fn timed_out(&self, upstream: SocketAddr, events: u64) {
        (self.stats.tcp.upstream_timeouts).fetch_add(events, std::sync::atomic::Ordering::Relaxed);
        self.timeout_log.warn(|said| {
            format!(
                "{upstream}: no answer within --upstream-timeout ({:?}); {said} TCP queries or \
                 connects unanswered (to this server and any other) since the last such line",
                self.settings.upstream_timeout
            )
        });
    }
}

/// The upstream took no more queries (`err` writing one): a server that closes after so many
/// (dnsmasq after 100) may have answers on their way still, which the client gets, as it
/// would directly, before the connection ends with the upstream's (`answers` reads until
/// then; a server that stays silent is timed out as ever). Nothing more is read from the
/// client. Before, the connection ended at once, and answers the server had sent were lost
/// (helper-184: 34 to 93 of 100 relayed).
async fn upstream_takes_no_more(conn: &Connection, err: &io::Error) -> Closed {
    log::debug!(
        "tcp client={} server={}: the upstream takes no more queries ({err}); relaying its \
         answers until it closes",
        conn.client,
        conn.original
    );
    if err.kind() == io::ErrorKind::ConnectionReset {
        // A server that closed in good order, then was written to, reads as a broken pipe;
        // a reset, as a reset: which the answers' side may then read as a mere end.
        conn.upstream_reset
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }
    conn.set_reading(false);
    std::future::pending().await
}

/// How long a connection the relay is done with waits for its client's end, reading and
/// dropping what it still sends, and how long a pause in that counts as the end.
const LINGER: Duration = Duration::from_secs(2);
const LINGER_QUIET: Duration = Duration::from_millis(100);

/// Ends a connection in good order: its last answers may still be in the kernel's queue
/// toward the client, and closing a socket with input unread sends a reset, which throws
/// them away (helper-187: a client that read 0.5 s late, its queries past an upstream's 100
/// unread, got 34 answers of 100, then a reset). So the write side is shut (the end follows
/// the answers), and what the client still sends is read and dropped until its end, a pause
/// of [`LINGER_QUIET`], or [`LINGER`] in all; the kernel then sends what is left, then the
/// end, on its own.
async fn close_in_good_order(
    read: &mut tokio::net::tcp::OwnedReadHalf,
    write: &mut tokio::net::tcp::OwnedWriteHalf,
) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let _ = write.shutdown().await;
    let until = tokio::time::Instant::now() + LINGER;
    let mut dropped = [0u8; 4096];
    loop {
        let pause = (tokio::time::Instant::now() + LINGER_QUIET).min(until);
        match tokio::time::timeout_at(pause, read.read(&mut dropped)).await {
            Ok(Ok(read)) if read > 0 => {}
            _ => return,
        }
    }
}

/// Resets a client's connection, from its two halves ([`reset`]).
fn reset_halves(read: tokio::net::tcp::OwnedReadHalf, write: tokio::net::tcp::OwnedWriteHalf) {
    if let Ok(stream) = read.reunite(write) {
        reset(&stream);
    }
}

/// Makes closing `stream` send a reset instead of an orderly end: an upstream that refused or
/// reset its connection is shown to the client as a connection that failed, not one the
/// server closed in good order after answering.
fn reset(stream: &TcpStream) {
    let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
}
