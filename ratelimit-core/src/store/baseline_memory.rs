//! The in-process [`BaselineStore`]: per-key [`BaselineState`]s in a lock-sharded map.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use compact_str::CompactString;
use crossbeam_utils::CachePadded;
use hashbrown::HashTable;
use parking_lot::Mutex;

use super::{Evictions, StoreError};
use crate::baseline::{BaselineConfig, BaselineState, BaselineStore, Judgement};
use crate::clock::Timestamp;

pub(super) struct Entry {
    pub(super) key: CompactString,
    pub(super) state: BaselineState,
}

/// Keys the eviction hand looks at per new key in a full shard.
const EVICT_SAMPLE: usize = 16;

/// A sharded in-memory [`BaselineStore`].
///
/// Shaped like [`DistinctMemoryStore`](super::DistinctMemoryStore): keys hashed once
/// with a per-process random ahash seed, the hash picks a cache-padded `parking_lot`
/// shard, an observation locks exactly one shard and finds an existing key by `&str`
/// without allocating. A shard keeps its keys in a `Vec` (for the eviction hand and
/// snapshots) and a `hashbrown` table of positions in it.
///
/// **Memory.** A key costs its [`BaselineState`] (36 bytes) and its name (inline up to
/// 24 bytes); at most `max_keys` keys are tracked.
///
/// **Key cap.** A new key in a full shard evicts one: the hand walks the shard's keys
/// `EVICT_SAMPLE` at a time and takes the first empty one (its history has decayed
/// away: forgetting it changes nothing), else the one of the sample observed least
/// recently. Only a shard with no key at all refuses a new key, with
/// [`StoreError::Full`].
///
/// **Sweep.** [`BaselineMemoryStore::sweep`] forgets the keys whose state, rolled to
/// now, is empty (no mail in the last hour or today, and a history decayed to
/// nothing): forgetting them changes no later decision.
///
/// # Examples
///
/// ```
/// use ratelimit_core::baseline::{BaselineConfig, BaselineStore};
/// use ratelimit_core::store::BaselineMemoryStore;
/// use ratelimit_core::Timestamp;
/// use std::time::Duration;
///
/// let store = BaselineMemoryStore::new(1000);
/// let cfg = BaselineConfig::new(Duration::ZERO, 5.0, 2, 7).unwrap();
/// let now = Timestamp::from_millis(1_700_000_000_000);
/// // Looking creates nothing.
/// assert_eq!(store.observe("alice", 0, &cfg, now).unwrap().hour, 0);
/// assert_eq!(store.key_count(), 0);
/// assert!(!store.observe("alice", 1, &cfg, now).unwrap().flagged);
/// assert!(store.observe("alice", 1, &cfg, now).unwrap().flagged); // 2 + 1 > max(2, 0)
/// assert!(store.clear_hour("alice", &cfg, now).unwrap());
/// assert!(!store.observe("alice", 0, &cfg, now).unwrap().flagged);
/// ```
pub struct BaselineMemoryStore {
    pub(super) shards: Box<[CachePadded<Mutex<Shard>>]>,
    hasher: ahash::RandomState,
    mask: u64,
    per_shard_cap: usize,
    max_keys: usize,
    len: AtomicUsize,
    evicted_idle: AtomicU64,
    evicted_lru: AtomicU64,
}

/// One shard: its keys in a `Vec`, found through a table of their positions.
#[derive(Default)]
pub(super) struct Shard {
    index: HashTable<u32>,
    pub(super) entries: Vec<Entry>,
    hand: usize,
}

impl Shard {
    fn find(&self, hash: u64, key: &str) -> Option<usize> {
        let entries = &self.entries;
        self.index
            .find(hash, |&i| {
                entries.get(i as usize).is_some_and(|e| e.key == key)
            })
            .map(|&i| i as usize)
    }

    fn insert(&mut self, hash: u64, entry: Entry, hasher: &ahash::RandomState) {
        let pos = self.entries.len() as u32;
        self.entries.push(entry);
        let entries = &self.entries;
        self.index.insert_unique(hash, pos, |&i| {
            entries
                .get(i as usize)
                .map_or(0, |e| hasher.hash_one(e.key.as_str()))
        });
    }

