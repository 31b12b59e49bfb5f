//! The in-process [`DistinctStore`]: per-key [`DistinctState`]s in a lock-sharded map.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use compact_str::CompactString;
use crossbeam_utils::CachePadded;
use hashbrown::HashTable;
use parking_lot::Mutex;

use super::{Evictions, StoreError, Sweep};
use crate::clock::Timestamp;
use crate::distinct::{DistinctLimit, DistinctState, DistinctStore, Observation};

struct Entry {
    key: CompactString,
    state: DistinctState,
}

/// Keys the eviction hand looks at per new key in a full shard.
const EVICT_SAMPLE: usize = 16;

/// A sharded in-memory [`DistinctStore`].
///
/// Shaped like [`MemoryStore`](super::MemoryStore): keys hashed once with per-process
/// random ahash seeds (a client cannot choose colliding keys or values), the hash picks
/// a cache-padded `parking_lot` shard, an observation locks exactly one shard and looks
/// an existing key up by `&str` without allocating. Values are kept as 64-bit hashes
/// under a second random seed. A shard keeps its keys in a `Vec` (so the eviction
/// hand can walk them) and a `hashbrown` table of positions in it.
///
/// **Memory.** A key holds at most `max + 1` entries of 16 bytes (see
/// [`crate::distinct`]); at most `max_keys` keys are tracked.
///
/// **Key cap.** A full table never turns the signal off for new users: a new key in
/// a full shard evicts one. The hand walks the shard's keys `EVICT_SAMPLE` at a
/// time and takes the first idle one (its networks have all aged out: forgetting it
/// changes nothing), else the one of the sample that becomes idle first: here that
/// is the least recently observed (a state's idle time is its last observation plus
/// the window; a flag ends no later). An exact LRU would need a list relinked on
/// every observation; a sample of 16 finds a key among the oldest few percent, which
/// is what matters under a flood of new names. Only a shard with
/// no key at all to evict (the global cap is reached through the other shards)
/// refuses the new key with [`StoreError::Full`]. [`DistinctMemoryStore::evictions`]
/// counts the evictions.
///
/// # Examples
///
/// ```
/// use ratelimit_core::distinct::{DistinctLimit, DistinctStore};
/// use ratelimit_core::store::DistinctMemoryStore;
/// use ratelimit_core::Timestamp;
/// use std::time::Duration;
///
/// let store = DistinctMemoryStore::new(1000);
/// let limit = DistinctLimit::new(1, Duration::from_secs(3600)).unwrap();
/// let now = Timestamp::from_millis(1_700_000_000_000);
/// assert!(!store.observe("alice", "192.0.2.0/24", &limit, now).unwrap().is_flagged());
/// assert!(store.observe("alice", "198.51.100.0/24", &limit, now).unwrap().is_flagged());
/// assert_eq!(store.entry_count("alice"), 2);
/// ```
pub struct DistinctMemoryStore {
    shards: Box<[CachePadded<Mutex<Shard>>]>,
    hasher: ahash::RandomState,
    /// A separate seed for values, so a value's hash says nothing about key placement.
    value_hasher: ahash::RandomState,
    mask: u64,
    per_shard_cap: usize,
    max_keys: usize,
    len: AtomicUsize,
    evicted_idle: AtomicU64,
    evicted_lru: AtomicU64,
}

/// One shard: its keys in a `Vec`, found through a table of their positions.
#[derive(Default)]
struct Shard {
    /// Positions in `entries`, by the key's hash.
    index: HashTable<u32>,
    entries: Vec<Entry>,
    /// Where the eviction hand looks next, in `entries`.
    hand: usize,
}

impl Shard {
    /// The position of `key` (hashed `hash`).
    fn find(&self, hash: u64, key: &str) -> Option<usize> {
        let entries = &self.entries;
        self.index
            .find(hash, |&i| {
                entries.get(i as usize).is_some_and(|e| e.key == key)
            })
            .map(|&i| i as usize)
    }

    /// Adds a key (not present).
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

