//! The lock-sharded in-memory store.

use std::sync::atomic::{AtomicUsize, Ordering};

use compact_str::CompactString;
use crossbeam_utils::CachePadded;
use hashbrown::HashTable;
use parking_lot::Mutex;

use super::{Reset, Scan, Store, StoreError, Sweep};
use crate::algorithm::KeyState;
use crate::clock::Timestamp;
use crate::decision::{Cost, Decision, Mode};
use crate::quota::Limit;

/// How a [`MemoryStore`] is built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryStoreConfig {
    /// Number of lock shards; rounded up to a power of two. Default: 8 per available
    /// CPU, so that two threads rarely want the same lock.
    pub shards: usize,
    /// The most keys tracked at once: a new key beyond it is refused with
    /// [`StoreError::Full`]. (Each shard also has a hard cap of a quarter more than
    /// its share, so a skewed flood cannot grow one table without bound.)
    /// Default: 4,000,000 (a few hundred MB at most).
    pub max_keys: usize,
}

impl Default for MemoryStoreConfig {
    fn default() -> Self {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        MemoryStoreConfig {
            shards: cpus * 8,
            max_keys: 4_000_000,
        }
    }
}

/// One tracked key. The key is a `CompactString`: keys up to 24 bytes (most mail
/// addresses) live inline in the table slot, with no separate allocation.
struct Entry {
    key: CompactString,
    state: KeyState,
}

struct Shard {
    table: HashTable<Entry>,
    /// When this shard was last swept because it was full (ms), to bound that work.
    last_full_sweep: u64,
}

/// A sharded in-memory [`Store`].
///
/// Keys are hashed once (ahash, per-process random seeds, so user-chosen keys
/// cannot force collisions); the hash picks a shard and is reused for the lookup in
/// that shard's table. Each shard is a cache-padded `parking_lot` mutex over a
/// `hashbrown` table; a decision locks exactly one shard, and looks up an existing
/// key by `&str` without allocating.
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

/// Which bits of the hash choose the shard: the middle ones. hashbrown uses the low
/// bits for the slot and the top 7 for its tag, so neither loses entropy to sharding.
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
        MemoryStore {
            shards: (0..shards)
                .map(|_| {
                    CachePadded::new(Mutex::new(Shard {
                        table: HashTable::new(),
                        last_full_sweep: 0,
                    }))
                })
                .collect(),
            hasher: ahash::RandomState::new(),
            mask: shards as u64 - 1,
            per_shard_cap: max_keys.div_ceil(shards) + max_keys.div_ceil(shards * 4) + 1,
            max_keys,
            len: AtomicUsize::new(0),
        }
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
        self.len.load(Ordering::Relaxed) >= self.max_keys || shard.table.len() >= self.per_shard_cap
    }

    fn shard_for(&self, hash: u64) -> &Mutex<Shard> {
        &self.shards[((hash >> SHARD_SHIFT) & self.mask) as usize]
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
        if let Some(e) = shard.table.find_mut(hash, |e| e.key == key) {
            e.state = state;
            return Ok(());
        }
        if self.is_full(&shard) {
            return Err(StoreError::Full {
                max_keys: self.max_keys,
            });
        }
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
        let mut shard = self.shard_for(hash).lock();
        if let Some(entry) = shard.table.find_mut(hash, |e| e.key == key) {
            return Ok(entry.state.apply(limits, cost, now, mode));
        }
        // A new key: decide on an empty state; keep it only if something was recorded.
        let mut state = KeyState::new();
        let decision = state.apply(limits, cost, now, mode);
        if state.counter_count() == 0 {
            return Ok(decision);
        }
        let now_ms = now.as_millis();
        if self.is_full(&shard) && now_ms >= shard.last_full_sweep + 1000 {
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
        Ok(decision)
    }
}

impl Sweep for MemoryStore {
    /// Locks one shard at a time. Frees table memory when a shard has shrunk to a
    /// quarter of its capacity (after a key flood).
    fn sweep(&self, now: Timestamp) -> usize {
        let mut removed = 0;
        for shard in self.shards.iter() {
            let mut shard = shard.lock();
            let before = shard.table.len();
            shard.table.retain(|e| !e.state.is_idle(now));
            removed += before - shard.table.len();
            if shard.table.capacity() > 64 && shard.table.len() < shard.table.capacity() / 4 {
                let hasher = &self.hasher;
                shard
                    .table
                    .shrink_to_fit(|e| hasher.hash_one(e.key.as_str()));
            }
        }
        self.len.fetch_sub(removed, Ordering::Relaxed);
        removed
    }
}

impl Scan for MemoryStore {
    /// Locks one shard at a time, for the time it takes to call `f` on its keys.
    fn scan(&self, f: &mut dyn FnMut(&str, &KeyState)) {
        for shard in self.shards.iter() {
            let shard = shard.lock();
            for e in shard.table.iter() {
                f(&e.key, &e.state);
            }
        }
    }

    /// Read without locking (a relaxed counter kept beside the shards).
    fn key_count(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }
}

impl Reset for MemoryStore {
    /// Locks the key's shard.
    fn reset(&self, key: &str) -> Result<bool, StoreError> {
        let hash = self.hasher.hash_one(key);
        let mut shard = self.shard_for(hash).lock();
        match shard.table.find_entry(hash, |e| e.key == key) {
            Ok(occupied) => {
                occupied.remove();
                self.len.fetch_sub(1, Ordering::Relaxed);
                Ok(true)
            }
            Err(_) => Ok(false),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
        s.scan(&mut |k, _| keys.push(k.to_string()));
        assert_eq!(keys, ["new"]);
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
    fn reset_unblocks_a_key() {
        let s = MemoryStore::new();
        acquire(&s, "a", 0).unwrap();
        acquire(&s, "a", 0).unwrap();
        assert!(!acquire(&s, "a", 0).unwrap().is_allowed());
        assert!(s.reset("a").unwrap());
        assert!(!s.reset("a").unwrap());
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
        let _ = Duration::ZERO;
    }
}