    /// Removes the key at `pos`; the last key moves into its place.
    fn remove(&mut self, pos: usize, hasher: &ahash::RandomState) {
        let Some(e) = self.entries.get(pos) else {
            return;
        };
        let hash = hasher.hash_one(e.key.as_str());
        if let Ok(slot) = self.index.find_entry(hash, |&i| i as usize == pos) {
            slot.remove();
        }
        let last = self.entries.len() - 1;
        self.entries.swap_remove(pos);
        if let Some(moved) = self.entries.get(pos) {
            let hash = hasher.hash_one(moved.key.as_str());
            if let Some(i) = self.index.find_mut(hash, |&i| i as usize == last) {
                *i = pos as u32;
            }
        }
    }

    /// Removes the keys empty at `now`; returns how many.
    fn sweep(
        &mut self,
        now: Timestamp,
        cfg: &BaselineConfig,
        hasher: &ahash::RandomState,
    ) -> usize {
        let before = self.entries.len();
        self.entries
            .retain(|e| !rolled_empty(&e.state, now, Some(cfg)));
        let removed = before - self.entries.len();
        if removed > 0 {
            if self.entries.capacity() > 2 * self.entries.len() + 16 {
                self.entries.shrink_to_fit();
            }
            self.index = HashTable::with_capacity(self.entries.len());
            let entries = &self.entries;
            for (i, e) in entries.iter().enumerate() {
                self.index
                    .insert_unique(hasher.hash_one(e.key.as_str()), i as u32, |&i| {
                        entries
                            .get(i as usize)
                            .map_or(0, |e| hasher.hash_one(e.key.as_str()))
                    });
            }
        }
        removed
    }

    /// Removes one key to make room: the first key of the next [`EVICT_SAMPLE`] from
    /// the hand that is empty at `now`, else the one of them
    /// observed least recently. `None` when the shard holds no key.
    fn evict(
        &mut self,
        now: Timestamp,
        cfg: Option<&BaselineConfig>,
        hasher: &ahash::RandomState,
    ) -> Option<Evicted> {
        let n = self.entries.len();
        if n == 0 {
            return None;
        }
        let mut hand = self.hand % n;
        let mut oldest: Option<(usize, u32)> = None;
        let mut idle = None;
        for _ in 0..EVICT_SAMPLE.min(n) {
            let pos = hand;
            hand = if hand + 1 == n { 0 } else { hand + 1 };
            let Some(e) = self.entries.get(pos) else {
                continue;
            };
            if rolled_empty(&e.state, now, cfg) {
                idle = Some(pos);
                break;
            }
            if oldest.is_none_or(|(_, o)| e.state.slot < o) {
                oldest = Some((pos, e.state.slot));
            }
        }
        self.hand = hand;
        let (pos, why) = match (idle, oldest) {
            (Some(pos), _) => (pos, Evicted::Idle),
            (None, Some((pos, _))) => (pos, Evicted::Lru),
            (None, None) => return None,
        };
        self.remove(pos, hasher);
        Some(why)
    }
}

/// Whether `state`, rolled to `now`, is empty. On a copy: the state's newest slot
/// stays the key's last observation, which eviction goes by.
fn rolled_empty(state: &BaselineState, now: Timestamp, cfg: Option<&BaselineConfig>) -> bool {
    let mut s = *state;
    if let Some(cfg) = cfg {
        s.roll(now, cfg);
    }
    s.is_empty()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Evicted {
    Idle,
    Lru,
}

impl std::fmt::Debug for BaselineMemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BaselineMemoryStore")
            .field("shards", &self.shards.len())
            .field("max_keys", &self.max_keys)
            .field("keys", &self.len.load(Ordering::Relaxed))
            .finish()
    }
}

/// The middle bits of the hash choose the shard (as in the memory store).
const SHARD_SHIFT: u32 = 40;

