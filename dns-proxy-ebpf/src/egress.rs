//! The send guard's last line, on every packet a socket of the cgroup sends
//! (`cgroup_skb/egress`): only the proxy's sockets send from a block address on its port.
//!
//! The `sock_addr` guards see a socket at `bind`, `connect` and `sendmsg`, and a socket set
//! up while no agent ran passes none of them afterwards: one bound to the block then and
//! connected to a client sends with a plain `send`, and one that queued the start of a
//! datagram then (`MSG_MORE`, `UDP_CORK`) sends the rest, with the source and destination it
//! chose then, without any hook. Aborting such sockets at start ([`block_binders`] in the
//! daemon) leaves a corked datagram queued, and a socket dump can be made to skip one. The
//! packet itself cannot hide its source: a packet from a block address on the proxy's port is
//! dropped here unless an agent's socket (or an excluded cgroup's) sent it.
//!
//! It also drops what a raw socket of the cgroup sends to a block address (but ICMP): a raw
//! datagram passes no `sock_addr` hook, so nothing checks that the block address it uses is
//! its own workload's, and the agent charges the workload the address belongs to. Pods have
//! `CAP_NET_RAW` by default: one sent raw queries from its own address to a neighbour's block
//! address and used up the neighbour's in-flight share (80 % of its lookups lost; five such
//! senders defeated the per-source places too). A packet socket (`AF_PACKET`) builds its own
//! frames and passes no cgroup hook at all: that stays open (docs/security.md).
//!
//! Cheap for everything else: a packet of a socket that is not raw and not on the proxy's port
//! is let through after a look at the socket's type and port. Every raw socket is looked at,
//! whatever its protocol: with `IP_HDRINCL` (`IPV6_HDRINCL`) one of any protocol, 0 included,
//! writes the whole header, a UDP one too.
use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{
        bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_ns, bpf_sk_fullsock,
        bpf_skb_ancestor_cgroup_id, bpf_skb_cgroup_id,
    },
    programs::SkBuffContext,
};
use dns_proxy_common::{Counter, Origin, REFUSED_WITHOUT_AGENT_FOR_NS, server_key};

use crate::{
    ALIVE_AT, CONNECTED, SERVERS,
    block::{charge, index_in_block4, index_in_block6, share_left},
    config,
    context::full_sock_peer,
    count,
    scope::{an_agent_serves, an_older_agent_runs, is_excluded_cgroup},
    sock::{block_peer_index, note_connected},
};

/// `cgroup_skb` verdicts.
const PASS: i32 = 1;
const DROP: i32 = 0;
/// `ETH_P_IP` and `ETH_P_IPV6`, as `__sk_buff.protocol` holds them (network order).
const PROTOCOL_IPV4: u32 = 0x0800u16.to_be() as u32;
const PROTOCOL_IPV6: u32 = 0x86ddu16.to_be() as u32;
/// Where the source address sits in the IPv4 and IPv6 headers (the program sees the packet
/// from its network header on).
const IPV4_SOURCE: usize = 12;
const IPV6_SOURCE: usize = 8;
/// Where the destination address, and the protocol (IPv6: the next header), sit.
const IPV4_DESTINATION: usize = 16;
const IPV6_DESTINATION: usize = 24;
const IPV4_PROTOCOL: usize = 9;
const IPV6_NEXT_HEADER: usize = 6;
/// Socket types, from the kernel's net.h.
const SOCK_STREAM: u32 = 1;
const SOCK_DGRAM: u32 = 2;
const SOCK_RAW: u32 = 3;
/// The protocols of ICMP and ICMPv6, which a raw socket may send to the block (`ping`).
const IPPROTO_ICMP: u8 = 1;
const IPPROTO_ICMPV6: u8 = 58;
/// The only datagram protocol the guard judges (uapi `in.h`).
const IPPROTO_UDP: u32 = 17;

/// Whether the kernel tells a `cgroup_skb` program the packet's network namespace
/// (`bpf_get_netns_cookie`, Linux 6.18): the guard's type parameter, so that the program for
/// older kernels holds no call to the helper at all. Where it is not told, the guard applies in
/// every namespace, in host mode too: a container of the cgroup that sends from its own
/// block address on the proxy's port, or raw to one, is dropped as well (the agent warns).
pub const NETNS_TOLD: bool = true;
pub const NETNS_UNTOLD: bool = false;

