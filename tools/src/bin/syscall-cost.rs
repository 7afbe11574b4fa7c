//! What a lookup costs the client in the kernel: the time spent inside the syscalls of a
//! fresh socket's lookup (socket, connect, send, then recv and close once the answer is
//! there), without the wait for the answer. Run with and without the eBPF programs, or
//! through iptables REDIRECT, it shows what each interception adds to the client's syscalls.
//!
//! Usage: syscall-cost SERVER:PORT COUNT
//! Prints `lookups=N median_ns=N p90_ns=N connect_ns=N send_ns=N recv_ns=N` (medians; the
//! first 10 % of lookups warm up and are not counted).
#![expect(
    clippy::disallowed_methods,
    reason = "a synchronous test client on std sockets; it resolves no names"
)]
use std::{
    net::{SocketAddr, UdpSocket},
    os::fd::AsRawFd as _,
    time::{Duration, Instant},
};

fn median(values: &mut [u64], quantile: f64) -> u64 {
    values.sort_unstable();
    values[((values.len() - 1) as f64 * quantile).round() as usize]
}

/// Waits, untimed, until `socket` has a datagram.
fn wait_readable(socket: &UdpSocket) -> bool {
    let mut poll = libc::pollfd {
        fd: socket.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `poll` is one live pollfd (count 1) for the duration of the call, and its fd is
    // the socket's, open while `socket` is borrowed.
    unsafe { libc::poll(&mut poll, 1, 2000) == 1 }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [server, count] = args.as_slice() else {
        eprintln!("usage: syscall-cost SERVER:PORT COUNT");
        std::process::exit(2);
    };
    let server: SocketAddr = server.parse().expect("SERVER:PORT");
    let count: usize = count.parse().expect("COUNT");
    let warm_up = count / 10;
    let (mut total, mut connect, mut send, mut recv) = (vec![], vec![], vec![], vec![]);
    let mut answer = [0u8; 4096];
    for i in 0..count {
        let query = fixtures::a_query(i as u16, &format!("c{i}.example.test"));
        let started = Instant::now();
        let socket = UdpSocket::bind("0.0.0.0:0").expect("bind");
        let before_connect = Instant::now();
        socket.connect(server).expect("connect");
        let before_send = Instant::now();
        socket.send(&query).expect("send");
        let sent = Instant::now();
        if !wait_readable(&socket) {
            eprintln!("lookup {i}: no answer in 2 s");
            std::process::exit(1);
        }
        let before_recv = Instant::now();
        socket.recv(&mut answer).expect("recv");
        drop(socket);
        let done = Instant::now();
        if i < warm_up {
            continue;
        }
        let ns = |d: Duration| d.as_nanos() as u64;
        total.push(ns(sent - started) + ns(done - before_recv));
        connect.push(ns(before_send - before_connect));
        send.push(ns(sent - before_send));
        recv.push(ns(done - before_recv));
    }
    println!(
        "lookups={} median_ns={} p90_ns={} connect_ns={} send_ns={} recv_ns={}",
        total.len(),
        median(&mut total.clone(), 0.5),
        median(&mut total, 0.9),
        median(&mut connect, 0.5),
        median(&mut send, 0.5),
        median(&mut recv, 0.5),
    );
}
