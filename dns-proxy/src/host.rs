//! What the agent sets up on its host before it attaches: the blocks' `local` routes, so the
//! kernel delivers their addresses here, and the bpffs directory where the server table is
//! pinned. Both are left in place at exit on purpose: a socket that was sent to a block address
//! keeps a local destination (its lookups fail fast, never into a black hole, while no agent
//! runs), and the next agent decodes the same addresses.
use std::{
    ffi::CString,
    fs, io, mem,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::{ffi::OsStrExt as _, fs::DirBuilderExt as _},
    },
    path::{Path, PathBuf},
    sync::Arc,
};

use dns_proxy_common::AddressBlock;

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error(
        "cannot route {block} to this host (`ip route replace local {block} dev lo`): \
         {source}{hint}"
    )]
    Route {
        block: AddressBlock,
        source: io::Error,
        /// What the error likely means ([`route_hint`]).
        hint: &'static str,
    },
    #[error("--state-dir {path}: {problem}")]
    StateDir { path: PathBuf, problem: String },
    #[error(
        "{path}: {problem}; to start anew, remove the table's directory (`rm -r {dir}`) while \
         no agent runs, and restart clients whose sockets outlive it (an old address may then \
         name another server)",
        dir = path.parent().unwrap_or(path).display()
    )]
    Pin { path: PathBuf, problem: String },
    #[error(
        "open files: {in_use} are in use before serving, and the limit is {limit}: fewer than \
         {needed} are left for upstream sockets, TCP connections and the metrics server; \
         raise it (`ulimit -Hn`, systemd's LimitNOFILE=) to a few thousand or more"
    )]
    TooFewOpenFiles {
        in_use: u64,
        limit: u64,
        needed: u64,
    },
    /// Nothing was found wrong: the agent could not open what it checks.
    #[error(
        "cannot check {path}: {source} (the agent is out of open files: raise its limit, \
         `ulimit -n` or systemd's LimitNOFILE=)"
    )]
    OutOfFiles { path: PathBuf, source: io::Error },
    #[error("{flag} {block}: {problem}")]
    Block {
        flag: &'static str,
        block: AddressBlock,
        problem: String,
    },
}

/// Makes every address of `block` local to this network namespace, as
/// `ip route replace local BLOCK dev lo` does (AnyIP). 127/8 is local already. Returns the
/// route if this call made it (it was not there: no agent had routed it), for a start that
/// fails to take back.
pub fn route_block_here(block: AddressBlock) -> Result<Option<AddedRoute>, HostError> {
    if block.first().to_canonical().is_loopback() {
        return Ok(None);
    }
    let error = |source| HostError::Route {
        block,
        hint: route_hint(block, &source),
        source,
    };
    let made = match local_route(block, RouteRequest::Create) {
        Ok(()) => true,
        Err(err) if err.raw_os_error() == Some(libc::EEXIST) => {
            local_route(block, RouteRequest::Replace).map_err(error)?;
            false
        }
        Err(err) => return Err(error(err)),
    };
    log::info!("routed {block} to this host (local, dev lo)");
    // `then`, not `then_some`: a route made and dropped at once would be removed.
    Ok(made.then(|| AddedRoute { block, keep: false }))
}

/// What a failed route means: rtnetlink answers `EPERM` to a process without
/// `CAP_NET_ADMIN`, and `EACCES`, whoever asks, for an IPv6 route where IPv6 is switched off
/// on `lo` (the default `--listen6` checks that first; an explicit one gets here).
fn route_hint(block: AddressBlock, source: &io::Error) -> &'static str {
    match source.raw_os_error() {
        Some(libc::EACCES) if block.first().is_ipv6() && ipv6_is_off() => {
            " (IPv6 is switched off on lo in this network namespace, \
             net.ipv6.conf.lo.disable_ipv6 = 1: switch it on, or give no --listen6)"
        }
        Some(libc::EPERM | libc::EACCES) => " (the agent needs CAP_NET_ADMIN)",
        _ => "",
    }
}

/// A route a start made. Once the agent serves it is kept, after the agent too (a socket sent
/// to the block is then refused, not sent elsewhere, until the next agent); if the start
/// fails, dropping it removes the route again.
#[must_use]
#[derive(Debug)]
pub struct AddedRoute {
    block: AddressBlock,
    keep: bool,
}

impl AddedRoute {
    pub fn keep(mut self) {
        self.keep = true;
    }
}

impl Drop for AddedRoute {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        match local_route(self.block, RouteRequest::Delete) {
            Ok(()) => log::info!(
                "removed the route of {}: the agent did not start",
                self.block
            ),
            Err(err) => log::warn!("removing the route of {}: {err}", self.block),
        }
    }
}

/// What to ask of the local route of a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RouteRequest {
    /// Make it, unless there is one (`EEXIST`).
    Create,
    /// Make it, or replace the one there.
    Replace,
    Delete,
}

/// Waits until the kernel's random generator is seeded, which early in boot, on a machine short
/// of entropy, it may not be yet. The keys std's `RandomState` draws for each thread (the UDP
/// threads' unpredictable query IDs come from them) do not wait for it themselves; threads
/// started after this draw from a seeded generator.
pub fn wait_for_random_seed() {
    let mut byte = [0_u8; 1];
    let not_yet = getrandom(&mut byte, libc::GRND_NONBLOCK)
        .is_err_and(|err| err.raw_os_error() == Some(libc::EAGAIN));
    if not_yet {
        log::info!("waiting for the kernel's random generator to be seeded");
        // Any other error: no getrandom(2) (before Linux 3.17, which cannot run the agent).
        let _ = getrandom(&mut byte, 0);
    }
}

/// 128 random bits from a seeded generator: `getrandom(2)` without flags waits for its seed.
pub fn random_key() -> std::io::Result<[u64; 2]> {
    let mut key = [0_u8; 16];
    getrandom(&mut key, 0)?;
    let (first, second) = key.split_at(8);
    Ok([first, second].map(|half| u64::from_ne_bytes(half.try_into().expect("8 bytes"))))
}

