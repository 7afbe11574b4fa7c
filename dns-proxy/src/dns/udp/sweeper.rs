//! The sweeper: every so often, the queries not answered within the upstream timeout are
//! forgotten (their clients time out, as they would have without the proxy), and a client
//! whose upstream is late gets a stale answer, if the cache holds one.
use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use super::{
    LOG, UdpProxy,
    cached::{Leading, Recipient},
    pending::{Pending, PendingKey},
};
use crate::dns::{OriginalDestinations, cache::CacheableQuery, coalesce::Waiter, stats::Stats};

/// How long a client waits for the upstream before it gets a stale answer, if the cache holds
/// one within --serve-stale: RFC 8767's client response timer. The sweeper serves it at its
/// last tick before this has passed, so a client waits at most this long, at least this less
/// one tick (1.55 s with the default --upstream-timeout).
pub const STALE_AFTER: Duration = Duration::from_millis(1800);

/// A query whose client is served a stale answer, its upstream being late.
struct Overdue<'a> {
    to: Recipient<'a>,
    query: CacheableQuery,
    head: Box<[u8]>,
    /// The clients of identical queries that waited on it.
    waiters: Vec<Waiter>,
}

impl<D: OriginalDestinations> UdpProxy<D> {
    /// Forgets, every so often, the queries not answered within the upstream timeout. Their
    /// clients time out, as they would have without the proxy, unless the cache holds a stale
    /// answer for them (`--serve-stale`): they get it once they have waited [`STALE_AFTER`].
    pub(super) async fn expire_unanswered(self: &Arc<Self>) {
        let timeout = self.settings.upstream_timeout;
        let every = (timeout / 10).clamp(Duration::from_millis(10), Duration::from_millis(250));
        let mut ticks = tokio::time::interval(every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if self.workers.unless_stopped(ticks.tick()).await.is_none() {
                return;
            }
            let now = Instant::now();
            let (expired, overdue) = {
                let mut table = self.pending.lock().expect("not poisoned");
                let expired: Vec<(PendingKey, Pending)> = table
                    .extract_if(|pending| now.duration_since(pending.started.instant) >= timeout);
                let overdue: Vec<Overdue<'_>> = table
                    .values_mut()
                    .filter_map(|pending| {
                        let to = pending.recipient(self);
                        let cached = pending.cached.as_mut()?;
                        // At the last tick before STALE_AFTER has passed, not the first after:
                        // a tick of 250 ms had clients wait up to 2.04 s, past the 2 s some
                        // give up at (helper-172).
                        if !cached.stale_kept
                            || cached.served_stale
                            || now.duration_since(pending.started.instant) + every < STALE_AFTER
                        {
                            return None;
                        }
                        cached.served_stale = true;
                        // Late enough to count as failing: a TCP retry (the stale answer may
                        // come truncated) is answered stale too.
                        if let Some(cache) = &self.settings.cache {
                            cache.upstream_failed(&cached.query.key, pending.started.instant, now);
                        }
                        let waiters = cached
                            .leading
                            .as_ref()
                            .map(Leading::serve_stale)
                            .unwrap_or_default();
                        Some(Overdue {
                            to,
                            query: cached.query.clone(),
                            head: cached.head.clone(),
                            waiters,
                        })
                    })
                    .collect();
                (expired, overdue)
            };
            for Overdue {
                to,
                query,
                head,
                waiters,
            } in overdue
            {
                self.answer_stale(&query, &head, to);
                for waiter in waiters {
                    self.answer_stale(&waiter.query, &waiter.head, waiter.recipient());
                }
            }
            let stats = &self.stats.udp;
            for (key, mut pending) in expired {
                let socket = &pending.socket;
                if socket.peer().is_some() && !socket.answered_since(pending.started.instant) {
                    self.disconnect_upstream(key.upstream, socket.id());
                }
                pending.socket.settled();
                Stats::add(&stats.upstream_timeouts);
                // The count is of every server's since the last such line (helper-187).
                self.timeout_log.warn(|timed_out| {
                    format!(
                        "{}: no answer within --upstream-timeout ({timeout:?}); {timed_out} UDP \
                         queries unanswered (to this server and any other) since the last such \
                         line",
                        key.upstream
                    )
                });
                if let Some(description) = &pending.description {
                    log::debug!(
                        target: LOG,
                        "query udp client={} upstream={} {description} timed out after {timeout:?} workload={}",
                        pending.client,
                        key.upstream,
                        self.workload_name(pending.cgroup),
                    );
                }
                if let Some(cached) = pending.cached.take() {
                    let waited = self.settle_cached(*cached, None, pending.recipient(self), false);
                    stats
                        .upstream_timeouts
                        .fetch_add(waited, std::sync::atomic::Ordering::Relaxed);
                }
                stats.settled(1);
            }
        }
    }
}
