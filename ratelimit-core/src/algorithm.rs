//! How it is decided: the sliding-window and token-bucket (GCRA) algorithms over one
//! key's [`KeyState`].
//!
//! This is pure code over plain data: no locks, no clock, no I/O. A [`Store`](crate::Store)
//! owns the states and makes [`KeyState::apply`] atomic per key; the Redis store runs a
//! script that mirrors this file line for line.
//!
//! # Sliding window
//!
//! A limit `N/W` with precision `P` splits time into sub-windows of `s = W / P`
//! milliseconds, numbered `floor(t / s)`. A check at time `t` (sub-window `b`) counts
//! the cost recorded in sub-windows `b-P ..= b` — `P+1` of them, a span that starts
//! at most `W + s` before `t`. Every interval of length `W` that ends at an accepted
//! event lies inside that span, so the cost accepted in any interval of length `W`
//! never exceeds `N`; the over-count is at most one sub-window of time.
//! Only sub-windows with a count are stored (a user who sends a few messages an
//! hour keeps a few entries).
//!
//! # Token bucket
//!
//! GCRA expressed as a level: the bucket holds `level / W` units, drains `N` units per
//! `W`, and holds at most `burst`. The level is kept in unit·milliseconds, so
//! `retry_after` is exact to the millisecond and the level means the same thing in
//! any tier (moving a key to a tier with another rate keeps what it sent).

use std::time::Duration;

use smallvec::SmallVec;

use crate::clock::Timestamp;
use crate::decision::{Cost, Decision, Denial, LimitStatus, MAX_LIMITS, Mode};
use crate::quota::{Algorithm, CounterId, Limit};

/// One sub-window with a non-zero count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Slot {
    /// Sub-window number `floor(t / s)`, truncated to 32 bits (compared with wrapping
    /// arithmetic; keys idle for a whole window are cleared before that could matter).
    pub(crate) idx: u32,
    /// Units recorded in it (at most the limit's count, a `u32`).
    pub(crate) count: u32,
}

/// The stored state of one counter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum CounterData {
    /// Non-empty sub-windows, oldest first.
    Window(SmallVec<[Slot; 2]>),
    /// Token bucket: `level` in unit·ms, as of `last` (ms since the epoch).
    Bucket { level: u64, last: u64 },
}

/// One counter of a key, identified by its limit's [`CounterId`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Counter {
    pub(crate) id: CounterId,
    pub(crate) data: CounterData,
}

/// Everything recorded for one key: one counter per distinct limit shape.
///
/// Public so that a custom [`Store`](crate::Store) can keep states however it likes
/// and still decide exactly as the built-in stores do.
///
/// # Examples
///
/// ```
/// use ratelimit_core::{Cost, KeyState, Limit, Mode, Timestamp};
///
/// let limits = ["2/1m".parse::<Limit>().unwrap()];
/// let mut state = KeyState::new();
/// let t = Timestamp::from_millis(1_000_000);
/// assert!(state.apply(&limits, Cost::units(1), t, Mode::Acquire).is_allowed());
/// assert!(state.apply(&limits, Cost::units(1), t, Mode::Acquire).is_allowed());
/// let refused = state.apply(&limits, Cost::units(1), t, Mode::Acquire);
/// assert!(!refused.is_allowed());
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyState {
    /// When every counter will have decayed to nothing (ms since the epoch). At or
    /// after it the state is empty and the key may be swept.
    pub(crate) idle_at: u64,
    pub(crate) counters: SmallVec<[Counter; 1]>,
}

/// What phase one found for one limit.
#[derive(Clone, Copy, Default)]
struct Probe {
    used: u64,
    admit: bool,
    retry_after: Option<Duration>,
    remaining_if_recorded: u64,
    remaining_now: u64,
}

impl KeyState {
    /// An empty state.
    pub fn new() -> Self {
        KeyState::default()
    }

