//! Types shared by the dns-proxy eBPF programs and the daemon.
//!
//! The redirect is self-describing: `connect4/6` and `sendmsg4/6` give each original server a
//! small index in an append-only table (`SERVERS`, pinned in bpffs so that it outlives the
//! agent) and send the socket to the address of a block that encodes that index: index `i`
//! of the IPv4 block `B` is the address `B + i`, on the proxy's port. The daemon learns the
//! server from each datagram's destination address (or a connection's local address), and
//! `recvmsg`/`getpeername` decode the answer's source back to the server the same way. No
//! record keyed by a client exists, so nothing a client does can change another's route.
//!
//! Every map key and value is `#[repr(C)]`, `Copy`, free of implicit padding and checked for
//! size at compile time, so both sides agree on the layout byte for byte. Addresses and ports
//! are kept in **network byte order**, exactly as the kernel's `bpf_sock_addr` context holds
//! them; the `user` feature converts them to `std::net` types in one place.
#![no_std]

#[cfg(feature = "user")]
mod user;
#[cfg(feature = "user")]
pub use user::{AddressBlock, BlockError, ServerPrefix};

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
    pub const BIND4: &str = "dns_proxy_bind4";
    pub const BIND6: &str = "dns_proxy_bind6";
    /// The `cgroup_skb/egress` guard: packets from the block on the proxy's port.
    pub const EGRESS: &str = "dns_proxy_egress";
    /// The same guard for kernels older than Linux 6.18, whose `cgroup_skb` programs cannot
    /// tell a packet's network namespace (no `bpf_get_netns_cookie` there): it guards every
    /// namespace, as node mode does anyway. Named apart from `EGRESS` within the 15
    /// characters the kernel keeps of a program's name (`bpftool prog` shows `dns_proxy_guard`).
    pub const EGRESS_ANY_NETNS: &str = "dns_proxy_guard_any_netns";
    pub const SOCK_RELEASE: &str = "dns_proxy_sock_release";
    /// The `cgroup/setsockopt` program: notes sockets that choose their interface.
    pub const SETSOCKOPT: &str = "dns_proxy_setsockopt";
    /// The `sk_lookup` program, attached to the agent's network namespace.
    pub const SK_LOOKUP: &str = "dns_proxy_sk_lookup";
    /// The `raw_tp/cgroup_mkdir` program: excludes a cgroup made at an excluded path as the
    /// kernel makes it, before anything can run in it.
    pub const EXCLUDE_MADE: &str = "dns_proxy_exclude_made";

    /// [`crate::server_key`] -> [`crate::Origin`]: the original server of each index, and
    /// the cgroup whose sockets were sent to it. Pinned (`--state-dir`), so a restarted agent
    /// decodes the same addresses; an index never changes its origin while it is in use.
    pub const SERVERS: &str = "SERVERS";
    /// [`crate::Origin`] -> index: the reverse of `SERVERS`, pinned beside it.
    pub const SERVER_INDEX: &str = "SERVER_INDEX";
    /// cgroup id -> `u64`: how many slots of `SERVERS` that cgroup's sockets took (its pairs,
    /// and shared origins it made alone), against `MAX_ORIGINS_PER_CGROUP`. Raised by the
    /// programs as they take a slot; an entry goes (the agent's walk) once its cgroup is gone
    /// and no pair of it is left. Pinned beside `SERVERS`, which it counts.
    pub const CGROUP_ORIGINS: &str = "CGROUP_ORIGINS";
    /// cgroup id -> `i64`: what the agent's walk adds to a cgroup's `CGROUP_ORIGINS` so that
    /// the sum is what the cgroup holds (pairs an older agent took uncharged, shared origins it
    /// made alone and that were since forgotten). Written by the agents alone, so that they
    /// never overwrite a count the programs add to (which let a workload past its share:
    /// helper-115). Pinned beside `CGROUP_ORIGINS`, and gone with it.
    pub const CGROUP_ADJUST: &str = "CGROUP_ADJUST";
    /// Sockmap of the proxy's listening sockets, by [`crate::listener_slot`].
    pub const LISTENERS: &str = "LISTENERS";
    /// cgroup id -> [`crate::EXCLUDED_SUBTREE`]: the operator's excluded cgroup trees, whose
    /// sockets are never redirected
    pub const EXCLUDED_CGROUPS: &str = "EXCLUDED_CGROUPS";
    /// [`crate::cgroup_path_hash`] of a kernel path -> [`crate::CgroupPath`]: where the
    /// operator's excluded cgroup trees are, as the kernel names them (below the hierarchy's
    /// root), for `raw_tp/cgroup_mkdir` to exclude a cgroup made there under its new id.
    pub const EXCLUDED_PATHS: &str = "EXCLUDED_PATHS";
    /// cgroup id -> [`crate::AgentCgroup`]: the cgroups of every running agent of this block,
    /// whose sockets no agent's programs redirect. Pinned beside `SERVERS`, so that an agent
    /// taking over from another and the one it replaces never redirect each other's queries.
    pub const AGENT_CGROUPS: &str = "AGENT_CGROUPS";
    /// An agent's start stamp -> [`crate::AgentRecord`]: the running agents of this block, each
    /// with its heartbeat. Pinned; read by the agents only (which is the newest, and which
    /// `AGENT_CGROUPS` entries belong to none that is alive).
    pub const AGENTS: &str = "AGENTS";
    /// LPM trie of [`crate::server_prefix_data`] -> `u8`: the operator's servers
    /// (`--exclude-server`), whose sockets are never redirected; each family apart.
    pub const EXCLUDED_SERVERS: &str = "EXCLUDED_SERVERS";
    /// Per-CPU array of `u64`, indexed by [`crate::Counter`]
    pub const COUNTERS: &str = "COUNTERS";
    /// Array of one `u32`, bits [`crate::ARMED_IPV4`] and [`crate::ARMED_IPV6`]: each set once
    /// every program is attached (until then the redirecting programs, attached first so that
    /// they detach first, redirect nothing), and cleared while that family's block is not
    /// routed to the host (nothing is sent there; lookups go direct).
    pub const ARMED: &str = "ARMED";
    /// Array of one `u64`: when (`CLOCK_MONOTONIC` nanoseconds, as `bpf_ktime_get_ns` reads
    /// it) the agent last said it was running, which it does every half second while each of
    /// its UDP threads runs. Past [`crate::UNRESPONSIVE_AFTER_NS`] the redirecting programs
    /// redirect nothing and `sk_lookup` refuses what reaches the block: a stopped, frozen or
    /// wedged agent would read none of it. Not pinned (each agent's program has its own).
    pub const ALIVE_AT: &str = "ALIVE_AT";

    /// Array of one `u32`: the IPv4 address a socket of the agent's namespace sends from
    /// toward the Internet (network order; 0: none). Written by the agent, and again when
    /// routes change; `connect4` binds an unbound socket there before sending it to the
    /// block, so that it shows the source it would have had without the agent.
    pub const SOURCE4: &str = "SOURCE4";

    /// IPv4 server → the source toward it, where its route picks another than `SOURCE4`'s.
    /// Written by the agent; `connect4` binds to it before `SOURCE4`.
    pub const SOURCE4_BY_SERVER: &str = "SOURCE4_BY_SERVER";

    /// Socket cookie -> [`crate::server_key`]: the sockets `connect4/6` connected to an
    /// index's address (UDP or TCP), until they are released (`cgroup/sock_release`). Pinned
    /// beside `SERVERS`: the agent forgets no origin that a live socket is connected to.
    pub const CONNECTED: &str = "CONNECTED";
    /// Socket cookie -> the id of the cgroup (`u64`) whose share of `CONNECTED` the socket's
    /// note is charged to ([`MAX_CONNECTED_PER_CGROUP`]); taken out with the note, by
    /// `cgroup/sock_release`. Pinned beside `CONNECTED`.
    pub const CONNECTED_CHARGE: &str = "CONNECTED_CHARGE";
    /// Cgroup id -> how many notes of `CONNECTED` are charged to it (`u64`, added to and
    /// taken from atomically by the programs). Pinned beside `CONNECTED`; the agent removes
    /// the entries at 0.
    pub const CONNECTED_PER_CGROUP: &str = "CONNECTED_PER_CGROUP";
    /// The pin of the `cgroup/sock_release` program's link, in the table's directory, followed
    /// by `_` and the redirected cgroup's id. The one link an agent leaves attached when it
    /// stops: a socket released while no agent runs must still take its note out of
    /// `CONNECTED`, or the note, and the origin it holds, would outlive it.
    pub const SOCK_RELEASE_LINK: &str = "sock_release_link";
    /// The pin of the `cgroup_skb/egress` program's link (node mode), in the table's
    /// directory, followed by `_` and the redirected cgroup's id: left attached when the agent
    /// stops, so that a pod's socket still connected to the block while no agent serves is
    /// refused as it sends (`EPERM`), not by the node's rate-limited port unreachable.
    pub const EGRESS_LINK: &str = "egress_link";
    /// Sockhash of [`crate::ServingKey`] -> a UDP socket of the agent that serves that port
    /// of the block (its first, of the family). Pinned, shared by the agents of the table:
    /// the entry goes as the kernel closes the socket, so the programs of any agent, a dead
    /// one's too, can tell whether one serves.
    pub const SERVING: &str = "SERVING";
    /// Array of `u64` by [`crate::server_key`]: until when (`CLOCK_MONOTONIC` nanoseconds)
    /// `sk_lookup` drops UDP datagrams to that index's address, so that the kernel answers
    /// them port unreachable, as the server the index names did the agent. Written by the
    /// agent on such an ICMP error; not pinned (each agent's program has its own).
    pub const REFUSING: &str = "REFUSING";
    /// Socket storage (a byte): the agent's own sockets (its listeners, its upstream sockets),
    /// marked by the agent as it makes them, which no program redirects, refuses or decodes,
    /// whatever cgroup the agent is in. Not pinned (each agent's program has its own).
    pub const AGENT_SOCKETS: &str = "AGENT_SOCKETS";

    /// Global holding the [`crate::RedirectConfig`], set at load time.
    pub const REDIRECT_CONFIG: &str = "REDIRECT_CONFIG";
    /// Global `u64` bit mask, set at load time: bit N set means some cgroup at level N (the
    /// hierarchy's root is level 0) is excluded with its whole subtree.
    pub const EXCLUDED_LEVELS: &str = "EXCLUDED_LEVELS";
    /// Global `u32`, set at load time: how many prefixes `EXCLUDED_SERVERS` holds (0: the
    /// programs do not look).
    pub const EXCLUDED_SERVER_COUNT: &str = "EXCLUDED_SERVER_COUNT";
    /// Global `[u64; 2]`, set at load time: the agent's random key for
    /// [`crate::Origin::slot_hash`]. Each agent draws its own: the hash only says where a new
    /// origin's search starts, and an origin's index is found again through `SERVER_INDEX`,
    /// so agents sharing the table need not agree on it (an origin whose reverse entry was
    /// lost may take a second slot then, freed with the first when it is forgotten).
    pub const TABLE_HASH_KEY: &str = "TABLE_HASH_KEY";
    /// Global `u32`, set at load time (`--max-servers-per-workload`): the most slots of
    /// `SERVERS` one cgroup's sockets may take (`CGROUP_ORIGINS`); 0: no limit. So that one
    /// workload cannot fill the table that every workload's lookups need.
    pub const MAX_ORIGINS_PER_CGROUP: &str = "MAX_ORIGINS_PER_CGROUP";
    /// Global [`crate::CgroupOffsets`], set at load time from the kernel's BTF: where
    /// `raw_tp/cgroup_mkdir` finds a new cgroup's id and hierarchy.
    pub const CGROUP_OFFSETS: &str = "CGROUP_OFFSETS";
}

