//! Telling the programs that the agent runs (`ALIVE_AT`): a stopped (SIGSTOP), frozen
//! (`docker pause`, `cgroup.freeze`) or wedged agent keeps its programs attached and its
//! sockets open, and reads nothing. Once it has not said so for
//! [`UNRESPONSIVE_AFTER_NS`](dns_proxy_common::UNRESPONSIVE_AFTER_NS), the programs send it
//! nothing new (lookups go direct) and refuse what reaches the block (its senders hear so at
//! once), until it says so again.
use aya::maps::{Array, MapData};
use dns_proxy_common::names;

use super::{EbpfError, server_table::read_clock};

pub struct AliveAt(Array<MapData, u64>);

impl AliveAt {
    pub(super) fn new(map: Array<MapData, u64>) -> Self {
        Self(map)
    }

    /// Says the agent runs now (a `bpf()` call).
    pub fn now(&mut self) -> Result<(), EbpfError> {
        // The clock `bpf_ktime_get_ns` reads; it cannot fail on Linux.
        let now = read_clock(libc::CLOCK_MONOTONIC).unwrap_or_default();
        let now = u64::try_from(now.as_nanos()).unwrap_or(u64::MAX);
        self.0.set(0, now, 0).map_err(|source| EbpfError::Map {
            map: names::ALIVE_AT,
            source: Box::new(source),
        })
    }
}
