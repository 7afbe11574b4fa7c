//! Many datagrams per syscall: `recvmmsg(2)` and `sendmmsg(2)` on a non-blocking UDP socket.
//!
//! Under load most of the proxy's time is spent entering the kernel (profiled: 83 % in
//! syscalls). One `recvmmsg` takes every datagram queued on a socket, up to [`BATCH`], and
//! one `sendmmsg` sends a run of them, so a busy proxy makes a few syscalls per batch instead
//! of two per datagram. Neither socket2 nor tokio offers these calls; the unsafe code is kept
//! to this module.
use std::{
    io,
    mem::{self, MaybeUninit},
    net::SocketAddr,
    os::fd::{AsRawFd, BorrowedFd},
};

use socket2::{SockAddr, SockAddrStorage};

use super::wire::MAX_UDP_MESSAGE;

/// Datagrams per syscall at most. Enough to empty a busy socket's queue in a few calls.
pub const BATCH: usize = 32;

/// Buffers for receiving up to [`BATCH`] datagrams at once, each up to the largest UDP
/// message, so none is ever cut short. The memory is zeroed on allocation, which the
/// allocator gets from fresh pages: only the pages datagrams are written to become resident.
pub struct ReceivedBatch {
    buffers: Box<[u8]>,
    lens: [usize; BATCH],
    peers: [Option<SocketAddr>; BATCH],
    count: usize,
}

impl Default for ReceivedBatch {
    fn default() -> Self {
        Self {
            buffers: vec![0; BATCH * MAX_UDP_MESSAGE].into_boxed_slice(),
            lens: [0; BATCH],
            peers: [None; BATCH],
            count: 0,
        }
    }
}

impl ReceivedBatch {
    /// The datagrams of the last [`receive`](Self::receive), with their indexes and senders.
    /// A datagram whose sender's address is not IPv4 or IPv6 is left out.
    pub fn iter(&self) -> impl Iterator<Item = (usize, &[u8], SocketAddr)> {
        (0..self.count).filter_map(|i| Some((i, self.datagram(i), self.peers[i]?)))
    }

    /// Datagram `index` of the last [`receive`](Self::receive).
    pub fn datagram(&self, index: usize) -> &[u8] {
        assert!(index < self.count);
        let start = index * MAX_UDP_MESSAGE;
        &self.buffers[start..start + self.lens[index]]
    }

