//! The policy server end to end: a real server on 127.0.0.1:0, raw protocol bytes.

mod support;

use std::time::Duration;

use support::server::{Client, Req, Server};

const DUNNO: &str = "DUNNO";

const THREE_PER_HOUR: &str = r#"
[tiers.default]
limits = ["3/1h"]
"#;

#[tokio::test]
async fn a_limit_is_enforced_exactly_per_user() {
    let s = Server::start(THREE_PER_HOUR).await;
    let mut c = s.client().await;
    for i in 0..3 {
        assert_eq!(
            c.message("alice@example.com", &format!("m{i}"), 1).await,
            DUNNO,
            "message {i}"
        );
    }
    let refused = c.message("alice@example.com", "m3", 1).await;
    assert!(
        refused.starts_with("DEFER_IF_PERMIT Too much mail from alice@example.com: limit of 3/1h reached, try again in "),
        "{refused}"
    );
    // Refused at RCPT, before DATA: the body is never sent.
    let mut rcpt = Req::new("RCPT", "alice@example.com", "m4");
    assert!(c.ask(&rcpt).await.starts_with("DEFER_IF_PERMIT"));
    rcpt.stage = "DATA";
    assert!(c.ask(&rcpt).await.starts_with("DEFER_IF_PERMIT"));
    s.stop().await;
}

#[tokio::test]
async fn other_users_are_unaffected_and_usernames_are_normalized() {
    let s = Server::start(THREE_PER_HOUR).await;
    let mut c = s.client().await;
    for i in 0..3 {
        // Case and surrounding spaces do not make a new user.
        let user = [
            "alice@example.com",
            "ALICE@Example.com",
            " alice@example.com ",
        ][i];
        assert_eq!(c.message(user, &format!("a{i}"), 1).await, DUNNO);
    }
    assert_ne!(c.message("alice@example.com", "a3", 1).await, DUNNO);
    for i in 0..3 {
        assert_eq!(
            c.message("bob@example.com", &format!("b{i}"), 1).await,
            DUNNO
        );
    }
    s.stop().await;
}

#[tokio::test]
async fn multi_recipient_messages_are_counted_by_the_count_unit() {
    let s = Server::start(
        r#"
[tiers.default]
limits = ["100/1h", { limit = "5/1h", unit = "recipients" }]
"#,
    )
    .await;
    let mut c = s.client().await;
    assert_eq!(c.message("carol@example.com", "m1", 3).await, DUNNO);
    // 3 more recipients would make 6 > 5: refused at DATA, where the count is known.
    let refused = c.message("carol@example.com", "m2", 3).await;
    assert!(refused.contains("limit of 5/1h recipients"), "{refused}");
    // 2 more fit exactly.
    assert_eq!(c.message("carol@example.com", "m3", 2).await, DUNNO);
    assert_ne!(c.message("carol@example.com", "m4", 1).await, DUNNO);
    s.stop().await;
}

#[tokio::test]
async fn one_messages_requests_are_charged_once() {
    let s = Server::start(THREE_PER_HOUR).await;
    let mut c = s.client().await;
    // One message: 4 RCPT, DATA, and END-OF-MESSAGE sent twice with the same instance.
    let mut r = Req::new("RCPT", "dave@example.com", "one");
    r.rcpts = 4;
    for _ in 0..4 {
        assert_eq!(c.ask(&r).await, DUNNO);
    }
    r.stage = "DATA";
    assert_eq!(c.ask(&r).await, DUNNO);
    r.stage = "END-OF-MESSAGE";
    assert_eq!(c.ask(&r).await, DUNNO);
    assert_eq!(c.ask(&r).await, DUNNO);
    // Only one of three used: two more messages pass, the third is refused.
    assert_eq!(c.message("dave@example.com", "two", 1).await, DUNNO);
    assert_eq!(c.message("dave@example.com", "three", 1).await, DUNNO);
    assert_ne!(c.message("dave@example.com", "four", 1).await, DUNNO);
    s.stop().await;
}

#[tokio::test]
async fn refused_mail_is_not_charged() {
    let s = Server::start(
        r#"
[tiers.default]
limits = ["2/1h"]
"#,
    )
    .await;
    let mut c = s.client().await;
    let eom = |i: usize| format!("e{i}");
    // Postfix wired at END-OF-MESSAGE only: every attempt reaches the acquire.
    let mut answers = Vec::new();
    for i in 0..6 {
        answers.push(
            c.ask(&Req::new("END-OF-MESSAGE", "erin@example.com", &eom(i)))
                .await,
        );
    }
    assert_eq!(
        answers.iter().filter(|a| *a == DUNNO).count(),
        2,
        "{answers:?}"
    );
    // After the window (plus one sub-window), exactly 2 pass again: the 4 refused
    // attempts used nothing.
    s.advance(Duration::from_secs(3660));
    let mut again = Vec::new();
    for i in 6..10 {
        again.push(
            c.ask(&Req::new("END-OF-MESSAGE", "erin@example.com", &eom(i)))
                .await,
        );
    }
    assert_eq!(again.iter().filter(|a| *a == DUNNO).count(), 2, "{again:?}");
    s.stop().await;
}

