//! Operations, end to end on a real server: incident lines, the alert hook (command
//! and webhook), Prometheus metrics, recording and replay.

mod support;

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use ratelimit_policyd::{daemon, replay};
use support::logs::Logs;
use support::server::{Server, T0, eventually};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn config(extra: &str) -> String {
    format!(
        "[admin]\nsocket = \"admin.sock\"\ntier_overrides = \"overrides\"\n\n\
         [tiers.default]\nlimits = [\"2/1h\"]\n\n\
         [tiers.bulk]\nlimits = [\"100/1h\"]\n\n{extra}"
    )
}

const DEFER: &str = "DEFER_IF_PERMIT";

#[tokio::test]
async fn a_burst_of_refusals_logs_one_incident_line_naming_the_clients_seen() {
    let logs = Logs::default();
    let _guard = logs.capture(tracing::Level::INFO);
    let dir = tempfile::tempdir().unwrap();
    let srv = Server::start_in(dir.path(), &config("")).await;
    let mut c = srv.client().await;
    assert_eq!(c.eom("alice", "m1", "192.0.2.1").await, "DUNNO");
    assert_eq!(c.eom("alice", "m2", "192.0.2.2").await, "DUNNO");
    for i in 0..20 {
        let client = if i % 2 == 0 { "192.0.2.3" } else { "192.0.2.1" };
        assert!(
            c.rcpt("alice", &format!("r{i}"), client)
                .await
                .starts_with(DEFER)
        );
        assert!(
            c.eom("alice", &format!("r{i}"), client)
                .await
                .starts_with(DEFER)
        );
    }
    let text = logs.text();
    let incidents: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("incident: user over limit"))
        .collect();
    assert_eq!(incidents.len(), 1, "{text}");
    let line = incidents[0];
    for want in [
        "user=alice",
        "tier=default",
        "limit=2/1h",
        "used=2",
        "client=\"192.0.2.3\"",
        "clients_seen=192.0.2.3,192.0.2.2,192.0.2.1",
        "clears_at=2023-11-14T23:0",
        "clears_in=",
    ] {
        assert!(line.contains(want), "{want} missing in {line}");
    }
    // Nothing per request at info: the only line about alice is the incident.
    assert_eq!(
        text.lines().filter(|l| l.contains("alice")).count(),
        1,
        "{text}"
    );
    assert_eq!(srv.daemon.ops.incidents.load(Ordering::Relaxed), 1);

    // Once it has cleared, a new refusal is a new incident.
    srv.clock.advance(Duration::from_secs(2 * 3600));
    assert_eq!(c.eom("alice", "n1", "192.0.2.9").await, "DUNNO");
    assert_eq!(c.eom("alice", "n2", "192.0.2.9").await, "DUNNO");
    assert!(c.eom("alice", "n3", "192.0.2.9").await.starts_with(DEFER));
    assert!(c.eom("alice", "n4", "192.0.2.9").await.starts_with(DEFER));
    let text = logs.text();
    assert_eq!(
        text.matches("incident: user over limit").count(),
        2,
        "{text}"
    );
    drop(c);
    srv.stop().await;
}

#[tokio::test]
async fn json_logs_carry_the_incident_fields() {
    let logs = Logs::default();
    let _guard = logs.capture_json(tracing::Level::INFO);
    let dir = tempfile::tempdir().unwrap();
    let srv = Server::start_in(dir.path(), &config("")).await;
    let mut c = srv.client().await;
    for i in 0..4 {
        c.eom("bob", &format!("m{i}"), "198.51.100.4").await;
    }
    let text = logs.text();
    let line = text.lines().find(|l| l.contains("incident")).unwrap();
    let v: serde_json::Value = serde_json::from_str(line).unwrap();
    assert_eq!(v["fields"]["user"], "bob");
    assert_eq!(v["fields"]["limit"], "2/1h");
    assert_eq!(v["fields"]["clients_seen"], "198.51.100.4");
    assert_eq!(v["level"], "WARN");
    drop(c);
    srv.stop().await;
}

