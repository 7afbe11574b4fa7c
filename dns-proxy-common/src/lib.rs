//! Types shared by the dns-proxy eBPF programs and the daemon.
//!
//! Every map key and value is `#[repr(C)]`, `Copy`, free of implicit padding and checked for
//! size at compile time, so both sides agree on the layout byte for byte. Addresses and ports
//! are kept in **network byte order**, exactly as the kernel's `bpf_sock_addr` context holds
//! them; the `user` feature converts them to `std::net` types in one place.
#![no_std]

#[cfg(feature = "user")]
mod user;

/// `AF_INET` from the kernel's socket.h.
pub const AF_INET: u16 = 2;
/// `AF_INET6` from the kernel's socket.h.
pub const AF_INET6: u16 = 10;
/// `IPPROTO_TCP`.
pub const IPPROTO_TCP: u8 = 6;
/// `IPPROTO_UDP`.
pub const IPPROTO_UDP: u8 = 17;

/// The port whose traffic is redirected.
pub const DNS_PORT: u16 = 53;

/// Names of the programs, maps and globals in the eBPF object, used by both sides.
pub mod names {
    pub const CONNECT4: &str = "dns_proxy_connect4";
    pub const SENDMSG4: &str = "dns_proxy_sendmsg4";
    pub const RECVMSG4: &str = "dns_proxy_recvmsg4";
    pub const GETPEERNAME4: &str = "dns_proxy_getpeername4";
    pub const CONNECT6: &str = "dns_proxy_connect6";
    pub const SENDMSG6: &str = "dns_proxy_sendmsg6";
    pub const RECVMSG6: &str = "dns_proxy_recvmsg6";
    pub const GETPEERNAME6: &str = "dns_proxy_getpeername6";
    pub const EGRESS: &str = "dns_proxy_egress";
    pub const SOCK_RELEASE: &str = "dns_proxy_sock_release";

    /// socket cookie -> [`crate::SocketRecord`]
    pub const SOCKETS: &str = "SOCKETS";
    /// [`crate::FlowKey`] -> [`crate::Endpoint`] (the original destination)
    pub const FLOWS: &str = "FLOWS";
    /// cgroup id -> [`crate::EXCLUDED_EXACT`] or [`crate::EXCLUDED_SUBTREE`]: cgroups whose
    /// sockets are never redirected
    pub const EXCLUDED_CGROUPS: &str = "EXCLUDED_CGROUPS";
    /// Per-CPU array of `u64`, indexed by [`crate::Counter`]
    pub const COUNTERS: &str = "COUNTERS";

    /// Global holding the [`crate::RedirectTarget`], set at load time.
    pub const REDIRECT_TARGET: &str = "REDIRECT_TARGET";
    /// Global `u64` bit mask, set at load time: bit N set means some cgroup at level N (the
    /// hierarchy's root is level 0) is excluded with its whole subtree.
    pub const EXCLUDED_LEVELS: &str = "EXCLUDED_LEVELS";
}

/// `EXCLUDED_CGROUPS` value: only sockets of this very cgroup are left alone (the agent's own,
/// whose level in the hierarchy may not be knowable from inside a cgroup namespace).
pub const EXCLUDED_EXACT: u8 = 1;
/// `EXCLUDED_CGROUPS` value: sockets of this cgroup and of every cgroup below it are left alone.
pub const EXCLUDED_SUBTREE: u8 = 2;
/// The deepest cgroup level an exclusion may sit at (the bits of `EXCLUDED_LEVELS`).
pub const MAX_EXCLUDED_LEVEL: u32 = 63;

/// What the kernel side counts, per CPU: the index into `COUNTERS`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// DNS connects and sends rewritten to the proxy.
    Redirected = 0,
    /// DNS connects and sends left alone because their cgroup is excluded.
    SkippedExcluded = 1,
    /// Answers and peer names shown as the original server instead of the proxy.
    ReverseTranslated = 2,
    /// Answers or peer names from the proxy on a socket the kernel has no record of (a client
    /// that addressed the proxy itself, or a record evicted from a full map).
    RecordMisses = 3,
    /// Records that could not be stored (a map full even after LRU eviction, or out of memory).
    MapFull = 4,
}

