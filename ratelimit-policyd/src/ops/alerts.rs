//! Alerts on the first refusal of a user for a limit (an incident): run a command
//! and/or POST a JSON webhook.
//!
//! Off the request path: [`Alerts::offer`] only `try_send`s into a bounded channel
//! (full: the alert is dropped and counted in `ratelimit_alerts_total{result="dropped"}`);
//! one worker task delivers them in order, each command and POST bounded by
//! `[alerts] timeout`. The policy opens at most one incident per user per limit until
//! it clears, so there is at most one alert per user per limit per window.
//!
//! The command runs as `sh -c COMMAND` with the details in the environment — never
//! interpolated into the command line, so a user name cannot inject shell syntax:
//!
//! | variable | value |
//! |---|---|
//! | `RATELIMIT_EVENT` | `incident` |
//! | `RATELIMIT_USER` | the user (key) |
//! | `RATELIMIT_TIER` | its tier |
//! | `RATELIMIT_LIMIT` | the limit that refused (`100/1h`) |
//! | `RATELIMIT_USED` | the count used when refused |
//! | `RATELIMIT_CLIENT` | the client address of the refused request (may be empty) |
//! | `RATELIMIT_CLIENTS` | the last few client addresses of the user, space-separated |
//! | `RATELIMIT_CLEARS_AT` | when it clears, RFC 3339 UTC (empty: never, the message exceeds the limit) |
//! | `RATELIMIT_DRY_RUN` | `true` for a warn tier (nothing was refused), else `false` |
//!
//! The webhook gets the same fields as JSON, with `Authorization: Bearer TOKEN` when
//! `webhook_token` is set, over `http://` or verified `https://` ([`super::webhook`]).
//! The token is never logged; URLs are logged as host only.

use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::ArcSwapOption;

use serde::Serialize;
use tokio::sync::{mpsc, watch};

use super::webhook::{self, TlsClient};
use crate::config::ops::AlertsConfig;
use crate::policy::{Incident, SharedConfig};

/// The webhook body (and the source of the command's environment).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct AlertBody {
    /// Always `"incident"`.
    pub event: &'static str,
    /// The user.
    pub user: String,
    /// Its tier.
    pub tier: String,
    /// The limit that refused.
    pub limit: String,
    /// The count used when refused.
    pub used: u64,
    /// The client address of the refused request.
    pub client: Option<String>,
    /// The last few client addresses of the user, most recent first.
    pub clients: Vec<String>,
    /// When it clears (RFC 3339), if ever.
    pub clears_at: Option<String>,
    /// A warn tier: logged only.
    pub dry_run: bool,
    /// Why, in words and numbers, for signals that say more (the baseline); empty
    /// otherwise.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

impl AlertBody {
    /// The alert for `incident`.
    pub fn of(incident: &Incident) -> AlertBody {
        AlertBody {
            event: "incident",
            user: incident.key.clone(),
            tier: incident.tier.clone(),
            limit: incident.limit.clone(),
            used: incident.used,
            client: incident.client_address.clone(),
            clients: incident.clients.clone(),
            clears_at: incident.clears_at.map(crate::template::rfc3339),
            dry_run: incident.dry_run,
            detail: incident.detail.clone(),
        }
    }

    /// The `RATELIMIT_*` environment of the command.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("RATELIMIT_EVENT", self.event.to_string()),
            ("RATELIMIT_USER", self.user.clone()),
            ("RATELIMIT_TIER", self.tier.clone()),
            ("RATELIMIT_LIMIT", self.limit.clone()),
            ("RATELIMIT_USED", self.used.to_string()),
            ("RATELIMIT_CLIENT", self.client.clone().unwrap_or_default()),
            ("RATELIMIT_CLIENTS", self.clients.join(" ")),
            (
                "RATELIMIT_CLEARS_AT",
                self.clears_at.clone().unwrap_or_default(),
            ),
            ("RATELIMIT_DRY_RUN", self.dry_run.to_string()),
            ("RATELIMIT_DETAIL", self.detail.clone()),
        ]
    }
}

/// Alerts: the queue the request path offers incidents to, and what became of them.
pub struct Alerts {
    /// Delivered (a command that exited 0, a webhook answered 2xx).
    pub sent: AtomicU64,
    /// Failed or timed out.
    pub failed: AtomicU64,
    /// Dropped because the queue was full.
    pub dropped: AtomicU64,
    config: SharedConfig,
    tx: ArcSwapOption<mpsc::Sender<AlertBody>>,
}

impl Alerts {
    /// Alerts as `config` sets them (read per alert, so a reload can turn alerts on,
    /// off or elsewhere); nothing is queued until [`Alerts::start`].
    pub fn new(config: SharedConfig) -> Alerts {
        Alerts {
            sent: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            config,
            tx: ArcSwapOption::empty(),
        }
    }

