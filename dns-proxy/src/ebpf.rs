//! Loading the eBPF object, attaching its programs to a cgroup (and `sk_lookup` to this
//! network namespace), and reading its maps.
//!
//! Links are bpf_links owned by this process's file descriptors: if the agent dies, the kernel
//! detaches them and new lookups go direct again (fail-open). The exceptions redirect nothing:
//! `sock_release`'s, pinned so that sockets released while no agent runs still take their
//! notes out of `CONNECTED`, and in node mode the egress guard's, so that a pod's socket
//! still connected to the block while no agent serves is refused as it sends. The table of servers is pinned (in
//! `--state-dir`), so that a restarted agent decodes the addresses that sockets were sent to
//! before.
use std::{
    fs::File,
    io,
    net::{IpAddr, SocketAddr},
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd},
    path::Path,
    sync::Arc,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{
        HashMap, MapData, PerCpuArray, SkStorage, SockMap,
        lpm_trie::{Key, LpmTrie},
    },
    programs::{
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSock, CgroupSockAddr,
        CgroupSockopt, RawTracePoint, SkLookup, cgroup_sock_addr::CgroupSockAddrLinkId,
        links::FdLink, sk_lookup::SkLookupLinkId,
    },
};
use dns_proxy_common::{
    AF_INET, AF_INET6, AddressBlock, Counter, Listener, MAX_EXCLUDED_CGROUPS, MAX_EXCLUDED_LEVEL,
    MAX_UDP_SOCKETS, RedirectConfig as KernelConfig, ServerPrefix, ServerPrefixData, listener_slot,
    names,
};
use tokio::io::unix::AsyncFd;

pub use exclusions::{Exclusions, TreesMade};

use crate::{agents::Agents, block_binders, cgroup::Cgroup};

mod alive;
mod exclusions;
mod kernel_btf;
mod link_pin;
mod links;
mod origins;
mod own_sockets;
mod server_table;
mod serving;
mod sources;

pub use alive::AliveAt;
pub use link_pin::{LinkPin, PinKind, PinnedNow};
pub use links::AttachedLinks;
pub use origins::CachedServers;
pub use own_sockets::OwnSockets;
pub use server_table::{FORGOTTEN_HELD_FOR, Forgotten, ServerTable};
pub use serving::Serving;
pub use sources::{DirectSources, Found as FoundSources};

/// The eBPF object, built from `dns-proxy-ebpf` by build.rs.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/dns-proxy"));

#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    #[error("cannot load the eBPF object (server table pinned in {state_dir}): {source}{hint}", hint = hint(source))]
    Load {
        source: Box<aya::EbpfError>,
        state_dir: String,
    },
    #[error("eBPF object has no {kind} named {name} (build mismatch)")]
    Missing {
        kind: &'static str,
        name: &'static str,
    },
    #[error("the kernel rejected program {program} ({hook}): {source}{hint}", hint = hook_hint(source, hook))]
    LoadProgram {
        program: &'static str,
        hook: &'static str,
        source: Box<aya::programs::ProgramError>,
    },
    #[error("cannot attach {program} ({hook}) to {target}: {source}{hint}", hint = hook_hint(source, hook))]
    Attach {
        program: &'static str,
        hook: &'static str,
        target: String,
        source: Box<aya::programs::ProgramError>,
    },
    #[error("cannot open this network namespace (/proc/self/ns/net): {0}")]
    OpenNetns(io::Error),
    #[error("cannot read this network namespace's cookie (SO_NETNS_COOKIE, Linux 5.14): {0}")]
    NetnsCookie(io::Error),
    #[error("cannot duplicate a UDP listener's descriptor for the SERVING map: {0}")]
    DuplicateListener(io::Error),
    #[error("cannot draw a random key for the server table's hash (getrandom): {0}")]
    RandomKey(io::Error),
    #[error(
        "cannot load the eBPF programs without {}: grant {} (or run dns-proxy as root with its \
         full capabilities; CAP_SYS_ADMIN also stands in for both)",
        missing.join(" and "),
        if missing.len() > 1 { "them" } else { "it" }
    )]
    MissingCapabilities { missing: Vec<&'static str> },
    #[error("{count} UDP threads: at most {max} can be served")]
    TooManyUdpSockets { count: usize, max: u32 },
    #[error("cannot open cgroup {cgroup}: {source}")]
    OpenCgroup { cgroup: String, source: io::Error },
    #[error(
        "{count} cgroups to exclude: at most {max} can be (exclude their common parent instead)"
    )]
    TooManyExclusions { count: usize, max: u32 },
    #[error(
        "cannot exclude {cgroup}: it sits at level {level} of the cgroup hierarchy, deeper than \
         the {max} levels the kernel side looks at"
    )]
    ExclusionTooDeep {
        cgroup: String,
        level: u32,
        max: u32,
    },
    #[error(transparent)]
    Agents(crate::agents::AgentsError),
    #[error(
        "--takeover: another process serves this address, but no dns-proxy of the same blocks \
         and port runs with --state-dir {state_dir}; an agent takes over only from one that \
         shares its --state-dir (and so its table of servers)"
    )]
    NothingToTakeOver { state_dir: String },
    #[error(
        "--takeover: another dns-proxy redirects this cgroup, but {state_dir}, this agent's \
         table, holds no list of running agents: that agent runs with another --state-dir or \
         other blocks (another mode: --listen, --listen6), and an agent takes over only from one \
         with the same (stop it first, or start this one with its flags); or the list was \
         removed while it runs, which it pins again within 2 s (start again then)"
    )]
    NoAgentsPinned { state_dir: String },
    #[error("eBPF map {map}: {source}{hint}", hint = hint(source))]
    Map {
        map: &'static str,
        source: Box<aya::maps::MapError>,
    },
}

/// The root cause of an aya error, if it is an OS error.
pub(crate) fn os_error<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a io::Error> {
    let mut current = Some(err);
    while let Some(err) = current {
        if let Some(io_err) = err.downcast_ref::<io::Error>() {
            return Some(io_err);
        }
        current = err.source();
    }
    None
}

