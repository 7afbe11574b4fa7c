//! The translation behind the cgroup `sock_addr` hooks, as in cilium's `bpf/bpf_sock.c`:
//! forward on connect and sendmsg (`sock4_xlate_fwd`, `sock6_xlate_fwd`: a DNS socket is sent
//! to its server's address in the block), reverse on recvmsg and getpeername
//! (`sock4_xlate_rev`, `sock6_xlate_rev`: a peer in the block is shown as its server), and
//! the guards that keep every socket but the proxy's off the block (`sock4_guard_bind`,
//! `sock6_guard_bind`, `impersonates_proxy4/6`). A dual-stack socket's v4-mapped address takes
//! the IPv4 path (`xlate_fwd4`, `xlate_rev4`), written back v4-mapped.
//!
//! Each returns the hook's verdict and fails open: whatever goes wrong, the call is allowed
//! unchanged. Only a socket that would use the proxy's addresses is refused.
use aya_ebpf::{
    EbpfContext as _,
    bindings::BPF_NOEXIST,
    helpers::{bpf_get_current_cgroup_id, bpf_get_socket_cookie},
    programs::{SockAddrContext, SockContext},
};
use dns_proxy_common::{
    AF_INET, AF_INET6, Counter, Endpoint, MAX_CONNECTED_PER_CGROUP, RedirectConfig, server_key,
    v4_mapped_prefix,
};

use crate::{
    ALLOW, CONNECTED, CONNECTED_CHARGE, CONNECTED_PER_CGROUP, Hook, REFUSE, SOURCE4,
    SOURCE4_BY_SERVER,
    block::{
        addresses_proxy4, atomic_add, block4_address, block6_address, encodes, index_for,
        index_in_block4, index_in_block6, origin_at, server_at,
    },
    config,
    context::{
        ctx_bind_source4, ctx_bind_source6, ctx_local_ip4, ctx_local_ip6, ctx_local_port,
        ctx_msg_src_ip4, ctx_msg_src_ip6, ctx_peer4, ctx_peer6, ctx_set_user_ip4, ctx_set_user_ip6,
        ctx_set_user_port, ctx_sock_family, ctx_sock_kind, ctx_sock_peer, ctx_sock_type,
        ctx_user_ip4, ctx_user_ip6, ctx_user_port,
    },
    count,
    scope::{
        SOCK_DGRAM, armed, decodes_here, guarded_here, in_agent_namespace, is_agents_or_excluded,
        is_dns, leave_alone, proxy_alive,
    },
};

/// connect4: [`sock4_xlate_fwd`]; a socket it sends to the block is first given the source
/// it would have had without the agent ([`bind_direct_source4`]).
pub fn sock4_connect(ctx: &SockAddrContext) -> i32 {
    let server = ctx_user_ip4(ctx);
    let verdict = sock4_xlate_fwd(ctx, Hook::Connect);
    if ctx_user_ip4(ctx) != server {
        bind_direct_source4(ctx, server);
    }
    verdict
}

/// Binds an IPv4 socket of the agent's namespace that `connect4` sends to the block, and that
/// has no address or port yet, to the address the agent found toward `server_be`
/// (`SOURCE4_BY_SERVER`) or, for a server it has not seen or that the default route reaches,
/// toward the Internet (`SOURCE4`), as connecting it to `server_be` directly would have. Without it
/// the route to the block picks the source (127.0.0.1, or the block's address on a node),
/// which `getsockname` shows, and which a later `connect` of the same socket elsewhere keeps
/// and cannot route. A loopback or unspecified server keeps the loopback source it would have
/// had. IPv6 sockets are left alone: binding one to an IPv6 address makes it IPv6-only for
/// good, and binding a dual-stack one to a v4-mapped address keeps it off IPv6 after a
/// disconnect; that includes one connected with an IPv4 address, which runs `connect4` (an
/// adversarial review's could not connect to an IPv6 server after a disconnect:
/// `EAFNOSUPPORT`). Best effort: a bind that fails (the address just went away) leaves the
/// socket as it was.
fn bind_direct_source4(ctx: &SockAddrContext, server_be: u32) {
    let config = config();
    if ctx_sock_family(ctx) != u32::from(AF_INET)
        || Endpoint::v4(server_be, 0).is_local_only()
        || !in_agent_namespace(ctx, &config)
        || ctx_local_ip4(ctx) != 0
        || ctx_local_port(ctx) != 0
    {
        return;
    }
    // SAFETY: a value the agent writes whole; read once.
    let source = match unsafe { SOURCE4_BY_SERVER.get(server_be) } {
        Some(&source) => source,
        None => SOURCE4.get(0).copied().unwrap_or(0),
    };
    if source != 0 {
        ctx_bind_source4(ctx, source);
    }
}

