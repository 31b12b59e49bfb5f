//! The packed form of a key's state, and the fast path that decides on it.
//!
//! Most keys hold **one counter** (a tier whose limits share one counter, e.g.
//! `100/1h`): a token bucket, or a sliding window with at most 4 non-empty
//! sub-windows of at most 2^18 - 1 units each. Such a state packs into an
//! [`Entry`]'s 24 bytes of state:
//! - `head`'s tag (top 8 bits) is below [`TOMB`]: it names the counter by its
//!   position among the shard's interned [`Ids`]; `head`'s low 47 bits are
//!   `idle_at` (ms) (bit 47 is the table's [`REF`](super::table::REF) bit);
//! - a token bucket: `a` is the level (unit·ms) and `b` the last update (ms);
//! - a sliding window: `a` and `b` hold four `u32` sub-window slots, oldest
//!   first, each `count << 14 | offset` where `offset` is the slot's sub-window
//!   number counted back from `idle_at / sub_ms` (unused slots are 0: a stored
//!   count is never 0).
//!
//! Any other state is kept whole in the shard's side table, under the tag
//! [`GENERAL`]. Packing is a bijection checked when it is done, never an
//! approximation: [`Ids::pack`] and [`Ids::unpack`] convert exactly.
//!
//! [`apply`] decides the common case (one limit, a packed or idle entry holding
//! that limit's counter) on the packed words directly, without unpacking to a
//! [`KeyState`]. It is the one copy of the algorithm outside
//! [`crate::algorithm`], written out for speed: it must decide and record
//! exactly as [`KeyState::apply`] does. The proptests at the end of this file
//! hold it to that directly, and `the_store_holds_exactly_what_key_states_hold`
//! (in `tests.rs`) through the whole store.

use super::divisor::Divisor;
use super::table::{Entry, FP_SHIFT, TOMB};
use crate::algorithm::{CounterRef, KeyCounters, KeyState, OneCounter, Slot};
use crate::clock::Timestamp;
use crate::decision::{Cost, Denial, LimitStatus, Mode};
use crate::quota::{Algorithm, CounterId, Limit};

/// `Entry::head`'s top byte for a state that does not pack: it is kept whole in
/// the shard's side table, at position `a`. (Values below [`TOMB`] are packed
/// single-counter states, naming the counter by its position in the shard's
/// interned ids.)
pub(super) const GENERAL: u8 = 254;
/// `Entry::head`'s low 47 bits: `idle_at` (ms) of a packed state (until the
/// year 6429; a later time keeps the state whole in the side table). Bit 47 is
/// the table's [`REF`](super::table::REF) bit.
pub(super) const IDLE_MASK: u64 = (1 << (FP_SHIFT - 1)) - 1;
/// Sub-window slots of a packed window: `count << OFF_BITS | offset`.
const OFF_BITS: u32 = 14;
const OFF_MASK: u32 = (1 << OFF_BITS) - 1;
const MAX_PACKED_COUNT: u32 = (1 << (32 - OFF_BITS)) - 1;
/// Sub-windows a packed window holds.
const PACKED_SLOTS: usize = 4;

/// The counter ids that packed entries of one shard name by a one-byte tag.
#[derive(Default)]
pub(super) struct Ids {
    ids: Vec<CounterId>,
    /// Division by the sub-window length (ms) of each id (by 1 for a bucket).
    subs: Vec<Divisor>,
}

impl Ids {
    /// The tag naming counter `id`, interning it if there is room.
    pub(super) fn intern(&mut self, id: CounterId) -> Option<u8> {
        if let Some(t) = self.ids.iter().position(|i| *i == id) {
            return Some(t as u8);
        }
        if self.ids.len() >= usize::from(TOMB) {
            return None;
        }
        let sub = match id.precision() {
            _ if id.is_bucket() => 1,
            0 => return None, // not a valid window id: keep it in general form
            p => id.window_ms() / p,
        };
        if sub == 0 {
            return None; // not a valid window id either
        }
        self.ids.push(id);
        self.subs.push(Divisor::new(sub));
        Some((self.ids.len() - 1) as u8)
    }

    /// `state` packed as (head, a, b), if it has the packable shape (see the module
    /// docs).
    #[inline]
    pub(super) fn pack(&mut self, state: &KeyState) -> Option<(u64, u64, u64)> {
        let [counter] = state.counters.as_slice() else {
            return None;
        };
        self.pack_parts(counter.id, state.idle_at, counter.data.as_ref())
    }

