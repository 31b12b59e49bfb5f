//! `show USER`: the user's tier, usage of each limit, and whether (and until when) the
//! next message would be refused.

use std::fmt::Write;
use std::sync::Arc;
use std::time::Duration;

use ratelimit_core::{Cost, Mode};
use serde::{Deserialize, Serialize};

use super::context::Context;
use crate::backend::CallBounds;
use crate::escape::{Escaped, escape};
use crate::policy::keying::is_exempt_user;
use crate::template::{Approx, rfc3339};

/// How long `show` waits for a store on the network.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(5);

/// `{"cmd":"show","user":"alice@example.com"}`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Show {
    /// The user (normalized as keys are: trimmed, lowercased).
    pub user: String,
}

/// One limit of the user's tier.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LimitUsage {
    /// As written (`100/1h`).
    pub limit: String,
    /// Counted in the window now.
    pub used: u64,
    /// Left before refusals.
    pub remaining: u64,
    /// This limit is what refuses the next message.
    pub refusing: bool,
}

/// The reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShowReply {
    /// The normalized user.
    pub user: String,
    /// Its tier now.
    pub tier: String,
    /// Never limited (`[exempt] users` or domain).
    pub exempt: bool,
    /// Usage per limit (empty: unlimited tier).
    pub limits: Vec<LimitUsage>,
    /// The next message (one recipient) would be refused.
    pub blocked: bool,
    /// When it would be admitted again, in seconds (`None`: not blocked, or never).
    pub retry_after_secs: Option<u64>,
    /// The same as a time (RFC 3339).
    pub retry_at: Option<String>,
    /// Last client addresses seen, most recent first.
    pub clients: Vec<String>,
    /// The user's baseline, when the baseline signal judges them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline: Option<BaselineShow>,
}

/// A user's baseline in `show`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaselineShow {
    /// Messages accepted in the last hour.
    pub hour: u32,
    /// The usual busiest hour, in messages (one decimal).
    pub usual: String,
    /// Today's busiest hour so far.
    pub today_max: u32,
    /// Whole days of history.
    pub learned_days: u64,
    /// The threshold (`None`: still learning, not judged).
    pub threshold: Option<u32>,
    /// The next message would be flagged.
    pub flagged: bool,
}

impl Show {
    /// Peeks the user's counters (nothing is recorded).
    pub async fn apply(self, ctx: &Context) -> Result<ShowReply, String> {
        let policy = &ctx.view.policy;
        let key = crate::key::from_text(&self.user);
        if key.is_empty() {
            return Err("show needs a user".into());
        }
        let cfg = policy.config();
        let tier = Arc::clone(cfg.tiers.map.tier_of(&key));
        let exempt = is_exempt_user(&cfg, &key);
        let now = policy.now();
        let decision = policy
            .backend()
            .check(
                &key,
                &tier,
                Cost::message(1, 0),
                now,
                Mode::Peek,
                CallBounds {
                    timeout: ADMIN_TIMEOUT,
                    max_in_flight: cfg.server.max_store_calls_in_flight,
                },
            )
            .await
            .map_err(|e| e.to_string())?;
        let denial = decision.denial();
        let limits = tier
            .limits()
            .iter()
            .enumerate()
            .map(|(i, l)| {
                let s = decision.statuses().get(i).copied().unwrap_or_default();
                LimitUsage {
                    limit: l.to_string(),
                    used: s.used,
                    remaining: s.remaining,
                    refusing: denial.is_some_and(|d| d.limit == i),
                }
            })
            .collect();
        let retry = denial.and_then(|d| d.retry_after);
        let p = Arc::clone(policy);
        let k = key.clone();
        let baseline = super::context::blocking(move || p.baseline_of(&k))
            .await?
            .map_err(|e| e.to_string())?
            .map(|j| BaselineShow {
                hour: j.hour,
                usual: format!("{:.1}", j.usual_messages()),
                today_max: j.day_max,
                learned_days: j.learned_days(),
                threshold: j.threshold,
                flagged: j.flagged,
            });
        Ok(ShowReply {
            user: key.clone(),
            tier: tier.name().to_string(),
            exempt,
            limits,
            blocked: denial.is_some(),
            retry_after_secs: retry.map(|r| r.as_millis().div_ceil(1000) as u64),
            retry_at: retry.map(|r| rfc3339(now.saturating_add(r).as_millis())),
            clients: policy
                .clients()
                .get(&key)
                .iter()
                .map(|c| c.to_string())
                .collect(),
            baseline,
        })
    }
}

/// Text for the CLI.
pub fn render(r: &ShowReply) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "user:    {}", Escaped(&r.user));
    let _ = writeln!(
        s,
        "tier:    {}{}",
        Escaped(&r.tier),
        if r.exempt {
            " (exempt: never limited)"
        } else {
            ""
        }
    );
    if r.limits.is_empty() {
        let _ = writeln!(s, "limits:  none (unlimited tier)");
    }
    for l in &r.limits {
        let _ = writeln!(
            s,
            "limit:   {:<12} used {:>8}  remaining {:>8}{}",
            escape(&l.limit),
            l.used,
            l.remaining,
            if l.refusing { "  <- refusing" } else { "" }
        );
    }
    let status = match (r.blocked, r.retry_after_secs, &r.retry_at) {
        (false, _, _) => "ok (the next message would be accepted)".to_string(),
        (true, Some(secs), Some(at)) => format!(
            "BLOCKED: retry in {} (at {})",
            Approx(Duration::from_secs(secs)),
            Escaped(at)
        ),
        (true, _, _) => "BLOCKED".to_string(),
    };
    let _ = writeln!(s, "status:  {status}");
    if !r.clients.is_empty() {
        let _ = writeln!(s, "clients: {}", Escaped(&r.clients.join(" ")));
    }
    if let Some(b) = &r.baseline {
        let judged = match b.threshold {
            Some(t) => format!("flagged above {t}"),
            None => "learning, not judged yet".to_string(),
        };
        let _ = writeln!(
            s,
            "baseline: {} in the last hour, usual busiest hour {} (learned over {} days, today's busiest {}); {judged}{}",
            b.hour,
            Escaped(&b.usual),
            b.learned_days,
            b.today_max,
            if b.flagged { "  <- FLAGGED" } else { "" }
        );
    }
    s
}
