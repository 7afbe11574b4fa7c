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
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsRawFd, BorrowedFd},
};

use socket2::{SockAddr, SockAddrStorage};

use super::wire::MAX_UDP_MESSAGE;

/// Datagrams per syscall at most. Enough to empty a busy socket's queue in a few calls.
pub const BATCH: usize = 32;

/// Where a datagram arrived: its destination address and the interface it came in on, from
/// `IP_PKTINFO` / `IPV6_PKTINFO` (set on the socket with [`receive_arrivals`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Arrival {
    pub destination: IpAddr,
    pub ifindex: u32,
}

/// The loopback device's index, in every network namespace: what arrives over it was sent
/// from this namespace.
pub const LOOPBACK_IFINDEX: u32 = 1;

/// Room for one `in6_pktinfo` control message (the larger of the two), 8-byte aligned.
const CONTROL_WORDS: usize = 8;

/// Buffers for receiving up to [`BATCH`] datagrams at once, each up to the largest UDP
/// message, so none is ever cut short. The 2 MiB come from fresh anonymous pages
/// ([`ZeroPages`]): only the pages datagrams are written to become resident.
pub struct ReceivedBatch {
    buffers: ZeroPages,
    lens: [usize; BATCH],
    peers: [Option<SocketAddr>; BATCH],
    arrivals: [Option<Arrival>; BATCH],
    count: usize,
}

impl Default for ReceivedBatch {
    fn default() -> Self {
        Self {
            buffers: ZeroPages::new(BATCH * MAX_UDP_MESSAGE),
            lens: [0; BATCH],
            peers: [None; BATCH],
            arrivals: [None; BATCH],
            count: 0,
        }
    }
}

/// Zeroed memory mapped from fresh anonymous pages, resident only where written.
///
/// A zeroed `Vec` of the same size is not that: once glibc has freed a large mapping it raises
/// its mmap threshold, serves the next large allocation from its heap and clears it, and every
/// page is resident at once. The chaos soak saw agent instances 2 and 4 MiB larger than the
/// rest (one or two of these batches, made resident) until they were mapped like this.
struct ZeroPages {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
}

// SAFETY: it owns its mapping, as a Box owns its allocation.
unsafe impl Send for ZeroPages {}
// SAFETY: shared access only reads, through `&[u8]`.
unsafe impl Sync for ZeroPages {}

impl ZeroPages {
    fn new(len: usize) -> Self {
        // SAFETY: a fresh private anonymous mapping; no existing memory is touched.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert!(
            ptr != libc::MAP_FAILED,
            "cannot map {len} bytes: {}",
            io::Error::last_os_error()
        );
        Self {
            ptr: std::ptr::NonNull::new(ptr.cast()).expect("mmap returns no null mapping"),
            len,
        }
    }
}