/// A user name is client text: a CR or an escape sequence in it must not forge a
/// line or drive the operator's terminal in a text log; JSON keeps the original.
#[tokio::test]
async fn control_characters_in_a_user_name_are_escaped_in_text_logs_and_kept_in_json() {
    let evil = "mal\x1b[2jlory\rfake\u{85}x";
    for json in [false, true] {
        let logs = Logs::default();
        let _guard = if json {
            logs.capture_json(tracing::Level::INFO)
        } else {
            logs.capture(tracing::Level::INFO)
        };
        let dir = tempfile::tempdir().unwrap();
        let srv = Server::start_in(dir.path(), &config("")).await;
        let mut c = srv.client().await;
        for i in 0..3 {
            c.eom(evil, &format!("m{i}"), "192.0.2.1").await;
        }
        drop(c);
        srv.stop().await;
        let text = logs.text();
        let line = text
            .lines()
            .find(|l| l.contains("incident"))
            .unwrap_or_else(|| panic!("no incident line in {text:?}"));
        if json {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            assert_eq!(v["fields"]["user"], evil, "{line}");
        } else {
            assert!(
                line.contains(r"user=mal\x1b[2jlory\rfake\u{85}x"),
                "{line:?}"
            );
        }
        // JSON escapes C0 controls itself; C1 (U+0085) is valid JSON text and stays.
        let raw: &[char] = if json {
            &['\x1b', '\r']
        } else {
            &['\x1b', '\r', '\u{85}']
        };
        assert!(
            !text.contains(raw),
            "a raw control character reached the log: {text:?}"
        );
    }
}

fn parse_env_blocks(text: &str) -> Vec<BTreeMap<String, String>> {
    text.split("---\n")
        .filter(|b| !b.trim().is_empty())
        .map(|b| {
            b.lines()
                .filter_map(|l| l.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        })
        .collect()
}

#[tokio::test]
async fn the_alert_command_runs_once_per_incident_with_the_documented_variables() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("alerts.log");
    let cmd = format!(
        "[alerts]\ncommand = \"env | grep ^RATELIMIT_ | sort >> '{0}'; echo --- >> '{0}'\"\n",
        out.display()
    );
    let srv = Server::start_in(dir.path(), &config(&cmd)).await;
    let mut c = srv.client().await;
    c.eom("carol@example.com", "m1", "192.0.2.10").await;
    c.eom("carol@example.com", "m2", "192.0.2.11").await;
    for i in 0..10 {
        assert!(
            c.eom("carol@example.com", &format!("x{i}"), "192.0.2.12")
                .await
                .starts_with(DEFER)
        );
    }
    let ops = &srv.daemon.ops;
    eventually("the alert command", || {
        ops.alerts.sent.load(Ordering::Relaxed) == 1
    })
    .await;
    let blocks = parse_env_blocks(&std::fs::read_to_string(&out).unwrap());
    assert_eq!(blocks.len(), 1);
    let env = &blocks[0];
    assert_eq!(env["RATELIMIT_EVENT"], "incident");
    assert_eq!(env["RATELIMIT_USER"], "carol@example.com");
    assert_eq!(env["RATELIMIT_TIER"], "default");
    assert_eq!(env["RATELIMIT_LIMIT"], "2/1h");
    assert_eq!(env["RATELIMIT_USED"], "2");
    assert_eq!(env["RATELIMIT_CLIENT"], "192.0.2.12");
    assert_eq!(env["RATELIMIT_CLIENTS"], "192.0.2.12 192.0.2.11 192.0.2.10");
    assert!(
        env["RATELIMIT_CLEARS_AT"].starts_with("2023-11-14T23:0"),
        "{env:?}"
    );
    assert_eq!(env["RATELIMIT_DRY_RUN"], "false");
    assert_eq!(ops.incidents.load(Ordering::Relaxed), 1);

    // The next window: a second incident, a second alert, and no more.
    srv.clock.advance(Duration::from_secs(2 * 3600));
    for i in 0..5 {
        c.eom("carol@example.com", &format!("y{i}"), "192.0.2.12")
            .await;
    }
    eventually("the second alert", || {
        ops.alerts.sent.load(Ordering::Relaxed) == 2
    })
    .await;
    assert_eq!(ops.incidents.load(Ordering::Relaxed), 2);
    let blocks = parse_env_blocks(&std::fs::read_to_string(&out).unwrap());
    assert_eq!(blocks.len(), 2);
    drop(c);
    srv.stop().await;
}

