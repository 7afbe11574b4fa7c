//! The TCP relay's state: one connection's two directions, fed any client stream and any
//! upstream stream (well-formed frames, any bytes, or a mix). Whatever they hold and whenever
//! either ends, the relay ends; the upstream is sent only whole queries, in the client's
//! order, up to the first message that is not one; the client is sent only whole frames the
//! upstream sent, unaltered and in order; and nothing is left counted as in flight.
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

fn message(id: u8, answer: bool) -> Vec<u8> {
    let mut message = vec![
        0,
        id,
        if answer { 0x81 } else { 0x01 },
        0,
        0,
        1,
        0,
        0,
        0,
        0,
        0,
        0,
    ];
    message.extend_from_slice(b"\x01a\x07example\x04test\x00\x00\x01\x00\x01");
    message
}

fn bytes_of(frames: &[Frame]) -> Vec<u8> {
    let mut bytes = Vec::new();
    for frame in frames {
        match frame {
            Frame::Message { id, answer } => {
                let message = message(*id, *answer);
                bytes.extend_from_slice(&(message.len() as u16).to_be_bytes());
                bytes.extend_from_slice(&message);
            }
            Frame::Framed(data) => {
                let data = &data[..data.len().min(usize::from(u16::MAX))];
                bytes.extend_from_slice(&(data.len() as u16).to_be_bytes());
                bytes.extend_from_slice(data);
            }
            Frame::Raw(data) => bytes.extend_from_slice(data),
        }
    }
    bytes
}

/// The whole frames at the start of `bytes`.
fn frames(mut bytes: &[u8]) -> Vec<&[u8]> {
    let mut frames = Vec::new();
    while let Some((length, rest)) = bytes.split_first_chunk::<2>() {
        let length = usize::from(u16::from_be_bytes(*length));
        if rest.len() < length {
            break;
        }
        frames.push(&rest[..length]);
        bytes = &rest[length..];
    }
    frames
}

fn is_prefix<T: PartialEq + std::fmt::Debug>(prefix: &[T], of: &[T]) -> bool {
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
            };
            let _entered = runtime.enter();
            TcpProxy::new(
                listener,
                FixedDestination(None),
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
        let queries: Vec<&[u8]> = frames(&client_bytes)
            .into_iter()
            .take_while(|frame| wire::is_query(frame))
            .collect();
        assert!(is_prefix(&frames(&to_upstream), &queries), "{closed}");
        assert_eq!(
            framed(&frames(&to_upstream)),
            to_upstream,
            "only whole frames"
        );
        // What the client may get: the upstream's frames, as they were.
        assert!(
            is_prefix(&frames(&to_client), &frames(&upstream_bytes)),
            "{closed}"
        );
        assert_eq!(framed(&frames(&to_client)), to_client, "only whole frames");
        let inflight = proxy.fuzz_inflight();
        assert_eq!(inflight, 0, "{closed}: queries left in flight");
    });
});

/// `frames` framed again, as the relay writes them.
fn framed(frames: &[&[u8]]) -> Vec<u8> {
    let mut bytes = Vec::new();
    for frame in frames {
        bytes.extend_from_slice(&(frame.len() as u16).to_be_bytes());
        bytes.extend_from_slice(frame);
    }
    bytes
}
