//! Which sockets the programs act on: nothing until the agent has armed them and while its
//! socket is gone; only DNS clients; never the agent's own sockets nor an excluded cgroup's
//! (the agents' own among them), nor one asking an excluded server; and, unless the proxy
//! serves other namespaces (node mode), only the agent's namespace.
use aya_ebpf::{
    helpers::{
        bpf_for_each_map_elem, bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id,
        bpf_ktime_get_boot_ns, bpf_ktime_get_ns, bpf_map_lookup_elem, bpf_sk_release,
    },
    maps::lpm_trie::Key,
    programs::SockAddrContext,
};
use dns_proxy_common::{
    AF_INET6, AGENT_FILLS_SERVING, ARMED_IPV4, ARMED_IPV6, AgentRecord, Counter, DNS_PORT,
    EXCLUDED_SUBTREE, Endpoint, Listener, MAX_EXCLUDED_LEVEL, OLDER_AGENT_ALIVE_FOR_NS,
    RedirectConfig, SERVER_PREFIX_BITS, SERVING_SLOTS, ServingKey, UNRESPONSIVE_AFTER_NS,
    listener_slot, server_prefix_data,
};

use crate::{
    AGENT_CGROUPS, AGENT_SOCKETS, AGENTS, ALIVE_AT, ARMED, EXCLUDED_CGROUPS, EXCLUDED_LEVELS,
    EXCLUDED_SERVER_COUNT, EXCLUDED_SERVERS, Hook, LISTENERS, SERVING,
    context::{
        ctx_bound_dev_if, ctx_local_port, ctx_mark, ctx_netns_cookie, ctx_sock_protocol,
        ctx_sock_type,
    },
    count,
    interface::chosen_interface,
};

/// The loopback device's index, in every network namespace.
pub const LOOPBACK_IFINDEX: u32 = 1;
/// `SOCK_STREAM` and `SOCK_DGRAM` from the kernel's net.h.
const SOCK_STREAM: u32 = 1;
pub const SOCK_DGRAM: u32 = 2;
/// The protocols of a DNS client's socket (uapi `in.h`): UDP, TCP, and MPTCP, which carries
/// TCP (its `connect` runs the hook on its first subflow, a TCP socket; MPTCP is taken too,
/// should a kernel run it on the MPTCP socket itself).
const IPPROTO_TCP: u32 = 6;
const IPPROTO_UDP: u32 = 17;
const IPPROTO_MPTCP: u32 = 262;

/// Whether the agent has attached every program and the block of `family` is routed here
/// (`ARMED`, whose bit for the family it sets last and clears while the block has no route):
/// the redirecting programs redirect nothing before the steering and decoding programs are
/// in place, nor to a block whose packets would leave the host. Nor for an agent that has not
/// said it runs for a while ([`agent_running`]; counted).
pub fn armed(family: u16) -> bool {
    let bit = if family == AF_INET6 {
        ARMED_IPV6
    } else {
        ARMED_IPV4
    };
    if ARMED.get(0).is_none_or(|armed| *armed & bit == 0) {
        return false;
    }
    if !agent_running() {
        count(Counter::AgentUnresponsive);
        return false;
    }
    true
}

/// Whether the agent said it was running less than [`UNRESPONSIVE_AFTER_NS`] ago (`ALIVE_AT`).
/// Stopped (SIGSTOP), frozen (`docker pause`, `cgroup.freeze`) or wedged, an agent keeps its
/// programs attached and its sockets open, and reads nothing: lookups sent to it would be lost
/// until it runs again. Past that, new ones go direct and those sent to the block are refused.
pub fn agent_running() -> bool {
    let Some(&alive_at) = ALIVE_AT.get(0) else {
        return false;
    };
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    now.saturating_sub(alive_at) < UNRESPONSIVE_AFTER_NS
}

/// Whether the proxy's socket for this kind of socket (`LISTENERS`: its TCP listener, or its
/// first UDP socket, of the family it will be sent to) is alive. A dead agent's sockets leave
/// the map as the kernel closes them, before its links are gone: from that moment nothing is
/// sent to it, and a client's retry goes direct.
pub fn proxy_alive(sock_type: u32, family: u16) -> bool {
    let listener = if sock_type == SOCK_STREAM {
        Listener::Tcp { family }
    } else {
        Listener::Udp { family, n: 0 }
    };
    let slot = listener_slot(listener);
    // SAFETY: a sockmap this object defines, and a key of its key size.
    unsafe {
        holds_socket(
            core::ptr::addr_of!(LISTENERS).cast_mut().cast(),
            core::ptr::addr_of!(slot).cast(),
        )
    }
}