#[tokio::test]
async fn a_dry_run_tier_alerts_with_dry_run_true_and_answers_dunno() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("alerts.log");
    let toml = format!(
        "[admin]\nenabled = false\ntier_overrides = \"overrides\"\n\
         [tiers.default]\nlimits = [\"1/1h\"]\naction = \"warn\"\n\
         [alerts]\ncommand = \"echo $RATELIMIT_USER $RATELIMIT_DRY_RUN >> '{}'\"\n",
        out.display()
    );
    let srv = Server::start_in(dir.path(), &toml).await;
    let mut c = srv.client().await;
    for i in 0..3 {
        assert_eq!(c.eom("dave", &format!("m{i}"), "192.0.2.1").await, "DUNNO");
    }
    let ops = &srv.daemon.ops;
    eventually("the alert", || ops.alerts.sent.load(Ordering::Relaxed) == 1).await;
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "dave true\n");
    drop(c);
    srv.stop().await;
}

#[tokio::test]
async fn a_slow_or_failing_hook_does_not_delay_answers() {
    let dir = tempfile::tempdir().unwrap();
    // The hook sleeps far longer than any answer may take; the queue holds one.
    let srv = Server::start_in(
        dir.path(),
        &config("[alerts]\ncommand = \"sleep 30\"\ntimeout = \"60s\"\nqueue = 1\n"),
    )
    .await;
    let mut c = srv.client().await;
    for user in ["u1", "u2", "u3", "u4", "u5"] {
        c.eom(user, "a", "192.0.2.1").await;
        c.eom(user, "b", "192.0.2.1").await;
        let t = Instant::now();
        let answer = c.eom(user, "c", "192.0.2.1").await;
        let took = t.elapsed();
        assert!(answer.starts_with(DEFER));
        assert!(
            took < Duration::from_secs(2),
            "an answer took {took:?} while a hook slept"
        );
    }
    let ops = &srv.daemon.ops;
    assert_eq!(ops.incidents.load(Ordering::Relaxed), 5);
    // One hook running, at most one queued: the rest were dropped, and counted.
    assert!(ops.alerts.dropped.load(Ordering::Relaxed) >= 3);
    assert_eq!(ops.alerts.sent.load(Ordering::Relaxed), 0);
    let t = Instant::now();
    assert_eq!(c.eom("someone-else", "z", "192.0.2.1").await, "DUNNO");
    assert!(t.elapsed() < Duration::from_secs(2));
    drop(c);
    let t = Instant::now();
    srv.stop().await; // kills the sleeping hook rather than waiting for it
    assert!(t.elapsed() < Duration::from_secs(15));

    let dir = tempfile::tempdir().unwrap();
    let srv = Server::start_in(dir.path(), &config("[alerts]\ncommand = \"exit 3\"\n")).await;
    let mut c = srv.client().await;
    for i in 0..3 {
        c.eom("erin", &format!("m{i}"), "192.0.2.1").await;
    }
    let ops = &srv.daemon.ops;
    eventually("the failing hook", || {
        ops.alerts.failed.load(Ordering::Relaxed) == 1
    })
    .await;
    assert!(c.eom("erin", "m9", "192.0.2.1").await.starts_with(DEFER));
    drop(c);
    srv.stop().await;
}

/// A one-shot HTTP server: accepts one request, keeps it, answers `status`.
async fn one_request_server(status: &'static str) -> (String, tokio::task::JoinHandle<String>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let h = tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let n = s.read(&mut chunk).await.unwrap();
            buf.extend_from_slice(&chunk[..n]);
            let text = String::from_utf8_lossy(&buf).to_string();
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("Content-Length: "))
                    .unwrap()
                    .parse()
                    .unwrap();
                if body.len() >= len {
                    break;
                }
            }
            if n == 0 {
                break;
            }
        }
        s.write_all(format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n").as_bytes())
            .await
            .unwrap();
        String::from_utf8(buf).unwrap()
    });
    (format!("http://{addr}/hooks/ratelimit?src=test"), h)
}