/// Drops a packet sent from a block address by any socket but an agent's (or an excluded
/// cgroup's, which the guards leave alone), counted as an impersonation: by a UDP socket on
/// any port (a socket still connected to a block address on a port the proxy served before
/// a change of port would take it for its server's answer), by a TCP socket on the proxy's.
/// Raw sockets are not judged by their source: the kernel's own (ICMP errors, echo replies,
/// TCP resets, sent from the address a packet was refused at) are raw, and live in the
/// cgroup a deployment redirects when that is the root.
pub fn guard_egress<const NETNS: bool>(ctx: &SkBuffContext) -> i32 {
    let sock_type = socket_type(ctx);
    if sock_type == Some(SOCK_RAW) && raw_to_the_block::<NETNS>(ctx) {
        count(Counter::RawRefused);
        return DROP;
    }
    let config = config();
    let guarded = match sock_type {
        Some(SOCK_DGRAM) => {
            if judge_connected_udp::<NETNS>(ctx) {
                return DROP;
            }
            true
        }
        Some(SOCK_STREAM) => {
            let port = ctx.skb.local_port();
            port == u32::from(u16::from_be(config.port4))
                || port == u32::from(u16::from_be(config.port6))
        }
        _ => false,
    };
    if !guarded {
        return PASS;
    }
    let protocol = ctx.skb.protocol();
    let from_block = if protocol == PROTOCOL_IPV4 && config.capacity4 != 0 {
        ctx.load::<u32>(IPV4_SOURCE)
            .is_ok_and(|source| index_in_block4(&config, source).is_some())
    } else if protocol == PROTOCOL_IPV6 && config.capacity6 != 0 {
        ctx.load::<[u32; 4]>(IPV6_SOURCE)
            .is_ok_and(|source| index_in_block6(&config, source).is_some())
    } else {
        false
    };
    if !from_block || !guarded_here::<NETNS>(ctx) || sent_by_an_exempt_socket(ctx) {
        return PASS;
    }
    count(Counter::ImpersonationRefused);
    DROP
}

/// Looks at a UDP socket connected to a block address on the proxy's port: while an agent of
/// this table serves there, holds its index if it names no server ([`hold_stale_index`]);
/// while none does, says whether to refuse the datagram ([`unserved`]) and leaves the table
/// alone: a program whose agent is gone (pinned, in node mode) would take indexes of a live
/// agent's table on the same block for stale, and hold them in its own. Cheap for the rest: a
/// socket that is not connected to the block costs two reads of its own fields. Not inlined:
/// a frame of its own, beside the guard's.
#[inline(never)]
fn judge_connected_udp<const NETNS: bool>(ctx: &SkBuffContext) -> bool {
    let config = config();
    // SAFETY: the context's own `__sk_buff`; its socket pointer is read as the verifier
    // allows (a `bpf_sock` that may be null), and used only through `bpf_sk_fullsock`.
    let sk = unsafe { (*ctx.skb.skb).__bindgen_anon_2.sk };
    if sk.is_null() {
        return false;
    }
    // SAFETY: a non-null socket of the packet, valid for the run.
    let sk = unsafe { bpf_sk_fullsock(sk) };
    if sk.is_null() {
        return false;
    }
    // SAFETY: non-null: a full socket the helper returned, valid for the run.
    let (family, addr, port) = unsafe { full_sock_peer(sk) };
    if port == 0 {
        return false;
    }
    let Some((family, index)) = block_peer_index(&config, family, addr, port) else {
        return false;
    };
    // Host mode leaves no guard pinned: an agent runs while this one does. The look at
    // `SERVING` cost 200 to 250 ns a datagram of a connected socket (`bpf_stats`, on a busy
    // machine), and is made in node mode only.
    if config.foreign_namespaces == 0 || an_agent_serves(&config, family) {
        hold_stale_index::<NETNS>(ctx, family, index);
        return false;
    }
    unserved(ctx, server_key(family, index))
}

