//! The upstream sockets. No socket carries queries to two servers, so the port a query leaves
//! from is never shown to another server, one a workload may run to learn the agent's ports:
//! - per address family, the few upstreams that answer ([`CONNECTED_UPSTREAMS`]) get sockets
//!   connected to them ([`CONNECTED_SOCKETS`] each), each on a random port, opened as queries
//!   need them and replaced by a fresh one (a new random port) after [`USES_PER_SOCKET`]
//!   queries or [`MAX_SOCKET_AGE`], whichever comes first; a batch of queries to one leaves
//!   from one of them picked at random;
//! - any other query leaves from a socket of its own, on a random port, opened for it and
//!   closed once it is settled ([`UdpProxy::pick_one_off`]), as a resolver's are.
//!
//! So an off-path attacker must hit one of these ports as well as a query's ID and question.
//! Compare ztunnel's `src/proxy/pool.rs`.
//!
//! Why connected sockets: a datagram sent or received with an address runs the kernel's
//! cgroup `sendmsg`/`recvmsg` hooks, which lock the socket even where no program is attached
//! (the hooks are switched on machine-wide once any is), and a send with an address looks
//! its route up each time. A connected socket sends and receives without one: the kernel
//! delivers it nothing but its upstream's datagrams, and keeps the route. Measured in
//! docs/performance.md: about 5 % of the agent's CPU per query.
//!
//! Only an upstream that has answered a query gets connected sockets, so a workload that asks
//! servers that never answer takes none. An upstream not asked for [`CONNECTED_IDLE`] gives
//! its place to the next that answers; upstreams beyond the few are asked from sockets of
//! their own, one per query, as are all of them whenever their connected sockets cannot be
//! opened, and queries with an ID all of its connected sockets carry to it. A workload that
//! keeps the few places for servers of its own costs the others speed, not their ports.
//!
//! A connected socket keeps the route and source address `connect` chose. After any change
//! to the namespace's links, addresses, routes or rules ([`crate::route_changes`]), an
//! upstream's connected sockets are replaced by fresh ones at its next query (at most once
//! per [`RECONNECT_EVERY`]; meanwhile, sockets of their own). Should a change
//! go unannounced: if a query on a connected socket cannot be sent, or times out with nothing
//! heard on that socket since, the upstream goes back to sockets of their own, which choose a
//! source per datagram, until it answers again ([`UdpProxy::disconnect_upstream`]).
use std::{
    cell::Cell,
    hash::{BuildHasher, RandomState},
    io,
    net::SocketAddr,
    os::fd::AsFd as _,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use socket2::{Domain, Socket, Type};
use tokio::net::UdpSocket;

use super::{LOG, UdpProxy, mmsg};
use crate::{dns::OriginalDestinations, ebpf::OwnSockets};

/// Upstreams per address family (and UDP thread) that get sockets connected to them.
/// Nodes and hosts ask one to three servers, a workload with servers of its own a few more; a
/// workload that asks many (a recursive resolver) has the rest asked from a socket per query,
/// which costs about twice the CPU (docs/performance.md).
pub(super) const CONNECTED_UPSTREAMS: usize = 16;

/// Sockets connected to one upstream. Each carries [`USES_PER_SOCKET`] queries, so the ports
/// keep changing.
pub(super) const CONNECTED_SOCKETS: usize = 4;

/// An upstream with connected sockets that is not asked for this long gives them up to the
/// next upstream that answers (only when there is one and no room is left).
pub(super) const CONNECTED_IDLE: Duration = Duration::from_secs(30);

/// After a change to the namespace's routes, an upstream's connected sockets are replaced at
/// most this often. Changes that come faster (a node's pod churn) leave it on sockets of their
/// own, which follow any change, until this has passed: connecting its few anew at every
/// change would leave as many replaced ones open as there are changes.
pub(super) const RECONNECT_EVERY: Duration = Duration::from_secs(1);

/// Queries a connected socket carries before a fresh one, on a new random port, takes its
/// place: the ports keep changing, and the cost of a socket is shared by this many queries.
pub const USES_PER_SOCKET: u32 = 128;

/// A connected socket older than this is replaced at its next use, however few queries it
/// carried: an upstream asked seldom kept its sockets, and their ports, for many minutes (an
/// adversary saw one unchanged for 4), so a port learned somehow (a side channel) left only
/// the 16-bit ID to guess for that long.
#[cfg(not(test))]
pub(super) const MAX_SOCKET_AGE: Duration = Duration::from_secs(60);
#[cfg(test)]
pub(super) const MAX_SOCKET_AGE: Duration = Duration::from_millis(300);

/// Uses of a connected socket past which its age is looked at only every this many: a busy
/// socket is spent by its uses long before its age, and reads no clock per query.
const AGE_LOOKED_AT_EVERY: u32 = 16;

/// One upstream socket.
pub(super) struct PoolSocket {
    /// Unique among all the proxy's pool sockets, ever.
    id: u64,
    socket: UdpSocket,
    /// The upstream it sends to: the only one (a socket of one query's own sends to one).
    upstream: SocketAddr,
    /// The upstream it is connected to, the only one it hears from; `None`: a socket of one
    /// query's own, which hears anyone.
    peer: Option<SocketAddr>,
    /// When it was opened.
    opened: Instant,
    /// When an answer last arrived on it, in nanoseconds after `opened`; 0: none yet.
    last_answer: AtomicU64,
    /// Queries sent from it.
    uses: AtomicU32,
    /// Queries sent from it and not yet settled.
    outstanding: AtomicUsize,
    /// Datagrams that arrived on it, answered no query in flight and could have been taken
    /// for an answer (late answers, or forged ones sprayed at its port), by the bucket of
    /// their question ([`STRAY_BUCKETS`]).
    strays: [AtomicU32; STRAY_BUCKETS],
    /// The answers it carried, by [`answer_print`], as many as it carries queries (the last
    /// of them, should a batch take it past [`USES_PER_SOCKET`]): a second copy of one (a
    /// server or network that duplicates) is no stray.
    answers_carried: Box<[AtomicU64]>,
    next_answer_carried: AtomicUsize,
    /// Replaced in its pool: its reader ends once nothing is outstanding.
    retired: AtomicBool,
    /// Told when it becomes [done](Self::is_done), so its reader ends, and it closes, at once.
    done: tokio::sync::Notify,
}

/// Stray datagrams are counted by question, in this many buckets (of the keyed question
/// hash), so that junk or other names sprayed at a socket's port cost the cache nothing for
/// the questions they could not have answered.
const STRAY_BUCKETS: usize = 64;

pub(super) fn stray_bucket(question: u64) -> usize {
    (question % STRAY_BUCKETS as u64) as usize
}

/// An answer's ID and question in one word (0: none). Only answers to queries that went up
/// with an ID of the agent's own are remembered (`match_answer`), so no workload knows the
/// ID of a print, and the question key is keyed: nobody can aim a forgery at one.
fn answer_print(id: u16, question: u64) -> u64 {
    (question << 16) | u64::from(id)
}

/// What a datagram that answered nothing could have been taken for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Stray {
    /// Nothing: not a response, its question cannot be read, or it has none (as FORMERR
    /// may), and an answer with no question is never kept.
    NotAnAnswer,
    /// An answer with this ID to the question with this key.
    Question { id: u16, key: u64 },
}

