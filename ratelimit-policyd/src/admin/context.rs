//! What the admin commands act on, shared by every command.

use std::sync::Arc;

use crate::ops::View;

/// Re-reads the configuration (`admin reload`); returns a summary or why not.
pub type ReloadFn = Arc<dyn Fn() -> Result<String, String> + Send + Sync>;

/// What the admin commands act on: what the operations endpoints see, and the
/// daemon's reload.
#[derive(Clone)]
pub struct Context {
    /// The policy, the server's and the operations' counts.
    pub view: View,
    /// What `reload` does (`None`: an embedding without a configuration file).
    pub reload: Option<ReloadFn>,
}

/// Runs blocking store work (Redis, scans) off the async threads.
pub(super) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, String> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| format!("admin task failed: {e}"))
}
