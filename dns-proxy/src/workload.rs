//! Which workload asked a query: a name for the cgroup the kernel side saw it come from.
//!
//! The kernel side reports `bpf_get_current_cgroup_id()`, the inode number of the asking
//! process's cgroup v2 directory. [`CgroupPaths`] turns that id into the directory's path
//! under the cgroup2 mount, and [`Workload::from_cgroup_path`] names the workload from the
//! shapes that Kubernetes, Docker, Podman, LXC and systemd give their cgroups.
//!
//! The names are labels, not proof: a workload that was delegated its cgroup subtree (a
//! systemd service with `Delegate=yes`, every user's own manager `user@<uid>.service`, a
//! container with a writable cgroupns) chooses the names below it. Parsing takes the outermost
//! identity of any kind, so such a workload cannot escape the identity of the cgroup it was put
//! in, only add shapes below it; and any name that does not validate falls through to the
//! plain path, escaped for logs. Two kinds of parent are looked through, to the pods below
//! them: a container runtime's own unit (`containerd.service`: only root makes cgroups
//! there), and a Docker container (a kind node), whose pods are named with the container
//! (`docker=<id> pod=<uid> ...`): a container's root may make cgroups in its own (kind,
//! Sysbox), so that a pod's name there is the container's to choose.
use std::{
    fmt, fs, io,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use hashlink::LruCache;

/// How many characters of a container id the compact form shows (as `docker ps` does).
const SHORT_ID: usize = 12;

/// A workload, named from its cgroup v2 path.
///
/// Two renderings:
/// - [`Display`](fmt::Display), compact for log lines: `pod=<uid> container=<12 hex>`,
///   `pod=<uid>`, `docker=<12 hex> pod=<uid> container=<12 hex>`, `docker=<12 hex>`, `unit=<name>`, `unit=<name> user=<uid>`,
///   `cgroup=<path>`.
/// - [`Workload::full`], stable for dnstap's `extra` field, JSON and table keys: the same
///   `key=value` pairs with the full 64-hex container ids. Values never hold spaces, `=` or
///   control characters (a path's are escaped), so the form splits cleanly on spaces.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Workload {
    /// A Kubernetes pod (`uid` in its dashed 36-character form, or the 32-hex config hash of
    /// a static pod), and the container in it when the cgroup is a container's rather than
    /// the pod's own. `node` is the Docker container the pod's cgroup is below (a kind
    /// node's), so that such a pod is never named as a pod of the host's own: whoever is
    /// root in a container with a cgroup of its own to write (kind, Sysbox, a private
    /// cgroupns with the hierarchy mounted read-write) chooses the names below it.
    Pod {
        uid: String,
        container: Option<String>,
        node: Option<String>,
    },
    /// A Docker container outside Kubernetes: its 64-hex id.
    Docker { id: String },
    /// A container of another runtime: `runtime` is `podman` (`libpod-<64 hex>`, the id) or
    /// `lxc` (LXC, LXD and Incus: `lxc.payload.<name>`, the name).
    Container { runtime: &'static str, id: String },
    /// A systemd unit (`foo.service`, `session-2.scope`); `user` is the uid when the unit is
    /// one of a user's: under `user-<uid>.slice`, including units of that user's own
    /// manager (`user@<uid>.service/app.slice/x.service` is `x.service` of that user).
    Unit { name: String, user: Option<u32> },
    /// Anything else: the path under the cgroup2 mount, e.g. `/` or `/my-cgroup/leaf`.
    Cgroup { path: String },
}

impl Workload {
    /// Names the workload from a cgroup path relative to the cgroup2 mount
    /// (`/kubepods.slice/...`; the leading `/` is optional). Never fails: what matches no
    /// known shape is [`Workload::Cgroup`].
    ///
    /// The outermost identity wins, whatever its kind: a Kubernetes pod, a Docker container
    /// or a systemd unit, so that a workload cannot take another's name by making cgroups
    /// shaped like it below its own. Before, a pod anywhere in the path came first, then a
    /// Docker container: a service with `Delegate=yes` made `docker/<id>` below itself and
    /// was named, and listed in the names table, as that container (helper-124). Below a
    /// container runtime's unit or a Docker container, a pod is that pod (see the module's
    /// docs).
    pub fn from_cgroup_path(path: &Path) -> Self {
        let text = path.to_string_lossy();
        let parts: Vec<&str> = text.split('/').filter(|part| !part.is_empty()).collect();
        outermost(&parts).unwrap_or_else(|| Workload::Cgroup {
            path: format!("/{}", parts.join("/")),
        })
    }

    /// The stable full form (see the type's docs), for dnstap, JSON and keys.
    pub fn full(&self) -> Full<'_> {
        Full(self)
    }

    /// A key for tables and metric labels: the full form.
    pub fn key(&self) -> String {
        self.full().to_string()
    }

    fn render(&self, f: &mut fmt::Formatter<'_>, id_len: usize) -> fmt::Result {
        let short = |id: &str| id[..id_len.min(id.len())].to_owned();
        match self {
            Workload::Pod {
                uid,
                container,
                node,
            } => {
                if let Some(node) = node {
                    write!(f, "docker={} ", short(node))?;
                }
                write!(f, "pod={uid}")?;
                match container {
                    Some(container) => write!(f, " container={}", short(container)),
                    None => Ok(()),
                }
            }
            Workload::Docker { id } => write!(f, "docker={}", short(id)),
            Workload::Container { runtime, id } => write!(f, "{runtime}={}", short(id)),
            Workload::Unit { name, user: None } => write!(f, "unit={name}"),
            Workload::Unit {
                name,
                user: Some(user),
            } => write!(f, "unit={name} user={user}"),
            Workload::Cgroup { path } => {
                f.write_str("cgroup=")?;
                write_escaped(f, path)
            }
        }
    }
}

