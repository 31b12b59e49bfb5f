//! Counters that survive restarts (snapshots) and are shared through Redis.

mod support;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::proc::{Daemon, accepted, ask, free_port, tempdir};

fn snapshot_config(path: &Path, port: u16, snap: &Path, interval: &str, extra: &str) {
    std::fs::write(
        path,
        format!(
            "[server]\nlisten = [\"127.0.0.1:{port}\"]\n\n[store]\nsnapshot_path = \"{}\"\nsnapshot_interval = \"{interval}\"\n{extra}\n\n[tiers.default]\nlimits = [\"10/1h\"]\n",
            snap.display()
        ),
    )
    .unwrap();
}

#[test]
fn a_graceful_restart_keeps_every_count() {
    let dir = tempdir("graceful");
    let (cfg, snap, port) = (dir.join("p.toml"), dir.join("counters.snap"), free_port());
    snapshot_config(&cfg, port, &snap, "1h", "");
    let args = ["--config", cfg.to_str().unwrap()];
    let mut d = Daemon::start(&args, port);
    let mut s = d.connect();
    assert_eq!(accepted(&mut s, "a@example.com", "a", 7), 7);
    d.signal("TERM");
    assert!(d.child.wait().unwrap().success());
    drop(d);
    let d = Daemon::start(&args, port);
    d.wait_for_log("counters restored from snapshot");
    let mut s = d.connect();
    assert_eq!(
        accepted(&mut s, "a@example.com", "b", 10),
        3,
        "7 of 10 were sent before the restart"
    );
    assert_eq!(accepted(&mut s, "z@example.com", "z", 10), 10);
}