impl std::ops::Deref for ZeroPages {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        // SAFETY: `len` bytes mapped readable (zero until written), owned by `self`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for ZeroPages {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, and `&mut self` is the only access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for ZeroPages {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// Asks the kernel to say, with each datagram `socket` receives, where it arrived.
pub fn receive_arrivals(socket: BorrowedFd<'_>, ipv6: bool) -> io::Result<()> {
    let (level, option) = if ipv6 {
        (libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO)
    } else {
        (libc::IPPROTO_IP, libc::IP_PKTINFO)
    };
    set_flag(socket, level, option)
}

/// Lets `socket` send from an address no interface has (IPv6 block addresses are only
/// routed `local`, which `IPV6_PKTINFO` does not count as the host's own without this).
pub fn send_from_any_address(socket: BorrowedFd<'_>, ipv6: bool) -> io::Result<()> {
    if ipv6 {
        set_flag(socket, libc::IPPROTO_IPV6, IPV6_FREEBIND)
    } else {
        set_flag(socket, libc::IPPROTO_IP, libc::IP_FREEBIND)
    }
}

/// `IPV6_FREEBIND` (Linux 4.15), which the libc crate does not name.
const IPV6_FREEBIND: libc::c_int = 78;

fn set_flag(socket: BorrowedFd<'_>, level: libc::c_int, option: libc::c_int) -> io::Result<()> {
    set_int_option(socket, level, option, 1)
}

/// Sets a socket option whose value is an int (a flag, a size, a group number).
pub(crate) fn set_int_option(
    socket: BorrowedFd<'_>,
    level: libc::c_int,
    option: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: the kernel reads an int of the size given, a live local, for the open
    // descriptor `socket` borrows.
    let result = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            option,
            (&raw const value).cast(),
            mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if result != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Asks the kernel to queue the ICMP errors that come back for what `socket` sends (an
/// unconnected socket is told of none otherwise), to be read with [`receive_error`].
pub fn queue_errors(socket: BorrowedFd<'_>, ipv6: bool) -> io::Result<()> {
    if ipv6 {
        set_flag(socket, libc::IPPROTO_IPV6, libc::IPV6_RECVERR)
    } else {
        set_flag(socket, libc::IPPROTO_IP, libc::IP_RECVERR)
    }
}

/// An ICMP error that came back for a datagram the socket sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedError {
    /// Where the datagram went.
    pub destination: SocketAddr,
    /// What the error means to a socket: `ECONNREFUSED` (port unreachable),
    /// `EHOSTUNREACH`, `ENETUNREACH`...
    pub errno: i32,
    /// Whether it is one the kernel reports to a connected socket (a hard error: port
    /// unreachable, administratively prohibited...), not a soft one (net or host unreachable,
    /// time exceeded), which a connected socket never sees: its client retries then.
    pub hard: bool,
    /// The start of the datagram, as the ICMP message carried it back.
    pub datagram: Vec<u8>,
}

/// The next ICMP error queued on `socket` ([`queue_errors`]); `None` when none is left.
/// Errors of other origins (local ones) are passed over.
pub fn receive_error(socket: BorrowedFd<'_>) -> io::Result<Option<QueuedError>> {
    loop {
        let mut datagram = vec![0u8; 1280];
        let mut iov = libc::iovec {
            iov_base: datagram.as_mut_ptr().cast(),
            iov_len: datagram.len(),
        };
        // SAFETY: `sockaddr_storage` is plain integers, for which all zeros is a valid value.
        let mut name: libc::sockaddr_storage = unsafe { mem::zeroed() };
        let mut control = [0u64; 16];
        // SAFETY: `msghdr` is plain integers and pointers, for which all zeros is valid.
        let mut header: libc::msghdr = unsafe { mem::zeroed() };
        header.msg_name = (&raw mut name).cast();
        header.msg_namelen = mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        header.msg_iov = &raw mut iov;
        header.msg_iovlen = 1;
        header.msg_control = control.as_mut_ptr().cast();
        header.msg_controllen = mem::size_of_val(&control);
        // SAFETY: every buffer the header points at is alive and of the length given, and the
        // kernel writes within those lengths.
        let received = unsafe {
            libc::recvmsg(
                socket.as_raw_fd(),
                &raw mut header,
                libc::MSG_ERRQUEUE | libc::MSG_DONTWAIT,
            )
        };
        if received < 0 {
            let err = io::Error::last_os_error();
            return match err.kind() {
                io::ErrorKind::WouldBlock => Ok(None),
                _ => Err(err),
            };
        }
        datagram.truncate(received as usize);
        // SAFETY: the kernel wrote the destination's address, of the length it set.
        let destination = unsafe { socket_addr(&name, header.msg_namelen) };
        // SAFETY: `recvmsg` filled the header, its control buffer still alive.
        let error = unsafe { icmp_error(&header) };
        if let (Some(destination), Some(error)) = (destination, error) {
            return Ok(Some(QueuedError {
                destination,
                errno: error.ee_errno as i32,
                hard: is_hard(&error),
                datagram,
            }));
        }
    }
}

/// Whether an ICMP error is one the kernel gives a connected UDP socket (`icmp_err_convert`'s
/// and `icmpv6_err_convert`'s fatal ones): destination unreachable for a port, a protocol,
/// an unknown network or host, or by administrative prohibition.
fn is_hard(error: &libc::sock_extended_err) -> bool {
    match error.ee_origin {
        libc::SO_EE_ORIGIN_ICMP => {
            error.ee_type == 3 && matches!(error.ee_code, 2 | 3 | 6..=10 | 13..=15)
        }
        libc::SO_EE_ORIGIN_ICMP6 => error.ee_type == 1 && matches!(error.ee_code, 1 | 4..=6),
        _ => false,
    }
}

/// The ICMP error of a message of the error queue, from its `IP_RECVERR` or `IPV6_RECVERR`
/// control message (`struct sock_extended_err`); `None` for an error of another origin.
///
/// # Safety
/// `header` was filled in by `recvmsg`, its control buffer still alive.
unsafe fn icmp_error(header: &libc::msghdr) -> Option<libc::sock_extended_err> {
    // SAFETY: the CMSG macros walk the buffer the kernel filled, within its length.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(header) };
    while !cmsg.is_null() {
        // SAFETY: a non-null cmsg from the macros points at a whole header in the buffer.
        let (level, kind) = unsafe { ((*cmsg).cmsg_level, (*cmsg).cmsg_type) };
        let is_error = (level == libc::IPPROTO_IP && kind == libc::IP_RECVERR)
            || (level == libc::IPPROTO_IPV6 && kind == libc::IPV6_RECVERR);
        if is_error {
            // SAFETY: the data of such a message is a `sock_extended_err`, maybe unaligned.
            let error: libc::sock_extended_err =
                unsafe { std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast()) };
            let from_icmp = matches!(
                error.ee_origin,
                libc::SO_EE_ORIGIN_ICMP | libc::SO_EE_ORIGIN_ICMP6
            );
            return from_icmp.then_some(error);
        }
        // SAFETY: as above, within the buffer.
        cmsg = unsafe { libc::CMSG_NXTHDR(header, cmsg) };
    }
    None
}

impl ReceivedBatch {
    /// The datagrams of the last [`receive`](Self::receive), with their indexes and senders.
    /// A datagram whose sender's address is not IPv4 or IPv6 is left out.
    pub fn iter(&self) -> impl Iterator<Item = (usize, &[u8], SocketAddr)> {
        (0..self.count).filter_map(|i| Some((i, self.datagram(i), self.peers[i]?)))
    }

