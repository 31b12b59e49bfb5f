//! The store backend: the one module of the server that knows which stores exist.
//!
//! Everything else — the policy, the admin commands, replay, the periodic sweep and
//! snapshot — talks to a [`Backend`], which holds two stores behind traits:
//! - a [`VolumeStore`]: the counters of the tiers' limits ([`Store`] plus the admin
//!   capabilities the server needs: list, forget, sweep, snapshot);
//! - a [`NetworkStore`]: the client networks seen per user (the compromise signal).
//!
//! [`Backend::open`] builds them from `[store]` (the in-process memory stores, or
//! Redis for both); [`Backend::new`] takes any stores, so a store written by an
//! embedder runs the server's policy unchanged.
//!
//! Stores that decide in process ([`Calls::Inline`]) are called on the request's own
//! thread. Stores that wait on the network ([`Calls::Blocking`]) are guarded
//! (`circuit.rs`): at most `max_store_calls_in_flight` calls at once, and a circuit
//! that stops calling a store that keeps failing; a request refused by either gets
//! the `on_store_error` answer at once. A guarded call runs on the request's own
//! thread when the store bounds its calls itself within `decision_timeout`
//! ([`VolumeStore::longest_call`]: Redis with `redis_connect_timeout + 3 ×
//! redis_command_timeout` within it), and otherwise on the runtime's blocking pool,
//! bounded by `decision_timeout`; either way a hung backend costs a request at
//! most `decision_timeout`.
//!
//! With `on_store_error = "local"` the policy decides a request the shared store
//! failed with [`Backend::check_local`] and [`Backend::observe_local`]: this
//! server's own in-process stores (`fallback.rs`).

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use ratelimit_core::distinct::{DistinctLimit, DistinctStore, Observation};
use ratelimit_core::store::snapshot::SnapshotStats;
use ratelimit_core::store::{
    DistinctMemoryStore, Evictions, Forget, RedisStore, Scan, SnapshotError, Sweep,
};
use ratelimit_core::{
    Cost, Decision, KeyState, MemoryStore, MemoryStoreConfig, Mode, Store, StoreError, Tier,
    Timestamp,
};

use crate::config::{Backend as BackendConfig, ServerConfig, StoreConfig};

mod circuit;
mod fallback;
mod redis_config;
pub use redis_config::{import_baselines, redis_store_config};
#[cfg(test)]
mod tests;

use circuit::Guard;
pub use circuit::{FIRST_OPEN, Health, MAX_OPEN, OPEN_AFTER, REOPEN_WITHIN};
use fallback::Local;

/// How many command round trips one Redis call may take at worst: the call, and
/// after a Redis restart (the code missing) `FUNCTION LOAD` and the call again, or
/// the script's `EVAL`.
const REDIS_ROUND_TRIPS: u32 = 3;

// Per-user baselines: their store trait and the backend's methods for them.
mod baseline;
pub use baseline::{BaselineKeeper, baseline_snapshot_path};
use ratelimit_core::store::BaselineMemoryStore;

/// Users an embedder's backend ([`Backend::new`]) keeps baselines for, in process,
/// until [`Backend::with_baseline`] gives it another store.
const EMBEDDED_BASELINE_KEYS: usize = 100_000;

/// Where the counters of the tiers' limits live, as the server needs them.
///
/// [`Store::check`] decides; the rest serves the admin commands and maintenance.
/// Every method may be called from any thread; none is called on the request path
/// but `check`.
pub trait VolumeStore: Store + 'static {
    /// Calls `f` for every tracked key with its state (`admin top`).
    fn scan(&self, f: &mut dyn FnMut(&str, &KeyState)) -> Result<(), StoreError>;

    /// Forgets everything recorded for `key`; returns whether anything was.
    fn forget(&self, key: &str) -> Result<bool, StoreError>;

    /// Removes keys whose state has fully decayed; returns how many. Stores that
    /// expire keys by themselves (Redis TTLs) have nothing to do.
    fn sweep(&self, _now: Timestamp) -> usize {
        0
    }

    /// How many keys are tracked, when that is cheap to know.
    fn tracked_keys(&self) -> Option<usize> {
        None
    }

    /// Keys evicted to make room for new ones, for stores that evict (in process).
    fn evictions(&self) -> Option<Evictions> {
        None
    }

    /// Writes a snapshot to `path`, for stores that keep one (`None`: this store
    /// does not).
    fn save_snapshot(
        &self,
        _path: &Path,
        _now: Timestamp,
    ) -> Option<Result<SnapshotStats, SnapshotError>> {
        None
    }

    /// Checks that the store answers: the probe of an open circuit (network
    /// stores). Called on a thread of its own.
    fn probe(&self) -> Result<(), StoreError> {
        Ok(())
    }

    /// The longest one call can take, when the store bounds its calls itself (its
    /// own connect and command timeouts). `None`: unknown, so a network store is
    /// called on the blocking pool, where the caller's timeout bounds it.
    fn longest_call(&self) -> Option<Duration> {
        None
    }
}