/// `EXCLUDED_CGROUPS` value: sockets of this cgroup and of every cgroup below it are left alone.
pub const EXCLUDED_SUBTREE: u8 = 2;
/// The deepest cgroup level an exclusion may sit at (the bits of `EXCLUDED_LEVELS`).
pub const MAX_EXCLUDED_LEVEL: u32 = 63;

/// How long after the agent last said it was running (`ALIVE_AT`) the programs take it for
/// stopped: nothing new is sent to it, and what reaches the block is refused. The agent says
/// so every half second; a loaded host's scheduling delays are far shorter.
pub const UNRESPONSIVE_AFTER_NS: u64 = 3_000_000_000;

/// How long after its agent last said it was running (`ALIVE_AT`) a node-mode egress guard,
/// left pinned, refuses a pod's socket still connected to the block while no agent serves:
/// long enough for an agent restarted by its service manager, and no longer, since a socket
/// connected through a table that is gone may be connected since through another agent's
/// table of the same block (another `--state-dir`), to an address the dead table's note still
/// names (helper-202: one of 133 sockets, refused until the dead table was removed). Past
/// it, such a socket is refused by the node's port unreachable, as before the guard.
pub const REFUSED_WITHOUT_AGENT_FOR_NS: u64 = 60_000_000_000;

