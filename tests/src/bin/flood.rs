//! An abusive client for the flood test: queries as fast as a fixed rate allows, never
//! reading an answer, bounded in count and time.
//!
//! Usage: flood SERVER:PORT RATE_PER_SECOND COUNT SECONDS [FIRST]
//! Sends distinct A queries (`floodN.example.test`, N from FIRST, 0 by default) from 8 sockets
//! in turn (so the agent's UDP threads all see it) at RATE_PER_SECOND, until COUNT are sent or
//! SECONDS have passed; prints `sent=N`.
#![expect(
    clippy::disallowed_methods,
    reason = "a synchronous test client on std sockets; it resolves no names"
)]
use std::{
    net::{SocketAddr, UdpSocket},
    thread,
    time::{Duration, Instant},
};

const SOCKETS: usize = 8;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (server, rate, count, seconds, first) = match args.as_slice() {
        [server, rate, count, seconds] => (server, rate, count, seconds, "0"),
        [server, rate, count, seconds, first] => (server, rate, count, seconds, first.as_str()),
        _ => {
            eprintln!("usage: flood SERVER:PORT RATE_PER_SECOND COUNT SECONDS [FIRST]");
            std::process::exit(2);
        }
    };
    let first: u64 = first.parse().expect("FIRST");
    let server: SocketAddr = server.parse().expect("SERVER:PORT");
    let rate: u64 = rate.parse().expect("RATE_PER_SECOND");
    let count: u64 = count.parse().expect("COUNT");
    let limit = Duration::from_secs(seconds.parse().expect("SECONDS"));
    let sockets: Vec<UdpSocket> = (0..SOCKETS)
        .map(|_| UdpSocket::bind("0.0.0.0:0").expect("bind"))
        .collect();
    let started = Instant::now();
    let mut sent = 0u64;
    while sent < count && started.elapsed() < limit {
        // Keep to the rate: send what is due, then sleep a millisecond.
        let due = (started.elapsed().as_secs_f64() * rate as f64) as u64;
        // Time is checked per query too: unpaced (a rate above what one thread can send),
        // what is due would keep it sending past SECONDS.
        while sent < due.min(count) && started.elapsed() < limit {
            let name = format!("flood{}.example.test", first + sent);
            let query = tests::a_query(sent as u16, &name);
            if sockets[sent as usize % SOCKETS]
                .send_to(&query, server)
                .is_ok()
            {
                sent += 1;
            }
        }
        thread::sleep(Duration::from_millis(1));
    }
    println!("sent={sent}");
}
