//! Distinct values per key per window, with bounded memory: the compromise signal.
//!
//! A phished password is used from many places at once. Counting how many distinct
//! client networks one user sent from in the last hour gives that away long before a
//! volume limit fills up. This module is the pure algorithm; stores keep a
//! [`DistinctState`] per key behind the [`DistinctStore`] trait
//! ([`DistinctMemoryStore`](crate::store::DistinctMemoryStore) in process, and the
//! Redis store with the cargo feature `redis`).
//!
//! # What is decided
//!
//! A [`DistinctLimit`] of `max` per `window` is **crossed** at an observation when more
//! than `max` distinct values were observed in the `window` ending at it (an interval
//! `(now - window, now]`). A key is **flagged** at time `t` while some observation in
//! `(t - window, t]` crossed the limit: the flag lasts a whole window after the last
//! observation that crossed it, so an abuser who keeps spreading stays flagged, and one
//! who stops is released a window later.
//!
//! # Bounded memory, exact answer
//!
//! A state keeps at most `max + 1` entries, `(value hash, last seen)`: the `max + 1`
//! values seen most recently. That is enough to decide exactly: more than `max` values
//! were seen in the window if and only if the `max + 1` most recently seen values were
//! all seen within it. When a new value arrives and the state is full, the entry seen
//! longest ago is evicted; it can never again be among the `max + 1` most recent
//! without being observed again, which re-inserts it. Whatever a client does — a
//! million random addresses — a key costs `max + 1` entries of 16 bytes and one flag.
//!
//! Observing is idempotent: the same value observed again only moves its last-seen
//! time, so observing one message at several stages counts its network once.
//!
//! # Examples
//!
//! ```
//! use ratelimit_core::distinct::{DistinctLimit, DistinctState};
//! use ratelimit_core::Timestamp;
//! use std::time::Duration;
//!
//! let limit = DistinctLimit::new(2, Duration::from_secs(3600)).unwrap();
//! let mut state = DistinctState::new();
//! let t = Timestamp::from_millis(1_700_000_000_000);
//! assert!(!state.observe(1, &limit, t).is_flagged());
//! assert!(!state.observe(2, &limit, t).is_flagged());
//! assert!(!state.observe(2, &limit, t).is_flagged()); // seen already
//! let third = state.observe(3, &limit, t);
//! assert!(third.is_flagged() && third.newly_flagged);
//! assert_eq!(state.len(), 3); // never more than max + 1
//! ```

use std::fmt;
use std::time::Duration;

use crate::clock::{Timestamp, duration_to_millis};
use crate::decision::StoreError;
use crate::quota::{MAX_WINDOW_MS, fmt_window};

/// "More than `max` distinct values per `window`", checked when built.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DistinctLimit {
    /// At most [`DistinctLimit::MAX_THRESHOLD`]: a state holds `max + 1` entries, and
    /// the Redis script reads them all on every observation.
    max: u32,
    window_ms: u64,
}

/// Why a [`DistinctLimit`] cannot be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DistinctLimitError {
    /// The threshold is zero or above [`DistinctLimit::MAX_THRESHOLD`].
    #[error("the threshold must be from 1 to {}", DistinctLimit::MAX_THRESHOLD)]
    Threshold,
    /// The window is zero, not whole milliseconds, or too long.
    #[error("the window must be whole milliseconds, at least 1ms and at most 8900 years")]
    Window,
}

impl DistinctLimit {
    /// The largest threshold accepted.
    pub const MAX_THRESHOLD: u32 = 1000;

    /// More than `max` distinct values per `window` crosses the limit.
    pub fn new(max: u32, window: Duration) -> Result<DistinctLimit, DistinctLimitError> {
        if max == 0 || max > Self::MAX_THRESHOLD {
            return Err(DistinctLimitError::Threshold);
        }
        let window_ms = duration_to_millis(window);
        if window_ms == 0
            || window_ms > MAX_WINDOW_MS
            || !window.subsec_nanos().is_multiple_of(1_000_000)
        {
            return Err(DistinctLimitError::Window);
        }
        Ok(DistinctLimit { max, window_ms })
    }

