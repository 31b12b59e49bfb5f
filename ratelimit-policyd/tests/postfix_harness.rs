//! Self-test of the real-Postfix harness (`tests/support/postfix.rs`), with a
//! toy policy server written here: it proves that the harness wires the policy
//! service, acts as SASL users via XCLIENT, and sees deliveries, refusals and
//! HOLDs. The real policy server's end-to-end tests live elsewhere.

mod support;

use std::collections::{BTreeSet, HashMap};
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use support::postfix::{PostfixInstance, PostfixOptions, SmtpStep};

const LIMIT: usize = 3;
const WAIT: Duration = Duration::from_secs(30);

type Request = HashMap<String, String>;

/// Toy policy server: DUNNO, except a user with LIMIT accepted messages gets
/// DEFER_IF_PERMIT at every stage; `mallory` gets HOLD at END-OF-MESSAGE;
/// `dora` is deferred at DATA and `eve` at END-OF-MESSAGE.
struct ToyPolicy {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Request>>>,
}

impl ToyPolicy {
    fn start() -> ToyPolicy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let counts = Arc::new(Mutex::new(HashMap::<String, usize>::new()));
        let s = seen.clone();
        thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let (seen, counts) = (s.clone(), counts.clone());
                thread::spawn(move || serve(conn, seen, counts));
            }
        });
        ToyPolicy { addr, seen }
    }

    fn requests(&self) -> Vec<Request> {
        self.seen.lock().unwrap().clone()
    }
}

fn serve(
    conn: TcpStream,
    seen: Arc<Mutex<Vec<Request>>>,
    counts: Arc<Mutex<HashMap<String, usize>>>,
) {
    let mut out = conn.try_clone().unwrap();
    let mut req = Request::new();
    for line in BufReader::new(conn).lines() {
        let Ok(line) = line else { return };
        if let Some((k, v)) = line.split_once('=') {
            req.insert(k.to_string(), v.to_string());
            continue;
        }
        let user = req.get("sasl_username").cloned().unwrap_or_default();
        let stage = req.get("protocol_state").cloned().unwrap_or_default();
        let action = {
            let mut counts = counts.lock().unwrap();
            let sent = counts.entry(user.clone()).or_default();
            match (user.as_str(), stage.as_str()) {
                ("mallory", "END-OF-MESSAGE") => "HOLD held for review",
                ("dora", "DATA") | ("eve", "END-OF-MESSAGE") => "DEFER_IF_PERMIT late stage test",
                _ if *sent >= LIMIT => "DEFER_IF_PERMIT test limit reached",
                (_, "END-OF-MESSAGE") => {
                    *sent += 1;
                    "DUNNO"
                }
                _ => "DUNNO",
            }
        };
        seen.lock().unwrap().push(std::mem::take(&mut req));
        if write!(out, "action={action}\n\n").is_err() {
            return;
        }
    }
}

