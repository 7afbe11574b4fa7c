//! The clients of `cargo xtask soak`: several kinds of lookups at once, each kind on a thread
//! of its own, every outcome counted, until standard input closes.
//!
//! Usage: soak-client SERVER:PORT FAILING_SERVER:PORT INTERVAL_MS [RETRIES]
//! - `udp` (two threads): an A query from a fresh connected UDP socket, as glibc sends it;
//! - `tcp`: an A query over a fresh TCP connection;
//! - `large`: the TXT query for `fixtures::BIG_NAME` (about 800 bytes) over TCP;
//! - `failing`: an A query to FAILING_SERVER, which never answers (a short timeout).
//!
//! One lookup after another per thread, INTERVAL_MS apart (TCP kinds five times that: the
//! server forks per connection). RETRIES (default 0) more tries, from a fresh socket, for a
//! lookup that was not answered (not for `failing`): a resolver's retry. Prints one line per
//! kind: `KIND sent=N answered=N timeout=N error=N wrong=N retried=N retried_at_s=T,T,...`
//! (the counts are of the last try; `retried`: lookups answered only on a retry, and when they
//! were, in seconds since the start, the first 200), then, on stderr, the first few failures
//! of each kind.
#![expect(
    clippy::disallowed_methods,
    reason = "a synchronous test client on std sockets; it resolves no names"
)]
use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream, UdpSocket},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::Duration,
};

use fixtures::{ANSWER_IP, BIG_NAME, a_query};

const TIMEOUT: Duration = Duration::from_secs(2);
const FAILING_TIMEOUT: Duration = Duration::from_millis(300);
/// Failures kept, per kind, for the report.
const KEEP_FAILURES: usize = 5;

#[derive(Default)]
struct Counts {
    sent: u64,
    answered: u64,
    timeout: u64,
    error: u64,
    wrong: u64,
    retried: u64,
    /// Seconds since the start at which lookups were answered on a retry, the first few.
    retried_at_s: Vec<u64>,
    failures: Vec<String>,
}

/// Retry times kept, per kind.
const KEEP_RETRY_TIMES: usize = 200;

enum Outcome {
    Answered,
    Timeout,
    Error(String),
    Wrong(String),
}

