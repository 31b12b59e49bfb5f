//! `reset USER`: forget the user's counters and open incidents (unblock).

use serde::{Deserialize, Serialize};

use super::context::Context;
use crate::escape::Escaped;

/// `{"cmd":"reset","user":"alice@example.com"}`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reset {
    /// The user.
    pub user: String,
}

/// The reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResetReply {
    /// The normalized user.
    pub user: String,
    /// Whether anything was recorded for the user.
    pub had_counters: bool,
}

impl Reset {
    /// Resets the user.
    pub async fn apply(self, ctx: &Context) -> Result<ResetReply, String> {
        let key = crate::key::from_text(&self.user);
        if key.is_empty() {
            return Err("reset needs a user".into());
        }
        let policy = std::sync::Arc::clone(&ctx.view.policy);
        let k = key.clone();
        let had = super::context::blocking(move || policy.forget(&k))
            .await?
            .map_err(|e| e.to_string())?;
        tracing::info!(user = %key, had_counters = had, "admin: counters reset");
        Ok(ResetReply {
            user: key,
            had_counters: had,
        })
    }
}

/// Text for the CLI.
pub fn render(r: &ResetReply) -> String {
    if r.had_counters {
        format!("{}: counters reset (unblocked)\n", Escaped(&r.user))
    } else {
        format!("{}: nothing was recorded\n", Escaped(&r.user))
    }
}
