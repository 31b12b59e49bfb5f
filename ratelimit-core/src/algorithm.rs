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
use crate::decision::{Cost, Decision, Denial, LimitStatus, Mode};
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
    Window(SmallVec<[Slot; 4]>),
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

/// What checking one limit found.
#[derive(Clone, Copy)]
struct Probe {
    used: u64,
    admit: bool,
    retry_after: Option<Duration>,
    /// Units admissible now, before this event. If the event is recorded (every
    /// limit admitted it), what remains after it is exactly `remaining - cost`.
    remaining: u64,
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
        decide(self, limits, cost, now, mode)
    }

    /// Units counted against `limit` at `now` (for inspection: `show USER`, top senders).
    pub fn used(&self, limit: &Limit, now: Timestamp) -> u64 {
        if self.is_idle(now) {
            return 0;
        }
        let at = At::new(limit, now.as_millis());
        probe(limit, self.get(limit.counter_id()), 0, at).used
    }

    /// The number of counters held (for memory accounting and tests).
    pub fn counter_count(&self) -> usize {
        self.counters.len()
    }
}

impl KeyCounters for KeyState {
    fn idle_at(&self) -> u64 {
        self.idle_at
    }

    fn is_empty(&self) -> bool {
        self.counters.is_empty()
    }

    fn get(&self, id: CounterId) -> Option<CounterRef<'_>> {
        self.counters
            .iter()
            .find(|c| c.id == id)
            .map(|c| c.data.as_ref())
    }

    fn clear(&mut self) {
        self.counters.clear();
        self.idle_at = 0;
    }

    fn set_idle_at(&mut self, idle_at: u64) {
        self.idle_at = idle_at;
    }

    fn record(&mut self, limit: &Limit, cost: u64, at: At) -> u64 {
        let id = limit.counter_id();
        let pos = match self.counters.iter().position(|c| c.id == id) {
            Some(pos) => pos,
            None => {
                self.counters.push(Counter {
                    id,
                    data: CounterData::empty(limit),
                });
                self.counters.len() - 1
            }
        };
        let counter = &mut self.counters[pos];
        match (&mut counter.data, limit.algorithm()) {
            (CounterData::Window(slots), Algorithm::SlidingWindow { precision }) => {
                record_window(slots, precision, cost, at)
            }
            (CounterData::Bucket { level, last }, Algorithm::TokenBucket { .. }) => {
                record_bucket(level, last, limit, cost, at.now_ms)
            }
            // The id encodes the algorithm, so a mismatch cannot happen; start over if
            // a corrupt store ever produced one.
            (data, _) => {
                *data = CounterData::empty(limit);
                self.record(limit, cost, at)
            }
        }
    }
}

impl CounterData {
    /// A new counter for `limit`.
    fn empty(limit: &Limit) -> CounterData {
        match limit.algorithm() {
            Algorithm::SlidingWindow { .. } => CounterData::Window(SmallVec::new()),
            Algorithm::TokenBucket { .. } => CounterData::Bucket { level: 0, last: 0 },
        }
    }

    pub(crate) fn as_ref(&self) -> CounterRef<'_> {
        match self {
            CounterData::Window(slots) => CounterRef::Window(slots),
            CounterData::Bucket { level, last } => CounterRef::Bucket {
                level: *level,
                last: *last,
            },
        }
    }
}

/// A borrowed view of one counter's data.
#[derive(Debug, Clone, Copy)]
pub(crate) enum CounterRef<'a> {
    /// Non-empty sub-windows, oldest first.
    Window(&'a [Slot]),
    /// Token bucket level (unit·ms) as of `last` (ms).
    Bucket { level: u64, last: u64 },
}

/// One key's counters as [`decide`] reads and writes them: implemented by
/// [`KeyState`] (any number of counters) and [`OneCounter`] (one, on the stack).
pub(crate) trait KeyCounters {
    /// When every counter will be empty (ms).
    fn idle_at(&self) -> u64;
    /// Whether no counter is held.
    fn is_empty(&self) -> bool;
    /// The counter with this id.
    fn get(&self, id: CounterId) -> Option<CounterRef<'_>>;
    /// Forgets every counter.
    fn clear(&mut self);
    fn set_idle_at(&mut self, idle_at: u64);
    /// Records `cost` on `limit`'s counter (creating it); returns when that counter
    /// will be empty.
    fn record(&mut self, limit: &Limit, cost: u64, at: At) -> u64;
}

