use std::{
    fs, io::Read as _, net::Ipv4Addr, os::unix::net::UnixListener, path::Path, process::Command,
    sync::Mutex,
};

use hickory_proto::{
    op::{Message, MessageType as DnsMessageType, OpCode, Query},
    rr::{Name, RData, Record, RecordType, rdata::A},
};

use super::*;

const WORKLOAD: &str = "pod=0b7632a2-a56e-4278-987a-22de18008dbe \
                        container=0bc5eac79e3ae7a0c2651f14722aa10fa333eb2325c2ca97da33aa284cda81b0";

/// A directory of the test's own, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "dns-proxy-test-dnstap-{tag}-{}",
            std::process::id()
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap_or_else(|err| panic!("mkdir {}: {err}", dir.display()));
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn query(name: &str) -> Message {
    let mut message = Message::new();
    message
        .set_id(0x1234)
        .set_message_type(DnsMessageType::Query)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(true)
        .add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
    message
}

fn response(name: &str, answer: Ipv4Addr) -> Message {
    let mut message = query(name);
    message
        .set_message_type(DnsMessageType::Response)
        .set_recursion_available(true)
        .add_answer(Record::from_rdata(
            Name::from_ascii(name).unwrap(),
            300,
            RData::A(A(answer)),
        ));
    message
}

/// A lookup of `name`: what its two events on the workload's side carry.
struct Lookup {
    start: SystemTime,
    query: Vec<u8>,
    response: Vec<u8>,
}

fn lookup(name: &str) -> Lookup {
    Lookup {
        start: SystemTime::now(),
        query: query(name).to_vec().unwrap(),
        response: response(name, Ipv4Addr::new(198, 51, 100, 7))
            .to_vec()
            .unwrap(),
    }
}

impl Lookup {
    fn events(&self) -> [Event<'_>; 2] {
        let common = Event {
            kind: MessageType::ClientQuery,
            transport: Transport::Udp,
            client: "10.244.1.7:41234".parse().unwrap(),
            server: "192.0.2.53:53".parse().unwrap(),
            query_time: self.start,
            query: Some(&self.query),
            response_time: None,
            response: None,
            workload: Workload::Named(WORKLOAD),
        };
        let answered = Event {
            kind: MessageType::ClientResponse,
            response_time: Some(self.start + Duration::from_millis(3)),
            response: Some(&self.response),
            ..common
        };
        [common, answered]
    }
}