/// Whether sockmap or sockhash `map` holds a socket at `key`.
///
/// # Safety
/// `map` must be a sockmap or sockhash this object defines, and `key` point to a key of its
/// key size, alive for the call. A socket the lookup returns holds a reference, released at
/// once, and is never dereferenced.
#[inline(always)]
unsafe fn holds_socket(map: *mut core::ffi::c_void, key: *const core::ffi::c_void) -> bool {
    // SAFETY: as the caller promises.
    unsafe {
        let sock = bpf_map_lookup_elem(map, key);
        if sock.is_null() {
            return false;
        }
        bpf_sk_release(sock);
    }
    true
}

/// Whether an agent serves `family`'s block on this agent's port (`SERVING`, any slot): this
/// one, or another before, during and after a takeover. The first slot is the one an agent
/// alone holds: one lookup, while one serves.
/// Read by the egress guard, which a dead agent leaves pinned in node mode.
pub fn an_agent_serves(config: &RedirectConfig, family: u16) -> bool {
    let port = if family == AF_INET6 {
        config.port6
    } else {
        config.port4
    };
    for slot in 0..SERVING_SLOTS {
        let key = ServingKey::new(config.redirected_cgroup, port, family, slot);
        // SAFETY: a sockhash this object defines, and a key of its key size.
        let held = unsafe {
            holds_socket(
                core::ptr::addr_of!(SERVING).cast_mut().cast(),
                core::ptr::addr_of!(key).cast(),
            )
        };
        if held {
            return true;
        }
    }
    false
}

/// Whether an agent of a version before `SERVING` said within
/// [`OLDER_AGENT_ALIVE_FOR_NS`] that it runs on the block's port (its record in `AGENTS`
/// lacks [`AGENT_FILLS_SERVING`]): it may serve the block and put nothing in `SERVING`, so
/// that an empty `SERVING` says nothing. Without this look, a rollback to such a version
/// within 60 s of this one's stop had its pods' connected sockets refused until the 60 s were
/// out (helper-204: every lookup of glibc, 286 of 286). Read by the egress guard only when
/// `SERVING` is empty: a walk of up to [`dns_proxy_common::MAX_AGENTS`] records.
pub fn an_older_agent_runs(config: &RedirectConfig) -> bool {
    let mut search = OlderAgentSearch {
        // SAFETY: a helper without arguments.
        now_ns: unsafe { bpf_ktime_get_boot_ns() },
        // The agents register with their IPv4 block's port, in host order.
        port: u16::from_be(config.port4),
        found: 0,
    };
    // SAFETY: a hash map this object defines; the callback is a static function of the
    // signature the helper calls, and `search` lives on the stack for the whole call.
    unsafe {
        bpf_for_each_map_elem(
            core::ptr::addr_of!(AGENTS).cast_mut().cast(),
            older_agent_record as *mut core::ffi::c_void,
            core::ptr::addr_of_mut!(search).cast(),
            0,
        );
    }
    search.found != 0
}

/// What [`older_agent_record`] looks for, and whether it found it.
#[repr(C)]
struct OlderAgentSearch {
    now_ns: u64,
    port: u16,
    found: u16,
}

/// `bpf_for_each_map_elem`'s callback over `AGENTS`: 1 (stop) at the first record of a live
/// agent of a version before `SERVING` on the search's port, 0 (go on) otherwise.
#[inline(never)]
extern "C" fn older_agent_record(
    _map: *mut core::ffi::c_void,
    _key: *mut core::ffi::c_void,
    record: *mut core::ffi::c_void,
    search: *mut core::ffi::c_void,
) -> i64 {
    // SAFETY: the helper passes a value of `AGENTS`, an `AgentRecord`, and the search it was
    // given, both valid for the call.
    let (record, search) = unsafe {
        (
            &*record.cast::<AgentRecord>(),
            &mut *search.cast::<OlderAgentSearch>(),
        )
    };
    let older_alive = record.port == search.port
        && record.flags & AGENT_FILLS_SERVING == 0
        && search.now_ns.saturating_sub(record.heartbeat_ns) <= OLDER_AGENT_ALIVE_FOR_NS;
    if older_alive {
        search.found = 1;
    }
    i64::from(older_alive)
}

