//! The operator's excluded cgroup trees (`--exclude-cgroup`) in `EXCLUDED_CGROUPS`, kept
//! excluded when one is made anew. The kernel side knows a tree by its cgroup id, and systemd
//! removes a service's cgroup when the service stops and makes a new one, with a new id, when
//! it starts again (systemd-resolved restarted by a package upgrade, say). Without a refresh,
//! the restarted service would be redirected; with `--upstream` pointing at it, its queries
//! would come back to it.
//!
//! The kernel excludes a cgroup made at an excluded path as it makes it (`raw_tp/cgroup_mkdir`,
//! which finds the path in `EXCLUDED_PATHS`), before anything can run in it. The agent looks
//! too, as soon as the kernel says a directory was made or removed where a tree goes
//! ([`TreesMade`]) and every second: it lets its old id go, and where that program could not
//! be attached it is what excludes the new one (racing the service's first lookups).
use std::{
    fs, io,
    os::unix::{ffi::OsStrExt as _, fs::MetadataExt as _},
    path::{Component, Path, PathBuf},
};

use aya::maps::{HashMap, MapData};
use dns_proxy_common::{
    CGROUP_PATH_BYTES, CgroupPath, EXCLUDED_SUBTREE, MAX_CGROUP_PATH, cgroup_path_hash,
};
use inotify::{Inotify, WatchMask, Watches};
use tokio::io::unix::AsyncFd;

use super::{EbpfError, ExcludedTree, names};

/// The excluded trees and the map the programs read them from.
///
/// What `EXCLUDED_CGROUPS` holds stays bounded without the agent: each tree's id as the agent
/// last saw it, and the id the kernel last excluded at each path (`CgroupPath::made`, which the
/// program takes out itself when it excludes the next). The agent never takes out an id it did
/// not put in: the kernel's for a cgroup it cannot see (below a directory it may not
/// search) would go with it. Before, it let such ids go after a second, and a service whose
/// parent directory its owner had made unreadable to the agent was redirected (helper-152).
pub struct Exclusions {
    map: HashMap<MapData, u64, u8>,
    /// `EXCLUDED_PATHS`, filled once: held so that its descriptor stays open for the program
    /// loaded after.
    _paths: HashMap<MapData, u64, CgroupPath>,
    trees: Vec<Tree>,
    /// The kernel excludes a cgroup made at a tree's path as it is made
    /// ([`Exclusions::kernel_excludes_made`]).
    kernel_excludes: bool,
}

/// One excluded tree: where it is, and the id it is excluded under.
struct Tree {
    path: PathBuf,
    id: u64,
    /// Its path was found missing (logged once).
    missing: bool,
    /// Its path could not be looked at (logged once).
    unreadable: bool,
}