/// The OS error under an aya error (aya's messages name the syscall but not its errno), and
/// what to do about it.
fn hint(err: &(dyn std::error::Error + 'static)) -> String {
    match os_error(err) {
        Some(os) if os.kind() == io::ErrorKind::PermissionDenied && in_a_user_namespace() => {
            format!(
                " ({os}: dns-proxy runs in a user namespace, where its capabilities do not \
                 count for eBPF: run it in the host's, as root or with CAP_BPF, CAP_PERFMON and \
                 CAP_NET_ADMIN)"
            )
        }
        Some(os) if os.kind() == io::ErrorKind::PermissionDenied => format!(
            " ({os}: run dns-proxy as root, or with CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN)"
        ),
        // Not the verifier's doing, whatever its log says: every map and program is a
        // descriptor.
        Some(os) if os.raw_os_error() == Some(libc::EMFILE) => format!(
            " ({os}: the agent is out of open files; raise its hard limit, `ulimit -Hn` or \
             systemd's LimitNOFILE=, to a few thousand or more)"
        ),
        Some(os) => format!(" ({os})"),
        None => String::new(),
    }
}

/// Whether this process is in a user namespace other than the initial one (whose inode
/// number, `PROC_USER_INIT_INO`, is fixed): root there holds every capability, and none of
/// them lets it load eBPF programs (helper-175, `unshare -r`).
fn in_a_user_namespace() -> bool {
    const INITIAL_USER_NAMESPACE: &str = "user:[4026531837]";
    std::fs::read_link("/proc/self/ns/user")
        .is_ok_and(|link| link.as_os_str() != INITIAL_USER_NAMESPACE)
}

fn hook_hint(err: &(dyn std::error::Error + 'static), hook: &'static str) -> String {
    let min_kernel = PROGRAMS
        .iter()
        .find(|p| p.hook == hook)
        .map_or("a newer kernel", |p| p.min_kernel);
    // Out of open files: the load failed for want of a descriptor, after a verification that
    // may have passed and left its log (helper-122 was told of the verifier and Linux 5.17
    // under `prlimit --nofile=64`).
    if os_error(err).is_some_and(|os| os.raw_os_error() == Some(libc::EMFILE)) {
        return hint(err);
    }
    if refused_by_the_verifier(err) {
        // EACCES or EINVAL then say nothing of the hook, and of privileges only where the
        // agent runs without root (a verifier without CAP_PERFMON refuses pointer arithmetic).
        // SAFETY: geteuid has no arguments and cannot fail.
        let privileges = if unsafe { libc::geteuid() } == 0 {
            ""
        } else {
            "; without root the agent also needs CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN"
        };
        return format!(
            " (the kernel's verifier refused the program, for the reason the end of its output \
             gives: dns-proxy needs Linux {MIN_KERNEL} or later, and is tested on Linux 6.1 and \
             6.18; please report it with `uname -r`{privileges})"
        );
    }
    match os_error(err) {
        Some(os) if matches!(os.raw_os_error(), Some(libc::EOPNOTSUPP | ENOTSUPP)) => format!(
            " ({os}: this kernel does not support {hook}, which needs Linux {min_kernel} with \
             CONFIG_CGROUP_BPF)"
        ),
        // What a kernel without the hook answers, among other things.
        Some(os) if os.raw_os_error() == Some(libc::EINVAL) => {
            format!(" ({os}: a kernel older than Linux {min_kernel} has no {hook})")
        }
        _ => hint(err),
    }
}

/// The oldest kernel the programs are written for (`sk_lookup`'s ingress interface and
/// `bpf_loop`); docs/operations.md says what each part needs.
const MIN_KERNEL: &str = "5.17";

/// Whether `err` is a program load the verifier refused, with its reasons.
fn refused_by_the_verifier(err: &(dyn std::error::Error + 'static)) -> bool {
    use aya::programs::ProgramError;
    err.downcast_ref::<ProgramError>()
        .or_else(|| {
            err.downcast_ref::<Box<ProgramError>>()
                .map(|boxed| &**boxed)
        })
        .and_then(verifier_log)
        .is_some_and(|log| !log.trim().is_empty())
}

/// What the verifier said of a program it refused.
fn verifier_log(err: &aya::programs::ProgramError) -> Option<String> {
    match err {
        aya::programs::ProgramError::LoadError { verifier_log, .. } => {
            Some(verifier_log.to_string())
        }
        _ => None,
    }
}

/// The `cgroup_skb` program `name` of the object.
fn cgroup_skb<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut CgroupSkb, EbpfError> {
    ebpf.program_mut(name)
        .and_then(|program| <&mut CgroupSkb>::try_from(program).ok())
        .ok_or(EbpfError::Missing {
            kind: "cgroup_skb program",
            name,
        })
}

/// Whether the kernel refused a program for calling `helper`, which it does not offer to the
/// program's type.
fn lacks_helper(err: &aya::programs::ProgramError, helper: &str) -> bool {
    verifier_log(err).is_some_and(|log| log.contains(&format!("unknown func {helper}#")))
}

/// The kernel's internal "operation not supported" (524), which the bpf syscall can leak.
const ENOTSUPP: i32 = 524;

/// How a program is attached.
#[derive(Clone, Copy)]
enum Hook {
    /// A `cgroup/*` sock_addr hook, on the redirected cgroup.
    SockAddr,
    /// `sk_lookup`, on the agent's network namespace.
    SkLookup,
    /// `cgroup_skb/egress`, on the redirected cgroup.
    Egress,
    /// A `cgroup/*` sock hook (`sock_release`), on the redirected cgroup.
    Sock,
    /// `cgroup/setsockopt`, on the redirected cgroup.
    Sockopt,
}

struct ProgramSpec {
    name: &'static str,
    hook: &'static str,
    kind: Hook,
    /// Programs that send traffic to the proxy. Attached last and detached first, so a
    /// redirected socket always has its answers decoded and its packets steered.
    redirects: bool,
    min_kernel: &'static str,
}

/// In attach order: the redirecting programs first, but disarmed (`ARMED` is 0 until every
/// program is attached: they redirect nothing before sk_lookup and the decoding programs are
/// in place); then the guards (bind, and every packet sent), after which sockets bound to the
/// block while no agent ran are aborted ([`LAST_GUARD`]), before `sk_lookup` and the decoding
/// programs.
const PROGRAMS: &[ProgramSpec] = &[
    ProgramSpec::redirecting(names::CONNECT4, "cgroup/connect4", "5.8"),
    ProgramSpec::redirecting(names::CONNECT6, "cgroup/connect6", "5.8"),
    ProgramSpec::redirecting(names::SENDMSG4, "cgroup/sendmsg4", "5.8"),
    ProgramSpec::redirecting(names::SENDMSG6, "cgroup/sendmsg6", "5.8"),
    ProgramSpec::new(names::BIND4, "cgroup/bind4", Hook::SockAddr, "4.17"),
    ProgramSpec::new(names::BIND6, "cgroup/bind6", Hook::SockAddr, "4.17"),
    ProgramSpec::new(
        names::SETSOCKOPT,
        "cgroup/setsockopt",
        Hook::Sockopt,
        "5.11",
    ),
    ProgramSpec::new(
        names::SOCK_RELEASE,
        "cgroup/sock_release",
        Hook::Sock,
        "5.9",
    ),
    ProgramSpec::new(names::EGRESS, "cgroup_skb/egress", Hook::Egress, "5.8"),
    ProgramSpec::new(names::SK_LOOKUP, "sk_lookup", Hook::SkLookup, "5.17"),
    ProgramSpec::new(names::RECVMSG4, "cgroup/recvmsg4", Hook::SockAddr, "5.2"),
    ProgramSpec::new(names::RECVMSG6, "cgroup/recvmsg6", Hook::SockAddr, "5.2"),
    ProgramSpec::new(
        names::GETPEERNAME4,
        "cgroup/getpeername4",
        Hook::SockAddr,
        "5.8",
    ),
    ProgramSpec::new(
        names::GETPEERNAME6,
        "cgroup/getpeername6",
        Hook::SockAddr,
        "5.8",
    ),
];

/// Once this one is attached, no socket of the cgroup may bind a block address on the
/// proxy's port, nor send from one: those bound before are aborted then
/// ([`block_binders`]).
const LAST_GUARD: &str = names::EGRESS;

impl ProgramSpec {
    const fn new(
        name: &'static str,
        hook: &'static str,
        kind: Hook,
        min_kernel: &'static str,
    ) -> Self {
        Self {
            name,
            hook,
            kind,
            redirects: false,
            min_kernel,
        }
    }

    const fn redirecting(name: &'static str, hook: &'static str, min_kernel: &'static str) -> Self {
        Self {
            name,
            hook,
            kind: Hook::SockAddr,
            redirects: true,
            min_kernel,
        }
    }
}

/// A block of the proxy's addresses and the port its listeners use there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Block {
    pub addresses: AddressBlock,
    pub port: u16,
}

impl Block {
    /// The server index `addr` encodes, if it is an address of this block on its port.
    fn index_of(&self, addr: SocketAddr) -> Option<u32> {
        if addr.port() != self.port {
            return None;
        }
        self.addresses.index_of(addr.ip())
    }
}

/// The proxy's listening sockets, which `sk_lookup` hands the block's packets to.
pub struct ListenerFds<'a> {
    pub tcp4: BorrowedFd<'a>,
    pub tcp6: Option<BorrowedFd<'a>>,
    /// One per UDP thread.
    pub udp4: Vec<BorrowedFd<'a>>,
    pub udp6: Vec<BorrowedFd<'a>>,
    /// The metrics listener and its address: `sk_lookup` hands its connections to this one
    /// only, whoever else joins its port.
    pub metrics: Option<(SocketAddr, BorrowedFd<'a>)>,
}

/// What the redirect sends to the proxy, and what it leaves alone.
pub struct RedirectConfig<'a> {
    pub cgroup: &'a Cgroup,
    /// IPv4 sockets and v4-mapped destinations go to this block.
    pub block4: Block,
    /// IPv6 sockets go to this block; `None`: they are left alone.
    pub block6: Option<Block>,
    /// The agent's own cgroup: no agent of this block redirects its sockets (`AGENT_CGROUPS`).
    pub agent_cgroup: &'a Cgroup,
    /// The operator's cgroup trees whose sockets are never redirected.
    pub excluded: &'a [ExcludedTree<'a>],
    /// The operator's servers, whose sockets are never redirected.
    pub excluded_servers: &'a [ServerPrefix],
    /// The most slots of the table one cgroup may take; 0: no limit.
    pub max_origins_per_cgroup: u32,
    /// The bpffs directory where the server table is pinned.
    pub state_dir: &'a Path,
    pub listeners: ListenerFds<'a>,
    /// The listeners joined another agent's (`--takeover`): that agent must be alive in this
    /// state directory, on this port, or this one would serve with a table of its own.
    pub taking_over: bool,
    /// Leave `sock_release` attached, pinned, when this agent stops (`run`; not `exec`); in
    /// node mode the egress guard too.
    pub leave_release_attached: bool,
}

