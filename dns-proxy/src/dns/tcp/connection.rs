//! One relayed connection: what both of its directions share (the queries waiting for
//! answers, the pipelining slots, when it was last active), and why it ended.
use std::{
    collections::HashMap,
    io,
    net::SocketAddr,
    sync::Mutex,
    time::{Duration, Instant},
};

use tokio::sync::{Notify, Semaphore};

use super::{MAX_KEEPALIVE, MAX_PIPELINED, framing::RoomHolder};
use crate::{
    dns::{Moment, cache::CacheableQuery, query_log::Asked, transfer::Transfer, wire},
    drain,
};

/// Why a relayed connection ended, for the debug log.
#[derive(Debug)]
pub(super) enum Closed {
    ByClient,
    ByUpstream,
    Idle,
    UpstreamTimeout,
    ClientStalled,
    /// No room for another large message (`MESSAGE_BUDGET`).
    NoRoomForMessage,
    Draining,
    /// For a client within its fair share, at twice `--max-tcp-connections` (open.rs).
    GaveWay,
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
            Self::NoRoomForMessage => f.write_str("no room for another large message"),
            Self::Draining => f.write_str("shutting down"),
            Self::GaveWay => {
                f.write_str("for a client within its fair share, at twice --max-tcp-connections")
            }
            Self::MalformedQuery => {
                f.write_str("the client sent something that is not a DNS query")
            }
            Self::ClientError(err) => write!(f, "client error: {err}"),
            Self::UpstreamError(err) => write!(f, "upstream error: {err}"),
        }
    }
}

/// The queries of one ID waiting for their answers.
pub(super) struct Pending {
    /// Its key in the cache, whose answer is kept there, and its header and question; `None`
    /// with the cache off, or for a query the cache does not answer.
    pub(super) cacheable: Option<(CacheableQuery, Box<[u8]>)>,
    /// The queries sent with this ID and not yet answered, in the order they were sent: more
    /// than one when the client reused an ID still in flight, and then each is answered
    /// before the connection counts as answered.
    pub(super) awaited: std::collections::VecDeque<Awaited>,
}

/// One query waiting for its answer: each of those sent with one ID has its own time and
/// description (helper-198: five pipelined queries with one ID were each logged to dnstap
/// with the first's time, and given one debug line between them).
pub(super) struct Awaited {
    /// When it arrived.
    pub(super) started: Moment,
    /// "name=... type=..." when debug logging is on.
    pub(super) description: Option<String>,
    /// A zone transfer's (AXFR, IXFR) progress: such a query is pending until its last
    /// message.
    pub(super) transfer: Option<Transfer>,
}

/// What an answer settled.
#[derive(Default)]
pub(super) struct Settled {
    /// It answered a query in full: that query's slot is free.
    pub(super) answered: bool,
    /// The query, once nothing sent with its ID awaits an answer.
    pub(super) done: Option<Pending>,
    /// When the query was asked, if this is its first answer.
    pub(super) started: Option<Moment>,
    /// The query it answered in full, if it did.
    pub(super) finished: Option<Awaited>,
}

