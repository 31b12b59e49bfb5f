//! The baseline signal end to end over the policy protocol: a real server
//! (`support::server` on 127.0.0.1:0) with a manual clock, spoken to in raw bytes.
//!
//! alice sends one message a day for three days; the next morning her account sends
//! without stopping. With `factor = 3, min = 4` her threshold is `max(4, 3 × 1) = 4`: four
//! messages in the hour are accepted, the fifth is held, with one incident that
//! says why in numbers. bob, with no history, is judged by his tier only.

mod support;

use std::sync::Arc;
use std::time::Duration;

use ratelimit_policyd::policy::{Counted, Incident, Signal};
use ratelimit_policyd::{daemon, replay};
use support::server::{Client, Incidents, Req, Server, T0};

const CONFIG: &str = r#"
[server]
listen = ["127.0.0.1:0"]

[baseline]
learn = "2d"
factor = 3
min = 4

[exempt]
baseline_users = ["trusted@example.com"]

[tiers.default]
limits = ["100/1h"]

[tiers.watch]
limits = ["100/1h"]

[tiers.exempted]
limits = ["100/1h"]
baseline_exempt = true

[assign]
"watched@example.com" = "watch"
"free@example.com" = "exempted"
"#;

const DAY: Duration = Duration::from_secs(86_400);

/// One message of `user`, instance `n`: RCPT, DATA, END-OF-MESSAGE; the first answer
/// that is not `DUNNO`, or `DUNNO`.
async fn send(c: &mut Client, user: &str, n: u64) -> String {
    c.message(user, &format!("1a2b.{n:x}"), 1).await
}

/// Three days of one message a day (at 22:00) for each of `users`, then the clock
/// at 10:00 the next morning: two and a half days of history.
async fn learn(srv: &Server, c: &mut Client, users: &[&str]) -> u64 {
    let mut n = 0;
    for day in 0..3 {
        if day > 0 {
            srv.advance(DAY);
        }
        for u in users {
            n += 1;
            assert_eq!(send(c, u, n).await, "DUNNO");
        }
    }
    srv.advance(Duration::from_secs(12 * 3600));
    n
}

#[tokio::test]
async fn a_user_is_held_past_their_threshold_and_others_are_not() {
    held_past_the_threshold("").await;
}

#[tokio::test]
#[ignore = "needs redis-server; scripts/test installs and starts it"]
async fn redis_a_user_is_held_past_their_threshold_and_others_are_not() {
    let url = std::env::var("RATELIMIT_TEST_REDIS_URL")
        .unwrap_or_else(|_| "redis://127.0.0.1:6379/".into());
    held_past_the_threshold(&format!(
        "\n[store]\nbackend = \"redis\"\nredis_url = \"{url}\"\n\
         redis_key_prefix = \"rltest:{}:baseline:\"\nredis_time = \"local\"\n\
         redis_command_timeout = \"2s\"\n",
        std::process::id()
    ))
    .await;
}

