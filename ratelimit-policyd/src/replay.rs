//! Replay: run recorded requests (see [`ops::record`](crate::ops::record)) through a
//! configuration offline, on a simulated clock, to see who would have been refused,
//! when, and by which limit — so limits can be chosen from last week's traffic before
//! they are enforced.
//!
//! The policy is the server's own ([`Policy::decide`]), over in-memory stores
//! (whatever the configured backend) and a [`ManualClock`] set to each record's
//! timestamp; each recorded connection keeps its own state, as live. What is
//! reported is read from each [`Verdict`](crate::policy::Verdict).
//!
//! # Examples
//!
//! ```
//! use ratelimit_policyd::{config, replay};
//! let cfg = config::parse("[tiers.default]\nlimits = [\"1/1h\"]\n", "t.toml", None).unwrap();
//! let log = r#"{"ts":1000,"conn":1,"attrs":{"protocol_state":"END-OF-MESSAGE","sasl_username":"alice","instance":"a"},"action":"DUNNO"}
//! {"ts":2000,"conn":1,"attrs":{"protocol_state":"END-OF-MESSAGE","sasl_username":"alice","instance":"b"},"action":"DUNNO"}
//! "#;
//! let report = replay::run(cfg, log.as_bytes()).unwrap();
//! assert_eq!(report.refused().count(), 1);
//! assert_eq!(report.incidents[0].incident.limit, "1/1h");
//! ```

use std::collections::BTreeMap;
use std::fmt::Write;
use std::io::BufRead;
use std::sync::Arc;

use arc_swap::ArcSwap;
use ratelimit_core::{Clock, ManualClock, Timestamp};

use crate::backend::Backend;
use crate::config::{Backend as BackendConfig, Config};
use crate::escape::Escaped;
use crate::ops::record::{Record, action_label};
use crate::policy::{ConnState, Incident, NoObserver, Policy};
use crate::protocol::{Attribute, PolicyRequest};

/// One replayed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replayed {
    /// When (ms since the epoch).
    pub ts: u64,
    /// The user (`sasl_username` as recorded).
    pub user: Option<String>,
    /// The protocol stage.
    pub stage: String,
    /// Refused (or, in a warn tier, would have been) under the replayed configuration.
    pub refused: bool,
    /// The answer under the replayed configuration.
    pub action: String,
    /// The answer the live server gave.
    pub live_action: String,
}

/// An incident (first refusal of a user for a limit) and when it opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimedIncident {
    /// When (ms since the epoch).
    pub at: u64,
    /// What.
    pub incident: Incident,
}

/// What a replay found.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Every replayed request, in order.
    pub requests: Vec<Replayed>,
    /// The incidents, in order.
    pub incidents: Vec<TimedIncident>,
    /// Lines that could not be replayed: (line number, why).
    pub bad_lines: Vec<(usize, String)>,
}

impl Report {
    /// The requests refused under the replayed configuration.
    pub fn refused(&self) -> impl Iterator<Item = &Replayed> {
        self.requests.iter().filter(|r| r.refused)
    }

    /// How many answers differ from the live run's.
    pub fn differences(&self) -> usize {
        self.requests
            .iter()
            .filter(|r| r.action != r.live_action)
            .count()
    }
}

/// Replays the JSON lines of `input` through `cfg` (starts its own runtime: call
/// [`replay`] from async code).
pub fn run(cfg: Config, input: impl BufRead) -> std::io::Result<Report> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()?;
    rt.block_on(replay(cfg, input))
}