#[tokio::test]
async fn the_webhook_posts_json_with_the_bearer_token_and_never_logs_it() {
    let logs = Logs::default();
    let _guard = logs.capture(tracing::Level::TRACE);
    let (url, got) = one_request_server("204 No Content").await;
    let dir = tempfile::tempdir().unwrap();
    let toml = config(&format!(
        "[alerts]\nwebhook_url = \"{url}\"\nwebhook_token = \"s3cret-t0ken\"\ntimeout = \"5s\"\n"
    ));
    let srv = Server::start_in(dir.path(), &toml).await;
    let mut c = srv.client().await;
    for i in 0..4 {
        c.eom("frank", &format!("m{i}"), "203.0.113.5").await;
    }
    let request = got.await.unwrap();
    let (head, body) = request.split_once("\r\n\r\n").unwrap();
    assert!(
        head.starts_with("POST /hooks/ratelimit?src=test HTTP/1.1\r\n"),
        "{head}"
    );
    assert!(
        head.lines()
            .any(|l| l == "Authorization: Bearer s3cret-t0ken"),
        "{head}"
    );
    assert!(
        head.contains("\r\nContent-Type: application/json\r\n"),
        "{head}"
    );
    let v: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(v["event"], "incident");
    assert_eq!(v["user"], "frank");
    assert_eq!(v["tier"], "default");
    assert_eq!(v["limit"], "2/1h");
    assert_eq!(v["used"], 2);
    assert_eq!(v["client"], "203.0.113.5");
    assert_eq!(v["clients"], serde_json::json!(["203.0.113.5"]));
    assert_eq!(v["dry_run"], false);
    let ops = &srv.daemon.ops;
    eventually("the webhook", || {
        ops.alerts.sent.load(Ordering::Relaxed) == 1
    })
    .await;
    assert!(!format!("{:?}", srv.daemon.policy.config()).contains("s3cret"));
    drop(c);
    srv.stop().await;
    let text = logs.text();
    assert!(text.contains("alert webhook sent"), "{text}");
    assert!(!text.contains("s3cret"), "the token was logged:\n{text}");
}

async fn get(addr: std::net::SocketAddr, path: &str) -> (String, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    (head.to_string(), body.to_string())
}

/// Checks the Prometheus text format (0.0.4) line by line; returns the samples.
fn parse_prometheus(text: &str) -> BTreeMap<String, f64> {
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    let mut samples = BTreeMap::new();
    let name_ok = |n: &str| {
        !n.is_empty()
            && n.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
            && !n.starts_with(|c: char| c.is_ascii_digit())
    };
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# ") {
            let mut w = rest.splitn(3, ' ');
            let (kind, name, what) = (w.next().unwrap(), w.next().unwrap(), w.next().unwrap());
            assert!(name_ok(name), "{line}");
            match kind {
                "HELP" => assert!(!what.is_empty()),
                "TYPE" => {
                    assert!(["counter", "gauge", "histogram"].contains(&what), "{line}");
                    assert!(
                        types.insert(name.into(), what.into()).is_none(),
                        "TYPE twice: {line}"
                    );
                }
                _ => panic!("bad comment: {line}"),
            }
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("{line}"));
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value: {line}"));
        let name = series.split('{').next().unwrap();
        assert!(name_ok(name), "{line}");
        if let Some(labels) = series.strip_prefix(name).filter(|l| !l.is_empty()) {
            let inner = labels
                .strip_prefix('{')
                .and_then(|l| l.strip_suffix('}'))
                .unwrap();
            for pair in inner.split(',') {
                let (k, v) = pair.split_once('=').unwrap();
                assert!(
                    name_ok(k) && v.starts_with('"') && v.ends_with('"'),
                    "{line}"
                );
            }
        }
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                name.strip_suffix(s)
                    .filter(|f| types.get(*f).is_some_and(|t| t == "histogram"))
            })
            .unwrap_or(name);
        assert!(types.contains_key(family), "no TYPE before {line}");
        assert!(
            samples.insert(series.to_string(), value).is_none(),
            "duplicate {line}"
        );
    }
    samples
}

