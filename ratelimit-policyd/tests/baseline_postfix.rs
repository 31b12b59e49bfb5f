//! A real Postfix (Debian package), wired to our server at RCPT, DATA and
//! END-OF-MESSAGE, holds the mail of a user far above her own usual volume, and not
//! that of another user with the same history.
//!
//! alice and bob each sent one message a day for three days (learned over the policy
//! protocol on the server's manual clock). With `factor = 3, min = 4` their
//! threshold is `max(4, 3 × 1) = 4` messages in an hour. The next morning alice's
//! account sends six through Postfix: four are delivered, the fifth and sixth are
//! held for review (accepted: nothing lost). bob sends two, both delivered.

mod support;

use std::time::Duration;

use support::postfix::{PostfixInstance, PostfixOptions};
use support::server::Server;

const CONFIG: &str = r#"
[baseline]
learn = "2d"
factor = 3
min = 4

[tiers.default]
limits = ["100/1h"]
"#;

const DAY: Duration = Duration::from_secs(86_400);

#[test]
#[ignore = "needs Postfix; scripts/test installs it"]
fn postfix_holds_the_mail_of_a_user_far_above_her_baseline_and_not_another() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let server = rt.block_on(Server::start(CONFIG));
    let (alice, bob) = ("alice@example.com", "bob@example.com");

    // Three days of one message a day each, then 10:00 the next morning.
    rt.block_on(async {
        let mut c = server.client().await;
        let mut n = 0u64;
        for day in 0..3 {
            if day > 0 {
                server.advance(DAY);
            }
            for u in [alice, bob] {
                n += 1;
                assert_eq!(c.message(u, &format!("1a2b.{n:x}"), 1).await, "DUNNO");
            }
        }
        server.advance(Duration::from_secs(12 * 3600));
    });
    let learned = server.daemon.policy.baseline_of(alice).unwrap().unwrap();
    assert_eq!(learned.threshold, Some(4), "{learned:?}");

    let pf =
        PostfixInstance::start(PostfixOptions::new(server.addr)).unwrap_or_else(|e| panic!("{e}"));
    let mut alice_ids = Vec::new();
    for i in 0..6 {
        let out = pf.send_as(
            alice,
            "192.0.2.10",
            alice,
            &["friend@example.net"],
            &format!("message {i}"),
        );
        // HOLD is not a refusal: the client is told the mail was queued.
        assert!(out.accepted, "{out:#?}\n{}", pf.debug_dump());
        alice_ids.push(out.queue_id.clone().unwrap_or_default());
    }
    for i in 0..2 {
        let out = pf.send_as(
            bob,
            "198.51.100.20",
            bob,
            &["friend@example.net"],
            &format!("hello {i}"),
        );
        assert!(out.accepted, "{out:#?}\n{}", pf.debug_dump());
    }

    // alice's first four and bob's two are delivered; nothing else arrives.
    pf.assert_delivered_exactly(6, Duration::from_secs(60));

    // alice's fifth and sixth sit in the hold queue.
    let queue = pf
        .queue()
        .unwrap_or_else(|e| panic!("{e}\n{}", pf.debug_dump()));
    let mut held: Vec<String> = queue
        .iter()
        .filter(|e| e.queue_name == "hold")
        .map(|e| e.queue_id.clone())
        .collect();
    held.sort();
    let mut want = alice_ids[4..].to_vec();
    want.sort();
    assert_eq!(held, want, "{queue:#?}\n{}", pf.debug_dump());

    // Postfix logged our reason with the hold.
    let log = pf.maillog();
    assert!(
        log.contains(
            "alice@example.com sent more than 4 messages in an hour, far above their usual"
        ),
        "{}",
        pf.debug_dump()
    );

    drop(pf);
    rt.block_on(server.stop());
}