#[tokio::test]
async fn tiers_assign_users_and_domains_and_exemptions_skip_counting() {
    let s = Server::start(
        r#"
[exempt]
users = ["monitor@example.com"]
domains = ["lists.example.org"]
clients = ["198.51.100.0/24"]

[tiers.default]
limits = ["1/1h"]

[tiers.bulk]
limits = ["5/1h"]
action = "defer"
reply_code = "451 4.7.1"
message = "{user} is over {limit} of tier {tier}"

[assign]
"news@example.com" = "bulk"
"@partner.example" = "bulk"
"#,
    )
    .await;
    let mut c = s.client().await;
    for (user, allowed) in [
        ("news@example.com", 5),
        ("x@partner.example", 5),
        ("plain@example.com", 1),
    ] {
        for i in 0..allowed {
            assert_eq!(
                c.message(user, &format!("{user}{i}"), 1).await,
                DUNNO,
                "{user} #{i}"
            );
        }
        let refused = c.message(user, &format!("{user}-over"), 1).await;
        assert_ne!(refused, DUNNO, "{user}");
    }
    // The bulk tier's custom code and text.
    let r = c.message("news@example.com", "again", 1).await;
    assert_eq!(r, "451 4.7.1 news@example.com is over 5/1h of tier bulk");
    // Exempt by user, by domain and by client network.
    for i in 0..5 {
        assert_eq!(
            c.message("monitor@example.com", &format!("mon{i}"), 1)
                .await,
            DUNNO
        );
        assert_eq!(
            c.message("list@lists.example.org", &format!("list{i}"), 1)
                .await,
            DUNNO
        );
        let mut r = Req::new("END-OF-MESSAGE", "plain@example.com", "");
        let inst = format!("webmail{i}");
        r.instance = &inst;
        r.client = "198.51.100.7";
        assert_eq!(c.ask(&r).await, DUNNO);
    }
    s.stop().await;
}

#[tokio::test]
async fn moving_a_user_to_another_tier_keeps_what_was_sent() {
    let s = Server::start(
        r#"
[tiers.default]
limits = ["3/1h"]
[tiers.bulk]
limits = ["5/1h"]
"#,
    )
    .await;
    let mut c = s.client().await;
    for i in 0..3 {
        assert_eq!(
            c.message("fay@example.com", &format!("f{i}"), 1).await,
            DUNNO
        );
    }
    assert_ne!(c.message("fay@example.com", "f3", 1).await, DUNNO);
    let mut cfg = (*s.daemon.policy.config()).clone();
    cfg.tiers.map.assign("fay@example.com", "bulk").unwrap();
    s.daemon.policy.set_config(cfg);
    // 3 already sent: 2 more in the bulk tier.
    assert_eq!(c.message("fay@example.com", "f4", 1).await, DUNNO);
    assert_eq!(c.message("fay@example.com", "f5", 1).await, DUNNO);
    assert_ne!(c.message("fay@example.com", "f6", 1).await, DUNNO);
    s.stop().await;
}

#[tokio::test]
async fn hold_reject_and_dry_run_actions() {
    let s = Server::start(
        r#"
[tiers.default]
limits = ["1/1h"]
action = "warn"
[tiers.trial]
limits = ["1/1h"]
action = "hold"
message = "held: {user}"
[tiers.strict]
limits = ["1/1h"]
action = "reject"
reply_code = "550 5.7.1"
[assign]
"t@example.com" = "trial"
"s@example.com" = "strict"
"#,
    )
    .await;
    let mut c = s.client().await;
    // Dry run: never refused, but counted as would-refuse.
    for i in 0..4 {
        assert_eq!(c.message("w@example.com", &format!("w{i}"), 1).await, DUNNO);
    }
    assert_eq!(
        s.daemon
            .policy
            .tally()
            .get(ratelimit_policyd::policy::Counted::DryRun),
        3 * 3
    );
    assert_eq!(c.message("t@example.com", "t0", 1).await, DUNNO);
    assert_eq!(
        c.message("t@example.com", "t1", 1).await,
        "HOLD held: t@example.com"
    );
    assert_eq!(c.message("s@example.com", "s0", 1).await, DUNNO);
    let r = c.message("s@example.com", "s1", 1).await;
    assert!(
        r.starts_with("550 5.7.1 Too much mail from s@example.com"),
        "{r}"
    );
    s.stop().await;
}

#[tokio::test]
async fn stages_other_than_rcpt_data_and_eom_are_dunno_and_uncounted() {
    let s = Server::start(THREE_PER_HOUR).await;
    let mut c = s.client().await;
    for stage in [
        "CONNECT",
        "EHLO",
        "HELO",
        "MAIL",
        "VRFY",
        "ETRN",
        "SOMETHING-NEW",
    ] {
        for i in 0..5 {
            assert_eq!(
                c.ask(&Req::new(stage, "gil@example.com", &format!("{stage}{i}")))
                    .await,
                DUNNO
            );
        }
    }
    for i in 0..3 {
        assert_eq!(
            c.message("gil@example.com", &format!("g{i}"), 1).await,
            DUNNO
        );
    }
    s.stop().await;
}

