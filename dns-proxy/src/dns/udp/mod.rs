//! The UDP listener: each redirected query is forwarded, unaltered, to the server its client
//! asked for, and the answer is relayed back unaltered. (With the cache on, a query whose
//! answer may be kept or shared goes up with an ID of the agent's own, and its answer gets
//! the client's back.)
//!
//! Queries leave from upstream sockets on random ports that each carry queries to one server
//! only (`pool`): those connected to the few servers that answer, replaced by fresh ones
//! after [`USES_PER_SOCKET`] queries, and for any other query a socket of its own. An answer
//! is relayed only if it arrives on the socket its query left from, from the address and port
//! the query went to, with the query's ID and the very bytes of its question; anything else is
//! counted and dropped. Nothing is made per query to a server with connected sockets (no
//! task, socket or buffer): the receive loop forwards, each pool socket's reader relays its
//! answers, and a sweeper expires what was not answered in time. Datagrams move in batches, a
//! `recvmmsg` or `sendmmsg` each (see `mmsg`): the queries of one batch leave together from
//! one pool socket, and the answers one reader finds go back to their clients together.
//!
//! This file holds the listener and a query's way in (admission, the cache, the pending
//! table); the rest is a file each:
//! - `pool`: the upstream sockets;
//! - `pending`: the table of queries in flight, and answer matching;
//! - `forward`: client to upstream, in batches;
//! - `relay`: upstream to client, in batches;
//! - `cached`: the answer cache's part (hits, waiting on identical queries, stale answers);
//! - `sweeper`: queries that time out, and stale answers for late upstreams;
//! - `unreachable`: queries whose upstream cannot be reached (an ICMP error, a failed send);
//! - `port_unreachable`: the ICMP error their clients get, as from the server;
//! - `mmsg`: `recvmmsg` and `sendmmsg`;
//! - `turn`: the waits on a socket, which let the thread's other tasks run;
//! - `fuzz`: the fuzz targets' hooks.
use std::{
    hash::RandomState,
    io,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsFd, OwnedFd},
    sync::{Arc, Mutex, atomic::AtomicU64},
    time::Duration,
};

use tokio::{io::Interest, net::UdpSocket};

use super::{
    Moment, OriginalDestinations,
    admission::{Admission, Route, Transport, TurnedAway},
    cache::Cache,
    coalesce::Coalescer,
    observers::Observers,
    per_client::PerClientLimit,
    query_log::Asked,
    stats::{ProtocolStats, Stats},
    wire,
};
use crate::{
    drain::{self, Deadline},
    ebpf::OwnSockets,
    log_limit::RateLimited,
    route_changes::RouteChanges,
};

mod cached;
mod forward;
#[cfg(feature = "fuzzing")]
mod fuzz;
pub(crate) mod mmsg;
mod pending;
mod pool;
mod port_unreachable;
mod relay;
mod sweeper;
#[cfg(test)]
mod tests;
mod turn;
mod unreachable;

pub use port_unreachable::PortUnreachable;
pub use unreachable::ClosedPorts;

use cached::{CacheHit, FromCache, MadeHere, Recipient};
use forward::Forwarding;
use mmsg::{Arrival, LOOPBACK_IFINDEX, ReceivedBatch};
use pending::{Asking, Pending, PendingKey, PendingTable};
pub use pool::USES_PER_SOCKET;
use turn::Turn;

/// The most sockets connected to upstreams one UDP thread keeps, per address family.
pub const MOST_CONNECTED_SOCKETS: usize = pool::CONNECTED_UPSTREAMS * pool::CONNECTED_SOCKETS;
use pool::{Pool, PoolSocket};
pub use sweeper::STALE_AFTER;

