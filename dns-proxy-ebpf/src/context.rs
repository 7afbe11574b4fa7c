//! The raw context access of the programs, in one place: every field of `bpf_sock_addr` and
//! `bpf_sk_lookup` that they read or write goes through here.
use core::ffi::c_void;

use aya_ebpf::{
    EbpfContext as _,
    bindings::{bpf_sk_lookup, bpf_sock_addr},
    programs::{SkLookupContext, SockAddrContext},
};

/// A `cgroup/*4` or `cgroup/*6` context. Addresses and the port are in network order.
pub struct SockAddr<'a> {
    ctx: &'a SockAddrContext,
    raw: *mut bpf_sock_addr,
}

impl<'a> SockAddr<'a> {
    pub fn new(ctx: &'a SockAddrContext) -> Self {
        Self {
            ctx,
            raw: ctx.sock_addr,
        }
    }

    /// The program's context, for aya-log.
    pub fn context(&self) -> &'a SockAddrContext {
        self.ctx
    }

    /// The context, for helpers that take it.
    pub fn raw(&self) -> *mut c_void {
        self.raw.cast()
    }

    pub fn sock_type(&self) -> u32 {
        // SAFETY: the kernel hands every sock_addr program a valid context; `type` is
        // readable in every sock_addr hook.
        unsafe { (*self.raw).type_ }
    }

    pub fn user_ip4(&self) -> u32 {
        // SAFETY: as above; `user_ip4` is readable in the *4 hooks, the only ones that call this.
        unsafe { (*self.raw).user_ip4 }
    }

    pub fn set_user_ip4(&self, addr_be: u32) {
        // SAFETY: as above; `user_ip4` is writable in the *4 hooks.
        unsafe { (*self.raw).user_ip4 = addr_be }
    }

    /// The socket's own local port, host order (0 while it has none).
    pub fn local_port(&self) -> u32 {
        // SAFETY: the kernel hands every sock_addr program a valid context whose `sk` is a
        // valid, non-null socket; `src_port` is readable through it.
        unsafe {
            let sk = (*self.raw).__bindgen_anon_1.sk;
            (*sk).src_port
        }
    }

    /// The socket's own local IPv4 address, network order (0 while unbound).
    pub fn local_ip4(&self) -> u32 {
        // SAFETY: as for `local_port`; `src_ip4` is readable through `sk`.
        unsafe {
            let sk = (*self.raw).__bindgen_anon_1.sk;
            (*sk).src_ip4
        }
    }

    /// The socket's own local IPv6 address, network-order words, read one at a time.
    pub fn local_ip6(&self) -> [u32; 4] {
        // SAFETY: as for `local_port`; `src_ip6` is readable through `sk`, word by word.
        unsafe {
            let sk = (*self.raw).__bindgen_anon_1.sk;
            let words = core::ptr::addr_of!((*sk).src_ip6).cast::<u32>();
            core::array::from_fn(|i| core::ptr::read_volatile(words.add(i)))
        }
    }

    /// The source address a `sendmsg` asked for (`IP_PKTINFO`), network order; 0 if none.
    /// Only sendmsg4 calls it, where the field is readable.
    pub fn msg_src_ip4(&self) -> u32 {
        // SAFETY: the context is valid; `msg_src_ip4` is readable in sendmsg4.
        unsafe { (*self.raw).msg_src_ip4 }
    }

    /// The source address a `sendmsg` asked for (`IPV6_PKTINFO`), network-order words read
    /// one at a time. Only sendmsg6 calls it, where the field is readable.
    pub fn msg_src_ip6(&self) -> [u32; 4] {
        // SAFETY: the context is valid; `msg_src_ip6` is readable in sendmsg6, word by word.
        let words = unsafe { core::ptr::addr_of!((*self.raw).msg_src_ip6) }.cast::<u32>();
        // SAFETY: `words` points at the four words of `msg_src_ip6`.
        core::array::from_fn(|i| unsafe { core::ptr::read_volatile(words.add(i)) })
    }

    /// The port, network order (it sits in the low 16 bits of `user_port`).
    pub fn user_port(&self) -> u16 {
        // SAFETY: as above; `user_port` is readable in every sock_addr hook.
        unsafe { (*self.raw).user_port as u16 }
    }

    pub fn set_user_port(&self, port_be: u16) {
        // SAFETY: as above; `user_port` is writable in every hook that calls this.
        unsafe { (*self.raw).user_port = u32::from(port_be) }
    }

    /// `user_ip6`, one 32-bit word at a time: the verifier allows no wider access to it, and
    /// plain reads may be merged by the compiler into 64-bit loads.
    pub fn user_ip6(&self) -> [u32; 4] {
        // SAFETY: as above; only the *6 hooks call this, where `user_ip6` is readable.
        let words = unsafe { core::ptr::addr_of!((*self.raw).user_ip6) }.cast::<u32>();
        // SAFETY: `words` points at the four words of `user_ip6`.
        core::array::from_fn(|i| unsafe { core::ptr::read_volatile(words.add(i)) })
    }

    /// Writes `user_ip6` one 32-bit word at a time, for the same reason.
    pub fn set_user_ip6(&self, addr: [u32; 4]) {
        // SAFETY: as above; `user_ip6` is writable in the *6 hooks that call this.
        let words = unsafe { core::ptr::addr_of_mut!((*self.raw).user_ip6) }.cast::<u32>();
        for (i, word) in addr.into_iter().enumerate() {
            // SAFETY: `words` points at the four words of `user_ip6`.
            unsafe { core::ptr::write_volatile(words.add(i), word) };
        }
    }
}

/// What `sk_lookup` reads of its context.
pub struct LookupFields {
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

impl LookupFields {
    pub fn read(ctx: &SkLookupContext) -> Self {
        let raw: *const bpf_sk_lookup = ctx.as_ptr().cast();
        // SAFETY: the kernel hands sk_lookup a valid context, whose fields are all readable
        // with 32-bit loads; the IPv6 words are read one at a time, as for user_ip6.
        unsafe {
            let word = |field: *const u32| core::ptr::read_volatile(field);
            let ip6 = core::ptr::addr_of!((*raw).local_ip6).cast::<u32>();
            let remote6 = core::ptr::addr_of!((*raw).remote_ip6).cast::<u32>();
            Self {
                family: word(core::ptr::addr_of!((*raw).family)),
                protocol: word(core::ptr::addr_of!((*raw).protocol)),
                local_ip4: word(core::ptr::addr_of!((*raw).local_ip4)),
                local_ip6: core::array::from_fn(|i| word(ip6.add(i))),
                local_port: word(core::ptr::addr_of!((*raw).local_port)),
                remote_port: u16::from_be(core::ptr::read_volatile(core::ptr::addr_of!(
                    (*raw).remote_port
                ))),
                remote_hash: word(core::ptr::addr_of!((*raw).remote_ip4)) ^ word(remote6.add(3)),
                ingress_ifindex: word(core::ptr::addr_of!((*raw).ingress_ifindex)),
            }
        }
    }
}
