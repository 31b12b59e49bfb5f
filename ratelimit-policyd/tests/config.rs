//! The configuration through its public API: defaults, errors (`file:line: field:
//! message`), limits, the tier map file, redaction.

use std::path::Path;
use std::time::Duration;

use ratelimit_core::Unit;
use ratelimit_policyd::config::{
    self, ActionKind, Backend, DEFAULT_CONFIG, FailMode, ListenAddr, LogTarget, WithoutSasl,
    apply_map_file, defaults, load, parse, redact_url,
};

#[test]
fn redis_passwords_are_redacted_whole() {
    for (url, want) in [
        ("redis://:s3cret@h:6379/", "redis://:***@h:6379/"),
        ("redis://admin:p@ss@h:6379/0", "redis://admin:***@h:6379/0"),
        (
            "redis+unix:///r.sock?db=1&pass=pw",
            "redis+unix:///r.sock?db=1&pass=***",
        ),
        ("redis://127.0.0.1:6379/", "redis://127.0.0.1:6379/"),
    ] {
        assert_eq!(redact_url(url), want);
    }
}

#[test]
fn builtin_default_is_valid() {
    let c = parse(DEFAULT_CONFIG, "default", None).unwrap();
    assert_eq!(
        c.server.listen,
        [ListenAddr::Tcp("127.0.0.1:10031".parse().unwrap())]
    );
    assert_eq!(
        c.tiers.map.default_tier().limits(),
        &["100/1h".parse().unwrap()]
    );
    assert_eq!(
        c.store.backend,
        Backend::Memory {
            max_keys: 1_000_000
        }
    );
    assert_eq!(c.keying.without_sasl, WithoutSasl::Skip);
}

#[test]
fn the_example_config_is_valid() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/example.toml");
    let c = load(&path).unwrap_or_else(|e| panic!("{e}"));
    assert!(c.tiers.map.get("bulk").is_some());
}

fn err(text: &str) -> String {
    parse(text, "test.toml", None).unwrap_err().to_string()
}

#[test]
fn errors_name_file_line_and_field() {
    let cases = [
        (
            "[server]\nlisten = [\"nowhere\"]\n",
            "test.toml:2: server.listen: \"nowhere\" is neither",
        ),
        (
            "[server]\nbogus = 1\n",
            "test.toml:2: unknown field `bogus`",
        ),
        (
            "[server]\nlog_target = \"mail.log\"\n",
            "test.toml:2: server.log_target: \"mail.log\": expected \"auto\"",
        ),
        (
            "[server]\nlog_target = \"journald\"\nsyslog_socket = \"/dev/log\"\n",
            "test.toml:3: server.syslog_socket: applies to log_target = \"syslog\" only",
        ),
        (
            "[server]\nlog_target = \"syslog\"\nsyslog_socket = \"\"\n",
            "test.toml:3: server.syslog_socket: is empty",
        ),
        (
            "[tiers.default]\nlimits = [\"100/0h\"]\n",
            "test.toml:2: tiers.default.limits: invalid limit \"100/0h\"",
        ),
        (
            "[tiers.default]\nlimits = [\"10/1h\"]\naction = \"explode\"\n",
            "test.toml:3: tiers.default.action: \"explode\"",
        ),
        (
            "[tiers.default]\nreply_code = \"550\"\n",
            "test.toml:2: tiers.default.reply_code: \"550\": action \"defer\" needs a 4xx code",
        ),
        (
            "[tiers.gold]\nlimits = []\n",
            "test.toml: default_tier: no tier is called \"default\"",
        ),
        (
            "[tiers.default]\n[assign]\n\"a@b\" = \"gold\"\n",
            "test.toml:3: assign.\"a@b\": \"a@b\" is assigned to tier \"gold\"",
        ),
        (
            "[server]\nidle_timeout = \"soon\"\n",
            "test.toml:2: server.idle_timeout: \"soon\" is not a duration",
        ),
        (
            "[exempt]\nclients = [\"10.0.0.0/33\"]\n",
            "test.toml:2: exempt.clients: \"10.0.0.0/33\" is not",
        ),
        (
            "[store]\nbackend = \"sql\"\n",
            "test.toml:2: store.backend: \"sql\"",
        ),
        (
            "[tiers.default]\nlimits = [{ limit = \"10/1h\", unit = \"parsecs\" }]\n",
            "test.toml:2: tiers.default.limits: unknown unit",
        ),
    ];
    for (text, want) in cases {
        let got = err(text);
        assert!(
            got.starts_with(want),
            "for\n{text}\n got: {got}\nwant: {want}"
        );
    }
}