    /// Removes every key idle at `now`; returns how many.
    fn sweep(&mut self, now: Timestamp, hasher: &ahash::RandomState) -> usize {
        let before = self.entries.len();
        self.entries.retain(|e| !e.state.is_idle(now));
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

    /// Removes one key to make room: the first idle key of the next
    /// [`EVICT_SAMPLE`] from the hand, else the one of them idle first (the least
    /// recently observed). `None` when the shard holds no key.
    fn evict(&mut self, now: Timestamp, hasher: &ahash::RandomState) -> Option<Evicted> {
        let n = self.entries.len();
        if n == 0 {
            return None;
        }
        let mut hand = self.hand % n;
        let mut oldest: Option<(usize, u64)> = None;
        let mut idle = None;
        for _ in 0..EVICT_SAMPLE.min(n) {
            let pos = hand;
            hand = if hand + 1 == n { 0 } else { hand + 1 };
            let Some(e) = self.entries.get(pos) else {
                continue;
            };
            if e.state.is_idle(now) {
                idle = Some(pos);
                break;
            }
            let at = e.state.idle_at();
            if oldest.is_none_or(|(_, o)| at < o) {
                oldest = Some((pos, at));
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

/// Why a key was evicted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Evicted {
    Idle,
    Lru,
}

impl std::fmt::Debug for DistinctMemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DistinctMemoryStore")
            .field("shards", &self.shards.len())
            .field("max_keys", &self.max_keys)
            .field("keys", &self.len.load(Ordering::Relaxed))
            .finish()
    }
}

/// The middle bits of the hash choose the shard (as in the memory store).
const SHARD_SHIFT: u32 = 40;

impl DistinctMemoryStore {
    /// A store tracking at most `max_keys` keys, with 8 shards per available CPU.
    pub fn new(max_keys: usize) -> DistinctMemoryStore {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let shards = (cpus * 8).clamp(1, 1 << 16).next_power_of_two();
        let max_keys = max_keys.max(1);
        DistinctMemoryStore {
            shards: (0..shards)
                .map(|_| CachePadded::new(Mutex::new(Shard::default())))
                .collect(),
            hasher: ahash::RandomState::new(),
            value_hasher: ahash::RandomState::new(),
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

    /// Claims room for one new key in `shard` (whose lock the caller holds), as
    /// the memory store does: the global count is raised only below the cap.
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

    /// Keys evicted so far to make room for new ones.
    pub fn evictions(&self) -> Evictions {
        Evictions {
            idle: self.evicted_idle.load(Ordering::Relaxed),
            lru: self.evicted_lru.load(Ordering::Relaxed),
        }
    }

    /// The number of values kept for `key` (at most the threshold plus one). Locks
    /// the key's shard.
    pub fn entry_count(&self, key: &str) -> usize {
        self.with_state(key, |s| s.len()).unwrap_or(0)
    }

    /// Heap bytes of `key`'s state: its entry buffer plus its name when not inline.
    /// Locks the key's shard.
    pub fn key_heap_bytes(&self, key: &str) -> usize {
        let name = if key.len() > std::mem::size_of::<CompactString>() {
            key.len()
        } else {
            0
        };
        self.with_state(key, |s| s.heap_bytes() + name).unwrap_or(0)
    }

    /// What an observation would say about `key` at `now`, recording nothing. Locks
    /// the key's shard.
    pub fn peek(&self, key: &str, limit: &DistinctLimit, now: Timestamp) -> Observation {
        self.with_state(key, |s| s.peek(limit, now))
            .unwrap_or_else(|| DistinctState::new().peek(limit, now))
    }

    fn with_state<T>(&self, key: &str, f: impl FnOnce(&DistinctState) -> T) -> Option<T> {
        let hash = self.hasher.hash_one(key);
        let shard = self.shard_for(hash).lock();
        let pos = shard.find(hash, key)?;
        shard.entries.get(pos).map(|e| f(&e.state))
    }
}

impl DistinctStore for DistinctMemoryStore {
    /// Locks the key's shard for the duration of the observation.
    fn observe(
        &self,
        key: &str,
        value: &str,
        limit: &DistinctLimit,
        now: Timestamp,
    ) -> Result<Observation, StoreError> {
        let value_hash = self.value_hasher.hash_one(value);
        let hash = self.hasher.hash_one(key);
        let mut shard = self.shard_for(hash).lock();
        if let Some(pos) = shard.find(hash, key)
            && let Some(e) = shard.entries.get_mut(pos)
        {
            return Ok(e.state.observe(value_hash, limit, now));
        }
        if !self.reserve(&shard) {
            // Full: the new key takes an evicted key's place (the count is unchanged).
            match shard.evict(now, &self.hasher) {
                Some(Evicted::Idle) => self.evicted_idle.fetch_add(1, Ordering::Relaxed),
                Some(Evicted::Lru) => self.evicted_lru.fetch_add(1, Ordering::Relaxed),
                None => {
                    return Err(StoreError::Full {
                        max_keys: self.max_keys,
                    });
                }
            };
        }
        let mut state = DistinctState::new();
        let observation = state.observe(value_hash, limit, now);
        shard.insert(
            hash,
            Entry {
                key: CompactString::new(key),
                state,
            },
            &self.hasher,
        );
        Ok(observation)
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

impl Sweep for DistinctMemoryStore {
    /// Takes one shard lock at a time.
    fn sweep(&self, now: Timestamp) -> usize {
        let mut removed = 0;
        for shard in self.shards.iter() {
            removed += shard.lock().sweep(now, &self.hasher);
        }
        self.len.fetch_sub(removed, Ordering::Relaxed);
        removed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn idle_keys_are_swept_and_the_cap_holds() {
        let store = DistinctMemoryStore::new(4);
        let limit = DistinctLimit::new(2, Duration::from_secs(60)).unwrap();
        let t = Timestamp::from_millis(1_700_000_000_000);
        for k in 0..100 {
            // Past the cap a new key evicts one (or, in a shard holding none, is
            // refused): never more than the cap.
            let _ = store.observe(&format!("u{k}"), "n", &limit, t);
            assert!(store.key_count() <= 4);
        }
        let stored = store.key_count();
        assert!(stored > 0);
        let later = t.saturating_add(Duration::from_secs(60));
        assert_eq!(store.sweep(later), stored);
        assert_eq!(store.key_count(), 0);
        assert!(store.forget("u0").is_ok_and(|gone| !gone));
    }

    fn one_shard(max_keys: usize) -> DistinctMemoryStore {
        let mut s = DistinctMemoryStore::new(max_keys);
        s.shards = vec![CachePadded::new(Mutex::new(Shard::default()))].into();
        s.mask = 0;
        s.per_shard_cap = max_keys + 1;
        s
    }

    #[test]
    fn a_full_store_evicts_idle_keys_first_then_the_least_recently_observed() {
        let store = one_shard(3);
        let limit = DistinctLimit::new(1, Duration::from_secs(60)).unwrap();
        let at = |s: u64| Timestamp::from_millis(1_700_000_000_000 + s * 1000);
        let keys = |store: &DistinctMemoryStore| {
            let shard = store.shards[0].lock();
            let mut k: Vec<String> = shard.entries.iter().map(|e| e.key.to_string()).collect();
            k.sort();
            k
        };
        let _ = store.observe("old", "n1", &limit, at(0)).unwrap();
        let _ = store.observe("a", "n1", &limit, at(30)).unwrap();
        let _ = store.observe("b", "n1", &limit, at(31)).unwrap();
        // "old" has aged out at 61 s: it goes, for nothing.
        let _ = store.observe("c", "n1", &limit, at(61)).unwrap();
        assert_eq!(keys(&store), ["a", "b", "c"]);
        assert_eq!(store.evictions(), Evictions { idle: 1, lru: 0 });
        // None idle: the least recently observed goes ("a" was seen again; "b" not).
        let _ = store.observe("a", "n1", &limit, at(62)).unwrap();
        let _ = store.observe("d", "n1", &limit, at(63)).unwrap();
        assert_eq!(keys(&store), ["a", "c", "d"]);
        assert_eq!(store.evictions(), Evictions { idle: 1, lru: 1 });
        // Again: "c" and "a" were seen since, "d" is the least recently observed.
        let _ = store.observe("c", "n2", &limit, at(64)).unwrap();
        let _ = store.observe("a", "n1", &limit, at(64)).unwrap();
        let _ = store.observe("e", "n1", &limit, at(65)).unwrap();
        assert_eq!(keys(&store), ["a", "c", "e"]);
        // Every key left is found after the moves eviction makes.
        for k in keys(&store) {
            assert_eq!(store.entry_count(&k), if k == "c" { 2 } else { 1 }, "{k}");
            assert!(store.forget(&k).unwrap(), "{k}");
        }
        assert_eq!(store.key_count(), 0);
    }
}
