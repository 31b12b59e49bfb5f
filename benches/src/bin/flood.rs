//! Flood benchmark: how much a connection flood and a garbage flood slow down a
//! well-behaved policy client.
//!
//! Two phases against one server, in one run:
//!
//! 1. **quiet**: only the well-behaved client runs;
//! 2. **attack**: the same client, while `--connectors` threads open connections as
//!    fast as they can (each holds up to `--hold` of them, closing the oldest) and
//!    `--garbage` threads connect and send junk (random bytes, NULs, invalid UTF-8,
//!    endless lines, too many attributes) until the server hangs up.
//!
//! The well-behaved client is one persistent connection sending Postfix 3.7 requests
//! (RCPT, DATA, END-OF-MESSAGE) one at a time, like an smtpd process. A second probe
//! opens a *new* connection every `--probe-every` and sends one request, which shows
//! what a freshly started smtpd would see. Both report latency percentiles per phase
//! and the attack/quiet ratio of p99.
//!
//! Bounded: each phase lasts its duration, every connection is on loopback, and at most
//! `--hold` connections per connector thread are open at a time.
//!
//! ```text
//! target/release/ratelimit-policyd --config benches/flood.toml &
//! target/release/flood --addr 127.0.0.1:10931 --quiet 5s --attack 5s
//! ```

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use clap::Parser;
use hdrhistogram::Histogram;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use ratelimit_benches::duration::parse_duration;
use ratelimit_benches::reply::{MAX_REPLY, Status, parse_reply};
use ratelimit_benches::request::{MessageStream, Mix, StreamConfig};

/// Flood benchmark: a well-behaved client's latency, quiet and under a connection and
/// garbage flood (loopback only).
#[derive(Debug, Parser)]
#[command(name = "flood", version)]
struct Args {
    /// Server address (HOST:PORT on loopback).
    #[arg(long, default_value = "127.0.0.1:10031")]
    addr: String,
    /// Length of the quiet phase.
    #[arg(long, value_parser = parse_duration, default_value = "5s")]
    quiet: Duration,
    /// Length of the attack phase.
    #[arg(long, value_parser = parse_duration, default_value = "5s")]
    attack: Duration,
    /// Threads opening connections as fast as they can.
    #[arg(long, default_value_t = 1)]
    connectors: u32,
    /// Connections each connector keeps open (it closes the oldest beyond this).
    #[arg(long, default_value_t = 2000)]
    hold: usize,
    /// Threads sending garbage.
    #[arg(long, default_value_t = 1)]
    garbage: u32,
    /// How often the probe opens a new connection for one request.
    #[arg(long, value_parser = parse_duration, default_value = "50ms")]
    probe_every: Duration,
    /// Give up on one request after this long (counted as a timeout).
    #[arg(long, value_parser = parse_duration, default_value = "2s")]
    timeout: Duration,
    /// Distinct users of the well-behaved client (keep them under their limits).
    #[arg(long, default_value_t = 1000)]
    users: u64,
}

const QUIET: u8 = 0;
const ATTACK: u8 = 1;
const DONE: u8 = 2;

/// Latencies and failures of one client in one phase.
struct PhaseStats {
    hist: Histogram<u64>,
    timeouts: u64,
    errors: u64,
}

impl PhaseStats {
    fn new() -> PhaseStats {
        PhaseStats {
            hist: Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("valid bounds"),
            timeouts: 0,
            errors: 0,
        }
    }

    fn record(&mut self, r: Result<Duration, Failure>) {
        match r {
            Ok(d) => {
                let _ = self.hist.record(d.as_nanos().max(1) as u64);
            }
            Err(Failure::Timeout) => self.timeouts += 1,
            Err(Failure::Other) => self.errors += 1,
        }
    }
}

enum Failure {
    Timeout,
    Other,
}

impl From<io::Error> for Failure {
    fn from(e: io::Error) -> Failure {
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => Failure::Timeout,
            _ => Failure::Other,
        }
    }
}

/// Sends one request and reads its whole reply.
fn exchange(s: &mut TcpStream, request: &[u8], buf: &mut [u8]) -> Result<(), Failure> {
    s.write_all(request)?;
    let mut len = 0;
    loop {
        let n = s.read(&mut buf[len..])?;
        if n == 0 {
            return Err(Failure::Other);
        }
        len += n;
        match parse_reply(&buf[..len]) {
            Ok(Status::Partial) if len < buf.len() => continue,
            Ok(Status::Complete { len: l, .. }) if l == len => return Ok(()),
            _ => return Err(Failure::Other),
        }
    }
}