/// [`KeyState::apply`] over any [`KeyCounters`]: the one place where a decision is
/// made, but for the memory store's packed fast path (`store/memory/packed.rs`),
/// which repeats it on packed words for speed and is property-tested against it.
///
/// Always inlined: the `Decision` is then built where the caller's caller wants
/// it, instead of being copied out (a quarter of a kilobyte) at each return.
#[inline(always)]
pub(crate) fn decide<S: KeyCounters>(
    state: &mut S,
    limits: &[Limit],
    cost: Cost,
    now: Timestamp,
    mode: Mode,
) -> Decision {
    let now_ms = now.as_millis();
    let live = !state.is_empty() && now_ms < state.idle_at();
    // Built in place: the statuses are written once, where the caller gets them.
    let mut decision = Decision::with_len(limits.len());
    // The first limit's view of `now`, kept for recording (the others are
    // recomputed then: most tiers have one limit).
    let mut first_at = At::default();
    for (i, limit) in limits.iter().enumerate() {
        let counter = if live {
            state.get(limit.counter_id())
        } else {
            None
        };
        let at = At::new(limit, now_ms);
        if i == 0 {
            first_at = at;
        }
        let p = probe(limit, counter, cost.get(limit.unit()), at);
        if !p.admit && decision.denial.is_none() {
            decision.denial = Some(Denial {
                limit: i,
                retry_after: p.retry_after,
            });
        }
        if let Some(status) = decision.statuses.get_mut(i) {
            *status = LimitStatus {
                used: p.used,
                limit: capacity(limit),
                remaining: p.remaining,
            };
        }
    }
    if mode == Mode::Acquire && decision.denial.is_none() {
        // Every limit admitted `cost`, so `remaining >= cost` for each.
        for (status, limit) in decision.statuses.iter_mut().zip(limits) {
            let c = cost.get(limit.unit());
            debug_assert!(status.remaining >= c);
            status.remaining = status.remaining.saturating_sub(c);
        }
        if !live {
            state.clear();
        }
        for (i, limit) in limits.iter().enumerate() {
            let id = limit.counter_id();
            if limits[..i].iter().any(|l| l.counter_id() == id) {
                continue; // a counter shared by two limits is charged once
            }
            let at = if i == 0 {
                first_at
            } else {
                At::new(limit, now_ms)
            };
            let expiry = state.record(limit, cost.get(limit.unit()), at);
            state.set_idle_at(state.idle_at().max(expiry));
        }
    }
    decision
}

/// The sub-windows of a sliding-window counter, as [`record_window`] updates them.
pub(crate) trait SlotList {
    /// Keeps the slots for which `keep` holds.
    fn retain(&mut self, keep: impl FnMut(&Slot) -> bool);
    fn last_mut(&mut self) -> Option<&mut Slot>;
    fn push(&mut self, slot: Slot);
}

impl<const N: usize> SlotList for SmallVec<[Slot; N]> {
    fn retain(&mut self, mut keep: impl FnMut(&Slot) -> bool) {
        SmallVec::retain(self, |s| keep(s));
        // A list that spilled to the heap (a busy spell over many sub-windows) and
        // is back to a few slots returns its heap block: otherwise every key that
        // was ever busy keeps its largest list for as long as it is tracked.
        if self.spilled() && self.capacity() > 2 * self.len().max(N) {
            self.shrink_to_fit();
        }
    }
    fn last_mut(&mut self) -> Option<&mut Slot> {
        <[Slot]>::last_mut(self)
    }
    fn push(&mut self, slot: Slot) {
        SmallVec::push(self, slot);
    }
}

