//! dns-proxy's kernel side: cgroup programs that send a workload's DNS to the local proxy and
//! make the answers look as if they came from the server the workload asked, and an
//! `sk_lookup` program that hands what reaches the proxy's addresses to the proxy's sockets.
//!
//! The redirect is self-describing (see `dns-proxy-common`): the address a socket is sent to
//! encodes its original server, as an index into the pinned, append-only `SERVERS` table.
//! - `connect4/6` (UDP and TCP) and `sendmsg4/6` (UDP) give the server an index and rewrite
//!   the destination to that index's address in the block, on the proxy's port.
//! - `recvmsg4/6` and `getpeername4/6` decode a source in the block back to the server.
//! - `bind4/6` keep everyone but the proxy off the block's addresses on the proxy's port.
//! - `sk_lookup` (on the agent's network namespace) steers the block to the proxy's sockets,
//!   and refuses packets from other namespaces whose index names a loopback server.
//!
//! Every cgroup program fails open: whatever goes wrong, the call is allowed unchanged.
#![no_std]
#![no_main]

mod context;

use aya_ebpf::{
    bindings::{BPF_F_NO_PREALLOC, BPF_NOEXIST},
    helpers::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_netns_cookie,
        bpf_map_lookup_elem, bpf_sk_release,
    },
    macros::{cgroup_sock_addr, map, sk_lookup},
    maps::{Array, HashMap, PerCpuArray, SockMap},
    programs::{SkLookupContext, SockAddrContext},
};
use dns_proxy_common::{
    AF_INET, AF_INET6, AgentCgroup, AgentRecord, Counter, DNS_PORT, EXCLUDED_SUBTREE, Endpoint,
    IPPROTO_TCP, LISTENER_SLOTS, Listener, MAX_AGENTS, MAX_EXCLUDED_CGROUPS, MAX_EXCLUDED_LEVEL,
    MAX_PROBES, MAX_SERVERS, Origin, RedirectConfig, listener_slot, server_key, v4_mapped_prefix,
};

use aya_log_ebpf::warn;

use crate::context::{LookupFields, SockAddr};

/// The verdict that lets a call through.
const ALLOW: i32 = 1;
/// The verdict that refuses a call (`EPERM`): only `bind4/6` give it.
const REFUSE: i32 = 0;
/// `sk_lookup` verdicts.
const SK_PASS: u32 = 1;
const SK_DROP: u32 = 0;
/// `BPF_SK_LOOKUP_F_REPLACE | BPF_SK_LOOKUP_F_NO_REUSEPORT`: the socket chosen replaces what
/// an earlier `sk_lookup` program chose (so an agent taking over, whose program runs after the
/// one of the agent it replaces, gets every new packet), and is the one that gets the packet,
/// even if it sits in an SO_REUSEPORT group that others joined.
const TAKE_OVER_AND_NO_REUSEPORT: u64 = 1 | 2;
/// The loopback device's index, in every network namespace.
const LOOPBACK_IFINDEX: u32 = 1;

/// `SOCK_STREAM` and `SOCK_DGRAM` from the kernel's net.h.
const SOCK_STREAM: u32 = 1;
const SOCK_DGRAM: u32 = 2;

/// The proxy's addresses and this namespace, written by the loader before load
/// (`names::REDIRECT_CONFIG`).
#[unsafe(no_mangle)]
static REDIRECT_CONFIG: RedirectConfig = RedirectConfig {
    agent_netns: 0,
    block6: [0; 4],
    block4: 0,
    capacity4: 0,
    capacity6: 0,
    port4: 0,
    port6: 0,
    udp_sockets: 0,
    foreign_namespaces: 0,
    metrics_family: 0,
    metrics_port: 0,
    _padding: [0; 2],
    metrics_addr: [0; 4],
};

/// Levels of the cgroup hierarchy that hold an excluded subtree, one bit each; written by the
/// loader before load (`names::EXCLUDED_LEVELS`).
#[unsafe(no_mangle)]
static EXCLUDED_LEVELS: u64 = 0;

