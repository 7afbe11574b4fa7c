//! Log lines for events that can come in floods: at most one per interval, with a count.
use std::{
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

#[derive(Debug)]
pub struct RateLimited {
    interval: Duration,
    last: Mutex<Option<Instant>>,
    suppressed: AtomicU64,
}

impl RateLimited {
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            last: Mutex::new(None),
            suppressed: AtomicU64::new(0),
        }
    }

    /// Logs `message(events since the last line)` at warn level, unless a line was written less
    /// than the interval ago. Returns whether it wrote.
    pub fn warn(&self, message: impl FnOnce(u64) -> String) -> bool {
        let events = self.suppressed.fetch_add(1, Ordering::Relaxed) + 1;
        let now = Instant::now();
        {
            let Ok(mut last) = self.last.try_lock() else {
                return false; // another thread is writing the line right now
            };
            if last.is_some_and(|last| now.duration_since(last) < self.interval) {
                return false;
            }
            *last = Some(now);
        }
        self.suppressed.fetch_sub(events, Ordering::Relaxed);
        let line = message(events);
        log::warn!("{line}");
        true
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
}