impl Exclusions {
    /// Excludes each of `excluded` in `map`, and puts its path, as the kernel names it, in
    /// `paths`.
    pub(super) fn new(
        mut map: HashMap<MapData, u64, u8>,
        mut paths: HashMap<MapData, u64, CgroupPath>,
        excluded: &[ExcludedTree<'_>],
    ) -> Result<Self, EbpfError> {
        let mut trees = Vec::with_capacity(excluded.len());
        for tree in excluded {
            let cgroup = tree.cgroup;
            match kernel_path(&cgroup.path, tree.level) {
                Some(path) => {
                    let key = cgroup_path_hash(&path.bytes);
                    // Two paths of one hash (64 bits: not by chance): the second would take
                    // the first's place, and the first be left to the agent's looks.
                    if let Ok(other) = paths.get(&key, 0)
                        && other.bytes != path.bytes
                    {
                        log::warn!(
                            "excluded cgroup tree {}: its path hashes as another's; a cgroup \
                             made at the other is excluded once the agent sees it",
                            cgroup.path.display()
                        );
                    }
                    paths
                        .insert(key, path, 0)
                        .map_err(|source| EbpfError::Map {
                            map: names::EXCLUDED_PATHS,
                            source: Box::new(source),
                        })?;
                }
                // The hierarchy's root is never made anew.
                None if tree.level == 0 => {}
                None => log::warn!(
                    "excluded cgroup tree {}: its path below the hierarchy's root is longer than \
                     the kernel side can tell a new cgroup's apart ({MAX_CGROUP_PATH} bytes); a \
                     cgroup made there anew is excluded once the agent sees it, which races the \
                     first lookups made in it",
                    cgroup.path.display(),
                ),
            }
            if cgroup.id == 0 {
                log::warn!(
                    "excluded cgroup tree {} does not exist yet: it is excluded as soon as it \
                     is made; until then nothing is made there to redirect",
                    cgroup.path.display()
                );
                trees.push(Tree {
                    path: cgroup.path.clone(),
                    id: 0,
                    missing: true,
                    unreadable: false,
                });
                continue;
            }
            map.insert(cgroup.id, EXCLUDED_SUBTREE, 0)
                .map_err(|source| EbpfError::Map {
                    map: names::EXCLUDED_CGROUPS,
                    source: Box::new(source),
                })?;
            log::info!(
                "never redirecting cgroup tree {} (id {})",
                cgroup.path.display(),
                cgroup.id
            );
            trees.push(Tree {
                path: cgroup.path.clone(),
                id: cgroup.id,
                missing: false,
                unreadable: false,
            });
        }
        Ok(Self {
            map,
            _paths: paths,
            trees,
            kernel_excludes: false,
        })
    }

    /// Whether there is anything to keep excluded.
    pub fn is_empty(&self) -> bool {
        self.trees.is_empty()
    }

    /// The nearest existing directory above each tree: where the kernel first shows a cgroup
    /// made at the tree's path, or on the way to it. Blocking: a `stat` per level.
    pub fn parents(&self) -> Vec<PathBuf> {
        let mut parents: Vec<PathBuf> = self
            .trees
            .iter()
            .filter_map(|tree| tree.path.ancestors().skip(1).find(|dir| dir.is_dir()))
            .map(Path::to_owned)
            .collect();
        parents.sort();
        parents.dedup();
        parents
    }

    /// Says that the kernel excludes a cgroup made at a tree's path as it is made
    /// (`raw_tp/cgroup_mkdir` is attached).
    pub(super) fn set_kernel_excludes_made(&mut self) {
        self.kernel_excludes = true;
    }

    /// Whether the kernel excludes a cgroup made at a tree's path as it is made; if not, the
    /// agent's looks alone do.
    pub fn kernel_excludes_made(&self) -> bool {
        self.kernel_excludes
    }

    /// Looks at each excluded path once: a cgroup made anew there is excluded under its new id,
    /// and the old id is let go. A path that is gone keeps its old id (which no cgroup will
    /// have again) until a cgroup is made there; one that cannot be looked at keeps what it
    /// had. Blocking: a `stat` per path.
    pub fn refresh(&mut self) {
        for tree in &mut self.trees {
            let id = match fs::metadata(&tree.path) {
                Ok(metadata) if metadata.is_dir() => metadata.ino(),
                Err(err) if err.kind() != io::ErrorKind::NotFound => {
                    if !tree.unreadable {
                        tree.unreadable = true;
                        let why = if err.kind() == io::ErrorKind::PermissionDenied {
                            "; the agent runs without capabilities once it serves, and a \
                             directory above it is not open to it"
                        } else {
                            ""
                        };
                        let meanwhile = if self.kernel_excludes {
                            "the kernel still excludes a cgroup made there as it is made"
                        } else {
                            "a cgroup made there anew is not excluded until the agent can look"
                        };
                        log::warn!(
                            "cannot look at excluded cgroup tree {} ({err}{why}): {meanwhile}",
                            tree.path.display()
                        );
                    }
                    continue;
                }
                _ => {
                    tree.unreadable = false;
                    if !tree.missing {
                        tree.missing = true;
                        // Not a warning: systemd removes a stopped service's cgroup, so each
                        // stop of an excluded service would be one.
                        log::info!(
                            "excluded cgroup tree {} is gone; a cgroup made there again is \
                             excluded as soon as it is made",
                            tree.path.display()
                        );
                    }
                    continue;
                }
            };
            tree.unreadable = false;
            tree.missing = false;
            let old = tree.id;
            if id == old {
                continue;
            }
            // The old id first: its cgroup is gone. The new one is there already when the
            // kernel excluded it as it was made.
            let _ = self.map.remove(&old);
            let path = tree.path.display();
            match self.map.insert(id, EXCLUDED_SUBTREE, 0) {
                Ok(()) if old == 0 => {
                    log::info!("cgroup tree {path} was made (id {id}): never redirected");
                }
                Ok(()) => log::info!(
                    "cgroup tree {path} was made anew (id {old} -> {id}): still never redirected"
                ),
                // Not tried again (said once): the tree is redirected until a restart.
                Err(err) => log::error!(
                    "cgroup tree {path} was made anew (id {id}) and cannot be excluded: {err}"
                ),
            }
            tree.id = id;
        }
    }
}

/// `path`, a cgroup `level` levels below the hierarchy's root, as the kernel names it: its
/// last `level` components below `/`. `None` for the root, or if it is too long for the
/// kernel's tracepoint.
fn kernel_path(path: &Path, level: u32) -> Option<CgroupPath> {
    let components: Vec<&[u8]> = path
        .components()
        .filter_map(|component| match component {
            Component::Normal(name) => Some(name.as_bytes()),
            _ => None,
        })
        .collect();
    let below_root = components.get(components.len().checked_sub(level as usize)?..)?;
    if below_root.is_empty() {
        return None;
    }
    let mut kernel = CgroupPath {
        len: 0,
        _padding: 0,
        made: 0,
        bytes: [0; CGROUP_PATH_BYTES],
    };
    let mut len = 0;
    for name in below_root {
        if len + 1 + name.len() > MAX_CGROUP_PATH {
            return None;
        }
        kernel.bytes[len] = b'/';
        kernel.bytes[len + 1..len + 1 + name.len()].copy_from_slice(name);
        len += 1 + name.len();
    }
    kernel.len = len as u32;
    Some(kernel)
}

/// At most this many rounds of [`TreesMade::watch`]: as many as a path made one level at a
/// time can need (a cgroup is at most 64 levels deep, as the programs' levels go).
const MAX_WATCH_ROUNDS: usize = 64;

/// The kernel's word (inotify) that a directory was made, moved in or removed in a directory
/// above an excluded tree ([`Exclusions::parents`]): a service's cgroup made there is
/// excluded at once, not at the next look a second later, and so usually before the service's
/// first lookup (the two race). Before, a service started after the agent had its first
/// lookups redirected (helper-143, under a real systemd).
pub struct TreesMade {
    inotify: AsyncFd<Inotify>,
    /// Its events, read to empty the queue; what they say is not needed (a refresh looks).
    buffer: Vec<u8>,
}

impl TreesMade {
    pub fn new() -> io::Result<Self> {
        // SAFETY: the AsyncFd owns the Inotify, whose descriptor stays open and the same for
        // as long as it lives (the handles of `watches` only add watches to it).
        let inotify = unsafe {
            AsyncFd::register_with_interest(Inotify::init()?, tokio::io::Interest::READABLE)
        }
        .map_err(|err| io::Error::other(err.to_string()))?;
        Ok(Self {
            inotify,
            buffer: vec![0; 4096],
        })
    }

