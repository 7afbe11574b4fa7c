//! A dnstap log of lookups (dnstap.info): every query and answer, with the workload that
//! asked, for tools that read dnstap (dnstap-ldns, golang-dnstap, dnscollector).
//!
//! [`DnstapSink::log`] never blocks and never queues without bound: each logging thread
//! queues its events in a buffer of its own, a writer thread of the sink's own takes them a
//! whole buffer at a time, and an event that does not fit the bound, or finds no reader, is
//! dropped and counted ([`DnstapCounters`]). Lookups must never wait for a log.
//!
//! What we fill in each `Dnstap` message:
//! - `identity`: the node's name, given by the caller; `version`: `dns-proxy <version>`;
//! - `extra`: the workload's full form ([`crate::workload::Workload::full`]), when known;
//! - `message.type`: CLIENT_QUERY/CLIENT_RESPONSE for the workload's side,
//!   FORWARDER_QUERY/FORWARDER_RESPONSE for the upstream side;
//! - `query_address`/`query_port`: the client (the workload's socket), on both sides, so
//!   every event ties to the workload; `response_address`/`response_port`: the server the
//!   workload asked (its original destination, which we forward to);
//! - the times, and the wire messages the caller hands over.
mod encode;
pub mod fstrm;
mod output;

use output::{Output, connect, open_file};
pub use output::{check_target, create_log_file};

use std::{
    cell::RefCell,
    fmt,
    io::{self, Write},
    net::SocketAddr,
    ops::Range,
    path::PathBuf,
    str::FromStr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        mpsc::{self, Receiver, RecvTimeoutError},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant, SystemTime},
};

use crate::log_limit::RateLimited;

/// The Frame Streams content type of dnstap.
pub const CONTENT_TYPE: &[u8] = b"protobuf:dnstap.Dnstap";
/// `version` in every message.
pub const VERSION: &str = concat!("dns-proxy ", env!("CARGO_PKG_VERSION"));

/// A reader sees a lookup at most this long after we write it, however busy we are.
/// How long the writer naps when the queue is empty: events wait at most this long, and a
/// busy agent fills at most a few thousand of the queue's slots meanwhile.
const IDLE_NAP: Duration = Duration::from_millis(5);
const FLUSH_INTERVAL: Duration = Duration::from_secs(1);
/// The writer's buffer: one `write` per this many bytes of frames (about 300 events).
const WRITE_BUFFER: usize = 64 << 10;
/// Reconnecting to a socket reader: the first wait, doubled up to the last.
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Connecting, the handshake, and each write to a socket reader: a reader that stops reading
/// for this long is dropped (and reconnected later), so we drop lookups rather than queue.
const IO_TIMEOUT: Duration = Duration::from_secs(1);
/// How long [`DnstapSink`]'s drop waits for the writer to drain, write STOP and get FINISH.
pub const CLOSE_LIMIT: Duration = Duration::from_secs(3);
/// How often a warning about a missing reader or drops may be logged.
const WARN_INTERVAL: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum DnstapError {
    #[error("--dnstap {0:?}: expected unix:PATH or file:PATH")]
    Target(String),
    #[error("cannot create the dnstap file {path}: {source}")]
    CreateFile { path: PathBuf, source: io::Error },
    #[error("cannot start the dnstap writer thread: {0}")]
    Thread(io::Error),
}

/// Where the log goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DnstapTarget {
    /// A reader's Frame Streams socket (bidirectional: READY/ACCEPT, then START ... STOP,
    /// FINISH). When it is missing or goes away we drop events and reconnect with backoff.
    Unix(PathBuf),
    /// A file, truncated at start: START, data frames, STOP on close (unidirectional). It
    /// gets nothing more after a write error, since a partial frame would corrupt the rest.
    File(PathBuf),
}

impl DnstapTarget {
    /// `unix:PATH` or `file:PATH`.
    pub fn parse(text: &str) -> Result<Self, DnstapError> {
        let target = match text.split_once(':') {
            Some(("unix", path)) if !path.is_empty() => Self::Unix(path.into()),
            Some(("file", path)) if !path.is_empty() => Self::File(path.into()),
            _ => return Err(DnstapError::Target(text.to_owned())),
        };
        Ok(target)
    }
}

