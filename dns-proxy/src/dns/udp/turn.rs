//! A UDP thread's tasks take turns: the listener and the answers' relays wait on their sockets
//! through a [`Turn`], so that none keeps the thread from its other tasks, the tick that tells
//! the heartbeat the thread runs among them (a thread silent for 1.5 s is taken for wedged,
//! and the redirect goes off).
use std::{
    future::{Future, poll_fn},
    io,
    pin::pin,
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use tokio::{
    io::{Interest, Ready},
    net::UdpSocket,
};

/// The longest a task runs before it lets the thread's other tasks run, however much of
/// tokio's budget it has left: a budget counts batches, and a batch can cost milliseconds of
/// wall clock on CPUs a flood shares (helper-190: 40 workloads flooding a server that never
/// answers; 128 batches took over 1.5 s, and the redirect went off).
pub const LONGEST_TURN: Duration = Duration::from_millis(20);

/// One task's waits on its socket, and since when it has run without waiting (an atomic, not
/// a `Cell`, only so that the task's future, which borrows it, may be sent to its thread).
pub struct Turn {
    origin: Instant,
    /// Since `origin`, in nanoseconds.
    since: AtomicU64,
}

impl Turn {
    pub fn new() -> Self {
        Self {
            origin: Instant::now(),
            since: AtomicU64::new(0),
        }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn begin(&self) {
        self.since.store(self.now(), Ordering::Relaxed);
    }

    fn used_up(&self) -> bool {
        let ran = self
            .now()
            .saturating_sub(self.since.load(Ordering::Relaxed));
        ran >= LONGEST_TURN.as_nanos() as u64
    }

    /// `socket.ready(interest)`, after giving up the task's turn if it is used up: at the cost
    /// of a unit of tokio's cooperative budget, as a `recv` of tokio's own would cost (its
    /// readiness costs none: a listener that a flood kept readable, each batch full, never
    /// yielded), and once [`LONGEST_TURN`] has passed since it last waited.
    pub async fn ready(&self, socket: &UdpSocket, interest: Interest) -> io::Result<Ready> {
        self.noting_a_wait(tokio::task::coop::consume_budget())
            .await;
        if self.used_up() {
            tokio::task::yield_now().await;
            self.begin();
        }
        self.noting_a_wait(socket.ready(interest)).await
    }

    /// [`ready`](Self::ready) to read.
    pub async fn readable(&self, socket: &UdpSocket) -> io::Result<()> {
        self.ready(socket, Interest::READABLE).await.map(drop)
    }

    /// What `future` resolves to; a new turn begins if it had to wait (the thread's other
    /// tasks could run meanwhile).
    async fn noting_a_wait<F: Future>(&self, future: F) -> F::Output {
        let mut future = pin!(future);
        let mut waited = false;
        let output = poll_fn(|cx| {
            let poll = future.as_mut().poll(cx);
            waited |= poll.is_pending();
            poll
        })
        .await;
        if waited {
            self.begin();
        }
        output
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    };

    use super::*;

    /// A socket with a datagram queued that nobody reads: ready at once, every time, as a
    /// listener's is under a flood that fills each batch.
    async fn always_readable() -> UdpSocket {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let sender = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        sender
            .send_to(b"never read", socket.local_addr().unwrap())
            .await
            .unwrap();
        // Seen readable by tokio: from here on, ready at once.
        socket.readable().await.unwrap();
        socket
    }

    /// A task that sets the flag once it runs.
    fn other_task() -> Arc<AtomicBool> {
        let ran = Arc::new(AtomicBool::new(false));
        tokio::spawn({
            let ran = Arc::clone(&ran);
            async move { ran.store(true, Ordering::SeqCst) }
        });
        ran
    }

    /// How many waits (each followed by `work`) a task makes before the thread's other task
    /// runs; `None` past 10,000.
    async fn waits_before_the_other_task_runs(work: impl Fn()) -> Option<usize> {
        let socket = always_readable().await;
        let other_ran = other_task();
        let turn = Turn::new();
        for waits in 0..10_000 {
            turn.readable(&socket).await.unwrap();
            turn.ready(&socket, Interest::READABLE | Interest::ERROR)
                .await
                .unwrap();
            if other_ran.load(Ordering::SeqCst) {
                return Some(waits);
            }
            work();
        }
        None
    }

    /// Quick batches: the budget (128 units) ends the turn. Without it, tokio's readiness
    /// alone: 10,000 waits, and no other task ran (a FORMERR flood starved a UDP thread's
    /// tick: e2e `a_flood_the_agent_answers_itself_never_turns_the_redirect_off`).
    #[tokio::test]
    async fn waits_on_a_socket_that_stays_readable_let_the_threads_other_tasks_run() {
        let waits = waits_before_the_other_task_runs(|| {}).await;
        assert!(waits.is_some_and(|waits| waits < 128), "{waits:?}");
    }

    /// Slow batches: the clock ends the turn, long before the budget would (128 batches of 5 ms
    /// are 640 ms).
    #[tokio::test]
    async fn a_turn_of_slow_batches_ends_after_its_time() {
        let batch = Duration::from_millis(5);
        let waits = waits_before_the_other_task_runs(|| std::thread::sleep(batch)).await;
        let most = usize::try_from(LONGEST_TURN.as_millis() / batch.as_millis()).unwrap() + 1;
        assert!(waits.is_some_and(|waits| waits <= most), "{waits:?}");
    }
}