    /// Where datagram `index` of the last [`receive`](Self::receive) arrived, if the socket
    /// says ([`receive_arrivals`]).
    pub fn arrival(&self, index: usize) -> Option<Arrival> {
        assert!(index < self.count);
        self.arrivals[index]
    }

    /// Datagram `index` of the last [`receive`](Self::receive).
    pub fn datagram(&self, index: usize) -> &[u8] {
        assert!(index < self.count);
        let start = index * MAX_UDP_MESSAGE;
        &self.buffers[start..start + self.lens[index]]
    }

    /// Writes `id` as datagram `index`'s message ID: its first two bytes, which it has (it
    /// parsed as a DNS message).
    pub fn set_message_id(&mut self, index: usize, id: u16) {
        assert!(index < self.count && self.lens[index] >= 2);
        let start = index * MAX_UDP_MESSAGE;
        self.buffers[start..start + 2].copy_from_slice(&id.to_be_bytes());
    }

    /// Receives what is queued on `socket` (non-blocking), up to [`BATCH`] datagrams, with
    /// one `recvmmsg`. Returns how many; `WouldBlock` if none was queued.
    ///
    /// `peer`: the socket is connected to it. The kernel delivers such a socket nothing but
    /// `peer`'s datagrams, so their sender is not asked for, which spares the kernel's cgroup
    /// `recvmsg` hook and the socket lock it takes.
    pub fn receive(
        &mut self,
        socket: BorrowedFd<'_>,
        peer: Option<SocketAddr>,
    ) -> io::Result<usize> {
        self.count = 0;
        // Zeroed, so that reading a whole one is sound whatever length the kernel wrote.
        // SAFETY: `sockaddr_storage` is plain integers, for which all zeros is a valid value.
        let mut names: [libc::sockaddr_storage; BATCH] = unsafe { mem::zeroed() };
        // SAFETY: `iovec` is a pointer and a length: all zeros is a null pointer and 0.
        let mut iovecs: [libc::iovec; BATCH] = unsafe { mem::zeroed() };
        // SAFETY: `mmsghdr` is integers and raw pointers, all zeros null; each is set below.
        let mut headers: [libc::mmsghdr; BATCH] = unsafe { mem::zeroed() };
        let mut controls = [[0u64; CONTROL_WORDS]; BATCH];
        for (i, chunk) in self.buffers.chunks_exact_mut(MAX_UDP_MESSAGE).enumerate() {
            iovecs[i] = libc::iovec {
                iov_base: chunk.as_mut_ptr().cast(),
                iov_len: chunk.len(),
            };
            let header = &mut headers[i].msg_hdr;
            if peer.is_none() {
                header.msg_name = (&raw mut names[i]).cast();
                header.msg_namelen = mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            }
            header.msg_iov = &mut iovecs[i];
            header.msg_iovlen = 1;
            header.msg_control = controls[i].as_mut_ptr().cast();
            header.msg_controllen = mem::size_of_val(&controls[i]);
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
            self.peers[i] = match peer {
                Some(peer) => Some(peer),
                // SAFETY: the kernel wrote `namelen` bytes of a socket address into `names[i]`.
                None => unsafe { socket_addr(&names[i], namelen) },
            };
            // SAFETY: the header's control buffer is `controls[i]`, filled in by the kernel
            // up to the length it set.
            self.arrivals[i] = unsafe { arrival(&headers[i].msg_hdr) };
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

/// Where a received message says it arrived, from its `IP_PKTINFO` or `IPV6_PKTINFO`
/// control message.
///
/// # Safety
/// `header` was filled in by `recvmsg`/`recvmmsg`, its control buffer still alive.
unsafe fn arrival(header: &libc::msghdr) -> Option<Arrival> {
    // SAFETY: the CMSG macros walk the buffer the kernel filled, within its length.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(header) };
    while !cmsg.is_null() {
        // SAFETY: a non-null cmsg from the macros points at a whole header in the buffer.
        let (level, kind) = unsafe { ((*cmsg).cmsg_level, (*cmsg).cmsg_type) };
        // SAFETY: the data of a control message of this level and type is that struct; it
        // may be unaligned in the buffer, so it is read unaligned.
        unsafe {
            if level == libc::IPPROTO_IP && kind == libc::IP_PKTINFO {
                let info: libc::in_pktinfo = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast());
                return Some(Arrival {
                    destination: IpAddr::V4(Ipv4Addr::from(info.ipi_addr.s_addr.to_ne_bytes())),
                    ifindex: info.ipi_ifindex as u32,
                });
            }
            if level == libc::IPPROTO_IPV6 && kind == libc::IPV6_PKTINFO {
                let info: libc::in6_pktinfo =
                    std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast());
                return Some(Arrival {
                    destination: IpAddr::V6(Ipv6Addr::from(info.ipi6_addr.s6_addr)),
                    ifindex: info.ipi6_ifindex,
                });
            }
            cmsg = libc::CMSG_NXTHDR(header, cmsg);
        }
    }
    None
}

/// What a datagram to send is: its bytes, where it goes (`None`: the socket's connected
/// peer), and (for an answer) the address it must come from, which is the one its query was
/// sent to.
pub struct Outgoing<'a> {
    pub datagram: &'a [u8],
    pub to: Option<SocketAddr>,
    pub from: Option<IpAddr>,
}

/// Sends datagrams `0..count` (each, from `datagram(i)`, to its address) on `socket` with as
/// few `sendmmsg` calls as the kernel takes, in order. A datagram the kernel refuses is skipped and reported to
/// `failed` with its index and the error; the rest still go. Returns how many were sent.
pub fn send_all<'a>(
    socket: BorrowedFd<'_>,
    count: usize,
    datagram: impl Fn(usize) -> Outgoing<'a>,
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
    datagram: impl Fn(usize) -> Outgoing<'a>,
) -> io::Result<usize> {
    let count = indexes.len();
    debug_assert!(count > 0 && count <= BATCH);
    // Only the first `count` are made: a lone datagram pays for one address, not BATCH.
    let mut names: [MaybeUninit<SockAddr>; BATCH] = [const { MaybeUninit::uninit() }; BATCH];
    // SAFETY: `iovec` is a pointer and a length: all zeros is a null pointer and 0.
    let mut iovecs: [libc::iovec; BATCH] = unsafe { mem::zeroed() };
    // SAFETY: `mmsghdr` is integers and raw pointers, all zeros null; only the first `count`
    // are set and sent.
    let mut headers: [libc::mmsghdr; BATCH] = unsafe { mem::zeroed() };
    let mut controls = [[0u64; CONTROL_WORDS]; BATCH];
    for i in 0..count {
        let Outgoing { datagram, to, from } = datagram(indexes.start + i);
        iovecs[i] = libc::iovec {
            // The kernel only reads it.
            iov_base: datagram.as_ptr().cast_mut().cast(),
            iov_len: datagram.len(),
        };
        let header = &mut headers[i].msg_hdr;
        // Without an address (left null), to the connected peer.
        if let Some(to) = to {
            let name = names[i].write(to.into());
            header.msg_name = name.as_ptr().cast_mut().cast();
            header.msg_namelen = name.len();
        }
        header.msg_iov = &mut iovecs[i];
        header.msg_iovlen = 1;
        if let Some(from) = from {
            // SAFETY: `controls` lives until after the `sendmmsg` below, the send of `header`.
            unsafe { set_source(header, &mut controls[i], from) };
        }
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

/// Makes the message come from `from`, with an `IP_PKTINFO` or `IPV6_PKTINFO` control
/// message in `control`.
///
/// # Safety
/// `control` outlives the send of `header`.
unsafe fn set_source(header: &mut libc::msghdr, control: &mut [u64; CONTROL_WORDS], from: IpAddr) {
    header.msg_control = control.as_mut_ptr().cast();
    let (level, kind, len) = match from {
        IpAddr::V4(_) => (
            libc::IPPROTO_IP,
            libc::IP_PKTINFO,
            mem::size_of::<libc::in_pktinfo>(),
        ),
        IpAddr::V6(_) => (
            libc::IPPROTO_IPV6,
            libc::IPV6_PKTINFO,
            mem::size_of::<libc::in6_pktinfo>(),
        ),
    };
    // SAFETY: CMSG_SPACE only computes a length from an integer.
    header.msg_controllen = unsafe { libc::CMSG_SPACE(len as u32) } as usize;
    debug_assert!(header.msg_controllen <= mem::size_of_val(control));
    // SAFETY: `control` is live and holds CMSG_SPACE(len) bytes (the assertion above), and
    // `header` points at it with that length, so CMSG_FIRSTHDR gives a header inside it and
    // the header and its data fit; the data is written unaligned.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(header);
        (*cmsg).cmsg_level = level;
        (*cmsg).cmsg_type = kind;
        (*cmsg).cmsg_len = libc::CMSG_LEN(len as u32) as usize;
        let data = libc::CMSG_DATA(cmsg);
        match from {
            IpAddr::V4(v4) => std::ptr::write_unaligned(
                data.cast(),
                libc::in_pktinfo {
                    ipi_ifindex: 0,
                    ipi_spec_dst: libc::in_addr {
                        s_addr: u32::from_ne_bytes(v4.octets()),
                    },
                    ipi_addr: libc::in_addr { s_addr: 0 },
                },
            ),
            IpAddr::V6(v6) => std::ptr::write_unaligned(
                data.cast(),
                libc::in6_pktinfo {
                    ipi6_addr: libc::in6_addr {
                        s6_addr: v6.octets(),
                    },
                    ipi6_ifindex: 0,
                },
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use tokio::net::UdpSocket;

    use super::*;

    fn outgoing((datagram, to): (&[u8], SocketAddr)) -> Outgoing<'_> {
        Outgoing {
            datagram,
            to: Some(to),
            from: None,
        }
    }

    /// Receives into `batch` once `socket` has a datagram (loopback usually delivers within the
    /// send, but not when the kernel leaves its network work to `ksoftirqd` on a busy CPU);
    /// how many it took.
    async fn receive_when_readable(socket: &UdpSocket, batch: &mut ReceivedBatch) -> usize {
        let wait = std::time::Duration::from_secs(1);
        tokio::time::timeout(wait, async {
            loop {
                socket.readable().await.unwrap();
                match socket.try_io(tokio::io::Interest::READABLE, || {
                    batch.receive(socket.as_fd(), None)
                }) {
                    Ok(count) => return count,
                    Err(err) if err.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(err) => panic!("{err}"),
                }
            }
        })
        .await
        .expect("a datagram within a second")
    }

    /// Every datagram `socket` receives until it has `count`.
    async fn receive_count(socket: &UdpSocket, count: usize) -> Vec<(Vec<u8>, SocketAddr)> {
        let mut batch = ReceivedBatch::default();
        let mut got = Vec::new();
        while got.len() < count {
            receive_when_readable(socket, &mut batch).await;
            got.extend(batch.iter().map(|(_, d, from)| (d.to_vec(), from)));
        }
        got
    }

    /// What a block address does: a client connected to 127.53.0.9 reaches a socket bound to
    /// 127.0.0.1 only through sk_lookup, so here the receiver is bound to the wildcard; its
    /// answer must come from 127.53.0.9 for the connected client to take it.
    #[tokio::test]
    async fn arrivals_are_reported_and_answers_leave_from_the_address_asked() {
        let receiver = UdpSocket::bind("0.0.0.0:0").await.unwrap();
        receive_arrivals(receiver.as_fd(), false).unwrap();
        let port = receiver.local_addr().unwrap().port();
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let asked: SocketAddr = format!("127.53.0.9:{port}").parse().unwrap();
        client.connect(asked).await.unwrap();
        client.send(b"query").await.unwrap();
        let mut batch = ReceivedBatch::default();
        assert_eq!(receive_when_readable(&receiver, &mut batch).await, 1);
        let (_, datagram, from) = batch.iter().next().unwrap();
        assert_eq!(
            (datagram, from),
            (&b"query"[..], client.local_addr().unwrap())
        );
        let arrival = batch.arrival(0).unwrap();
        assert_eq!(arrival.destination, asked.ip());
        assert_eq!(arrival.ifindex, LOOPBACK_IFINDEX);
        let sent = send_all(
            receiver.as_fd(),
            1,
            |_| Outgoing {
                datagram: b"answer",
                to: Some(from),
                from: Some(arrival.destination),
            },
            |_, err| panic!("{err}"),
        );
        assert_eq!(sent, 1);
        let mut buf = [0u8; 16];
        let len = tokio::time::timeout(std::time::Duration::from_secs(1), client.recv(&mut buf))
            .await
            .expect("the connected client takes the answer")
            .unwrap();
        assert_eq!(&buf[..len], b"answer");
    }

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
            |i| outgoing(datagrams[i]),
            |i, err| panic!("{i}: {err}"),
        );
        assert_eq!(sent, BATCH + 5);

        // The even ones to `receiver`, the odd ones to `other`.
        let evens = (BATCH + 5).div_ceil(2);
        let mut got = receive_count(&receiver, evens).await;
        got.extend(receive_count(&other, BATCH + 5 - evens).await);
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
            |i| outgoing(datagrams[i]),
            |i, err| failures.push((i, err.raw_os_error())),
        );
        assert_eq!(sent, 2);
        assert_eq!(failures, vec![(1, Some(libc::EMSGSIZE))]);
        let got: Vec<Vec<u8>> = receive_count(&receiver, 2)
            .await
            .into_iter()
            .map(|(d, _)| d)
            .collect();
        assert_eq!(got, vec![b"one".to_vec(), b"three".to_vec()]);
    }
}
