//! The admin interface: a Unix socket (mode 0600) speaking one JSON object per line,
//! and the `ratelimit-policyd admin ...` commands that use it.
//!
//! Request: `{"cmd":"show","user":"alice@example.com"}`. Reply, one line:
//! `{"ok":true,"result":{...}}` or `{"ok":false,"error":"..."}`. A request that is
//! not understood (bad JSON, unknown command, missing field) gets an error reply and
//! the connection stays open for the next one.
//!
//! One command per file, behind [`Command`]:
//! [`show`] (tier, usage per limit, retry time), [`reset`] (unblock), [`tier`] (move a
//! user at runtime, persisted in [`overrides`]), [`top`] (heaviest senders now),
//! [`stats`], [`reload`]. [`client`] is the CLI side.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;

pub mod client;
mod context;
pub mod overrides;
pub mod reload;
pub mod reset;
pub mod show;
pub mod stats;
pub mod tier;
pub mod top;

pub use context::{Context, ReloadFn};

/// One admin request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "lowercase")]
pub enum Command {
    /// A user's tier, usage per limit and retry time.
    Show(show::Show),
    /// Forget a user's counters (unblock).
    Reset(reset::Reset),
    /// Move a user to a tier, persistently.
    Tier(tier::SetTier),
    /// The heaviest senders now.
    Top(top::Top),
    /// Request, decision and connection counters.
    Stats(stats::Stats),
    /// Re-read the configuration.
    Reload(reload::Reload),
}

/// The reply line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    /// Whether the command succeeded.
    pub ok: bool,
    /// What it returned (command-specific).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Reply {
    fn ok(result: serde_json::Value) -> Reply {
        Reply {
            ok: true,
            result: Some(result),
            error: None,
        }
    }

    fn err(error: impl Into<String>) -> Reply {
        Reply {
            ok: false,
            result: None,
            error: Some(error.into()),
        }
    }
}

fn json<T: Serialize>(r: Result<T, String>) -> Reply {
    match r.and_then(|v| serde_json::to_value(v).map_err(|e| e.to_string())) {
        Ok(v) => Reply::ok(v),
        Err(e) => Reply::err(e),
    }
}

/// Runs one command.
pub async fn execute(cmd: Command, ctx: &Context) -> Reply {
    match cmd {
        Command::Show(c) => json(c.apply(ctx).await),
        Command::Reset(c) => json(c.apply(ctx).await),
        Command::Tier(c) => json(c.apply(ctx).await),
        Command::Top(c) => json(c.apply(ctx).await),
        Command::Stats(c) => json(c.apply(ctx)),
        Command::Reload(c) => json(c.apply(ctx).await),
    }
}

/// Human-readable text of a successful reply to `cmd`.
pub fn render(cmd: &Command, result: serde_json::Value) -> Result<String, String> {
    fn typed<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> Result<T, String> {
        serde_json::from_value(v).map_err(|e| format!("unexpected reply: {e}"))
    }
    Ok(match cmd {
        Command::Show(_) => show::render(&typed(result)?),
        Command::Reset(_) => reset::render(&typed(result)?),
        Command::Tier(_) => tier::render(&typed(result)?),
        Command::Top(_) => top::render(&typed(result)?),
        Command::Stats(_) => stats::render(&typed(result)?),
        Command::Reload(_) => reload::render(&typed(result)?),
    })
}

/// Runs one request line.
pub async fn handle_line(line: &[u8], ctx: &Context) -> Reply {
    let line = line.trim_ascii();
    if line.is_empty() {
        return Reply::err(
            "empty request: send one JSON object per line, e.g. {\"cmd\":\"stats\"}",
        );
    }
    match serde_json::from_slice::<Command>(line) {
        Ok(cmd) => execute(cmd, ctx).await,
        Err(e) => Reply::err(format!(
            "bad request: {e} (commands: show, reset, tier, top, stats, reload)"
        )),
    }
}

/// Longest request line.
pub const MAX_LINE: usize = 64 * 1024;
/// An admin connection idle this long is closed.
const IDLE: Duration = Duration::from_secs(300);

/// Binds the admin socket at `path`, mode 0600. Creates a missing parent directory
/// (mode 0700); replaces a stale socket, but not one another server still answers on.
pub fn bind(path: &Path) -> io::Result<UnixListener> {
    use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
        && !dir.exists()
    {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    if let Ok(meta) = std::fs::symlink_metadata(path)
        && meta.file_type().is_socket()
    {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                "another server is answering on this socket",
            ));
        }
        std::fs::remove_file(path)?;
    }
    // Until the chmod, the socket has the umask's mode; connecting needs write
    // permission, which the usual umasks (022, 027, 077) do not give others.
    let l = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

/// Serves the admin socket until `stop`, then removes it.
pub async fn serve(
    listener: UnixListener,
    path: PathBuf,
    ctx: Context,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = stop.wait_for(|s| *s) => break,
        };
        match accepted {
            Ok((stream, _)) => {
                tokio::spawn(connection(stream, ctx.clone()));
            }
            Err(e) => {
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    let _ = std::fs::remove_file(&path);
}

async fn connection(stream: UnixStream, ctx: Context) {
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    let mut line = Vec::new();
    loop {
        line.clear();
        let limit = u64::try_from(MAX_LINE + 1).unwrap_or(u64::MAX);
        let mut bounded = (&mut r).take(limit);
        let read = tokio::time::timeout(IDLE, bounded.read_until(b'\n', &mut line));
        match read.await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return,
            Ok(Ok(_)) => {}
        }
        let too_long = line.len() > MAX_LINE && !line.ends_with(b"\n");
        let reply = if too_long {
            Reply::err(format!("request longer than {MAX_LINE} bytes"))
        } else {
            handle_line(&line, &ctx).await
        };
        let mut out = serde_json::to_vec(&reply)
            .unwrap_or_else(|_| br#"{"ok":false,"error":"reply could not be encoded"}"#.to_vec());
        out.push(b'\n');
        if w.write_all(&out).await.is_err() || too_long {
            return;
        }
    }
}
