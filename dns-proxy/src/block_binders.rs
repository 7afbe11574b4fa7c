//! Sockets of the agent's namespace that were bound to a block address on the proxy's port
//! and connected to a client while no agent ran, when no bind guard refused it. What such a
//! socket sends is dropped by the egress guard once an agent runs, but while it stays
//! connected it takes what that client sends to the block (a connected socket comes before
//! `sk_lookup`): the client's queries, which would never reach the proxy (security.md,
//! claim 1). Once this agent's guards are attached, and before anything decodes, each is
//! aborted through `sock_diag` (`SOCK_DESTROY`, as `ss -K` does): it is disconnected with
//! `ECONNABORTED` and keeps its bind.
//!
//! The kernel finds a socket to abort by its addresses, walking every socket bound to the
//! same address and port, so thousands of twins cost seconds: past a deadline the sweep takes
//! on no more twins (the agent serves; the rest keep what they took, one client port each).
//! And a dump that someone closes sockets under may skip one where it comes in pieces: the
//! sweep dumps again until a dump small enough to come whole lists nothing new.
//!
//! Only the agent's own namespace: in node mode what a pod's socket takes is its own pod's
//! (the block is routed to the node), and what it sends from the block the egress guard
//! drops.
use std::{
    collections::{HashMap, HashSet},
    io::{self, Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Instant,
};

use socket2::{Domain, Protocol, Socket, Type};

use crate::{ebpf::Block, host::reply_error};

/// `linux/sock_diag.h`.
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
/// `struct nlmsghdr`.
const NLMSG_HEADER_LEN: usize = 16;
/// `struct inet_diag_sockid`: ports, source and destination, interface, cookie.
pub(crate) const SOCKID_LEN: usize = 48;
/// `struct inet_diag_req_v2`: family, protocol, extensions, padding, states, then the id.
const REQUEST_LEN: usize = 8 + SOCKID_LEN;
/// `linux/inet_diag.h`: the request's bytecode attribute, and its "local address in a prefix,
/// on a port" condition.
const INET_DIAG_REQ_BYTECODE: u16 = 1;
const INET_DIAG_BC_S_COND: u8 = 7;
/// `inet_diag_req_v2.idiag_states`: every state, and the one of a connected UDP socket.
const ALL_STATES: u32 = u32::MAX;
const TCP_ESTABLISHED: u32 = 1;
const UDP: u8 = libc::IPPROTO_UDP as u8;
/// `::ffff:0:0/96`.
const V4_MAPPED_PREFIX: [u8; 12] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff];
/// `struct inet_diag_msg` begins with family, state, timer, retransmits, then the id.
const MESSAGE_ID_OFFSET: usize = 4;

/// A UDP socket as `sock_diag` lists it: its family, local address and the id that names it
/// in a `SOCK_DESTROY`.
#[derive(Debug)]
struct Listed {
    family: u8,
    local: SocketAddr,
    peer: SocketAddr,
    id: [u8; SOCKID_LEN],
}

