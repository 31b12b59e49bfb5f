//! When "now" is: the [`Clock`] trait, the wall clock, and a manual clock for tests.
//!
//! Algorithm code never reads the time itself; every decision takes a [`Timestamp`]
//! from an injected clock. Timestamps are **wall-clock milliseconds since the Unix
//! epoch**, so state that is persisted (snapshots) or shared (Redis) means the same
//! thing after a restart and on every host.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A point in time: milliseconds since the Unix epoch (wall clock).
///
/// Milliseconds are the tick of every algorithm here: `retry_after` values are exact
/// to the millisecond, and a `u64` of them lasts for 584 million years.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Timestamp(u64);

impl Timestamp {
    /// The Unix epoch.
    pub const EPOCH: Timestamp = Timestamp(0);

    /// A timestamp `ms` milliseconds after the Unix epoch.
    pub const fn from_millis(ms: u64) -> Self {
        Timestamp(ms)
    }

    /// Milliseconds since the Unix epoch.
    pub const fn as_millis(self) -> u64 {
        self.0
    }

    /// This timestamp moved `d` later (saturating).
    pub fn saturating_add(self, d: Duration) -> Self {
        Timestamp(self.0.saturating_add(duration_to_millis(d)))
    }

    /// Time from `earlier` to `self`, zero if `earlier` is later.
    pub fn saturating_duration_since(self, earlier: Timestamp) -> Duration {
        Duration::from_millis(self.0.saturating_sub(earlier.0))
    }
}

/// Whole milliseconds of `d`, saturating at `u64::MAX`.
pub(crate) fn duration_to_millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// A source of the current time.
///
/// Implementations must be cheap: the limiter calls [`Clock::now`] once per decision.
///
/// # Examples
///
/// Tests use [`ManualClock`] and advance it instead of sleeping; a clock of your own
/// is one method, here the wall clock read through a cache another thread refreshes:
///
/// ```
/// use std::sync::atomic::{AtomicU64, Ordering};
/// use ratelimit_core::{Clock, SystemClock, Timestamp};
///
/// struct Cached(AtomicU64);
///
/// impl Cached {
///     fn refresh(&self) {
///         self.0.store(SystemClock.now().as_millis(), Ordering::Relaxed);
///     }
/// }
///
/// impl Clock for Cached {
///     fn now(&self) -> Timestamp {
///         Timestamp::from_millis(self.0.load(Ordering::Relaxed))
///     }
/// }
///
/// let clock = Cached(AtomicU64::new(0));
/// clock.refresh();
/// assert!(clock.now() > Timestamp::EPOCH);
/// ```
pub trait Clock: Send + Sync {
    /// The current time.
    fn now(&self) -> Timestamp;
}

impl<C: Clock + ?Sized> Clock for Arc<C> {
    fn now(&self) -> Timestamp {
        (**self).now()
    }
}

impl<C: Clock + ?Sized> Clock for &C {
    fn now(&self) -> Timestamp {
        (**self).now()
    }
}

/// The system's wall clock.
///
/// A clock stepped backwards (NTP) is tolerated by the algorithms: time never runs
/// backwards for a counter, and nothing recorded is lost.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        let since = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO);
        Timestamp(duration_to_millis(since))
    }
}

/// A clock that moves only when told to. Clones share the same time.
///
/// # Examples
///
/// ```
/// use ratelimit_core::{Clock, ManualClock, Timestamp};
/// use std::time::Duration;
///
/// let clock = ManualClock::new(Timestamp::from_millis(1_000));
/// clock.advance(Duration::from_secs(2));
/// assert_eq!(clock.now(), Timestamp::from_millis(3_000));
/// ```
#[derive(Debug, Clone, Default)]
pub struct ManualClock {
    ms: Arc<AtomicU64>,
}

impl ManualClock {
    /// A manual clock showing `start`.
    pub fn new(start: Timestamp) -> Self {
        ManualClock {
            ms: Arc::new(AtomicU64::new(start.0)),
        }
    }

    /// Moves the clock forward by `d`.
    pub fn advance(&self, d: Duration) {
        self.ms.fetch_add(duration_to_millis(d), Ordering::SeqCst);
    }

    /// Sets the clock to `t` (it may go backwards, as a wall clock can).
    pub fn set(&self, t: Timestamp) {
        self.ms.store(t.0, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        Timestamp(self.ms.load(Ordering::SeqCst))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn system_clock_is_after_2020() {
        assert!(SystemClock.now().as_millis() > 1_577_836_800_000);
    }

    #[test]
    fn manual_clock_clones_share_time() {
        let a = ManualClock::new(Timestamp::from_millis(5));
        let b = a.clone();
        a.advance(Duration::from_millis(7));
        assert_eq!(b.now(), Timestamp::from_millis(12));
        b.set(Timestamp::from_millis(1));
        assert_eq!(a.now(), Timestamp::from_millis(1));
    }
}