#[test]
fn after_kill_9_counts_from_before_the_last_snapshot_are_kept() {
    let dir = tempdir("kill9");
    let (cfg, snap, port) = (dir.join("p.toml"), dir.join("counters.snap"), free_port());
    snapshot_config(&cfg, port, &snap, "200ms", "");
    let args = ["--config", cfg.to_str().unwrap()];
    let mut d = Daemon::start(&args, port);
    let mut s = d.connect();
    assert_eq!(accepted(&mut s, "k@example.com", "a", 6), 6);
    // Wait until a snapshot written after those 6 exists.
    let since = std::time::SystemTime::now();
    let start = Instant::now();
    loop {
        let fresh = std::fs::metadata(&snap)
            .and_then(|m| m.modified())
            .is_ok_and(|t| t > since);
        if fresh {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no snapshot written"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    d.child.kill().unwrap(); // SIGKILL: no shutdown snapshot
    d.child.wait().unwrap();
    drop(d);
    let d = Daemon::start(&args, port);
    let mut s = d.connect();
    assert_eq!(
        accepted(&mut s, "k@example.com", "b", 10),
        4,
        "the 6 snapshotted messages still count"
    );
}

#[test]
fn a_corrupt_snapshot_refuses_to_start_unless_told_to_start_empty() {
    let dir = tempdir("corrupt");
    let (cfg, snap, port) = (dir.join("p.toml"), dir.join("counters.snap"), free_port());
    std::fs::write(
        &snap,
        b"RLSNAP\r\n\x01\x00\x00\x00garbage that is not a snapshot",
    )
    .unwrap();
    snapshot_config(&cfg, port, &snap, "1m", "");
    let out = Command::new(support::proc::BIN)
        .args(["--config", cfg.to_str().unwrap()])
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("counters.snap"), "{err}");
    assert!(err.contains("on_bad_snapshot = \"start-empty\""), "{err}");

    snapshot_config(&cfg, port, &snap, "1m", "on_bad_snapshot = \"start-empty\"");
    let d = Daemon::start(&["--config", cfg.to_str().unwrap()], port);
    assert!(d.log.lock().unwrap().contains("SNAPSHOT UNREADABLE"));
    let mut s = d.connect();
    assert_eq!(ask(&mut s, "e@example.com", "e"), "action=DUNNO");
}

// ------------------------------------------------------------------ Redis

fn redis_url() -> String {
    std::env::var("RATELIMIT_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/".into())
}

fn redis_config(path: &Path, port: u16, url: &str, prefix: &str, extra: &str) {
    std::fs::write(
        path,
        format!(
            "[server]\nlisten = [\"127.0.0.1:{port}\"]\ndecision_timeout = \"300ms\"\n{extra}\n\n[store]\nbackend = \"redis\"\nredis_url = \"{url}\"\nredis_key_prefix = \"{prefix}\"\nredis_connect_timeout = \"100ms\"\nredis_command_timeout = \"100ms\"\n\n[tiers.default]\nlimits = [\"10/1h\"]\n"
        ),
    )
    .unwrap();
}

#[test]
#[ignore = "needs redis-server; scripts/test runs it through scripts/with-redis"]
fn two_servers_sharing_redis_admit_exactly_the_limit_in_total() {
    let dir = tempdir("shared");
    let prefix = format!("rl-shared-{}:", std::process::id());
    let (p1, p2) = (free_port(), free_port());
    redis_config(&dir.join("a.toml"), p1, &redis_url(), &prefix, "");
    redis_config(&dir.join("b.toml"), p2, &redis_url(), &prefix, "");
    let a = Daemon::start(&["--config", dir.join("a.toml").to_str().unwrap()], p1);
    let b = Daemon::start(&["--config", dir.join("b.toml").to_str().unwrap()], p2);
    a.wait_for_log("connected to Redis");
    let (mut sa, mut sb) = (a.connect(), b.connect());
    let mut total = 0;
    for i in 0..15 {
        let s = if i % 2 == 0 { &mut sa } else { &mut sb };
        if ask(s, "roamer@example.com", &format!("r{i}")) == "action=DUNNO" {
            total += 1;
        }
    }
    assert_eq!(total, 10, "the fleet as a whole admits exactly the limit");
}

struct RedisProc {
    child: Child,
}

impl RedisProc {
    fn start(port: u16) -> RedisProc {
        RedisProc::start_with(port, &[])
    }

    fn start_with(port: u16, extra: &[&str]) -> RedisProc {
        let bin = std::env::var("REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
        let child = Command::new(bin)
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server not found: run the tests through scripts/test");
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "redis-server did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        RedisProc { child }
    }
}

impl Drop for RedisProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Redis's count of connections accepted since it started (`INFO stats`).
fn connections_received(port: u16) -> u64 {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"INFO stats\r\n").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut text = String::new();
    let mut buf = [0u8; 4096];
    while !text.contains("total_connections_received:") || !text.ends_with("\r\n") {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "redis closed the connection: {text}");
        text.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    text.lines()
        .find_map(|l| l.strip_prefix("total_connections_received:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no count in {text}"))
}

/// Under a burst of concurrent Postfix connections the server keeps as many Redis
/// connections as calls may be in flight (`max_store_calls_in_flight`), instead of
/// closing every one beyond a small pool after each call and opening it again: that
/// churn cost both this server and Redis a connection per decision.
#[test]
#[ignore = "needs redis-server; scripts/test installs it"]
fn concurrent_clients_reuse_redis_connections_instead_of_reopening_them() {
    const CLIENTS: usize = 48;
    const REQUESTS: usize = 40;
    let rport = free_port();
    let _redis = RedisProc::start(rport);
    let dir = tempdir("pool");
    let port = free_port();
    redis_config(
        &dir.join("a.toml"),
        port,
        &format!("redis://127.0.0.1:{rport}/"),
        "rl-pool:",
        "max_store_calls_in_flight = 64",
    );
    let d = Daemon::start(&["--config", dir.join("a.toml").to_str().unwrap()], port);
    d.wait_for_log("connected to Redis");
    let before = connections_received(rport);
    let answered = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        for c in 0..CLIENTS {
            let (d, answered) = (&d, &answered);
            s.spawn(move || {
                let mut conn = d.connect();
                for i in 0..REQUESTS {
                    let a = ask(
                        &mut conn,
                        &format!("user{c}@example.com"),
                        &format!("{c}-{i}"),
                    );
                    assert!(a.starts_with("action="), "{a}");
                    answered.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            });
        }
    });
    assert_eq!(answered.into_inner(), CLIENTS * REQUESTS);
    // Our own INFO connection counts once.
    let opened = connections_received(rport) - before - 1;
    assert!(
        opened <= 64,
        "{opened} Redis connections opened for {} decisions from {CLIENTS} clients",
        CLIENTS * REQUESTS
    );
}

fn timed_ask(s: &mut std::net::TcpStream, user: &str, inst: &str) -> (String, Duration) {
    let t = Instant::now();
    let a = ask(s, user, inst);
    (a, t.elapsed())
}