/// Fills `buf` (at most 256 bytes, never read short) from `getrandom(2)` with `flags`,
/// again if a signal interrupts it.
fn getrandom(buf: &mut [u8], flags: libc::c_uint) -> std::io::Result<()> {
    loop {
        // SAFETY: the kernel writes at most `buf.len()` bytes into `buf`, a live slice.
        let filled = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), flags) };
        if filled >= 0 {
            return Ok(());
        }
        let err = std::io::Error::last_os_error();
        if err.kind() != std::io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// Raises the soft limit on open files to the hard one: each relayed TCP connection holds
/// two descriptors, and `--max-tcp-connections` (twice it, by fair share) would pass the
/// usual soft limit of 1,024 long before the hard one (systemd's is 524,288). Warns if the hard
/// one is below `needed`, what the agent's limits may take: past it, TCP clients wait
/// unaccepted and queries are dropped.
pub fn raise_open_file_limit(needed: u64) {
    let Some(mut limit) = open_file_limit() else {
        return;
    };
    if limit.rlim_max < needed {
        log::warn!(
            "open files: the hard limit is {}, and --max-tcp-connections and --max-inflight \
             may need {needed}: past it, TCP clients wait unaccepted and queries are dropped; \
             raise it (`ulimit -Hn`, systemd's LimitNOFILE=) or lower those limits",
            limit.rlim_max
        );
    }
    if limit.rlim_cur >= limit.rlim_max {
        return;
    }
    let soft = limit.rlim_cur;
    limit.rlim_cur = limit.rlim_max;
    // SAFETY: the kernel reads one `struct rlimit` from `limit`, a live local of that type.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } == 0 {
        log::debug!(
            "open files: raised the soft limit from {soft} to {}",
            limit.rlim_max
        );
    }
}

/// This process's limits on open files (`RLIMIT_NOFILE`), if it can read them.
fn open_file_limit() -> Option<libc::rlimit> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: the kernel writes one `struct rlimit` into `limit`, a live local of that type.
    (unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0).then_some(limit)
}

/// The open files an agent must have left once it is set up, beside its UDP threads' sockets
/// connected to upstreams: TCP connections (two each), the metrics server's, sockets of
/// queries to other upstreams.
pub const OPEN_FILES_TO_SERVE: u64 = 128;

/// Refuses to serve with fewer open files left than [`OPEN_FILES_TO_SERVE`] and what
/// `udp_threads` keep connected to upstreams (one address family's most each): such an agent
/// started, said it was ready, and failed every TCP lookup and every probe of its health
/// (helper-186: a hard limit of 100, 113 files in use at idle; helper-187: 100 UDP threads
/// under a limit of 1024 passed a fixed margin of 128, then ran out).
pub fn check_open_files_left(udp_threads: usize) -> Result<(), HostError> {
    let needed = OPEN_FILES_TO_SERVE
        + (udp_threads as u64).saturating_mul(crate::dns::udp::MOST_CONNECTED_SOCKETS as u64);
    let Some(limit) = open_file_limit() else {
        return Ok(());
    };
    let Ok(open) = fs::read_dir("/proc/self/fd") else {
        return Ok(());
    };
    let in_use = open.count() as u64;
    if limit.rlim_cur < in_use.saturating_add(needed) {
        return Err(HostError::TooFewOpenFiles {
            in_use,
            limit: limit.rlim_cur,
            needed,
        });
    }
    Ok(())
}

/// Whether IPv6 is off in this network namespace: switched off on the loopback device, where
/// the proxy's IPv6 addresses live (`net.ipv6.conf.lo.disable_ipv6`, which
/// `net.ipv6.conf.all.disable_ipv6` sets too), or absent from the kernel.
pub fn ipv6_is_off() -> bool {
    match fs::read_to_string("/proc/sys/net/ipv6/conf/lo/disable_ipv6") {
        Ok(value) => value.trim() == "1",
        Err(_) => Path::new("/proc/sys/net/ipv4").exists(),
    }
}

/// The lowest port any user may bind in this network namespace
/// (`net.ipv4.ip_unprivileged_port_start`, which IPv6 follows too); 1024, the kernel's
/// default, if it cannot be read.
pub fn first_unprivileged_port() -> u16 {
    fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
        .ok()
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or(1024)
}

/// `BPF_FS_MAGIC` from the kernel's magic.h.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Makes `path` a directory on a bpffs, mounting one at `/sys/fs/bpf` first if the path is
/// below it and nothing is mounted there (as systemd does at boot), and returns the directory
/// of the table of servers for these blocks: one table per pair of blocks, so agents with
/// other blocks (a node's `run` and an `exec`) never share indexes they cannot encode.
/// The directories are the agent's own: created `0700`, refused if another user owns them
/// or others may write there (a pin removed or replaced by someone else would misroute).
pub fn prepare_state_dir(
    path: &Path,
    block4: AddressBlock,
    block6: AddressBlock,
) -> Result<PathBuf, HostError> {
    // bpffs takes no '.' in a name: 127.53.0.0/16 and fd53:6e73:6470::/112 become
    // `127_53_0_0-16+fd53_6e73_6470__-112`.
    let name = format!(
        "{}-{}+{}-{}",
        block4.first(),
        block4.prefix_len(),
        block6.first(),
        block6.prefix_len()
    )
    .replace(['.', ':'], "_");
    let pins = path.join(name);
    let created = prepare_bpffs_dir(path)?;
    own_exclusively(path, created)?;
    let created = !pins.exists();
    fs::create_dir_all(&pins).map_err(|err| HostError::StateDir {
        path: pins.clone(),
        problem: format!("cannot create it: {err}"),
    })?;
    own_exclusively(&pins, created)?;
    Ok(pins)
}

/// Refuses a directory another user owns, or one others may write to; makes one the agent
/// has just created `0700`.
fn own_exclusively(dir: &Path, created: bool) -> Result<(), HostError> {
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
    let problem = |problem: String| HostError::StateDir {
        path: dir.to_owned(),
        problem,
    };
    let metadata = fs::metadata(dir).map_err(|err| problem(format!("cannot read it: {err}")))?;
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if metadata.uid() != me {
        return Err(problem(format!(
            "owned by user {}, not by the agent's ({me}): another user could replace the pinned \
             table. Remove it (`rm -r {}`) and keep others from making it again: mount the \
             bpffs with mode=0700 (as systemd mounts /sys/fs/bpf; a plain `mount -t bpf` \
             lets every user write there), or give --state-dir a directory only root may \
             write to",
            metadata.uid(),
            dir.display()
        )));
    }
    if created {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
            .map_err(|err| problem(format!("cannot make it 0700: {err}")))?;
    } else if metadata.mode() & 0o022 != 0 {
        return Err(problem(format!(
            "others may write to it (mode {:o}): another user could replace the pinned table; \
             `chmod 0700` it",
            metadata.mode() & 0o7777
        )));
    }
    Ok(())
}

