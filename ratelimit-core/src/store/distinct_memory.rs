//! The in-process [`DistinctStore`]: per-key [`DistinctState`]s in a lock-sharded map.

use std::sync::atomic::{AtomicUsize, Ordering};

use compact_str::CompactString;
use crossbeam_utils::CachePadded;
use hashbrown::HashTable;
use parking_lot::Mutex;

use super::{StoreError, Sweep};
use crate::clock::Timestamp;
use crate::distinct::{DistinctLimit, DistinctState, DistinctStore, Observation};

struct Entry {
    key: CompactString,
    state: DistinctState,
}

/// A sharded in-memory [`DistinctStore`].
///
/// Shaped like [`MemoryStore`](super::MemoryStore): keys hashed once with per-process
/// random ahash seeds (a client cannot choose colliding keys or values), the hash picks
/// a cache-padded `parking_lot` shard, an observation locks exactly one shard and looks
/// an existing key up by `&str` without allocating. Values are kept as 64-bit hashes
/// under a second random seed.
///
/// **Memory.** A key holds at most `max + 1` entries of 16 bytes (see
/// [`crate::distinct`]); at most `max_keys` keys are tracked. When a shard is full, a
/// new key first sweeps that shard of idle states (at most once a second); if it is
/// still full the observation fails with [`StoreError::Full`].
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
}

struct Shard {
    table: HashTable<Entry>,
    last_full_sweep: u64,
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
                .map(|_| {
                    CachePadded::new(Mutex::new(Shard {
                        table: HashTable::new(),
                        last_full_sweep: 0,
                    }))
                })
                .collect(),
            hasher: ahash::RandomState::new(),
            value_hasher: ahash::RandomState::new(),
            mask: shards as u64 - 1,
            per_shard_cap: max_keys.div_ceil(shards) + max_keys.div_ceil(shards * 4) + 1,
            max_keys,
            len: AtomicUsize::new(0),
        }
    }

    fn shard_for(&self, hash: u64) -> &Mutex<Shard> {
        // The mask keeps the index below the shard count.
        &self.shards[((hash >> SHARD_SHIFT) & self.mask) as usize]
    }

    fn is_full(&self, shard: &Shard) -> bool {
        self.len.load(Ordering::Relaxed) >= self.max_keys || shard.table.len() >= self.per_shard_cap
    }

    /// The number of keys tracked.
    pub fn key_count(&self) -> usize {
        self.len.load(Ordering::Relaxed)
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
        shard
            .table
            .find(hash, |e| e.key == key)
            .map(|e| f(&e.state))
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
        if let Some(e) = shard.table.find_mut(hash, |e| e.key == key) {
            return Ok(e.state.observe(value_hash, limit, now));
        }
        let now_ms = now.as_millis();
        if self.is_full(&shard) && now_ms >= shard.last_full_sweep.saturating_add(1000) {
            shard.last_full_sweep = now_ms;
            let before = shard.table.len();
            shard.table.retain(|e| !e.state.is_idle(now));
            self.len
                .fetch_sub(before - shard.table.len(), Ordering::Relaxed);
        }
        if self.is_full(&shard) {
            return Err(StoreError::Full {
                max_keys: self.max_keys,
            });
        }
        let mut state = DistinctState::new();
        let observation = state.observe(value_hash, limit, now);
        let hasher = &self.hasher;
        shard.table.insert_unique(
            hash,
            Entry {
                key: CompactString::new(key),
                state,
            },
            |e| hasher.hash_one(e.key.as_str()),
        );
        self.len.fetch_add(1, Ordering::Relaxed);
        Ok(observation)
    }

    /// Locks the key's shard.
    fn forget(&self, key: &str) -> Result<bool, StoreError> {
        let hash = self.hasher.hash_one(key);
        let mut shard = self.shard_for(hash).lock();
        match shard.table.find_entry(hash, |e| e.key == key) {
            Ok(entry) => {
                entry.remove();
                self.len.fetch_sub(1, Ordering::Relaxed);
                Ok(true)
            }
            Err(_) => Ok(false),
        }
    }
}

impl Sweep for DistinctMemoryStore {
    /// Takes one shard lock at a time.
    fn sweep(&self, now: Timestamp) -> usize {
        let mut removed = 0;
        for shard in self.shards.iter() {
            let mut shard = shard.lock();
            let before = shard.table.len();
            shard.table.retain(|e| !e.state.is_idle(now));
            removed += before - shard.table.len();
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
        let mut stored = 0;
        for k in 0..100 {
            if store.observe(&format!("u{k}"), "n", &limit, t).is_ok() {
                stored += 1;
            }
        }
        assert_eq!((stored, store.key_count()), (4, 4));
        let later = t.saturating_add(Duration::from_secs(60));
        assert_eq!(store.sweep(later), stored);
        assert_eq!(store.key_count(), 0);
        assert!(store.forget("u0").is_ok_and(|gone| !gone));
    }
}
