//! How a [`RedisStore`] connects and lays out its keys:
//! [`RedisStoreConfig`], [`TimeSource`], [`TlsClientCert`], and the password-free form
//! of a URL for logs.

use std::fmt;
use std::time::Duration;

#[cfg(doc)]
use super::RedisStore;
#[cfg(doc)]
use crate::store::Store;

/// Whose clock decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum TimeSource {
    /// The Redis server's `TIME`: every host sharing the store agrees. The `now`
    /// passed to [`Store::check`] is ignored.
    #[default]
    Server,
    /// The `now` passed to [`Store::check`] (a manual clock in tests, or one host).
    Caller,
}

/// How a [`RedisStore`] connects and lays out its keys.
///
/// `Debug` never shows the password in the URL. `#[non_exhaustive]`, so settings can
/// be added: start from [`RedisStoreConfig::new`] and change what you need.
///
/// # Examples
///
/// ```
/// use ratelimit_core::store::{RedisStoreConfig, TimeSource};
/// use std::time::Duration;
///
/// let c = RedisStoreConfig::new("redis://:s3cret@10.0.0.5:6379/2")
///     .with_key_prefix("mx1:")
///     .with_command_timeout(Duration::from_millis(200))
///     .with_time_source(TimeSource::Server);
/// assert_eq!(c.redacted_url(), "redis://:***@10.0.0.5:6379/2");
/// assert!(!format!("{c:?}").contains("s3cret"));
/// ```
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RedisStoreConfig {
    /// One Redis server: `redis://[[user]:password@]host[:port][/db]`,
    /// `rediss://...` (TLS), or `redis+unix:///path[?db=N&pass=P]`. Empty when
    /// [`cluster_nodes`](Self::cluster_nodes) is set ([`RedisStoreConfig::cluster`]).
    pub url: String,
    /// The seed nodes of a Redis Cluster (`redis://host:port` or `rediss://host:port`,
    /// all with the same scheme and credentials). When set, the store discovers the
    /// cluster's slots from whichever seed answers first and sends each decision to
    /// the master of its key's slot; [`url`](Self::url) must then be empty. Default
    /// none (one server at `url`).
    pub cluster_nodes: Vec<String>,
    /// Prepended to every key's hash name, so several deployments (or tests) can
    /// share one Redis. Default `rl:`.
    pub key_prefix: String,
    /// The most a new connection may take, handshake included. Default 1 s.
    pub connect_timeout: Duration,
    /// The most one command may take (socket read and write timeouts). Default 1 s.
    pub command_timeout: Duration,
    /// Whose clock decides. Default [`TimeSource::Server`].
    pub time_source: TimeSource,
    /// How long a hash is kept past its `idle_at` before Redis expires it. Decisions
    /// never depend on it (the script checks `idle_at` itself); it only has to cover
    /// how far a caller's clock may lag the server's. Default 60 s.
    pub ttl_grace: Duration,
    /// The most idle connections kept for reuse (more are opened under load and
    /// closed after use). Default 16.
    pub max_idle_connections: usize,
    /// The password sent when connecting (`AUTH`), instead of one in the URL: read
    /// from a file by the server, so it never appears in a URL, a log or `Debug`.
    /// It replaces a password in the URL; a user name in the URL is kept. Default
    /// none.
    pub password: Option<String>,
    /// PEM certificates of the certificate authorities trusted to sign the server's
    /// certificate, for `rediss://` URLs (a private CA). They replace the public roots
    /// compiled into the client (webpki-roots). A CA with a `redis://` URL is an error
    /// ([`RedisStore::new`]): TLS is never optional once asked for. Default none.
    pub tls_ca: Option<Vec<u8>>,
    /// A client certificate and key presented to a server that asks for one
    /// (`tls-auth-clients`), for `rediss://` URLs. Default none.
    pub tls_client_cert: Option<TlsClientCert>,
    /// Send the decisions of threads that wait for Redis at the same moment as one
    /// pipelined batch (one write and one read for all of them) instead of one round
    /// trip each: less CPU in Redis and here under concurrent load, the same
    /// decisions. A caller waits at most `connect_timeout + 3 × command_timeout`,
    /// as without it. One server only (ignored for a cluster). Default off.
    pub batch: bool,
}