/// A cgroup whose sockets, and those of every cgroup below it, are left alone.
#[derive(Debug, Clone, Copy)]
pub struct ExcludedTree<'a> {
    pub cgroup: &'a Cgroup,
    /// Its depth below the hierarchy's root.
    pub level: u32,
}

/// The loaded and attached programs. Dropping it detaches them all but those whose links are
/// pinned: `sock_release`, and in node mode the egress guard.
pub struct Redirector {
    ebpf: Ebpf,
    redirect_links: Vec<(&'static str, CgroupSockAddrLinkId)>,
    steer_link: Option<SkLookupLinkId>,
    /// The links pinned, which stay attached when the agent stops.
    link_pins: Vec<Arc<LinkPin>>,
    /// This agent's entries of `SERVING`.
    serving: Arc<Serving>,
    cgroup: String,
    /// Until [`Redirector::take_exclusions`].
    exclusions: Option<Exclusions>,
    /// Until [`Redirector::take_routing`].
    routing: Option<(DirectSources, RedirectSwitch)>,
    /// Until [`Redirector::take_alive_at`].
    alive_at: Option<AliveAt>,
    own_sockets: OwnSockets,
}

impl Redirector {
    /// Loads the programs, attaches them to `config.cgroup` (and `sk_lookup` to this network
    /// namespace), and starts forwarding their log records to the `log` crate. Must run
    /// inside a tokio runtime.
    pub fn attach(
        config: &RedirectConfig<'_>,
    ) -> Result<(Self, ServerTable, KernelCounters, Agents), EbpfError> {
        let missing = crate::privileges::missing_for_loading();
        if !missing.is_empty() {
            return Err(EbpfError::MissingCapabilities { missing });
        }
        let udp_sockets = config.listeners.udp4.len();
        if udp_sockets > MAX_UDP_SOCKETS as usize {
            return Err(EbpfError::TooManyUdpSockets {
                count: udp_sockets,
                max: MAX_UDP_SOCKETS,
            });
        }
        let foreign_namespaces = !config.block4.addresses.first().is_loopback();
        let kernel_config = KernelConfig::new(
            netns_cookie()?,
            config.cgroup.id,
            (config.block4.addresses, config.block4.port),
            config.block6.map(|block| (block.addresses, block.port)),
            udp_sockets as u16,
            foreign_namespaces,
            config.listeners.metrics.map(|(addr, _)| addr),
        );
        let excluded_levels = excluded_levels(config.excluded)?;
        // Only where there is something to exclude: the program runs at every mkdir of a
        // cgroup on the host.
        let cgroup_offsets = if config.excluded.is_empty() {
            None
        } else {
            kernel_btf::cgroup_offsets(Path::new(kernel_btf::KERNEL_BTF))
                .inspect_err(|err| log::warn!("{err}: {MADE_EXCLUDED_LATER}"))
                .ok()
        };
        let mut ebpf = EbpfLoader::new()
            .override_global(names::REDIRECT_CONFIG, &kernel_config, true)
            .override_global(names::EXCLUDED_LEVELS, &excluded_levels, true)
            .override_global(
                names::CGROUP_OFFSETS,
                &cgroup_offsets.unwrap_or_default(),
                true,
            )
            .override_global(
                names::EXCLUDED_SERVER_COUNT,
                &(config.excluded_servers.len() as u32),
                true,
            )
            .override_global(
                names::MAX_ORIGINS_PER_CGROUP,
                &config.max_origins_per_cgroup,
                true,
            )
            // A key no workload can know, for where new origins' searches for a slot start
            // in the table (`Origin::slot_hash`).
            .override_global(
                names::TABLE_HASH_KEY,
                &crate::host::random_key().map_err(EbpfError::RandomKey)?,
                true,
            )
            .default_map_pin_directory(config.state_dir)
            .load(EBPF_OBJECT)
            .map_err(|source| EbpfError::Load {
                source: Box::new(source),
                state_dir: config.state_dir.display().to_string(),
            })?;
        spawn_kernel_logger(&mut ebpf);

        let mut exclusions = Exclusions::new(
            take_map(&mut ebpf, names::EXCLUDED_CGROUPS)?,
            take_map(&mut ebpf, names::EXCLUDED_PATHS)?,
            config.excluded,
        )?;
        if cgroup_offsets.is_some() && exclude_made_cgroups(&mut ebpf) {
            exclusions.set_kernel_excludes_made();
            // The paths were looked at before the program ran: one made since is excluded by
            // this look, and from now on by the program. Before anything is redirected.
            exclusions.refresh();
        }
        // Before anything is attached: from now on no agent redirects this one's sockets.
        let agents = Agents::register(
            take_map(&mut ebpf, names::AGENT_CGROUPS)?,
            take_map(&mut ebpf, names::AGENTS)?,
            config.agent_cgroup.id,
            config.block4.port,
        )
        .map_err(EbpfError::Agents)?;
        if config.taking_over && !agents.others_on_port() {
            return Err(EbpfError::NothingToTakeOver {
                state_dir: config.state_dir.display().to_string(),
            });
        }
        log::info!(
            "never redirecting this agent's cgroup {} (id {}), nor any other agent's of this block",
            config.agent_cgroup.path.display(),
            config.agent_cgroup.id
        );
        fill_listeners(&mut ebpf, &config.listeners)?;
        let own_sockets = mark_listeners(&mut ebpf, &config.listeners)?;
        fill_excluded_servers(&mut ebpf, config.excluded_servers)?;
        let servers = ServerTable::take(&mut ebpf, config.block4, config.block6)?;
        let counters = KernelCounters::take(&mut ebpf)?;
        // Before anything is attached: the programs redirect nothing, and sk_lookup steers
        // nothing, for an agent that has not said it runs.
        let mut alive_at = AliveAt::new(take_array(&mut ebpf, names::ALIVE_AT)?);
        alive_at.now()?;

        let cgroup_name = config.cgroup.path.display().to_string();
        let cgroup_fd =
            File::open(&config.cgroup.path).map_err(|source| EbpfError::OpenCgroup {
                cgroup: cgroup_name.clone(),
                source,
            })?;
        let netns_fd = File::open("/proc/self/ns/net").map_err(EbpfError::OpenNetns)?;
        let mut redirect_links = Vec::new();
        let mut steer_link = None;
        let mut link_pins = Vec::new();
        for spec in PROGRAMS {
            let program = ebpf.program_mut(spec.name).ok_or(EbpfError::Missing {
                kind: "program",
                name: spec.name,
            })?;
            let load_err = |source| EbpfError::LoadProgram {
                program: spec.name,
                hook: spec.hook,
                source: Box::new(source),
            };
            let attach_err = |target: &str, source| EbpfError::Attach {
                program: spec.name,
                hook: spec.hook,
                target: target.to_owned(),
                source: Box::new(source),
            };
            let mismatch = EbpfError::Missing {
                kind: "program of the expected type",
                name: spec.name,
            };
            match spec.kind {
                Hook::SockAddr => {
                    let program: &mut CgroupSockAddr = program.try_into().map_err(|_| mismatch)?;
                    program.load().map_err(load_err)?;
                    // Single: the kernel rejects any other flag for a cgroup bpf_link, and
                    // links always attach in multi mode, beside other programs (a CNI's
                    // socket LB, say).
                    let link = program
                        .attach(cgroup_fd.as_fd(), CgroupAttachMode::Single)
                        .map_err(|source| attach_err(&format!("cgroup {cgroup_name}"), source))?;
                    if spec.redirects {
                        redirect_links.push((spec.name, link));
                    }
                    log::info!("attached {} ({}) to {cgroup_name}", spec.name, spec.hook);
                }
                Hook::Egress => {
                    let program: &mut CgroupSkb = program.try_into().map_err(|_| mismatch)?;
                    let loaded = match program.load() {
                        Ok(()) => spec.name,
                        Err(err) if lacks_helper(&err, "bpf_get_netns_cookie") => {
                            // Node mode guards every namespace anyway.
                            if !foreign_namespaces {
                                log::warn!(
                                    "this kernel tells cgroup_skb programs no network namespace \
                                     (Linux 6.18 does): in every namespace of the cgroup, not \
                                     only this one, a packet sent from a block address on port \
                                     {} (or {} for IPv6), or sent raw to a block address, is \
                                     dropped; a container of the cgroup that serves on its own \
                                     127.53.x.y there needs --exclude-cgroup",
                                    config.block4.port,
                                    config.block6.map_or(config.block4.port, |block| block.port),
                                );
                            }
                            cgroup_skb(&mut ebpf, names::EGRESS_ANY_NETNS)?
                                .load()
                                .map_err(|source| EbpfError::LoadProgram {
                                    program: names::EGRESS_ANY_NETNS,
                                    hook: spec.hook,
                                    source: Box::new(source),
                                })?;
                            names::EGRESS_ANY_NETNS
                        }
                        Err(err) => return Err(load_err(err)),
                    };
                    let program = cgroup_skb(&mut ebpf, loaded)?;
                    let attach = |program: &mut CgroupSkb| {
                        program
                            .attach(
                                cgroup_fd.as_fd(),
                                CgroupSkbAttachType::Egress,
                                CgroupAttachMode::Single,
                            )
                            .map_err(|source| attach_err(&format!("cgroup {cgroup_name}"), source))
                    };
                    let link = attach(program)?;
                    // Node mode: a pod's socket connected to the block is refused here while
                    // no agent serves, rather than by the node's rate-limited port unreachable.
                    if config.leave_release_attached && foreign_namespaces {
                        let held = program.take_link(link);
                        match pin_link(link_pin::EGRESS, held, config) {
                            Some(pin) => link_pins.push(pin),
                            // The link went with it: attached again, for as long as this
                            // agent runs.
                            None => {
                                attach(program)?;
                            }
                        }
                    }
                    log::info!("attached {loaded} ({}) to {cgroup_name}", spec.hook);
                }
                Hook::Sock => {
                    let program: &mut CgroupSock = program.try_into().map_err(|_| mismatch)?;
                    program.load().map_err(load_err)?;
                    let attach = |program: &mut CgroupSock| {
                        program
                            .attach(cgroup_fd.as_fd(), CgroupAttachMode::Single)
                            .map_err(|source| attach_err(&format!("cgroup {cgroup_name}"), source))
                    };
                    let link = attach(program)?;
                    if config.leave_release_attached {
                        let held = program.take_link(link);
                        match pin_link(link_pin::RELEASE, held, config) {
                            Some(pin) => link_pins.push(pin),
                            // As above.
                            None => {
                                attach(program)?;
                            }
                        }
                    }
                    log::info!("attached {} ({}) to {cgroup_name}", spec.name, spec.hook);
                }
                Hook::Sockopt => {
                    let program: &mut CgroupSockopt = program.try_into().map_err(|_| mismatch)?;
                    program.load().map_err(load_err)?;
                    program
                        .attach(cgroup_fd.as_fd(), CgroupAttachMode::Single)
                        .map_err(|source| attach_err(&format!("cgroup {cgroup_name}"), source))?;
                    log::info!("attached {} ({}) to {cgroup_name}", spec.name, spec.hook);
                }
                Hook::SkLookup => {
                    let program: &mut SkLookup = program.try_into().map_err(|_| mismatch)?;
                    program.load().map_err(load_err)?;
                    steer_link = Some(
                        program
                            .attach(netns_fd.as_fd())
                            .map_err(|source| attach_err("this network namespace", source))?,
                    );
                    log::info!(
                        "attached {} ({}) to this network namespace",
                        spec.name,
                        spec.hook
                    );
                }
            }
            if spec.name == LAST_GUARD {
                abort_block_binders(config.block4, config.block6);
            }
        }
        // Before the redirect starts, so that the first socket it sends gets its source.
        let block4 = match config.block4.addresses.first() {
            IpAddr::V4(first) => first,
            IpAddr::V6(_) => unreachable!("the IPv4 block is IPv4"),
        };
        let sources = DirectSources::new(
            take_array(&mut ebpf, names::SOURCE4)?,
            take_map(&mut ebpf, names::SOURCE4_BY_SERVER)?,
            block4,
            &servers.servers4(),
        );
        // Every program is in place, `sk_lookup` steers to this agent: a pinned egress guard
        // (a dead agent's, this one's) lets pass what pods send to the block from now on.
        // Before, it refused it at once, where the node's refusal is rate-limited.
        let serving = Serving::put(
            take_as(&mut ebpf, names::SERVING)?,
            config.cgroup.id,
            &config.listeners,
            config.block4,
            config.block6,
        )?;
        // The redirect may start.
        let mut switch = RedirectSwitch(take_array(&mut ebpf, names::ARMED)?);
        switch.set(&[])?;
        Ok((
            Self {
                ebpf,
                redirect_links,
                steer_link,
                link_pins,
                serving: Arc::new(serving),
                cgroup: cgroup_name,
                exclusions: Some(exclusions),
                routing: Some((sources, switch)),
                alive_at: Some(alive_at),
                own_sockets,
            },
            servers,
            counters,
            agents,
        ))
    }

