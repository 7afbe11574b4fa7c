//! The classic design, as a stand-in for the race demonstration (`cargo xtask race`), not part
//! of the product: a DNS forwarder that iptables REDIRECTs queries to, as Istio's and Kuma's
//! agents are. It sends each query from a fresh socket on an ephemeral port to one fixed
//! upstream, and replies from the address the query was sent to (so conntrack's reverse NAT
//! makes the answer come from the server the client asked).
//!
//! A query that arrives from one of its own upstream sockets has looped: a stale conntrack
//! entry sent the forwarder's own query back to it. It counts those and drops them.
//!
//! Usage: classic-forwarder LISTEN UPSTREAM TIMEOUT_MS
//! Runs until standard input closes, then prints `forwarded=N answered=N looped=N`.
#![expect(
    clippy::disallowed_methods,
    reason = "test tooling on std sockets, one thread per query; it resolves no names"
)]
use std::{
    collections::HashSet,
    io::Read as _,
    net::{SocketAddr, UdpSocket},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::Duration,
};

#[derive(Default)]
struct Counters {
    forwarded: AtomicU64,
    answered: AtomicU64,
    looped: AtomicU64,
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [listen, upstream, timeout_ms] = args.as_slice() else {
        eprintln!("usage: classic-forwarder LISTEN UPSTREAM TIMEOUT_MS");
        std::process::exit(1);
    };
    let listen: SocketAddr = listen.parse().expect("LISTEN");
    let upstream: SocketAddr = upstream.parse().expect("UPSTREAM");
    let timeout = Duration::from_millis(timeout_ms.parse().expect("TIMEOUT_MS"));

    let listener = Arc::new(UdpSocket::bind(listen).expect("bind LISTEN"));
    listener
        .set_read_timeout(Some(Duration::from_millis(100)))
        .expect("read timeout");
    let own_ports = Arc::new(Mutex::new(HashSet::<u16>::new()));
    let counters = Arc::new(Counters::default());
    let done = Arc::new(AtomicBool::new(false));
    {
        let done = Arc::clone(&done);
        thread::spawn(move || {
            let _ = std::io::stdin().read_to_end(&mut Vec::new());
            done.store(true, Ordering::Relaxed);
        });
    }

    let mut buf = [0u8; 4096];
    while !done.load(Ordering::Relaxed) {
        let Ok((len, client)) = listener.recv_from(&mut buf) else {
            continue; // the read timeout, to look at `done`
        };
        if own_ports.lock().unwrap().contains(&client.port()) {
            counters.looped.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let query = buf[..len].to_vec();
        let (listener, own_ports, counters) = (
            Arc::clone(&listener),
            Arc::clone(&own_ports),
            Arc::clone(&counters),
        );
        thread::spawn(move || {
            let Ok(socket) = UdpSocket::bind("0.0.0.0:0") else {
                return;
            };
            let port = socket.local_addr().map(|a| a.port()).unwrap_or(0);
            own_ports.lock().unwrap().insert(port);
            counters.forwarded.fetch_add(1, Ordering::Relaxed);
            let mut answer = [0u8; 4096];
            let received = socket
                .set_read_timeout(Some(timeout))
                .and_then(|()| socket.connect(upstream))
                .and_then(|()| socket.send(&query))
                .and_then(|_| socket.recv(&mut answer));
            own_ports.lock().unwrap().remove(&port);
            if let Ok(len) = received
                && listener.send_to(&answer[..len], client).is_ok()
            {
                counters.answered.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    println!(
        "forwarded={} answered={} looped={}",
        counters.forwarded.load(Ordering::Relaxed),
        counters.answered.load(Ordering::Relaxed),
        counters.looped.load(Ordering::Relaxed)
    );
}
