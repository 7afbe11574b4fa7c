//! cgroup v2: finding the hierarchy, checking the cgroup to attach to, and giving the agent a
//! cgroup of its own so the kernel side can tell its upstream traffic from a workload's.
//!
//! On hybrid hosts every process starts in the cgroup2 root, so the agent shares its cgroup id
//! with everything else until it moves into a leaf of its own.
use std::{
    fs, io,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

/// `CGROUP2_SUPER_MAGIC` from linux/magic.h.
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// Name of the agent's own cgroup, created beside the workloads in the agent's current cgroup.
/// Fixed, so a restarted agent reuses it and a killed one leaves nothing new behind.
pub const AGENT_CGROUP_NAME: &str = "dns-proxy-agent";

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error(
        "no cgroup2 filesystem is mounted (looked in /proc/self/mountinfo); mount one, e.g. \
         `mount -t cgroup2 none /sys/fs/cgroup/unified`"
    )]
    NoCgroup2Mount,
    #[error("{flag} {path}: {reason}")]
    BadCgroup {
        flag: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("cannot create the agent's cgroup {path}: {source}{hint}", hint = permission_hint(source))]
    CreateAgentCgroup { path: PathBuf, source: io::Error },
    #[error("cannot move the agent into its cgroup {path}: {source}{hint}", hint = permission_hint(source))]
    EnterAgentCgroup { path: PathBuf, source: io::Error },
    #[error("this process has no cgroup v2 entry (0::) in /proc/self/cgroup")]
    NotInCgroup2,
    #[error(
        "no cgroup2 mount shows the agent's own cgroup (/{}, as its cgroup namespace names \
         it): in a container with a cgroup namespace of its own, mount cgroup2 in the \
         container too (runtimes do at /sys/fs/cgroup on cgroup v2 hosts), or run it in the \
         host's cgroup namespace",
        .0.display()
    )]
    OwnCgroupNotMounted(PathBuf),
    #[error("cannot create a cgroup for the command at {path}: {source}{hint}", hint = permission_hint(source))]
    CreateCommandCgroup { path: PathBuf, source: io::Error },
}

fn permission_hint(err: &io::Error) -> &'static str {
    match err.kind() {
        io::ErrorKind::PermissionDenied => " (run dns-proxy as root)",
        _ => "",
    }
}

fn read(path: &Path) -> Result<String, CgroupError> {
    fs::read_to_string(path).map_err(|source| CgroupError::Read {
        path: path.to_owned(),
        source,
    })
}

/// A cgroup2 mount: where it is, and the cgroup it shows there (its root, as this process's
/// cgroup namespace names it, without the leading `/`: empty for the namespace's root).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cgroup2Mount {
    pub mount_point: PathBuf,
    root: PathBuf,
    read_only: bool,
}

impl Cgroup2Mount {
    /// The directory of `cgroup` (a path as [`parse_own_cgroup`] gives it) under this mount;
    /// `None` if the mount does not show it: a subtree beside it, or a mount whose root lies
    /// above the namespace's (`/..`, the host's tree bound into a container with a cgroup
    /// namespace of its own), which no path of the namespace can be placed in.
    pub fn dir_of(&self, cgroup: &Path) -> Option<PathBuf> {
        let climbs = |path: &Path| {
            path.components()
                .any(|part| part == std::path::Component::ParentDir)
        };
        if climbs(&self.root) || climbs(cgroup) {
            return None;
        }
        let below = cgroup.strip_prefix(&self.root).ok()?;
        Some(self.mount_point.join(below))
    }

    /// The cgroup (as [`parse_own_cgroup`] names it) whose directory under this mount is
    /// `dir`: the inverse of [`dir_of`](Self::dir_of).
    fn cgroup_at(&self, dir: &Path) -> Option<PathBuf> {
        Some(self.root.join(dir.strip_prefix(&self.mount_point).ok()?))
    }
}

/// The cgroup2 mounts in the text of `/proc/self/mountinfo`, in its order.
fn parse_cgroup2_mounts(mountinfo: &str) -> Vec<Cgroup2Mount> {
    mountinfo
        .lines()
        .filter_map(|line| {
            // "36 25 0:31 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw": fields before " - "
            // are id, parent, dev, root, mount point, options...; after it the filesystem type.
            let (mount, fs) = line.split_once(" - ")?;
            if fs.split_whitespace().next() != Some("cgroup2") {
                return None;
            }
            let mut fields = mount.split_whitespace().skip(3);
            let (root, mount_point) = (fields.next()?, fields.next()?);
            let options = fields.next().unwrap_or_default();
            Some(Cgroup2Mount {
                mount_point: PathBuf::from(unescape_mountinfo(mount_point)),
                root: PathBuf::from(unescape_mountinfo(root).trim_start_matches('/')),
                read_only: options.split(',').any(|option| option == "ro"),
            })
        })
        .collect()
}