/// `dnstap-ldns -y -r FILE`'s YAML.
fn dnstap_ldns(file: &Path) -> String {
    let output = match Command::new("dnstap-ldns")
        .arg("-y")
        .arg("-r")
        .arg(file)
        .output()
    {
        Ok(output) => output,
        Err(err) if err.kind() == io::ErrorKind::NotFound => {
            panic!("dnstap-ldns is not installed: run `cargo xtask setup --tests`")
        }
        Err(err) => panic!("cannot run dnstap-ldns: {err}"),
    };
    assert!(
        output.status.success(),
        "dnstap-ldns -y -r {} failed ({}): {}",
        file.display(),
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// Polls `check` every 10 ms until it holds, or panics with `what` after `limit`.
fn wait_for(what: &str, limit: Duration, check: impl Fn() -> bool) {
    let deadline = Instant::now() + limit;
    while !check() {
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        thread::sleep(Duration::from_millis(10));
    }
}

/// The data frames of a Frame Streams file written by a unidirectional writer.
fn read_file(path: &Path) -> Vec<Vec<u8>> {
    let bytes = fs::read(path).unwrap();
    let mut input = &bytes[..];
    let start = fstrm::read_frame(&mut input, 1 << 20).unwrap();
    assert_eq!(
        start,
        fstrm::Frame::Control {
            kind: fstrm::START,
            content_types: vec![CONTENT_TYPE.to_vec()]
        }
    );
    let mut frames = Vec::new();
    loop {
        match fstrm::read_frame(&mut input, 1 << 20).unwrap() {
            fstrm::Frame::Data(frame) => frames.push(frame),
            fstrm::Frame::Control {
                kind: fstrm::STOP, ..
            } => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(input.is_empty(), "{} bytes after STOP", input.len());
    frames
}

/// Writes `frames` as a Frame Streams file, for dnstap-ldns to read.
fn write_file(path: &Path, frames: &[Vec<u8>]) {
    let mut out = Vec::new();
    fstrm::write_control(&mut out, fstrm::START, Some(CONTENT_TYPE)).unwrap();
    for frame in frames {
        fstrm::write_data(&mut out, frame).unwrap();
    }
    fstrm::write_control(&mut out, fstrm::STOP, None).unwrap();
    fs::write(path, out).unwrap();
}

/// What dnstap-ldns shows of the lookups from [`lookup`], and `extra`, which it does not show,
/// from the frames themselves.
fn assert_lookups_read_back(yaml: &str, frames: &[Vec<u8>], names: &[&str]) {
    let messages: Vec<&str> = yaml
        .split("\n---")
        .filter(|m| m.contains("type: MESSAGE"))
        .collect();
    assert_eq!(messages.len(), 2 * names.len(), "{yaml}");
    for (at, message) in messages.iter().enumerate() {
        let kind = if at % 2 == 0 {
            "CLIENT_QUERY"
        } else {
            "CLIENT_RESPONSE"
        };
        let name = names[at / 2];
        for expected in [
            format!("  type: {kind}\n"),
            "identity: \"node-1\"".into(),
            format!("version: \"{VERSION}\""),
            "socket_family: INET\n".into(),
            "socket_protocol: UDP\n".into(),
            "query_address: \"10.244.1.7\"".into(),
            "query_port: 41234\n".into(),
            "response_address: \"192.0.2.53\"".into(),
            "response_port: 53\n".into(),
            format!(";{name}\tIN\tA"),
        ] {
            assert!(
                message.contains(&expected),
                "no {expected:?} in:\n{message}"
            );
        }
        if kind == "CLIENT_RESPONSE" {
            assert!(
                message.contains(&format!("{name}\t300\tIN\tA\t198.51.100.7")),
                "{message}"
            );
        }
    }
    assert_eq!(frames.len(), messages.len());
    for frame in frames {
        let fields = encode::decode::fields(frame);
        assert_eq!(encode::decode::bytes(&fields, 3), WORKLOAD.as_bytes());
    }
}

#[test]
fn the_sink_can_be_shared_between_threads() {
    fn shareable<T: Send + Sync>() {}
    shareable::<DnstapSink>();
}

#[test]
fn targets_parse_from_unix_and_file_paths() {
    assert_eq!(
        "unix:/run/dnstap.sock".parse::<DnstapTarget>().unwrap(),
        DnstapTarget::Unix("/run/dnstap.sock".into())
    );
    assert_eq!(
        DnstapTarget::parse("file:relative/log:with:colons.dnstap").unwrap(),
        DnstapTarget::File("relative/log:with:colons.dnstap".into())
    );
    assert_eq!(DnstapTarget::Unix("/a".into()).to_string(), "unix:/a");
    for bad in [
        "",
        "unix:",
        "file:",
        "/run/dnstap.sock",
        "tcp:127.0.0.1:6000",
        "UNIX:/a",
    ] {
        let err = DnstapTarget::parse(bad).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("--dnstap {bad:?}: expected unix:PATH or file:PATH")
        );
    }
}

#[test]
fn a_file_that_cannot_be_created_is_an_error_at_start() {
    let target = DnstapTarget::File("/nonexistent/dir/lookups.dnstap".into());
    let Err(err) = DnstapSink::start(DnstapSettings::new(target, "node-1")) else {
        panic!("started with a file in a missing directory");
    };
    assert!(
        err.to_string()
            .starts_with("cannot create the dnstap file /nonexistent/dir/lookups.dnstap: "),
        "{err}"
    );
}

#[test]
fn dnstap_ldns_reads_the_file() {
    let dir = TempDir::new("file");
    let path = dir.0.join("lookups.dnstap");
    let settings = DnstapSettings::new(DnstapTarget::File(path.clone()), "node-1");
    let sink = DnstapSink::start(settings).unwrap();
    let names = ["www.example.test.", "api.example.test."];
    for name in names {
        for event in lookup(name).events() {
            sink.log(&event);
        }
    }
    let counters = sink.counters();
    assert!(sink.close(Duration::from_secs(5)));
    assert_eq!((counters.written(), counters.dropped()), (4, 0));
    assert_lookups_read_back(&dnstap_ldns(&path), &read_file(&path), &names);
}

#[test]
fn events_of_many_threads_are_all_written_even_from_threads_that_ended() {
    let dir = TempDir::new("threads");
    let path = dir.0.join("lookups.dnstap");
    let mut settings = DnstapSettings::new(DnstapTarget::File(path.clone()), "node-1");
    settings.name_cgroup = Some(Arc::new(|cgroup| format!("cgroup {cgroup}").into()));
    let sink = DnstapSink::start(settings).unwrap();
    let counters = sink.counters();
    // Threads that log and end at once, some while the writer naps, some while it writes.
    for round in 0..4_u64 {
        thread::scope(|scope| {
            for cgroup in 0..4 {
                let sink = &sink;
                scope.spawn(move || {
                    let asked = lookup("www.example.test.");
                    for event in asked.events() {
                        for _ in 0..250 {
                            sink.log(&Event {
                                workload: Workload::Cgroup(round * 10 + cgroup),
                                ..event
                            });
                        }
                    }
                });
            }
        });
        thread::sleep(Duration::from_millis(3));
    }
    assert!(sink.close(Duration::from_secs(5)));
    assert_eq!((counters.written(), counters.dropped()), (8_000, 0));
    let frames = read_file(&path);
    assert_eq!(frames.len(), 8_000);
    let named = |name: &[u8]| {
        frames
            .iter()
            .filter(|frame| frame.windows(name.len()).any(|at| at == name))
            .count()
    };
    assert_eq!(named(b"cgroup 31"), 500, "the writer names cgroups");
}

#[test]
fn threads_that_go_quiet_give_back_the_room_they_took_and_the_bound_holds() {
    let dir = TempDir::new("credit");
    let path = dir.0.join("lookups.dnstap");
    let mut settings = DnstapSettings::new(DnstapTarget::File(path), "node-1");
    settings.queue_bytes = 64 * 1024;
    let sink = DnstapSink::start(settings).unwrap();
    let queued = || sink.shared.queued_bytes.load(Ordering::Relaxed);
    let (quiet_tx, quiet_rx) = std::sync::mpsc::channel::<()>();
    let quiet_rx = Mutex::new(quiet_rx);
    thread::scope(|scope| {
        // Twenty threads that log one event each and then stay, quiet: each took a chunk of
        // room (a 64th of the bound) for it.
        let (logged_tx, logged_rx) = std::sync::mpsc::channel();
        for _ in 0..20 {
            let (sink, quiet_rx, logged_tx) = (&sink, &quiet_rx, logged_tx.clone());
            scope.spawn(move || {
                sink.log(&lookup("www.example.test.").events()[0]);
                logged_tx.send(()).unwrap();
                let _ = quiet_rx.lock().unwrap().recv();
            });
        }
        for _ in 0..20 {
            logged_rx.recv().unwrap();
        }
        // Once the writer has taken and written their events, and found them quiet, none of
        // that room is held.
        wait_for(
            "the quiet threads' room back",
            Duration::from_secs(5),
            || sink.counters().written() == 20 && queued() == 0,
        );
        // And the threads that log hold what the bound allows at most.
        let big = [0; 2048];
        let asked = lookup("www.example.test.");
        for _ in 0..200 {
            let mut event = asked.events()[1];
            event.response = Some(&big);
            sink.log(&event);
            assert!(queued() <= 64 * 1024, "{}", queued());
        }
        drop(quiet_tx);
    });
}

#[test]
fn what_is_logged_after_close_is_dropped_and_counted() {
    let dir = TempDir::new("closed");
    let path = dir.0.join("lookups.dnstap");
    let settings = DnstapSettings::new(DnstapTarget::File(path), "node-1");
    let sink = Arc::new(DnstapSink::start(settings).unwrap());
    let counters = sink.counters();
    let asked = lookup("www.example.test.");
    sink.log(&asked.events()[0]);
    // Close from the sink's own side, as drop does, while this thread's queue exists.
    let shared = Arc::clone(&sink.shared);
    shared.closing.store(true, Ordering::Relaxed);
    wait_for("the writer's last take", Duration::from_secs(5), || {
        shared.queues.lock().unwrap().closed
    });
    sink.log(&asked.events()[1]);
    // A thread that logs for the first time after the last take.
    thread::scope(|scope| {
        scope.spawn(|| sink.log(&asked.events()[1]));
    });
    assert_eq!((counters.written(), counters.dropped()), (1, 2));
}

/// Log rotation as logrotate does it by default (`create`, then SIGHUP): the file is moved
/// away and an empty one made at its path; on `reopen` the moved file is ended (STOP), whole
/// and readable, and the lookups after go to a new file at the path.
#[test]
fn a_reopened_file_log_ends_the_moved_file_and_goes_on_at_its_path() {
    let dir = TempDir::new("rotate");
    let path = dir.0.join("lookups.dnstap");
    let rotated = dir.0.join("lookups.dnstap.1");
    let settings = DnstapSettings::new(DnstapTarget::File(path.clone()), "node-1");
    let sink = DnstapSink::start(settings).unwrap();
    for event in lookup("before.example.test.").events() {
        sink.log(&event);
    }
    wait_for("the lookup in the file", Duration::from_secs(3), || {
        sink.counters().written() == 2
    });
    fs::rename(&path, &rotated).unwrap();
    drop(fs::File::create(&path).unwrap());
    assert!(sink.reopen());
    wait_for("a new file at the path", Duration::from_secs(3), || {
        fs::metadata(&path).is_ok_and(|meta| meta.len() > 0)
    });
    for event in lookup("after.example.test.").events() {
        sink.log(&event);
    }
    assert!(sink.close(Duration::from_secs(5)));
    let names = ["before.example.test."];
    assert_lookups_read_back(&dnstap_ldns(&rotated), &read_file(&rotated), &names);
    let names = ["after.example.test."];
    assert_lookups_read_back(&dnstap_ldns(&path), &read_file(&path), &names);
    // The empty file logrotate made was used, not kept aside.
    let files = fs::read_dir(&dir.0).unwrap().count();
    assert_eq!(files, 2);
}

#[test]
fn a_file_reader_sees_lookups_within_a_second_without_a_close() {
    let dir = TempDir::new("flush");
    let path = dir.0.join("lookups.dnstap");
    let settings = DnstapSettings::new(DnstapTarget::File(path.clone()), "node-1");
    let sink = DnstapSink::start(settings).unwrap();
    let asked = lookup("www.example.test.");
    sink.log(&asked.events()[0]);
    let start_frame = 8 + 34;
    wait_for("the query in the file", Duration::from_secs(2), || {
        fs::metadata(&path).is_ok_and(|meta| meta.len() > start_frame)
    });
    drop(sink);
}

/// A Frame Streams reader: the handshake, data frames until STOP, FINISH; the data frames.
fn read_socket(listener: &UnixListener) -> Vec<Vec<u8>> {
    let (stream, _) = listener.accept().unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let content_type = || vec![CONTENT_TYPE.to_vec()];
    let ready = fstrm::read_frame(&mut &stream, 0).unwrap();
    assert_eq!(
        ready,
        fstrm::Frame::Control {
            kind: fstrm::READY,
            content_types: content_type()
        }
    );
    fstrm::write_control(&mut &stream, fstrm::ACCEPT, Some(CONTENT_TYPE)).unwrap();
    let start = fstrm::read_frame(&mut &stream, 0).unwrap();
    assert_eq!(
        start,
        fstrm::Frame::Control {
            kind: fstrm::START,
            content_types: content_type()
        }
    );
    let mut frames = Vec::new();
    loop {
        match fstrm::read_frame(&mut &stream, 1 << 20).unwrap() {
            fstrm::Frame::Data(frame) => frames.push(frame),
            fstrm::Frame::Control {
                kind: fstrm::STOP, ..
            } => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    fstrm::write_control(&mut &stream, fstrm::FINISH, None).unwrap();
    frames
}

#[test]
fn a_socket_reader_gets_the_handshake_and_the_lookups() {
    let _ = env_logger::builder()
        .is_test(true)
        .filter_level(log::LevelFilter::Debug)
        .try_init();
    let dir = TempDir::new("unix");
    let socket = dir.0.join("dnstap.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    let reader = thread::spawn(move || read_socket(&listener));
    let settings = DnstapSettings::new(DnstapTarget::Unix(socket), "node-1");
    let sink = DnstapSink::start(settings).unwrap();
    let counters = sink.counters();
    let names = ["www.example.test.", "api.example.test."];
    // The reader is there from the start: the first event connects to it.
    for name in names {
        for event in lookup(name).events() {
            sink.log(&event);
        }
    }
    assert!(sink.close(Duration::from_secs(5)));
    let frames = reader.join().unwrap();
    assert_eq!((counters.written(), counters.dropped()), (4, 0));
    let file = dir.0.join("received.dnstap");
    write_file(&file, &frames);
    assert_lookups_read_back(&dnstap_ldns(&file), &frames, &names);
}

#[test]
fn a_reader_that_comes_late_is_connected_to_and_gets_what_follows() {
    let dir = TempDir::new("late");
    let socket = dir.0.join("dnstap.sock");
    let settings = DnstapSettings::new(DnstapTarget::Unix(socket.clone()), "node-1");
    let sink = DnstapSink::start(settings).unwrap();
    let counters = sink.counters();
    let asked = lookup("early.example.test.");
    sink.log(&asked.events()[0]);
    wait_for("the early query dropped", Duration::from_secs(2), || {
        counters.dropped() == 1
    });
    let listener = UnixListener::bind(&socket).unwrap();
    let reader = thread::spawn(move || read_socket(&listener));
    // The first retry comes after a second.
    wait_for("the reconnection", Duration::from_secs(5), || {
        let asked = lookup("late.example.test.");
        sink.log(&asked.events()[0]);
        thread::sleep(Duration::from_millis(50));
        counters.written() > 0
    });
    assert!(sink.close(Duration::from_secs(5)));
    let frames = reader.join().unwrap();
    assert_eq!(frames.len() as u64, counters.written());
    assert!(!frames.is_empty());
}

/// Logs `count` events of about 600 bytes as fast as it can; the slowest `log` call.
fn flood(sink: &DnstapSink, count: usize) -> Duration {
    let asked = lookup("www.example.test.");
    let big = [0; 512];
    let mut event = asked.events()[1];
    event.response = Some(&big);
    let mut slowest = Duration::ZERO;
    for _ in 0..count {
        let start = Instant::now();
        sink.log(&event);
        slowest = slowest.max(start.elapsed());
    }
    slowest
}

/// The slowest a `log` call may be: half the writer's one-second waits, with room for a busy
/// test machine (a call took 104 ms once in 15 runs beside twelve busy loops).
const NEVER_WAITS: Duration = Duration::from_millis(500);

#[test]
fn with_no_reader_log_returns_at_once_and_counts_drops() {
    let dir = TempDir::new("none");
    let settings = DnstapSettings::new(DnstapTarget::Unix(dir.0.join("nobody.sock")), "node-1");
    let sink = DnstapSink::start(settings).unwrap();
    let counters = sink.counters();
    let slowest = flood(&sink, 20_000);
    assert!(slowest < NEVER_WAITS, "a log call took {slowest:?}");
    let start = Instant::now();
    assert!(sink.close(Duration::from_secs(5)));
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "close took {:?}",
        start.elapsed()
    );
    assert_eq!((counters.written(), counters.dropped()), (0, 20_000));
}

/// Accepts connections and keeps them open without reading, until dropped.
struct DeafReader {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl DeafReader {
    /// `handshake`: answer READY with ACCEPT first (then stop reading), or never read at all.
    fn new(socket: &Path, handshake: bool) -> Self {
        let listener = UnixListener::bind(socket).unwrap();
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        let thread = thread::spawn(move || {
            let held = Mutex::new(Vec::new());
            while !stopping.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        if handshake {
                            stream.set_nonblocking(false).unwrap();
                            // READY is 42 bytes: read exactly that, and no further.
                            let mut ready = [0; 42];
                            (&stream).read_exact(&mut ready).unwrap();
                            fstrm::write_control(&mut &stream, fstrm::ACCEPT, Some(CONTENT_TYPE))
                                .unwrap();
                        }
                        held.lock().unwrap().push(stream);
                    }
                    Err(_) => thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for DeafReader {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[test]
fn a_reader_that_never_reads_costs_drops_not_waits() {
    for handshake in [false, true] {
        let dir = TempDir::new(&format!("deaf-{handshake}"));
        let socket = dir.0.join("dnstap.sock");
        let _reader = DeafReader::new(&socket, handshake);
        let mut settings = DnstapSettings::new(DnstapTarget::Unix(socket), "node-1");
        settings.queue_bytes = 64 * 700;
        let sink = DnstapSink::start(settings).unwrap();
        let counters = sink.counters();
        if handshake {
            wait_for("the handshake", Duration::from_secs(5), || {
                flood(&sink, 1);
                counters.written() > 0
            });
        }
        // 12 MB, far more than a socket buffer.
        let count = 20_000;
        let slowest = flood(&sink, count);
        assert!(
            slowest < NEVER_WAITS,
            "handshake {handshake}: a log call took {slowest:?}"
        );
        assert!(
            counters.dropped() > 0,
            "handshake {handshake}: nothing dropped"
        );
        let logged = counters.written() + counters.dropped();
        let start = Instant::now();
        assert!(sink.close(Duration::from_secs(10)), "handshake {handshake}");
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "handshake {handshake}: close took {:?}",
            start.elapsed()
        );
        let total = counters.written() + counters.dropped();
        assert!(
            total >= count as u64 && total >= logged,
            "handshake {handshake}: {total}"
        );
    }
}

#[test]
fn a_log_file_is_a_regular_file_made_anew_and_an_old_one_is_kept() {
    let dir = TempDir::new("create");
    // A FIFO (no reader) or a symlink: refused at once, never waited on or followed.
    let fifo = dir.0.join("fifo");
    let c_path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a NUL-terminated path that lives for the call.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
    let started = Instant::now();
    assert!(create_log_file(&fifo).is_err());
    assert!(started.elapsed() < Duration::from_secs(1));
    let target = dir.0.join("target");
    fs::write(&target, b"precious").unwrap();
    let link = dir.0.join("link");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    assert!(create_log_file(&link).is_err());
    assert_eq!(fs::read(&target).unwrap(), b"precious");
    // A log already there (a restarted agent's, or the one another agent still writes to
    // during a takeover) is kept under another name.
    let log = dir.0.join("queries.dnstap");
    fs::write(&log, b"the old log").unwrap();
    drop(create_log_file(&log).unwrap());
    assert_eq!(fs::metadata(&log).unwrap().len(), 0);
    // An empty one too (an agent that has logged nothing may still write to it), and in the
    // same second as another: every one keeps a name of its own.
    drop(create_log_file(&log).unwrap());
    drop(create_log_file(&log).unwrap());
    let kept: Vec<_> = fs::read_dir(&dir.0)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| {
            let name = path.file_name().unwrap().to_string_lossy();
            name.starts_with("queries.dnstap.")
        })
        .collect();
    assert_eq!(kept.len(), 3, "{kept:?}");
    let old_logs = kept
        .iter()
        .filter(|path| fs::read(path).unwrap() == b"the old log")
        .count();
    assert_eq!(old_logs, 1, "{kept:?}");
}