#[test]
#[ignore = "needs redis-server; scripts/test installs it"]
fn redis_down_gets_the_fail_answer_in_time_and_recovery_needs_no_restart() {
    let rport = free_port();
    let redis = RedisProc::start(rport);
    let dir = tempdir("fault");
    let url = format!("redis://127.0.0.1:{rport}/");
    let modes = [
        ("open", "action=DUNNO"),
        (
            "closed",
            "action=DEFER_IF_PERMIT 4.3.0 Rate limiter temporarily unavailable, try again later",
        ),
    ];
    let mut daemons = Vec::new();
    for (mode, _) in modes {
        let port = free_port();
        let cfg = dir.join(format!("{mode}.toml"));
        redis_config(
            &cfg,
            port,
            &url,
            &format!("rl-fault-{mode}-{}:", std::process::id()),
            &format!("on_store_error = \"{mode}\""),
        );
        let d = Daemon::start(&["--config", cfg.to_str().unwrap()], port);
        let mut s = d.connect();
        assert_eq!(
            accepted(&mut s, "f@example.com", "up", 12),
            10,
            "{mode}: normal decisions"
        );
        daemons.push((d, s));
    }
    drop(redis);

    // Redis is down: every request gets the configured fail answer within the
    // decision timeout (300 ms) plus scheduling slack; nothing hangs, nothing panics.
    for ((_, s), (mode, want)) in daemons.iter_mut().zip(modes) {
        for i in 0..10 {
            let (a, took) = timed_ask(s, "g@example.com", &format!("down{i}"));
            assert_eq!(a, want, "{mode}");
            assert!(
                took < Duration::from_secs(2),
                "{mode}: answer took {took:?}"
            );
        }
    }
    // Redis comes back on the same port (empty): decisions resume, no restart (once
    // the circuit the failures opened is closed by a probe: within seconds).
    let _redis = RedisProc::start(rport);
    for ((d, s), (mode, _)) in daemons.iter_mut().zip(modes) {
        d.wait_for_log("store circuit closed");
        let start = Instant::now();
        // The fail-open server answers DUNNO either way; wait until the closed one
        // admits, and for both check that limits are enforced again.
        while mode == "closed"
            && ask(
                s,
                "probe@example.com",
                &format!("p{}", start.elapsed().as_micros()),
            ) != "action=DUNNO"
        {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "decisions did not resume"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(
            accepted(s, "h@example.com", "back", 12),
            10,
            "{mode}: limits enforced again"
        );
        assert!(
            d.log.lock().unwrap().contains("store failure"),
            "{mode}: errors are logged"
        );
    }
}

/// The password from `redis_password_file` (relative to the configuration file) is
/// what the server authenticates with, and it is never logged.
#[test]
#[ignore = "needs redis-server; scripts/test installs it"]
fn the_redis_password_is_read_from_a_file_and_never_logged() {
    let rport = free_port();
    let _redis = RedisProc::start_with(rport, &["--requirepass", "pw-from-a-file"]);
    let dir = tempdir("redis-pw");
    std::fs::write(dir.join("redis.pw"), "pw-from-a-file\n").unwrap();
    let port = free_port();
    let url = format!("redis://127.0.0.1:{rport}/");
    let cfg = dir.join("r.toml");
    redis_config(&cfg, port, &url, "rl-pw:", "");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("[store]\n", "[store]\nredis_password_file = \"redis.pw\"\n");
    std::fs::write(&cfg, text).unwrap();
    let d = Daemon::start(&["--config", cfg.to_str().unwrap()], port);
    d.wait_for_log("connected to Redis");
    let mut s = d.connect();
    assert_eq!(ask(&mut s, "pw@example.com", "p1"), "action=DUNNO");
    assert_eq!(d.count_in_log("pw-from-a-file"), 0);
}

/// Only a snapshot that is not there means "no snapshot yet": one that cannot be
/// read (here a symlink loop, and a path through a regular file; for a non-root
/// user also a directory without permission) refuses the start.
#[test]
fn a_snapshot_that_cannot_be_read_is_an_error_not_no_snapshot_yet() {
    use ratelimit_core::Timestamp;
    use ratelimit_policyd::backend::{Backend, CallBounds};
    let dir = tempdir("unreadable-snap");
    let open = |snap: &Path| {
        let text = format!("[store]\nsnapshot_path = \"{}\"\n", snap.display());
        let cfg = ratelimit_policyd::config::parse(&text, "t.toml", None).unwrap();
        Backend::open(
            &cfg.store,
            CallBounds::of(&cfg.server),
            Timestamp::from_millis(1_700_000_000_000),
        )
    };
    assert!(
        open(&dir.join("missing.snap")).is_ok(),
        "none yet: start empty"
    );

    let looped = dir.join("loop.snap");
    std::os::unix::fs::symlink(&looped, &looped).unwrap();
    let e = open(&looped).unwrap_err().to_string();
    assert!(e.contains("loop.snap"), "{e}");

    std::fs::write(dir.join("file"), b"").unwrap();
    assert!(open(&dir.join("file/counters.snap")).is_err());

    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        use std::os::unix::fs::PermissionsExt;
        let locked = dir.join("locked");
        std::fs::create_dir_all(&locked).unwrap();
        std::fs::write(locked.join("counters.snap"), b"x").unwrap();
        std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o000)).unwrap();
        let r = open(&locked.join("counters.snap"));
        std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o700)).unwrap();
        let e = r.unwrap_err().to_string();
        assert!(e.contains("Permission denied"), "{e}");
    }
}

/// A relative `snapshot_path` is relative to the configuration file, like every
/// other path, not to the server's working directory.
#[test]
fn a_relative_snapshot_path_is_relative_to_the_configuration_file() {
    let dir = tempdir("relative-snap");
    let cfg = dir.join("p.toml");
    std::fs::write(&cfg, "[store]\nsnapshot_path = \"state/counters.snap\"\n").unwrap();
    let c = ratelimit_policyd::config::load(&cfg).unwrap();
    assert_eq!(
        c.store.snapshot.unwrap().path,
        dir.join("state/counters.snap")
    );
    let e = ratelimit_policyd::config::parse("[store]\nsnapshot_path = \" \"\n", "t.toml", None)
        .unwrap_err()
        .to_string();
    assert_eq!(e, "t.toml:2: store.snapshot_path: must not be empty");
}