    /// A handle to add watches with, off the runtime.
    pub fn watches(&self) -> Watches {
        self.inotify.get_ref().watches()
    }

    /// Watches the nearest existing directory above each of `exclusions`' trees for its next
    /// change, to be called again before each look (a directory watched already keeps its one
    /// watch; the kernel drops the watch of one removed). One change each: a workload that
    /// makes and removes directories there without pause wakes the agent once per look, not
    /// once per directory (12,000 a second took 17 % of a CPU with watches that stayed).
    ///
    /// Until the nearest existing directories stay the same: one made below a directory
    /// before its watch was set would show nothing, and the levels made in it later would go
    /// unseen (a path made with `mkdir -p` under load; helper-144). Blocking: a `stat` per
    /// level and a path lookup per watch. Returns what a directory that cannot be watched
    /// said (the user's inotify watches used up), but for one gone since: it is left to the
    /// look each second.
    pub fn watch(watches: &mut Watches, exclusions: &Exclusions) -> Option<(PathBuf, io::Error)> {
        let mask = WatchMask::CREATE
            | WatchMask::DELETE
            | WatchMask::MOVED_TO
            | WatchMask::ONLYDIR
            | WatchMask::ONESHOT;
        let mut failed = None;
        let mut dirs = exclusions.parents();
        // Each round follows what changed meanwhile: a path made a level further down, most
        // often (a workload making and removing directories there could go on, so bounded).
        for _ in 0..=MAX_WATCH_ROUNDS {
            for dir in &dirs {
                match watches.add(dir, mask) {
                    Ok(_) => {}
                    Err(err) if err.kind() == io::ErrorKind::NotFound => {}
                    Err(err) => failed = Some((dir.clone(), err)),
                }
            }
            let now = exclusions.parents();
            if now == dirs {
                break;
            }
            dirs = now;
        }
        failed
    }