/// connect6: [`sock6_xlate_fwd`]; a socket of the agent's namespace it sends to the block for
/// a server at `::1` or `::` is first bound to `::1`, the source it would have had
/// ([`bind_loopback_source6`]). Inlined into the program, and the bind in a frame of its own
/// after [`sock6_xlate_fwd`] returns: one frame more on that path is past Linux 6.1's 512
/// bytes ("combined stack size of 5 calls is 544").
#[inline(always)]
pub fn sock6_connect(ctx: &SockAddrContext) -> i32 {
    let loopback_server = native_loopback6_flag(ctx_user_ip6(ctx));
    let verdict = sock6_xlate_fwd(ctx, Hook::Connect);
    if loopback_server != 0 && !is_native_loopback6(ctx_user_ip6(ctx)) {
        bind_loopback_source6(ctx);
    }
    verdict
}

/// 1 if `addr_be` is `::1` or `::` ([`is_native_loopback6`]), else 0, computed without a
/// branch. With a branch, the verifier walked all of [`sock6_xlate_fwd`] once with the flag
/// set and once more with it clear (it is live across the call): 167k instructions processed
/// instead of 56k, and 45 MB of kernel memory charged to the agent at start instead of 25 MB.
fn native_loopback6_flag(addr_be: [u32; 4]) -> u64 {
    let [a, b, c, d] = addr_be;
    let rest = u64::from(a | b | c | (d & !u32::from_ne_bytes([0, 0, 0, 1])));
    // Hidden from LLVM, which would otherwise turn the arithmetic below back into a comparison,
    // and so into a branch.
    // SAFETY: a read of a live, aligned local.
    let rest = unsafe { core::ptr::read_volatile(&rest) };
    // `rest` < 2^32: its negation has the top bit set unless it is 0.
    1 - (rest.wrapping_neg() >> 63)
}

/// `::1` or `::`, not a v4-mapped address (a dual-stack socket bound to `::1` could no longer
/// reach an IPv4 server, and its IPv4 path has a source of its own).
fn is_native_loopback6(addr_be: [u32; 4]) -> bool {
    let [a, b, c, d] = addr_be;
    a == 0 && b == 0 && c == 0 && (d == 0 || d == u32::from_ne_bytes([0, 0, 0, 1]))
}

/// Binds an IPv6 socket of the agent's namespace that `connect6` sends to the block for a
/// loopback or unspecified server, and that has no address or port yet, to `::1`. Without it
/// the route to the block picks the source among the host's addresses (RFC 6724: its ULA or
/// global one), which `getsockname` showed for a socket that asked `[::1]:53`; once that
/// address expired (SLAAC, privacy addresses, renumbering) every lookup of the socket was
/// lost, and the agent's answers left the host towards it (helper-123). IPv6 sockets to other
/// servers are left alone (see [`bind_direct_source4`]). Best effort, as there.
#[inline(never)]
fn bind_loopback_source6(ctx: &SockAddrContext) {
    let config = config();
    if !in_agent_namespace(ctx, &config) || ctx_local_ip6(ctx) != [0; 4] || ctx_local_port(ctx) != 0
    {
        return;
    }
    ctx_bind_source6(ctx, [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])]);
}

/// sendmsg4: [`sock4_xlate_fwd`], but a `sendto` that names the server of the block address
/// its socket is connected to goes to that address ([`sends_to_its_peers_server4`]), once the
/// guard has seen the source it asks for.
pub fn sock4_sendmsg(ctx: &SockAddrContext) -> i32 {
    if sends_to_its_peers_server4(ctx) {
        return if impersonates_proxy4(ctx, Hook::Sendmsg) {
            REFUSE
        } else {
            ALLOW
        };
    }
    sock4_xlate_fwd(ctx, Hook::Sendmsg)
}

/// sendmsg6: the same for IPv6 sockets ([`sends_to_its_peers_server6`]). Apart from
/// [`sock6_xlate_fwd`], which `connect6` shares: that path's stack is at its limit.
pub fn sock6_sendmsg(ctx: &SockAddrContext) -> i32 {
    if sends_to_its_peers_server6(ctx) {
        return if impersonates_proxy6(ctx, Hook::Sendmsg) {
            REFUSE
        } else {
            ALLOW
        };
    }
    sock6_xlate_fwd(ctx, Hook::Sendmsg)
}

