//! The binary itself: start-up, systemd readiness, SIGHUP and `admin reload` (good and
//! bad file), SIGTERM, check-config.

mod support;

use std::path::Path;
use std::process::Command;

use support::proc::{BIN, Daemon, accepted, ask, free_port, tempdir};

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

/// Runs `check-config FILE` and waits for it.
fn check_config(file: &Path) -> std::process::Output {
    Command::new(BIN)
        .args(["check-config", file.to_str().unwrap()])
        .output()
        .unwrap()
}

#[test]
fn check_config_reports_ok_or_names_file_line_and_field() {
    let dir = tempdir("check");
    let good = dir.join("good.toml");
    write_config(&good, 10031, "100/1h");
    let out = check_config(&good);
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
    let out = check_config(&bad);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.toml:3: unknown field `max_conections`"),
        "{err}"
    );

    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/example.toml");
    let out = check_config(&example);
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
    let out = check_config(&cfg);
    assert!(out.status.success());
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!all.contains("s3cret"), "{all}");
    assert!(all.contains("redis://:***@127.0.0.1:6379/"), "{all}");
}

/// check-config runs at every start under systemd (ExecStartPre), into the journal:
/// it says that an alert command is set, never what it is (it may carry a token).
#[test]
fn check_config_prints_only_that_an_alert_command_is_set() {
    let dir = tempdir("command");
    let cfg = dir.join("alerts.toml");
    std::fs::write(
        &cfg,
        "[alerts]\ncommand = \"curl -H 'Authorization: Bearer t0ken-in-a-command' https://x/\"\n",
    )
    .unwrap();
    let out = check_config(&cfg);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("t0ken-in-a-command"), "{text}");
    assert!(text.contains("alerts: a command (set)"), "{text}");
}

/// `redis_password_file` and `webhook_token_file`: relative to the configuration
/// file, or a systemd credential name (no slash) when `$CREDENTIALS_DIRECTORY` is
/// set; a file that cannot be read is `file:line: field: cannot read PATH: ...`.
#[test]
fn secrets_are_read_from_files_or_systemd_credentials() {
    let dir = tempdir("secret-files");
    let creds = dir.join("creds");
    std::fs::create_dir_all(dir.join("etc")).unwrap();
    std::fs::create_dir_all(&creds).unwrap();
    std::fs::write(dir.join("etc/redis.pw"), "pw-in-etc\n").unwrap();
    std::fs::write(creds.join("hook-token"), "token-in-creds\n").unwrap();
    let cfg = dir.join("etc/r.toml");
    std::fs::write(
        &cfg,
        "[store]\nbackend = \"redis\"\nredis_password_file = \"./redis.pw\"\n\n\
         [alerts]\nwebhook_url = \"http://127.0.0.1:9/hook\"\nwebhook_token_file = \"hook-token\"\n",
    )
    .unwrap();
    let run = |creds: Option<&Path>| {
        let mut cmd = Command::new(BIN);
        cmd.args(["check-config", cfg.to_str().unwrap()]);
        match creds {
            Some(c) => cmd.env("CREDENTIALS_DIRECTORY", c),
            None => cmd.env_remove("CREDENTIALS_DIRECTORY"),
        };
        let out = cmd.output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    };
    let (ok, text) = run(Some(&creds));
    assert!(ok, "{text}");
    assert!(
        text.contains("with the password from redis_password_file"),
        "{text}"
    );
    assert!(text.contains("with a bearer token"), "{text}");
    assert!(
        !text.contains("pw-in-etc") && !text.contains("token-in-creds"),
        "{text}"
    );

    // Without $CREDENTIALS_DIRECTORY the name is a path relative to etc/.
    let (ok, text) = run(None);
    assert!(!ok, "{text}");
    assert!(
        text.contains(&format!(
            "r.toml:7: alerts.webhook_token_file: cannot read {}: ",
            dir.join("etc/hook-token").display()
        )),
        "{text}"
    );
}

#[test]
fn ready_1_reaches_notify_socket_once_the_listener_accepts() {
    let dir = tempdir("notify");
    let notify = dir.join("notify.sock");
    let manager = std::os::unix::net::UnixDatagram::bind(&notify).unwrap();
    manager
        .set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .unwrap();
    let port = free_port();
    let mut child = Command::new(BIN)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .env("NOTIFY_SOCKET", &notify)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 256];
    let got = manager.recv(&mut buf);
    // READY=1 means served: the first connection, made right away, is answered.
    let answered = std::net::TcpStream::connect(("127.0.0.1", port))
        .map(|mut s| ask(&mut s, "n@example.com", "n"));
    let _ = child.kill();
    let _ = child.wait();
    let n = got.expect("READY=1 within 20 s");
    assert_eq!(&buf[..n], b"READY=1");
    assert_eq!(answered.expect("connects after READY=1"), "action=DUNNO");
}

#[test]
fn admin_reload_exits_0_on_a_good_file_and_non_zero_on_a_bad_one() {
    let dir = tempdir("admin-reload");
    let cfg = dir.join("policyd.toml");
    let port = free_port();
    let admin = format!(
        "\n[admin]\nsocket = \"{0}/admin.sock\"\ntier_overrides = \"{0}/overrides\"\n",
        dir.display()
    );
    let write = |limit: &str| {
        write_config(&cfg, port, limit);
        let text = std::fs::read_to_string(&cfg).unwrap() + &admin;
        std::fs::write(&cfg, text).unwrap();
    };
    write("2/1h");
    let d = Daemon::start(&["--config", cfg.to_str().unwrap()], port);
    d.wait_for_log("admin socket");
    // As the unit's ExecReload runs it: the socket found through --config.
    let reload = || {
        Command::new(BIN)
            .args(["--config", cfg.to_str().unwrap(), "admin", "reload"])
            .output()
            .unwrap()
    };
    write("4/1h");
    let out = reload();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("reloaded "));

    write("4/0h");
    let out = reload();
    assert!(
        !out.status.success(),
        "a bad file is not reported as reloaded"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("policyd.toml:5: tiers.default.limits: invalid limit \"4/0h\""),
        "{err}"
    );
    // Through the socket alone, the server itself refuses the file, and says why.
    let out = Command::new(BIN)
        .args([
            "admin",
            "--socket",
            &format!("{}/admin.sock", dir.display()),
            "reload",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("invalid limit \"4/0h\""), "{err}");
    // Still the 4/1h configuration.
    let mut s = d.connect();
    assert_eq!(accepted(&mut s, "r@example.com", "r", 6), 4);
}
