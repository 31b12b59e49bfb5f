//! The lock-sharded in-memory store.
//!
//! # Layout
//!
//! Each shard holds its keys in one open-addressed table of 48-byte [`Entry`]s,
//! four to a 192-byte bucket (three cache lines, 64-byte aligned). A key's hash
//! picks its home bucket; a lookup reads that bucket's three lines at once and
//! finds the key there 82-87% of the time (else in the next bucket), so a cold
//! key mostly costs one memory round trip: no index to read first, no pointer to
//! chase. The table is kept
//! between 75% and 85% full (it grows by a third, not by doubling): 56.5 to 64
//! bytes per key, against about 200 for a `hashbrown` table of
//! `(CompactString, KeyState)`. See [`Table`].
//!
//! Two things shorten that round trip for a store of many keys. A table of
//! 2 MiB or more is mapped on transparent huge pages where the kernel allows
//! (see [`huge`]), so the lookup rarely waits for a page-table walk as well.
//! And the key's home bucket is prefetched, through a [`TableHint`] readable
//! without the lock, before its shard is locked, so the fetch overlaps taking
//! the lock and the lock is held for the decision only.
//!
//! Locking: a decision, a forget or an insert locks one shard; sweep and scan lock
//! one shard at a time.
//!
//! An entry holds the key (inline up to 24 bytes, longer keys on the heap) and the
//! key's state packed in 24 bytes when it is the common shape: **one counter** (a
//! tier whose limits share one counter, e.g. `100/1h`), either a token bucket or a
//! sliding window with at most 4 non-empty sub-windows of at most 2^18 - 1 units
//! each. Any other state (several counters, big counts, a clock that jumped far)
//! is kept as a plain [`KeyState`] in a side table of the shard, and goes back to
//! the packed form when it fits again. Both forms hold exactly the same state:
//! packing is a bijection checked when it is done, never an approximation, so
//! decisions are those of [`KeyState::apply`] whichever form a key is in.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use compact_str::CompactString;
use crossbeam_utils::CachePadded;
use parking_lot::Mutex;

use super::huge::{self, HugeArray};
use super::{Forget, Scan, Store, StoreError, Sweep};
use crate::algorithm::{CounterRef, KeyCounters, KeyState, OneCounter, Slot, decide};
use crate::clock::Timestamp;
use crate::decision::{Cost, Decision, Denial, LimitStatus, Mode};
use crate::quota::{Algorithm, CounterId, Limit};

/// How a [`MemoryStore`] is built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryStoreConfig {
    /// Number of lock shards; rounded up to a power of two. Default: 4 per available
    /// CPU (as `dashmap`), so that two running threads rarely want the same lock
    /// (a lock is held for tens of nanoseconds: the key's bucket is prefetched
    /// before it is taken), while each shard's table stays large enough to sit
    /// mostly on huge pages (see [`MemoryStore`]).
    pub shards: usize,
    /// The most keys tracked at once: a new key beyond it is refused with
    /// [`StoreError::Full`]. (Each shard also has a hard cap of a quarter more than
    /// its share, and of at most 16,777,214 keys, so a skewed flood cannot grow one
    /// table without bound.) Default: 4,000,000 (about 250 MB at most).
    pub max_keys: usize,
}

impl Default for MemoryStoreConfig {
    fn default() -> Self {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        MemoryStoreConfig {
            shards: cpus * 4,
            max_keys: 4_000_000,
        }
    }
}

/// `Entry::head`'s top byte: which form the state is in. Values below
/// [`TOMB`] are packed single-counter states, naming the counter by its
/// position in the shard's interned ids.
const GENERAL: u8 = 254;
/// `Entry::head`'s top byte for a never-used table slot: it ends a probe.
const VACANT: u8 = 255;
/// `Entry::head`'s top byte for the slot of a removed key: a probe goes past it,
/// an insert may reuse it, a rebuild drops it.
const TOMB: u8 = 253;
/// `Entry::head`'s next 8 bits: the key's hash fingerprint (its top 8 bits),
/// checked before the key is compared.
const FP_SHIFT: u32 = 48;
const FP_MASK: u64 = 0xff << FP_SHIFT;
/// `Entry::head`'s low 48 bits: `idle_at` (ms) of a packed state (until the
/// year 10889).
const IDLE_MASK: u64 = (1 << FP_SHIFT) - 1;
/// Sub-window slots of a packed window: `count << OFF_BITS | offset`.
const OFF_BITS: u32 = 14;
const OFF_MASK: u32 = (1 << OFF_BITS) - 1;
const MAX_PACKED_COUNT: u32 = (1 << (32 - OFF_BITS)) - 1;
/// Sub-windows a packed window holds.
const PACKED_SLOTS: usize = 4;

/// One slot of a shard's table: a tracked key and its state (48 bytes).
///
/// `head` is the form tag (top 8 bits), the key's hash fingerprint (next 8)
/// and, for a packed state, `idle_at` (low 48). For
/// a packed token bucket `a` is the level and `b` the last update; for a packed
/// sliding window `a` and `b` hold four `u32` sub-window slots, oldest first,
/// each `count << 14 | offset` where `offset` is the slot's sub-window number
/// counted back from `idle_at / sub_ms` (unused slots are 0: a stored count is
/// never 0). For [`GENERAL`], `a` is the position of the state in the shard's
/// side table.
struct Entry {
    /// `CompactString`: keys up to 24 bytes (most mail addresses) live inline.
    key: CompactString,
    head: u64,
    a: u64,
    b: u64,
}

impl Entry {
    const VACANT: Entry = Entry {
        key: CompactString::const_new(""),
        head: (VACANT as u64) << 56,
        a: 0,
        b: 0,
    };

    const TOMB: Entry = Entry {
        key: CompactString::const_new(""),
        head: (TOMB as u64) << 56,
        a: 0,
        b: 0,
    };

    fn tag(&self) -> u8 {
        (self.head >> 56) as u8
    }

