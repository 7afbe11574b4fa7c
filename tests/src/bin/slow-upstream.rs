//! A DNS server that answers every A query after a delay: an upstream with lookups always in
//! flight, for the tests of what happens to them when the agent stops.
//!
//! Usage: slow-upstream LISTEN_ADDR:PORT DELAY_MS ANSWER_IPV4
//! Answers each query with one A record (TTL 60) for the name asked, DELAY_MS after it came.
#![expect(
    clippy::disallowed_methods,
    reason = "a synchronous test server on std sockets; it resolves no names"
)]
use std::{
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    sync::Arc,
    thread,
    time::Duration,
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

fn answer(query: &[u8], address: Ipv4Addr) -> Option<Vec<u8>> {
    if query.len() < 12 || query[2] & 0x80 != 0 || query[4..6] != [0, 1] {
        return None;
    }
    let end = question_end(query)?;
    let mut message = query[..2].to_vec();
    // QR, opcode QUERY, RD copied, RA; one question, one answer, nothing else.
    message.extend_from_slice(&[0x80 | (query[2] & 0x01), 0x80, 0, 1, 0, 1, 0, 0, 0, 0]);
    message.extend_from_slice(&query[12..end]);
    message.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
    message.extend_from_slice(&address.octets());
    Some(message)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [listen, delay_ms, address] = args.as_slice() else {
        eprintln!("usage: slow-upstream LISTEN_ADDR:PORT DELAY_MS ANSWER_IPV4");
        std::process::exit(2);
    };
    let listen: SocketAddr = listen.parse().expect("LISTEN_ADDR:PORT");
    let delay = Duration::from_millis(delay_ms.parse().expect("DELAY_MS"));
    let address: Ipv4Addr = address.parse().expect("ANSWER_IPV4");
    let socket = Arc::new(UdpSocket::bind(listen).expect("bind"));
    let mut buf = [0u8; 4096];
    loop {
        let Ok((len, from)) = socket.recv_from(&mut buf) else {
            continue;
        };
        let Some(message) = answer(&buf[..len], address) else {
            continue;
        };
        let socket = Arc::clone(&socket);
        thread::spawn(move || {
            thread::sleep(delay);
            let _ = socket.send_to(&message, from);
        });
    }
}
