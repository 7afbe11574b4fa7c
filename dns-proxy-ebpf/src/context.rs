//! The `ctx_*` accessors: the programs' only raw access to their contexts. Every field of
//! `bpf_sock_addr`, `bpf_sk_lookup` and `bpf_sockopt` that they read or write, and the one helper that takes
//! the context itself, goes through here (compare cilium's `ctx_*` in `bpf/include/bpf/ctx/`).
//!
//! Why each access is sound, once for all of them:
//! - the pointer: aya's program macros build the context from the pointer the kernel passes
//!   the program, valid for the whole run; the programs never keep it past the call.
//! - the field: the verifier checks every context access (field, size, read or write) against
//!   the program's type and hook when the program is loaded, and refuses a program that makes
//!   one its hook does not allow. So a call from the wrong hook (`user_ip4` in a `*6` program,
//!   `msg_src_ip4` outside `sendmsg4`) cannot run: the load fails, and the e2e suite loads
//!   every program for real.
//! - the size: the verifier allows no access wider than 32 bits to some of the IPv6 address
//!   arrays (the socket's, sk_lookup's), and to the others only at 8-byte-aligned offsets
//!   and on newer kernels, so all of them are read and written one 32-bit word at a time,
//!   through volatile accesses that the compiler may not merge into 64-bit ones.
//!
//! Addresses and ports are in network order unless an accessor says otherwise.
use aya_ebpf::{
    EbpfContext as _,
    bindings::{bpf_sk_lookup, bpf_sock, bpf_sock_addr, sockaddr},
    helpers::{bpf_get_netns_cookie, generated::bpf_bind},
    programs::{SkLookupContext, SockAddrContext, SockContext, SockoptContext},
};
use dns_proxy_common::{AF_INET, AF_INET6};

/// The `bpf_sock_addr` behind a `cgroup/*4` or `cgroup/*6` context.
fn raw(ctx: &SockAddrContext) -> *mut bpf_sock_addr {
    ctx.sock_addr
}

/// Four network-order words from a context field the verifier lets be read 32 bits at a time.
///
/// # Safety
/// `words` points at four readable `u32`s of a live context.
// Always inlined: the verifier refuses a load through a context pointer moved by an offset, so
// the word's offset must fold into each load, which it cannot across a call.
#[inline(always)]
unsafe fn read_words(words: *const u32) -> [u32; 4] {
    // SAFETY: the caller's promise: each `words.add(i)`, `i < 4`, is a readable word.
    core::array::from_fn(|i| unsafe { core::ptr::read_volatile(words.add(i)) })
}

/// The socket's type (`SOCK_STREAM`, `SOCK_DGRAM`, ...). Every sock_addr hook.
pub fn ctx_sock_type(ctx: &SockAddrContext) -> u32 {
    // SAFETY: a valid context (module docs); `type` is readable in every sock_addr hook.
    unsafe { (*raw(ctx)).type_ }
}

/// The socket's own address family (`AF_INET`, `AF_INET6`), which may differ from the
/// address's: a dual-stack IPv6 socket connected with an IPv4 address runs `connect4`. Every
/// sock_addr hook.
pub fn ctx_sock_family(ctx: &SockAddrContext) -> u32 {
    // SAFETY: a valid context (module docs); `family` is readable in every sock_addr hook.
    unsafe { (*raw(ctx)).family }
}

/// The socket's protocol (`IPPROTO_UDP`, `IPPROTO_TCP`, ...; the one the kernel resolved, never
/// 0). Every sock_addr hook.
pub fn ctx_sock_protocol(ctx: &SockAddrContext) -> u32 {
    // SAFETY: a valid context (module docs); `protocol` is readable in every sock_addr hook.
    unsafe { (*raw(ctx)).protocol }
}

/// The IPv4 address the call names (destination or peer). The `*4` hooks.
pub fn ctx_user_ip4(ctx: &SockAddrContext) -> u32 {
    // SAFETY: a valid context; `user_ip4` is readable in the `*4` hooks, the only callers (the
    // verifier refuses any other).
    unsafe { (*raw(ctx)).user_ip4 }
}

/// Rewrites the IPv4 address the call names. The `*4` hooks.
pub fn ctx_set_user_ip4(ctx: &SockAddrContext, addr_be: u32) {
    // SAFETY: a valid context; `user_ip4` is writable in the `*4` hooks that call this.
    unsafe { (*raw(ctx)).user_ip4 = addr_be }
}

/// The IPv6 address the call names, as four words. The `*6` hooks.
pub fn ctx_user_ip6(ctx: &SockAddrContext) -> [u32; 4] {
    // SAFETY: a valid context; `addr_of!` makes a pointer to the field without reading it.
    let words = unsafe { core::ptr::addr_of!((*raw(ctx)).user_ip6) }.cast::<u32>();
    // SAFETY: `words` points at the four words of `user_ip6`, readable in the `*6` hooks, the
    // only callers.
    unsafe { read_words(words) }
}

