//! A dnstap log of lookups (dnstap.info): every query and answer, with the workload that
//! asked, for tools that read dnstap (dnstap-ldns, golang-dnstap, dnscollector).
//!
//! [`DnstapSink::log`] never blocks and never queues without bound: events go through a
//! bounded queue to a writer thread of their own, and an event that does not fit, or finds no
//! reader, is dropped and counted ([`DnstapCounters`]). Lookups must never wait for a log.
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

use std::{
    fmt,
    fs::File,
    io::{self, BufWriter, Write},
    net::SocketAddr,
    os::{fd::OwnedFd, unix::net::UnixStream},
    path::{Path, PathBuf},
    str::FromStr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TryRecvError},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant, SystemTime},
};

use bytes::Bytes;

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

/// One lookup event; see the module docs for what goes where.
#[derive(Debug, Clone)]
pub struct Event {
    pub kind: MessageType,
    pub transport: Transport,
    /// The workload's socket: `query_address`/`query_port`.
    pub client: SocketAddr,
    /// The server the workload asked: `response_address`/`response_port`.
    pub server: SocketAddr,
    pub query_time: SystemTime,
    /// The query in wire format (for the query events).
    pub query: Option<Bytes>,
    pub response_time: Option<SystemTime>,
    /// The response in wire format (for the response events).
    pub response: Option<Bytes>,
    /// The workload's full form, for `extra`; shared, so callers can keep one per cgroup.
    pub workload: Option<Arc<str>>,
}

impl Event {
    /// What the event holds in memory while queued.
    fn cost(&self) -> usize {
        size_of::<Self>()
            + self.query.as_ref().map_or(0, Bytes::len)
            + self.response.as_ref().map_or(0, Bytes::len)
            + self.workload.as_ref().map_or(0, |workload| workload.len())
    }
}

/// How a [`DnstapSink`] is set up.
#[derive(Debug, Clone)]
pub struct DnstapSettings {
    pub target: DnstapTarget,
    /// `identity` in every message: the node's name.
    pub identity: String,
    /// The most events queued for the writer.
    pub queue_events: usize,
    /// The most bytes queued for the writer (TCP messages reach 64 KiB each).
    pub queue_bytes: usize,
}

impl DnstapSettings {
    pub fn new(target: DnstapTarget, identity: impl Into<String>) -> Self {
        Self {
            target,
            identity: identity.into(),
            queue_events: 4096,
            queue_bytes: 8 << 20,
        }
    }
}

/// Events written and dropped, for metrics. `written` counts frames handed to the output's
/// buffer: a socket that fails later loses what was in it uncounted.
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

    fn drop_one(&self) {
        self.dropped.fetch_add(1, Ordering::Relaxed);
    }
}

#[derive(Debug, Default)]
struct Shared {
    counters: Arc<DnstapCounters>,
    queued_bytes: AtomicUsize,
    /// Set on close: drain what is queued, but do not retry a reader for it (a first try,
    /// for a log closed right after it started, is still made).
    closing: AtomicBool,
}

/// The dnstap log: [`DnstapSink::log`] from any thread; a writer thread does the I/O.
/// Dropping it closes the log (see [`DnstapSink::close`]).
pub struct DnstapSink {
    sender: Option<SyncSender<Event>>,
    shared: Arc<Shared>,
    queue_bytes: usize,
    /// The thread and its "done" signal; in a Mutex only so the sink is `Sync` (a Receiver is
    /// not), for sharing between the relays' threads.
    writer: Mutex<Option<(JoinHandle<()>, Receiver<()>)>>,
}

