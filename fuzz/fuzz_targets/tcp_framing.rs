//! TCP framing: the proxy reads a stream of 2-byte-length-prefixed messages, from clients and
//! from upstreams, arriving in pieces of any size. Whatever the bytes and however they are
//! split, it must read exactly the frames a reference decoder finds, end cleanly only between
//! frames, and report a stream cut mid-frame as an error. Frames it writes read back as sent.
#![no_main]

use std::{
    future::Future,
    io,
    pin::{Pin, pin},
    task::{Context, Poll, Waker},
};

use dns_proxy::dns::tcp::{read_message, write_message};
use dns_proxy_fuzz::frames;
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncRead, ReadBuf};

/// A stream that hands out `data` in pieces of the given sizes (then whatever is left).
struct Pieces<'a> {
    data: &'a [u8],
    sizes: std::vec::IntoIter<usize>,
}

impl AsyncRead for Pieces<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let size = self.sizes.next().unwrap_or(usize::MAX).max(1);
        let n = size.min(buf.remaining()).min(self.data.len());
        buf.put_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Poll::Ready(Ok(()))
    }
}

/// Runs a future that never waits (the streams here are always ready).
fn now<T>(future: impl Future<Output = T>) -> T {
    let mut future = pin!(future);
    match future
        .as_mut()
        .poll(&mut Context::from_waker(Waker::noop()))
    {
        Poll::Ready(value) => value,
        Poll::Pending => panic!("an in-memory stream made the reader wait"),
    }
}

fuzz_target!(|input: (Vec<u8>, &[u8])| {
    let (sizes, data) = input;
    let mut stream = Pieces {
        data,
        sizes: sizes
            .into_iter()
            .map(usize::from)
            .collect::<Vec<_>>()
            .into_iter(),
    };
    let (expected, clean_end) = frames(data);
    let mut read = Vec::new();
    let end = loop {
        match now(read_message(&mut stream)) {
            Ok(Some(message)) => read.push(message),
            Ok(None) => break true,
            Err(err) => {
                assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof, "{err}");
                break false;
            }
        }
    };
    assert_eq!(read, expected);
    assert_eq!(end, clean_end, "clean end");

    // What the proxy writes reads back the same.
    let mut written = Vec::new();
    for frame in &expected {
        now(write_message(&mut written, frame)).expect("write to memory");
    }
    let mut again = &written[..];
    for frame in &expected {
        assert_eq!(
            now(read_message(&mut again)).unwrap().as_deref(),
            Some(*frame)
        );
    }
    assert_eq!(now(read_message(&mut again)).unwrap(), None);
});
