//! The CLI side of the admin socket: send one command, print the reply.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use super::{Command, Reply};

/// Longest the CLI waits for a reply (`top` over Redis scans every key).
pub const TIMEOUT: Duration = Duration::from_secs(60);

/// Sends `cmd` to the server at `socket` and returns its reply.
pub fn call(socket: &Path, cmd: &Command) -> Result<Reply, String> {
    let fail = |what: &str, e: std::io::Error| format!("{what} {}: {e}", socket.display());
    let mut stream = UnixStream::connect(socket).map_err(|e| {
        fail("cannot connect to the admin socket", e)
            + " (is the server running? is [admin] socket the same? try --socket PATH)"
    })?;
    stream
        .set_read_timeout(Some(TIMEOUT))
        .map_err(|e| fail("admin socket", e))?;
    let mut line = serde_json::to_vec(cmd).map_err(|e| e.to_string())?;
    line.push(b'\n');
    stream
        .write_all(&line)
        .map_err(|e| fail("cannot write to", e))?;
    let mut reply = String::new();
    BufReader::new(&stream)
        .read_line(&mut reply)
        .map_err(|e| fail("no reply from", e))?;
    if reply.is_empty() {
        return Err(format!("{} closed the connection", socket.display()));
    }
    serde_json::from_str(&reply).map_err(|e| format!("unexpected reply: {e}"))
}

/// Runs `cmd` and gives the text to print (or the error): the reply as JSON when
/// `json`, else human-readable.
pub fn run(socket: &Path, cmd: &Command, json: bool) -> Result<String, String> {
    let reply = call(socket, cmd)?;
    if !reply.ok {
        // The error may quote what was sent (a user, a tier): printed, so escaped.
        let error = reply.error.unwrap_or_else(|| "failed".into());
        return Err(crate::escape::escape(&error).into_owned());
    }
    let result = reply.result.unwrap_or(serde_json::Value::Null);
    if json {
        return serde_json::to_string_pretty(&result)
            .map(|s| s + "\n")
            .map_err(|e| e.to_string());
    }
    super::render(cmd, result)
}