    /// Until something was made or removed in a watched directory; takes every such event
    /// queued.
    pub async fn changed(&mut self) -> io::Result<()> {
        loop {
            let mut ready = self.inotify.readable_mut().await?;
            let buffer = &mut self.buffer;
            let mut events = 0;
            // Reads until the queue is empty: `try_io` then clears the readiness and says
            // "would block", the one way the loop ends but an error of another kind.
            let drained = ready.try_io(|inotify| -> io::Result<()> {
                loop {
                    events += inotify.get_mut().read_events(buffer)?.count();
                }
            });
            if let Ok(Err(err)) = drained {
                return Err(err);
            }
            if events > 0 {
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kernel_path_of(path: &str, level: u32) -> Option<String> {
        kernel_path(Path::new(path), level)
            .map(|path| String::from_utf8(path.bytes[..path.len as usize].to_vec()).unwrap())
    }

    #[test]
    fn a_trees_kernel_path_is_its_levels_below_the_root() {
        assert_eq!(
            kernel_path_of("/sys/fs/cgroup/system.slice/unbound.service", 2).as_deref(),
            Some("/system.slice/unbound.service")
        );
        assert_eq!(
            kernel_path_of("/sys/fs/cgroup/unified/kubepods", 1).as_deref(),
            Some("/kubepods")
        );
        // The root itself, and a level deeper than the path.
        assert_eq!(kernel_path_of("/sys/fs/cgroup", 0), None);
        assert_eq!(kernel_path_of("/a", 2), None);
    }

    /// The kernel cuts a longer path to 1,023 bytes, so one of 1,023 could not be told from a
    /// longer one that begins with it (helper-151: a sibling with a longer name was excluded).
    #[test]
    fn a_path_the_kernel_could_not_tell_from_a_longer_one_has_no_kernel_path() {
        let longest = format!("/sys/fs/cgroup/{}", "x".repeat(MAX_CGROUP_PATH - 1));
        assert_eq!(
            kernel_path_of(&longest, 1).map(|path| path.len()),
            Some(MAX_CGROUP_PATH)
        );
        let longer = format!("/sys/fs/cgroup/{}", "x".repeat(MAX_CGROUP_PATH));
        assert_eq!(kernel_path_of(&longer, 1), None);
    }
}
