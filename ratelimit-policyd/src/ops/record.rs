//! Recording decided requests as JSON lines, for [`replay`](crate::replay).
//!
//! Off by default (`[record] path`). The request path builds a small [`Record`] and
//! `try_send`s it; a writer task appends it to the file (full queue: dropped and
//! counted in `ratelimit_records_dropped_total`). One line per request:
//!
//! ```text
//! {"ts":1700000000000,"conn":3,"attrs":{"protocol_state":"END-OF-MESSAGE","sasl_username":"alice","client_address":"192.0.2.7","instance":"a1.b2","recipient_count":"2","size":"1200"},"action":"DEFER_IF_PERMIT"}
//! ```
//!
//! `ts` is the policy's clock in ms since the epoch; `conn` tells connections apart
//! (a message is charged once per `instance` per connection); `attrs` holds only the
//! attributes the policy reads (no recipients, subjects or bodies); `action` is the
//! answer the live server gave.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use arc_swap::ArcSwapOption;
use ratelimit_core::Timestamp;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, watch};

use crate::protocol::{Action, PolicyRequest};

/// Records waiting to be written.
pub const QUEUE: usize = 8192;

/// The attributes recorded: what the policy decides by.
pub const RECORDED: [&str; 9] = [
    "request",
    "protocol_state",
    "sasl_username",
    "client_address",
    "sender",
    "instance",
    "recipient_count",
    "size",
    "policy_context",
];

/// One decided request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// When it was decided, ms since the epoch (the policy's clock).
    pub ts: u64,
    /// Which connection it came on.
    pub conn: u64,
    /// The recorded attributes (non-empty ones only).
    pub attrs: BTreeMap<String, String>,
    /// The answer given: `DUNNO`, `DEFER_IF_PERMIT`, `HOLD`, `REJECT`, or a code (`451`).
    pub action: String,
}

impl Record {
    /// The record of `req`, decided at `at` and answered `answer`.
    pub fn of(
        conn: u64,
        at: ratelimit_core::Timestamp,
        req: &PolicyRequest<'_>,
        answer: &Action<'_>,
    ) -> Record {
        let mut attrs = BTreeMap::new();
        for name in RECORDED {
            if let Some(v) = req.get(name.as_bytes())
                && !v.is_empty()
            {
                attrs.insert(name.to_string(), String::from_utf8_lossy(v).into_owned());
            }
        }
        Record {
            ts: at.as_millis(),
            conn,
            attrs,
            action: action_label(answer),
        }
    }
}

/// `DUNNO`, `DEFER_IF_PERMIT`, ..., or the number of a code action.
pub fn action_label(a: &Action<'_>) -> String {
    match a {
        Action::Code { code, .. } => code.get().to_string(),
        other => other.keyword().to_string(),
    }
}

/// Opens (appends to, creating it mode 0600) the record file.
async fn open(path: &Path) -> std::io::Result<tokio::fs::File> {
    tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .await
}

/// The request path's side of recording: a bounded queue to the writer.
#[derive(Default)]
pub struct Recorder {
    /// Records dropped because the writer fell behind.
    pub dropped: AtomicU64,
    tx: ArcSwapOption<mpsc::Sender<Record>>,
    /// Whether `tx` was ever set: one plain load per request when it was not.
    on: AtomicBool,
}

impl Recorder {
    /// Records a decided request, if recording is on (never waits: drops and counts
    /// when the writer is behind).
    pub fn record(&self, conn: u64, at: Timestamp, req: &PolicyRequest<'_>, answer: &Action<'_>) {
        if !self.on.load(Ordering::Acquire) {
            return;
        }
        let guard = self.tx.load();
        let Some(tx) = guard.as_ref() else {
            return;
        };
        if tx.try_send(Record::of(conn, at, req, answer)).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Starts recording into `path` (appended to, created mode 0600): returns the
    /// writer to spawn, which runs until `stop`.
    pub async fn start(
        &self,
        path: &Path,
        stop: watch::Receiver<bool>,
    ) -> std::io::Result<impl std::future::Future<Output = ()> + Send + 'static> {
        let file = open(path).await?;
        let (tx, rx) = mpsc::channel(QUEUE);
        self.tx.store(Some(Arc::new(tx)));
        self.on.store(true, Ordering::Release);
        Ok(writer(file, rx, stop))
    }
}

/// Writes records until `stop`, then drains what is queued and flushes.
async fn writer(
    file: tokio::fs::File,
    mut rx: mpsc::Receiver<Record>,
    mut stop: watch::Receiver<bool>,
) {
    let mut out = tokio::io::BufWriter::new(file);
    let mut stopping = false;
    loop {
        let rec = if stopping {
            match rx.try_recv() {
                Ok(r) => r,
                Err(_) => break,
            }
        } else {
            tokio::select! {
                r = rx.recv() => match r { Some(r) => r, None => break },
                _ = stop.wait_for(|s| *s) => { stopping = true; continue; }
            }
        };
        if let Err(e) = write_one(&mut out, &rec).await {
            tracing::error!(error = %e, "writing the record file failed; recording stops");
            return;
        }
        // Flush whenever the queue is empty: the file is current when traffic pauses.
        if rx.is_empty()
            && let Err(e) = out.flush().await
        {
            tracing::error!(error = %e, "writing the record file failed; recording stops");
            return;
        }
    }
    let _ = out.flush().await;
}

async fn write_one(
    out: &mut tokio::io::BufWriter<tokio::fs::File>,
    rec: &Record,
) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(rec).map_err(std::io::Error::other)?;
    line.push(b'\n');
    out.write_all(&line).await
}