    /// The pinned links: to be pinned again if their pins go.
    pub fn link_pins(&self) -> Vec<Arc<LinkPin>> {
        self.link_pins.clone()
    }

    /// Pins this agent's links in place of another agent's on this cgroup, as its stop leaves
    /// them: called when no other agent serves its port, so that the guard left attached is
    /// that of the last agent that ran, whose time its refusals are bounded by
    /// ([`dns_proxy_common::REFUSED_WITHOUT_AGENT_FOR_NS`]). Left, a newer agent's pin (one that
    /// took over and stopped first, or died) would stay, and its guard's time run out early.
    pub fn take_the_pins_as_the_last(&self) {
        for pin in &self.link_pins {
            match pin.take_back() {
                None => {}
                Some(Ok(())) => log::info!(
                    "pinned {} in place of the link of an agent that serves no more: this one \
                     is the last to",
                    pin.kind().program
                ),
                Some(Err(problem)) => log::warn!(
                    "cannot pin {} in place of another agent's link ({problem})",
                    pin.kind().program
                ),
            }
        }
    }

    /// Unpins this agent's egress guard if its pin is still this agent's while another agent
    /// serves its port and has no socket in `SERVING`: that one is of a version before
    /// `SERVING`, and this guard, left, would refuse its pods' sockets (helper-203). (One of
    /// this version pins its own at its next heartbeat.)
    pub fn unpin_the_guard_beside_another(&self) {
        if self.serving.another_in_serving() {
            return;
        }
        for pin in self
            .link_pins
            .iter()
            .filter(|pin| pin.kind() == link_pin::EGRESS)
        {
            match pin.unpin_for_good() {
                Ok(true) => log::info!(
                    "unpinned {} ({}): the agent that serves now put no socket in SERVING (a \
                     version before it), and this one's guard would refuse its pods",
                    pin.kind().program,
                    pin.path().display()
                ),
                Ok(false) => {}
                Err(err) => log::warn!("{err}"),
            }
        }
    }