/// Rewrites the IPv6 address the call names, one word at a time. The `*6` hooks.
pub fn ctx_set_user_ip6(ctx: &SockAddrContext, addr: [u32; 4]) {
    // SAFETY: a valid context; `addr_of_mut!` makes a pointer to the field without reading it.
    let words = unsafe { core::ptr::addr_of_mut!((*raw(ctx)).user_ip6) }.cast::<u32>();
    for (i, word) in addr.into_iter().enumerate() {
        // SAFETY: `words.add(i)`, `i < 4`, is a word of `user_ip6`, writable with 32-bit
        // stores in the `*6` hooks that call this.
        unsafe { core::ptr::write_volatile(words.add(i), word) };
    }
}

/// The port the call names (it sits in the low 16 bits of `user_port`). Every hook.
pub fn ctx_user_port(ctx: &SockAddrContext) -> u16 {
    // SAFETY: a valid context; `user_port` is readable in every sock_addr hook.
    unsafe { (*raw(ctx)).user_port as u16 }
}

/// Rewrites the port the call names. Every hook.
pub fn ctx_set_user_port(ctx: &SockAddrContext, port_be: u16) {
    // SAFETY: a valid context; `user_port` is writable in every hook that calls this.
    unsafe { (*raw(ctx)).user_port = u32::from(port_be) }
}

/// The source address a `sendmsg` asked for (`IP_PKTINFO`); 0 if none. sendmsg4 only.
pub fn ctx_msg_src_ip4(ctx: &SockAddrContext) -> u32 {
    // SAFETY: a valid context; `msg_src_ip4` is readable in sendmsg4, the only caller.
    unsafe { (*raw(ctx)).msg_src_ip4 }
}

/// The source address a `sendmsg` asked for (`IPV6_PKTINFO`), as four words; zeros if none.
/// sendmsg6 only.
pub fn ctx_msg_src_ip6(ctx: &SockAddrContext) -> [u32; 4] {
    // SAFETY: a valid context; `addr_of!` makes a pointer to the field without reading it.
    let words = unsafe { core::ptr::addr_of!((*raw(ctx)).msg_src_ip6) }.cast::<u32>();
    // SAFETY: `words` points at the four words of `msg_src_ip6`, readable in sendmsg6, the
    // only caller.
    unsafe { read_words(words) }
}

/// The socket's own local port, host order (0 while it has none). Every hook.
pub fn ctx_local_port(ctx: &SockAddrContext) -> u32 {
    // SAFETY: a valid context, whose `sk` the verifier knows as a valid, non-null socket in
    // every sock_addr hook; `src_port` is readable through it.
    unsafe {
        let sk = (*raw(ctx)).__bindgen_anon_1.sk;
        (*sk).src_port
    }
}

/// The device the socket is bound to (`SO_BINDTODEVICE`), by index; 0 if none. Every hook.
pub fn ctx_bound_dev_if(ctx: &SockAddrContext) -> u32 {
    // SAFETY: as for `ctx_local_port`; `bound_dev_if` is readable through `sk`.
    unsafe {
        let sk = (*raw(ctx)).__bindgen_anon_1.sk;
        (*sk).bound_dev_if
    }
}

/// The socket's mark (`SO_MARK`); 0 if none. Every hook.
pub fn ctx_mark(ctx: &SockAddrContext) -> u32 {
    // SAFETY: as for `ctx_local_port`; `mark` is readable through `sk`.
    unsafe {
        let sk = (*raw(ctx)).__bindgen_anon_1.sk;
        (*sk).mark
    }
}

/// The socket's own local IPv4 address (0 while unbound). The `*4` hooks.
pub fn ctx_local_ip4(ctx: &SockAddrContext) -> u32 {
    // SAFETY: as for `ctx_local_port`; `src_ip4` is readable through `sk`.
    unsafe {
        let sk = (*raw(ctx)).__bindgen_anon_1.sk;
        (*sk).src_ip4
    }
}

/// The socket's own local IPv6 address, as four words (zeros while unbound). The `*6` hooks.
pub fn ctx_local_ip6(ctx: &SockAddrContext) -> [u32; 4] {
    // SAFETY: as for `ctx_local_port`; `src_ip6` is readable through `sk`, word by word, and
    // `addr_of!` makes a pointer to it without reading it.
    unsafe {
        let sk = (*raw(ctx)).__bindgen_anon_1.sk;
        read_words(core::ptr::addr_of!((*sk).src_ip6).cast::<u32>())
    }
}

