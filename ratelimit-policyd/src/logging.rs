//! Where the daemon's log lines go (`[server] log_target`): journald under systemd,
//! syslog with facility `mail` (so that incidents land in `mail.log` beside
//! Postfix's lines), or stderr, as text or JSON (`log_format`) for development.
//!
//! Every target keeps one priority per level ([`severity`]); an incident is logged
//! at WARN, so it is a `warning` in journald and in syslog. `RATELIMIT_LOG` filters
//! the levels (`info` unless set), whatever the target.
//!
//! The target is chosen once, at start: a reload does not move the logs.

use std::ffi::OsStr;
use std::io;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use tracing::{Level, Metadata};
use tracing_journald::{Priority, PriorityMappings};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry};

use crate::config::{LogTarget, ServerConfig};
use crate::escape::TextFields;
use crate::template::rfc3339;

/// The program name in every line: journald's `SYSLOG_IDENTIFIER`, syslog's tag.
pub const IDENTIFIER: &str = "ratelimit-policyd";

/// Syslog facility `mail` (RFC 5424, 6.2.1): Postfix's, so `mail.log` has both.
pub const FACILITY_MAIL: u8 = 2;

/// The longest syslog datagram sent; a longer line is cut (rsyslog's default
/// `maxMessageSize` is 8 KiB too).
pub const MAX_DATAGRAM: usize = 8192;

/// The syslog severity of a level (RFC 5424): ERROR is `err` (3), WARN `warning`
/// (4, incidents), INFO `info` (6), DEBUG and TRACE `debug` (7). journald gets the
/// same ([`journald_priorities`]).
pub fn severity(level: Level) -> u8 {
    match level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        Level::DEBUG | Level::TRACE => 7,
    }
}

/// The syslog priority of a level with facility `mail`: `facility * 8 + severity`,
/// the `<PRI>` a syslog line starts with (an incident: `<20>`).
pub fn priority(level: Level) -> u8 {
    FACILITY_MAIL * 8 + severity(level)
}

/// [`severity`] as `tracing-journald` takes it (its own default makes INFO a
/// `notice` and DEBUG `info`).
pub fn journald_priorities() -> PriorityMappings {
    PriorityMappings {
        error: Priority::Error,
        warn: Priority::Warning,
        info: Priority::Informational,
        debug: Priority::Debug,
        trace: Priority::Debug,
    }
}

/// `target` made concrete: [`LogTarget::Auto`] is journald when `journal_stream`
/// (`$JOURNAL_STREAM`, `device:inode` as systemd sets it) names the stream that
/// stderr is (`stderr_id`), stderr otherwise (a shell started under systemd
/// inherits the variable with another stderr).
pub fn resolve(
    target: LogTarget,
    journal_stream: Option<&OsStr>,
    stderr_id: Option<(u64, u64)>,
) -> LogTarget {
    if target != LogTarget::Auto {
        return target;
    }
    let named = journal_stream
        .and_then(OsStr::to_str)
        .and_then(|s| s.split_once(':'))
        .and_then(|(dev, ino)| Some((dev.parse::<u64>().ok()?, ino.parse::<u64>().ok()?)));
    match (named, stderr_id) {
        (Some(named), Some(id)) if named == id => LogTarget::Journald,
        _ => LogTarget::Stderr,
    }
}

/// The device and inode of this process's stderr.
fn stderr_id() -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata("/proc/self/fd/2").ok()?;
    Some((m.dev(), m.ino()))
}