impl PoolSocket {
    /// A fresh socket on a random port of `any` (`0.0.0.0:0` or `[::]:0`) for `upstream`,
    /// connected to it if `connect`, marked as the agent's own in `own_sockets`.
    fn open(
        next_id: &AtomicU64,
        any: SocketAddr,
        upstream: SocketAddr,
        connect: bool,
        own_sockets: &OwnSockets,
    ) -> io::Result<Arc<Self>> {
        let peer = connect.then_some(upstream);
        Ok(Arc::new(Self {
            id: next_id.fetch_add(1, Ordering::Relaxed),
            socket: pool_socket(any, peer, own_sockets)?,
            upstream,
            peer,
            opened: Instant::now(),
            last_answer: AtomicU64::new(0),
            strays: std::array::from_fn(|_| AtomicU32::new(0)),
            // So that a copy that comes with a later batch is not taken for a stray (a
            // duplicating server made 7 % of other answers unkept; remembering the last 16
            // left 4 % under bursts of 400).
            answers_carried: (0..if connect { USES_PER_SOCKET as usize } else { 1 })
                .map(|_| AtomicU64::new(0))
                .collect(),
            next_answer_carried: AtomicUsize::new(0),
            uses: AtomicU32::new(0),
            outstanding: AtomicUsize::new(0),
            retired: AtomicBool::new(false),
            done: tokio::sync::Notify::new(),
        }))
    }