/// A TLS client certificate and its private key, both PEM. `Debug` shows neither.
#[derive(Clone, PartialEq, Eq)]
pub struct TlsClientCert {
    /// The certificate chain, leaf first.
    pub cert_pem: Vec<u8>,
    /// The private key (PKCS#8, PKCS#1 or SEC1).
    pub key_pem: Vec<u8>,
}

impl fmt::Debug for TlsClientCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsClientCert")
            .field("cert_pem", &format_args!("{} bytes", self.cert_pem.len()))
            .field("key_pem", &"***")
            .finish()
    }
}

impl RedisStoreConfig {
    /// The defaults, with this URL.
    pub fn new(url: impl Into<String>) -> Self {
        RedisStoreConfig {
            url: url.into(),
            cluster_nodes: Vec::new(),
            key_prefix: "rl:".into(),
            connect_timeout: Duration::from_secs(1),
            command_timeout: Duration::from_secs(1),
            time_source: TimeSource::Server,
            ttl_grace: Duration::from_secs(60),
            max_idle_connections: 16,
            password: None,
            tls_ca: None,
            tls_client_cert: None,
            batch: false,
        }
    }

    /// The defaults, for a Redis Cluster reached through these seed nodes (see
    /// [`cluster_nodes`](Self::cluster_nodes)).
    ///
    /// # Examples
    ///
    /// ```
    /// use ratelimit_core::store::RedisStoreConfig;
    ///
    /// let c = RedisStoreConfig::cluster(["redis://:pw@10.0.0.1:7000", "redis://:pw@10.0.0.2:7000"]);
    /// assert_eq!(c.endpoint(), "cluster redis://:***@10.0.0.1:7000,redis://:***@10.0.0.2:7000");
    /// ```
    pub fn cluster<S: Into<String>>(nodes: impl IntoIterator<Item = S>) -> Self {
        let mut c = RedisStoreConfig::new(String::new());
        c.cluster_nodes = nodes.into_iter().map(Into::into).collect();
        c
    }

    /// Whether this configures a Redis Cluster ([`cluster_nodes`](Self::cluster_nodes)
    /// is not empty).
    pub fn is_cluster(&self) -> bool {
        !self.cluster_nodes.is_empty()
    }

    /// Where the store connects, safe to log: the redacted URL, or `cluster ` and the
    /// redacted seed nodes.
    pub fn endpoint(&self) -> String {
        if self.is_cluster() {
            let nodes: Vec<String> = self.cluster_nodes.iter().map(|n| redact_url(n)).collect();
            format!("cluster {}", nodes.join(","))
        } else {
            self.redacted_url()
        }
    }

    /// This configuration with [`tls_ca`](Self::tls_ca) set (PEM).
    pub fn with_tls_ca(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.tls_ca = Some(pem.into());
        self
    }

    /// This configuration with [`key_prefix`](Self::key_prefix) set.
    pub fn with_key_prefix(mut self, key_prefix: impl Into<String>) -> Self {
        self.key_prefix = key_prefix.into();
        self
    }

    /// This configuration with [`connect_timeout`](Self::connect_timeout) set.
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// This configuration with [`command_timeout`](Self::command_timeout) set.
    pub fn with_command_timeout(mut self, timeout: Duration) -> Self {
        self.command_timeout = timeout;
        self
    }

    /// This configuration with [`time_source`](Self::time_source) set.
    pub fn with_time_source(mut self, time_source: TimeSource) -> Self {
        self.time_source = time_source;
        self
    }

    /// This configuration with [`ttl_grace`](Self::ttl_grace) set.
    pub fn with_ttl_grace(mut self, grace: Duration) -> Self {
        self.ttl_grace = grace;
        self
    }

    /// This configuration with [`batch`](Self::batch) set.
    pub fn with_batching(mut self, batch: bool) -> Self {
        self.batch = batch;
        self
    }

    /// This configuration with [`max_idle_connections`](Self::max_idle_connections) set.
    pub fn with_max_idle_connections(mut self, n: usize) -> Self {
        self.max_idle_connections = n;
        self
    }

    /// The URL with any password (and a bare user-info part, which some clients
    /// read as a password) replaced by `***`: safe to log.
    pub fn redacted_url(&self) -> String {
        redact_url(&self.url)
    }
}