/// Where the cgroup2 hierarchy is mounted, from the text of `/proc/self/mountinfo`.
///
/// Prefers a mount of the hierarchy's root over a bind mount of a subtree.
pub fn parse_cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    let mounts = parse_cgroup2_mounts(mountinfo);
    mounts
        .iter()
        .find(|mount| mount.root.as_os_str().is_empty())
        .or(mounts.first())
        .map(|mount| mount.mount_point.clone())
}

/// The cgroup2 mounts that show `own`, this process's cgroup (from [`parse_own_cgroup`]),
/// from the text of `/proc/self/mountinfo`, best first: the widest root, then writable
/// before read-only. In a container with a cgroup namespace of its own, the container's own
/// mount comes before the host's tree mounted beside it for `--cgroup`, which does not show
/// it at all.
pub fn parse_own_cgroup_mounts(mountinfo: &str, own: &Path) -> Vec<Cgroup2Mount> {
    let mut mounts: Vec<Cgroup2Mount> = parse_cgroup2_mounts(mountinfo)
        .into_iter()
        .filter(|mount| mount.dir_of(own).is_some())
        .collect();
    mounts.sort_by_key(|mount| (mount.root.components().count(), mount.read_only));
    mounts
}

/// mountinfo writes space, tab, newline and backslash as octal escapes (`\040`).
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    let is_octal = |b: &u8| (b'0'..=b'7').contains(b);
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && let Some(digits) = bytes.get(i + 1..i + 4)
            && digits.iter().all(is_octal)
        {
            let value = digits
                .iter()
                .fold(0u32, |acc, d| acc * 8 + u32::from(d - b'0'));
            out.push(value as u8);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The process's cgroup v2 path relative to the hierarchy root, from `/proc/self/cgroup`.
pub fn parse_own_cgroup(proc_self_cgroup: &str) -> Option<PathBuf> {
    proc_self_cgroup
        .lines()
        .find_map(|line| line.strip_prefix("0::"))
        .map(|path| PathBuf::from(path.trim_start_matches('/')))
}

/// This process's cgroup, as `/proc/self/cgroup` names it from its cgroup namespace's root.
fn own_cgroup() -> Result<PathBuf, CgroupError> {
    parse_own_cgroup(&read(Path::new("/proc/self/cgroup"))?).ok_or(CgroupError::NotInCgroup2)
}

/// The cgroup2 mount that shows this process's own cgroup: the best of
/// [`parse_own_cgroup_mounts`] whose directory of it is there.
pub fn own_cgroup_mount() -> Result<Cgroup2Mount, CgroupError> {
    let mountinfo = read(Path::new("/proc/self/mountinfo"))?;
    let own = own_cgroup()?;
    // The first whose directory is there: a mount covered by another shows nothing.
    parse_own_cgroup_mounts(&mountinfo, &own)
        .into_iter()
        .find(|mount| {
            mount
                .dir_of(&own)
                .is_some_and(|dir| filesystem_magic(&dir).ok() == Some(CGROUP2_SUPER_MAGIC))
        })
        .ok_or_else(|| {
            if parse_cgroup2_mount(&mountinfo).is_none() {
                CgroupError::NoCgroup2Mount
            } else {
                CgroupError::OwnCgroupNotMounted(own)
            }
        })
}

/// The mount point of the cgroup2 hierarchy on this host.
pub fn cgroup2_root() -> Result<PathBuf, CgroupError> {
    let mountinfo = read(Path::new("/proc/self/mountinfo"))?;
    parse_cgroup2_mount(&mountinfo).ok_or(CgroupError::NoCgroup2Mount)
}

/// For a path that does not exist: where the cgroup2 hierarchy is, when the nearest
/// directory above it that exists is not in it (a hybrid host's `/sys/fs/cgroup/docker`,
/// where cgroup2 is `/sys/fs/cgroup/unified`; helper-173 had only "No such file or
/// directory").
fn outside_cgroup2(path: &Path) -> Option<String> {
    // A dangling symlink's directory says nothing of where it points.
    if fs::symlink_metadata(path).is_ok() {
        return None;
    }
    // `unified/pods` meant below the hierarchy, taken from wherever the agent started
    // (helper-179).
    if path.is_relative() {
        let cwd = std::env::current_dir()
            .map_or_else(|_| "?".to_owned(), |dir| dir.display().to_string());
        let root = cgroup2_root().map_or_else(
            |_| String::new(),
            |root| format!(" (the cgroup2 hierarchy is mounted at {})", root.display()),
        );
        return Some(format!(
            "; a relative path is taken from the current directory, {cwd}: give the cgroup's \
             whole path{root}"
        ));
    }
    let existing = path.ancestors().skip(1).find(|dir| dir.exists())?;
    if filesystem_magic(existing).ok()? == CGROUP2_SUPER_MAGIC {
        return None;
    }
    Some(match cgroup2_root() {
        Ok(root) => format!(
            "; {} is not in the cgroup2 hierarchy, which is mounted at {}",
            existing.display(),
            root.display()
        ),
        Err(_) => "; no cgroup2 filesystem is mounted".to_owned(),
    })
}

/// A cgroup v2 directory and its id (the kernfs inode number, which is what
/// `bpf_get_current_cgroup_id` returns).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cgroup {
    pub path: PathBuf,
    pub id: u64,
}