/// connect4 / sendmsg4: a socket that would send as the proxy is refused; a DNS socket is sent
/// to its server's address in the IPv4 block. A send to the peer the socket is connected to
/// is left as its `connect` left it ([`sends_to_its_peer4`]), once the guard has seen the
/// source it asks for.
pub fn sock4_xlate_fwd(ctx: &SockAddrContext, hook: Hook) -> i32 {
    // The guard first: a send to the socket's own peer may still ask for a block source.
    if impersonates_proxy4(ctx, hook) {
        return REFUSE;
    }
    if sends_to_its_peer4(ctx, hook) {
        return ALLOW;
    }
    let config = config();
    match xlate_fwd4(ctx, &config, ctx_user_ip4(ctx), ctx_user_port(ctx), hook) {
        Forward4::Leave(verdict) => verdict,
        Forward4::Redirect(index) => {
            ctx_set_user_ip4(ctx, block4_address(&config, index));
            to_proxy_port(ctx, config.port4, hook, server_key(AF_INET, index))
        }
    }
}

/// connect6 / sendmsg6: the same for IPv6 sockets. A v4-mapped destination (a dual-stack
/// socket talking to an IPv4 server) takes the IPv4 path and goes to the v4-mapped address of
/// the IPv4 block, so its packets stay IPv4.
pub fn sock6_xlate_fwd(ctx: &SockAddrContext, hook: Hook) -> i32 {
    if impersonates_proxy6(ctx, hook) {
        return REFUSE;
    }
    if sends_to_its_peer6(ctx, hook) {
        return ALLOW;
    }
    let (addr, port_be) = (ctx_user_ip6(ctx), ctx_user_port(ctx));
    let config = config();
    let prefix = v4_mapped_prefix();
    if addr[..3] == prefix {
        return match xlate_fwd4(ctx, &config, addr[3], port_be, hook) {
            Forward4::Leave(verdict) => verdict,
            Forward4::Redirect(index) => {
                let to = block4_address(&config, index);
                ctx_set_user_ip6(ctx, [prefix[0], prefix[1], prefix[2], to]);
                to_proxy_port(ctx, config.port4, hook, server_key(AF_INET, index))
            }
        };
    }
    if config.capacity6 != 0
        && port_be == config.port6
        && let Some(index) = index_in_block6(&config, addr)
    {
        let verdict = verdict_on_block_address(ctx, &config, AF_INET6, Some(index));
        if verdict == SHARED_ORIGIN
            && let Some(own) = own_origin_of_shared(ctx, AF_INET6, index)
        {
            ctx_set_user_ip6(ctx, block6_address(&config, own));
            return to_proxy_port(ctx, config.port6, hook, server_key(AF_INET6, own));
        }
        return held_if_connected(ctx, hook, AF_INET6, index, verdict);
    }
    if !is_dns(ctx, port_be, hook) || !armed(AF_INET6) {
        return ALLOW;
    }
    if config.capacity6 == 0 || is_link_local6(addr) || !proxy_alive(ctx_sock_type(ctx), AF_INET6) {
        return ALLOW;
    }
    let server = Endpoint::v6(addr, port_be);
    if leave_alone(ctx, &config, &server) {
        return ALLOW;
    }
    let Some(index) = index_for(ctx, server, config.capacity6) else {
        return ALLOW;
    };
    ctx_set_user_ip6(ctx, block6_address(&config, index));
    to_proxy_port(ctx, config.port6, hook, server_key(AF_INET6, index))
}

/// Whether a `sendmsg4` names the peer its socket is connected to. The kernel runs the hook for
/// every send of a dual-stack socket connected to a v4-mapped address (its IPv4 path is given
/// the peer as the destination), and for a `sendto` that names the peer. `connect` decided
/// where such a socket goes, as it does for an IPv4 socket's `send`, which runs no hook:
/// redirecting its sends would send a socket connected straight to its server (before an
/// agent ran, say) to the block, whose answers its connection refuses, and refusing them
/// would fail a socket connected to the block by another cgroup's process.
fn sends_to_its_peer4(ctx: &SockAddrContext, hook: Hook) -> bool {
    if hook != Hook::Sendmsg {
        return false;
    }
    let (peer, peer_port) = ctx_peer4(ctx);
    // A port of 0: not connected.
    peer_port != 0 && peer_port == ctx_user_port(ctx) && peer == ctx_user_ip4(ctx)
}

/// The same for a `sendmsg6` that names the peer its IPv6 socket is connected to (a `sendto`
/// naming it: a connected IPv6 socket's `send` runs no hook).
fn sends_to_its_peer6(ctx: &SockAddrContext, hook: Hook) -> bool {
    if hook != Hook::Sendmsg {
        return false;
    }
    let (peer, peer_port) = ctx_peer6(ctx);
    peer_port != 0 && peer_port == ctx_user_port(ctx) && peer == ctx_user_ip6(ctx)
}

