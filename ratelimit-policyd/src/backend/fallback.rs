//! The local fallback's stores (`on_store_error = "local"`): this server's own
//! in-process counters and client networks, used while the shared store fails.
//!
//! They are made on first use (a server whose shared store never fails holds
//! none), bounded by `[store] max_keys` like the memory store (a new user beyond it
//! takes the place of an idle or least recently used one), and swept with the rest
//! (`Backend::sweep`). What they count stays after the shared store is back: it
//! decays like any count, and is what this server knows if the shared store fails
//! again within the window.

use std::sync::OnceLock;

use ratelimit_core::distinct::{DistinctLimit, DistinctStore, Observation};
use ratelimit_core::store::{DistinctMemoryStore, Sweep};
use ratelimit_core::{
    Cost, Decision, MemoryStore, MemoryStoreConfig, Mode, Store, StoreError, Tier, Timestamp,
};

/// The in-process stores of the local fallback, made on first use.
pub(super) struct Local {
    max_keys: usize,
    stores: OnceLock<Stores>,
}

struct Stores {
    volume: MemoryStore,
    networks: DistinctMemoryStore,
}

impl Local {
    /// Stores tracking at most `max_keys` users each, once made.
    pub(super) fn new(max_keys: usize) -> Local {
        Local {
            max_keys: max_keys.max(1),
            stores: OnceLock::new(),
        }
    }

    fn stores(&self) -> &Stores {
        self.stores.get_or_init(|| Stores {
            volume: MemoryStore::with_config(
                MemoryStoreConfig::default().with_max_keys(self.max_keys),
            ),
            networks: DistinctMemoryStore::new(self.max_keys),
        })
    }

    /// [`Store::check`] on the local counters.
    pub(super) fn check(
        &self,
        key: &str,
        tier: &Tier,
        cost: Cost,
        now: Timestamp,
        mode: Mode,
    ) -> Result<Decision, StoreError> {
        self.stores()
            .volume
            .check(key, tier.limits(), cost, now, mode)
    }

    /// [`DistinctStore::observe`] on the local client networks.
    pub(super) fn observe(
        &self,
        key: &str,
        network: &str,
        limit: &DistinctLimit,
        now: Timestamp,
    ) -> Result<Observation, StoreError> {
        self.stores().networks.observe(key, network, limit, now)
    }

    /// Removes idle users from both stores, if they were ever made; how many
    /// counters' keys went.
    pub(super) fn sweep(&self, now: Timestamp) -> usize {
        match self.stores.get() {
            Some(s) => {
                Sweep::sweep(&s.networks, now);
                Sweep::sweep(&s.volume, now)
            }
            None => 0,
        }
    }

    /// Users the local counters track (0 before first use).
    pub(super) fn tracked_keys(&self) -> usize {
        self.stores.get().map_or(0, |s| s.volume.key_count())
    }
}