impl fmt::Display for Workload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.render(f, SHORT_ID)
    }
}

/// [`Workload`]'s full form; see [`Workload::full`].
pub struct Full<'a>(&'a Workload);

impl fmt::Display for Full<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.render(f, usize::MAX)
    }
}

/// Cgroup names are chosen by whoever creates them; escape what could break a log line or
/// the full form's `key=value` pairs, or hide in it (anything but printable ASCII).
fn write_escaped(f: &mut fmt::Formatter<'_>, text: &str) -> fmt::Result {
    for c in text.chars() {
        if !c.is_ascii_graphic() || matches!(c, '\\' | '=' | '"') {
            write!(f, "\\u{{{:x}}}", u32::from(c))?;
        } else {
            write!(f, "{c}")?;
        }
    }
    Ok(())
}

/// Container runtimes' own units, below which their containers' cgroups may sit
/// (`/system.slice/containerd.service/kubepods-...:cri-containerd:<id>`): only root makes
/// cgroups there.
const RUNTIME_UNITS: &[&str] = &[
    "containerd.service",
    "crio.service",
    "k3s.service",
    "k3s-agent.service",
    "rke2-server.service",
    "rke2-agent.service",
];

/// The workload of the outermost cgroup in `parts` that names one.
fn outermost(parts: &[&str]) -> Option<Workload> {
    for (at, part) in parts.iter().enumerate() {
        if let Some(pod) = pod_at(parts, at) {
            // Deeper, the pod's shape is most likely a container's making, below its own
            // cgroup, of a runtime not known here (helper-176: `buildkit/<id>/kubepods/...`):
            // named by its path.
            return rooted_near_the_top(parts, at).then_some(pod);
        }
        if let Some(id) = docker_at(parts, at) {
            // A kind node: a Docker container whose kubelet runs pods inside it. Its pods are
            // named with it: its root chose their cgroups' names (helper-171).
            return Some(match pod(&parts[at + 1..]) {
                Some(Workload::Pod { uid, container, .. }) => Workload::Pod {
                    uid,
                    container,
                    node: Some(id),
                },
                _ => Workload::Docker { id },
            });
        }
        // Not looked through: an unprivileged container's root (LXC's, or Podman's with
        // systemd inside) may make cgroups in its own, shaped as anything (helper-127).
        if let Some(container) = container_at(parts, at) {
            return Some(container);
        }
        // A container of a runtime or a layout not known here (Docker's cgroupfs driver
        // under a --cgroup-parent of its own, nerdctl's `/default/<id>`): named by its path,
        // and not looked through, for the same reason (helper-175: a pod's shape below one
        // was named as the host's pod).
        if container_id(part).is_some() {
            return Some(Workload::Cgroup {
                path: format!("/{}", parts[..=at].join("/")),
            });
        }
        if is_unit(part) {
            if RUNTIME_UNITS.contains(part)
                && let Some(pod) = pod(&parts[at + 1..])
            {
                return Some(pod);
            }
            return Some(unit_at(parts, at));
        }
    }
    None
}