    /// Queues the alert for `incident` if alerts are configured and started; a full
    /// queue drops it (counted and logged).
    pub fn offer(&self, incident: &Incident) {
        if !self.config.load().ops.alerts.enabled() {
            return;
        }
        let tx = self.tx.load();
        let Some(tx) = tx.as_ref() else {
            return;
        };
        if tx.try_send(AlertBody::of(incident)).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(user = %incident.key, "alert dropped: the alert queue is full");
        }
    }

    /// Opens the queue (its size is fixed here) and returns the worker that delivers
    /// it, until `stop`.
    pub fn start(
        self: &Arc<Self>,
        stop: watch::Receiver<bool>,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let (tx, rx) = mpsc::channel::<AlertBody>(self.config.load().ops.alerts.queue);
        self.tx.store(Some(Arc::new(tx)));
        worker(Arc::clone(self), rx, stop)
    }
}

async fn worker(
    alerts: Arc<Alerts>,
    mut rx: mpsc::Receiver<AlertBody>,
    mut stop: watch::Receiver<bool>,
) {
    let mut tls = TlsClient::default();
    loop {
        let alert = tokio::select! {
            a = rx.recv() => match a { Some(a) => a, None => return },
            _ = stop.wait_for(|s| *s) => return,
        };
        let cfg = alerts.config.load_full();
        let deliver = async {
            tokio::join!(
                run_command(&cfg.ops.alerts, &alert),
                post_webhook(&cfg.ops.alerts, &alert, &mut tls)
            )
        };
        // At shutdown an alert in progress is abandoned (a command is killed).
        let (cmd, hook) = tokio::select! {
            r = deliver => r,
            _ = stop.wait_for(|s| *s) => return,
        };
        for outcome in [cmd, hook].into_iter().flatten() {
            let counter = if outcome {
                &alerts.sent
            } else {
                &alerts.failed
            };
            counter.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Runs the command, if configured; `Some(true)` when it exited 0 in time.
async fn run_command(cfg: &AlertsConfig, alert: &AlertBody) -> Option<bool> {
    let command = cfg.command.as_deref()?;
    let mut cmd = tokio::process::Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(command)
        .envs(alert.env())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(user = %alert.user, error = %e, "alert command could not be started");
            return Some(false);
        }
    };
    match tokio::time::timeout(cfg.timeout, child.wait_with_output()).await {
        Ok(Ok(out)) if out.status.success() => {
            tracing::debug!(user = %alert.user, "alert command ran");
            Some(true)
        }
        Ok(Ok(out)) => {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let stderr: String = stderr.trim().chars().take(300).collect();
            tracing::warn!(user = %alert.user, status = %out.status, stderr = %stderr, "alert command failed");
            Some(false)
        }
        Ok(Err(e)) => {
            tracing::warn!(user = %alert.user, error = %e, "alert command failed");
            Some(false)
        }
        Err(_) => {
            // Dropping the future kills the child (kill_on_drop).
            tracing::warn!(user = %alert.user, timeout = ?cfg.timeout, "alert command timed out and was killed");
            Some(false)
        }
    }
}

/// POSTs the webhook, if configured; `Some(true)` when it answered 2xx in time.
async fn post_webhook(cfg: &AlertsConfig, alert: &AlertBody, tls: &mut TlsClient) -> Option<bool> {
    let url = cfg.webhook_url.as_ref()?;
    let body = match serde_json::to_vec(alert) {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!(error = %e, "alert body could not be encoded");
            return Some(false);
        }
    };
    let host = url.for_logs();
    let tls = if url.tls {
        match tls.config(cfg.webhook_ca.as_ref()) {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::warn!(user = %alert.user, webhook = %host, error = %e, "alert webhook failed");
                return Some(false);
            }
        }
    } else {
        None
    };
    let token = cfg.webhook_token.as_ref();
    match tokio::time::timeout(cfg.timeout, webhook::post(url, token, &body, tls)).await {
        Ok(Ok(status)) if (200..300).contains(&status) => {
            tracing::debug!(user = %alert.user, webhook = %host, status, "alert webhook sent");
            Some(true)
        }
        Ok(Ok(status)) => {
            tracing::warn!(user = %alert.user, webhook = %host, status, "alert webhook answered an error");
            Some(false)
        }
        Ok(Err(e)) => {
            tracing::warn!(user = %alert.user, webhook = %host, error = %e, "alert webhook failed");
            Some(false)
        }
        Err(_) => {
            tracing::warn!(user = %alert.user, webhook = %host, timeout = ?cfg.timeout, "alert webhook timed out");
            Some(false)
        }
    }
}