/// Aborts every UDP socket of this network namespace bound to an address of `block4` or
/// `block6` that encodes a server, on the block's port, and connected (one that is not takes
/// nothing from `sk_lookup`); dumps again until a dump lists none it has not seen. Past
/// `deadline` it takes on no more twins (groups of more than [`WHOLE_DUMP`] on the same
/// addresses). Needs `CAP_NET_ADMIN`.
///
/// The kernel finds the socket a `SOCK_DESTROY` names by its addresses and interface, and only
/// then checks the cookie: of several sockets on the same addresses (`SO_REUSEADDR`), it finds
/// the one connected last, of either family (a dual-stack socket on the v4-mapped address
/// included), whatever was listed. So for each socket listed, with its own family and
/// interface, the sweep asks which socket the kernel finds (a lookup of one, any cookie) and
/// aborts that one by its cookie, until the kernel finds none bound to the block and connected
/// to that peer (adversarial reviews defeated two simpler sweeps with such twins).
pub fn abort_block_binders(
    block4: Block,
    block6: Option<Block>,
    deadline: Instant,
) -> io::Result<Sweep> {
    let binds_block = |local: SocketAddr| {
        let in_block = |block: Block| {
            local.port() == block.port && block.addresses.index_of(local.ip()).is_some()
        };
        in_block(block4) || block6.is_some_and(in_block)
    };
    let mut diag = diag_socket()?;
    let same = |a: SocketAddr, b: SocketAddr| canonical(a) == canonical(b);
    // IPv4 sockets on the IPv4 block; IPv6 ones on it (v4-mapped) and on the IPv6 block.
    let mut queries = vec![
        (libc::AF_INET as u8, block4),
        (libc::AF_INET6 as u8, block4),
    ];
    queries.extend(block6.map(|block6| (libc::AF_INET6 as u8, block6)));
    let mut sweep = Sweep::default();
    let mut done = HashSet::new();
    loop {
        let mut connected = 0;
        let mut listed = Vec::new();
        for &(family, block) in &queries {
            let on_block = list_connected_udp(&mut diag, family, block)?;
            connected += on_block.len();
            listed.extend(
                on_block
                    .into_iter()
                    .filter(|socket| binds_block(socket.local) && !done.contains(&socket.cookie())),
            );
        }
        // A dump that someone closes sockets under may skip one, but only where its output
        // is cut in pieces: one of a few sockets comes whole, and then nothing is missed
        // (the kernel filters by the block, so no other socket adds to the output).
        if listed.is_empty() && connected <= WHOLE_DUMP {
            sweep.unconfirmed = false;
            return Ok(sweep);
        }
        // Stopped before a dump came whole: one may have been skipped, whatever was listed.
        sweep.unconfirmed = connected > WHOLE_DUMP;
        // Each lookup walks the sockets on the same addresses: the small groups cost a lookup
        // or a few each, and are all aborted, whatever the time (a dump alone may take longer
        // than the deadline: the kernel walks every socket on the port, another workload's
        // many unconnected ones included). Then a new dump, which may list what this one
        // skipped, before the twins, which take the most and come last, within the deadline.
        let mut groups: HashMap<(SocketAddr, SocketAddr), Vec<&Listed>> = HashMap::new();
        for socket in &listed {
            let key = (canonical(socket.local), canonical(socket.peer));
            groups.entry(key).or_default().push(socket);
        }
        let mut groups: Vec<_> = groups.into_values().collect();
        groups.sort_by_key(Vec::len);
        let small = groups
            .first()
            .is_some_and(|group| group.len() <= WHOLE_DUMP);
        if small {
            groups.retain(|group| group.len() <= WHOLE_DUMP);
        } else if Instant::now() >= deadline {
            sweep.left = listed.len();
            return Ok(sweep);
        }
        for (reached, socket) in groups.iter().flatten().enumerate() {
            if !small && Instant::now() >= deadline {
                sweep.left = listed.len() - reached;
                return Ok(sweep);
            }
            while !done.contains(&socket.cookie()) {
                let Some(found) = find_one(&mut diag, socket)? else {
                    break;
                };
                // Another socket, or one aborted before: the kernel finds no more of these.
                if !same(found.local, socket.local)
                    || !same(found.peer, socket.peer)
                    || !done.insert(found.cookie())
                {
                    break;
                }
                if destroy(&mut diag, &found)? {
                    sweep.aborted.push((found.local, found.peer));
                }
            }
            // Listed but not found (closed, or shielded by another twin): not listed again.
            done.insert(socket.cookie());
        }
    }
}

/// At most this many connected sockets on the block make a dump that comes in one piece
/// (about 100 bytes each, against the 4 KiB of a dump's first message).
pub const WHOLE_DUMP: usize = 16;

fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// What a sweep did.
#[derive(Debug, Default)]
pub struct Sweep {
    /// The local and peer addresses of each socket aborted.
    pub aborted: Vec<(SocketAddr, SocketAddr)>,
    /// Sockets listed but not reached by the deadline.
    pub left: usize,
    /// The deadline came before a dump could be trusted whole: one may have been skipped (and
    /// `left` may be short of what is there).
    pub unconfirmed: bool,
}

impl Listed {
    fn cookie(&self) -> [u8; 8] {
        let mut cookie = [0; 8];
        cookie.copy_from_slice(&self.id[SOCKID_LEN - 8..]);
        cookie
    }
}

pub(crate) fn diag_socket() -> io::Result<Socket> {
    Socket::new(
        Domain::from(libc::AF_NETLINK),
        Type::RAW.cloexec(),
        Some(Protocol::from(libc::NETLINK_SOCK_DIAG)),
    )
}

