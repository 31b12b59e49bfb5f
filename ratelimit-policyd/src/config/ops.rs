//! The operations sections of the configuration: `[alerts]`, `[metrics]`, `[admin]`,
//! `[record]`, validated into typed values like every other section.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use toml::Spanned;

pub use super::defaults::{
    ADMIN_SOCKET as DEFAULT_ADMIN_SOCKET, TIER_OVERRIDES as DEFAULT_TIER_OVERRIDES,
};
pub use super::raw::{RawAdmin, RawAlerts, RawMetrics, RawRecord};
use super::{ConfigError, Ctx, defaults};

/// A secret (webhook token): never printed, not even by `{:?}`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(secret: impl Into<String>) -> Secret {
        Secret(secret.into())
    }

    /// The secret itself, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// An `http://` or `https://` webhook URL, split for the built-in HTTP/1.1 client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpUrl {
    /// `https://`: TLS (rustls), the server's certificate verified against the
    /// system roots or `[alerts] webhook_ca_file`.
    pub tls: bool,
    /// The host alone (no port, no brackets around an IPv6 address): the name the
    /// certificate must be valid for, sent as SNI.
    pub host: String,
    /// `host` or `host:port`, as sent in the `Host` header.
    pub authority: String,
    /// What to connect to (`host:port`; port 80, or 443 for https, when not given).
    pub connect: String,
    /// The path and query (`/` when empty).
    pub path: String,
}

impl HttpUrl {
    /// Parses `http[s]://host[:port][/path]`. No userinfo (use `webhook_token`).
    pub fn parse(url: &str) -> Result<HttpUrl, String> {
        let (tls, rest) = if let Some(rest) = url.strip_prefix("https://") {
            (true, rest)
        } else if let Some(rest) = url.strip_prefix("http://") {
            (false, rest)
        } else {
            return Err(format!(
                "\"{}\": only http:// and https:// URLs are supported",
                redact(url)
            ));
        };
        let (authority, path) = match rest.find(['/', '?']) {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        if authority.is_empty() || authority.contains('@') {
            return Err(format!(
                "\"{}\": expected http[s]://host[:port]/path (put credentials in webhook_token)",
                redact(url)
            ));
        }
        let (host, port) = match authority.rfind(':') {
            Some(i) if !authority[i..].contains(']') => {
                (&authority[..i], Some(&authority[i + 1..]))
            }
            _ => (authority, None),
        };
        if let Some(p) = port
            && p.parse::<u16>().is_err()
        {
            return Err(format!("\"{}\": the port must be a number", redact(url)));
        }
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        if host.is_empty() {
            return Err(format!("\"{}\": no host", redact(url)));
        }
        let connect = match port {
            Some(_) => authority.to_string(),
            None => format!("{authority}:{}", if tls { 443 } else { 80 }),
        };
        let path = if path.starts_with('?') {
            format!("/{path}")
        } else {
            path.to_string()
        };
        if path.bytes().any(|b| b.is_ascii_control() || b == b' ') {
            return Err("the webhook URL must not contain spaces or control characters".into());
        }
        Ok(HttpUrl {
            tls,
            host: host.to_string(),
            authority: authority.to_string(),
            connect,
            path,
        })
    }

    /// The URL for logs: scheme and host only (`https://hooks.example/...`).
    pub fn for_logs(&self) -> String {
        format!(
            "{}://{}/...",
            if self.tls { "https" } else { "http" },
            self.authority
        )
    }
}

/// `[alerts] webhook_ca_file`: the CA certificates an https webhook's certificate
/// must chain to, instead of the system's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaFile {
    /// The file, as resolved (for logs).
    pub path: PathBuf,
    /// Its certificates (DER), read when the configuration is loaded.
    pub certs: Vec<CertificateDer<'static>>,
}

