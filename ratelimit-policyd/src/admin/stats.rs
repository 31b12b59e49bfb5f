//! `stats`: request, decision, connection and alert counters since start.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use serde::{Deserialize, Serialize};

use crate::ops::Outcome;
use crate::policy::{Engine, Stat};

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
    /// Incidents opened.
    pub incidents: u64,
    /// Alerts sent, failed, dropped.
    pub alerts: BTreeMap<String, u64>,
    /// Seconds since the last snapshot, if one was written.
    pub snapshot_age_secs: Option<u64>,
}

impl Stats {
    /// Reads the counters.
    pub fn apply(self, engine: &Arc<Engine>) -> Result<StatsReply, String> {
        let s = &engine.stats;
        let o = &engine.ops;
        let ld = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        let requests = ["rcpt", "data", "end_of_message", "other"]
            .iter()
            .zip(s.requests())
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        let decisions = o
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
            uptime_secs: o.uptime().as_secs(),
            requests,
            decisions,
            skipped: s.get(Stat::Skipped),
            charged: s.get(Stat::Charged),
            store_errors: s.get(Stat::StoreErrors),
            tracked_keys: engine.tracked_keys(),
            connections_open: ld(&o.connections_open),
            connections_total: ld(&o.connections_total),
            connections_refused: ld(&o.connections_refused),
            incidents: ld(&o.incidents),
            alerts: [
                ("sent", ld(&o.alerts_sent)),
                ("failed", ld(&o.alerts_failed)),
                ("dropped", ld(&o.alerts_dropped)),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
            snapshot_age_secs: engine
                .last_snapshot()
                .map(|at| engine.now().saturating_duration_since(at).as_secs()),
        })
    }
}

/// Text for the CLI.
pub fn render(r: &StatsReply) -> String {
    let mut s = String::new();
    let join = |m: &BTreeMap<String, u64>| {
        m.iter()
            .map(|(k, v)| format!("{k} {v}"))
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
        let _ = writeln!(s, "tier {tier}: {}", join(&by));
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
        "connections: {} open, {} total, {} refused by allow",
        r.connections_open, r.connections_total, r.connections_refused
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
