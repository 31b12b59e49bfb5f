//! How well per-user baselines catch a phished account sending from one host: a
//! synthetic month of traffic, replayed with `[baseline]` off and on.
//!
//! ```sh
//! # the evaluation (a table like the one in docs/compromise.md)
//! cargo run --release -p ratelimit-examples --example compromise_eval -- evaluate [USERS] [DAYS]
//! # only the traffic, as [record] JSON lines, for `ratelimit-policyd replay`
//! cargo run --release -p ratelimit-examples --example compromise_eval -- generate FILE [USERS] [DAYS]
//! ```
//!
//! The traffic (deterministic, seeded): USERS users (default 10,000) over DAYS days
//! (default 30), END-OF-MESSAGE requests only (one per message, where mail is
//! charged and learned):
//! - heavy-tailed volumes: a user's mean messages per working day is Pareto
//!   distributed (shape 1.2, most send one to five, a few send hundreds; capped at
//!   800), the users sending 100 or more a day are in a `bulk` tier;
//! - a daily rhythm (office hours, a lunch dip, some evening mail) and a weekly one
//!   (weekends at a quarter);
//! - mail in sessions: a few messages a minute or two apart, not evenly spread;
//! - legitimate bursts: a busy day (3 times the usual volume) on 1 user-day in 40,
//!   a mailing (20 to 60 messages within an hour) on 1 user-day in 3000;
//! - travellers: 5% of users send from another network on a quarter of their days
//!   (the baseline does not care; the networks signal is off here);
//! - compromises from day 14 on: light users (a mean of at most 5 a day) and heavy
//!   users (100 or more a day) taken over by one host sending one message a minute
//!   (60 an hour) for six hours.

use std::io::{BufReader, Write};

use ratelimit_policyd::{config, replay};

const DAY: u64 = 86_400_000;
const HOUR: u64 = 3_600_000;
const MIN: u64 = 60_000;
/// Monday 2026-11-02 00:00 UTC.
const START: u64 = 20_394 * DAY;

/// xorshift64*: small, deterministic, good enough for traffic.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// Uniform in [0, 1).
    fn f(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    /// Poisson with mean `l` (Knuth below 30, a rounded normal above).
    fn poisson(&mut self, l: f64) -> u64 {
        if l <= 0.0 {
            return 0;
        }
        if l > 30.0 {
            let (u1, u2) = (self.f().max(1e-12), self.f());
            let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
            return (l + z * l.sqrt()).round().max(0.0) as u64;
        }
        let (limit, mut p, mut k) = ((-l).exp(), 1.0, 0);
        loop {
            p *= self.f();
            if p <= limit {
                return k;
            }
            k += 1;
        }
    }
}

/// Weight of each hour of a working day (UTC).
const HOURS: [f64; 24] = [
    0.1, 0.05, 0.05, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 3.0, 3.0, 3.0, 1.5, 2.5, 3.0, 3.0, 2.5, 2.0,
    1.0, 0.8, 0.8, 0.6, 0.4, 0.2,
];

fn hour_of_day(rng: &mut Rng) -> u64 {
    let total: f64 = HOURS.iter().sum();
    let mut x = rng.f() * total;
    for (h, w) in HOURS.iter().enumerate() {
        if x < *w {
            return h as u64;
        }
        x -= w;
    }
    12
}

/// Who sent a message.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Legit,
    /// The abuser of compromise number `i`.
    Abuse(usize),
}

/// A compromise: whose account, and whether a heavy one.
struct Compromise {
    user: usize,
    heavy: bool,
}

struct Traffic {
    /// (time, user, client, kind), in time order.
    messages: Vec<(u64, u32, u32, Kind)>,
    rates: Vec<f64>,
    compromises: Vec<Compromise>,
    days: u64,
}

