//! The policy decision for one request (parse excluded): the charging request at
//! END-OF-MESSAGE, the peek at RCPT, and a stage that is not counted, for 10,000
//! users on the memory store.

use std::hint::black_box;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use ratelimit_benches::request::{MessageStream, Mix, StreamConfig};
use ratelimit_core::{ManualClock, Timestamp};
use ratelimit_policyd::config;
use ratelimit_policyd::daemon::Daemon;
use ratelimit_policyd::policy::{ConnState, Policy};
use ratelimit_policyd::protocol::{
    Action, Attribute, PolicyRequest, RequestBounds, Status, parse_request,
};

const USERS: u64 = 10_000;

/// Runs a future that never waits (the memory store decides inline) to completion.
fn ready<F: std::future::Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    let mut cx = Context::from_waker(Waker::noop());
    match f.as_mut().poll(&mut cx) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("the memory store path must not wait"),
    }
}

fn policy() -> (Arc<Policy>, ManualClock) {
    // High limits: every decision is an admit, as for most real traffic.
    let cfg = config::parse("[tiers.default]\nlimits = [\"1000000/1h\", { limit = \"5000000/1d\", unit = \"recipients\" }]\n", "bench", None).unwrap();
    let clock = ManualClock::new(Timestamp::from_millis(1_700_000_000_000));
    let daemon = Daemon::new(cfg, Arc::new(clock.clone())).unwrap();
    (daemon.policy, clock)
}

fn requests(mix: Mix) -> Vec<Vec<u8>> {
    let mut stream = MessageStream::new(&StreamConfig {
        mix,
        recipients: 1,
        users: USERS,
        connection: 0,
    });
    (0..USERS)
        .map(|u| {
            stream.begin_message(u, u);
            stream.request(stream.requests_per_message() - 1).to_vec()
        })
        .collect()
}

fn bench_stage(c: &mut Criterion, name: &str, reqs: &[Vec<u8>], patch: Option<&[u8]>) {
    let (policy, clock) = policy();
    let limits = RequestBounds::DEFAULT;
    let reqs: Vec<Vec<u8>> = match patch {
        // Rewrite protocol_state to another stage of the same length class.
        Some(stage) => reqs
            .iter()
            .map(|r| {
                let s = String::from_utf8_lossy(r).replace(
                    "protocol_state=END-OF-MESSAGE",
                    &format!("protocol_state={}", String::from_utf8_lossy(stage)),
                );
                s.into_bytes()
            })
            .collect(),
        None => reqs.to_vec(),
    };
    let mut g = c.benchmark_group("decide");
    g.throughput(Throughput::Elements(1));
    let mut i = 0usize;
    let mut conn = ConnState::default();
    g.bench_function(name, |b| {
        b.iter(|| {
            let req = &reqs[i % reqs.len()];
            i = i.wrapping_add(1);
            if i.is_multiple_of(1024) {
                clock.advance(std::time::Duration::from_millis(50));
            }
            let mut slots = [Attribute::EMPTY; 64];
            let Ok(Status::Complete(p)) = parse_request(req, &limits, &mut slots) else {
                panic!()
            };
            let r = PolicyRequest::from_attributes(&slots[..p.attributes]).unwrap();
            let verdict = ready(policy.decide(black_box(&r), &mut conn, policy.now()));
            assert_eq!(verdict.action, Action::Dunno);
        })
    });
    g.finish();
}

fn decide(c: &mut Criterion) {
    let eom = requests(Mix::Eom);
    bench_stage(c, "END-OF-MESSAGE (acquire), parse included", &eom, None);
    bench_stage(c, "RCPT (peek), parse included", &eom, Some(b"RCPT"));
    bench_stage(
        c,
        "CONNECT (not counted), parse included",
        &eom,
        Some(b"CONNECT"),
    );
}

criterion_group!(benches, decide);
criterion_main!(benches);