fn connect(addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    Ok(s)
}

fn phase(p: &AtomicU8) -> u8 {
    p.load(Ordering::Relaxed)
}

/// The well-behaved client: one persistent connection, one request at a time.
fn steady(addr: SocketAddr, args: &Args, p: &AtomicU8) -> [PhaseStats; 2] {
    let mut stats = [PhaseStats::new(), PhaseStats::new()];
    let mut stream = MessageStream::new(&StreamConfig {
        mix: Mix::Postfix,
        recipients: 1,
        users: args.users,
        connection: 0,
    });
    let mut buf = vec![0u8; MAX_REPLY + 1];
    let mut conn = None;
    let mut message = 0u64;
    while phase(p) != DONE {
        message += 1;
        stream.begin_message(message % args.users, message);
        for i in 0..stream.requests_per_message() {
            let ph = phase(p);
            if ph == DONE {
                break;
            }
            let start = Instant::now();
            let result = (|| {
                if conn.is_none() {
                    conn = Some(connect(addr, args.timeout)?);
                }
                let c = conn.as_mut().expect("just connected");
                exchange(c, stream.request(i), &mut buf)
            })();
            if result.is_err() {
                conn = None; // reconnect, as Postfix would
            }
            stats[usize::from(ph)].record(result.map(|()| start.elapsed()));
        }
    }
    stats
}

/// A new connection for every request: what a freshly started smtpd sees.
fn probe(addr: SocketAddr, args: &Args, p: &AtomicU8) -> [PhaseStats; 2] {
    let mut stats = [PhaseStats::new(), PhaseStats::new()];
    let request = b"request=smtpd_access_policy\nprotocol_state=RCPT\nsasl_username=probe@example.com\nrecipient=x@example.net\n\n";
    let mut buf = vec![0u8; MAX_REPLY + 1];
    while phase(p) != DONE {
        let ph = phase(p);
        let start = Instant::now();
        let result = connect(addr, args.timeout)
            .map_err(Failure::from)
            .and_then(|mut c| exchange(&mut c, request, &mut buf));
        stats[usize::from(ph)].record(result.map(|()| start.elapsed()));
        thread::sleep(args.probe_every.saturating_sub(start.elapsed()));
    }
    stats
}