/// What both directions of one connection share.
pub(super) struct Connection {
    /// The cgroup that connected (0: not recorded).
    pub(super) cgroup: u64,
    pub(super) client: SocketAddr,
    pub(super) original: SocketAddr,
    pub(super) upstream: SocketAddr,
    /// The proxy address the client reached, which names its server and cgroup (`None`:
    /// unknown, or in unit tests).
    pub(super) reached: Option<SocketAddr>,
    pub(super) pending: Mutex<HashMap<u16, Pending>>,
    pub(super) slots: Semaphore,
    pub(super) last_activity: Mutex<Instant>,
    pub(super) client_done: std::sync::atomic::AtomicBool,
    /// The client sent something that is not a query: nothing more is read from it.
    pub(super) sent_malformed: std::sync::atomic::AtomicBool,
    /// A write to the upstream found it reset (not closed in good order): however the relay
    /// ends, the client's connection is reset too.
    pub(super) upstream_reset: std::sync::atomic::AtomicBool,
    /// A query has begun to arrive and is not yet on its way: a drain must wait for it.
    reading: std::sync::atomic::AtomicBool,
    /// The client sent a query with an ID still in flight: answers to its queries cannot be
    /// told apart for sure from then on, so none is kept in the cache.
    pub(super) reuses_ids: std::sync::atomic::AtomicBool,
    /// How long the server last told the client it may leave the connection idle
    /// (edns-tcp-keepalive, RFC 7828), in units of 100 ms; 0: it did not say.
    keepalive: std::sync::atomic::AtomicU16,
    /// The client asked for edns-tcp-keepalive: only then is the server's heeded.
    pub(super) asked_keepalive: std::sync::atomic::AtomicBool,
    pub(super) changed: Notify,
    /// Sent when this connection is to close for another client's (open.rs).
    pub(super) give_way: drain::Signal,
}

impl Connection {
    /// Who the room its large messages take is charged to: its workload, whatever address
    /// it sends from (a workload that bound ten local addresses held ten shares; helper-96),
    /// or, where none is recorded, its source address.
    pub(super) fn room_holder(&self) -> RoomHolder {
        match self.cgroup {
            0 => RoomHolder::Address(self.client.ip().to_canonical()),
            cgroup => RoomHolder::Workload(cgroup),
        }
    }

    /// What the query log says of this connection's queries.
    pub(super) fn asked(&self) -> Asked {
        Asked {
            transport: crate::dnstap::Transport::Tcp,
            client: self.client,
            server: self.original,
            cgroup: self.cgroup,
        }
    }

    pub(super) fn new(
        cgroup: u64,
        client: SocketAddr,
        original: SocketAddr,
        upstream: SocketAddr,
    ) -> Self {
        Self {
            cgroup,
            client,
            original,
            upstream,
            reached: None,
            pending: Mutex::default(),
            slots: Semaphore::new(MAX_PIPELINED),
            last_activity: Mutex::new(Instant::now()),
            client_done: false.into(),
            sent_malformed: false.into(),
            upstream_reset: false.into(),
            reading: false.into(),
            reuses_ids: false.into(),
            keepalive: 0.into(),
            asked_keepalive: false.into(),
            changed: Notify::new(),
            give_way: drain::Signal::new(),
        }
    }

    pub(super) fn touch(&self) {
        *self.last_activity.lock().expect("not poisoned") = Instant::now();
        self.changed.notify_one();
    }

    /// Queries sent and not yet answered (in full, for a zone transfer).
    pub(super) fn outstanding(&self) -> usize {
        let table = self.pending.lock().expect("not poisoned");
        table.values().map(|pending| pending.awaited.len()).sum()
    }

    /// Nothing more comes from the client (its end, or what cannot be read past): the
    /// connection ends once its answers are written ([`finished`](Self::finished)).
    pub(super) fn client_sent_all(&self) {
        self.set_reading(false);
        self.client_done
            .store(true, std::sync::atomic::Ordering::Relaxed);
        self.changed.notify_one();
    }

    pub(super) fn finished(&self) -> bool {
        self.client_done.load(std::sync::atomic::Ordering::Relaxed) && self.outstanding() == 0
    }