#[test]
fn limits_as_strings_and_tables() {
    let c = parse(
        r#"
[tiers.default]
limits = [
  "100/1h",
  { limit = "1000/1d", unit = "recipients" },
  { limit = "50/10m", algorithm = "bucket", burst = 10 },
  { limit = "10/1h", precision = 3600, unit = "bytes" },
]
action = "defer"
reply_code = "452 4.7.1"
message = "slow down"
"#,
        "t",
        None,
    )
    .unwrap();
    let l = c.tiers.map.default_tier().limits();
    assert_eq!(l.len(), 4);
    assert_eq!(l[1].unit(), Unit::Recipients);
    assert_eq!(
        l[2].algorithm(),
        ratelimit_core::Algorithm::TokenBucket { burst: 10 }
    );
    assert_eq!(
        l[3].algorithm(),
        ratelimit_core::Algorithm::SlidingWindow { precision: 3600 }
    );
    let p = &c.tiers.policies["default"];
    assert_eq!(p.action, ActionKind::Code("452 4.7.1".into()));
    assert_eq!(p.message, "slow down");
}

#[test]
fn map_file_lines_and_errors() {
    let mut c = parse(
        "[tiers.default]\n[tiers.bulk]\nlimits=[\"1000/1h\"]\n",
        "t",
        None,
    )
    .unwrap();
    let n = apply_map_file(
        &mut c.tiers.map,
        "# comment\n\nAlice@Example.com bulk\n@lists.example bulk # trailing\n",
        "map",
    )
    .unwrap();
    assert_eq!(n, 2);
    assert_eq!(c.tiers.map.tier_of("alice@example.com").name(), "bulk");
    assert_eq!(c.tiers.map.tier_of("x@lists.example").name(), "bulk");
    let e = apply_map_file(&mut c.tiers.map, "a bulk\nb gold\n", "map").unwrap_err();
    assert_eq!(
        e.to_string(),
        "map:2: \"b\" is assigned to tier \"gold\", which is not defined"
    );
    let e = apply_map_file(&mut c.tiers.map, "just-one-word\n", "map").unwrap_err();
    assert!(e.to_string().starts_with("map:1: expected"), "{e}");
}

#[test]
fn an_empty_file_is_the_defaults_table() {
    let c = parse("", "empty.toml", None).unwrap();
    assert_eq!(c.server.listen, [ListenAddr::Tcp(defaults::LISTEN)]);
    let allow: Vec<String> = c.server.allow.iter().map(|n| n.to_string()).collect();
    assert_eq!(allow, defaults::ALLOW);
    assert_eq!(c.server.max_connections, defaults::MAX_CONNECTIONS);
    assert_eq!(c.server.max_connections, 1024);
    assert_eq!(c.server.idle_timeout, Duration::from_secs(600));
    assert_eq!(c.server.decision_timeout, Duration::from_millis(500));
    assert_eq!(c.server.on_store_error, FailMode::Open);
    assert!(!c.server.log_json);
    assert_eq!(c.server.log_target, LogTarget::Auto);
    assert_eq!(c.server.syslog_socket, Path::new("/dev/log"));
    assert_eq!(
        c.store.backend,
        Backend::Memory {
            max_keys: defaults::MAX_KEYS
        }
    );
    assert_eq!(defaults::MAX_KEYS, 1_000_000);
    assert_eq!(c.store.snapshot, None);
    assert_eq!(c.store.sweep_interval, defaults::SWEEP_INTERVAL);
    assert_eq!(c.keying.without_sasl, defaults::WITHOUT_SASL);
    assert_eq!((c.keying.ipv4_prefix, c.keying.ipv6_prefix), (24, 64));
    assert_eq!(c.tiers.map.default_tier().name(), defaults::TIER);
    assert_eq!(
        c.tiers.map.default_tier().limits(),
        &["100/1h".parse().unwrap()]
    );
    let p = &c.tiers.policies[defaults::TIER];
    assert_eq!(p.action, defaults::TIER_ACTION);
    assert_eq!(p.message, defaults::MESSAGE);
    assert!(c.networks.by_tier.is_empty());
    assert_eq!(c.ops.alerts.timeout, defaults::ALERTS_TIMEOUT);
    assert_eq!(c.ops.alerts.queue, defaults::ALERTS_QUEUE);
    assert_eq!(
        c.ops.admin.socket.as_deref(),
        Some(Path::new(defaults::ADMIN_SOCKET))
    );
    assert_eq!(
        c.ops.admin.tier_overrides,
        Path::new(config::ops::DEFAULT_TIER_OVERRIDES)
    );
    assert_eq!(c.ops.metrics, None);
    assert_eq!(c.ops.record, None);
}