/// The IPv4 peer the socket is connected to, and its port; a port of 0 while it is not
/// connected. A dual-stack socket connected to a v4-mapped address has its IPv4 peer here.
/// The `*4` hooks.
pub fn ctx_peer4(ctx: &SockAddrContext) -> (u32, u16) {
    // SAFETY: as for `ctx_local_port`; `dst_ip4` and `dst_port` (16 bits) are readable
    // through `sk`.
    unsafe {
        let sk = (*raw(ctx)).__bindgen_anon_1.sk;
        ((*sk).dst_ip4, (*sk).dst_port)
    }
}

/// The IPv6 peer the socket is connected to, as four words, and its port; a port of 0 while it
/// is not connected. The `*6` hooks.
pub fn ctx_peer6(ctx: &SockAddrContext) -> ([u32; 4], u16) {
    // SAFETY: as for `ctx_local_ip6`; `dst_ip6` (word by word) and `dst_port` are readable
    // through `sk`.
    unsafe {
        let sk = (*raw(ctx)).__bindgen_anon_1.sk;
        let peer = read_words(core::ptr::addr_of!((*sk).dst_ip6).cast::<u32>());
        (peer, (*sk).dst_port)
    }
}

/// `struct sockaddr_in`, for `bpf_bind`.
#[repr(C)]
struct SockaddrIn {
    family: u16,
    port_be: u16,
    addr_be: u32,
    zero: [u8; 8],
}

/// Binds the socket to the IPv4 address `addr_be`, its port left to `connect` to pick
/// (`bpf_bind` with port 0). connect4 only (the verifier allows the helper in connect4/6); the
/// result is ignored (a failed bind changes nothing).
pub fn ctx_bind_source4(ctx: &SockAddrContext, addr_be: u32) {
    let mut addr = SockaddrIn {
        family: AF_INET,
        port_be: 0,
        addr_be,
        zero: [0; 8],
    };
    // SAFETY: the helper takes the program's own context (checked by the verifier) and a
    // pointer to an initialized `sockaddr_in` on the stack, of the length given, which it only
    // reads.
    unsafe {
        bpf_bind(
            raw(ctx),
            (&raw mut addr).cast::<sockaddr>(),
            size_of::<SockaddrIn>() as i32,
        )
    };
}

/// `struct sockaddr_in6`, as `bpf_bind` reads it.
#[repr(C)]
struct SockaddrIn6 {
    family: u16,
    port_be: u16,
    flowinfo: u32,
    addr_be: [u32; 4],
    scope_id: u32,
}

/// Binds the socket to the IPv6 address `addr_be`, its port left to `connect` to pick
/// (`bpf_bind` with port 0). connect6 only.
pub fn ctx_bind_source6(ctx: &SockAddrContext, addr_be: [u32; 4]) {
    let mut addr = SockaddrIn6 {
        family: AF_INET6,
        port_be: 0,
        flowinfo: 0,
        addr_be,
        scope_id: 0,
    };
    // SAFETY: as for `ctx_bind_source4`, with an initialized `sockaddr_in6`.
    unsafe {
        bpf_bind(
            raw(ctx),
            (&raw mut addr).cast::<sockaddr>(),
            size_of::<SockaddrIn6>() as i32,
        )
    };
}

/// The cookie of the network namespace of the socket behind `ctx`. Every hook.
pub fn ctx_netns_cookie(ctx: &SockAddrContext) -> u64 {
    // SAFETY: the helper takes the program's own context, the pointer the kernel passed it (the
    // verifier checks the argument is that context); it only reads the socket's namespace.
    unsafe { bpf_get_netns_cookie(ctx.as_ptr()) }
}

/// What `sk_lookup` reads of its context.
pub struct Lookup {
    pub family: u32,
    pub protocol: u32,
    /// Network order.
    pub local_ip4: u32,
    /// Network-order words.
    pub local_ip6: [u32; 4],
    /// Host order.
    pub local_port: u32,
    /// Host order of the network-order port (only hashed).
    pub remote_port: u16,
    /// The remote address folded to one word (only hashed).
    pub remote_hash: u32,
    pub ingress_ifindex: u32,
}

