//! The admin socket and CLI, end to end: every command through the real
//! `ratelimit-policyd admin ...` binary against a real server.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Output;

use support::server::Server;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

const DEFER: &str = "DEFER_IF_PERMIT";

fn config() -> String {
    "[admin]\nsocket = \"admin.sock\"\ntier_overrides = \"state/overrides\"\n\n\
     [tiers.default]\nlimits = [\"2/1h\"]\n\n\
     [tiers.bulk]\nlimits = [\"100/1h\"]\n"
        .to_string()
}

/// Runs `ratelimit-policyd --socket SOCKET admin ARGS` off the runtime's thread.
async fn cli(socket: &Path, args: &[&str]) -> Output {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_ratelimit-policyd"));
    cmd.arg("admin").arg("--socket").arg(socket).args(args);
    tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap()
}

async fn ok(socket: &Path, args: &[&str]) -> String {
    let out = cli(socket, args).await;
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(out.status.success(), "admin {args:?} failed: {stderr}");
    stdout
}

fn socket(dir: &Path) -> PathBuf {
    dir.join("admin.sock")
}

#[tokio::test]
async fn the_admin_socket_is_private() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Server::start_in(dir.path(), &config()).await;
    let mode = std::fs::metadata(socket(dir.path()))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "mode {mode:o}");
    srv.stop().await;
    assert!(
        !socket(dir.path()).exists(),
        "the socket is removed at shutdown"
    );
}

#[tokio::test]
async fn every_admin_command_works_through_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let sock = socket(dir.path());
    let srv = Server::start_in(dir.path(), &config()).await;
    let mut c = srv.client().await;
    assert_eq!(c.eom("Alice@Example.com", "m1", "192.0.2.1").await, "DUNNO");
    assert_eq!(c.eom("alice@example.com", "m2", "192.0.2.2").await, "DUNNO");
    assert!(
        c.eom("alice@example.com", "m3", "192.0.2.2")
            .await
            .starts_with(DEFER)
    );
    assert_eq!(c.eom("bob@example.com", "b1", "192.0.2.7").await, "DUNNO");

    // show
    let out = ok(&sock, &["show", "ALICE@example.com"]).await;
    assert!(out.contains("user:    alice@example.com"), "{out}");
    assert!(out.contains("tier:    default"), "{out}");
    assert!(out.contains("2/1h"), "{out}");
    assert!(out.contains("used        2"), "{out}");
    assert!(out.contains("BLOCKED: retry in "), "{out}");
    assert!(out.contains("clients: 192.0.2.2 192.0.2.1"), "{out}");
    let json = ok(&sock, &["--json", "show", "alice@example.com"]).await;
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["blocked"], true);
    assert_eq!(v["limits"][0]["used"], 2);
    assert_eq!(v["limits"][0]["refusing"], true);
    assert!(v["retry_after_secs"].as_u64().unwrap() > 3000);

    // top
    let out = ok(&sock, &["top", "5"]).await;
    let rows: Vec<&str> = out.lines().skip(1).collect();
    assert_eq!(rows.len(), 2, "{out}");
    assert!(
        rows[0].starts_with("alice@example.com") && rows[0].contains("2 / 2"),
        "{out}"
    );
    assert!(rows[1].starts_with("bob@example.com"), "{out}");
    let out = ok(&sock, &["top", "1"]).await;
    assert_eq!(out.lines().count(), 2, "{out}");

    // stats
    let out = ok(&sock, &["stats"]).await;
    assert!(out.contains("end_of_message 4"), "{out}");
    assert!(out.contains("tier default: allow 3, defer 1"), "{out}");
    assert!(out.contains("connections: 1 open, 1 total"), "{out}");
    assert!(out.contains("incidents:   1"), "{out}");

    // reset
    let out = ok(&sock, &["reset", "alice@example.com"]).await;
    assert_eq!(out, "alice@example.com: counters reset (unblocked)\n");
    assert!(
        ok(&sock, &["show", "alice@example.com"])
            .await
            .contains("status:  ok")
    );
    assert_eq!(c.eom("alice@example.com", "m4", "192.0.2.2").await, "DUNNO");
    let out = ok(&sock, &["reset", "nobody@example.com"]).await;
    assert!(out.contains("nothing was recorded"), "{out}");

    // tier
    let out = ok(&sock, &["tier", "alice@example.com", "bulk"]).await;
    assert!(
        out.starts_with("alice@example.com: tier bulk (was default); saved in "),
        "{out}"
    );
    assert!(
        ok(&sock, &["show", "alice@example.com"])
            .await
            .contains("tier:    bulk")
    );
    let persisted = std::fs::read_to_string(dir.path().join("state/overrides")).unwrap();
    assert!(
        persisted.lines().any(|l| l == "alice@example.com bulk"),
        "{persisted}"
    );
    for i in 0..5 {
        assert_eq!(
            c.eom("alice@example.com", &format!("t{i}"), "192.0.2.2")
                .await,
            "DUNNO"
        );
    }
    let bad = cli(&sock, &["tier", "alice@example.com", "gold"]).await;
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.contains("no tier is called \"gold\" (tiers: bulk, default)"),
        "{err}"
    );

    // reload: a new tier appears; the override stays.
    let text = config() + "\n[tiers.trial]\nlimits = [\"1/1h\"]\n";
    std::fs::write(&srv.config_path, text).unwrap();
    let out = ok(&sock, &["reload"]).await;
    assert!(out.starts_with("reloaded "), "{out}");
    assert!(srv.daemon.policy.config().tiers.map.get("trial").is_some());
    assert!(
        ok(&sock, &["show", "alice@example.com"])
            .await
            .contains("tier:    bulk")
    );
    std::fs::write(&srv.config_path, "[tiers.default]\nlimits = [\"0/1h\"]\n").unwrap();
    let bad = cli(&sock, &["reload"]).await;
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.contains("ratelimit.toml:2: tiers.default.limits"),
        "{err}"
    );
    assert!(
        srv.daemon.policy.config().tiers.map.get("trial").is_some(),
        "the old config is kept"
    );

    drop(c);
    srv.stop().await;
}