impl FromStr for DnstapTarget {
    type Err = DnstapError;

    fn from_str(text: &str) -> Result<Self, DnstapError> {
        Self::parse(text)
    }
}

impl fmt::Display for DnstapTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unix(path) => write!(f, "unix:{}", path.display()),
            Self::File(path) => write!(f, "file:{}", path.display()),
        }
    }
}

/// dnstap's `Message.Type`, the four a forwarding proxy writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageType {
    ClientQuery = 5,
    ClientResponse = 6,
    ForwarderQuery = 7,
    ForwarderResponse = 8,
}

/// dnstap's `SocketProtocol`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Udp = 1,
    Tcp = 2,
}

/// One lookup event; see the module docs for what goes where. It borrows what it carries:
/// [`DnstapSink::log`] copies it into the calling thread's queue.
#[derive(Debug, Clone, Copy)]
pub struct Event<'a> {
    pub kind: MessageType,
    pub transport: Transport,
    /// The workload's socket: `query_address`/`query_port`.
    pub client: SocketAddr,
    /// The server the workload asked: `response_address`/`response_port`.
    pub server: SocketAddr,
    pub query_time: SystemTime,
    /// The query in wire format (for the query events).
    pub query: Option<&'a [u8]>,
    pub response_time: Option<SystemTime>,
    /// The response in wire format (for the response events).
    pub response: Option<&'a [u8]>,
    /// Who asked, for `extra`.
    pub workload: Workload<'a>,
}

/// The workload an event is about, as `extra` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload<'a> {
    /// No `extra`.
    Unknown,
    /// Its full form.
    Named(&'a str),
    /// Its cgroup: the writer thread names it with [`DnstapSettings::name_cgroup`], so naming
    /// costs the lookup path nothing (`cgroup-id=N` without a namer).
    Cgroup(u64),
}

impl Event<'_> {
    /// What the event holds in memory while queued.
    fn cost(&self) -> usize {
        size_of::<Queued>()
            + self.query.map_or(0, <[u8]>::len)
            + self.response.map_or(0, <[u8]>::len)
            + match self.workload {
                Workload::Named(name) => name.len(),
                Workload::Unknown | Workload::Cgroup(_) => 0,
            }
    }
}

/// How a [`DnstapSink`] is set up.
#[derive(Clone)]
pub struct DnstapSettings {
    pub target: DnstapTarget,
    /// `identity` in every message: the node's name.
    pub identity: String,
    /// The most bytes queued for the writer, events' own size included (TCP messages reach
    /// 64 KiB each; an event without messages takes about 100 bytes).
    pub queue_bytes: usize,
    /// Names a [`Workload::Cgroup`] for `extra`, on the writer thread. A name is reused for
    /// the cgroup's other events of the same take of the queues (a few milliseconds' worth).
    pub name_cgroup: Option<CgroupNamer>,
    /// Where the sink counts what it writes and drops (shared with whoever counted before
    /// it started).
    pub counters: Arc<DnstapCounters>,
}

/// See [`DnstapSettings::name_cgroup`].
pub type CgroupNamer = Arc<dyn Fn(u64) -> Arc<str> + Send + Sync>;

impl fmt::Debug for DnstapSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DnstapSettings")
            .field("target", &self.target)
            .field("identity", &self.identity)
            .field("queue_bytes", &self.queue_bytes)
            .field("name_cgroup", &self.name_cgroup.is_some())
            .finish()
    }
}

impl DnstapSettings {
    pub fn new(target: DnstapTarget, identity: impl Into<String>) -> Self {
        Self {
            target,
            identity: identity.into(),
            queue_bytes: 8 << 20,
            name_cgroup: None,
            counters: Arc::default(),
        }
    }
}