/// A URL for logs: the scheme and host only (a path or query may carry a token).
pub fn redact(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let host = rest.split(['/', '?']).next().unwrap_or("");
    let host = host.rsplit('@').next().unwrap_or(host);
    if scheme.is_empty() {
        format!("{host}/...")
    } else {
        format!("{scheme}://{host}/...")
    }
}

/// `[alerts]`: what runs on the first refusal of a user for a limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlertsConfig {
    /// A shell command (`sh -c`), details in `RATELIMIT_*` environment variables.
    pub command: Option<String>,
    /// Where to POST a JSON body.
    pub webhook_url: Option<HttpUrl>,
    /// Sent as `Authorization: Bearer TOKEN`.
    pub webhook_token: Option<Secret>,
    /// The CAs an https webhook is verified against; `None`: the system's roots.
    pub webhook_ca: Option<CaFile>,
    /// Longest a command or a POST may take; then it is killed / abandoned.
    pub timeout: Duration,
    /// Alerts waiting to be sent; beyond it new ones are dropped (and counted).
    pub queue: usize,
}

impl AlertsConfig {
    /// Whether anything is configured.
    pub fn enabled(&self) -> bool {
        self.command.is_some() || self.webhook_url.is_some()
    }
}

impl Default for AlertsConfig {
    fn default() -> Self {
        AlertsConfig {
            command: None,
            webhook_url: None,
            webhook_token: None,
            webhook_ca: None,
            timeout: defaults::ALERTS_TIMEOUT,
            queue: defaults::ALERTS_QUEUE,
        }
    }
}

/// `[admin]`: the admin socket and where tier moves are kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminConfig {
    /// The Unix socket (mode 0600); `None` when disabled.
    pub socket: Option<PathBuf>,
    /// The file `admin tier` writes (`user tier` lines), applied on top of the
    /// configured assignments at start and on every reload.
    pub tier_overrides: PathBuf,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            socket: Some(PathBuf::from(defaults::ADMIN_SOCKET)),
            tier_overrides: PathBuf::from(defaults::TIER_OVERRIDES),
        }
    }
}

/// Everything operational.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct OpsConfig {
    /// `[alerts]`.
    pub alerts: AlertsConfig,
    /// `[metrics] listen`: the Prometheus endpoint; `None` is off.
    pub metrics: Option<SocketAddr>,
    /// `[admin]`.
    pub admin: AdminConfig,
    /// `[record] path`: JSON lines of every decided request; `None` is off.
    pub record: Option<PathBuf>,
}

/// A path: not empty, relative to the configuration's directory.
fn path(cx: &Ctx<'_>, v: &Spanned<String>, field: &str) -> Result<PathBuf, ConfigError> {
    if v.get_ref().trim().is_empty() {
        return cx.err(Some(v.span()), field, "must not be empty");
    }
    Ok(cx.resolve(v.get_ref()))
}

/// Reads a PEM file of CA certificates: at least one, every one well formed.
fn ca_file(
    cx: &Ctx<'_>,
    v: &Spanned<String>,
    field: &str,
    path: PathBuf,
) -> Result<CaFile, ConfigError> {
    let bytes = std::fs::read(&path).or_else(|e| {
        cx.err(
            Some(v.span()),
            field,
            format!("cannot read {}: {e}", path.display()),
        )
    })?;
    let mut certs = Vec::new();
    for cert in CertificateDer::pem_slice_iter(&bytes) {
        match cert {
            Ok(c) => certs.push(c),
            Err(e) => {
                return cx.err(
                    Some(v.span()),
                    field,
                    format!("{}: not a PEM certificate file: {e}", path.display()),
                );
            }
        }
    }
    if certs.is_empty() {
        return cx.err(
            Some(v.span()),
            field,
            format!(
                "{}: no certificate in it (expected PEM, -----BEGIN CERTIFICATE-----)",
                path.display()
            ),
        );
    }
    Ok(CaFile { path, certs })
}

