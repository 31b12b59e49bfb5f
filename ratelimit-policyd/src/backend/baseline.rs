//! The baseline store behind the backend seam: per-user baselines
//! ([`ratelimit_core::baseline`]) in process ([`BaselineMemoryStore`], saved in its
//! own snapshot file beside the counters') or in Redis (the same server and prefix as
//! the counters).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ratelimit_core::baseline::{BaselineConfig, BaselineStore, Judgement};
use ratelimit_core::store::snapshot::SnapshotStats;
use ratelimit_core::store::{BaselineMemoryStore, RedisStore, SnapshotError};
use ratelimit_core::{StoreError, Timestamp};

use super::{Backend, Calls, bounded};

/// Where per-user baselines live, as the server needs them.
pub trait BaselineKeeper: BaselineStore + 'static {
    /// Forgets users whose baseline has decayed to nothing; returns how many. Stores
    /// that expire keys by themselves (Redis TTLs) have nothing to do.
    fn sweep(&self, _now: Timestamp, _cfg: &BaselineConfig) -> usize {
        0
    }

    /// Users tracked, for stores that know it cheaply (in process).
    fn tracked(&self) -> Option<usize> {
        None
    }

    /// Writes a snapshot to `path`, for stores that keep one.
    fn save_snapshot(
        &self,
        _path: &Path,
        _now: Timestamp,
    ) -> Option<Result<SnapshotStats, SnapshotError>> {
        None
    }

    /// Restores a snapshot from `path`, for stores that keep one.
    fn load_snapshot(
        &self,
        _path: &Path,
        _now: Timestamp,
    ) -> Option<Result<SnapshotStats, SnapshotError>> {
        None
    }
}

impl BaselineKeeper for BaselineMemoryStore {
    fn sweep(&self, now: Timestamp, cfg: &BaselineConfig) -> usize {
        BaselineMemoryStore::sweep(self, now, cfg)
    }
    fn tracked(&self) -> Option<usize> {
        Some(self.key_count())
    }
    fn save_snapshot(
        &self,
        path: &Path,
        now: Timestamp,
    ) -> Option<Result<SnapshotStats, SnapshotError>> {
        Some(BaselineMemoryStore::save_snapshot(self, path, now))
    }
    fn load_snapshot(
        &self,
        path: &Path,
        now: Timestamp,
    ) -> Option<Result<SnapshotStats, SnapshotError>> {
        Some(BaselineMemoryStore::load_snapshot(self, path, now))
    }
}

impl BaselineKeeper for RedisStore {}

/// The baselines' snapshot file beside the counters' one: `PATH.baseline`.
pub fn baseline_snapshot_path(counters: &Path) -> PathBuf {
    let mut name = counters.as_os_str().to_os_string();
    name.push(".baseline");
    PathBuf::from(name)
}

impl Backend {
    /// Records `accepted` messages of `key` at `now` and judges it (see
    /// [`BaselineStore::observe`]); 0 only looks.
    pub async fn baseline(
        &self,
        key: &str,
        accepted: u32,
        cfg: &BaselineConfig,
        now: Timestamp,
        timeout: Duration,
    ) -> Result<Judgement, StoreError> {
        match self.calls {
            Calls::Inline => self.baseline.observe(key, accepted, cfg, now),
            Calls::Blocking => {
                let store = Arc::clone(&self.baseline);
                let (key, cfg) = (key.to_string(), *cfg);
                bounded(timeout, move || store.observe(&key, accepted, &cfg, now)).await
            }
        }
    }

    /// Forgets `key`'s hour (its flag), keeping its history. Blocking.
    pub fn baseline_clear_hour(
        &self,
        key: &str,
        cfg: &BaselineConfig,
        now: Timestamp,
    ) -> Result<bool, StoreError> {
        self.baseline.clear_hour(key, cfg, now)
    }

    /// Forgets `key`'s baseline, history included. Blocking.
    pub fn baseline_forget(&self, key: &str) -> Result<bool, StoreError> {
        self.baseline.forget(key)
    }

    /// Judges `key` at `now` without recording. Blocking.
    pub fn baseline_peek(
        &self,
        key: &str,
        cfg: &BaselineConfig,
        now: Timestamp,
    ) -> Result<Judgement, StoreError> {
        self.baseline.observe(key, 0, cfg, now)
    }

    /// Forgets users whose baseline has decayed to nothing; returns how many.
    pub fn sweep_baselines(&self, now: Timestamp, cfg: &BaselineConfig) -> usize {
        self.baseline.sweep(now, cfg)
    }

    /// Users whose baseline is tracked, when known.
    pub fn baseline_users(&self) -> Option<usize> {
        self.baseline.tracked()
    }

    /// Writes the baselines' snapshot beside the counters' (`PATH.baseline`).
    pub fn save_baselines(
        &self,
        counters: &Path,
        now: Timestamp,
    ) -> Option<Result<SnapshotStats, SnapshotError>> {
        self.baseline
            .save_snapshot(&baseline_snapshot_path(counters), now)
    }

    /// Writes the baselines' snapshot to `path` itself (`replay --write-snapshot`).
    pub fn save_baselines_to(
        &self,
        path: &Path,
        now: Timestamp,
    ) -> Option<Result<SnapshotStats, SnapshotError>> {
        self.baseline.save_snapshot(path, now)
    }

    /// Restores the baselines' snapshot from beside the counters' (`PATH.baseline`):
    /// none there is no error (nothing learned yet); an unreadable one is, unless
    /// `start_empty_if_bad`.
    pub(super) fn restore_baselines(
        &self,
        counters: &Path,
        start_empty_if_bad: bool,
        now: Timestamp,
    ) -> Result<(), SnapshotError> {
        let path = baseline_snapshot_path(counters);
        match self.baseline.load_snapshot(&path, now) {
            None => Ok(()),
            Some(Err(SnapshotError::Io { source, .. }))
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                Ok(())
            }
            Some(Ok(stats)) => {
                tracing::info!(path = %path.display(), users = stats.restored, "baselines restored from snapshot");
                Ok(())
            }
            Some(Err(e)) if start_empty_if_bad => {
                tracing::error!(error = %e, "BASELINE SNAPSHOT UNREADABLE: starting with no baselines (on_bad_snapshot = \"start-empty\")");
                Ok(())
            }
            Some(Err(e)) => Err(e),
        }
    }
}
