//! A DNS client that checks what a strict resolver checks: the answer must come from the
//! server's own address and port, with the query's ID.
//!
//! Usage: dns-udp-probe sendto|connect SERVER_IP:PORT NAME [--hold]
//! - `sendto`: like musl, an unconnected socket, `sendto` and `recvfrom`;
//! - `connect`: like glibc, a connected socket; `getpeername()` must name the server too;
//! - `--hold`: keep the socket open after the answer until standard input closes.
//!
//! Prints `source=ADDR:PORT answer=A.B.C.D` and exits 0, or says what was wrong and exits 1.
#![expect(
    clippy::disallowed_methods,
    reason = "a synchronous test client; it resolves no names"
)]
use std::{
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    process::ExitCode,
    time::Duration,
};

const QUERY_ID: u16 = 0x5a17;

fn query(name: &str) -> Vec<u8> {
    let mut message = Vec::new();
    message.extend_from_slice(&QUERY_ID.to_be_bytes());
    message.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]); // RD, one question
    for label in name.trim_end_matches('.').split('.') {
        message.push(label.len() as u8);
        message.extend_from_slice(label.as_bytes());
    }
    message.extend_from_slice(&[0, 0, 1, 0, 1]); // root, type A, class IN
    message
}

/// The address of the answer's one A record: without EDNS the test server's answer ends with
/// that record's RDATA.
fn single_a_record(answer: &[u8]) -> Option<Ipv4Addr> {
    let ancount = u16::from_be_bytes([*answer.get(6)?, *answer.get(7)?]);
    let tail: [u8; 4] = answer
        .get(answer.len().checked_sub(4)?..)?
        .try_into()
        .ok()?;
    (ancount == 1).then(|| Ipv4Addr::from(tail))
}

fn probe(socket: &UdpSocket, mode: &str, server: SocketAddr, name: &str) -> Result<String, String> {
    socket
        .set_read_timeout(Some(Duration::from_secs(3)))
        .map_err(|e| e.to_string())?;
    match mode {
        "sendto" => {
            socket
                .send_to(&query(name), server)
                .map_err(|e| format!("sendto: {e}"))?;
        }
        "connect" => {
            socket
                .connect(server)
                .map_err(|e| format!("connect: {e}"))?;
            let peer = socket
                .peer_addr()
                .map_err(|e| format!("getpeername: {e}"))?;
            if peer != server {
                return Err(format!("getpeername() says {peer}, not {server}"));
            }
            socket
                .send(&query(name))
                .map_err(|e| format!("send: {e}"))?;
        }
        other => return Err(format!("unknown mode {other}")),
    }
    let mut buf = [0u8; 4096];
    let (len, source) = socket
        .recv_from(&mut buf)
        .map_err(|e| format!("no answer: {e}"))?;
    let answer = &buf[..len];
    if source != server {
        return Err(format!(
            "answer came from {source}, not from {server}: musl would drop it"
        ));
    }
    if answer.get(..2) != Some(&QUERY_ID.to_be_bytes()[..]) {
        return Err("answer has the wrong ID".to_owned());
    }
    let address =
        single_a_record(answer).ok_or(format!("answer has no single A record ({len} bytes)"))?;
    Ok(format!("source={source} answer={address}"))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let (mode, server, name, hold) = match args.as_slice() {
        [_, mode, server, name] => (mode, server, name, false),
        [_, mode, server, name, hold] if hold == "--hold" => (mode, server, name, true),
        _ => {
            eprintln!("usage: dns-udp-probe sendto|connect SERVER_IP:PORT NAME [--hold]");
            return ExitCode::FAILURE;
        }
    };
    let Ok(server) = server.parse() else {
        eprintln!("{server}: not an IP:PORT");
        return ExitCode::FAILURE;
    };
    let socket = match UdpSocket::bind("0.0.0.0:0") {
        Ok(socket) => socket,
        Err(err) => {
            eprintln!("bind: {err}");
            return ExitCode::FAILURE;
        }
    };
    match probe(&socket, mode, server, name) {
        Ok(line) => {
            println!("{line}");
            if hold {
                use std::io::{Read as _, Write as _};
                let _ = std::io::stdout().flush();
                let _ = std::io::stdin().read_to_end(&mut Vec::new());
            }
            drop(socket);
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("{err}");
            ExitCode::FAILURE
        }
    }
}