/// Validates the four sections.
pub(super) fn build(
    cx: &Ctx<'_>,
    alerts: &RawAlerts,
    metrics: &RawMetrics,
    admin: &RawAdmin,
    record: &RawRecord,
) -> Result<OpsConfig, ConfigError> {
    let mut ops = OpsConfig::default();

    let a = &mut ops.alerts;
    if let Some(c) = &alerts.command {
        if c.get_ref().trim().is_empty() {
            return cx.err(Some(c.span()), "alerts.command", "must not be empty");
        }
        a.command = Some(c.get_ref().clone());
    }
    if let Some(u) = &alerts.webhook_url {
        a.webhook_url = Some(
            HttpUrl::parse(u.get_ref())
                .or_else(|e| cx.err(Some(u.span()), "alerts.webhook_url", e))?,
        );
    }
    if let Some(t) = &alerts.webhook_token {
        if a.webhook_url.is_none() {
            return cx.err(
                Some(t.span()),
                "alerts.webhook_token",
                "set webhook_url too (the token is sent only to it)",
            );
        }
        if t.get_ref().bytes().any(|b| b.is_ascii_control()) {
            return cx.err(
                Some(t.span()),
                "alerts.webhook_token",
                "must not contain control characters",
            );
        }
        a.webhook_token = Some(Secret(t.get_ref().clone()));
    }
    if let Some(f) = &alerts.webhook_token_file {
        let field = "alerts.webhook_token_file";
        if alerts.webhook_token.is_some() {
            return cx.err(
                Some(f.span()),
                field,
                "set webhook_token or webhook_token_file, not both",
            );
        }
        if a.webhook_url.is_none() {
            return cx.err(
                Some(f.span()),
                field,
                "set webhook_url too (the token is sent only to it)",
            );
        }
        let token = cx.secret_file(f, field)?;
        if token.bytes().any(|b| b.is_ascii_control()) {
            return cx.err(
                Some(f.span()),
                field,
                "the token must not contain control characters (one trailing newline is removed)",
            );
        }
        a.webhook_token = Some(Secret(token));
    }
    if let Some(f) = &alerts.webhook_ca_file {
        let field = "alerts.webhook_ca_file";
        if !a.webhook_url.as_ref().is_some_and(|u| u.tls) {
            return cx.err(
                Some(f.span()),
                field,
                "only used for an https:// webhook_url; set one",
            );
        }
        let path = path(cx, f, field)?;
        a.webhook_ca = Some(ca_file(cx, f, field, path)?);
    }
    a.timeout = cx.duration(&alerts.timeout, "alerts.timeout", defaults::ALERTS_TIMEOUT)?;
    if let Some(q) = &alerts.queue {
        if *q.get_ref() == 0 {
            return cx.err(Some(q.span()), "alerts.queue", "must be at least 1");
        }
        a.queue = *q.get_ref();
    }

    if let Some(l) = &metrics.listen {
        ops.metrics = Some(l.get_ref().parse::<SocketAddr>().or_else(|_| {
            cx.err(
                Some(l.span()),
                "metrics.listen",
                format!(
                    "\"{}\" is not host:port (an IP address and port, e.g. \"127.0.0.1:9531\")",
                    l.get_ref()
                ),
            )
        })?);
    }

    if let Some(s) = &admin.socket {
        ops.admin.socket = Some(path(cx, s, "admin.socket")?);
    }
    if admin.enabled == Some(false) {
        ops.admin.socket = None;
    }
    if let Some(t) = &admin.tier_overrides {
        ops.admin.tier_overrides = path(cx, t, "admin.tier_overrides")?;
    }

    if let Some(p) = &record.path {
        ops.record = Some(path(cx, p, "record.path")?);
    }
    Ok(ops)
}