fn generate(users: usize, days: u64, seed: u64) -> Traffic {
    let mut rng = Rng(seed | 1);
    let rates: Vec<f64> = (0..users)
        .map(|_| (0.8 * (1.0 - rng.f()).powf(-1.0 / 1.2)).min(800.0))
        .collect();
    let travellers: Vec<bool> = (0..users).map(|_| rng.below(20) == 0).collect();
    let mut messages = Vec::new();
    for (u, &rate) in rates.iter().enumerate() {
        for d in 0..days {
            let weekend = d % 7 >= 5;
            let mut mean = if weekend { rate / 4.0 } else { rate };
            if rng.below(40) == 0 {
                mean *= 3.0;
            }
            let client = if travellers[u] && rng.below(4) == 0 {
                1_000_000 + u as u32
            } else {
                u as u32
            };
            let mut left = rng.poisson(mean);
            while left > 0 {
                let session = (1 + rng.below(5)).min(left);
                let mut t = START + d * DAY + hour_of_day(&mut rng) * HOUR + rng.below(HOUR);
                for _ in 0..session {
                    messages.push((t, u as u32, client, Kind::Legit));
                    t += 20_000 + rng.below(100_000);
                }
                left -= session;
            }
            if rng.below(3000) == 0 {
                let n = 20 + rng.below(41);
                let t0 = START + d * DAY + (8 + rng.below(9)) * HOUR;
                for _ in 0..n {
                    messages.push((t0 + rng.below(HOUR), u as u32, client, Kind::Legit));
                }
            }
        }
    }
    let mut compromises = Vec::new();
    if days > 14 {
        let light: Vec<usize> = (0..users).filter(|&u| rates[u] <= 5.0).collect();
        let heavy: Vec<usize> = (0..users).filter(|&u| rates[u] >= 100.0).collect();
        for (pool, is_heavy, n) in [(&light, false, 40), (&heavy, true, 10)] {
            for _ in 0..n.min(pool.len()) {
                let user = pool[rng.below(pool.len() as u64) as usize];
                if compromises.iter().any(|c: &Compromise| c.user == user) {
                    continue;
                }
                let day = 14 + rng.below(days - 14);
                let start = START + day * DAY + rng.below(DAY);
                let i = compromises.len();
                for m in 0..360 {
                    messages.push((start + m * MIN, user as u32, 2_000_000, Kind::Abuse(i)));
                }
                compromises.push(Compromise {
                    user,
                    heavy: is_heavy,
                });
            }
        }
    }
    messages.sort_by_key(|m| m.0);
    Traffic {
        messages,
        rates,
        compromises,
        days,
    }
}

fn client_ip(c: u32) -> String {
    format!("10.{}.{}.{}", (c >> 16) & 255, (c >> 8) & 255, c & 255)
}

/// The traffic as `[record]` JSON lines.
fn write_records(t: &Traffic, out: &mut impl Write) -> std::io::Result<()> {
    for (i, &(ts, u, c, _)) in t.messages.iter().enumerate() {
        writeln!(
            out,
            r#"{{"ts":{ts},"conn":{},"attrs":{{"protocol_state":"END-OF-MESSAGE","sasl_username":"u{u}@example.com","client_address":"{}","instance":"m{i:x}"}},"action":"DUNNO"}}"#,
            u % 64,
            client_ip(c)
        )?;
    }
    Ok(())
}

/// The configuration: tiers, the heavy users in `bulk`, and `[baseline]` if given.
fn config_text(t: &Traffic, baseline: Option<(f64, u32)>) -> String {
    let mut s = String::from(
        "[tiers.default]\nlimits = [\"100/1h\"]\n\n[tiers.bulk]\nlimits = [\"1000/1h\"]\n\n",
    );
    if let Some((factor, min)) = baseline {
        s.push_str(&format!(
            "[baseline]\nlearn = \"7d\"\nfactor = {factor}\nmin = {min}\nhalf_life = \"7d\"\naction = \"hold\"\n\n"
        ));
    }
    s.push_str("[assign]\n");
    for (u, r) in t.rates.iter().enumerate() {
        if *r >= 100.0 {
            s.push_str(&format!("\"u{u}@example.com\" = \"bulk\"\n"));
        }
    }
    s
}

struct Outcome {
    light: Vec<u64>,
    heavy: Vec<u64>,
    not_stopped: usize,
    fp_user_days: u64,
    active_user_days: u64,
    held_legit: u64,
    legit: u64,
}