/// Where the client networks seen per user live.
pub trait NetworkStore: DistinctStore + 'static {
    /// Removes users whose networks have all aged out; returns how many.
    fn sweep(&self, _now: Timestamp) -> usize {
        0
    }

    /// For stores in process: users tracked, and `key`'s networks and heap bytes.
    fn usage(&self, _key: &str) -> Option<NetworkUsage> {
        None
    }

    /// Users evicted to make room for new ones, for stores that evict (in process).
    fn evictions(&self) -> Option<Evictions> {
        None
    }

    /// The longest one call can take (see [`VolumeStore::longest_call`]).
    fn longest_call(&self) -> Option<Duration> {
        None
    }
}

/// What a [`NetworkStore`] in process holds (for tests and `admin show`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetworkUsage {
    /// Users whose networks are tracked.
    pub users: usize,
    /// Networks kept for the user asked about.
    pub networks: usize,
    /// Heap bytes of the user's state.
    pub heap_bytes: usize,
}

/// How a backend's stores are called.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Calls {
    /// On the caller's thread: the stores never wait (in process).
    Inline,
    /// Guarded (calls in flight, circuit), and bounded by the caller's timeout:
    /// on the caller's thread when the store's own timeouts are within it, else on
    /// the blocking pool (network stores).
    Blocking,
}

/// What bounds one guarded store call ([`Calls::Blocking`]): `[server]
/// decision_timeout` and `max_store_calls_in_flight`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallBounds {
    /// The longest the caller waits.
    pub timeout: Duration,
    /// Most calls in flight at once; beyond it a call is refused at once.
    pub max_in_flight: usize,
}

impl CallBounds {
    /// The bounds `[server]` sets.
    pub fn of(server: &ServerConfig) -> CallBounds {
        CallBounds {
            timeout: server.decision_timeout,
            max_in_flight: server.max_store_calls_in_flight,
        }
    }
}

/// Why a backend could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The memory store's snapshot could not be restored.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// The store could not be set up.
    #[error("store: {0}")]
    Store(#[from] StoreError),
}

/// The counters and client networks the policy decides with.
#[derive(Clone)]
pub struct Backend {
    volume: Arc<dyn VolumeStore>,
    networks: Arc<dyn NetworkStore>,
    /// Per-user baselines (see `backend/baseline.rs`).
    baseline: Arc<dyn BaselineKeeper>,
    calls: Calls,
    name: &'static str,
    /// When the last snapshot was written (ms since the epoch; 0: never).
    last_snapshot_ms: Arc<AtomicU64>,
    /// The cap on calls in flight and the circuit ([`Calls::Blocking`]).
    guard: Arc<Guard>,
    /// The local fallback's stores, made on first use.
    local: Arc<Local>,
    /// [`VolumeStore::longest_call`] and [`NetworkStore::longest_call`].
    longest: (Option<Duration>, Option<Duration>),
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backend")
            .field("store", &self.name)
            .field("calls", &self.calls)
            .finish_non_exhaustive()
    }
}

impl Backend {
    /// A backend over any stores; `name` is what logs call it.
    pub fn new(
        volume: Arc<dyn VolumeStore>,
        networks: Arc<dyn NetworkStore>,
        calls: Calls,
        name: &'static str,
    ) -> Backend {
        let longest = (volume.longest_call(), networks.longest_call());
        let probed = Arc::clone(&volume);
        Backend {
            volume,
            networks,
            baseline: Arc::new(BaselineMemoryStore::new(EMBEDDED_BASELINE_KEYS)),
            calls,
            name,
            last_snapshot_ms: Arc::new(AtomicU64::new(0)),
            guard: Arc::new(Guard::new(name, Box::new(move || probed.probe()))),
            local: Arc::new(Local::new(crate::config::defaults::MAX_KEYS)),
            longest,
        }
    }

    /// The same backend with a local fallback tracking at most `max_keys` users.
    pub fn with_local_max_keys(mut self, max_keys: usize) -> Backend {
        self.local = Arc::new(Local::new(max_keys));
        self
    }

    /// This backend with `baseline` as its store of per-user baselines.
    pub fn with_baseline(mut self, baseline: Arc<dyn BaselineKeeper>) -> Backend {
        self.baseline = baseline;
        self
    }

