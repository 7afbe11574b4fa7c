//! Telling the programs that the agent runs (`ALIVE_AT`): a stopped (SIGSTOP), frozen
//! (`docker pause`, `cgroup.freeze`) or wedged agent keeps its programs attached and its
//! sockets open, and reads nothing. Once it has not said so for
//! [`UNRESPONSIVE_AFTER_NS`](dns_proxy_common::UNRESPONSIVE_AFTER_NS), the programs send it
//! nothing new (lookups go direct) and refuse what reaches the block (its senders hear so at
//! once), until it says so again.
use aya::maps::{Array, MapData};
use dns_proxy_common::names;

use super::EbpfError;
use crate::time_namespace::kernel_monotonic_ns;

pub struct AliveAt(Array<MapData, u64>);

impl AliveAt {
    pub(super) fn new(map: Array<MapData, u64>) -> Self {
        Self(map)
    }

    /// Says the agent runs now (a `bpf()` call).
    pub fn now(&mut self) -> Result<(), EbpfError> {
        self.0
            .set(0, kernel_monotonic_ns(), 0)
            .map_err(|source| EbpfError::Map {
                map: names::ALIVE_AT,
                source: Box::new(source),
            })
    }
}
