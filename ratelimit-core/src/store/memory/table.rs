//! One shard's keys: an open-addressed table of 48-byte [`Entry`]s, four to a
//! cache-line-aligned [`Bucket`], and the lock-free [`TableHint`] that lets the
//! store prefetch a key's home bucket before it locks the shard.
//!
//! The table stores and finds keys; it does not read their state. An entry's
//! `head` tag says only whether its slot is [`VACANT`], a tombstone ([`TOMB`])
//! or a live key; what a live key's tag and words mean is the shard's business
//! (see [`super::packed`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use compact_str::CompactString;

use crate::store::huge::{self, HugeArray};

/// `Entry::head`'s top byte for a never-used table slot: it ends a probe.
pub(super) const VACANT: u8 = 255;
/// `Entry::head`'s top byte for the slot of a removed key: a probe goes past it,
/// an insert may reuse it, a rebuild drops it.
pub(super) const TOMB: u8 = 253;
/// `Entry::head`'s next 8 bits: the key's hash fingerprint (its top 8 bits),
/// checked before the key is compared.
pub(super) const FP_SHIFT: u32 = 48;
const FP_MASK: u64 = 0xff << FP_SHIFT;
/// `Entry::head`'s bit 47: the key was used (checked, allowed or not) since the
/// eviction hand last went by it (see [`super::shard::Shard::evict`]). A new key
/// starts without it, so a key used once is the first to go.
pub(super) const REF: u64 = 1 << 47;

/// One slot of a shard's table: a tracked key and its state (48 bytes).
///
/// `head` is the form tag (top 8 bits), the key's hash fingerprint (next 8),
/// the [`REF`] bit and 47 bits of state. The table reads only the tag ([`VACANT`], [`TOMB`], or
/// any other value for a live key) and the fingerprint; the shard gives the
/// other tags, the low 48 bits of `head`, `a` and `b` their meaning (the packed
/// forms and the side table: see [`super::packed`]).
pub(super) struct Entry {
    /// `CompactString`: keys up to 24 bytes (most mail addresses) live inline.
    pub(super) key: CompactString,
    pub(super) head: u64,
    pub(super) a: u64,
    pub(super) b: u64,
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

    /// The form tag: `head`'s top byte.
    #[inline]
    pub(super) fn tag(&self) -> u8 {
        (self.head >> 56) as u8
    }

    /// Whether the slot holds a key: any tag but [`VACANT`] and [`TOMB`].
    #[inline]
    pub(super) fn is_live(&self) -> bool {
        let tag = self.tag();
        tag != VACANT && tag != TOMB
    }

    /// Stores a state (`head` without fingerprint and [`REF`] bits), keeping the
    /// fingerprint and the [`REF`] bit.
    #[inline]
    pub(super) fn set(&mut self, head: u64, a: u64, b: u64) {
        debug_assert_eq!(head & (FP_MASK | REF), 0);
        (self.head, self.a, self.b) = (head | (self.head & (FP_MASK | REF)), a, b);
    }

    /// Whether the key was used since the eviction hand last cleared the bit.
    #[inline]
    pub(super) fn is_referenced(&self) -> bool {
        self.head & REF != 0
    }

    /// Marks the key used. Writes only when the bit is not set yet, so a key
    /// used again and again costs no store.
    #[inline]
    pub(super) fn touch(&mut self) {
        if self.head & REF == 0 {
            self.head |= REF;
        }
    }

    /// Clears the used bit (the eviction hand going by: a second chance).
    #[inline]
    pub(super) fn clear_ref(&mut self) {
        self.head &= !REF;
    }
}

/// Entries per bucket: a bucket is three cache lines, read together.
pub(super) const WAYS: usize = 4;

/// [`WAYS`] entries on their own cache lines (192 bytes, 64-byte aligned).
#[repr(align(64))]
pub(super) struct Bucket([Entry; WAYS]);

impl Bucket {
    const VACANT: Bucket = Bucket([Entry::VACANT; WAYS]);
}

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
pub(super) struct Table {
    pub(super) buckets: HugeArray<Bucket>,
    /// Where `buckets` is, for a prefetch before the shard is locked.
    pub(super) hint: Arc<TableHint>,
    /// Slots holding a key.
    pub(super) len: usize,
    /// Slots holding a key or a tombstone.
    pub(super) used: usize,
}

impl Table {
    /// Slots in all buckets (tombstones and vacant ones included).
    #[inline]
    pub(super) fn slots(&self) -> usize {
        self.buckets.len() * WAYS
    }

    /// The entry at `pos`.
    #[inline]
    pub(super) fn get(&self, pos: u32) -> &Entry {
        &self.buckets[pos as usize / WAYS].0[pos as usize % WAYS]
    }

    /// The entry at `pos`, to change.
    #[inline]
    pub(super) fn get_mut(&mut self, pos: u32) -> &mut Entry {
        &mut self.buckets[pos as usize / WAYS].0[pos as usize % WAYS]
    }

    fn home(&self, hash: u64) -> usize {
        home_bucket(hash, self.buckets.len())
    }

    /// The position of `key` (whose hash is `hash`).
    #[inline]
    pub(super) fn find(&self, hash: u64, key: &str) -> Option<u32> {
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
    #[inline]
    pub(super) fn insert(&mut self, hash: u64, key: &str, hash_of: impl Fn(&str) -> u64) -> u32 {
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
    #[inline]
    pub(super) fn remove(&mut self, pos: u32) -> Entry {
        self.len -= 1;
        std::mem::replace(self.get_mut(pos), Entry::TOMB)
    }

    /// Every key with its position.
    pub(super) fn iter(&self) -> impl Iterator<Item = (u32, &Entry)> {
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
    pub(super) fn rebuild(&mut self, keys: usize, hash_of: impl Fn(&str) -> u64) {
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
pub(super) struct TableHint {
    /// The address of the first bucket.
    pub(super) base: AtomicUsize,
    /// The number of buckets.
    pub(super) buckets: AtomicUsize,
}

impl TableHint {
    /// Starts loading the three cache lines of `hash`'s home bucket.
    #[inline]
    pub(super) fn prefetch(&self, hash: u64) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn an_entry_is_48_bytes() {
        assert_eq!(size_of::<Entry>(), 48);
    }

    proptest! {
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
}
