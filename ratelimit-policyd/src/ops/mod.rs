//! Operations: incident log lines and alerts, Prometheus metrics, request
//! recording. They observe the policy and the server; neither imports them.
//!
//! [`Ops`] is the policy's [`Observer`](crate::policy::Observer): for every verdict it records the request
//! (when `[record]` is on) and, for each incident the verdict opened, logs one line,
//! counts it, and queues an alert. It only bumps atomics and `try_send`s into
//! bounded channels on the request's thread. [`start`] (called by the daemon)
//! spawns the workers and binds the metrics port and the admin socket as configured.
//!
//! - [`alerts`]: run a command and/or POST a webhook on each incident, off the
//!   request path.
//! - [`webhook`]: the webhook's HTTP/1.1 client, plain or over verified TLS.
//! - [`metrics`]: the `/metrics` endpoint (Prometheus text format).
//! - [`record`]: JSON lines of decided requests, for [`replay`](crate::replay).

use tokio::sync::watch;

pub mod alerts;
pub mod metrics;
mod observer;
pub mod record;
pub mod webhook;

pub use observer::{Ops, View};

/// Starts the operational workers of `view` as configured: the alert worker, the
/// recorder, the metrics endpoint. Tasks are added to `tasks` and stop when `stop`
/// turns true. A port that cannot be bound or a file that cannot be opened is
/// logged, not fatal: answering Postfix matters more.
pub async fn start(view: &View, tasks: &mut tokio::task::JoinSet<()>, stop: watch::Receiver<bool>) {
    let cfg = view.policy.config();
    let ops = &view.ops;
    tasks.spawn(ops.alerts.start(stop.clone()));
    if let Some(path) = &cfg.ops.record {
        match ops.recorder.start(path, stop.clone()).await {
            Ok(writer) => {
                tasks.spawn(writer);
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
                *ops.metrics_addr.lock() = bound;
                tasks.spawn(metrics::serve(l, view.clone(), stop.clone()));
            }
            Err(e) => {
                tracing::error!(listen = %addr, error = %e, "cannot bind the metrics port; no metrics")
            }
        }
    }
}

/// Marks the operational endpoints started (see [`Ops::ready`]).
pub fn set_ready(ops: &Ops) {
    ops.ready.send_replace(true);
}
