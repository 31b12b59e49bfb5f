//! The whole server over loopback: one request/reply round trip on a persistent
//! connection, as Postfix does, for our server (memory store, 10,000 users) and
//! the do-nothing policy server (the protocol ceiling) in one group.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use ratelimit_benches::request::{MessageStream, Mix, StreamConfig};
use ratelimit_core::SystemClock;
use ratelimit_policyd::{config, daemon};

const USERS: u64 = 10_000;

fn requests() -> Vec<Vec<u8>> {
    let mut stream = MessageStream::new(&StreamConfig {
        mix: Mix::Eom,
        recipients: 1,
        users: USERS,
        connection: 0,
    });
    (0..USERS)
        .map(|u| {
            stream.begin_message(u, u);
            stream.request(0).to_vec()
        })
        .collect()
}

fn round_trips(addr: SocketAddr, reqs: &[Vec<u8>], iters: u64) -> Duration {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_nodelay(true).unwrap();
    let mut buf = [0u8; 512];
    let start = Instant::now();
    for i in 0..iters as usize {
        s.write_all(&reqs[i % reqs.len()]).unwrap();
        let mut got = 0;
        loop {
            let n = s.read(&mut buf[got..]).unwrap();
            assert!(n > 0, "server closed the connection");
            got += n;
            if buf[..got].ends_with(b"\n\n") {
                break;
            }
        }
        assert!(
            buf.starts_with(b"action=DUNNO"),
            "{}",
            String::from_utf8_lossy(&buf[..got])
        );
    }
    start.elapsed()
}

struct Dunno(Child);
impl Drop for Dunno {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn server(c: &mut Criterion) {
    let reqs = requests();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let cfg = config::parse(
        "[server]\nlisten = [\"127.0.0.1:0\"]\n[tiers.default]\nlimits = [\"1000000/1h\"]\n",
        "bench",
        None,
    )
    .unwrap();
    let daemon = daemon::Daemon::new(cfg, Arc::new(SystemClock)).unwrap();
    let listeners = rt.block_on(daemon::bind(&daemon.policy.config())).unwrap();
    let ours = listeners[0].local_addr().unwrap();
    let (_stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
    rt.spawn(async move {
        daemon
            .run(listeners, async move {
                let _ = stop_rx.await;
            })
            .await
    });

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dunno_addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let _dunno = Dunno(
        Command::new(env!("CARGO_BIN_EXE_dunno-server"))
            .arg(dunno_addr.to_string())
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    while TcpStream::connect(dunno_addr).is_err() {
        std::thread::sleep(Duration::from_millis(10));
    }

    let mut g = c.benchmark_group("server/round-trip");
    g.throughput(Throughput::Elements(1));
    g.bench_function("ratelimit-policyd (memory store, END-OF-MESSAGE)", |b| {
        b.iter_custom(|iters| round_trips(ours, &reqs, iters))
    });
    g.bench_function("do-nothing server (DUNNO)", |b| {
        b.iter_custom(|iters| round_trips(dunno_addr, &reqs, iters))
    });
    g.finish();
}

criterion_group!(benches, server);
criterion_main!(benches);