    /// This agent's entries of `SERVING`.
    pub fn serving(&self) -> Arc<Serving> {
        Arc::clone(&self.serving)
    }

    /// Stops redirecting new sockets, while packets to the proxy's addresses are still steered
    /// to it and answers still decoded. The first step of a graceful shutdown.
    pub fn stop_redirecting(&mut self) {
        for (name, link) in self.redirect_links.drain(..) {
            let result = self
                .ebpf
                .program_mut(name)
                .and_then(|program| <&mut CgroupSockAddr>::try_from(program).ok())
                .map(|program| program.detach(link));
            log_detached(name, &format!("from {}", self.cgroup), result);
        }
    }
}

/// What happens to a cgroup made at an excluded path when the kernel cannot exclude it as it
/// is made.
const MADE_EXCLUDED_LATER: &str = "a cgroup made at an excluded path (a service's, at each \
    start) is excluded once the agent sees it, which races the service's first lookups";

/// Loads and attaches `raw_tp/cgroup_mkdir` (with the offsets already in the object), which
/// excludes a cgroup made at an excluded path as the kernel makes it; whether it is attached.
/// A warning where the kernel refuses it (a kernel locked down against reading its memory,
/// say): the agent then excludes such a cgroup when it sees it. The link lives as long as
/// `ebpf`.
fn exclude_made_cgroups(ebpf: &mut Ebpf) -> bool {
    let attached = (|| -> Result<(), String> {
        let program: &mut RawTracePoint = ebpf
            .program_mut(names::EXCLUDE_MADE)
            .ok_or("no such program in the object")?
            .try_into()
            .map_err(|_| "not a raw tracepoint program")?;
        program
            .load()
            .map_err(|err| format!("{err}{}", hint(&err)))?;
        program
            .attach("cgroup_mkdir")
            .map_err(|err| err.to_string())?;
        Ok(())
    })();
    match attached {
        Ok(()) => {
            log::info!(
                "attached {} (raw_tp/cgroup_mkdir): a cgroup made at an excluded path is \
                 excluded as the kernel makes it",
                names::EXCLUDE_MADE
            );
            true
        }
        Err(err) => {
            log::warn!(
                "cannot attach {} (raw_tp/cgroup_mkdir): {err}: {MADE_EXCLUDED_LATER}",
                names::EXCLUDE_MADE
            );
            false
        }
    }
}

/// Says how detaching program `name` went (`None`: the program was not found).
fn log_detached(name: &str, what: &str, result: Option<Result<(), aya::programs::ProgramError>>) {
    match result {
        Some(Ok(())) => log::info!("detached {name} {what}"),
        Some(Err(err)) => log::warn!("detaching {name} {what}: {err}"),
        None => log::warn!("detaching {name}: program not found"),
    }
}

impl Redirector {
    /// The excluded cgroup trees, for the task that keeps them excluded when they are made
    /// anew; `None` after the first call.
    pub fn take_exclusions(&mut self) -> Option<Exclusions> {
        self.exclusions.take()
    }