    /// Whether the slot holds a key.
    fn is_live(&self) -> bool {
        self.tag() < TOMB || self.tag() == GENERAL
    }

    /// Stores a state (`head` without fingerprint bits), keeping the fingerprint.
    fn set(&mut self, head: u64, a: u64, b: u64) {
        debug_assert_eq!(head & FP_MASK, 0);
        (self.head, self.a, self.b) = (head | (self.head & FP_MASK), a, b);
    }
}

/// Entries per bucket: a bucket is three cache lines, read together.
const WAYS: usize = 4;

/// [`WAYS`] entries on their own cache lines (192 bytes, 64-byte aligned).
#[repr(align(64))]
struct Bucket([Entry; WAYS]);

impl Bucket {
    const VACANT: Bucket = Bucket([Entry::VACANT; WAYS]);
}

/// The most keys one shard holds.
const MAX_SHARD_KEYS: usize = (1 << 24) - 2;
/// A table grows when an insert would fill more than this share of its slots
/// (in percent, tombstones included), to hold its keys at 75%: between 56.5 and
/// 64 bytes per key.
const MAX_LOAD_PCT: usize = 85;

/// A shard's keys: an open-addressed table of buckets, with linear probing from
/// bucket to bucket. A key's home bucket is its hash's low 32 bits scaled to the
/// bucket count (any count: growth is by a third, not doubling, so the table
/// stays between 75% and 85% full). Within a bucket slots fill in order and a
/// vacant slot ends a probe, so a lookup reads the home bucket's three cache
/// lines at once and, 82-87% of the time (simulated at 85% and 75% load), no
/// more: one memory round trip for a cold key. Removal leaves a tombstone;
/// sweeps rebuild.
///
/// A position is `bucket * WAYS + way`; it stays valid until the table grows or
/// is rebuilt (only insert, sweep and rebuild do that, under the shard's lock).
#[derive(Default)]
struct Table {
    buckets: HugeArray<Bucket>,
    /// Where `buckets` is, for a prefetch before the shard is locked.
    hint: Arc<TableHint>,
    /// Slots holding a key.
    len: usize,
    /// Slots holding a key or a tombstone.
    used: usize,
}

impl Table {
    fn slots(&self) -> usize {
        self.buckets.len() * WAYS
    }

    fn get(&self, pos: u32) -> &Entry {
        &self.buckets[pos as usize / WAYS].0[pos as usize % WAYS]
    }

    fn get_mut(&mut self, pos: u32) -> &mut Entry {
        &mut self.buckets[pos as usize / WAYS].0[pos as usize % WAYS]
    }

    fn home(&self, hash: u64) -> usize {
        home_bucket(hash, self.buckets.len())
    }

    /// The position of `key` (whose hash is `hash`).
    #[inline]
    fn find(&self, hash: u64, key: &str) -> Option<u32> {
        let n = self.buckets.len();
        let fp = hash >> 56;
        let mut b = self.home(hash);
        for _ in 0..n {
            let bucket = &self.buckets[b].0;
            // All the heads first: the three lines are fetched together.
            let heads: [u64; WAYS] = std::array::from_fn(|w| bucket[w].head);
            for (w, head) in heads.into_iter().enumerate() {
                let form = (head >> 56) as u8;
                if form == VACANT {
                    return None;
                }
                if (head >> FP_SHIFT) & 0xff == fp && form != TOMB && bucket[w].key == key {
                    return Some((b * WAYS + w) as u32);
                }
            }
            b = if b + 1 == n { 0 } else { b + 1 };
        }
        None
    }

    /// The first vacant or tombstone slot on `hash`'s probe path (the table is
    /// never full: at most [`MAX_LOAD_PCT`] of it is used).
    fn place(&self, hash: u64) -> Option<u32> {
        let n = self.buckets.len();
        let mut b = self.home(hash);
        for _ in 0..n {
            for (w, e) in self.buckets[b].0.iter().enumerate() {
                if !e.is_live() {
                    return Some((b * WAYS + w) as u32);
                }
            }
            b = if b + 1 == n { 0 } else { b + 1 };
        }
        None
    }

    /// Adds `key` (not present) with no state yet (the caller sets it next);
    /// grows the table first if needed. Returns its position.
    fn insert(&mut self, hash: u64, key: &str, hash_of: impl Fn(&str) -> u64) -> u32 {
        if (self.used + 1) * 100 > self.slots() * MAX_LOAD_PCT {
            self.rebuild(self.len + 1, &hash_of);
        }
        // `place` finds a slot at the load kept; should it ever not, grow until it does.
        let pos = loop {
            if let Some(pos) = self.place(hash) {
                break pos;
            }
            self.rebuild(self.len * 2 + 8, &hash_of);
        };
        if self.get(pos).tag() == VACANT {
            self.used += 1;
        }
        *self.get_mut(pos) = Entry {
            key: CompactString::new(key),
            head: (u64::from(VACANT) << 56) | (hash >> 56 << FP_SHIFT),
            a: 0,
            b: 0,
        };
        self.len += 1;
        pos
    }

    /// Takes the key at `pos` out, leaving a tombstone; returns its entry.
    fn remove(&mut self, pos: u32) -> Entry {
        self.len -= 1;
        std::mem::replace(self.get_mut(pos), Entry::TOMB)
    }

    /// Every key with its position.
    fn iter(&self) -> impl Iterator<Item = (u32, &Entry)> {
        self.buckets
            .iter()
            .flat_map(|b| b.0.iter())
            .enumerate()
            .filter(|(_, e)| e.is_live())
            .map(|(i, e)| (i as u32, e))
    }

    /// Publishes where the buckets are now (after every reallocation).
    fn publish(&self) {
        self.hint
            .base
            .store(self.buckets.as_ptr() as usize, Ordering::Relaxed);
        self.hint
            .buckets
            .store(self.buckets.len(), Ordering::Relaxed);
    }