fn start(policy: &ToyPolicy) -> PostfixInstance {
    PostfixInstance::start(PostfixOptions::new(policy.addr)).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
#[ignore = "needs a real Postfix; scripts/test installs it and runs ignored tests"]
fn defers_a_user_over_the_limit_from_any_address_and_not_others() {
    let policy = ToyPolicy::start();
    let pf = start(&policy);
    let dump = || pf.debug_dump();

    let outcomes: Vec<_> = (1..=5)
        .map(|i| {
            pf.send_as(
                "alice",
                &format!("192.0.2.{i}"),
                "alice@example.com",
                &["rcpt@example.net"],
                "hi",
            )
        })
        .collect();
    for (i, out) in outcomes.iter().enumerate() {
        if i < LIMIT {
            assert!(
                out.accepted && out.first_error.is_none(),
                "message {i}: {out:#?}\n{}",
                dump()
            );
        } else {
            assert!(
                !out.accepted && out.is_temp_fail(),
                "message {i}: {out:#?}\n{}",
                dump()
            );
            let (step, reply) = out.first_error.as_ref().unwrap();
            assert_eq!(
                *step,
                SmtpStep::RcptTo("rcpt@example.net".into()),
                "{out:#?}"
            );
            assert_eq!(reply.code, 450, "{out:#?}");
            assert!(reply.text().contains("test limit reached"), "{out:#?}");
        }
    }
    let bob = pf.send_as(
        "bob",
        "192.0.2.50",
        "bob@example.com",
        &["x@example.net", "y@example.org"],
        "hi",
    );
    assert!(
        bob.accepted && bob.first_error.is_none(),
        "{bob:#?}\n{}",
        dump()
    );

    pf.assert_delivered_exactly(LIMIT + 1, WAIT);
    let msgs = pf.delivered_messages();
    let from = |a: &str| msgs.iter().filter(|m| m.mail_from == a).count();
    assert_eq!(
        (from("alice@example.com"), from("bob@example.com")),
        (LIMIT, 1),
        "{msgs:#?}"
    );
    let bob_msg = msgs
        .iter()
        .find(|m| m.mail_from == "bob@example.com")
        .unwrap();
    assert_eq!(bob_msg.rcpts, ["x@example.net", "y@example.org"]);

    // What the policy server saw.
    let reqs = policy.requests();
    let alice: Vec<&Request> = reqs
        .iter()
        .filter(|r| r["sasl_username"] == "alice")
        .collect();
    assert!(!alice.is_empty());
    for r in &alice {
        assert_eq!(r["request"], "smtpd_access_policy");
        assert_eq!(r["sasl_method"], "XCLIENT");
        assert_eq!(r["client_name"], "client.example");
        assert!(r["client_address"].starts_with("192.0.2."), "{r:?}");
    }
    let stages: BTreeSet<&str> = alice.iter().map(|r| r["protocol_state"].as_str()).collect();
    assert_eq!(stages, BTreeSet::from(["DATA", "END-OF-MESSAGE", "RCPT"]));
    // One accepted message: its EOM request carries the queue id; every
    // request with the same `instance` is from the same client and covers all stages.
    let qid = outcomes[0].queue_id.clone().expect("queue id in 250 reply");
    let eom = alice
        .iter()
        .find(|r| r["protocol_state"] == "END-OF-MESSAGE" && r["queue_id"] == qid)
        .unwrap_or_else(|| panic!("no END-OF-MESSAGE for {qid}: {alice:#?}"));
    assert!(eom["size"].parse::<u64>().unwrap() > 0);
    let same: Vec<&&Request> = alice
        .iter()
        .filter(|r| r["instance"] == eom["instance"])
        .collect();
    let stages: BTreeSet<&str> = same.iter().map(|r| r["protocol_state"].as_str()).collect();
    assert_eq!(
        stages,
        BTreeSet::from(["DATA", "END-OF-MESSAGE", "RCPT"]),
        "{same:#?}"
    );
    assert!(
        same.iter().all(|r| r["client_address"] == "192.0.2.1"),
        "{same:#?}"
    );
    // A refused message never reached DATA.
    assert!(
        !alice
            .iter()
            .any(|r| r["client_address"] == "192.0.2.5" && r["protocol_state"] != "RCPT")
    );
}

#[test]
#[ignore = "needs a real Postfix; scripts/test installs it and runs ignored tests"]
fn hold_goes_to_the_hold_queue_and_late_refusals_report_their_step() {
    let policy = ToyPolicy::start();
    let pf = start(&policy);

    let held = pf.send_as(
        "mallory",
        "192.0.2.66",
        "mallory@example.com",
        &["victim@example.net"],
        "buy now",
    );
    assert!(
        held.accepted && held.first_error.is_none(),
        "{held:#?}\n{}",
        pf.debug_dump()
    );
    let qid = held.queue_id.clone().unwrap();
    pf.wait_settled(WAIT)
        .unwrap_or_else(|e| panic!("{e}\n{}", pf.debug_dump()));
    assert_eq!(pf.hold_queue(), vec![qid.clone()], "{}", pf.debug_dump());
    assert_eq!(pf.delivered(), 0, "{}", pf.debug_dump());

    let dora = pf.send_as(
        "dora",
        "192.0.2.7",
        "dora@example.com",
        &["a@example.net"],
        "x",
    );
    let (step, reply) = dora.first_error.clone().expect("dora is deferred");
    assert_eq!(
        (step, reply.code, dora.accepted),
        (SmtpStep::Data, 450, false),
        "{dora:#?}"
    );
    let eve = pf.send_as(
        "eve",
        "192.0.2.8",
        "eve@example.com",
        &["a@example.net"],
        ".leading dot\nline",
    );
    let (step, reply) = eve.first_error.clone().expect("eve is deferred");
    assert_eq!(
        (step, reply.code, eve.accepted),
        (SmtpStep::EndOfData, 450, false),
        "{eve:#?}"
    );
    assert!(reply.text().contains("late stage test"), "{eve:#?}");

    // Releasing the held message delivers it; nothing else was queued.
    pf.release_held(&qid).unwrap();
    pf.assert_delivered_exactly(1, WAIT);
    assert!(pf.hold_queue().is_empty());
    assert_eq!(pf.delivered_messages()[0].mail_from, "mallory@example.com");
}

#[test]
#[ignore = "needs a real Postfix; scripts/test installs it and runs ignored tests"]
fn no_open_relay_and_policy_outage_gives_the_default_action() {
    // Nothing listens on the policy address.
    let dead = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let pf = PostfixInstance::start(PostfixOptions::new(dead)).unwrap_or_else(|e| panic!("{e}"));

    // Unauthenticated and outside mynetworks: refused as a relay before the
    // policy service is asked (else this would be the 451 below).
    let anon = pf.send_as("", "192.0.2.9", "anon@example.com", &["x@example.net"], "x");
    let (step, reply) = anon.first_error.clone().expect("relay refused");
    assert_eq!(
        (step, reply.code),
        (SmtpStep::RcptTo("x@example.net".into()), 554),
        "{anon:#?}"
    );
    assert!(reply.text().contains("Relay access denied"), "{anon:#?}");

    // Authenticated: the policy service is consulted, is down, and Postfix
    // answers smtpd_policy_service_default_action.
    let alice = pf.send_as(
        "alice",
        "192.0.2.10",
        "alice@example.com",
        &["x@example.net"],
        "x",
    );
    let (step, reply) = alice.first_error.clone().expect("policy outage");
    assert_eq!(
        (step, reply.code),
        (SmtpStep::RcptTo("x@example.net".into()), 451),
        "{alice:#?}"
    );
    // Postfix formats it like any restriction reply: "4.3.5 <rcpt>: Recipient
    // address rejected: policy service unavailable".
    let text = reply.text();
    assert!(
        text.starts_with("4.3.5 ") && text.ends_with("policy service unavailable"),
        "{alice:#?}"
    );
    pf.assert_delivered_exactly(0, WAIT);
}