    /// Whether nothing is recorded that still counts at `now`: the key may be forgotten.
    pub fn is_idle(&self, now: Timestamp) -> bool {
        self.counters.is_empty() || now.as_millis() >= self.idle_at
    }

    /// Checks `cost` against every limit at `now`; in [`Mode::Acquire`], if all admit,
    /// records it on each distinct counter. A refused or peeked event changes nothing
    /// that any later decision can see.
    pub fn apply(&mut self, limits: &[Limit], cost: Cost, now: Timestamp, mode: Mode) -> Decision {
        let now_ms = now.as_millis();
        let live = !self.is_idle(now);
        let mut statuses = [LimitStatus::default(); MAX_LIMITS];
        let mut denial = None;
        let mut probes = [Probe::default(); MAX_LIMITS];
        for (i, limit) in limits.iter().enumerate() {
            let counter = if live {
                self.find(limit.counter_id())
            } else {
                None
            };
            let p = probe(limit, counter, cost.get(limit.unit()), now_ms);
            if !p.admit && denial.is_none() {
                denial = Some(Denial {
                    limit: i,
                    retry_after: p.retry_after,
                });
            }
            if let Some(slot) = probes.get_mut(i) {
                *slot = p;
            }
        }
        let record = mode == Mode::Acquire && denial.is_none();
        for (i, (status, limit)) in statuses.iter_mut().zip(limits).enumerate() {
            let p = probes[i];
            *status = LimitStatus {
                used: p.used,
                limit: capacity(limit),
                remaining: if record {
                    p.remaining_if_recorded
                } else {
                    p.remaining_now
                },
            };
        }
        if record {
            if !live {
                self.counters.clear();
                self.idle_at = 0;
            }
            for (i, limit) in limits.iter().enumerate() {
                let id = limit.counter_id();
                if limits[..i].iter().any(|l| l.counter_id() == id) {
                    continue; // a counter shared by two limits is charged once
                }
                let expiry = self.record(limit, cost.get(limit.unit()), now_ms);
                self.idle_at = self.idle_at.max(expiry);
            }
        }
        Decision::new(denial, &statuses[..limits.len().min(MAX_LIMITS)])
    }

    /// Units counted against `limit` at `now` (for inspection: `show USER`, top senders).
    pub fn used(&self, limit: &Limit, now: Timestamp) -> u64 {
        if self.is_idle(now) {
            return 0;
        }
        probe(limit, self.find(limit.counter_id()), 0, now.as_millis()).used
    }

    /// The number of counters held (for memory accounting and tests).
    pub fn counter_count(&self) -> usize {
        self.counters.len()
    }

    fn find(&self, id: CounterId) -> Option<&Counter> {
        self.counters.iter().find(|c| c.id == id)
    }

