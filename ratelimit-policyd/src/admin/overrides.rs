//! Tier moves made with `admin tier`, kept in a file so they survive restarts and
//! reloads: `user tier` per line (the format of `assign_file`), written atomically
//! (temporary file, fsync, rename). Applied on top of the configured assignments
//! whenever the configuration is loaded (start, SIGHUP, `admin reload`).
//!
//! A tier that no longer exists in the configuration is skipped with a warning (the
//! user falls back to its configured tier) rather than refusing to start, and so is a
//! line that cannot be read (`file:line` in the warning): a hand edit gone wrong must
//! not turn into a restart loop. Names that the format cannot hold (a user with a
//! space, `#` or a control character) are refused by [`set`], so the server never
//! writes such a line itself.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use crate::config::{Config, ConfigError, check_tier_name};
use crate::key;

static LOCK: Mutex<()> = Mutex::new(());

/// Serializes changes to the overrides and swaps of the configuration that read them.
pub fn lock() -> MutexGuard<'static, ()> {
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// The overrides read from a file: the tier of each user, and the lines skipped.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overrides {
    /// Tier by user key.
    pub tiers: BTreeMap<String, String>,
    /// Lines that could not be read, each naming the file and line.
    pub skipped: Vec<ConfigError>,
}

/// Whether `key` can be kept in the overrides file, or why not. The file holds
/// `user tier` per line with `#` comments, so a user key must be one word without
/// `#` or control characters.
pub fn check_user(key: &str) -> Result<(), String> {
    if key.is_empty() || key == "@" {
        return Err("a user (or @domain) is needed".into());
    }
    if key
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || c == '#')
    {
        return Err(format!(
            "\"{}\": a user name with whitespace, '#' or control characters cannot be kept in the tier overrides file",
            crate::escape::Escaped(key)
        ));
    }
    Ok(())
}

/// The overrides in `path` (none when the file does not exist). Lines that cannot be
/// read are skipped (see [`parse`]); only a file that exists but cannot be read is
/// an error.
pub fn read(path: &Path) -> Result<Overrides, ConfigError> {
    let file = path.display().to_string();
    match std::fs::read(path) {
        Ok(bytes) => Ok(parse(&bytes, &file)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Overrides::default()),
        Err(e) => Err(ConfigError {
            file,
            line: None,
            field: None,
            message: format!("cannot read the tier overrides: {e}"),
        }),
    }
}

/// Reads the content of an overrides file named `file`: `user tier` per line, `#`
/// comments, blank lines ignored. A line with another shape, a name that is not
/// valid, or a line that is not UTF-8 (the server writes keys of names that are not
/// UTF-8 as `\XHH`) is skipped and reported in [`Overrides::skipped`].
pub fn parse(bytes: &[u8], file: &str) -> Overrides {
    let mut out = Overrides::default();
    for (i, line) in bytes.split(|b| *b == b'\n').enumerate() {
        let Ok(line) = std::str::from_utf8(line) else {
            out.skipped.push(ConfigError {
                file: file.to_string(),
                line: Some(i + 1),
                field: None,
                message: "not UTF-8; line skipped".into(),
            });
            continue;
        };
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let skip = |message: String| ConfigError {
            file: file.to_string(),
            line: Some(i + 1),
            field: None,
            message,
        };
        let mut words = line.split_whitespace();
        let (Some(user), Some(tier), None) = (words.next(), words.next(), words.next()) else {
            out.skipped.push(skip(format!(
                "expected \"user tier\", found \"{line}\"; line skipped"
            )));
            continue;
        };
        let user = key::from_text(user);
        if let Err(e) = check_user(&user).and_then(|()| check_tier_name(tier)) {
            out.skipped.push(skip(format!("{e}; line skipped")));
            continue;
        }
        out.tiers.insert(user, tier.to_string());
    }
    out
}

