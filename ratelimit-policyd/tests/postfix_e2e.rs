//! A real Postfix (Debian package), wired to our server at RCPT, DATA and
//! END-OF-MESSAGE, defers exactly what it should.

mod support;

use std::time::Duration;

use support::postfix::{PostfixInstance, PostfixOptions, SmtpStep};
use support::server::Server;

const LIMIT: usize = 5;

#[test]
#[ignore = "needs a real Postfix; scripts/test installs it and runs ignored tests"]
fn postfix_defers_exactly_past_the_limit_whatever_the_client_address() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let server = rt.block_on(Server::start(&format!(
        "[tiers.default]\nlimits = [\"{LIMIT}/1h\"]\n"
    )));
    let pf =
        PostfixInstance::start(PostfixOptions::new(server.addr)).unwrap_or_else(|e| panic!("{e}"));

    // One phished account, many client addresses: limit + 5 messages.
    let mut refused = Vec::new();
    let mut accepted = 0;
    for i in 0..LIMIT + 5 {
        let client = format!("192.0.2.{}", 10 + i);
        let out = pf.send_as(
            "victim@example.com",
            &client,
            "victim@example.com",
            &["friend@example.net"],
            "hello",
        );
        if out.accepted {
            accepted += 1;
        } else {
            refused.push(out);
        }
    }
    assert_eq!(accepted, LIMIT, "{}", pf.debug_dump());
    assert_eq!(refused.len(), 5);
    for out in &refused {
        let (step, reply) = out.first_error.clone().expect("a refusal");
        assert!(
            matches!(step, SmtpStep::RcptTo(_)),
            "refused at {step:?}, before the body is sent"
        );
        assert_eq!(reply.code, 450, "{reply:?}");
        let text = reply.text();
        assert!(text.contains("4.7.1"), "{text}");
        assert!(
            text.contains(
                "Too much mail from victim@example.com: limit of 5/1h reached, try again in"
            ),
            "{text}"
        );
    }

    // Another user is unaffected.
    for i in 0..3 {
        let out = pf.send_as(
            "other@example.com",
            &format!("198.51.100.{i}"),
            "other@example.com",
            &["x@example.net", "y@example.net"],
            "hi",
        );
        assert!(out.accepted, "{out:#?}\n{}", pf.debug_dump());
    }

    // Exactly the accepted mail reaches the sink, and nothing more arrives.
    pf.assert_delivered_exactly(LIMIT + 3, Duration::from_secs(60));
    drop(pf);
    rt.block_on(server.stop());
}
