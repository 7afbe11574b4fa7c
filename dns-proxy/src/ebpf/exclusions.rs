//! The operator's excluded cgroup trees (`--exclude-cgroup`) in `EXCLUDED_CGROUPS`, kept
//! excluded when one is made anew. The kernel side knows a tree by its cgroup id, and systemd
//! removes a service's cgroup when the service stops and makes a new one, with a new id, when
//! it starts again (systemd-resolved restarted by a package upgrade, say). Without a refresh,
//! the restarted service would be redirected; with `--upstream` pointing at it, its queries
//! would come back to it. A refresh runs as soon as the kernel says a directory was made or
//! removed where a tree goes ([`TreesMade`]), so the service's first lookups are usually
//! excluded too.
use std::{
    fs, io,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use aya::maps::{HashMap, MapData};
use dns_proxy_common::EXCLUDED_SUBTREE;
use inotify::{Inotify, WatchMask, Watches};
use tokio::io::unix::AsyncFd;

use super::{EbpfError, ExcludedTree, names};

/// The excluded trees and the map the programs read them from.
pub struct Exclusions {
    map: HashMap<MapData, u64, u8>,
    trees: Vec<Tree>,
}

/// One excluded tree: where it is, and the id it is excluded under.
struct Tree {
    path: PathBuf,
    id: u64,
    /// Its path was found missing (logged once).
    missing: bool,
}

impl Exclusions {
    /// Excludes each of `excluded` in `map`.
    pub(super) fn new(
        mut map: HashMap<MapData, u64, u8>,
        excluded: &[ExcludedTree<'_>],
    ) -> Result<Self, EbpfError> {
        let mut trees = Vec::with_capacity(excluded.len());
        for tree in excluded {
            let cgroup = tree.cgroup;
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
        Ok(Self { map, trees })
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
    /// have again) until a cgroup is made there. Blocking: a `stat` per path.
    pub fn refresh(&mut self) {
        for tree in &mut self.trees {
            let id = match fs::metadata(&tree.path) {
                Ok(metadata) if metadata.is_dir() => metadata.ino(),
                _ => {
                    if !tree.missing {
                        tree.missing = true;
                        // Not a warning: systemd removes a stopped service's cgroup, so each
                        // stop of an excluded service would be one.
                        log::info!(
                            "excluded cgroup tree {} is gone; a cgroup made there again is \
                             excluded as soon as it is seen",
                            tree.path.display()
                        );
                    }
                    continue;
                }
            };
            tree.missing = false;
            if id == tree.id {
                continue;
            }
            // The old id first: its cgroup is gone, and a full map has room for the new one.
            let _ = self.map.remove(&tree.id);
            match self.map.insert(id, EXCLUDED_SUBTREE, 0) {
                Ok(()) if tree.id == 0 => log::info!(
                    "cgroup tree {} was made (id {id}): never redirected",
                    tree.path.display()
                ),
                Ok(()) => log::info!(
                    "cgroup tree {} was made anew (id {} -> {id}): still never redirected",
                    tree.path.display(),
                    tree.id
                ),
                // Not tried again (said once): the tree is redirected until a restart.
                Err(err) => log::error!(
                    "cgroup tree {} was made anew (id {id}) and cannot be excluded: {err}",
                    tree.path.display()
                ),
            }
            tree.id = id;
        }
    }
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
