//! Lookups as a resolver makes them, for the race demonstration: each from a fresh UDP socket,
//! connected to the server, with a short timeout and no retry. An answer counts if it has
//! the query's ID and the response bit.
//!
//! Usage: lookup-load SERVER:PORT COUNT TIMEOUT_MS
//! Prints `lookups=N answered=N failed=N p50_us=N p99_us=N` (latencies of answered lookups).
#![expect(
    clippy::disallowed_methods,
    reason = "a synchronous test client on std sockets; it resolves no names"
)]
use std::{
    net::{SocketAddr, UdpSocket},
    time::{Duration, Instant},
};

fn lookup(server: SocketAddr, id: u16, timeout: Duration) -> bool {
    let Ok(socket) = UdpSocket::bind("0.0.0.0:0") else {
        return false;
    };
    let message = tests::a_query(id, &format!("l{id}.example.test"));
    let sent = socket
        .set_read_timeout(Some(timeout))
        .and_then(|()| socket.connect(server))
        .and_then(|()| socket.send(&message));
    if sent.is_err() {
        return false;
    }
    let deadline = Instant::now() + timeout;
    let mut answer = [0u8; 4096];
    while let Ok(len) = socket.recv(&mut answer) {
        if len >= 12 && answer[..2] == id.to_be_bytes() && answer[2] & 0x80 != 0 {
            return true;
        }
        if Instant::now() >= deadline {
            break;
        }
    }
    false
}

fn percentile(sorted: &[Duration], p: f64) -> u128 {
    if sorted.is_empty() {
        return 0;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index].as_micros()
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [server, count, timeout_ms] = args.as_slice() else {
        eprintln!("usage: lookup-load SERVER:PORT COUNT TIMEOUT_MS");
        std::process::exit(1);
    };
    let server: SocketAddr = server.parse().expect("SERVER:PORT");
    let count: u32 = count.parse().expect("COUNT");
    let timeout = Duration::from_millis(timeout_ms.parse().expect("TIMEOUT_MS"));
    let mut latencies = Vec::new();
    for i in 0..count {
        let started = Instant::now();
        if lookup(server, (i % 65_536) as u16, timeout) {
            latencies.push(started.elapsed());
        }
    }
    latencies.sort_unstable();
    println!(
        "lookups={count} answered={} failed={} p50_us={} p99_us={}",
        latencies.len(),
        count as usize - latencies.len(),
        percentile(&latencies, 0.50),
        percentile(&latencies, 0.99)
    );
}
