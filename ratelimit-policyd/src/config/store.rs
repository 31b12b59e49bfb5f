//! `[store]`: where counters live, snapshots of the memory store, sweeps.

use std::fmt;

use toml::Spanned;

use super::ops::Secret;
use super::raw::RawStore;
use super::{Backend, ConfigError, Ctx, SnapshotConfig, StoreConfig, defaults};

/// TLS material for `rediss://`, read from `[store]`'s files when the configuration
/// is loaded (so a missing or empty file is a configuration error naming its key).
#[derive(Clone, PartialEq, Eq, Default)]
pub struct RedisTls {
    /// `redis_ca_file`: PEM certificates of a private CA, trusted instead of the
    /// public roots.
    pub ca: Option<Vec<u8>>,
    /// `redis_client_cert_file` and `redis_client_key_file`: a PEM certificate and
    /// its key, presented when the server asks for one.
    pub client: Option<(Vec<u8>, Secret)>,
}

impl fmt::Debug for RedisTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisTls")
            .field(
                "ca",
                &self.ca.as_ref().map(|c| format!("{} bytes", c.len())),
            )
            .field(
                "client",
                &self.client.as_ref().map(|_| "cert and key (***)"),
            )
            .finish()
    }
}

/// Whether every URL uses TLS (`rediss://`), checked for the keys that need it.
fn all_tls<'a>(mut urls: impl Iterator<Item = &'a String>) -> bool {
    urls.all(|u| u.starts_with("rediss://"))
}

/// `redis_ca_file`, `redis_client_cert_file`, `redis_client_key_file`. The CA and
/// the certificate are paths (relative to the configuration's directory); the key
/// is read like `redis_password_file` (a systemd credential name works).
fn tls(
    cx: &Ctx<'_>,
    raw: &RawStore,
    urls: &[String],
    where_: &str,
) -> Result<RedisTls, ConfigError> {
    let pem = |v: &Spanned<String>, field: &str, what: &str| -> Result<Vec<u8>, ConfigError> {
        let name = v.get_ref();
        if name.trim().is_empty() {
            return cx.err(Some(v.span()), field, "must not be empty");
        }
        let path = cx.resolve(name);
        let bytes = std::fs::read(&path).or_else(|e| {
            cx.err(
                Some(v.span()),
                field,
                format!("cannot read {}: {e}", path.display()),
            )
        })?;
        if !has_pem(&bytes, what) {
            return cx.err(
                Some(v.span()),
                field,
                format!("{} holds no PEM {what}", path.display()),
            );
        }
        Ok(bytes)
    };
    let needs_tls = |v: &Spanned<String>, field: &str| -> Result<(), ConfigError> {
        if all_tls(urls.iter()) {
            return Ok(());
        }
        cx.err(
            Some(v.span()),
            field,
            format!("needs rediss:// (TLS), but {where_} uses redis://"),
        )
    };
    let mut out = RedisTls::default();
    if let Some(v) = &raw.redis_ca_file {
        needs_tls(v, "store.redis_ca_file")?;
        out.ca = Some(pem(v, "store.redis_ca_file", "CERTIFICATE")?);
    }
    match (&raw.redis_client_cert_file, &raw.redis_client_key_file) {
        (None, None) => {}
        (Some(cert), Some(key)) => {
            needs_tls(cert, "store.redis_client_cert_file")?;
            let cert = pem(cert, "store.redis_client_cert_file", "CERTIFICATE")?;
            let field = "store.redis_client_key_file";
            let secret = cx.secret_file(key, field)?;
            if !has_pem(secret.as_bytes(), "PRIVATE KEY") {
                return cx.err(Some(key.span()), field, "holds no PEM PRIVATE KEY");
            }
            out.client = Some((cert, Secret::new(secret)));
        }
        (Some(v), None) => {
            return cx.err(
                Some(v.span()),
                "store.redis_client_cert_file",
                "needs redis_client_key_file too",
            );
        }
        (None, Some(v)) => {
            return cx.err(
                Some(v.span()),
                "store.redis_client_key_file",
                "needs redis_client_cert_file too",
            );
        }
    }
    Ok(out)
}

