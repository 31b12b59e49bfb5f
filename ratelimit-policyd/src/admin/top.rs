//! `top [N]`: the heaviest senders now, by use of their tier's first limit.

use serde::{Deserialize, Serialize};
use std::fmt::Write;

use super::context::Context;
use crate::escape::escape;

/// Default number of senders.
pub const DEFAULT_N: usize = 10;
/// Most senders returned.
pub const MAX_N: usize = 1000;

/// `{"cmd":"top","n":10}`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Top {
    /// How many (default 10, at most 1000).
    #[serde(default)]
    pub n: Option<usize>,
}

/// One sender.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sender {
    /// The user.
    pub user: String,
    /// Its tier.
    pub tier: String,
    /// Used of the first limit.
    pub used: u64,
    /// The first limit's count.
    pub limit: u64,
}

/// The reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopReply {
    /// Heaviest first.
    pub senders: Vec<Sender>,
}

impl Top {
    /// Scans the counters (one shard lock at a time; Redis: SCAN).
    pub async fn apply(self, ctx: &Context) -> Result<TopReply, String> {
        let n = self.n.unwrap_or(DEFAULT_N).clamp(1, MAX_N);
        let policy = std::sync::Arc::clone(&ctx.view.policy);
        let top = super::context::blocking(move || policy.top_senders(n))
            .await?
            .map_err(|e| e.to_string())?;
        Ok(TopReply {
            senders: top
                .into_iter()
                .map(|(user, tier, used, limit)| Sender {
                    user,
                    tier,
                    used,
                    limit,
                })
                .collect(),
        })
    }
}

/// Text for the CLI.
pub fn render(r: &TopReply) -> String {
    if r.senders.is_empty() {
        return "no mail counted in the current windows\n".into();
    }
    let mut s = String::new();
    let rows: Vec<_> = r
        .senders
        .iter()
        .map(|x| (escape(&x.user), escape(&x.tier), x.used, x.limit))
        .collect();
    let w = rows
        .iter()
        .map(|(user, ..)| user.chars().count())
        .max()
        .unwrap_or(4)
        .max(4);
    let _ = writeln!(s, "{:<w$}  {:<12} {:>8} / LIMIT", "USER", "TIER", "USED");
    for (user, tier, used, limit) in &rows {
        let _ = writeln!(s, "{user:<w$}  {tier:<12} {used:>8} / {limit}");
    }
    s
}
