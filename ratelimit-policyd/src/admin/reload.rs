//! `reload`: re-read the configuration (and the tier overrides), as SIGHUP does. An
//! invalid file is reported and the running configuration kept.

use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::policy::Engine;

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
    /// Reloads through the daemon's hook; without one (an embedded server), from the
    /// file the configuration came from.
    pub async fn apply(self, engine: &Arc<Engine>) -> Result<ReloadReply, String> {
        let e = Arc::clone(engine);
        let message = super::blocking(move || match e.ops.reload_hook() {
            Some(hook) => hook(&e),
            None => {
                let source = e.config().source.clone();
                let path = Path::new(&source);
                if !path.is_file() {
                    return Err(format!(
                        "the configuration came from {source}, not a file: nothing to reload"
                    ));
                }
                crate::daemon::try_reload(&e, Some(path), &[]).map_err(|e| e.to_string())
            }
        })
        .await??;
        Ok(ReloadReply { message })
    }
}

/// Text for the CLI.
pub fn render(r: &ReloadReply) -> String {
    format!("{}\n", r.message)
}