/// A `sock_diag` request of `kind` for `protocol`'s sockets of `family`, naming `id` (zeros:
/// any).
fn request(
    kind: u16,
    flags: u16,
    (family, protocol): (u8, u8),
    states: u32,
    id: &[u8; SOCKID_LEN],
) -> Vec<u8> {
    let len = (NLMSG_HEADER_LEN + REQUEST_LEN) as u32;
    let mut message = Vec::with_capacity(len as usize);
    message.extend_from_slice(&len.to_ne_bytes());
    message.extend_from_slice(&kind.to_ne_bytes());
    message.extend_from_slice(&flags.to_ne_bytes());
    message.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    message.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's
    message.extend_from_slice(&[family, protocol, 0, 0]);
    message.extend_from_slice(&states.to_ne_bytes());
    message.extend_from_slice(id);
    message
}

/// Every connected UDP socket of `family` in this namespace bound to an address of `block` on
/// its port (v4-mapped for an IPv6 socket on an IPv4 block). The kernel filters: a connected
/// UDP socket's state is `TCP_ESTABLISHED`, and a bytecode condition names the block.
fn list_connected_udp(socket: &mut Socket, family: u8, block: Block) -> io::Result<Vec<Listed>> {
    let mut id = [0; SOCKID_LEN];
    id[..2].copy_from_slice(&block.port.to_be_bytes());
    let mut listed = Vec::new();
    dump(
        socket,
        (family, UDP),
        1 << TCP_ESTABLISHED,
        &id,
        &source_in(block),
        |body| listed.extend(parse_listed(body)),
    )?;
    Ok(listed)
}

/// Dumps `protocol`'s sockets of `family` (and `id`'s port) in `states` that the inet_diag
/// bytecode `filter` matches, handing each `inet_diag_msg` to `each`.
pub(crate) fn dump(
    socket: &mut Socket,
    (family, protocol): (u8, u8),
    states: u32,
    id: &[u8; SOCKID_LEN],
    filter: &[u8],
    mut each: impl FnMut(&[u8]),
) -> io::Result<()> {
    let flags = (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16;
    let mut message = request(SOCK_DIAG_BY_FAMILY, flags, (family, protocol), states, id);
    // The attribute: length, type, then the bytecode (a multiple of 4 bytes).
    message.extend_from_slice(&((4 + filter.len()) as u16).to_ne_bytes());
    message.extend_from_slice(&INET_DIAG_REQ_BYTECODE.to_ne_bytes());
    message.extend_from_slice(filter);
    let len = message.len() as u32;
    message[..4].copy_from_slice(&len.to_ne_bytes());
    socket.write_all(&message)?;
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let received = socket.read(&mut buffer)?;
        let mut rest = &buffer[..received];
        while rest.len() >= NLMSG_HEADER_LEN {
            let len = u32::from_ne_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
            let kind = u16::from_ne_bytes([rest[4], rest[5]]);
            if len < NLMSG_HEADER_LEN || len > rest.len() {
                return Err(io::Error::other("a malformed sock_diag reply"));
            }
            match kind {
                k if k == libc::NLMSG_DONE as u16 => return Ok(()),
                k if k == libc::NLMSG_ERROR as u16 => {
                    return Err(io::Error::from_raw_os_error(-reply_error(&rest[..len])?));
                }
                _ => each(&rest[NLMSG_HEADER_LEN..len]),
            }
            rest = &rest[len.next_multiple_of(4).min(rest.len())..];
        }
    }
}

/// One `inet_diag_msg`: the socket it describes, if it is IPv4 or IPv6.
fn parse_listed(body: &[u8]) -> Option<Listed> {
    let id: [u8; SOCKID_LEN] = body
        .get(MESSAGE_ID_OFFSET..MESSAGE_ID_OFFSET + SOCKID_LEN)?
        .try_into()
        .ok()?;
    let family = body[0];
    let port = |at: usize| u16::from_be_bytes([id[at], id[at + 1]]);
    let address = |at: usize| -> Option<IpAddr> {
        match i32::from(family) {
            libc::AF_INET => {
                let octets: [u8; 4] = id[at..at + 4].try_into().ok()?;
                Some(IpAddr::V4(Ipv4Addr::from(octets)))
            }
            libc::AF_INET6 => {
                let octets: [u8; 16] = id[at..at + 16].try_into().ok()?;
                Some(IpAddr::V6(Ipv6Addr::from(octets)))
            }
            _ => None,
        }
    };
    Some(Listed {
        family,
        local: SocketAddr::new(address(4)?, port(0)),
        peer: SocketAddr::new(address(20)?, port(2)),
        id,
    })
}