#[tokio::test]
async fn metrics_parse_as_prometheus_text_and_move_with_requests() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Server::start_in(dir.path(), &config("[metrics]\nlisten = \"127.0.0.1:0\"\n")).await;
    let maddr = srv.daemon.ops.metrics_addr().unwrap();
    let (head, body) = get(maddr, "/metrics").await;
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    assert!(
        head.contains("Content-Type: text/plain; version=0.0.4"),
        "{head}"
    );
    let before = parse_prometheus(&body);
    assert_eq!(
        before["ratelimit_requests_total{stage=\"end_of_message\"}"],
        0.0
    );
    assert_eq!(
        before["ratelimit_decisions_total{action=\"defer\",tier=\"bulk\"}"],
        0.0
    );

    let mut c = srv.client().await;
    c.eom("gina", "m1", "192.0.2.1").await;
    c.eom("gina", "m2", "192.0.2.1").await;
    c.eom("gina", "m3", "192.0.2.1").await;
    c.rcpt("gina", "m4", "192.0.2.1").await;
    c.ask_attrs(&[("protocol_state", "CONNECT")]).await;

    let (_, body) = get(maddr, "/metrics").await;
    let after = parse_prometheus(&body);
    let d = |k: &str| after[k] - before.get(k).copied().unwrap_or(0.0);
    assert_eq!(d("ratelimit_requests_total{stage=\"end_of_message\"}"), 3.0);
    assert_eq!(d("ratelimit_requests_total{stage=\"rcpt\"}"), 1.0);
    assert_eq!(d("ratelimit_requests_total{stage=\"other\"}"), 1.0);
    assert_eq!(
        d("ratelimit_decisions_total{action=\"allow\",tier=\"default\"}"),
        2.0
    );
    assert_eq!(
        d("ratelimit_decisions_total{action=\"defer\",tier=\"default\"}"),
        2.0
    );
    assert_eq!(d("ratelimit_skipped_total"), 1.0);
    assert_eq!(d("ratelimit_messages_charged_total"), 2.0);
    assert_eq!(d("ratelimit_request_duration_seconds_count"), 5.0);
    assert_eq!(
        after["ratelimit_request_duration_seconds_bucket{le=\"+Inf\"}"],
        5.0
    );
    assert_eq!(after["ratelimit_tracked_keys"], 1.0);
    // The other bounded tables: gina's refusal opened one incident, and her
    // client address is kept for incident lines.
    assert_eq!(before["ratelimit_table_entries{table=\"incidents\"}"], 0.0);
    assert_eq!(after["ratelimit_table_entries{table=\"incidents\"}"], 1.0);
    assert_eq!(before["ratelimit_table_entries{table=\"clients\"}"], 0.0);
    assert_eq!(after["ratelimit_table_entries{table=\"clients\"}"], 1.0);
    assert!(after.contains_key("ratelimit_table_entries{table=\"networks\"}"));
    for signal in ["networks", "baseline"] {
        let k = format!("ratelimit_signal_flagged_total{{signal=\"{signal}\"}}");
        assert_eq!(after[k.as_str()], 0.0, "{k}");
    }
    assert_eq!(after["ratelimit_connections_open"], 1.0);
    assert_eq!(d("ratelimit_connections_total"), 1.0);
    assert_eq!(d("ratelimit_incidents_total"), 1.0);
    assert_eq!(after["ratelimit_store_errors_total"], 0.0);
    assert_eq!(after["ratelimit_store_full_refusals_total"], 0.0);
    for store in ["counters", "networks"] {
        for reason in ["idle", "lru"] {
            let k =
                format!("ratelimit_store_evictions_total{{store=\"{store}\",reason=\"{reason}\"}}");
            assert_eq!(after[k.as_str()], 0.0, "{k}");
        }
    }

    let (head, _) = get(maddr, "/nope").await;
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
    drop(c);
    srv.stop().await;
}

