//! dns-proxy's kernel side: cgroup programs that send a workload's DNS to the local proxy and
//! make the answers look as if they came from the server the workload asked, and an
//! `sk_lookup` program that hands what reaches the proxy's addresses to the proxy's sockets.
//!
//! The redirect is self-describing (see `dns-proxy-common`): the address a socket is sent to
//! encodes its original server, as an index into the pinned, append-only `SERVERS` table.
//! - `connect4/6` (UDP and TCP) and `sendmsg4/6` (UDP) give the server an index and rewrite
//!   the destination to that index's address in the block, on the proxy's port; `connect4`
//!   first binds an unbound IPv4 socket of the agent's namespace to the source it would have
//!   had (`SOURCE4`), not the one the route to the block would give it.
//! - `recvmsg4/6` and `getpeername4/6` decode a source in the block back to the server.
//! - `bind4/6` keep everyone but the proxy off the block's addresses on the proxy's port, and
//!   `cgroup_skb/egress` drops any packet but the proxy's sent from there.
//! - `sk_lookup` (on the agent's network namespace) steers the block to the proxy's sockets,
//!   and refuses packets from other namespaces whose index names a loopback server.
//!
//! Every cgroup program fails open: whatever goes wrong, the call is allowed unchanged.
//!
//! Where things are, in the order a call meets them (the layout of cilium's `bpf/bpf_sock.c`):
//! - this file: the maps, the globals the loader patches, and the entry points, one line each;
//! - `sock`: the translation behind the cgroup hooks: `sock4_xlate_fwd` / `sock6_xlate_fwd`
//!   (connect, sendmsg), `sock4_xlate_rev` / `sock6_xlate_rev` (recvmsg, getpeername), and the
//!   guards on bind and on sending from the proxy's addresses; a v4-mapped address of a
//!   dual-stack socket takes the IPv4 path;
//! - `egress`: the guard on every packet sent from the block on the proxy's port;
//! - `cgroup/sock_release` (in `sock`): a socket connected to the block lets go of its index;
//! - `made`: `raw_tp/cgroup_mkdir` excludes a cgroup made at an excluded path as it is made;
//! - `interface`: `cgroup/setsockopt` notes a socket that chooses the interface it sends
//!   through, which the redirect then leaves alone;
//! - `steer`: what `sk_lookup` does with a packet to the block;
//! - `block`: the block's addresses and the server table behind them (an index per origin);
//! - `scope`: which sockets the programs act on (armed, a live proxy, DNS, excluded cgroups,
//!   the agent's namespace);
//! - `context`: the `ctx_*` accessors, the only raw access to the programs' contexts.
#![no_std]
#![no_main]
// `atomic_xadd`: the bpf target's `core::sync::atomic` has no `fetch_add` (block.rs,
// `atomic_add`). Built for bpf with `RUSTC_BOOTSTRAP=1` (dns-proxy/build.rs); the host build
// (clippy) uses `AtomicU64`.
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]
#![cfg_attr(target_arch = "bpf", allow(internal_features))]

mod block;
mod context;
mod egress;
mod interface;
mod made;
mod scope;
mod sock;
mod steer;

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    btf_maps::SkStorage,
    macros::{
        btf_map, cgroup_skb, cgroup_sock, cgroup_sock_addr, cgroup_sockopt, map, raw_tracepoint,
        sk_lookup,
    },
    maps::{Array, HashMap, LpmTrie, PerCpuArray, SockHash, SockMap},
    programs::{
        RawTracePointContext, SkBuffContext, SkLookupContext, SockAddrContext, SockContext,
        SockoptContext,
    },
};
use dns_proxy_common::{
    AgentCgroup, AgentRecord, CgroupOffsets, CgroupPath, Counter, EXCLUDED_CGROUP_ENTRIES,
    LISTENER_SLOTS, MAX_AGENTS, MAX_CONNECTED, MAX_EXCLUDED_CGROUPS, MAX_EXCLUDED_SERVERS,
    MAX_SERVERS, MAX_SERVING, NO_ROOM_ENTRIES, NoRoom, Origin, RedirectConfig, ServerPrefixData,
    ServingKey,
};