    /// Records `cost` on `limit`'s counter; returns when that counter will be empty.
    fn record(&mut self, limit: &Limit, cost: u64, now_ms: u64) -> u64 {
        let id = limit.counter_id();
        let pos = match self.counters.iter().position(|c| c.id == id) {
            Some(pos) => pos,
            None => {
                let data = match limit.algorithm() {
                    Algorithm::SlidingWindow { .. } => CounterData::Window(SmallVec::new()),
                    Algorithm::TokenBucket { .. } => CounterData::Bucket { level: 0, last: 0 },
                };
                self.counters.push(Counter { id, data });
                self.counters.len() - 1
            }
        };
        let counter = &mut self.counters[pos];
        match (&mut counter.data, limit.algorithm()) {
            (CounterData::Window(slots), Algorithm::SlidingWindow { precision }) => {
                let sub = limit.sub_ms();
                let p = i64::from(precision);
                let b_abs = now_ms / sub;
                let b = b_abs as u32;
                slots.retain(|s| age(b, s.idx) <= p);
                // cost <= count <= u32::MAX here: it was admitted.
                let cost = u32::try_from(cost).unwrap_or(u32::MAX);
                match slots.last_mut() {
                    // The current sub-window, or a later one if the clock stepped back.
                    Some(last) if age(b, last.idx) <= 0 => {
                        last.count = last.count.saturating_add(cost);
                        let newest = b_abs.saturating_add_signed(-age(b, last.idx));
                        (newest + 1 + u64::from(precision)).saturating_mul(sub)
                    }
                    _ => {
                        if cost > 0 {
                            slots.push(Slot {
                                idx: b,
                                count: cost,
                            });
                        }
                        (b_abs + 1 + u64::from(precision)).saturating_mul(sub)
                    }
                }
            }
            (CounterData::Bucket { level, last }, Algorithm::TokenBucket { .. }) => {
                let n = u128::from(limit.count());
                let w = u128::from(limit.window_ms());
                let lvl = drained(*level, *last, limit, now_ms);
                let new = (lvl + u128::from(cost) * w).min(u128::from(u64::MAX));
                *level = new as u64;
                *last = (*last).max(now_ms);
                let empty_in = new.div_ceil(n);
                u64::try_from(u128::from(*last) + empty_in).unwrap_or(u64::MAX)
            }
            // The id encodes the algorithm, so a mismatch cannot happen; start over if
            // a corrupt store ever produced one.
            (data, _) => {
                *data = match limit.algorithm() {
                    Algorithm::SlidingWindow { .. } => CounterData::Window(SmallVec::new()),
                    Algorithm::TokenBucket { .. } => CounterData::Bucket { level: 0, last: 0 },
                };
                self.record(limit, cost, now_ms)
            }
        }
    }
}

/// The most a limit admits from empty: its count, or a bucket's burst.
fn capacity(limit: &Limit) -> u64 {
    match limit.algorithm() {
        Algorithm::SlidingWindow { .. } => limit.count(),
        Algorithm::TokenBucket { burst } => u64::from(burst),
    }
}

/// Age of sub-window `idx` seen from sub-window `b` (negative: in the future).
fn age(b: u32, idx: u32) -> i64 {
    i64::from(b.wrapping_sub(idx) as i32)
}

/// A bucket's level at `now_ms`, after draining since `last`.
fn drained(level: u64, last: u64, limit: &Limit, now_ms: u64) -> u128 {
    let elapsed = u128::from(now_ms.saturating_sub(last));
    u128::from(level).saturating_sub(elapsed * u128::from(limit.count()))
}

fn probe(limit: &Limit, counter: Option<&Counter>, cost: u64, now_ms: u64) -> Probe {
    match limit.algorithm() {
        Algorithm::SlidingWindow { precision } => {
            let slots: &[Slot] = match counter.map(|c| &c.data) {
                Some(CounterData::Window(s)) => s,
                _ => &[],
            };
            probe_window(limit, precision, slots, cost, now_ms)
        }
        Algorithm::TokenBucket { burst } => {
            let (level, last) = match counter.map(|c| &c.data) {
                Some(CounterData::Bucket { level, last }) => (*level, *last),
                _ => (0, 0),
            };
            probe_bucket(limit, burst, level, last, cost, now_ms)
        }
    }
}

fn probe_window(limit: &Limit, precision: u16, slots: &[Slot], cost: u64, now_ms: u64) -> Probe {
    let n = limit.count();
    let sub = limit.sub_ms();
    let p = i64::from(precision);
    let b_abs = now_ms / sub;
    let b = b_abs as u32;
    let used: u64 = slots
        .iter()
        .filter(|s| age(b, s.idx) <= p)
        .map(|s| u64::from(s.count))
        .sum();
    let admit = used.saturating_add(cost) <= n;
    let retry_after = if admit || cost > n {
        None
    } else {
        // Oldest first: when enough sub-windows have left the window to fit `cost`.
        let mut left = used;
        let mut when = None;
        for s in slots.iter().filter(|s| age(b, s.idx) <= p) {
            left -= u64::from(s.count);
            if left + cost <= n {
                // Saturating: a slot far in the future (the clock stepped back, or a
                // restored snapshot says so) must not overflow.
                let leaves_at = (b_abs as i64 - age(b, s.idx) + p + 1).max(0) as u64;
                let leaves_at = leaves_at.saturating_mul(sub);
                when = Some(Duration::from_millis(leaves_at.saturating_sub(now_ms)));
                break;
            }
        }
        when
    };
    Probe {
        used,
        admit,
        retry_after,
        remaining_if_recorded: n.saturating_sub(used.saturating_add(cost)),
        remaining_now: n.saturating_sub(used),
    }
}

