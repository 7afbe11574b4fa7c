//! A steady stream of lookups, as a resolver library makes them, that counts every outcome:
//! each lookup from a fresh UDP socket connected to the server (as glibc does), waiting
//! `TIMEOUT_MS` for an answer, and trying again from a new socket up to `ATTEMPTS` times in all.
//! An answer counts only if it comes from the server's address and port, with the query's ID,
//! the response bit and the question asked.
//!
//! Usage: steady-lookups SERVER:PORT TIMEOUT_MS ATTEMPTS INTERVAL_MS STREAMS
//! STREAMS threads each make one lookup after another, pausing INTERVAL_MS between them.
//! Runs until its standard input closes, then prints
//! `lookups=N first_try=N retried=N failed=N` and, on stderr, one line per lookup that failed
//! or needed a retry.
#![expect(
    clippy::disallowed_methods,
    reason = "a synchronous test client on std sockets; it resolves no names"
)]
use std::{
    io::Read as _,
    net::{SocketAddr, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

/// One attempt: `Ok` with the answer, or why there was none.
fn attempt(server: SocketAddr, query: &[u8], timeout: Duration) -> Result<(), String> {
    let socket = UdpSocket::bind("0.0.0.0:0").map_err(|err| format!("bind: {err}"))?;
    socket
        .set_read_timeout(Some(timeout))
        .and_then(|()| socket.connect(server))
        .map_err(|err| format!("connect: {err}"))?;
    socket.send(query).map_err(|err| format!("send: {err}"))?;
    let deadline = Instant::now() + timeout;
    let mut answer = [0u8; 4096];
    loop {
        let (len, from) = socket
            .recv_from(&mut answer)
            .map_err(|err| format!("recv: {err}"))?;
        if from != server {
            return Err(format!("an answer from {from}, not {server}"));
        }
        // ID, QR, then the question section as the query had it.
        let question = &query[12..];
        if len >= query.len()
            && answer[..2] == query[..2]
            && answer[2] & 0x80 != 0
            && &answer[12..12 + question.len()] == question
        {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err("only answers to other queries".to_owned());
        }
    }
}

#[derive(Default, Clone, Copy)]
struct Counts {
    lookups: u64,
    first_try: u64,
    retried: u64,
    failed: u64,
}

/// One stream of lookups until `stop`; its lookups' names and IDs are its own.
fn stream(
    number: u64,
    server: SocketAddr,
    timeout: Duration,
    attempts: u32,
    interval: Duration,
    stop: &AtomicBool,
) -> Counts {
    let mut counts = Counts::default();
    let started = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let n = counts.lookups;
        let id = ((number << 12) + n % 4096) as u16;
        let message = tests::a_query(id, &format!("s{number}-{n}.steady.example.test"));
        counts.lookups += 1;
        let mut errors = Vec::new();
        for _ in 0..attempts {
            match attempt(server, &message, timeout) {
                Ok(()) => break,
                Err(err) => errors.push(err),
            }
        }
        let at = started.elapsed().as_millis();
        match errors.len() {
            0 => counts.first_try += 1,
            tries if tries < attempts as usize => {
                counts.retried += 1;
                eprintln!(
                    "lookup {number}-{n} at {at} ms answered after {tries} failed tries: {errors:?}"
                );
            }
            _ => {
                counts.failed += 1;
                eprintln!("lookup {number}-{n} at {at} ms failed: {errors:?}");
            }
        }
        thread::sleep(interval);
    }
    counts
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [server, timeout_ms, attempts, interval_ms, streams] = args.as_slice() else {
        eprintln!("usage: steady-lookups SERVER:PORT TIMEOUT_MS ATTEMPTS INTERVAL_MS STREAMS");
        std::process::exit(2);
    };
    let server: SocketAddr = server.parse().expect("SERVER:PORT");
    let timeout = Duration::from_millis(timeout_ms.parse().expect("TIMEOUT_MS"));
    let attempts: u32 = attempts.parse().expect("ATTEMPTS");
    let interval = Duration::from_millis(interval_ms.parse().expect("INTERVAL_MS"));
    let streams: u64 = streams.parse().expect("STREAMS");
    assert!((1..=16).contains(&streams), "STREAMS: 1 to 16");

    let stop = Arc::new(AtomicBool::new(false));
    let watcher = Arc::clone(&stop);
    thread::spawn(move || {
        let _ = std::io::stdin().read_to_end(&mut Vec::new());
        watcher.store(true, Ordering::Relaxed);
    });
    let workers: Vec<_> = (0..streams)
        .map(|number| {
            let stop = Arc::clone(&stop);
            thread::spawn(move || stream(number, server, timeout, attempts, interval, &stop))
        })
        .collect();
    let mut total = Counts::default();
    for worker in workers {
        let counts = worker.join().expect("a lookup stream");
        total.lookups += counts.lookups;
        total.first_try += counts.first_try;
        total.retried += counts.retried;
        total.failed += counts.failed;
    }
    println!(
        "lookups={} first_try={} retried={} failed={}",
        total.lookups, total.first_try, total.retried, total.failed
    );
}