    /// In-process stores tracking at most `max_keys` keys each.
    pub fn memory(max_keys: usize) -> Backend {
        let volume = MemoryStore::with_config(MemoryStoreConfig::default().with_max_keys(max_keys));
        Backend::new(
            Arc::new(volume),
            Arc::new(DistinctMemoryStore::new(max_keys)),
            Calls::Inline,
            "memory",
        )
        .with_baseline(Arc::new(BaselineMemoryStore::new(max_keys)))
    }

    /// The backend `[store]` configures. The memory store is restored from its
    /// snapshot when one is configured (an unreadable one is an error unless
    /// `on_bad_snapshot = "start-empty"`). Redis is not required to answer yet:
    /// decisions fail per `on_store_error` until it does; it keeps as many idle
    /// connections as `bounds` lets calls be in flight at once (with fewer kept, a
    /// server with more calls in flight closed and reopened connections
    /// continually). The local fallback tracks at most `max_keys` users.
    pub fn open(
        cfg: &StoreConfig,
        bounds: CallBounds,
        now: Timestamp,
    ) -> Result<Backend, OpenError> {
        Backend::open_stores(cfg, bounds, now).map(|b| b.with_local_max_keys(cfg.local_max_keys))
    }

    fn open_stores(
        cfg: &StoreConfig,
        bounds: CallBounds,
        now: Timestamp,
    ) -> Result<Backend, OpenError> {
        match &cfg.backend {
            BackendConfig::Memory { max_keys } => {
                let volume =
                    MemoryStore::with_config(MemoryStoreConfig::default().with_max_keys(*max_keys));
                if let Some(snap) = &cfg.snapshot {
                    restore(&volume, &snap.path, snap.start_empty_if_bad, now)?;
                }
                let backend = Backend::new(
                    Arc::new(volume),
                    Arc::new(DistinctMemoryStore::new(*max_keys)),
                    Calls::Inline,
                    "memory",
                )
                .with_baseline(Arc::new(BaselineMemoryStore::new(*max_keys)));
                if let Some(snap) = &cfg.snapshot {
                    backend.restore_baselines(&snap.path, snap.start_empty_if_bad, now)?;
                }
                Ok(backend)
            }
            redis @ BackendConfig::Redis { .. } => {
                let rc = redis_store_config(redis)
                    .ok_or_else(|| StoreError::Unavailable("not a Redis configuration".into()))?
                    .with_max_idle_connections(bounds.max_in_flight);
                let store = Arc::new(RedisStore::new(rc)?);
                let redis = store.config().endpoint();
                match store.ping() {
                    Ok(()) => tracing::info!(redis = %redis, "connected to Redis"),
                    Err(e) => {
                        tracing::warn!(redis = %redis, error = %e, "Redis is not answering yet; answering per on_store_error until it does")
                    }
                }
                Ok(Backend::new(
                    Arc::clone(&store) as Arc<dyn VolumeStore>,
                    Arc::clone(&store) as Arc<dyn NetworkStore>,
                    Calls::Blocking,
                    "redis",
                )
                .with_baseline(store))
            }
        }
    }

    /// What logs call this backend (`memory`, `redis`, or an embedder's name).
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Whether a decision with `timeout` completes on the caller's thread without a
    /// runtime: the stores decide in process, or bound their own calls within
    /// `timeout` (so a call is made on the caller's thread, see [`Calls`]).
    pub fn decides_inline(&self, timeout: Duration) -> bool {
        match self.calls {
            Calls::Inline => true,
            Calls::Blocking => within(self.longest.0, timeout) && within(self.longest.1, timeout),
        }
    }

    /// Checks `cost` for `key` against `tier`'s limits (see [`Store::check`]) in
    /// the shared store. A guarded store may refuse the call at once (too many in
    /// flight, circuit open): an [`StoreError::Unavailable`] like any other.
    pub async fn check(
        &self,
        key: &str,
        tier: &Arc<Tier>,
        cost: Cost,
        now: Timestamp,
        mode: Mode,
        bounds: CallBounds,
    ) -> Result<Decision, StoreError> {
        if self.calls == Calls::Inline {
            return self.volume.check(key, tier.limits(), cost, now, mode);
        }
        let permit = self.guard.admit(bounds.max_in_flight)?;
        let result = if call_here() {
            let r = self.volume.check(key, tier.limits(), cost, now, mode);
            drop(permit);
            r
        } else {
            let store = Arc::clone(&self.volume);
            let (key, tier) = (key.to_string(), Arc::clone(tier));
            bounded(bounds.timeout, move || {
                let _permit = permit;
                store.check(&key, tier.limits(), cost, now, mode)
            })
            .await
        };
        self.guard.record(&result);
        result
    }