    /// Why a [`finished`](Self::finished) connection ends.
    pub(super) fn why_finished(&self) -> Closed {
        if self
            .sent_malformed
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            Closed::MalformedQuery
        } else {
            Closed::ByClient
        }
    }

    pub(super) fn set_reading(&self, reading: bool) {
        self.reading
            .store(reading, std::sync::atomic::Ordering::Relaxed);
        self.touch();
    }

    pub(super) fn is_reading(&self) -> bool {
        self.reading.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Takes an answer off the table: whether it answered a query in full (at a zone
    /// transfer's last message), which frees that query's slot; the query, once none sent
    /// with its ID awaits an answer any more; and when it was asked if this is a first answer.
    pub(super) fn settle(&self, id: u16, answer: &[u8]) -> Settled {
        let mut table = self.pending.lock().expect("not poisoned");
        let Some(pending) = table.get_mut(&id) else {
            return Settled::default();
        };
        // Answers to queries with one ID are taken in the order the queries were sent.
        let Some(front) = pending.awaited.front_mut() else {
            return Settled::default();
        };
        let first = front.transfer.as_ref().is_none_or(Transfer::not_begun);
        let started = first.then_some(front.started);
        let answered = front
            .transfer
            .as_mut()
            .is_none_or(|transfer| transfer.took(answer));
        let finished = if answered {
            pending.awaited.pop_front()
        } else {
            None
        };
        let done = (answered && pending.awaited.is_empty())
            .then(|| table.remove(&id))
            .flatten();
        Settled {
            answered,
            done,
            started,
            finished,
        }
    }

    /// When the oldest query waiting for its first answer was asked (a zone transfer under
    /// way is making progress, and is not counted).
    pub(super) fn oldest_unanswered(&self) -> Option<Instant> {
        let table = self.pending.lock().expect("not poisoned");
        table.values().filter_map(not_begun).min()
    }

    /// Forgets the queries asked at or before `cutoff` that have no answer begun (each with
    /// the queries sent after it with its ID), as if they had timed out; returns how many it
    /// forgot, whose slots are free. An answer that comes for one later is still relayed.
    pub(super) fn forget_unanswered_since(&self, cutoff: Instant) -> usize {
        let mut table = self.pending.lock().expect("not poisoned");
        let mut forgotten = 0;
        table.retain(|_, pending| {
            let overdue = not_begun(pending).is_some_and(|started| started <= cutoff);
            if overdue {
                forgotten += pending.awaited.len();
            }
            !overdue
        });
        forgotten
    }

    /// Notes how long `answer`'s server says the client may leave the connection idle, if the
    /// client asked: the client sees that, relayed, and may idle on it.
    pub(super) fn note_keepalive(&self, answer: &[u8]) {
        if !self
            .asked_keepalive
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            return;
        }
        if let Some(timeout) = wire::tcp_keepalive(answer).or_else(|| wire::dso_keepalive(answer)) {
            self.keepalive
                .store(timeout, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// How long the connection may stay idle: `configured`, or longer if the server promised
    /// the client more, up to [`MAX_KEEPALIVE`].
    pub(super) fn idle_limit(&self, configured: Duration) -> Duration {
        let promised = self.keepalive.load(std::sync::atomic::Ordering::Relaxed);
        let promised = Duration::from_millis(100 * u64::from(promised)).min(MAX_KEEPALIVE);
        configured.max(promised)
    }
}

/// When `pending`'s first query was asked, if no answer to it has begun to come.
fn not_begun(pending: &Pending) -> Option<Instant> {
    pending
        .awaited
        .front()
        .filter(|front| front.transfer.as_ref().is_none_or(Transfer::not_begun))
        .map(|front| front.started.instant)
}

/// The client's writer, which counts every byte the client's socket takes as activity: a
/// client that reads slowly makes progress, one that stopped reading does not, even while an
/// answer larger than the socket's buffer is being written. As the upstream's reader, it
/// counts every byte that comes: a large answer sent slowly is not overdue.
pub(super) struct Progress<'a, W> {
    pub(super) inner: W,
    pub(super) conn: &'a Connection,
}

impl<W: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Progress<'_, W> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        let written = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        if let std::task::Poll::Ready(Ok(n)) = written
            && n > 0
        {
            self.conn.touch();
        }
        written
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> std::task::Poll<io::Result<usize>> {
        let written = std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let std::task::Poll::Ready(Ok(n)) = written
            && n > 0
        {
            self.conn.touch();
        }
        written
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<R: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Progress<'_, R> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        let before = buf.filled().len();
        let read = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        if let std::task::Poll::Ready(Ok(())) = read
            && buf.filled().len() > before
        {
            self.conn.touch();
        }
        read
    }
}
