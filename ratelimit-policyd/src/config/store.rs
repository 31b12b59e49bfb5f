//! `[store]`: where counters live, snapshots of the memory store, sweeps.

use super::ops::Secret;
use super::raw::RawStore;
use super::{Backend, ConfigError, Ctx, SnapshotConfig, StoreConfig, defaults};

/// Whether a Redis URL carries a password (`redis://user:PASSWORD@host`, or a
/// `pass=`/`password=` query parameter).
fn url_has_password(url: &str) -> bool {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let (authority, query) = match rest.find(['/', '?']) {
        Some(i) => (rest.get(..i).unwrap_or(""), rest.get(i..).unwrap_or("")),
        None => (rest, ""),
    };
    let in_userinfo = authority
        .rsplit_once('@')
        .and_then(|(userinfo, _)| userinfo.split_once(':'))
        .is_some_and(|(_, pw)| !pw.is_empty());
    let in_query = query
        .split_once('?')
        .map_or("", |(_, q)| q)
        .split('&')
        .filter_map(|p| p.split_once('='))
        .any(|(k, v)| {
            (k.eq_ignore_ascii_case("pass") || k.eq_ignore_ascii_case("password")) && !v.is_empty()
        });
    in_userinfo || in_query
}

impl Default for StoreConfig {
    /// Every `[store]` key at its default ([`defaults`]): the memory store, no snapshots.
    fn default() -> Self {
        StoreConfig {
            backend: Backend::Memory {
                max_keys: defaults::MAX_KEYS,
            },
            snapshot: None,
            sweep_interval: defaults::SWEEP_INTERVAL,
            local_max_keys: defaults::MAX_KEYS,
        }
    }
}

/// Validates `[store]`.
pub(super) fn build(cx: &Ctx<'_>, raw: &RawStore) -> Result<StoreConfig, ConfigError> {
    let backend = raw
        .backend
        .as_ref()
        .map_or(defaults::BACKEND, |b| b.get_ref().as_str());
    // The memory store's cap; with Redis, the local fallback's.
    let max_keys = match &raw.max_keys {
        Some(m) if *m.get_ref() == 0 => {
            return cx.err(Some(m.span()), "store.max_keys", "must be at least 1");
        }
        Some(m) => *m.get_ref(),
        None => defaults::MAX_KEYS,
    };
    let backend = match backend {
        "memory" => Backend::Memory { max_keys },
        "redis" => Backend::Redis {
            url: raw
                .redis_url
                .clone()
                .unwrap_or_else(|| defaults::REDIS_URL.into()),
            password: match &raw.redis_password_file {
                None => None,
                Some(f) => {
                    let field = "store.redis_password_file";
                    if raw.redis_url.as_deref().is_some_and(url_has_password) {
                        return cx.err(
                            Some(f.span()),
                            field,
                            "redis_url has a password too: set it in one place",
                        );
                    }
                    Some(Secret::new(cx.secret_file(f, field)?))
                }
            },
            key_prefix: raw
                .redis_key_prefix
                .clone()
                .unwrap_or_else(|| defaults::REDIS_KEY_PREFIX.into()),
            connect_timeout: cx.duration(
                &raw.redis_connect_timeout,
                "store.redis_connect_timeout",
                defaults::REDIS_CONNECT_TIMEOUT,
            )?,
            command_timeout: cx.duration(
                &raw.redis_command_timeout,
                "store.redis_command_timeout",
                defaults::REDIS_COMMAND_TIMEOUT,
            )?,
            server_time: cx.keyword(
                &raw.redis_time,
                "store.redis_time",
                defaults::REDIS_SERVER_TIME,
                &[("server", true), ("local", false)],
                "expected \"server\" or \"local\"",
            )?,
        },
        other => {
            let span = raw.backend.as_ref().map(|b| b.span());
            return cx.err(
                span,
                "store.backend",
                format!("\"{other}\": expected \"memory\" or \"redis\""),
            );
        }
    };
    let snapshot = match &raw.snapshot_path {
        None => None,
        Some(path) => {
            let start_empty_if_bad = cx.keyword(
                &raw.on_bad_snapshot,
                "store.on_bad_snapshot",
                defaults::START_EMPTY_IF_BAD,
                &[("refuse", false), ("start-empty", true)],
                "expected \"refuse\" or \"start-empty\"",
            )?;
            if path.get_ref().trim().is_empty() {
                return cx.err(
                    Some(path.span()),
                    "store.snapshot_path",
                    "must not be empty",
                );
            }
            Some(SnapshotConfig {
                // Relative to the configuration's directory, like every other path.
                path: cx.resolve(path.get_ref()),
                interval: cx.duration(
                    &raw.snapshot_interval,
                    "store.snapshot_interval",
                    defaults::SNAPSHOT_INTERVAL,
                )?,
                start_empty_if_bad,
            })
        }
    };
    let sweep_interval = cx.duration(
        &raw.sweep_interval,
        "store.sweep_interval",
        defaults::SWEEP_INTERVAL,
    )?;
    Ok(StoreConfig {
        backend,
        snapshot,
        sweep_interval,
        local_max_keys: max_keys,
    })
}