/// What the pins must be, by name: (key size, value size, max entries); each a hash map but
/// `SERVING`, a sockhash. The first two are the table of servers, whose halves must be there
/// together; the workloads' shares of it and the agents' maps come and go alone.
const PINS: [(&str, u32, u32, u32); 10] = [
    (
        dns_proxy_common::names::SERVERS,
        4,
        32,
        dns_proxy_common::MAX_SERVERS,
    ),
    (
        dns_proxy_common::names::SERVER_INDEX,
        32,
        4,
        dns_proxy_common::MAX_SERVERS,
    ),
    (
        dns_proxy_common::names::CGROUP_ORIGINS,
        8,
        8,
        dns_proxy_common::MAX_SERVERS,
    ),
    (
        dns_proxy_common::names::CGROUP_ADJUST,
        8,
        8,
        dns_proxy_common::MAX_SERVERS,
    ),
    (
        dns_proxy_common::names::AGENT_CGROUPS,
        8,
        8,
        dns_proxy_common::MAX_AGENTS,
    ),
    (
        dns_proxy_common::names::AGENTS,
        8,
        24,
        dns_proxy_common::MAX_AGENTS,
    ),
    (
        dns_proxy_common::names::CONNECTED,
        8,
        4,
        dns_proxy_common::MAX_CONNECTED,
    ),
    (
        dns_proxy_common::names::CONNECTED_CHARGE,
        8,
        8,
        dns_proxy_common::MAX_CONNECTED,
    ),
    (
        dns_proxy_common::names::CONNECTED_PER_CGROUP,
        8,
        8,
        dns_proxy_common::MAX_CONNECTED,
    ),
    (
        dns_proxy_common::names::SERVING,
        16,
        4,
        dns_proxy_common::MAX_SERVING,
    ),
];

/// Whether the list of running agents is pinned in `pins`, the table's directory: without it
/// no agent of this state directory runs to take over from.
pub fn agents_pinned(pins: &Path) -> bool {
    pins.join(dns_proxy_common::names::AGENTS).exists()
}

/// Checks the pins in `pins`, if there are any: both halves of the table of servers or
/// neither, and each a hash map of the layout this agent uses. (aya would reuse any pinned
/// map by that name.)
pub fn check_pins(pins: &Path) -> Result<(), HostError> {
    let present: Vec<bool> = PINS[..2]
        .iter()
        .map(|(name, ..)| pins.join(name).exists())
        .collect();
    if present.iter().any(|p| *p) && !present.iter().all(|p| *p) {
        let missing = PINS[present.iter().position(|p| !p).unwrap_or(0)].0;
        let there = PINS[present.iter().position(|p| *p).unwrap_or(0)].0;
        return Err(HostError::Pin {
            path: pins.join(there),
            problem: format!("its other half, {missing}, is gone: the table cannot be trusted"),
        });
    }
    // The corrections of counts that are gone (a pin removed by hand) would correct the new
    // counts wrongly: they go too, and the first walk settles the new counts afresh. Likewise
    // the charges of notes that are gone: they would hold shares of `CONNECTED` that no
    // socket gives back.
    use dns_proxy_common::names::{
        CGROUP_ADJUST, CGROUP_ORIGINS, CONNECTED, CONNECTED_CHARGE, CONNECTED_PER_CGROUP,
    };
    for (name, depends_on) in [
        (CGROUP_ADJUST, CGROUP_ORIGINS),
        (CONNECTED_CHARGE, CONNECTED),
        (CONNECTED_PER_CGROUP, CONNECTED),
    ] {
        let path = pins.join(name);
        if !path.exists() || pins.join(depends_on).exists() {
            continue;
        }
        log::warn!(
            "{}: the map it goes with ({depends_on}) is gone: removing it",
            path.display()
        );
        std::fs::remove_file(&path).map_err(|err| HostError::Pin {
            path: path.clone(),
            problem: format!("cannot remove it: {err}"),
        })?;
    }
    for (name, key_size, value_size, max_entries) in PINS {
        let path = pins.join(name);
        if !path.exists() {
            continue;
        }
        let pin_problem = |problem: String| HostError::Pin {
            path: path.clone(),
            problem,
        };
        // Not a problem of the table's (a read-only bpffs, say): said as it is, without the
        // advice to remove the table.
        let info = aya::maps::MapInfo::from_pin(&path).map_err(|err| HostError::StateDir {
            path: path.clone(),
            problem: match crate::ebpf::os_error(&err) {
                Some(os) => format!("cannot open the pinned map: {err}: {os}"),
                None => format!("cannot open the pinned map: {err}"),
            },
        })?;
        let (map_type, kind) = if name == dns_proxy_common::names::SERVING {
            (aya::maps::MapType::SockHash, "sockhash")
        } else {
            (aya::maps::MapType::Hash, "hash map")
        };
        let same_layout = info.map_type().is_ok_and(|pinned| pinned == map_type)
            && info.key_size() == key_size
            && info.value_size() == value_size
            && info.max_entries() == max_entries;
        if !same_layout
            && [
                dns_proxy_common::names::AGENTS,
                dns_proxy_common::names::SERVING,
            ]
            .contains(&name)
        {
            // Only agents read AGENTS, for readiness and clean-up, and only the egress guard
            // SERVING, which the running agents fill: an agent of another version keeps its
            // own (its descriptor outlives the pin), this one starts a new.
            log::warn!(
                "{}: a map of another layout (an agent of another version's): replacing it; \
                 until that agent stops, neither sees the other {}",
                path.display(),
                if name == dns_proxy_common::names::AGENTS {
                    "alive"
                } else {
                    "serve"
                }
            );
            std::fs::remove_file(&path)
                .map_err(|err| pin_problem(format!("cannot replace it: {err}")))?;
            continue;
        }
        if !same_layout && name == dns_proxy_common::names::AGENT_CGROUPS {
            // It holds only the running agents' cgroups, which every agent puts back: the
            // table of servers need not go with it.
            return Err(HostError::StateDir {
                path: path.clone(),
                problem: format!(
                    "a map of another layout (an agent of another version's); it holds only \
                     the running agents' cgroups: stop the agents of this state dir, remove \
                     this pin alone (`rm {}`), and start again",
                    path.display()
                ),
            });
        }
        if !same_layout {
            return Err(pin_problem(format!(
                "a map of another layout (type {:?}, key {} bytes, value {}, {} entries; this \
                 agent needs a {kind} of {key_size}, {value_size} and {max_entries})",
                info.map_type(),
                info.key_size(),
                info.value_size(),
                info.max_entries()
            )));
        }
    }
    Ok(())
}