    /// Unique among all the proxy's pool sockets, ever.
    pub(super) fn id(&self) -> u64 {
        self.id
    }

    pub(super) fn socket(&self) -> &UdpSocket {
        &self.socket
    }

    /// The upstream it is connected to; `None` for a socket of one query's own.
    pub(super) fn peer(&self) -> Option<SocketAddr> {
        self.peer
    }

    /// The upstream it sends to.
    pub(super) fn upstream(&self) -> SocketAddr {
        self.upstream
    }

    /// The address a datagram to `upstream` is sent to from it: none from a socket connected
    /// to `upstream`, which sends there without one.
    pub(super) fn address_for(&self, upstream: SocketAddr) -> Option<SocketAddr> {
        (self.peer != Some(upstream)).then_some(upstream)
    }

    /// Replaced, or given up: its reader ends once nothing sent from it is outstanding.
    fn retire(&self) {
        // SeqCst, here and in `settled`: of a retirement and the last settlement, at the same
        // moment on two threads, at least one sees the other.
        self.retired.store(true, Ordering::SeqCst);
        if self.outstanding.load(Ordering::SeqCst) == 0 {
            self.done.notify_one();
        }
    }

    /// Whether it has carried its share of queries ([`USES_PER_SOCKET`]) or lived its time
    /// ([`MAX_SOCKET_AGE`]): then it is replaced.
    fn is_spent(&self) -> bool {
        let uses = self.uses.load(Ordering::Relaxed);
        uses >= USES_PER_SOCKET
            || ((uses < AGE_LOOKED_AT_EVERY || uses.is_multiple_of(AGE_LOOKED_AT_EVERY))
                && self.opened.elapsed() >= MAX_SOCKET_AGE)
    }

    /// A query was sent from it: one more of its share, outstanding until settled.
    pub(super) fn carries(&self) {
        self.uses.fetch_add(1, Ordering::Relaxed);
        self.outstanding.fetch_add(1, Ordering::Relaxed);
    }

    /// Answers to queries sent from it arrived at `now`.
    pub(super) fn answered(&self, now: Instant) {
        let since_opened = now.saturating_duration_since(self.opened).as_nanos();
        let nanos = u64::try_from(since_opened).unwrap_or(u64::MAX).max(1);
        self.last_answer.store(nanos, Ordering::Relaxed);
    }

    /// Whether an answer arrived on it at `since` or later.
    pub(super) fn answered_since(&self, since: Instant) -> bool {
        match self.last_answer.load(Ordering::Relaxed) {
            0 => false,
            nanos => self.opened + Duration::from_nanos(nanos) >= since,
        }
    }

    /// The answer with `id` to the question with key `question` arrived on it.
    pub(super) fn carried_answer(&self, id: u16, question: u64) {
        let slot = self.next_answer_carried.fetch_add(1, Ordering::Relaxed);
        let slot = slot % self.answers_carried.len();
        self.answers_carried[slot].store(answer_print(id, question), Ordering::Relaxed);
    }

    /// A datagram arrived on it that answers no query in flight.
    pub(super) fn stray(&self, stray: Stray) {
        let Stray::Question { id, key } = stray else {
            return;
        };
        let print = answer_print(id, key);
        let copy = self
            .answers_carried
            .iter()
            .any(|recent| recent.load(Ordering::Relaxed) == print);
        if !copy {
            self.strays[stray_bucket(key)].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// How many datagrams that answered nothing, and could have been taken for an answer to
    /// the question whose key is `question`, arrived on it so far (with those of the other
    /// questions in its bucket).
    pub(super) fn strays(&self, question: u64) -> u32 {
        self.strays[stray_bucket(question)].load(Ordering::Relaxed)
    }

    /// A query sent from it was answered, failed or timed out.
    pub(super) fn settled(&self) {
        let last = self.outstanding.fetch_sub(1, Ordering::SeqCst) == 1;
        if last && self.retired.load(Ordering::SeqCst) {
            self.done.notify_one();
        }
    }

    /// Replaced in its pool, with nothing sent from it outstanding: its reader may end.
    pub(super) fn is_done(&self) -> bool {
        self.retired.load(Ordering::SeqCst) && self.outstanding.load(Ordering::SeqCst) == 0
    }

    /// Waits until told it may be [done](Self::is_done).
    pub(super) async fn until_done(&self) {
        self.done.notified().await;
    }
}

impl std::fmt::Debug for PoolSocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PoolSocket({})", self.id)
    }
}

