//! `reset USER`: forget the user's counters, open incidents and baseline flag
//! (unblock); `reset --baseline USER` also forgets the user's baseline history.

use serde::{Deserialize, Serialize};

use super::context::Context;
use crate::escape::Escaped;

/// `{"cmd":"reset","user":"alice@example.com"}` (`"baseline":true` to forget the
/// baseline history too)
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reset {
    /// The user.
    pub user: String,
    /// Also forget the user's baseline history.
    #[serde(default)]
    pub baseline: bool,
}

/// The reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResetReply {
    /// The normalized user.
    pub user: String,
    /// Whether anything was recorded for the user.
    pub had_counters: bool,
    /// Whether a baseline history was forgotten (`--baseline`).
    #[serde(default)]
    pub forgot_baseline: bool,
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
        let baseline = self.baseline;
        let (had, forgot) = super::context::blocking(move || {
            let had = policy.forget(&k)?;
            let forgot = baseline && policy.forget_baseline(&k)?;
            Ok::<_, ratelimit_core::StoreError>((had, forgot))
        })
        .await?
        .map_err(|e| e.to_string())?;
        tracing::info!(user = %key, had_counters = had, forgot_baseline = forgot, "admin: counters reset");
        Ok(ResetReply {
            user: key,
            had_counters: had,
            forgot_baseline: forgot,
        })
    }
}

/// Text for the CLI.
pub fn render(r: &ResetReply) -> String {
    let mut s = if r.had_counters {
        format!("{}: counters reset (unblocked)\n", Escaped(&r.user))
    } else {
        format!("{}: nothing was recorded\n", Escaped(&r.user))
    };
    if r.forgot_baseline {
        s.push_str(&format!(
            "{}: baseline history forgotten (learning again)\n",
            Escaped(&r.user)
        ));
    }
    s
}