    /// Notes that `key` sent from `network` (see [`DistinctStore::observe`]), in
    /// the shared store, guarded as [`Backend::check`] is.
    pub async fn observe(
        &self,
        key: &str,
        network: &str,
        limit: &DistinctLimit,
        now: Timestamp,
        bounds: CallBounds,
    ) -> Result<Observation, StoreError> {
        if self.calls == Calls::Inline {
            return self.networks.observe(key, network, limit, now);
        }
        let permit = self.guard.admit(bounds.max_in_flight)?;
        let result = if call_here() {
            let r = self.networks.observe(key, network, limit, now);
            drop(permit);
            r
        } else {
            let store = Arc::clone(&self.networks);
            let (key, network, limit) = (key.to_string(), network.to_string(), *limit);
            bounded(bounds.timeout, move || {
                let _permit = permit;
                store.observe(&key, &network, &limit, now)
            })
            .await
        };
        self.guard.record(&result);
        result
    }

    /// [`Backend::check`] on this server's own counters (the local fallback), for
    /// a request the shared store failed. Never waits.
    pub fn check_local(
        &self,
        key: &str,
        tier: &Tier,
        cost: Cost,
        now: Timestamp,
        mode: Mode,
    ) -> Result<Decision, StoreError> {
        self.guard.decided_locally();
        self.local.check(key, tier, cost, now, mode)
    }

    /// [`Backend::observe`] on this server's own client networks (the local
    /// fallback). Never waits.
    pub fn observe_local(
        &self,
        key: &str,
        network: &str,
        limit: &DistinctLimit,
        now: Timestamp,
    ) -> Result<Observation, StoreError> {
        self.guard.decided_locally();
        self.local.observe(key, network, limit, now)
    }

    /// The cap on calls in flight, the circuit and the local fallback, now.
    pub fn health(&self) -> Health {
        self.guard.health()
    }

    /// Users the local fallback's counters track.
    pub fn local_tracked_keys(&self) -> usize {
        self.local.tracked_keys()
    }

    /// Forgets `key`'s counters and networks; whether anything was recorded.
    /// Blocking: call it off the async threads.
    pub fn forget(&self, key: &str) -> Result<bool, StoreError> {
        let networks = self.networks.forget(key)?;
        let counters = self.volume.forget(key)?;
        Ok(counters || networks)
    }

    /// Every tracked key with its state. Blocking: call it off the async threads.
    pub fn scan(&self, f: &mut dyn FnMut(&str, &KeyState)) -> Result<(), StoreError> {
        self.volume.scan(f)
    }

    /// Removes idle keys from both stores; returns how many counters' keys went.
    pub fn sweep(&self, now: Timestamp) -> usize {
        let networks = self.networks.sweep(now);
        if networks > 0 {
            tracing::debug!(users = networks, "swept idle client-network state");
        }
        let local = self.local.sweep(now);
        if local > 0 {
            tracing::debug!(users = local, "swept idle users of the local fallback");
        }
        self.volume.sweep(now)
    }

    /// How many keys the counters track, when known.
    pub fn tracked_keys(&self) -> Option<usize> {
        self.volume.tracked_keys()
    }

    /// Evictions from the counters and from the client networks, for the stores
    /// that evict (in process).
    pub fn evictions(&self) -> (Option<Evictions>, Option<Evictions>) {
        (self.volume.evictions(), self.networks.evictions())
    }

    /// The network store's usage for `key`, when it is in process.
    pub fn network_usage(&self, key: &str) -> Option<NetworkUsage> {
        self.networks.usage(key)
    }

    /// Writes the counters' snapshot to `path`; `None` when the store keeps none.
    pub fn save_snapshot(
        &self,
        path: &Path,
        now: Timestamp,
    ) -> Option<Result<SnapshotStats, SnapshotError>> {
        let saved = self.volume.save_snapshot(path, now)?;
        if let Some(Err(e)) = self.save_baselines(path, now) {
            tracing::warn!(error = %e, "the baselines' snapshot could not be written");
        }
        if saved.is_ok() {
            self.last_snapshot_ms
                .store(now.as_millis().max(1), Ordering::Relaxed);
        }
        Some(saved)
    }

    /// When the last snapshot was written, if one was.
    pub fn last_snapshot(&self) -> Option<Timestamp> {
        match self.last_snapshot_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(Timestamp::from_millis(ms)),
        }
    }
}