    /// The source of redirected sockets and the switch of the redirect, for the task that
    /// keeps both as routes change; `None` after the first call.
    pub fn take_routing(&mut self) -> Option<(DirectSources, RedirectSwitch)> {
        self.routing.take()
    }

    /// Where the agent says it runs, for the task that keeps saying so; `None` after the first
    /// call.
    pub fn take_alive_at(&mut self) -> Option<AliveAt> {
        self.alive_at.take()
    }

    /// Where the agent marks the sockets it makes as its own.
    pub fn own_sockets(&self) -> OwnSockets {
        self.own_sockets.clone()
    }

    /// Stops steering packets to this agent's sockets; `what_follows` says in the log what
    /// becomes of them. For an agent that stops: while another runs, so that what reaches the
    /// block goes to that one and this one's drain ends with what it has; otherwise once its
    /// UDP listeners are done with new packets, so that what is sent to the block is refused
    /// (the kernel finds no socket there) while they answer what they have.
    pub fn stop_steering(&mut self, what_follows: &str) {
        let Some(link) = self.steer_link.take() else {
            return;
        };
        let name = names::SK_LOOKUP;
        let result = self
            .ebpf
            .program_mut(name)
            .and_then(|program| <&mut SkLookup>::try_from(program).ok())
            .map(|program| program.detach(link));
        log_detached(
            name,
            &format!("from this network namespace: {what_follows}"),
            result,
        );
    }
}

impl Drop for Redirector {
    fn drop(&mut self) {
        // Dropping `ebpf` closes every link; say so, since operators watch for it.
        if self.link_pins.is_empty() {
            log::info!("detaching all programs from {}", self.cgroup);
            return;
        }
        let left: Vec<&LinkPin> = self
            .link_pins
            .iter()
            .filter(|pin| say_what_stays(pin, &self.cgroup))
            .map(|pin| &**pin)
            .collect();
        if left.is_empty() {
            log::info!("detaching all programs from {}", self.cgroup);
            return;
        }
        let list = |each: fn(&LinkPin) -> String| {
            left.iter()
                .map(|pin| each(pin))
                .collect::<Vec<_>>()
                .join(" and ")
        };
        log::info!(
            "detaching all programs from {} but {} (pinned at {}, they redirect nothing: {})",
            self.cgroup,
            list(|pin| pin.kind().program.to_owned()),
            list(|pin| pin.path().display().to_string()),
            list(|pin| pin.kind().keeps.to_owned()),
        );
    }
}

/// Says what becomes of `pin`'s link as the agent stops, pinning it again if its pin is gone
/// since the last heartbeat (SIGTERM just after the removal would otherwise leave nothing
/// attached); whether it is this agent's link that stays attached.
fn say_what_stays(pin: &LinkPin, cgroup: &str) -> bool {
    let (program, path) = (pin.kind().program, pin.path().display());
    let without = pin.kind().without;
    if pin.given_up() {
        log::info!(
            "detaching {program} from {cgroup}: unpinned beside an agent of a version before \
             SERVING, whose pods it would refuse"
        );
        return false;
    }
    let now = match pin.pinned_now() {
        PinnedNow::Gone => match pin.restore() {
            Ok(true) => PinnedNow::Ours,
            // Gone still if it could not be made (its directory gone with the table).
            Ok(false) | Err(_) => pin.pinned_now(),
        },
        now => now,
    };
    match now {
        PinnedNow::Ours => return true,
        PinnedNow::Another => log::info!(
            "detaching {program} from {cgroup}: the one pinned at {path} is another agent's on \
             this cgroup, and stays attached in its place"
        ),
        // Removed with the table since the last heartbeat: nothing is left to keep, unless
        // another agent pins the table again.
        PinnedNow::Gone if !pin.dir().exists() => log::warn!(
            "detaching {program} from {cgroup}: the table's directory is gone (removed since \
             the agent's last heartbeat)"
        ),
        PinnedNow::Gone => log::warn!(
            "detaching {program} from {cgroup}: its pin at {path} is gone, and cannot be made \
             again; {without}"
        ),
        PinnedNow::Blocked(what) => log::warn!(
            "detaching {program} from {cgroup}: its pin's place is taken ({what}); {without}"
        ),
        PinnedNow::Unknown(what) => log::warn!(
            "whether {program} stays attached to {cgroup} cannot be told ({what}): if it does \
             not, {without}"
        ),
    }
    false
}

/// Holds `taken`, a link of `kind` taken from its program, and pins it in the table's
/// directory; `None` if it cannot be held (the link is gone then: the caller attaches anew,
/// for as long as the agent runs). A pin that cannot be made yet is made by the heartbeat.
fn pin_link<L>(
    kind: PinKind,
    taken: Result<L, aya::programs::ProgramError>,
    config: &RedirectConfig<'_>,
) -> Option<Arc<LinkPin>>
where
    FdLink: TryFrom<L, Error = aya::programs::links::LinkError>,
{
    let pin = taken
        .map_err(|err| err.to_string())
        .and_then(|link| FdLink::try_from(link).map_err(|err| format!("not a bpf_link: {err}")))
        .and_then(|held| LinkPin::hold(kind, held, config.state_dir, config.cgroup.id));
    match pin {
        Ok(pin) => {
            if let Err(problem) = pin.pin_at_start() {
                log::warn!(
                    "cannot pin {} yet ({problem}): it stays attached while the agent runs, \
                     and the heartbeat pins it once nothing is in the way",
                    kind.program
                );
            }
            Some(Arc::new(pin))
        }
        Err(problem) => {
            log::warn!(
                "cannot leave {} attached for when no agent runs ({problem}): {}",
                kind.program,
                kind.without
            );
            None
        }
    }
}

/// How long the start sweep may take: the kernel's lookups make thousands of twins cost
/// seconds (5,000 took 0.6 s, 19,000 8.5 s), and lookups go direct meanwhile.
const SWEEP_BUDGET: std::time::Duration = std::time::Duration::from_secs(1);

/// Aborts the sockets of this namespace bound to a block address on the proxy's port while no
/// agent ran ([`block_binders`]), and says so. If they cannot be looked for, the agent goes on
/// (they stay as the kernel left them) and says why.
fn abort_block_binders(block4: Block, block6: Option<Block>) {
    let deadline = std::time::Instant::now() + SWEEP_BUDGET;
    match block_binders::abort_block_binders(block4, block6, deadline) {
        Ok(block_binders::Sweep {
            aborted,
            left,
            unconfirmed,
        }) => {
            // The first few, and how many: a workload may have made thousands.
            const NAMED: usize = 10;
            for (local, peer) in aborted.iter().take(NAMED) {
                log::warn!(
                    "aborted a socket bound to {local}, a block address on the proxy's port, \
                     connected to {peer}: it was bound while no agent ran, and could have sent \
                     datagrams shown as a server's answers"
                );
            }
            if aborted.len() > NAMED {
                log::warn!(
                    "aborted {} sockets bound to the block while no agent ran ({} not named)",
                    aborted.len(),
                    aborted.len() - NAMED
                );
            }
            if unconfirmed {
                log::error!(
                    "stopped looking for sockets bound to the block while no agent ran after \
                     {SWEEP_BUDGET:?} with more than {} still connected there: some may have \
                     been missed (each takes what the client it is connected to sends to the \
                     block; nothing it sends gets out)",
                    block_binders::WHOLE_DUMP
                );
            }
            if left > 0 {
                log::error!(
                    "stopped aborting sockets bound to the block while no agent ran after \
                     {SWEEP_BUDGET:?}, {left} left: each keeps taking what the client it is \
                     connected to sends to the block (nothing it sends gets out)"
                );
            }
        }
        Err(err) => log::error!(
            "cannot look for sockets bound to the block while no agent ran (sock_diag): {err}; \
             any there stay as they are"
        ),
    }
}

/// `ARMED`: a bit per address family; while it is set, the redirecting programs send sockets
/// to that family's block; cleared, they send nothing there (new lookups go direct), while
/// what was sent before is still steered and decoded.
pub struct RedirectSwitch(aya::maps::Array<MapData, u32>);

impl RedirectSwitch {
    /// Redirects to every family's block but those of the blocks in `unrouted`.
    pub fn set(&mut self, unrouted: &[dns_proxy_common::AddressBlock]) -> Result<(), EbpfError> {
        let off = unrouted
            .iter()
            .map(|block| match block.first() {
                IpAddr::V4(_) => dns_proxy_common::ARMED_IPV4,
                IpAddr::V6(_) => dns_proxy_common::ARMED_IPV6,
            })
            .fold(0, |bits, bit| bits | bit);
        let on = (dns_proxy_common::ARMED_IPV4 | dns_proxy_common::ARMED_IPV6) & !off;
        self.0.set(0, on, 0).map_err(|source| EbpfError::Map {
            map: names::ARMED,
            source: Box::new(source),
        })
    }
}

/// This network namespace's cookie, as `bpf_get_netns_cookie` gives it to the programs.
fn netns_cookie() -> Result<u64, EbpfError> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)
        .map_err(EbpfError::NetnsCookie)?;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: the descriptor is open (owned by `socket`); the kernel writes at most `len`
    // bytes into `cookie`, a live local that large, and the length back into `len`.
    let result = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    if result != 0 {
        return Err(EbpfError::NetnsCookie(io::Error::last_os_error()));
    }
    Ok(cookie)
}

