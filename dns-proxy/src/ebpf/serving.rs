//! `SERVING`: the serving agent's first UDP socket, by port and family, pinned and shared by the agents of the table. The egress guard, which a dead agent leaves
//! pinned in node mode, refuses a pod's datagrams to the block where no entry is: the kernel
//! takes a socket out as it closes it, so a dead agent's entry goes with its sockets, and a
//! live agent's stays whatever became of the agent that put it there before.
use std::{
    os::fd::{AsRawFd as _, BorrowedFd, OwnedFd},
    sync::Mutex,
};

use aya::maps::{MapData, SockHash};
use dns_proxy_common::{AF_INET, AF_INET6, ServingKey, names};

use super::{Block, EbpfError, ListenerFds};

/// `BPF_NOEXIST`: put only where no entry is.
const NOEXIST: u64 = 1;

/// This agent's entries of `SERVING`, and its own descriptors of the sockets in them.
pub struct Serving {
    map: Mutex<SockHash<MapData, ServingKey>>,
    /// Each key with a descriptor of the socket to put there, while the agent serves; empty
    /// once it stops serving ([`stop`](Self::stop)).
    sockets: Mutex<Vec<(ServingKey, OwnedFd)>>,
}

impl Serving {
    /// Puts this agent's first UDP socket of each family in `map`, in place of any other
    /// agent's: from now on this one serves the block on its ports.
    pub(super) fn put(
        map: SockHash<MapData, ServingKey>,
        listeners: &ListenerFds<'_>,
        block4: Block,
        block6: Option<Block>,
    ) -> Result<Self, EbpfError> {
        let mut wanted = Vec::new();
        let families = [
            (AF_INET, Some(block4), listeners.udp4.first()),
            (AF_INET6, block6, listeners.udp6.first()),
        ];
        for (family, block, socket) in families {
            let (Some(block), Some(socket)) = (block, socket) else {
                continue;
            };
            let key = ServingKey::new(block.port.to_be(), family);
            wanted.push((key, duplicate(*socket)?));
        }
        let mut map = map;
        for (key, socket) in &wanted {
            map.insert(key, socket.as_raw_fd(), 0)
                .map_err(|source| EbpfError::Map {
                    map: names::SERVING,
                    source: Box::new(source),
                })?;
        }
        Ok(Self {
            map: Mutex::new(map),
            sockets: Mutex::new(wanted),
        })
    }

    /// Puts this agent's sockets back where no entry is, while it serves: the agent that took
    /// over from it is gone, and until this one puts them back, a pod's socket connected to
    /// the block is refused though this one would answer it. Returns the ports put back.
    pub fn put_back(&self) -> Vec<u16> {
        let sockets = self
            .sockets
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut map = self
            .map
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut put = Vec::new();
        for (key, socket) in sockets.iter() {
            if map.insert(key, socket.as_raw_fd(), NOEXIST).is_ok() {
                put.push(u16::from_be(key.port));
            }
        }
        put
    }

    /// This agent serves no more: it puts nothing back, and lets go of its descriptors, so
    /// that its entries go as its listeners close.
    pub fn stop(&self) {
        self.sockets
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clear();
    }
}

/// A descriptor of the agent's own on `socket`, as high as the listeners' own: a SIGKILL
/// releases the highest first, and the listeners must leave `LISTENERS` before the links go
/// (`udp_threads::listener_socket`). Under a descriptor limit that low, where it is.
fn duplicate(socket: BorrowedFd<'_>) -> Result<OwnedFd, EbpfError> {
    crate::udp_threads::high_duplicate(socket)
        .or_else(|_| socket.try_clone_to_owned())
        .map_err(EbpfError::DuplicateListener)
}