fn median(v: &mut [u64]) -> u64 {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

fn evaluate_one(t: &Traffic, path: &std::path::Path, baseline: Option<(f64, u32)>) -> Outcome {
    let cfg = config::parse(&config_text(t, baseline), "eval.toml", None).expect("config");
    let input = BufReader::new(std::fs::File::open(path).expect("records"));
    let report = replay::run(cfg, input).expect("replay");
    assert_eq!(report.requests.len(), t.messages.len());
    let mut before = vec![0u64; t.compromises.len()];
    let mut stopped = vec![false; t.compromises.len()];
    let days = t.days as usize;
    let mut active = vec![Vec::<bool>::new(); days];
    let mut flagged = vec![Vec::<bool>::new(); days];
    for d in 0..days {
        active[d] = vec![false; t.rates.len()];
        flagged[d] = vec![false; t.rates.len()];
    }
    let (mut held_legit, mut legit) = (0, 0);
    for (r, &(ts, u, _, kind)) in report.requests.iter().zip(&t.messages) {
        let d = ((ts - START) / DAY) as usize;
        match kind {
            Kind::Abuse(i) => {
                if stopped[i] {
                } else if r.refused {
                    stopped[i] = true;
                } else {
                    before[i] += 1;
                }
            }
            Kind::Legit => {
                legit += 1;
                if let Some(a) = active.get_mut(d) {
                    a[u as usize] = true;
                }
                if r.refused && r.signal == Some("baseline") {
                    held_legit += 1;
                    if let Some(f) = flagged.get_mut(d) {
                        f[u as usize] = true;
                    }
                }
            }
        }
    }
    let (mut light, mut heavy) = (Vec::new(), Vec::new());
    for (i, c) in t.compromises.iter().enumerate() {
        if c.heavy {
            heavy.push(before[i]);
        } else {
            light.push(before[i]);
        }
    }
    // False positives counted from the first judged day (learn = 7d) on.
    let judged = 7..days;
    Outcome {
        light,
        heavy,
        not_stopped: stopped.iter().filter(|s| !**s).count(),
        fp_user_days: judged
            .clone()
            .map(|d| flagged[d].iter().filter(|f| **f).count() as u64)
            .sum(),
        active_user_days: judged
            .map(|d| active[d].iter().filter(|a| **a).count() as u64)
            .sum(),
        held_legit,
        legit,
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let num = |i: usize, default: u64| -> u64 {
        args.get(i).and_then(|a| a.parse().ok()).unwrap_or(default)
    };
    match args.first().map(String::as_str) {
        Some("generate") => {
            let path = args.get(1).ok_or("generate FILE [USERS] [DAYS]")?;
            let t = generate(num(2, 10_000) as usize, num(3, 30), 42);
            let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
            write_records(&t, &mut out)?;
            out.flush()?;
            eprintln!(
                "{} messages, {} compromises, written to {path}",
                t.messages.len(),
                t.compromises.len()
            );
            Ok(())
        }
        Some("evaluate") => {
            let (users, days) = (num(1, 10_000) as usize, num(2, 30));
            let t = generate(users, days, 42);
            let path =
                std::env::temp_dir().join(format!("compromise-eval-{}.jsonl", std::process::id()));
            let mut out = std::io::BufWriter::new(std::fs::File::create(&path)?);
            write_records(&t, &mut out)?;
            out.flush()?;
            drop(out);
            let light = t.compromises.iter().filter(|c| !c.heavy).count();
            println!(
                "{users} users, {days} days, {} messages; {light} light and {} heavy accounts taken over (60 an hour from one host)\n",
                t.messages.len(),
                t.compromises.len() - light
            );
            println!(
                "| baseline | light: median / max sent before stopped | heavy: median / max | not stopped in 6 h | legit users flagged per day | legit messages held |"
            );
            println!("|---|---|---|---|---|---|");
            let settings: [Option<(f64, u32)>; 6] = [
                None,
                Some((5.0, 10)),
                Some((3.0, 10)),
                Some((5.0, 5)),
                Some((10.0, 10)),
                Some((5.0, 20)),
            ];
            for s in settings {
                let mut o = evaluate_one(&t, &path, s);
                let name = s.map_or("off (tier limits only)".to_string(), |(f, m)| {
                    format!("factor {f}, min {m}")
                });
                let per_day = 100.0 * o.fp_user_days as f64 / o.active_user_days.max(1) as f64;
                println!(
                    "| {name} | {} / {} | {} / {} | {} | {per_day:.3}% ({} user-days) | {} of {} ({:.4}%) |",
                    median(&mut o.light),
                    o.light.iter().max().copied().unwrap_or(0),
                    median(&mut o.heavy),
                    o.heavy.iter().max().copied().unwrap_or(0),
                    o.not_stopped,
                    o.fp_user_days,
                    o.held_legit,
                    o.legit,
                    100.0 * o.held_legit as f64 / o.legit.max(1) as f64
                );
            }
            let _ = std::fs::remove_file(&path);
            println!(
                "\nmemory per user: {} bytes of state ({} in Redis)",
                std::mem::size_of::<ratelimit_core::baseline::BaselineState>(),
                34
            );
            Ok(())
        }
        _ => {
            let mut err = std::io::stderr();
            writeln!(
                err,
                "usage: compromise_eval evaluate [USERS] [DAYS] | generate FILE [USERS] [DAYS]"
            )?;
            Err("no command".into())
        }
    }
}
