//! The one shutdown primitive every listener uses: the UDP listeners on their threads, the TCP
//! proxy and the metrics server.
//!
//! A stop comes in two steps. A [`Signal`] tells whoever watches it to stop taking work as it
//! does while serving (the agent's run sends one when it is asked to stop, the TCP proxy one to
//! its connections when it drains, the UDP listener one to its pool readers and sweeper). Then,
//! once the redirect is off, each listener drains: it keeps answering what still arrives
//! ([`Deadline::next_arrival`]) until nothing has for [`QUIET`] and nothing is in flight, or
//! until the [`Deadline`] every listener shares, and says what it left unfinished.
use std::{future::Future, time::Duration};

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// While draining, a listener stops once nothing has arrived for this long and nothing is in
/// flight.
pub const QUIET: Duration = Duration::from_millis(300);

/// A request to stop, sent once to every clone. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Signal(CancellationToken);

impl Signal {
    pub fn new() -> Self {
        Self::default()
    }

    /// Sends the request: every clone's [`stopped`](Self::stopped) resolves.
    pub fn stop(&self) {
        self.0.cancel();
    }

    pub fn is_stopped(&self) -> bool {
        self.0.is_cancelled()
    }

    /// Resolves once the request has been sent.
    pub async fn stopped(&self) {
        self.0.cancelled().await;
    }

    /// What `work` resolves to, or `None` if the request comes first.
    pub async fn unless_stopped<T>(&self, work: impl Future<Output = T>) -> Option<T> {
        tokio::select! {
            () = self.0.cancelled() => None,
            done = work => Some(done),
        }
    }
}

/// When draining ends, whatever is left: one for every listener of the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadline(Instant);

impl Deadline {
    /// `timeout` from now.
    pub fn after(timeout: Duration) -> Self {
        Self(Instant::now() + timeout)
    }

    /// The next thing that arrives (what `arrival` makes resolves to), to be handled before
    /// asking again; `None` once nothing has arrived for [`QUIET`] while `idle` says nothing
    /// is in flight, or at the deadline.
    pub async fn next_arrival<F: Future>(
        self,
        mut arrival: impl FnMut() -> F,
        idle: impl Fn() -> bool,
    ) -> Option<F::Output> {
        loop {
            tokio::select! {
                () = tokio::time::sleep_until(self.0) => return None,
                arrived = tokio::time::timeout(QUIET, arrival()) => match arrived {
                    Ok(arrived) => return Some(arrived),
                    Err(_quiet) if idle() => return None,
                    Err(_quiet) => {}
                },
            }
        }
    }

    /// `by` before this one (already past, if it is less than `by` away).
    pub fn earlier_by(self, by: Duration) -> Self {
        Self(self.0.checked_sub(by).unwrap_or(self.0))
    }

    /// How long until it comes (zero once it has).
    pub fn remaining(self) -> Duration {
        self.0.saturating_duration_since(Instant::now())
    }

    /// What `work` resolves to, or `None` if the deadline comes first.
    pub async fn within<T>(self, work: impl Future<Output = T>) -> Option<T> {
        tokio::time::timeout_at(self.0, work).await.ok()
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::atomic::{AtomicBool, AtomicUsize, Ordering},
        time::Instant,
    };

    use super::*;

    #[tokio::test]
    async fn a_signal_reaches_every_clone_and_cuts_work_short() {
        let signal = Signal::new();
        let watcher = signal.clone();
        assert_eq!(watcher.unless_stopped(async { 7 }).await, Some(7));
        signal.stop();
        assert!(watcher.is_stopped());
        watcher.stopped().await;
        assert_eq!(
            watcher.unless_stopped(std::future::pending::<()>()).await,
            None
        );
    }

    #[tokio::test]
    async fn draining_hands_out_arrivals_then_ends_when_quiet_and_idle() {
        let deadline = Deadline::after(Duration::from_secs(5));
        let arrivals = AtomicUsize::new(0);
        let arrive = || async {
            match arrivals.fetch_add(1, Ordering::Relaxed) {
                n @ 0..3 => n,
                _ => std::future::pending().await,
            }
        };
        let started = Instant::now();
        let mut handled = Vec::new();
        while let Some(n) = deadline.next_arrival(arrive, || true).await {
            handled.push(n);
        }
        assert_eq!(handled, [0, 1, 2]);
        let took = started.elapsed();
        assert!(took >= QUIET && took < QUIET * 4, "{took:?}");
    }

    #[tokio::test]
    async fn draining_waits_for_what_is_in_flight_until_the_deadline() {
        let deadline = Deadline::after(QUIET * 3);
        let in_flight = AtomicBool::new(true);
        let started = Instant::now();
        let nothing = || std::future::pending::<()>();
        assert_eq!(
            deadline
                .next_arrival(nothing, || !in_flight.load(Ordering::Relaxed))
                .await,
            None
        );
        let took = started.elapsed();
        assert!(took >= QUIET * 3, "ended before the deadline: {took:?}");
        in_flight.store(false, Ordering::Relaxed);
        assert_eq!(deadline.within(std::future::pending::<()>()).await, None);
        assert_eq!(deadline.within(async { 1 }).await, Some(1));
    }
}
