//! `stats`: request, decision, connection and alert counters since start.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::Ordering;

use serde::{Deserialize, Serialize};

use super::context::Context;
use crate::escape::Escaped;
use crate::policy::{Counted, Outcome};

/// `{"cmd":"stats"}`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Stats {}

/// The reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatsReply {
    /// Seconds since start.
    pub uptime_secs: u64,
    /// Requests by stage (`rcpt`, `data`, `end_of_message`, `other`).
    pub requests: BTreeMap<String, u64>,
    /// Counted requests by tier, then by answer (`allow`, `defer`, ...).
    pub decisions: BTreeMap<String, BTreeMap<String, u64>>,
    /// Requests not counted.
    pub skipped: u64,
    /// Messages charged.
    pub charged: u64,
    /// Store failures.
    pub store_errors: u64,
    /// Users tracked (memory store).
    pub tracked_keys: Option<usize>,
    /// Connections open now.
    pub connections_open: u64,
    /// Connections accepted since start.
    pub connections_total: u64,
    /// Connections refused by `[server] allow`.
    pub connections_refused: u64,
    /// Unix-socket connections refused by `[server] allow_uids`.
    #[serde(default)]
    pub connections_refused_uid: u64,
    /// Connections closed at `max_connections` (the one idle longest) to admit new ones.
    #[serde(default)]
    pub connections_evicted: u64,
    /// Incidents opened.
    pub incidents: u64,
    /// Alerts sent, failed, dropped.
    pub alerts: BTreeMap<String, u64>,
    /// Seconds since the last snapshot, if one was written.
    pub snapshot_age_secs: Option<u64>,
}

impl Stats {
    /// Reads the counters.
    pub fn apply(self, ctx: &Context) -> Result<StatsReply, String> {
        let policy = &ctx.view.policy;
        let s = policy.tally();
        let o = &ctx.view.ops;
        let server = &ctx.view.server;
        let ld = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        let requests = ["rcpt", "data", "end_of_message", "other"]
            .iter()
            .zip(s.requests())
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        let decisions = s
            .decisions()
            .into_iter()
            .map(|(tier, counts)| {
                let by = Outcome::ALL
                    .iter()
                    .zip(counts)
                    .map(|(oc, n)| (oc.label().to_string(), n))
                    .collect();
                (tier, by)
            })
            .collect();
        Ok(StatsReply {
            uptime_secs: server.uptime().as_secs(),
            requests,
            decisions,
            skipped: s.get(Counted::Skipped),
            charged: s.get(Counted::Charged),
            store_errors: s.get(Counted::StoreErrors),
            tracked_keys: policy.backend().tracked_keys(),
            connections_open: ld(&server.connections_open),
            connections_total: ld(&server.connections_total),
            connections_refused: ld(&server.connections_refused),
            connections_refused_uid: ld(&server.connections_refused_uid),
            connections_evicted: ld(&server.connections_evicted),
            incidents: ld(&o.incidents),
            alerts: [
                ("sent", ld(&o.alerts.sent)),
                ("failed", ld(&o.alerts.failed)),
                ("dropped", ld(&o.alerts.dropped)),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
            snapshot_age_secs: policy
                .backend()
                .last_snapshot()
                .map(|at| policy.now().saturating_duration_since(at).as_secs()),
        })
    }
}

/// Text for the CLI.
pub fn render(r: &StatsReply) -> String {
    let mut s = String::new();
    let join = |m: &BTreeMap<String, u64>| {
        m.iter()
            .map(|(k, v)| format!("{} {v}", Escaped(k)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let _ = writeln!(s, "uptime:      {}s", r.uptime_secs);
    let _ = writeln!(s, "requests:    {}", join(&r.requests));
    for (tier, by) in &r.decisions {
        let by: BTreeMap<String, u64> = by
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        let _ = writeln!(s, "tier {}: {}", Escaped(tier), join(&by));
    }
    let _ = writeln!(
        s,
        "skipped:     {}, charged {}, store errors {}",
        r.skipped, r.charged, r.store_errors
    );
    if let Some(k) = r.tracked_keys {
        let _ = writeln!(s, "tracked:     {k} users");
    }
    let _ = writeln!(
        s,
        "connections: {} open, {} total, {} refused by allow, {} by allow_uids, {} evicted at the cap",
        r.connections_open,
        r.connections_total,
        r.connections_refused,
        r.connections_refused_uid,
        r.connections_evicted
    );
    let _ = writeln!(
        s,
        "incidents:   {}; alerts {}",
        r.incidents,
        join(&r.alerts)
    );
    if let Some(a) = r.snapshot_age_secs {
        let _ = writeln!(s, "snapshot:    {a}s ago");
    }
    s
}