/// The scenario of the module docs, with `extra` after [`CONFIG`] (a `[store]`).
async fn held_past_the_threshold(extra: &str) {
    let incidents = Incidents::default();
    let text = format!("{CONFIG}{extra}");
    let srv = Server::with(&text)
        .observer(Arc::new(incidents.clone()))
        .start()
        .await;
    let mut c = srv.client().await;
    let alice = "alice@example.com";
    let mut n = learn(
        &srv,
        &mut c,
        &[alice, "trusted@example.com", "free@example.com"],
    )
    .await;
    for i in 1..=4 {
        n += 1;
        assert_eq!(send(&mut c, alice, n).await, "DUNNO", "message {i}");
    }
    n += 1;
    let held = send(&mut c, alice, n).await;
    assert_eq!(
        held,
        "HOLD triggers HOLD action: alice@example.com sent more than 4 messages in an hour, far above their usual"
    );
    // Held mail is not learned: she stays flagged, one incident in all.
    for _ in 0..3 {
        n += 1;
        assert!(send(&mut c, alice, n).await.starts_with("HOLD "));
    }
    // Every held message is counted (ratelimit_signal_flagged_total{signal="baseline"}).
    let flagged = || srv.daemon.policy.tally().get(Counted::BaselineFlagged);
    assert_eq!(flagged(), 4);
    let all = incidents.all();
    assert_eq!(all.len(), 1, "{all:?}");
    let i: &Incident = &all[0];
    assert_eq!(
        (i.key.as_str(), i.limit.as_str(), i.used, i.signal),
        (alice, "baseline4/1h", 5, Signal::Baseline)
    );
    assert_eq!(
        i.detail,
        "alice@example.com sent 5 in the last hour; their usual busiest hour is 1 (learned over 2 days), threshold 4"
    );
    assert_eq!(i.action, "hold");
    // Everything was accepted in the 10-minute slot starting at 10:00: clears 70
    // minutes later.
    let morning = T0 + 2 * 86_400_000 + 12 * 3_600_000;
    assert_eq!(i.clears_at, Some(morning + 70 * 60_000));
    // A user with no history (learning) and exempt users are judged by their tier only.
    for u in ["bob@example.com", "trusted@example.com", "free@example.com"] {
        for _ in 0..20 {
            n += 1;
            assert_eq!(send(&mut c, u, n).await, "DUNNO", "{u}");
        }
    }
    // admin reset: the flag goes, the history stays (the fifth is held again).
    assert!(srv.daemon.policy.forget(alice).unwrap());
    for _ in 0..4 {
        n += 1;
        assert_eq!(send(&mut c, alice, n).await, "DUNNO");
    }
    n += 1;
    assert!(send(&mut c, alice, n).await.starts_with("HOLD "));
    assert_eq!(flagged(), 5);
    let b = srv.daemon.policy.baseline_of(alice).unwrap().unwrap();
    assert_eq!((b.hour, b.threshold, b.learned_days()), (4, Some(4), 2));
    // Forgetting the history: alice learns again, not judged.
    assert!(srv.daemon.policy.forget_baseline(alice).unwrap());
    assert_eq!(
        srv.daemon
            .policy
            .baseline_of(alice)
            .unwrap()
            .unwrap()
            .threshold,
        None
    );
    n += 1;
    assert_eq!(send(&mut c, alice, n).await, "DUNNO");
    // An hour and ten minutes after the burst the flag would have cleared anyway.
    srv.advance(Duration::from_secs(70 * 60));
    assert_eq!(
        srv.daemon
            .policy
            .baseline_of("bob@example.com")
            .unwrap()
            .unwrap()
            .hour,
        0
    );
}

#[tokio::test]
async fn refused_mail_is_not_learned() {
    // A tier of 2 an hour: the third and later messages each day are deferred by the
    // volume limit (at END-OF-MESSAGE, where mail is learned) and must not teach the
    // baseline.
    let text = CONFIG.replace(
        "limits = [\"100/1h\"]\n\n[tiers.watch]",
        "limits = [\"2/1h\"]\n\n[tiers.watch]",
    );
    let srv = Server::start(&text).await;
    let mut c = srv.client().await;
    let mut n = 0;
    for _ in 0..3 {
        for i in 0..10 {
            n += 1;
            let a = c
                .eom("carol@example.com", &format!("1a2b.{n:x}"), "192.0.2.1")
                .await;
            assert_eq!(a == "DUNNO", i < 2, "{a}");
        }
        srv.advance(DAY);
    }
    let b = srv
        .daemon
        .policy
        .baseline_of("carol@example.com")
        .unwrap()
        .unwrap();
    assert_eq!(b.usual_messages(), 2.0);
    // A RCPT peek records nothing either.
    let _ = c.ask(&Req::new("RCPT", "carol@example.com", "peek")).await;
    assert_eq!(
        srv.daemon
            .policy
            .baseline_of("carol@example.com")
            .unwrap()
            .unwrap()
            .hour,
        0
    );
}

