//! Operations: incident alerts, Prometheus metrics, request recording, and the
//! counters they read.
//!
//! [`OpsState`] lives in the [`Engine`] (`engine.ops`); the request path only bumps
//! atomics in it and hands work to channels. [`start`] (called by
//! [`server::run`](crate::server::run)) spawns the workers and binds the metrics port
//! and the admin socket as configured.
//!
//! - [`alerts`]: run a command and/or POST a webhook on the first refusal of a user
//!   for a limit, off the request path.
//! - [`metrics`]: the `/metrics` endpoint (Prometheus text format).
//! - [`record`]: JSON lines of decided requests, for [`replay`](crate::replay).
//! - [`clients`]: the last few client addresses of each user, for incident lines.
//! - [`striped`]: the counters every request adds to, one copy per thread stripe.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ahash::AHashMap;
use arc_swap::ArcSwapOption;
use parking_lot::{Mutex, RwLock};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use crate::policy::Engine;
use crate::protocol::Action;

pub mod alerts;
pub mod clients;
pub mod metrics;
pub mod record;
pub mod striped;

/// How a decided request was answered, for `ratelimit_decisions_total{action}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Under every limit: `DUNNO`.
    Allow,
    /// Refused temporarily (`DEFER_IF_PERMIT`, `DEFER`, a 4xx code).
    Defer,
    /// Put in the hold queue.
    Hold,
    /// Refused for good (`REJECT`, a 5xx code).
    Reject,
    /// Over a limit of a warn tier: logged, answered `DUNNO`.
    DryRun,
    /// The store failed or timed out (answered per `on_store_error`).
    StoreError,
}

impl Outcome {
    /// Every outcome, in label order.
    pub const ALL: [Outcome; 6] = [
        Outcome::Allow,
        Outcome::Defer,
        Outcome::Hold,
        Outcome::Reject,
        Outcome::DryRun,
        Outcome::StoreError,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Allow => "allow",
            Outcome::Defer => "defer",
            Outcome::Hold => "hold",
            Outcome::Reject => "reject",
            Outcome::DryRun => "dry_run",
            Outcome::StoreError => "store_error",
        }
    }

    /// `allowed`: `Some(true)` allowed, `Some(false)` over a limit, `None` store failure.
    pub fn of(allowed: Option<bool>, answer: &Action<'_>) -> Outcome {
        match (allowed, answer) {
            (None, _) => Outcome::StoreError,
            (Some(true), _) => Outcome::Allow,
            (Some(false), Action::Hold(_)) => Outcome::Hold,
            (Some(false), Action::Reject(_)) => Outcome::Reject,
            (Some(false), Action::Code { code, .. }) if !code.is_temporary() => Outcome::Reject,
            (Some(false), a) if a.is_refusal() => Outcome::Defer,
            (Some(false), _) => Outcome::DryRun,
        }
    }
}

/// Distinct tier labels kept; tiers come from the configuration, so this only
/// matters across many reloads that rename tiers. Beyond it, decisions count under
/// the tier label `"other"`.
pub const MAX_TIER_LABELS: usize = 64;

/// Store failures are logged at WARN at most this often (ms); the others at DEBUG,
/// and counted in `ratelimit_store_errors_total`.
pub const STORE_ERROR_LOG_EVERY_MS: u64 = 10_000;

/// Upper bounds of the request latency histogram, in microseconds.
pub const LATENCY_BUCKETS_US: [u64; 14] = [
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000,
];

/// The histogram's sum (µs), after its buckets and `+Inf`.
const LATENCY_SUM: usize = LATENCY_BUCKETS_US.len() + 1;
/// The histogram's count.
const LATENCY_COUNT: usize = LATENCY_SUM + 1;

/// Request latency: time from a complete request to its answer written. Striped
/// (every request observes it): non-cumulative counts per bucket and `+Inf`, then
/// the sum in µs and the count.
#[derive(Debug, Default)]
pub struct Histogram(striped::Counters<{ LATENCY_COUNT + 1 }>);

