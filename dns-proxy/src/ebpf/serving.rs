//! `SERVING`: the first UDP socket of each agent that serves a port and family of the block,
//! in a slot of its own, pinned and shared by the agents of the table. The egress guard, which
//! a dead agent leaves pinned in node mode, refuses a pod's datagrams to the block where no
//! slot holds a socket: the kernel takes a socket out as it closes it, so a dead agent's entry
//! goes with its sockets, and a live agent's stays whatever becomes of another's. One slot
//! per agent: with one entry for all, a takeover that failed after its start had put its
//! socket there, or a newer agent stopped while the older still served, left the entry empty,
//! and the older agent's pods were refused for up to 2 s (helper-202: 12 of 40 lookups).
use std::{
    os::fd::{AsRawFd as _, BorrowedFd, OwnedFd},
    sync::Mutex,
};

use aya::maps::{MapData, MapError, SockHash};
use dns_proxy_common::{AF_INET, AF_INET6, SERVING_SLOTS, ServingKey};

use super::{Block, EbpfError, ListenerFds};

/// `BPF_NOEXIST`: put only where no entry is.
const NOEXIST: u64 = 1;

/// This agent's entries of `SERVING`, and its own descriptors of the sockets in them.
pub struct Serving {
    map: Mutex<SockHash<MapData, ServingKey>>,
    entries: Mutex<Vec<Entry>>,
}

/// What this agent puts in `SERVING` for one family.
struct Entry {
    /// The cgroup the agent redirects (its id).
    cgroup: u64,
    port_be: u16,
    family: u16,
    /// A descriptor of the socket to put there, while the agent serves; none once it stops
    /// serving ([`Serving::stop`]).
    socket: Option<OwnedFd>,
    /// The slot it holds; none while every slot was taken.
    slot: Option<u8>,
}

impl Entry {
    fn key(&self, slot: u8) -> ServingKey {
        ServingKey::new(self.cgroup, self.port_be, self.family, slot)
    }
}

impl Serving {
    /// The entries, locked (first, when both are).
    fn entries(&self) -> std::sync::MutexGuard<'_, Vec<Entry>> {
        self.entries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The map, locked.
    fn map(&self) -> std::sync::MutexGuard<'_, SockHash<MapData, ServingKey>> {
        self.map
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Puts this agent's first UDP socket of each family in the lowest free slot of `map`
    /// for `cgroup` (the id of the cgroup it redirects): from now on it serves the block on its
    /// ports there, beside any agent there already.
    pub(super) fn put(
        mut map: SockHash<MapData, ServingKey>,
        cgroup: u64,
        listeners: &ListenerFds<'_>,
        block4: Block,
        block6: Option<Block>,
    ) -> Result<Self, EbpfError> {
        let mut entries = Vec::new();
        let families = [
            (AF_INET, Some(block4), listeners.udp4.first()),
            (AF_INET6, block6, listeners.udp6.first()),
        ];
        for (family, block, socket) in families {
            let (Some(block), Some(socket)) = (block, socket) else {
                continue;
            };
            let mut entry = Entry {
                cgroup,
                port_be: block.port.to_be(),
                family,
                socket: Some(duplicate(*socket)?),
                slot: None,
            };
            match take_lowest_free(&mut map, &entry, SERVING_SLOTS) {
                Ok(Some(slot)) => entry.slot = Some(slot),
                Ok(None) => log::warn!(
                    "no slot of SERVING taken for port {}: {SERVING_SLOTS} agents serve it \
                     already; tried again at each heartbeat",
                    block.port
                ),
                Err(err) => log::warn!(
                    "no slot of SERVING taken for port {}: {err}; tried again at each \
                     heartbeat",
                    block.port
                ),
            }
            entries.push(entry);
        }
        Ok(Self {
            map: Mutex::new(map),
            entries: Mutex::new(entries),
        })
    }

