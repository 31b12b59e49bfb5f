//! At most one log line per interval for events a client can repeat at will.
//!
//! A key flood makes every request a store failure, a garbage flood makes every
//! connection a bad request, and an address outside the allowlist can connect as often
//! as it likes. Logged one line each, a flood becomes a flood of the log: journald then
//! drops lines (its rate limit), including the incident lines that matter. A
//! [`LogThrottle`] lets the first event through, then one per interval, each saying how
//! many were left out since the last one. (Metrics still count every event.)

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The interval the server uses: one line per repeated kind of event every 10 s.
pub const LOG_EVERY: Duration = Duration::from_secs(10);

/// Lets one event per interval be logged, and counts the others.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use ratelimit_policyd::logthrottle::LogThrottle;
///
/// static BAD: LogThrottle = LogThrottle::new(Duration::from_secs(3600));
/// assert_eq!(BAD.allow(), Some(0)); // the first one is logged
/// assert_eq!(BAD.allow(), None); // the next ones are counted
/// assert_eq!(BAD.allow(), None);
/// ```
#[derive(Debug)]
pub struct LogThrottle {
    every_ms: u64,
    /// Milliseconds since the process's first throttled event before which nothing more
    /// is logged; `0` lets the very first event through.
    next_ms: AtomicU64,
    suppressed: AtomicU64,
}

fn elapsed_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    let start = START.get_or_init(Instant::now);
    u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX)
}

impl LogThrottle {
    /// One event per `every` (rounded down to whole milliseconds).
    pub const fn new(every: Duration) -> LogThrottle {
        LogThrottle {
            every_ms: every.as_millis() as u64,
            next_ms: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(n)` when this event should be logged, `n` being the events left out since
    /// the last one logged; `None` when it should not (it is counted).
    pub fn allow(&self) -> Option<u64> {
        self.allow_at(elapsed_ms())
    }

    /// [`LogThrottle::allow`] at `now_ms` on a clock of the caller's (the policy's
    /// clock, so a test's manual clock decides too); times must not go backwards.
    pub fn allow_at(&self, now: u64) -> Option<u64> {
        let next = self.next_ms.load(Ordering::Relaxed);
        if now >= next
            && self
                .next_ms
                .compare_exchange(
                    next,
                    now.saturating_add(self.every_ms).max(1),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
        {
            return Some(self.suppressed.swap(0, Ordering::Relaxed));
        }
        self.suppressed.fetch_add(1, Ordering::Relaxed);
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_counting_the_rest() {
        let t = LogThrottle::new(Duration::from_millis(50));
        assert_eq!(t.allow(), Some(0));
        for _ in 0..1000 {
            assert_eq!(t.allow(), None);
        }
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(t.allow(), Some(1000));
        assert_eq!(t.allow(), None);
    }

    #[test]
    fn on_the_callers_clock_one_line_per_interval() {
        let t = LogThrottle::new(LOG_EVERY);
        assert_eq!(t.allow_at(1_000), Some(0));
        assert_eq!(t.allow_at(2_000), None);
        assert_eq!(t.allow_at(10_999), None);
        assert_eq!(t.allow_at(11_000), Some(2));
        assert_eq!(t.allow_at(11_001), None);
    }

    #[test]
    fn many_threads_log_once() {
        let t = LogThrottle::new(Duration::from_secs(3600));
        let lines: Vec<u64> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|_| s.spawn(|| (0..1000).filter_map(|_| t.allow()).collect::<Vec<_>>()))
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().unwrap())
                .collect()
        });
        assert_eq!(lines.len(), 1, "{lines:?}");
        // Events counted by other threads just before the one line was logged are
        // reported in it; none is lost.
        assert_eq!(lines[0] + t.suppressed.load(Ordering::Relaxed), 3999);
    }
}
