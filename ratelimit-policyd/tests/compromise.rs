//! The compromise signal end to end over the policy protocol: a real server
//! (`support::server` on 127.0.0.1:0) with a manual clock, spoken to in raw bytes.
//!
//! The same scenarios run on the memory store and, in ignored tests that need a
//! Redis server (`scripts/with-redis`), on the Redis store.

mod support;

use std::sync::Arc;
use std::time::Duration;

use ratelimit_policyd::config;
use ratelimit_policyd::policy::Incident;
use support::server::{Client, Incidents, Req, Server, T0};

/// A server with [`BASE_CONFIG`], one connection to it, the incidents it opened, and
/// the instance of the message being sent.
struct Session {
    srv: Server,
    c: Client,
    incidents: Incidents,
    instance: u64,
}

const BASE_CONFIG: &str = r#"
[server]
listen = ["127.0.0.1:0"]

[keying]
ipv4_prefix = 24
ipv6_prefix = 64

[exempt]
roaming_users = ["Traveller@Example.com"]

[networks]
max = 3
window = "1h"

[tiers.default]
limits = ["100/1h"]

[tiers.roaming]
limits = ["100/1h"]
networks_exempt = true

[tiers.strict]
limits = ["1/1h"]
max_networks = 2
networks_window = "30m"

[tiers.watch]
limits = ["100/1h"]
networks_action = "warn"

[tiers.deferring]
limits = []
max_networks = 1
networks_action = "defer"
networks_message = "{user}: {networks} networks (over {max} in {window}), retry in {retry}"

[assign]
"nomad@example.com" = "roaming"
"strict@example.com" = "strict"
"watched@example.com" = "watch"
"deferred@example.com" = "deferring"
"#;

/// A server with `extra` after [`BASE_CONFIG`] (an `[alerts]` hook, a `[store]`).
async fn start(extra: &str) -> Session {
    let text = format!("{BASE_CONFIG}{extra}");
    let incidents = Incidents::default();
    let srv = Server::with(&text)
        .observer(Arc::new(incidents.clone()))
        .start()
        .await;
    let c = srv.client().await;
    Session {
        srv,
        c,
        incidents,
        instance: 0,
    }
}

/// One request as Postfix sends it for message `instance` of `user` from `client`.
fn request(stage: &str, user: &str, client: &str, instance: u64) -> Vec<u8> {
    let instance = format!("1a2b.{instance:x}");
    let mut req = Req::new(stage, user, &instance).from(client);
    req.sender = user;
    req.bytes()
}

impl Session {
    /// Sends one request; returns the reply's action (e.g. `DUNNO`).
    async fn ask(&mut self, stage: &str, user: &str, client: &str) -> String {
        let req = request(stage, user, client, self.instance);
        self.c.raw(&req).await.expect("connection closed")
    }

    async fn reply(&mut self) -> String {
        self.c.reply().await.expect("connection closed")
    }

    /// One message: RCPT, DATA, END-OF-MESSAGE from `client`; the three answers.
    async fn message(&mut self, user: &str, client: &str) -> [String; 3] {
        self.instance += 1;
        [
            self.ask("RCPT", user, client).await,
            self.ask("DATA", user, client).await,
            self.ask("END-OF-MESSAGE", user, client).await,
        ]
    }

    fn incidents(&self) -> Vec<Incident> {
        self.incidents.all()
    }
}

fn dunno() -> [String; 3] {
    ["DUNNO".to_string(), "DUNNO".into(), "DUNNO".into()]
}

// ---------------------------------------------------------------- scenarios

async fn two_networks_are_unaffected(mut s: Session) {
    for i in 0..5 {
        assert_eq!(s.message("alice@example.com", "192.0.2.10").await, dunno());
        assert_eq!(
            s.message("alice@example.com", &format!("198.51.100.{i}"))
                .await,
            dunno()
        );
    }
    assert!(s.incidents().is_empty());
}