/// The outermost pod cgroup in `parts` and the container directly under it.
fn pod(parts: &[&str]) -> Option<Workload> {
    (0..parts.len())
        .find_map(|at| pod_at(parts, at).map(|pod| (at, pod)))
        .and_then(|(at, pod)| rooted_near_the_top(parts, at).then_some(pod))
}

/// Whether the pod at `parts[at]` hangs from a Kubernetes tree (`kubepods`, `kubepods.slice`,
/// kind's `kubelet.slice`) that starts at the top of `parts` or one level below (kubelet's
/// `--cgroup-root`, k3s's `/k3s`): where kubelet makes it. A container of a runtime not known
/// here may make the same shapes deeper, below its own cgroup.
fn rooted_near_the_top(parts: &[&str], at: usize) -> bool {
    parts[..=at]
        .iter()
        .position(|part| part.starts_with("kubepods") || part.starts_with("kubelet"))
        .is_some_and(|root| root <= 1)
}

/// The pod whose cgroup is `parts[at]`, and the container directly under it.
fn pod_at(parts: &[&str], at: usize) -> Option<Workload> {
    let part = parts[at];
    if let Some(workload) = containerd_leaf(part) {
        return Some(workload);
    }
    let uid = systemd_pod_uid(part).or_else(|| {
        cgroupfs_under_kubepods(&parts[..at])
            .then(|| part.strip_prefix("pod").and_then(pod_uid))
            .flatten()
    })?;
    // Below the container: its own sub-cgroups, still that container.
    let container = parts.get(at + 1).and_then(|part| container_id(part));
    Some(Workload::Pod {
        uid,
        container,
        node: None,
    })
}

/// containerd's own name for a container's cgroup, `<pod slice>:<runtime>:<id>`, which
/// becomes a directory of that name when kubelet uses the systemd driver and containerd does
/// not (`SystemdCgroup = false`): `/system.slice/containerd.service/kubepods-...:cri-containerd:<id>`.
fn containerd_leaf(part: &str) -> Option<Workload> {
    let mut fields = part.split(':');
    let (Some(slice), Some(_runtime), Some(id), None) =
        (fields.next(), fields.next(), fields.next(), fields.next())
    else {
        return None;
    };
    let uid = systemd_pod_uid(slice)?;
    let container = is_container_id(id).then(|| id.to_owned());
    Some(Workload::Pod {
        uid,
        container,
        node: None,
    })
}

/// `kubepods-pod<uid>.slice`, `kubepods-burstable-pod<uid>.slice`,
/// `kubepods-besteffort-pod<uid>.slice`, each also with kind's `kubelet-` in front. systemd
/// spells the uid with `_` for `-` (a `-` in a slice name means nesting).
fn systemd_pod_uid(part: &str) -> Option<String> {
    let name = part.strip_suffix(".slice")?;
    let name = name.strip_prefix("kubelet-").unwrap_or(name);
    let name = name.strip_prefix("kubepods-")?;
    let name = ["burstable-", "besteffort-"]
        .iter()
        .find_map(|qos| name.strip_prefix(qos))
        .unwrap_or(name);
    let uid = name.strip_prefix("pod")?;
    if uid.contains('-') {
        return None;
    }
    pod_uid(&uid.replace('_', "-"))
}

