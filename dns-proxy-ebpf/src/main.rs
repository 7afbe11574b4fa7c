//! dns-proxy's kernel side: cgroup programs that send a workload's DNS to the local proxy and
//! make the answers look as if they came from the server the workload asked.
//!
//! - `connect4` / `sendmsg4` rewrite a UDP destination `addr:53` to the proxy and remember
//!   the original destination per socket (`SOCKETS`, keyed by socket cookie).
//! - `cgroup_skb/egress` sees each redirected datagram with its final source address and port
//!   and records "this client flow was headed for that server" (`FLOWS`), which is what the
//!   proxy looks up when the datagram arrives.
//! - `recvmsg4` / `getpeername4` show the original server instead of the proxy.
//! - `sock_release` forgets both records when the socket closes.
//!
//! Every program fails open: whatever goes wrong, the call is allowed unchanged.
#![no_std]
#![no_main]

mod ipv4;

use aya_ebpf::{
    bindings::{BPF_F_NO_PREALLOC, bpf_sock_addr},
    helpers::{bpf_get_current_cgroup_id, bpf_get_socket_cookie},
    macros::{cgroup_skb, cgroup_sock, cgroup_sock_addr, map},
    maps::{HashMap, LruHashMap},
    programs::{SkBuffContext, SockAddrContext, SockContext},
};
use aya_log_ebpf::warn;
use dns_proxy_common::{
    AF_INET, DNS_PORT, Endpoint, FlowKey, IPPROTO_UDP, MAX_EXCLUDED_CGROUPS, MAX_TRACKED_SOCKETS,
    RedirectTarget, SocketRecord,
};

/// The verdict that lets a call or packet through. These programs never return anything else.
const ALLOW: i32 = 1;

/// `SOCK_DGRAM` from the kernel's net.h.
const SOCK_DGRAM: u32 = 2;

/// The proxy's listener, written by the loader before load (`names::REDIRECT_TARGET`).
#[unsafe(no_mangle)]
static REDIRECT_TARGET: RedirectTarget = RedirectTarget {
    ipv4: 0,
    port: 0,
    _pad: 0,
};

#[map(name = "SOCKETS")]
static SOCKETS: LruHashMap<u64, SocketRecord> =
    LruHashMap::with_max_entries(MAX_TRACKED_SOCKETS, 0);

#[map(name = "FLOWS")]
static FLOWS: LruHashMap<FlowKey, Endpoint> = LruHashMap::with_max_entries(MAX_TRACKED_SOCKETS, 0);

#[map(name = "EXCLUDED_CGROUPS")]
static EXCLUDED_CGROUPS: HashMap<u64, u8> =
    HashMap::with_max_entries(MAX_EXCLUDED_CGROUPS, BPF_F_NO_PREALLOC);

#[cgroup_sock_addr(connect4)]
pub fn dns_proxy_connect4(ctx: SockAddrContext) -> i32 {
    redirect4(&ctx);
    ALLOW
}

#[cgroup_sock_addr(sendmsg4)]
pub fn dns_proxy_sendmsg4(ctx: SockAddrContext) -> i32 {
    redirect4(&ctx);
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

fn redirect_target() -> RedirectTarget {
    // Volatile: the loader patches this value; the compiler must not fold the zero in.
    unsafe { core::ptr::read_volatile(&REDIRECT_TARGET) }
}

fn socket_cookie<C: aya_ebpf::EbpfContext>(ctx: &C) -> u64 {
    unsafe { bpf_get_socket_cookie(ctx.as_ptr()) }
}

/// connect4 / sendmsg4: rewrite a UDP destination `addr:53` to the proxy and record it.
fn redirect4(ctx: &SockAddrContext) {
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
    if sock_type != SOCK_DGRAM || port_be != DNS_PORT.to_be() {
        return;
    }
    let target = redirect_target();
    if target.port == 0 {
        return; // not configured: the loader never attaches us like this, but fail open
    }
    if user_ip4 == target.ipv4 && port_be == target.port {
        return; // already headed for the proxy
    }
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    if unsafe { EXCLUDED_CGROUPS.get(&cgroup_id) }.is_some() {
        return; // the proxy's own upstream traffic, or a cgroup the operator left alone
    }

    let original = Endpoint::v4(user_ip4, port_be);
    let cookie = socket_cookie(ctx);
    match SOCKETS.get_ptr_mut(&cookie) {
        // A socket that sends again (to the same or another server): keep the flow it has.
        Some(record) => unsafe { (*record).original = original },
        None => {
            let record = SocketRecord {
                original,
                flow: FlowKey::default(),
            };
            if SOCKETS.insert(&cookie, &record, 0).is_err() {
                warn!(
                    ctx,
                    "dns-proxy: cannot record socket {}, not redirecting", cookie
                );
                return; // without a record the answer could not be restored: leave it direct
            }
        }
    }
    unsafe {
        (*sock_addr).user_ip4 = target.ipv4;
        (*sock_addr).user_port = u32::from(target.port);
    }
}

/// recvmsg4 / getpeername4: a peer that is the proxy is shown as the original server.
fn restore_original4(ctx: &SockAddrContext) {
    let sock_addr: *mut bpf_sock_addr = ctx.sock_addr;
    let (user_ip4, user_port) = unsafe { ((*sock_addr).user_ip4, (*sock_addr).user_port) };
    let target = redirect_target();
    if target.port == 0 || user_ip4 != target.ipv4 || user_port as u16 != target.port {
        return;
    }
    let cookie = socket_cookie(ctx);
    let Some(record) = (unsafe { SOCKETS.get(&cookie) }) else {
        return; // not a socket we redirected: a client of the proxy by its own choice
    };
    if record.original.family != AF_INET {
        return;
    }
    unsafe {
        (*sock_addr).user_ip4 = record.original.addr[0];
        (*sock_addr).user_port = u32::from(record.original.port);
    }
}

/// cgroup_skb/egress: for a packet of a redirected socket headed for the proxy, record its
/// client flow (source address and port after routing and autobind) -> original server.
fn record_flow(ctx: &SkBuffContext) {
    let cookie = socket_cookie(ctx);
    let Some(record) = SOCKETS.get_ptr_mut(&cookie) else {
        return; // not a redirected socket: the common case, kept cheap
    };
    let Some(packet) = ipv4::Ports::parse(ctx) else {
        return;
    };
    let target = redirect_target();
    if packet.protocol != IPPROTO_UDP
        || packet.dst_addr != target.ipv4
        || packet.dst_port != target.port
    {
        return;
    }
    let key = FlowKey {
        client_addr: [packet.src_addr, 0, 0, 0],
        client_port: packet.src_port,
        family: AF_INET as u8,
        protocol: packet.protocol,
    };
    // SAFETY: the pointer came from a successful lookup; racing writers store whole values.
    let original = unsafe { (*record).original };
    // Written for every datagram: a socket that sends to several servers in turn is always
    // forwarded to the one it addressed last.
    if FLOWS.insert(&key, &original, 0).is_err() {
        warn!(ctx, "dns-proxy: cannot record flow of socket {}", cookie);
        return;
    }
    unsafe {
        if (*record).flow != key {
            (*record).flow = key;
        }
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