fn restore(
    store: &MemoryStore,
    path: &Path,
    start_empty_if_bad: bool,
    now: Timestamp,
) -> Result<(), SnapshotError> {
    match store.load_snapshot(path, now) {
        // Only a snapshot that is not there is "none yet": one that cannot be read
        // (permissions, a symlink loop, a path through a file) is an error below.
        Err(SnapshotError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            tracing::info!(path = %path.display(), "no snapshot yet: starting with empty counters");
            Ok(())
        }
        Ok(stats) => {
            tracing::info!(path = %path.display(), keys = stats.keys, restored = stats.restored, "counters restored from snapshot");
            Ok(())
        }
        Err(e) if start_empty_if_bad => {
            tracing::error!(error = %e, "SNAPSHOT UNREADABLE: starting with EMPTY counters (on_bad_snapshot = \"start-empty\"); every user's quota is reset");
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// Whether a store whose calls take at most `longest` may be called on the
/// caller's thread when it waits `timeout`.
fn within(longest: Option<Duration>, timeout: Duration) -> bool {
    longest.is_some_and(|l| l <= timeout)
}

/// Whether a store call is made on this thread: it is not the runtime's. A
/// connection thread decides without the runtime only when
/// [`Backend::decides_inline`] said the store's calls end within its timeout (a
/// reload in between may stretch one decision past a shortened timeout, once);
/// on the runtime (a connection thread in `block_on`, the admin commands) a call
/// goes to the blocking pool, so no runtime thread waits on the store.
fn call_here() -> bool {
    tokio::runtime::Handle::try_current().is_err()
}

/// The longest one call of `store` can take: a connection opened (the pooled one
/// may be dead), then [`REDIS_ROUND_TRIPS`] commands. Unknown (`None`) on a
/// cluster, where a call may open connections to several nodes while slots move,
/// so its calls go to the blocking pool, bounded by `decision_timeout`.
fn redis_longest_call(store: &RedisStore) -> Option<Duration> {
    let c = store.config();
    if c.is_cluster() {
        return None;
    }
    Some(
        c.connect_timeout
            .saturating_add(c.command_timeout.saturating_mul(REDIS_ROUND_TRIPS)),
    )
}

/// Runs a store call on the blocking pool, bounded by `timeout`: a store that hangs,
/// or a call that panics, is a [`StoreError`] like any other.
async fn bounded<T: Send + 'static>(
    timeout: Duration,
    call: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    match tokio::time::timeout(timeout, tokio::task::spawn_blocking(call)).await {
        Ok(Ok(r)) => r,
        Ok(Err(join)) => Err(StoreError::Unavailable(format!(
            "store task failed: {join}"
        ))),
        Err(_) => Err(StoreError::Timeout(timeout)),
    }
}

impl VolumeStore for MemoryStore {
    fn scan(&self, f: &mut dyn FnMut(&str, &KeyState)) -> Result<(), StoreError> {
        Scan::scan(self, f)
    }
    fn forget(&self, key: &str) -> Result<bool, StoreError> {
        Forget::forget(self, key)
    }
    fn sweep(&self, now: Timestamp) -> usize {
        Sweep::sweep(self, now)
    }
    fn tracked_keys(&self) -> Option<usize> {
        Some(self.key_count())
    }
    fn evictions(&self) -> Option<Evictions> {
        Some(MemoryStore::evictions(self))
    }
    fn save_snapshot(
        &self,
        path: &Path,
        now: Timestamp,
    ) -> Option<Result<SnapshotStats, SnapshotError>> {
        Some(MemoryStore::save_snapshot(self, path, now))
    }
}

impl VolumeStore for RedisStore {
    fn scan(&self, f: &mut dyn FnMut(&str, &KeyState)) -> Result<(), StoreError> {
        Scan::scan(self, f)
    }
    fn forget(&self, key: &str) -> Result<bool, StoreError> {
        Forget::forget(self, key)
    }
    fn probe(&self) -> Result<(), StoreError> {
        self.ping()
    }
    fn longest_call(&self) -> Option<Duration> {
        redis_longest_call(self)
    }
}

impl NetworkStore for DistinctMemoryStore {
    fn sweep(&self, now: Timestamp) -> usize {
        Sweep::sweep(self, now)
    }
    fn usage(&self, key: &str) -> Option<NetworkUsage> {
        Some(NetworkUsage {
            users: self.key_count(),
            networks: self.entry_count(key),
            heap_bytes: self.key_heap_bytes(key),
        })
    }
    fn evictions(&self) -> Option<Evictions> {
        Some(DistinctMemoryStore::evictions(self))
    }
}

impl NetworkStore for RedisStore {
    fn longest_call(&self) -> Option<Duration> {
        redis_longest_call(self)
    }
}
