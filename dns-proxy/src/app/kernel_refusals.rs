//! What the kernel side refused or could not do, said in the log. The programs count it
//! (`COUNTERS`, on `/metrics` as `dns_proxy_kernel_*`), but an operator without a scraper reads
//! only the log, and these counts are the only trace of lookups that never reached the agent:
//! a second agent in another network namespace makes every lookup of the cgroup fail with
//! `EPERM` while both agents say they are ready, and only the refusals tell.
//!
//! A table with no room for an origin is said by the programs themselves (`table_full`,
//! `shared_index`, `workload_limit`, through aya-log), so it is not said here again.
use std::time::Duration;

use dns_proxy_common::Counter;
use tokio::time::Instant;

use super::LOG;
use crate::{drain, ebpf::KernelCounters};

/// How often the counters are read: the first refusal is said within this long.
const LOOK_EVERY: Duration = Duration::from_secs(1);

/// At most one line per counter this often, with the count since the last one: a flood of
/// refusals cannot flood the log.
const SAY_AT_MOST_EVERY: Duration = Duration::from_secs(10);

/// The counters said in the log, each with what its count is and what it means.
const SAID: [(Counter, &str); 9] = [
    (
        Counter::ForeignRefused,
        "connects or sends of a workload to a proxy address that is not its own were refused \
         (EPERM), or packets to a proxy address from outside dropped: a process passing for \
         another workload, or, in node mode, a second dns-proxy redirecting this cgroup tree from \
         another network namespace (every lookup of the tree then fails: run one agent per \
         cgroup tree), or a user-space network relay (slirp4netns, pasta: rootless containers) \
         re-sending its sandbox's queries (keep such sandboxes out of the tree)",
    ),
    (
        Counter::ImpersonationRefused,
        "binds of, or sends from, a proxy address were refused to sockets other than the \
         agent's: a process trying to answer as a DNS server, or another agent of this cgroup \
         tree with a state dir of its own (`dns-proxy exec` must share the agent's)",
    ),
    (
        Counter::RawRefused,
        "packets of raw sockets to a proxy address were dropped: nothing checks whose address a \
         raw packet uses",
    ),
    (
        Counter::ConnectedNotNoted,
        "sockets connected to a proxy address could not be noted (65,536 at once): once their \
         workload's cgroup is gone, their server's index may be given to another server while \
         they still use it",
    ),
    (
        Counter::ExcludeMadeFailed,
        "cgroups made at an --exclude-cgroup path could not be excluded by the kernel as they \
         were made: the agent excludes them when it sees them, which races their first lookups",
    ),
    (
        Counter::UnknownIndex,
        "packets to a proxy address that names no server were refused (port unreachable), and \
         answers or peer names from one left alone: a process asking a proxy address directly, or sockets connected under a table \
         of servers that is gone (the state directory lost between agents: such sockets fail \
         until they connect again)",
    ),
    (
        Counter::StaleIndexHeld,
        "proxy addresses that named no server were held for the UDP sockets still connected \
         to them, under a table of servers that is gone (the state directory's bpffs lost \
         between agents): their lookups fail (port unreachable) until they connect again, and \
         the addresses are given to no other server while they stay",
    ),
    // The agent's own lines count only the refusals it saw, before the kernel took over
    // (helper-186: 5 of 22,000 failures said).
    (
        Counter::ClosedPortRefused,
        "UDP datagrams to a server whose port the agent found closed were refused by the \
         kernel (port unreachable, as from the server) for 2 s after: lookups failed at once, \
         as asking it directly, without reaching the agent",
    ),
    (
        Counter::AgentUnresponsive,
        "DNS connects and sends went direct, and packets to a proxy address were refused, \
         because the agent had not said it runs for 3 s (stopped, frozen, or a UDP thread \
         wedged)",
    ),
];