/// Records `cost` in the current sub-window; returns when the counter will be empty.
fn record_window(slots: &mut impl SlotList, precision: u16, cost: u64, at: At) -> u64 {
    let (sub, b_abs) = (at.sub, at.b_abs);
    let p = i64::from(precision);
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

/// Adds `cost` to a bucket; returns when it will be empty.
fn record_bucket(level: &mut u64, last: &mut u64, limit: &Limit, cost: u64, now_ms: u64) -> u64 {
    let w = limit.window_ms();
    // At most u64::MAX: `cost` was admitted, so level + cost * w <= burst * w.
    let new = drained(*level, *last, limit, now_ms).saturating_add(cost.saturating_mul(w));
    *level = new;
    *last = (*last).max(now_ms);
    (*last).saturating_add(new.div_ceil(limit.count()))
}

/// Sub-windows a [`OneCounter`] holds: four, and one more that recording may add.
pub(crate) const ONE_COUNTER_SLOTS: usize = 5;

/// A key state with at most one counter, held on the stack with no allocation:
/// the working copy of a store's compact entry. [`decide`] over it gives exactly
/// what it gives over the equal [`KeyState`], **provided every limit uses the one
/// counter `id`** (when the state is live): that is the caller's to check, with
/// [`OneCounter::fits`].
#[derive(Debug, Clone)]
pub(crate) struct OneCounter {
    /// Meaningful only when `present`.
    pub(crate) id: CounterId,
    pub(crate) present: bool,
    pub(crate) idle_at: u64,
    /// Token bucket: level and last update; window: unused.
    pub(crate) level: u64,
    pub(crate) last: u64,
    /// Sliding window: the first `len` slots, oldest first.
    pub(crate) slots: [Slot; ONE_COUNTER_SLOTS],
    pub(crate) len: u8,
}

impl OneCounter {
    /// No counter.
    pub(crate) const EMPTY: OneCounter = OneCounter {
        id: CounterId(0),
        present: false,
        idle_at: 0,
        level: 0,
        last: 0,
        slots: [Slot { idx: 0, count: 0 }; ONE_COUNTER_SLOTS],
        len: 0,
    };

    /// Whether [`decide`] on this state with `limits` stays within one counter:
    /// every limit uses one counter, and it is this one if the state is live.
    pub(crate) fn fits(&self, limits: &[Limit], now: Timestamp) -> bool {
        let Some(first) = limits.first() else {
            return true;
        };
        let id = first.counter_id();
        let live = self.present && now.as_millis() < self.idle_at;
        (!live || id == self.id) && limits[1..].iter().all(|l| l.counter_id() == id)
    }

    /// The same state as a [`KeyState`].
    pub(crate) fn to_key_state(&self) -> KeyState {
        let mut state = KeyState {
            idle_at: self.idle_at,
            counters: SmallVec::new(),
        };
        if self.present {
            let data = if self.id.is_bucket() {
                CounterData::Bucket {
                    level: self.level,
                    last: self.last,
                }
            } else {
                CounterData::Window(
                    self.slots[..usize::from(self.len)]
                        .iter()
                        .copied()
                        .collect(),
                )
            };
            state.counters.push(Counter { id: self.id, data });
        }
        state
    }
}

/// The fixed slots of a [`OneCounter`] as a [`SlotList`].
struct OneSlots<'a> {
    slots: &'a mut [Slot; ONE_COUNTER_SLOTS],
    len: &'a mut u8,
}

impl SlotList for OneSlots<'_> {
    fn retain(&mut self, mut keep: impl FnMut(&Slot) -> bool) {
        let mut kept = 0;
        for i in 0..usize::from(*self.len) {
            if keep(&self.slots[i]) {
                self.slots[kept] = self.slots[i];
                kept += 1;
            }
        }
        *self.len = kept as u8;
    }
    fn last_mut(&mut self) -> Option<&mut Slot> {
        self.slots[..usize::from(*self.len)].last_mut()
    }
    fn push(&mut self, slot: Slot) {
        // A OneCounter is built with at most ONE_COUNTER_SLOTS - 1 slots, and one
        // decision pushes at most one.
        self.slots[usize::from(*self.len)] = slot;
        *self.len += 1;
    }
}

impl KeyCounters for OneCounter {
    fn idle_at(&self) -> u64 {
        self.idle_at
    }

    fn is_empty(&self) -> bool {
        !self.present
    }