/// `SO_NETNS_COOKIE` (Linux 5.14), which the libc crate may not name.
const SO_NETNS_COOKIE: libc::c_int = 71;

/// Puts the proxy's listening sockets into `LISTENERS`, where `sk_lookup` finds them.
fn fill_listeners(ebpf: &mut Ebpf, listeners: &ListenerFds<'_>) -> Result<(), EbpfError> {
    let name = names::LISTENERS;
    let map = ebpf
        .map_mut(name)
        .ok_or(EbpfError::Missing { kind: "map", name })?;
    let mut map: SockMap<_> = SockMap::try_from(map).map_err(|source| EbpfError::Map {
        map: name,
        source: Box::new(source),
    })?;
    let mut put = |listener: Listener, fd: BorrowedFd<'_>| {
        map.set(listener_slot(listener), &fd.as_raw_fd(), 0)
            .map_err(|source| EbpfError::Map {
                map: name,
                source: Box::new(source),
            })
    };
    put(Listener::Tcp { family: AF_INET }, listeners.tcp4)?;
    if let Some(tcp6) = listeners.tcp6 {
        put(Listener::Tcp { family: AF_INET6 }, tcp6)?;
    }
    if let Some((_, metrics)) = listeners.metrics {
        put(Listener::Metrics, metrics)?;
    }
    for (family, sockets) in [(AF_INET, &listeners.udp4), (AF_INET6, &listeners.udp6)] {
        for (n, fd) in sockets.iter().enumerate() {
            put(
                Listener::Udp {
                    family,
                    n: n as u32,
                },
                *fd,
            )?;
        }
    }
    Ok(())
}

/// Marks the listeners as the agent's own (`AGENT_SOCKETS`), and returns where to mark the
/// sockets it makes from now on. Before anything is attached, so that the programs never
/// refuse the listeners' answers, sent from the block's addresses, whatever cgroup the agent
/// is moved to later.
fn mark_listeners(ebpf: &mut Ebpf, listeners: &ListenerFds<'_>) -> Result<OwnSockets, EbpfError> {
    let own_sockets = OwnSockets::new(take_as::<SkStorage<_, u8>>(ebpf, names::AGENT_SOCKETS)?);
    let metrics = listeners.metrics.map(|(_, fd)| fd);
    let udp = listeners.udp4.iter().chain(&listeners.udp6).copied();
    for fd in [Some(listeners.tcp4), listeners.tcp6, metrics]
        .into_iter()
        .flatten()
        .chain(udp)
    {
        own_sockets.mark(fd);
    }
    Ok(own_sockets)
}

/// Puts the operator's excluded servers (at most `MAX_EXCLUDED_SERVERS`, which the
/// configuration checks) into `EXCLUDED_SERVERS`, before anything is attached.
fn fill_excluded_servers(ebpf: &mut Ebpf, servers: &[ServerPrefix]) -> Result<(), EbpfError> {
    let name = names::EXCLUDED_SERVERS;
    let map = ebpf
        .map_mut(name)
        .ok_or(EbpfError::Missing { kind: "map", name })?;
    let map_err = |source| EbpfError::Map {
        map: name,
        source: Box::new(source),
    };
    let mut map: LpmTrie<_, ServerPrefixData, u8> = LpmTrie::try_from(map).map_err(map_err)?;
    for server in servers {
        let (prefix_len, data) = server.trie_key();
        map.insert(&Key::new(prefix_len, data), 1, 0)
            .map_err(map_err)?;
    }
    Ok(())
}

/// The `EXCLUDED_LEVELS` mask: one bit for each level that holds an excluded subtree.
fn excluded_levels(excluded: &[ExcludedTree<'_>]) -> Result<u64, EbpfError> {
    if excluded.len() > MAX_EXCLUDED_CGROUPS as usize {
        return Err(EbpfError::TooManyExclusions {
            count: excluded.len(),
            max: MAX_EXCLUDED_CGROUPS,
        });
    }
    let mut mask = 0u64;
    for tree in excluded {
        if tree.level > MAX_EXCLUDED_LEVEL {
            return Err(EbpfError::ExclusionTooDeep {
                cgroup: tree.cgroup.path.display().to_string(),
                level: tree.level,
                max: MAX_EXCLUDED_LEVEL,
            });
        }
        mask |= 1 << tree.level;
    }
    Ok(mask)
}

/// Takes map `name` out of the object, as the kind `T` it must be.
fn take_as<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, EbpfError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or(EbpfError::Missing { kind: "map", name })?;
    T::try_from(map).map_err(|source| EbpfError::Map {
        map: name,
        source: Box::new(source),
    })
}

