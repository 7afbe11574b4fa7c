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

use tests::answer::{Reply, write_answer};

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
        if !write_answer(&buf[..len], Reply::A(address), &mut message) {
            continue;
        }
        if delay.is_zero() {
            let _ = socket.send_to(&message, from);
        } else {
            due.push_back((Instant::now() + delay, from, message.clone()));
        }
    }
}