async fn the_first_request_past_the_threshold_is_held(mut s: Session) {
    for net in ["192.0.2.1", "198.51.100.1", "203.0.113.1"] {
        assert_eq!(s.message("bob@example.com", net).await, dunno(), "{net}");
    }
    s.srv.clock.advance(Duration::from_secs(600));
    s.instance += 1;
    let held = s.ask("RCPT", "bob@example.com", "100.64.7.7").await;
    assert_eq!(
        held,
        "HOLD triggers HOLD action: bob@example.com sent from more than 3 networks within 1h"
    );
    // The rest of that message, and the next ones from anywhere, are held too.
    assert!(
        s.ask("DATA", "bob@example.com", "100.64.7.7")
            .await
            .starts_with("HOLD ")
    );
    assert!(
        s.ask("END-OF-MESSAGE", "bob@example.com", "100.64.7.7")
            .await
            .starts_with("HOLD ")
    );
    for r in s.message("bob@example.com", "192.0.2.1").await {
        assert!(r.starts_with("HOLD "), "{r}");
    }
    // One incident, distinguishable from volume ones, naming the address.
    let incidents = s.incidents();
    assert_eq!(incidents.len(), 1, "{incidents:?}");
    let i = &incidents[0];
    assert_eq!(
        (i.key.as_str(), i.tier.as_str(), i.limit.as_str(), i.used),
        ("bob@example.com", "default", "networks>3/1h", 4)
    );
    assert_eq!(i.client_address.as_deref(), Some("100.64.7.7"));
    assert_eq!(i.clears_at, Some(T0 + 600_000 + 3_600_000));
    assert!(!i.dry_run);
    // Others are not affected.
    assert_eq!(s.message("carol@example.com", "100.64.7.7").await, dunno());
    // A window after the last request that crossed, bob is released.
    s.srv.clock.advance(Duration::from_secs(3600));
    assert_eq!(s.message("bob@example.com", "192.0.2.1").await, dunno());
}

async fn addresses_in_one_ipv6_64_count_once(mut s: Session) {
    for i in 1..=20 {
        let ip = format!("2001:db8:0:1::{i:x}");
        assert_eq!(
            s.message("deferred@example.com", &ip).await,
            dunno(),
            "{ip}"
        );
    }
    let got = s
        .ask("RCPT", "deferred@example.com", "2001:db8:0:2::1")
        .await;
    assert_eq!(
        got,
        "DEFER_IF_PERMIT deferred@example.com: 2 networks (over 1 in 1h), retry in 1h"
    );
    // An IPv4 client in IPv4-mapped form is the same /24 as in plain form.
    let mut s2 = start("").await;
    assert_eq!(
        s2.message("deferred@example.com", "192.0.2.1").await,
        dunno()
    );
    assert_eq!(
        s2.message("deferred@example.com", "::ffff:192.0.2.200")
            .await,
        dunno()
    );
}

async fn roaming_users_and_exempt_tiers_are_not_watched(mut s: Session) {
    for i in 0..20 {
        let ip = format!("10.{i}.0.1");
        assert_eq!(s.message("nomad@example.com", &ip).await, dunno());
        assert_eq!(s.message(" traveller@EXAMPLE.com", &ip).await, dunno());
    }
    assert!(s.incidents().is_empty());
}

async fn warn_only_logs_and_alerts(mut s: Session) {
    for i in 0..6 {
        assert_eq!(
            s.message("watched@example.com", &format!("10.{i}.0.1"))
                .await,
            dunno()
        );
    }
    let incidents = s.incidents();
    assert_eq!(incidents.len(), 1, "{incidents:?}");
    assert!(incidents[0].dry_run);
}

async fn a_refused_request_still_reveals_its_address(mut s: Session) {
    // strict: 1 message per hour, more than 2 networks in 30 minutes is held.
    assert_eq!(s.message("strict@example.com", "192.0.2.1").await, dunno());
    s.instance += 1;
    let r = s.ask("RCPT", "strict@example.com", "198.51.100.1").await;
    assert!(r.starts_with("DEFER_IF_PERMIT Too much mail"), "{r}");
    // The deferred attempt counted its network: the third network is held.
    s.instance += 1;
    let r = s.ask("RCPT", "strict@example.com", "203.0.113.1").await;
    assert!(r.starts_with("HOLD "), "{r}");
    assert_eq!(
        s.incidents().last().map(|i| i.limit.clone()).as_deref(),
        Some("networks>2/30m")
    );
}

// ---------------------------------------------------------------- memory store

#[tokio::test]
async fn memory_a_user_from_two_networks_is_unaffected() {
    two_networks_are_unaffected(start("").await).await;
}

#[tokio::test]
async fn memory_a_user_past_the_threshold_is_held_from_the_first_request_past_it() {
    the_first_request_past_the_threshold_is_held(start("").await).await;
}

#[tokio::test]
async fn memory_ipv6_addresses_in_one_64_count_once() {
    addresses_in_one_ipv6_64_count_once(start("").await).await;
}

