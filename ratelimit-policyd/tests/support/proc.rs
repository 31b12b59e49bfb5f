//! Running the real binary in tests: start, signal, ask over raw TCP.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_ratelimit-policyd");

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn tempdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("rl-daemon-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

pub struct Daemon {
    pub child: Child,
    pub port: u16,
    pub log: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Daemon {
    pub fn start(args: &[&str], port: u16) -> Daemon {
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

    pub fn wait_for_log(&self, needle: &str) {
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

    pub fn count_in_log(&self, needle: &str) -> usize {
        self.log.lock().unwrap().matches(needle).count()
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
    }

    pub fn connect(&self) -> TcpStream {
        TcpStream::connect(("127.0.0.1", self.port)).unwrap()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn ask(s: &mut TcpStream, user: &str, instance: &str) -> String {
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

pub fn accepted(s: &mut TcpStream, user: &str, prefix: &str, n: usize) -> usize {
    (0..n)
        .filter(|i| ask(s, user, &format!("{prefix}{i}")) == "action=DUNNO")
        .count()
}