    /// The threshold: more than this many values crosses the limit.
    pub fn max(&self) -> u32 {
        self.max
    }

    /// The window.
    pub fn window(&self) -> Duration {
        Duration::from_millis(self.window_ms)
    }

    /// The window in milliseconds.
    pub fn window_ms(&self) -> u64 {
        self.window_ms
    }

    /// The most entries a state keeps under this limit: `max + 1`.
    pub fn capacity(&self) -> usize {
        self.max as usize + 1
    }
}

impl fmt::Display for DistinctLimit {
    /// `>5/1h`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, ">{}/{}", self.max, fmt_window(self.window_ms))
    }
}

/// What an observation found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use = "a flag is data: check `is_flagged()`"]
pub struct Observation {
    /// Distinct values seen in the window ending now, counted up to `max + 1` (the
    /// state keeps no more).
    pub distinct: u32,
    /// Until when the key is flagged (exclusive), if it is flagged now.
    pub flagged_until: Option<Timestamp>,
    /// Whether this observation raised the flag (it was not flagged just before).
    pub newly_flagged: bool,
}

impl Observation {
    /// Whether the key is flagged now.
    pub fn is_flagged(&self) -> bool {
        self.flagged_until.is_some()
    }
}

/// One value seen: its hash and when it was last seen (ms).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    /// The value's hash (the store picks the hash function).
    pub hash: u64,
    /// When it was last seen, ms since the epoch.
    pub at: u64,
}

/// The state of one key: at most `max + 1` recently seen values and a flag.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DistinctState {
    /// A `Vec` grown one slot at a time (`reserve_exact`), so its capacity never
    /// exceeds the `max + 1` entries it may hold.
    entries: Vec<Seen>,
    /// Flagged while `now < flagged_until` (ms; 0 = never flagged).
    flagged_until: u64,
    /// When nothing in this state matters any more (every entry out of its window and
    /// the flag down): the memory store forgets the key then, Redis expires it.
    idle_at: u64,
}

impl DistinctState {
    /// An empty state.
    pub fn new() -> DistinctState {
        DistinctState::default()
    }

    /// Records that `value_hash` was seen at `now` and says whether the key is flagged.
    ///
    /// A clock stepped backwards is tolerated: a last-seen time never moves back.
    pub fn observe(
        &mut self,
        value_hash: u64,
        limit: &DistinctLimit,
        now: Timestamp,
    ) -> Observation {
        let now = now.as_millis();
        let window = limit.window_ms;
        let was_flagged = now < self.flagged_until;
        let cap = limit.capacity();
        if let Some(e) = self.entries.iter_mut().find(|e| e.hash == value_hash) {
            e.at = e.at.max(now);
        } else {
            // Out-of-window entries can never count again.
            self.entries.retain(|e| e.at.saturating_add(window) > now);
            // A tier with a lower threshold than before: keep the most recent.
            while self.entries.len() >= cap {
                self.evict_oldest();
            }
            self.entries.reserve_exact(1);
            self.entries.push(Seen {
                hash: value_hash,
                at: now,
            });
        }
        let distinct = self.count_in_window(window, now);
        if distinct > limit.max {
            self.flagged_until = self.flagged_until.max(now.saturating_add(window));
        }
        let newest = self.entries.iter().map(|e| e.at).max().unwrap_or(0);
        self.idle_at = self.flagged_until.max(newest.saturating_add(window));
        Observation {
            distinct,
            flagged_until: (now < self.flagged_until)
                .then_some(Timestamp::from_millis(self.flagged_until)),
            newly_flagged: !was_flagged && now < self.flagged_until,
        }
    }