    /// Re-places every key in a table sized for `keys` keys at 75% load (at
    /// least two buckets), dropping tombstones. Positions change.
    fn rebuild(&mut self, keys: usize, hash_of: impl Fn(&str) -> u64) {
        let slots = (keys.max(self.len) * 4 / 3 + 1).max(2 * WAYS);
        let mut old = std::mem::replace(
            &mut self.buckets,
            HugeArray::new(slots.div_ceil(WAYS), || Bucket::VACANT),
        );
        self.publish();
        self.len = 0;
        self.used = 0;
        for slot in old.iter_mut().flat_map(|b| b.0.iter_mut()) {
            if !slot.is_live() {
                continue;
            }
            let e = std::mem::replace(slot, Entry::VACANT);
            if let Some(pos) = self.place(hash_of(e.key.as_str())) {
                *self.get_mut(pos) = e;
                self.len += 1;
                self.used += 1;
            }
        }
    }
}

/// The home bucket of `hash` among `buckets`: the hash's low 32 bits scaled
/// to the count (the table's lookups and the lock-free prefetch must agree).
#[inline]
fn home_bucket(hash: u64, buckets: usize) -> usize {
    (((hash & 0xffff_ffff) * buckets as u64) >> 32) as usize
}

/// Where a shard's table is, readable without the shard's lock: the store
/// prefetches a key's home bucket before it locks the shard, so the memory
/// round trip overlaps the lock. Only a hint: the two words may be stale or
/// from two different tables, which at worst fetches a useless line.
#[derive(Default)]
struct TableHint {
    base: AtomicUsize,
    buckets: AtomicUsize,
}

impl TableHint {
    /// Starts loading the three cache lines of `hash`'s home bucket.
    #[inline]
    fn prefetch(&self, hash: u64) {
        let home = home_bucket(hash, self.buckets.load(Ordering::Relaxed));
        let at = self
            .base
            .load(Ordering::Relaxed)
            .wrapping_add(home * std::mem::size_of::<Bucket>());
        for line in 0..std::mem::size_of::<Bucket>() / 64 {
            huge::prefetch(at.wrapping_add(line * 64));
        }
    }
}

/// Exact `n / d` by a multiplication for the `n` a packed entry holds (below
/// 2^56: `idle_at`, and the times decided at): sub-window numbers are needed
/// on every decision, and a 64-bit division costs several times a multiply.
///
/// With `l = ceil(log2 d)` and `m = ceil(2^(56 + l) / d)` (at most 2^57),
/// `floor(n / d) = floor(m * n / 2^(56 + l))` for every `n < 2^56`: the error
/// `m / 2^(56 + l) - 1 / d` is below `1 / (d * 2^56)`, too little to carry a
/// quotient over the next integer (Granlund and Montgomery, 1994).
#[derive(Debug, Clone, Copy)]
struct Divisor {
    d: u64,
    m: u64,
    shift: u32,
}

impl Divisor {
    const BITS: u32 = 56;

    /// Division by `d` (at least 1).
    fn new(d: u64) -> Divisor {
        let d = d.max(1);
        let l = 64 - (d - 1).leading_zeros();
        let shift = Divisor::BITS + l;
        let m = (1u128 << shift).div_ceil(u128::from(d));
        Divisor {
            d,
            m: m as u64,
            shift,
        }
    }

    #[inline]
    fn div(self, n: u64) -> u64 {
        if n >> Divisor::BITS == 0 {
            ((u128::from(self.m) * u128::from(n)) >> self.shift) as u64
        } else {
            n / self.d
        }
    }
}

/// The counter ids that packed entries of one shard name by a one-byte tag.
#[derive(Default)]
struct Ids {
    ids: Vec<CounterId>,
    /// Division by the sub-window length (ms) of each id (by 1 for a bucket).
    subs: Vec<Divisor>,
}

struct Shard {
    table: Table,
    ids: Ids,
    /// States that do not pack, and the free positions among them.
    general: Vec<KeyState>,
    general_free: Vec<u64>,
    /// When this shard was last swept because it was full (ms), to bound that work.
    last_full_sweep: u64,
}

impl Ids {
    /// The tag naming counter `id`, interning it if there is room.
    fn intern(&mut self, id: CounterId) -> Option<u8> {
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

    /// `state` packed as (head, a, b), if it has the packable shape (see [`Entry`]).
    fn pack(&mut self, state: &KeyState) -> Option<(u64, u64, u64)> {
        let [counter] = state.counters.as_slice() else {
            return None;
        };
        self.pack_parts(counter.id, state.idle_at, counter.data.as_ref())
    }

    /// [`Ids::pack`] for a [`OneCounter`].
    fn pack_one(&mut self, one: &OneCounter) -> Option<(u64, u64, u64)> {
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
                let mut words = [0u64; PACKED_SLOTS];
                for (w, s) in words.iter_mut().zip(slots) {
                    let off = anchor.wrapping_sub(s.idx);
                    if off > OFF_MASK || s.count == 0 || s.count > MAX_PACKED_COUNT {
                        return None;
                    }
                    *w = u64::from((s.count << OFF_BITS) | off);
                }
                Some((
                    head,
                    words[0] | (words[1] << 32),
                    words[2] | (words[3] << 32),
                ))
            }
            _ => None,
        }
    }

    /// The state of a packed entry (its tag below [`GENERAL`]).
    fn unpack(&self, e: &Entry) -> OneCounter {
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
            for w in [
                e.a as u32,
                (e.a >> 32) as u32,
                e.b as u32,
                (e.b >> 32) as u32,
            ] {
                if w == 0 {
                    break;
                }
                one.slots[usize::from(one.len)] = Slot {
                    idx: anchor.wrapping_sub(w & OFF_MASK),
                    count: w >> OFF_BITS,
                };
                one.len += 1;
            }
        }
        one
    }
}

impl Shard {
    fn new() -> Shard {
        Shard {
            table: Table::default(),
            ids: Ids::default(),
            general: Vec::new(),
            general_free: Vec::new(),
            last_full_sweep: 0,
        }
    }

