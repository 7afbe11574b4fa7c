//! Per-workload query counts (`--workload-metrics N`, off by default): queries by the cgroup
//! that asked, for the first N cgroups seen that are still there; the rest are counted
//! together, so the metrics page stays small whatever runs on the node.
use foldhash::HashMap;
use std::sync::{
    Mutex, PoisonError,
    atomic::{AtomicU64, Ordering},
};

/// The counts, shared by every listener.
#[derive(Debug)]
pub struct WorkloadStats {
    limit: usize,
    by_cgroup: Mutex<HashMap<u64, u64>>,
    /// Queries of cgroups past the limit, and of cgroup 0 (not recorded).
    others: AtomicU64,
}

impl WorkloadStats {
    /// Counts at most `limit` cgroups apart.
    pub fn new(limit: usize) -> Self {
        Self {
            limit,
            by_cgroup: Mutex::default(),
            others: AtomicU64::new(0),
        }
    }

    /// One query of cgroup `cgroup`.
    pub fn query(&self, cgroup: u64) {
        if cgroup != 0 {
            let mut by_cgroup = self.lock();
            let room = by_cgroup.len() < self.limit;
            if let Some(count) = by_cgroup.get_mut(&cgroup) {
                *count += 1;
                return;
            }
            if room {
                by_cgroup.insert(cgroup, 1);
                return;
            }
        }
        self.others.fetch_add(1, Ordering::Relaxed);
    }

    /// The cgroups counted apart.
    pub fn cgroups(&self) -> Vec<u64> {
        self.lock().keys().copied().collect()
    }

    /// Stops counting apart the cgroups that are `gone` (their series leave the page), so that
    /// new workloads take their places: otherwise the first N cgroups ever seen would keep them
    /// for good, and every later one were counted with the others.
    pub fn forget(&self, gone: impl Fn(u64) -> bool) -> usize {
        let mut by_cgroup = self.lock();
        let before = by_cgroup.len();
        by_cgroup.retain(|cgroup, _| !gone(*cgroup));
        before - by_cgroup.len()
    }

    /// (cgroup, queries) of the cgroups counted apart, and the queries of the others.
    pub fn snapshot(&self) -> (Vec<(u64, u64)>, u64) {
        let mut counts: Vec<(u64, u64)> = self.lock().iter().map(|(k, v)| (*k, *v)).collect();
        counts.sort_unstable();
        (counts, self.others.load(Ordering::Relaxed))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, u64>> {
        self.by_cgroup
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_cgroups_are_counted_apart_and_the_rest_together() {
        let stats = WorkloadStats::new(2);
        for cgroup in [7, 8, 7, 9, 10, 0, 8] {
            stats.query(cgroup);
        }
        assert_eq!(stats.snapshot(), (vec![(7, 2), (8, 2)], 3));
    }

    #[test]
    fn a_cgroup_that_is_gone_gives_its_place_to_the_next() {
        let stats = WorkloadStats::new(2);
        for cgroup in [7, 8, 9] {
            stats.query(cgroup);
        }
        assert_eq!(stats.forget(|cgroup| cgroup == 7), 1);
        stats.query(9);
        stats.query(10);
        assert_eq!(stats.snapshot(), (vec![(8, 1), (9, 1)], 2));
    }
}