/// Whether a socket headed for `port_be` is a DNS client we redirect: UDP always, TCP (or
/// MPTCP) on connect (sendmsg hooks only see datagrams anyway). A socket on port 53 itself is
/// a DNS server's: what it sends to port 53 is an answer to another server (or a forwarder's
/// query from the server's port), not a lookup of a workload, and is left alone. So is any
/// other protocol of those types, which the proxy cannot take: a UDP-Lite datagram sent to
/// the block found no socket there (`sk_lookup` runs for UDP only) and was lost, and an ICMP
/// "ping" socket connected to a server's port 53 was answered by this host (helper-98).
pub fn is_dns(ctx: &SockAddrContext, port_be: u16, hook: Hook) -> bool {
    let (sock_type, protocol) = (ctx_sock_type(ctx), ctx_sock_protocol(ctx));
    port_be == DNS_PORT.to_be()
        && ((sock_type == SOCK_DGRAM && protocol == IPPROTO_UDP)
            || (hook == Hook::Connect
                && sock_type == SOCK_STREAM
                && (protocol == IPPROTO_TCP || protocol == IPPROTO_MPTCP)))
        && ctx_local_port(ctx) != u32::from(DNS_PORT)
}

/// Whether the socket behind `ctx` is the agent's own, by its mark (`AGENT_SOCKETS`), or the
/// calling task's cgroup is excluded. The mark holds wherever the agent is: moved out of its
/// cgroup (into the one it redirects, say), it still never redirects its own queries to
/// itself nor refuses its own answers. Not inlined: the `connect6` path's frames are near the
/// kernel's 512-byte stack limit.
#[inline(never)]
pub fn is_agents_or_excluded(ctx: &SockAddrContext) -> bool {
    is_agents_socket(ctx) || is_excluded()
}

/// Whether the agent marked the socket behind `ctx` as its own.
#[inline(always)]
fn is_agents_socket(ctx: &SockAddrContext) -> bool {
    // SAFETY: looks up the socket's storage of the program's own map, never creating it; the
    // helper takes the context's socket, valid for the run, and the pointer is only tested.
    !unsafe { AGENT_SOCKETS.get_ptr_mut(ctx) }.is_null()
}

/// Whether the calling task's cgroup is excluded: an agent's (any agent of this block, the
/// one taking over from this one included), or below a cgroup listed with its subtree. Only
/// the levels that hold such a cgroup are looked at.
#[inline(never)]
fn is_excluded() -> bool {
    // SAFETY: a helper without arguments, which reads the calling task's cgroup.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    // SAFETY: a helper that takes a plain integer (it returns 0 for a level deeper than the
    // task's cgroup).
    is_excluded_cgroup(cgroup_id, |level| unsafe {
        bpf_get_current_ancestor_cgroup_id(level)
    })
}

/// Whether cgroup `cgroup_id`, whose ancestor at a level `ancestor` gives (0: none that
/// deep), is excluded: an agent's, or below a cgroup listed with its subtree.
#[inline(always)]
pub fn is_excluded_cgroup(cgroup_id: u64, ancestor: impl Fn(i32) -> u64) -> bool {
    // SAFETY: `get` is unsafe because an element may be removed or replaced while it is held;
    // these maps are `BPF_F_NO_PREALLOC`, so a removed element is freed only after the program
    // is done (RCU) and never reused meanwhile, and the value is only tested, never kept.
    if unsafe { AGENT_CGROUPS.get(cgroup_id) }.is_some() {
        return true;
    }
    // SAFETY: a read of a global the loader patches before load and nothing writes after;
    // volatile, so that the compiler cannot fold in the zero it was compiled with.
    let levels = unsafe { core::ptr::read_volatile(&EXCLUDED_LEVELS) };
    for level in 0..=MAX_EXCLUDED_LEVEL {
        if levels >> level == 0 {
            break;
        }
        if levels & (1 << level) == 0 {
            continue;
        }
        let ancestor = ancestor(level as i32);
        if ancestor == 0 {
            break; // the cgroup is shallower than this level
        }
        // SAFETY: as for `AGENT_CGROUPS` above: a `BPF_F_NO_PREALLOC` map, the value only
        // compared.
        if unsafe { EXCLUDED_CGROUPS.get(ancestor) } == Some(&EXCLUDED_SUBTREE) {
            return true;
        }
    }
    false
}