/// Events written and dropped, for metrics. `written` counts frames handed to the output's
/// buffer: a file or socket that fails later loses what was in it uncounted.
#[derive(Debug, Default)]
pub struct DnstapCounters {
    written: AtomicU64,
    dropped: AtomicU64,
}

impl DnstapCounters {
    pub fn written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }

    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    pub(crate) fn drop_one(&self) {
        self.dropped.fetch_add(1, Ordering::Relaxed);
    }
}

/// An event in a thread's queue; its messages and name are in the queue's `bytes`.
#[derive(Debug)]
struct Queued {
    kind: MessageType,
    transport: Transport,
    client: SocketAddr,
    server: SocketAddr,
    query_time: SystemTime,
    query: Option<Range<usize>>,
    response_time: Option<SystemTime>,
    response: Option<Range<usize>>,
    workload: QueuedWorkload,
}

#[derive(Debug)]
enum QueuedWorkload {
    Unknown,
    Named(Range<usize>),
    Cgroup(u64),
}

/// The events one thread logged that the writer has not taken yet. Each logging thread has
/// its own, so logging takes no lock another logging thread holds: the writer takes the whole
/// queue at once, every few milliseconds.
#[derive(Debug, Default)]
struct ThreadQueue {
    events: Vec<Queued>,
    bytes: Vec<u8>,
    /// What the events cost against [`DnstapSettings::queue_bytes`].
    cost: usize,
    /// Room this thread took from the shared bound and has not used yet (see
    /// [`DnstapSink::reserve`]).
    credit: usize,
    /// The writer has taken its last events: what comes now is dropped.
    closed: bool,
}

impl ThreadQueue {
    fn push(&mut self, event: &Event<'_>, cost: usize) {
        let mut keep = |data: &[u8]| {
            let start = self.bytes.len();
            self.bytes.extend_from_slice(data);
            start..self.bytes.len()
        };
        let query = event.query.map(&mut keep);
        let response = event.response.map(&mut keep);
        let workload = match event.workload {
            Workload::Unknown => QueuedWorkload::Unknown,
            Workload::Named(name) => QueuedWorkload::Named(keep(name.as_bytes())),
            Workload::Cgroup(id) => QueuedWorkload::Cgroup(id),
        };
        self.events.push(Queued {
            kind: event.kind,
            transport: event.transport,
            client: event.client,
            server: event.server,
            query_time: event.query_time,
            query,
            response_time: event.response_time,
            response,
            workload,
        });
        self.cost += cost;
    }

    /// Moves the events to `into` (whose own were written), leaving this queue empty.
    fn take(&mut self, into: &mut ThreadQueue) {
        into.events.clear();
        into.bytes.clear();
        std::mem::swap(&mut self.events, &mut into.events);
        std::mem::swap(&mut self.bytes, &mut into.bytes);
        into.cost = std::mem::take(&mut self.cost);
    }
}

type SharedQueue = Arc<Mutex<ThreadQueue>>;

fn lock(queue: &Mutex<ThreadQueue>) -> std::sync::MutexGuard<'_, ThreadQueue> {
    queue
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

thread_local! {
    /// This thread's queue of each sink it logged to, by the sink's id.
    static QUEUES: RefCell<Vec<(u64, SharedQueue)>> = const { RefCell::new(Vec::new()) };
}

/// Tells sinks apart in [`QUEUES`] (an address could be reused by a later sink).
static NEXT_SINK_ID: AtomicU64 = AtomicU64::new(0);

/// Every thread's queue, for the writer.
#[derive(Default)]
struct Registry {
    queues: Vec<SharedQueue>,
    /// The writer has taken the last events: queues made now are closed from the start.
    closed: bool,
}

#[derive(Default)]
struct Shared {
    counters: Arc<DnstapCounters>,
    /// What every queue holds and has room taken for, against `queue_bytes`.
    queued_bytes: AtomicUsize,
    queues: Mutex<Registry>,
    /// Events the writer has taken and not yet written or dropped. The writer changes it
    /// per event: on a cache line of its own, so that the logging threads' `queued_bytes`
    /// does not bounce between the CPUs with it.
    in_hand: OwnCacheLine<AtomicUsize>,
    /// Set on close: drain what is queued, but do not retry a reader for it (a first try,
    /// for a log closed right after it started, is still made).
    closing: AtomicBool,
    /// Set by [`DnstapSink::reopen`]: end the file and start a new one at its path.
    reopen: AtomicBool,
}

