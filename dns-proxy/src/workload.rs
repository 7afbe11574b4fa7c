//! Which workload asked a query: a name for the cgroup the kernel side saw it come from.
//!
//! The kernel side reports `bpf_get_current_cgroup_id()`, the inode number of the asking
//! process's cgroup v2 directory. [`CgroupPaths`] turns that id into the directory's path
//! under the cgroup2 mount, and [`Workload::from_cgroup_path`] names the workload from the
//! shapes that Kubernetes, Docker and systemd give their cgroups.
//!
//! The names are labels, not proof: a workload that was delegated its cgroup subtree (a
//! systemd service with `Delegate=yes`, a container with a writable cgroupns) chooses the
//! names below it. Parsing takes the outermost match, so such a workload cannot escape the
//! identity of the cgroup it was put in, only add shapes below it; and any name that does not
//! validate falls through to the plain path, escaped for logs.
use std::{
    collections::HashMap,
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
///   `pod=<uid>`, `docker=<12 hex>`, `unit=<name>`, `unit=<name> user=<uid>`,
///   `cgroup=<path>`.
/// - [`Workload::full`], stable for dnstap's `extra` field, JSON and table keys: the same
///   `key=value` pairs with the full 64-hex container ids. Values never hold spaces, `=` or
///   control characters (a path's are escaped), so the form splits cleanly on spaces.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Workload {
    /// A Kubernetes pod (`uid` in its dashed 36-character form, or the 32-hex config hash of
    /// a static pod), and the container in it when the cgroup is a container's rather than
    /// the pod's own.
    Pod {
        uid: String,
        container: Option<String>,
    },
    /// A Docker container outside Kubernetes: its 64-hex id.
    Docker { id: String },
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
    /// Precedence: a Kubernetes pod anywhere in the path (so kind nodes, which are Docker
    /// containers holding kubelets, name their pods), then a Docker container, then a
    /// systemd unit. Within each, the outermost match wins.
    pub fn from_cgroup_path(path: &Path) -> Self {
        let text = path.to_string_lossy();
        let parts: Vec<&str> = text.split('/').filter(|part| !part.is_empty()).collect();
        pod(&parts)
            .or_else(|| docker(&parts))
            .or_else(|| unit(&parts))
            .unwrap_or_else(|| Workload::Cgroup {
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
                container: Some(container),
            } => write!(f, "pod={uid} container={}", short(container)),
            Workload::Pod {
                uid,
                container: None,
            } => write!(f, "pod={uid}"),
            Workload::Docker { id } => write!(f, "docker={}", short(id)),
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

/// The outermost pod cgroup and the container directly under it.
fn pod(parts: &[&str]) -> Option<Workload> {
    for (at, part) in parts.iter().enumerate() {
        if let Some(workload) = containerd_leaf(part) {
            return Some(workload);
        }
        let uid = systemd_pod_uid(part).or_else(|| {
            let parents = &parts[..at];
            cgroupfs_under_kubepods(parents)
                .then(|| part.strip_prefix("pod").and_then(pod_uid))
                .flatten()
        });
        if let Some(uid) = uid {
            // Below the container: its own sub-cgroups, still that container.
            let container = parts.get(at + 1).and_then(|part| container_id(part));
            return Some(Workload::Pod { uid, container });
        }
    }
    None
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
    Some(Workload::Pod { uid, container })
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

/// `docker-<id>.scope` (systemd driver) or `docker/<id>` (cgroupfs driver).
fn docker(parts: &[&str]) -> Option<Workload> {
    parts.iter().enumerate().find_map(|(at, part)| {
        let id = match part.strip_prefix("docker-") {
            Some(scope) => scope.strip_suffix(".scope")?,
            None if at > 0 && parts[at - 1] == "docker" => part,
            None => return None,
        };
        is_container_id(id).then(|| Workload::Docker { id: id.to_owned() })
    })
}

/// The outermost `.service` or `.scope`; inside a user's manager (`user@<uid>.service`) the
/// outermost unit below it, when there is one.
fn unit(parts: &[&str]) -> Option<Workload> {
    let at = parts.iter().position(|part| is_unit(part))?;
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
        return Some(Workload::Unit {
            name: (*inner).to_owned(),
            user: Some(uid),
        });
    }
    Some(Workload::Unit {
        name: parts[at].to_owned(),
        user,
    })
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
    last_walk: Option<Instant>,
    walks: u64,
}

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
                last_walk: None,
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
        if state
            .last_walk
            .is_some_and(|last| now.duration_since(last) < self.limits.min_walk_interval)
        {
            return Ok(None);
        }
        state.last_walk = Some(now);
        state.walks += 1;
        let mut found = self.walk()?;
        let wanted = found.remove(&id);
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
        Ok(self.walk()?.into_keys().collect())
    }

    /// How many times the tree was walked, for metrics.
    pub fn walks(&self) -> u64 {
        self.state.lock().map_or(0, |state| state.walks)
    }

    /// How many ids are cached.
    pub fn cached(&self) -> usize {
        self.state.lock().map_or(0, |state| state.paths.len())
    }

    /// Every cgroup under the mount, by id, within the limits. Directories that vanish or
    /// cannot be read during the walk are skipped: the tree changes while we walk it.
    fn walk(&self) -> Result<HashMap<u64, PathBuf>, WorkloadError> {
        let root_meta = fs::symlink_metadata(&self.root).map_err(|source| WorkloadError::Root {
            path: self.root.clone(),
            source,
        })?;
        let mut found = HashMap::new();
        found.insert(root_meta.ino(), PathBuf::from("/"));
        // Depth-first with an explicit stack: (directory on disk, path under the mount, depth).
        let mut stack = vec![(self.root.clone(), PathBuf::from("/"), 0)];
        while let Some((dir, relative, depth)) = stack.pop() {
            let Ok(entries) = fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                if found.len() >= self.limits.max_walk_entries {
                    return Ok(found);
                }
                // DirEntry::metadata does not follow symlinks; a different device is a
                // mount inside the tree, not a cgroup.
                let Ok(meta) = entry.metadata() else {
                    continue;
                };
                if !meta.is_dir() || meta.dev() != root_meta.dev() {
                    continue;
                }
                let child = relative.join(entry.file_name());
                found.insert(meta.ino(), child.clone());
                if depth + 1 < self.limits.max_depth {
                    stack.push((entry.path(), child, depth + 1));
                }
            }
        }
        Ok(found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "0bc5eac79e3ae7a0c2651f14722aa10fa333eb2325c2ca97da33aa284cda81b0";
    const UID: &str = "0b7632a2-a56e-4278-987a-22de18008dbe";

    fn parse(path: &str) -> Workload {
        Workload::from_cgroup_path(Path::new(path))
    }

    fn pod(container: Option<&str>) -> Workload {
        Workload::Pod {
            uid: UID.into(),
            container: container.map(Into::into),
        }
    }

    fn underscored() -> String {
        UID.replace('-', "_")
    }

    #[test]
    fn names_pods_and_containers_of_the_systemd_driver_for_each_runtime_and_qos() {
        let u = underscored();
        for (qos_slice, qos) in [
            ("kubepods-burstable.slice/", "burstable-"),
            ("kubepods-besteffort.slice/", "besteffort-"),
            ("", ""),
        ] {
            let pod_slice = format!("/kubepods.slice/{qos_slice}kubepods-{qos}pod{u}.slice");
            assert_eq!(parse(&pod_slice), pod(None), "{pod_slice}");
            for runtime in ["cri-containerd-", "crio-", "docker-"] {
                let path = format!("{pod_slice}/{runtime}{ID}.scope");
                assert_eq!(parse(&path), pod(Some(ID)), "{path}");
            }
        }
    }

    #[test]
    fn names_pods_and_containers_of_the_cgroupfs_driver() {
        for qos in ["burstable/", "besteffort/", ""] {
            let pod_dir = format!("/kubepods/{qos}pod{UID}");
            assert_eq!(parse(&pod_dir), pod(None), "{pod_dir}");
            assert_eq!(parse(&format!("{pod_dir}/{ID}")), pod(Some(ID)));
            assert_eq!(parse(&format!("{pod_dir}/crio-{ID}")), pod(Some(ID)));
        }
        // A real one, from a GKE node's /proc/self/cgroup.
        assert_eq!(
            parse(
                "/kubepods/besteffort/pod74c13223-5a00-11e9-b385-42010a80018d/\
                 34dc0b5e626f2c5c4c5170e34b10e7654ce36f0fcd532739f4445baabea03376"
            ),
            Workload::Pod {
                uid: "74c13223-5a00-11e9-b385-42010a80018d".into(),
                container: Some(
                    "34dc0b5e626f2c5c4c5170e34b10e7654ce36f0fcd532739f4445baabea03376".into()
                ),
            }
        );
    }

    #[test]
    fn names_pods_nested_under_kind_nodes_and_other_prefixes() {
        let u = underscored();
        // kind: the node is a Docker container whose kubelet uses kubelet.slice.
        let kind = format!(
            "/system.slice/docker-{ID}.scope/kubelet.slice/kubelet-kubepods.slice/\
             kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{u}.slice/\
             cri-containerd-{ID}.scope"
        );
        assert_eq!(parse(&kind), pod(Some(ID)));
        let guaranteed =
            format!("/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-pod{u}.slice");
        assert_eq!(parse(&guaranteed), pod(None));
        let under_containerd = format!(
            "/system.slice/containerd.service/kubepods-burstable-pod{u}.slice:cri-containerd:{ID}"
        );
        assert_eq!(parse(&under_containerd), pod(Some(ID)));
        let nested = format!("/system.slice/containerd.service/kubepods/burstable/pod{UID}/{ID}");
        assert_eq!(parse(&nested), pod(Some(ID)));
        // k3s in a cgroup of its own.
        assert_eq!(
            parse(&format!("/k3s/kubepods/pod{UID}/{ID}")),
            pod(Some(ID))
        );
    }

    #[test]
    fn a_containers_own_sub_cgroups_still_name_that_container() {
        let u = underscored();
        let other = "1".repeat(64);
        let fake = format!(
            "kubepods-pod{}.slice/cri-containerd-{other}.scope",
            "1".repeat(32)
        );
        let path = format!(
            "/kubepods.slice/kubepods-pod{u}.slice/cri-containerd-{ID}.scope/init.scope/{fake}"
        );
        assert_eq!(parse(&path), pod(Some(ID)));
    }

    #[test]
    fn takes_static_pods_config_hash_as_their_uid() {
        let hash = "a1b2c3d4e5f60718293a4b5c6d7e8f90";
        assert_eq!(
            parse(&format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{hash}.slice"
            )),
            Workload::Pod {
                uid: hash.into(),
                container: None
            }
        );
    }

    #[test]
    fn crio_conmon_is_the_pod_not_a_container() {
        let u = underscored();
        let path = format!("/kubepods.slice/kubepods-pod{u}.slice/crio-conmon-{ID}.scope");
        assert_eq!(parse(&path), pod(None));
    }

    #[test]
    fn names_docker_containers_of_both_drivers() {
        let docker = Workload::Docker { id: ID.into() };
        assert_eq!(parse(&format!("/docker/{ID}")), docker);
        assert_eq!(parse(&format!("/system.slice/docker-{ID}.scope")), docker);
        assert_eq!(parse(&format!("/docker/{ID}/sub")), docker);
        assert_eq!(docker.to_string(), "docker=0bc5eac79e3a");
        assert_eq!(docker.key(), format!("docker={ID}"));
    }

    #[test]
    fn names_systemd_units_system_and_user() {
        let system = |name: &str| Workload::Unit {
            name: name.into(),
            user: None,
        };
        let user = |name: &str| Workload::Unit {
            name: name.into(),
            user: Some(1000),
        };
        assert_eq!(
            parse("/system.slice/nginx.service"),
            system("nginx.service")
        );
        assert_eq!(
            parse("/system.slice/foo.slice/bar.service"),
            system("bar.service")
        );
        assert_eq!(
            parse("/system.slice/dns-proxy.service/dns-proxy-agent"),
            system("dns-proxy.service")
        );
        assert_eq!(parse("/init.scope"), system("init.scope"));
        assert_eq!(
            parse("/system.slice/system-getty.slice/getty@tty1.service"),
            system("getty@tty1.service")
        );
        assert_eq!(
            parse("/user.slice/user-1000.slice/user@1000.service/app.slice/x.service"),
            user("x.service")
        );
        assert_eq!(
            parse("/user.slice/user-1000.slice/user@1000.service/init.scope"),
            user("init.scope")
        );
        assert_eq!(
            parse("/user.slice/user-1000.slice/session-3.scope"),
            user("session-3.scope")
        );
        assert_eq!(
            parse("/user.slice/user-1000.slice/user@1000.service"),
            user("user@1000.service")
        );
        assert_eq!(user("x.service").to_string(), "unit=x.service user=1000");
        assert_eq!(system("nginx.service").to_string(), "unit=nginx.service");
    }

    #[test]
    fn anything_else_is_its_path() {
        let path = |p: &str| Workload::Cgroup { path: p.into() };
        assert_eq!(parse("/"), path("/"));
        assert_eq!(parse(""), path("/"));
        assert_eq!(parse("/system.slice"), path("/system.slice"));
        assert_eq!(parse("my-cgroup/leaf/"), path("/my-cgroup/leaf"));
        assert_eq!(path("/a/b").to_string(), "cgroup=/a/b");
    }

    #[test]
    fn names_that_do_not_validate_fall_through_to_the_path() {
        let u = underscored();
        let odd = [
            // Uid too short, too long, uppercase, dashes in a systemd name, non-hex.
            format!("/kubepods.slice/kubepods-pod{}.slice", &u[1..]),
            format!("/kubepods.slice/kubepods-pod{u}0.slice"),
            format!("/kubepods.slice/kubepods-pod{}.slice", u.to_uppercase()),
            format!("/kubepods.slice/kubepods-pod{UID}.slice"),
            "/kubepods.slice/kubepods-podzzzzzzzz_zzzz_zzzz_zzzz_zzzzzzzzzzzz.slice".into(),
            "/kubepods.slice/kubepods-pod.slice".into(),
            // A pod directory that is not where kubelet puts one.
            format!("/elsewhere/pod{UID}/{ID}"),
            // Docker ids of the wrong length or alphabet.
            format!("/docker/{}", &ID[1..]),
            format!("/docker/{}", ID.to_uppercase()),
            "/docker/".into(),
        ];
        for path in odd {
            let parsed = parse(&path);
            assert!(
                matches!(parsed, Workload::Cgroup { .. }),
                "{path}: {parsed:?}"
            );
        }
        // Still a valid systemd scope name, so the unit, not a container.
        assert_eq!(
            parse(&format!("/system.slice/docker-{ID}x.scope")),
            Workload::Unit {
                name: format!("docker-{ID}x.scope"),
                user: None
            }
        );
        // A pod whose container part does not validate is still the pod.
        let bad_container = format!(
            "/kubepods.slice/kubepods-pod{u}.slice/cri-containerd-{}.scope",
            &ID[2..]
        );
        assert_eq!(parse(&bad_container), pod(None));
    }

    #[test]
    fn hostile_names_neither_panic_nor_break_a_log_line() {
        let nasty = [
            "/a\nb/c d=e\\\"f\u{7f}\u{200b}",
            "/kubepods.slice/kubepods-pod\u{e9}\u{e9}.slice",
            "/kubepods-pod.slice/-.scope",
            "/user.slice/user-99999999999999999999.slice/user@-1.service/.service",
            "////",
            "/docker-.scope",
            "/kubepods/pod/",
            "/\u{0}",
        ];
        for path in nasty {
            let parsed = parse(path);
            for line in [parsed.to_string(), parsed.key()] {
                assert!(
                    !line.chars().any(|c| c.is_control() || c == '\u{200b}'),
                    "{path:?} → {line:?}"
                );
                let value = line.split_once('=').map_or("", |(_, value)| value);
                assert!(!value.contains([' ', '=']), "{path:?} → {line:?}");
            }
        }
        assert_eq!(parse("/a\nb c").to_string(), "cgroup=/a\\u{a}b\\u{20}c");
        // Not a .service: a unit name needs a stem and systemd's characters.
        assert!(matches!(
            parse("/system.slice/.service"),
            Workload::Cgroup { .. }
        ));
        assert!(matches!(
            parse("/system.slice/a b.service"),
            Workload::Cgroup { .. }
        ));
    }

    #[test]
    fn compact_form_shortens_container_ids_and_full_form_keeps_them() {
        let workload = pod(Some(ID));
        assert_eq!(
            workload.to_string(),
            format!("pod={UID} container=0bc5eac79e3a")
        );
        assert_eq!(workload.key(), format!("pod={UID} container={ID}"));
        assert_eq!(workload.full().to_string(), workload.key());
        assert_eq!(pod(None).to_string(), format!("pod={UID}"));
    }

    /// A directory tree of the test's own, removed on drop.
    struct TempTree(PathBuf);

    impl TempTree {
        fn new(parent: &Path, name: &str) -> Self {
            let dir = parent.join(name);
            fs::create_dir(&dir).unwrap_or_else(|err| panic!("mkdir {}: {err}", dir.display()));
            Self(dir)
        }

        fn mkdir(&self, relative: &str) -> u64 {
            let dir = self.0.join(relative);
            fs::create_dir(&dir).unwrap_or_else(|err| panic!("mkdir {}: {err}", dir.display()));
            fs::metadata(&dir).unwrap().ino()
        }
    }

    impl Drop for TempTree {
        fn drop(&mut self) {
            // cgroupfs refuses recursive removal of files (cgroup.procs, ...): rmdir leaves
            // first, deepest first.
            let mut dirs = Vec::new();
            let mut stack = vec![self.0.clone()];
            while let Some(dir) = stack.pop() {
                if let Ok(entries) = fs::read_dir(&dir) {
                    for entry in entries.flatten() {
                        if entry.file_type().is_ok_and(|kind| kind.is_dir()) {
                            stack.push(entry.path());
                        }
                    }
                }
                dirs.push(dir);
            }
            for dir in dirs.iter().rev() {
                if fs::remove_dir(dir).is_err() {
                    let _ = fs::remove_dir_all(dir);
                }
            }
        }
    }

    fn temp_tree() -> TempTree {
        TempTree::new(
            &std::env::temp_dir(),
            &format!(
                "dns-proxy-test-paths-{}-{:?}",
                std::process::id(),
                std::thread::current().id()
            )
            .replace(['(', ')'], ""),
        )
    }

    #[test]
    fn resolves_ids_from_one_walk_and_walks_no_more_often_than_the_interval() {
        let tree = temp_tree();
        let a = tree.mkdir("a");
        let b = tree.mkdir("a/b");
        let paths = CgroupPaths::with_limits(
            &tree.0,
            CgroupPathsLimits {
                min_walk_interval: Duration::from_secs(3600),
                ..Default::default()
            },
        );
        assert_eq!(paths.resolve(b).unwrap(), Some(PathBuf::from("/a/b")));
        assert_eq!(paths.resolve(a).unwrap(), Some(PathBuf::from("/a")));
        let root = fs::metadata(&tree.0).unwrap().ino();
        assert_eq!(paths.resolve(root).unwrap(), Some(PathBuf::from("/")));
        assert_eq!(paths.walks(), 1);
        // A storm of unknown ids, and a cgroup made since: no walk until the interval is up.
        let c = tree.mkdir("c");
        for id in 0..1000 {
            assert_eq!(paths.resolve(u64::MAX - id).unwrap(), None);
        }
        assert_eq!(paths.resolve(c).unwrap(), None);
        assert_eq!(paths.walks(), 1);
    }

    #[test]
    fn keeps_the_asked_id_when_the_tree_is_larger_than_the_cache() {
        let tree = temp_tree();
        let ids: Vec<u64> = (0..20).map(|n| tree.mkdir(&format!("d{n}"))).collect();
        let paths = CgroupPaths::with_limits(
            &tree.0,
            CgroupPathsLimits {
                capacity: 4,
                min_walk_interval: Duration::ZERO,
                ..Default::default()
            },
        );
        for (n, id) in ids.iter().enumerate() {
            assert_eq!(
                paths.resolve(*id).unwrap(),
                Some(PathBuf::from(format!("/d{n}")))
            );
            assert!(paths.cached() <= 4);
        }
    }

    #[test]
    fn bounds_the_depth_and_does_not_follow_symlinks() {
        let tree = temp_tree();
        let mut deep = String::from("x");
        let mut deepest = tree.mkdir(&deep);
        for _ in 0..5 {
            deep.push_str("/x");
            deepest = tree.mkdir(&deep);
        }
        std::os::unix::fs::symlink("/", tree.0.join("link")).unwrap();
        let paths = CgroupPaths::with_limits(
            &tree.0,
            CgroupPathsLimits {
                max_depth: 3,
                min_walk_interval: Duration::ZERO,
                ..Default::default()
            },
        );
        assert_eq!(paths.resolve(deepest).unwrap(), None);
        let slash = fs::metadata("/").unwrap().ino();
        let found = paths.walk().unwrap();
        assert_eq!(found.len(), 4, "{found:?}"); // the root and x, x/x, x/x/x
        assert!(
            found
                .get(&slash)
                .is_none_or(|path| !path.starts_with("/link"))
        );
    }

    #[test]
    fn an_unreadable_root_is_an_error_naming_it() {
        let paths = CgroupPaths::new("/nonexistent/cgroup2");
        let err = paths.resolve(1).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/cgroup2"), "{err}");
    }

    /// Panics unless running as root: a privileged test must never skip quietly.
    fn require_root() {
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        if euid != 0 {
            panic!(
                "this test makes cgroups and needs root: run `cargo xtask test` as root (see \
                 tests/README.md)"
            );
        }
    }

    #[test]
    fn resolves_real_cgroups_and_drops_the_ones_removed() {
        require_root();
        let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap();
        let mount = crate::cgroup::parse_cgroup2_mount(&mountinfo)
            .expect("no cgroup2 mount on this machine");
        let name = format!("dns-proxy-test-wl-{}", std::process::id());
        let tree = TempTree::new(&mount, &name);
        let parent = fs::metadata(&tree.0).unwrap().ino();
        let child = tree.mkdir("child");
        let paths = CgroupPaths::with_limits(
            &mount,
            CgroupPathsLimits {
                min_walk_interval: Duration::from_millis(50),
                ..Default::default()
            },
        );
        assert_eq!(
            paths.resolve(child).unwrap(),
            Some(PathBuf::from(format!("/{name}/child")))
        );
        assert_eq!(
            paths.workload(parent).unwrap(),
            Some(Workload::Cgroup {
                path: format!("/{name}")
            })
        );
        // The root cgroup's id on cgroup v2 is its inode, 1.
        assert_eq!(paths.resolve(1).unwrap(), Some(PathBuf::from("/")));

        fs::remove_dir(tree.0.join("child")).unwrap();
        std::thread::sleep(Duration::from_millis(60));
        // A miss walks again (the interval is up), and the walk forgets the child.
        assert_eq!(paths.resolve(u64::MAX).unwrap(), None);
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(paths.resolve(child).unwrap(), None);
        assert_eq!(
            paths.resolve(parent).unwrap(),
            Some(PathBuf::from(format!("/{name}")))
        );
        assert_eq!(paths.walks(), 3);
    }
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
        let _ = self.name(id);
        None
    }

    /// The full form if known, otherwise what the log says ([`name`](Self::name):
    /// `cgroup-id=N`, or `unknown`): never nothing, so every event names its cgroup.
    pub fn full_or_id(&self, id: u64) -> Arc<str> {
        self.full(id).unwrap_or_else(|| self.name(id))
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
                            let forms = (workload.to_string().into(), workload.key().into());
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
