//! `https://` alert webhooks, end to end: a CA and server certificates made here
//! (rcgen), a tokio-rustls HTTPS server that records what it receives, and the
//! in-process policy server raising an incident. The certificate must chain to
//! `[alerts] webhook_ca_file` (or the system's CAs) and be valid for the URL's host.

mod support;

use std::sync::Arc;
use std::sync::atomic::Ordering;

use ratelimit_policyd::config;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::ServerConfig;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use support::logs::Logs;
use support::server::{Server, eventually};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A CA: its certificate (PEM, for `webhook_ca_file`) and what signs with it.
struct Ca {
    pem: String,
    der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

fn ca(name: &str) -> Ca {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let cert = params.self_signed(&key).unwrap();
    Ca {
        pem: cert.pem(),
        der: cert.der().clone(),
        issuer: Issuer::new(params, key),
    }
}

/// A server certificate for `names` signed by `ca`.
fn server_config(ca: &Ca, names: &[&str]) -> Arc<ServerConfig> {
    let key = KeyPair::generate().unwrap();
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let params = CertificateParams::new(names).unwrap();
    let cert = params.signed_by(&key, &ca.issuer).unwrap();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    #[allow(deprecated)] // the same provider as the client (see ops/webhook.rs)
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone(), ca.der.clone()], key)
        .unwrap();
    Arc::new(config)
}

/// What the HTTPS server saw on its one connection.
#[derive(Debug)]
enum Seen {
    /// A request (head and body) and the SNI name the client sent.
    Request { sni: Option<String>, text: String },
    /// The TLS handshake failed on the server's side too.
    HandshakeFailed,
}

/// An HTTPS server on 127.0.0.1 that accepts one connection, records the request
/// and answers 204. Returns the port and what it saw.
async fn https_server(config: Arc<ServerConfig>) -> (u16, tokio::task::JoinHandle<Seen>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let h = tokio::spawn(async move {
        let (tcp, _) = l.accept().await.unwrap();
        let mut s = match acceptor.accept(tcp).await {
            Ok(s) => s,
            Err(_) => return Seen::HandshakeFailed,
        };
        let sni = s.get_ref().1.server_name().map(str::to_string);
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let n = s.read(&mut chunk).await.unwrap();
            buf.extend_from_slice(&chunk[..n]);
            let text = String::from_utf8_lossy(&buf).to_string();
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("Content-Length: "))
                    .unwrap()
                    .parse()
                    .unwrap();
                if body.len() >= len {
                    break;
                }
            }
            assert!(n > 0, "the client hung up mid-request: {buf:?}");
        }
        s.write_all(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n")
            .await
            .unwrap();
        s.shutdown().await.unwrap();
        Seen::Request {
            sni,
            text: String::from_utf8(buf).unwrap(),
        }
    });
    (port, h)
}

fn policy(alerts: &str) -> String {
    format!("[tiers.default]\nlimits = [\"2/1h\"]\n\n[alerts]\ntimeout = \"10s\"\n{alerts}")
}

/// Sends `frank` over his limit: one incident, one alert.
async fn raise_incident(srv: &Server) {
    let mut c = srv.client().await;
    for i in 0..3 {
        c.eom("frank", &format!("m{i}"), "203.0.113.5").await;
    }
}

#[tokio::test]
async fn an_https_webhook_verified_against_the_configured_ca_gets_the_post() {
    let logs = Logs::default();
    let _guard = logs.capture(tracing::Level::DEBUG);
    let ca = ca("ratelimit test CA");
    let (port, seen) = https_server(server_config(&ca, &["localhost"])).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.pem"), &ca.pem).unwrap();
    let srv = Server::start_in(
        dir.path(),
        &policy(&format!(
            "webhook_url = \"https://localhost:{port}/hooks/rl?src=test\"\n\
             webhook_token = \"s3cret-t0ken\"\nwebhook_ca_file = \"ca.pem\"\n"
        )),
    )
    .await;
    raise_incident(&srv).await;
    let Seen::Request { sni, text } = seen.await.unwrap() else {
        panic!("the handshake failed:\n{}", logs.text());
    };
    assert_eq!(sni.as_deref(), Some("localhost"), "SNI is the URL's host");
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    assert!(
        head.starts_with("POST /hooks/rl?src=test HTTP/1.1\r\n"),
        "{head}"
    );
    let headers: Vec<&str> = head.lines().collect();
    let host = format!("Host: localhost:{port}");
    assert!(headers.contains(&host.as_str()), "{head}");
    assert!(
        headers.contains(&"Authorization: Bearer s3cret-t0ken"),
        "{head}"
    );
    assert!(
        headers.contains(&"Content-Type: application/json"),
        "{head}"
    );
    let v: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(v["event"], "incident");
    assert_eq!(v["user"], "frank");
    assert_eq!(v["limit"], "2/1h");
    assert_eq!(v["client"], "203.0.113.5");
    let alerts = &srv.daemon.ops.alerts;
    eventually("the webhook", || alerts.sent.load(Ordering::Relaxed) == 1).await;
    assert_eq!(alerts.failed.load(Ordering::Relaxed), 0);
    srv.stop().await;
    let text = logs.text();
    assert!(text.contains("alert webhook sent"), "{text}");
    assert!(text.contains("https://localhost:"), "{text}");
    assert!(!text.contains("s3cret"), "the token was logged:\n{text}");
}

