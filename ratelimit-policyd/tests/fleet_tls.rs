//! A real server with its Redis store over TLS (`rediss://`, `[store] redis_ca_file`),
//! against the TLS-only `redis-server` of `scripts/with-redis-tls`. `scripts/test`
//! runs this.

mod support;

use std::path::Path;

use support::proc::{Daemon, accepted, free_port, tempdir};

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: run through scripts/with-redis-tls (scripts/test does)")
    })
}

fn config(path: &Path, port: u16, ca: &str, test: &str) {
    std::fs::write(
        path,
        format!(
            "[server]\nlisten = [\"127.0.0.1:{port}\"]\ndecision_timeout = \"2s\"\n\n\
             [store]\nbackend = \"redis\"\nredis_url = \"{}\"\nredis_ca_file = \"{ca}\"\n\
             redis_client_cert_file = \"{}\"\nredis_client_key_file = \"{}\"\n\
             redis_key_prefix = \"rl-tls-{}-{test}:\"\n\
             redis_connect_timeout = \"1s\"\nredis_command_timeout = \"1s\"\n\n\
             [tiers.default]\nlimits = [\"5/1h\"]\n",
            env("RATELIMIT_TEST_REDIS_TLS_URL"),
            env("RATELIMIT_TEST_REDIS_CLIENT_CERT_FILE"),
            env("RATELIMIT_TEST_REDIS_CLIENT_KEY_FILE"),
            std::process::id()
        ),
    )
    .unwrap();
}

#[test]
#[ignore = "needs redis-server with TLS and openssl (scripts/test runs it under scripts/with-redis-tls)"]
fn the_right_ca_connects_and_limits() {
    let dir = tempdir("fleet-tls-ok");
    let port = free_port();
    config(
        &dir.join("t.toml"),
        port,
        &env("RATELIMIT_TEST_REDIS_CA_FILE"),
        "ok",
    );
    let d = Daemon::start(&["--config", dir.join("t.toml").to_str().unwrap()], port);
    d.wait_for_log("connected to Redis");
    let mut s = d.connect();
    assert_eq!(accepted(&mut s, "alice@example.com", "m", 8), 5);
}

#[test]
#[ignore = "needs redis-server with TLS and openssl (scripts/test runs it under scripts/with-redis-tls)"]
fn a_wrong_ca_is_a_clear_warning_at_start_and_answers_follow_on_store_error() {
    let dir = tempdir("fleet-tls-wrong");
    let port = free_port();
    config(
        &dir.join("t.toml"),
        port,
        &env("RATELIMIT_TEST_REDIS_WRONG_CA_FILE"),
        "wrong",
    );
    let d = Daemon::start(&["--config", dir.join("t.toml").to_str().unwrap()], port);
    d.wait_for_log("Redis is not answering yet");
    let log = d.log.lock().unwrap().clone();
    assert!(log.contains(&env("RATELIMIT_TEST_REDIS_TLS_URL")), "{log}");
    assert!(log.contains("invalid peer certificate"), "{log}");
    assert!(log.contains("the TLS handshake failed"), "{log}");
    assert!(!log.contains("connected to Redis"), "{log}");
    // on_store_error = "open" (the default): every message passes, none counted.
    let mut s = d.connect();
    assert_eq!(accepted(&mut s, "alice@example.com", "m", 8), 8);
}