/// Whether a cgroupfs-driver pod directory (`pod<uid>`) would sit where kubelet puts one:
/// directly under `kubepods`, or under `kubepods/burstable` or `kubepods/besteffort`.
fn cgroupfs_under_kubepods(parents: &[&str]) -> bool {
    matches!(
        parents,
        [.., "kubepods"] | [.., "kubepods", "burstable" | "besteffort"]
    )
}

/// A pod uid in its dashed form: 8-4-4-4-12 lowercase hex, or a static pod's 32 hex.
fn pod_uid(uid: &str) -> Option<String> {
    let groups: Vec<&str> = uid.split('-').collect();
    let lengths: Vec<usize> = groups.iter().map(|group| group.len()).collect();
    let shaped = lengths == [8, 4, 4, 4, 12] || lengths == [32];
    (shaped && groups.iter().all(|group| is_lower_hex(group))).then(|| uid.to_owned())
}

/// A container's cgroup under its pod: `cri-containerd-<id>.scope`, `crio-<id>.scope`,
/// `docker-<id>.scope` (systemd driver) or `<id>`, `crio-<id>` (cgroupfs driver).
/// `crio-conmon-<id>.scope` is CRI-O's monitor, not the container, and does not match.
fn container_id(part: &str) -> Option<String> {
    let name = part.strip_suffix(".scope").unwrap_or(part);
    let id = ["cri-containerd-", "crio-", "docker-"]
        .iter()
        .find_map(|runtime| name.strip_prefix(runtime))
        .unwrap_or(name);
    is_container_id(id).then(|| id.to_owned())
}

/// Every runtime here names containers by a sha256: 64 lowercase hex.
fn is_container_id(id: &str) -> bool {
    id.len() == 64 && is_lower_hex(id)
}

fn is_lower_hex(text: &str) -> bool {
    !text.is_empty() && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// The id of the Docker container whose cgroup is `parts[at]`: `docker-<id>.scope`
/// (systemd driver) or `docker/<id>` (cgroupfs driver).
fn docker_at(parts: &[&str], at: usize) -> Option<String> {
    let part = parts[at];
    let id = match part.strip_prefix("docker-") {
        Some(scope) => scope.strip_suffix(".scope")?,
        None if at > 0 && parts[at - 1] == "docker" => part,
        None => return None,
    };
    is_container_id(id).then(|| id.to_owned())
}

/// A Podman or LXC container whose cgroup is `parts[at]`: `libpod-<id>` (cgroupfs manager)
/// or `libpod-<id>.scope` (systemd; `libpod-conmon-<id>.scope` is its monitor, a unit), and
/// `lxc.payload.<name>` (LXC 4 and later, LXD, Incus) or `lxc/<name>` (LXC 3 and before). An
/// LXC name that does not validate still ends the search: the path up to it names the
/// workload.
fn container_at(parts: &[&str], at: usize) -> Option<Workload> {
    let part = parts[at];
    let lxc = part
        .strip_prefix("lxc.payload.")
        .or_else(|| (at > 0 && parts[at - 1] == "lxc").then_some(part));
    if let Some(name) = lxc {
        let valid = name.len() <= 128
            && name.starts_with(|c: char| c.is_ascii_alphanumeric())
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
        return Some(match valid {
            true => Workload::Container {
                runtime: "lxc",
                id: name.to_owned(),
            },
            false => Workload::Cgroup {
                path: format!("/{}", parts[..=at].join("/")),
            },
        });
    }
    let name = part.strip_prefix("libpod-")?;
    let id = name.strip_suffix(".scope").unwrap_or(name);
    is_container_id(id).then(|| Workload::Container {
        runtime: "podman",
        id: id.to_owned(),
    })
}

/// The unit `parts[at]` (a `.service` or `.scope`); inside a user's manager
/// (`user@<uid>.service`) the outermost unit below it, when there is one.
fn unit_at(parts: &[&str], at: usize) -> Workload {
    let user = parts[..at].iter().find_map(|part| {
        part.strip_prefix("user-")?
            .strip_suffix(".slice")?
            .parse()
            .ok()
    });
    let manager_of = parts[at]
        .strip_prefix("user@")
        .and_then(|rest| rest.strip_suffix(".service"))
        .and_then(|uid| uid.parse::<u32>().ok());
    if let Some(uid) = manager_of
        && let Some(inner) = parts[at + 1..].iter().find(|part| is_unit(part))
    {
        return Workload::Unit {
            name: (*inner).to_owned(),
            user: Some(uid),
        };
    }
    Workload::Unit {
        name: parts[at].to_owned(),
        user,
    }
}

/// A systemd unit name for a cgroup: `.service` or `.scope`, in the characters systemd
/// allows (unit_name_is_valid: ASCII letters, digits, `:-_.@`; we refuse its `\` escapes
/// so that names need none in logs), at most 255 bytes.
fn is_unit(part: &str) -> bool {
    let Some(stem) = part
        .strip_suffix(".service")
        .or_else(|| part.strip_suffix(".scope"))
    else {
        return false;
    };
    !stem.is_empty()
        && part.len() <= 255
        && part
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b":-_.@".contains(&b))
}