#[tokio::test]
async fn memory_exempt_users_are_unaffected() {
    roaming_users_and_exempt_tiers_are_not_watched(start("").await).await;
}

#[tokio::test]
async fn memory_warn_only_logs_and_alerts() {
    warn_only_logs_and_alerts(start("").await).await;
}

#[tokio::test]
async fn memory_a_refused_request_still_reveals_its_address() {
    a_refused_request_still_reveals_its_address(start("").await).await;
}

#[tokio::test]
async fn a_user_sending_from_many_random_addresses_keeps_bounded_state() {
    let mut s = start("").await;
    // Pipelined, in batches.
    let n = 20_000u64;
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut batch = Vec::new();
    for i in 0..n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let ip = if i % 2 == 0 {
            format!(
                "{}.{}.{}.{}",
                x >> 56,
                (x >> 48) & 255,
                (x >> 40) & 255,
                x & 255
            )
        } else {
            format!(
                "2001:db8:{:x}:{:x}::{:x}",
                x >> 48,
                (x >> 32) & 0xffff,
                x & 0xffff
            )
        };
        batch.extend(request("RCPT", "mallory@example.com", &ip, i));
        // 256 requests at a time, then their replies (so neither side's socket
        // buffers fill up).
        if i % 256 == 255 || i == n - 1 {
            s.c.send(&batch).await;
            batch.clear();
            for _ in 0..=(i % 256) {
                let r = s.reply().await;
                assert!(r == "DUNNO" || r.starts_with("HOLD "), "{r}");
            }
        }
    }
    let backend = s.srv.daemon.policy.backend();
    let usage = backend.network_usage("mallory@example.com").unwrap();
    let (users, kept, bytes) = (usage.users, usage.networks, usage.heap_bytes);
    assert_eq!((users, kept), (1, 4), "more than 3 networks keeps 4");
    assert!(bytes <= 4 * 16, "{bytes} bytes");
    // Held requests charge nothing: no counters were created either.
    assert_eq!(backend.tracked_keys(), Some(0));
    assert_eq!(s.incidents().len(), 1);
}

// ---------------------------------------------------------------- Redis store

fn redis_config(test: &str) -> String {
    let url = std::env::var("RATELIMIT_TEST_REDIS_URL")
        .unwrap_or_else(|_| "redis://127.0.0.1:6379/".into());
    format!(
        "\n[store]\nbackend = \"redis\"\nredis_url = \"{url}\"\n\
         redis_key_prefix = \"rltest:{}:{test}:\"\nredis_time = \"local\"\n\
         redis_command_timeout = \"2s\"\n",
        std::process::id()
    )
}

async fn redis_server(test: &str) -> Session {
    // `[store]` comes after the tiers in the text: TOML allows any table order.
    start(&redis_config(test)).await
}

#[tokio::test]
#[ignore = "needs redis-server; scripts/test installs and starts it"]
async fn redis_a_user_from_two_networks_is_unaffected() {
    two_networks_are_unaffected(redis_server("two").await).await;
}

#[tokio::test]
#[ignore = "needs redis-server; scripts/test installs and starts it"]
async fn redis_a_user_past_the_threshold_is_held_from_the_first_request_past_it() {
    the_first_request_past_the_threshold_is_held(redis_server("held").await).await;
}

#[tokio::test]
#[ignore = "needs redis-server; scripts/test installs and starts it"]
async fn redis_ipv6_addresses_in_one_64_count_once() {
    addresses_in_one_ipv6_64_count_once(redis_server("v6").await).await;
}

#[tokio::test]
#[ignore = "needs redis-server; scripts/test installs and starts it"]
async fn redis_exempt_users_are_unaffected() {
    roaming_users_and_exempt_tiers_are_not_watched(redis_server("exempt").await).await;
}

#[tokio::test]
#[ignore = "needs redis-server; scripts/test installs and starts it"]
async fn redis_a_refused_request_still_reveals_its_address() {
    a_refused_request_still_reveals_its_address(redis_server("refused").await).await;
}

// ---------------------------------------------------------------- configuration