#[tokio::test]
async fn unknown_commands_get_an_error_reply_and_the_connection_stays_open() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Server::start_in(dir.path(), &config()).await;
    let s = tokio::net::UnixStream::connect(socket(dir.path()))
        .await
        .unwrap();
    let (r, mut w) = s.into_split();
    let mut r = BufReader::new(r);
    let mut ask = async |line: &str| {
        w.write_all(line.as_bytes()).await.unwrap();
        let mut reply = String::new();
        r.read_line(&mut reply).await.unwrap();
        serde_json::from_str::<serde_json::Value>(&reply).unwrap()
    };
    let v = ask("{\"cmd\":\"frobnicate\"}\n").await;
    assert_eq!(v["ok"], false);
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("unknown variant `frobnicate`"),
        "{v}"
    );
    let v = ask("this is not json\n").await;
    assert_eq!(v["ok"], false);
    let v = ask("{\"cmd\":\"show\"}\n").await;
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("missing field `user`"),
        "{v}"
    );
    let v = ask("\n").await;
    assert_eq!(v["ok"], false);
    let v = ask("{\"cmd\":\"stats\"}\n").await;
    assert_eq!(v["ok"], true, "{v}");
    assert!(v["result"]["requests"].is_object());
    let v = ask("{\"cmd\":\"top\"}\n").await;
    assert_eq!(v["result"]["senders"], serde_json::json!([]));
    srv.stop().await;
}