impl Cgroup {
    /// Checks that `path` is a directory of a cgroup2 filesystem. `flag` names the option it
    /// came from, for the error.
    pub fn open(flag: &'static str, path: &Path) -> Result<Self, CgroupError> {
        let bad = |reason: String| CgroupError::BadCgroup {
            flag,
            path: path.to_owned(),
            reason,
        };
        let metadata = fs::metadata(path).map_err(|err| {
            let hint = match err.kind() {
                io::ErrorKind::NotFound => outside_cgroup2(path).unwrap_or_default(),
                _ => String::new(),
            };
            bad(format!("{err}{hint}"))
        })?;
        if !metadata.is_dir() {
            return Err(bad("not a directory".to_owned()));
        }
        if filesystem_magic(path).map_err(|err| bad(format!("statfs: {err}")))?
            != CGROUP2_SUPER_MAGIC
        {
            let hint = match cgroup2_root() {
                Ok(root) => format!("cgroup2 is mounted at {}", root.display()),
                Err(_) => "no cgroup2 filesystem is mounted".to_owned(),
            };
            return Err(bad(format!("not a cgroup v2 directory ({hint})")));
        }
        // Resolved once: the cgroup is the directory named now, which a symlink re-pointed
        // later, or a relative path read from another directory, would no longer name.
        let path = resolved(path, &metadata).ok_or_else(|| {
            bad(
                "reached through another mount namespace's tree (/proc/PID/root, say), where \
                 this one shows another directory or none, and which the agent cannot follow \
                 once it drops its capabilities: mount the host's cgroup2 hierarchy into the \
                 agent's mount namespace and name it there"
                    .to_owned(),
            )
        })?;
        Ok(Self {
            path,
            id: metadata.ino(),
        })
    }

    /// A cgroup not made yet at `path`, an absolute path that does not exist, below an
    /// existing cgroup: id 0, which no cgroup has, its path resolved as [`open`](Self::open)
    /// resolves one (the existing part's symlinks and `..`; the rest must be plain names), and
    /// the depth it will have. `None` if no cgroup is above it, or the rest is not plain. For
    /// an `--exclude-cgroup` of a service that is stopped when the agent starts (systemd
    /// removes a stopped unit's cgroup). An error if its depth cannot be known (the hierarchy's
    /// root is not visible above it, in a cgroup namespace), said of `path`.
    pub fn not_made_yet(
        flag: &'static str,
        path: &Path,
    ) -> Result<Option<(Self, u32)>, CgroupError> {
        let Some(existing) = path.ancestors().skip(1).find(|dir| dir.exists()) else {
            return Ok(None);
        };
        let Ok(ancestor) = Self::open(flag, existing) else {
            return Ok(None);
        };
        let Ok(rest) = path.strip_prefix(existing) else {
            return Ok(None);
        };
        let plain = rest
            .components()
            .all(|part| matches!(part, std::path::Component::Normal(_)));
        let Ok(below) = u32::try_from(rest.components().count()) else {
            return Ok(None);
        };
        if !plain || below == 0 {
            return Ok(None);
        }
        let level = match ancestor.level(flag) {
            Ok(level) => level + below,
            Err(CgroupError::BadCgroup { reason, .. }) => {
                return Err(CgroupError::BadCgroup {
                    flag,
                    path: path.to_owned(),
                    reason,
                });
            }
            Err(err) => return Err(err),
        };
        Ok(Some((
            Self {
                path: ancestor.path.join(rest),
                id: 0,
            },
            level,
        )))
    }

