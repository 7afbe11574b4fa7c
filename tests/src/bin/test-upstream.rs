//! A minimal, fast DNS server for tests and benchmarks: answers every A query with one record,
//! at once or after a fixed delay. One thread; delayed answers wait in a FIFO (the delay is
//! the same for all), so ten thousand queries in flight cost a few megabytes, not threads.
//!
//! Usage: test-upstream LISTEN_ADDR:PORT DELAY_MS ANSWER_IPV4|source
//! Answers each query with one A record (TTL 60) for the name asked, DELAY_MS after it came:
//! ANSWER_IPV4, or with `source` the IPv4 address the query came from (what a server that
//! answers by its asker's address sees).
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
        eprintln!("usage: test-upstream LISTEN_ADDR:PORT DELAY_MS ANSWER_IPV4|source");
        std::process::exit(2);
    };
    let listen: SocketAddr = listen.parse().expect("LISTEN_ADDR:PORT");
    let delay = Duration::from_millis(delay_ms.parse().expect("DELAY_MS"));
    // `None`: the asker's address.
    let address: Option<Ipv4Addr> =
        (address != "source").then(|| address.parse().expect("ANSWER_IPV4 or source"));
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
        let answer = match (address, from.ip()) {
            (Some(address), _) => address,
            (None, std::net::IpAddr::V4(source)) => source,
            (None, std::net::IpAddr::V6(source)) => {
                source.to_ipv4_mapped().unwrap_or(Ipv4Addr::UNSPECIFIED)
            }
        };
        if !write_answer(&buf[..len], Reply::A(answer), &mut message) {
            continue;
        }
        if delay.is_zero() {
            let _ = socket.send_to(&message, from);
        } else {
            due.push_back((Instant::now() + delay, from, message.clone()));
        }
    }
}
