//! Per-workload query counts (`--workload-metrics N`, off by default): queries by the workload
//! that asked, for the first N workloads seen that are still there; the rest are counted
//! together, so the metrics page stays small whatever runs on the node.
//!
//! A place is a workload's, by its name, not a cgroup's: a unit restarted, or a container made
//! anew under the same name, is one workload in a new cgroup each time, and counts in the place
//! its name has. Before, each cgroup took a place of its own until it had been gone three walks
//! of the tree (about 3 minutes), and a unit restarting every second took all N (helper-198:
//! 70 restarts left 3 live workloads counted under `other`). A cgroup is named by a thread of
//! its own (`WorkloadNames`), so its first queries may come before its name: they wait, and are
//! counted in its workload's place once it is named, or with the others if it cannot be named
//! within [`UNNAMED_WAIT`] (gone already, or out of the walk's reach). A place taken by a cgroup
//! not yet named (helper-200: a unit whose instances asked at once and were gone before they
//! were named held every place as `cgroup-id=N` series) is so never taken.
use foldhash::HashMap;
use std::{
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

/// The full name of a cgroup's workload, if known yet (`WorkloadNames::full`, which never
/// waits: it has the cgroup named if it is not).
pub type NameOf = Box<dyn Fn(u64) -> Option<Arc<str>> + Send + Sync>;

/// How long the queries of a cgroup not named yet wait for its name before they are counted
/// with the others: the naming thread walks the tree at most every 250 ms, longer on a large
/// tree.
const UNNAMED_WAIT: Duration = Duration::from_secs(5);

/// Cgroups counted apart, or waiting for their names, at most, per place: the cgroups of one
/// workload (a unit's restarts) until they are forgotten.
const CGROUPS_PER_PLACE: usize = 64;

/// The counts, shared by every listener.
pub struct WorkloadStats {
    limit: usize,
    places: Mutex<Places>,
    /// Queries of workloads past the limit, of cgroups that could not be named, and of cgroup
    /// 0 (not recorded).
    others: AtomicU64,
    name_of: NameOf,
}

impl std::fmt::Debug for WorkloadStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkloadStats")
            .field("limit", &self.limit)
            .field("places", &self.places)
            .field("others", &self.others)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Default)]
struct Places {
    /// Each named cgroup counted apart, and its workload's name.
    of_cgroup: HashMap<u64, Arc<str>>,
    /// The queries of each workload counted apart: its place.
    queries: HashMap<Arc<str>, u64>,
    /// Cgroups not named yet: when their first query came, and their queries.
    unnamed: HashMap<u64, (Instant, u64)>,
}

impl WorkloadStats {
    /// Counts at most `limit` workloads apart, each named by `name_of`.
    pub fn new(limit: usize, name_of: NameOf) -> Self {
        Self {
            limit,
            places: Mutex::default(),
            others: AtomicU64::new(0),
            name_of,
        }
    }

