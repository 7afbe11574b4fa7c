//! The UDP relay's state: queries of several clients registered as in flight, and datagrams
//! arriving on the pool sockets, in any order, against a model of what must happen. An answer
//! goes to the client whose query it answers (same pool socket, upstream, ID and question
//! bytes), once, and to no one else; a query is refused only at a limit or when its ID is
//! taken; the table, the shared gauge and the per-client counts always agree with the model.
#![no_main]

use std::{
    cell::RefCell,
    net::{Ipv4Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use arbitrary::Arbitrary;
use dns_proxy::dns::{
    FixedDestination,
    coalesce::Coalescer,
    per_client::PerClientLimit,
    udp::{ForwardSettings, UdpProxy},
    wire,
};
use libfuzzer_sys::fuzz_target;
use tokio::runtime::Runtime;

const UPSTREAM: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::new(192, 0, 2, 53)), 53);
const MAX_INFLIGHT: usize = 8;
const PER_CLIENT: usize = 3;
const NAMES: [&str; 3] = ["a.example.test", "A.example.test", "b.example.test"];

#[derive(Arbitrary, Debug)]
enum Op {
    /// A query from client `client % 4`, with a small ID (so IDs collide), for one of NAMES,
    /// or raw bytes.
    Query {
        client: u8,
        id: u8,
        name: u8,
        raw: Option<Vec<u8>>,
    },
    /// An answer to in-flight query `which`, maybe altered.
    Answer { which: u8, alter: Alter },
    /// Any bytes, from the upstream or elsewhere, on a pool socket.
    Stray {
        socket: u8,
        elsewhere: bool,
        bytes: Vec<u8>,
    },
}

#[derive(Arbitrary, Debug)]
enum Alter {
    None,
    Id,
    QuestionCase,
    SourcePort,
    Socket,
    Truncate(u8),
    Trailer(Vec<u8>),
}

/// A query the model holds in flight.
struct InFlight {
    socket: u64,
    id: u16,
    query: Vec<u8>,
    client: SocketAddr,
}

fn client(n: u8) -> SocketAddr {
    (Ipv4Addr::new(10, 0, 0, n % 4 + 1), 40000).into()
}

thread_local! {
    static RUNTIME: RefCell<Runtime> = RefCell::new(
        tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime"),
    );
}