/// What the kernel side counts, per CPU: the index into `COUNTERS`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// DNS connects and sends rewritten to the proxy.
    Redirected = 0,
    /// DNS connects and sends left alone because their cgroup is excluded.
    SkippedExcluded = 1,
    /// DNS connects and sends of another network namespace left alone: a loopback or
    /// unspecified server (the namespace's own), or a proxy only this namespace reaches.
    SkippedForeignNamespace = 2,
    /// Answers and peer names shown as the original server instead of the proxy.
    ReverseTranslated = 3,
    /// Answers or peer names from a block address whose index names no server.
    UnknownIndex = 4,
    /// Connects and sends whose server got no index: the table is full for that address
    /// family (or the slots its search may try are), so the socket was left alone and went
    /// direct. Counted per call, not per server.
    TableFull = 5,
    /// Packets to a block address dropped by `sk_lookup`: from another namespace to a loopback
    /// or unspecified server's address (no one outside reaches this host's loopback services
    /// through the proxy), or, in host mode, from anywhere but this namespace; and connects
    /// and sends of a workload to a block address that is not its own cgroup's, refused
    /// (`EPERM`).
    ForeignRefused = 6,
    /// Binds of, or sends from, a block address refused, UDP on any port, TCP on the proxy's
    /// (nothing but the proxy may send from there: `recvmsg` would show it as the server, and
    /// a UDP socket still connected to a port the proxy served before would take it for its
    /// server's answer).
    ImpersonationRefused = 7,
    /// DNS connects and sends left alone because their socket is bound to a device other
    /// than loopback (`SO_BINDTODEVICE`), or sends through one (`IP_UNICAST_IF`): the proxy's
    /// addresses are local, on `lo`, or routed through one device of a pod, which such a
    /// socket may not reach; or because it is marked (`SO_MARK`), for policy routing that the
    /// proxy's own socket would not get.
    SkippedBoundDevice = 8,
    /// DNS connects and sends given their server's shared index, as every cgroup may be
    /// when the table has no room for a pair of their own: redirected and answered, but the
    /// proxy cannot tell which workload asked (`workload=unknown`), and the per-client limits
    /// fall back to its source address.
    SharedIndex = 9,
    /// DNS connects and sends left alone because their server is excluded
    /// (`EXCLUDED_SERVERS`): asked directly, from the workload's own address.
    SkippedExcludedServer = 10,
    /// Sockets connected to a proxy address that `CONNECTED` had no room to note, or whose
    /// cgroup had taken its share of it ([`MAX_CONNECTED_PER_CGROUP`]): once their cgroup is
    /// gone, their index may be given to another origin while they still use it.
    ConnectedNotNoted = 11,
    /// DNS connects and sends left alone (an excluded cgroup's included: this is looked at
    /// first), and packets to a block address refused, because the agent had not said it was
    /// running for [`UNRESPONSIVE_AFTER_NS`] (`ALIVE_AT`): stopped
    /// (SIGSTOP), frozen (`docker pause`) or wedged, it would read none of them.
    AgentUnresponsive = 12,
    /// Packets a raw socket of the cgroup sent to a block address (but ICMP), dropped at
    /// egress: a raw datagram passes no cgroup hook, so nothing checks whose address it uses,
    /// and it would be charged to the workload that address belongs to.
    RawRefused = 13,
    /// UDP datagrams to a block address refused by `sk_lookup` (the kernel answers port
    /// unreachable) because its server's port was found closed a moment ago (`REFUSING`):
    /// lookups that failed fast, as asking the server would have, without reaching the
    /// agent.
    ClosedPortRefused = 14,
    /// DNS connects and sends of a cgroup that has taken its share of the table
    /// (`MAX_ORIGINS_PER_CGROUP`) to a server it has no index of its own for: given the
    /// server's shared index if it has one (redirected, the workload unknown), else left
    /// alone (direct). Counted per call.
    WorkloadLimit = 15,
    /// Cgroups made at an excluded path that `raw_tp/cgroup_mkdir` excluded as they were made.
    ExcludedAsMade = 16,
    /// Cgroups made at an excluded path that `raw_tp/cgroup_mkdir` could not exclude (a read
    /// of the kernel's structs failed, or `EXCLUDED_CGROUPS` had no room): left to the agent's
    /// look, which races their first lookups.
    ExcludeMadeFailed = 17,
    /// Indexes that named no server taken for the UDP sockets still connected to them, at
    /// their first packet (`cgroup_skb/egress`): sockets connected under a table of servers
    /// that is gone (its bpffs lost between agents). Held ([`Origin::stale`]) while such a
    /// socket lives, the index is given to no other server, so the socket's lookups fail
    /// (port unreachable) instead of reaching that server.
    StaleIndexHeld = 18,
}