    /// [`Ids::pack`] for a [`OneCounter`].
    #[inline]
    pub(super) fn pack_one(&mut self, one: &OneCounter) -> Option<(u64, u64, u64)> {
        self.pack_parts(one.id, one.idle_at, one.get(one.id)?)
    }

    fn pack_parts(
        &mut self,
        id: CounterId,
        idle_at: u64,
        data: CounterRef<'_>,
    ) -> Option<(u64, u64, u64)> {
        if idle_at > IDLE_MASK {
            return None;
        }
        let tag = self.intern(id)?;
        let head = (u64::from(tag) << 56) | idle_at;
        match (data, id.is_bucket()) {
            (CounterRef::Bucket { level, last }, true) => Some((head, level, last)),
            (CounterRef::Window(slots), false) if slots.len() <= PACKED_SLOTS => {
                let anchor = self.subs[usize::from(tag)].div(idle_at) as u32;
                let (a, b) = pack_window(anchor, slots)?;
                Some((head, a, b))
            }
            _ => None,
        }
    }

    /// The state of a packed entry (its tag below [`GENERAL`]).
    #[inline]
    pub(super) fn unpack(&self, e: &Entry) -> OneCounter {
        let tag = usize::from(e.tag());
        let id = self.ids[tag];
        let idle_at = e.head & IDLE_MASK;
        let mut one = OneCounter {
            id,
            present: true,
            idle_at,
            ..OneCounter::EMPTY
        };
        if id.is_bucket() {
            (one.level, one.last) = (e.a, e.b);
        } else {
            let anchor = self.subs[tag].div(idle_at) as u32;
            one.len = unpack_window(anchor, e.a, e.b, &mut one.slots) as u8;
        }
        one
    }
}

/// The sub-windows that a packed window's words `a` and `b` hold, oldest first,
/// written to the front of `slots` (offsets counted back from `anchor`, the
/// sub-window number of `idle_at`); returns how many. `slots` has room for one
/// more, which recording may add.
#[inline(always)]
fn unpack_window(anchor: u32, a: u64, b: u64, slots: &mut [Slot; PACKED_SLOTS + 1]) -> usize {
    let mut len = 0;
    for w in [a as u32, (a >> 32) as u32, b as u32, (b >> 32) as u32] {
        if w == 0 {
            break;
        }
        slots[len] = Slot {
            idx: anchor.wrapping_sub(w & OFF_MASK),
            count: w >> OFF_BITS,
        };
        len += 1;
    }
    len
}

/// A window's sub-windows (oldest first) as the packed words `(a, b)`, their
/// offsets counted back from `anchor`; `None` if they do not pack (more than
/// [`PACKED_SLOTS`] of them, an offset or a count too big, a count of 0).
#[inline(always)]
fn pack_window(anchor: u32, slots: &[Slot]) -> Option<(u64, u64)> {
    if slots.len() > PACKED_SLOTS {
        return None;
    }
    let mut words = [0u64; PACKED_SLOTS];
    for (w, s) in words.iter_mut().zip(slots) {
        let off = anchor.wrapping_sub(s.idx);
        if off > OFF_MASK || s.count == 0 || s.count > MAX_PACKED_COUNT {
            return None;
        }
        *w = u64::from((s.count << OFF_BITS) | off);
    }
    Some((words[0] | (words[1] << 32), words[2] | (words[3] << 32)))
}

