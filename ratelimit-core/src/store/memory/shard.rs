//! One shard of the memory store: its [`Table`] of keys, and each key's state in
//! one of two forms, packed in the key's entry (see [`super::packed`]) or kept
//! whole as a [`KeyState`] in a side table. The shard moves a state between the
//! forms as it changes, decides on whichever it is in, and forgets idle keys.
//! It knows nothing of locks: the store holds the shard's lock around each call.

use super::packed::{self, GENERAL, IDLE_MASK, Ids};
use super::table::{Entry, Table};
use crate::algorithm::{KeyState, OneCounter, decide};
use crate::clock::Timestamp;
use crate::decision::{Cost, Decision, Denial, LimitStatus, Mode};
use crate::quota::Limit;

/// When the state of entry `e` has fully decayed (ms): packed, its `idle_at`;
/// whole, its state's.
#[inline]
fn idle_at(general: &[KeyState], e: &Entry) -> u64 {
    match e.tag() {
        GENERAL => general.get(e.a as usize).map_or(0, |s| s.idle_at),
        _ => e.head & IDLE_MASK,
    }
}

/// One shard's keys and their states.
pub(super) struct Shard {
    pub(super) table: Table,
    ids: Ids,
    /// States that do not pack, and the free positions among them.
    pub(super) general: Vec<KeyState>,
    pub(super) general_free: Vec<u64>,
    /// The eviction hand: the slot where the next look for a victim starts.
    hand: usize,
}

/// Why a key was evicted to make room for a new one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Evicted {
    /// Its state had fully decayed: forgetting it changes no decision.
    Idle,
    /// It was not used since the hand last went by, and was the least recently
    /// charged of those the hand looked at.
    Lru,
}

/// Slots the eviction hand looks at in one pass.
pub(super) const EVICT_SAMPLE: usize = 32;
/// Passes before the hand gives up (every live key it saw had been used since
/// its last pass, which it has now cleared): at most 128 slots per new key.
pub(super) const EVICT_PASSES: usize = 4;

impl Shard {
    pub(super) fn new() -> Shard {
        Shard {
            table: Table::default(),
            ids: Ids::default(),
            general: Vec::new(),
            general_free: Vec::new(),
            hand: 0,
        }
    }

    #[inline]
    pub(super) fn len(&self) -> usize {
        self.table.len
    }

    #[inline]
    pub(super) fn find(&self, hash: u64, key: &str) -> Option<u32> {
        self.table.find(hash, key)
    }

    /// Calls `f` with the state of entry `e`.
    pub(super) fn with_state<R>(&self, e: &Entry, f: impl FnOnce(&KeyState) -> R) -> R {
        match e.tag() {
            GENERAL => f(&self.general[e.a as usize]),
            _ => f(&self.ids.unpack(e).to_key_state()),
        }
    }

    fn is_idle(&self, e: &Entry, now: Timestamp) -> bool {
        now.as_millis() >= idle_at(&self.general, e)
    }

    /// Marks the key at `pos` used (for the eviction hand).
    #[inline]
    pub(super) fn touch(&mut self, pos: u32) {
        self.table.get_mut(pos).touch();
    }

    /// Removes one key to make room for a new one, when the shard is full.
    ///
    /// The hand goes round the table a pass of [`EVICT_SAMPLE`] slots at a time.
    /// In a pass it takes the first idle key; if there is none, the key whose
    /// state decays first (the least recently charged) among those not used
    /// since the hand last went by. It clears the used bit of every other key of
    /// the pass (their second chance). A pass that finds neither leads to the
    /// next; after [`EVICT_PASSES`] it gives up: `None` (every key it looked at
    /// was used since its previous pass; those bits are now cleared).
    pub(super) fn evict(&mut self, now: Timestamp) -> Option<Evicted> {
        let slots = self.table.slots();
        if slots == 0 || self.table.len == 0 {
            return None;
        }
        let now_ms = now.as_millis();
        let mut hand = self.hand % slots;
        let mut found = None;
        for _ in 0..EVICT_PASSES {
            let mut idle = None;
            let mut oldest: Option<(u32, u64)> = None;
            for _ in 0..EVICT_SAMPLE.min(slots) {
                let pos = hand as u32;
                hand = if hand + 1 == slots { 0 } else { hand + 1 };
                let e = self.table.get_mut(pos);
                if !e.is_live() {
                    continue;
                }
                let at = idle_at(&self.general, e);
                if now_ms >= at {
                    idle = idle.or(Some(pos));
                } else if e.is_referenced() {
                    e.clear_ref();
                } else if oldest.is_none_or(|(_, o)| at < o) {
                    oldest = Some((pos, at));
                }
            }
            found = match (idle, oldest) {
                (Some(pos), _) => Some((pos, Evicted::Idle)),
                (None, Some((pos, _))) => Some((pos, Evicted::Lru)),
                (None, None) => continue,
            };
            break;
        }
        self.hand = hand;
        let (pos, why) = found?;
        self.remove(pos);
        Some(why)
    }