    /// What [`DistinctState::observe`] would say about the key at `now`, recording
    /// nothing.
    pub fn peek(&self, limit: &DistinctLimit, now: Timestamp) -> Observation {
        let now = now.as_millis();
        Observation {
            distinct: self.count_in_window(limit.window_ms, now),
            flagged_until: (now < self.flagged_until)
                .then_some(Timestamp::from_millis(self.flagged_until)),
            newly_flagged: false,
        }
    }

    fn count_in_window(&self, window: u64, now: u64) -> u32 {
        let n = self
            .entries
            .iter()
            .filter(|e| e.at.saturating_add(window) > now)
            .count();
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    fn evict_oldest(&mut self) {
        if let Some((i, _)) = self.entries.iter().enumerate().min_by_key(|(_, e)| e.at) {
            self.entries.swap_remove(i);
        }
    }

    /// Whether nothing in this state matters at `now` any more.
    pub fn is_idle(&self, now: Timestamp) -> bool {
        now.as_millis() >= self.idle_at
    }

    /// When the state becomes idle (ms since the epoch).
    pub fn idle_at(&self) -> u64 {
        self.idle_at
    }

    /// Until when the key is flagged (ms since the epoch; 0 if it never was).
    pub fn flagged_until(&self) -> u64 {
        self.flagged_until
    }

    /// The values kept (at most `max + 1`).
    pub fn entries(&self) -> &[Seen] {
        &self.entries
    }

    /// The number of values kept.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no value is kept.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Bytes this state owns on the heap (its entries' buffer).
    pub fn heap_bytes(&self) -> usize {
        self.entries.capacity() * std::mem::size_of::<Seen>()
    }
}

/// Where [`DistinctState`]s live.
///
/// # Contract
///
/// [`DistinctStore::observe`] on one key is atomic against every other caller of the
/// same store (threads, processes, hosts sharing the backend): it records `value` and
/// decides as [`DistinctState::observe`] does, in one step. Every store keeps at most
/// `limit.capacity()` values per key. Values are compared exactly by the Redis store and
/// by a 64-bit keyed hash in memory (a collision, about one in 2^64 per pair, would
/// count two values once).
pub trait DistinctStore: Send + Sync {
    /// Records that `key` was seen with `value` at `now`; says whether `key` is flagged.
    fn observe(
        &self,
        key: &str,
        value: &str,
        limit: &DistinctLimit,
        now: Timestamp,
    ) -> Result<Observation, StoreError>;

    /// Forgets everything observed for `key`; returns whether anything was.
    fn forget(&self, key: &str) -> Result<bool, StoreError>;
}

impl<S: DistinctStore + ?Sized> DistinctStore for std::sync::Arc<S> {
    fn observe(
        &self,
        key: &str,
        value: &str,
        limit: &DistinctLimit,
        now: Timestamp,
    ) -> Result<Observation, StoreError> {
        (**self).observe(key, value, limit, now)
    }