#[tokio::test]
async fn connections_refused_by_the_allowlist_are_counted() {
    let dir = tempfile::tempdir().unwrap();
    let toml = config("[metrics]\nlisten = \"127.0.0.1:0\"\n")
        .replace("[admin]", "[server]\nallow = [\"192.0.2.0/24\"]\n\n[admin]");
    let srv = Server::start_in(dir.path(), &toml).await;
    let mut s = tokio::net::TcpStream::connect(srv.addr).await.unwrap();
    let mut buf = Vec::new();
    // Refused: closed without a word.
    assert_eq!(s.read_to_end(&mut buf).await.unwrap(), 0);
    let (_, body) = get(srv.daemon.ops.metrics_addr().unwrap(), "/metrics").await;
    let m = parse_prometheus(&body);
    assert_eq!(
        m["ratelimit_connections_refused_total{reason=\"allowlist\"}"],
        1.0
    );
    assert_eq!(m["ratelimit_connections_total"], 0.0);
    srv.stop().await;
}

#[tokio::test]
async fn connections_evicted_at_the_cap_are_counted_and_logged() {
    let logs = Logs::default();
    let _guard = logs.capture(tracing::Level::INFO);
    let dir = tempfile::tempdir().unwrap();
    let toml = config("[metrics]\nlisten = \"127.0.0.1:0\"\n")
        .replace("[admin]", "[server]\nmax_connections = 1\n\n[admin]");
    let srv = Server::start_in(dir.path(), &toml).await;
    // One idle connection holds the only slot; a newcomer takes it once it has been
    // idle for a second.
    let mut idle = tokio::net::TcpStream::connect(srv.addr).await.unwrap();
    let mut newcomer = srv.client().await;
    assert_eq!(
        newcomer.rcpt("new@example.com", "n.1", "192.0.2.1").await,
        "DUNNO"
    );
    let mut buf = Vec::new();
    assert_eq!(idle.read_to_end(&mut buf).await.unwrap(), 0);
    let (_, body) = get(srv.daemon.ops.metrics_addr().unwrap(), "/metrics").await;
    let m = parse_prometheus(&body);
    assert_eq!(m["ratelimit_connections_evicted_total"], 1.0);
    assert_eq!(m["ratelimit_connections_total"], 2.0);
    let text = logs.text();
    assert!(
        text.contains("max_connections reached: closed the connection idle longest"),
        "{text}"
    );
    drop(newcomer);
    srv.stop().await;
}

