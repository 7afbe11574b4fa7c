//! dns-proxy's kernel side: cgroup programs that send a workload's DNS to the local proxy and
//! make the answers look as if they came from the server the workload asked.
//!
//! - `connect4/6` (UDP and TCP) and `sendmsg4/6` (UDP) rewrite a destination `addr:53` to the
//!   proxy and remember the original destination per socket (`SOCKETS`, by socket cookie).
//! - `cgroup_skb/egress` sees each redirected packet with its final source address and port and
//!   records "this client flow was headed for that server" (`FLOWS`), which is what the proxy
//!   looks up when a datagram or connection arrives.
//! - `recvmsg4/6` and `getpeername4/6` show the original server instead of the proxy.
//! - `sock_release` forgets both records when the socket closes.
//!
//! Every program fails open: whatever goes wrong, the call is allowed unchanged.
#![no_std]
#![no_main]

mod packet;

use aya_ebpf::{
    bindings::{BPF_F_NO_PREALLOC, bpf_sock_addr},
    helpers::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_socket_cookie,
    },
    macros::{cgroup_skb, cgroup_sock, cgroup_sock_addr, map},
    maps::{HashMap, LruHashMap, PerCpuArray},
    programs::{SkBuffContext, SockAddrContext, SockContext},
};
use aya_log_ebpf::warn;
use dns_proxy_common::{
    AF_INET, Counter, DNS_PORT, EXCLUDED_SUBTREE, Endpoint, FlowKey, IPPROTO_TCP, IPPROTO_UDP,
    MAX_EXCLUDED_CGROUPS, MAX_EXCLUDED_LEVEL, MAX_TRACKED_SOCKETS, RedirectTarget, SocketRecord,
    v4_mapped_prefix,
};

use crate::packet::Flow;

/// The verdict that lets a call or packet through. These programs never return anything else.
const ALLOW: i32 = 1;

/// `SOCK_STREAM` and `SOCK_DGRAM` from the kernel's net.h.
const SOCK_STREAM: u32 = 1;
const SOCK_DGRAM: u32 = 2;

/// The proxy's listeners, written by the loader before load (`names::REDIRECT_TARGET`).
#[unsafe(no_mangle)]
static REDIRECT_TARGET: RedirectTarget = RedirectTarget {
    ipv4: 0,
    port: 0,
    port6: 0,
    ipv6: [0; 4],
};

/// Levels of the cgroup hierarchy that hold an excluded subtree, one bit each; written by the
/// loader before load (`names::EXCLUDED_LEVELS`).
#[unsafe(no_mangle)]
static EXCLUDED_LEVELS: u64 = 0;

#[map(name = "SOCKETS")]
static SOCKETS: LruHashMap<u64, SocketRecord> =
    LruHashMap::with_max_entries(MAX_TRACKED_SOCKETS, 0);

#[map(name = "FLOWS")]
static FLOWS: LruHashMap<FlowKey, Endpoint> = LruHashMap::with_max_entries(MAX_TRACKED_SOCKETS, 0);

#[map(name = "EXCLUDED_CGROUPS")]
static EXCLUDED_CGROUPS: HashMap<u64, u8> =
    HashMap::with_max_entries(MAX_EXCLUDED_CGROUPS, BPF_F_NO_PREALLOC);

#[map(name = "COUNTERS")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Counter::ALL.len() as u32, 0);

/// Adds one to a counter of this CPU's; no other CPU writes it, so no atomic is needed.
fn count(counter: Counter) {
    if let Some(value) = COUNTERS.get_ptr_mut(counter as u32) {
        unsafe { *value += 1 };
    }
}

#[cgroup_sock_addr(connect4)]
pub fn dns_proxy_connect4(ctx: SockAddrContext) -> i32 {
    redirect4(&ctx, true);
    ALLOW
}

#[cgroup_sock_addr(sendmsg4)]
pub fn dns_proxy_sendmsg4(ctx: SockAddrContext) -> i32 {
    redirect4(&ctx, false);
    ALLOW
}

#[cgroup_sock_addr(recvmsg4)]
pub fn dns_proxy_recvmsg4(ctx: SockAddrContext) -> i32 {
    restore_original4(&ctx);
    ALLOW
}