impl BaselineMemoryStore {
    /// A store tracking at most `max_keys` keys, with 8 shards per available CPU.
    pub fn new(max_keys: usize) -> BaselineMemoryStore {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let shards = (cpus * 8).clamp(1, 1 << 16).next_power_of_two();
        let max_keys = max_keys.max(1);
        BaselineMemoryStore {
            shards: (0..shards)
                .map(|_| CachePadded::new(Mutex::new(Shard::default())))
                .collect(),
            hasher: ahash::RandomState::new(),
            mask: shards as u64 - 1,
            per_shard_cap: (max_keys.div_ceil(shards) + max_keys.div_ceil(shards * 4) + 1)
                .min(u32::MAX as usize),
            max_keys,
            len: AtomicUsize::new(0),
            evicted_idle: AtomicU64::new(0),
            evicted_lru: AtomicU64::new(0),
        }
    }

    fn shard_for(&self, hash: u64) -> &Mutex<Shard> {
        // The mask keeps the index below the shard count.
        &self.shards[((hash >> SHARD_SHIFT) & self.mask) as usize]
    }

    fn reserve(&self, shard: &Shard) -> bool {
        shard.entries.len() < self.per_shard_cap
            && self
                .len
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                    (n < self.max_keys).then_some(n + 1)
                })
                .is_ok()
    }

    /// The number of keys tracked.
    pub fn key_count(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    /// The most keys tracked.
    pub fn max_keys(&self) -> usize {
        self.max_keys
    }

    /// Keys evicted so far to make room for new ones.
    pub fn evictions(&self) -> Evictions {
        Evictions {
            idle: self.evicted_idle.load(Ordering::Relaxed),
            lru: self.evicted_lru.load(Ordering::Relaxed),
        }
    }

    /// `key`'s state as kept (not rolled), if any. Locks the key's shard.
    pub fn state(&self, key: &str) -> Option<BaselineState> {
        let hash = self.hasher.hash_one(key);
        let shard = self.shard_for(hash).lock();
        let pos = shard.find(hash, key)?;
        shard.entries.get(pos).map(|e| e.state)
    }

    /// Sets `key`'s state (restoring a snapshot); an empty state is not kept. Locks
    /// the key's shard; a full store evicts as a new key would.
    pub fn insert_state(
        &self,
        key: &str,
        state: BaselineState,
        now: Timestamp,
    ) -> Result<(), StoreError> {
        self.update(key, now, None, true, |s| *s = state)
            .map(|_| ())
    }

    /// Forgets the keys whose state is empty at `now` (no recent mail, no
    /// history); returns how many. Takes one shard lock at a time.
    pub fn sweep(&self, now: Timestamp, cfg: &BaselineConfig) -> usize {
        let mut removed = 0;
        for shard in self.shards.iter() {
            removed += shard.lock().sweep(now, cfg, &self.hasher);
        }
        self.len.fetch_sub(removed, Ordering::Relaxed);
        removed
    }

    /// Runs `f` on `key`'s state under its shard lock, creating it when `create`.
    /// Returns what the state was left as, `None` when absent and not created.
    /// Eviction judges emptiness at `now` with `cfg` (without one, as kept).
    fn update(
        &self,
        key: &str,
        now: Timestamp,
        cfg: Option<&BaselineConfig>,
        create: bool,
        f: impl FnOnce(&mut BaselineState),
    ) -> Result<Option<BaselineState>, StoreError> {
        let hash = self.hasher.hash_one(key);
        let mut shard = self.shard_for(hash).lock();
        if let Some(pos) = shard.find(hash, key)
            && let Some(e) = shard.entries.get_mut(pos)
        {
            f(&mut e.state);
            return Ok(Some(e.state));
        }
        if !create {
            return Ok(None);
        }
        let mut state = BaselineState::new();
        f(&mut state);
        if state.is_empty() {
            return Ok(Some(state));
        }
        if !self.reserve(&shard) {
            match shard.evict(now, cfg, &self.hasher) {
                Some(Evicted::Idle) => self.evicted_idle.fetch_add(1, Ordering::Relaxed),
                Some(Evicted::Lru) => self.evicted_lru.fetch_add(1, Ordering::Relaxed),
                None => {
                    return Err(StoreError::Full {
                        max_keys: self.max_keys,
                    });
                }
            };
        }
        shard.insert(
            hash,
            Entry {
                key: CompactString::new(key),
                state,
            },
            &self.hasher,
        );
        Ok(Some(state))
    }
}