#[tokio::test]
async fn a_tier_move_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let sock = socket(dir.path());
    let srv = Server::start_in(dir.path(), &config()).await;
    ok(&sock, &["tier", "carol@example.com", "bulk"]).await;
    ok(&sock, &["tier", "@partner.example", "bulk"]).await;
    srv.stop().await;

    let srv = Server::start_in(dir.path(), &config()).await;
    let out = ok(&sock, &["show", "carol@example.com"]).await;
    assert!(out.contains("tier:    bulk"), "{out}");
    let out = ok(&sock, &["show", "anyone@partner.example"]).await;
    assert!(out.contains("tier:    bulk"), "{out}");
    let mut c = srv.client().await;
    for i in 0..5 {
        assert_eq!(
            c.eom("carol@example.com", &format!("m{i}"), "192.0.2.1")
                .await,
            "DUNNO"
        );
    }
    // A tier later removed from the configuration: the override is skipped, not fatal.
    drop(c);
    srv.stop().await;
    let text = config().replace("[tiers.bulk]\nlimits = [\"100/1h\"]\n", "");
    let srv = Server::start_in(dir.path(), &text).await;
    let out = ok(&sock, &["show", "carol@example.com"]).await;
    assert!(out.contains("tier:    default"), "{out}");
    srv.stop().await;
}

#[tokio::test]
async fn the_cli_finds_the_socket_from_the_config_and_reports_a_dead_one() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Server::start_in(dir.path(), &config()).await;
    let cfg = srv.config_path.clone();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_ratelimit-policyd"));
    cmd.arg("--config").arg(&cfg).args(["admin", "stats"]);
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    srv.stop().await;
    let out = cli(&socket(dir.path()), &["stats"]).await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot connect to the admin socket"));
}

/// Names are client text: the CLI's human-readable output writes their control
/// characters as escapes (an `ESC [` sequence must not drive the operator's
/// terminal); `--json` keeps the original, which JSON escapes by itself.
#[tokio::test]
async fn the_cli_escapes_control_characters_in_the_names_it_prints() {
    let dir = tempfile::tempdir().unwrap();
    let sock = socket(dir.path());
    let srv = Server::start_in(dir.path(), &config()).await;
    let mut c = srv.client().await;
    let evil = "ev\x1b[2jil\rx\u{9b}y";
    let shown = r"ev\x1b[2jil\rx\u{9b}y";
    for i in 0..3 {
        c.eom(evil, &format!("m{i}"), "192.0.2.1").await;
    }
    let raw: &[char] = &['\x1b', '\r', '\u{9b}'];
    for args in [
        &["show", evil][..],
        &["top"][..],
        &["tier", "alice", evil][..],
        &["reset", evil][..],
    ] {
        let out = cli(&sock, args).await;
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(text.contains(shown), "admin {args:?}: {text:?}");
        assert!(!text.contains(raw), "admin {args:?}: {text:?}");
    }
    let json = ok(&sock, &["--json", "show", evil]).await;
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["user"], evil);
    drop(c);
    srv.stop().await;
}

/// `admin tier` never writes a line the next start could not read, and a bad line
/// written by hand is skipped with a warning naming file:line, not a failed start.
#[tokio::test]
async fn a_bad_overrides_line_is_skipped_and_admin_tier_refuses_names_the_file_cannot_hold() {
    let dir = tempfile::tempdir().unwrap();
    let sock = socket(dir.path());
    let overrides = dir.path().join("state/overrides");
    std::fs::create_dir_all(overrides.parent().unwrap()).unwrap();
    std::fs::write(&overrides, "alice bulk\njohn smith bulk\nbob bulk\n").unwrap();
    let logs = support::logs::Logs::default();
    let guard = logs.capture(tracing::Level::WARN);
    let srv = Server::start_in(dir.path(), &config()).await;
    drop(guard);
    let text = logs.text();
    assert!(
        text.contains(&format!(
            "{}:2: expected \"user tier\"",
            overrides.display()
        )),
        "{text}"
    );
    let map = &srv.daemon.policy.config().tiers.map;
    assert_eq!(map.tier_of("alice").name(), "bulk");
    assert_eq!(map.tier_of("bob").name(), "bulk");

    let before = std::fs::read_to_string(&overrides).unwrap();
    for user in ["john smith", "a#b", "eve\nmallory"] {
        let bad = cli(&sock, &["tier", user, "bulk"]).await;
        assert!(!bad.status.success(), "{user:?}");
        let err = String::from_utf8_lossy(&bad.stderr);
        assert!(
            err.contains("cannot be kept in the tier overrides file"),
            "{err}"
        );
    }
    assert_eq!(std::fs::read_to_string(&overrides).unwrap(), before);
    srv.stop().await;
}