/// Whether `bytes` has a PEM block whose label ends with `what` (`CERTIFICATE`,
/// `PRIVATE KEY` also matching `RSA PRIVATE KEY` and `EC PRIVATE KEY`).
fn has_pem(bytes: &[u8], what: &str) -> bool {
    String::from_utf8_lossy(bytes).lines().any(|l| {
        l.trim()
            .strip_prefix("-----BEGIN ")
            .and_then(|rest| rest.strip_suffix("-----"))
            .is_some_and(|label| label.ends_with(what))
    })
}

/// `redis_url` or `redis_cluster_nodes` (never both): the URL (empty for a cluster)
/// and the seed nodes (empty for one server).
fn endpoints(cx: &Ctx<'_>, raw: &RawStore) -> Result<(String, Vec<String>), ConfigError> {
    let Some(nodes) = &raw.redis_cluster_nodes else {
        let url = raw
            .redis_url
            .clone()
            .unwrap_or_else(|| defaults::REDIS_URL.into());
        return Ok((url, Vec::new()));
    };
    let field = "store.redis_cluster_nodes";
    let span = Some(nodes.span());
    if raw.redis_url.is_some() {
        return cx.err(
            span,
            field,
            "set redis_url (one server) or redis_cluster_nodes (a cluster), not both",
        );
    }
    let list = nodes.get_ref();
    if list.is_empty() {
        return cx.err(span, field, "must list at least one seed node");
    }
    for node in list {
        let Some(rest) = node
            .strip_prefix("redis://")
            .or_else(|| node.strip_prefix("rediss://"))
        else {
            return cx.err(
                span,
                field,
                format!(
                    "\"{}\": expected redis://host:port or rediss://host:port",
                    super::redact_url(node)
                ),
            );
        };
        if rest.is_empty() || rest.starts_with('/') {
            return cx.err(span, field, format!("\"{node}\": no host"));
        }
    }
    if !all_tls(list.iter()) && list.iter().any(|u| u.starts_with("rediss://")) {
        return cx.err(
            span,
            field,
            "mixes redis:// and rediss://: every node of a cluster uses TLS or none does",
        );
    }
    Ok((String::new(), list.clone()))
}

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
        "redis" => {
            let (url, cluster_nodes) = endpoints(cx, raw)?;
            let (urls, where_) = if cluster_nodes.is_empty() {
                (std::slice::from_ref(&url), "redis_url")
            } else {
                (&cluster_nodes[..], "redis_cluster_nodes")
            };
            let tls = tls(cx, raw, urls, where_)?;
            redis_backend(cx, raw, url, cluster_nodes, tls)?
        }
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

/// The Redis backend: `url` or `cluster_nodes`, the TLS files, and the other
/// `redis_*` keys.
fn redis_backend(
    cx: &Ctx<'_>,
    raw: &RawStore,
    url: String,
    cluster_nodes: Vec<String>,
    tls: RedisTls,
) -> Result<Backend, ConfigError> {
    Ok(Backend::Redis {
        password: match &raw.redis_password_file {
            None => None,
            Some(f) => {
                let field = "store.redis_password_file";
                let twice = if cluster_nodes.is_empty() {
                    url_has_password(&url).then_some("redis_url")
                } else {
                    cluster_nodes
                        .iter()
                        .any(|n| url_has_password(n))
                        .then_some("redis_cluster_nodes")
                };
                if let Some(key) = twice {
                    return cx.err(
                        Some(f.span()),
                        field,
                        format!("{key} has a password too: set it in one place"),
                    );
                }
                Some(Secret::new(cx.secret_file(f, field)?))
            }
        },
        key_prefix: match &raw.redis_key_prefix {
            Some(p) if !cluster_nodes.is_empty() && p.contains(['{', '}']) => {
                return cx.err(
                    None,
                    "store.redis_key_prefix",
                    "must not contain { or } with redis_cluster_nodes (the braces mark \
                     each key's hash tag, which picks its cluster slot)",
                );
            }
            Some(p) => p.clone(),
            None => defaults::REDIS_KEY_PREFIX.into(),
        },
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
        batch: match &raw.redis_batch {
            Some(b) if *b.get_ref() && !cluster_nodes.is_empty() => {
                return cx.err(
                    Some(b.span()),
                    "store.redis_batch",
                    "works with one server (redis_url), not with redis_cluster_nodes",
                );
            }
            Some(b) => *b.get_ref(),
            None => false,
        },
        url,
        cluster_nodes,
        tls,
    })
}
