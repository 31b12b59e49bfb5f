//! The binary itself: start-up, SIGHUP reload (good and bad file), SIGTERM, check-config.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_ratelimit-policyd");

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn tempdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("rl-daemon-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

struct Daemon {
    child: Child,
    port: u16,
    log: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Daemon {
    fn start(args: &[&str], port: u16) -> Daemon {
        let mut child = Command::new(BIN)
            .args(args)
            .env("RATELIMIT_LOG", "info")
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push_str(&line);
                sink.lock().unwrap().push('\n');
            }
        });
        let d = Daemon { child, port, log };
        d.wait_for_log("listening");
        d
    }

    fn wait_for_log(&self, needle: &str) {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(20) {
            if self.log.lock().unwrap().contains(needle) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "\"{needle}\" not logged; log:\n{}",
            self.log.lock().unwrap()
        );
    }

    fn count_in_log(&self, needle: &str) -> usize {
        self.log.lock().unwrap().matches(needle).count()
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
    }

    fn connect(&self) -> TcpStream {
        TcpStream::connect(("127.0.0.1", self.port)).unwrap()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn ask(s: &mut TcpStream, user: &str, instance: &str) -> String {
    let req = format!(
        "request=smtpd_access_policy\nprotocol_state=END-OF-MESSAGE\nsasl_username={user}\ninstance={instance}\nrecipient_count=1\nsize=10\nclient_address=192.0.2.1\n\n"
    );
    s.write_all(req.as_bytes()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\n\n") {
        let n = s.read(&mut byte).unwrap();
        assert!(n > 0, "connection closed");
        buf.push(byte[0]);
    }
    String::from_utf8(buf).unwrap().trim_end().to_string()
}

fn accepted(s: &mut TcpStream, user: &str, prefix: &str, n: usize) -> usize {
    (0..n)
        .filter(|i| ask(s, user, &format!("{prefix}{i}")) == "action=DUNNO")
        .count()
}

fn write_config(path: &Path, port: u16, limit: &str) {
    std::fs::write(
        path,
        format!(
            "[server]\nlisten = [\"127.0.0.1:{port}\"]\n\n[tiers.default]\nlimits = [\"{limit}\"]\n"
        ),
    )
    .unwrap();
}

#[test]
fn no_arguments_runs_the_builtin_default_and_prints_the_wiring() {
    // The default port may be taken on a shared machine: --listen only moves it.
    let port = free_port();
    let d = Daemon::start(&["--listen", &format!("127.0.0.1:{port}")], port);
    d.wait_for_log("smtpd_end_of_data_restrictions = check_policy_service inet:127.0.0.1:");
    let mut s = d.connect();
    assert_eq!(
        accepted(&mut s, "u@example.com", "m", 105),
        100,
        "built-in default is 100/1h"
    );
}

#[test]
fn sighup_reloads_a_good_file_and_keeps_the_old_one_when_the_new_is_bad() {
    let dir = tempdir("hup");
    let cfg = dir.join("policyd.toml");
    let port = free_port();
    write_config(&cfg, port, "2/1h");
    let d = Daemon::start(&["--config", cfg.to_str().unwrap()], port);
    let mut s = d.connect();
    assert_eq!(accepted(&mut s, "a@example.com", "a", 5), 2);

    write_config(&cfg, port, "4/1h");
    d.signal("HUP");
    d.wait_for_log("configuration reloaded");
    // Same user: 2 already sent, 2 more under the new limit.
    assert_eq!(accepted(&mut s, "a@example.com", "b", 5), 2);

    std::fs::write(&cfg, "[tiers.default]\nlimits = [\"4/0h\"]\n").unwrap();
    d.signal("HUP");
    d.wait_for_log("reload failed; keeping the previous configuration");
    assert!(
        d.log
            .lock()
            .unwrap()
            .contains("policyd.toml:2: tiers.default.limits: invalid limit \"4/0h\"")
    );
    // Still the 4/1h configuration, and still serving.
    assert_eq!(accepted(&mut s, "c@example.com", "c", 6), 4);
    assert_eq!(d.count_in_log("configuration reloaded"), 1);
}

#[test]
fn sigterm_finishes_and_exits_cleanly() {
    let port = free_port();
    let mut d = Daemon::start(&["--listen", &format!("127.0.0.1:{port}")], port);
    let mut s = d.connect();
    assert_eq!(ask(&mut s, "t@example.com", "t"), "action=DUNNO");
    d.signal("TERM");
    let status = d.child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert!(d.log.lock().unwrap().contains("stopped"));
}

#[test]
fn check_config_reports_ok_or_names_file_line_and_field() {
    let dir = tempdir("check");
    let good = dir.join("good.toml");
    write_config(&good, 10031, "100/1h");
    let out = Command::new(BIN)
        .args(["check-config", good.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("good.toml: OK"), "{text}");
    assert!(text.contains("tier default (default): 100/1h"), "{text}");

    let bad = dir.join("bad.toml");
    std::fs::write(
        &bad,
        "[server]\nlisten = [\"127.0.0.1:10031\"]\nmax_conections = 5\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["check-config", bad.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.toml:3: unknown field `max_conections`"),
        "{err}"
    );

    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/example.toml");
    let out = Command::new(BIN)
        .args(["check-config", example.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn check_config_never_prints_the_redis_password() {
    let dir = tempdir("secret");
    let cfg = dir.join("redis.toml");
    std::fs::write(
        &cfg,
        "[store]\nbackend = \"redis\"\nredis_url = \"redis://:s3cret@127.0.0.1:6379/\"\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["check-config", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success());
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!all.contains("s3cret"), "{all}");
    assert!(all.contains("redis://:***@127.0.0.1:6379/"), "{all}");
}