/// The fields of an `sk_lookup` context that `steer_to_proxy` looks at, read at once.
pub fn ctx_lookup(ctx: &SkLookupContext) -> Lookup {
    let raw: *const bpf_sk_lookup = ctx.as_ptr().cast();
    // SAFETY: the kernel hands sk_lookup a valid context (module docs), every field of which
    // it may read with 32-bit loads (`remote_port` with a 16-bit one); `addr_of!` makes each
    // pointer without reading, and the IPv6 words are read one at a time, as for `user_ip6`.
    unsafe {
        let word = |field: *const u32| core::ptr::read_volatile(field);
        let remote6 = core::ptr::addr_of!((*raw).remote_ip6).cast::<u32>();
        Lookup {
            family: word(core::ptr::addr_of!((*raw).family)),
            protocol: word(core::ptr::addr_of!((*raw).protocol)),
            local_ip4: word(core::ptr::addr_of!((*raw).local_ip4)),
            local_ip6: read_words(core::ptr::addr_of!((*raw).local_ip6).cast::<u32>()),
            local_port: word(core::ptr::addr_of!((*raw).local_port)),
            remote_port: u16::from_be(core::ptr::read_volatile(core::ptr::addr_of!(
                (*raw).remote_port
            ))),
            remote_hash: word(core::ptr::addr_of!((*raw).remote_ip4)) ^ word(remote6.add(3)),
            ingress_ifindex: word(core::ptr::addr_of!((*raw).ingress_ifindex)),
        }
    }
}

/// The type of the socket behind a `cgroup/sock_release` context (`SOCK_STREAM`, ...).
pub fn ctx_sock_kind(ctx: &SockContext) -> u32 {
    // SAFETY: the context's socket pointer is the kernel's, valid for the whole run; `type` is
    // readable.
    unsafe { (*ctx.sock).type_ }
}

/// The peer of the socket behind a `cgroup/sock_release` context: its family, address (an
/// IPv4 one in the first word) and port (network order; 0 while not connected).
pub fn ctx_sock_peer(ctx: &SockContext) -> (u32, [u32; 4], u16) {
    // SAFETY: the context's socket pointer is the kernel's, valid for the whole run; the
    // verifier allows reading `family`, `dst_ip4`, `dst_ip6` (word by word) and `dst_port`.
    unsafe { full_sock_peer(ctx.sock) }
}

/// The peer of a full socket (`bpf_sk_fullsock`'s, in `cgroup_skb`): its family, address (an
/// IPv4 one in the first word) and port (network order; 0 while not connected).
///
/// # Safety
/// `sk` is a non-null full socket a helper returned, or a `cgroup/sock_release` context's,
/// valid for the run.
// Always inlined, as `read_words`: a context's fields are loaded at offsets from its pointer.
#[inline(always)]
pub unsafe fn full_sock_peer(sk: *const bpf_sock) -> (u32, [u32; 4], u16) {
    // SAFETY: the caller's promise; a full socket's `family`, `dst_ip4`, `dst_ip6` (word by
    // word) and `dst_port` are readable.
    unsafe {
        let family = (*sk).family;
        let port = (*sk).dst_port;
        if family == u32::from(AF_INET6) {
            let addr = read_words(core::ptr::addr_of!((*sk).dst_ip6).cast::<u32>());
            (family, addr, port)
        } else {
            (family, [(*sk).dst_ip4, 0, 0, 0], port)
        }
    }
}

/// The option a `cgroup/setsockopt` call sets: its level, name and length.
pub fn ctx_sockopt_option(ctx: &SockoptContext) -> (i32, i32, i32) {
    // SAFETY: a valid context; `level`, `optname` and `optlen` are readable in setsockopt.
    unsafe {
        let raw = ctx.sockopt;
        ((*raw).level, (*raw).optname, (*raw).optlen)
    }
}

/// The four bytes at `OFFSET` of the value a `cgroup/setsockopt` call sets, as they are in
/// memory; `None` if the kernel passed the program fewer.
pub fn ctx_sockopt_u32_at<const OFFSET: usize>(ctx: &SockoptContext) -> Option<u32> {
    // SAFETY: a valid context; `optval` and `optval_end` bound the copy of the value the kernel
    // made for the program, and the verifier checks the read below against that bound.
    unsafe {
        let raw = ctx.sockopt;
        let start = (*raw).__bindgen_anon_2.optval.cast::<u8>();
        let end = (*raw).__bindgen_anon_3.optval_end.cast::<u8>();
        if start.add(OFFSET + 4) > end {
            return None;
        }
        Some(core::ptr::read_unaligned(start.add(OFFSET).cast::<u32>()))
    }
}

/// Tells the kernel to set the option from the caller's own buffer, not the program's copy
/// (an `optlen` of 0).
pub fn ctx_sockopt_use_callers_value(ctx: &SockoptContext) {
    // SAFETY: a valid context; `optlen` is writable in setsockopt.
    unsafe { (*ctx.sockopt).optlen = 0 }
}

/// The socket a `cgroup/setsockopt` call is made on, for the socket storage helpers.
pub fn ctx_sockopt_sk(ctx: &SockoptContext) -> *mut bpf_sock {
    // SAFETY: a valid context; `sk` is readable in setsockopt and never null there.
    unsafe { (*ctx.sockopt).__bindgen_anon_1.sk }
}