fn run(ops: Vec<Op>) {
    RUNTIME.with_borrow(|runtime| {
        let _entered = runtime.enter();
        let per_client = PerClientLimit::new(PER_CLIENT);
        let settings = ForwardSettings {
            upstream_override: None,
            upstream_timeout: Duration::from_secs(3600),
            max_inflight: MAX_INFLIGHT,
            per_client: Arc::clone(&per_client),
            cache: None,
            observers: Default::default(),
            in_flight: Arc::new(Coalescer::new(1024)),
            route_changes: Default::default(),
            closed_ports: Default::default(),
            own_sockets: Default::default(),
            port_unreachable: Arc::default(),
        };
        let listener = runtime
            .block_on(tokio::net::UdpSocket::bind("127.0.0.1:0"))
            .expect("a loopback socket");
        let proxy = UdpProxy::new(
            listener,
            FixedDestination::new(Some(UPSTREAM)),
            settings,
            Arc::default(),
        )
        .expect("the proxy");
        let mut model: Vec<InFlight> = Vec::new();
        for (step, op) in ops.into_iter().enumerate() {
            let (socket, datagram, from) = match op {
                Op::Query {
                    client: n,
                    id,
                    name,
                    raw,
                } => {
                    let from = client(n);
                    let query = raw.unwrap_or_else(|| {
                        tests::a_query(u16::from(id), NAMES[usize::from(name) % NAMES.len()])
                    });
                    let registered = proxy.fuzz_register(&query, from, step as u64);
                    let held = model.iter().filter(|q| q.client == from).count();
                    // The agent-wide limit, or twice it for a client within its fair share
                    // (the limit divided among the clients holding something, itself included).
                    let mut holders: Vec<SocketAddr> = model.iter().map(|q| q.client).collect();
                    holders.push(from);
                    holders.sort_unstable();
                    holders.dedup();
                    let fair = (MAX_INFLIGHT / holders.len()).max(1);
                    let room = model.len() < MAX_INFLIGHT
                        || (held < fair && model.len() < 2 * MAX_INFLIGHT);
                    match registered {
                        Some((socket, upstream)) => {
                            assert!(wire::is_query(&query));
                            assert_eq!(upstream, UPSTREAM);
                            assert!(held < PER_CLIENT, "past the client's limit");
                            assert!(room, "past the limit");
                            let id = wire::message_id(&query).unwrap();
                            assert!(
                                !model.iter().any(|q| q.socket == socket && q.id == id),
                                "two queries under one key"
                            );
                            model.push(InFlight {
                                socket,
                                id,
                                query,
                                client: from,
                            });
                        }
                        None if wire::is_query(&query) && held < PER_CLIENT && room => {
                            let id = wire::message_id(&query).unwrap();
                            assert!(
                                model.iter().any(|q| q.id == id),
                                "a query refused with room and a free ID"
                            );
                        }
                        None => {}
                    }
                    continue;
                }
                Op::Answer { which, alter } => {
                    if model.is_empty() {
                        continue;
                    }
                    let query = &model[usize::from(which) % model.len()];
                    let mut answer = query.query.clone();
                    answer[2] |= 0x80;
                    answer.extend_from_slice(
                        b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x04\xc6\x33\x64\x07",
                    );
                    let (mut socket, mut from) = (query.socket, UPSTREAM);
                    match alter {
                        Alter::None => {}
                        Alter::Id => answer[1] ^= 0x01,
                        Alter::QuestionCase => {
                            if let Some(byte) = answer.get_mut(13) {
                                *byte ^= 0x20;
                            }
                        }
                        Alter::SourcePort => from.set_port(5353),
                        Alter::Socket => socket += 1,
                        Alter::Truncate(len) => answer.truncate(usize::from(len)),
                        Alter::Trailer(bytes) => answer.extend_from_slice(&bytes),
                    }
                    (socket, answer, from)
                }
                Op::Stray {
                    socket,
                    elsewhere,
                    bytes,
                } => {
                    let from = if elsewhere {
                        "192.0.2.99:53".parse().unwrap()
                    } else {
                        UPSTREAM
                    };
                    (u64::from(socket % 8), bytes, from)
                }
            };
            // The model's verdict: the query with this socket, upstream and ID, whose question
            // the answer repeats (letter case aside), or any such query if it has none.
            let expected = (from == UPSTREAM)
                .then(|| {
                    let id = wire::response_id(&datagram)?;
                    let question = wire::question(&datagram)?;
                    model.iter().position(|q| {
                        q.socket == socket
                            && q.id == id
                            && wire::question(&q.query)
                                .is_some_and(|asked| same_question(asked, question))
                    })
                })
                .flatten();
            let relayed_to = proxy.fuzz_match(socket, &datagram, from);
            assert_eq!(
                relayed_to,
                expected.map(|i| model[i].client),
                "{datagram:02x?}"
            );
            if let Some(i) = expected {
                model.remove(i);
            }
            let (table, gauge) = proxy.fuzz_inflight();
            assert_eq!((table, gauge), (model.len(), model.len() as u64));
            let mut clients: Vec<_> = model.iter().map(|q| q.client).collect();
            clients.sort();
            clients.dedup();
            assert_eq!(per_client.clients(), clients.len());
        }
        // End the readers and the sweeper, so nothing outlives this input.
        proxy.fuzz_stop();
        drop(proxy);
        runtime.block_on(async {
            for _ in 0..4 {
                tokio::task::yield_now().await;
            }
        });
    });
}

/// The model's own comparison: no question at all, or the same bytes but for the letter case
/// of the name (the last four bytes, type and class, exactly).
fn same_question(asked: &[u8], answered: &[u8]) -> bool {
    if answered.is_empty() {
        return true;
    }
    let name = asked.len().saturating_sub(4);
    asked.len() == answered.len()
        && asked[..name].eq_ignore_ascii_case(&answered[..name])
        && asked[name..] == answered[name..]
}

fuzz_target!(|ops: Vec<Op>| run(ops));
