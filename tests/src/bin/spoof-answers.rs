//! An off-path attacker who knows more than a real one would: the port of the proxy's
//! upstream socket and the query's ID and name. It forges answers to that query, each wrong
//! in one way only, from a raw socket (so any source address and port can be claimed):
//!
//! 1. `source`: from another address (SECOND_SERVER:53), ID and question right;
//! 2. `port`: from the server's address but port 5353, ID and question right;
//! 3. `id`: from the server's address and port 53, question right, ID wrong;
//! 4. `question`: from the server's address and port 53, ID right, another name.
//!
//! Every forged answer carries the A record 203.0.113.66, so a client that got one shows it.
//!
//! Usage: spoof-answers TARGET_IP PORT SERVER_IP SECOND_SERVER_IP ID NAME
//! Prints one line per datagram sent and exits 0.
use std::{
    net::{Ipv4Addr, SocketAddr},
    process::ExitCode,
};

use socket2::{Domain, Protocol, Socket, Type};

pub const FORGED_ANSWER: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 66);

/// An answer to an A query for `name` with ID `id`: one A record, FORGED_ANSWER.
fn forged_answer(id: u16, name: &str) -> Vec<u8> {
    let mut message = Vec::new();
    message.extend_from_slice(&id.to_be_bytes());
    message.extend_from_slice(&[0x81, 0x80, 0, 1, 0, 1, 0, 0, 0, 0]);
    for label in name.trim_end_matches('.').split('.') {
        message.push(label.len() as u8);
        message.extend_from_slice(label.as_bytes());
    }
    message.extend_from_slice(&[0, 0, 1, 0, 1]);
    // The answer: a pointer to the name, A, IN, TTL 60, 4 bytes.
    message.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
    message.extend_from_slice(&FORGED_ANSWER.octets());
    message
}

/// Sends `payload` as a UDP datagram from `from` to `to`, whatever `from` is, as long as its
/// address is one of this namespace's: the kernel writes the IP header, we the UDP one.
fn send_forged(from: SocketAddr, to: SocketAddr, payload: &[u8]) -> std::io::Result<()> {
    let socket = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::UDP))?;
    socket.bind(&SocketAddr::new(from.ip(), 0).into())?;
    let mut datagram = Vec::with_capacity(8 + payload.len());
    datagram.extend_from_slice(&from.port().to_be_bytes());
    datagram.extend_from_slice(&to.port().to_be_bytes());
    datagram.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    // No checksum: allowed for UDP over IPv4.
    datagram.extend_from_slice(&[0, 0]);
    datagram.extend_from_slice(payload);
    socket.send_to(&datagram, &SocketAddr::new(to.ip(), 0).into())?;
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [target, port, server, second, id, name] = &args[..] else {
        eprintln!("usage: spoof-answers TARGET_IP PORT SERVER_IP SECOND_SERVER_IP ID NAME");
        return ExitCode::from(2);
    };
    let parsed = (|| -> Option<(Ipv4Addr, u16, Ipv4Addr, Ipv4Addr, u16)> {
        Some((
            target.parse().ok()?,
            port.parse().ok()?,
            server.parse().ok()?,
            second.parse().ok()?,
            id.parse().ok()?,
        ))
    })();
    let Some((target, port, server, second, id)) = parsed else {
        eprintln!("spoof-answers: bad arguments {args:?}");
        return ExitCode::from(2);
    };
    let to = SocketAddr::from((target, port));
    let forgeries = [
        ("source", (second, 53), forged_answer(id, name)),
        ("port", (server, 5353), forged_answer(id, name)),
        ("id", (server, 53), forged_answer(id ^ 0xffff, name)),
        (
            "question",
            (server, 53),
            forged_answer(id, "spoofed.example.test"),
        ),
    ];
    for (wrong, from, payload) in forgeries {
        let from = SocketAddr::from(from);
        if let Err(err) = send_forged(from, to, &payload) {
            eprintln!("spoof-answers: sending the {wrong} forgery: {err}");
            return ExitCode::FAILURE;
        }
        println!("sent wrong-{wrong} from {from} to {to}");
    }
    ExitCode::SUCCESS
}
