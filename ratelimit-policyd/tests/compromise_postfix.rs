//! A real Postfix (Debian package), wired to our server at RCPT, DATA and
//! END-OF-MESSAGE, puts the mail of a user who logs in from too many networks on
//! hold: accepted (nothing lost, the client sees success), kept in Postfix's hold
//! queue for review (`postqueue -j`), and not delivered.

mod support;

use std::time::Duration;

use support::postfix::{PostfixInstance, PostfixOptions};
use support::server::Server;

const MAX_NETWORKS: usize = 3;

#[test]
#[ignore = "needs Postfix; scripts/test installs it"]
fn postfix_holds_the_mail_of_a_user_sending_from_too_many_networks() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let server = rt.block_on(Server::start(&format!(
        "[networks]\nmax = {MAX_NETWORKS}\nwindow = \"1h\"\n\n\
         [tiers.default]\nlimits = [\"100/1h\"]\n"
    )));
    let pf =
        PostfixInstance::start(PostfixOptions::new(server.addr)).unwrap_or_else(|e| panic!("{e}"));

    // A phished account used from eight networks (XCLIENT ADDR=), one message each.
    let clients = [
        "192.0.2.10",
        "198.51.100.10",
        "203.0.113.10",
        "100.64.1.10",
        "100.64.2.10",
        "100.64.3.10",
        "100.64.4.10",
        "100.64.5.10",
    ];
    let mut queue_ids = Vec::new();
    for client in clients {
        let out = pf.send_as(
            "phished@example.com",
            client,
            "phished@example.com",
            &["friend@example.net"],
            "hello",
        );
        // HOLD is not a refusal: the client is told the mail was queued.
        assert!(out.accepted, "{out:#?}\n{}", pf.debug_dump());
        queue_ids.push(out.queue_id.clone().unwrap_or_default());
    }
    // The same user from a network already seen, and another user: the first is
    // held too (flagged for the window), the second is delivered.
    let again = pf.send_as(
        "phished@example.com",
        "192.0.2.99",
        "phished@example.com",
        &["friend@example.net"],
        "again",
    );
    assert!(again.accepted, "{again:#?}");
    let other = pf.send_as(
        "honest@example.com",
        "100.64.5.20",
        "honest@example.com",
        &["friend@example.net"],
        "hi",
    );
    assert!(other.accepted, "{other:#?}");

    // Exactly the first three (one per network up to the threshold) and the other
    // user's message are delivered; nothing else arrives.
    pf.assert_delivered_exactly(MAX_NETWORKS + 1, Duration::from_secs(60));

    // The rest sit in the hold queue: postqueue -j shows them, from the user.
    let queue = pf
        .queue()
        .unwrap_or_else(|e| panic!("{e}\n{}", pf.debug_dump()));
    let held: Vec<_> = queue.iter().filter(|e| e.queue_name == "hold").collect();
    assert_eq!(
        held.len(),
        clients.len() - MAX_NETWORKS + 1,
        "{queue:#?}\n{}",
        pf.debug_dump()
    );
    assert!(
        held.iter().all(|e| e.sender == "phished@example.com"),
        "{held:#?}"
    );
    let mut held_ids: Vec<String> = held.iter().map(|e| e.queue_id.clone()).collect();
    held_ids.sort();
    let mut want: Vec<String> = queue_ids[MAX_NETWORKS..].to_vec();
    want.push(again.queue_id.clone().unwrap_or_default());
    want.sort();
    assert_eq!(held_ids, want, "the messages from the 4th network on");

    // Postfix logged our reason with the hold.
    let log = pf.maillog();
    assert!(
        log.contains(
            "hold: RCPT from client.example[100.64.1.10]: <friend@example.net>: \
             Recipient address triggers HOLD action: phished@example.com sent from more \
             than 3 networks within 1h;"
        ),
        "{}",
        pf.debug_dump()
    );

    // Nothing was lost: a reviewer can release a held message and it is delivered.
    pf.release_held(&held_ids[0])
        .unwrap_or_else(|e| panic!("{e}"));
    pf.assert_delivered_exactly(MAX_NETWORKS + 2, Duration::from_secs(60));

    drop(pf);
    rt.block_on(server.stop());
}
