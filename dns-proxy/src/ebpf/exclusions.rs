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
//! ([`TreesMade`]) and every second: it lets the old id go, and where that program could not
//! be attached it is what excludes the new one (racing the service's first lookups).
use std::{
    collections::HashMap as StdHashMap,
    fs, io,
    os::unix::{ffi::OsStrExt as _, fs::MetadataExt as _},
    path::{Component, Path, PathBuf},
    time::{Duration, Instant},
};

use aya::maps::{HashMap, MapData};
use dns_proxy_common::{
    CGROUP_PATH_BYTES, CgroupPath, EXCLUDED_SUBTREE, MAX_CGROUP_PATH, cgroup_path_hash,
};
use inotify::{Inotify, WatchMask, Watches};
use tokio::io::unix::AsyncFd;

use super::{EbpfError, ExcludedTree, names};

/// How long an id in `EXCLUDED_CGROUPS` that is no tree's is kept: the kernel adds a made
/// cgroup's id just before the directory can be seen, so a look in between finds it no
/// tree's for a moment. Past that, it is a cgroup made and removed before the agent looked.
const STRAY_FOR: Duration = Duration::from_secs(1);

/// The excluded trees and the map the programs read them from.
pub struct Exclusions {
    map: HashMap<MapData, u64, u8>,
    /// `EXCLUDED_PATHS`, filled once: held so that its descriptor stays open for the program
    /// loaded after.
    _paths: HashMap<MapData, u64, CgroupPath>,
    trees: Vec<Tree>,
    /// Ids in `map` that are no tree's, and since when they were seen so.
    strays: StdHashMap<u64, Instant>,
}

/// One excluded tree: where it is, and the id it is excluded under.
struct Tree {
    path: PathBuf,
    id: u64,
    /// Its path was found missing (logged once).
    missing: bool,
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
                    paths
                        .insert(cgroup_path_hash(&path.bytes), path, 0)
                        .map_err(|source| EbpfError::Map {
                            map: names::EXCLUDED_PATHS,
                            source: Box::new(source),
                        })?;
                }
                None => log::warn!(
                    "excluded cgroup tree {}: its path below the hierarchy's root is longer than \
                     the kernel can tell a new cgroup's apart ({MAX_CGROUP_PATH} bytes); a \
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
            });
        }
        Ok(Self {
            map,
            _paths: paths,
            trees,
            strays: StdHashMap::new(),
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

    /// Looks at each excluded path once: a cgroup made anew there is excluded under its new id,
    /// and the old id is let go. A path that is gone keeps its old id (which no cgroup will
    /// have again) until a cgroup is made there. Then lets go the ids that have been no tree's
    /// for [`STRAY_FOR`]. Blocking: a `stat` per path.
    pub fn refresh(&mut self) {
        let Self {
            map, trees, strays, ..
        } = self;
        for index in 0..trees.len() {
            let id = match fs::metadata(&trees[index].path) {
                Ok(metadata) if metadata.is_dir() => metadata.ino(),
                _ => {
                    let tree = &mut trees[index];
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
            trees[index].missing = false;
            let old = trees[index].id;
            if id == old {
                continue;
            }
            // The old id first: its cgroup is gone. The new one is there already when the
            // kernel excluded it as it was made.
            let _ = map.remove(&old);
            let mut inserted = map.insert(id, EXCLUDED_SUBTREE, 0);
            if inserted.is_err() {
                // Full of ids of cgroups made and removed since the last look: all go now.
                let mut kept: Vec<u64> = trees.iter().map(|tree| tree.id).collect();
                kept.push(id);
                let_strays_go(map, strays, &kept, None);
                inserted = map.insert(id, EXCLUDED_SUBTREE, 0);
            }
            let path = trees[index].path.display();
            match inserted {
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
            trees[index].id = id;
        }
        let kept: Vec<u64> = trees.iter().map(|tree| tree.id).collect();
        let_strays_go(map, strays, &kept, Some(Instant::now()));
    }
}

/// Lets go the ids in `map` that are not `kept`: at once without `now`, else those seen so
/// (`strays`) for [`STRAY_FOR`] by `now`.
fn let_strays_go(
    map: &mut HashMap<MapData, u64, u8>,
    strays: &mut StdHashMap<u64, Instant>,
    kept: &[u64],
    now: Option<Instant>,
) {
    let in_map: Vec<u64> = map.keys().filter_map(Result::ok).collect();
    strays.retain(|id, _| in_map.contains(id) && !kept.contains(id));
    for id in in_map.into_iter().filter(|id| !kept.contains(id)) {
        let go = match now {
            Some(now) => now.duration_since(*strays.entry(id).or_insert(now)) >= STRAY_FOR,
            None => true,
        };
        if go {
            let _ = map.remove(&id);
            strays.remove(&id);
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