#[tokio::test]
async fn idle_connections_are_closed() {
    let s = Server::start(
        r#"
[server]
idle_timeout = "200ms"
[tiers.default]
limits = ["3/1h"]
"#,
    )
    .await;
    let mut idle = s.client().await;
    // Half a request, then nothing: freed by the idle timeout too.
    let mut stalled = s.client().await;
    use tokio::io::AsyncWriteExt;
    stalled
        .stream
        .write_all(b"request=smtpd_access_policy\nprotocol_state=RCPT\n")
        .await
        .unwrap();
    assert!(idle.closed().await);
    assert!(stalled.closed().await);
    // The server still serves new connections.
    let mut c = s.client().await;
    assert_eq!(c.message("h@example.com", "h", 1).await, DUNNO);
    s.stop().await;
}

#[tokio::test]
async fn clients_outside_the_allowlist_are_refused() {
    let s = Server::start(
        r#"
[server]
allow = ["10.0.0.0/8"]
"#,
    )
    .await;
    let mut c = s.client().await;
    let reply = c.raw(&Req::new("RCPT", "i@example.com", "i").bytes()).await;
    assert_eq!(reply, None, "a client outside the allowlist got an answer");
    s.stop().await;
}

#[tokio::test]
async fn a_malformed_request_closes_only_its_own_connection() {
    let s = Server::start(THREE_PER_HOUR).await;
    let mut good = s.client().await;
    assert_eq!(good.message("j@example.com", "j0", 1).await, DUNNO);
    let mut bad = s.client().await;
    assert_eq!(bad.raw(b"this line has no equals sign\n\n").await, None);
    assert_eq!(good.message("j@example.com", "j1", 1).await, DUNNO);
    // Pipelined requests on one connection are answered in order.
    let mut both = Req::new("END-OF-MESSAGE", "k@example.com", "k0").bytes();
    both.extend(Req::new("END-OF-MESSAGE", "k@example.com", "k1").bytes());
    let mut p = Client::connect(s.addr).await;
    assert_eq!(p.raw(&both).await.as_deref(), Some(DUNNO));
    assert_eq!(p.reply().await.as_deref(), Some(DUNNO));
    s.stop().await;
}

#[tokio::test]
async fn mail_without_sasl_is_skipped_or_keyed_as_configured() {
    let skip = Server::start(THREE_PER_HOUR).await;
    let mut c = skip.client().await;
    for i in 0..5 {
        assert_eq!(c.message("", &format!("n{i}"), 1).await, DUNNO);
    }
    skip.stop().await;

    let by_net = Server::start(
        r#"
[keying]
without_sasl = "client_prefix"
ipv4_prefix = 24
[tiers.default]
limits = ["2/1h"]
"#,
    )
    .await;
    let mut c = by_net.client().await;
    for (i, client) in ["203.0.113.5", "203.0.113.77"].iter().enumerate() {
        let inst = format!("p{i}");
        let mut r = Req::new("END-OF-MESSAGE", "", &inst);
        r.client = client;
        assert_eq!(c.ask(&r).await, DUNNO);
    }
    let mut r = Req::new("END-OF-MESSAGE", "", "p2");
    r.client = "203.0.113.200";
    assert!(c.ask(&r).await.contains("net:203.0.113.0/24"));
    by_net.stop().await;
}

#[tokio::test]
async fn a_whitespace_only_sasl_username_is_no_user_not_the_shared_key_empty() {
    // Skipped like mail without SASL: never counted, whoever sends it.
    let skip = Server::start(THREE_PER_HOUR).await;
    let mut c = skip.client().await;
    for (i, user) in [" ", "  ", "\t", " \t ", "\u{a0}"]
        .iter()
        .cycle()
        .take(10)
        .enumerate()
    {
        assert_eq!(
            c.message(user, &format!("w{i}"), 1).await,
            DUNNO,
            "{user:?}"
        );
    }
    assert_eq!(skip.used("", "3/1h"), 0);
    assert_eq!(skip.daemon.policy.backend().tracked_keys(), Some(0));
    skip.stop().await;

    // Keyed on the client network when that is what `without_sasl` says.
    let by_net = Server::start(
        r#"
[keying]
without_sasl = "client_prefix"
ipv4_prefix = 24
[tiers.default]
limits = ["2/1h"]
"#,
    )
    .await;
    let mut c = by_net.client().await;
    for (i, user) in [" ", "\t"].iter().enumerate() {
        let inst = format!("p{i}");
        let r = Req::new("END-OF-MESSAGE", user, &inst).from("203.0.113.5");
        assert_eq!(c.ask(&r).await, DUNNO);
    }
    let r = Req::new("END-OF-MESSAGE", "  ", "p2").from("203.0.113.9");
    assert!(c.ask(&r).await.contains("net:203.0.113.0/24"));
    // Another network is another key, although its user name is as blank.
    let r = Req::new("END-OF-MESSAGE", " ", "p3").from("198.51.100.1");
    assert_eq!(c.ask(&r).await, DUNNO);
    assert_eq!(by_net.used("", "2/1h"), 0);
    by_net.stop().await;
}