/// The upstream sockets of one address family; only the receive loop picks and replaces them.
pub(super) struct Pool {
    /// `0.0.0.0:0` or `[::]:0`.
    any: SocketAddr,
    slots: Mutex<Slots>,
}

impl Pool {
    /// No sockets yet, for `any` (`0.0.0.0:0` or `[::]:0`).
    pub(super) fn new(any: impl Into<SocketAddr>) -> Self {
        Self {
            any: any.into(),
            slots: Mutex::default(),
        }
    }

    /// The upstreams that have connected sockets (or may open some), and how many each has.
    #[cfg(test)]
    pub(super) fn connected(&self) -> Vec<(SocketAddr, usize)> {
        let slots = self.slots.lock().expect("not poisoned");
        let connected = slots.connected.iter();
        connected.map(|c| (c.upstream, c.sockets.len())).collect()
    }
}

/// A pool's sockets that outlive a query.
#[derive(Default)]
pub(super) struct Slots {
    /// At most [`CONNECTED_UPSTREAMS`].
    connected: Vec<Connected>,
}

/// The sockets connected to one upstream.
struct Connected {
    upstream: SocketAddr,
    /// At most [`CONNECTED_SOCKETS`], opened as queries need them.
    sockets: Vec<Arc<PoolSocket>>,
    /// When a query last went to it.
    last_asked: Instant,
    /// The [`RouteChanges`](crate::route_changes::RouteChanges) its sockets were connected
    /// after: after another, they are connected anew.
    routes: u64,
    /// When they were last connected anew for a change.
    reconnected: Option<Instant>,
}

/// The sockets a query may leave from, as [`UdpProxy::pick_socket`] chose them.
#[derive(Debug)]
pub(super) enum Picked {
    /// Those connected to the upstream, at `index` in [`Slots::connected`], the one at `start`
    /// first.
    Connected { index: usize, start: usize },
    /// A socket of the query's own.
    OneOff(Arc<PoolSocket>),
}

impl Picked {
    /// Whether the sockets picked are connected to the upstream.
    pub(super) fn is_connected(&self) -> bool {
        matches!(self, Picked::Connected { .. })
    }
}

impl Slots {
    /// The sockets a query may leave from, in the order to try them (one in flight with the
    /// same ID to the same upstream takes a socket's key): those picked, from the one picked.
    pub(super) fn candidates<'a>(
        &'a self,
        picked: &'a Picked,
    ) -> impl Iterator<Item = &'a Arc<PoolSocket>> {
        let (sockets, start) = match picked {
            Picked::Connected { index, start } => (&self.connected[*index].sockets[..], *start),
            Picked::OneOff(socket) => (std::slice::from_ref(socket), 0),
        };
        let (before, from_start) = sockets.split_at(start);
        from_start.iter().chain(before)
    }
}

/// A UDP socket on a random port of `any` (`0.0.0.0` or `::`), connected to `peer` if given,
/// marked as the agent's own first: whatever cgroup the agent is in now, neither the connect
/// nor the sends are redirected.
fn pool_socket(
    any: SocketAddr,
    peer: Option<SocketAddr>,
    own_sockets: &OwnSockets,
) -> io::Result<UdpSocket> {
    let domain = Domain::for_address(any);
    let socket = Socket::new(domain, Type::DGRAM.nonblocking().cloexec(), None)?;
    own_sockets.mark(&socket);
    if any.is_ipv6() {
        // IPv4 servers are asked from the IPv4 pool.
        socket.set_only_v6(true)?;
    }
    // An unreachable server (its port closed, no route) is told at once, not by a timeout.
    mmsg::queue_errors(socket.as_fd(), any.is_ipv6())?;
    match peer {
        // Connected with no bind first (connect picks a random port, as a bind to port 0
        // does): until it is connected, the socket takes anyone's datagrams, and once it is,
        // its receives no longer ask who sent them. A route lookup: nothing is sent.
        Some(peer) => {
            socket.connect(&peer.into())?;
            discard_queued(&socket);
        }
        None => socket.bind(&any.into())?,
    }
    UdpSocket::from_std(socket.into())
}