fn take_map<V: aya::Pod, K: aya::Pod>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<HashMap<MapData, K, V>, EbpfError> {
    take_as(ebpf, name)
}

fn take_array<V: aya::Pod>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<aya::maps::Array<MapData, V>, EbpfError> {
    take_as(ebpf, name)
}

/// Forwards the kernel programs' aya-log records to the `log` crate. The logger owns the log
/// ring buffer; it must live as long as the programs (see docs/building.md).
fn spawn_kernel_logger(ebpf: &mut Ebpf) {
    let logger = match aya_log::EbpfLogger::init(ebpf) {
        Ok(logger) => logger,
        Err(err) => {
            log::warn!("kernel-side log records will not be shown: {err}");
            return;
        }
    };
    // SAFETY: the logger owns the ring buffer's fd, which stays open and the same for as long
    // as the logger lives, and the AsyncFd owns the logger.
    let registered =
        unsafe { AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) };
    let mut logger = match registered {
        Ok(logger) => logger,
        Err(err) => {
            log::warn!("kernel-side log records will not be shown: {err}");
            return;
        }
    };
    tokio::spawn(async move {
        loop {
            let mut guard = match logger.readable_mut().await {
                Ok(guard) => guard,
                Err(err) => {
                    log::warn!("kernel-side log reader stopped: {err}");
                    return;
                }
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
}

/// The kernel side's per-CPU counters (`COUNTERS`).
pub struct KernelCounters {
    map: PerCpuArray<MapData, u64>,
}

impl std::fmt::Debug for KernelCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KernelCounters")
    }
}

impl KernelCounters {
    fn take(ebpf: &mut Ebpf) -> Result<Self, EbpfError> {
        Ok(Self {
            map: take_as(ebpf, names::COUNTERS)?,
        })
    }

    /// `counter` summed over the CPUs.
    fn sum(&self, counter: Counter) -> Result<u64, aya::maps::MapError> {
        Ok(self.map.get(&(counter as u32), 0)?.iter().sum())
    }

    /// Each counter summed over the CPUs, or the first error of reading one.
    pub fn try_read(&self) -> Result<Vec<(Counter, u64)>, aya::maps::MapError> {
        Counter::ALL
            .iter()
            .map(|&counter| Ok((counter, self.sum(counter)?)))
            .collect()
    }

    /// Each counter summed over the CPUs. A counter that cannot be read is left out (and
    /// logged): a scrape shows what it can.
    pub fn read(&self) -> Vec<(Counter, u64)> {
        let mut values = Vec::with_capacity(Counter::ALL.len());
        for counter in Counter::ALL {
            match self.sum(counter) {
                Ok(value) => values.push((counter, value)),
                Err(err) => log::warn!("reading {} [{counter:?}]: {err}", names::COUNTERS),
            }
        }
        values
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_hints_say_what_to_do() {
        let eperm = io::Error::from_raw_os_error(libc::EPERM);
        assert!(
            hint(&eperm).contains("run dns-proxy as root"),
            "{}",
            hint(&eperm)
        );
        let einval = io::Error::from_raw_os_error(libc::EINVAL);
        let text = hook_hint(&einval, "cgroup/getpeername4");
        assert!(
            text.contains("older than Linux 5.8 has no cgroup/getpeername4"),
            "{text}"
        );
        let unsupported = io::Error::from_raw_os_error(ENOTSUPP);
        let text = hook_hint(&unsupported, "sk_lookup");
        assert!(
            text.contains("does not support sk_lookup, which needs Linux 5.17"),
            "{text}"
        );
        assert_eq!(hint(&io::Error::other("no OS error")), " (no OS error)");
    }

    #[test]
    fn a_program_the_verifier_refused_is_not_blamed_on_privileges_or_the_hook() {
        let refused = |errno, log: &str| aya::programs::ProgramError::LoadError {
            io_error: io::Error::from_raw_os_error(errno),
            verifier_log: aya_obj::VerifierLog::new(log.to_owned()),
        };
        // Linux 6.1's words for a path whose frames it counts in 32-byte steps.
        let too_deep = refused(
            libc::EACCES,
            "combined stack size of 6 calls is 544. Too large\n",
        );
        let text = hook_hint(&too_deep, "cgroup/connect6");
        assert!(text.contains("verifier refused"), "{text}");
        assert!(!text.contains("root") && !text.contains("CAP_"), "{text}");
        // And for a helper its `cgroup_skb` programs do not have (Linux 6.18 added it).
        let no_cookie = refused(
            libc::EINVAL,
            "160: (85) call bpf_get_netns_cookie#122\nunknown func bpf_get_netns_cookie#122\n",
        );
        let text = hook_hint(&no_cookie, "cgroup_skb/egress");
        assert!(!text.contains("has no cgroup_skb/egress"), "{text}");
        assert!(lacks_helper(&no_cookie, "bpf_get_netns_cookie"));
        assert!(!lacks_helper(&too_deep, "bpf_get_netns_cookie"));
        // Without a log it is still the syscall's error that speaks.
        let text = hook_hint(&refused(libc::EPERM, ""), "cgroup/connect4");
        assert!(text.contains("run dns-proxy as root"), "{text}");
        // Out of open files after a verification that passed and left its log: the limit is
        // to blame, not the kernel (helper-122, `prlimit --nofile=64`).
        let no_descriptor = refused(libc::EMFILE, "verification time 162776 usec\n");
        let text = hook_hint(&no_descriptor, "cgroup/connect4");
        assert!(text.contains("out of open files"), "{text}");
        assert!(!text.contains("verifier refused"), "{text}");
    }

    #[test]
    fn block_binders_are_aborted_after_the_guards_and_before_anything_decodes() {
        let position = |name| PROGRAMS.iter().position(|p| p.name == name).unwrap();
        let guarded = position(LAST_GUARD);
        for guard in [names::BIND4, names::BIND6, names::EGRESS] {
            assert!(position(guard) <= guarded, "{guard}");
        }
        for decoding in [
            names::SK_LOOKUP,
            names::RECVMSG4,
            names::RECVMSG6,
            names::GETPEERNAME4,
            names::GETPEERNAME6,
        ] {
            assert!(position(decoding) > guarded, "{decoding}");
        }
    }

    #[test]
    fn redirecting_programs_attach_first_and_are_armed_last() {
        let redirecting = PROGRAMS.iter().filter(|p| p.redirects).count();
        assert_eq!(redirecting, 4);
        assert!(PROGRAMS[..redirecting].iter().all(|p| p.redirects));
    }
}