/// A value alone on its cache line (128 bytes: two lines, as adjacent-line prefetch pairs
/// them on x86).
#[derive(Default)]
#[repr(align(128))]
struct OwnCacheLine<T>(T);

impl<T> std::ops::Deref for OwnCacheLine<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

impl Shared {
    fn registry(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.queues
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The dnstap log: [`DnstapSink::log`] from any thread; a writer thread does the I/O.
/// Dropping it closes the log (see [`DnstapSink::close`]).
pub struct DnstapSink {
    id: u64,
    shared: Arc<Shared>,
    queue_bytes: usize,
    /// How much room a logging thread takes from `queue_bytes` at a time.
    reserve_chunk: usize,
    /// The thread and its "done" signal; in a Mutex only so the sink is `Sync` (a Receiver is
    /// not), for sharing between the relays' threads.
    writer: Mutex<Option<(JoinHandle<()>, Receiver<()>)>>,
    /// Whether the log is a file (which [`reopen`](Self::reopen) starts anew).
    file: bool,
}

impl DnstapSink {
    /// Starts the writer thread. A file is created (truncated) here, so a bad path is an
    /// error now; a socket reader may come later.
    pub fn start(settings: DnstapSettings) -> Result<Self, DnstapError> {
        let file = matches!(settings.target, DnstapTarget::File(_));
        let output = match &settings.target {
            DnstapTarget::File(path) => Some(open_file(path)?),
            DnstapTarget::Unix(_) => None,
        };
        let (done_tx, done_rx) = mpsc::channel();
        let shared = Arc::new(Shared {
            counters: Arc::clone(&settings.counters),
            ..Shared::default()
        });
        let writer = Writer {
            target: settings.target,
            shared: Arc::clone(&shared),
            identity: settings.identity.into_bytes(),
            name_cgroup: settings.name_cgroup,
            last_named: None,
            output,
            tried: false,
            backoff: FIRST_BACKOFF,
            next_attempt: Instant::now(),
            taken: Vec::new(),
            spare: Vec::new(),
            frame: Vec::new(),
            scratch: Vec::new(),
            dirty: false,
            last_flush: Instant::now(),
            drops_reported: 0,
            reader_warning: RateLimited::new(WARN_INTERVAL),
            drop_warning: RateLimited::new(WARN_INTERVAL),
        };
        let handle = thread::Builder::new()
            .name("dnstap-writer".into())
            .spawn(move || {
                writer.run();
                let _ = done_tx.send(());
            })
            .map_err(DnstapError::Thread)?;
        Ok(Self {
            id: NEXT_SINK_ID.fetch_add(1, Ordering::Relaxed),
            shared,
            queue_bytes: settings.queue_bytes,
            reserve_chunk: (settings.queue_bytes / RESERVE_CHUNKS).max(1),
            writer: Mutex::new(Some((handle, done_rx))),
            file,
        })
    }

    /// Queues a copy of `event` for the writer, or drops and counts it when the queue is full
    /// (or the log is closed). Never blocks: the only lock is this thread's own queue's, which
    /// the writer holds just to take it.
    pub fn log(&self, event: &Event<'_>) {
        let cost = event.cost();
        let kept = QUEUES.with_borrow_mut(|queues| {
            let mut queue = lock(self.thread_queue(queues));
            if queue.closed || (queue.credit < cost && !self.reserve(&mut queue, cost)) {
                return false;
            }
            queue.credit -= cost;
            queue.push(event, cost);
            true
        });
        if !kept {
            self.shared.counters.drop_one();
        }
    }

    /// Takes room for at least `cost` more bytes from the shared bound into `queue`'s credit:
    /// a chunk at a time, so that a busy thread changes the count every other logging thread
    /// and the writer change once per chunk, not once per event. Chunks come only from the
    /// bound's first half: above it, just `cost`, so that what the threads hold unused never
    /// keeps more than half the bound from the others. Whether it fits.
    fn reserve(&self, queue: &mut ThreadQueue, cost: usize) -> bool {
        let queued_bytes = &self.shared.queued_bytes;
        let mut queued = queued_bytes.load(Ordering::Relaxed);
        loop {
            let chunk = cost.max(self.reserve_chunk);
            let room = if queued + chunk <= self.queue_bytes / 2 {
                chunk
            } else if queued + cost <= self.queue_bytes {
                cost
            } else {
                return false;
            };
            match queued_bytes.compare_exchange_weak(
                queued,
                queued + room,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => {
                    queue.credit += room;
                    return true;
                }
                Err(now) => queued = now,
            }
        }
    }

    /// This thread's queue for this sink, made (and shown to the writer) on first use.
    fn thread_queue<'q>(&self, queues: &'q mut Vec<(u64, SharedQueue)>) -> &'q SharedQueue {
        if let Some(at) = queues.iter().position(|(id, _)| *id == self.id) {
            return &queues[at].1;
        }
        // Queues of sinks that are gone (only this thread holds them) go first.
        queues.retain(|(_, queue)| Arc::strong_count(queue) > 1);
        let queue = SharedQueue::default();
        let mut registry = self.shared.registry();
        lock(&queue).closed = registry.closed;
        registry.queues.push(Arc::clone(&queue));
        drop(registry);
        queues.push((self.id, queue));
        &queues[queues.len() - 1].1
    }

