//! The kernel's table of servers as the DNS listeners ask it: the eBPF side's implementation
//! of [`OriginalDestinations`], so that nothing under [`crate::dns`] needs aya.
use foldhash::{HashMap, HashMapExt};
use std::{
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
};

use super::ServerTable;
use crate::dns::OriginalDestinations;

/// The kernel's table of servers with a copy of what was read of it, so that a query costs
/// no `bpf()` call once its origin was seen: an index does not change its origin while in
/// use, and the copy is dropped whenever the agent forgets origins of departed cgroups (their
/// indexes may then name others). One per UDP thread and one for TCP, so the copies are never
/// contended. Bounded by the table's size.
pub struct CachedServers {
    table: Arc<ServerTable>,
    /// Listen addresses: a query forwarded there would come back too.
    listeners: Vec<SocketAddr>,
    /// What was read, as of the table's generation it was read at.
    known: Mutex<(u64, KnownOrigins)>,
}

/// (family, index) → (server, cgroup id), as read from the kernel's table.
type KnownOrigins = HashMap<(u16, u32), (SocketAddr, u64)>;

impl CachedServers {
    pub fn new(table: Arc<ServerTable>, listeners: Vec<SocketAddr>) -> Self {
        Self {
            table,
            listeners,
            known: Mutex::default(),
        }
    }
}

impl OriginalDestinations for CachedServers {
    fn origin(&self, reached: SocketAddr) -> Option<(SocketAddr, u64)> {
        let key = self.table.index_of(reached)?;
        self.table.seen(key.0, key.1);
        let generation = self.table.generation();
        {
            let mut known = self.known.lock().expect("not poisoned");
            if known.0 != generation {
                *known = (generation, HashMap::new());
            }
            if let Some(origin) = known.1.get(&key) {
                return Some(*origin);
            }
        }
        let origin = self.table.origin(key.0, key.1)?;
        let mut known = self.known.lock().expect("not poisoned");
        if known.0 == generation {
            known.1.insert(key, origin);
        }
        Some(origin)
    }

    fn still_in_use(&self, reached: SocketAddr) {
        if let Some((family, index)) = self.table.index_of(reached) {
            self.table.seen(family, index);
        }
    }

    fn is_proxy(&self, addr: SocketAddr) -> bool {
        let canonical = SocketAddr::new(addr.ip().to_canonical(), addr.port());
        self.listeners.contains(&canonical) || self.table.is_block_address(canonical)
    }

    fn is_local_client(&self, client: IpAddr) -> bool {
        let client = client.to_canonical();
        self.table.host_mode() || client.is_loopback() || self.table.is_block_ip(client)
    }

    fn refuse_udp_for_a_while(&self, reached: SocketAddr) {
        self.table.refuse_udp_for_a_while(reached);
    }

    fn refuse_here_for_a_while(&self, reached: SocketAddr) {
        self.table.refuse_here_for_a_while(reached);
    }

    fn refused_here(&self, reached: SocketAddr) -> bool {
        self.table.refused_here(reached)
    }
}