/// Reads `counters` every [`LOOK_EVERY`] and says what rose, until `stop`, and once more then.
pub(super) async fn say_kernel_refusals(
    counters: std::sync::Arc<KernelCounters>,
    stop: drain::Signal,
) {
    let mut said = Said::new(Instant::now());
    let mut every = tokio::time::interval(LOOK_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut unreadable = false;
    loop {
        let stopping = tokio::select! {
            () = stop.stopped() => true,
            _ = every.tick() => false,
        };
        match counters.try_read() {
            Ok(values) => {
                unreadable = false;
                for line in said.lines(&values, Instant::now(), stopping) {
                    log::warn!(target: LOG, "{line}");
                }
            }
            Err(err) if !unreadable => {
                unreadable = true;
                log::warn!(
                    target: LOG,
                    "cannot read the kernel side's counters ({err}): its refusals go unsaid in \
                     the log (and unshown on /metrics) until they can be read"
                );
            }
            Err(_) => {}
        }
        if stopping {
            return;
        }
    }
}

/// What has been said of each counter in [`SAID`]: its value and when.
struct Said {
    start: Instant,
    /// Per entry of [`SAID`]: the value last said (0 at first) and when (`None`: never).
    last: [(u64, Option<Instant>); SAID.len()],
}

impl Said {
    fn new(start: Instant) -> Self {
        Self {
            start,
            last: [(0, None); SAID.len()],
        }
    }

    /// The lines to log for `values` read at `now`: one for each counter that rose since it
    /// was last said, unless that was less than [`SAY_AT_MOST_EVERY`] ago (`always`: even
    /// then, as at stop, so nothing goes unsaid).
    fn lines(&mut self, values: &[(Counter, u64)], now: Instant, always: bool) -> Vec<String> {
        let mut lines = Vec::new();
        for ((counter, meaning), (last_value, last_said)) in SAID.iter().zip(&mut self.last) {
            let Some(&(_, value)) = values.iter().find(|(read, _)| read == counter) else {
                continue;
            };
            let rose = value.saturating_sub(*last_value);
            let since = last_said.unwrap_or(self.start);
            let recent = last_said.is_some_and(|at| now - at < SAY_AT_MOST_EVERY);
            if rose == 0 || (recent && !always) {
                continue;
            }
            let seconds = (now - since).as_secs_f64();
            lines.push(format!(
                "{rose} {meaning} [kernel {counter:?}, in the last {seconds:.0} s; {value} since start]"
            ));
            *last_value = value;
            *last_said = Some(now);
        }
        lines
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rise_is_said_at_once_then_at_most_every_ten_seconds_with_the_count_between() {
        let start = Instant::now();
        let mut said = Said::new(start);
        let at = |seconds: u64| start + Duration::from_secs(seconds);
        let foreign =
            |value: u64| vec![(Counter::ForeignRefused, value), (Counter::Redirected, 99)];

        assert!(said.lines(&foreign(0), at(1), false).is_empty());
        let first = said.lines(&foreign(3), at(2), false);
        assert_eq!(first.len(), 1, "{first:?}");
        assert!(first[0].starts_with("3 connects or sends"), "{first:?}");
        assert!(
            first[0].contains("in the last 2 s; 3 since start"),
            "{first:?}"
        );
        assert!(first[0].contains("ForeignRefused"), "{first:?}");

        // More within ten seconds: not said yet, and counted into the next line.
        assert!(said.lines(&foreign(10), at(5), false).is_empty());
        assert!(said.lines(&foreign(50), at(11), false).is_empty());
        let next = said.lines(&foreign(60), at(12), false);
        assert_eq!(next.len(), 1, "{next:?}");
        assert!(next[0].starts_with("57 connects"), "{next:?}");
        assert!(
            next[0].contains("in the last 10 s; 60 since start"),
            "{next:?}"
        );

        // At stop, what rose since is said whenever the last line was.
        let last = said.lines(&foreign(61), at(13), true);
        assert_eq!(last.len(), 1, "{last:?}");
        assert!(last[0].starts_with("1 connects"), "{last:?}");
        assert!(said.lines(&foreign(61), at(14), true).is_empty());
    }

    #[test]
    fn counters_not_said_here_are_left_out() {
        let mut said = Said::new(Instant::now());
        let values: Vec<_> = Counter::ALL.iter().map(|&counter| (counter, 0)).collect();
        assert!(said.lines(&values, Instant::now(), true).is_empty());
        let risen: Vec<_> = Counter::ALL.iter().map(|&counter| (counter, 5)).collect();
        let lines = said.lines(&risen, Instant::now(), true);
        assert_eq!(lines.len(), SAID.len(), "{lines:#?}");
        for quiet in [
            Counter::Redirected,
            Counter::TableFull,
            Counter::SharedIndex,
            Counter::WorkloadLimit,
            Counter::ExcludedAsMade,
        ] {
            let name = format!("kernel {quiet:?},");
            assert!(!lines.iter().any(|line| line.contains(&name)), "{lines:#?}");
        }
    }
}