    /// The directory of the hierarchy's root above this cgroup (the top of the cgroup2
    /// filesystem it is on); `None` if it cannot be read.
    pub fn hierarchy_root(&self) -> Option<PathBuf> {
        // Resolved when it was opened.
        let mut dir = self.path.clone();
        while dir.join("cgroup.type").exists() {
            let parent = dir.parent()?;
            if filesystem_magic(parent).ok() != Some(CGROUP2_SUPER_MAGIC) {
                break;
            }
            dir = parent.to_owned();
        }
        Some(dir)
    }

    /// Whether this cgroup is `other` or one of its ancestors: compared by id, so two paths
    /// to one cgroup (another mount of the hierarchy, `..`, a symlink) are one.
    pub fn holds(&self, other: &Cgroup) -> bool {
        let mut dir = other.path.clone();
        loop {
            if fs::metadata(&dir).is_ok_and(|metadata| metadata.ino() == self.id) {
                return true;
            }
            match dir.parent() {
                Some(parent) if filesystem_magic(parent).ok() == Some(CGROUP2_SUPER_MAGIC) => {
                    dir = parent.to_owned();
                }
                _ => return false,
            }
        }
    }

    /// How deep the cgroup sits below the hierarchy's root (level 0), as the kernel's
    /// `bpf_get_current_ancestor_cgroup_id` counts. Found by walking up to the root, the only
    /// cgroup without a `cgroup.type` file; fails when the root is not visible from here (a
    /// cgroup2 mount of a cgroup namespace or of a subtree).
    pub fn level(&self, flag: &'static str) -> Result<u32, CgroupError> {
        let bad = |reason: String| CgroupError::BadCgroup {
            flag,
            path: self.path.clone(),
            reason,
        };
        let mut dir = self.path.clone();
        let mut level = 0;
        while dir.join("cgroup.type").exists() {
            let parent = dir.parent().map(Path::to_owned);
            match parent {
                Some(parent) if filesystem_magic(&parent).ok() == Some(CGROUP2_SUPER_MAGIC) => {
                    dir = parent;
                    level += 1;
                }
                _ => {
                    return Err(bad(format!(
                        "the cgroup2 hierarchy's root is not visible above it ({} is the top of \
                         its mount): use a path under a mount of the host's cgroup2 root",
                        dir.display()
                    )));
                }
            }
        }
        Ok(level)
    }
}

/// `path` (of `metadata`) with its symlinks and `..` resolved, if that names the same
/// directory. Through `/proc/PID/root` (another mount namespace's tree, as a pod with
/// `hostPID` may name the host's cgroups) it names a directory of this namespace instead, or
/// none: `None`.
fn resolved(path: &Path, metadata: &fs::Metadata) -> Option<PathBuf> {
    let canonical = fs::canonicalize(path).ok()?;
    let found = fs::metadata(&canonical).ok()?;
    (found.dev() == metadata.dev() && found.ino() == metadata.ino()).then_some(canonical)
}

fn filesystem_magic(path: &Path) -> io::Result<i64> {
    use std::os::unix::ffi::OsStrExt as _;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))?;
    let mut stat = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: c_path is NUL-terminated and lives for the call; stat is a live, writable
    // `struct statfs`, the size the kernel fills.
    let rc = unsafe { libc::statfs(c_path.as_ptr(), stat.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: statfs returned 0, so the kernel filled the whole struct.
    let stat = unsafe { stat.assume_init() };
    #[allow(
        clippy::unnecessary_cast,
        reason = "f_type is narrower on some architectures"
    )]
    Ok(stat.f_type as i64)
}

/// The agent's own leaf cgroup. While it lives, the agent's sockets carry its id, which the
/// kernel side skips. Dropping it moves the agent back to where it was and removes the leaf.
#[derive(Debug)]
pub struct AgentCgroup {
    cgroup: Cgroup,
    previous: PathBuf,
}