impl DnstapSink {
    /// Starts the writer thread. A file is created (truncated) here, so a bad path is an
    /// error now; a socket reader may come later.
    pub fn start(settings: DnstapSettings) -> Result<Self, DnstapError> {
        let output = match &settings.target {
            DnstapTarget::File(path) => Some(open_file(path)?),
            DnstapTarget::Unix(_) => None,
        };
        let (sender, events) = mpsc::sync_channel(settings.queue_events.max(1));
        let (done_tx, done_rx) = mpsc::channel();
        let shared = Arc::new(Shared::default());
        let writer = Writer {
            target: settings.target,
            events,
            shared: Arc::clone(&shared),
            identity: settings.identity.into_bytes(),
            output,
            tried: false,
            backoff: FIRST_BACKOFF,
            next_attempt: Instant::now(),
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
            sender: Some(sender),
            shared,
            queue_bytes: settings.queue_bytes,
            writer: Mutex::new(Some((handle, done_rx))),
        })
    }

    /// Queues `event` for the writer, or drops and counts it when the queue is full (or
    /// the log is closed). Never blocks.
    pub fn log(&self, event: Event) {
        let cost = event.cost();
        let queued = self.shared.queued_bytes.fetch_add(cost, Ordering::Relaxed);
        let sent = queued + cost <= self.queue_bytes
            && self
                .sender
                .as_ref()
                .is_some_and(|sender| sender.try_send(event).is_ok());
        if !sent {
            self.shared.queued_bytes.fetch_sub(cost, Ordering::Relaxed);
            self.shared.counters.drop_one();
        }
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
        self.shared.closing.store(true, Ordering::Relaxed);
        // The writer sees the queue disconnected once it has drained it.
        drop(self.sender.take());
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
                log::warn!("dnstap: the writer did not finish within {limit:?}; leaving it");
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

impl Drop for DnstapSink {
    fn drop(&mut self) {
        self.close_within(CLOSE_LIMIT);
    }
}

fn open_file(path: &Path) -> Result<Output, DnstapError> {
    let create = |source| DnstapError::CreateFile {
        path: path.to_owned(),
        source,
    };
    let file = create_log_file(path).map_err(create)?;
    let mut writer: BufWriter<Box<dyn Write + Send>> = BufWriter::new(Box::new(file));
    fstrm::write_control(&mut writer, fstrm::START, Some(CONTENT_TYPE)).map_err(create)?;
    Ok(Output {
        writer,
        reader: None,
    })
}

/// Checks, before the agent changes anything, that `target` can be a log: a file's directory
/// exists, and nothing but a regular file is at its path.
pub fn check_target(target: &DnstapTarget) -> Result<(), String> {
    use std::os::unix::fs::FileTypeExt as _;
    let DnstapTarget::File(path) = target else {
        return Ok(());
    };
    let parent = path
        .parent()
        .filter(|parent| !parent.as_os_str().is_empty());
    if let Some(parent) = parent
        && !parent.is_dir()
    {
        return Err(format!("{}: no such directory", parent.display()));
    }
    match std::fs::symlink_metadata(path) {
        Ok(existing) if !existing.file_type().is_file() => {
            let kind = existing.file_type();
            let what = if kind.is_symlink() {
                "a symlink"
            } else if kind.is_fifo() {
                "a FIFO"
            } else if kind.is_dir() {
                "a directory"
            } else {
                "not a regular file"
            };
            Err(format!(
                "{}: {what}; give the path of a regular file to create",
                path.display()
            ))
        }
        _ => Ok(()),
    }
}

/// Creates the log file at `path`, a regular file and nothing else: not through a symlink
/// (someone who may write to the directory could point it at any file the agent may write),
/// and never waiting (a FIFO without a reader would block the agent). A log already there is
/// kept, renamed `PATH.<unix seconds>`: a restarted agent's, or, during a takeover, the one
/// the other agent is still writing to (through its own descriptor).
pub fn create_log_file(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::{FileTypeExt as _, OpenOptionsExt as _};
    if let Ok(existing) = std::fs::symlink_metadata(path) {
        let kind = existing.file_type();
        if kind.is_symlink() || kind.is_fifo() || kind.is_socket() || kind.is_dir() {
            return Err(io::Error::other(format!(
                "not a regular file ({kind:?}): give the path of a file to create"
            )));
        }
        if existing.len() > 0 {
            let seconds = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |since| since.as_secs());
            let mut kept = path.as_os_str().to_owned();
            kept.push(format!(".{seconds}"));
            std::fs::rename(path, &kept)?;
        }
    }
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .mode(0o640)
        .open(path)?;
    if !file.metadata()?.file_type().is_file() {
        return Err(io::Error::other("not a regular file"));
    }
    Ok(file)
}

/// A connected output: the buffered writer, and for a socket the stream FINISH comes on.
struct Output {
    writer: BufWriter<Box<dyn Write + Send>>,
    reader: Option<UnixStream>,
}