    /// The counters, to read from metrics.
    pub fn counters(&self) -> Arc<DnstapCounters> {
        Arc::clone(&self.shared.counters)
    }

    /// Writes what is queued, then STOP (and waits for a socket reader's FINISH), waiting at
    /// most `limit` for the writer thread. Returns whether it finished; if not, the thread
    /// is left to finish (or stay stuck) on its own.
    pub fn close(mut self, limit: Duration) -> bool {
        self.close_within(limit)
    }

    fn close_within(&mut self, limit: Duration) -> bool {
        // The writer takes the queues one last time, closing them, and ends.
        self.shared.closing.store(true, Ordering::Relaxed);
        let writer = self
            .writer
            .get_mut()
            .unwrap_or_else(|poison| poison.into_inner())
            .take();
        let Some((handle, done)) = writer else {
            return true;
        };
        match done.recv_timeout(limit) {
            Err(RecvTimeoutError::Timeout) => {
                // Whatever it has not written is lost with the process: count it so (a few
                // it manages to write meanwhile are then counted twice).
                let left = self.shared.in_hand.load(Ordering::Relaxed) + self.close_queues();
                let left_events = u64::try_from(left).unwrap_or(u64::MAX);
                self.shared
                    .counters
                    .dropped
                    .fetch_add(left_events, Ordering::Relaxed);
                log::warn!(
                    "dnstap: the writer did not finish within {limit:?}; leaving it, with the \
                     events of {left} lookups unwritten (counted as dropped)"
                );
                false
            }
            // Disconnected without a message: the thread panicked; join reports nothing new.
            Ok(()) | Err(RecvTimeoutError::Disconnected) => {
                let _ = handle.join();
                true
            }
        }
    }
}

impl DnstapSink {
    /// Ends the log file and starts a new one at its path, for log rotation (SIGHUP, after
    /// logrotate moved the file away); whatever is at the path then is kept aside, unless it
    /// is an empty file (logrotate's `create`), which is used. Returns whether the log is a
    /// file (a socket reader has nothing to reopen).
    pub fn reopen(&self) -> bool {
        if self.file {
            self.shared.reopen.store(true, Ordering::Relaxed);
        }
        self.file
    }

