//! `reload`: re-read the configuration (and the tier overrides), as SIGHUP does. An
//! invalid file is reported and the running configuration kept.

use serde::{Deserialize, Serialize};

use super::context::Context;
use crate::escape::Escaped;

/// `{"cmd":"reload"}`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Reload {}

/// The reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReloadReply {
    /// What was loaded.
    pub message: String,
}

impl Reload {
    /// Reloads as the daemon does on SIGHUP, and says what was loaded or why not.
    pub async fn apply(self, ctx: &Context) -> Result<ReloadReply, String> {
        let Some(reload) = ctx.reload.clone() else {
            return Err("this server has no configuration file to reload".into());
        };
        let message = super::context::blocking(move || reload()).await??;
        Ok(ReloadReply { message })
    }
}

/// Text for the CLI.
pub fn render(r: &ReloadReply) -> String {
    format!("{}\n", Escaped(&r.message))
}
