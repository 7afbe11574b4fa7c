//! Loading the eBPF object, attaching its programs to a cgroup, and reading its maps.
//!
//! Links are bpf_links owned by this process's file descriptors and never pinned: if the agent
//! dies, the kernel detaches everything and DNS goes direct again (fail-open).
use std::{
    error::Error as _,
    fs::File,
    io,
    net::{SocketAddr, SocketAddrV4, SocketAddrV6},
    os::fd::AsFd as _,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData, PerCpuArray},
    programs::{
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSock, CgroupSockAddr,
        cgroup_sock_addr::CgroupSockAddrLinkId,
    },
};
use dns_proxy_common::{
    Counter, EXCLUDED_EXACT, EXCLUDED_SUBTREE, Endpoint, FlowKey, MAX_EXCLUDED_CGROUPS,
    MAX_EXCLUDED_LEVEL, RedirectTarget, names,
};
use tokio::io::unix::AsyncFd;

use crate::cgroup::Cgroup;

/// The eBPF object, built from `dns-proxy-ebpf` by build.rs.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/dns-proxy"));

#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    #[error("cannot load the eBPF object: {source}{hint}", hint = hint(source))]
    Load { source: Box<aya::EbpfError> },
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
    #[error("cannot attach {program} ({hook}) to cgroup {cgroup}: {source}{hint}", hint = hook_hint(source, hook))]
    Attach {
        program: &'static str,
        hook: &'static str,
        cgroup: String,
        source: Box<aya::programs::ProgramError>,
    },
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
    #[error("eBPF map {map}: {source}{hint}", hint = hint(source))]
    Map {
        map: &'static str,
        source: Box<aya::maps::MapError>,
    },
}

/// The root cause of an aya error, if it is an OS error.
fn os_error<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a io::Error> {
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
        Some(os) if os.kind() == io::ErrorKind::PermissionDenied => format!(
            " ({os}: run dns-proxy as root, or with CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN)"
        ),
        Some(os) => format!(" ({os})"),
        None => String::new(),
    }
}

fn hook_hint(err: &(dyn std::error::Error + 'static), hook: &'static str) -> String {
    let min_kernel = PROGRAMS
        .iter()
        .find(|p| p.hook == hook)
        .map_or("a newer kernel", |p| p.min_kernel);
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

/// The kernel's internal "operation not supported" (524), which the bpf syscall can leak.
const ENOTSUPP: i32 = 524;

/// How a program is attached.
#[derive(Clone, Copy)]
enum Hook {
    SockAddr,
    SkbEgress,
    Sock,
}

struct ProgramSpec {
    name: &'static str,
    hook: &'static str,
    kind: Hook,
    /// Programs that send traffic to the proxy. Attached last and detached first, so a
    /// redirected socket always has its answers restored.
    redirects: bool,
    min_kernel: &'static str,
}

/// In attach order: bookkeeping first, redirects last.
const PROGRAMS: &[ProgramSpec] = &[
    ProgramSpec::new(
        names::SOCK_RELEASE,
        "cgroup/sock_release",
        Hook::Sock,
        "5.9",
    ),
    ProgramSpec::new(names::EGRESS, "cgroup_skb/egress", Hook::SkbEgress, "4.10"),
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
    ProgramSpec::redirecting(names::CONNECT4, "cgroup/connect4", "4.17"),
    ProgramSpec::redirecting(names::CONNECT6, "cgroup/connect6", "4.17"),
    ProgramSpec::redirecting(names::SENDMSG4, "cgroup/sendmsg4", "4.18"),
    ProgramSpec::redirecting(names::SENDMSG6, "cgroup/sendmsg6", "4.18"),
];

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

/// What the redirect sends to the proxy, and what it leaves alone.
pub struct RedirectConfig<'a> {
    pub cgroup: &'a Cgroup,
    /// The IPv4 listener: IPv4 sockets and v4-mapped destinations go there.
    pub target_v4: SocketAddrV4,
    /// The IPv6 listener; `None`: IPv6 sockets are left alone.
    pub target_v6: Option<SocketAddrV6>,
    /// cgroups whose sockets are never redirected: the agent's own, first of all.
    pub excluded: &'a [Exclusion<'a>],
}

/// A cgroup whose sockets are left alone.
#[derive(Debug, Clone, Copy)]
pub struct Exclusion<'a> {
    pub cgroup: &'a Cgroup,
    pub scope: ExclusionScope,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExclusionScope {
    /// Only the cgroup itself (the agent's own leaf).
    Exact,
    /// The cgroup and everything below it; `level` is its depth below the hierarchy's root.
    Subtree { level: u32 },
}