/// Whether a datagram of a pod's UDP socket connected to the block (index `key`), sent while
/// no agent serves the block on this port in node mode, is refused. The pod connected
/// while an agent ran, and the socket sends there still: with no agent, the node answers port
/// unreachable, which the kernel rate-limits per pod address (a burst of 6, then one a
/// second), and the rest of its lookups waited out their timeout (helper-201: 14 of 50).
/// Refused here, the send fails at once (`EPERM`), every time. In host mode the block is on
/// loopback, whose port unreachable is not rate-limited: left to it.
///
/// This program is pinned in node mode, so that it outlives the agent. `SERVING` tells whether
/// any agent of this table serves this cgroup, so that a program whose agent is gone refuses
/// nothing a newer one would answer; an agent of a version before `SERVING` puts nothing
/// there, and is told by its record in `AGENTS` ([`an_older_agent_runs`], looked at last);
/// and only a socket this table connected is refused (its note in `CONNECTED`): an agent of
/// another table on the same cgroup and block (another `--state-dir`, another namespace)
/// serves its own, which this program must let be.
#[inline(never)]
fn unserved(ctx: &SkBuffContext, key: u32) -> bool {
    // Only so long after this program's agent last ran ([`REFUSED_WITHOUT_AGENT_FOR_NS`]).
    let Some(&alive_at) = ALIVE_AT.get(0) else {
        return false;
    };
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    if now.saturating_sub(alive_at) > REFUSED_WITHOUT_AGENT_FOR_NS {
        return false;
    }
    // SAFETY: the context's own `__sk_buff`, valid for the whole run.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb.cast()) };
    // SAFETY: `get` is unsafe because an element may change while held; it is only compared.
    let connected_here = unsafe { CONNECTED.get(cookie) }.is_some_and(|noted| *noted == key);
    connected_here && !sent_by_an_exempt_socket(ctx) && !an_older_agent_runs(&config())
}

/// Holds the index a UDP socket is connected to when it names no server (or is held so
/// already): the socket connected to it under a table of servers that is gone (the state
/// directory's bpffs lost between agents), and the agent would give the index to another
/// server, which the socket would then reach (helper-174: 1,181 answers from another server).
/// Held by a stale origin ([`Origin::stale`]), charged to the socket's cgroup as a slot of its
/// own, and by a note of the socket in `CONNECTED`, so that the agent frees it only once no
/// such socket is left; meanwhile `sk_lookup` refuses what is sent there, and the socket's
/// lookups fail fast (port unreachable) until it connects again.
///
/// Only sockets the programs would have sent there: of the agent's namespace in host mode
/// (another's 127.x is its own), and not an agent's or an excluded cgroup's. Where the kernel
/// does not tell a packet's namespace (before Linux 6.18), another namespace's socket of the
/// cgroup connected to its own address in the block's range takes an index too: charged to
/// its cgroup, within its share, as a server it asked would be. A socket connected to a live
/// index costs a lookup of the table.
#[inline(never)]
fn hold_stale_index<const NETNS: bool>(ctx: &SkBuffContext, family: u16, index: u32) {
    let key = server_key(family, index);
    // SAFETY: `get` is unsafe because an element may change while held; it is only tested.
    let held_stale = match unsafe { SERVERS.get(key) } {
        Some(origin) if !origin.is_stale() => return,
        Some(_) => true,
        None => false,
    };
    if !guarded_here::<NETNS>(ctx) || sent_by_an_exempt_socket(ctx) {
        return;
    }
    // SAFETY: the context's own `__sk_buff`, valid for the whole run.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb.cast()) };
    // SAFETY: as above.
    let cgroup_id = unsafe { bpf_skb_cgroup_id(ctx.skb.skb) };
    if held_stale {
        // Held for another socket already: this one holds it too, noted once.
        // SAFETY: as above; only tested.
        if unsafe { CONNECTED.get(cookie) }.is_none() {
            note_connected(cookie, cgroup_id, key);
        }
        return;
    }
    if !share_left(cgroup_id) {
        return;
    }
    let stale = Origin::stale(family, cgroup_id);
    if SERVERS.insert(key, stale, u64::from(BPF_NOEXIST)).is_err() {
        return; // taken a moment ago, by a connect or another CPU
    }
    charge(cgroup_id);
    note_connected(cookie, cgroup_id, key);
    count(Counter::StaleIndexHeld);
}

