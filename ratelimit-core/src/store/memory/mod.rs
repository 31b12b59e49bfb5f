//! The lock-sharded in-memory store: [`MemoryStore`].
//!
//! # Layout
//!
//! Each shard ([`shard`]) holds its keys in one open-addressed table ([`table`])
//! of 48-byte entries, four to a 192-byte bucket (three cache lines, 64-byte
//! aligned). A key's hash picks its home bucket; a lookup reads that bucket's
//! three lines at once and finds the key there 82-87% of the time (else in the
//! next bucket), so a cold key mostly costs one memory round trip: no index to
//! read first, no pointer to chase. The table is kept between 75% and 85% full
//! (it grows by a third, not by doubling): 56.5 to 64 bytes per key, against
//! about 200 for a `hashbrown` table of `(CompactString, KeyState)`.
//!
//! Two things shorten that round trip for a store of many keys. A table of
//! 2 MiB or more is mapped on transparent huge pages where the kernel allows
//! (see [`huge`]), so the lookup rarely waits for a page-table walk as well.
//! And the key's home bucket is prefetched, through a hint readable without the
//! lock, before its shard is locked, so the fetch overlaps taking the lock and
//! the lock is held for the decision only.
//!
//! Locking: a decision, a forget or an insert locks one shard; sweep and scan lock
//! one shard at a time.
//!
//! # Eviction
//!
//! A full table must not switch limiting off for every key it does not hold,
//! so a new key in a full shard evicts one ([`shard::Shard::evict`]), in this
//! order:
//! 1. **idle keys**, whose state has fully decayed: forgetting them costs
//!    nothing (no decision changes);
//! 2. **the least recently used**, approximated by CLOCK with a sample: each
//!    entry has a *used* bit (bit 47 of its head) that every check of the key
//!    sets, allowed, refused or peeked; a new key starts without it. A hand goes
//!    round the shard's table 32 slots at a time; in its pass it takes the first
//!    idle key, else, among the keys whose bit is clear, the one whose state
//!    decays first (the least recently charged); it clears the bit of the other
//!    keys it goes by (their second chance);
//! 3. **nothing**: after four passes (128 slots) in which every key had been
//!    used since the hand's previous pass, the new key is refused
//!    ([`StoreError::Full`]); the bits are cleared by then, so later keys get in.
//!
//! Why this and not an exact LRU: an exact LRU needs a list or a timestamp per
//! key, updated on every check: 8 to 16 more bytes an entry (the 48-byte entry
//! and 192-byte bucket would no longer fit cache lines) and a write, or a list
//! relinked under the lock, on the hot path. The used bit lives in bits the
//! entry already had, is written at most once per pass of the hand (a check
//! reads it, and writes only when it is clear), and all eviction work happens
//! only on an insert into a full shard, bounded to 128 slots. And it resists a
//! flood of one-off names better than an LRU would: a key seen once starts
//! without its bit, so a flood evicts its own keys before the keys of users who
//! keep sending, and an abuser who keeps trying (refusals set the bit too) keeps
//! his counters unless a whole turn of the hand passes without a try.
//!
//! An entry holds the key (inline up to 24 bytes, longer keys on the heap) and the
//! key's state packed in 24 bytes when it is the common shape ([`packed`]): **one
//! counter** (a tier whose limits share one counter, e.g. `100/1h`), either a
//! token bucket or a sliding window with at most 4 non-empty sub-windows of at
//! most 2^18 - 1 units each. Any other state (several counters, big counts, a
//! clock that jumped far) is kept as a plain [`KeyState`] in a side table of the
//! shard, and goes back to the packed form when it fits again. Both forms hold
//! exactly the same state: packing is a bijection checked when it is done, never
//! an approximation, so decisions are those of [`KeyState::apply`] whichever form
//! a key is in.
//!
//! # Modules
//!
//! - this file: [`MemoryStore`] — sharding, locking, the key cap, and the
//!   [`Store`], [`Sweep`], [`Scan`] and [`Forget`] implementations;
//! - [`shard`]: one shard's keys, each state in its packed or whole form;
//! - [`packed`]: the packed form, and the fast path that decides on it;
//! - [`table`]: the open-addressed table and its prefetch hint;
//! - [`divisor`]: exact division by a multiply, for sub-window numbers.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use crossbeam_utils::CachePadded;
use parking_lot::Mutex;