/// The loaded and attached programs. Dropping it detaches them all.
pub struct Redirector {
    ebpf: Ebpf,
    redirect_links: Vec<(&'static str, CgroupSockAddrLinkId)>,
    cgroup: String,
}

impl Redirector {
    /// Loads the programs, attaches them to `config.cgroup`, and starts forwarding their log
    /// records to the `log` crate. Must run inside a tokio runtime.
    pub fn attach(
        config: &RedirectConfig<'_>,
    ) -> Result<(Self, FlowTable, KernelCounters), EbpfError> {
        let target = RedirectTarget::new(config.target_v4, config.target_v6);
        let excluded_levels = excluded_levels(config.excluded)?;
        let mut ebpf = EbpfLoader::new()
            .override_global(names::REDIRECT_TARGET, &target, true)
            .override_global(names::EXCLUDED_LEVELS, &excluded_levels, true)
            .load(EBPF_OBJECT)
            .map_err(|source| EbpfError::Load {
                source: Box::new(source),
            })?;
        spawn_kernel_logger(&mut ebpf);

        exclude_cgroups(&mut ebpf, config.excluded)?;
        let flows = FlowTable {
            map: take_map(&mut ebpf, names::FLOWS)?,
        };
        let counters = KernelCounters::take(&mut ebpf)?;

        let cgroup_name = config.cgroup.path.display().to_string();
        let cgroup_fd =
            File::open(&config.cgroup.path).map_err(|source| EbpfError::OpenCgroup {
                cgroup: cgroup_name.clone(),
                source,
            })?;
        let mut redirect_links = Vec::new();
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
            let attach_err = |source| EbpfError::Attach {
                program: spec.name,
                hook: spec.hook,
                cgroup: cgroup_name.clone(),
                source: Box::new(source),
            };
            let mismatch = EbpfError::Missing {
                kind: "program of the expected type",
                name: spec.name,
            };
            // Flags 0: the kernel rejects any other for a cgroup bpf_link, and links always
            // attach in multi mode, beside other programs (a CNI's socket LB, say).
            let mode = CgroupAttachMode::Single;
            match spec.kind {
                Hook::SockAddr => {
                    let program: &mut CgroupSockAddr = program.try_into().map_err(|_| mismatch)?;
                    program.load().map_err(load_err)?;
                    let link = program
                        .attach(cgroup_fd.as_fd(), mode)
                        .map_err(attach_err)?;
                    if spec.redirects {
                        redirect_links.push((spec.name, link));
                    }
                }
                Hook::SkbEgress => {
                    let program: &mut CgroupSkb = program.try_into().map_err(|_| mismatch)?;
                    program.load().map_err(load_err)?;
                    program
                        .attach(cgroup_fd.as_fd(), CgroupSkbAttachType::Egress, mode)
                        .map_err(attach_err)?;
                }
                Hook::Sock => {
                    let program: &mut CgroupSock = program.try_into().map_err(|_| mismatch)?;
                    program.load().map_err(load_err)?;
                    program
                        .attach(cgroup_fd.as_fd(), mode)
                        .map_err(attach_err)?;
                }
            }
            log::info!("attached {} ({}) to {cgroup_name}", spec.name, spec.hook);
        }
        Ok((
            Self {
                ebpf,
                redirect_links,
                cgroup: cgroup_name,
            },
            flows,
            counters,
        ))
    }

    /// Stops redirecting new sockets, while answers to the ones already redirected are still
    /// restored. The first step of a graceful shutdown.
    pub fn stop_redirecting(&mut self) {
        for (name, link) in self.redirect_links.drain(..) {
            let result = self
                .ebpf
                .program_mut(name)
                .and_then(|program| <&mut CgroupSockAddr>::try_from(program).ok())
                .map(|program| program.detach(link));
            match result {
                Some(Ok(())) => log::info!("detached {name} from {}", self.cgroup),
                Some(Err(err)) => log::warn!("detaching {name} from {}: {err}", self.cgroup),
                None => log::warn!("detaching {name}: program not found"),
            }
        }
    }
}

impl Drop for Redirector {
    fn drop(&mut self) {
        // Dropping `ebpf` closes every link; say so, since operators watch for it.
        log::info!("detaching all programs from {}", self.cgroup);
    }
}

