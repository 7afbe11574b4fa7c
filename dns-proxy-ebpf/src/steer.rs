//! `sk_lookup`, on the agent's network namespace: a packet to a block address on the proxy's
//! port goes to one of the proxy's sockets, whatever else is bound there, and the metrics
//! port to the newest agent's listener.
use aya_ebpf::{helpers::bpf_ktime_get_ns, programs::SkLookupContext};
use dns_proxy_common::{
    AF_INET, AF_INET6, Counter, IPPROTO_TCP, Listener, RedirectConfig, listener_slot, server_key,
};

use crate::{
    LISTENERS, REFUSING,
    block::{index_in_block4, index_in_block6, server_at},
    config,
    context::{Lookup, ctx_lookup},
    count,
    scope::agent_running,
};

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

/// Whether a lookup is a TCP connection to the metrics listener's address and port (any local
/// address, for a wildcard listener).
fn is_for_metrics(lookup: &Lookup, config: &RedirectConfig) -> bool {
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
pub fn steer_to_proxy(ctx: &SkLookupContext) -> u32 {
    let lookup = ctx_lookup(ctx);
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
        // Nothing to serve (no origin, or one held for the sockets of a lost table): refused,
        // so that the sender hears so at once (port unreachable, a reset). Passed on, it was
        // taken by the agent's hold of its port on every address (a port of 1024 or above,
        // as the default 8053), and a connected socket waited out its timeout (helper-180).
        return SK_DROP;
    };
    if server.is_local_only() && lookup.ingress_ifindex != LOOPBACK_IFINDEX {
        count(Counter::ForeignRefused);
        return SK_DROP;
    }
    if !agent_running() {
        // Read by no one: the sender hears at once (port unreachable, a reset) and moves on,
        // unless another agent's program takes it.
        count(Counter::AgentUnresponsive);
        return SK_DROP;
    }
    let tcp = lookup.protocol == u32::from(IPPROTO_TCP);
    if !tcp && refusing(family, index) {
        // No socket takes it: the kernel answers port unreachable, as the server did the agent.
        count(Counter::ClosedPortRefused);
        return SK_DROP;
    }
    let listener = if tcp {
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

/// Whether the agent asked that UDP datagrams to `family`'s index `index` be refused for now
/// (`REFUSING`): its server's port was closed a moment ago. A client connected to the address
/// then reads `ECONNREFUSED`, as it would asking the server itself, and moves on.
fn refusing(family: u16, index: u32) -> bool {
    match REFUSING.get(server_key(family, index)) {
        // SAFETY: a helper without arguments.
        Some(&until) => until != 0 && until > unsafe { bpf_ktime_get_ns() },
        None => false,
    }
}