/// Lines for `check-config` (no secrets: the token is shown as set or not, the
/// webhook by host).
pub fn describe(ops: &OpsConfig) -> String {
    let mut out = String::new();
    let a = &ops.alerts;
    if a.enabled() {
        out.push_str(&format!(
            "alerts: {}{}{} (timeout {:?}, queue {})\n",
            // Only that it is set: a command line may carry a token, and check-config
            // runs at every start under systemd, into the journal.
            if a.command.is_some() {
                "a command (set)"
            } else {
                ""
            },
            if a.command.is_some() && a.webhook_url.is_some() {
                ", "
            } else {
                ""
            },
            a.webhook_url.as_ref().map_or(String::new(), |u| format!(
                "webhook {}{}{}",
                u.for_logs(),
                if a.webhook_token.is_some() {
                    " with a bearer token"
                } else {
                    ""
                },
                match (&a.webhook_ca, u.tls) {
                    (Some(ca), _) => format!(", verified against {}", ca.path.display()),
                    (None, true) => ", verified against the system's CAs".to_string(),
                    (None, false) => String::new(),
                }
            )),
            a.timeout,
            a.queue
        ));
    } else {
        out.push_str("alerts: off\n");
    }
    match ops.metrics {
        Some(m) => out.push_str(&format!("metrics: http://{m}/metrics\n")),
        None => out.push_str("metrics: off\n"),
    }
    match &ops.admin.socket {
        Some(p) => out.push_str(&format!(
            "admin socket: {} (tier overrides in {})\n",
            p.display(),
            ops.admin.tier_overrides.display()
        )),
        None => out.push_str("admin socket: off\n"),
    }
    match &ops.record {
        Some(p) => out.push_str(&format!("recording requests to {}\n", p.display())),
        None => out.push_str("recording: off\n"),
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn webhook_urls_are_http_or_https_with_host_and_path() {
        let u = HttpUrl::parse("http://alerts.example:8080/hook?x=1").unwrap();
        assert!(!u.tls);
        assert_eq!(u.host, "alerts.example");
        assert_eq!(u.authority, "alerts.example:8080");
        assert_eq!(u.connect, "alerts.example:8080");
        assert_eq!(u.path, "/hook?x=1");
        let u = HttpUrl::parse("http://[::1]").unwrap();
        assert_eq!(u.host, "::1");
        assert_eq!(u.connect, "[::1]:80");
        assert_eq!(u.path, "/");
        let u = HttpUrl::parse("https://hooks.example?k=v").unwrap();
        assert!(u.tls);
        assert_eq!(u.host, "hooks.example");
        assert_eq!(u.connect, "hooks.example:443");
        assert_eq!(u.path, "/?k=v");
        assert_eq!(u.for_logs(), "https://hooks.example/...");
        let u = HttpUrl::parse("https://[2001:db8::1]:8443/x").unwrap();
        assert_eq!(u.host, "2001:db8::1");
        assert_eq!(u.connect, "[2001:db8::1]:8443");
        assert!(HttpUrl::parse("ftp://x/").is_err());
        assert!(HttpUrl::parse("http://user:pw@x/").is_err());
        assert!(HttpUrl::parse("http:///x").is_err());
        assert!(HttpUrl::parse("https://x:port/").is_err());
        assert!(HttpUrl::parse("https://:443/").is_err());
    }

    #[test]
    fn urls_and_secrets_are_redacted() {
        assert_eq!(
            redact("http://u:pw@hooks.example/abc?token=s3cret"),
            "http://hooks.example/..."
        );
        assert_eq!(format!("{:?}", Secret("s3cret".into())), "Secret(***)");
        let mut ops = OpsConfig::default();
        ops.alerts.webhook_url = HttpUrl::parse("http://h.example/x?token=abc").ok();
        ops.alerts.webhook_token = Some(Secret("s3cret".into()));
        let d = describe(&ops);
        assert!(
            d.contains("webhook http://h.example/... with a bearer token"),
            "{d}"
        );
        assert!(!d.contains("s3cret") && !d.contains("abc"), "{d}");
    }
}
