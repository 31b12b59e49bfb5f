//! Tier moves made with `admin tier`, kept in a file so they survive restarts and
//! reloads: `user tier` per line (the format of `assign_file`), written atomically
//! (temporary file, fsync, rename). Applied on top of the configured assignments
//! whenever the configuration is loaded (start, SIGHUP, `admin reload`).
//!
//! A tier that no longer exists in the configuration is skipped with a warning (the
//! user falls back to its configured tier) rather than refusing to start.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use crate::config::{Config, ConfigError};
use crate::key;

static LOCK: Mutex<()> = Mutex::new(());

/// Serializes changes to the overrides and swaps of the configuration that read them.
pub fn lock() -> MutexGuard<'static, ()> {
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// The overrides in `path` (none when the file does not exist).
pub fn read(path: &Path) -> Result<BTreeMap<String, String>, ConfigError> {
    let file = path.display().to_string();
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
        Err(e) => {
            return Err(ConfigError {
                file,
                line: None,
                field: None,
                message: format!("cannot read the tier overrides: {e}"),
            });
        }
    };
    let mut out = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let mut words = line.split_whitespace();
        let (Some(user), Some(tier), None) = (words.next(), words.next(), words.next()) else {
            return Err(ConfigError {
                file,
                line: Some(i + 1),
                field: None,
                message: format!("expected \"user tier\", found \"{line}\""),
            });
        };
        out.insert(key::from_text(user), tier.to_string());
    }
    Ok(out)
}

/// Applies the overrides file of `cfg` to its tier map; returns how many applied.
pub fn apply(cfg: &mut Config) -> Result<usize, ConfigError> {
    let path = cfg.ops.admin.tier_overrides.clone();
    let mut n = 0;
    for (user, tier) in read(&path)? {
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

/// Sets `user`'s override to `tier` in `path`, atomically.
pub fn set(path: &Path, user: &str, tier: &str) -> io::Result<()> {
    let mut all = read(path).map_err(|e| io::Error::other(e.to_string()))?;
    all.insert(user.to_string(), tier.to_string());
    let mut text = String::from(
        "# Tier moves made with `ratelimit-policyd admin tier USER TIER`, applied on top of\n\
         # the configured assignments. Written by the server; \"user tier\" per line.\n",
    );
    for (u, t) in &all {
        text.push_str(u);
        text.push(' ');
        text.push_str(t);
        text.push('\n');
    }
    write_atomically(path, text.as_bytes())
}

fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
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
        let mut f = std::fs::File::create(&tmp)?;
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
        let all = read(&p).unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(all["alice@example.com"], "default");
        assert_eq!(all["bob@example.com"], "trial");
        std::fs::write(&p, "alice bulk\nbroken\n").unwrap();
        assert!(read(&p).unwrap_err().to_string().contains(":2: expected"));
    }
}