/// The failure both sides see when the client refuses the server's certificate.
async fn refused(
    srv: Server,
    logs: &Logs,
    seen: tokio::task::JoinHandle<Seen>,
    host: &str,
) -> String {
    raise_incident(&srv).await;
    match seen.await.unwrap() {
        Seen::HandshakeFailed => {}
        Seen::Request { text, .. } => panic!("delivered to an untrusted server:\n{text}"),
    }
    let alerts = &srv.daemon.ops.alerts;
    eventually("the failed webhook", || {
        alerts.failed.load(Ordering::Relaxed) == 1
    })
    .await;
    assert_eq!(alerts.sent.load(Ordering::Relaxed), 0);
    srv.stop().await;
    let text = logs.text();
    let line = text
        .lines()
        .find(|l| l.contains("alert webhook failed"))
        .unwrap_or_else(|| panic!("no warning:\n{text}"));
    assert!(line.contains("WARN"), "{line}");
    assert!(
        line.contains(&format!("TLS handshake with {host} failed")),
        "the warning names the host: {line}"
    );
    line.to_string()
}

#[tokio::test]
async fn a_server_certificate_from_another_ca_is_refused_and_nothing_is_sent() {
    let logs = Logs::default();
    let _guard = logs.capture(tracing::Level::INFO);
    let trusted = ca("trusted CA");
    let other = ca("another CA");
    let (port, seen) = https_server(server_config(&other, &["localhost"])).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.pem"), &trusted.pem).unwrap();
    let srv = Server::start_in(
        dir.path(),
        &policy(&format!(
            "webhook_url = \"https://localhost:{port}/hook\"\nwebhook_ca_file = \"ca.pem\"\n"
        )),
    )
    .await;
    let line = refused(srv, &logs, seen, "localhost").await;
    assert!(
        line.contains("invalid peer certificate: UnknownIssuer"),
        "the warning says why: {line}"
    );
}

#[tokio::test]
async fn without_a_ca_file_the_system_store_does_not_trust_a_private_ca() {
    let logs = Logs::default();
    let _guard = logs.capture(tracing::Level::INFO);
    let private = ca("private CA");
    let (port, seen) = https_server(server_config(&private, &["localhost"])).await;
    let srv = Server::start(&policy(&format!(
        "webhook_url = \"https://localhost:{port}/hook\"\n"
    )))
    .await;
    let line = refused(srv, &logs, seen, "localhost").await;
    assert!(line.contains("invalid peer certificate"), "{line}");
}

#[tokio::test]
async fn a_certificate_for_another_host_is_refused() {
    let logs = Logs::default();
    let _guard = logs.capture(tracing::Level::INFO);
    let ca = ca("ratelimit test CA");
    // Valid for localhost only; the URL names 127.0.0.1.
    let (port, seen) = https_server(server_config(&ca, &["localhost"])).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.pem"), &ca.pem).unwrap();
    let srv = Server::start_in(
        dir.path(),
        &policy(&format!(
            "webhook_url = \"https://127.0.0.1:{port}/hook\"\nwebhook_ca_file = \"ca.pem\"\n"
        )),
    )
    .await;
    let line = refused(srv, &logs, seen, "127.0.0.1").await;
    assert!(
        line.contains("certificate not valid for name \"127.0.0.1\""),
        "{line}"
    );
}

fn load(dir: &std::path::Path, alerts: &str) -> Result<config::Config, String> {
    let path = dir.join("r.toml");
    std::fs::write(&path, policy(alerts)).unwrap();
    config::load(&path).map_err(|e| e.to_string())
}

#[test]
fn webhook_ca_file_errors_name_the_key_and_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("empty.pem"), "no certificate here\n").unwrap();
    std::fs::write(
        d.join("bad.pem"),
        "-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    std::fs::write(d.join("ca.pem"), ca("x").pem).unwrap();

    let e = load(
        d,
        "webhook_url = \"http://h/x\"\nwebhook_ca_file = \"ca.pem\"\n",
    )
    .unwrap_err();
    assert!(
        e.contains("r.toml:7: alerts.webhook_ca_file: only used for an https:// webhook_url"),
        "{e}"
    );
    let https = "webhook_url = \"https://h/x\"\n";
    let e = load(d, &format!("{https}webhook_ca_file = \"missing.pem\"\n")).unwrap_err();
    assert!(
        e.contains("alerts.webhook_ca_file: cannot read ") && e.contains("missing.pem"),
        "{e}"
    );
    let e = load(d, &format!("{https}webhook_ca_file = \"empty.pem\"\n")).unwrap_err();
    assert!(
        e.contains("alerts.webhook_ca_file: ") && e.contains("empty.pem: no certificate in it"),
        "{e}"
    );
    let e = load(d, &format!("{https}webhook_ca_file = \"bad.pem\"\n")).unwrap_err();
    assert!(e.contains("bad.pem: not a PEM certificate file"), "{e}");
    let c = load(d, &format!("{https}webhook_ca_file = \"ca.pem\"\n")).unwrap();
    let ca = c.ops.alerts.webhook_ca.unwrap();
    assert_eq!(ca.path, d.join("ca.pem"));
    assert_eq!(ca.certs.len(), 1);
    let e = load(d, "webhook_url = \"ftp://h/x\"\n").unwrap_err();
    assert!(e.contains("only http:// and https:// URLs"), "{e}");
}