impl BaselineStore for BaselineMemoryStore {
    /// Locks the key's shard for the duration of the observation.
    fn observe(
        &self,
        key: &str,
        accepted: u32,
        cfg: &BaselineConfig,
        now: Timestamp,
    ) -> Result<Judgement, StoreError> {
        let state = self.update(key, now, Some(cfg), accepted > 0, |s| {
            s.record(now, accepted, cfg)
        })?;
        Ok(state.unwrap_or_default().judge(now, cfg))
    }

    /// Locks the key's shard.
    fn clear_hour(
        &self,
        key: &str,
        cfg: &BaselineConfig,
        now: Timestamp,
    ) -> Result<bool, StoreError> {
        let mut had = false;
        self.update(key, now, Some(cfg), false, |s| {
            s.roll(now, cfg);
            had = s.clear_hour();
        })?;
        Ok(had)
    }

    /// Locks the key's shard.
    fn forget(&self, key: &str) -> Result<bool, StoreError> {
        let hash = self.hasher.hash_one(key);
        let mut shard = self.shard_for(hash).lock();
        match shard.find(hash, key) {
            Some(pos) => {
                shard.remove(pos, &self.hasher);
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
    use std::time::Duration;

    const DAY: u64 = 86_400_000;

    fn cfg() -> BaselineConfig {
        BaselineConfig::new(Duration::ZERO, 5.0, 10, 1).unwrap()
    }

    #[test]
    fn the_cap_holds_and_decayed_keys_are_swept() {
        let store = BaselineMemoryStore::new(4);
        let t = Timestamp::from_millis(20_000 * DAY);
        for k in 0..100 {
            let _ = store.observe(&format!("u{k}"), 1, &cfg(), t);
            assert!(store.key_count() <= 4);
        }
        let stored = store.key_count();
        assert!(stored > 0);
        // A day later each has learned 1; nothing is swept.
        let next = Timestamp::from_millis(20_001 * DAY);
        assert_eq!(store.sweep(next, &cfg()), 0);
        // With a one-day half-life, 1 (256/256) is gone after nine quiet days.
        let later = Timestamp::from_millis(20_010 * DAY);
        assert_eq!(store.sweep(later, &cfg()), stored);
        assert_eq!(store.key_count(), 0);
    }

    fn one_shard(max_keys: usize) -> BaselineMemoryStore {
        let mut s = BaselineMemoryStore::new(max_keys);
        s.shards = vec![CachePadded::new(Mutex::new(Shard::default()))].into();
        s.mask = 0;
        s.per_shard_cap = max_keys + 1;
        s
    }

    #[test]
    fn a_full_store_evicts_the_least_recently_observed() {
        let store = one_shard(3);
        let at = |min: u64| Timestamp::from_millis(20_000 * DAY + min * 60_000);
        for (k, t) in [("a", 0), ("b", 10), ("c", 20)] {
            let _ = store.observe(k, 1, &cfg(), at(t)).unwrap();
        }
        let _ = store.observe("a", 0, &cfg(), at(30)).unwrap();
        let _ = store.observe("d", 1, &cfg(), at(40)).unwrap();
        let mut keys: Vec<String> = store.shards[0]
            .lock()
            .entries
            .iter()
            .map(|e| e.key.to_string())
            .collect();
        keys.sort();
        assert_eq!(keys, ["a", "c", "d"]);
        assert_eq!(store.evictions(), Evictions { idle: 0, lru: 1 });
        for k in keys {
            assert!(store.forget(&k).unwrap(), "{k}");
        }
        assert_eq!(store.key_count(), 0);
    }
}