/// Discards what reached a socket just connected, before anything was sent from it (so
/// nothing from its peer): datagrams of anyone that hit its port as `connect` bound it, and
/// their errors.
fn discard_queued(socket: &Socket) {
    let mut byte = [std::mem::MaybeUninit::uninit(); 1];
    // Bounded: each call takes a datagram or a pending error, and the queue is small.
    for _ in 0..1024 {
        match socket.recv(&mut byte) {
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => break,
            _ => {}
        }
    }
    while let Ok(Some(_)) = mmsg::receive_error(socket.as_fd()) {}
}

thread_local! {
    /// A cheap per-thread random sequence for picking pool sockets (xorshift64*).
    static RANDOM: Cell<u64> = Cell::new(RandomState::new().hash_one(std::thread::current().id()) | 1);
}

thread_local! {
    /// A keyed hash (SipHash, with a key of this thread's drawn from the OS) of a counter:
    /// values no one without the key can predict.
    static UNPREDICTABLE: (RandomState, Cell<u64>) = (RandomState::new(), Cell::new(0));
}

/// A message ID an off-path attacker cannot predict, for a query sent with an ID of the
/// agent's own.
pub(super) fn unpredictable_id() -> u16 {
    UNPREDICTABLE.with(|(key, counter)| {
        counter.set(counter.get().wrapping_add(1));
        key.hash_one(counter.get()) as u16
    })
}

pub(super) fn random() -> u64 {
    RANDOM.with(|state| {
        let mut x = state.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        state.set(x);
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    })
}