/// Whether a `sendmsg4` names the server of the block address its socket is connected to (a
/// `sendto` of the server's own address, on a socket `connect` sent to the block); if so, the
/// send goes to that peer, as the socket's `send` would. Redirected anew it would take the
/// index of the sending process's cgroup, which is not the connecting one's once the socket
/// was passed on or its process moved, and the connected socket would refuse the answer,
/// which comes from that other index's address. Not inlined: its frame would add to the
/// redirect's.
#[inline(never)]
fn sends_to_its_peers_server4(ctx: &SockAddrContext) -> bool {
    let (peer, peer_port) = ctx_peer4(ctx);
    // Not connected: the usual `sendto`, at the cost of two field reads.
    if peer_port == 0 {
        return false;
    }
    let config = config();
    if config.capacity4 == 0 || peer_port != config.port4 {
        return false;
    }
    let server = [ctx_user_ip4(ctx), 0, 0, 0];
    let index = index_in_block4(&config, peer);
    if !is_peers_server(ctx, &config, AF_INET, index, &server, ctx_user_port(ctx)) {
        return false;
    }
    ctx_set_user_ip4(ctx, peer);
    ctx_set_user_port(ctx, peer_port);
    true
}

/// The same for a `sendmsg6`: a dual-stack socket connected to a v4-mapped block address that
/// names its IPv4 server v4-mapped, or an IPv6 socket connected to the IPv6 block that names
/// its IPv6 server. Not inlined: its frame would add to the redirect's.
#[inline(never)]
fn sends_to_its_peers_server6(ctx: &SockAddrContext) -> bool {
    let (peer, peer_port) = ctx_peer6(ctx);
    // Not connected: the usual `sendto`.
    if peer_port == 0 {
        return false;
    }
    let config = &config();
    let addr = ctx_user_ip6(ctx);
    let prefix = v4_mapped_prefix();
    let (family, index, server) = if addr[..3] == prefix {
        if peer[..3] != prefix || config.capacity4 == 0 || peer_port != config.port4 {
            return false;
        }
        (
            AF_INET,
            index_in_block4(config, peer[3]),
            [addr[3], 0, 0, 0],
        )
    } else {
        if peer[..3] == prefix || config.capacity6 == 0 || peer_port != config.port6 {
            return false;
        }
        (AF_INET6, index_in_block6(config, peer), addr)
    };
    if !is_peers_server(ctx, config, family, index, &server, ctx_user_port(ctx)) {
        return false;
    }
    ctx_set_user_ip6(ctx, peer);
    ctx_set_user_port(ctx, peer_port);
    true
}

/// Whether block address `index` of `family` (a socket's peer) encodes the server
/// `addr`:`port_be`, for a socket the block's guard applies to: an excluded process's too,
/// which may send there with `send` anyway (left alone, its `sendto` went direct, from a
/// socket that takes answers from the block address only).
#[inline(always)]
fn is_peers_server(
    ctx: &SockAddrContext,
    config: &RedirectConfig,
    family: u16,
    index: Option<u32>,
    addr: &[u32; 4],
    port_be: u16,
) -> bool {
    match index {
        Some(index) => guarded_here(ctx, config) && encodes(family, index, addr, port_be),
        None => false,
    }
}

/// What the forward translation makes of an IPv4 destination.
enum Forward4 {
    /// The call gets this verdict, its destination unchanged.
    Leave(i32),
    /// The socket is sent to this index's address of the IPv4 block, on the proxy's port.
    Redirect(u32),
}

/// The forward translation of the IPv4 destination `addr`:`port_be`, a v4 socket's or the
/// v4-mapped one of a dual-stack socket. A workload's socket may not address the block itself
/// (the address would claim another workload's origin); a DNS client the proxy takes is
/// redirected; any other is left alone.
// Always inlined: a BPF call takes at most five arguments, in registers, and this one's six
// (its result is returned through a pointer) would not compile as a call.
#[inline(always)]
fn xlate_fwd4(
    ctx: &SockAddrContext,
    config: &RedirectConfig,
    addr: u32,
    port_be: u16,
    hook: Hook,
) -> Forward4 {
    if config.capacity4 != 0 && addresses_proxy4(config, addr, port_be) {
        let index = index_in_block4(config, addr);
        let verdict = verdict_on_block_address(ctx, config, AF_INET, index);
        let Some(index) = index else {
            return Forward4::Leave(verdict);
        };
        if verdict == SHARED_ORIGIN
            && let Some(own) = own_origin_of_shared(ctx, AF_INET, index)
        {
            return Forward4::Redirect(own);
        }
        return Forward4::Leave(held_if_connected(ctx, hook, AF_INET, index, verdict));
    }
    if !is_dns(ctx, port_be, hook)
        || config.capacity4 == 0
        || !armed(AF_INET)
        || !proxy_alive(ctx_sock_type(ctx), AF_INET)
    {
        return Forward4::Leave(ALLOW);
    }
    let server = Endpoint::v4(addr, port_be);
    if leave_alone(ctx, config, &server) {
        return Forward4::Leave(ALLOW);
    }
    match index_for(ctx, server, config.capacity4) {
        Some(index) => Forward4::Redirect(index),
        None => Forward4::Leave(ALLOW),
    }
}

