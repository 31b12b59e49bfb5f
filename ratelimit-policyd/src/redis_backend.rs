//! Connecting the Redis store (when built with the `redis` feature).

use std::sync::Arc;

use ratelimit_core::Store;

use crate::config::Backend;
use crate::daemon::StartError;

/// Connects the Redis store described by `backend`.
pub fn connect(backend: &Backend) -> Result<Arc<dyn Store>, StartError> {
    let _ = backend;
    Err(StartError::Store(
        "this build has no Redis support (build with the \"redis\" feature)".into(),
    ))
}
