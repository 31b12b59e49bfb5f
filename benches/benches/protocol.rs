//! Request parsing and response encoding (bytes per second), against a naive
//! line-splitting parser that allocates a map per request (the shape of most
//! policy servers), in one group.

use std::collections::HashMap;
use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use ratelimit_benches::request::{MessageStream, Mix, StreamConfig};
use ratelimit_policyd::protocol::{
    Action, Attribute, PolicyRequest, RequestBounds, Stage, Status, encode_response, frame_request,
    parse_request,
};

/// A real-shaped END-OF-MESSAGE request: all 29 attributes of Postfix 3.7.
fn postfix_request() -> Vec<u8> {
    let mut stream = MessageStream::new(&StreamConfig {
        mix: Mix::Eom,
        recipients: 1,
        users: 10_000,
        connection: 0,
    });
    stream.begin_message(1234, 1);
    stream.request(0).to_vec()
}

fn naive_parse(buf: &[u8]) -> HashMap<String, String> {
    let text = String::from_utf8_lossy(buf);
    text.lines()
        .take_while(|l| !l.is_empty())
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn parse(c: &mut Criterion) {
    let req = postfix_request();
    let bounds = RequestBounds::DEFAULT;
    let mut g = c.benchmark_group("parse");
    g.throughput(Throughput::Bytes(req.len() as u64));
    g.bench_function("ratelimit parse_request + PolicyRequest", |b| {
        b.iter(|| {
            let mut slots = [Attribute::EMPTY; 64];
            let Ok(Status::Complete(p)) = parse_request(black_box(&req), &bounds, &mut slots)
            else {
                panic!("not parsed");
            };
            let r = PolicyRequest::from_attributes(&slots[..p.attributes]).unwrap();
            assert_eq!(r.protocol_state, Stage::EndOfMessage);
            black_box(r.sasl_username);
        })
    });
    g.bench_function("ratelimit frame_request (framing only)", |b| {
        b.iter(|| {
            let Ok(Status::Complete(p)) = frame_request(black_box(&req), &bounds) else {
                panic!("not framed");
            };
            assert_eq!(p.consumed, req.len());
        })
    });
    g.bench_function("naive split into a HashMap<String, String>", |b| {
        b.iter(|| {
            let m = naive_parse(black_box(&req));
            assert_eq!(
                m.get("protocol_state").map(String::as_str),
                Some("END-OF-MESSAGE")
            );
        })
    });
    g.finish();
}

fn encode(c: &mut Criterion) {
    let defer = Action::defer_if_permit(
        "Too much mail from alice@example.com: limit of 100/1h reached, try again in 12m30s",
    );
    let mut out = Vec::with_capacity(256);
    let mut g = c.benchmark_group("encode");
    for (name, action) in [("DUNNO", Action::Dunno), ("DEFER_IF_PERMIT text", defer)] {
        out.clear();
        encode_response(&action, &mut out);
        g.throughput(Throughput::Bytes(out.len() as u64));
        g.bench_function(name, |b| {
            b.iter(|| {
                out.clear();
                encode_response(black_box(&action), &mut out);
                assert!(out.ends_with(b"\n\n"));
            })
        });
    }
    g.finish();
}

criterion_group!(benches, parse, encode);
criterion_main!(benches);