#[tokio::test]
async fn replay_json_agrees_with_the_live_run_and_its_snapshot_judges_from_day_one() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!("{CONFIG}\n[record]\npath = \"requests.jsonl\"\n");
    let srv = Server::start_in(dir.path(), &text).await;
    let mut c = srv.client().await;
    let alice = "alice@example.com";
    let mut n = learn(&srv, &mut c, &[alice]).await;
    let mut live = Vec::new();
    for _ in 0..5 {
        n += 1;
        live.push(send(&mut c, alice, n).await);
    }
    assert_eq!(live.iter().filter(|a| *a == "DUNNO").count(), 4, "{live:?}");
    for _ in 0..3 {
        n += 1;
        assert_eq!(send(&mut c, "bob@example.com", n).await, "DUNNO");
    }
    drop(c);
    let cfg_path = srv.config_path.clone();
    srv.stop().await;

    let cfg = daemon::load_config(Some(&cfg_path), &[]).unwrap();
    let log = dir.path().join("requests.jsonl");
    let snap = dir.path().join("learned.baseline");
    let report = replay::replay_to(
        cfg,
        std::io::BufReader::new(std::fs::File::open(&log).unwrap()),
        Some(&snap),
    )
    .await
    .unwrap();
    assert!(report.bad_lines.is_empty(), "{:?}", report.bad_lines);
    assert_eq!(report.differences(), 0, "{:#?}", report.requests);
    let json: serde_json::Value =
        serde_json::from_str(&replay::render_json(&report, "t.toml")).unwrap();
    let users = json["users"].as_array().unwrap();
    assert_eq!(users.len(), 2);
    assert_eq!(users[0]["user"], alice);
    assert_eq!(users[0]["accepted"], 7);
    let first = &users[0]["first_refusal"];
    assert_eq!(first["signal"], "baseline");
    assert_eq!(first["limit"], "baseline4/1h");
    assert_eq!(first["action"], "HOLD");
    assert_eq!(first["accepted_before"], 7);
    assert_eq!(
        first["at"],
        T0 + 2 * 86_400_000 + 12 * 3_600_000,
        "the fifth message, at 10:00 on the third day"
    );
    assert_eq!(users[1]["user"], "bob@example.com");
    assert_eq!(users[1]["accepted"], 3);
    assert!(users[1]["first_refusal"].is_null());
    assert_eq!(
        json["incidents"][0]["detail"]
            .as_str()
            .unwrap()
            .split(';')
            .next(),
        Some("alice@example.com sent 5 in the last hour")
    );

    // Day one: a new server restores the learned baselines from beside its counters'
    // snapshot and judges alice at once; bob (three hours of history) is learning.
    let day_one = tempfile::tempdir().unwrap();
    std::fs::copy(&snap, day_one.path().join("counters.snap.baseline")).unwrap();
    let text = format!("{CONFIG}\n[store]\nsnapshot_path = \"counters.snap\"\n");
    let srv = Server::start_in(day_one.path(), &text).await;
    srv.advance(2 * DAY + Duration::from_secs(15 * 3600));
    let mut c = srv.client().await;
    for i in 0..4 {
        assert_eq!(send(&mut c, alice, 1000 + i).await, "DUNNO", "{i}");
    }
    assert!(send(&mut c, alice, 2000).await.starts_with("HOLD "));
    for i in 0..10 {
        assert_eq!(send(&mut c, "bob@example.com", 3000 + i).await, "DUNNO");
    }
}

/// Day one for a fleet: alice's history was learned elsewhere (here, a memory store
/// fed the same three days as `learn`), saved as a snapshot and written into Redis by
/// `ratelimit-policyd import-baselines`; a server on that Redis that has never seen
/// her holds her fifth message of the morning.
#[tokio::test]
#[ignore = "needs redis-server; scripts/test installs and starts it"]
async fn redis_baselines_imported_on_day_one_hold_past_the_threshold() {
    use ratelimit_core::Timestamp;
    use ratelimit_core::baseline::BaselineStore;
    use ratelimit_core::store::BaselineMemoryStore;

    let url = std::env::var("RATELIMIT_TEST_REDIS_URL")
        .unwrap_or_else(|_| "redis://127.0.0.1:6379/".into());
    let text = format!(
        "{CONFIG}\n[store]\nbackend = \"redis\"\nredis_url = \"{url}\"\n\
         redis_key_prefix = \"rltest:{}:import:\"\nredis_time = \"local\"\n\
         redis_command_timeout = \"2s\"\n",
        std::process::id()
    );
    let cfg = ratelimit_policyd::config::parse(&text, "t.toml", None).unwrap();
    let base = cfg.baseline.any().unwrap();
    let learned = BaselineMemoryStore::new(10);
    let alice = "alice@example.com";
    for day in 0..3u64 {
        let at = Timestamp::from_millis(T0 + day * 86_400_000);
        let _ = learned.observe(alice, 1, &base, at).unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("learned.baseline");
    learned
        .save_snapshot(&snap, Timestamp::from_millis(T0 + 2 * 86_400_000))
        .unwrap();
    let conf = dir.path().join("ratelimit-policyd.toml");
    std::fs::write(&conf, &text).unwrap();

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ratelimit-policyd"))
        .arg("--config")
        .arg(&conf)
        .arg("import-baselines")
        .arg(&snap)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.starts_with("imported 1 baselines from "), "{stdout}");

    let srv = Server::with(&text).start().await;
    let mut c = srv.client().await;
    // The morning after the third day, as in `learn`.
    srv.advance(2 * DAY + Duration::from_secs(12 * 3600));
    for i in 1..=4u64 {
        assert_eq!(send(&mut c, alice, i).await, "DUNNO", "message {i}");
    }
    assert!(send(&mut c, alice, 5).await.starts_with("HOLD "));
    // bob has no history: his tier only.
    for i in 1..=6u64 {
        assert_eq!(send(&mut c, "bob@example.com", 10 + i).await, "DUNNO");
    }
}