/// The last step of a redirect, once the address is written: the proxy's port; counted. A
/// socket connected there holds the index (`key`) until it is released.
fn to_proxy_port(ctx: &SockAddrContext, port_be: u16, hook: Hook, key: u32) -> i32 {
    ctx_set_user_port(ctx, port_be);
    count(Counter::Redirected);
    if hook == Hook::Connect {
        hold_index(ctx, key);
    }
    ALLOW
}

/// Notes that the UDP socket behind `ctx` is connected to the address of server key `key`
/// (`CONNECTED`), so that the agent does not give that index to another origin while the
/// socket may still send there. A TCP connection needs no note: the agent reads its server
/// once, when it accepts it; and noting one would leak, as a TCP socket can leave the block
/// before its release (a failed connect, a disconnect), and an MPTCP connect runs the hook on
/// a subflow whose release runs none.
///
/// The note is charged to the connecting cgroup (`CONNECTED_CHARGE`, `CONNECTED_PER_CGROUP`),
/// once per socket: a cgroup past its share ([`MAX_CONNECTED_PER_CGROUP`]) is not noted, so
/// that one workload holding many sockets cannot fill the map for the others. Not inlined,
/// and the note inlined into it: the `connect6` path's stack is near its limit (Linux 6.1
/// refused a frame more: "combined stack size of 5 calls is 544").
#[inline(never)]
fn hold_index(ctx: &SockAddrContext, key: u32) {
    if ctx_sock_type(ctx) != SOCK_DGRAM {
        return;
    }
    // SAFETY: the helper takes the program's own context, which it was given.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: a helper with no arguments.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    note_connected(cookie, cgroup_id, key);
}

/// Notes socket `cookie` as connected to the address of server key `key`, charged to cgroup
/// `cgroup_id` ([`hold_index`]); also for a socket found connected to an index of a table that
/// is gone (`egress`).
#[inline(always)]
pub(crate) fn note_connected(cookie: u64, cgroup_id: u64, key: u32) {
    // SAFETY: `get` is unsafe because an element may change while held; it is only tested.
    if unsafe { CONNECTED_CHARGE.get(cookie) }.is_some() {
        // Noted and charged already (connected again within the block): the note follows
        // the socket, and an update of an existing entry needs no room.
        let _ = CONNECTED.insert(cookie, key, 0);
        return;
    }
    // SAFETY: as above; the count is copied out at once.
    let charged = unsafe { CONNECTED_PER_CGROUP.get(cgroup_id) }
        .copied()
        .unwrap_or(0);
    // Past its share, or full: not noted, as before the map, and counted. Two CPUs of one
    // cgroup may both pass at its last place: a share is exceeded by a socket per CPU.
    if (charged as i64) >= MAX_CONNECTED_PER_CGROUP as i64
        || CONNECTED.insert(cookie, key, 0).is_err()
    {
        count(Counter::ConnectedNotNoted);
        return;
    }
    // The charge after the note, and out before it at release: a charge never outlives its
    // note.
    if CONNECTED_CHARGE.insert(cookie, cgroup_id, 0).is_err() {
        return;
    }
    if CONNECTED_PER_CGROUP.get_ptr_mut(cgroup_id).is_none() {
        // Room for it: an entry per cgroup with a note at most, but those at 0 the agent has
        // not removed yet.
        let _ = CONNECTED_PER_CGROUP.insert(cgroup_id, 0, u64::from(BPF_NOEXIST));
    }
    if let Some(count) = CONNECTED_PER_CGROUP.get_ptr_mut(cgroup_id) {
        // SAFETY: a pointer into the map's value, aligned and valid while the program runs;
        // every other writer (another CPU) adds to it atomically too.
        unsafe { atomic_add(count, 1) };
    }
}