    /// Closes every thread's queue (what is logged now is dropped and counted), returning how
    /// many events they still held.
    fn close_queues(&self) -> usize {
        let mut registry = self.shared.registry();
        registry.closed = true;
        registry
            .queues
            .iter()
            .map(|queue| {
                let mut queue = lock(queue);
                queue.closed = true;
                let held = queue.events.len();
                queue.events.clear();
                held
            })
            .sum()
    }
}

impl Drop for DnstapSink {
    fn drop(&mut self) {
        self.close_within(CLOSE_LIMIT);
    }
}

/// The writer thread's state.
struct Writer {
    target: DnstapTarget,
    shared: Arc<Shared>,
    identity: Vec<u8>,
    name_cgroup: Option<CgroupNamer>,
    /// The last cgroup named, within one take: a batch's events are mostly one workload's,
    /// and naming takes a lock. Forgotten at each take, so a renamed workload shows soon.
    last_named: Option<(u64, Arc<str>)>,
    output: Option<Output>,
    /// Whether we have tried to connect to a socket reader, or to start a file anew, yet.
    tried: bool,
    backoff: Duration,
    next_attempt: Instant,
    /// The queues' events taken in one pass, and emptied queues to take the next into: the
    /// buffers go round between the threads instead of being made anew.
    taken: Vec<ThreadQueue>,
    spare: Vec<ThreadQueue>,
    /// Buffers reused from event to event.
    frame: Vec<u8>,
    scratch: Vec<u8>,
    /// Whether the output holds frames not yet flushed.
    dirty: bool,
    last_flush: Instant,
    drops_reported: u64,
    reader_warning: RateLimited,
    drop_warning: RateLimited,
}

/// A logging thread takes room from the queues' shared bound in chunks of this share of it.
const RESERVE_CHUNKS: usize = 64;
/// Emptied queues the writer keeps to swap in; a bigger one goes (a burst's buffers are not
/// held for ever).
const SPARE_QUEUES: usize = 8;
/// Fewer events than this in one take, and the writer naps before the next.
const SMALL_BATCH: usize = 256;
const SPARE_BYTES: usize = 1 << 20;

impl Writer {
    fn run(mut self) {
        loop {
            // Seen before the last take: whatever was logged before closing is in it.
            let closing = self.shared.closing.load(Ordering::Relaxed);
            if self.shared.reopen.swap(false, Ordering::Relaxed) {
                self.reopen_file();
            }
            self.take_queues(closing);
            if self.taken.is_empty() {
                if closing {
                    break;
                }
                // Idle: a reader sees everything so far now. Then a nap: the logging threads
                // never wake the writer (a futex call and a context switch per event); it
                // takes what they queued a batch at a time.
                self.flush();
                self.report_drops();
                thread::sleep(IDLE_NAP.min(self.idle_wait()));
                self.reconnect_if_due();
                continue;
            }
            let mut taken = std::mem::take(&mut self.taken);
            let events: usize = taken.iter().map(|queue| queue.events.len()).sum();
            self.shared.in_hand.store(events, Ordering::Relaxed);
            for queue in &mut taken {
                for queued in &queue.events {
                    self.write(queued, &queue.bytes);
                    self.shared.in_hand.fetch_sub(1, Ordering::Relaxed);
                }
                self.shared
                    .queued_bytes
                    .fetch_sub(queue.cost, Ordering::Relaxed);
            }
            for mut queue in taken.drain(..) {
                if self.spare.len() < SPARE_QUEUES && queue.bytes.capacity() <= SPARE_BYTES {
                    queue.events.clear();
                    queue.bytes.clear();
                    self.spare.push(queue);
                }
            }
            self.taken = taken;
            if self.last_flush.elapsed() >= FLUSH_INTERVAL {
                self.flush();
                self.report_drops();
            }
            if closing {
                break;
            }
            // A small batch: the loggers are not busy, and taking their queues again at once
            // would only make their next events wait on the queue's lock.
            if events < SMALL_BATCH {
                thread::sleep(IDLE_NAP);
            }
        }
        self.stop();
        self.report_drops();
    }