    /// Receives what is queued on `socket` (non-blocking), up to [`BATCH`] datagrams, with
    /// one `recvmmsg`. Returns how many; `WouldBlock` if none was queued.
    pub fn receive(&mut self, socket: BorrowedFd<'_>) -> io::Result<usize> {
        self.count = 0;
        // Zeroed, so that reading a whole one is sound whatever length the kernel wrote.
        let mut names: [libc::sockaddr_storage; BATCH] = unsafe { mem::zeroed() };
        let mut iovecs: [libc::iovec; BATCH] = unsafe { mem::zeroed() };
        let mut headers: [libc::mmsghdr; BATCH] = unsafe { mem::zeroed() };
        for (i, chunk) in self.buffers.chunks_exact_mut(MAX_UDP_MESSAGE).enumerate() {
            iovecs[i] = libc::iovec {
                iov_base: chunk.as_mut_ptr().cast(),
                iov_len: chunk.len(),
            };
            let header = &mut headers[i].msg_hdr;
            header.msg_name = (&raw mut names[i]).cast();
            header.msg_namelen = mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            header.msg_iov = &mut iovecs[i];
            header.msg_iovlen = 1;
        }
        // SAFETY: every header points at a live name buffer of the length it gives and at one
        // iovec over a live, distinct chunk of `self.buffers`; the kernel writes no further.
        let received = unsafe {
            libc::recvmmsg(
                socket.as_raw_fd(),
                headers.as_mut_ptr(),
                BATCH as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if received < 0 {
            return Err(io::Error::last_os_error());
        }
        let received = received as usize;
        for i in 0..received {
            self.lens[i] = headers[i].msg_len as usize;
            let namelen = headers[i].msg_hdr.msg_namelen;
            // SAFETY: the kernel wrote `namelen` bytes of a socket address into `names[i]`.
            self.peers[i] = unsafe { socket_addr(&names[i], namelen) };
        }
        self.count = received;
        Ok(received)
    }
}

/// The IPv4 or IPv6 address in `name`, of `len` bytes; `None` for any other family.
///
/// # Safety
/// `name` holds a socket address of `len` bytes, written by the kernel.
unsafe fn socket_addr(name: &libc::sockaddr_storage, len: libc::socklen_t) -> Option<SocketAddr> {
    let mut storage = SockAddrStorage::zeroed();
    // SAFETY: `SockAddrStorage` wraps a `sockaddr_storage`, which is what we copy in.
    unsafe { *storage.view_as::<libc::sockaddr_storage>() = *name };
    // SAFETY: the family and length are the kernel's, for the address it wrote.
    unsafe { SockAddr::new(storage, len) }.as_socket()
}

/// Sends datagrams `0..count` (each, from `datagram(i)`, to its address) on `socket` with as few `sendmmsg` calls as the
/// kernel takes, in order. A datagram the kernel refuses is skipped and reported to
/// `failed` with its index and the error; the rest still go. Returns how many were sent.
pub fn send_all<'a>(
    socket: BorrowedFd<'_>,
    count: usize,
    datagram: impl Fn(usize) -> (&'a [u8], SocketAddr),
    mut failed: impl FnMut(usize, io::Error),
) -> usize {
    let mut sent = 0;
    let mut next = 0;
    while next < count {
        let chunk = next..count.min(next + BATCH);
        match send_batch(socket, chunk, &datagram) {
            Ok(count) => {
                sent += count;
                next += count;
            }
            // The first of the chunk failed: skip it, go on with the next.
            Err(err) => {
                failed(next, err);
                next += 1;
            }
        }
    }
    sent
}

/// One `sendmmsg` of the datagrams `indexes` (at most [`BATCH`]); how many the kernel took
/// (at least one), or the error of the first.
fn send_batch<'a>(
    socket: BorrowedFd<'_>,
    indexes: std::ops::Range<usize>,
    datagram: impl Fn(usize) -> (&'a [u8], SocketAddr),
) -> io::Result<usize> {
    let count = indexes.len();
    debug_assert!(count > 0 && count <= BATCH);
    // Only the first `count` are made: a lone datagram pays for one address, not BATCH.
    let mut names: [MaybeUninit<SockAddr>; BATCH] = [const { MaybeUninit::uninit() }; BATCH];
    let mut iovecs: [libc::iovec; BATCH] = unsafe { mem::zeroed() };
    let mut headers: [libc::mmsghdr; BATCH] = unsafe { mem::zeroed() };
    for i in 0..count {
        let (datagram, to) = datagram(indexes.start + i);
        let name = names[i].write(to.into());
        iovecs[i] = libc::iovec {
            // The kernel only reads it.
            iov_base: datagram.as_ptr().cast_mut().cast(),
            iov_len: datagram.len(),
        };
        let header = &mut headers[i].msg_hdr;
        header.msg_name = name.as_ptr().cast_mut().cast();
        header.msg_namelen = name.len();
        header.msg_iov = &mut iovecs[i];
        header.msg_iovlen = 1;
    }
    // SAFETY: the first `count` headers point at live addresses and at iovecs over live
    // datagrams, all of the lengths they give; the kernel only writes `msg_len`.
    let sent = unsafe {
        libc::sendmmsg(
            socket.as_raw_fd(),
            headers.as_mut_ptr(),
            count as libc::c_uint,
            libc::MSG_DONTWAIT,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(sent as usize)
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use tokio::net::UdpSocket;

    use super::*;

    // Loopback delivers within the send: what was sent is queued when it returns.
    #[tokio::test]
    async fn sends_and_receives_many_datagrams_per_call_byte_for_byte() {
        let receiver = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let other = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let sender = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let big = vec![7u8; 60_000];
        let messages: Vec<Vec<u8>> = (0..BATCH + 5)
            .map(|i| {
                if i == 3 {
                    big.clone()
                } else {
                    vec![i as u8; i + 1]
                }
            })
            .collect();
        let to = |i: usize| {
            if i.is_multiple_of(2) {
                receiver.local_addr().unwrap()
            } else {
                other.local_addr().unwrap()
            }
        };
        let datagrams: Vec<(&[u8], SocketAddr)> = messages
            .iter()
            .enumerate()
            .map(|(i, m)| (&m[..], to(i)))
            .collect();
        let sent = send_all(
            sender.as_fd(),
            datagrams.len(),
            |i| datagrams[i],
            |i, err| panic!("{i}: {err}"),
        );
        assert_eq!(sent, BATCH + 5);

        let mut batch = ReceivedBatch::default();
        let mut got = Vec::new();
        for socket in [&receiver, &other] {
            loop {
                match batch.receive(socket.as_fd()) {
                    Ok(_) => got.extend(batch.iter().map(|(_, d, from)| (d.to_vec(), from))),
                    Err(err) if err.kind() == io::ErrorKind::WouldBlock => break,
                    Err(err) => panic!("{err}"),
                }
            }
        }
        assert_eq!(got.len(), BATCH + 5);
        for (datagram, from) in &got {
            assert_eq!(*from, sender.local_addr().unwrap());
            assert!(messages.contains(datagram));
        }
        assert!(got.iter().any(|(d, _)| d.len() == 60_000));
    }

    #[tokio::test]
    async fn a_refused_datagram_is_skipped_and_the_rest_still_go() {
        let receiver = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let sender = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let to = receiver.local_addr().unwrap();
        // Too big for UDP over IPv4: the kernel refuses it with EMSGSIZE.
        let too_big = vec![0u8; 70_000];
        let datagrams: Vec<(&[u8], SocketAddr)> =
            vec![(b"one", to), (&too_big, to), (b"three", to)];
        let mut failures = Vec::new();
        let sent = send_all(
            sender.as_fd(),
            datagrams.len(),
            |i| datagrams[i],
            |i, err| failures.push((i, err.raw_os_error())),
        );
        assert_eq!(sent, 2);
        assert_eq!(failures, vec![(1, Some(libc::EMSGSIZE))]);
        let mut batch = ReceivedBatch::default();
        batch.receive(receiver.as_fd()).unwrap();
        let got: Vec<&[u8]> = batch.iter().map(|(_, d, _)| d).collect();
        assert_eq!(got, vec![&b"one"[..], &b"three"[..]]);
    }
}
