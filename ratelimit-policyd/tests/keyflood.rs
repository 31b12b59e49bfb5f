//! Key floods against the default configuration: a full key table never switches
//! limiting off, and memory stays within the documented bound
//! ([docs/operations.md](../../docs/operations.md#memory)).
//!
//! The tests of this file measure the process's resident memory, so they take
//! turns (one lock), and nothing else runs in this test binary.

mod support;

use std::time::Instant;

use ratelimit_policyd::protocol::{Action, Status, parse_response};
use support::server::Server;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One test at a time: they measure the process's memory.
static MEMORY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Resident memory of this process (bytes), from `/proc/self/status`.
fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    let kb: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kb * 1024
}

/// Answers to END-OF-MESSAGE requests of `users(i)` for `i` in `range`, sent
/// pipelined on `conns` connections: (DUNNO, DEFER_IF_PERMIT) counts.
async fn flood(
    server: &Server,
    range: std::ops::Range<usize>,
    conns: usize,
    user: fn(usize, &mut Vec<u8>),
) -> (usize, usize) {
    let mut tasks = Vec::new();
    for conn in 0..conns {
        let addr = server.addr;
        let range = range.clone();
        tasks.push(tokio::spawn(async move {
            let mine = range.clone().skip(conn).step_by(conns).count();
            let stream = TcpStream::connect(addr).await.unwrap();
            let (mut rd, mut wr) = stream.into_split();
            let writer = tokio::spawn(async move {
                let mut buf = Vec::with_capacity(128 << 10);
                for i in range.skip(conn).step_by(conns) {
                    buf.extend_from_slice(
                        b"protocol_state=END-OF-MESSAGE\nclient_address=192.0.2.1\nsasl_username=",
                    );
                    user(i, &mut buf);
                    buf.extend_from_slice(b"\n\n");
                    if buf.len() >= 120 << 10 {
                        wr.write_all(&buf).await.unwrap();
                        buf.clear();
                    }
                }
                wr.write_all(&buf).await.unwrap();
                wr
            });
            let (mut allowed, mut deferred, mut seen) = (0, 0, 0);
            let mut pending = Vec::new();
            let mut chunk = vec![0u8; 64 << 10];
            while seen < mine {
                let n = rd.read(&mut chunk).await.unwrap();
                assert!(n > 0, "the server closed a flood connection");
                pending.extend_from_slice(&chunk[..n]);
                let mut used = 0;
                while let Ok(Status::Complete((action, len))) = parse_response(&pending[used..]) {
                    match action {
                        Action::Dunno => allowed += 1,
                        Action::DeferIfPermit(_) => deferred += 1,
                        other => panic!("unexpected answer {other}"),
                    }
                    used += len;
                    seen += 1;
                }
                pending.drain(..used);
            }
            drop(writer.await.unwrap());
            (allowed, deferred)
        }));
    }
    let mut total = (0, 0);
    for t in tasks {
        let (a, d) = t.await.unwrap();
        total = (total.0 + a, total.1 + d);
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_flood_of_one_and_a_half_million_users_alice_is_still_limited_and_memory_is_bounded()
 {
    let _turn = MEMORY.lock().await;
    const USERS: usize = 1_500_000;
    // The default configuration: max_keys = 1,000,000, 100 messages an hour,
    // on_store_error = "open".
    let server = Server::start("").await;
    let before = rss();
    let start = Instant::now();
    let (allowed, deferred) = flood(&server, 0..USERS, 2, |i, buf| {
        buf.extend_from_slice(format!("flood{i}@example.com").as_bytes())
    })
    .await;
    let grown = rss().saturating_sub(before);
    let policy = &server.daemon.policy;
    let keys = policy.backend().tracked_keys().unwrap();
    let (ev, _) = policy.backend().evictions();
    eprintln!(
        "{USERS} users in {:.1?}: {allowed} admitted, {deferred} deferred; {keys} keys tracked, \
         evictions {ev:?}; RSS grew {:.1} MB, {:.1} bytes per tracked key",
        start.elapsed(),
        grown as f64 / 1e6,
        grown as f64 / keys as f64
    );
    assert_eq!(allowed + deferred, USERS);
    assert!(keys <= 1_000_000, "{keys}");

    let mut c = server.client().await;
    for i in 0..100 {
        assert_eq!(
            c.message("alice@example.com", &format!("a{i}"), 1).await,
            "DUNNO",
            "message {i}"
        );
    }
    let refused = c.message("alice@example.com", "a100", 1).await;
    assert!(
        refused.starts_with("DEFER_IF_PERMIT") && refused.contains("100/1h"),
        "{refused}"
    );
    assert_eq!(server.used("alice@example.com", "100/1h"), 100);
    // The documented bound: 80 bytes per key of counters for names of up to 24
    // bytes, and 600 bytes per user of the 65,536 whose client addresses are kept.
    let bound = 80 * 1_000_000 + 65_536 * 600;
    assert!(grown <= bound, "RSS grew {grown} bytes, bound {bound}");
    server.stop().await;
}

/// GET /metrics: the value of each series.
async fn metrics(addr: std::net::SocketAddr) -> std::collections::HashMap<String, f64> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).await.unwrap();
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .filter_map(|(k, v)| Some((k.to_string(), v.parse().ok()?)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_user_with_nothing_to_evict_is_deferred_even_when_store_errors_fail_open() {
    let _turn = MEMORY.lock().await;
    // One key in all, in one of several shards: a new user of another shard finds
    // nothing there to evict.
    let server = Server::start(
        "[server]\non_store_error = \"open\"\n[store]\nmax_keys = 1\n\
         [metrics]\nlisten = \"127.0.0.1:0\"\n[tiers.default]\nlimits = [\"100/1h\"]\n",
    )
    .await;
    let mut c = server.client().await;
    let (mut admitted, mut deferred) = (0, 0);
    for i in 0..64 {
        let answer = c
            .eom(&format!("u{i}@example.com"), &format!("m{i}"), "192.0.2.1")
            .await;
        if answer == "DUNNO" {
            admitted += 1;
        } else {
            assert_eq!(
                answer,
                "DEFER_IF_PERMIT 4.7.1 Too many senders tracked right now, try again later"
            );
            deferred += 1;
        }
        assert_eq!(server.daemon.policy.backend().tracked_keys(), Some(1));
    }
    assert!(
        admitted >= 1 && deferred >= 1,
        "{admitted} admitted, {deferred} deferred"
    );
    let m = metrics(server.daemon.ops.metrics_addr().unwrap()).await;
    assert_eq!(m["ratelimit_store_full_refusals_total"], deferred as f64);
    assert_eq!(
        m["ratelimit_store_evictions_total{store=\"counters\",reason=\"lru\"}"],
        (admitted - 1) as f64
    );
    assert_eq!(
        m["ratelimit_decisions_total{action=\"defer\",tier=\"default\"}"],
        deferred as f64
    );
    assert_eq!(m["ratelimit_store_errors_total"], 0.0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_of_four_kilobytes_cost_a_bounded_key_each_and_are_limited_each_on_its_own() {
    let _turn = MEMORY.lock().await;
    const USERS: usize = 100_000;
    const NAME: usize = 4000;
    let server = Server::start("").await;
    let before = rss();
    let start = Instant::now();
    let (allowed, deferred) = flood(&server, 0..USERS, 2, |i, buf| {
        let id = format!("{i}@example.com");
        buf.resize(buf.len() + NAME - id.len(), b'x');
        buf.extend_from_slice(id.as_bytes());
    })
    .await;
    let grown = rss().saturating_sub(before);
    let keys = server.daemon.policy.backend().tracked_keys().unwrap();
    eprintln!(
        "{USERS} names of {NAME} bytes in {:.1?}: {allowed} admitted, {deferred} deferred; \
         {keys} keys; RSS grew {:.1} MB",
        start.elapsed(),
        grown as f64 / 1e6
    );
    assert_eq!((allowed, deferred, keys), (USERS, 0, USERS));
    // The documented bound: 400 bytes per key of counters, and 600 bytes per user
    // of the 65,536 whose client addresses are kept.
    let bound = USERS as u64 * 400 + 65_536 * 600;
    assert!(grown <= bound, "RSS grew {grown} bytes, bound {bound}");

    // Two long names that share far more than the key's 286-byte prefix are two
    // users, each with a quota of its own.
    let long = |who: &str| format!("{}{who}@example.com", "y".repeat(1000));
    let (a, b) = (long("a"), long("b"));
    let mut c = server.client().await;
    for i in 0..100 {
        assert_eq!(c.message(&a, &format!("a{i}"), 1).await, "DUNNO", "{i}");
    }
    assert!(
        c.message(&a, "a100", 1)
            .await
            .starts_with("DEFER_IF_PERMIT")
    );
    assert_eq!(c.message(&b, "b0", 1).await, "DUNNO");
    // The same long name in capitals is the same user.
    assert!(
        c.message(&a.to_uppercase(), "a101", 1)
            .await
            .starts_with("DEFER_IF_PERMIT")
    );
    server.stop().await;
}
