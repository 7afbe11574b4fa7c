//! The TCP relay's state: one connection's two directions, fed any client stream and any
//! upstream stream (well-formed frames, any bytes, or a mix). Whatever they hold and whenever
//! either ends, the relay ends; the upstream is sent only whole queries, in the client's
//! order, up to the first message that is not one; the client is sent only whole frames the
//! upstream sent, unaltered and in order, and at most the agent's FORMERR to that message; and
//! nothing is left counted as in flight.
#![no_main]

use std::{cell::RefCell, sync::Arc, time::Duration};

use arbitrary::Arbitrary;
use dns_proxy::dns::{
    FixedDestination,
    per_client::PerClientLimit,
    stats::Stats,
    tcp::{TcpProxy, TcpSettings},
    wire,
};
use dns_proxy_fuzz::{framed, frames};
use libfuzzer_sys::fuzz_target;
use tokio::runtime::Runtime;

#[derive(Arbitrary, Debug)]
enum Frame {
    /// A query (QR clear) or an answer (QR set) with a small ID, framed.
    Message { id: u8, answer: bool },
    /// Any bytes, framed.
    Framed(Vec<u8>),
    /// Any bytes, unframed: they may cut or shift what follows.
    Raw(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
struct Input {
    client: Vec<Frame>,
    upstream: Vec<Frame>,
}

/// A query for a.example.test, or (`answer`) the same message with QR set.
fn message(id: u8, answer: bool) -> Vec<u8> {
    let mut message = tests::a_query(u16::from(id), "a.example.test");
    if answer {
        message[2] |= 0x80;
    }
    message
}

fn bytes_of(frames: &[Frame]) -> Vec<u8> {
    let mut bytes = Vec::new();
    for frame in frames {
        match frame {
            Frame::Message { id, answer } => {
                bytes.extend(framed([&message(*id, *answer)[..]]));
            }
            Frame::Framed(data) => {
                bytes.extend(framed([&data[..data.len().min(usize::from(u16::MAX))]]));
            }
            Frame::Raw(data) => bytes.extend_from_slice(data),
        }
    }
    bytes
}

/// The whole frames at the start of `bytes`.
fn whole_frames(bytes: &[u8]) -> Vec<&[u8]> {
    frames(bytes).0
}

fn is_prefix(prefix: &[&[u8]], of: &[&[u8]]) -> bool {
    prefix.len() <= of.len() && prefix == &of[..prefix.len()]
}

thread_local! {
    static RUNTIME: Runtime =
        tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    static PROXY: RefCell<Option<Arc<TcpProxy<FixedDestination>>>> = const { RefCell::new(None) };
}

fn proxy(runtime: &Runtime) -> Arc<TcpProxy<FixedDestination>> {
    PROXY.with_borrow_mut(|proxy| {
        Arc::clone(proxy.get_or_insert_with(|| {
            let listener = runtime
                .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
                .expect("a loopback listener");
            let settings = TcpSettings {
                upstream_override: None,
                upstream_timeout: Duration::from_secs(3600),
                idle_timeout: Duration::from_secs(3600),
                max_connections: 1,
                per_client: PerClientLimit::new(1),
                cache: None,
                observers: Default::default(),
                own_sockets: Default::default(),
            };
            let _entered = runtime.enter();
            TcpProxy::new(
                listener,
                FixedDestination::new(None),
                settings,
                Arc::<Stats>::default(),
            )
            .expect("the proxy")
        }))
    })
}

fuzz_target!(|input: Input| {
    let (client_bytes, upstream_bytes) = (bytes_of(&input.client), bytes_of(&input.upstream));
    RUNTIME.with(|runtime| {
        let proxy = proxy(runtime);
        let (mut to_upstream, mut to_client) = (Vec::new(), Vec::new());
        let closed = runtime.block_on(proxy.fuzz_relay(
            (&client_bytes[..], &mut to_client),
            (&upstream_bytes[..], &mut to_upstream),
        ));
        // What the upstream may get: the client's frames while they are queries.
        let queries: Vec<&[u8]> = whole_frames(&client_bytes)
            .into_iter()
            .take_while(|frame| wire::is_query(frame))
            .collect();
        let (upstream_got, client_got) = (whole_frames(&to_upstream), whole_frames(&to_client));
        assert!(is_prefix(&upstream_got, &queries), "{closed}");
        assert_eq!(framed(upstream_got), to_upstream, "only whole frames");
        assert_eq!(framed(client_got.clone()), to_client, "only whole frames");
        // What the client may get: the upstream's frames, as they were, and the agent's
        // FORMERR to the first message that is no query, if it has a query's header, at any
        // point among them.
        let formerr = whole_frames(&client_bytes)
            .into_iter()
            .find(|frame| !wire::is_query(frame))
            .and_then(wire::format_error);
        let from_upstream = whole_frames(&upstream_bytes);
        let without = |at: usize| {
            let mut rest = client_got.clone();
            rest.remove(at);
            rest
        };
        let as_sent = is_prefix(&client_got, &from_upstream)
            || formerr.as_deref().is_some_and(|formerr| {
                (0..client_got.len())
                    .filter(|&at| client_got[at] == formerr)
                    .any(|at| is_prefix(&without(at), &from_upstream))
            });
        assert!(as_sent, "{closed}");
        let inflight = proxy.fuzz_inflight();
        assert_eq!(inflight, 0, "{closed}: queries left in flight");
    });
});