impl fmt::Debug for RedisStoreConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let nodes: Vec<String> = self.cluster_nodes.iter().map(|n| redact_url(n)).collect();
        f.debug_struct("RedisStoreConfig")
            .field("url", &self.redacted_url())
            .field("cluster_nodes", &nodes)
            .field("key_prefix", &self.key_prefix)
            .field("connect_timeout", &self.connect_timeout)
            .field("command_timeout", &self.command_timeout)
            .field("time_source", &self.time_source)
            .field("ttl_grace", &self.ttl_grace)
            .field("max_idle_connections", &self.max_idle_connections)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field(
                "tls_ca",
                &self
                    .tls_ca
                    .as_ref()
                    .map(|pem| format!("{} bytes", pem.len())),
            )
            .field("tls_client_cert", &self.tls_client_cert)
            .field("batch", &self.batch)
            .finish()
    }
}

/// `url` with any password replaced by `***`, for logs: the user info ends at the
/// *last* `@` of the authority, as URL parsers read it, so a password containing `@`
/// is hidden whole, and `pass=` query parameters (`redis+unix:///path?pass=...`) are
/// hidden too.
///
/// ```
/// use ratelimit_core::store::redis::redact_url;
/// assert_eq!(redact_url("redis://:s3cr@t@cache:6379/0"), "redis://:***@cache:6379/0");
/// ```
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_string();
    };
    let rest_start = scheme_end + 3;
    let rest = &url[rest_start..];
    let auth_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let mut out = String::with_capacity(url.len());
    out.push_str(&url[..rest_start]);
    match rest[..auth_end].rfind('@') {
        Some(at) => {
            let userinfo = &rest[..at];
            match userinfo.split_once(':') {
                Some((user, _)) => {
                    out.push_str(user);
                    out.push_str(":***");
                }
                None => out.push_str("***"),
            }
            out.push_str(&rest[at..auth_end]);
        }
        None => out.push_str(&rest[..auth_end]),
    }
    // Query parameters (`redis+unix:///s?pass=...`): hide password values.
    let tail = &rest[auth_end..];
    match tail.split_once('?') {
        Some((path, query)) => {
            out.push_str(path);
            out.push('?');
            let params: Vec<String> = query
                .split('&')
                .map(|p| match p.split_once('=') {
                    Some((k, _))
                        if k.eq_ignore_ascii_case("pass") || k.eq_ignore_ascii_case("password") =>
                    {
                        format!("{k}=***")
                    }
                    _ => p.to_string(),
                })
                .collect();
            out.push_str(&params.join("&"));
        }
        None => out.push_str(tail),
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::RedisStore;

    #[test]
    fn passwords_never_show() {
        let cases = [
            ("redis://127.0.0.1:6379/", "redis://127.0.0.1:6379/"),
            ("redis://:pw@host:1/0", "redis://:***@host:1/0"),
            ("redis://user:pw@host", "redis://user:***@host"),
            ("redis://pw@host/", "redis://***@host/"),
            ("redis://u:p@ss@host/", "redis://u:***@host/"),
            (
                "redis+unix:///run/redis.sock?db=1&pass=pw",
                "redis+unix:///run/redis.sock?db=1&pass=***",
            ),
            ("not a url", "not a url"),
        ];
        for (url, want) in cases {
            let c = RedisStoreConfig::new(url);
            assert_eq!(c.redacted_url(), want, "{url}");
            let debug = format!("{c:?}");
            assert!(debug.contains(want), "{debug}");
        }
        let store =
            RedisStore::new(RedisStoreConfig::new("redis://:hunter2@127.0.0.1:1/")).unwrap();
        assert!(!format!("{store:?}").contains("hunter2"));
        let mut c = RedisStoreConfig::new("redis://127.0.0.1:1/");
        c.password = Some("from-a-file".into());
        let debug = format!("{c:?}");
        assert!(debug.contains("password: Some(\"***\")"), "{debug}");
        let store = RedisStore::new(c).unwrap();
        assert!(!format!("{store:?}").contains("from-a-file"));

        let mut c = RedisStoreConfig::cluster(["redis://:pw1@a:7000", "redis://:pw1@b:7001"]);
        c.tls_client_cert = Some(TlsClientCert {
            cert_pem: b"CERT".to_vec(),
            key_pem: b"PRIVATE KEY".to_vec(),
        });
        let debug = format!("{c:?}");
        assert!(
            !debug.contains("pw1") && !debug.contains("PRIVATE"),
            "{debug}"
        );
        assert!(debug.contains("redis://:***@b:7001"), "{debug}");
        assert_eq!(
            c.endpoint(),
            "cluster redis://:***@a:7000,redis://:***@b:7001"
        );
    }
}