/// cgroup/sock_release: a UDP socket going away lets go of the index it was connected to,
/// and of its charge. Every socket of the cgroup comes here, and an update of the map takes a
/// lock: only UDP sockets are noted ([`hold_index`]), and one whose peer is not in the block
/// (connected elsewhere since, or disconnected) is looked up first, without the lock.
///
/// The agent leaves this program attached when it stops (pinned, `SOCK_RELEASE_LINK`), so
/// that a socket released while no agent runs takes its note out too. Two agents' programs
/// may run for one socket during a takeover: only the one whose delete of the charge succeeds
/// gives it back.
pub fn release_sock(ctx: &SockContext) -> i32 {
    if ctx_sock_kind(ctx) != SOCK_DGRAM {
        return ALLOW;
    }
    // SAFETY: the helper takes the program's own context, which it was given.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: as in `hold_index`; the cgroup id is copied out at once.
    if let Some(cgroup_id) = unsafe { CONNECTED_CHARGE.get(cookie) }.copied()
        && CONNECTED_CHARGE.remove(cookie).is_ok()
        && let Some(count) = CONNECTED_PER_CGROUP.get_ptr_mut(cgroup_id)
    {
        // SAFETY: as in `hold_index`. Adding `u64::MAX` takes one away.
        unsafe { atomic_add(count, u64::MAX) };
    }
    let (family, addr, port) = ctx_sock_peer(ctx);
    let in_block = port != 0 && is_block_peer(&config(), family, addr, port);
    // SAFETY: `get` is unsafe because an element may change while held; it is only tested.
    if in_block || unsafe { CONNECTED.get(cookie) }.is_some() {
        let _ = CONNECTED.remove(cookie);
    }
    ALLOW
}

/// Whether a peer is an address of the block on the proxy's port (an IPv4 one, or a v4-mapped
/// one of a dual-stack socket, in the IPv4 block).
fn is_block_peer(config: &RedirectConfig, family: u32, addr: [u32; 4], port_be: u16) -> bool {
    block_peer_index(config, family, addr, port_be).is_some()
}

/// The family and index of the block address a peer is, on the proxy's port (an IPv4 one, or
/// a v4-mapped one of a dual-stack socket, in the IPv4 block).
pub(crate) fn block_peer_index(
    config: &RedirectConfig,
    family: u32,
    addr: [u32; 4],
    port_be: u16,
) -> Option<(u16, u32)> {
    if family == u32::from(AF_INET6) && addr[..3] != v4_mapped_prefix() {
        if port_be != config.port6 {
            return None;
        }
        return index_in_block6(config, addr).map(|index| (AF_INET6, index));
    }
    let addr4 = if family == u32::from(AF_INET6) {
        addr[3]
    } else {
        addr[0]
    };
    if port_be != config.port4 {
        return None;
    }
    index_in_block4(config, addr4).map(|index| (AF_INET, index))
}

/// What a socket addressing block address `index` on the proxy's port is told: a workload may
/// address only an origin of its own cgroup, or one shared by every cgroup (as the program of
/// an agent that ran before this one, during a takeover, rewrote it); any other is refused
/// (`EPERM`), so no workload can send as another's. Agents' and excluded cgroups' sockets
/// are let be. [`ALLOWED_AND_HELD`]: an origin of the socket's own cgroup, which it holds once
/// connected there; [`SHARED_ORIGIN`]: a shared one, which the socket is moved off.
fn verdict_on_block_address(
    ctx: &SockAddrContext,
    config: &RedirectConfig,
    family: u16,
    index: Option<u32>,
) -> i32 {
    // In host mode the block is the agent's namespace's loopback: another namespace's
    // addresses that look the same are that namespace's own.
    if is_agents_or_excluded(ctx)
        || (config.foreign_namespaces == 0 && !in_agent_namespace(ctx, config))
    {
        return ALLOW;
    }
    // SAFETY: a helper without arguments, which reads the calling task's cgroup.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    let Some(index) = index else {
        count(Counter::ForeignRefused);
        return REFUSE;
    };
    match origin_at(family, index) {
        Some(origin) if origin.cgroup_id == cgroup_id => ALLOWED_AND_HELD,
        Some(origin) if origin.cgroup_id == 0 => SHARED_ORIGIN,
        _ => {
            count(Counter::ForeignRefused);
            REFUSE
        }
    }
}

/// [`verdict_on_block_address`]'s verdict for a socket addressing an origin of its own cgroup:
/// allowed, and, connected there, holding it ([`held_if_connected`]).
const ALLOWED_AND_HELD: i32 = 2;

/// [`verdict_on_block_address`]'s verdict for a workload's socket addressing a server's shared
/// origin: sent on to its own cgroup's origin of that server ([`own_origin_of_shared`]), so
/// that no workload can go unnamed by asking the shared address itself; where the table has no
/// room for it, allowed and held as [`ALLOWED_AND_HELD`].
const SHARED_ORIGIN: i32 = 3;

