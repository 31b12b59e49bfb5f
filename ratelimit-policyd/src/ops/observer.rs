//! [`Ops`], the policy's observer: for every verdict it records the request (when
//! `[record]` is on) and, for each incident the verdict opened, logs one line, counts
//! it, and queues an alert; and [`View`], what the operations endpoints read.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use ratelimit_core::Timestamp;
use tokio::sync::watch;

use super::alerts::Alerts;
use super::record::Recorder;
use crate::policy::{Incident, Observer, Policy, SharedConfig, Signal, Verdict};
use crate::protocol::PolicyRequest;
use crate::server::ServerStats;
use crate::template::{Approx, rfc3339};

/// What the operations endpoints (metrics, admin) read.
#[derive(Clone)]
pub struct View {
    /// The policy: its configuration, counts, stores.
    pub policy: Arc<Policy>,
    /// The server's connection counts and latency.
    pub server: Arc<ServerStats>,
    /// Incidents, alerts and records.
    pub ops: Arc<Ops>,
}

/// The observer of the policy: incident lines, alerts and records, and their counts.
pub struct Ops {
    /// Incidents opened (first refusal of a user for a limit or signal).
    pub incidents: AtomicU64,
    /// Alerts on incidents, and their counts.
    pub alerts: Arc<Alerts>,
    /// Recording of decided requests.
    pub recorder: Recorder,
    pub(super) metrics_addr: Mutex<Option<SocketAddr>>,
    pub(super) ready: watch::Sender<bool>,
}

impl Ops {
    /// Observes with alerts configured by `config`.
    pub fn new(config: SharedConfig) -> Ops {
        Ops {
            incidents: AtomicU64::new(0),
            alerts: Arc::new(Alerts::new(config)),
            recorder: Recorder::default(),
            metrics_addr: Mutex::new(None),
            ready: watch::channel(false).0,
        }
    }
}

impl std::fmt::Debug for Ops {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ops").finish_non_exhaustive()
    }
}

impl Observer for Ops {
    fn decided(&self, conn: u64, at: Timestamp, req: &PolicyRequest<'_>, verdict: &Verdict<'_>) {
        for incident in &verdict.incidents {
            self.incident(incident, at);
        }
        self.recorder.record(conn, at, req, &verdict.action);
    }
}

impl Ops {
    /// One incident: counted, logged (one line), and queued for alerting.
    fn incident(&self, incident: &Incident, at: Timestamp) {
        self.incidents.fetch_add(1, Ordering::Relaxed);
        log_incident(incident, at);
        self.alerts.offer(incident);
    }

    /// The address the metrics endpoint is bound to, once bound.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        *self.metrics_addr.lock()
    }

    /// Waits until [`start`](super::start) has bound the metrics port and the admin socket.
    pub async fn ready(&self) {
        let mut rx = self.ready.subscribe();
        let _ = rx.wait_for(|r| *r).await;
    }
}

/// The incident's log line (WARN): who, which limit or signal, from where, until when.
fn log_incident(incident: &Incident, at: Timestamp) {
    let now_ms = at.as_millis();
    let clients_seen = if incident.clients.is_empty() {
        "-".to_string()
    } else {
        incident.clients.join(",")
    };
    let client = incident.client_address.as_deref().unwrap_or("-");
    match incident.signal {
        Signal::Limit(_) => tracing::warn!(
            user = %incident.key,
            tier = %incident.tier,
            limit = %incident.limit,
            used = incident.used,
            client,
            clients_seen = %clients_seen,
            clears_at = %incident.clears_at.map(rfc3339).unwrap_or_else(|| "never".into()),
            clears_in = %incident.clears_at.map(|c| Approx(Duration::from_millis(c.saturating_sub(now_ms))).to_string()).unwrap_or_else(|| "never (message larger than the limit)".into()),
            dry_run = incident.dry_run,
            "incident: user over limit"
        ),
        Signal::Networks => tracing::warn!(
            user = %incident.key,
            tier = %incident.tier,
            limit = %incident.limit,
            networks = incident.used,
            client,
            clients_seen = %clients_seen,
            action = incident.action,
            clears_at = %incident.clears_at.map(rfc3339).unwrap_or_else(|| "never".into()),
            clears_in = %incident.clears_at.map(|c| Approx(Duration::from_millis(c.saturating_sub(now_ms))).to_string()).unwrap_or_else(|| "never".into()),
            dry_run = incident.dry_run,
            "incident: user sending from too many networks (compromised account?)"
        ),
        Signal::Baseline => tracing::warn!(
            user = %incident.key,
            tier = %incident.tier,
            limit = %incident.limit,
            sent = incident.used,
            client,
            clients_seen = %clients_seen,
            action = incident.action,
            clears_at = %incident.clears_at.map(rfc3339).unwrap_or_else(|| "never".into()),
            dry_run = incident.dry_run,
            "incident: {} (compromised account?)", incident.detail
        ),
    }
}