/// Installs the global subscriber for `server`'s log target and format, filtered by
/// `RATELIMIT_LOG`. When journald or the syslog socket cannot be opened, logs to
/// stderr instead and says why there (at WARN). Does nothing when a subscriber is
/// already installed.
pub fn init(server: &ServerConfig) {
    let target = resolve(
        server.log_target,
        std::env::var_os("JOURNAL_STREAM").as_deref(),
        stderr_id(),
    );
    let fallback = match target {
        LogTarget::Journald => match tracing_journald::layer() {
            Ok(layer) => {
                let _ = Registry::default()
                    .with(filter())
                    .with(
                        layer
                            .with_syslog_identifier(IDENTIFIER.to_string())
                            .with_priority_mappings(journald_priorities()),
                    )
                    .try_init();
                return;
            }
            Err(e) => format!("cannot log to journald ({e}); logging to stderr"),
        },
        LogTarget::Syslog => match Syslog::connect(&server.syslog_socket) {
            Ok(syslog) => {
                init_fmt(server.log_json, syslog, false, false);
                return;
            }
            Err(e) => format!(
                "cannot log to syslog at {} ({e}); logging to stderr",
                server.syslog_socket.display()
            ),
        },
        LogTarget::Auto | LogTarget::Stderr => String::new(),
    };
    // Colours only on a terminal: a log file gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    init_fmt(server.log_json, std::io::stderr, ansi, true);
    if !fallback.is_empty() {
        tracing::warn!("{fallback}");
    }
}

fn filter() -> EnvFilter {
    EnvFilter::try_from_env("RATELIMIT_LOG").unwrap_or_else(|_| EnvFilter::new("info"))
}

/// A `fmt` subscriber writing to `writer`; `time`: with a timestamp of its own (a
/// syslog line has one in its header).
fn init_fmt<W>(json: bool, writer: W, ansi: bool, time: bool)
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter())
        .with_writer(writer)
        .with_ansi(ansi);
    // Text lines escape control characters in every field (a user name with a CR
    // cannot forge a line); JSON escapes them by itself and keeps the original.
    let _ = match (json, time) {
        (false, true) => builder.fmt_fields(TextFields).try_init(),
        (true, true) => builder.json().try_init(),
        (false, false) => builder.without_time().fmt_fields(TextFields).try_init(),
        (true, false) => builder.without_time().json().try_init(),
    };
}

/// A syslog client over a local datagram socket (`/dev/log`): one datagram per
/// line, RFC 3164 as the C library's `syslog()` writes it,
/// `<PRI>Mmm dd hh:mm:ss ratelimit-policyd[pid]: line`, facility `mail` and the
/// priority of the line's level ([`priority`]).
///
/// The timestamp is UTC; the local syslog daemons (rsyslog, syslog-ng, journald)
/// stamp a local socket's lines with their own reception time anyway. When the
/// daemon restarted (a send fails), the socket is connected again and the line
/// sent once more; a line that still cannot be sent is dropped: logging never
/// stops mail.
#[derive(Clone)]
pub struct Syslog {
    path: PathBuf,
    socket: Arc<ArcSwap<UnixDatagram>>,
    pid: u32,
}

impl Syslog {
    /// Connects to the syslog socket at `path`.
    pub fn connect(path: &Path) -> io::Result<Syslog> {
        Ok(Syslog {
            path: path.to_path_buf(),
            socket: Arc::new(ArcSwap::from_pointee(open(path)?)),
            pid: std::process::id(),
        })
    }

    /// Sends one line at `level` (a trailing newline is dropped).
    pub fn send(&self, level: Level, line: &[u8]) {
        let datagram = self.datagram(level, line, now_ms());
        if self.socket.load().send(&datagram).is_err()
            && let Ok(socket) = open(&self.path)
        {
            let _ = socket.send(&datagram);
            self.socket.store(Arc::new(socket));
        }
    }

    /// The datagram of one line at `level` at `ms` since the epoch.
    fn datagram(&self, level: Level, line: &[u8], ms: u64) -> Vec<u8> {
        let line = line.strip_suffix(b"\n").unwrap_or(line);
        let mut out = format!(
            "<{}>{} {IDENTIFIER}[{}]: ",
            priority(level),
            rfc3164_time(ms),
            self.pid
        )
        .into_bytes();
        let room = MAX_DATAGRAM.saturating_sub(out.len());
        out.extend_from_slice(&line[..line.len().min(room)]);
        out
    }
}

