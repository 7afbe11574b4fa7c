//! Log lines for events that can come in floods: at most one per interval, with a count. What
//! a counting limiter held back since its last line is said once that line is an interval old
//! ([`say_held_back`]), and when the agent stops or the limiter goes: a burst that ends is
//! said whole, where only its first event was, and the rest with the next line of its kind,
//! if one came.
use std::{
    sync::{
        Arc, Mutex, PoisonError, Weak,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

#[derive(Debug)]
pub struct RateLimited {
    limiter: Arc<Limiter>,
}

#[derive(Debug)]
struct Limiter {
    interval: Duration,
    /// When the last line was written; `None`: never.
    last: Mutex<Option<Instant>>,
    /// Events since the last line, not yet said.
    held_back: AtomicU64,
    /// What an event is, for the line that says those held back ("TCP connections refused");
    /// `None`: not said (a line about a state, whose count means nothing).
    what: Option<&'static str>,
}

/// The counting limiters alive, for [`say_held_back`]. A limiter is dropped with its owner;
/// its entry here goes at the next call.
static COUNTING: Mutex<Vec<Weak<Limiter>>> = Mutex::new(Vec::new());

impl RateLimited {
    /// A limiter for a line about a state (a thread wedged, a reader gone): what it holds back
    /// is never said on its own.
    pub fn new(interval: Duration) -> Self {
        Self::with(interval, None)
    }

    /// A limiter for a line that counts events: those it holds back are said by
    /// [`say_held_back`] as "N more `what` since the last such lines".
    pub fn counting(interval: Duration, what: &'static str) -> Self {
        let limited = Self::with(interval, Some(what));
        COUNTING
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Arc::downgrade(&limited.limiter));
        limited
    }

    fn with(interval: Duration, what: Option<&'static str>) -> Self {
        Self {
            limiter: Arc::new(Limiter {
                interval,
                last: Mutex::new(None),
                held_back: AtomicU64::new(0),
                what,
            }),
        }
    }

    /// Logs `message(events since the last line)` at warn level, unless a line was written less
    /// than the interval ago. Returns whether it wrote.
    pub fn warn(&self, message: impl FnOnce(u64) -> String) -> bool {
        let limiter = &self.limiter;
        limiter.held_back.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        let events = {
            let Ok(mut last) = limiter.last.try_lock() else {
                return false; // another thread is writing the line right now
            };
            if last.is_some_and(|last| now.duration_since(last) < limiter.interval) {
                return false;
            }
            *last = Some(now);
            limiter.held_back.swap(0, Ordering::Relaxed)
        };
        let line = message(events);
        log::warn!("{line}");
        true
    }
}

impl Limiter {
    /// What it held back, if any and its last line is an interval old (or `now_anyway`), taken
    /// as said now. Its last line stays when it was: the next event is written in full at
    /// once, naming its server or client (a sweep that counted as a line hid every failure
    /// of a slow trickle behind "N more" lines: helper-113).
    fn take_held_back(&self, now: Instant, now_anyway: bool) -> Option<(u64, &'static str)> {
        let what = self.what?;
        let last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        let due = now_anyway || last.is_none_or(|last| now.duration_since(last) >= self.interval);
        if !due || self.held_back.load(Ordering::Relaxed) == 0 {
            return None;
        }
        Some((self.held_back.swap(0, Ordering::Relaxed), what))
    }
}

impl Drop for Limiter {
    /// Says what it held back: its owner is gone (a listener at the end of its drain), and
    /// [`say_held_back`] no longer sees it.
    fn drop(&mut self) {
        let held_back = *self.held_back.get_mut();
        if let (Some(what), 1..) = (self.what, held_back) {
            log::warn!("{held_back} more {what} since the last such lines");
        }
    }
}

/// Says, for each counting limiter alive, what it held back since its last line, once that line
/// is an interval old; with `at_stop`, whatever it held back. Limiters of one kind (one per
/// UDP thread) are said together, in one line. Returns the lines, also logged.
pub fn say_held_back(at_stop: bool) -> Vec<String> {
    let now = Instant::now();
    let limiters: Vec<Arc<Limiter>> = {
        let mut counting = COUNTING.lock().unwrap_or_else(PoisonError::into_inner);
        counting.retain(|limiter| limiter.strong_count() > 0);
        counting.iter().filter_map(Weak::upgrade).collect()
    };
    let mut by_kind: Vec<(&'static str, u64)> = Vec::new();
    for (events, what) in limiters
        .iter()
        .filter_map(|limiter| limiter.take_held_back(now, at_stop))
    {
        match by_kind.iter_mut().find(|(kind, _)| *kind == what) {
            Some((_, total)) => *total += events,
            None => by_kind.push((what, events)),
        }
    }
    let lines: Vec<String> = by_kind
        .into_iter()
        .map(|(what, events)| format!("{events} more {what} since the last such lines"))
        .collect();
    for line in &lines {
        log::warn!("{line}");
    }
    lines
}

/// Says what the counting limiters held back ([`say_held_back`]) every second until `stop`, and
/// once more then, whatever it is.
pub async fn say_held_back_until(stop: crate::drain::Signal) {
    let mut every = tokio::time::interval(Duration::from_secs(1));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let stopping = tokio::select! {
            () = stop.stopped() => true,
            _ = every.tick() => false,
        };
        say_held_back(stopping);
        if stopping {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_once_per_interval_with_the_count_in_between() {
        let limited = RateLimited::new(Duration::from_millis(200));
        let mut counts = Vec::new();
        assert!(limited.warn(|n| {
            counts.push(n);
            String::new()
        }));
        for _ in 0..5 {
            assert!(!limited.warn(|_| unreachable!()));
        }
        std::thread::sleep(Duration::from_millis(250));
        assert!(limited.warn(|n| {
            counts.push(n);
            String::new()
        }));
        assert_eq!(counts, [1, 6]);
    }

    /// What `limited` held back and would be said now (or at stop).
    fn held_back(limited: &RateLimited, at_stop: bool) -> Option<u64> {
        let taken = limited.limiter.take_held_back(Instant::now(), at_stop);
        taken.map(|(events, _)| events)
    }

    #[test]
    fn what_a_counting_limiter_held_back_is_said_once_its_line_is_an_interval_old() {
        let limited = RateLimited::counting(Duration::from_millis(200), "test events");
        assert!(limited.warn(|_| String::new()));
        assert_eq!(held_back(&limited, false), None, "nothing held back");
        for _ in 0..1459 {
            assert!(!limited.warn(|_| unreachable!()));
        }
        assert_eq!(held_back(&limited, false), None, "the line is too recent");
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(held_back(&limited, false), Some(1459));
        assert_eq!(held_back(&limited, false), None, "said once");
        // The next event is written in full at once, as the line is old: the sweep said a
        // count, and named nothing.
        let mut counts = Vec::new();
        assert!(limited.warn(|n| {
            counts.push(n);
            String::new()
        }));
        assert_eq!(counts, [1]);
        assert!(!limited.warn(|_| unreachable!()));
        assert_eq!(held_back(&limited, false), None, "the line is recent");
        assert_eq!(held_back(&limited, true), Some(1), "at stop");
    }

    #[test]
    fn a_state_limiter_says_nothing_more() {
        let limited = RateLimited::new(Duration::from_millis(10));
        assert!(limited.warn(|_| String::new()));
        assert!(!limited.warn(|_| unreachable!()));
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(held_back(&limited, true), None);
    }

    #[test]
    fn the_counting_limiters_alive_are_said_by_kind_and_the_dropped_forgotten() {
        let said = |what: &str| {
            say_held_back(false)
                .into_iter()
                .filter(|line| line.contains(what))
                .collect::<Vec<_>>()
        };
        // Two of one kind (as each UDP thread has its own), and one dropped.
        let alive =
            [(); 2].map(|()| RateLimited::counting(Duration::from_millis(10), "test events alive"));
        let dropped = RateLimited::counting(Duration::from_millis(10), "test events dropped");
        for limited in alive.iter().chain([&dropped]) {
            assert!(limited.warn(|_| String::new()));
            assert!(!limited.warn(|_| unreachable!()));
        }
        drop(dropped);
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(
            said("test events alive"),
            ["2 more test events alive since the last such lines"]
        );
        assert!(said("test events dropped").is_empty());
    }
}