impl AgentCgroup {
    /// Creates (or reuses) `<current cgroup>/dns-proxy-agent`, under `mount` (which shows the
    /// current cgroup: [`own_cgroup_mount`]), and moves the whole process there. Call it
    /// before any socket is created.
    pub fn enter(mount: &Cgroup2Mount) -> Result<Self, CgroupError> {
        let own = own_cgroup()?;
        let previous = mount
            .dir_of(&own)
            .ok_or_else(|| CgroupError::OwnCgroupNotMounted(own.clone()))?;
        // Already inside one (a re-exec): stay.
        let path = if own
            .file_name()
            .is_some_and(|name| name == AGENT_CGROUP_NAME)
        {
            previous.clone()
        } else {
            previous.join(AGENT_CGROUP_NAME)
        };
        // Another agent leaving removes the cgroup when it is empty: if that happens between
        // our mkdir and our move, make it again.
        const ATTEMPTS: u32 = 5;
        let pid = std::process::id().to_string();
        for attempt in 1..=ATTEMPTS {
            match fs::create_dir(&path) {
                Ok(()) => {}
                Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {}
                // A container's own cgroup, mounted read-only: it holds only the container's
                // processes, so the agent can stay where it is. Never the root, which holds all.
                Err(err)
                    if err.kind() == io::ErrorKind::ReadOnlyFilesystem
                        && previous.join("cgroup.type").exists() =>
                {
                    let cgroup = Cgroup::open("the agent's cgroup", &previous)?;
                    log::info!(
                        "{} is read-only (a container's cgroup): the agent stays in its \
                         cgroup, which must hold no workload",
                        previous.display()
                    );
                    return Ok(Self { cgroup, previous });
                }
                Err(source) => return Err(CgroupError::CreateAgentCgroup { path, source }),
            }
            match fs::write(path.join("cgroup.procs"), &pid) {
                Ok(()) => break,
                Err(err)
                    if attempt < ATTEMPTS
                        && matches!(err.raw_os_error(), Some(libc::ENODEV | libc::ENOENT)) => {}
                Err(source) => {
                    return Err(CgroupError::EnterAgentCgroup {
                        path: path.clone(),
                        source,
                    });
                }
            }
        }
        let cgroup = Cgroup::open("the agent's cgroup", &path).map_err(|err| {
            CgroupError::EnterAgentCgroup {
                path: path.clone(),
                source: io::Error::other(err.to_string()),
            }
        })?;
        Ok(Self { cgroup, previous })
    }

    pub fn cgroup(&self) -> &Cgroup {
        &self.cgroup
    }

    /// The cgroup the agent was in before it entered its own.
    pub fn parent(&self) -> &Path {
        &self.previous
    }
}

impl Drop for AgentCgroup {
    fn drop(&mut self) {
        if self.previous == self.cgroup.path {
            return;
        }
        let pid = std::process::id().to_string();
        if let Err(err) = fs::write(self.previous.join("cgroup.procs"), pid) {
            log::debug!("leaving {}: {err}", self.cgroup.path.display());
            return;
        }
        match fs::remove_dir(&self.cgroup.path) {
            Ok(()) => {}
            // Where only CAP_DAC_OVERRIDE may remove it (the hierarchy's root, mode 0555 under
            // systemd), which the agent gave up before serving.
            Err(err) if err.kind() == io::ErrorKind::PermissionDenied => log::info!(
                "left the empty cgroup {} behind: removing it needs a capability the agent \
                 gave up before serving ({err}); the next agent started here uses it again, \
                 or remove it with rmdir",
                self.cgroup.path.display()
            ),
            // Fails while another agent still lives there; that one removes it.
            Err(err) => log::debug!("removing {}: {err}", self.cgroup.path.display()),
        }
    }
}

/// Where [`return_to`] found the agent.
#[derive(Debug, PartialEq, Eq)]
pub enum OwnCgroup {
    /// In its own cgroup.
    In,
    /// Elsewhere (this path): moved back.
    MovedBack(PathBuf),
    /// Elsewhere (this path), and its own cgroup is gone or was made anew (another cgroup,
    /// which no agent registered): left where it is.
    Lost(PathBuf),
}