fn open(path: &Path) -> io::Result<UnixDatagram> {
    let socket = UnixDatagram::unbound()?;
    socket.connect(path)?;
    Ok(socket)
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// `Nov 14 22:00:00` (RFC 3164: the day padded with a space, no year).
fn rfc3164_time(ms: u64) -> String {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    // 2024-05-01T10:00:00Z
    let iso = rfc3339(ms);
    let month: usize = iso[5..7].parse().unwrap_or(1);
    let day: u32 = iso[8..10].parse().unwrap_or(1);
    format!(
        "{} {day:>2} {}",
        MONTHS[month.clamp(1, 12) - 1],
        &iso[11..19]
    )
}

/// One line being formatted, sent as one datagram when dropped.
pub struct SyslogLine<'a> {
    syslog: &'a Syslog,
    level: Level,
    buf: Vec<u8>,
}

impl io::Write for SyslogLine<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for SyslogLine<'_> {
    fn drop(&mut self) {
        if !self.buf.is_empty() {
            self.syslog.send(self.level, &self.buf);
        }
    }
}

impl<'a> MakeWriter<'a> for Syslog {
    type Writer = SyslogLine<'a>;

    fn make_writer(&'a self) -> SyslogLine<'a> {
        SyslogLine {
            syslog: self,
            level: Level::INFO,
            buf: Vec::new(),
        }
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> SyslogLine<'a> {
        SyslogLine {
            syslog: self,
            level: *meta.level(),
            buf: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_level_has_its_syslog_severity_and_incidents_are_warnings() {
        let table = [
            (Level::ERROR, 3, 19),
            (Level::WARN, 4, 20),
            (Level::INFO, 6, 22),
            (Level::DEBUG, 7, 23),
            (Level::TRACE, 7, 23),
        ];
        for (level, sev, pri) in table {
            assert_eq!(severity(level), sev, "{level}");
            assert_eq!(priority(level), pri, "{level}");
        }
        let j = journald_priorities();
        let journald = [
            (Level::ERROR, j.error),
            (Level::WARN, j.warn),
            (Level::INFO, j.info),
            (Level::DEBUG, j.debug),
            (Level::TRACE, j.trace),
        ];
        for (level, p) in journald {
            assert_eq!(p as u8 - b'0', severity(level), "journald, {level}");
        }
    }

    #[test]
    fn a_datagram_is_an_rfc3164_line_with_priority_time_tag_and_pid() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let _server = UnixDatagram::bind(&path).unwrap();
        let syslog = Syslog::connect(&path).unwrap();
        // 2023-11-04T08:05:09Z
        let ms = 1_699_085_109_000;
        let d = syslog.datagram(Level::WARN, b"incident: user over limit\n", ms);
        assert_eq!(
            String::from_utf8(d).unwrap(),
            format!(
                "<20>Nov  4 08:05:09 ratelimit-policyd[{}]: incident: user over limit",
                std::process::id()
            )
        );
        let long = vec![b'x'; 2 * MAX_DATAGRAM];
        assert_eq!(syslog.datagram(Level::ERROR, &long, ms).len(), MAX_DATAGRAM);
    }

    #[test]
    fn auto_is_journald_only_when_stderr_is_the_journal_stream() {
        let stream = Some(OsStr::new("8:12345"));
        assert_eq!(
            resolve(LogTarget::Auto, stream, Some((8, 12345))),
            LogTarget::Journald
        );
        assert_eq!(
            resolve(LogTarget::Auto, stream, Some((8, 999))),
            LogTarget::Stderr
        );
        assert_eq!(
            resolve(LogTarget::Auto, None, Some((8, 12345))),
            LogTarget::Stderr
        );
        assert_eq!(
            resolve(LogTarget::Auto, Some(OsStr::new("junk")), Some((8, 12345))),
            LogTarget::Stderr
        );
        for explicit in [LogTarget::Stderr, LogTarget::Journald, LogTarget::Syslog] {
            assert_eq!(resolve(explicit, stream, Some((8, 12345))), explicit);
        }
    }
}
