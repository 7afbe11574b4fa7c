//! A DNS server that fails in one way, over UDP and TCP, for the failing-upstream tests.
//!
//! Usage: bad-upstream LISTEN_ADDR:PORT MODE
//! - `silent`: reads every query, answers none (TCP connections stay open);
//! - `slow:MS`: answers each query with one A record ([`ANSWER`]) after MS;
//! - `servfail`: answers each query with RCODE SERVFAIL;
//! - `no-tcp`: answers over UDP; nothing listens on TCP, so connections are refused;
//! - `reset`: answers over UDP; over TCP sends the first half of the answer, then a reset;
//! - `garbage`: answers each query with bytes that are not a DNS message (over TCP, framed);
//! - `formerr-bare`: answers FORMERR with the header alone, no question (as servers without
//!   EDNS do);
//! - `case`: answers with one A record, the question's name in upper case.
//!
//! Prints `ready` once it listens.
#![expect(
    clippy::disallowed_methods,
    reason = "a synchronous test server on std sockets; it resolves no names"
)]
use std::{
    io::Write as _,
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    thread,
    time::Duration,
};

use tests::answer::{Reply, write_answer};

/// The address in this server's A records.
const ANSWER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 9);
/// What `garbage` sends: no DNS header could start like this and be a query's answer.
const GARBAGE: &[u8] = b"\xff\xfe this is not DNS";

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Silent,
    Slow(Duration),
    ServFail,
    NoTcp,
    Reset,
    Garbage,
    FormErrBare,
    Case,
}

impl Mode {
    fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "silent" => Self::Silent,
            "servfail" => Self::ServFail,
            "no-tcp" => Self::NoTcp,
            "reset" => Self::Reset,
            "garbage" => Self::Garbage,
            "formerr-bare" => Self::FormErrBare,
            "case" => Self::Case,
            _ => Self::Slow(Duration::from_millis(
                text.strip_prefix("slow:")?.parse().ok()?,
            )),
        })
    }

    /// What to send back for `query`; `None` to send nothing.
    fn reply(self, query: &[u8]) -> Option<Vec<u8>> {
        let reply = match self {
            Self::Silent => return None,
            Self::Garbage => return Some(GARBAGE.to_vec()),
            Self::FormErrBare => {
                let mut header = query.get(..12)?.to_vec();
                header[2] = 0x80 | (header[2] & 0x79); // QR, the query's opcode and RD
                header[3] = 1; // FORMERR
                header[4..12].fill(0);
                return Some(header);
            }
            Self::Case => {
                let mut answer = Vec::new();
                write_answer(query, Reply::A(ANSWER), &mut answer).then_some(())?;
                // The question's name: its letters (length bytes are below 'A').
                let mut at = 12;
                while let Some(&len) = answer.get(at).filter(|&&len| len != 0) {
                    let end = (at + 1 + usize::from(len)).min(answer.len());
                    answer[at + 1..end].make_ascii_uppercase();
                    at = end;
                }
                return Some(answer);
            }
            Self::Slow(delay) => {
                thread::sleep(delay);
                Reply::A(ANSWER)
            }
            Self::ServFail => Reply::ServFail,
            Self::NoTcp | Self::Reset => Reply::A(ANSWER),
        };
        let mut answer = Vec::new();
        write_answer(query, reply, &mut answer).then_some(answer)
    }
}

fn serve_udp(socket: UdpSocket, mode: Mode) {
    let mut buf = [0u8; 4096];
    while let Ok((len, from)) = socket.recv_from(&mut buf) {
        let (query, socket) = (buf[..len].to_vec(), socket.try_clone().expect("clone"));
        // A thread each, so a slow answer holds up no other.
        thread::spawn(move || {
            if let Some(answer) = mode.reply(&query) {
                let _ = socket.send_to(&answer, from);
            }
        });
    }
}

fn serve_tcp_connection(mut stream: TcpStream, mode: Mode) {
    while let Some(query) = tests::answer::read_tcp_message(&mut stream) {
        let Some(answer) = mode.reply(&query) else {
            continue;
        };
        let mut frame = (answer.len() as u16).to_be_bytes().to_vec();
        frame.extend_from_slice(&answer);
        if mode == Mode::Reset {
            let _ = stream.write_all(&frame[..frame.len() / 2]);
            let _ = stream.flush();
            thread::sleep(Duration::from_millis(50));
            // Linger 0: close sends a reset, not a FIN.
            let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
            return;
        }
        if stream.write_all(&frame).is_err() {
            return;
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [listen, mode] = args.as_slice() else {
        eprintln!(
            "usage: bad-upstream LISTEN_ADDR:PORT silent|slow:MS|servfail|no-tcp|reset|garbage"
        );
        std::process::exit(2);
    };
    let listen: SocketAddr = listen.parse().expect("LISTEN_ADDR:PORT");
    let mode = Mode::parse(mode).expect("a mode");
    let udp = UdpSocket::bind(listen).expect("bind UDP");
    let tcp = (mode != Mode::NoTcp).then(|| TcpListener::bind(listen).expect("bind TCP"));
    println!("ready");
    if let Some(tcp) = tcp {
        thread::spawn(move || {
            for stream in tcp.incoming().flatten() {
                thread::spawn(move || serve_tcp_connection(stream, mode));
            }
        });
    }
    serve_udp(udp, mode);
}
