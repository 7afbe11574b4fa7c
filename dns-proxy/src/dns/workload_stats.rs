//! Per-workload query counts (`--workload-metrics N`, off by default): queries by the workload
//! that asked, for the first N workloads seen that are still there; the rest are counted
//! together, so the metrics page stays small whatever runs on the node.
//!
//! A place is a workload's, not a cgroup's: a unit restarted, or a container made anew under
//! the same name, is one workload in a new cgroup each time, and joins the place its name has.
//! Before, each cgroup took a place of its own until it had been gone three walks of the tree
//! (about 3 minutes), and a unit restarting every second took all N (helper-198: 70 restarts
//! left 3 live workloads counted under `other`). A cgroup is named by a thread of its own
//! (`WorkloadNames`), so its first queries may come before its name: it takes a place of its
//! own then, which joins its name's when the counts are next looked at (a scrape, the walk
//! that forgets the gone, or a new workload finding no room).
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

/// How often a workload finding no room has the places of one name joined: each join looks
/// at every cgroup counted.
const JOIN_AT_MOST_EVERY: Duration = Duration::from_millis(100);

/// Cgroups counted apart at most, per place: the cgroups of one workload (a unit's restarts)
/// until they are forgotten.
const CGROUPS_PER_PLACE: usize = 64;

/// The counts, shared by every listener.
pub struct WorkloadStats {
    limit: usize,
    places: Mutex<Places>,
    /// Queries of workloads past the limit, and of cgroup 0 (not recorded).
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

/// A place's number.
type Place = u64;

#[derive(Debug, Default)]
struct Places {
    /// Each cgroup counted apart, and its place.
    of_cgroup: HashMap<u64, Place>,
    /// The queries of each place.
    queries: HashMap<Place, u64>,
    /// The place of each workload named so far.
    of_name: HashMap<Arc<str>, Place>,
    next: Place,
    /// When the places of one name were last joined.
    joined_at: Option<Instant>,
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
        if cgroup != 0 && self.count_apart(cgroup) {
            return;
        }
        self.others.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a query of `cgroup` in its workload's place, if it has one or there is room.
    fn count_apart(&self, cgroup: u64) -> bool {
        let mut places = self.lock();
        if let Some(&place) = places.of_cgroup.get(&cgroup) {
            *places.queries.entry(place).or_default() += 1;
            return true;
        }
        let name = (self.name_of)(cgroup);
        let room_for_cgroups = places.of_cgroup.len() < self.limit * CGROUPS_PER_PLACE;
        if let Some(&place) = name.as_ref().and_then(|name| places.of_name.get(name))
            && room_for_cgroups
        {
            places.of_cgroup.insert(cgroup, place);
            *places.queries.entry(place).or_default() += 1;
            return true;
        }
        if places.queries.len() >= self.limit {
            let now = Instant::now();
            if places
                .joined_at
                .is_none_or(|at| now.duration_since(at) >= JOIN_AT_MOST_EVERY)
            {
                places.joined_at = Some(now);
                self.join_places_of_one_name(&mut places);
            }
        }
        if places.queries.len() >= self.limit || !room_for_cgroups {
            return false;
        }
        let place = places.next;
        places.next += 1;
        places.of_cgroup.insert(cgroup, place);
        places.queries.insert(place, 1);
        if let Some(name) = name {
            places.of_name.insert(name, place);
        }
        true
    }

    /// Joins the places whose cgroups have come to share a name: the cgroups named since they
    /// took a place of their own.
    fn join_places_of_one_name(&self, places: &mut Places) {
        let mut moved: HashMap<Place, Place> = HashMap::default();
        let mut cgroups: Vec<(u64, Place)> = places
            .of_cgroup
            .iter()
            .map(|(&cgroup, &place)| (cgroup, place))
            .collect();
        cgroups.sort_unstable();
        for (cgroup, place) in cgroups {
            let Some(name) = (self.name_of)(cgroup) else {
                continue;
            };
            match places.of_name.get(&name) {
                Some(&named) if named != place => {
                    moved.insert(place, named);
                }
                Some(_) => {}
                None => {
                    places.of_name.insert(name, place);
                }
            }
        }
        for (from, to) in &moved {
            let queries = places.queries.remove(from).unwrap_or_default();
            *places.queries.entry(*to).or_default() += queries;
        }
        for place in places.of_cgroup.values_mut() {
            if let Some(&to) = moved.get(place) {
                *place = to;
            }
        }
    }

    /// The cgroups counted apart.
    pub fn cgroups(&self) -> Vec<u64> {
        self.lock().of_cgroup.keys().copied().collect()
    }