#[test]
fn networks_settings_are_validated_with_file_line_and_field() {
    let cases = [
        (
            "[tiers.default]\nmax_networks = 0\n",
            "test.toml:2: tiers.default.max_networks: 0: must be from 1 to 1000",
        ),
        (
            "[networks]\nmax = 5000\n",
            "test.toml:2: networks.max: 5000: must be from 1 to 1000",
        ),
        (
            "[tiers.default]\nmax_networks = 5\nnetworks_action = \"explode\"\n",
            "test.toml:3: tiers.default.networks_action: \"explode\": expected hold, defer, reject or warn",
        ),
        (
            "[tiers.default]\nmax_networks = 5\nnetworks_window = \"soon\"\n",
            "test.toml:3: tiers.default.networks_window: \"soon\" is not a duration",
        ),
        (
            "[tiers.default]\nmax_networks = 5\nnetworks_exempt = true\n",
            "test.toml:3: tiers.default.networks_exempt: networks_exempt = true and max_networks contradict",
        ),
        (
            "[tiers.default]\nnetworks_action = \"hold\"\n",
            "test.toml: tiers.default.max_networks: networks_window, networks_action and networks_message need a threshold",
        ),
        (
            "[networks]\nwindow = \"1h\"\n",
            "test.toml: networks: window, action and message need a threshold",
        ),
    ];
    for (text, want) in cases {
        let got = config::parse(text, "test.toml", None)
            .map(|_| "valid".to_string())
            .unwrap_or_else(|e| e.to_string());
        assert!(
            got.starts_with(want),
            "for\n{text}\n got: {got}\nwant: {want}"
        );
    }
}

#[test]
fn tier_settings_override_the_networks_defaults() {
    let cfg = config::parse(BASE_CONFIG, "test.toml", None).unwrap();
    let show = |tier: &str| {
        cfg.networks
            .by_tier
            .get(tier)
            .map(|n| format!("{} {:?}", n.limit, n.action))
    };
    assert_eq!(show("default").as_deref(), Some(">3/1h Hold"));
    assert_eq!(show("strict").as_deref(), Some(">2/30m Hold"));
    assert_eq!(show("watch").as_deref(), Some(">3/1h Warn"));
    assert_eq!(show("deferring").as_deref(), Some(">1/1h Defer"));
    assert_eq!(show("roaming"), None);
    assert!(cfg.exempt.roaming_users.contains("traveller@example.com"));
    let described = config::describe(&cfg);
    assert!(
        described.contains("tier strict: networks >2/30m -> Hold"),
        "{described}"
    );
    // The default text follows the action: logged by Postfix for hold, seen by the
    // client for defer.
    assert_eq!(
        cfg.networks.by_tier["strict"].message,
        config::DEFAULT_NETWORKS_MESSAGE
    );
    let d = config::parse(
        "[networks]\nmax = 2\n[tiers.default]\nnetworks_action = \"defer\"\n",
        "t",
        None,
    )
    .unwrap();
    assert_eq!(
        d.networks.by_tier["default"].message,
        config::DEFAULT_NETWORKS_REFUSAL
    );
    // Without any networks setting nothing is watched (the built-in default).
    assert!(config::builtin().networks.by_tier.is_empty());
    // [networks] alone applies to the default tier of a config without [tiers].
    let cfg = config::parse("[networks]\nmax = 4\n", "t", None).unwrap();
    assert_eq!(
        cfg.networks
            .by_tier
            .get("default")
            .map(|n| n.limit.to_string())
            .as_deref(),
        Some(">4/1h")
    );
}

// ---------------------------------------------------------------- the alert hook

#[tokio::test]
async fn the_alert_hook_hears_of_it_once() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("alerts");
    let mut s = start(&format!(
        "\n[alerts]\ncommand = \"env | grep ^RATELIMIT_ | sort >> '{0}'; echo --- >> '{0}'\"\n",
        out.display()
    ))
    .await;
    for i in 0..8 {
        let answers = s.message("eve@example.com", &format!("10.{i}.0.1")).await;
        assert_eq!(answers[0] == "DUNNO", i < 3, "{i}: {answers:?}");
    }
    let read = || std::fs::read_to_string(&out).unwrap_or_default();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !read().contains("---") {
        assert!(std::time::Instant::now() < deadline, "no alert");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let text = read();
    assert_eq!(text.matches("---").count(), 1, "{text}");
    for line in [
        "RATELIMIT_EVENT=incident",
        "RATELIMIT_USER=eve@example.com",
        "RATELIMIT_LIMIT=networks>3/1h",
        "RATELIMIT_USED=4",
        "RATELIMIT_CLIENT=10.3.0.1",
        "RATELIMIT_DRY_RUN=false",
    ] {
        assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
    }
}