    /// Puts `state` in the entry at `pos`, packed if it fits, else in the side
    /// table (reusing the entry's place there if it had one).
    #[inline]
    pub(super) fn set_state(&mut self, pos: u32, state: KeyState) {
        let packed = self.ids.pack(&state);
        let e = self.table.get_mut(pos);
        let old_general = (e.tag() == GENERAL).then_some(e.a);
        match (packed, old_general) {
            (Some((head, a, b)), old) => {
                e.set(head, a, b);
                if let Some(g) = old {
                    self.free_general(g);
                }
            }
            (None, Some(g)) => self.general[g as usize] = state,
            (None, None) => {
                let g = match self.general_free.pop() {
                    Some(g) => {
                        self.general[g as usize] = state;
                        g
                    }
                    None => {
                        self.general.push(state);
                        (self.general.len() - 1) as u64
                    }
                };
                let e = self.table.get_mut(pos);
                e.set(u64::from(GENERAL) << 56, g, 0);
            }
        }
    }

    /// [`Shard::set_state`] for a [`OneCounter`].
    #[inline]
    pub(super) fn set_one(&mut self, pos: u32, one: &OneCounter) {
        match self.ids.pack_one(one) {
            Some((head, a, b)) => {
                let e = self.table.get_mut(pos);
                debug_assert!(e.tag() != GENERAL);
                e.set(head, a, b);
            }
            None => self.set_state(pos, one.to_key_state()),
        }
    }

    fn free_general(&mut self, g: u64) {
        self.general[g as usize] = KeyState::new();
        self.general_free.push(g);
    }

    /// Decides for the entry at `pos`. Always inlined, like [`decide`]: the
    /// decision is then built where the caller returns it, not copied there.
    #[inline(always)]
    pub(super) fn apply(
        &mut self,
        pos: u32,
        limits: &[Limit],
        cost: Cost,
        now: Timestamp,
        mode: Mode,
    ) -> Decision {
        let e = self.table.get(pos);
        if e.tag() == GENERAL {
            let g = e.a as usize;
            let decision = self.general[g].apply(limits, cost, now, mode);
            if mode == Mode::Acquire && decision.is_allowed() {
                // It may fit the packed form again (e.g. after decaying to nothing).
                if let Some((head, a, b)) = self.ids.pack(&self.general[g]) {
                    let e = self.table.get_mut(pos);
                    e.set(head, a, b);
                    self.free_general(g as u64);
                }
            }
            return decision;
        }
        // A packed state: decide on a copy on the stack, store it back if it changed.
        // An idle state decides as an empty one (`decide` clears it before recording).
        let mut one = if now.as_millis() >= e.head & IDLE_MASK {
            OneCounter::EMPTY
        } else {
            self.ids.unpack(e)
        };
        let record = mode == Mode::Acquire;
        if one.fits(limits, now) {
            let decision = decide(&mut one, limits, cost, now, mode);
            if record && decision.is_allowed() {
                self.set_one(pos, &one);
            }
            decision
        } else {
            let mut state = one.to_key_state();
            let decision = state.apply(limits, cost, now, mode);
            if record && decision.is_allowed() {
                self.set_state(pos, state);
            }
            decision
        }
    }

    /// The common case of [`Shard::apply`], decided on the packed words of the
    /// entry at `pos` by [`packed::apply`]: one limit, and the entry is packed and
    /// either idle or holding that limit's counter. `None`, with nothing changed,
    /// in any other case: [`Shard::apply`] then decides.
    ///
    /// Returns the denial and the one status rather than a [`Decision`] (a
    /// quarter of a kilobyte): the caller builds that where it returns it.
    #[inline(always)]
    pub(super) fn apply_packed(
        &mut self,
        pos: u32,
        limit: &Limit,
        cost: Cost,
        now: Timestamp,
        mode: Mode,
    ) -> Option<(Option<Denial>, LimitStatus)> {
        packed::apply(
            &mut self.ids,
            self.table.get_mut(pos),
            limit,
            cost,
            now,
            mode,
        )
    }

    /// Adds a new key (not present), with no state yet: set it next.
    #[inline]
    pub(super) fn insert(&mut self, hash: u64, key: &str, hasher: &ahash::RandomState) -> u32 {
        self.table.insert(hash, key, |k| hasher.hash_one(k))
    }

    /// Removes the key at `pos`.
    pub(super) fn remove(&mut self, pos: u32) {
        let e = self.table.remove(pos);
        if e.tag() == GENERAL {
            self.free_general(e.a);
        }
    }

    /// Forgets every key idle at `now`; returns how many. The removed keys leave
    /// tombstones; the table is rebuilt, sized for the keys left, once tombstones
    /// take a quarter of it or the keys left fill less than 3/8 of it (after a
    /// key flood, so the memory the flood took is given back).
    pub(super) fn sweep(&mut self, now: Timestamp, hasher: &ahash::RandomState) -> usize {
        let idle: Vec<u32> = self
            .table
            .iter()
            .filter(|(_, e)| self.is_idle(e, now))
            .map(|(pos, _)| pos)
            .collect();
        if idle.is_empty() {
            return 0;
        }
        for &pos in &idle {
            self.remove(pos);
        }
        let slots = self.table.slots();
        if (self.table.used - self.table.len) * 4 > slots || self.table.len * 8 < slots * 3 {
            self.table.rebuild(0, |k| hasher.hash_one(k));
        }
        if self.general_free.len() == self.general.len() {
            self.general = Vec::new();
            self.general_free = Vec::new();
        }
        idle.len()
    }
}