    fn get(&self, id: CounterId) -> Option<CounterRef<'_>> {
        if !self.present || id != self.id {
            None
        } else if id.is_bucket() {
            Some(CounterRef::Bucket {
                level: self.level,
                last: self.last,
            })
        } else {
            Some(CounterRef::Window(&self.slots[..usize::from(self.len)]))
        }
    }

    fn clear(&mut self) {
        *self = OneCounter::EMPTY;
    }

    fn set_idle_at(&mut self, idle_at: u64) {
        self.idle_at = idle_at;
    }

    fn record(&mut self, limit: &Limit, cost: u64, at: At) -> u64 {
        let id = limit.counter_id();
        if !self.present {
            *self = OneCounter {
                id,
                present: true,
                ..OneCounter::EMPTY
            };
        }
        assert!(id == self.id, "OneCounter used for limits of two counters");
        match limit.algorithm() {
            Algorithm::SlidingWindow { precision } => {
                let mut slots = OneSlots {
                    slots: &mut self.slots,
                    len: &mut self.len,
                };
                record_window(&mut slots, precision, cost, at)
            }
            Algorithm::TokenBucket { .. } => {
                record_bucket(&mut self.level, &mut self.last, limit, cost, at.now_ms)
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

/// `now` as one limit sees it: computed once per limit and decision (a sliding
/// window's sub-window length and number are two divisions), for both checking
/// and recording.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct At {
    now_ms: u64,
    /// Sub-window length in ms (sliding window; 0 for a bucket).
    sub: u64,
    /// Sub-window number `now_ms / sub` (sliding window).
    b_abs: u64,
}

impl At {
    fn new(limit: &Limit, now_ms: u64) -> At {
        match limit.algorithm() {
            Algorithm::SlidingWindow { .. } => {
                let sub = limit.sub_ms();
                At {
                    now_ms,
                    sub,
                    b_abs: now_ms / sub,
                }
            }
            Algorithm::TokenBucket { .. } => At {
                now_ms,
                sub: 0,
                b_abs: 0,
            },
        }
    }
}

/// Age of sub-window `idx` seen from sub-window `b` (negative: in the future).
fn age(b: u32, idx: u32) -> i64 {
    i64::from(b.wrapping_sub(idx) as i32)
}

/// A bucket's level at `now_ms`, after draining since `last`. (A drain that
/// overflows 64 bits is more than any level, so saturating is exact.)
fn drained(level: u64, last: u64, limit: &Limit, now_ms: u64) -> u64 {
    let elapsed = now_ms.saturating_sub(last);
    level.saturating_sub(elapsed.saturating_mul(limit.count()))
}

fn probe(limit: &Limit, counter: Option<CounterRef<'_>>, cost: u64, at: At) -> Probe {
    match limit.algorithm() {
        Algorithm::SlidingWindow { precision } => {
            let slots: &[Slot] = match counter {
                Some(CounterRef::Window(s)) => s,
                _ => &[],
            };
            probe_window(limit, precision, slots, cost, at)
        }
        Algorithm::TokenBucket { burst } => {
            let (level, last) = match counter {
                Some(CounterRef::Bucket { level, last }) => (level, last),
                _ => (0, 0),
            };
            probe_bucket(limit, burst, level, last, cost, at.now_ms)
        }
    }
}

fn probe_window(limit: &Limit, precision: u16, slots: &[Slot], cost: u64, at: At) -> Probe {
    let n = limit.count();
    let (now_ms, sub, b_abs) = (at.now_ms, at.sub, at.b_abs);
    let p = i64::from(precision);
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
        remaining: n.saturating_sub(used),
    }
}

fn probe_bucket(limit: &Limit, burst: u32, level: u64, last: u64, cost: u64, now_ms: u64) -> Probe {
    // All in 64 bits: `cap` fits (checked when the limit was built), the level is a
    // u64, and a `need` that overflows is more than `cap` (never admitted).
    let n = limit.count();
    let w = limit.window_ms();
    let cap = u64::from(burst) * w;
    let lvl = drained(level, last, limit, now_ms);
    let need = cost.checked_mul(w).filter(|need| *need <= cap);
    let admit = need.is_some_and(|need| lvl <= cap - need);
    let retry_after = match need {
        // Refused although the bucket could hold it: wait until enough has drained.
        Some(need) if !admit => Some(Duration::from_millis((lvl - (cap - need)).div_ceil(n))),
        _ => None,
    };
    Probe {
        used: lvl.div_ceil(w),
        admit,
        retry_after,
        remaining: cap.saturating_sub(lvl) / w,
    }
}

#[cfg(test)]
mod tests;