impl Counter {
    pub const ALL: [Self; 19] = [
        Self::Redirected,
        Self::SkippedExcluded,
        Self::SkippedForeignNamespace,
        Self::ReverseTranslated,
        Self::UnknownIndex,
        Self::TableFull,
        Self::ForeignRefused,
        Self::ImpersonationRefused,
        Self::SkippedBoundDevice,
        Self::SharedIndex,
        Self::SkippedExcludedServer,
        Self::ConnectedNotNoted,
        Self::AgentUnresponsive,
        Self::RawRefused,
        Self::ClosedPortRefused,
        Self::WorkloadLimit,
        Self::ExcludedAsMade,
        Self::ExcludeMadeFailed,
        Self::StaleIndexHeld,
    ];
}

/// Indexes per address family: an index fits in 16 bits (the host part of a `/16` or
/// `/112` block at most). Index 0 is never used.
pub const MAX_INDEX: u32 = 65_535;
/// Capacity of the `SERVERS` and `SERVER_INDEX` maps: both families' indexes.
pub const MAX_SERVERS: u32 = 2 * (MAX_INDEX + 1);
/// How many slots a new origin may try, from the one its hash picks, before it goes without
/// (its server's shared index, or [`Counter::TableFull`]). Linear probing clusters: with 16, a
/// `/24` began to turn origins away at about 55 % full; with 64, none was at 71 % (90 servers
/// and their pairs) and a few were at 94 %, and a block of 64 addresses or fewer is searched
/// whole. A probe of a taken slot is one map lookup.
pub const MAX_PROBES: u32 = 64;
/// How long an origin whose search for a slot failed skips the search (its sockets go by its
/// server's shared index, or direct, at once): a slot freed meanwhile (by the agent's walk,
/// once a minute) waits that long at most.
pub const NO_ROOM_FOR_NS: u64 = 1_000_000_000;
/// Capacity of the `NO_ROOM` array: origins remembered as finding no slot, one per entry
/// their hash picks (a later one takes the entry over).
pub const NO_ROOM_ENTRIES: u32 = 4096;
/// How many `--exclude-cgroup`s the agent takes, and the capacity of `EXCLUDED_PATHS`.
pub const MAX_EXCLUDED_CGROUPS: u32 = 64;
/// Capacity of the `EXCLUDED_CGROUPS` map: each excluded tree's id as the agent last saw it,
/// and the id the kernel last excluded at each path (`CgroupPath::made`), with room to spare.
pub const EXCLUDED_CGROUP_ENTRIES: u32 = 4 * MAX_EXCLUDED_CGROUPS;