/// Moves this process back into `agent`, its own cgroup, under `mount` (the mount it entered
/// it from), if something moved it out (a service manager, or `echo PID > cgroup.procs` into
/// the redirected cgroup): a socket it made elsewhere would carry that cgroup's id and could
/// be redirected to the agent itself.
pub fn return_to(agent: &Cgroup, mount: &Cgroup2Mount) -> Result<OwnCgroup, CgroupError> {
    let own = own_cgroup()?;
    // Moved where the mount does not show (outside its cgroup namespace): named as is.
    let now = mount
        .dir_of(&own)
        .unwrap_or_else(|| Path::new("/").join(&own));
    let at = fs::metadata(&now);
    if at.as_ref().is_ok_and(|meta| meta.ino() == agent.id) {
        return Ok(OwnCgroup::In);
    }
    // Where it was put, by name: in its own cgroup unless the mount shows another directory
    // there (made anew while it was out, and it was put in that); a mount covered since by
    // another filesystem shows nothing.
    if mount.cgroup_at(&agent.path).as_deref() == Some(own.as_path()) && at.is_err() {
        return Ok(OwnCgroup::In);
    }
    // A directory made anew at its path is another cgroup, which the programs redirect.
    if !fs::metadata(&agent.path).is_ok_and(|meta| meta.ino() == agent.id) {
        return Ok(OwnCgroup::Lost(now));
    }
    fs::write(
        agent.path.join("cgroup.procs"),
        std::process::id().to_string(),
    )
    .map_err(|source| CgroupError::EnterAgentCgroup {
        path: agent.path.clone(),
        source,
    })?;
    Ok(OwnCgroup::MovedBack(now))
}

/// The fresh cgroup `dns-proxy exec` runs its command in, beside the agent's own. Dropping it
/// removes it, unless the command left processes behind there.
#[derive(Debug)]
pub struct CommandCgroup {
    cgroup: Cgroup,
}

impl CommandCgroup {
    pub fn create(parent: &Path) -> Result<Self, CgroupError> {
        let path = parent.join(format!("dns-proxy-exec-{}", std::process::id()));
        fs::create_dir(&path).map_err(|source| CgroupError::CreateCommandCgroup {
            path: path.clone(),
            source,
        })?;
        let cgroup = Cgroup::open("the command's cgroup", &path);
        match cgroup {
            Ok(cgroup) => Ok(Self { cgroup }),
            Err(err) => {
                let _ = fs::remove_dir(&path);
                Err(err)
            }
        }
    }

    pub fn cgroup(&self) -> &Cgroup {
        &self.cgroup
    }
}