    /// Takes every thread's queued events into `taken`; `last` also closes the queues, so
    /// what is logged after is dropped and counted. Forgets the queues of threads that ended.
    fn take_queues(&mut self, last: bool) {
        self.last_named = None;
        let mut registry = self.shared.registry();
        registry.closed = last;
        let mut returned = 0;
        registry.queues.retain(|shared| {
            let mut queue = lock(shared);
            queue.closed = last;
            // Only the writer holds it: its thread has ended, and it is empty once taken.
            let ended = Arc::strong_count(shared) == 1;
            if queue.events.is_empty() {
                // A thread that logged nothing since the last take gives back the room it
                // took, so idle threads hold none of the bound.
                returned += std::mem::take(&mut queue.credit);
            } else {
                let mut into = self.spare.pop().unwrap_or_default();
                queue.take(&mut into);
                self.taken.push(into);
                if ended {
                    returned += std::mem::take(&mut queue.credit);
                }
            }
            !ended
        });
        if returned > 0 {
            self.shared
                .queued_bytes
                .fetch_sub(returned, Ordering::Relaxed);
        }
    }

    /// How long to wait for an event when there is none: until the next reconnection
    /// attempt, or a flush interval.
    fn idle_wait(&self) -> Duration {
        if self.output.is_none() {
            self.next_attempt
                .saturating_duration_since(Instant::now())
                .clamp(Duration::from_millis(10), FLUSH_INTERVAL)
        } else {
            FLUSH_INTERVAL
        }
    }

    fn write(&mut self, queued: &Queued, bytes: &[u8]) {
        if self.output.is_none() {
            self.reconnect_if_due();
        }
        let Some(output) = &mut self.output else {
            self.shared.counters.drop_one();
            return;
        };
        let named;
        let workload = match &queued.workload {
            QueuedWorkload::Unknown => Workload::Unknown,
            QueuedWorkload::Named(range) => {
                Workload::Named(std::str::from_utf8(&bytes[range.clone()]).unwrap_or_default())
            }
            QueuedWorkload::Cgroup(id) => match &self.name_cgroup {
                Some(name_cgroup) => {
                    named = match &self.last_named {
                        Some((last, name)) if last == id => Arc::clone(name),
                        _ => {
                            let name = name_cgroup(*id);
                            self.last_named = Some((*id, Arc::clone(&name)));
                            name
                        }
                    };
                    Workload::Named(&named)
                }
                None => Workload::Cgroup(*id),
            },
        };
        let event = Event {
            kind: queued.kind,
            transport: queued.transport,
            client: queued.client,
            server: queued.server,
            query_time: queued.query_time,
            query: queued.query.clone().map(|range| &bytes[range]),
            response_time: queued.response_time,
            response: queued.response.clone().map(|range| &bytes[range]),
            workload,
        };
        self.frame.clear();
        encode::dnstap(
            &event,
            &self.identity,
            VERSION.as_bytes(),
            &mut self.scratch,
            &mut self.frame,
        );
        match fstrm::write_data(&mut output.writer, &self.frame) {
            Ok(()) => {
                self.shared.counters.written.fetch_add(1, Ordering::Relaxed);
                self.dirty = true;
            }
            Err(err) => {
                self.shared.counters.drop_one();
                self.lost(&err);
            }
        }
    }

    fn flush(&mut self) {
        self.last_flush = Instant::now();
        if !self.dirty {
            return;
        }
        self.dirty = false;
        if let Some(output) = &mut self.output
            && let Err(err) = output.writer.flush()
        {
            self.lost(&err);
        }
    }