/// [`KeyState::apply`] for the common case, decided on the packed words
/// directly: one limit, and the entry `e` is packed and either idle or holding
/// that limit's counter (`ids` are its shard's). Every step is the one
/// [`decide`](crate::algorithm) takes (`probe_window`/`record_window`,
/// `probe_bucket`/`record_bucket`), on the same numbers; the proptests below
/// hold the two to the same decisions and the same states. `None`, with nothing
/// changed, when the case is another one or the new state would not pack: the
/// shard's general path then decides.
///
/// Returns the denial and the one status rather than a [`Decision`](crate::Decision) (a
/// quarter of a kilobyte): the caller builds that where it returns it.
#[inline(always)]
pub(super) fn apply(
    ids: &mut Ids,
    e: &mut Entry,
    limit: &Limit,
    cost: Cost,
    now: Timestamp,
    mode: Mode,
) -> Option<(Option<Denial>, LimitStatus)> {
    let now_ms = now.as_millis();
    if now_ms > IDLE_MASK {
        return None;
    }
    if e.tag() >= GENERAL {
        return None;
    }
    let (head, wa, wb) = (e.head, e.a, e.b);
    let stored_idle = head & IDLE_MASK;
    let live = now_ms < stored_idle;
    let id = limit.counter_id();
    let tag = if live {
        let tag = e.tag();
        if ids.ids.get(usize::from(tag)) != Some(&id) {
            return None;
        }
        tag
    } else {
        ids.intern(id)?
    };
    let c = cost.get(limit.unit());
    let n = limit.count();
    let record = mode == Mode::Acquire;
    let (status, idle_at, a, b) = match limit.algorithm() {
        Algorithm::SlidingWindow { precision } => {
            let div = *ids.subs.get(usize::from(tag))?;
            let sub = div.d;
            let p = i64::from(precision);
            let b_abs = div.div(now_ms);
            let bw = b_abs as u32;
            let age = |idx: u32| i64::from(bw.wrapping_sub(idx) as i32);
            // Oldest first; one more than packs, for the slot recording may add.
            let mut slots = [Slot { idx: 0, count: 0 }; PACKED_SLOTS + 1];
            let mut len = 0;
            let idle_at = if live {
                let anchor = div.div(stored_idle) as u32;
                len = unpack_window(anchor, wa, wb, &mut slots);
                stored_idle
            } else {
                0
            };
            let counted = |s: &&Slot| age(s.idx) <= p;
            let used: u64 = slots[..len]
                .iter()
                .filter(counted)
                .map(|s| u64::from(s.count))
                .sum();
            let remaining = n.saturating_sub(used);
            if used.saturating_add(c) > n {
                let mut retry_after = None;
                if c <= n {
                    let mut left = used;
                    for s in slots[..len].iter().filter(counted) {
                        left -= u64::from(s.count);
                        if left + c <= n {
                            let leaves_at = (b_abs as i64 - age(s.idx) + p + 1).max(0) as u64;
                            let leaves_at = leaves_at.saturating_mul(sub);
                            retry_after = Some(std::time::Duration::from_millis(
                                leaves_at.saturating_sub(now_ms),
                            ));
                            break;
                        }
                    }
                }
                let denial = Denial {
                    limit: 0,
                    retry_after,
                };
                let status = LimitStatus {
                    used,
                    limit: n,
                    remaining,
                };
                return Some((Some(denial), status));
            }
            let status = LimitStatus {
                used,
                limit: n,
                remaining: if record { remaining - c } else { remaining },
            };
            if !record {
                return Some((None, status));
            }
            // Record: drop the sub-windows that left, then add to the newest one
            // (or one after now, if the clock stepped back) or start one.
            let mut kept = 0;
            for i in 0..len {
                if age(slots[i].idx) <= p {
                    slots[kept] = slots[i];
                    kept += 1;
                }
            }
            len = kept;
            let c32 = u32::try_from(c).unwrap_or(u32::MAX);
            let precision = u64::from(precision);
            let expiry = match slots[..len].last_mut() {
                Some(last) if age(last.idx) <= 0 => {
                    last.count = last.count.saturating_add(c32);
                    let newest = b_abs.saturating_add_signed(-age(last.idx));
                    (newest + 1 + precision).saturating_mul(sub)
                }
                _ => {
                    if c32 > 0 {
                        slots[len] = Slot {
                            idx: bw,
                            count: c32,
                        };
                        len += 1;
                    }
                    (b_abs + 1 + precision).saturating_mul(sub)
                }
            };
            let idle_at = idle_at.max(expiry);
            if len > PACKED_SLOTS || idle_at > IDLE_MASK {
                return None;
            }
            let (a, b) = pack_window(div.div(idle_at) as u32, &slots[..len])?;
            (status, idle_at, a, b)
        }
        Algorithm::TokenBucket { burst } => {
            let w = limit.window_ms();
            let cap = u64::from(burst) * w;
            let (level, last, idle_at) = if live {
                (wa, wb, stored_idle)
            } else {
                (0, 0, 0)
            };
            let lvl = level.saturating_sub(now_ms.saturating_sub(last).saturating_mul(n));
            let need = c.checked_mul(w).filter(|need| *need <= cap);
            let remaining = cap.saturating_sub(lvl) / w;
            let used = lvl.div_ceil(w);
            let admit = need.is_some_and(|need| lvl <= cap - need);
            if !admit {
                let denial = Denial {
                    limit: 0,
                    retry_after: need.map(|need| {
                        std::time::Duration::from_millis((lvl - (cap - need)).div_ceil(n))
                    }),
                };
                let status = LimitStatus {
                    used,
                    limit: u64::from(burst),
                    remaining,
                };
                return Some((Some(denial), status));
            }
            let status = LimitStatus {
                used,
                limit: u64::from(burst),
                remaining: if record {
                    remaining.saturating_sub(c)
                } else {
                    remaining
                },
            };
            if !record {
                return Some((None, status));
            }
            let new = lvl.saturating_add(c.saturating_mul(w));
            let last = last.max(now_ms);
            let idle_at = idle_at.max(last.saturating_add(new.div_ceil(n)));
            if idle_at > IDLE_MASK {
                return None;
            }
            (status, idle_at, new, last)
        }
    };
    e.set((u64::from(tag) << 56) | idle_at, a, b);
    Some((None, status))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decision::Decision;
    use compact_str::CompactString;
    use proptest::prelude::*;
    use std::time::Duration;

    const T0: u64 = 1_700_000_000_000;

    /// Single limits of every shape the fast path meets: windows whose states
    /// pack and grow past four sub-windows, two windows sharing a counter, a
    /// count too big for a packed sub-window, a fine precision, and buckets.
    fn limits() -> Vec<Limit> {
        let l = |s: &str| s.parse::<Limit>().unwrap();
        let b = |n, w, burst| Limit::token_bucket(n, Duration::from_millis(w), burst).unwrap();
        vec![
            l("5/10s"),
            l("3/10s"),
            l("400000/10s"),
            l("2/1s").with_precision(1000).unwrap(),
            l("100/1h").with_precision(4).unwrap(),
            b(2, 5_000, 3),
            b(u64::from(u32::MAX), 7, 5),
        ]
    }

    /// The state the entry holds, as a `KeyState` (a zero head: nothing yet).
    fn held(ids: &Ids, e: &Entry) -> KeyState {
        if e.head == 0 {
            KeyState::new()
        } else {
            ids.unpack(e).to_key_state()
        }
    }

    proptest! {
        /// One key through a random history of single-limit checks, against
        /// one `KeyState`: whenever [`apply`] decides, it decides and records
        /// exactly as [`KeyState::apply`]; whenever it declines, it has changed
        /// nothing, and the entry takes the model's state in whichever form
        /// fits (as the shard's general path does).
        #[test]
        fn the_packed_fast_path_decides_as_key_state_apply(
            ops in prop::collection::vec(
                (
                    prop_oneof![5 => 0i64..=700, 1 => -20_000i64..0, 1 => 0i64..=40_000],
                    0..limits().len(),
                    prop_oneof![5 => 0u64..=3, 1 => 0u64..=300_000],
                    prop::bool::weighted(0.8),
                ),
                1..300,
            )
        ) {
            let limits = limits();
            let mut ids = Ids::default();
            let mut e = Entry { key: CompactString::new("k"), head: 0, a: 0, b: 0 };
            let mut model = KeyState::new();
            let mut t = T0 as i64;
            for (dt, limit, cost, acquire) in ops {
                t = (t + dt).max(T0 as i64);
                let now = Timestamp::from_millis(t as u64);
                let limit = &limits[limit];
                let mode = if acquire { Mode::Acquire } else { Mode::Peek };
                let cost = Cost::units(cost);
                // The eviction hand's bit changes nothing that is decided.
                if t % 3 == 0 && e.head != 0 {
                    e.touch();
                } else if t % 3 == 1 {
                    e.clear_ref();
                }
                let before = (e.head, e.a, e.b);
                let got = apply(&mut ids, &mut e, limit, cost, now, mode);
                let want = model.apply(std::slice::from_ref(limit), cost, now, mode);
                match got {
                    Some((denial, status)) => {
                        prop_assert_eq!(Decision::single(denial, status), want);
                        prop_assert_eq!(held(&ids, &e), model.clone());
                    }
                    None => {
                        prop_assert_eq!((e.head, e.a, e.b), before, "declined, yet changed");
                        e.head = match ids.pack(&model) {
                            Some((head, a, b)) => {
                                (e.a, e.b) = (a, b);
                                head
                            }
                            None => u64::from(GENERAL) << 56,
                        } | (before.0 & super::super::table::REF);
                    }
                }
            }
        }
    }
}
