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
use std::path::Path;
use std::sync::Arc;

use arc_swap::ArcSwap;
use ratelimit_core::{Clock, ManualClock, Timestamp};

use crate::backend::Backend;
use crate::config::{Backend as BackendConfig, Config};
use crate::escape::Escaped;
use crate::ops::record::{Record, action_label};
use crate::policy::{ConnState, Incident, NoObserver, Policy, Signal};
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
    /// What refused (or would have): `limit`, `networks` or `baseline`.
    pub signal: Option<&'static str>,
    /// The limit or signal as incidents name it (`100/1h`, `networks>5/1h`,
    /// `baseline10/1h`), when this request opened an incident.
    pub limit: Option<String>,
    /// A message accepted at END-OF-MESSAGE (answered `DUNNO`).
    pub accepted: bool,
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

/// [`run`], writing the baselines learned to `write_snapshot` (see [`replay_to`]).
pub fn run_to(
    cfg: Config,
    input: impl BufRead,
    write_snapshot: Option<&Path>,
) -> std::io::Result<Report> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()?;
    rt.block_on(replay_to(cfg, input, write_snapshot))
}

/// Replays the JSON lines of `input` through `cfg`.
pub async fn replay(cfg: Config, input: impl BufRead) -> std::io::Result<Report> {
    replay_to(cfg, input, None).await
}

/// Replays the JSON lines of `input` through `cfg`; then, with `write_snapshot`,
/// writes the baselines learned to that file (the memory store's baseline snapshot,
/// which a server restores from `snapshot_path` + `.baseline`).
pub async fn replay_to(
    cfg: Config,
    input: impl BufRead,
    write_snapshot: Option<&Path>,
) -> std::io::Result<Report> {
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
        let action = action_label(&verdict.action);
        report.requests.push(Replayed {
            ts: rec.ts,
            user: rec.attrs.get("sasl_username").cloned(),
            stage: req.protocol_state.to_string(),
            refused: verdict.is_refusal(),
            accepted: req.protocol_state == crate::protocol::Stage::EndOfMessage
                && action == "DUNNO",
            action,
            live_action: rec.action,
            signal: verdict.signal.map(|s| match s {
                Signal::Limit(_) => "limit",
                Signal::Networks => "networks",
                Signal::Baseline => "baseline",
            }),
            limit: verdict.incidents.first().map(|i| i.limit.clone()),
        });
    }
    if let Some(path) = write_snapshot {
        match policy.backend().save_baselines_to(path, clock.now()) {
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(std::io::Error::other(e.to_string())),
            None => {
                return Err(std::io::Error::other(
                    "this backend keeps no baseline snapshot",
                ));
            }
        }
    }
    Ok(report)
}

/// One user in the `--json` report.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct UserReport {
    /// The user (`sasl_username` as recorded).
    pub user: String,
    /// Messages accepted at END-OF-MESSAGE in the whole replay.
    pub accepted: u64,
    /// Requests refused (or, with warn, that would have been).
    pub refused: u64,
    /// The first refusal, if any.
    pub first_refusal: Option<FirstRefusal>,
}

/// When and why a user was first refused.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct FirstRefusal {
    /// When (ms since the epoch).
    pub at: u64,
    /// The same, RFC 3339.
    pub time: String,
    /// `limit`, `networks` or `baseline`.
    pub signal: Option<&'static str>,
    /// The limit or signal as incidents name it (`100/1h`, `baseline10/1h`).
    pub limit: Option<String>,
    /// The answer (`HOLD`, `DEFER_IF_PERMIT`, ...; `DUNNO` for a warn).
    pub action: String,
    /// Messages of the user accepted before it.
    pub accepted_before: u64,
}

/// The per-user report, users in name order.
pub fn users(report: &Report) -> Vec<UserReport> {
    let mut by: BTreeMap<&str, UserReport> = BTreeMap::new();
    for r in &report.requests {
        let Some(user) = r.user.as_deref() else {
            continue;
        };
        let u = by.entry(user).or_insert_with(|| UserReport {
            user: user.to_string(),
            accepted: 0,
            refused: 0,
            first_refusal: None,
        });
        if r.refused {
            u.refused += 1;
            if u.first_refusal.is_none() {
                u.first_refusal = Some(FirstRefusal {
                    at: r.ts,
                    time: crate::template::rfc3339(r.ts),
                    signal: r.signal,
                    limit: r.limit.clone(),
                    action: r.action.clone(),
                    accepted_before: u.accepted,
                });
            }
        }
        if r.accepted {
            u.accepted += 1;
        }
    }
    by.into_values().collect()
}

/// The report as one JSON document: the requests replayed, the incidents, and per
/// user the messages accepted and the first refusal (when, by what, and how many
/// messages were accepted before it).
pub fn render_json(report: &Report, config: &str) -> String {
    let incidents: Vec<serde_json::Value> = report
        .incidents
        .iter()
        .map(|t| {
            let i = &t.incident;
            serde_json::json!({
                "at": t.at,
                "user": i.key,
                "tier": i.tier,
                "limit": i.limit,
                "used": i.used,
                "dry_run": i.dry_run,
                "action": i.action,
                "clears_at": i.clears_at,
                "detail": i.detail,
            })
        })
        .collect();
    let doc = serde_json::json!({
        "config": config,
        "requests": report.requests.len(),
        "from": report.requests.first().map(|r| r.ts),
        "to": report.requests.last().map(|r| r.ts),
        "bad_lines": report.bad_lines.len(),
        "refused": report.refused().count(),
        "differences": report.differences(),
        "incidents": incidents,
        "users": users(report),
    });
    let mut s = doc.to_string();
    s.push('\n');
    s
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