#[test]
fn redis_and_snapshot_defaults_come_from_the_table() {
    let c = parse(
        "[store]\nbackend = \"redis\"\nsnapshot_path = \"s\"\n",
        "t",
        None,
    )
    .unwrap();
    assert_eq!(
        c.store.backend,
        Backend::Redis {
            url: defaults::REDIS_URL.into(),
            cluster_nodes: Vec::new(),
            tls: Default::default(),
            password: None,
            key_prefix: defaults::REDIS_KEY_PREFIX.into(),
            connect_timeout: defaults::REDIS_CONNECT_TIMEOUT,
            command_timeout: defaults::REDIS_COMMAND_TIMEOUT,
            server_time: defaults::REDIS_SERVER_TIME,
            batch: false,
        }
    );
    let snap = c.store.snapshot.unwrap();
    assert_eq!(snap.interval, defaults::SNAPSHOT_INTERVAL);
    assert!(!snap.start_empty_if_bad);
    let c = parse("[networks]\nmax = 3\n", "t", None).unwrap();
    let n = &c.networks.by_tier[defaults::TIER];
    assert_eq!(n.action, defaults::NETWORKS_ACTION);
    assert_eq!(n.message, config::DEFAULT_NETWORKS_MESSAGE);
    assert_eq!(n.limit.window(), defaults::NETWORKS_WINDOW);
}

#[test]
fn every_section_reports_file_line_and_field() {
    let cases = [
        (
            "[server]\non_store_error = \"maybe\"\n",
            "test.toml:2: server.on_store_error: \"maybe\": expected \"open\" (answer DUNNO), \"closed\" (defer) or \"local\" (this server's own counters)",
        ),
        (
            "[server]\nlisten = []\n",
            "test.toml: server.listen: needs at least one address",
        ),
        (
            "[store]\nbackend = \"redis\"\nredis_time = \"atomic\"\n",
            "test.toml:3: store.redis_time: \"atomic\": expected \"server\" or \"local\"",
        ),
        (
            "[store]\nmax_keys = 0\n",
            "test.toml:2: store.max_keys: must be at least 1",
        ),
        (
            "[keying]\nwithout_sasl = \"ip\"\n",
            "test.toml:2: keying.without_sasl: \"ip\": expected skip, client_address, client_prefix or sender",
        ),
        (
            "[keying]\nipv6_prefix = 129\n",
            "test.toml:2: keying.ipv6_prefix: must be from 0 to 128",
        ),
        (
            "[alerts]\n\nqueue = 0\n",
            "test.toml:3: alerts.queue: must be at least 1",
        ),
        (
            "[alerts]\ntimeout = \"0s\"\n",
            "test.toml:2: alerts.timeout: must be longer than zero",
        ),
        (
            "[admin]\nsocket = \" \"\n",
            "test.toml:2: admin.socket: must not be empty",
        ),
        (
            "[networks]\nmax = 2\naction = \"explode\"\n",
            "test.toml:3: networks.action: \"explode\": expected hold, defer, reject or warn",
        ),
        (
            "[tiers.default]\naction = \"hold\"\nreply_code = \"451\"\n",
            "test.toml:3: tiers.default.reply_code: reply_code applies only to defer and reject",
        ),
        (
            "[tiers.default]\naction = \"reject\"\nreply_code = \"451\"\n",
            "test.toml:3: tiers.default.reply_code: \"451\": action \"reject\" needs a 5xx code",
        ),
    ];
    for (text, want) in cases {
        assert_eq!(err(text), want, "for\n{text}");
    }
}

