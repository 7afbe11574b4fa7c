//! A minimal, fast DNS server for tests and benchmarks: answers every A query with one record,
//! at once or after a fixed delay. One thread; delayed answers wait in a FIFO (the delay is
//! the same for all), so ten thousand queries in flight cost a few megabytes, not threads.
//!
//! Usage: test-upstream LISTEN_ADDR:PORT DELAY_MS ANSWER_IPV4
//! Answers each query with one A record (TTL 60) for the name asked, DELAY_MS after it came.
#![expect(
    clippy::disallowed_methods,
    reason = "a synchronous test server on std sockets; it resolves no names"
)]
use std::{
    collections::VecDeque,
    io::ErrorKind,
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    time::{Duration, Instant},
};

/// The offset just past the first question, if the message has a well-formed one.
fn question_end(message: &[u8]) -> Option<usize> {
    let mut offset = 12;
    loop {
        let len = usize::from(*message.get(offset)?);
        offset += 1;
        match len {
            0 => break,
            1..=63 => offset += len,
            _ => return None,
        }
    }
    let end = offset + 4;
    (end <= message.len()).then_some(end)
}

/// The answer to `query`, written into `out` (cleared first); false if it is not a query.
fn answer(query: &[u8], address: Ipv4Addr, out: &mut Vec<u8>) -> bool {
    out.clear();
    if query.len() < 12 || query[2] & 0x80 != 0 || query[4..6] != [0, 1] {
        return false;
    }
    let Some(end) = question_end(query) else {
        return false;
    };
    out.extend_from_slice(&query[..2]);
    // QR, opcode QUERY, RD copied, RA; one question, one answer, nothing else.
    out.extend_from_slice(&[0x80 | (query[2] & 0x01), 0x80, 0, 1, 0, 1, 0, 0, 0, 0]);
    out.extend_from_slice(&query[12..end]);
    out.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
    out.extend_from_slice(&address.octets());
    true
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [listen, delay_ms, address] = args.as_slice() else {
        eprintln!("usage: test-upstream LISTEN_ADDR:PORT DELAY_MS ANSWER_IPV4");
        std::process::exit(2);
    };
    let listen: SocketAddr = listen.parse().expect("LISTEN_ADDR:PORT");
    let delay = Duration::from_millis(delay_ms.parse().expect("DELAY_MS"));
    let address: Ipv4Addr = address.parse().expect("ANSWER_IPV4");
    let socket = UdpSocket::bind(listen).expect("bind");
    let mut buf = [0u8; 4096];
    let mut message = Vec::with_capacity(512);
    let mut due: VecDeque<(Instant, SocketAddr, Vec<u8>)> = VecDeque::new();
    let mut read_timeout = None;
    loop {
        // Send what is due, then wait for a query at most until the next answer is.
        let now = Instant::now();
        while due.front().is_some_and(|(at, ..)| *at <= now) {
            let (_, to, answer) = due.pop_front().expect("checked");
            let _ = socket.send_to(&answer, to);
        }
        let wait = due
            .front()
            .map(|(at, ..)| at.saturating_duration_since(now))
            .filter(|wait| !wait.is_zero());
        // Only when it changes: answering at once must cost no more than recv and send.
        if wait != read_timeout {
            let _ = socket.set_read_timeout(wait);
            read_timeout = wait;
        }
        let (len, from) = match socket.recv_from(&mut buf) {
            Ok(received) => received,
            Err(err) if matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                continue;
            }
            Err(_) => continue,
        };
        if !answer(&buf[..len], address, &mut message) {
            continue;
        }
        if delay.is_zero() {
            let _ = socket.send_to(&message, from);
        } else {
            due.push_back((Instant::now() + delay, from, message.clone()));
        }
    }
}