/// `inet_diag` bytecode that matches a socket whose local address is in `block`, on its port:
/// one `INET_DIAG_BC_S_COND`, whose "yes" jumps to the end (a match) and whose "no" past it.
fn source_in(block: Block) -> Vec<u8> {
    let (family, address) = match block.addresses.first() {
        IpAddr::V4(v4) => (libc::AF_INET as u8, v4.octets().to_vec()),
        IpAddr::V6(v6) => (libc::AF_INET6 as u8, v6.octets().to_vec()),
    };
    // struct inet_diag_bc_op (code, yes, no), then struct inet_diag_hostcond (family,
    // prefix length, two bytes of padding, port as an int, the address).
    let length = 4 + 8 + address.len();
    let mut bytecode = vec![INET_DIAG_BC_S_COND, length as u8];
    bytecode.extend_from_slice(&((length + 4) as u16).to_ne_bytes());
    bytecode.extend_from_slice(&[family, block.addresses.prefix_len(), 0, 0]);
    bytecode.extend_from_slice(&i32::from(block.port).to_ne_bytes());
    bytecode.extend_from_slice(&address);
    bytecode
}

/// The socket the kernel finds for `pair`'s addresses, as it would for a datagram from its
/// peer: the one `SOCK_DESTROY` of those addresses reaches. `None` if there is none.
fn find_one(diag: &mut Socket, pair: &Listed) -> io::Result<Option<Listed>> {
    // A lookup of one names the datagram's source (the socket's peer) first, then its
    // destination, and takes any cookie.
    let mut id = [0u8; SOCKID_LEN];
    id[..2].copy_from_slice(&pair.id[2..4]);
    id[2..4].copy_from_slice(&pair.id[..2]);
    // A dual-stack socket on v4-mapped addresses is asked for as IPv4: `SOCK_DESTROY` looks
    // such a pair up as IPv4 too, and the IPv6 lookup may find another twin than it.
    let v4_mapped =
        |at: usize| pair.family == libc::AF_INET6 as u8 && pair.id[at..at + 12] == V4_MAPPED_PREFIX;
    let family = if v4_mapped(4) && v4_mapped(20) {
        id[4..8].copy_from_slice(&pair.id[32..36]);
        id[20..24].copy_from_slice(&pair.id[16..20]);
        libc::AF_INET as u8
    } else {
        id[4..20].copy_from_slice(&pair.id[20..36]);
        id[20..36].copy_from_slice(&pair.id[4..20]);
        pair.family
    };
    id[36..40].copy_from_slice(&pair.id[36..40]);
    id[40..].copy_from_slice(&[0xff; 8]); // INET_DIAG_NOCOOKIE
    let flags = libc::NLM_F_REQUEST as u16;
    diag.write_all(&request(
        SOCK_DIAG_BY_FAMILY,
        flags,
        (family, UDP),
        ALL_STATES,
        &id,
    ))?;
    let mut reply = vec![0u8; 4096];
    let received = diag.read(&mut reply)?;
    let reply = &reply[..received];
    if reply.len() < NLMSG_HEADER_LEN {
        return Err(io::Error::other("a short sock_diag reply"));
    }
    if u16::from_ne_bytes([reply[4], reply[5]]) == libc::NLMSG_ERROR as u16 {
        return match -reply_error(reply)? {
            libc::ENOENT => Ok(None),
            errno => Err(io::Error::from_raw_os_error(errno)),
        };
    }
    let len = u32::from_ne_bytes([reply[0], reply[1], reply[2], reply[3]]) as usize;
    Ok(parse_listed(
        reply.get(NLMSG_HEADER_LEN..len).unwrap_or_default(),
    ))
}

/// Aborts `socket` (`SOCK_DESTROY`, by its cookie): whether it did. One that closed
/// meanwhile, or that the kernel does not find first for its addresses, is not aborted.
fn destroy(diag: &mut Socket, socket: &Listed) -> io::Result<bool> {
    let flags = (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16;
    diag.write_all(&request(
        SOCK_DESTROY,
        flags,
        (socket.family, UDP),
        ALL_STATES,
        &socket.id,
    ))?;
    let mut reply = [0u8; 256];
    let received = diag.read(&mut reply)?;
    match -reply_error(&reply[..received])? {
        0 => Ok(true),
        libc::ENOENT => Ok(false),
        errno => Err(io::Error::from_raw_os_error(errno)),
    }
}
