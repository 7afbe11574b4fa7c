//! An authoritative server whose answers the cache tests script by name, over UDP and TCP.
//!
//! Usage: scripted-authority LISTEN_ADDR:PORT QUERY_LOG SILENT_FLAG
//!
//! Each query it receives is appended to QUERY_LOG as `NAME TYPE do=0|1 udp|tcp` (the name as
//! asked); while the file SILENT_FLAG exists it answers nothing, or SERVFAIL to everything if
//! the file says `servfail`. Otherwise the first label of the name
//! says what it answers (letter case aside):
//! - `nx`: NXDOMAIN, with an SOA of TTL 300 and MINIMUM 7 (kept 7 s);
//! - `nodata`: NOERROR without answers, with an SOA of TTL 5 and MINIMUM 600 (kept 5 s);
//! - `nosoa`: NXDOMAIN without an SOA (not to be kept);
//! - `servfail`: SERVFAIL;
//! - `big`: 40 A records, TTL 60 (truncated, TC, over UDP past the client's size);
//! - `dnssec`: A 198.51.100.2 when the query has the DO bit, 198.51.100.1 without;
//! - `slow`: A 198.51.100.1, TTL 60, 1.5 s after the query;
//! - `slowbig`: as `big`, 1.5 s after the query;
//! - `short`: A 198.51.100.1, TTL 2;
//! - `ecs`: A 198.51.100.1, TTL 60, scoped to 192.0.2.0/24 by an EDNS Client Subnet option
//!   (when the query has EDNS);
//! - `upper`: A 198.51.100.1, TTL 60, its question in upper case whatever the query's (a
//!   server that fails its clients' 0x20 check);
//! - `droplong`: A 198.51.100.1, TTL 60, but a UDP query over 1,232 bytes is dropped, as
//!   dnsmasq drops it;
//! - `keepalive` (over TCP, with EDNS): A 198.51.100.1, TTL 60, and an edns-tcp-keepalive
//!   option (RFC 7828) of 5 s: the client may leave the connection idle that long;
//! - an AXFR of any name (over TCP): a zone transfer of 300 A records in 6 messages, 150 ms
//!   apart, the zone's SOA first and last; the server closes when the client has closed its
//!   side and the transfer is sent;
//! - anything else: A 198.51.100.1, TTL 60.
//!
//! The answer echoes the question as asked, and an OPT record (size 1232, the DO bit echoed)
//! if the query had one, with the client's cookie and a server cookie of 8 bytes if it sent
//! one (RFC 7873).
#![expect(
    clippy::disallowed_methods,
    reason = "a synchronous test server on std sockets; it resolves no names"
)]
use std::{
    fs::OpenOptions,
    io::Write,
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use hickory_proto::{
    op::{Edns, Message, MessageType, ResponseCode},
    rr::{
        Name, RData, Record, RecordType,
        rdata::{
            A, SOA,
            opt::{ClientSubnet, EdnsCode, EdnsOption},
        },
    },
    serialize::binary::{BinDecodable, BinEncodable},
};
use tests::answer::read_tcp_message;

const ANSWER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
const SIGNED_ANSWER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
const SLOW: Duration = Duration::from_millis(1500);
const HEADER_LEN: usize = 12;
/// The UDP payload a client without EDNS takes.
const CLASSIC_UDP_LIMIT: usize = 512;

struct Script {
    log: Mutex<std::fs::File>,
    silent_flag: PathBuf,
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [listen, log, silent_flag] = args.as_slice() else {
        eprintln!("usage: scripted-authority LISTEN_ADDR:PORT QUERY_LOG SILENT_FLAG");
        std::process::exit(2);
    };
    let listen: SocketAddr = listen.parse().expect("LISTEN_ADDR:PORT");
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("QUERY_LOG");
    let script = Arc::new(Script {
        log: Mutex::new(log),
        silent_flag: silent_flag.into(),
    });
    let tcp = TcpListener::bind(listen).expect("bind TCP");
    let tcp_script = Arc::clone(&script);
    std::thread::spawn(move || {
        for stream in tcp.incoming().flatten() {
            let script = Arc::clone(&tcp_script);
            std::thread::spawn(move || serve_tcp(&script, stream));
        }
    });
    let udp = Arc::new(UdpSocket::bind(listen).expect("bind UDP"));
    let mut buf = [0u8; 4096];
    loop {
        let Ok((len, from)) = udp.recv_from(&mut buf) else {
            continue;
        };
        let Some((answer, delay)) = script.answer(&buf[..len], "udp") else {
            continue;
        };
        if delay.is_zero() {
            let _ = udp.send_to(&answer, from);
        } else {
            let udp = Arc::clone(&udp);
            std::thread::spawn(move || {
                std::thread::sleep(delay);
                let _ = udp.send_to(&answer, from);
            });
        }
    }
}

fn serve_tcp(script: &Script, mut stream: TcpStream) {
    while let Some(query) = read_tcp_message(&mut stream) {
        let answers = match zone_transfer(&query) {
            Some(messages) => messages,
            None => match script.answer(&query, "tcp") {
                Some((answer, delay)) => {
                    std::thread::sleep(delay);
                    vec![answer]
                }
                None => continue,
            },
        };
        for (at, answer) in answers.iter().enumerate() {
            if at > 0 {
                std::thread::sleep(TRANSFER_PAUSE);
            }
            let mut framed = (answer.len() as u16).to_be_bytes().to_vec();
            framed.extend_from_slice(answer);
            if stream.write_all(&framed).is_err() {
                return;
            }
        }
    }
}

/// Between a zone transfer's messages.
const TRANSFER_PAUSE: Duration = Duration::from_millis(150);

/// The messages of a zone transfer if `query` asks for one (AXFR): the zone's SOA, 300 A
/// records, the SOA again, 50 records to a message, each with the query's ID.
fn zone_transfer(query: &[u8]) -> Option<Vec<Vec<u8>>> {
    let query = Message::from_bytes(query).ok()?;
    let question = query.queries().first()?.clone();
    if question.query_type() != RecordType::AXFR {
        return None;
    }
    let mut records = vec![soa(60, 60)];
    records.extend((0..300u32).map(|i| {
        let name = Name::from_ascii(format!("h{i}.example.test.")).expect("a name");
        let [.., high, low] = i.to_be_bytes();
        Record::from_rdata(name, 60, RData::A(A(Ipv4Addr::new(10, 1, high, low))))
    }));
    records.push(soa(60, 60));
    let messages = records
        .chunks(51)
        .enumerate()
        .map(|(at, chunk)| {
            let mut message = Message::new();
            message
                .set_id(query.id())
                .set_message_type(MessageType::Response)
                .set_authoritative(true);
            if at == 0 {
                message.add_query(question.clone());
            }
            message.add_answers(chunk.iter().cloned());
            message.to_vec().expect("a transfer message")
        })
        .collect();
    Some(messages)
}

impl Script {
    /// The answer to `query` and when to send it; `None` for no answer.
    fn answer(&self, query: &[u8], transport: &str) -> Option<(Vec<u8>, Duration)> {
        let size = query.len();
        let query = Message::from_bytes(query).ok()?;
        let question = query.queries().first()?.clone();
        let dnssec_ok = query
            .extensions()
            .as_ref()
            .is_some_and(|edns| edns.flags().dnssec_ok);
        let line = format!(
            "{} {} do={} {transport}\n",
            question.name(),
            question.query_type(),
            u8::from(dnssec_ok)
        );
        let _ = self
            .log
            .lock()
            .expect("not poisoned")
            .write_all(line.as_bytes());
        let failing = match std::fs::read_to_string(&self.silent_flag) {
            Ok(mode) if mode.trim() == "servfail" => true,
            Ok(_) => return None,
            Err(_) => false,
        };
        let name = question.name().clone();
        let first_label = name
            .iter()
            .next()
            .map(|label| String::from_utf8_lossy(label).to_ascii_lowercase())
            .unwrap_or_default();
        if first_label == "droplong" && transport == "udp" && size > 1232 {
            return None;
        }
        let mut answer = Message::new();
        answer
            .set_id(query.id())
            .set_message_type(MessageType::Response)
            .set_op_code(query.op_code())
            .set_authoritative(true)
            .set_recursion_desired(query.recursion_desired())
            .add_query(question.clone());
        if let Some(edns) = query.extensions() {
            let mut echoed = Edns::new();
            echoed
                .set_max_payload(1232)
                .set_dnssec_ok(edns.flags().dnssec_ok);
            let client_cookie =
                edns.options()
                    .as_ref()
                    .iter()
                    .find_map(|(code, option)| match (code, option) {
                        (EdnsCode::Cookie, EdnsOption::Unknown(_, data)) => Some(data.clone()),
                        _ => None,
                    });
            if let Some(mut cookie) = client_cookie.filter(|cookie| cookie.len() >= 8) {
                cookie.truncate(8);
                cookie.extend_from_slice(&[0x5e; 8]);
                echoed
                    .options_mut()
                    .insert(EdnsOption::Unknown(u16::from(EdnsCode::Cookie), cookie));
            }
            if first_label == "keepalive" && transport == "tcp" {
                // 5 s, in units of 100 ms.
                echoed
                    .options_mut()
                    .insert(EdnsOption::Unknown(11, 50u16.to_be_bytes().to_vec()));
            }
            if first_label == "ecs" {
                let subnet = ClientSubnet::new(Ipv4Addr::new(192, 0, 2, 0).into(), 24, 24);
                echoed.options_mut().insert(EdnsOption::Subnet(subnet));
            }
            answer.set_edns(echoed);
        }
        let a = |ttl, ip: Ipv4Addr| Record::from_rdata(name.clone(), ttl, RData::A(A(ip)));
        let mut delay = Duration::ZERO;
        match first_label.as_str() {
            _ if failing => {
                answer.set_response_code(ResponseCode::ServFail);
            }
            "nx" => {
                answer.set_response_code(ResponseCode::NXDomain);
                answer.add_name_server(soa(300, 7));
            }
            "nodata" => {
                answer.add_name_server(soa(5, 600));
            }
            "nosoa" => {
                answer.set_response_code(ResponseCode::NXDomain);
            }
            "servfail" => {
                answer.set_response_code(ResponseCode::ServFail);
            }
            "big" | "slowbig" => {
                for i in 0..40u8 {
                    answer.add_answer(a(60, Ipv4Addr::new(10, 0, 0, i)));
                }
                if first_label == "slowbig" {
                    delay = SLOW;
                }
            }
            "dnssec" => {
                answer.add_answer(a(60, if dnssec_ok { SIGNED_ANSWER } else { ANSWER }));
            }
            "slow" => {
                answer.add_answer(a(60, ANSWER));
                delay = SLOW;
            }
            "ecs" => {
                answer.add_answer(a(60, ANSWER));
            }
            "upper" => {
                answer.add_answer(a(60, ANSWER));
            }
            "short" => {
                answer.add_answer(a(2, ANSWER));
            }
            _ if question.query_type() == RecordType::A => {
                answer.add_answer(a(60, ANSWER));
            }
            _ => {
                answer.add_name_server(soa(60, 60));
            }
        }
        let mut bytes = answer.to_vec().ok()?;
        if first_label == "upper" {
            // The question's labels, after the header: in upper case.
            let end = HEADER_LEN + question.name().to_bytes().ok()?.len();
            bytes[HEADER_LEN..end].make_ascii_uppercase();
        }
        let limit = query
            .extensions()
            .as_ref()
            .map_or(CLASSIC_UDP_LIMIT, |edns| usize::from(edns.max_payload()));
        if transport == "udp" && bytes.len() > limit.max(CLASSIC_UDP_LIMIT) {
            // As a real server does: the question only, TC set; the client retries over TCP.
            answer.take_answers();
            answer.set_truncated(true);
            bytes = answer.to_vec().ok()?;
        }
        Some((bytes, delay))
    }
}

/// The zone's SOA, TTL `ttl`, MINIMUM `minimum`.
fn soa(ttl: u32, minimum: u32) -> Record {
    let zone = Name::from_ascii("example.test.").expect("a name");
    let soa = SOA::new(
        Name::from_ascii("ns.example.test.").expect("a name"),
        Name::from_ascii("admin.example.test.").expect("a name"),
        1,
        3600,
        600,
        86400,
        minimum,
    );
    Record::from_rdata(zone, ttl, RData::SOA(soa))
}