impl Histogram {
    /// Records one observation.
    pub fn observe(&self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        let i = LATENCY_BUCKETS_US
            .iter()
            .position(|b| us <= *b)
            .unwrap_or(LATENCY_BUCKETS_US.len());
        self.0.add(i, 1);
        self.0.add(LATENCY_SUM, us);
        self.0.add(LATENCY_COUNT, 1);
    }

    /// Cumulative counts per bucket (the last is `+Inf`), the sum in µs, the count.
    pub fn snapshot(&self) -> (Vec<u64>, u64, u64) {
        let all = self.0.all();
        let mut acc = 0u64;
        let cumulative = all
            .iter()
            .take(LATENCY_SUM)
            .map(|n| {
                acc = acc.wrapping_add(*n);
                acc
            })
            .collect();
        let at = |i: usize| all.get(i).copied().unwrap_or(0);
        (cumulative, at(LATENCY_SUM), at(LATENCY_COUNT))
    }
}

/// One tier's decisions by outcome (in [`Outcome::ALL`] order), striped.
type TierCounters = Arc<striped::Counters<6>>;

fn note(counts: &TierCounters, outcome: Outcome) {
    let i = Outcome::ALL.iter().position(|o| *o == outcome).unwrap_or(0);
    counts.add(i, 1);
}

/// The decision counters of one tier (as [`OpsState::note_decision`] counts them).
#[derive(Debug, Clone)]
pub struct TierDecisions {
    tier: Box<str>,
    counts: TierCounters,
}

impl TierDecisions {
    /// The tier these count (its decisions may be counted under `"other"`).
    pub fn tier(&self) -> &str {
        &self.tier
    }

    /// Counts a decision.
    pub fn note(&self, outcome: Outcome) {
        note(&self.counts, outcome);
    }
}

/// Re-reads the configuration for `admin reload`; set by the daemon (which knows the
/// file and the command-line overrides). Returns a summary or the error.
pub type ReloadHook = Arc<dyn Fn(&Engine) -> Result<String, String> + Send + Sync>;

/// Operational counters and worker handles, kept in the engine.
pub struct OpsState {
    /// Open connections (policy clients).
    pub connections_open: AtomicU64,
    /// Connections accepted since start.
    pub connections_total: AtomicU64,
    /// TCP connections refused because the client is not in `[server] allow`.
    pub connections_refused: AtomicU64,
    /// Request latency.
    pub latency: Histogram,
    /// Incidents opened (first refusal of a user for a limit).
    pub incidents: AtomicU64,
    /// Alerts delivered (a command that exited 0, a webhook answered 2xx).
    pub alerts_sent: AtomicU64,
    /// Alerts that failed or timed out.
    pub alerts_failed: AtomicU64,
    /// Alerts dropped because the queue was full.
    pub alerts_dropped: AtomicU64,
    /// Records dropped because the recorder fell behind.
    pub records_dropped: AtomicU64,
    /// Last client addresses per user.
    pub clients: clients::ClientsSeen,
    decisions: RwLock<AHashMap<Box<str>, TierCounters>>,
    recorder: ArcSwapOption<mpsc::Sender<record::Record>>,
    /// Whether `recorder` was ever set: one plain load per request when it was not.
    recording: AtomicBool,
    next_conn: AtomicU64,
    metrics_addr: Mutex<Option<SocketAddr>>,
    ready: watch::Sender<bool>,
    reload: Mutex<Option<ReloadHook>>,
    started: Instant,
    store_error_logged_ms: AtomicU64,
    store_errors_suppressed: AtomicU64,
}

impl Default for OpsState {
    fn default() -> Self {
        OpsState {
            connections_open: AtomicU64::new(0),
            connections_total: AtomicU64::new(0),
            connections_refused: AtomicU64::new(0),
            latency: Histogram::default(),
            incidents: AtomicU64::new(0),
            alerts_sent: AtomicU64::new(0),
            alerts_failed: AtomicU64::new(0),
            alerts_dropped: AtomicU64::new(0),
            records_dropped: AtomicU64::new(0),
            clients: clients::ClientsSeen::default(),
            decisions: RwLock::new(AHashMap::new()),
            recorder: ArcSwapOption::empty(),
            recording: AtomicBool::new(false),
            next_conn: AtomicU64::new(0),
            metrics_addr: Mutex::new(None),
            ready: watch::channel(false).0,
            reload: Mutex::new(None),
            started: Instant::now(),
            store_error_logged_ms: AtomicU64::new(0),
            store_errors_suppressed: AtomicU64::new(0),
        }
    }
}