impl Counter {
    pub const ALL: [Self; 5] = [
        Self::Redirected,
        Self::SkippedExcluded,
        Self::ReverseTranslated,
        Self::RecordMisses,
        Self::MapFull,
    ];
}

/// Capacity of the `SOCKETS` and `FLOWS` LRU maps: live DNS sockets on the host at one time.
pub const MAX_TRACKED_SOCKETS: u32 = 65_536;
/// Capacity of the `EXCLUDED_CGROUPS` map.
pub const MAX_EXCLUDED_CGROUPS: u32 = 64;

/// An IPv4 or IPv6 socket address in the kernel's representation.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Endpoint {
    /// The address in network byte order, as the four 32-bit words of `bpf_sock_addr`'s
    /// `user_ip6`. An IPv4 address sits in `addr[0]` (as in `user_ip4`) with the rest zero.
    pub addr: [u32; 4],
    /// The port in network byte order.
    pub port: u16,
    /// [`AF_INET`] or [`AF_INET6`]; 0 means "no endpoint".
    pub family: u16,
}

impl Endpoint {
    /// An IPv4 endpoint from the kernel's network-order address and port.
    pub const fn v4(addr_be: u32, port_be: u16) -> Self {
        Self {
            addr: [addr_be, 0, 0, 0],
            port: port_be,
            family: AF_INET,
        }
    }

    /// An IPv6 endpoint from the kernel's network-order words and port.
    pub const fn v6(addr_be: [u32; 4], port_be: u16) -> Self {
        Self {
            addr: addr_be,
            port: port_be,
            family: AF_INET6,
        }
    }

    pub const fn is_set(&self) -> bool {
        self.family != 0
    }
}

/// Identifies a client's socket as the proxy sees it: the source of the datagrams (or the TCP
/// connection) that reach the proxy after the redirect. The client's address is part of the
/// key so that clients in different network namespaces (pods with their own addresses) never
/// collide even when they use the same port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// The client's address, network byte order, laid out as in [`Endpoint::addr`].
    pub client_addr: [u32; 4],
    /// The client's port, network byte order.
    pub client_port: u16,
    /// [`AF_INET`] or [`AF_INET6`] (as u8: both fit).
    pub family: u8,
    /// [`IPPROTO_UDP`] or [`IPPROTO_TCP`].
    pub protocol: u8,
}

/// What the kernel side remembers about one redirected socket (value of `SOCKETS`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SocketRecord {
    /// Where the socket's last redirected datagram or connection was headed.
    pub original: Endpoint,
    /// The flow key the egress program recorded for this socket in `FLOWS`, so that
    /// `sock_release` can remove it. `flow.family == 0` until the first packet leaves.
    pub flow: FlowKey,
}

/// Where redirected traffic goes: the proxy's listeners. A global of the eBPF object, written
/// by the loader before the programs are loaded.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RedirectTarget {
    /// The proxy's IPv4 listen address, network byte order. IPv4 sockets, and IPv6 sockets
    /// sending to v4-mapped addresses (`::ffff:a.b.c.d`), go here.
    pub ipv4: u32,
    /// The IPv4 listener's port (UDP and TCP), network byte order.
    pub port: u16,
    /// The IPv6 listener's port (UDP and TCP), network byte order; 0: IPv6 is not redirected.
    pub port6: u16,
    /// The proxy's IPv6 listen address, as four network-order words.
    pub ipv6: [u32; 4],
}

/// The first three words of a v4-mapped IPv6 address (`::ffff:0:0/96`), as the kernel holds
/// them: network byte order.
pub const fn v4_mapped_prefix() -> [u32; 3] {
    [0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff])]
}

const _: () = assert!(core::mem::size_of::<Endpoint>() == 20);
const _: () = assert!(core::mem::size_of::<FlowKey>() == 20);
const _: () = assert!(core::mem::size_of::<SocketRecord>() == 40);
const _: () = assert!(core::mem::size_of::<RedirectTarget>() == 24);
