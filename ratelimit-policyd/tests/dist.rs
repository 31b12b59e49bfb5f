//! The monitoring files in `dist/` against a live server: every metric that the
//! alerting rules and the Grafana dashboard use is one the server exports; the
//! dashboard is a Grafana dashboard model; and, with promtool installed, the rules
//! and the live `/metrics` output pass `promtool check`.

mod support;

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use ratelimit_policyd::daemon;
use support::server::Server;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn dist(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../dist")
        .join(file)
}

/// A server with metrics, a snapshot written (so that its age is exported) and a
/// few requests answered (one refused); its `/metrics` output.
async fn live_metrics() -> String {
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("snap");
    let srv = Server::start_in(
        dir.path(),
        &format!(
            "[metrics]\nlisten = \"127.0.0.1:0\"\n\n[store]\nsnapshot_path = {:?}\n\n\
             [tiers.default]\nlimits = [\"2/1h\"]\n",
            snap.to_str().unwrap()
        ),
    )
    .await;
    let mut c = srv.client().await;
    for m in ["m1", "m2", "m3"] {
        c.eom("u@example.com", m, "192.0.2.1").await;
    }
    assert!(daemon::write_snapshot(&srv.daemon.policy).is_some());
    let addr = srv.daemon.ops.metrics_addr().unwrap();
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    srv.stop().await;
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_string()
}

/// Each metric family in Prometheus text (`# TYPE name kind`), with its kind.
fn families(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .map(|l| {
            let (name, kind) = l.split_once(' ').unwrap();
            (name.to_string(), kind.to_string())
        })
        .collect()
}

/// Every `ratelimit_...` name in `text`.
fn names_used(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("ratelimit_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
            .unwrap_or(tail.len());
        // Part of a longer identifier (e.g. "ratelimit_policyd") is not a metric.
        let before = rest[..at].chars().next_back();
        if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
            out.insert(tail[..end].to_string());
        }
        rest = &tail[end..];
    }
    out
}

/// The names in `used` that the exported `families` do not have: a histogram's
/// `_bucket`, `_sum` and `_count` series count as its family.
fn unknown(used: &BTreeSet<String>, families: &[(String, String)]) -> Vec<String> {
    let has = |name: &str, kinds: &[&str]| {
        families
            .iter()
            .any(|(n, k)| n == name && (kinds.is_empty() || kinds.contains(&k.as_str())))
    };
    used.iter()
        .filter(|name| {
            if has(name, &[]) {
                return false;
            }
            let series_of = |suffix: &str, kinds: &[&str]| {
                name.strip_suffix(suffix)
                    .is_some_and(|family| has(family, kinds))
            };
            !(series_of("_bucket", &["histogram"])
                || series_of("_sum", &["histogram", "summary"])
                || series_of("_count", &["histogram", "summary"]))
        })
        .cloned()
        .collect()
}

/// The `expr` strings of the dashboard's panels, checking the model's shape on
/// the way: what Grafana needs to import it.
fn dashboard_exprs() -> Vec<String> {
    let text = std::fs::read_to_string(dist("grafana-dashboard.json")).unwrap();
    let d: serde_json::Value = serde_json::from_str(&text).unwrap();
    for key in ["title", "uid"] {
        assert!(d[key].is_string(), "dashboard {key}");
    }
    assert!(d["schemaVersion"].as_u64().unwrap() >= 36);
    let vars = d["templating"]["list"].as_array().unwrap();
    assert!(
        vars.iter().any(|v| v["type"] == "datasource"),
        "a data source variable"
    );
    let panels = d["panels"].as_array().unwrap();
    let mut ids = BTreeSet::new();
    let mut exprs = Vec::new();
    for p in panels {
        let title = p["title"].as_str().unwrap();
        assert!(ids.insert(p["id"].as_u64().unwrap()), "{title}: id reused");
        assert!(p["type"].is_string(), "{title}: type");
        for k in ["x", "y", "w", "h"] {
            assert!(p["gridPos"][k].is_u64(), "{title}: gridPos.{k}");
        }
        assert!(p["gridPos"]["x"].as_u64().unwrap() + p["gridPos"]["w"].as_u64().unwrap() <= 24);
        let targets = p["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{title}: no query");
        for t in targets {
            assert!(t["refId"].is_string(), "{title}: refId");
            exprs.push(t["expr"].as_str().unwrap().to_string());
        }
    }
    exprs
}

#[tokio::test]
async fn every_metric_the_rules_and_the_dashboard_use_is_exported() {
    let families = families(&live_metrics().await);
    let rules = std::fs::read_to_string(dist("prometheus-rules.yml")).unwrap();
    // Only the expressions: comments and annotations may name other things.
    let exprs: String = rules
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("expr:"))
        .collect::<Vec<_>>()
        .join("\n");
    let in_rules = names_used(&exprs);
    assert!(in_rules.len() >= 5, "{in_rules:?}");
    assert_eq!(unknown(&in_rules, &families), Vec::<String>::new(), "rules");

    let in_dashboard = names_used(&dashboard_exprs().join("\n"));
    for wanted in [
        "ratelimit_decisions_total",
        "ratelimit_incidents_total",
        "ratelimit_request_duration_seconds_bucket",
        "ratelimit_store_errors_total",
    ] {
        assert!(in_dashboard.contains(wanted), "dashboard has no {wanted}");
    }
    assert_eq!(
        unknown(&in_dashboard, &families),
        Vec::<String>::new(),
        "dashboard"
    );
}

#[test]
fn a_name_that_is_not_exported_is_reported() {
    let families = vec![
        ("ratelimit_a_total".to_string(), "counter".to_string()),
        ("ratelimit_h_seconds".to_string(), "histogram".to_string()),
    ];
    let used = names_used(
        "rate(ratelimit_a_total[5m]) + ratelimit_h_seconds_bucket + ratelimit_h_seconds_count \
         + ratelimit_a_total_sum + ratelimit_gone_total + mail_ratelimit_x_total",
    );
    assert_eq!(
        unknown(&used, &families),
        ["ratelimit_a_total_sum", "ratelimit_gone_total"]
    );
}

/// `promtool ARGS` with `input` on stdin: its exit status and output.
fn promtool(args: &[&str], input: &str) -> (bool, String) {
    let mut child = Command::new("promtool")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian: apt-get install prometheus)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("promtool {}:\n{text}", args.join(" "));
    (out.status.success(), text)
}

#[test]
#[ignore = "needs promtool; scripts/test installs it (Debian: prometheus)"]
fn promtool_accepts_the_rules() {
    let path = dist("prometheus-rules.yml");
    let (ok, out) = promtool(&["check", "rules", path.to_str().unwrap()], "");
    assert!(ok, "{out}");
    assert!(out.contains("SUCCESS: 7 rules found"), "{out}");
}

#[tokio::test]
#[ignore = "needs promtool; scripts/test installs it (Debian: prometheus)"]
async fn promtool_accepts_the_live_metrics() {
    let body = live_metrics().await;
    let (ok, out) = promtool(&["check", "metrics"], &body);
    assert!(ok, "{out}");
}