/// Whether the socket behind `ctx` lives in the agent's network namespace.
pub fn in_agent_namespace(ctx: &SockAddrContext, config: &RedirectConfig) -> bool {
    ctx_netns_cookie(ctx) == config.agent_netns
}

/// Whether a DNS socket headed for `server` must be left alone (counted when it is): an
/// excluded cgroup; another namespace, where a loopback or unspecified server is that
/// namespace's own and where a host-mode proxy cannot be reached; an excluded server; or a
/// socket bound to a device other than loopback, sending through one, or marked.
pub fn leave_alone(ctx: &SockAddrContext, config: &RedirectConfig, server: &Endpoint) -> bool {
    if !in_agent_namespace(ctx, config)
        && (config.foreign_namespaces == 0 || server.is_local_only())
    {
        count(Counter::SkippedForeignNamespace);
        return true;
    }
    if is_agents_or_excluded(ctx) {
        count(Counter::SkippedExcluded);
        return true;
    }
    if is_excluded_server(server) {
        count(Counter::SkippedExcludedServer);
        return true;
    }
    // In the agent's namespace the proxy's addresses are local, on `lo`: a socket bound to
    // another device (dnsmasq's `server=IP@eth0`, say) cannot reach them, and would lose
    // every lookup. In a pod the block is routed through one device, which a socket bound
    // to another (a second network's) cannot use either: left alone everywhere (fail-open).
    // The same for a socket that sends through another device without being bound to it
    // (`IP_UNICAST_IF`), and for a marked one (`SO_MARK`): policy routing by its mark (a VPN's
    // or a mesh's DNS forwarder) would not apply to the proxy's own socket.
    let bound = ctx_bound_dev_if(ctx);
    if (bound != 0 && bound != LOOPBACK_IFINDEX)
        || ctx_mark(ctx) != 0
        || chosen_interface(ctx, server.family) > LOOPBACK_IFINDEX
    {
        count(Counter::SkippedBoundDevice);
        return true;
    }
    false
}

/// Whether `server` is in a prefix of `EXCLUDED_SERVERS`. Not inlined, and its count a global
/// of its own rather than a field of `RedirectConfig`: either grew the callers' frames, and
/// the combined stack of the `connect6` path is near the kernel's 512-byte limit.
#[inline(never)]
fn is_excluded_server(server: &Endpoint) -> bool {
    // SAFETY: a read of a global the loader patches before load and nothing writes after;
    // volatile, so that the compiler cannot fold in the zero it was compiled with.
    if unsafe { core::ptr::read_volatile(&EXCLUDED_SERVER_COUNT) } == 0 {
        return false;
    }
    EXCLUDED_SERVERS
        .get(Key::new(SERVER_PREFIX_BITS, server_prefix_data(server)))
        .is_some()
}

/// Whether answers from the block are decoded for this socket: only where the proxy can
/// have sent them (the agent's namespace, or any in node mode), and never for an agent's own
/// sockets. An excluded cgroup's are decoded: a socket sent to the block before its process
/// moved into one (or before a takeover excluded its cgroup) still sends there, and its
/// answers must show its server, or resolvers drop every one. Checked once a peer is known to
/// be a block address.
pub fn decodes_here(ctx: &SockAddrContext, config: &RedirectConfig) -> bool {
    guarded_here(ctx, config) && !is_an_agents(ctx)
}

/// Whether the socket behind `ctx` is an agent's: marked by this one, or used by a task of
/// any agent's cgroup.
#[inline(never)]
fn is_an_agents(ctx: &SockAddrContext) -> bool {
    // SAFETY: a helper without arguments, which reads the calling task's cgroup.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    // SAFETY: as in `is_excluded_cgroup`: a `BPF_F_NO_PREALLOC` map, the value only tested.
    is_agents_socket(ctx) || unsafe { AGENT_CGROUPS.get(cgroup_id) }.is_some()
}

/// Whether the send guard applies to this socket: everywhere in node mode (the block is
/// routed to the node from every namespace), only in the agent's namespace in host mode
/// (another namespace's 127.53.x.y is its own, and nothing is decoded there).
pub fn guarded_here(ctx: &SockAddrContext, config: &RedirectConfig) -> bool {
    config.foreign_namespaces != 0 || in_agent_namespace(ctx, config)
}
