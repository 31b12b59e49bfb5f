//! When Redis fails: the local fallback (`on_store_error = "local"`), the cap on store
//! calls in flight, the circuit, and the bound on every answer while Redis hangs.
//!
//! Each test runs the real binary against a `redis-server` of its own on a free
//! port, so that it can stop it (`SIGSTOP`: hung, connections accepted but never
//! answered), continue it, or shut it down and start it again with its data.
//! `scripts/test` installs redis-server and runs these (`--include-ignored`).

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::proc::{Daemon, ask, free_port, tempdir};

/// The tests measure answer times: they run one at a time, so that they do not
/// load the machine for each other.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A redis-server of the test's own, keeping its dump file in `dir`.
struct Redis {
    child: Child,
    port: u16,
}

impl Redis {
    fn start(port: u16, dir: &Path) -> Redis {
        let bin = std::env::var("REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
        let child = Command::new(bin)
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--dir"])
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server not found: run the tests through scripts/test");
        let start = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "redis-server did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Redis { child, port }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill(2) on the child this test spawned.
        let r = unsafe { libc::kill(self.child.id() as libc::pid_t, sig) };
        assert_eq!(r, 0, "kill {sig}");
    }

    /// Hangs it: connections are still accepted (by the kernel), nothing is answered.
    fn hang(&self) {
        self.signal(libc::SIGSTOP);
    }

    fn resume(&self) {
        self.signal(libc::SIGCONT);
    }

    /// `SHUTDOWN SAVE`: it writes its data to the dump file and exits.
    fn shut_down_saving(mut self) {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        s.write_all(b"SHUTDOWN SAVE\r\n").unwrap();
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
        let start = Instant::now();
        while self.child.try_wait().unwrap().is_none() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "redis-server still up"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            self.signal(libc::SIGCONT);
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A server with Redis at `url`, metrics on `mport`, `server` lines added to
/// `[server]`, and one tier of 10 messages an hour.
fn start_daemon(dir: &Path, name: &str, url: &str, server: &str, store: &str) -> (Daemon, u16) {
    let (port, mport) = (free_port(), free_port());
    let path: PathBuf = dir.join(format!("{name}.toml"));
    std::fs::write(
        &path,
        format!(
            "[server]\nlisten = [\"127.0.0.1:{port}\"]\n{server}\n\n\
             [store]\nbackend = \"redis\"\nredis_url = \"{url}\"\n\
             redis_key_prefix = \"rl-fallback-{name}-{}:\"\n{store}\n\n\
             [metrics]\nlisten = \"127.0.0.1:{mport}\"\n\n[admin]\nenabled = false\n\n\
             [tiers.default]\nlimits = [\"10/1h\"]\n",
            std::process::id()
        ),
    )
    .unwrap();
    // Listening; Redis may not have answered its first ping yet on a loaded
    // machine: the tests warm up until it decides.
    let d = Daemon::start(&["--config", path.to_str().unwrap()], port);
    (d, mport)
}

/// The value of one series of the server's `/metrics` (`name` with its labels).
///
/// A scrape that comes back empty (once, under the whole suite's load, the
/// endpoint closed a scrape without answering) is tried again, up to five times:
/// these tests are about the values, not about the endpoint (ops.rs tests that).
fn metric(mport: u16, series: &str) -> f64 {
    let mut out = String::new();
    for _ in 0..5 {
        let mut s = TcpStream::connect(("127.0.0.1", mport)).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        out.clear();
        // An error reading counts as an empty answer, tried again.
        let _ = s.read_to_string(&mut out);
        if !out.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    out.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {series} in:\n{out}"))
}

/// Waits up to `within` until `cond` holds.
fn wait_until(what: &str, within: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < within, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Threads and open files of process `pid`.
fn threads_and_fds(pid: u32) -> (usize, usize) {
    let count = |d: &str| {
        std::fs::read_dir(format!("/proc/{pid}/{d}"))
            .unwrap()
            .count()
    };
    (count("task"), count("fd"))
}

/// Asks for `user` until Redis decides (`DUNNO`), within 30 s: the first calls
/// connect and load the script, which on a loaded machine may take longer than a
/// short `decision_timeout` (and a circuit opened meanwhile closes within seconds).
fn warm(s: &mut TcpStream, user: &str) {
    let start = Instant::now();
    for i in 0.. {
        if ask(s, user, &format!("warm{i}")) == DUNNO {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "Redis never decided for {user}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Asks one END-OF-MESSAGE; the answer and how long it took.
fn timed(s: &mut TcpStream, user: &str, instance: &str) -> (String, Duration) {
    let t = Instant::now();
    let a = ask(s, user, instance);
    (a, t.elapsed())
}

const DUNNO: &str = "action=DUNNO";
const UNAVAILABLE: &str =
    "action=DEFER_IF_PERMIT 4.3.0 Rate limiter temporarily unavailable, try again later";

#[test]
#[ignore = "needs redis-server (scripts/test runs it)"]
fn while_redis_is_down_each_server_limits_with_its_own_counters() {
    let _serial = one_at_a_time();
    let dir = tempdir("fallback-local");
    let rport = free_port();
    let redis = Redis::start(rport, &dir);
    // Its own timeouts (200 ms + 3 x 500 ms) are within decision_timeout: calls are
    // made on the connection thread. (Generous: a loaded machine must not fail
    // the calls before Redis is taken down.)
    let (d, mport) = start_daemon(
        &dir,
        "local",
        &redis.url(),
        "decision_timeout = \"2s\"\non_store_error = \"local\"\nlocal_fraction = 0.5",
        "redis_connect_timeout = \"200ms\"\nredis_command_timeout = \"500ms\"",
    );
    let mut s = d.connect();
    for i in 0..4 {
        assert_eq!(ask(&mut s, "alice@example.com", &format!("up{i}")), DUNNO);
    }
    assert_eq!(
        metric(mport, "ratelimit_store_errors_total"),
        0.0,
        "Redis decided all four"
    );
    // Down, with its data saved: refused connections, every call fails at once.
    redis.shut_down_saving();
    // Alice is limited by this server's own counters, at half the limit: 5 of 10
    // (what Redis counted is not known here).
    let answers: Vec<String> = (0..8)
        .map(|i| ask(&mut s, "alice@example.com", &format!("down{i}")))
        .collect();
    assert!(answers[..5].iter().all(|a| a == DUNNO), "{answers:?}");
    for a in &answers[5..] {
        assert!(
            a.starts_with("action=DEFER_IF_PERMIT") && a.contains("limit of 5/1h"),
            "{answers:?}"
        );
    }
    // Bob, who has sent nothing, is not affected.
    for i in 0..3 {
        assert_eq!(ask(&mut s, "bob@example.com", &format!("b{i}")), DUNNO);
    }
    d.wait_for_log("switching to the local fallback");
    assert_eq!(metric(mport, "ratelimit_store_fallback_active"), 1.0);
    assert_eq!(metric(mport, "ratelimit_store_circuit_open"), 1.0);
    assert!(
        metric(
            mport,
            "ratelimit_store_calls_refused_total{reason=\"circuit_open\"}"
        ) > 0.0
    );

    // Back, with what it had: shared counting resumes once a probe finds it.
    let _redis = Redis::start(rport, &dir);
    d.wait_for_log("switching back to the shared store");
    let back: Vec<String> = (0..8)
        .map(|i| ask(&mut s, "alice@example.com", &format!("back{i}")))
        .collect();
    // Redis counted 4: 6 more, then the whole limit's refusal.
    assert!(back[..6].iter().all(|a| a == DUNNO), "{back:?}");
    assert!(
        back[6..]
            .iter()
            .all(|a| a.starts_with("action=DEFER_IF_PERMIT") && a.contains("limit of 10/1h")),
        "{back:?}"
    );
    assert_eq!(metric(mport, "ratelimit_store_fallback_active"), 0.0);
    assert!(metric(mport, "ratelimit_store_fallback_seconds_total") > 0.0);
    // One line each way, not one per request.
    assert_eq!(d.count_in_log("switching to the local fallback"), 1);
    assert_eq!(d.count_in_log("switching back to the shared store"), 1);
}

/// 200 requests over 16 connections while Redis hangs: each is answered within
/// `decision_timeout` (plus 50 ms for the client and the machine), and once Redis
/// answers again the server holds no more threads or files than before.
fn hung_redis_answers_in_time(
    name: &str,
    decision_timeout_ms: u64,
    command_timeout_ms: u64,
    store_extra: &str,
) {
    let _serial = one_at_a_time();
    let dir = tempdir(name);
    let redis = Redis::start(free_port(), &dir);
    let (d, mport) = start_daemon(
        &dir,
        name,
        &redis.url(),
        &format!("decision_timeout = \"{decision_timeout_ms}ms\"\non_store_error = \"closed\""),
        &format!(
            "redis_connect_timeout = \"100ms\"\nredis_command_timeout = \"{command_timeout_ms}ms\"\n{store_extra}"
        ),
    );
    let mut conns: Vec<TcpStream> = (0..16).map(|_| d.connect()).collect();
    // Warm up: every connection decided on a live Redis (a pool of connections
    // to it, the script loaded), then three more waves of 16 at once: how long the
    // slowest of those took is what this machine adds now (a loaded machine is
    // slow to run 16 threads woken together), and is added to the bound.
    let wave = |conns: &mut Vec<TcpStream>, tag: &str| -> Duration {
        std::thread::scope(|sc| {
            let asks: Vec<_> = conns
                .iter_mut()
                .enumerate()
                .map(|(c, s)| {
                    let user = format!("w{c}@example.com");
                    let tag = tag.to_string();
                    sc.spawn(move || {
                        warm(s, &user);
                        timed(s, &user, &tag).1
                    })
                })
                .collect();
            asks.into_iter().map(|a| a.join().unwrap()).max().unwrap()
        })
    };
    wave(&mut conns, "first");
    let noise = (0..3)
        .map(|i| wave(&mut conns, &format!("noise{i}")))
        .max()
        .unwrap();
    let pid = d.child.id();
    let before = threads_and_fds(pid);
    let closed = d.count_in_log("store circuit closed");

    redis.hang();
    let bound = Duration::from_millis(decision_timeout_ms + 50) + noise;
    let slowest = std::thread::scope(|sc| {
        let workers: Vec<_> = conns
            .iter_mut()
            .enumerate()
            .map(|(c, s)| {
                sc.spawn(move || {
                    let mut slowest = Duration::ZERO;
                    for i in 0..200 / 16 + usize::from(c < 200 % 16) {
                        let (a, took) = timed(s, &format!("u{c}@example.com"), &format!("h{i}"));
                        assert_eq!(a, UNAVAILABLE);
                        assert!(took <= bound, "answer {i} on connection {c} took {took:?}");
                        slowest = slowest.max(took);
                    }
                    slowest
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).max()
    });
    println!(
        "{name}: slowest answer {slowest:?} (bound {bound:?}: decision_timeout + 50 ms + {noise:?})"
    );
    assert_eq!(metric(mport, "ratelimit_store_circuit_open"), 1.0);
    assert!(metric(mport, "ratelimit_store_calls_in_flight") <= 16.0);

    redis.resume();
    wait_until("the circuit to close", Duration::from_secs(30), || {
        d.count_in_log("store circuit closed") > closed
    });
    assert_eq!(ask(&mut conns[0], "after@example.com", "a1"), DUNNO);
    // The probe thread has ended, timed-out connections are closed, and the
    // blocking pool's extra threads (if any) have gone idle and ended.
    let mut now = threads_and_fds(pid);
    wait_until(
        "no more threads or files than before",
        Duration::from_secs(30),
        || {
            now = threads_and_fds(pid);
            now.0 <= before.0 && now.1 <= before.1
        },
    );
    println!("{name}: threads and fds before {before:?}, after {now:?}");
}

#[test]
#[ignore = "needs redis-server (scripts/test runs it)"]
fn hung_redis_every_answer_within_the_decision_timeout_on_the_blocking_pool() {
    // 100 ms + 3 x 500 ms is more than 300 ms: calls go to the blocking pool, and
    // each is given up on at 300 ms while it runs on until its 500 ms read timeout.
    hung_redis_answers_in_time("hung-pool", 300, 500, "");
}

#[test]
#[ignore = "needs redis-server (scripts/test runs it)"]
fn hung_redis_every_answer_within_the_decision_timeout_on_the_connection_thread() {
    // 100 ms + 3 x 100 ms is within 500 ms: calls are made on the connection thread.
    hung_redis_answers_in_time("hung-direct", 500, 100, "");
}

#[test]
#[ignore = "needs redis-server (scripts/test runs it)"]
fn hung_redis_every_answer_within_the_decision_timeout_with_batched_calls() {
    // The same on the connection thread, the calls batched (redis_batch): a caller
    // queued behind a hung batch gives up within its own bound too.
    hung_redis_answers_in_time("hung-batch", 500, 100, "redis_batch = true");
}

#[test]
#[ignore = "needs redis-server (scripts/test runs it)"]
fn beyond_max_store_calls_in_flight_requests_are_answered_at_once() {
    let _serial = one_at_a_time();
    let dir = tempdir("fallback-cap");
    let redis = Redis::start(free_port(), &dir);
    // Calls outlive the wait (8 s against 2 s): each holds its place in the cap
    // until it really returns.
    let (d, mport) = start_daemon(
        &dir,
        "cap",
        &redis.url(),
        "decision_timeout = \"2s\"\non_store_error = \"closed\"\nmax_store_calls_in_flight = 2",
        "redis_connect_timeout = \"8s\"\nredis_command_timeout = \"8s\"",
    );
    let mut conns: Vec<TcpStream> = (0..8).map(|_| d.connect()).collect();
    for (c, s) in conns.iter_mut().enumerate() {
        warm(s, &format!("w{c}@example.com"));
    }
    redis.hang();
    let wave = |conns: &mut Vec<TcpStream>, tag: &str| -> Vec<Duration> {
        std::thread::scope(|sc| {
            let asks: Vec<_> = conns
                .iter_mut()
                .enumerate()
                .map(|(c, s)| {
                    let tag = tag.to_string();
                    sc.spawn(move || {
                        let (a, took) = timed(s, &format!("u{c}@example.com"), &tag);
                        assert_eq!(a, UNAVAILABLE);
                        took
                    })
                })
                .collect();
            asks.into_iter().map(|a| a.join().unwrap()).collect()
        })
    };
    let started = Instant::now();
    let first = wave(&mut conns, "first");
    // Two calls reach Redis and wait the whole decision_timeout; the six beyond
    // the cap are refused without a call, so answered long before it (without
    // the cap all eight would wait).
    let refused_in_flight = || {
        metric(
            mport,
            "ratelimit_store_calls_refused_total{reason=\"in_flight\"}",
        )
    };
    let waited = |took: &[Duration]| {
        took.iter()
            .filter(|t| **t >= Duration::from_millis(1900))
            .count()
    };
    let fast = |took: &[Duration]| {
        took.iter()
            .filter(|t| **t < Duration::from_millis(1500))
            .count()
    };
    assert_eq!(refused_in_flight(), 6.0);
    assert_eq!((waited(&first), fast(&first)), (2, 6), "{first:?}");
    // The two calls given up on at 2 s still run until 8 s: the cap still holds.
    assert_eq!(metric(mport, "ratelimit_store_calls_in_flight"), 2.0);
    let second = wave(&mut conns, "second");
    assert!(
        started.elapsed() < Duration::from_millis(7500),
        "the second wave came too late to find the calls still running"
    );
    assert_eq!(refused_in_flight(), 14.0);
    assert_eq!(fast(&second), 8, "{second:?}");
    // Only the two calls timed out: the circuit is still closed.
    assert_eq!(metric(mport, "ratelimit_store_circuit_open"), 0.0);
    redis.resume();
    wait_until("the calls to end", Duration::from_secs(10), || {
        metric(mport, "ratelimit_store_calls_in_flight") == 0.0
    });
    assert_eq!(ask(&mut conns[0], "after@example.com", "a1"), DUNNO);
}

#[test]
#[ignore = "needs redis-server (scripts/test runs it)"]
fn after_five_failures_in_a_row_the_circuit_answers_at_once_until_redis_is_back() {
    let _serial = one_at_a_time();
    let dir = tempdir("fallback-circuit");
    let redis = Redis::start(free_port(), &dir);
    let (d, mport) = start_daemon(
        &dir,
        "circuit",
        &redis.url(),
        "decision_timeout = \"1s\"\non_store_error = \"closed\"",
        "redis_connect_timeout = \"100ms\"\nredis_command_timeout = \"100ms\"",
    );
    let mut s = d.connect();
    warm(&mut s, "w@example.com");
    // What warming up may have counted on a loaded machine.
    let opened = metric(mport, "ratelimit_store_circuit_opens_total");
    let refused = metric(
        mport,
        "ratelimit_store_calls_refused_total{reason=\"circuit_open\"}",
    );
    let logged = (
        d.count_in_log("store circuit open"),
        d.count_in_log("store circuit closed"),
    );
    redis.hang();
    let took: Vec<Duration> = (0..12)
        .map(|i| {
            let (a, took) = timed(&mut s, "u@example.com", &format!("h{i}"));
            assert_eq!(a, UNAVAILABLE);
            took
        })
        .collect();
    // A call to the hung Redis cannot fail before its 100 ms connect or read
    // timeout; once five have, the store is not called (counted below): answers
    // come at once.
    let slow = Duration::from_millis(90);
    assert!(took[..5].iter().all(|t| *t >= slow), "{took:?}");
    let total: Duration = took[5..].iter().sum();
    assert!(total < slow * 7, "{took:?}");
    assert_eq!(metric(mport, "ratelimit_store_circuit_open"), 1.0);
    assert_eq!(
        metric(mport, "ratelimit_store_circuit_opens_total"),
        opened + 1.0
    );
    assert_eq!(
        metric(
            mport,
            "ratelimit_store_calls_refused_total{reason=\"circuit_open\"}"
        ),
        refused + 7.0
    );
    redis.resume();
    wait_until("the circuit to close", Duration::from_secs(30), || {
        d.count_in_log("store circuit closed") > logged.1
    });
    assert_eq!(metric(mport, "ratelimit_store_circuit_open"), 0.0);
    assert_eq!(ask(&mut s, "v@example.com", "v1"), DUNNO);
    assert_eq!(d.count_in_log("store circuit open"), logged.0 + 1);
    assert_eq!(d.count_in_log("store circuit closed"), logged.1 + 1);
}
