//! The least a user-space DNS relay can do, as the yardstick `cargo xtask bench` reads the
//! agent against (its `bare relay` row): two threads with blocking `recvmmsg` and `sendmmsg`,
//! no event loop, no interception (the client sends to it directly), no checks, and no table
//! but the client of each message ID. What it costs over `direct` is what any user-space
//! proxy pays on this machine for the two receives and two sends of each query.
//!
//! Not a DNS server anyone should run: two clients with the same ID in flight get each
//! other's answers. IPv4 only.
//!
//! Usage: bare-relay LISTEN:PORT UPSTREAM:PORT
#![expect(
    clippy::disallowed_methods,
    reason = "blocking threads on std sockets are the point: the least machinery there is"
)]
use std::{
    io,
    mem::MaybeUninit,
    net::{SocketAddr, SocketAddrV4, UdpSocket},
    os::fd::{AsRawFd as _, RawFd},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

/// Datagrams a syscall takes or sends at most.
const BATCH: usize = 32;
const BUFFER: usize = 4096;

/// One batch of datagrams with their addresses, laid out for `recvmmsg` and `sendmmsg`.
struct Batch {
    buffers: Vec<[u8; BUFFER]>,
    addresses: Vec<libc::sockaddr_in>,
    iovecs: Vec<libc::iovec>,
    headers: Vec<libc::mmsghdr>,
}

impl Batch {
    fn new() -> Box<Self> {
        let mut batch = Box::new(Batch {
            buffers: vec![[0; BUFFER]; BATCH],
            // SAFETY: sockaddr_in is plain data, for which all zeroes is a valid value.
            addresses: vec![unsafe { MaybeUninit::zeroed().assume_init() }; BATCH],
            iovecs: Vec::with_capacity(BATCH),
            headers: Vec::with_capacity(BATCH),
        });
        let Batch {
            buffers,
            addresses,
            iovecs,
            headers,
        } = &mut *batch;
        for buffer in buffers.iter_mut() {
            iovecs.push(libc::iovec {
                iov_base: buffer.as_mut_ptr().cast(),
                iov_len: BUFFER,
            });
        }
        for (address, iovec) in addresses.iter_mut().zip(iovecs.iter_mut()) {
            // SAFETY: mmsghdr is plain data, for which all zeroes is a valid value.
            let mut header: libc::mmsghdr = unsafe { MaybeUninit::zeroed().assume_init() };
            header.msg_hdr.msg_name = (address as *mut libc::sockaddr_in).cast();
            header.msg_hdr.msg_namelen = size_of::<libc::sockaddr_in>() as u32;
            header.msg_hdr.msg_iov = iovec;
            header.msg_hdr.msg_iovlen = 1;
            headers.push(header);
        }
        batch
    }

    /// Waits for at least one datagram on `fd` and takes what is queued, up to a batch. An
    /// error that a datagram or a signal causes (an ICMP error on the connected upstream
    /// socket, say) reads as an empty batch.
    fn receive(&mut self, fd: RawFd) -> io::Result<usize> {
        for (header, iovec) in self.headers.iter_mut().zip(&mut self.iovecs) {
            iovec.iov_len = BUFFER;
            header.msg_hdr.msg_namelen = size_of::<libc::sockaddr_in>() as u32;
        }
        // SAFETY: every header points at its own address, iovec and buffer, in vectors of
        // `self` filled once to BATCH and never resized (so their heap storage never moves),
        // borrowed mutably for the call.
        let received = unsafe {
            libc::recvmmsg(
                fd,
                self.headers.as_mut_ptr(),
                BATCH as u32,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        if received < 0 {
            let err = io::Error::last_os_error();
            return match err.raw_os_error() {
                Some(libc::ECONNREFUSED | libc::EINTR) => Ok(0),
                _ => Err(err),
            };
        }
        let received = received as usize;
        for (header, iovec) in self.headers.iter().zip(&mut self.iovecs).take(received) {
            iovec.iov_len = header.msg_len as usize;
        }
        Ok(received)
    }

    /// Sends the first `count` datagrams, each to the address beside it (or, with `to_peer`,
    /// to the connected peer).
    fn send(&mut self, fd: RawFd, count: usize, to_peer: bool) {
        for header in &mut self.headers[..count] {
            header.msg_hdr.msg_namelen = if to_peer {
                0
            } else {
                size_of::<libc::sockaddr_in>() as u32
            };
        }
        let mut sent = 0;
        while sent < count {
            // SAFETY: as in `receive`; the kernel only reads the first `count` headers.
            let done = unsafe {
                libc::sendmmsg(
                    fd,
                    self.headers[sent..].as_mut_ptr(),
                    (count - sent) as u32,
                    0,
                )
            };
            if done <= 0 {
                // A full buffer or an ICMP error: that datagram is lost, as on the wire.
                sent += 1;
            } else {
                sent += done as usize;
            }
        }
    }

    fn id(&self, index: usize) -> usize {
        usize::from(u16::from_be_bytes([
            self.buffers[index][0],
            self.buffers[index][1],
        ]))
    }
}

fn pack(address: &libc::sockaddr_in) -> u64 {
    (u64::from(address.sin_addr.s_addr) << 16) | u64::from(address.sin_port)
}

fn unpack(packed: u64, address: &mut libc::sockaddr_in) {
    address.sin_family = libc::AF_INET as libc::sa_family_t;
    address.sin_addr.s_addr = (packed >> 16) as u32;
    address.sin_port = packed as u16;
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [listen, upstream] = args.as_slice() else {
        eprintln!("usage: bare-relay LISTEN:PORT UPSTREAM:PORT");
        std::process::exit(2);
    };
    let parse = |text: &str| match text.parse::<SocketAddr>() {
        Ok(SocketAddr::V4(address)) => address,
        _ => {
            eprintln!("bare-relay: {text}: not an IPv4 address and port");
            std::process::exit(2);
        }
    };
    let (listen, upstream): (SocketAddrV4, SocketAddrV4) = (parse(listen), parse(upstream));
    let listener = UdpSocket::bind(listen).expect("bind the listener");
    let upstream_socket = UdpSocket::bind("0.0.0.0:0").expect("bind the upstream socket");
    upstream_socket.connect(upstream).expect("connect upstream");
    // The client of each ID in flight: its address and port.
    let clients: Arc<Vec<AtomicU64>> =
        Arc::new((0..=u16::MAX).map(|_| AtomicU64::new(0)).collect());

    let (listener_fd, upstream_fd) = (listener.as_raw_fd(), upstream_socket.as_raw_fd());
    let answers = {
        let clients = Arc::clone(&clients);
        std::thread::spawn(move || {
            let mut batch = Batch::new();
            loop {
                let count = batch.receive(upstream_fd).expect("recvmmsg upstream");
                for i in 0..count {
                    let client = clients[batch.id(i)].load(Ordering::Relaxed);
                    unpack(client, &mut batch.addresses[i]);
                }
                batch.send(listener_fd, count, false);
            }
        })
    };
    let mut batch = Batch::new();
    loop {
        let count = batch.receive(listener_fd).expect("recvmmsg listener");
        for i in 0..count {
            clients[batch.id(i)].store(pack(&batch.addresses[i]), Ordering::Relaxed);
        }
        batch.send(upstream_fd, count, true);
        if answers.is_finished() {
            break;
        }
    }
    drop((listener, upstream_socket));
}