#[cgroup_sock_addr(getpeername4)]
pub fn dns_proxy_getpeername4(ctx: SockAddrContext) -> i32 {
    restore_original4(&ctx);
    ALLOW
}

#[cgroup_sock_addr(connect6)]
pub fn dns_proxy_connect6(ctx: SockAddrContext) -> i32 {
    redirect6(&ctx, true);
    ALLOW
}

#[cgroup_sock_addr(sendmsg6)]
pub fn dns_proxy_sendmsg6(ctx: SockAddrContext) -> i32 {
    redirect6(&ctx, false);
    ALLOW
}

#[cgroup_sock_addr(recvmsg6)]
pub fn dns_proxy_recvmsg6(ctx: SockAddrContext) -> i32 {
    restore_original6(&ctx);
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn dns_proxy_getpeername6(ctx: SockAddrContext) -> i32 {
    restore_original6(&ctx);
    ALLOW
}

#[cgroup_skb(egress)]
pub fn dns_proxy_egress(ctx: SkBuffContext) -> i32 {
    record_flow(&ctx);
    ALLOW
}

#[cgroup_sock(sock_release)]
pub fn dns_proxy_sock_release(ctx: SockContext) -> i32 {
    forget_socket(&ctx);
    ALLOW
}

/// Reads `user_ip6` one 32-bit word at a time: the verifier allows no wider access to it, and
/// plain reads may be merged by the compiler into 64-bit loads.
fn read_user_ip6(sock_addr: *const bpf_sock_addr) -> [u32; 4] {
    let words = unsafe { core::ptr::addr_of!((*sock_addr).user_ip6) }.cast::<u32>();
    core::array::from_fn(|i| unsafe { core::ptr::read_volatile(words.add(i)) })
}

/// Writes `user_ip6` one 32-bit word at a time, for the same reason.
fn write_user_ip6(sock_addr: *mut bpf_sock_addr, addr: [u32; 4]) {
    let words = unsafe { core::ptr::addr_of_mut!((*sock_addr).user_ip6) }.cast::<u32>();
    for (i, word) in addr.into_iter().enumerate() {
        unsafe { core::ptr::write_volatile(words.add(i), word) };
    }
}

fn redirect_target() -> RedirectTarget {
    // Volatile: the loader patches this value; the compiler must not fold the zero in.
    unsafe { core::ptr::read_volatile(&REDIRECT_TARGET) }
}

fn socket_cookie<C: aya_ebpf::EbpfContext>(ctx: &C) -> u64 {
    unsafe { bpf_get_socket_cookie(ctx.as_ptr()) }
}

/// Whether a socket of this type headed for `port_be` is DNS we redirect: UDP always, TCP on
/// connect (sendmsg hooks only see UDP anyway).
fn is_dns(sock_type: u32, port_be: u16, on_connect: bool) -> bool {
    port_be == DNS_PORT.to_be()
        && (sock_type == SOCK_DGRAM || (on_connect && sock_type == SOCK_STREAM))
}

/// Whether the calling task's cgroup is excluded: listed itself, or below a cgroup listed
/// with its subtree. Only the levels that hold such a cgroup are looked at.
fn is_excluded() -> bool {
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    if unsafe { EXCLUDED_CGROUPS.get(&cgroup_id) }.is_some() {
        return true;
    }
    let levels = unsafe { core::ptr::read_volatile(&EXCLUDED_LEVELS) };
    for level in 0..=MAX_EXCLUDED_LEVEL {
        if levels >> level == 0 {
            break;
        }
        if levels & (1 << level) == 0 {
            continue;
        }
        let ancestor = unsafe { bpf_get_current_ancestor_cgroup_id(level as i32) };
        if ancestor == 0 {
            break; // the calling task's cgroup is shallower than this level
        }
        if unsafe { EXCLUDED_CGROUPS.get(&ancestor) } == Some(&EXCLUDED_SUBTREE) {
            return true;
        }
    }
    false
}

/// Whether a DNS socket must be left alone, counted when it is.
fn skip_excluded() -> bool {
    let excluded = is_excluded();
    if excluded {
        count(Counter::SkippedExcluded);
    }
    excluded
}

/// Records where the socket was headed; `false` if it could not be recorded (then it must not
/// be redirected, since its answers could not be restored).
fn record_original<C: aya_ebpf::EbpfContext>(ctx: &C, original: Endpoint) -> bool {
    let cookie = socket_cookie(ctx);
    match SOCKETS.get_ptr_mut(&cookie) {
        // A socket that sends again (to the same or another server): keep the flow it has.
        Some(record) => {
            unsafe { (*record).original = original };
            true
        }
        None => {
            let record = SocketRecord {
                original,
                flow: FlowKey::default(),
            };
            if SOCKETS.insert(&cookie, &record, 0).is_err() {
                count(Counter::MapFull);
                warn!(
                    ctx,
                    "dns-proxy: cannot record socket {}, not redirecting", cookie
                );
                return false;
            }
            true
        }
    }
}

/// connect4 / sendmsg4: rewrite a destination `addr:53` to the proxy and record it.
fn redirect4(ctx: &SockAddrContext, on_connect: bool) {
    let sock_addr: *mut bpf_sock_addr = ctx.sock_addr;
    // SAFETY: the kernel hands every sock_addr program a valid context.
    let (sock_type, user_ip4, user_port) = unsafe {
        (
            (*sock_addr).type_,
            (*sock_addr).user_ip4,
            (*sock_addr).user_port,
        )
    };
    // The port sits in network order in the low 16 bits.
    let port_be = user_port as u16;
    if !is_dns(sock_type, port_be, on_connect) {
        return;
    }
    let target = redirect_target();
    if target.port == 0 || (user_ip4 == target.ipv4 && port_be == target.port) {
        return; // not configured, or already headed for the proxy
    }
    if skip_excluded() || !record_original(ctx, Endpoint::v4(user_ip4, port_be)) {
        return;
    }
    unsafe {
        (*sock_addr).user_ip4 = target.ipv4;
        (*sock_addr).user_port = u32::from(target.port);
    }
    count(Counter::Redirected);
}

/// connect6 / sendmsg6: the same for IPv6 sockets. A v4-mapped destination (a dual-stack
/// socket talking to an IPv4 server) goes to the v4-mapped IPv4 listener, so its packets stay
/// IPv4 and the proxy sees an IPv4 client.
fn redirect6(ctx: &SockAddrContext, on_connect: bool) {
    let sock_addr: *mut bpf_sock_addr = ctx.sock_addr;
    let (sock_type, user_port) = unsafe { ((*sock_addr).type_, (*sock_addr).user_port) };
    let port_be = user_port as u16;
    if !is_dns(sock_type, port_be, on_connect) {
        return;
    }
    let user_ip6 = read_user_ip6(sock_addr);
    let target = redirect_target();
    let prefix = v4_mapped_prefix();
    let (to_addr, to_port) = if user_ip6[..3] == prefix {
        ([prefix[0], prefix[1], prefix[2], target.ipv4], target.port)
    } else {
        (target.ipv6, target.port6)
    };
    if to_port == 0 || (user_ip6 == to_addr && port_be == to_port) {
        return; // this family is not redirected, or already headed for the proxy
    }
    if skip_excluded() || !record_original(ctx, Endpoint::v6(user_ip6, port_be)) {
        return;
    }
    write_user_ip6(sock_addr, to_addr);
    unsafe { (*sock_addr).user_port = u32::from(to_port) };
    count(Counter::Redirected);
}

/// The original destination of a socket whose peer is the proxy, if it was redirected;
/// counted as a miss when it was not (or its record is gone).
fn original_of<C: aya_ebpf::EbpfContext>(ctx: &C) -> Option<Endpoint> {
    let cookie = socket_cookie(ctx);
    let original = unsafe { SOCKETS.get(&cookie) }.map(|record| record.original);
    if original.is_none() {
        count(Counter::RecordMisses);
    }
    original
}

/// recvmsg4 / getpeername4: a peer that is the proxy is shown as the original server.
fn restore_original4(ctx: &SockAddrContext) {
    let sock_addr: *mut bpf_sock_addr = ctx.sock_addr;
    let (user_ip4, user_port) = unsafe { ((*sock_addr).user_ip4, (*sock_addr).user_port) };
    let target = redirect_target();
    if target.port == 0 || user_ip4 != target.ipv4 || user_port as u16 != target.port {
        return;
    }
    // None: not a socket we redirected, but a client of the proxy by its own choice.
    let Some(original) = original_of(ctx) else {
        return;
    };
    if original.family != AF_INET {
        return;
    }
    unsafe {
        (*sock_addr).user_ip4 = original.addr[0];
        (*sock_addr).user_port = u32::from(original.port);
    }
    count(Counter::ReverseTranslated);
}

/// recvmsg6 / getpeername6: a peer that is the proxy (its IPv6 listener, or the v4-mapped
/// IPv4 one) is shown as the original server, exactly as the socket addressed it.
fn restore_original6(ctx: &SockAddrContext) {
    let sock_addr: *mut bpf_sock_addr = ctx.sock_addr;
    let user_port = unsafe { (*sock_addr).user_port };
    let user_ip6 = read_user_ip6(sock_addr);
    let port_be = user_port as u16;
    let target = redirect_target();
    let prefix = v4_mapped_prefix();
    let from_proxy = if user_ip6[..3] == prefix {
        target.port != 0 && user_ip6[3] == target.ipv4 && port_be == target.port
    } else {
        target.port6 != 0 && user_ip6 == target.ipv6 && port_be == target.port6
    };
    if !from_proxy {
        return;
    }
    let Some(original) = original_of(ctx) else {
        return;
    };
    // A dual-stack socket's sendto to a v4-mapped address goes through sendmsg4 (the kernel
    // hands it to the IPv4 code), which records the original as IPv4: show it v4-mapped.
    let addr = if original.family == AF_INET {
        [prefix[0], prefix[1], prefix[2], original.addr[0]]
    } else {
        original.addr
    };
    write_user_ip6(sock_addr, addr);
    unsafe { (*sock_addr).user_port = u32::from(original.port) };
    count(Counter::ReverseTranslated);
}

/// cgroup_skb/egress: for a packet of a redirected socket headed for the proxy, record its
/// client flow (source address and port after routing and autobind) -> original server.
fn record_flow(ctx: &SkBuffContext) {
    let cookie = socket_cookie(ctx);
    let Some(record) = SOCKETS.get_ptr_mut(&cookie) else {
        return; // not a redirected socket: the common case, kept cheap
    };
    let Some(flow) = Flow::parse(ctx) else {
        return;
    };
    if flow.protocol != IPPROTO_UDP && flow.protocol != IPPROTO_TCP {
        return;
    }
    let target = redirect_target();
    let to_proxy = if flow.family == AF_INET {
        flow.dst_addr[0] == target.ipv4 && flow.dst_port == target.port
    } else {
        flow.dst_addr == target.ipv6 && flow.dst_port == target.port6
    };
    if !to_proxy {
        return;
    }
    let key = FlowKey {
        client_addr: flow.src_addr,
        client_port: flow.src_port,
        family: flow.family as u8,
        protocol: flow.protocol,
    };
    // SAFETY: the pointer came from a successful lookup; racing writers store whole values.
    let (original, recorded) = unsafe { ((*record).original, (*record).flow) };
    // A TCP connection's destination never changes: record it once, not for every segment.
    // A UDP socket may send to several servers in turn: every datagram updates the record,
    // so it is forwarded to the server it addressed last.
    if flow.protocol == IPPROTO_TCP && recorded == key {
        return;
    }
    if FLOWS.insert(&key, &original, 0).is_err() {
        count(Counter::MapFull);
        warn!(ctx, "dns-proxy: cannot record flow of socket {}", cookie);
        return;
    }
    if recorded != key {
        unsafe { (*record).flow = key };
    }
}

/// sock_release: a redirected socket closes; its records must not outlive it.
fn forget_socket(ctx: &SockContext) {
    let cookie = socket_cookie(ctx);
    let Some(record) = (unsafe { SOCKETS.get(&cookie) }) else {
        return;
    };
    let flow = record.flow;
    if flow.family != 0 {
        // The port is still bound here (release runs before the socket lets go of it), so no
        // other socket can own this flow yet.
        let _ = FLOWS.remove(&flow);
    }
    let _ = SOCKETS.remove(&cookie);
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