use super::huge;
use super::{Evictions, Forget, Scan, Store, StoreError, Sweep};
use crate::algorithm::{KeyState, OneCounter, decide};
use crate::clock::Timestamp;
use crate::decision::{Cost, Decision, Mode};
use crate::quota::Limit;

mod divisor;
mod packed;
mod shard;
mod table;
#[cfg(test)]
mod tests;

use shard::{Evicted, Shard};
use table::TableHint;

/// How a [`MemoryStore`] is built.
///
/// `#[non_exhaustive]`, so settings can be added: start from `Default` and change
/// what you need.
///
/// # Examples
///
/// ```
/// use ratelimit_core::{MemoryStore, MemoryStoreConfig};
/// let store = MemoryStore::with_config(MemoryStoreConfig::default().with_max_keys(1_000));
/// assert_eq!(store.max_keys(), 1_000);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct MemoryStoreConfig {
    /// Number of lock shards; rounded up to a power of two. Default: 4 per available
    /// CPU (as `dashmap`), so that two running threads rarely want the same lock
    /// (a lock is held for tens of nanoseconds: the key's bucket is prefetched
    /// before it is taken), while each shard's table stays large enough to sit
    /// mostly on huge pages (see [`MemoryStore`]).
    pub shards: usize,
    /// The most keys tracked at once: a new key beyond it takes the place of an
    /// evicted one (see [`MemoryStore`], "Key cap"). (Each shard also has a hard
    /// cap of a quarter more than its share, and of at most 16,777,214 keys, so a
    /// skewed flood cannot grow one table without bound.) Default: 4,000,000
    /// (about 250 MB at most with keys of up to 24 bytes).
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

impl MemoryStoreConfig {
    /// This configuration with [`shards`](Self::shards) set.
    pub fn with_shards(mut self, shards: usize) -> Self {
        self.shards = shards;
        self
    }

    /// This configuration with [`max_keys`](Self::max_keys) set.
    pub fn with_max_keys(mut self, max_keys: usize) -> Self {
        self.max_keys = max_keys;
        self
    }
}

/// The most keys one shard holds.
const MAX_SHARD_KEYS: usize = (1 << 24) - 2;

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
/// **Key cap.** At most [`MemoryStoreConfig::max_keys`] keys are tracked. A full
/// table never means "no limit": a new key with something to record evicts a key
/// of its shard and takes its place (see the module docs, "Eviction"): an idle
/// key first (forgetting it changes nothing), else the least recently used of a
/// sample. Only if the sample holds nothing it may evict does the new key's check
/// fail with [`StoreError::Full`], which a server answers with a temporary
/// refusal. A tracked key is never refused, nor evicted for a key that is
/// already tracked. [`MemoryStore::evictions`] counts the evictions.
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
    /// Keys evicted to make room, idle and not (only a new key in a full shard
    /// touches these).
    evicted_idle: AtomicU64,
    evicted_lru: AtomicU64,
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
            evicted_idle: AtomicU64::new(0),
            evicted_lru: AtomicU64::new(0),
        }
    }

    /// Keys evicted so far to make room for new ones.
    pub fn evictions(&self) -> Evictions {
        Evictions {
            idle: self.evicted_idle.load(Ordering::Relaxed),
            lru: self.evicted_lru.load(Ordering::Relaxed),
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
            // Full (a snapshot from a larger table, or a lowered `max_keys`): make
            // room as a new key on the request path does, so a restore never fails
            // for want of room.
            self.evict_for_new_key(&mut shard, now)?;
        }
        let pos = shard.insert(hash, key, &self.hasher);
        shard.set_state(pos, state);
        Ok(())
    }

    /// Evicts one key of `shard` (idle first, then the least recently used) to make
    /// room for a new one, counting it; [`StoreError::Full`] if none can go.
    fn evict_for_new_key(&self, shard: &mut Shard, now: Timestamp) -> Result<(), StoreError> {
        match shard.evict(now) {
            Some(Evicted::Idle) => self.evicted_idle.fetch_add(1, Ordering::Relaxed),
            Some(Evicted::Lru) => self.evicted_lru.fetch_add(1, Ordering::Relaxed),
            None => {
                return Err(StoreError::Full {
                    max_keys: self.max_keys,
                });
            }
        };
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
            shard.touch(pos);
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
        if !self.reserve(&shard) {
            // Full: the new key takes an evicted key's place (the count is unchanged).
            self.evict_for_new_key(&mut shard, now)?;
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