#[test]
fn reply_codes_pick_the_action() {
    let action = |text: &str| {
        parse(&format!("[tiers.default]\n{text}"), "t", None)
            .unwrap()
            .tiers
            .policies["default"]
            .action
            .clone()
    };
    assert_eq!(action(""), ActionKind::Defer);
    assert_eq!(
        action("reply_code = \"421  4.7.0\"\n"),
        ActionKind::Code("421 4.7.0".into())
    );
    assert_eq!(
        action("action = \"reject\"\nreply_code = \"554 5.7.1\"\n"),
        ActionKind::Reject(Some("554 5.7.1".into()))
    );
    assert_eq!(action("action = \"reject\"\n"), ActionKind::Reject(None));
    assert_eq!(action("action = \"dry-run\"\n"), ActionKind::Warn);
    assert_eq!(action("action = \"hold\"\n"), ActionKind::Hold);
}

/// Tier names are written in `user tier` lines (tier map, overrides), log lines and
/// metric labels: one that needs quoting in any of them is refused at load.
#[test]
fn tier_names_that_a_map_file_could_not_hold_are_refused() {
    for name in [
        "big customers",
        "a#b",
        "new\\nline",
        "tab\\tbed",
        "",
        "ünicode",
    ] {
        let text = format!("[tiers.default]\nlimits = []\n\n[tiers.\"{name}\"]\nlimits = []\n");
        let e = err(&text);
        assert!(e.starts_with("test.toml:4: tiers."), "{name:?}: {e}");
        assert!(
            e.contains("a tier name is 1 to 64 ASCII letters"),
            "{name:?}: {e}"
        );
        assert!(!e.contains(['\n', '\t']), "{name:?}: {e:?}");
    }
    let long = "x".repeat(65);
    assert!(
        err(&format!(
            "default_tier = \"{long}\"\n[tiers.{long}]\nlimits = []\n"
        ))
        .contains("a tier name")
    );
    let ok = parse(
        "default_tier = \"std-1.0_a\"\n[tiers.\"std-1.0_a\"]\nlimits = []\n",
        "test.toml",
        None,
    );
    assert!(ok.is_ok(), "{ok:?}");
}

#[test]
fn secret_files_are_read_relative_to_the_config_and_checked() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("pw"), "s3cret\r\n").unwrap();
    std::fs::write(dir.path().join("empty"), "\n").unwrap();
    std::fs::write(dir.path().join("ctl"), "a\x1bb\n").unwrap();
    let load_text = |text: &str| {
        let p = dir.path().join("t.toml");
        std::fs::write(&p, text).unwrap();
        load(&p)
    };
    let redis = "[store]\nbackend = \"redis\"\n";
    let c = load_text(&format!("{redis}redis_password_file = \"pw\"\n")).unwrap();
    let Backend::Redis { password, .. } = &c.store.backend else {
        panic!("not redis");
    };
    assert_eq!(password.as_ref().map(|p| p.expose()), Some("s3cret"));
    assert!(!format!("{:?}", c.store).contains("s3cret"));
    let e = load_text(&format!("{redis}redis_password_file = \"empty\"\n"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("t.toml:3: store.redis_password_file: ") && e.ends_with("empty is empty"),
        "{e}"
    );
    let e = load_text(
        "[store]\nbackend = \"redis\"\nredis_url = \"redis://:pw@h/\"\nredis_password_file = \"pw\"\n",
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains(":4: store.redis_password_file: redis_url has a password too"),
        "{e}"
    );
    let hook = "[alerts]\nwebhook_url = \"http://h/x\"\n";
    let c = load_text(&format!("{hook}webhook_token_file = \"pw\"\n")).unwrap();
    assert_eq!(
        c.ops.alerts.webhook_token.as_ref().map(|t| t.expose()),
        Some("s3cret")
    );
    let e = load_text(&format!("{hook}webhook_token_file = \"ctl\"\n"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(":3: alerts.webhook_token_file: the token must not contain control"),
        "{e}"
    );
    let e = load_text(&format!(
        "{hook}webhook_token = \"x\"\nwebhook_token_file = \"pw\"\n"
    ))
    .unwrap_err()
    .to_string();
    assert!(
        e.contains(":4: alerts.webhook_token_file: set webhook_token or"),
        "{e}"
    );
}