/// The pinned maps (the table of servers, the agents' maps), held open so that they can be
/// pinned again: a state directory removed while the agent runs (by hand, or a bpffs mounted
/// over it) would leave the next agent a fresh table, by whose indexes the sockets connected
/// before would name other servers.
pub struct Pins {
    dir: PathBuf,
    maps: Vec<(&'static str, aya::maps::MapData)>,
    /// The kernel's ids of the table's two maps (`SERVERS`, `SERVER_INDEX`), by which a pin
    /// of their names is known for theirs.
    table_ids: [u32; 2],
    /// The links held to be pinned here (`run` only: `sock_release`'s, and in node mode the
    /// egress guard's): their pins go with the state directory too.
    link_pins: Vec<Arc<crate::ebpf::LinkPin>>,
}

impl Pins {
    /// Opens every pin in `dir`, the table's directory, once the programs are loaded, and
    /// holds `link_pins`, which the load pinned there (or tried to).
    pub fn hold(dir: &Path, link_pins: Vec<Arc<crate::ebpf::LinkPin>>) -> Result<Self, HostError> {
        let maps = PINS
            .iter()
            .map(|(name, ..)| {
                let path = dir.join(name);
                aya::maps::MapData::from_pin(&path)
                    .map(|map| (*name, map))
                    .map_err(|err| HostError::StateDir {
                        problem: match crate::ebpf::os_error(&err) {
                            Some(os) => format!("cannot open the pinned map: {err}: {os}"),
                            None => format!("cannot open the pinned map: {err}"),
                        },
                        path,
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let id_of = |index: usize| {
            let (name, map) = &maps[index];
            map.info()
                .map(|info| info.id())
                .map_err(|err| HostError::StateDir {
                    path: dir.join(name),
                    problem: format!("cannot read the pinned map's id: {err}"),
                })
        };
        let table_ids = [id_of(0)?, id_of(1)?];
        Ok(Self {
            dir: dir.to_owned(),
            maps,
            table_ids,
            link_pins,
        })
    }

    /// Pins each link again whose pin is gone, after [`restore`](Self::restore) made the
    /// directories again: each link's kind, and whether it was pinned again (or why not).
    /// Empty where the agent leaves no link pinned (`exec`).
    pub fn restore_links(&self) -> Vec<(crate::ebpf::PinKind, Result<bool, String>)> {
        self.link_pins
            .iter()
            .map(|link| (link.kind(), link.restore()))
            .collect()
    }

    /// Pins each link in place of another agent's on this cgroup ([`LinkPin::take_back`]):
    /// the programs whose links were pinned again.
    ///
    /// [`LinkPin::take_back`]: crate::ebpf::LinkPin::take_back
    pub fn take_back_links(&self) -> Vec<&'static str> {
        self.link_pins
            .iter()
            .filter(|link| link.take_back().is_some_and(|pinned| pinned.is_ok()))
            .map(|link| link.kind().program)
            .collect()
    }

    /// The table's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Pins again each map whose pin is gone, its directories made again as the agent makes
    /// them, and returns their names. A pin that names another map (an agent of another
    /// version's) is left alone, and so is a gone `AGENTS` beside a table still pinned: an
    /// agent of another version removed it to make its own ([`check_pins`]), which ours,
    /// pinned again before it loads, would be handed instead.
    pub fn restore(&self) -> Result<Vec<&'static str>, HostError> {
        // Files of the same names on another filesystem mounted over it are no pins (a
        // tmpfs with empty files: helper-140).
        if self.dir.exists() && !is_bpffs(&self.dir) {
            return Err(HostError::StateDir {
                path: self.dir.clone(),
                problem: "no longer on a bpf filesystem (another filesystem mounted over it): \
                          cannot keep the table pinned"
                    .to_owned(),
            });
        }
        self.check_the_table_pinned_is_this_one()?;
        let table_pinned = PINS[..2]
            .iter()
            .any(|(name, ..)| self.dir.join(name).exists());
        let mut gone = Vec::new();
        for (name, map) in &self.maps {
            let path = self.dir.join(name);
            match fs::symlink_metadata(&path) {
                Ok(_) => {}
                Err(err) if err.kind() == io::ErrorKind::NotFound => {
                    if !(*name == dns_proxy_common::names::AGENTS && table_pinned) {
                        gone.push((*name, map, path));
                    }
                }
                Err(err) => {
                    return Err(HostError::StateDir {
                        path,
                        problem: format!("cannot read it: {err}"),
                    });
                }
            }
        }
        if gone.is_empty() {
            return Ok(Vec::new());
        }
        self.make_dirs_again()?;
        let mut restored = Vec::new();
        for (name, map, path) in gone {
            map.pin(&path).map_err(|err| HostError::StateDir {
                path: path.clone(),
                problem: format!("cannot pin it again: {err}"),
            })?;
            restored.push(name);
        }
        Ok(restored)
    }

    /// Refuses pins of the table's names that name other maps: another bpffs, holding another
    /// table, mounted over the state directory (helper-141), or a table started anew by hand
    /// meanwhile. The next agent would take that table, by whose indexes the sockets sent to
    /// the block before would name other servers.
    fn check_the_table_pinned_is_this_one(&self) -> Result<(), HostError> {
        for ((name, ..), id) in PINS[..2].iter().zip(self.table_ids) {
            let path = self.dir.join(name);
            if !path.exists() {
                continue;
            }
            // With its OS error: out of open files (EMFILE), this read as a broken state
            // directory (helper-163), and then as a table lost (helper-186).
            let pinned = aya::maps::MapInfo::from_pin(&path).map_err(|err| {
                let os = crate::ebpf::os_error(&err);
                match os.and_then(io::Error::raw_os_error) {
                    Some(code @ (libc::EMFILE | libc::ENFILE)) => HostError::OutOfFiles {
                        path: path.clone(),
                        source: io::Error::from_raw_os_error(code),
                    },
                    _ => HostError::StateDir {
                        path: path.clone(),
                        problem: match os {
                            Some(os) => format!("cannot open the pinned map: {err}: {os}"),
                            None => format!("cannot open the pinned map: {err}"),
                        },
                    },
                }
            })?;
            if pinned.id() != id {
                return Err(HostError::StateDir {
                    path,
                    problem: format!(
                        "names another map (id {}) than this agent's table (id {id}): another \
                         table is pinned there (a filesystem mounted over the state directory, \
                         or a table started anew meanwhile), which the next agent would take",
                        pinned.id()
                    ),
                });
            }
        }
        Ok(())
    }

    /// Makes the table's directory and those above it that are gone, `0700`, and checks the
    /// state directory and the table's as at start. Nothing is made outside a bpffs (one
    /// unmounted under the agent, say): the nearest directory that exists must be on one.
    fn make_dirs_again(&self) -> Result<(), HostError> {
        let existing = self.dir.ancestors().find(|dir| dir.exists());
        if !existing.is_some_and(is_bpffs) {
            return Err(HostError::StateDir {
                path: self.dir.clone(),
                problem: "no longer on a bpf filesystem (unmounted, or another filesystem \
                          mounted over it): cannot pin the table again"
                    .to_owned(),
            });
        }
        let missing: Vec<&Path> = self
            .dir
            .ancestors()
            .take_while(|dir| Some(*dir) != existing)
            .collect();
        for dir in missing.iter().rev() {
            fs::create_dir(dir).map_err(|err| HostError::StateDir {
                path: dir.to_path_buf(),
                problem: format!("cannot create it again: {err}"),
            })?;
            own_exclusively(dir, true)?;
        }
        for dir in [self.dir.parent().unwrap_or(&self.dir), &self.dir] {
            if !missing.contains(&dir) {
                own_exclusively(dir, false)?;
            }
        }
        Ok(())
    }
}

/// Refuses a block that would take over addresses in use: any address of this host's
/// interfaces, and the loopback resolvers' `127.0.0.1`, `127.0.0.53` and `127.0.0.54`.
pub fn check_block_is_free(flag: &'static str, block: AddressBlock) -> Result<(), HostError> {
    if is_public(block.first()) {
        log::warn!(
            "{flag} {block}: a range of the public Internet; this host routes it to itself \
             (and keeps the route after the agent exits), so it can no longer reach those \
             addresses; a link-local, loopback or private block is meant"
        );
    }
    let reserved: [std::net::IpAddr; 3] = [
        [127, 0, 0, 1].into(),
        [127, 0, 0, 53].into(),
        [127, 0, 0, 54].into(),
    ];
    warn_of_a_network_routed_through_the_block(flag, block);
    let taken = reserved
        .into_iter()
        .chain(interface_addresses())
        .find(|ip| block.contains(*ip) && *ip != block.first());
    match taken {
        Some(ip) => Err(HostError::Block {
            flag,
            block,
            problem: format!(
                "holds {ip}, an address in use on this host: its traffic on the proxy's port \
                 would be taken over; choose a block apart from it"
            ),
        }),
        None => Ok(()),
    }
}

/// Warns when the kernel routes the block's servers' addresses (index 1 and the last) through
/// a network, by a route narrower than a default one: its hosts there, DNS servers among them,
/// become unreachable for every process once the block is routed here, and stay so after
/// the agent exits (its route stays). A link-local block is left alone: hosts often route all
/// of `169.254.0.0/16` or `fe80::/64` to a link, where nothing answers at the block's addresses.
fn warn_of_a_network_routed_through_the_block(flag: &'static str, block: AddressBlock) {
    let link_local = match block.first() {
        std::net::IpAddr::V4(v4) => v4.is_link_local(),
        std::net::IpAddr::V6(v6) => v6.segments()[0] & 0xffc0 == 0xfe80,
    };
    if link_local {
        return;
    }
    for address in [block.address(1), block.address(block.capacity())] {
        if let Ok(Some((length, kind))) = matched_route(address)
            && kind == libc::RTN_UNICAST
            && length > 0
        {
            let network = network_of(address, length);
            log::warn!(
                "{flag} {block}: this host routes {network} through a network; once the block \
                 is routed here (and after the agent exits: the route stays), no process \
                 reaches the hosts of that network inside the block, and a DNS server there is \
                 refused; choose a block nothing else routes"
            );
            return;
        }
    }
}

/// The network of `length` bits that holds `address`, as `a.b.c.d/len`.
fn network_of(address: std::net::IpAddr, length: u8) -> String {
    let length = u32::from(length);
    match address {
        std::net::IpAddr::V4(v4) => {
            let mask = u32::MAX.checked_shl(32 - length.min(32)).unwrap_or(0);
            format!(
                "{}/{length}",
                std::net::Ipv4Addr::from(u32::from(v4) & mask)
            )
        }
        std::net::IpAddr::V6(v6) => {
            let mask = u128::MAX.checked_shl(128 - length.min(128)).unwrap_or(0);
            format!(
                "{}/{length}",
                std::net::Ipv6Addr::from(u128::from(v6) & mask)
            )
        }
    }
}

/// Whether `ip` may be a public Internet host's: not loopback, link-local, private (RFC 1918,
/// unique-local), shared (RFC 6598), benchmarking (RFC 2544) or documentation space.
fn is_public(ip: std::net::IpAddr) -> bool {
    match ip {
        std::net::IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            !(v4.is_loopback()
                || v4.is_link_local()
                || v4.is_private()
                || v4.is_documentation()
                || (a == 100 && (64..128).contains(&b))
                || (a == 198 && (18..20).contains(&b)))
        }
        std::net::IpAddr::V6(v6) => {
            let first = v6.segments()[0];
            !(v6.is_loopback()
                || first & 0xfe00 == 0xfc00
                || first & 0xffc0 == 0xfe80
                || first == 0x2001 && v6.segments()[1] == 0x0db8)
        }
    }
}

/// The addresses of this namespace's interfaces (`getifaddrs`).
pub(crate) fn interface_addresses() -> Vec<std::net::IpAddr> {
    let mut addresses = Vec::new();
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes one pointer into `list`, a live local; the list it points to
    // is the C library's until `freeifaddrs` below, and is only read meanwhile.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return addresses;
    }
    let mut entry = list;
    while !entry.is_null() {
        // SAFETY: `entry` is a non-null node of the list getifaddrs made, not yet freed; its
        // address, if not null, is a sockaddr of the family it names, so the cast to that
        // family's struct reads only bytes of it.
        unsafe {
            let address = (*entry).ifa_addr;
            if !address.is_null() {
                match i32::from((*address).sa_family) {
                    libc::AF_INET => {
                        let v4 = &*address.cast::<libc::sockaddr_in>();
                        addresses.push(std::net::IpAddr::from(v4.sin_addr.s_addr.to_ne_bytes()));
                    }
                    libc::AF_INET6 => {
                        let v6 = &*address.cast::<libc::sockaddr_in6>();
                        addresses.push(std::net::IpAddr::from(v6.sin6_addr.s6_addr));
                    }
                    _ => {}
                }
            }
            entry = (*entry).ifa_next;
        }
    }
    // SAFETY: the list getifaddrs made (it succeeded), freed once, and no pointer into it is
    // used after: the addresses were copied out.
    unsafe { libc::freeifaddrs(list) };
    addresses
}

/// Makes `path` a directory on a bpffs (see [`prepare_state_dir`]); returns whether it made it.
fn prepare_bpffs_dir(path: &Path) -> Result<bool, HostError> {
    let problem = |problem: String| HostError::StateDir {
        path: path.to_owned(),
        problem,
    };
    let default_mount = Path::new("/sys/fs/bpf");
    if path.starts_with(default_mount) && !is_bpffs(default_mount) {
        if !mount_namespace_is_the_hosts() {
            return Err(problem(
                "nothing is mounted at /sys/fs/bpf, and a bpffs the agent mounted there would \
                 be its alone: it runs in a mount namespace other than the host's (a \
                 container's, or a service's private one), or cannot tell, so the table of \
                 servers pinned on it would go with the agent, and sockets connected through \
                 it would fail after a restart; mount the host's bpffs there (for a container, \
                 `-v /sys/fs/bpf:/sys/fs/bpf` with one mounted on the host: \
                 `mount -t bpf -o mode=0700 bpf /sys/fs/bpf`)"
                    .to_owned(),
            ));
        }
        fs::create_dir_all(default_mount)
            .map_err(|err| problem(format!("cannot create {}: {err}", default_mount.display())))?;
        mount_bpffs(default_mount).map_err(|err| {
            problem(format!(
                "nothing is mounted at /sys/fs/bpf and mounting bpffs there failed: {err}; \
                 mount it (`mount -t bpf -o mode=0700 bpf /sys/fs/bpf`)"
            ))
        })?;
        log::info!("mounted bpffs at /sys/fs/bpf");
    }
    // Nothing is made outside a bpffs: the nearest directory that exists must be on one.
    let existing = path.ancestors().find(|dir| dir.exists());
    if !existing.is_some_and(is_bpffs) {
        return Err(problem(
            "not on a bpf filesystem; give a directory on one, or mount one \
             (`mount -t bpf -o mode=0700 bpf DIR`)"
                .to_owned(),
        ));
    }
    if existing == Some(path) {
        return Ok(false);
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(|err| problem(format!("cannot create it: {err}")))?;
    Ok(true)
}

/// The inode number of the initial PID namespace (`PROC_PID_INIT_INO`), fixed since Linux 3.8.
const INITIAL_PID_NAMESPACE: u64 = 0xEFFF_FFFC;

/// Whether a filesystem mounted in this process's mount namespace outlives the agent: the
/// namespace is the host's, the initial one, which PID 1 and the kernel's threads are in. A
/// container's (or a service's private one) goes with its processes, and a bpffs mounted
/// there with the table of servers pinned on it (helper-173: a Docker container given
/// CAP_SYS_ADMIN and no bpffs lost its table at every restart). In a PID namespace other than
/// the initial one, it is a container's (helper-175: `tini` as PID 1 passed a check for
/// another process sharing the namespace). Compared with PID 1's, or where that cannot be
/// read (this machine's PID 1 is not dumpable), with kthreadd's (PID 2); where neither can
/// be, the agent cannot tell, and mounts nothing (helper-176: an ancestor walk took an
/// orphaned agent in a private namespace for the host's).
fn mount_namespace_is_the_hosts() -> bool {
    let namespace_inode = |link: &str| {
        fs::read_link(link).ok().and_then(|target| {
            let target = target.to_string_lossy().into_owned();
            target
                .rsplit_once('[')
                .and_then(|(_, rest)| rest.strip_suffix(']'))
                .and_then(|inode| inode.parse::<u64>().ok())
        })
    };
    if namespace_inode("/proc/self/ns/pid") != Some(INITIAL_PID_NAMESPACE) {
        return false;
    }
    let Ok(own) = fs::read_link("/proc/self/ns/mnt") else {
        return false;
    };
    let kthreadd = fs::read_to_string("/proc/2/comm").is_ok_and(|name| name.trim() == "kthreadd");
    let initial = fs::read_link("/proc/1/ns/mnt").or_else(|err| match kthreadd {
        true => fs::read_link("/proc/2/ns/mnt"),
        false => Err(err),
    });
    initial.is_ok_and(|initial| initial == own)
}

pub(crate) fn is_bpffs(path: &Path) -> bool {
    let Ok(c_path) = CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: `struct statfs` is plain integers, for which all zeros is a valid value.
    let mut stat: libc::statfs = unsafe { mem::zeroed() };
    // SAFETY: c_path is NUL-terminated and lives for the call; `stat` is a live, writable
    // `struct statfs`, the size the kernel fills.
    let result = unsafe { libc::statfs(c_path.as_ptr(), &mut stat) };
    result == 0 && stat.f_type as i64 == BPF_FS_MAGIC
}

fn mount_bpffs(at: &Path) -> io::Result<()> {
    let target = CString::new(at.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let kind = c"bpf";
    // Only root may use it: the table's pins must not be removed or replaced by others.
    let options = c"mode=0700";
    // SAFETY: source, target and type are NUL-terminated strings that outlive the call
    // (`kind` and `options` are static, `target` is owned here), and bpffs reads its data
    // (`options`) as one; mount writes no memory of ours.
    let result = unsafe {
        libc::mount(
            kind.as_ptr(),
            target.as_ptr(),
            kind.as_ptr(),
            0,
            options.as_ptr().cast(),
        )
    };
    if result != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// One rtnetlink request about the route of type local for `block` on the loopback device in
/// the local table (`RTM_NEWROUTE` or `RTM_DELROUTE`), and its acknowledgement.
fn local_route(block: AddressBlock, request: RouteRequest) -> io::Result<()> {
    let (family, address) = match block.first() {
        std::net::IpAddr::V4(v4) => (libc::AF_INET as u8, v4.octets().to_vec()),
        std::net::IpAddr::V6(v6) => (libc::AF_INET6 as u8, v6.octets().to_vec()),
    };
    let loopback = 1u32.to_ne_bytes(); // the loopback device's index, in every namespace
    let (kind, flags) = match request {
        RouteRequest::Create => (libc::RTM_NEWROUTE, libc::NLM_F_CREATE | libc::NLM_F_EXCL),
        RouteRequest::Replace => (libc::RTM_NEWROUTE, libc::NLM_F_CREATE | libc::NLM_F_REPLACE),
        RouteRequest::Delete => (libc::RTM_DELROUTE, 0),
    };
    let mut message = rtnetlink_header(kind, libc::NLM_F_REQUEST | libc::NLM_F_ACK | flags);
    // struct rtmsg
    message.extend_from_slice(&[
        family,
        block.prefix_len(),
        0, // src_len
        0, // tos
        libc::RT_TABLE_LOCAL,
        libc::RTPROT_STATIC,
        libc::RT_SCOPE_HOST,
        libc::RTN_LOCAL,
    ]);
    message.extend_from_slice(&0u32.to_ne_bytes()); // rtm_flags
    push_attribute(&mut message, libc::RTA_DST, &address);
    // IPv4: the block's first address (which names no server) as the source of what this
    // host sends to the block; without it the kernel picks the destination itself, and a
    // socket on the proxy's port could send from a server's address without binding it.
    // (IPv6 picks a source among assigned addresses only, never a routed one, and takes no
    // unassigned preferred source.)
    if family == libc::AF_INET as u8 {
        push_attribute(&mut message, libc::RTA_PREFSRC, &address);
    }
    push_attribute(&mut message, libc::RTA_OIF, &loopback);
    let (reply, received) = rtnetlink_exchange(&mut message)?;
    match reply_error(&reply[..received])? {
        0 => Ok(()),
        code => Err(io::Error::from_raw_os_error(-code)),
    }
}

/// Whether `block` is routed to this host: the routes the kernel matches for the block's
/// first and last server addresses (index 1 and the highest, `ip route get fibmatch`) are of
/// type local, and one of them covers the whole block (its prefix no longer than the block's).
/// Needs no privilege. For the watch on the blocks' routes: another program, or an
/// interface's IPv6 switched off and on, can remove them, or leave narrower local routes (an
/// address of the block on an interface) that no longer hold the servers' addresses. A
/// narrower local route left inside the block beside its own (by an agent of a smaller block
/// before it, say) is fine: the addresses it holds are local too. Not seen: a route for one
/// address inside the block, between the two.
pub fn is_block_routed_here(block: AddressBlock) -> io::Result<bool> {
    // Index 1's address, not the first: an address of the block added to an interface makes
    // the first one an anycast route of its own (IPv6), which says nothing of the others.
    let first = local_route_length(block.address(1))?;
    let last = local_route_length(block.address(block.capacity()))?;
    Ok(match (first, last) {
        (Some(first), Some(last)) => first.min(last) <= block.prefix_len(),
        _ => false,
    })
}

/// Whether this namespace's loopback interface is up. Every block is routed through `lo`, and
/// with `lo` down the kernel keeps loopback's own `local 127.0.0.0/8` route (its address's)
/// while it delivers nothing there.
pub fn is_loopback_up() -> io::Result<bool> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)?;
    // SAFETY: `ifreq` is plain integers and a union of them, for which all zeros is valid.
    let mut request: libc::ifreq = unsafe { mem::zeroed() };
    for (to, from) in request.ifr_name.iter_mut().zip(b"lo\0") {
        *to = *from as libc::c_char;
    }
    // SAFETY: the descriptor is open; SIOCGIFFLAGS reads the name and writes the flags of the
    // `ifreq` it is given, which lives for the call.
    if unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFFLAGS, &mut request) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: SIOCGIFFLAGS filled the union's flags.
    let flags = unsafe { request.ifr_ifru.ifru_flags };
    Ok(flags & libc::IFF_UP as libc::c_short != 0)
}

/// The prefix length of the route the kernel matches for `address`, in whatever table the
/// rules pick, if it is of type local.
fn local_route_length(address: std::net::IpAddr) -> io::Result<Option<u8>> {
    Ok(matched_route(address)?
        .and_then(|(length, kind)| (kind == libc::RTN_LOCAL).then_some(length)))
}

/// The prefix length and type (`RTN_*`) of the route the kernel matches for `address`, in
/// whatever table the rules pick (`ip route get fibmatch`); `None` if none does.
fn matched_route(address: std::net::IpAddr) -> io::Result<Option<(u8, u8)>> {
    let (family, address) = match address {
        std::net::IpAddr::V4(v4) => (libc::AF_INET as u8, v4.octets().to_vec()),
        std::net::IpAddr::V6(v6) => (libc::AF_INET6 as u8, v6.octets().to_vec()),
    };
    let mut message = rtnetlink_header(libc::RTM_GETROUTE, libc::NLM_F_REQUEST);
    // struct rtmsg: the route matched for this one address.
    let dst_len = (address.len() * 8) as u8;
    message.extend_from_slice(&[family, dst_len, 0, 0, 0, 0, 0, 0]);
    message.extend_from_slice(&RTM_F_FIB_MATCH.to_ne_bytes());
    push_attribute(&mut message, libc::RTA_DST, &address);
    let (reply, received) = rtnetlink_exchange(&mut message)?;
    let reply = &reply[..received];
    let header_len = mem::size_of::<libc::nlmsghdr>();
    let kind = reply
        .get(4..6)
        .map(|kind| u16::from_ne_bytes([kind[0], kind[1]]));
    if kind == Some(libc::RTM_NEWROUTE) {
        // struct rtmsg: rtm_dst_len is its second byte, rtm_type its eighth.
        let (Some(&matched_len), Some(&route_type)) =
            (reply.get(header_len + 1), reply.get(header_len + 7))
        else {
            return Err(io::Error::other("a short rtnetlink route"));
        };
        return Ok(Some((matched_len, route_type)));
    }
    // No route at all (ENETUNREACH, say): not here either.
    reply_error(reply).map(|_| None)
}

/// `linux/rtnetlink.h`'s flag asking `RTM_GETROUTE` for the route matched, not the result.
const RTM_F_FIB_MATCH: u32 = 0x2000;

/// A `struct nlmsghdr` of one request of `kind`, to the kernel, to be followed by its body;
/// [`rtnetlink_exchange`] writes its length.
fn rtnetlink_header(kind: u16, flags: libc::c_int) -> Vec<u8> {
    let mut message = Vec::with_capacity(64);
    message.extend_from_slice(&0u32.to_ne_bytes()); // the length, filled in when sent
    message.extend_from_slice(&kind.to_ne_bytes());
    message.extend_from_slice(&(flags as u16).to_ne_bytes());
    message.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    message.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's
    message
}

/// Sends one rtnetlink request (`message`, whose length it writes into its header) and
/// returns the kernel's first reply and its length.
fn rtnetlink_exchange(message: &mut [u8]) -> io::Result<([u8; 1024], usize)> {
    let len = message.len() as u32;
    message[..4].copy_from_slice(&len.to_ne_bytes());
    // SAFETY: socket takes integers only; the descriptor it returns is owned at once below.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh, open descriptor (checked above) that nothing else owns or
    // closes.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: `sockaddr_nl` is plain integers, for which all zeros is a valid value (and the
    // kernel's own address: pid 0, no groups).
    let mut kernel: libc::sockaddr_nl = unsafe { mem::zeroed() };
    kernel.nl_family = libc::AF_NETLINK as u16;
    // SAFETY: the descriptor is open (owned by `socket`); the message and the address are
    // live for the call and of the lengths given, and sendto only reads them.
    let sent = unsafe {
        libc::sendto(
            socket.as_raw_fd(),
            message.as_ptr().cast(),
            message.len(),
            0,
            (&raw const kernel).cast(),
            mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut reply = [0u8; 1024];
    // SAFETY: the descriptor is open (owned by `socket`); `reply` is live and writable for
    // the call, and the kernel writes at most the length given, its own.
    let received = unsafe {
        libc::recv(
            socket.as_raw_fd(),
            reply.as_mut_ptr().cast(),
            reply.len(),
            0,
        )
    };
    if received < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((reply, received as usize))
}

/// The error code of an `NLMSG_ERROR` reply (0: an acknowledgement), of rtnetlink or
/// `sock_diag`; an error if the reply is something else.
pub(crate) fn reply_error(reply: &[u8]) -> io::Result<i32> {
    let header_len = mem::size_of::<libc::nlmsghdr>();
    if reply.len() < header_len + 4 {
        return Err(io::Error::other("a short netlink reply"));
    }
    let kind = u16::from_ne_bytes([reply[4], reply[5]]);
    if kind != libc::NLMSG_ERROR as u16 {
        return Err(io::Error::other(format!("a netlink reply of type {kind}")));
    }
    let mut code = [0u8; 4];
    code.copy_from_slice(&reply[header_len..header_len + 4]);
    Ok(i32::from_ne_bytes(code))
}

/// Appends one `rtattr` with its payload, padded to 4 bytes.
fn push_attribute(message: &mut Vec<u8>, kind: u16, payload: &[u8]) {
    let len = 4 + payload.len();
    message.extend_from_slice(&(len as u16).to_ne_bytes());
    message.extend_from_slice(&kind.to_ne_bytes());
    message.extend_from_slice(payload);
    message.resize(message.len().next_multiple_of(4), 0);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tests run as host processes (the e2e tests check the refusals, in namespaces of
    /// their own): here the namespace is the host's, and a bpffs may be mounted.
    #[test]
    fn a_host_process_is_in_the_hosts_mount_namespace() {
        assert!(mount_namespace_is_the_hosts());
    }

    /// Read-only questions to this namespace's routes: the host-mode block is local (inside
    /// 127/8), a documentation block (TEST-NET-1) is not, whether a default route takes it or
    /// no route does.
    #[test]
    fn the_loopback_block_is_routed_here_and_a_documentation_block_is_not() {
        let block = |text: &str| text.parse::<AddressBlock>().unwrap();
        assert!(is_block_routed_here(block("127.53.0.0/16")).unwrap());
        assert!(!is_block_routed_here(block("192.0.2.0/24")).unwrap());
    }

    #[test]
    fn only_a_block_of_the_public_internet_is_called_public() {
        for public in ["8.8.8.0", "1.1.1.0", "2001:4860::", "2a00:1450::"] {
            assert!(is_public(public.parse().unwrap()), "{public}");
        }
        for meant in [
            "127.53.0.0",
            "169.254.53.0",
            "10.53.0.0",
            "192.168.0.0",
            "100.64.0.0",
            "198.18.0.0",
            "192.0.2.0",
            "fd53:6e73:6470::",
            "fe80::",
            "::1",
        ] {
            assert!(!is_public(meant.parse().unwrap()), "{meant}");
        }
    }
}
