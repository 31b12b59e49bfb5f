//! The Redis store over TLS, against a real `redis-server --tls-port` started by
//! `scripts/with-redis-tls` (which generates the CA and certificates with openssl and
//! sets the `RATELIMIT_TEST_REDIS_TLS_*` / `..._CA_FILE` variables). `scripts/test`
//! runs these.
#![cfg(feature = "redis")]

use std::time::{Duration, Instant};

use ratelimit_core::store::redis::TlsClientCert;
use ratelimit_core::store::{RedisStore, RedisStoreConfig};
use ratelimit_core::{Cost, Limit, Mode, Store, StoreError, Timestamp};

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is not set: run these tests through scripts/with-redis-tls (scripts/test does)"
        )
    })
}

fn read(var: &str) -> Vec<u8> {
    let path = env(var);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{var}={path}: {e}"))
}

fn config(test: &str, url: String) -> RedisStoreConfig {
    let mut c = RedisStoreConfig::new(url);
    c.key_prefix = format!("rltls:{}:{test}:", std::process::id());
    c.connect_timeout = Duration::from_secs(2);
    c
}

/// Two admitted, the third refused: a decision round-trips through the script.
fn decides(store: &RedisStore) {
    let limits: [Limit; 1] = ["2/1m".parse().unwrap()];
    let t = Timestamp::from_millis(1_700_000_000_000);
    let mut admitted = Vec::new();
    for _ in 0..3 {
        let d = store
            .check(
                "alice@example.com",
                &limits,
                Cost::units(1),
                t,
                Mode::Acquire,
            )
            .unwrap();
        admitted.push(d.is_allowed());
    }
    assert_eq!(admitted, [true, true, false]);
}

fn unavailable(store: &RedisStore) -> String {
    match store.ping() {
        Err(StoreError::Unavailable(msg)) => {
            eprintln!("as expected: {msg}");
            msg
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
}

#[test]
#[ignore = "needs redis-server with TLS and openssl (scripts/test runs it under scripts/with-redis-tls)"]
fn rediss_with_the_private_ca_decides() {
    let c = config("ca", env("RATELIMIT_TEST_REDIS_TLS_URL"))
        .with_tls_ca(read("RATELIMIT_TEST_REDIS_CA_FILE"));
    let store = RedisStore::new(c).unwrap();
    store.ping().unwrap();
    decides(&store);
}

#[test]
#[ignore = "needs redis-server with TLS and openssl (scripts/test runs it under scripts/with-redis-tls)"]
fn rediss_with_a_client_certificate_decides() {
    let mut c = config("mtls", env("RATELIMIT_TEST_REDIS_TLS_URL"))
        .with_tls_ca(read("RATELIMIT_TEST_REDIS_CA_FILE"));
    c.tls_client_cert = Some(TlsClientCert {
        cert_pem: read("RATELIMIT_TEST_REDIS_CLIENT_CERT_FILE"),
        key_pem: read("RATELIMIT_TEST_REDIS_CLIENT_KEY_FILE"),
    });
    let store = RedisStore::new(c).unwrap();
    decides(&store);
}

#[test]
#[ignore = "needs redis-server with TLS and openssl (scripts/test runs it under scripts/with-redis-tls)"]
fn a_wrong_ca_or_the_public_roots_fail_with_a_certificate_error() {
    let url = env("RATELIMIT_TEST_REDIS_TLS_URL");
    let wrong =
        config("wrong", url.clone()).with_tls_ca(read("RATELIMIT_TEST_REDIS_WRONG_CA_FILE"));
    // The test CA is in no public root store either.
    let public = config("public", url.clone());
    for c in [wrong, public] {
        let store = RedisStore::new(c).unwrap();
        let msg = unavailable(&store);
        assert!(msg.contains(&url), "{msg}");
        assert!(msg.contains("TLS handshake failed"), "{msg}");
        assert!(msg.to_lowercase().contains("certificate"), "{msg}");
        // And a decision fails the same way (the caller's failure policy applies).
        let limits: [Limit; 1] = ["2/1m".parse().unwrap()];
        let err = store
            .check(
                "a",
                &limits,
                Cost::units(1),
                Timestamp::from_millis(1),
                Mode::Acquire,
            )
            .unwrap_err();
        assert!(matches!(err, StoreError::Unavailable(_)), "{err}");
    }
}

#[test]
#[ignore = "needs redis-server with TLS and openssl (scripts/test runs it under scripts/with-redis-tls)"]
fn plain_text_to_the_tls_port_fails_clearly_and_fast() {
    let port = env("RATELIMIT_TEST_REDIS_TLS_PORT");
    let url = format!("redis://127.0.0.1:{port}/");
    let store = RedisStore::new(config("plain", url.clone())).unwrap();
    let start = Instant::now();
    let msg = unavailable(&store);
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
    assert!(msg.contains(&url), "{msg}");
    assert!(msg.contains("use a rediss:// URL"), "{msg}");
}