#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    #[error("cannot read the cgroup2 mount {path}: {source}")]
    Root { path: PathBuf, source: io::Error },
}

/// Limits of a [`CgroupPaths`]; the defaults suit a busy Kubernetes node.
#[derive(Debug, Clone, Copy)]
pub struct CgroupPathsLimits {
    /// How many id → path entries to keep; the least recently used go first.
    pub capacity: usize,
    /// The least time between two walks of the tree: ids that miss in between are unknown
    /// until the next walk, so a storm of unknown ids costs one walk per interval.
    pub min_walk_interval: Duration,
    /// The time between two walks is also at least this many times the last walk's own, so
    /// that a tree slow to walk (deep paths of long names, which a workload that may make
    /// cgroups can make) takes at most about `1 / (1 + this)` of a CPU.
    pub walk_time_factor: u32,
    /// How deep a walk goes below the mount (kind in Docker nests about ten deep).
    pub max_depth: usize,
    /// How many directories one walk visits at most, so a workload that makes a flood of
    /// sub-cgroups cannot make walks unbounded.
    pub max_walk_entries: usize,
}

impl Default for CgroupPathsLimits {
    fn default() -> Self {
        Self {
            capacity: 65_536,
            min_walk_interval: Duration::from_millis(250),
            walk_time_factor: 10,
            max_depth: 32,
            max_walk_entries: 262_144,
        }
    }
}

/// Cgroup id (what `bpf_get_current_cgroup_id()` returns: on cgroup v2 the inode number of
/// the cgroup's directory) → the cgroup's path under the cgroup2 mount.
///
/// Lookups are blocking filesystem work (a miss walks the tree): call it off the async
/// threads, e.g. in tokio's `spawn_blocking`. It is `Sync`; concurrent callers wait for one
/// another's walk, which is what they would do anyway.
pub struct CgroupPaths {
    root: PathBuf,
    limits: CgroupPathsLimits,
    state: Mutex<State>,
}

struct State {
    paths: LruCache<u64, PathBuf>,
    /// When the next walk may start.
    next_walk: Option<Instant>,
    walks: u64,
}

/// The longest path kept for a cgroup, in bytes, cut at a `/`: a cgroup's path is its
/// creator's to choose, up to the kernel's 4 KiB, and up to 65,536 are kept. The shapes
/// that name a workload (a pod, a container, a unit) come in its first few hundred bytes; one
/// only below the cut is named by its path's start.
const PATH_BYTES_KEPT: usize = 512;