#[tokio::test]
async fn replaying_a_recorded_session_gives_the_live_refusals() {
    let dir = tempfile::tempdir().unwrap();
    let toml = config("[record]\npath = \"requests.jsonl\"\n").replace(
        "limits = [\"2/1h\"]",
        "limits = [\"3/1h\", { limit = \"4/1d\", unit = \"recipients\" }]",
    );
    let srv = Server::start_in(dir.path(), &toml).await;
    let mut live = Vec::new();
    let mut a = srv.client().await;
    let mut b = srv.client().await;
    let step = |t: &mut u64| {
        *t += 1;
        srv.clock.advance(Duration::from_secs(7 * 60));
    };
    let mut t = 0;
    for i in 0..6 {
        step(&mut t);
        let (c, client) = if i % 2 == 0 {
            (&mut a, "192.0.2.1")
        } else {
            (&mut b, "198.51.100.2")
        };
        let inst = format!("h{i}");
        let r1 = c.rcpt("henry", &inst, client).await;
        let r2 = c.eom("henry", &inst, client).await;
        // The same message again at END-OF-MESSAGE is charged once.
        let r3 = c.eom("henry", &inst, client).await;
        live.extend([r1, r2, r3]);
        let r4 = c.eom("ivy", &format!("i{i}"), "203.0.113.9").await;
        live.push(r4);
    }
    srv.clock.advance(Duration::from_secs(3600));
    for i in 0..3 {
        live.push(a.eom("henry", &format!("later{i}"), "192.0.2.1").await);
    }
    drop((a, b));
    let live_refused = live.iter().filter(|r| r.starts_with(DEFER)).count();
    assert!(live_refused >= 6, "{live:?}");
    let cfg_path = srv.config_path.clone();
    srv.stop().await;

    let log = dir.path().join("requests.jsonl");
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(text.lines().count(), live.len());
    // Every request is recorded at the server's (manual) time, not the system's.
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let ts = v["ts"]
            .as_u64()
            .unwrap_or_else(|| panic!("no ts in {line}"));
        assert!((T0..=T0 + 2 * 3_600_000).contains(&ts), "{line}");
    }

    let cfg = daemon::load_config(Some(&cfg_path), &[]).unwrap();
    let report = replay::replay(
        cfg,
        std::io::BufReader::new(std::fs::File::open(&log).unwrap()),
    )
    .await
    .unwrap();
    assert!(report.bad_lines.is_empty(), "{:?}", report.bad_lines);
    assert_eq!(report.requests.len(), live.len());
    assert_eq!(report.differences(), 0, "{:#?}", report.requests);
    assert_eq!(report.refused().count(), live_refused);
    let refused_live: Vec<bool> = live.iter().map(|r| r.starts_with(DEFER)).collect();
    let refused_replay: Vec<bool> = report.requests.iter().map(|r| r.refused).collect();
    assert_eq!(refused_live, refused_replay);
    let users: Vec<(&str, &str)> = report
        .incidents
        .iter()
        .map(|i| (i.incident.key.as_str(), i.incident.limit.as_str()))
        .collect();
    // henry is refused at RCPT of his 4th message, before ivy sends her 4th; after an
    // hour henry is under the hourly limit again but reaches the daily one.
    assert_eq!(
        users,
        [
            ("henry", "3/1h"),
            ("ivy", "3/1h"),
            ("henry", "4/1d recipients")
        ]
    );

    // Through a looser configuration nobody would have been refused.
    let text = std::fs::read_to_string(&cfg_path)
        .unwrap()
        .replace("3/1h", "30/1h")
        .replace("4/1d", "40/1d");
    let loose_path = dir.path().join("loose.toml");
    std::fs::write(&loose_path, text).unwrap();
    let loose = daemon::load_config(Some(&loose_path), &[]).unwrap();
    let report = replay::replay(
        loose,
        std::io::BufReader::new(std::fs::File::open(&log).unwrap()),
    )
    .await
    .unwrap();
    assert_eq!(report.refused().count(), 0);
    assert_eq!(report.differences(), live_refused);
    let out = replay::render(&report, "loose.toml");
    assert!(out.contains("nobody would have been refused"), "{out}");
}

/// Reads until the peer closes; how long that took (`None`: still open after `limit`).
async fn closed_within(s: &mut tokio::net::TcpStream, limit: Duration) -> Option<Duration> {
    let t = Instant::now();
    let mut buf = [0u8; 256];
    loop {
        match tokio::time::timeout(limit.saturating_sub(t.elapsed()), s.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(t.elapsed()),
            Ok(Ok(_)) => {}
        }
    }
}

/// A flood of idle connections cannot hold the metrics endpoint: beyond
/// `MAX_SCRAPES` a connection is closed at once, and one that sends no request head
/// is closed after the 1 s header timeout, after which scrapes work again.
#[tokio::test]
async fn the_metrics_endpoint_caps_scrapes_and_closes_silent_connections() {
    use ratelimit_policyd::ops::metrics::MAX_SCRAPES;
    let dir = tempfile::tempdir().unwrap();
    let srv = Server::start_in(dir.path(), &config("[metrics]\nlisten = \"127.0.0.1:0\"\n")).await;
    let maddr = srv.daemon.ops.metrics_addr().unwrap();
    let mut idle = Vec::new();
    for _ in 0..MAX_SCRAPES {
        idle.push(tokio::net::TcpStream::connect(maddr).await.unwrap());
    }
    // Let the accept loop take them all before the one over the cap.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut over = tokio::net::TcpStream::connect(maddr).await.unwrap();
    let closed = closed_within(&mut over, Duration::from_millis(700)).await;
    assert!(
        closed.is_some(),
        "a connection over the cap is closed at once"
    );

    let waited = closed_within(&mut idle[0], Duration::from_secs(4)).await;
    let waited = waited.expect("a connection that sends nothing is closed");
    assert!(waited < Duration::from_secs(3), "closed after {waited:?}");
    for s in &mut idle[1..] {
        assert!(closed_within(s, Duration::from_secs(2)).await.is_some());
    }
    let (head, body) = get(maddr, "/metrics").await;
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    assert!(body.contains("ratelimit_uptime_seconds"), "{body}");
    srv.stop().await;
}