    /// At each heartbeat, while the agent serves: takes a slot where it holds none (none was
    /// free at its start), and moves to a lower slot that is free (the agent before it is
    /// gone), so that the guard's first lookup finds it. Returns the ports it took a slot for.
    pub fn put_back(&self) -> Vec<u16> {
        let mut entries = self.entries();
        let mut map = self.map();
        let mut taken = Vec::new();
        for entry in entries.iter_mut().filter(|entry| entry.socket.is_some()) {
            let held = entry.slot.filter(|slot| {
                map.keys()
                    .any(|key| key.is_ok_and(|key| key == entry.key(*slot)))
            });
            match held {
                Some(0) => {}
                Some(slot) => {
                    if let Ok(Some(lower)) = take_lowest_free(&mut map, entry, slot) {
                        let _ = map.remove(&entry.key(slot));
                        entry.slot = Some(lower);
                    }
                }
                // Said at the start, whatever it was; said again once taken.
                None => {
                    entry.slot = take_lowest_free(&mut map, entry, SERVING_SLOTS)
                        .ok()
                        .flatten();
                    if entry.slot.is_some() {
                        taken.push(u16::from_be(entry.port_be));
                    }
                }
            }
        }
        taken
    }

    /// Takes this agent's entries out now, its listeners still open: what pods send to the
    /// block is refused from now on (no other agent serves).
    pub fn withdraw(&self) {
        self.stop();
        let entries = self.entries();
        let mut map = self.map();
        for entry in entries.iter() {
            if let Some(slot) = entry.slot {
                let _ = map.remove(&entry.key(slot));
            }
        }
    }

    /// Whether another agent's socket is in `SERVING` for this agent's cgroup and one of its
    /// ports: an agent of this version serves there (one before `SERVING` puts none).
    pub fn another_in_serving(&self) -> bool {
        let entries = self.entries();
        let map = self.map();
        map.keys().flatten().any(|key| {
            entries.iter().any(|entry| {
                key.cgroup == entry.cgroup
                    && key.port == entry.port_be
                    && u16::from(key.family) == entry.family
                    && Some(key.slot) != entry.slot
            })
        })
    }

    /// This agent serves no more: it puts nothing back, and lets go of its descriptors, so
    /// that its entries go as its listeners close.
    pub fn stop(&self) {
        let mut entries = self.entries();
        for entry in entries.iter_mut() {
            entry.socket = None;
        }
    }
}

/// Puts `entry`'s socket in the lowest slot below `below` that holds none: the slot, or
/// none if each holds another's socket (or the agent serves no more). Any other refusal of
/// the map (full, or the socket not one it takes) is the error, said for the log.
fn take_lowest_free(
    map: &mut SockHash<MapData, ServingKey>,
    entry: &Entry,
    below: u8,
) -> Result<Option<u8>, String> {
    let Some(socket) = entry.socket.as_ref() else {
        return Ok(None);
    };
    for slot in 0..below {
        match map.insert(entry.key(slot), socket.as_raw_fd(), NOEXIST) {
            Ok(()) => return Ok(Some(slot)),
            Err(MapError::SyscallError(err))
                if err.io_error.raw_os_error() == Some(libc::EEXIST) => {}
            Err(MapError::SyscallError(err)) => {
                return Err(format!("the map refused it ({})", err.io_error));
            }
            Err(err) => return Err(err.to_string()),
        }
    }
    Ok(None)
}

/// A descriptor of the agent's own on `socket`, as high as the listeners' own: a SIGKILL
/// releases the highest first, and the listeners must leave `LISTENERS` before the links go
/// (`udp_threads::listener_socket`). Under a descriptor limit that low, where it is.
fn duplicate(socket: BorrowedFd<'_>) -> Result<OwnedFd, EbpfError> {
    crate::udp_threads::high_duplicate(socket)
        .or_else(|_| socket.try_clone_to_owned())
        .map_err(EbpfError::DuplicateListener)
}