    fn len(&self) -> usize {
        self.table.len
    }

    fn find(&self, hash: u64, key: &str) -> Option<u32> {
        self.table.find(hash, key)
    }

    /// Calls `f` with the state of entry `e`.
    fn with_state<R>(&self, e: &Entry, f: impl FnOnce(&KeyState) -> R) -> R {
        match e.tag() {
            GENERAL => f(&self.general[e.a as usize]),
            _ => f(&self.ids.unpack(e).to_key_state()),
        }
    }

    fn is_idle(&self, e: &Entry, now: Timestamp) -> bool {
        match e.tag() {
            GENERAL => self.general[e.a as usize].is_idle(now),
            _ => now.as_millis() >= e.head & IDLE_MASK,
        }
    }

    /// Puts `state` in the entry at `pos`, packed if it fits, else in the side
    /// table (reusing the entry's place there if it had one).
    fn set_state(&mut self, pos: u32, state: KeyState) {
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
    fn set_one(&mut self, pos: u32, one: &OneCounter) {
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
    fn apply(
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

    /// The common case of [`Shard::apply`], decided on the packed words
    /// directly: one limit, and the entry at `pos` is packed and either idle or
    /// holding that limit's counter. Every step is the one [`decide`] takes
    /// (`probe_window`/`record_window`, `probe_bucket`/`record_bucket`), on the
    /// same numbers; the proptests below hold the two to the same decisions and
    /// the same states. `None`, with nothing changed, when the case is another
    /// one or the new state would not pack: the general path then decides.
    ///
    /// Returns the denial and the one status rather than a [`Decision`] (a
    /// quarter of a kilobyte): the caller builds that where it returns it.
    #[inline(always)]
    fn apply_packed(
        &mut self,
        pos: u32,
        limit: &Limit,
        cost: Cost,
        now: Timestamp,
        mode: Mode,
    ) -> Option<(Option<Denial>, LimitStatus)> {
        let now_ms = now.as_millis();
        if now_ms > IDLE_MASK {
            return None;
        }
        let e = self.table.get(pos);
        if e.tag() >= GENERAL {
            return None;
        }
        let (head, wa, wb) = (e.head, e.a, e.b);
        let stored_idle = head & IDLE_MASK;
        let live = now_ms < stored_idle;
        let id = limit.counter_id();
        let tag = if live {
            let tag = e.tag();
            if self.ids.ids.get(usize::from(tag)) != Some(&id) {
                return None;
            }
            tag
        } else {
            self.ids.intern(id)?
        };
        let c = cost.get(limit.unit());
        let n = limit.count();
        let record = mode == Mode::Acquire;
        let (status, idle_at, a, b) = match limit.algorithm() {
            Algorithm::SlidingWindow { precision } => {
                let div = *self.ids.subs.get(usize::from(tag))?;
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
                    for w in [wa as u32, (wa >> 32) as u32, wb as u32, (wb >> 32) as u32] {
                        if w == 0 {
                            break;
                        }
                        slots[len] = Slot {
                            idx: anchor.wrapping_sub(w & OFF_MASK),
                            count: w >> OFF_BITS,
                        };
                        len += 1;
                    }
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
                let anchor = div.div(idle_at) as u32;
                let mut words = [0u64; PACKED_SLOTS];
                for (w, s) in words.iter_mut().zip(&slots[..len]) {
                    let off = anchor.wrapping_sub(s.idx);
                    if off > OFF_MASK || s.count == 0 || s.count > MAX_PACKED_COUNT {
                        return None;
                    }
                    *w = u64::from((s.count << OFF_BITS) | off);
                }
                (
                    status,
                    idle_at,
                    words[0] | (words[1] << 32),
                    words[2] | (words[3] << 32),
                )
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
        let e = self.table.get_mut(pos);
        e.set((u64::from(tag) << 56) | idle_at, a, b);
        Some((None, status))
    }

    /// Adds a new key (not present), with no state yet: set it next.
    fn insert(&mut self, hash: u64, key: &str, hasher: &ahash::RandomState) -> u32 {
        self.table.insert(hash, key, |k| hasher.hash_one(k))
    }

    /// Removes the key at `pos`.
    fn remove(&mut self, pos: u32) {
        let e = self.table.remove(pos);
        if e.tag() == GENERAL {
            self.free_general(e.a);
        }
    }

    /// Forgets every key idle at `now`; returns how many. The removed keys leave
    /// tombstones; the table is rebuilt, sized for the keys left, once tombstones
    /// take a quarter of it or the keys left fill less than 3/8 of it (after a
    /// key flood, so the memory the flood took is given back).
    fn sweep(&mut self, now: Timestamp, hasher: &ahash::RandomState) -> usize {
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

/// A sharded in-memory [`Store`].
///
/// Keys are hashed once (ahash, per-process random seeds, so user-chosen keys
/// cannot force collisions); the hash picks a shard, a home bucket in that shard's
/// table and an 8-bit fingerprint. Each shard is a cache-padded `parking_lot`
/// mutex over its table and side table (see the module docs); a decision locks exactly
/// one shard, and looks up an existing key by `&str` without allocating.
///
/// **Memory.** About 56.5 to 64 bytes per tracked key (a key of up to 24 bytes
/// whose state packs; see the module docs). On Linux a shard's table of 2 MiB
/// or more is mapped directly from the kernel and advised `MADV_HUGEPAGE`, so
/// with transparent huge pages set to `madvise` (the usual default) or `always`
/// it sits mostly on huge pages; [`MemoryStore::mapped_bytes`] counts it, as a
/// counting global allocator cannot.
///
/// **Key cap.** At most [`MemoryStoreConfig::max_keys`] keys are tracked. When a
/// shard is full, a new key first triggers a sweep of that shard (at most once a
/// second); if it is still full the new key's check fails with [`StoreError::Full`],
/// and the caller's failure policy applies. Tracked keys are never evicted: a key
/// flood cannot hand an abuser's quota back.
///
/// # Examples
///
/// ```
/// use ratelimit_core::{Cost, Limit, MemoryStore, Mode, Store, Timestamp};
///
/// let store = MemoryStore::new();
/// let limits = ["1/1m".parse::<Limit>().unwrap()];
/// let now = Timestamp::from_millis(1_700_000_000_000);
/// let d = store.check("alice", &limits, Cost::units(1), now, Mode::Acquire).unwrap();
/// assert!(d.is_allowed());
/// let d = store.check("alice", &limits, Cost::units(1), now, Mode::Acquire).unwrap();
/// assert!(!d.is_allowed());
/// ```
pub struct MemoryStore {
    shards: Box<[CachePadded<Mutex<Shard>>]>,
    /// Each shard's [`TableHint`] (shared with its table), by shard index.
    hints: Box<[Arc<TableHint>]>,
    hasher: ahash::RandomState,
    mask: u64,
    per_shard_cap: usize,
    max_keys: usize,
    len: AtomicUsize,
}

impl Default for MemoryStore {
    fn default() -> Self {
        MemoryStore::new()
    }
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore")
            .field("shards", &self.shards.len())
            .field("max_keys", &self.max_keys)
            .field("keys", &self.len.load(Ordering::Relaxed))
            .finish()
    }
}

/// Which bits of the hash choose the shard: the middle ones. The table uses the
/// low 32 bits for the home bucket and the top 8 for the fingerprint, so neither
/// loses entropy to sharding.
const SHARD_SHIFT: u32 = 40;

impl MemoryStore {
    /// A store with the default configuration.
    pub fn new() -> Self {
        MemoryStore::with_config(MemoryStoreConfig::default())
    }

    /// A store with this configuration.
    pub fn with_config(config: MemoryStoreConfig) -> Self {
        let shards = config.shards.clamp(1, 1 << 16).next_power_of_two();
        let max_keys = config.max_keys.max(1);
        let per_shard_cap = max_keys.div_ceil(shards) + max_keys.div_ceil(shards * 4) + 1;
        let shards: Box<[_]> = (0..shards)
            .map(|_| CachePadded::new(Mutex::new(Shard::new())))
            .collect();
        MemoryStore {
            hints: shards.iter().map(|s| s.lock().table.hint.clone()).collect(),
            mask: shards.len() as u64 - 1,
            shards,
            hasher: ahash::RandomState::new(),
            per_shard_cap: per_shard_cap.min(MAX_SHARD_KEYS),
            max_keys,
            len: AtomicUsize::new(0),
        }
    }

    /// Bytes of table memory that all memory stores of this process hold
    /// mapped directly from the kernel rather than through the global
    /// allocator: on Linux, each table of 2 MiB or more (so that it can sit on
    /// huge pages). A counting global allocator does not see these bytes.
    pub fn mapped_bytes() -> usize {
        huge::mapped_bytes()
    }

    /// The number of shards.
    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    /// The configured key cap.
    pub fn max_keys(&self) -> usize {
        self.max_keys
    }

    /// Whether a new key may not be added (the caller holds `shard`'s lock).
    fn is_full(&self, shard: &Shard) -> bool {
        self.len.load(Ordering::Relaxed) >= self.max_keys || shard.len() >= self.per_shard_cap
    }

    /// Claims room for one new key in `shard` (whose lock the caller holds): the
    /// global count is raised only if it is below the cap, in one atomic step, so
    /// threads adding keys to different shards at once cannot overshoot it.
    fn reserve(&self, shard: &Shard) -> bool {
        shard.len() < self.per_shard_cap
            && self
                .len
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                    (n < self.max_keys).then_some(n + 1)
                })
                .is_ok()
    }

    fn shard_index(&self, hash: u64) -> usize {
        ((hash >> SHARD_SHIFT) & self.mask) as usize
    }

    fn shard_for(&self, hash: u64) -> &Mutex<Shard> {
        &self.shards[self.shard_index(hash)]
    }

    /// The number of tracked keys. Read without locking (a relaxed counter kept
    /// beside the shards).
    pub fn key_count(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    /// [`Scan::scan`], which cannot fail here: calls `f` for every tracked key,
    /// locking one shard at a time for the time it takes to call `f` on its keys.
    pub(crate) fn for_each_state(&self, f: &mut dyn FnMut(&str, &KeyState)) {
        for shard in self.shards.iter() {
            let shard = shard.lock();
            for (_, e) in shard.table.iter() {
                shard.with_state(e, |state| f(&e.key, state));
            }
        }
    }

    /// Puts a key's state in place, replacing what was there (snapshot restore).
    /// Idle states are skipped. Fails with [`StoreError::Full`] at the cap.
    pub(crate) fn insert_state(
        &self,
        key: &str,
        state: KeyState,
        now: Timestamp,
    ) -> Result<(), StoreError> {
        if state.is_idle(now) {
            return Ok(());
        }
        let hash = self.hasher.hash_one(key);
        let mut shard = self.shard_for(hash).lock();
        if let Some(pos) = shard.find(hash, key) {
            shard.set_state(pos, state);
            return Ok(());
        }
        if !self.reserve(&shard) {
            return Err(StoreError::Full {
                max_keys: self.max_keys,
            });
        }
        let pos = shard.insert(hash, key, &self.hasher);
        shard.set_state(pos, state);
        Ok(())
    }
}

impl Store for MemoryStore {
    /// Locks the key's shard for the duration of the decision.
    fn check(
        &self,
        key: &str,
        limits: &[Limit],
        cost: Cost,
        now: Timestamp,
        mode: Mode,
    ) -> Result<Decision, StoreError> {
        if limits.is_empty() {
            return Ok(Decision::UNLIMITED);
        }
        let hash = self.hasher.hash_one(key);
        self.hints[self.shard_index(hash)].prefetch(hash);
        let mut shard = self.shard_for(hash).lock();
        if let Some(pos) = shard.find(hash, key) {
            if let [limit] = limits
                && let Some((denial, status)) = shard.apply_packed(pos, limit, cost, now, mode)
            {
                return Ok(Decision::single(denial, status));
            }
            return Ok(shard.apply(pos, limits, cost, now, mode));
        }
        // A new key: decide on an empty state; keep it only if something was recorded.
        let mut one = OneCounter::EMPTY;
        let mut state = KeyState::new();
        let (decision, recorded) = if one.fits(limits, now) {
            let d = decide(&mut one, limits, cost, now, mode);
            (d, one.present)
        } else {
            let d = state.apply(limits, cost, now, mode);
            (d, state.counter_count() > 0)
        };
        if !recorded {
            return Ok(decision);
        }
        let now_ms = now.as_millis();
        if self.is_full(&shard) && now_ms >= shard.last_full_sweep + 1000 {
            shard.last_full_sweep = now_ms;
            let removed = shard.sweep(now, &self.hasher);
            self.len.fetch_sub(removed, Ordering::Relaxed);
        }
        if !self.reserve(&shard) {
            return Err(StoreError::Full {
                max_keys: self.max_keys,
            });
        }
        let pos = shard.insert(hash, key, &self.hasher);
        if one.present {
            shard.set_one(pos, &one);
        } else {
            shard.set_state(pos, state);
        }
        Ok(decision)
    }
}

impl Sweep for MemoryStore {
    /// Locks one shard at a time. Rebuilds a shard's table, sized for the keys
    /// left, when keys were removed (so a key flood's memory is given back).
    fn sweep(&self, now: Timestamp) -> usize {
        let mut removed = 0;
        for shard in self.shards.iter() {
            removed += shard.lock().sweep(now, &self.hasher);
        }
        self.len.fetch_sub(removed, Ordering::Relaxed);
        removed
    }
}

impl Scan for MemoryStore {
    /// Locks one shard at a time, for the time it takes to call `f` on its keys.
    /// Never fails.
    fn scan(&self, f: &mut dyn FnMut(&str, &KeyState)) -> Result<(), StoreError> {
        self.for_each_state(f);
        Ok(())
    }
}

impl Forget for MemoryStore {
    /// Locks the key's shard.
    fn forget(&self, key: &str) -> Result<bool, StoreError> {
        let hash = self.hasher.hash_one(key);
        let mut shard = self.shard_for(hash).lock();
        match shard.find(hash, key) {
            Some(pos) => {
                shard.remove(pos);
                self.len.fetch_sub(1, Ordering::Relaxed);
                Ok(true)
            }
            None => Ok(false),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;
    use std::time::Duration;

    const T0: u64 = 1_700_000_000_000;

    fn limits() -> [Limit; 1] {
        ["2/1m".parse().unwrap()]
    }

    fn acquire(s: &MemoryStore, key: &str, t: u64) -> Result<Decision, StoreError> {
        s.check(
            key,
            &limits(),
            Cost::units(1),
            Timestamp::from_millis(T0 + t),
            Mode::Acquire,
        )
    }

    #[test]
    fn an_entry_is_48_bytes() {
        assert_eq!(size_of::<Entry>(), 48);
    }

    #[test]
    fn shard_count_is_a_power_of_two() {
        let s = MemoryStore::with_config(MemoryStoreConfig {
            shards: 5,
            max_keys: 10,
        });
        assert_eq!(s.shard_count(), 8);
    }

    #[test]
    fn peeks_and_refusals_do_not_create_keys() {
        let s = MemoryStore::new();
        let now = Timestamp::from_millis(T0);
        s.check("a", &limits(), Cost::units(1), now, Mode::Peek)
            .unwrap();
        s.check("b", &limits(), Cost::units(5), now, Mode::Acquire)
            .unwrap();
        assert_eq!(s.key_count(), 0);
        acquire(&s, "a", 0).unwrap();
        assert_eq!(s.key_count(), 1);
    }

    #[test]
    fn sweep_forgets_only_idle_keys() {
        let s = MemoryStore::new();
        acquire(&s, "old", 0).unwrap();
        acquire(&s, "new", 30_000).unwrap();
        assert_eq!(s.sweep(Timestamp::from_millis(T0 + 61_000)), 1);
        assert_eq!(s.key_count(), 1);
        let mut keys = Vec::new();
        s.scan(&mut |k, _| keys.push(k.to_string())).unwrap();
        assert_eq!(keys, ["new"]);
        assert_eq!(acquire(&s, "new", 31_000).unwrap().statuses()[0].used, 1);
    }

    /// Each shard's prefetch hint names its current table, through the growth
    /// to tables mapped on huge pages (2 MiB and more) and a rebuild that
    /// shrinks them back, and every key is still found.
    #[test]
    fn the_prefetch_hint_follows_each_table() {
        let s = MemoryStore::with_config(MemoryStoreConfig {
            shards: 2,
            max_keys: 1_000_000,
        });
        let hints_match = |s: &MemoryStore| {
            for (shard, hint) in s.shards.iter().zip(s.hints.iter()) {
                let shard = shard.lock();
                let base = shard.table.buckets.as_ptr() as usize;
                assert_eq!(hint.base.load(Ordering::Relaxed), base);
                assert_eq!(
                    hint.buckets.load(Ordering::Relaxed),
                    shard.table.buckets.len()
                );
            }
        };
        let keys = 100_000;
        for i in 0..keys {
            acquire(&s, &format!("user{i}@example.com"), 0).unwrap();
        }
        hints_match(&s);
        let bytes = s.shards[0].lock().table.buckets.len() * std::mem::size_of::<Bucket>();
        assert!(bytes >= huge::HUGE_PAGE, "a shard's table is {bytes} bytes");
        #[cfg(target_os = "linux")]
        assert!(MemoryStore::mapped_bytes() >= bytes);
        for i in 0..keys {
            let d = acquire(&s, &format!("user{i}@example.com"), 1).unwrap();
            assert_eq!(d.statuses()[0].used, 1, "the first message is counted");
        }
        assert_eq!(s.sweep(Timestamp::from_millis(T0 + 61_000)), keys);
        hints_match(&s);
        assert!(s.shards[0].lock().table.buckets.len() < 10);
    }

    #[test]
    fn at_the_cap_new_keys_fail_and_tracked_keys_keep_working() {
        let s = MemoryStore::with_config(MemoryStoreConfig {
            shards: 1,
            max_keys: 3,
        });
        for k in ["a", "b", "c"] {
            acquire(&s, k, 0).unwrap();
        }
        let err = acquire(&s, "d", 0).unwrap_err();
        assert!(matches!(err, StoreError::Full { max_keys: 3 }), "{err}");
        assert_eq!(
            err.to_string(),
            "the store is full: it tracks its maximum of 3 keys"
        );
        // Tracked keys are not evicted and still count.
        assert!(acquire(&s, "a", 0).unwrap().is_allowed());
        assert!(!acquire(&s, "a", 0).unwrap().is_allowed());
        // Once old keys have decayed, a new key triggers a sweep and gets in.
        assert!(acquire(&s, "d", 120_000).unwrap().is_allowed());
        assert_eq!(s.key_count(), 1);
    }

    #[test]
    fn forget_unblocks_a_key() {
        let s = MemoryStore::new();
        acquire(&s, "a", 0).unwrap();
        acquire(&s, "a", 0).unwrap();
        assert!(!acquire(&s, "a", 0).unwrap().is_allowed());
        assert!(s.forget("a").unwrap());
        assert!(!s.forget("a").unwrap());
        assert!(acquire(&s, "a", 0).unwrap().is_allowed());
    }

    #[test]
    fn unlimited_tiers_track_nothing() {
        let s = MemoryStore::new();
        let d = s
            .check(
                "a",
                &[],
                Cost::units(1_000_000),
                Timestamp::from_millis(T0),
                Mode::Acquire,
            )
            .unwrap();
        assert!(d.is_allowed());
        assert_eq!(d.remaining(), u64::MAX);
        assert_eq!(s.key_count(), 0);
    }

    #[test]
    fn a_key_flood_is_given_back_by_a_sweep() {
        let s = MemoryStore::with_config(MemoryStoreConfig {
            shards: 2,
            max_keys: 1_000_000,
        });
        for i in 0..20_000 {
            acquire(&s, &format!("flood{i}@example.com"), 0).unwrap();
        }
        acquire(&s, "stays", 100_000).unwrap();
        assert_eq!(s.sweep(Timestamp::from_millis(T0 + 100_000)), 20_000);
        assert_eq!(s.key_count(), 1);
        for shard in s.shards.iter() {
            let shard = shard.lock();
            assert!(shard.table.slots() <= 2 * WAYS, "the table was shrunk");
        }
        let d = acquire(&s, "stays", 100_001).unwrap();
        assert_eq!(d.statuses()[0].used, 1);
    }

    proptest! {
        /// The multiply-and-shift division is exact below 2^56, for any divisor.
        #[test]
        fn divisor_divides_exactly(
            d in prop_oneof![1u64..=130_000, any::<u64>(), (0u32..64).prop_map(|k| 1u64 << k)],
            n in prop_oneof![any::<u64>(), 0u64..(1 << 56), Just((1u64 << 56) - 1)],
        ) {
            let div = Divisor::new(d);
            let d = d.max(1);
            prop_assert_eq!(div.div(n), n / d);
            // Around multiples of d, where a quotient would carry over first.
            let q = n / d;
            for m in [q.saturating_mul(d), q.saturating_mul(d).saturating_sub(1)] {
                prop_assert_eq!(div.div(m), m / d);
            }
        }

        /// The table finds exactly what was inserted and not removed, through
        /// growth, tombstones and rebuilds, with hashes crowded into three home
        /// places and four fingerprints so that probes run over full buckets
        /// and wrap around.
        #[test]
        fn the_table_finds_what_it_holds(
            ops in prop::collection::vec((0u8..10, 0u32..300), 1..800)
        ) {
            let hash_of = |k: &str| {
                let p: u64 = k.parse().unwrap();
                ((p % 3) << 30) | ((p % 4) << 56)
            };
            let mut table = Table::default();
            let mut held = std::collections::BTreeSet::new();
            for (op, p) in ops {
                let key = p.to_string();
                let found = table.find(hash_of(&key), &key);
                prop_assert_eq!(found.is_some(), held.contains(&p));
                match (op, found) {
                    (0..=5, None) => {
                        let pos = table.insert(hash_of(&key), &key, hash_of);
                        table.get_mut(pos).set(0, 0, 0);
                        held.insert(p);
                    }
                    (6..=8, Some(pos)) => {
                        let removed = table.remove(pos);
                        prop_assert_eq!(removed.key.as_str(), key.as_str());
                        held.remove(&p);
                    }
                    (9, _) => table.rebuild(0, hash_of),
                    _ => {}
                }
                prop_assert_eq!(table.len, held.len());
                prop_assert!(table.used * 100 <= table.slots() * MAX_LOAD_PCT);
            }
            for p in 0..300u32 {
                let key = p.to_string();
                let found = table.find(hash_of(&key), &key);
                prop_assert_eq!(found.is_some(), held.contains(&p));
                if let Some(pos) = found {
                    prop_assert_eq!(table.get(pos).key.as_str(), key.as_str());
                }
            }
            prop_assert_eq!(table.iter().count(), held.len());
        }
    }

    /// The state of `key` as the store holds it.
    fn state_of(s: &MemoryStore, key: &str) -> Option<KeyState> {
        let mut found = None;
        s.scan(&mut |k, state| {
            if k == key {
                found = Some(state.clone());
            }
        })
        .unwrap();
        found
    }

    #[test]
    fn common_states_are_packed_and_others_kept_whole() {
        let s = MemoryStore::with_config(MemoryStoreConfig {
            shards: 1,
            max_keys: 100,
        });
        let now = |ms| Timestamp::from_millis(T0 + ms);
        let hourly: Limit = "100/1h".parse().unwrap();
        let daily: Limit = "1000/1d".parse().unwrap();
        let bucket = Limit::token_bucket(100, Duration::from_secs(3600), 100).unwrap();
        let form = |key: &str| {
            let shard = s.shards[0].lock();
            let pos = shard.find(s.hasher.hash_one(key), key).unwrap();
            shard.table.get(pos).tag()
        };
        for i in 0..4 {
            s.check(
                "w",
                &[hourly],
                Cost::units(1),
                now(i * 60_000),
                Mode::Acquire,
            )
            .unwrap();
        }
        assert!(form("w") < GENERAL, "four sub-windows pack");
        let packed = state_of(&s, "w").unwrap();
        s.check(
            "w",
            &[hourly],
            Cost::units(1),
            now(4 * 60_000),
            Mode::Acquire,
        )
        .unwrap();
        assert_eq!(form("w"), GENERAL, "a fifth does not");
        assert_eq!(state_of(&s, "w").unwrap().used(&hourly, now(4 * 60_000)), 5);
        assert!(packed.used(&hourly, now(0)) == 4);
        s.check("b", &[bucket], Cost::units(3), now(0), Mode::Acquire)
            .unwrap();
        assert!(form("b") < GENERAL);
        s.check(
            "two",
            &[hourly, daily],
            Cost::units(1),
            now(0),
            Mode::Acquire,
        )
        .unwrap();
        assert_eq!(form("two"), GENERAL, "two counters do not pack");
        // Once everything has decayed, the next event packs again.
        s.check(
            "w",
            &[hourly],
            Cost::units(1),
            now(10_000_000),
            Mode::Acquire,
        )
        .unwrap();
        assert!(form("w") < GENERAL);
        // A count too big for a packed sub-window.
        let bytes: Limit = "100000000/1h".parse().unwrap();
        s.check("big", &[bytes], Cost::units(300_000), now(0), Mode::Acquire)
            .unwrap();
        assert_eq!(form("big"), GENERAL);
        assert_eq!(state_of(&s, "big").unwrap().used(&bytes, now(0)), 300_000);
        let shard = s.shards[0].lock();
        assert_eq!(shard.general.len() - shard.general_free.len(), 2);
    }

    /// One step of a random history over a few keys and tiers.
    #[derive(Debug, Clone)]
    enum Op {
        Check {
            dt: i64,
            key: u16,
            tier: usize,
            cost: u64,
            acquire: bool,
        },
        Sweep,
        Forget(u16),
    }

    fn tiers() -> Vec<Vec<Limit>> {
        let l = |s: &str| s.parse::<Limit>().unwrap();
        let b = |n, w, burst| Limit::token_bucket(n, Duration::from_millis(w), burst).unwrap();
        vec![
            vec![l("5/10s")],
            vec![l("3/10s")],
            vec![b(2, 5_000, 3)],
            vec![l("5/10s"), l("7/10s")],
            vec![l("5/10s"), b(2, 5_000, 3)],
            vec![l("400000/10s")],
            vec![l("2/1s").with_precision(1000).unwrap()],
            vec![b(u64::from(u32::MAX), 7, 5)],
        ]
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            30 => (
                prop_oneof![5 => 0i64..=700, 1 => -20_000i64..0, 1 => 0i64..=40_000],
                // Mostly a few keys with long histories, some of many.
                prop_oneof![4 => 0u16..4, 1 => 0u16..300],
                0..tiers().len(),
                prop_oneof![5 => 0u64..=3, 1 => 0u64..=300_000],
                prop::bool::weighted(0.8),
            )
                .prop_map(|(dt, key, tier, cost, acquire)| Op::Check {
                    dt,
                    key,
                    tier,
                    cost,
                    acquire
                }),
            1 => Just(Op::Sweep),
            1 => prop_oneof![3 => 0u16..4, 1 => 0u16..300].prop_map(Op::Forget),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        /// Whatever form each key is in (packed or whole), moving between tiers,
        /// sweeps and forgets: the store decides and holds exactly what one
        /// `KeyState` per key does.
        #[test]
        fn the_store_holds_exactly_what_key_states_hold(ops in prop::collection::vec(op(), 1..400)) {
            let store = MemoryStore::with_config(MemoryStoreConfig { shards: 2, max_keys: 10_000 });
            let tiers = tiers();
            let mut model: HashMap<String, KeyState> = HashMap::new();
            let mut t = T0 as i64;
            for op in &ops {
                match op {
                    Op::Check { dt, key, tier, cost, acquire } => {
                        t = (t + dt).max(T0 as i64);
                        let now = Timestamp::from_millis(t as u64);
                        let key = format!("user{key}@example.com");
                        let mode = if *acquire { Mode::Acquire } else { Mode::Peek };
                        let limits = &tiers[*tier];
                        let got = store.check(&key, limits, Cost::units(*cost), now, mode).unwrap();
                        let state = model.entry(key.clone()).or_default();
                        let want = state.apply(limits, Cost::units(*cost), now, mode);
                        prop_assert_eq!(got, want);
                        if state.counter_count() == 0 {
                            model.remove(&key);
                        }
                    }
                    Op::Sweep => {
                        let now = Timestamp::from_millis(t as u64);
                        let before = model.len();
                        model.retain(|_, s| !s.is_idle(now));
                        prop_assert_eq!(store.sweep(now), before - model.len());
                    }
                    Op::Forget(key) => {
                        let key = format!("user{key}@example.com");
                        prop_assert_eq!(store.forget(&key).unwrap(), model.remove(&key).is_some());
                    }
                }
            }
            let mut held = HashMap::new();
            store.scan(&mut |k, s| { held.insert(k.to_string(), s.clone()); }).unwrap();
            prop_assert_eq!(held, model.clone());
            prop_assert_eq!(store.key_count(), model.len());
        }
    }
}