/// Opens connections as fast as it can, holding at most `hold`.
fn connector(addr: SocketAddr, hold: usize, p: &AtomicU8, opened: &AtomicU64, failed: &AtomicU64) {
    let mut held = VecDeque::with_capacity(hold);
    while phase(p) == ATTACK {
        match TcpStream::connect_timeout(&addr, Duration::from_millis(500)) {
            Ok(s) => {
                opened.fetch_add(1, Ordering::Relaxed);
                if held.len() >= hold {
                    held.pop_front();
                }
                held.push_back(s);
            }
            Err(_) => {
                failed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// One piece of junk: each kind is something the server must refuse.
fn junk(rng: &mut SmallRng) -> Vec<u8> {
    let len = rng.random_range(1..20_000);
    match rng.random_range(0..5) {
        // Random bytes (NULs, invalid UTF-8, lines without '=').
        0 => (0..len).map(|_| rng.random()).collect(),
        // One endless line.
        1 => vec![b'a'; len + 5000],
        // NUL inside an otherwise valid request.
        2 => b"request=smtpd_access_policy\nsasl_username=a\0b\n\n".to_vec(),
        // Too many attributes.
        3 => (0..100)
            .flat_map(|i| format!("x{i}=y\n").into_bytes())
            .collect(),
        // Invalid UTF-8 names and values, then no '=' at all.
        _ => b"\xff\xfe=\xc3\x28\nsasl_username=\xe9\nno equals here\n\n".to_vec(),
    }
}

/// Connects, sends junk until the server hangs up, repeats.
fn garbage(addr: SocketAddr, p: &AtomicU8, sent: &AtomicU64, closed: &AtomicU64, seed: u64) {
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut sink = [0u8; 4096];
    while phase(p) == ATTACK {
        let Ok(mut s) = connect(addr, Duration::from_millis(500)) else {
            continue;
        };
        let piece = junk(&mut rng);
        if s.write_all(&piece).is_ok() {
            sent.fetch_add(piece.len() as u64, Ordering::Relaxed);
        }
        // The server closes without replying; a reply would be a bug.
        loop {
            match s.read(&mut sink) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
        closed.fetch_add(1, Ordering::Relaxed);
    }
}

fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

fn row(name: &str, phase: &str, s: &PhaseStats) {
    let h = &s.hist;
    if h.is_empty() {
        println!(
            "| {name} | {phase} | 0 | - | - | - | - | {} | {} |",
            s.timeouts, s.errors
        );
        return;
    }
    println!(
        "| {name} | {phase} | {} | {:.3} | {:.3} | {:.3} | {:.3} | {} | {} |",
        h.len(),
        ms(h.value_at_quantile(0.5)),
        ms(h.value_at_quantile(0.99)),
        ms(h.value_at_quantile(0.999)),
        ms(h.max()),
        s.timeouts,
        s.errors
    );
}

fn ratio(quiet: &PhaseStats, attack: &PhaseStats) -> String {
    if quiet.hist.is_empty() || attack.hist.is_empty() {
        return "-".into();
    }
    format!(
        "{:.2}",
        attack.hist.value_at_quantile(0.99) as f64 / quiet.hist.value_at_quantile(0.99) as f64
    )
}

fn main() -> io::Result<()> {
    let args = Arc::new(Args::parse());
    let addr = args
        .addr
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "address did not resolve"))?;
    if !addr.ip().is_loopback() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "flood only attacks a server on loopback",
        ));
    }
    let p = Arc::new(AtomicU8::new(QUIET));
    let counters: Arc<[AtomicU64; 4]> = Arc::new(Default::default());

    let steady_t = {
        let (a, p) = (Arc::clone(&args), Arc::clone(&p));
        thread::spawn(move || steady(addr, &a, &p))
    };
    let probe_t = {
        let (a, p) = (Arc::clone(&args), Arc::clone(&p));
        thread::spawn(move || probe(addr, &a, &p))
    };
    thread::sleep(args.quiet);

    p.store(ATTACK, Ordering::Relaxed);
    let attack_start = Instant::now();
    let mut attackers = Vec::new();
    for _ in 0..args.connectors {
        let (p, c, hold) = (Arc::clone(&p), Arc::clone(&counters), args.hold);
        attackers.push(thread::spawn(move || {
            connector(addr, hold, &p, &c[0], &c[1])
        }));
    }
    for i in 0..args.garbage {
        let (p, c) = (Arc::clone(&p), Arc::clone(&counters));
        attackers.push(thread::spawn(move || {
            garbage(addr, &p, &c[2], &c[3], u64::from(i))
        }));
    }
    thread::sleep(args.attack);
    p.store(DONE, Ordering::Relaxed);
    let attack_len = attack_start.elapsed();
    for t in attackers {
        let _ = t.join();
    }
    let steady = steady_t.join().expect("steady client");
    let probe = probe_t.join().expect("probe");

    let c = |i: usize| counters[i].load(Ordering::Relaxed);
    println!(
        "flood against {addr}: quiet {:?}, attack {:?}; nproc {}; load average {}",
        args.quiet,
        args.attack,
        thread::available_parallelism().map_or(0, |n| n.get()),
        std::fs::read_to_string("/proc/loadavg")
            .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
            .unwrap_or_default()
    );
    println!(
        "attack: {} connections opened ({:.0}/s, {} failed), {} garbage connections closed by the server, {} KiB of garbage",
        c(0),
        c(0) as f64 / attack_len.as_secs_f64(),
        c(1),
        c(3),
        c(2) / 1024
    );
    println!();
    println!(
        "| client | phase | requests | p50 ms | p99 ms | p99.9 ms | max ms | timeouts | errors |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    row("persistent", "quiet", &steady[0]);
    row("persistent", "attack", &steady[1]);
    row("new connection", "quiet", &probe[0]);
    row("new connection", "attack", &probe[1]);
    println!();
    println!(
        "p99 attack/quiet: persistent {}, new connection {}",
        ratio(&steady[0], &steady[1]),
        ratio(&probe[0], &probe[1])
    );
    Ok(())
}