fn probe_bucket(limit: &Limit, burst: u32, level: u64, last: u64, cost: u64, now_ms: u64) -> Probe {
    let n = u128::from(limit.count());
    let w = u128::from(limit.window_ms());
    let cap = u128::from(burst) * w;
    let lvl = drained(level, last, limit, now_ms);
    let need = u128::from(cost) * w;
    let admit = lvl + need <= cap;
    let retry_after = if admit || need > cap {
        None
    } else {
        let ms = (lvl + need - cap).div_ceil(n);
        Some(Duration::from_millis(u64::try_from(ms).unwrap_or(u64::MAX)))
    };
    let units = |v: u128| u64::try_from(v).unwrap_or(u64::MAX);
    Probe {
        used: units(lvl.div_ceil(w)),
        admit,
        retry_after,
        remaining_if_recorded: units(cap.saturating_sub(lvl + need) / w),
        remaining_now: units(cap.saturating_sub(lvl) / w),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quota::Unit;

    const T0: u64 = 1_700_000_000_000; // a multiple of 60 s

    fn at(ms: u64) -> Timestamp {
        Timestamp::from_millis(T0 + ms)
    }

    fn acquire(s: &mut KeyState, limits: &[Limit], cost: u64, t: u64) -> Decision {
        s.apply(limits, Cost::units(cost), at(t), Mode::Acquire)
    }

    #[test]
    fn window_admits_exactly_the_count_then_refuses() {
        let l = ["3/1m".parse::<Limit>().unwrap()];
        let mut s = KeyState::new();
        for i in 0..3 {
            let d = acquire(&mut s, &l, 1, i * 1000);
            assert!(d.is_allowed(), "event {i}");
            assert_eq!(d.statuses()[0].remaining, 2 - i);
        }
        let d = acquire(&mut s, &l, 1, 3000);
        let denial = d.denial().unwrap();
        assert_eq!(denial.limit, 0);
        // Sub-windows are 1 s; the first event (sub-window 0) leaves the counted span
        // when sub-window 61 begins.
        assert_eq!(
            denial.retry_after,
            Some(Duration::from_millis(61_000 - 3_000))
        );
        assert!(acquire(&mut s, &l, 1, 60_999).denial().is_some());
        assert!(acquire(&mut s, &l, 1, 61_000).is_allowed());
    }

    #[test]
    fn cost_larger_than_the_limit_is_never_admitted() {
        let l = ["3/1m".parse::<Limit>().unwrap()];
        let mut s = KeyState::new();
        let d = acquire(&mut s, &l, 4, 0);
        assert_eq!(d.denial().unwrap().retry_after, None);
        assert!(s.counters.is_empty());
    }

    #[test]
    fn refused_events_record_nothing_and_peek_records_nothing() {
        let l = ["2/1m".parse::<Limit>().unwrap()];
        let mut s = KeyState::new();
        assert!(s.apply(&l, Cost::units(2), at(0), Mode::Peek).is_allowed());
        assert!(s.counters.is_empty());
        acquire(&mut s, &l, 2, 0);
        let before = s.clone();
        assert!(acquire(&mut s, &l, 1, 10).denial().is_some());
        assert_eq!(s, before);
    }

    #[test]
    fn all_or_nothing_across_limits() {
        let l = [
            "10/1m".parse::<Limit>().unwrap(),
            "2/1h".parse::<Limit>().unwrap(),
        ];
        let mut s = KeyState::new();
        assert!(acquire(&mut s, &l, 1, 0).is_allowed());
        assert!(acquire(&mut s, &l, 1, 0).is_allowed());
        let d = acquire(&mut s, &l, 1, 0);
        assert_eq!(d.denial().unwrap().limit, 1);
        // The refusal by the hourly limit did not charge the per-minute one.
        assert_eq!(s.used(&l[0], at(0)), 2);
    }

    #[test]
    fn limits_sharing_a_counter_are_charged_once() {
        let l = [
            "10/1h".parse::<Limit>().unwrap(),
            "20/1h".parse::<Limit>().unwrap(),
        ];
        let mut s = KeyState::new();
        acquire(&mut s, &l, 3, 0);
        assert_eq!(s.used(&l[0], at(0)), 3);
        assert_eq!(s.used(&l[1], at(0)), 3);
    }

    #[test]
    fn units_are_counted_separately() {
        let msgs = "5/1h".parse::<Limit>().unwrap();
        let rcpts = msgs.with_unit(Unit::Recipients);
        let l = [msgs, rcpts];
        let mut s = KeyState::new();
        let d = s.apply(&l, Cost::message(4, 100), at(0), Mode::Acquire);
        assert!(d.is_allowed());
        assert_eq!(s.used(&msgs, at(0)), 1);
        assert_eq!(s.used(&rcpts, at(0)), 4);
        let d = s.apply(&l, Cost::message(2, 100), at(0), Mode::Acquire);
        assert_eq!(d.denial().unwrap().limit, 1);
    }

    #[test]
    fn a_clock_stepping_back_loses_nothing() {
        let l = ["2/1m".parse::<Limit>().unwrap()];
        let mut s = KeyState::new();
        acquire(&mut s, &l, 1, 30_000);
        // The wall clock steps back 20 s: the event is still counted.
        acquire(&mut s, &l, 1, 10_000);
        assert!(acquire(&mut s, &l, 1, 10_000).denial().is_some());
        assert_eq!(s.used(&l[0], at(10_000)), 2);
    }

    #[test]
    fn state_goes_idle_after_the_window() {
        let l = ["2/1m".parse::<Limit>().unwrap()];
        let mut s = KeyState::new();
        acquire(&mut s, &l, 1, 0);
        assert!(!s.is_idle(at(60_999)));
        assert!(s.is_idle(at(61_000)));
        assert_eq!(s.used(&l[0], at(61_000)), 0);
    }

    #[test]
    fn bucket_retry_after_is_exact() {
        let l = [Limit::token_bucket(10, Duration::from_secs(60), 3).unwrap()];
        let mut s = KeyState::new();
        for _ in 0..3 {
            assert!(acquire(&mut s, &l, 1, 0).is_allowed());
        }
        let d = acquire(&mut s, &l, 1, 0);
        // One unit drains every 6 s.
        assert_eq!(
            d.denial().unwrap().retry_after,
            Some(Duration::from_secs(6))
        );
        assert!(acquire(&mut s, &l, 1, 5_999).denial().is_some());
        assert!(acquire(&mut s, &l, 1, 6_000).is_allowed());
        assert!(s.is_idle(at(6_000 + 18_000)));
        assert!(!s.is_idle(at(6_000 + 17_999)));
    }

    #[test]
    fn moving_to_a_tier_with_a_higher_count_keeps_usage() {
        let small = ["10/1h".parse::<Limit>().unwrap()];
        let big = ["100/1h".parse::<Limit>().unwrap()];
        let mut s = KeyState::new();
        acquire(&mut s, &small, 8, 0);
        let d = acquire(&mut s, &big, 1, 1000);
        assert_eq!(d.statuses()[0].used, 8);
        assert_eq!(d.statuses()[0].remaining, 91);
        let back = acquire(&mut s, &small, 2, 2000);
        assert!(back.denial().is_some());
    }
}
