//! Who hears of each query and answer besides the client: the dnstap log, the names each
//! workload resolved, the per-workload counts, and the workloads' names for debug lines. UDP
//! and TCP tell them the same things at the same moments, through here.
use std::sync::Arc;

use super::{
    Moment,
    query_log::{Asked, QueryLog},
    workload_stats::WorkloadStats,
};
use crate::{resolutions::Resolutions, workload::WorkloadNames};

/// The log, the names table and the counts are `None` when off.
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

    /// An answer went to its client at `now`, to the query that arrived at `asked_at`
    /// (`None`: a TCP answer to no query known, which the log leaves out; its names are
    /// recorded).
    pub fn answered(&self, asked: Asked, asked_at: Option<Moment>, answer: &[u8], now: Moment) {
        if let (Some(log), Some(asked_at)) = (&self.query_log, asked_at) {
            // The query's own wall-clock reading, as its CLIENT_QUERY had it: one derived from
            // the monotonic latency differed by up to tens of µs (helper-171).
            log.response(asked, asked_at.wall, now.wall, answer);
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

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, SocketAddr};

    use super::*;
    use crate::{dnstap::Transport, resolutions::tests::answer};

    #[test]
    fn each_observer_hears_what_it_keeps_and_an_answer_to_no_known_query_is_not_logged() {
        let workloads = Arc::new(WorkloadNames::new("/nonexistent".into()));
        // A log whose sink never started counts every event it is given as dropped.
        let query_log = Arc::new(QueryLog::new(Arc::clone(&workloads)));
        let observers = Observers {
            workloads: Some(Arc::clone(&workloads)),
            query_log: Some(Arc::clone(&query_log)),
            resolutions: Some(Arc::new(Resolutions::new(Arc::clone(&workloads)))),
            workload_stats: Some(Arc::new(WorkloadStats::new(
                10,
                Box::new(|_| Some(Arc::from("unit=test.service"))),
            ))),
        };
        let asked = Asked {
            transport: Transport::Udp,
            client: SocketAddr::from(([127, 0, 0, 1], 40000)),
            server: SocketAddr::from(([192, 0, 2, 53], 53)),
            cgroup: 7,
        };
        let logged = || query_log.counters().dropped();
        let resolved = |observers: &Observers| {
            let rows = observers
                .resolutions
                .as_ref()
                .unwrap()
                .lookup("cgroup-id=7", Some(IpAddr::from([192, 0, 2, 80])));
            rows.len()
        };

        observers.asked(asked, b"query", Moment::now());
        assert_eq!(logged(), 1);
        let (counts, _) = observers.workload_stats.as_ref().unwrap().snapshot();
        assert_eq!(counts, [(Arc::from("unit=test.service"), 1)]);

        observers.answered(asked, None, &answer("www.example.test."), Moment::now());
        assert_eq!(
            logged(),
            1,
            "an answer with no query known is left out of the log"
        );
        assert_eq!(resolved(&observers), 1, "but its names are recorded");

        observers.answered(
            asked,
            Some(Moment::now()),
            &answer("www.example.test."),
            Moment::now(),
        );
        assert_eq!(logged(), 2);

        // All off: nothing to call, and workloads are named by cgroup id.
        let off = Observers::default();
        off.asked(asked, b"query", Moment::now());
        off.answered(
            asked,
            Some(Moment::now()),
            &answer("www.example.test."),
            Moment::now(),
        );
        assert_eq!(&*off.workload_name(7), "cgroup-id=7");
    }
}
