//! Who hears of each query and answer besides the client: the dnstap log, the names each
//! workload resolved, the per-workload counts, and the workloads' names for debug lines. UDP
//! and TCP tell them the same things at the same moments, through here.
use std::{sync::Arc, time::Duration};

use super::{
    Moment,
    query_log::{Asked, QueryLog},
    workload_stats::WorkloadStats,
};
use crate::{resolutions::Resolutions, workload::WorkloadNames};

/// Each `None` when off.
#[derive(Debug, Clone, Default)]
pub struct Observers {
    /// Names the workloads of the cgroups that ask, for the log; `None`: cgroup ids only.
    pub workloads: Option<Arc<WorkloadNames>>,
    /// The dnstap log (`--dnstap`).
    pub query_log: Option<Arc<QueryLog>>,
    /// The names each workload resolved (`/v1/resolutions`).
    pub resolutions: Option<Arc<Resolutions>>,
    /// Queries by workload (`--workload-metrics`).
    pub workload_stats: Option<Arc<WorkloadStats>>,
}

impl Observers {
    /// A client's query arrived at `at`.
    pub fn asked(&self, asked: Asked, query: &[u8], at: Moment) {
        if let Some(log) = &self.query_log {
            log.query(asked, query, at.wall);
        }
        if let Some(workload_stats) = &self.workload_stats {
            workload_stats.query(asked.cgroup);
        }
    }

    /// An answer went to its client at `now`, `latency` after its query arrived (`None`: a
    /// TCP answer to no query known, which the log leaves out; its names are recorded).
    pub fn answered(&self, asked: Asked, latency: Option<Duration>, answer: &[u8], now: Moment) {
        if let (Some(log), Some(latency)) = (&self.query_log, latency) {
            log.response(asked, latency, now.wall, answer);
        }
        if let Some(resolutions) = &self.resolutions {
            resolutions.record(asked.cgroup, answer, now);
        }
    }

    /// The name of cgroup `id`'s workload, for the log.
    pub fn workload_name(&self, id: u64) -> Arc<str> {
        WorkloadNames::name_in(self.workloads.as_deref(), id)
    }
}