impl Drop for CommandCgroup {
    fn drop(&mut self) {
        let path = &self.cgroup.path;
        if let Err(err) = fs::remove_dir(path) {
            let left = fs::read_to_string(path.join("cgroup.procs"))
                .map(|procs| procs.lines().count())
                .unwrap_or(0);
            log::warn!(
                "cannot remove {}: {err} ({left} processes the command started are still \
                 there: no longer redirected, and a socket of theirs connected through this \
                 agent is refused until it connects again)",
                path.display()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
25 1 254:0 / / rw,relatime - ext4 /dev/vda rw
30 25 0:26 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
31 30 0:27 / /sys/fs/cgroup/memory rw,nosuid - cgroup cgroup rw,memory
41 30 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    #[test]
    fn finds_cgroup2_in_hybrid_layout() {
        assert_eq!(
            parse_cgroup2_mount(HYBRID),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn prefers_the_hierarchy_root_over_a_bind_mounted_subtree() {
        let text = "\
50 25 0:38 /kubepods /host/cgroup rw - cgroup2 cgroup2 rw
51 25 0:38 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw
";
        assert_eq!(
            parse_cgroup2_mount(text),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        assert_eq!(
            parse_cgroup2_mount(&text[..text.find('\n').unwrap()]),
            Some(PathBuf::from("/host/cgroup"))
        );
    }

    /// The agent finds its own cgroup in the mount that shows it: in a Kubernetes pod on a
    /// cgroup v2 node (a cgroup namespace of its own), the container's `/sys/fs/cgroup`, not
    /// the host's tree at `/host/cgroup`, whose root lies above the namespace's.
    #[test]
    fn finds_its_own_cgroup_in_the_mount_that_shows_it() {
        let pod = "\
50 25 0:38 /../../.. /host/cgroup ro,relatime - cgroup2 cgroup2 rw
51 25 0:38 / /sys/fs/cgroup ro,nosuid - cgroup2 cgroup2 rw
";
        let own = |mountinfo: &str, cgroup: &str| {
            parse_own_cgroup_mounts(mountinfo, Path::new(cgroup))
                .first()
                .and_then(|mount| mount.dir_of(Path::new(cgroup)))
        };
        assert_eq!(own(pod, ""), Some(PathBuf::from("/sys/fs/cgroup")));
        assert_eq!(
            own(pod, "dns-proxy-agent"),
            Some(PathBuf::from("/sys/fs/cgroup/dns-proxy-agent"))
        );
        // Moved out of its namespace: no mount shows where it is.
        assert_eq!(own(pod, "../other"), None);
        // The host's tree alone, in a namespace of its own: nothing to place it in.
        assert_eq!(own(&pod[..pod.find('\n').unwrap()], ""), None);
        // A subtree bound alone shows the cgroups below it, and no others.
        let subtree = "50 25 0:38 /kubepods /host/cgroup rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            own(subtree, "kubepods/pod1/ctr"),
            Some(PathBuf::from("/host/cgroup/pod1/ctr"))
        );
        assert_eq!(own(subtree, "kubepods-other"), None);
        assert_eq!(own(subtree, "system.slice/x.service"), None);
        // Of two mounts of one root, the writable one, wherever it is listed.
        let two = "\
50 25 0:38 / /run/cgroup-ro ro,relatime - cgroup2 cgroup2 rw
51 25 0:38 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw
";
        assert_eq!(own(two, "app"), Some(PathBuf::from("/sys/fs/cgroup/app")));
        // With the whole hierarchy mounted too, the whole hierarchy's mount.
        assert_eq!(
            own(&format!("{subtree}{HYBRID}"), "kubepods/pod1"),
            Some(PathBuf::from("/sys/fs/cgroup/unified/kubepods/pod1"))
        );
    }

    #[test]
    fn no_cgroup2_mount() {
        assert_eq!(
            parse_cgroup2_mount("25 1 254:0 / / rw - ext4 /dev/vda rw\n"),
            None
        );
        assert_eq!(parse_cgroup2_mount(""), None);
    }

    #[test]
    fn unescapes_octal_in_mount_points() {
        let text = "41 30 0:38 / /mnt/my\\040cgroup rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            parse_cgroup2_mount(text),
            Some(PathBuf::from("/mnt/my cgroup"))
        );
        assert_eq!(unescape_mountinfo("trailing\\04"), "trailing\\04");
    }

    #[test]
    fn own_cgroup_in_hybrid_and_unified_layouts() {
        let hybrid = "9:name=systemd:/\n4:memory:/x\n0::/\n";
        assert_eq!(parse_own_cgroup(hybrid), Some(PathBuf::from("")));
        let unified = "0::/system.slice/dns-proxy.service\n";
        assert_eq!(
            parse_own_cgroup(unified),
            Some(PathBuf::from("system.slice/dns-proxy.service"))
        );
        assert_eq!(parse_own_cgroup("4:memory:/x\n"), None);
    }

    /// A `--cgroup` given through a symlink is the directory it names at start: re-pointed
    /// later, the link no longer names the cgroup the programs are on (an adversary's case:
    /// the agent said its cgroup was gone while it still served it).
    #[test]
    fn open_keeps_the_directory_a_symlink_names_now() {
        let root = cgroup2_root().expect("a cgroup2 mount");
        let link = std::env::temp_dir().join(format!("dns-proxy-cgroup-{}", std::process::id()));
        std::os::unix::fs::symlink(&root, &link).expect("a symlink");
        let opened = Cgroup::open("--cgroup", &link);
        let _ = fs::remove_file(&link);
        assert_eq!(
            opened.expect("opened").path,
            fs::canonicalize(&root).unwrap()
        );
    }

    #[test]
    fn open_rejects_what_is_not_a_cgroup2_directory() {
        let err = Cgroup::open("--cgroup", Path::new("/nonexistent/cgroup")).unwrap_err();
        assert!(
            err.to_string().contains("--cgroup /nonexistent/cgroup"),
            "{err}"
        );
        let err = Cgroup::open("--cgroup", Path::new("/proc")).unwrap_err();
        assert!(
            err.to_string().contains("not a cgroup v2 directory"),
            "{err}"
        );
        let err = Cgroup::open("--exclude-cgroup", Path::new("/proc/self/mountinfo")).unwrap_err();
        assert!(
            err.to_string()
                .contains("--exclude-cgroup /proc/self/mountinfo: not a directory"),
            "{err}"
        );
    }
}