/// Connects to a socket reader and does the handshake: READY, ACCEPT, START.
fn connect(path: &Path) -> io::Result<Output> {
    let socket = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None)?;
    // Non-blocking underneath: a reader whose backlog is full is an error, not a wait.
    socket.connect_timeout(&socket2::SockAddr::unix(path)?, IO_TIMEOUT)?;
    let stream = UnixStream::from(OwnedFd::from(socket));
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    fstrm::write_control(&mut &stream, fstrm::READY, Some(CONTENT_TYPE))?;
    match fstrm::read_frame(&mut &stream, 0)? {
        fstrm::Frame::Control {
            kind: fstrm::ACCEPT,
            content_types,
        } if content_types.is_empty() || content_types.iter().any(|t| t == CONTENT_TYPE) => {}
        other => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("expected ACCEPT of protobuf:dnstap.Dnstap, got {other:?}"),
            ));
        }
    }
    let mut writer: BufWriter<Box<dyn Write + Send>> =
        BufWriter::new(Box::new(stream.try_clone()?));
    fstrm::write_control(&mut writer, fstrm::START, Some(CONTENT_TYPE))?;
    writer.flush()?;
    Ok(Output {
        writer,
        reader: Some(stream),
    })
}

/// The writer thread's state.
struct Writer {
    target: DnstapTarget,
    events: Receiver<Event>,
    shared: Arc<Shared>,
    identity: Vec<u8>,
    output: Option<Output>,
    /// Whether we have tried to connect to a socket reader yet.
    tried: bool,
    backoff: Duration,
    next_attempt: Instant,
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

impl Writer {
    fn run(mut self) {
        loop {
            let event = match self.events.try_recv() {
                Ok(event) => event,
                Err(TryRecvError::Disconnected) => break,
                Err(TryRecvError::Empty) => {
                    // Idle: a reader sees everything so far now. Then a nap, not a blocking
                    // receive: a writer waiting in the channel is woken by every event a
                    // lookup logs (a futex call and a context switch each), one napping
                    // collects them a batch at a time.
                    self.flush();
                    self.report_drops();
                    thread::sleep(IDLE_NAP.min(self.idle_wait()));
                    self.reconnect_if_due();
                    continue;
                }
            };
            self.shared
                .queued_bytes
                .fetch_sub(event.cost(), Ordering::Relaxed);
            self.write(&event);
            if self.last_flush.elapsed() >= FLUSH_INTERVAL {
                self.flush();
                self.report_drops();
            }
        }
        self.stop();
        self.report_drops();
    }

    /// How long to wait for an event when there is none: until the next reconnection
    /// attempt, or a flush interval.
    fn idle_wait(&self) -> Duration {
        if self.output.is_none() && matches!(self.target, DnstapTarget::Unix(_)) {
            self.next_attempt
                .saturating_duration_since(Instant::now())
                .clamp(Duration::from_millis(10), FLUSH_INTERVAL)
        } else {
            FLUSH_INTERVAL
        }
    }

    fn write(&mut self, event: &Event) {
        if self.output.is_none() {
            self.reconnect_if_due();
        }
        let Some(output) = &mut self.output else {
            self.shared.counters.drop_one();
            return;
        };
        self.frame.clear();
        encode::dnstap(
            event,
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

    /// The output failed: a file is done for, a socket is retried after the backoff.
    fn lost(&mut self, err: &io::Error) {
        // Dropping a BufWriter flushes it; with a stalled reader that would wait again.
        if let Some(output) = self.output.take() {
            let (inner, _unwritten) = output.writer.into_parts();
            drop(inner);
        }
        self.dirty = false;
        let target = &self.target;
        match target {
            DnstapTarget::File(_) => {
                log::warn!(
                    "dnstap: writing {target} failed ({err}); it gets nothing more (a partial \
                     frame would corrupt the rest of it)"
                );
            }
            DnstapTarget::Unix(_) => {
                self.next_attempt = Instant::now() + self.backoff;
                let backoff = self.backoff;
                self.reader_warning.warn(|_| {
                    format!(
                        "dnstap: lost the reader at {target} ({err}); dropping lookups until it \
                         is back, next try in {backoff:?}"
                    )
                });
            }
        }
    }

    fn reconnect_if_due(&mut self) {
        let DnstapTarget::Unix(path) = &self.target else {
            return;
        };
        let retry = self.tried;
        if self.output.is_some()
            || (retry && self.shared.closing.load(Ordering::Relaxed))
            || Instant::now() < self.next_attempt
        {
            return;
        }
        self.tried = true;
        match connect(path) {
            Ok(output) => {
                log::info!("dnstap: writing to {}", self.target);
                self.output = Some(output);
                self.backoff = FIRST_BACKOFF;
            }
            Err(err) => {
                let (target, backoff) = (&self.target, self.backoff);
                self.reader_warning.warn(|attempts| {
                    format!(
                        "dnstap: no reader at {target} ({err}; {attempts} attempts); dropping \
                         lookups until there is, next try in {backoff:?}"
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
        if self
            .drop_warning
            .warn(|_| format!("dnstap: dropped {since} lookups (queue full, or no reader)"))
        {
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