/// The `EXCLUDED_LEVELS` mask: one bit for each level that holds an excluded subtree.
fn excluded_levels(excluded: &[Exclusion<'_>]) -> Result<u64, EbpfError> {
    if excluded.len() > MAX_EXCLUDED_CGROUPS as usize {
        return Err(EbpfError::TooManyExclusions {
            count: excluded.len(),
            max: MAX_EXCLUDED_CGROUPS,
        });
    }
    let mut mask = 0u64;
    for exclusion in excluded {
        if let ExclusionScope::Subtree { level } = exclusion.scope {
            if level > MAX_EXCLUDED_LEVEL {
                return Err(EbpfError::ExclusionTooDeep {
                    cgroup: exclusion.cgroup.path.display().to_string(),
                    level,
                    max: MAX_EXCLUDED_LEVEL,
                });
            }
            mask |= 1 << level;
        }
    }
    Ok(mask)
}

/// Fills `EXCLUDED_CGROUPS`; the map stays owned by `ebpf`, alive as long as the programs.
fn exclude_cgroups(ebpf: &mut Ebpf, excluded: &[Exclusion<'_>]) -> Result<(), EbpfError> {
    let name = names::EXCLUDED_CGROUPS;
    let map = ebpf
        .map_mut(name)
        .ok_or(EbpfError::Missing { kind: "map", name })?;
    let mut map: HashMap<_, u64, u8> = HashMap::try_from(map).map_err(|source| EbpfError::Map {
        map: name,
        source: Box::new(source),
    })?;
    for exclusion in excluded {
        let (value, what) = match exclusion.scope {
            ExclusionScope::Exact => (EXCLUDED_EXACT, "cgroup"),
            ExclusionScope::Subtree { .. } => (EXCLUDED_SUBTREE, "cgroup tree"),
        };
        let cgroup = exclusion.cgroup;
        map.insert(cgroup.id, value, 0)
            .map_err(|source| EbpfError::Map {
                map: name,
                source: Box::new(source),
            })?;
        log::info!(
            "never redirecting {what} {} (id {})",
            cgroup.path.display(),
            cgroup.id
        );
    }
    Ok(())
}

fn take_map<V: aya::Pod, K: aya::Pod>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<HashMap<MapData, K, V>, EbpfError> {
    let map = ebpf
        .take_map(name)
        .ok_or(EbpfError::Missing { kind: "map", name })?;
    HashMap::try_from(map).map_err(|source| EbpfError::Map {
        map: name,
        source: Box::new(source),
    })
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
        let name = names::COUNTERS;
        let map = ebpf
            .take_map(name)
            .ok_or(EbpfError::Missing { kind: "map", name })?;
        let map = PerCpuArray::try_from(map).map_err(|source| EbpfError::Map {
            map: name,
            source: Box::new(source),
        })?;
        Ok(Self { map })
    }

    /// Each counter summed over the CPUs. A counter that cannot be read is left out (and
    /// logged): a scrape shows what it can.
    pub fn read(&self) -> Vec<(Counter, u64)> {
        let mut values = Vec::with_capacity(Counter::ALL.len());
        for counter in Counter::ALL {
            match self.map.get(&(counter as u32), 0) {
                Ok(per_cpu) => values.push((counter, per_cpu.iter().sum())),
                Err(err) => log::warn!("reading {} [{counter:?}]: {err}", names::COUNTERS),
            }
        }
        values
    }
}

/// The kernel's record of where each redirected client was headed (`FLOWS`).
pub struct FlowTable {
    map: HashMap<MapData, FlowKey, Endpoint>,
}

impl FlowTable {
    /// The server the client at `client` (as the proxy sees it) originally addressed, over
    /// `protocol`; `None` if it was not redirected here.
    pub fn original_destination(&self, client: SocketAddr, protocol: u8) -> Option<SocketAddr> {
        let key = FlowKey::new(client, protocol);
        match self.map.get(&key, 0) {
            Ok(endpoint) => endpoint.to_socket_addr(),
            Err(aya::maps::MapError::KeyNotFound) => None,
            Err(err) => {
                log::warn!(
                    "looking up {client} in {}: {}",
                    names::FLOWS,
                    err.source().map_or(err.to_string(), |s| s.to_string())
                );
                None
            }
        }
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
        let text = hook_hint(&unsupported, "cgroup/sock_release");
        assert!(
            text.contains("does not support cgroup/sock_release, which needs Linux 5.9"),
            "{text}"
        );
        assert_eq!(hint(&io::Error::other("no OS error")), " (no OS error)");
    }

    #[test]
    fn redirecting_programs_attach_last() {
        let first_redirect = PROGRAMS.iter().position(|p| p.redirects).unwrap();
        assert!(PROGRAMS[first_redirect..].iter().all(|p| p.redirects));
        assert_eq!(PROGRAMS.iter().filter(|p| p.redirects).count(), 4);
    }
}