impl CgroupPaths {
    /// A resolver for the cgroup2 hierarchy mounted at `root` (e.g.
    /// [`crate::cgroup::cgroup2_root`]), with the default limits.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self::with_limits(root, CgroupPathsLimits::default())
    }

    pub fn with_limits(root: impl Into<PathBuf>, limits: CgroupPathsLimits) -> Self {
        Self {
            root: root.into(),
            limits,
            state: Mutex::new(State {
                paths: LruCache::new(limits.capacity.max(1)),
                next_walk: None,
                walks: 0,
            }),
        }
    }

    /// The path of cgroup `id` under the mount, starting with `/` (the root itself is `/`).
    ///
    /// `Ok(None)` when the id is unknown: not in the tree at the last walk, and the last walk
    /// was too recent for another. A cached path may name a cgroup removed since the last
    /// walk; ids are not reused while the system runs (64-bit kernfs ids), so it is never
    /// another cgroup's.
    pub fn resolve(&self, id: u64) -> Result<Option<PathBuf>, WorkloadError> {
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        if let Some(path) = state.paths.get(&id) {
            return Ok(Some(path.clone()));
        }
        let now = Instant::now();
        if state.next_walk.is_some_and(|next| now < next) {
            return Ok(None);
        }
        state.walks += 1;
        // The cache's worth of paths, and the one asked for: held as the walk goes, so that a
        // tree of many long paths costs no more than the cache.
        let (capacity, mut found, mut wanted) = (self.limits.capacity, Vec::new(), None);
        let walked = self.walk(|other, below| {
            if other == id {
                wanted = Some(cut_path(&Path::new("/").join(below)));
            } else if found.len() < capacity {
                found.push((other, cut_path(&Path::new("/").join(below))));
            }
        });
        let took = now.elapsed();
        let pause = took * self.limits.walk_time_factor;
        state.next_walk = Some(now + self.limits.min_walk_interval.max(pause));
        walked?;
        // A fresh walk replaces the cache, which drops the cgroups that vanished.
        state.paths.clear();
        for (other, path) in found {
            state.paths.insert(other, path);
        }
        // Last, so a tree larger than the cache still keeps the one asked for.
        if let Some(path) = &wanted {
            state.paths.insert(id, path.clone());
        }
        Ok(wanted)
    }

    /// The workload of cgroup `id`, or `None` when the id is unknown (see
    /// [`CgroupPaths::resolve`]).
    pub fn workload(&self, id: u64) -> Result<Option<Workload>, WorkloadError> {
        Ok(self
            .resolve(id)?
            .map(|path| Workload::from_cgroup_path(&path)))
    }

    /// The ids of every cgroup in the tree now (a walk, within the limits; not rate-limited,
    /// and the cache left alone).
    pub fn live_ids(&self) -> Result<std::collections::HashSet<u64>, WorkloadError> {
        let mut ids = std::collections::HashSet::new();
        self.walk(|id, _| {
            ids.insert(id);
        })?;
        Ok(ids)
    }

    /// How many times the tree was walked, for metrics.
    pub fn walks(&self) -> u64 {
        self.state.lock().map_or(0, |state| state.walks)
    }

    /// How many ids are cached.
    pub fn cached(&self) -> usize {
        self.state.lock().map_or(0, |state| state.paths.len())
    }

    /// Visits every cgroup under the mount, within the limits, with its id and its path below
    /// the mount (empty for the root). Directories that vanish or cannot be read during the walk
    /// are skipped: the tree changes while we walk it. Nothing is kept but an open directory per
    /// level.
    fn walk(&self, mut visit: impl FnMut(u64, &Path)) -> Result<(), WorkloadError> {
        let root_meta = fs::symlink_metadata(&self.root).map_err(|source| WorkloadError::Root {
            path: self.root.clone(),
            source,
        })?;
        visit(root_meta.ino(), Path::new(""));
        let mut visited = 1;
        // Depth-first, one open directory per level: what the walk holds is bounded by the
        // depth, however wide the tree.
        let Ok(top) = fs::read_dir(&self.root) else {
            return Ok(());
        };
        let mut open = vec![top];
        while let Some(entries) = open.last_mut() {
            let Some(entry) = entries.next() else {
                open.pop();
                continue;
            };
            let Ok(entry) = entry else {
                continue;
            };
            if visited >= self.limits.max_walk_entries {
                return Ok(());
            }
            // DirEntry::metadata does not follow symlinks; a different device is a mount
            // inside the tree, not a cgroup.
            let Ok(meta) = entry.metadata() else {
                continue;
            };
            if !meta.is_dir() || meta.dev() != root_meta.dev() {
                continue;
            }
            visited += 1;
            let path = entry.path();
            visit(meta.ino(), path.strip_prefix(&self.root).unwrap_or(&path));
            // `open` holds the directories above this one's parent, and its parent.
            if open.len() < self.limits.max_depth
                && let Ok(children) = fs::read_dir(&path)
            {
                open.push(children);
            }
        }
        Ok(())
    }
}