    /// One query of cgroup `cgroup`.
    pub fn query(&self, cgroup: u64) {
        if cgroup == 0 {
            self.others.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let mut places = self.lock();
        if let Some(name) = places.of_cgroup.get(&cgroup).cloned() {
            *places.queries.entry(name).or_default() += 1;
            return;
        }
        match (self.name_of)(cgroup) {
            Some(name) => {
                let waited = places
                    .unnamed
                    .remove(&cgroup)
                    .map_or(0, |(_, queries)| queries);
                self.count_named(&mut places, cgroup, name, waited + 1);
            }
            None if places.unnamed.contains_key(&cgroup)
                || places.unnamed.len() < self.most_cgroups() =>
            {
                let now = Instant::now();
                places.unnamed.entry(cgroup).or_insert((now, 0)).1 += 1;
            }
            None => {
                self.others.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn most_cgroups(&self) -> usize {
        self.limit.saturating_mul(CGROUPS_PER_PLACE)
    }

    /// Counts `queries` of cgroup `cgroup`, whose workload is `name`, in that workload's place,
    /// taken now if there is room; with the others otherwise.
    fn count_named(&self, places: &mut Places, cgroup: u64, name: Arc<str>, queries: u64) {
        let has_place = places.queries.contains_key(&name);
        if places.of_cgroup.len() < self.most_cgroups()
            && (has_place || places.queries.len() < self.limit)
        {
            places.of_cgroup.insert(cgroup, Arc::clone(&name));
            *places.queries.entry(name).or_default() += queries;
        } else {
            self.others.fetch_add(queries, Ordering::Relaxed);
        }
    }

    /// Counts the queries of the cgroups named since they asked, and, with the others, of those
    /// that waited [`UNNAMED_WAIT`] for their names, or that are `gone`.
    fn settle_unnamed(&self, places: &mut Places, gone: impl Fn(u64) -> bool) {
        let now = Instant::now();
        let mut waiting: Vec<(u64, (Instant, u64))> = places.unnamed.drain().collect();
        // In the order they first asked: the first N workloads that ask have the places
        // (in the map's order, the second of two that asked once took the one place half the
        // time).
        waiting.sort_unstable_by_key(|&(cgroup, (since, _))| (since, cgroup));
        for (cgroup, (since, queries)) in waiting {
            match (self.name_of)(cgroup) {
                Some(name) => self.count_named(places, cgroup, name, queries),
                None if gone(cgroup) || now.duration_since(since) >= UNNAMED_WAIT => {
                    self.others.fetch_add(queries, Ordering::Relaxed);
                }
                None => {
                    places.unnamed.insert(cgroup, (since, queries));
                }
            }
        }
    }

    /// The cgroups counted apart or waiting for their names.
    pub fn cgroups(&self) -> Vec<u64> {
        let places = self.lock();
        places
            .of_cgroup
            .keys()
            .chain(places.unnamed.keys())
            .copied()
            .collect()
    }

    /// Stops counting apart the cgroups that are `gone`, and the workloads left with none
    /// (their series leave the page), so that new workloads take their places: otherwise the
    /// first N ever seen would keep them for good, and every later one were counted with the
    /// others. Returns how many cgroups were forgotten.
    pub fn forget(&self, gone: impl Fn(u64) -> bool) -> usize {
        let mut places = self.lock();
        let before = places.of_cgroup.len() + places.unnamed.len();
        self.settle_unnamed(&mut places, &gone);
        places.of_cgroup.retain(|cgroup, _| !gone(*cgroup));
        let held: std::collections::HashSet<Arc<str>> =
            places.of_cgroup.values().cloned().collect();
        places.queries.retain(|name, _| held.contains(name));
        before - (places.of_cgroup.len() + places.unnamed.len())
    }

    /// (name, queries) of each workload counted apart, by name, and the queries of the others.
    /// The queries of cgroups still waiting for their names are in neither yet.
    pub fn snapshot(&self) -> (Vec<(Arc<str>, u64)>, u64) {
        let mut places = self.lock();
        self.settle_unnamed(&mut places, |_| false);
        let mut counts: Vec<(Arc<str>, u64)> = places
            .queries
            .iter()
            .map(|(name, &queries)| (Arc::clone(name), queries))
            .collect();
        counts.sort_unstable();
        (counts, self.others.load(Ordering::Relaxed))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Places> {
        self.places.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Names = Arc<Mutex<HashMap<u64, &'static str>>>;

    /// Names from a table the test changes: a cgroup is named when the test says so.
    fn named(names: &Names) -> NameOf {
        let names = Arc::clone(names);
        Box::new(move |cgroup| {
            names
                .lock()
                .unwrap()
                .get(&cgroup)
                .map(|&name| Arc::from(name))
        })
    }

    fn name(names: &Names, cgroup: u64, name: &'static str) {
        names.lock().unwrap().insert(cgroup, name);
    }

    /// The snapshot, names as text.
    fn counts(stats: &WorkloadStats) -> (Vec<(String, u64)>, u64) {
        let (apart, others) = stats.snapshot();
        let apart = apart
            .into_iter()
            .map(|(name, queries)| (name.to_string(), queries))
            .collect();
        (apart, others)
    }

    fn expect(apart: &[(&str, u64)], others: u64) -> (Vec<(String, u64)>, u64) {
        let apart = apart
            .iter()
            .map(|&(name, queries)| (name.to_owned(), queries))
            .collect();
        (apart, others)
    }

    #[test]
    fn the_first_workloads_are_counted_apart_and_the_rest_together() {
        let names = Names::default();
        for (cgroup, workload) in [(7, "a"), (8, "b"), (9, "c"), (10, "d")] {
            name(&names, cgroup, workload);
        }
        let stats = WorkloadStats::new(2, named(&names));
        for cgroup in [7, 8, 7, 9, 10, 0, 8] {
            stats.query(cgroup);
        }
        assert_eq!(counts(&stats), expect(&[("a", 2), ("b", 2)], 3));
    }

    #[test]
    fn a_gone_workload_gives_its_place_to_the_next() {
        let names = Names::default();
        for (cgroup, workload) in [(7, "a"), (8, "b"), (9, "c"), (10, "d")] {
            name(&names, cgroup, workload);
        }
        let stats = WorkloadStats::new(2, named(&names));
        for cgroup in [7, 8, 9] {
            stats.query(cgroup);
        }
        assert_eq!(stats.forget(|cgroup| cgroup == 7), 1);
        stats.query(9);
        stats.query(10);
        assert_eq!(counts(&stats), expect(&[("b", 1), ("c", 1)], 2));
    }

    /// Cgroups that asked before they were named take the places in the order they asked.
    #[test]
    fn the_first_to_ask_have_the_places_whenever_they_are_named() {
        let names = Names::default();
        let stats = WorkloadStats::new(1, named(&names));
        for cgroup in [40, 30, 20, 10] {
            stats.query(cgroup);
            std::thread::sleep(Duration::from_millis(1));
        }
        for (cgroup, workload) in [(10, "d"), (20, "c"), (30, "b"), (40, "a")] {
            name(&names, cgroup, workload);
        }
        assert_eq!(counts(&stats), expect(&[("a", 1)], 3));
    }

    /// A unit restarted is one workload in a new cgroup each time: it keeps one place, and
    /// leaves the others to other workloads, whether its cgroups ask before they are named or
    /// after (helper-198, helper-200).
    #[test]
    fn a_workload_in_a_new_cgroup_keeps_its_one_place() {
        let names = Names::default();
        let stats = WorkloadStats::new(2, named(&names));
        // Named before it asks, or only after: each counts in the unit's one place.
        for cgroup in [7, 8, 9] {
            name(&names, cgroup, "unit=restart.service");
            stats.query(cgroup);
        }
        stats.query(10);
        stats.query(10);
        name(&names, 10, "unit=restart.service");
        stats.query(11);
        name(&names, 11, "unit=other.service");
        stats.query(11);
        let both = expect(&[("unit=other.service", 2), ("unit=restart.service", 5)], 0);
        assert_eq!(counts(&stats), both);
        // The restarted unit's cgroups gone but its newest: it keeps its place and count.
        assert_eq!(stats.forget(|cgroup| cgroup < 10), 3);
        assert_eq!(counts(&stats), both);
        // All gone: its place goes to the next.
        assert_eq!(stats.forget(|cgroup| cgroup == 10), 1);
        name(&names, 12, "unit=next.service");
        stats.query(12);
        assert_eq!(
            counts(&stats),
            expect(&[("unit=next.service", 1), ("unit=other.service", 2)], 0)
        );
    }

    /// Cgroups gone before they were named take no place: their queries are counted with the
    /// others once they are found gone, and every query is counted once.
    #[test]
    fn cgroups_never_named_take_no_place() {
        let names = Names::default();
        let stats = WorkloadStats::new(1, named(&names));
        for cgroup in 1..=20 {
            stats.query(cgroup);
        }
        name(&names, 30, "unit=live.service");
        stats.query(30);
        assert_eq!(counts(&stats), expect(&[("unit=live.service", 1)], 0));
        assert_eq!(stats.forget(|cgroup| cgroup <= 20), 20);
        assert_eq!(counts(&stats), expect(&[("unit=live.service", 1)], 20));
    }

    /// A unit restarting without pause has no more than its share of cgroups counted apart:
    /// past that, its new cgroups are counted with the others until the gone are forgotten.
    #[test]
    fn the_cgroups_of_one_place_are_bounded() {
        let names = Names::default();
        let stats = WorkloadStats::new(1, named(&names));
        let cgroups = u64::try_from(CGROUPS_PER_PLACE).unwrap() + 10;
        for cgroup in 1..=cgroups {
            name(&names, cgroup, "unit=loop.service");
            stats.query(cgroup);
        }
        assert_eq!(stats.cgroups().len(), CGROUPS_PER_PLACE);
        let last = u64::try_from(CGROUPS_PER_PLACE).unwrap();
        assert_eq!(counts(&stats), expect(&[("unit=loop.service", last)], 10));
    }
}
