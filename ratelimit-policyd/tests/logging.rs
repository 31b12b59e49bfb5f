//! Where the binary logs: `[server] log_target = "syslog"` sends each line as one
//! datagram to the syslog socket, facility `mail`, a priority per level.

mod support;

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::proc::{BIN, accepted, free_port, tempdir};

/// Datagrams received on `socket` until one contains `needle`; panics after 20 s.
fn until(socket: &UnixDatagram, got: &mut Vec<String>, needle: &str) -> String {
    let start = Instant::now();
    let mut buf = vec![0u8; 65_536];
    loop {
        if let Some(line) = got.iter().find(|l| l.contains(needle)) {
            return line.clone();
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no \"{needle}\" line; got:\n{}",
            got.join("\n")
        );
        if let Ok(n) = socket.recv(&mut buf) {
            got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
}

#[test]
fn an_incident_reaches_the_syslog_socket_as_a_mail_warning_with_the_identifier() {
    let dir = tempdir("syslog");
    let log = dir.join("log");
    let socket = UnixDatagram::bind(&log).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let port = free_port();
    let cfg = dir.join("policyd.toml");
    std::fs::write(
        &cfg,
        format!(
            "[server]\nlisten = [\"127.0.0.1:{port}\"]\nlog_target = \"syslog\"\n\
             syslog_socket = \"log\"\n\n[tiers.default]\nlimits = [\"2/1h\"]\n"
        ),
    )
    .unwrap();
    let mut child = Command::new(BIN)
        .args(["--config", cfg.to_str().unwrap()])
        .env("RATELIMIT_LOG", "info")
        .env_remove("JOURNAL_STREAM")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut got = Vec::new();
    let pid = child.id();
    let listening = until(&socket, &mut got, "listening");
    // info (6) in facility mail (2): 2 * 8 + 6.
    assert!(listening.starts_with("<22>"), "info is <22>: {listening}");

    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    assert_eq!(accepted(&mut s, "phished@example.com", "m", 4), 2);
    let incident = until(&socket, &mut got, "incident: user over limit");
    // warning (4) in facility mail (2): 2 * 8 + 4.
    assert!(incident.starts_with("<20>"), "{incident}");
    assert!(
        incident.contains(&format!(" ratelimit-policyd[{pid}]: ")),
        "{incident}"
    );
    assert!(incident.contains("phished@example.com"), "{incident}");
    assert!(!incident.ends_with('\n'), "{incident:?}");

    let _ = child.kill();
    let _ = child.wait();
    // Nothing went to stderr: the syslog socket was there.
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert_eq!(stderr, "");
}

#[test]
fn without_the_syslog_socket_the_binary_logs_to_stderr_and_says_why() {
    let dir = tempdir("nosyslog");
    let port = free_port();
    let cfg = dir.join("policyd.toml");
    std::fs::write(
        &cfg,
        format!(
            "[server]\nlisten = [\"127.0.0.1:{port}\"]\nlog_target = \"syslog\"\n\
             syslog_socket = \"missing\"\n"
        ),
    )
    .unwrap();
    let d = support::proc::Daemon::start(&["--config", cfg.to_str().unwrap()], port);
    d.wait_for_log("cannot log to syslog at");
    d.wait_for_log("logging to stderr");
}