use crate::{
    egress::{NETNS_TOLD, NETNS_UNTOLD, guard_egress},
    interface::note_unicast_if,
    made::exclude_made_cgroup,
    sock::{
        release_sock, sock4_connect, sock4_guard_bind, sock4_sendmsg, sock4_xlate_rev,
        sock6_connect, sock6_guard_bind, sock6_sendmsg, sock6_xlate_rev,
    },
    steer::steer_to_proxy,
};

/// The verdict that lets a call through.
const ALLOW: i32 = 1;
/// The verdict that refuses a call (`EPERM`): given only to a socket that would use the
/// proxy's addresses (bind, or connect and sendmsg from or to them).
const REFUSE: i32 = 0;

/// The proxy's addresses and this namespace, written by the loader before load
/// (`names::REDIRECT_CONFIG`).
#[unsafe(no_mangle)]
static REDIRECT_CONFIG: RedirectConfig = RedirectConfig {
    agent_netns: 0,
    redirected_cgroup: 0,
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

/// Slots of `SERVERS` each cgroup took, against `MAX_ORIGINS_PER_CGROUP`: an entry per cgroup
/// that took one, so no more than the table has slots while the agent removes those of
/// departed cgroups.
#[map(name = "CGROUP_ORIGINS")]
static CGROUP_ORIGINS: HashMap<u64, u64> = HashMap::pinned(MAX_SERVERS, BPF_F_NO_PREALLOC);

/// What the agent adds to a cgroup's `CGROUP_ORIGINS` (its walk's corrections); read only
/// here.
#[map(name = "CGROUP_ADJUST")]
static CGROUP_ADJUST: HashMap<u64, i64> = HashMap::pinned(MAX_SERVERS, BPF_F_NO_PREALLOC);

/// The most slots of `SERVERS` one cgroup may take (0: no limit); written by the loader
/// before load (`names::MAX_ORIGINS_PER_CGROUP`).
#[unsafe(no_mangle)]
static MAX_ORIGINS_PER_CGROUP: u32 = 0;

/// Origins whose search for a free slot found none, and when, at the entry their hash picks:
/// for [`dns_proxy_common::NO_ROOM_FOR_NS`], their sockets skip the search. On a full `/16`
/// a search is 64 lookups in a table of 18 MiB: a connect of a workload with no pair of its
/// own took 7.3 µs with it, 4.1 µs with the skip. An array, not an LRU map: a full LRU map's
/// insert evicts by walking its lists (with one, a failed search took 44 µs at p50 against
/// 21 µs without, in one run). Not pinned (each agent's programs have their own).
#[map(name = "NO_ROOM")]
static NO_ROOM: Array<NoRoom> = Array::with_max_entries(NO_ROOM_ENTRIES, 0);

#[map(name = "LISTENERS")]
static LISTENERS: SockMap = SockMap::with_max_entries(LISTENER_SLOTS, 0);

/// The serving agent's first UDP socket, by port and family: pinned and
/// shared by the table's agents, so that the egress guard a dead agent left pinned tells
/// whether another serves now. The kernel takes a socket out as it closes it.
#[map(name = "SERVING")]
static SERVING: SockHash<ServingKey> = SockHash::pinned(MAX_SERVING, 0);

/// Written by the agent and by `raw_tp/cgroup_mkdir`. Preallocated, as a map a tracing program
/// writes should be (kernels before 6.1 warn of one that allocates).
#[map(name = "EXCLUDED_CGROUPS")]
static EXCLUDED_CGROUPS: HashMap<u64, u8> = HashMap::with_max_entries(EXCLUDED_CGROUP_ENTRIES, 0);

/// Written by the agent before it attaches `raw_tp/cgroup_mkdir`; preallocated, as
/// `EXCLUDED_CGROUPS`.
#[map(name = "EXCLUDED_PATHS")]
static EXCLUDED_PATHS: HashMap<u64, CgroupPath> =
    HashMap::with_max_entries(MAX_EXCLUDED_CGROUPS, 0);

/// Where `raw_tp/cgroup_mkdir` reads a new cgroup's path: too long for the stack.
#[map(name = "NEW_CGROUP_PATH")]
static NEW_CGROUP_PATH: PerCpuArray<CgroupPath> = PerCpuArray::with_max_entries(1, 0);

/// Where a new cgroup's id and hierarchy are in this kernel's structs; written by the loader
/// before load (`names::CGROUP_OFFSETS`).
#[unsafe(no_mangle)]
static CGROUP_OFFSETS: CgroupOffsets = CgroupOffsets {
    cgroup_kn: 0,
    cgroup_root: 0,
    root_hierarchy_id: 0,
    kernfs_node_id: 0,
};

/// How many prefixes `EXCLUDED_SERVERS` holds; written by the loader before load
/// (`names::EXCLUDED_SERVER_COUNT`).
#[unsafe(no_mangle)]
static EXCLUDED_SERVER_COUNT: u32 = 0;

/// The agent's random key for where a new origin's search for a slot starts; written by the
/// loader before load (`names::TABLE_HASH_KEY`).
#[unsafe(no_mangle)]
static TABLE_HASH_KEY: [u64; 2] = [0; 2];

/// Written by the agent before it attaches, and not after; looked up only when
/// `EXCLUDED_SERVER_COUNT` says it holds something.
#[map(name = "EXCLUDED_SERVERS")]
static EXCLUDED_SERVERS: LpmTrie<ServerPrefixData, u8> =
    LpmTrie::with_max_entries(MAX_EXCLUDED_SERVERS, 0);

#[map(name = "AGENT_CGROUPS")]
static AGENT_CGROUPS: HashMap<u64, AgentCgroup> = HashMap::pinned(MAX_AGENTS, BPF_F_NO_PREALLOC);

/// The agents write it; the egress guard reads it ([`scope::an_older_agent_runs`]).
#[map(name = "AGENTS")]
static AGENTS: HashMap<u64, AgentRecord> = HashMap::pinned(MAX_AGENTS, BPF_F_NO_PREALLOC);

#[map(name = "COUNTERS")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Counter::ALL.len() as u32, 0);

#[map(name = "ARMED")]
static ARMED: Array<u32> = Array::with_max_entries(1, 0);

#[map(name = "ALIVE_AT")]
static ALIVE_AT: Array<u64> = Array::with_max_entries(1, 0);

/// Socket cookie → server key: sockets connected to an index's address, until released.
#[map(name = "CONNECTED")]
static CONNECTED: HashMap<u64, u32> = HashMap::pinned(MAX_CONNECTED, BPF_F_NO_PREALLOC);

/// Socket cookie → the cgroup whose share of `CONNECTED` the socket's note is charged to.
#[map(name = "CONNECTED_CHARGE")]
static CONNECTED_CHARGE: HashMap<u64, u64> = HashMap::pinned(MAX_CONNECTED, BPF_F_NO_PREALLOC);

/// Cgroup id → the notes of `CONNECTED` charged to it. An entry per cgroup with a note at
/// most, as the agent removes those at 0.
#[map(name = "CONNECTED_PER_CGROUP")]
static CONNECTED_PER_CGROUP: HashMap<u64, u64> = HashMap::pinned(MAX_CONNECTED, BPF_F_NO_PREALLOC);

/// Until when (`CLOCK_MONOTONIC` ns) `sk_lookup` refuses UDP datagrams to each index's address
/// (by `server_key`): the agent found that index's server's port closed.
#[map(name = "REFUSING")]
static REFUSING: Array<u64> = Array::with_max_entries(MAX_SERVERS, 0);

/// The IPv4 address the agent's namespace sends from toward the Internet (network order; 0:
/// none), for `connect4` to bind redirected sockets to.
#[map(name = "SOURCE4")]
static SOURCE4: Array<u32> = Array::with_max_entries(1, 0);

/// IPv4 server (network order) → the address the agent's namespace sends from toward it, for
/// the servers whose route picks another source than `SOURCE4`'s (a server on another link, a
/// VPN's, the host's own address). Written by the agent alone.
#[map(name = "SOURCE4_BY_SERVER")]
static SOURCE4_BY_SERVER: HashMap<u32, u32> =
    HashMap::with_max_entries(MAX_SERVERS, BPF_F_NO_PREALLOC);

/// Socket → the interfaces it chose to send through, by index: by `IP_UNICAST_IF` /
/// `IPV6_UNICAST_IF`, and by the sticky `IPV6_PKTINFO`, as `cgroup/setsockopt` saw them set;
/// the kernel frees it with the socket.
#[btf_map(name = "UNICAST_IF")]
static UNICAST_IF: SkStorage<[u32; 2]> = SkStorage::new();

/// The agent's own sockets, which it marks as it makes them (`names::AGENT_SOCKETS`): never
/// redirected, refused or decoded, whatever cgroup the agent is in when it uses them.
#[btf_map(name = "AGENT_SOCKETS")]
static AGENT_SOCKETS: SkStorage<u8> = SkStorage::new();

/// The hook a forward translation runs in.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Hook {
    /// `connect4/6`: UDP and TCP sockets.
    Connect,
    /// `sendmsg4/6`: unconnected UDP sockets, which may ask for a source address.
    Sendmsg,
}