/// `path`, or its first components within [`PATH_BYTES_KEPT`] bytes (at least the first).
fn cut_path(path: &Path) -> PathBuf {
    if path.as_os_str().len() <= PATH_BYTES_KEPT {
        return path.to_owned();
    }
    let mut cut = PathBuf::new();
    for part in path.components() {
        let len = cut.as_os_str().len() + 1 + part.as_os_str().len();
        if len > PATH_BYTES_KEPT && cut.components().count() > 1 {
            break;
        }
        cut.push(part);
    }
    cut
}

/// Workload names for the query path, which must not block: a lookup answers from a cache at
/// once, and an id it does not know yet is handed to a thread of its own that walks the
/// cgroup tree ([`CgroupPaths`]); the name is there for the id's next query. The thread starts
/// with the first name asked for once [`WorkloadNames::allow_resolving`] was called (after the
/// agent dropped its capabilities: a thread made before would keep them), and ends with the
/// last handle.
#[derive(Debug)]
pub struct WorkloadNames {
    root: PathBuf,
    /// Short and full forms, by cgroup id.
    names: Arc<Mutex<LruCache<u64, Names>>>,
    /// Ids waiting for the resolver; full: asked again on a later query.
    requests: std::sync::OnceLock<Option<std::sync::mpsc::SyncSender<u64>>>,
    /// The resolver thread may start.
    resolving: std::sync::atomic::AtomicBool,
}

/// A workload's short form (the log's) and full form (dnstap's).
type Names = (Arc<str>, Arc<str>);

/// Ids waiting for the resolver at most.
const PENDING_RESOLUTIONS: usize = 1024;
/// Names kept at most.
const NAMES_KEPT: usize = 65_536;
/// The longest name kept, in bytes: a path's form escapes a byte as up to six, and each name
/// is kept, logged and written to dnstap with every query of its workload.
const NAME_BYTES: usize = 256;

/// `name`, or, if it is longer than [`NAME_BYTES`], its start, `...` and the cgroup's id, so
/// that two cut names stay apart.
fn bounded_name(name: String, id: u64) -> Arc<str> {
    if name.len() <= NAME_BYTES {
        return name.into();
    }
    let mut end = NAME_BYTES;
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    // Not inside an escape (`\u{3d}`).
    if let Some(escape) = name[..end].rfind('\\')
        && !name[escape..end].contains('}')
    {
        end = escape;
    }
    format!("{}... cgroup-id={id}", &name[..end]).into()
}