    /// Stops counting apart the cgroups that are `gone`, and the workloads left with none
    /// (their series leave the page), so that new workloads take their places: otherwise the
    /// first N ever seen would keep them for good, and every later one were counted with the
    /// others. Returns how many cgroups were forgotten.
    pub fn forget(&self, gone: impl Fn(u64) -> bool) -> usize {
        let mut places = self.lock();
        self.join_places_of_one_name(&mut places);
        let before = places.of_cgroup.len();
        places.of_cgroup.retain(|cgroup, _| !gone(*cgroup));
        let forgotten = before - places.of_cgroup.len();
        let held: std::collections::HashSet<Place> = places.of_cgroup.values().copied().collect();
        places.queries.retain(|place, _| held.contains(place));
        places.of_name.retain(|_, place| held.contains(place));
        forgotten
    }

    /// (cgroup, queries) of each workload counted apart (by one of its cgroups: the newest,
    /// which is named if any is), and the queries of the others.
    pub fn snapshot(&self) -> (Vec<(u64, u64)>, u64) {
        let mut places = self.lock();
        self.join_places_of_one_name(&mut places);
        let mut newest: HashMap<Place, u64> = HashMap::default();
        for (&cgroup, &place) in &places.of_cgroup {
            let cgroup_of_place = newest.entry(place).or_insert(cgroup);
            *cgroup_of_place = (*cgroup_of_place).max(cgroup);
        }
        let mut counts: Vec<(u64, u64)> = newest
            .into_iter()
            .map(|(place, cgroup)| (cgroup, places.queries.get(&place).copied().unwrap_or(0)))
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

    /// Names from a table the test changes: a cgroup is named when the test says so.
    fn named(names: &Arc<Mutex<HashMap<u64, &'static str>>>) -> NameOf {
        let names = Arc::clone(names);
        Box::new(move |cgroup| {
            names
                .lock()
                .unwrap()
                .get(&cgroup)
                .map(|&name| Arc::from(name))
        })
    }

    fn unnamed() -> NameOf {
        Box::new(|_| None)
    }

    #[test]
    fn the_first_cgroups_are_counted_apart_and_the_rest_together() {
        let stats = WorkloadStats::new(2, unnamed());
        for cgroup in [7, 8, 7, 9, 10, 0, 8] {
            stats.query(cgroup);
        }
        assert_eq!(stats.snapshot(), (vec![(7, 2), (8, 2)], 3));
    }

    #[test]
    fn a_cgroup_that_is_gone_gives_its_place_to_the_next() {
        let stats = WorkloadStats::new(2, unnamed());
        for cgroup in [7, 8, 9] {
            stats.query(cgroup);
        }
        assert_eq!(stats.forget(|cgroup| cgroup == 7), 1);
        stats.query(9);
        stats.query(10);
        assert_eq!(stats.snapshot(), (vec![(8, 1), (9, 1)], 2));
    }

    /// A unit restarted is one workload in a new cgroup each time: it keeps one place, and
    /// leaves the others to other workloads (helper-198: each restart took a place).
    #[test]
    fn a_workload_in_a_new_cgroup_keeps_its_one_place() {
        let names = Arc::new(Mutex::new(HashMap::default()));
        let stats = WorkloadStats::new(2, named(&names));
        // Named before it asks: it joins at once.
        for cgroup in [7, 8, 9] {
            names.lock().unwrap().insert(cgroup, "unit=restart.service");
            stats.query(cgroup);
        }
        // Named only after its first query: a place of its own until then, joined once
        // another workload finds no room.
        stats.query(10);
        names.lock().unwrap().insert(10, "unit=restart.service");
        names.lock().unwrap().insert(11, "unit=other.service");
        stats.query(11);
        stats.query(10);
        stats.query(12);
        assert_eq!(stats.snapshot(), (vec![(10, 5), (11, 1)], 1));
        // The restarted unit's cgroups gone but its newest: it keeps its place and count.
        assert_eq!(stats.forget(|cgroup| cgroup < 10), 3);
        assert_eq!(stats.snapshot(), (vec![(10, 5), (11, 1)], 1));
        // All gone: its place goes to the next.
        assert_eq!(stats.forget(|cgroup| cgroup == 10), 1);
        stats.query(12);
        assert_eq!(stats.snapshot(), (vec![(11, 1), (12, 1)], 1));
    }

    /// A unit restarting without pause gets no more than its place of cgroups: past that,
    /// its new cgroups are counted with the others until the gone are forgotten.
    #[test]
    fn the_cgroups_of_one_place_are_bounded() {
        let names = Arc::new(Mutex::new(HashMap::default()));
        let stats = WorkloadStats::new(1, named(&names));
        let cgroups = u64::try_from(CGROUPS_PER_PLACE).unwrap() + 10;
        for cgroup in 1..=cgroups {
            names.lock().unwrap().insert(cgroup, "unit=loop.service");
            stats.query(cgroup);
        }
        assert_eq!(stats.cgroups().len(), CGROUPS_PER_PLACE);
        assert_eq!(
            stats.snapshot(),
            (vec![(u64::try_from(CGROUPS_PER_PLACE).unwrap(), 64)], 10)
        );
    }
}
