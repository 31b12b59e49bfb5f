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

use ratelimit_policyd::policy::{Incident, Signal};
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
    let incidents = Incidents::default();
    let srv = Server::with(CONFIG)
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