/// The buffer the kernel's `cgroup_mkdir` tracepoint writes a new cgroup's path in, its NUL
/// included (its `TRACE_CGROUP_PATH_LEN`). A longer path is cut to its first 1,023 bytes
/// there, which a path of exactly 1,023 bytes could not be told from: an excluded path is at
/// most [`MAX_CGROUP_PATH`] long, and a path that fills the buffer matches none.
pub const CGROUP_PATH_BYTES: usize = 1024;
/// The longest excluded path the kernel side excludes as it is made.
pub const MAX_CGROUP_PATH: usize = CGROUP_PATH_BYTES - 2;

/// An excluded tree's path as the kernel names it: from the hierarchy's root, `/` first
/// (`/system.slice/unbound.service`), zeros after it; and the last cgroup the kernel excluded
/// there. `EXCLUDED_PATHS` value.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct CgroupPath {
    /// How many of `bytes` are the path.
    pub len: u32,
    pub _padding: u32,
    /// The id of the cgroup `raw_tp/cgroup_mkdir` last excluded at this path (0: none yet),
    /// written by the program alone. It takes that id out of `EXCLUDED_CGROUPS` when it
    /// excludes the next one there: a cgroup made at the path means the last one is gone. So
    /// what the kernel adds is one id per path, however often a workload makes and removes a
    /// cgroup there (before, 300 such in 7 to 12 ms filled the map, and another excluded service's
    /// new cgroup found no room: helper-151).
    pub made: u64,
    pub bytes: [u8; CGROUP_PATH_BYTES],
}

/// FNV-1a's offset basis: [`cgroup_path_hash`] of an empty path.
pub const CGROUP_PATH_HASH_SEED: u64 = 0xcbf2_9ce4_8422_2325;

/// One byte of FNV-1a, for the `EXCLUDED_PATHS` key: the program hashes a new cgroup's path
/// a byte at a time, the agent with [`cgroup_path_hash`]. Not a defence: the program compares
/// the whole path before it excludes anything.
pub const fn cgroup_path_hash_step(hash: u64, byte: u8) -> u64 {
    (hash ^ byte as u64).wrapping_mul(0x0000_0100_0000_01b3)
}

/// The `EXCLUDED_PATHS` key of a [`CgroupPath`]'s `bytes`: all of them, the zeros after the
/// path too (the program's loops have a fixed count, which the verifier walks once).
pub fn cgroup_path_hash(path: &[u8; CGROUP_PATH_BYTES]) -> u64 {
    let mut hash = CGROUP_PATH_HASH_SEED;
    let mut i = 0;
    while i < path.len() {
        hash = cgroup_path_hash_step(hash, path[i]);
        i += 1;
    }
    hash
}

/// Where `raw_tp/cgroup_mkdir` reads a new cgroup's id and hierarchy, in bytes, as this
/// kernel lays its structs out (its BTF, read by the agent): `cgroup->kn->id` is the cgroup's
/// id, `cgroup->root->hierarchy_id` is 0 for the cgroup2 hierarchy.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CgroupOffsets {
    /// `struct cgroup`'s `kn`: its `struct kernfs_node *`.
    pub cgroup_kn: u32,
    /// `struct cgroup`'s `root`: its `struct cgroup_root *`.
    pub cgroup_root: u32,
    /// `struct cgroup_root`'s `hierarchy_id` (an `int`).
    pub root_hierarchy_id: u32,
    /// `struct kernfs_node`'s `id` (a `u64`).
    pub kernfs_node_id: u32,
}
/// Capacity of the `EXCLUDED_SERVERS` map.
pub const MAX_EXCLUDED_SERVERS: u32 = 64;
/// Capacity of the `AGENT_CGROUPS` and `AGENTS` maps: agents of one block alive at once
/// (normally one, two while one takes over), with room for the records of agents that were
/// killed, until the next agent to start removes them.
pub const MAX_AGENTS: u32 = 64;
/// Capacity of the `CONNECTED` map: sockets connected to the block at once that keep their
/// index from being forgotten (past it, a socket is not counted, as before the map).
pub const MAX_CONNECTED: u32 = 65_536;
/// A cgroup's share of `CONNECTED`: past it, its sockets connected to the block are not noted
/// (counted as [`Counter::ConnectedNotNoted`]), so that no one workload fills the map for the
/// others. A stub resolver holds one or two such sockets, a forwarder's pool hundreds.
pub const MAX_CONNECTED_PER_CGROUP: u64 = 4_096;