impl std::fmt::Debug for OpsState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpsState").finish_non_exhaustive()
    }
}

impl OpsState {
    /// Counts a decision of `tier`. Takes a read lock (a write lock the first time a
    /// tier is seen); a caller deciding many requests keeps a [`TierDecisions`].
    pub fn note_decision(&self, tier: &str, outcome: Outcome) {
        note(&self.tier_counters(tier), outcome);
    }

    /// The decision counters of `tier`, to count its decisions without looking it up
    /// each time. Takes a read lock (a write lock the first time a tier is seen).
    pub fn tier_decisions(&self, tier: &str) -> TierDecisions {
        TierDecisions {
            tier: tier.into(),
            counts: self.tier_counters(tier),
        }
    }

    fn tier_counters(&self, tier: &str) -> TierCounters {
        if let Some(c) = self.decisions.read().get(tier) {
            return Arc::clone(c);
        }
        let mut map = self.decisions.write();
        let label = if map.len() >= MAX_TIER_LABELS && !map.contains_key(tier) {
            "other"
        } else {
            tier
        };
        Arc::clone(map.entry(label.into()).or_default())
    }

    /// Decisions by tier and outcome, sorted by tier.
    pub fn decisions(&self) -> Vec<(String, [u64; 6])> {
        let mut out: Vec<(String, [u64; 6])> = self
            .decisions
            .read()
            .iter()
            .map(|(t, c)| (t.to_string(), c.all()))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// A new connection id (for records: replay keeps each connection's state apart).
    pub fn next_connection_id(&self) -> u64 {
        self.next_conn.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Counts a connection opened; the guard counts it closed.
    pub fn connection_opened(&self) -> ConnectionGuard<'_> {
        self.connections_open.fetch_add(1, Ordering::Relaxed);
        self.connections_total.fetch_add(1, Ordering::Relaxed);
        ConnectionGuard(self)
    }

    /// Records a decided request, if recording is on (never waits: drops and counts
    /// when the recorder is behind).
    pub fn record(
        &self,
        conn: u64,
        at: ratelimit_core::Timestamp,
        req: &crate::protocol::PolicyRequest<'_>,
        answer: &Action<'_>,
    ) {
        if !self.recording.load(Ordering::Acquire) {
            return;
        }
        let guard = self.recorder.load();
        let Some(tx) = guard.as_ref() else {
            return;
        };
        let rec = record::Record::of(conn, at, req, answer);
        if tx.try_send(rec).is_err() {
            self.records_dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The address the metrics endpoint is bound to, once bound.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        *self.metrics_addr.lock()
    }

    /// Waits until [`start`] has bound the metrics port and the admin socket.
    pub async fn ready(&self) {
        let mut rx = self.ready.subscribe();
        let _ = rx.wait_for(|r| *r).await;
    }

    /// Sets what `admin reload` does.
    pub fn set_reload_hook(&self, hook: ReloadHook) {
        *self.reload.lock() = Some(hook);
    }

    /// What `admin reload` does, if set.
    pub fn reload_hook(&self) -> Option<ReloadHook> {
        self.reload.lock().clone()
    }

    /// Whether a store failure at `now_ms` should be logged at WARN (at most one per
    /// [`STORE_ERROR_LOG_EVERY`]); if so, how many were not since the last one.
    pub fn store_error_log_due(&self, now_ms: u64) -> Option<u64> {
        let last = self.store_error_logged_ms.load(Ordering::Relaxed);
        if last != 0 && now_ms < last.saturating_add(STORE_ERROR_LOG_EVERY_MS) {
            self.store_errors_suppressed.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        if self
            .store_error_logged_ms
            .compare_exchange(last, now_ms.max(1), Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
        {
            self.store_errors_suppressed.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Some(self.store_errors_suppressed.swap(0, Ordering::Relaxed))
    }

    /// Time since the engine was built.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }
}

/// Counts the connection closed when dropped.
pub struct ConnectionGuard<'a>(&'a OpsState);

impl Drop for ConnectionGuard<'_> {
    fn drop(&mut self) {
        self.0.connections_open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Starts the operational workers for `engine` as configured: the alert worker (and
/// its incident sink), the recorder, the metrics endpoint, the admin socket. Tasks
/// are added to `tasks` and stop when `stop` turns true. A port or socket that cannot
/// be bound is logged, not fatal: answering Postfix matters more.
pub async fn start(engine: &Arc<Engine>, tasks: &mut JoinSet<()>, stop: watch::Receiver<bool>) {
    let cfg = engine.config();
    alerts::install(engine, tasks, stop.clone());
    if let Some(path) = &cfg.ops.record {
        match record::open(path).await {
            Ok(file) => {
                let (tx, rx) = mpsc::channel(record::QUEUE);
                engine.ops.recorder.store(Some(Arc::new(tx)));
                engine.ops.recording.store(true, Ordering::Release);
                tasks.spawn(record::writer(file, rx, stop.clone()));
                tracing::info!(path = %path.display(), "recording decided requests");
            }
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e, "cannot open the record file; not recording")
            }
        }
    }
    if let Some(addr) = cfg.ops.metrics {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => {
                let bound = l.local_addr().ok();
                if !addr.ip().is_loopback() {
                    tracing::warn!(listen = %addr, "metrics endpoint is not on a loopback address");
                }
                tracing::info!(listen = %bound.unwrap_or(addr), "metrics on http://{}/metrics", bound.unwrap_or(addr));
                *engine.ops.metrics_addr.lock() = bound;
                tasks.spawn(metrics::serve(l, Arc::clone(engine), stop.clone()));
            }
            Err(e) => {
                tracing::error!(listen = %addr, error = %e, "cannot bind the metrics port; no metrics")
            }
        }
    }
    if let Some(path) = &cfg.ops.admin.socket {
        match crate::admin::bind(path) {
            Ok(l) => {
                tracing::info!(socket = %path.display(), "admin socket");
                tasks.spawn(crate::admin::serve(
                    l,
                    path.clone(),
                    Arc::clone(engine),
                    stop.clone(),
                ));
            }
            Err(e) => {
                tracing::warn!(socket = %path.display(), error = %e, "cannot create the admin socket; admin commands are unavailable (set [admin] socket, or enabled = false)")
            }
        }
    }
    engine.ops.ready.send_replace(true);
}

/// `2024-05-01T10:00:00Z` (UTC) for milliseconds since the epoch.
pub fn rfc3339(ms: u64) -> String {
    let secs = ms / 1000;
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (proleptic Gregorian).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_utc_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(4_102_444_799_999), "2099-12-31T23:59:59Z");
    }

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(40));
        h.observe(Duration::from_micros(300));
        h.observe(Duration::from_secs(5));
        let (b, sum, n) = h.snapshot();
        assert_eq!(b.first(), Some(&1));
        assert_eq!(b.get(3), Some(&2));
        assert_eq!(b.last(), Some(&3));
        assert_eq!(n, 3);
        assert_eq!(sum, 5_000_340);
    }

    #[test]
    fn store_failures_are_logged_at_most_every_ten_seconds() {
        let ops = OpsState::default();
        assert_eq!(ops.store_error_log_due(1_000), Some(0));
        assert_eq!(ops.store_error_log_due(2_000), None);
        assert_eq!(ops.store_error_log_due(10_999), None);
        assert_eq!(ops.store_error_log_due(11_000), Some(2));
        assert_eq!(ops.store_error_log_due(11_001), None);
    }

    #[test]
    fn tier_labels_are_bounded() {
        let ops = OpsState::default();
        for i in 0..MAX_TIER_LABELS + 10 {
            ops.note_decision(&format!("t{i}"), Outcome::Allow);
        }
        let d = ops.decisions();
        assert_eq!(d.len(), MAX_TIER_LABELS + 1);
        assert!(d.iter().any(|(t, c)| t == "other" && c[0] == 10));
    }
}