/// The target of the listener's log lines, whichever of its files they come from: the one they
/// had when it was one file, which log filters and searches name.
const LOG: &str = module_path!();

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
    /// Who hears of each query and answer: the log, the names table, the counts by workload.
    pub observers: Observers,
    /// With the cache on, the queries identical ones wait on, shared by every listener.
    pub in_flight: Arc<Coalescer>,
    /// Changes to the namespace's routes and addresses: upstream sockets connected to a
    /// server are connected anew after each.
    pub route_changes: RouteChanges,
    /// Indexes whose server refused one question port unreachable, shared by every listener
    /// (`unreachable`).
    pub closed_ports: Arc<ClosedPorts>,
    /// Where clients of a closed server are told so as by the server (raw ICMP sockets),
    /// shared by every listener.
    pub port_unreachable: Arc<PortUnreachable>,
    /// Where upstream sockets are marked as the agent's own, so that no program of its
    /// redirects them wherever the agent is.
    pub own_sockets: OwnSockets,
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

/// Counts an answer the listener could not send to its client. A full send buffer is
/// overload (the client retries, as after a loss); anything else is the kernel refusing it
/// (no route back to a forged source, a firewall on the listener's output), which more room
/// would not cure.
fn count_unsent(stats: &ProtocolStats, err: &io::Error) {
    let full = err.kind() == io::ErrorKind::WouldBlock || err.raw_os_error() == Some(libc::ENOBUFS);
    Stats::add(if full {
        &stats.dropped_overload
    } else {
        &stats.dropped_unsendable
    });
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
    pending: Mutex<PendingTable>,
    /// Keys the question hashes, so no one can craft a question that collides.
    question_hasher: RandomState,
    /// Stops the pool readers and the sweeper, at the end of `finish`.
    workers: drain::Signal,
    stats: Arc<Stats>,
    overload_log: RateLimited,
    upstream_log: RateLimited,
    stray_log: RateLimited,
    /// Queries their upstream left unanswered: a server gone silent is said in the log, not
    /// only counted (helper-186: 3,072 timeouts, no line at the default level).
    timeout_log: RateLimited,
    /// The queries this listener refused itself for a closed server's port in the current
    /// second (its start, and the count): past [`unreachable::REFUSED_HERE_PER_SECOND`], the
    /// kernel refuses the index instead, for nothing.
    refused_here: Mutex<(std::time::Instant, u32)>,
}

/// How often a listener that finishes looks whether what it forwarded is all answered.
const FINISH_POLL: Duration = Duration::from_millis(5);