impl<D: OriginalDestinations> UdpProxy<D> {
    /// The pool's sockets, locked, and those a query to `upstream` may leave from, the one
    /// `pick` chooses first: `upstream`'s connected sockets if it has some, else a socket of
    /// the query's own. While the connected sockets are fewer than they may be, another is
    /// opened first, and the chosen one is replaced by a fresh one if it has carried its share.
    /// `None` (counted) with no socket to use.
    pub(super) fn pick_socket<'p>(
        self: &Arc<Self>,
        pool: &'p Pool,
        upstream: SocketAddr,
        pick: u64,
        now: Instant,
    ) -> Option<(MutexGuard<'p, Slots>, Picked)> {
        let mut slots = pool.slots.lock().expect("not poisoned");
        if let Some(index) = slots.connected.iter().position(|c| c.upstream == upstream) {
            let connected = &mut slots.connected[index];
            connected.last_asked = now;
            let routes = self.settings.route_changes.generation();
            if connected.routes != routes {
                let recently = connected
                    .reconnected
                    .is_some_and(|at| now.saturating_duration_since(at) < RECONNECT_EVERY);
                if recently {
                    drop(slots);
                    return self.pick_one_off(pool, upstream);
                }
                // Their source address or route may be gone: fresh ones are connected (what
                // is in flight on these is still answered, until they close).
                connected.routes = routes;
                connected.reconnected = Some(now);
                for socket in connected.sockets.drain(..) {
                    socket.retire();
                }
            }
            match self.pick_among(&mut connected.sockets, pool.any, upstream, pick) {
                Ok(start) => return Some((slots, Picked::Connected { index, start })),
                // None could be opened (no route to it now, or out of descriptors): it gives
                // its place up until it answers again, and this query goes out on its own.
                Err(err) => {
                    log::debug!(target: LOG, "connecting a socket to {upstream}: {err}");
                    slots.connected.swap_remove(index);
                }
            }
        }
        drop(slots);
        self.pick_one_off(pool, upstream)
    }

    /// [`pick_socket`](Self::pick_socket) for a query that leaves from a socket of its own.
    fn pick_one_off<'p>(
        self: &Arc<Self>,
        pool: &'p Pool,
        upstream: SocketAddr,
    ) -> Option<(MutexGuard<'p, Slots>, Picked)> {
        let socket = self.open_one_off(pool, upstream)?;
        Some((
            pool.slots.lock().expect("not poisoned"),
            Picked::OneOff(socket),
        ))
    }

    /// A socket of one query's own, to `upstream`: a fresh one on a random port, bound but not
    /// connected (the send chooses its route and source, which a connected socket would keep).
    /// It is retired from the start, so it closes once the one query it carries is settled,
    /// and no other server ever sees its port. Its reader starts once the query is recorded on
    /// it ([`UdpProxy::started_on`]); until then, dropping it closes it. `None` (counted) if
    /// none can be opened.
    pub(super) fn open_one_off(
        self: &Arc<Self>,
        pool: &Pool,
        upstream: SocketAddr,
    ) -> Option<Arc<PoolSocket>> {
        match PoolSocket::open(
            &self.next_socket_id,
            pool.any,
            upstream,
            false,
            &self.settings.own_sockets,
        ) {
            Ok(socket) => {
                socket.retire();
                Some(socket)
            }
            // No IPv6 on the host, or out of descriptors or ports.
            Err(err) => {
                self.stats.udp.no_upstream_socket(&err);
                self.upstream_log.warn(|failed| {
                    format!("no socket for {upstream}: {err} ({failed} queries failed)")
                });
                None
            }
        }
    }

    /// The index in `sockets` (connected to `peer`) of the one `pick` chooses, after opening
    /// another while they are fewer than [`CONNECTED_SOCKETS`], and replacing the chosen one if
    /// it is spent (its share carried, or its time lived). An error if there is none and none could be opened.
    fn pick_among(
        self: &Arc<Self>,
        sockets: &mut Vec<Arc<PoolSocket>>,
        any: SocketAddr,
        peer: SocketAddr,
        pick: u64,
    ) -> io::Result<usize> {
        let open = || {
            PoolSocket::open(
                &self.next_socket_id,
                any,
                peer,
                true,
                &self.settings.own_sockets,
            )
        };
        if sockets.len() < CONNECTED_SOCKETS {
            match open() {
                Ok(fresh) => {
                    self.spawn_reader(&fresh);
                    sockets.push(fresh);
                }
                Err(err) if sockets.is_empty() => return Err(err),
                Err(err) => log::debug!(target: LOG, "opening another upstream socket: {err}"),
            }
        }
        let start = (pick % sockets.len() as u64) as usize;
        if sockets[start].is_spent() {
            match open() {
                Ok(fresh) => {
                    self.spawn_reader(&fresh);
                    std::mem::replace(&mut sockets[start], fresh).retire();
                }
                // Out of descriptors, say: keep using the old one for now.
                Err(err) => log::debug!(target: LOG, "replacing an upstream socket: {err}"),
            }
        }
        Ok(start)
    }

    /// A query was recorded on `socket`: a socket of its own gets its reader now (a connected
    /// one has had its reader since it was opened).
    pub(super) fn started_on(self: &Arc<Self>, socket: &Arc<PoolSocket>) {
        if socket.peer().is_none() {
            self.spawn_reader(socket);
        }
    }

    /// `upstream` answered a query sent from a socket of its own: it gets sockets connected to it
    /// (opened as its next queries need them) if there is room, or an upstream not asked for
    /// [`CONNECTED_IDLE`] gives its place up.
    pub(super) fn connect_upstream(&self, upstream: SocketAddr, now: Instant) {
        let pool = self.pool_for(upstream);
        let mut slots = pool.slots.lock().expect("not poisoned");
        if slots.connected.iter().any(|c| c.upstream == upstream) {
            return;
        }
        if slots.connected.len() >= CONNECTED_UPSTREAMS {
            let idle = slots
                .connected
                .iter()
                .position(|c| now.saturating_duration_since(c.last_asked) >= CONNECTED_IDLE);
            let Some(idle) = idle else {
                return;
            };
            for socket in slots.connected.swap_remove(idle).sockets {
                socket.retire();
            }
        }
        slots.connected.push(Connected {
            upstream,
            sockets: Vec::new(),
            last_asked: now,
            routes: self.settings.route_changes.generation(),
            reconnected: None,
        });
    }

    /// A query sent to `upstream` from `socket`, connected to it, could not be sent, or timed
    /// out with nothing heard on that socket since it left: the socket's source address may
    /// be gone (the host's address changed, or the route to it), which a connected socket
    /// keeps. If `socket` is still one of `upstream`'s (not one already replaced),
    /// `upstream` gives its connected sockets up, and is asked from a socket per query (which
    /// chooses a source as it sends) until it answers again.
    pub(super) fn disconnect_upstream(&self, upstream: SocketAddr, socket: u64) {
        let pool = self.pool_for(upstream);
        let mut slots = pool.slots.lock().expect("not poisoned");
        let current = slots.connected.iter().position(|c| {
            c.upstream == upstream && c.sockets.iter().any(|open| open.id() == socket)
        });
        if let Some(index) = current {
            for socket in slots.connected.swap_remove(index).sockets {
                socket.retire();
            }
        }
    }

    /// The pool of `upstream`'s address family.
    pub(super) fn pool_for(&self, upstream: SocketAddr) -> &Pool {
        match upstream {
            SocketAddr::V4(_) => &self.v4,
            SocketAddr::V6(_) => &self.v6,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pool socket on loopback for 127.0.0.1:53, connected to it if `connect`.
    fn test_socket(connect: bool) -> Arc<PoolSocket> {
        PoolSocket::open(
            &AtomicU64::new(0),
            "127.0.0.1:0".parse().unwrap(),
            "127.0.0.1:53".parse().unwrap(),
            connect,
            &OwnSockets::default(),
        )
        .unwrap()
    }

    /// A stray is counted against the questions it could have answered, and one with no
    /// question, never kept, against none.
    #[tokio::test]
    async fn strays_count_against_their_own_question() {
        let socket = test_socket(false);
        let (asked, other) = (7, 8);
        socket.stray(Stray::NotAnAnswer);
        socket.stray(Stray::Question { id: 1, key: other });
        assert_eq!(socket.strays(asked), 0);
        assert_eq!(socket.strays(other), 1);
        let same_bucket = asked + STRAY_BUCKETS as u64;
        socket.stray(Stray::Question {
            id: 1,
            key: same_bucket,
        });
        assert_eq!((socket.strays(asked), socket.strays(other)), (1, 1));
    }

    /// A second copy of an answer the socket carried is no stray; another ID to the same
    /// question, or the same ID to another, is.
    #[tokio::test]
    async fn a_second_copy_of_an_answer_is_no_stray() {
        let socket = test_socket(true);
        let question = 7;
        socket.carried_answer(0x1234, question);
        for other in 0..USES_PER_SOCKET as u16 - 1 {
            socket.carried_answer(other, 100 + u64::from(other));
        }
        socket.stray(Stray::Question {
            id: 0x1234,
            key: question,
        });
        assert_eq!(socket.strays(question), 0);
        socket.stray(Stray::Question {
            id: 0x1235,
            key: question,
        });
        socket.stray(Stray::Question {
            id: 0x1234,
            key: question + STRAY_BUCKETS as u64,
        });
        assert_eq!(socket.strays(question), 2);
        // Past its share of queries, the last of them only.
        socket.carried_answer(0xffff, 99);
        socket.stray(Stray::Question {
            id: 0x1234,
            key: question,
        });
        assert_eq!(socket.strays(question), 3);
    }

    /// What reached a socket's port before it was connected (anyone's datagram, an error) is
    /// gone once it is: its receives no longer ask who sent what they take.
    #[tokio::test]
    async fn what_reached_a_socket_before_it_was_connected_is_discarded() {
        let peer = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let socket = Socket::new(Domain::IPV4, Type::DGRAM.nonblocking(), None).unwrap();
        socket
            .bind(&SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, 0)).into())
            .unwrap();
        let port = socket.local_addr().unwrap().as_socket().unwrap();
        let anyone = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        for _ in 0..3 {
            anyone.send_to(b"forged answer", port).await.unwrap();
        }
        socket.connect(&peer.local_addr().unwrap().into()).unwrap();
        discard_queued(&socket);
        let mut buf = [std::mem::MaybeUninit::uninit(); 64];
        let err = socket.recv(&mut buf).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        // What its peer sends still comes through.
        peer.send_to(b"answer", port).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(socket.recv(&mut buf).unwrap(), 6);
    }
}