/// Applies the overrides file of `cfg` to its tier map; returns how many applied.
/// Skipped lines and tiers that no longer exist are logged (WARN), not errors.
pub fn apply(cfg: &mut Config) -> Result<usize, ConfigError> {
    let path = cfg.ops.admin.tier_overrides.clone();
    let overrides = read(&path)?;
    for e in &overrides.skipped {
        tracing::warn!(error = %e, "tier override skipped");
    }
    let mut n = 0;
    for (user, tier) in overrides.tiers {
        match cfg.tiers.map.assign(&user, &tier) {
            Ok(()) => n += 1,
            Err(e) => tracing::warn!(
                file = %path.display(),
                "tier override skipped: {e}; the configured tier applies"
            ),
        }
    }
    Ok(n)
}

/// Sets `user`'s override to `tier` in `path`, atomically (mode 0600: it names
/// users). Lines of the file that could not be read are dropped.
pub fn set(path: &Path, user: &str, tier: &str) -> io::Result<()> {
    check_user(user)
        .and_then(|()| check_tier_name(tier))
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut all = read(path).map_err(|e| io::Error::other(e.to_string()))?;
    for e in &all.skipped {
        tracing::warn!(error = %e, "unreadable tier override dropped while rewriting the file");
    }
    all.tiers.insert(user.to_string(), tier.to_string());
    let mut text = String::from(
        "# Tier moves made with `ratelimit-policyd admin tier USER TIER`, applied on top of\n\
         # the configured assignments. Written by the server; \"user tier\" per line.\n",
    );
    for (u, t) in &all.tiers {
        text.push_str(u);
        text.push(' ');
        text.push_str(t);
        text.push('\n');
    }
    write_atomically(path, text.as_bytes())
}

fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "tier-overrides".into());
    let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
    let result = (|| {
        // 0600: the file names users. A temporary file left by a crash keeps its old
        // mode through `open`, so the mode is set on the open file too.
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_keeps_other_users_and_replaces_the_same_user() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state/overrides");
        set(&p, "alice@example.com", "bulk").unwrap();
        set(&p, "bob@example.com", "trial").unwrap();
        set(&p, "alice@example.com", "default").unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&p).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "the file names users: {mode:o}");
        let all = read(&p).unwrap();
        assert_eq!(all.tiers.len(), 2);
        assert_eq!(all.tiers["alice@example.com"], "default");
        assert_eq!(all.tiers["bob@example.com"], "trial");
        assert!(all.skipped.is_empty());
    }

    #[test]
    fn bad_lines_are_skipped_naming_the_file_and_line() {
        let text =
            b"alice bulk\r\nbroken\nbob trial extra\ncarol b\x1bd\ndave  default  # ok\n\xff x\n";
        let o = parse(text, "/var/lib/ratelimit/overrides");
        assert_eq!(o.tiers.len(), 2, "{o:?}");
        assert_eq!(o.tiers["alice"], "bulk");
        assert_eq!(o.tiers["dave"], "default");
        let lines: Vec<String> = o.skipped.iter().map(|e| e.to_string()).collect();
        assert_eq!(lines.len(), 4, "{lines:?}");
        assert!(
            lines[0].starts_with("/var/lib/ratelimit/overrides:2: expected \"user tier\""),
            "{lines:?}"
        );
        assert!(
            lines[1].starts_with("/var/lib/ratelimit/overrides:3: "),
            "{lines:?}"
        );
        assert!(
            lines[2].starts_with("/var/lib/ratelimit/overrides:4: "),
            "{lines:?}"
        );
        assert!(
            lines[3].starts_with("/var/lib/ratelimit/overrides:6: not UTF-8"),
            "{lines:?}"
        );
    }

    #[test]
    fn names_the_file_cannot_hold_are_refused_and_nothing_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("overrides");
        for (user, tier) in [
            ("john smith", "bulk"),
            ("a#b", "bulk"),
            ("eve\nmallory bulk", "bulk"),
            ("eve\r", "bulk"),
            ("", "bulk"),
            ("alice", "bu lk"),
            ("alice", "bulk\n"),
            ("alice", "#"),
        ] {
            let e = set(&p, user, tier).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{user:?} {tier:?}");
            assert!(!p.exists(), "{user:?} {tier:?}");
        }
    }
}