fn is_timeout(err: &std::io::Error) -> bool {
    matches!(
        err.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

/// A TXT query (no EDNS) for `name`.
fn txt_query(id: u16, name: &str) -> Vec<u8> {
    let mut query = a_query(id, name);
    let type_at = query.len() - 4;
    query[type_at..type_at + 2].copy_from_slice(&16u16.to_be_bytes());
    query
}

/// Checks an answer to `query`: its ID, QR, NOERROR, and (`expect_a`) the single A record is
/// ANSWER_IP, or else at least `min_len` bytes with an answer record.
fn check(query: &[u8], answer: &[u8], expect_a: bool, min_len: usize) -> Outcome {
    if answer.len() < 12 || answer[..2] != query[..2] || answer[2] & 0x80 == 0 {
        return Outcome::Wrong(format!("not the answer to this query: {answer:02x?}"));
    }
    if answer[3] & 0x0f != 0 || answer[6..8] == [0, 0] {
        return Outcome::Wrong(format!(
            "rcode {} ancount {:?}",
            answer[3] & 0x0f,
            &answer[6..8]
        ));
    }
    if expect_a && answer[answer.len() - 4..] != ANSWER_IP.octets() {
        return Outcome::Wrong(format!(
            "another address: {:?}",
            &answer[answer.len() - 4..]
        ));
    }
    if answer.len() < min_len {
        return Outcome::Wrong(format!(
            "{} bytes, expected {min_len} or more",
            answer.len()
        ));
    }
    Outcome::Answered
}

fn udp_lookup(server: SocketAddr, query: &[u8], timeout: Duration) -> Result<Vec<u8>, Outcome> {
    let socket = UdpSocket::bind("0.0.0.0:0").map_err(|e| Outcome::Error(format!("bind: {e}")))?;
    socket
        .set_read_timeout(Some(timeout))
        .and_then(|()| socket.connect(server))
        .and_then(|()| socket.send(query).map(drop))
        .map_err(|e| Outcome::Error(format!("send: {e}")))?;
    let mut buf = vec![0u8; 4096];
    match socket.recv(&mut buf) {
        Ok(len) => Ok(buf[..len].to_vec()),
        Err(err) if is_timeout(&err) => Err(Outcome::Timeout),
        Err(err) => Err(Outcome::Error(format!("recv: {err}"))),
    }
}

fn tcp_lookup(server: SocketAddr, query: &[u8]) -> Result<Vec<u8>, Outcome> {
    let failed = |what: &str, err: std::io::Error| {
        if is_timeout(&err) {
            Outcome::Timeout
        } else {
            Outcome::Error(format!("{what}: {err}"))
        }
    };
    let mut stream =
        TcpStream::connect_timeout(&server, TIMEOUT).map_err(|e| failed("connect", e))?;
    stream
        .set_read_timeout(Some(TIMEOUT))
        .map_err(|e| failed("timeout", e))?;
    let mut frame = (query.len() as u16).to_be_bytes().to_vec();
    frame.extend_from_slice(query);
    stream.write_all(&frame).map_err(|e| failed("send", e))?;
    let mut length = [0u8; 2];
    stream
        .read_exact(&mut length)
        .map_err(|e| failed("read length", e))?;
    let mut answer = vec![0u8; usize::from(u16::from_be_bytes(length))];
    stream
        .read_exact(&mut answer)
        .map_err(|e| failed("read answer", e))?;
    Ok(answer)
}

/// One lookup of `kind`, number `n`.
fn lookup(kind: &str, n: u64, server: SocketAddr, failing: SocketAddr) -> Outcome {
    let id = n as u16;
    let query = match kind {
        "large" => txt_query(id, BIG_NAME),
        _ => a_query(id, &format!("soak{n}.{kind}.example.test")),
    };
    let answer = match kind {
        "udp" => udp_lookup(server, &query, TIMEOUT),
        "tcp" | "large" => tcp_lookup(server, &query),
        "failing" => udp_lookup(failing, &query, FAILING_TIMEOUT),
        other => unreachable!("{other}"),
    };
    match answer {
        // An A record of ANSWER_IP, or (large) the whole 800-byte TXT answer.
        Ok(answer) if kind == "large" => check(&query, &answer, false, 700),
        Ok(answer) => check(&query, &answer, true, 0),
        Err(outcome) => outcome,
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (server, failing, interval_ms, retries) = match args.as_slice() {
        [server, failing, interval_ms] => (server, failing, interval_ms, 0),
        [server, failing, interval_ms, retries] => (
            server,
            failing,
            interval_ms,
            retries.parse().expect("RETRIES"),
        ),
        _ => {
            eprintln!("usage: soak-client SERVER:PORT FAILING_SERVER:PORT INTERVAL_MS [RETRIES]");
            std::process::exit(2);
        }
    };
    let server: SocketAddr = server.parse().expect("SERVER:PORT");
    let failing: SocketAddr = failing.parse().expect("FAILING_SERVER:PORT");
    let interval = Duration::from_millis(interval_ms.parse().expect("INTERVAL_MS"));
    let stop = Arc::new(AtomicBool::new(false));
    let started = std::time::Instant::now();
    let kinds = ["udp", "udp", "tcp", "large", "failing"];
    let counts: Vec<Arc<Mutex<Counts>>> = kinds.iter().map(|_| Arc::default()).collect();
    let threads: Vec<_> = kinds
        .iter()
        .zip(&counts)
        .map(|(&kind, counts)| {
            let (stop, counts) = (Arc::clone(&stop), Arc::clone(counts));
            let pause = if kind == "tcp" || kind == "large" {
                interval * 5
            } else {
                interval
            };
            thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let mut outcome = lookup(kind, n, server, failing);
                    let mut tries = 0;
                    while !matches!(outcome, Outcome::Answered)
                        && kind != "failing"
                        && tries < retries
                    {
                        tries += 1;
                        outcome = lookup(kind, n, server, failing);
                    }
                    let mut counts = counts.lock().unwrap();
                    counts.sent += 1;
                    if tries > 0 && matches!(outcome, Outcome::Answered) {
                        counts.retried += 1;
                        if counts.retried_at_s.len() < KEEP_RETRY_TIMES {
                            counts.retried_at_s.push(started.elapsed().as_secs());
                        }
                    }
                    let failure = match outcome {
                        Outcome::Answered => {
                            counts.answered += 1;
                            None
                        }
                        Outcome::Timeout => {
                            counts.timeout += 1;
                            Some("timed out".to_owned())
                        }
                        Outcome::Error(why) => {
                            counts.error += 1;
                            Some(why)
                        }
                        Outcome::Wrong(why) => {
                            counts.wrong += 1;
                            Some(why)
                        }
                    };
                    if let Some(why) = failure
                        && kind != "failing"
                        && counts.failures.len() < KEEP_FAILURES
                    {
                        counts.failures.push(format!("{kind} lookup {n}: {why}"));
                    }
                    drop(counts);
                    n += 1;
                    thread::sleep(pause);
                }
            })
        })
        .collect();
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
    stop.store(true, Ordering::Relaxed);
    for thread in threads {
        thread.join().expect("a lookup thread");
    }
    // The two udp threads report as one kind.
    let mut merged: Vec<(&str, Counts)> = Vec::new();
    for (kind, counts) in kinds.iter().zip(counts) {
        let counts = std::mem::take(&mut *counts.lock().unwrap());
        match merged.iter_mut().find(|(k, _)| k == kind) {
            Some((_, total)) => {
                total.sent += counts.sent;
                total.answered += counts.answered;
                total.timeout += counts.timeout;
                total.error += counts.error;
                total.wrong += counts.wrong;
                total.retried += counts.retried;
                total.retried_at_s.extend(counts.retried_at_s);
                total.failures.extend(counts.failures);
            }
            None => merged.push((kind, counts)),
        }
    }
    for (kind, c) in &merged {
        let retried_at: Vec<String> = c.retried_at_s.iter().map(u64::to_string).collect();
        println!(
            "{kind} sent={} answered={} timeout={} error={} wrong={} retried={} retried_at_s={}",
            c.sent,
            c.answered,
            c.timeout,
            c.error,
            c.wrong,
            c.retried,
            retried_at.join(",")
        );
        for failure in &c.failures {
            eprintln!("{failure}");
        }
    }
}