/// The index of the calling cgroup's own origin of the server that shared origin `index` of
/// `family` names ([`index_for`]: made if there is room, else the shared one again, counted).
/// Inlined: as a frame of its own it sat between the redirect's and `index_for`'s, on
/// `connect6`'s deepest path one frame more than Linux 6.1's verifier allows.
#[inline(always)]
fn own_origin_of_shared(ctx: &SockAddrContext, family: u16, index: u32) -> Option<u32> {
    let server = server_at(family, index)?;
    let config = config();
    let capacity = if family == AF_INET {
        config.capacity4
    } else {
        config.capacity6
    };
    index_for(ctx, server, capacity)
}

/// The verdict the kernel gets for a socket addressing block address `index` directly: a
/// socket connected to an origin it may address holds it, as one the redirect sent there.
fn held_if_connected(
    ctx: &SockAddrContext,
    hook: Hook,
    family: u16,
    index: u32,
    verdict: i32,
) -> i32 {
    if verdict != ALLOWED_AND_HELD && verdict != SHARED_ORIGIN {
        return verdict;
    }
    if hook == Hook::Connect {
        hold_index(ctx, server_key(family, index));
    }
    ALLOW
}

/// Whether an IPv6 address is link-local (fe80::/10) or multicast (ff00::/8): its zone (the
/// interface) is part of the socket's address but not of the context the programs see, so
/// the proxy could not reach it the way the client meant. Such a server is left alone and
/// asked directly.
fn is_link_local6(addr: [u32; 4]) -> bool {
    let first = addr[0].to_ne_bytes();
    (first[0] == 0xfe && first[1] & 0xc0 == 0x80) || first[0] == 0xff
}

/// recvmsg4 / getpeername4: a peer in the block, on the proxy's port, is shown as the server
/// its address encodes.
pub fn sock4_xlate_rev(ctx: &SockAddrContext) -> i32 {
    let config = config();
    if let Some(server) = xlate_rev4(ctx, &config, ctx_user_ip4(ctx), ctx_user_port(ctx)) {
        ctx_set_user_ip4(ctx, server.addr[0]);
        from_server_port(ctx, server.port);
    }
    ALLOW
}

/// recvmsg6 / getpeername6: the same for IPv6 sockets, whose peer may be a v4-mapped address
/// of the IPv4 block (the IPv4 path); the server is shown exactly as the socket addressed it.
pub fn sock6_xlate_rev(ctx: &SockAddrContext) -> i32 {
    let config = config();
    let (addr, port_be) = (ctx_user_ip6(ctx), ctx_user_port(ctx));
    let prefix = v4_mapped_prefix();
    let server = if addr[..3] == prefix {
        xlate_rev4(ctx, &config, addr[3], port_be).map(|server| {
            let mapped = [prefix[0], prefix[1], prefix[2], server.addr[0]];
            Endpoint::v6(mapped, server.port)
        })
    } else {
        xlate_rev6(ctx, &config, addr, port_be)
    };
    if let Some(server) = server {
        ctx_set_user_ip6(ctx, server.addr);
        from_server_port(ctx, server.port);
    }
    ALLOW
}

/// The reverse translation of the IPv4 peer `addr`:`port_be` (a v4 socket's, or the last word
/// of a dual-stack socket's v4-mapped one): the server its block address encodes, if it is
/// one on the proxy's port and answers are decoded for this socket.
fn xlate_rev4(
    ctx: &SockAddrContext,
    config: &RedirectConfig,
    addr: u32,
    port_be: u16,
) -> Option<Endpoint> {
    if config.capacity4 == 0 || port_be != config.port4 {
        return None;
    }
    let index = index_in_block4(config, addr)?;
    if !decodes_here(ctx, config) {
        return None;
    }
    server_at(AF_INET, index)
}

/// The same for an IPv6 peer in the IPv6 block.
fn xlate_rev6(
    ctx: &SockAddrContext,
    config: &RedirectConfig,
    addr: [u32; 4],
    port_be: u16,
) -> Option<Endpoint> {
    if port_be != config.port6 {
        return None;
    }
    let index = index_in_block6(config, addr)?;
    if !decodes_here(ctx, config) {
        return None;
    }
    server_at(AF_INET6, index)
}

/// The last step of a reverse translation, once the address is written: the server's port;
/// counted.
fn from_server_port(ctx: &SockAddrContext, port_be: u16) {
    ctx_set_user_port(ctx, port_be);
    count(Counter::ReverseTranslated);
}