#[map(name = "SERVERS")]
static SERVERS: HashMap<u32, Origin> = HashMap::pinned(MAX_SERVERS, BPF_F_NO_PREALLOC);

#[map(name = "SERVER_INDEX")]
static SERVER_INDEX: HashMap<Origin, u32> = HashMap::pinned(MAX_SERVERS, BPF_F_NO_PREALLOC);

#[map(name = "LISTENERS")]
static LISTENERS: SockMap = SockMap::with_max_entries(LISTENER_SLOTS, 0);

#[map(name = "EXCLUDED_CGROUPS")]
static EXCLUDED_CGROUPS: HashMap<u64, u8> =
    HashMap::with_max_entries(MAX_EXCLUDED_CGROUPS, BPF_F_NO_PREALLOC);

#[map(name = "AGENT_CGROUPS")]
static AGENT_CGROUPS: HashMap<u64, AgentCgroup> = HashMap::pinned(MAX_AGENTS, BPF_F_NO_PREALLOC);

/// Only the agents read and write it; declared here so that it is made and pinned with the rest.
#[map(name = "AGENTS")]
static AGENTS: HashMap<u64, AgentRecord> = HashMap::pinned(MAX_AGENTS, BPF_F_NO_PREALLOC);

#[map(name = "COUNTERS")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Counter::ALL.len() as u32, 0);

#[map(name = "ARMED")]
static ARMED: Array<u32> = Array::with_max_entries(1, 0);

/// Whether the agent has attached every program (it sets `ARMED` last): the redirecting
/// programs redirect nothing until the steering and decoding programs are in place.
fn armed() -> bool {
    ARMED.get(0).is_some_and(|armed| *armed == 1)
}

/// Whether the proxy's socket for this kind of socket (`LISTENERS`: its TCP listener, or its
/// first UDP socket, of the family it will be sent to) is alive. A dead agent's sockets leave
/// the map as the kernel closes them, before its links are gone: from that moment nothing is
/// sent to it, and a client's retry goes direct.
fn proxy_alive(sock_type: u32, family: u16) -> bool {
    let listener = if sock_type == SOCK_STREAM {
        Listener::Tcp { family }
    } else {
        Listener::Udp { family, n: 0 }
    };
    let slot = listener_slot(listener);
    // SAFETY: a lookup in a sockmap with a key on the stack; a socket it returns is released
    // at once.
    unsafe {
        let sock = bpf_map_lookup_elem(
            core::ptr::addr_of!(LISTENERS).cast_mut().cast(),
            core::ptr::addr_of!(slot).cast(),
        );
        if sock.is_null() {
            return false;
        }
        bpf_sk_release(sock);
    }
    true
}