/// The bit of `ARMED` that lets the programs send sockets to the IPv4 block (v4-mapped
/// destinations of dual-stack sockets included).
pub const ARMED_IPV4: u32 = 1;
/// The bit of `ARMED` that lets the programs send sockets to the IPv6 block.
pub const ARMED_IPV6: u32 = 2;

/// `AGENT_CGROUPS` value: an agent's cgroup. Only its presence matters to the programs.
pub type AgentCgroup = u64;

/// `AGENTS` value: which cgroup an agent runs in, when it last said it was alive
/// (`CLOCK_BOOTTIME`, nanoseconds), and the port it serves (agents of one block on other
/// ports, `dns-proxy exec`'s, replace no one).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AgentRecord {
    pub cgroup_id: u64,
    pub heartbeat_ns: u64,
    pub port: u16,
    /// [`AGENT_NAMED`], [`AGENT_TELLS_STEERING`], [`AGENT_STEERING`], or 0 from an agent that
    /// predates them (the byte was padding).
    pub flags: u8,
    pub _padding: [u8; 5],
}

/// [`AgentRecord::flags`]: the agent holds the abstract unix socket
/// `dns-proxy/agent/<start stamp>` in its network namespace while it runs.
pub const AGENT_NAMED: u8 = 1;
/// [`AgentRecord::flags`]: the record says [`AGENT_STEERING`] once the agent steers the block.
/// An agent's record without it predates that, and is taken for steering while it is alive.
pub const AGENT_TELLS_STEERING: u8 = 2;
/// [`AgentRecord::flags`]: the agent's `sk_lookup` steers the block to its listeners, which
/// serve new lookups: set once it is ready, cleared once it is stopped (its `sk_lookup` may
/// steer on while it drains, but no other agent may take it for one that serves).
pub const AGENT_STEERING: u8 = 4;
/// [`AgentRecord::flags`]: the agent puts a socket in `SERVING` once it steers the block. An
/// agent's record without it is of a version before `SERVING`, which may serve the block with
/// nothing there: the egress guard left pinned refuses nothing while one is alive
/// ([`OLDER_AGENT_ALIVE_FOR_NS`]).
pub const AGENT_FILLS_SERVING: u8 = 8;
/// How recent the heartbeat of an agent of a version before `SERVING` must be
/// (`CLOCK_BOOTTIME`) for the egress guard to take it for alive: three heartbeats.
pub const OLDER_AGENT_ALIVE_FOR_NS: u64 = 6_000_000_000;
/// Capacity of the `SERVING` sockhash: an entry per port and family of each agent at most.
pub const MAX_SERVING: u32 = 2 * MAX_AGENTS;

/// Agents that can be in `SERVING` at once for one port and family, each in a slot of its
/// own: the one taken over from and the one taking over, and a third starting meanwhile.
pub const SERVING_SLOTS: u8 = 4;

/// Key of `SERVING`: the cgroup an agent redirects (its id), the port of the block (network
/// order) and the family it serves, and the slot it took. By the cgroup: an agent of the
/// table on another cgroup, in another network namespace, serves none of this one's pods,
/// and with a key by port alone, the guard left by an agent that stopped refused nothing while
/// such an agent ran (helper-205: its pods' connected sockets waited out their timeout, 21
/// of 49). Not by network namespace: of two node-mode agents in two namespaces on one tree (a
/// mistake the agents name), the one left serves the tree once the other stops.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServingKey {
    pub cgroup: u64,
    pub port: u16,
    pub family: u8,
    pub slot: u8,
    pub _padding: [u8; 4],
}

impl ServingKey {
    pub const fn new(cgroup: u64, port_be: u16, family: u16, slot: u8) -> Self {
        Self {
            cgroup,
            port: port_be,
            family: family as u8,
            slot,
            _padding: [0; 4],
        }
    }
}

/// UDP listening sockets per address family at most (one per UDP thread).
pub const MAX_UDP_SOCKETS: u32 = 128;
/// Capacity of the `LISTENERS` sockmap: TCP and UDP listeners per family, and the metrics
/// listener.
pub const LISTENER_SLOTS: u32 = 3 + 2 * MAX_UDP_SOCKETS;

/// The `SERVERS` key of index `index` of a family's block: the families' indexes are apart.
pub const fn server_key(family: u16, index: u32) -> u32 {
    if family == AF_INET6 {
        index | (1 << 16)
    } else {
        index
    }
}

/// Which socket of the proxy a slot of `LISTENERS` holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Listener {
    Tcp {
        family: u16,
    },
    /// The `n`th UDP socket of a family (`n < MAX_UDP_SOCKETS`).
    Udp {
        family: u16,
        n: u32,
    },
    /// The metrics and health listener (`--metrics`).
    Metrics,
}

