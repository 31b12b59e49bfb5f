//! `tier USER TIER`: move a user to another tier now, persisted in the overrides file
//! so the move survives restarts and reloads. What the user has already sent is kept.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::context::Context;
use crate::escape::Escaped;
use crate::policy::Policy;

/// `{"cmd":"tier","user":"alice@example.com","tier":"bulk"}`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetTier {
    /// The user (or `@domain`).
    pub user: String,
    /// A tier defined in the configuration.
    pub tier: String,
}

/// The reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TierReply {
    /// The normalized user.
    pub user: String,
    /// Its tier now.
    pub tier: String,
    /// Its tier before.
    pub previous: String,
    /// The overrides file written.
    pub persisted_in: String,
}

impl SetTier {
    /// Persists, then applies to the running configuration.
    pub async fn apply(self, ctx: &Context) -> Result<TierReply, String> {
        let key = crate::key::from_text(&self.user);
        if key.is_empty() || key == "@" {
            return Err("tier needs a user (or @domain) and a tier".into());
        }
        // The move is persisted as a `user tier` line: refuse what the file cannot hold.
        super::overrides::check_user(&key)?;
        let policy = Arc::clone(&ctx.view.policy);
        let tier = self.tier.trim().to_string();
        super::context::blocking(move || set(&policy, &key, &tier)).await?
    }
}

fn set(policy: &Policy, key: &str, tier: &str) -> Result<TierReply, String> {
    // Held across write and swap, and by reload, so neither loses the other's change.
    let _guard = super::overrides::lock();
    let cfg = policy.config();
    if cfg.tiers.map.get(tier).is_none() {
        let mut names: Vec<&str> = cfg.tiers.map.tiers().map(|t| t.name()).collect();
        names.sort_unstable();
        return Err(format!(
            "no tier is called \"{tier}\" (tiers: {})",
            names.join(", ")
        ));
    }
    let previous = cfg.tiers.map.tier_of(key).name().to_string();
    let path = &cfg.ops.admin.tier_overrides;
    super::overrides::set(path, key, tier).map_err(|e| {
        format!(
            "cannot persist to {}: {e} (nothing changed)",
            path.display()
        )
    })?;
    let mut new = (*cfg).clone();
    new.tiers.map.assign(key, tier).map_err(|e| e.to_string())?;
    policy.set_config(new);
    tracing::info!(user = %key, tier, previous = %previous, "admin: tier changed");
    Ok(TierReply {
        user: key.to_string(),
        tier: tier.to_string(),
        previous,
        persisted_in: path.display().to_string(),
    })
}

/// Text for the CLI.
pub fn render(r: &TierReply) -> String {
    format!(
        "{}: tier {} (was {}); saved in {}\n",
        Escaped(&r.user),
        Escaped(&r.tier),
        Escaped(&r.previous),
        Escaped(&r.persisted_in)
    )
}