#[cgroup_sock_addr(connect4)]
pub fn dns_proxy_connect4(ctx: SockAddrContext) -> i32 {
    sock4_connect(&ctx)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn dns_proxy_sendmsg4(ctx: SockAddrContext) -> i32 {
    sock4_sendmsg(&ctx)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn dns_proxy_recvmsg4(ctx: SockAddrContext) -> i32 {
    sock4_xlate_rev(&ctx)
}

#[cgroup_sock_addr(getpeername4)]
pub fn dns_proxy_getpeername4(ctx: SockAddrContext) -> i32 {
    sock4_xlate_rev(&ctx)
}

#[cgroup_sock_addr(connect6)]
pub fn dns_proxy_connect6(ctx: SockAddrContext) -> i32 {
    sock6_connect(&ctx)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn dns_proxy_sendmsg6(ctx: SockAddrContext) -> i32 {
    sock6_sendmsg(&ctx)
}

#[cgroup_sock_addr(recvmsg6)]
pub fn dns_proxy_recvmsg6(ctx: SockAddrContext) -> i32 {
    sock6_xlate_rev(&ctx)
}

#[cgroup_sock_addr(getpeername6)]
pub fn dns_proxy_getpeername6(ctx: SockAddrContext) -> i32 {
    sock6_xlate_rev(&ctx)
}

#[cgroup_sock_addr(bind4)]
pub fn dns_proxy_bind4(ctx: SockAddrContext) -> i32 {
    sock4_guard_bind(&ctx)
}

#[cgroup_sock_addr(bind6)]
pub fn dns_proxy_bind6(ctx: SockAddrContext) -> i32 {
    sock6_guard_bind(&ctx)
}

#[cgroup_sock(sock_release)]
pub fn dns_proxy_sock_release(ctx: SockContext) -> i32 {
    release_sock(&ctx)
}

#[cgroup_sockopt(setsockopt)]
pub fn dns_proxy_setsockopt(ctx: SockoptContext) -> i32 {
    note_unicast_if(&ctx)
}

#[cgroup_skb(egress)]
pub fn dns_proxy_egress(ctx: SkBuffContext) -> i32 {
    guard_egress::<NETNS_TOLD>(&ctx)
}

/// `dns_proxy_egress` for kernels before Linux 6.18, which give a `cgroup_skb` program no
/// network namespace: the loader attaches it where the kernel refuses the other.
#[cgroup_skb(egress)]
pub fn dns_proxy_guard_any_netns(ctx: SkBuffContext) -> i32 {
    guard_egress::<NETNS_UNTOLD>(&ctx)
}

#[raw_tracepoint(tracepoint = "cgroup_mkdir")]
pub fn dns_proxy_exclude_made(ctx: RawTracePointContext) -> i32 {
    exclude_made_cgroup(&ctx);
    0
}

#[sk_lookup]
pub fn dns_proxy_sk_lookup(ctx: SkLookupContext) -> u32 {
    steer_to_proxy(&ctx)
}

/// The configuration the loader wrote into `REDIRECT_CONFIG`.
fn config() -> RedirectConfig {
    // SAFETY: a read of a global that lives as long as the program and that nothing writes
    // while it runs (the loader patches it before load); volatile, so that the compiler cannot
    // fold in the zeros it was compiled with.
    unsafe { core::ptr::read_volatile(&REDIRECT_CONFIG) }
}

/// Adds one to a counter of this CPU's; no other CPU writes it, so no atomic is needed.
/// Returns this CPU's new count (0 if it could not be counted).
fn count(counter: Counter) -> u64 {
    match COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: a non-null pointer to this CPU's slot of a per-CPU array, whose slots live as
        // long as the map; programs on other CPUs count in slots of their own, and the agent
        // only reads. A program that interrupts this one on this CPU and counts the same
        // counter can cost one count, never memory: the slot is a plain, aligned u64.
        Some(value) => unsafe {
            *value += 1;
            *value
        },
        None => 0,
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
