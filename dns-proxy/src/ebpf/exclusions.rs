//! The operator's excluded cgroup trees (`--exclude-cgroup`) in `EXCLUDED_CGROUPS`, kept
//! excluded when one is made anew. The kernel side knows a tree by its cgroup id, and systemd
//! removes a service's cgroup when the service stops and makes a new one, with a new id, when
//! it starts again (systemd-resolved restarted by a package upgrade, say). Without a refresh,
//! the restarted service would be redirected; with `--upstream` pointing at it, its queries
//! would come back to it.
use std::{fs, os::unix::fs::MetadataExt as _, path::PathBuf};

use aya::maps::{HashMap, MapData};
use dns_proxy_common::EXCLUDED_SUBTREE;

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
                     is made (within a second); until then nothing is made there to redirect",
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
