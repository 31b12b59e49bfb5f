//! The webhook client: one HTTP/1.1 POST (`Connection: close`) per alert, over plain
//! TCP for `http://` and over TLS (rustls) for `https://`.
//!
//! TLS always verifies the server: its certificate must chain to a trusted CA and be
//! valid for the URL's host, which is also sent as SNI. The trusted CAs are the
//! system's (`rustls-native-certs`: on Debian `/etc/ssl/certs`, from the
//! `ca-certificates` package) or, when `[alerts] webhook_ca_file` is set, only the
//! certificates in that file (a private CA). There is no way to turn verification off.

use std::fmt;
use std::sync::Arc;

use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_rustls::TlsConnector;

use crate::config::ops::{CaFile, HttpUrl, Secret};

/// Why a POST did not get an answer.
#[derive(Debug)]
pub enum WebhookError {
    /// The TCP connection could not be made.
    Connect(std::io::Error),
    /// No CA to verify the server with (an empty system store).
    NoRoots(String),
    /// The TLS handshake failed: a certificate that does not verify, a protocol error.
    Tls {
        /// The host the certificate had to be valid for.
        host: String,
        /// The reason (rustls' error).
        error: std::io::Error,
    },
    /// The host is not a valid DNS name or IP address for TLS.
    ServerName(String),
    /// Reading or writing the request or the response failed.
    Io(std::io::Error),
    /// The answer did not start with an HTTP status line.
    NotHttp,
}

impl fmt::Display for WebhookError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WebhookError::Connect(e) => write!(f, "cannot connect: {e}"),
            WebhookError::NoRoots(why) => write!(f, "no CA certificate to verify with: {why}"),
            WebhookError::Tls { host, error } => {
                write!(f, "TLS handshake with {host} failed: {error}")
            }
            WebhookError::ServerName(host) => {
                write!(f, "\"{host}\" is not a host name TLS can verify")
            }
            WebhookError::Io(e) => write!(f, "{e}"),
            WebhookError::NotHttp => f.write_str("not an HTTP response"),
        }
    }
}

impl std::error::Error for WebhookError {}

/// The TLS client configuration, built once per set of trusted CAs: the alert worker
/// keeps one and rebuilds it only when a reload changes `webhook_ca_file` (reading
/// the system store for every alert would cost more than the alert).
#[derive(Default)]
pub struct TlsClient {
    built: Option<(Option<CaFile>, Arc<ClientConfig>)>,
}

impl TlsClient {
    /// The configuration trusting `ca` (or the system's CAs).
    pub fn config(&mut self, ca: Option<&CaFile>) -> Result<Arc<ClientConfig>, WebhookError> {
        if let Some((built_for, config)) = &self.built
            && built_for.as_ref() == ca
        {
            return Ok(Arc::clone(config));
        }
        let config = Arc::new(client_config(ca)?);
        self.built = Some((ca.cloned(), Arc::clone(&config)));
        Ok(config)
    }
}

/// rustls with the ring provider, the safe default protocol versions, and the roots.
fn client_config(ca: Option<&CaFile>) -> Result<ClientConfig, WebhookError> {
    let mut roots = RootCertStore::empty();
    match ca {
        Some(ca) => {
            for cert in &ca.certs {
                roots
                    .add(cert.clone())
                    .map_err(|e| WebhookError::NoRoots(format!("{}: {e}", ca.path.display())))?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for e in &found.errors {
                tracing::warn!(error = %e, "reading the system's CA certificates");
            }
            roots.add_parsable_certificates(found.certs);
            if roots.is_empty() {
                return Err(WebhookError::NoRoots(
                    "none in the system store (install ca-certificates, or set [alerts] webhook_ca_file)"
                        .into(),
                ));
            }
        }
    }
    // ring rather than rustls' default aws-lc-rs, whose C build is far heavier.
    // rustls 0.23.48 deprecated ring's provider for lacking post-quantum key
    // exchange; an alert (a user name, a limit, client addresses) is not a secret
    // that must outlive a future quantum computer, so classical ECDHE is enough.
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| WebhookError::NoRoots(format!("TLS setup: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(config)
}

/// Largest response head read from a webhook.
const MAX_RESPONSE_HEAD: usize = 8192;

/// POSTs `body` to `url` (TLS for https, verified with `tls`); returns the status code.
/// The caller bounds the time it takes.
pub async fn post(
    url: &HttpUrl,
    token: Option<&Secret>,
    body: &[u8],
    tls: Option<Arc<ClientConfig>>,
) -> Result<u16, WebhookError> {
    let tcp = tokio::net::TcpStream::connect(&url.connect)
        .await
        .map_err(WebhookError::Connect)?;
    if !url.tls {
        return exchange(tcp, url, token, body).await;
    }
    let Some(config) = tls else {
        return Err(WebhookError::NoRoots("no TLS configuration".into()));
    };
    let name = ServerName::try_from(url.host.clone())
        .map_err(|_| WebhookError::ServerName(url.host.clone()))?;
    let stream = TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(|error| WebhookError::Tls {
            host: url.host.clone(),
            error,
        })?;
    exchange(stream, url, token, body).await
}

/// Writes the request and reads the status line.
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    url: &HttpUrl,
    token: Option<&Secret>,
    body: &[u8],
) -> Result<u16, WebhookError> {
    let mut head = format!(
        "POST {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: ratelimit-policyd/{}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n",
        url.path,
        url.authority,
        env!("CARGO_PKG_VERSION"),
        body.len()
    );
    if let Some(t) = token {
        head.push_str("Authorization: Bearer ");
        head.push_str(t.expose());
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    let io = WebhookError::Io;
    stream.write_all(head.as_bytes()).await.map_err(io)?;
    stream.write_all(body).await.map_err(io)?;
    stream.flush().await.map_err(io)?;
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 1024];
    while !buf.windows(2).any(|w| w == b"\r\n") && buf.len() < MAX_RESPONSE_HEAD {
        let n = stream.read(&mut chunk).await.map_err(io)?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(chunk.get(..n).unwrap_or(&[]));
    }
    let line = buf.split(|b| *b == b'\n').next().unwrap_or(&[]);
    let line = String::from_utf8_lossy(line);
    let mut words = line.split_whitespace();
    match (
        words.next(),
        words.next().and_then(|c| c.parse::<u16>().ok()),
    ) {
        (Some(v), Some(code)) if v.starts_with("HTTP/") => Ok(code),
        _ => Err(WebhookError::NotHttp),
    }
}