/// connect4 / sendmsg4: no socket may send from a block address on a port it guards
/// ([`guarded_port`]), whether bound there (before the agent started, when no bind guard ran)
/// or asking for it with `IP_PKTINFO` (on sendmsg): `recvmsg4` would present what it sends as
/// a server's. Only the proxy may (refused with `EPERM`, counted).
fn impersonates_proxy4(ctx: &SockAddrContext, hook: Hook) -> bool {
    let config = config();
    if config.capacity4 == 0 || !guarded_port(ctx, ctx_local_port(ctx), config.port4) {
        return false;
    }
    let from_block = index_in_block4(&config, ctx_local_ip4(ctx)).is_some()
        || (hook == Hook::Sendmsg && index_in_block4(&config, ctx_msg_src_ip4(ctx)).is_some());
    from_block && guarded_here(ctx, &config) && refuse_unless_excluded(ctx)
}

/// connect6 / sendmsg6: the same for IPv6 sockets, the v4-mapped block included.
fn impersonates_proxy6(ctx: &SockAddrContext, hook: Hook) -> bool {
    let config = config();
    let port = ctx_local_port(ctx);
    let in_block = |addr: [u32; 4]| {
        if addr[..3] == v4_mapped_prefix() {
            guarded_port(ctx, port, config.port4) && index_in_block4(&config, addr[3]).is_some()
        } else {
            guarded_port(ctx, port, config.port6) && index_in_block6(&config, addr).is_some()
        }
    };
    let from_block =
        in_block(ctx_local_ip6(ctx)) || (hook == Hook::Sendmsg && in_block(ctx_msg_src_ip6(ctx)));
    from_block && guarded_here(ctx, &config) && refuse_unless_excluded(ctx)
}

/// Whether to refuse a socket's use of a block address on the proxy's port: always, but for
/// the proxy's own sockets and (excluded) cgroup. Counted when refused.
fn refuse_unless_excluded(ctx: &SockAddrContext) -> bool {
    if is_agents_or_excluded(ctx) {
        return false;
    }
    count(Counter::ImpersonationRefused);
    true
}

/// Whether the guards refuse a socket's use of a block address on `port` (host order; 0: not
/// chosen yet, which the kernel may make the proxy's later): for a UDP socket on any port,
/// since after a change of `--listen`'s port, sockets still connected to the old one take
/// what comes from there for their server's answer (an adversarial review answered a victim
/// so); for others on the proxy's port (`proxy_port_be`) or one not chosen yet, as a TCP
/// connection to the proxy is made anew, to its port of the moment, and a service of the
/// cgroup may answer its own clients on a block address and another port.
fn guarded_port(ctx: &SockAddrContext, port: u32, proxy_port_be: u16) -> bool {
    ctx_sock_type(ctx) == SOCK_DGRAM || port == 0 || port == u32::from(u16::from_be(proxy_port_be))
}

/// bind4: no socket of the agent's namespace but the proxy's may take a block address on a
/// port the guards keep ([`guarded_port`]): from there `recvmsg4` would present its datagrams
/// as the server's, and on a port the proxy served before, it would receive what sockets still
/// connected there send.
pub fn sock4_guard_bind(ctx: &SockAddrContext) -> i32 {
    let config = config();
    let port = u32::from(u16::from_be(ctx_user_port(ctx)));
    if config.capacity4 == 0
        || !guarded_port(ctx, port, config.port4)
        || index_in_block4(&config, ctx_user_ip4(ctx)).is_none()
    {
        return ALLOW;
    }
    refuse_bind_unless_excluded(ctx, &config)
}

/// bind6: the same for IPv6 sockets, v4-mapped block addresses included.
pub fn sock6_guard_bind(ctx: &SockAddrContext) -> i32 {
    let config = config();
    let addr = ctx_user_ip6(ctx);
    let port = u32::from(u16::from_be(ctx_user_port(ctx)));
    let in_block = if addr[..3] == v4_mapped_prefix() {
        guarded_port(ctx, port, config.port4) && index_in_block4(&config, addr[3]).is_some()
    } else {
        guarded_port(ctx, port, config.port6) && index_in_block6(&config, addr).is_some()
    };
    if !in_block {
        return ALLOW;
    }
    refuse_bind_unless_excluded(ctx, &config)
}

fn refuse_bind_unless_excluded(ctx: &SockAddrContext, config: &RedirectConfig) -> i32 {
    // Another namespace's block addresses are nobody's: the proxy never answers from there.
    if !in_agent_namespace(ctx, config) || !refuse_unless_excluded(ctx) {
        return ALLOW;
    }
    REFUSE
}