/// Replays the JSON lines of `input` through `cfg`.
pub async fn replay(cfg: Config, input: impl BufRead) -> std::io::Result<Report> {
    let max_keys = match &cfg.store.backend {
        BackendConfig::Memory { max_keys } => *max_keys,
        BackendConfig::Redis { .. } => crate::config::defaults::MAX_KEYS,
    };
    let clock = ManualClock::new(Timestamp::EPOCH);
    let policy = Policy::new(
        Arc::new(ArcSwap::from_pointee(cfg)),
        Backend::memory(max_keys),
        Arc::new(clock.clone()),
        Arc::new(NoObserver),
    );
    let mut conns: BTreeMap<u64, ConnState> = BTreeMap::new();
    let mut report = Report::default();
    for (i, line) in input.lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let rec: Record = match serde_json::from_str(&line) {
            Ok(r) => r,
            Err(e) => {
                report.bad_lines.push((i + 1, e.to_string()));
                continue;
            }
        };
        let attrs: Vec<Attribute<'_>> = rec
            .attrs
            .iter()
            .map(|(k, v)| Attribute {
                name: k.as_bytes(),
                value: v.as_bytes(),
            })
            .collect();
        let req = match PolicyRequest::from_attributes(&attrs) {
            Ok(r) => r,
            Err(e) => {
                report.bad_lines.push((i + 1, e.to_string()));
                continue;
            }
        };
        // Records from several connections may be slightly out of order: time only
        // moves forward.
        clock.set(Timestamp::from_millis(rec.ts.max(clock.now().as_millis())));
        let state = conns
            .entry(rec.conn)
            .or_insert_with(|| ConnState::new(rec.conn));
        let now = clock.now();
        let verdict = policy.decide(&req, state, now).await;
        report
            .incidents
            .extend(verdict.incidents.iter().map(|i| TimedIncident {
                at: now.as_millis(),
                incident: i.clone(),
            }));
        report.requests.push(Replayed {
            ts: rec.ts,
            user: rec.attrs.get("sasl_username").cloned(),
            stage: req.protocol_state.to_string(),
            refused: verdict.is_refusal(),
            action: action_label(&verdict.action),
            live_action: rec.action,
        });
    }
    Ok(report)
}

/// The report as text: incidents (who, when, which limit), then refusals per user.
pub fn render(report: &Report, config: &str) -> String {
    use crate::template::rfc3339;
    let mut s = String::new();
    let n = report.requests.len();
    let (first, last) = (
        report.requests.first().map(|r| r.ts),
        report.requests.last().map(|r| r.ts),
    );
    let _ = write!(s, "replayed {n} requests through {config}");
    if let (Some(a), Some(b)) = (first, last) {
        let _ = write!(s, " ({} to {})", rfc3339(a), rfc3339(b));
    }
    s.push('\n');
    for (line, why) in report.bad_lines.iter().take(5) {
        let _ = writeln!(s, "skipped line {line}: {}", Escaped(why));
    }
    if report.bad_lines.len() > 5 {
        let _ = writeln!(s, "skipped {} more lines", report.bad_lines.len() - 5);
    }
    let mut per_user: BTreeMap<&str, (usize, u64, u64)> = BTreeMap::new();
    for r in report.refused() {
        let e = per_user
            .entry(r.user.as_deref().unwrap_or("-"))
            .or_insert((0, r.ts, r.ts));
        e.0 += 1;
        e.2 = r.ts;
    }
    if report.incidents.is_empty() {
        let _ = writeln!(s, "nobody would have been refused");
    } else {
        let _ = writeln!(
            s,
            "\nfirst refusals (one per user and limit until it clears):"
        );
        for t in &report.incidents {
            let i = &t.incident;
            let _ = writeln!(
                s,
                "  {}  {}  limit {} (tier {}{})  used {}  clears {}",
                rfc3339(t.at),
                Escaped(&i.key),
                i.limit,
                Escaped(&i.tier),
                if i.dry_run { ", warn" } else { "" },
                i.used,
                i.clears_at.map_or_else(|| "never".into(), rfc3339)
            );
        }
        let _ = writeln!(
            s,
            "\nrefused requests per user ({} in all, {} user{}):",
            report.refused().count(),
            per_user.len(),
            if per_user.len() == 1 { "" } else { "s" }
        );
        for (user, (count, a, b)) in &per_user {
            let _ = writeln!(
                s,
                "  {}  {count} refused, {} to {}",
                Escaped(user),
                rfc3339(*a),
                rfc3339(*b)
            );
        }
    }
    let live = report
        .requests
        .iter()
        .filter(|r| !matches!(r.live_action.as_str(), "DUNNO" | "OK"))
        .count();
    let _ = writeln!(
        s,
        "\nthe live run refused {live} requests; {} answers differ from it",
        report.differences()
    );
    s
}