    fn forget(&self, key: &str) -> Result<bool, StoreError> {
        (**self).forget(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: u64 = 1_700_000_000_000;
    const H: u64 = 3_600_000;

    fn at(ms: u64) -> Timestamp {
        Timestamp::from_millis(T + ms)
    }

    fn hourly(max: u32) -> DistinctLimit {
        DistinctLimit::new(max, Duration::from_secs(3600)).unwrap()
    }

    #[test]
    fn limits_are_checked_when_built() {
        assert_eq!(
            DistinctLimit::new(0, Duration::from_secs(1)),
            Err(DistinctLimitError::Threshold)
        );
        assert_eq!(
            DistinctLimit::new(1001, Duration::from_secs(1)),
            Err(DistinctLimitError::Threshold)
        );
        assert_eq!(
            DistinctLimit::new(5, Duration::ZERO),
            Err(DistinctLimitError::Window)
        );
        assert_eq!(
            DistinctLimit::new(5, Duration::from_micros(1500)),
            Err(DistinctLimitError::Window)
        );
        assert_eq!(hourly(5).to_string(), ">5/1h");
        assert_eq!(hourly(5).capacity(), 6);
    }

    #[test]
    fn the_first_value_past_the_threshold_flags_for_a_window() {
        let l = hourly(3);
        let mut s = DistinctState::new();
        for v in 0..3 {
            let o = s.observe(v, &l, at(v * 1000));
            assert_eq!((o.distinct, o.is_flagged()), (v as u32 + 1, false));
        }
        let o = s.observe(9, &l, at(5000));
        assert_eq!(o.distinct, 4);
        assert_eq!(o.flagged_until, Some(at(5000 + H)));
        assert!(o.newly_flagged);
        // Seen again: still flagged, not newly.
        let o = s.observe(0, &l, at(6000));
        assert!(o.is_flagged() && !o.newly_flagged);
        // A window after the last crossing, the flag is down and the old values gone.
        let o = s.peek(&l, at(6000 + H));
        assert_eq!((o.distinct, o.is_flagged()), (0, false));
        assert!(s.is_idle(at(6000 + H)));
    }

    #[test]
    fn the_same_value_counts_once() {
        let l = hourly(1);
        let mut s = DistinctState::new();
        for i in 0..100 {
            assert!(!s.observe(42, &l, at(i)).is_flagged());
        }
        assert_eq!(s.len(), 1);
    }

    #[test]
    fn values_seen_more_than_a_window_apart_do_not_add_up() {
        let l = hourly(2);
        let mut s = DistinctState::new();
        let _ = s.observe(1, &l, at(0));
        let _ = s.observe(2, &l, at(H / 2));
        let o = s.observe(3, &l, at(H)); // 1 has just left the window
        assert_eq!((o.distinct, o.is_flagged()), (2, false));
        let o = s.observe(1, &l, at(H + 1));
        assert_eq!((o.distinct, o.is_flagged()), (3, true));
    }

    #[test]
    fn spreading_on_keeps_the_flag_up() {
        let l = hourly(2);
        let mut s = DistinctState::new();
        let mut t = 0;
        for v in 0..3 {
            let _ = s.observe(v, &l, at(t));
            t += 1000;
        }
        for v in 3..1000 {
            t += 10 * 60 * 1000 / 3; // a new network every 200 s
            let o = s.observe(v, &l, at(t));
            assert!(o.is_flagged(), "{v}");
            assert_eq!(o.flagged_until, Some(at(t + H)));
            assert!(s.len() <= 3);
        }
    }

    #[test]
    fn a_million_values_keep_max_plus_one_entries() {
        let l = hourly(5);
        let mut s = DistinctState::new();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for i in 0..1_000_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let _ = s.observe(x, &l, at(i));
            assert!(s.len() <= 6);
        }
        assert_eq!(s.len(), 6);
        assert!(s.heap_bytes() <= 6 * std::mem::size_of::<Seen>());
    }

    #[test]
    fn a_lower_threshold_trims_the_state() {
        let mut s = DistinctState::new();
        for v in 0..10 {
            let _ = s.observe(v, &hourly(20), at(v));
        }
        assert_eq!(s.len(), 10);
        let o = s.observe(99, &hourly(2), at(100));
        assert_eq!(s.len(), 3);
        assert!(o.is_flagged());
        // The most recent ones were kept.
        let mut kept: Vec<u64> = s.entries().iter().map(|e| e.hash).collect();
        kept.sort_unstable();
        assert_eq!(kept, [8, 9, 99]);
    }

    #[test]
    fn a_clock_stepping_back_loses_nothing() {
        let l = hourly(1);
        let mut s = DistinctState::new();
        let _ = s.observe(1, &l, at(10_000));
        let o = s.observe(2, &l, at(0));
        assert!(o.is_flagged());
        let _ = s.observe(1, &l, at(5000));
        assert_eq!(
            s.entries().iter().find(|e| e.hash == 1).map(|e| e.at),
            Some(T + 10_000)
        );
    }
}