#[cgroup_sock_addr(connect4)]
pub fn dns_proxy_connect4(ctx: SockAddrContext) -> i32 {
    let ctx = SockAddr::new(&ctx);
    if impersonates_proxy4(&ctx, None) {
        return REFUSE;
    }
    redirect4(&ctx, true)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn dns_proxy_sendmsg4(ctx: SockAddrContext) -> i32 {
    let ctx = SockAddr::new(&ctx);
    if impersonates_proxy4(&ctx, Some(ctx.msg_src_ip4())) {
        return REFUSE;
    }
    redirect4(&ctx, false)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn dns_proxy_recvmsg4(ctx: SockAddrContext) -> i32 {
    restore_server4(&SockAddr::new(&ctx));
    ALLOW
}

#[cgroup_sock_addr(getpeername4)]
pub fn dns_proxy_getpeername4(ctx: SockAddrContext) -> i32 {
    restore_server4(&SockAddr::new(&ctx));
    ALLOW
}

#[cgroup_sock_addr(connect6)]
pub fn dns_proxy_connect6(ctx: SockAddrContext) -> i32 {
    let ctx = SockAddr::new(&ctx);
    if impersonates_proxy6(&ctx, None) {
        return REFUSE;
    }
    redirect6(&ctx, true)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn dns_proxy_sendmsg6(ctx: SockAddrContext) -> i32 {
    let ctx = SockAddr::new(&ctx);
    if impersonates_proxy6(&ctx, Some(ctx.msg_src_ip6())) {
        return REFUSE;
    }
    redirect6(&ctx, false)
}

#[cgroup_sock_addr(recvmsg6)]
pub fn dns_proxy_recvmsg6(ctx: SockAddrContext) -> i32 {
    restore_server6(&SockAddr::new(&ctx));
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn dns_proxy_getpeername6(ctx: SockAddrContext) -> i32 {
    restore_server6(&SockAddr::new(&ctx));
    ALLOW
}

#[cgroup_sock_addr(bind4)]
pub fn dns_proxy_bind4(ctx: SockAddrContext) -> i32 {
    guard_bind4(&SockAddr::new(&ctx))
}

#[cgroup_sock_addr(bind6)]
pub fn dns_proxy_bind6(ctx: SockAddrContext) -> i32 {
    guard_bind6(&SockAddr::new(&ctx))
}

#[sk_lookup]
pub fn dns_proxy_sk_lookup(ctx: SkLookupContext) -> u32 {
    steer_to_proxy(&ctx)
}

fn config() -> RedirectConfig {
    // SAFETY: a plain read of a global; volatile, because the loader patches the value and
    // the compiler must not fold the zeros in.
    unsafe { core::ptr::read_volatile(&REDIRECT_CONFIG) }
}

/// Adds one to a counter of this CPU's; no other CPU writes it, so no atomic is needed.
/// Returns this CPU's new count (0 if it could not be counted).
fn count(counter: Counter) -> u64 {
    match COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: the pointer is to this CPU's slot of a live map value.
        Some(value) => unsafe {
            *value += 1;
            *value
        },
        None => 0,
    }
}

/// Whether a socket headed for `port_be` is a DNS client we redirect: UDP always, TCP on
/// connect (sendmsg hooks only see UDP anyway). A socket on port 53 itself is a DNS server's:
/// what it sends to port 53 is an answer to another server (or a forwarder's query from the
/// server's port), not a lookup of a workload, and is left alone.
fn is_dns(ctx: &SockAddr, port_be: u16, on_connect: bool) -> bool {
    let sock_type = ctx.sock_type();
    port_be == DNS_PORT.to_be()
        && (sock_type == SOCK_DGRAM || (on_connect && sock_type == SOCK_STREAM))
        && ctx.local_port() != u32::from(DNS_PORT)
}

/// Whether the calling task's cgroup is excluded: an agent's (any agent of this block, the
/// one taking over from this one included), or below a cgroup listed with its subtree. Only
/// the levels that hold such a cgroup are looked at.
fn is_excluded() -> bool {
    // SAFETY: helper calls without arguments that point anywhere.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    // SAFETY: the value is only compared, never kept past the call.
    if unsafe { AGENT_CGROUPS.get(&cgroup_id) }.is_some() {
        return true;
    }
    // SAFETY: a plain read of a global the loader patches.
    let levels = unsafe { core::ptr::read_volatile(&EXCLUDED_LEVELS) };
    for level in 0..=MAX_EXCLUDED_LEVEL {
        if levels >> level == 0 {
            break;
        }
        if levels & (1 << level) == 0 {
            continue;
        }
        // SAFETY: a helper call with a plain integer.
        let ancestor = unsafe { bpf_get_current_ancestor_cgroup_id(level as i32) };
        if ancestor == 0 {
            break; // the calling task's cgroup is shallower than this level
        }
        // SAFETY: as above.
        if unsafe { EXCLUDED_CGROUPS.get(&ancestor) } == Some(&EXCLUDED_SUBTREE) {
            return true;
        }
    }
    false
}

/// Whether the socket behind `ctx` lives in the agent's network namespace.
fn in_agent_namespace(ctx: &SockAddr, config: &RedirectConfig) -> bool {
    // SAFETY: the helper takes the program's own context.
    unsafe { bpf_get_netns_cookie(ctx.raw()) == config.agent_netns }
}

/// Whether a DNS socket headed for `server` must be left alone (counted when it is): an
/// excluded cgroup; or another namespace, where a loopback or unspecified server is that
/// namespace's own and where a host-mode proxy cannot be reached.
fn leave_alone(ctx: &SockAddr, config: &RedirectConfig, server: &Endpoint) -> bool {
    if !in_agent_namespace(ctx, config)
        && (config.foreign_namespaces == 0 || server.is_local_only())
    {
        count(Counter::SkippedForeignNamespace);
        return true;
    }
    if is_excluded() {
        count(Counter::SkippedExcluded);
        return true;
    }
    false
}

/// A cheap, well-mixed hash of an origin, to pick its first slot in the table.
fn hash(origin: &Origin) -> u32 {
    let mut h: u32 = 0x9e37_79b9;
    let cgroup = [origin.cgroup_id as u32, (origin.cgroup_id >> 32) as u32];
    for word in origin.server.addr.into_iter().chain(cgroup) {
        h = (h ^ word).wrapping_mul(0x85eb_ca6b);
        h ^= h >> 13;
    }
    h ^ u32::from(origin.server.port)
}

/// The index of `server`, asked by the calling task's cgroup, in its family's table (1 to
/// `capacity`): the pair's own, so the proxy knows which workload asked; or, if the table has
/// no room for the pair, the index every cgroup shares for that server (cgroup 0), so the
/// lookup is still redirected. `None` (counted) if neither can be had.
fn index_for(ctx: &SockAddrContext, server: Endpoint, capacity: u32) -> Option<u32> {
    // SAFETY: a helper call without arguments.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    let shared = Origin::new(server, 0);
    let mut created = false;
    let index = match index_of(&Origin::new(server, cgroup_id), capacity, &mut created) {
        Some(index) => {
            // A server's first pair also takes its shared origin, while there is room: when
            // the table is full, cgroups that ask it later still reach the proxy through it.
            if created {
                let _ = index_of(&shared, capacity, &mut created);
            }
            Some(index)
        }
        None => index_of(&shared, capacity, &mut created),
    };
    if index.is_none() {
        table_full(ctx);
    }
    index
}

/// The index of `origin` in its family's table (1 to `capacity`), given one if it has none
/// (`created` then set: an out-parameter, since an `Option` of a tuple with a `bool` makes
/// BTF the kernel refuses); `None` if it can get none. Slots are taken with `BPF_NOEXIST`, so
/// two CPUs that race for one agree on whose it is, and a slot, once taken, never changes
/// while it is in use.
fn index_of(origin: &Origin, capacity: u32, created: &mut bool) -> Option<u32> {
    let family = origin.server.family;
    // SAFETY: the value is copied out at once.
    if let Some(index) = unsafe { SERVER_INDEX.get(origin) }.copied() {
        // The reverse entry is only a shortcut: the table itself must agree (a lost or
        // replaced pin must not send a socket to another server's address).
        // SAFETY: the value is only compared.
        let agrees = unsafe { SERVERS.get(&server_key(family, index)) } == Some(origin);
        if agrees && index <= capacity {
            return Some(index);
        }
        if agrees {
            // An index from a larger block than this agent's: it cannot be encoded here.
            return None;
        }
    }
    let first = hash(origin) % capacity;
    for probe in 0..MAX_PROBES {
        let index = (first + probe) % capacity + 1;
        let key = server_key(family, index);
        let taken = match SERVERS.insert(&key, origin, u64::from(BPF_NOEXIST)) {
            Ok(()) => true,
            // SAFETY: the value is only compared.
            Err(_) => (unsafe { SERVERS.get(&key) }) == Some(origin),
        };
        if taken {
            // A lost reverse entry only costs the next socket a probe.
            let _ = SERVER_INDEX.insert(origin, &index, 0);
            *created = true;
            return Some(index);
        }
    }
    None
}

/// Counts a server that got no index, and says so in the log at the 1st, 2nd, 4th, 8th...
/// time on each CPU: a workload that fills the table cannot flood the log.
fn table_full(ctx: &SockAddrContext) {
    let times = count(Counter::TableFull);
    if times.is_power_of_two() {
        warn!(
            ctx,
            "dns-proxy: a server got no index (the table is full, {} times on this CPU): its \
             socket goes direct",
            times
        );
    }
}

/// connect4 / sendmsg4: send a DNS socket to its server's address in the IPv4 block; the
/// verdict. A workload's socket may not address the block itself: the address would claim
/// another workload's origin.
fn redirect4(ctx: &SockAddr, on_connect: bool) -> i32 {
    let (addr, port_be) = (ctx.user_ip4(), ctx.user_port());
    let config = config();
    if config.capacity4 != 0 && addresses_proxy4(&config, addr, port_be) {
        return verdict_on_block_address(ctx, &config, AF_INET, index_in_block4(&config, addr));
    }
    if !is_dns(ctx, port_be, on_connect) {
        return ALLOW;
    }
    if config.capacity4 == 0 || !armed() || !proxy_alive(ctx.sock_type(), AF_INET) {
        return ALLOW;
    }
    let server = Endpoint::v4(addr, port_be);
    if leave_alone(ctx, &config, &server) {
        return ALLOW;
    }
    let Some(index) = index_for(ctx.context(), server, config.capacity4) else {
        return ALLOW;
    };
    ctx.set_user_ip4(block4_address(&config, index));
    ctx.set_user_port(config.port4);
    count(Counter::Redirected);
    ALLOW
}

/// What a socket addressing block address `index` on the proxy's port is told: a workload may
/// address only an origin of its own cgroup, or one shared by every cgroup (as the program of
/// an agent that ran before this one, during a takeover, rewrote it); any other is refused
/// (`EPERM`), so no workload can send as another's. Agents' and excluded cgroups' sockets
/// are let be.
fn verdict_on_block_address(
    ctx: &SockAddr,
    config: &RedirectConfig,
    family: u16,
    index: Option<u32>,
) -> i32 {
    // In host mode the block is the agent's namespace's loopback: another namespace's
    // addresses that look the same are that namespace's own.
    if is_excluded() || (config.foreign_namespaces == 0 && !in_agent_namespace(ctx, config)) {
        return ALLOW;
    }
    // SAFETY: a helper call without arguments.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    let origin = index.and_then(|index| {
        // SAFETY: the value is copied out at once.
        unsafe { SERVERS.get(&server_key(family, index)) }.copied()
    });
    match origin {
        Some(origin) if origin.cgroup_id == cgroup_id || origin.cgroup_id == 0 => ALLOW,
        _ => {
            count(Counter::ForeignRefused);
            REFUSE
        }
    }
}

/// connect6 / sendmsg6: the same for IPv6 sockets. A v4-mapped destination (a dual-stack
/// socket talking to an IPv4 server) goes to the v4-mapped address of the IPv4 block, so its
/// packets stay IPv4.
fn redirect6(ctx: &SockAddr, on_connect: bool) -> i32 {
    let (addr, port_be) = (ctx.user_ip6(), ctx.user_port());
    let config = config();
    let prefix = v4_mapped_prefix();
    let mapped = addr[..3] == prefix;
    if mapped && config.capacity4 != 0 && addresses_proxy4(&config, addr[3], port_be) {
        let index = index_in_block4(&config, addr[3]);
        return verdict_on_block_address(ctx, &config, AF_INET, index);
    }
    if !mapped
        && config.capacity6 != 0
        && port_be == config.port6
        && let Some(index) = index_in_block6(&config, addr)
    {
        return verdict_on_block_address(ctx, &config, AF_INET6, Some(index));
    }
    if !is_dns(ctx, port_be, on_connect) || !armed() {
        return ALLOW;
    }
    if mapped {
        if config.capacity4 == 0 || !proxy_alive(ctx.sock_type(), AF_INET) {
            return ALLOW;
        }
        let server = Endpoint::v4(addr[3], port_be);
        if leave_alone(ctx, &config, &server) {
            return ALLOW;
        }
        let Some(index) = index_for(ctx.context(), server, config.capacity4) else {
            return ALLOW;
        };
        let to = block4_address(&config, index);
        ctx.set_user_ip6([prefix[0], prefix[1], prefix[2], to]);
        ctx.set_user_port(config.port4);
    } else {
        if config.capacity6 == 0 || is_link_local6(addr) || !proxy_alive(ctx.sock_type(), AF_INET6)
        {
            return ALLOW;
        }
        let server = Endpoint::v6(addr, port_be);
        if leave_alone(ctx, &config, &server) {
            return ALLOW;
        }
        let Some(index) = index_for(ctx.context(), server, config.capacity6) else {
            return ALLOW;
        };
        ctx.set_user_ip6(block6_address(&config, index));
        ctx.set_user_port(config.port6);
    }
    count(Counter::Redirected);
    ALLOW
}

/// Whether a socket addresses the proxy directly (a block address on its port).
fn addresses_proxy4(config: &RedirectConfig, addr: u32, port_be: u16) -> bool {
    port_be == config.port4 && index_in_block4(config, addr).is_some()
}

/// Whether an IPv6 address is link-local (fe80::/10) or multicast (ff00::/8): its zone (the
/// interface) is part of the socket's address but not of the context the programs see, so
/// the proxy could not reach it the way the client meant. Such a server is left alone and
/// asked directly.
fn is_link_local6(addr: [u32; 4]) -> bool {
    let first = addr[0].to_ne_bytes();
    (first[0] == 0xfe && first[1] & 0xc0 == 0x80) || first[0] == 0xff
}

/// Index `index`'s address in the IPv4 block, network order.
fn block4_address(config: &RedirectConfig, index: u32) -> u32 {
    (u32::from_be(config.block4) + index).to_be()
}

/// Index `index`'s address in the IPv6 block (its last 16 bits), network-order words.
fn block6_address(config: &RedirectConfig, index: u32) -> [u32; 4] {
    let [a, b, c, d] = config.block6;
    [a, b, c, (u32::from_be(d) | index).to_be()]
}

/// The index a network-order IPv4 address encodes, if it is in the block.
fn index_in_block4(config: &RedirectConfig, addr: u32) -> Option<u32> {
    let index = u32::from_be(addr).wrapping_sub(u32::from_be(config.block4));
    (index >= 1 && index <= config.capacity4).then_some(index)
}

/// The index a network-order IPv6 address encodes, if it is in the block.
fn index_in_block6(config: &RedirectConfig, addr: [u32; 4]) -> Option<u32> {
    let block = config.block6;
    if addr[..3] != block[..3] || config.capacity6 == 0 {
        return None;
    }
    let index = u32::from_be(addr[3]).wrapping_sub(u32::from_be(block[3]));
    (index >= 1 && index <= config.capacity6).then_some(index)
}

/// The server of index `index` of `family`'s block, counted as unknown if there is none.
fn server_at(family: u16, index: u32) -> Option<Endpoint> {
    // SAFETY: the value is copied out at once.
    let origin = unsafe { SERVERS.get(&server_key(family, index)) }.copied();
    if origin.is_none() {
        count(Counter::UnknownIndex);
    }
    origin.map(|origin| origin.server)
}

/// Whether answers from the block are decoded for this socket: only where the proxy can
/// have sent them (the agent's namespace, or any in node mode), and never for the proxy's own
/// sockets. Checked once a peer is known to be a block address.
fn decodes_here(ctx: &SockAddr, config: &RedirectConfig) -> bool {
    (config.foreign_namespaces != 0 || in_agent_namespace(ctx, config)) && !is_excluded()
}

/// recvmsg4 / getpeername4: a peer in the block, on the proxy's port, is shown as the server
/// its address encodes.
fn restore_server4(ctx: &SockAddr) {
    let config = config();
    if config.capacity4 == 0 || ctx.user_port() != config.port4 {
        return;
    }
    let Some(index) = index_in_block4(&config, ctx.user_ip4()) else {
        return;
    };
    if !decodes_here(ctx, &config) {
        return;
    }
    let Some(server) = server_at(AF_INET, index) else {
        return;
    };
    ctx.set_user_ip4(server.addr[0]);
    ctx.set_user_port(server.port);
    count(Counter::ReverseTranslated);
}

/// recvmsg6 / getpeername6: the same for IPv6 sockets, whose peer may be a v4-mapped address
/// of the IPv4 block; the server is shown exactly as the socket addressed it.
fn restore_server6(ctx: &SockAddr) {
    let config = config();
    let (addr, port_be) = (ctx.user_ip6(), ctx.user_port());
    let prefix = v4_mapped_prefix();
    let server = if addr[..3] == prefix {
        if config.capacity4 == 0 || port_be != config.port4 {
            return;
        }
        let Some(index) = index_in_block4(&config, addr[3]) else {
            return;
        };
        if !decodes_here(ctx, &config) {
            return;
        }
        let Some(server) = server_at(AF_INET, index) else {
            return;
        };
        Endpoint::v6(
            [prefix[0], prefix[1], prefix[2], server.addr[0]],
            server.port,
        )
    } else {
        if port_be != config.port6 {
            return;
        }
        let Some(index) = index_in_block6(&config, addr) else {
            return;
        };
        if !decodes_here(ctx, &config) {
            return;
        }
        let Some(server) = server_at(AF_INET6, index) else {
            return;
        };
        server
    };
    ctx.set_user_ip6(server.addr);
    ctx.set_user_port(server.port);
    count(Counter::ReverseTranslated);
}

/// connect4 / sendmsg4: a socket on the proxy's port may not send from a block address,
/// whether bound there (before the agent started, when no bind guard ran) or asking for it
/// with `IP_PKTINFO` (`source`): `recvmsg4` would present what it sends as a server's. Only
/// the proxy may (refused with `EPERM`, counted).
fn impersonates_proxy4(ctx: &SockAddr, source: Option<u32>) -> bool {
    let config = config();
    if config.capacity4 == 0 || ctx.local_port() != u32::from(u16::from_be(config.port4)) {
        return false;
    }
    let from_block = index_in_block4(&config, ctx.local_ip4()).is_some()
        || source.is_some_and(|source| index_in_block4(&config, source).is_some());
    from_block && guarded_here(ctx, &config) && refuse_unless_excluded()
}

/// Whether the send guard applies to this socket: everywhere in node mode (the block is
/// routed to the node from every namespace), only in the agent's namespace in host mode
/// (another namespace's 127.53.x.y is its own, and nothing is decoded there).
fn guarded_here(ctx: &SockAddr, config: &RedirectConfig) -> bool {
    config.foreign_namespaces != 0 || in_agent_namespace(ctx, config)
}

/// connect6 / sendmsg6: the same for IPv6 sockets, the v4-mapped block included.
fn impersonates_proxy6(ctx: &SockAddr, source: Option<[u32; 4]>) -> bool {
    let config = config();
    let port = ctx.local_port();
    let in_block = |addr: [u32; 4]| {
        if addr[..3] == v4_mapped_prefix() {
            port == u32::from(u16::from_be(config.port4))
                && index_in_block4(&config, addr[3]).is_some()
        } else {
            port == u32::from(u16::from_be(config.port6))
                && index_in_block6(&config, addr).is_some()
        }
    };
    let from_block = in_block(ctx.local_ip6()) || source.is_some_and(in_block);
    from_block && guarded_here(ctx, &config) && refuse_unless_excluded()
}

/// Whether to refuse a socket's use of a block address on the proxy's port: always, but for
/// the proxy's own (excluded) cgroup. Counted when refused.
fn refuse_unless_excluded() -> bool {
    if is_excluded() {
        return false;
    }
    count(Counter::ImpersonationRefused);
    true
}

/// bind4: no socket of the agent's namespace but the proxy's may take a block address on
/// the proxy's port, from where `recvmsg4` would present its datagrams as the server's.
fn guard_bind4(ctx: &SockAddr) -> i32 {
    let config = config();
    if config.capacity4 == 0
        || ctx.user_port() != config.port4
        || index_in_block4(&config, ctx.user_ip4()).is_none()
    {
        return ALLOW;
    }
    refuse_bind_unless_excluded(ctx, &config)
}

/// bind6: the same for IPv6 sockets, v4-mapped block addresses included.
fn guard_bind6(ctx: &SockAddr) -> i32 {
    let config = config();
    let (addr, port_be) = (ctx.user_ip6(), ctx.user_port());
    let in_block = if addr[..3] == v4_mapped_prefix() {
        port_be == config.port4 && index_in_block4(&config, addr[3]).is_some()
    } else {
        port_be == config.port6 && index_in_block6(&config, addr).is_some()
    };
    if !in_block {
        return ALLOW;
    }
    refuse_bind_unless_excluded(ctx, &config)
}

fn refuse_bind_unless_excluded(ctx: &SockAddr, config: &RedirectConfig) -> i32 {
    // Another namespace's block addresses are nobody's: the proxy never answers from there.
    if !in_agent_namespace(ctx, config) || !refuse_unless_excluded() {
        return ALLOW;
    }
    REFUSE
}

/// Whether a lookup is a TCP connection to the metrics listener's address and port (any local
/// address, for a wildcard listener).
fn is_for_metrics(lookup: &LookupFields, config: &RedirectConfig) -> bool {
    if config.metrics_family == 0
        || lookup.protocol != u32::from(IPPROTO_TCP)
        || lookup.local_port != u32::from(config.metrics_port)
        || lookup.family != u32::from(config.metrics_family)
    {
        return false;
    }
    let addr = config.metrics_addr;
    if u16::from(config.metrics_family) == AF_INET {
        addr[0] == 0 || addr[0] == lookup.local_ip4
    } else {
        addr == [0; 4] || addr == lookup.local_ip6
    }
}

/// sk_lookup: a packet to a block address on the proxy's port goes to one of the proxy's
/// sockets, whatever else is bound there; one whose index names a loopback or unspecified
/// server must come from this namespace (the loopback device), or it is dropped.
fn steer_to_proxy(ctx: &SkLookupContext) -> u32 {
    let lookup = LookupFields::read(ctx);
    let config = config();
    if is_for_metrics(&lookup, &config) {
        // The newest agent's metrics listener, whoever else joined its port: a process of the
        // same user id cannot answer its probes. Missing (going away): left as it was.
        let _ = LISTENERS.redirect_sk_lookup(
            ctx,
            listener_slot(Listener::Metrics),
            TAKE_OVER_AND_NO_REUSEPORT,
        );
        return SK_PASS;
    }
    let (family, index, port4_or_6) = match lookup.family {
        2 => match index_in_block4(&config, lookup.local_ip4) {
            Some(index) => (AF_INET, index, config.port4),
            None => return SK_PASS,
        },
        10 => match index_in_block6(&config, lookup.local_ip6) {
            Some(index) => (AF_INET6, index, config.port6),
            None => return SK_PASS,
        },
        _ => return SK_PASS,
    };
    // local_port is in host order in this context.
    if lookup.local_port != u32::from(u16::from_be(port4_or_6)) {
        return SK_PASS;
    }
    // In host mode the blocks are this namespace's alone: nothing from another interface.
    if config.foreign_namespaces == 0 && lookup.ingress_ifindex != LOOPBACK_IFINDEX {
        count(Counter::ForeignRefused);
        return SK_DROP;
    }
    let Some(server) = server_at(family, index) else {
        return SK_PASS; // nothing to serve: no socket takes it, the sender hears so
    };
    if server.is_local_only() && lookup.ingress_ifindex != LOOPBACK_IFINDEX {
        count(Counter::ForeignRefused);
        return SK_DROP;
    }
    let listener = if lookup.protocol == u32::from(IPPROTO_TCP) {
        Listener::Tcp { family }
    } else {
        // Any UDP socket serves any client; spread clients by their port.
        let sockets = u32::from(config.udp_sockets).max(1);
        let n = (u32::from(lookup.remote_port) ^ lookup.remote_hash) % sockets;
        Listener::Udp { family, n }
    };
    // A socket missing from the map (the proxy is going away) leaves the lookup as it was:
    // to the agent this one took over from, while that one still serves.
    let _ = LISTENERS.redirect_sk_lookup(ctx, listener_slot(listener), TAKE_OVER_AND_NO_REUSEPORT);
    SK_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