/// The `LISTENERS` slot of a listening socket.
pub const fn listener_slot(listener: Listener) -> u32 {
    match listener {
        Listener::Tcp { family } => (family == AF_INET6) as u32,
        Listener::Udp { family, n } => {
            2 + if family == AF_INET6 {
                MAX_UDP_SOCKETS
            } else {
                0
            } + n
        }
        Listener::Metrics => LISTENER_SLOTS - 1,
    }
}

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

    /// A loopback (127/8, ::1) or unspecified (0.0.0.0, ::) address: a server that means
    /// "this network namespace", whichever namespace asks.
    pub const fn is_local_only(&self) -> bool {
        match self.family {
            AF_INET => is_local_only_v4(self.addr[0]),
            AF_INET6 => {
                let [a, b, c, d] = self.addr;
                let prefix = v4_mapped_prefix();
                if a == prefix[0] && b == prefix[1] && c == prefix[2] {
                    return is_local_only_v4(d);
                }
                a == 0 && b == 0 && c == 0 && (d == 0 || d == u32::from_ne_bytes([0, 0, 0, 1]))
            }
            _ => false,
        }
    }
}

/// The `EXCLUDED_SERVERS` key data of a server's address: its family, then its address (an
/// IPv4 one in the first word, the rest zero). The family keeps the two apart, so an IPv6
/// prefix such as `::/0` holds no IPv4 server. A dual-stack socket's v4-mapped server takes
/// the IPv4 path, as an IPv4 [`Endpoint`], and matches its IPv4 prefix. Looked up at all
/// [`SERVER_PREFIX_BITS`]; a prefix of the address is [`SERVER_FAMILY_BITS`] longer.
pub const fn server_prefix_data(server: &Endpoint) -> ServerPrefixData {
    let [a, b, c, d] = server.addr;
    [(server.family as u32).to_be(), a, b, c, d]
}

/// What an `EXCLUDED_SERVERS` key holds: see [`server_prefix_data`].
pub type ServerPrefixData = [u32; 5];
/// The bits of an `EXCLUDED_SERVERS` key: the family's word and an IPv6 address.
pub const SERVER_PREFIX_BITS: u32 = 160;
/// The bits of the family's word, before the address.
pub const SERVER_FAMILY_BITS: u32 = 32;

/// Whether a network-order IPv4 address is loopback (127/8) or unspecified (0.0.0.0).
pub const fn is_local_only_v4(addr_be: u32) -> bool {
    let first_octet = addr_be.to_ne_bytes()[0];
    addr_be == 0 || first_octet == 127
}

/// Who asked which server, as an index of the block encodes it: the server, and the cgroup of
/// the task that sent its socket there (what `bpf_get_current_cgroup_id` gave at `connect`
/// or `sendmsg`). `cgroup_id` 0: any cgroup's, an index shared by every cgroup asking that
/// server, given when the table had no room for the pair. Only the kernel writes it, so a
/// query's origin is what the kernel saw, not what its sender claims.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Origin {
    pub server: Endpoint,
    pub _padding: u32,
    pub cgroup_id: u64,
}

impl Origin {
    pub const fn new(server: Endpoint, cgroup_id: u64) -> Self {
        Self {
            server,
            _padding: 0,
            cgroup_id,
        }
    }

    /// What holds an index of `family`'s block that named no server when a UDP socket of
    /// cgroup `cgroup_id` sent there: the socket connected to it under a table that is gone,
    /// and would reach whatever server the index were given to next. It names no server
    /// (port 0: no DNS server listens there), so the programs refuse what is sent there and
    /// the agent serves none of it; charged to the cgroup as a slot of its own, and freed by
    /// the agent once no socket connected to it is noted (`CONNECTED`).
    pub const fn stale(family: u16, cgroup_id: u64) -> Self {
        Self::new(
            Endpoint {
                addr: [0; 4],
                port: 0,
                family,
            },
            cgroup_id,
        )
    }

    /// Whether this holds an index for sockets of a table that is gone ([`Origin::stale`]).
    pub const fn is_stale(&self) -> bool {
        self.server.port == 0
    }

    /// Where in the table this origin's search for a free slot starts: SipHash-2-4 of its
    /// fields under `key`, the agent's random [`names::TABLE_HASH_KEY`]. Keyed, so that no
    /// workload can pick servers whose origins crowd the slots another's would take: with
    /// the hash known, 128 connects made a victim's lookups skip the proxy on an empty table.
    #[inline(always)]
    pub fn slot_hash(&self, key: [u64; 2]) -> u64 {
        let [a0, a1, a2, a3] = self.server.addr.map(u64::from);
        siphash_2_4(
            key,
            [
                a0 | a1 << 32,
                a2 | a3 << 32,
                u64::from(self.server.port) | u64::from(self.server.family) << 16,
                self.cgroup_id,
            ],
        )
    }
}