/// The type of the packet's full socket (`SOCK_STREAM`, `SOCK_DGRAM`, `SOCK_RAW`), if it has
/// one; `None` too for a datagram socket of another protocol than UDP (an ICMP "ping" socket,
/// UDP-Lite), which no client takes for a DNS answer: a ping socket bound to a block address
/// had its echo requests dropped (an adversarial review; ping's bind runs no `bind4`
/// program). Not inlined: a frame of its own, beside the guard's, for older verifiers' budget.
#[inline(never)]
fn socket_type(ctx: &SkBuffContext) -> Option<u32> {
    // SAFETY: the context's own `__sk_buff`; its socket pointer is read as the verifier
    // allows (a `bpf_sock` that may be null), and used only through `bpf_sk_fullsock`.
    let sk = unsafe { (*ctx.skb.skb).__bindgen_anon_2.sk };
    if sk.is_null() {
        return None;
    }
    // SAFETY: a non-null socket of the packet, valid for the run.
    let sk = unsafe { bpf_sk_fullsock(sk) };
    if sk.is_null() {
        return None;
    }
    // SAFETY: non-null: a full socket the helper returned, valid for the run.
    let (sock_type, protocol) = unsafe { ((*sk).type_, (*sk).protocol) };
    (sock_type != SOCK_DGRAM || protocol == IPPROTO_UDP).then_some(sock_type)
}

/// Whether the packet, a raw socket's, goes to a block address (anything but ICMP), in a
/// namespace the guard applies to, and not from an agent's or an excluded cgroup's socket.
#[inline(never)]
fn raw_to_the_block<const NETNS: bool>(ctx: &SkBuffContext) -> bool {
    let config = config();
    let protocol = ctx.skb.protocol();
    let to_block = if protocol == PROTOCOL_IPV4 && config.capacity4 != 0 {
        ctx.load::<u8>(IPV4_PROTOCOL)
            .is_ok_and(|next| next != IPPROTO_ICMP)
            && ctx
                .load::<u32>(IPV4_DESTINATION)
                .is_ok_and(|destination| index_in_block4(&config, destination).is_some())
    } else if protocol == PROTOCOL_IPV6 && config.capacity6 != 0 {
        ctx.load::<u8>(IPV6_NEXT_HEADER)
            .is_ok_and(|next| next != IPPROTO_ICMPV6)
            && ctx
                .load::<[u32; 4]>(IPV6_DESTINATION)
                .is_ok_and(|destination| index_in_block6(&config, destination).is_some())
    } else {
        false
    };
    to_block && guarded_here::<NETNS>(ctx) && !sent_by_an_exempt_socket(ctx)
}

/// Whether the guard applies to the packet's namespace: every one in node mode, only the
/// agent's in host mode (another namespace's 127.53.x.y is its own), every one where the
/// kernel does not tell.
fn guarded_here<const NETNS: bool>(ctx: &SkBuffContext) -> bool {
    let config = config();
    config.foreign_namespaces != 0
        || !NETNS
        // SAFETY: the context's own `__sk_buff`, valid for the whole run.
        || unsafe { bpf_get_netns_cookie(ctx.skb.skb.cast()) } == config.agent_netns
}

/// Whether the packet's socket belongs to an agent's cgroup or an excluded one (its cgroup is
/// the one it was made in, whoever sends on it now).
fn sent_by_an_exempt_socket(ctx: &SkBuffContext) -> bool {
    let skb = ctx.skb.skb;
    // SAFETY: the context's own `__sk_buff`, valid for the whole run.
    let cgroup_id = unsafe { bpf_skb_cgroup_id(skb) };
    // SAFETY: as above; the level is a plain integer (0 comes back for one deeper than the
    // socket's cgroup).
    is_excluded_cgroup(cgroup_id, |level| unsafe {
        bpf_skb_ancestor_cgroup_id(skb, level)
    })
}