    /// The output failed: retried after the backoff, a socket by connecting again, a file by
    /// starting a new one (the failed one kept aside: a partial frame ends what can be read of
    /// it).
    fn lost(&mut self, err: &io::Error) {
        // Dropping a BufWriter flushes it; with a stalled reader that would wait again.
        if let Some(output) = self.output.take() {
            let (inner, _unwritten) = output.writer.into_parts();
            drop(inner);
        }
        self.dirty = false;
        self.next_attempt = Instant::now() + self.backoff;
        let (target, backoff) = (&self.target, self.backoff);
        let _ = match target {
            DnstapTarget::File(_) => self.reader_warning.warn(|_| {
                format!(
                    "dnstap: writing {target} failed ({err}); lookups are answered but \
                     not logged until a new file can be started there (this one kept aside, \
                     as at start: a partial frame ends it), next try in {backoff:?}"
                )
            }),
            DnstapTarget::Unix(_) => self.reader_warning.warn(|_| {
                format!(
                    "dnstap: lost the reader at {target} ({err}); lookups are answered but not \
                     logged until it is back, next try in {backoff:?}"
                )
            }),
        };
    }

    /// Ends the file (STOP) and starts a new one at its path at once: after log rotation.
    fn reopen_file(&mut self) {
        let DnstapTarget::File(path) = &self.target else {
            return;
        };
        let path = path.clone();
        self.flush();
        self.stop();
        // logrotate's `create` leaves an empty file at the path: used, not kept aside.
        if std::fs::symlink_metadata(&path)
            .is_ok_and(|existing| existing.file_type().is_file() && existing.len() == 0)
        {
            let _ = std::fs::remove_file(&path);
        }
        self.tried = false;
        self.next_attempt = Instant::now();
        self.backoff = FIRST_BACKOFF;
        log::info!("dnstap: reopening {} (SIGHUP)", self.target);
        self.reconnect_if_due();
    }

    fn reconnect_if_due(&mut self) {
        let retry = self.tried;
        let file = matches!(self.target, DnstapTarget::File(_));
        // A file is started anew only to go on logging, never to close it.
        if self.output.is_some()
            || ((retry || file) && self.shared.closing.load(Ordering::Relaxed))
            || Instant::now() < self.next_attempt
        {
            return;
        }
        self.tried = true;
        let opened = match &self.target {
            DnstapTarget::Unix(path) => connect(path),
            DnstapTarget::File(path) => open_file(path).map_err(io::Error::other),
        };
        match opened {
            Ok(output) => {
                log::info!("dnstap: writing to {}", self.target);
                self.output = Some(output);
                self.backoff = FIRST_BACKOFF;
            }
            Err(err) => {
                let (target, backoff) = (&self.target, self.backoff);
                let what = if file { "cannot start" } else { "no reader at" };
                self.reader_warning.warn(|attempts| {
                    format!(
                        "dnstap: {what} {target} ({err}; {attempts} attempts); lookups \
                         are answered but not logged until there is, next try in {backoff:?}"
                    )
                });
                self.next_attempt = Instant::now() + self.backoff;
                self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
            }
        }
    }

    fn report_drops(&mut self) {
        let dropped = self.shared.counters.dropped();
        if dropped == self.drops_reported {
            return;
        }
        let since = dropped - self.drops_reported;
        if self.drop_warning.warn(|_| {
            format!(
                "dnstap: left {since} messages (a lookup's query and its answer are two) out \
                 of the log, their lookups answered all the same (queue full, no reader, or \
                 asked before the log started)"
            )
        }) {
            self.drops_reported = dropped;
        }
    }

    /// STOP, and for a socket reader its FINISH (within the I/O timeout).
    fn stop(&mut self) {
        let Some(mut output) = self.output.take() else {
            return;
        };
        let stopped = fstrm::write_control(&mut output.writer, fstrm::STOP, None)
            .and_then(|()| output.writer.flush());
        if let Err(err) = stopped {
            log::warn!("dnstap: cannot end {}: {err}", self.target);
            let (inner, _unwritten) = output.writer.into_parts();
            drop(inner);
            return;
        }
        if let Some(reader) = &output.reader {
            match fstrm::read_frame(&mut &*reader, 0) {
                Ok(fstrm::Frame::Control {
                    kind: fstrm::FINISH,
                    ..
                }) => {}
                other => log::debug!("dnstap: no FINISH from {}: {other:?}", self.target),
            }
        }
    }
}

#[cfg(test)]
mod tests;
