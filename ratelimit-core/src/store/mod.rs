//! Where state lives: the [`Store`] trait and its implementations.
//!
//! The store is the one seam between the algorithm ([`KeyState::apply`]) and storage.
//! Optional capabilities are separate traits:
//! - [`Sweep`]: forget every idle key (the memory store; Redis expires keys itself);
//! - [`Scan`]: list every key with its state, for snapshots and top senders; fallible,
//!   as listing a remote store can fail midway;
//! - [`Forget`]: forget one key (unblock a user), as
//!   [`DistinctStore::forget`](crate::distinct::DistinctStore::forget) does for
//!   distinct values.
//!
//! How many keys a store tracks is not a capability trait: the memory stores know it
//! for free ([`MemoryStore::key_count`], [`DistinctMemoryStore::key_count`]), while the
//! Redis store can only count by walking the keyspace (`RedisStore::try_key_count`).
//!
//! Stores: [`MemoryStore`] (sharded, in process) and, with the cargo feature `redis`,
//! [`RedisStore`] (shared by every host using the same Redis).
//!
//! Distinct-value state (the compromise signal, [`crate::distinct`]) has its own
//! trait, [`DistinctStore`](crate::distinct::DistinctStore): [`DistinctMemoryStore`] in
//! process, and [`RedisStore`] with the feature `redis`. So do per-user baselines
//! ([`crate::baseline`]): [`BaselineMemoryStore`] (with its own snapshot file) and
//! [`RedisStore`].

use crate::algorithm::KeyState;
use crate::clock::Timestamp;
use crate::decision::{Cost, Decision, Mode};
use crate::quota::Limit;

mod baseline_memory;
mod baseline_snapshot;
mod distinct_memory;
mod huge;
mod memory;
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub mod redis;
pub mod snapshot;

pub use baseline_memory::BaselineMemoryStore;
pub use baseline_snapshot::{BASELINE_VERSION, decode_baselines};
pub use distinct_memory::DistinctMemoryStore;
pub use memory::{MemoryStore, MemoryStoreConfig};
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use redis::{RedisStore, RedisStoreConfig, TimeSource};
pub use snapshot::SnapshotError;

pub use crate::decision::StoreError;

/// Where per-key state lives.
///
/// # Contract
///
/// [`Store::check`] on one key is **atomic against every other caller of the same
/// store** — other threads, other processes, other hosts sharing the backend: the
/// decision and (in [`Mode::Acquire`], when every limit admits) the recording of
/// `cost` happen as one step, so concurrent callers can never together exceed a limit.
/// It must decide exactly as [`KeyState::apply`] does for the same history and times
/// (the conformance suite checks this), and it must not record anything for a
/// refused event or a peek.
///
/// `now` is the caller's clock. A store that shares state between hosts may use its
/// own clock instead (the Redis store can use the Redis server's time), and says so.
///
/// # Examples
///
/// A store of your own keeps each key's [`KeyState`] wherever it likes and calls
/// [`KeyState::apply`] under its own lock; this one holds every key behind one mutex,
/// which keeps the contract trivially:
///
/// ```
/// use std::collections::HashMap;
/// use std::sync::Mutex;
///
/// use ratelimit_core::{
///     Cost, Decision, KeyState, Limit, Limiter, ManualClock, Mode, Store, StoreError, Tier,
///     TierMap, Timestamp,
/// };
///
/// #[derive(Default)]
/// struct OneLock(Mutex<HashMap<String, KeyState>>);
///
/// impl Store for OneLock {
///     fn check(
///         &self,
///         key: &str,
///         limits: &[Limit],
///         cost: Cost,
///         now: Timestamp,
///         mode: Mode,
///     ) -> Result<Decision, StoreError> {
///         let mut states = self.0.lock().map_err(|_| StoreError::Unavailable("poisoned".into()))?;
///         let state = states.entry(key.to_string()).or_default();
///         Ok(state.apply(limits, cost, now, mode))
///     }
/// }
///
/// let tiers = TierMap::new(Tier::new("default", ["1/1m".parse().unwrap()]).unwrap());
/// let clock = ManualClock::new(Timestamp::from_millis(1_700_000_000_000));
/// let limiter = Limiter::new(OneLock::default(), tiers, clock);
/// assert!(limiter.acquire("alice", Cost::message(1, 0)).unwrap().is_allowed());
/// assert!(!limiter.acquire("alice", Cost::message(1, 0)).unwrap().is_allowed());
/// ```
pub trait Store: Send + Sync {
    /// Checks `cost` for `key` against `limits` at `now`; in [`Mode::Acquire`],
    /// records it on every limit if all admit.
    fn check(
        &self,
        key: &str,
        limits: &[Limit],
        cost: Cost,
        now: Timestamp,
        mode: Mode,
    ) -> Result<Decision, StoreError>;
}

impl<S: Store + ?Sized> Store for std::sync::Arc<S> {
    fn check(
        &self,
        key: &str,
        limits: &[Limit],
        cost: Cost,
        now: Timestamp,
        mode: Mode,
    ) -> Result<Decision, StoreError> {
        (**self).check(key, limits, cost, now, mode)
    }
}

/// Keys an in-process store evicted to make room for new ones, by reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Evictions {
    /// Keys whose state had fully decayed (forgetting them changes nothing).
    pub idle: u64,
    /// Live keys, least recently used first (their use is forgotten).
    pub lru: u64,
}

/// A store that can forget keys whose state has fully decayed.
pub trait Sweep {
    /// Removes every key idle at `now`; returns how many were removed.
    fn sweep(&self, now: Timestamp) -> usize;
}

/// A store whose keys can be listed with their state.
pub trait Scan {
    /// Calls `f` for every tracked key. The callback must not call back into the store.
    ///
    /// A store that fails midway (a remote one) returns the error after having called
    /// `f` for some of the keys; an in-process store never fails.
    fn scan(&self, f: &mut dyn FnMut(&str, &KeyState)) -> Result<(), StoreError>;
}

/// A store that can forget one key (unblock a user).
///
/// The method has the name and meaning of
/// [`DistinctStore::forget`](crate::distinct::DistinctStore::forget). A store that
/// is both (`RedisStore`: its counters and its distinct values are separate hashes)
/// needs the call qualified when both traits are in scope, `Forget::forget(&store,
/// key)`; both traits are implemented for `Arc<S>`, so an unqualified call through
/// an `Arc` is a compile error rather than a silent pick of the other one.
pub trait Forget {
    /// Forgets everything recorded for `key`; returns whether anything was.
    fn forget(&self, key: &str) -> Result<bool, StoreError>;
}

impl<S: Forget + ?Sized> Forget for std::sync::Arc<S> {
    fn forget(&self, key: &str) -> Result<bool, StoreError> {
        (**self).forget(key)
    }
}
