//! Sockets that choose the interface they send through (`IP_UNICAST_IF`, `IPV6_UNICAST_IF`:
//! systemd-resolved for a link's own servers; or the sticky `IPV6_PKTINFO`, whose interface
//! index holds for every datagram the socket sends). Routed out of that interface, a socket sent to
//! the proxy's addresses (local, on `lo`) never reaches them and loses every lookup, so the
//! redirect leaves such a socket alone, as one bound to a device (`scope::leave_alone`).
//!
//! No `sock_addr` hook can read the option, so `cgroup/setsockopt` notes it when it is set, in
//! the socket's own storage (`UNICAST_IF`), which the kernel frees with the socket. A socket
//! that set it before the agent's programs were attached is not seen, nor one set by a 32-bit
//! program: the kernel runs no setsockopt program for a compat syscall.
use core::ptr;

use aya_ebpf::{
    bindings::BPF_SK_STORAGE_GET_F_CREATE,
    helpers::generated::bpf_sk_storage_get,
    programs::{SockAddrContext, SockoptContext},
};

use dns_proxy_common::AF_INET6;

use crate::{
    ALLOW, UNICAST_IF,
    context::{
        ctx_sockopt_option, ctx_sockopt_sk, ctx_sockopt_u32_at, ctx_sockopt_use_callers_value,
    },
};

/// A UDP socket's type and protocol (the kernel's `net.h`, `in.h`).
const SOCK_DGRAM: u32 = 2;
const IPPROTO_UDP: u32 = 17;

/// `SOL_IP`, `SOL_IPV6` and the options, from the kernel's `in.h` and `in6.h`.
const SOL_IP: i32 = 0;
const SOL_IPV6: i32 = 41;
const IP_UNICAST_IF: i32 = 50;
const IPV6_UNICAST_IF: i32 = 76;
const IPV6_PKTINFO: i32 = 50;

/// Where each option's choice is kept in the socket's storage: the kernel heeds either, so a
/// socket that clears one keeps the other's.
const BY_UNICAST_IF: usize = 0;
const BY_STICKY_PKTINFO: usize = 1;
/// The size of `struct in6_pktinfo` (an address, then the interface index, in host order).
const IN6_PKTINFO_LEN: i32 = 20;

/// The most of an option's value the kernel shows a program (a page).
const SHOWN_AT_MOST: i32 = 4096;

/// cgroup/setsockopt: notes the interface a socket chooses to send through. Never changes or
/// refuses the call, nor what a program of a cgroup below (which ran first) made of it: the
/// length is left as it is, but for a value longer than the page the kernel showed, which is
/// then set from the caller's own buffer (as the kernel would, without logging that it did).
pub fn note_unicast_if(ctx: &SockoptContext) -> i32 {
    let (level, name, len) = ctx_sockopt_option(ctx);
    let unicast_if = (level == SOL_IP && name == IP_UNICAST_IF)
        || (level == SOL_IPV6 && name == IPV6_UNICAST_IF);
    // The kernel takes nothing but 4 bytes for either, the index in network order.
    if unicast_if
        && len == 4
        && let Some(raw) = ctx_sockopt_u32_at::<0>(ctx)
    {
        note(ctx, BY_UNICAST_IF, u32::from_be(raw));
    }
    // The kernel takes at least a whole `in6_pktinfo` (an adversary's sticky option lost every
    // IPv6 lookup: the interface it chose cannot reach the proxy's addresses), and heeds it
    // only for an IPv6 UDP socket's datagrams (not TCP's; an IPv4 socket refuses it).
    if level == SOL_IPV6
        && name == IPV6_PKTINFO
        && len >= IN6_PKTINFO_LEN
        && is_ipv6_udp(ctx)
        && let Some(ifindex) = ctx_sockopt_u32_at::<16>(ctx)
    {
        note(ctx, BY_STICKY_PKTINFO, ifindex);
    }
    if len > SHOWN_AT_MOST {
        ctx_sockopt_use_callers_value(ctx);
    }
    ALLOW
}

/// Whether the socket of a `cgroup/setsockopt` call is an IPv6 UDP one.
fn is_ipv6_udp(ctx: &SockoptContext) -> bool {
    let sk = ctx_sockopt_sk(ctx);
    // SAFETY: the call's own socket, never null in setsockopt; `family`, `type` and
    // `protocol` are readable.
    let (family, sock_type, protocol) = unsafe { ((*sk).family, (*sk).type_, (*sk).protocol) };
    family == u32::from(AF_INET6) && sock_type == SOCK_DGRAM && protocol == IPPROTO_UDP
}

/// Stores `ifindex` as the socket's choice by option `by`: storage is made only for a choice
/// other than none (0) or loopback (1), and updated whatever it is once made (a socket may
/// choose again).
fn note(ctx: &SockoptContext, by: usize, ifindex: u32) {
    let map = ptr::from_ref(&UNICAST_IF).cast_mut().cast();
    let sk = ctx_sockopt_sk(ctx).cast();
    // SAFETY: the map is the program's own, `sk` the socket of the call (a full socket there),
    // and a null value with no flags only looks the storage up.
    let stored = unsafe { bpf_sk_storage_get(map, sk, ptr::null_mut(), 0) }.cast::<[u32; 2]>();
    if !stored.is_null() {
        // SAFETY: non-null, the socket's own storage of this map, two u32s; nothing else
        // holds it while the socket's option is being set.
        if let Some(slot) = unsafe { (*stored).get_mut(by) } {
            *slot = ifindex;
        }
        return;
    }
    if ifindex > crate::scope::LOOPBACK_IFINDEX {
        let mut value = [0u32; 2];
        if let Some(slot) = value.get_mut(by) {
            *slot = ifindex;
        }
        // SAFETY: as above; `value` is a live [u32; 2] the helper copies into new storage.
        unsafe {
            bpf_sk_storage_get(
                map,
                sk,
                ptr::from_mut(&mut value).cast(),
                u64::from(BPF_SK_STORAGE_GET_F_CREATE),
            )
        };
    }
}

/// The interface the socket behind `ctx` chose to send through to `server`, by index: 0 if
/// none was seen. Of two choices the larger is returned (what matters is whether either is a
/// device other than loopback); the sticky `IPV6_PKTINFO`'s only toward an IPv6 server, as
/// the kernel heeds it (not for a dual-stack socket's IPv4 datagrams).
#[inline(never)]
pub fn chosen_interface(ctx: &SockAddrContext, server_family: u16) -> u32 {
    // SAFETY: looks up the socket's storage of the program's own map; the helper takes the
    // context's socket, valid for the run.
    let stored = unsafe { UNICAST_IF.get_ptr_mut(ctx) };
    if stored.is_null() {
        return 0;
    }
    // SAFETY: non-null: the socket's storage of this map, two u32s.
    let [by_unicast_if, by_sticky_pktinfo] = unsafe { *stored };
    if server_family == AF_INET6 {
        by_unicast_if.max(by_sticky_pktinfo)
    } else {
        by_unicast_if
    }
}
