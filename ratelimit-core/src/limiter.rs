//! [`Limiter`]: a store, a tier map and a clock tied together.

use std::sync::Arc;

use crate::clock::{Clock, SystemClock};
use crate::decision::StoreError;
use crate::decision::{Cost, Decision, Mode};
use crate::store::{MemoryStore, Store};
use crate::tier::{Tier, TierMap};

/// Decides for keys by their tier: the convenient way to embed the library.
///
/// # Examples
///
/// ```
/// use ratelimit_core::{Cost, Limiter, MemoryStore, SystemClock, Tier, TierMap};
///
/// let mut tiers = TierMap::new(Tier::new("default", ["100/1h".parse().unwrap()]).unwrap());
/// tiers.add_tier(Tier::new("bulk", ["5000/1h".parse().unwrap()]).unwrap()).unwrap();
/// tiers.assign("@lists.example.org", "bulk").unwrap();
/// let limiter = Limiter::new(MemoryStore::new(), tiers, SystemClock);
///
/// let d = limiter.acquire("news@lists.example.org", Cost::message(1, 0)).unwrap();
/// assert_eq!(d.statuses()[0].remaining, 4999);
/// ```
pub struct Limiter<S: Store = MemoryStore, C: Clock = SystemClock> {
    store: S,
    tiers: TierMap,
    clock: C,
}

impl<S: Store, C: Clock> Limiter<S, C> {
    /// A limiter deciding with `store`, by `tiers`, at the times `clock` gives.
    pub fn new(store: S, tiers: TierMap, clock: C) -> Self {
        Limiter {
            store,
            tiers,
            clock,
        }
    }

    /// Checks `cost` for `key` against its tier and records it if every limit admits.
    pub fn acquire(&self, key: &str, cost: Cost) -> Result<Decision, StoreError> {
        self.check(key, cost, Mode::Acquire)
    }

    /// Checks `cost` for `key` without recording anything.
    pub fn peek(&self, key: &str, cost: Cost) -> Result<Decision, StoreError> {
        self.check(key, cost, Mode::Peek)
    }

    fn check(&self, key: &str, cost: Cost, mode: Mode) -> Result<Decision, StoreError> {
        let tier = self.tiers.tier_of(key);
        self.store
            .check(key, tier.limits(), cost, self.clock.now(), mode)
    }

    /// The tier `key` is in.
    pub fn tier_of(&self, key: &str) -> &Arc<Tier> {
        self.tiers.tier_of(key)
    }

    /// The tier map.
    pub fn tiers(&self) -> &TierMap {
        &self.tiers
    }

    /// Replaces the tier map. What keys have sent is kept: counters belong to keys
    /// and limit shapes, not to tiers.
    pub fn set_tiers(&mut self, tiers: TierMap) {
        self.tiers = tiers;
    }

    /// The store.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// The clock.
    pub fn clock(&self) -> &C {
        &self.clock
    }
}