impl WorkloadNames {
    /// Names for the cgroups of the cgroup2 hierarchy mounted at `root`.
    pub fn new(root: PathBuf) -> Self {
        Self {
            root,
            names: Arc::new(Mutex::new(LruCache::new(NAMES_KEPT))),
            requests: std::sync::OnceLock::new(),
            resolving: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Lets names be resolved from now on.
    pub fn allow_resolving(&self) {
        self.resolving
            .store(true, std::sync::atomic::Ordering::Release);
    }

    /// The name of cgroup `id`'s workload (the short form of [`Workload`]'s `Display`), if
    /// known; otherwise asks for it and says `cgroup-id=ID`. Id 0 is a query whose origin
    /// the kernel could not record (its table full): `unknown`.
    pub fn name(&self, id: u64) -> Arc<str> {
        if id == 0 {
            return Arc::from("unknown");
        }
        if let Some((name, _)) = lock(&self.names).get(&id) {
            return Arc::clone(name);
        }
        self.not_yet_named(id)
    }

    /// What an event of cgroup `id` says while its name is not known (`cgroup-id=N`), having
    /// asked the naming thread for it.
    fn not_yet_named(&self, id: u64) -> Arc<str> {
        if self.resolving.load(std::sync::atomic::Ordering::Acquire)
            && let Some(requests) = self.requests.get_or_init(|| self.start_resolver())
        {
            let _ = requests.try_send(id);
        }
        Arc::from(format!("cgroup-id={id}"))
    }

    /// [`name`](Self::name) from `names` if there are any (a proxy without them: the unit
    /// tests'), `cgroup-id=ID` otherwise.
    pub fn name_in(names: Option<&Self>, id: u64) -> Arc<str> {
        match names {
            Some(names) => names.name(id),
            None => Arc::from(format!("cgroup-id={id}")),
        }
    }

    /// The full form of cgroup `id`'s workload ([`Workload::key`]), if known (asked for as
    /// [`name`](Self::name) does otherwise); `None` for id 0 or a cgroup not named yet.
    pub fn full(&self, id: u64) -> Option<Arc<str>> {
        if id == 0 {
            return None;
        }
        if let Some((_, full)) = lock(&self.names).get(&id) {
            return Some(Arc::clone(full));
        }
        let _ = self.not_yet_named(id);
        None
    }

    /// The full form if known, otherwise `cgroup-id=N` (or `unknown`): never nothing, so every
    /// event names its cgroup, and never the short form. Looked up once: the naming thread
    /// could name the cgroup between a look for the full form and one for the short form, and
    /// a new container's first queries went to dnstap as `docker=<12 hex>` (3 events of
    /// 1,570 under churn; helper-97).
    pub fn full_or_id(&self, id: u64) -> Arc<str> {
        if id == 0 {
            return Arc::from("unknown");
        }
        self.full(id)
            .unwrap_or_else(|| Arc::from(format!("cgroup-id={id}")))
    }

    fn start_resolver(&self) -> Option<std::sync::mpsc::SyncSender<u64>> {
        let (requests, incoming) = std::sync::mpsc::sync_channel::<u64>(PENDING_RESOLUTIONS);
        let (root, names) = (self.root.clone(), Arc::clone(&self.names));
        let started = std::thread::Builder::new()
            .name("dns-proxy-workloads".to_owned())
            .spawn(move || {
                let paths = CgroupPaths::new(root);
                while let Ok(id) = incoming.recv() {
                    if lock(&names).contains_key(&id) {
                        continue;
                    }
                    match paths.workload(id) {
                        Ok(Some(workload)) => {
                            let forms = (
                                bounded_name(workload.to_string(), id),
                                bounded_name(workload.key(), id),
                            );
                            lock(&names).insert(id, forms);
                        }
                        // Not in the tree at the last walk: asked again on a later query.
                        Ok(None) => {}
                        Err(err) => log::debug!("naming cgroup {id}: {err}"),
                    }
                }
            });
        match started {
            Ok(_) => Some(requests),
            Err(err) => {
                log::warn!("cannot start the thread that names workloads: {err}");
                None
            }
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poison| poison.into_inner())
}

#[cfg(test)]
mod tests;