/// Receives a batch on `socket`, which tokio saw readable. A short batch means the socket's
/// queue was empty when the kernel stopped: tokio's readiness is then cleared at once, as it
/// would be by the next call finding nothing, a syscall this saves. (A datagram that arrives
/// later wakes the socket again.) `peer`: the socket is connected to it
/// ([`ReceivedBatch::receive`]).
fn receive_batch(
    socket: &UdpSocket,
    batch: &mut ReceivedBatch,
    peer: Option<SocketAddr>,
) -> io::Result<usize> {
    let mut count = 0;
    let received = socket.try_io(Interest::READABLE, || {
        count = batch.receive(socket.as_fd(), peer)?;
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
        let admission = Admission::new(Transport::Udp, destinations, upstream, per_client, &stats)
            .naming(settings.observers.workloads.clone());
        let proxy = Arc::new(Self {
            socket,
            shared_listener,
            local_addr,
            admission,
            settings,
            v4: Pool::new((Ipv4Addr::UNSPECIFIED, 0)),
            v6: Pool::new((Ipv6Addr::UNSPECIFIED, 0)),
            next_socket_id: AtomicU64::new(0),
            pending: Mutex::default(),
            question_hasher: RandomState::new(),
            workers: drain::Signal::new(),
            stats,
            overload_log: RateLimited::counting(
                Duration::from_secs(10),
                "UDP queries dropped at --max-inflight (or for an ID in use on every upstream \
                 socket)",
            ),
            upstream_log: RateLimited::counting(
                Duration::from_secs(10),
                "UDP queries failed on their way upstream (no socket, a send refused, no \
                 route, or the server's port closed: refused by it, or here for 2 s after)",
            ),
            stray_log: RateLimited::counting(
                Duration::from_secs(10),
                "datagrams and ICMP errors dropped on upstream sockets (about no query in \
                 flight)",
            ),
            timeout_log: RateLimited::counting(
                Duration::from_secs(10),
                "UDP queries unanswered by their upstream within --upstream-timeout",
            ),
            refused_here: Mutex::new((std::time::Instant::now(), 0)),
        });
        let sweeper = Arc::clone(&proxy);
        tokio::spawn(async move { sweeper.expire_unanswered().await });
        Ok(proxy)
    }

    /// Serves until `stop` is sent.
    pub async fn serve(self: &Arc<Self>, stop: drain::Signal) {
        let mut batch = ReceivedBatch::default();
        let mut forwarding = Forwarding::default();
        let turn = Turn::new();
        while let Some(ready) = stop.unless_stopped(turn.readable(&self.socket)).await {
            self.on_readable(ready, &mut batch, &mut forwarding);
        }
    }

    /// Graceful end, while `sk_lookup` may still steer clients here: keeps answering clients
    /// that were redirected before the redirect was switched off, until nothing has arrived
    /// for a moment and nothing is in flight, or until `deadline`; then calls `quiet`, and
    /// answers what still arrives until `steering_off` is sent (nothing steers clients here
    /// any more) or `deadline`. A listener that stopped reading while clients were still
    /// steered to it would leave their datagrams unread.
    pub async fn drain(
        self: &Arc<Self>,
        deadline: Deadline,
        quiet: impl FnOnce(),
        steering_off: &drain::Signal,
    ) {
        let mut batch = ReceivedBatch::default();
        let mut forwarding = Forwarding::default();
        let turn = Turn::new();
        let (arrival, idle) = (|| turn.readable(&self.socket), || self.inflight() == 0);
        while let Some(ready) = deadline.next_arrival(arrival, idle).await {
            self.on_readable(ready, &mut batch, &mut forwarding);
        }
        quiet();
        let serving = async {
            while let Some(ready) = steering_off
                .unless_stopped(turn.readable(&self.socket))
                .await
            {
                self.on_readable(ready, &mut batch, &mut forwarding);
            }
        };
        deadline.within(serving).await;
    }

    /// Graceful end, once nothing steers clients here: answers what they sent before (still
    /// queued on the listener) and what is in flight, until nothing is or until `deadline`.
    /// Returns how many forwarded queries were still unanswered then.
    pub async fn finish(self: &Arc<Self>, deadline: Deadline) -> usize {
        let mut batch = ReceivedBatch::default();
        let mut forwarding = Forwarding::default();
        let turn = Turn::new();
        let answering = async {
            loop {
                tokio::select! {
                    biased;
                    ready = turn.readable(&self.socket) => {
                        self.on_readable(ready, &mut batch, &mut forwarding);
                    }
                    () = tokio::time::sleep(FINISH_POLL) => {
                        if self.inflight() == 0 {
                            return;
                        }
                    }
                }
            }
        };
        deadline.within(answering).await;
        self.workers.stop();
        self.inflight()
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Takes one batch of what is queued on the listener, if `ready`, and forwards it.
    fn on_readable(
        self: &Arc<Self>,
        ready: io::Result<()>,
        batch: &mut ReceivedBatch,
        forwarding: &mut Forwarding,
    ) {
        match ready.and_then(|()| receive_batch(&self.socket, batch, None)) {
            Ok(_) => self.forward_batch(batch, forwarding),
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
            // Nothing a datagram can do makes recv fail for long; keep serving.
            Err(err) => log::warn!("receiving on {}: {err}", self.local_addr),
        }
    }

    /// Records a client's datagram, if it is a query of a redirected client, as pending on a
    /// pool socket (the one `pick` chooses if it can); returns its key and socket.
    fn register_query(
        self: &Arc<Self>,
        datagram: &[u8],
        client: SocketAddr,
        arrival: Option<Arrival>,
        now: Moment,
        pick: u64,
        hits: &mut Vec<CacheHit>,
    ) -> Option<(PendingKey, Arc<PoolSocket>)> {
        let stats = &self.stats.udp;
        Stats::add(&stats.received);
        if !wire::has_query_header(datagram) {
            // Not DNS, or an answer: a server answers neither.
            self.drop_malformed(datagram, client);
            return None;
        }
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
        } = match self.admission.route_or_loop(client, reached, local) {
            Ok(route) => route,
            Err(TurnedAway::Looped {
                original,
                cgroup,
                reached,
            }) => {
                let to = Recipient {
                    cgroup,
                    client,
                    original,
                    reply_from: reached.ip(),
                    listener: self.shared_listener.as_fd(),
                    started: now,
                };
                // Logged and counted as asked, as the answer made here is as answered.
                let asked = udp_asked(client, original, cgroup);
                self.settings.observers.asked(asked, datagram, now);
                self.refuse_loop(datagram, to);
                return None;
            }
            Err(TurnedAway::Other) => return None,
        };
        // Its answer leaves from there, so the client's connected socket takes it.
        let reply_from = reached.ip();
        let started = now;
        let recipient = Recipient {
            cgroup,
            client,
            original,
            reply_from,
            listener: self.shared_listener.as_fd(),
            started,
        };
        // Before the check below: a query answered FORMERR here is asked and answered in the
        // query log and the workload's counts too (helper-184: answers without their queries).
        let asked = udp_asked(client, original, cgroup);
        self.settings.observers.asked(asked, datagram, now);
        let (true, Some(id), Some(question)) = (
            wire::is_query(datagram),
            wire::message_id(datagram),
            wire::question(datagram),
        ) else {
            self.answer_malformed(datagram, recipient);
            return None;
        };
        let (cached, client_slot) = match self.consult_cache(datagram, recipient, local, hits) {
            FromCache::Handled => return None,
            FromCache::Forward(cached, client_slot) => (Some(cached), client_slot),
            // Its server's port was found closed a moment ago (with the cache on: one the
            // cache would not keep).
            FromCache::NotCached
                if self.settings.cache.is_some() && self.refuses_closed_port(recipient) =>
            {
                self.refuse_closed_port(datagram, recipient);
                return None;
            }
            FromCache::NotCached => (None, self.admission.client_slot(client, cgroup, local)?),
        };
        let asking = Asking::of(&client_slot, self.settings.max_inflight);
        // A query whose answer the cache keeps, or gives to the clients waiting on it, goes up
        // with an ID of the agent's own: the client chose its ID, and a workload that knows
        // the ID of a query whose answer others will be given would have one thing fewer to
        // guess in forging that answer (security.md, claim 7). Its answer gets the client's
        // ID back. Other queries go as they came, byte for byte.
        let (upstream_id, client_id) = match cached {
            Some(_) => (pool::unpredictable_id(), Some(id)),
            None => (id, None),
        };
        let question = self.question_key(question);
        let description =
            log::log_enabled!(log::Level::Debug).then(|| wire::describe_query(datagram));
        let pending = |socket| Pending {
            socket,
            cgroup,
            client,
            client_id,
            original,
            reply_from,
            question,
            started,
            description,
            cached,
            _client_slot: client_slot,
            strays_at_send: 0,
            answer_trusted: false,
        };
        self.register(
            upstream,
            upstream_id,
            pending,
            pick,
            asking,
            started.instant,
        )
    }

    /// The name of cgroup `id`'s workload, for the log.
    fn workload_name(&self, id: u64) -> Arc<str> {
        self.settings.observers.workload_name(id)
    }

    fn drop_malformed(&self, datagram: &[u8], client: SocketAddr) {
        Stats::add(&self.stats.udp.dropped_malformed);
        log::debug!(
            "dropping {} bytes from {client}: not a DNS query",
            datagram.len()
        );
    }

    /// Answers FORMERR, as its server would, to a query with a header but a question the
    /// proxy will not forward (two of them, one cut short, a compression pointer): its client
    /// fails at once instead of waiting out its timeout. Not forwarded: the answer check
    /// compares the question it could not read.
    fn answer_malformed(&self, datagram: &[u8], to: Recipient<'_>) {
        Stats::add(&self.stats.udp.dropped_malformed);
        log::debug!(
            "answering FORMERR to {} bytes from {} to {}: a question the proxy cannot read",
            datagram.len(),
            to.client,
            to.original
        );
        if let Some(answer) = wire::format_error(datagram) {
            self.send_answer(&answer, to, MadeHere::Malformed);
        }
    }
}