/// SipHash-2-4 (Aumasson and Bernstein) of a 32-byte message given as four little-endian
/// words. Written out, not taken from a crate: the eBPF programs need it without `std`, and
/// in registers (scalars, inlined), since the deepest program's stack has little room left.
#[inline(always)]
pub fn siphash_2_4(key: [u64; 2], message: [u64; 4]) -> u64 {
    #[inline(always)]
    fn round(v0: &mut u64, v1: &mut u64, v2: &mut u64, v3: &mut u64) {
        *v0 = v0.wrapping_add(*v1);
        *v1 = v1.rotate_left(13) ^ *v0;
        *v0 = v0.rotate_left(32);
        *v2 = v2.wrapping_add(*v3);
        *v3 = v3.rotate_left(16) ^ *v2;
        *v0 = v0.wrapping_add(*v3);
        *v3 = v3.rotate_left(21) ^ *v0;
        *v2 = v2.wrapping_add(*v1);
        *v1 = v1.rotate_left(17) ^ *v2;
        *v2 = v2.rotate_left(32);
    }
    let mut v0 = key[0] ^ 0x736f_6d65_7073_6575;
    let mut v1 = key[1] ^ 0x646f_7261_6e64_6f6d;
    let mut v2 = key[0] ^ 0x6c79_6765_6e65_7261;
    let mut v3 = key[1] ^ 0x7465_6462_7974_6573;
    // The last block holds the message's length in bytes, 32, in its top byte.
    let [m0, m1, m2, m3] = message;
    for word in [m0, m1, m2, m3, 32 << 56] {
        v3 ^= word;
        round(&mut v0, &mut v1, &mut v2, &mut v3);
        round(&mut v0, &mut v1, &mut v2, &mut v3);
        v0 ^= word;
    }
    v2 ^= 0xff;
    for _ in 0..4 {
        round(&mut v0, &mut v1, &mut v2, &mut v3);
    }
    v0 ^ v1 ^ v2 ^ v3
}

/// `NO_ROOM` value: an origin whose search for a free slot found none, and when
/// (`bpf_ktime_get_ns`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NoRoom {
    pub origin: Origin,
    pub failed_at_ns: u64,
}

/// What the programs need to know of the proxy, written by the loader before load.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RedirectConfig {
    /// The agent's network namespace (`SO_NETNS_COOKIE`).
    pub agent_netns: u64,
    /// The cgroup the programs are attached to (its id): whose agents' entries of `SERVING`
    /// the egress guard looks at.
    pub redirected_cgroup: u64,
    /// The IPv6 block's first address (its last 16 bits zero), network-order words.
    pub block6: [u32; 4],
    /// The IPv4 block's first address, network order.
    pub block4: u32,
    /// The IPv4 block's highest index, host order; 0: IPv4 is not redirected.
    pub capacity4: u32,
    /// The IPv6 block's highest index, host order; 0: IPv6 is not redirected.
    pub capacity6: u32,
    /// The proxy's IPv4 port (UDP and TCP), network order.
    pub port4: u16,
    /// The proxy's IPv6 port (UDP and TCP), network order.
    pub port6: u16,
    /// UDP listening sockets per family in `LISTENERS`, host order.
    pub udp_sockets: u16,
    /// 1: sockets of other network namespaces are redirected too (node mode: the blocks are
    /// routed to this namespace); 0: they are left alone (host mode: a loopback block).
    pub foreign_namespaces: u8,
    /// The metrics listener's family (`AF_INET` or `AF_INET6`); 0: no metrics listener.
    pub metrics_family: u8,
    /// The metrics listener's port, host order.
    pub metrics_port: u16,
    pub _padding: [u8; 2],
    /// The metrics listener's address, network-order words as in [`Endpoint`] (all zero: a
    /// wildcard, any local address).
    pub metrics_addr: [u32; 4],
}

/// The first three words of a v4-mapped IPv6 address (`::ffff:0:0/96`), as the kernel holds
/// them: network byte order.
pub const fn v4_mapped_prefix() -> [u32; 3] {
    [0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff])]
}

const _: () = assert!(core::mem::size_of::<Endpoint>() == 20);
const _: () = assert!(core::mem::size_of::<Origin>() == 32);
const _: () = assert!(core::mem::size_of::<NoRoom>() == 40);
const _: () = assert!(core::mem::size_of::<RedirectConfig>() == 72);
const _: () = assert!(core::mem::size_of::<AgentRecord>() == 24);
const _: () = assert!(core::mem::size_of::<ServingKey>() == 16);
const _: () = assert!(core::mem::size_of::<CgroupPath>() == 16 + CGROUP_PATH_BYTES);
const _: () = assert!(core::mem::size_of::<CgroupOffsets>() == 16);
const _: () = assert!(
    listener_slot(Listener::Udp {
        family: AF_INET6,
        n: MAX_UDP_SOCKETS - 1
    }) < LISTENER_SLOTS
);
