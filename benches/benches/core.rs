//! Acquire on the in-memory store, compared with `governor`'s keyed limiter in
//! the same group, with the same keys in the same order at the same times.
//!
//! Groups: `acquire/sliding` (`100/1h`, precision 60) and `acquire/bucket`
//! (token bucket 100 per hour, burst 100). `governor` is GCRA only; its quota
//! is 100 per hour with burst 100 in both groups. Each group has, per key count
//! (1k, 100k, 1M):
//!
//! - `ratelimit/1-thread`, `governor/1-thread`: one check per iteration;
//! - `ratelimit/2-threads`, `governor/2-threads`: two scoped threads on
//!   **disjoint** halves of the keys, each doing half the iterations; the time
//!   is the wall time from the first thread's start to the last one's end, so
//!   the figure is wall time per check across both threads (perfect scaling
//!   shows half the 1-thread time). Throughput is in checks per second, total;
//! - `overhead/1-thread`: the loop alone (next key, render it, advance time),
//!   which both libraries also pay.
//!
//! All keys are pre-touched before measuring: three rounds over every key, at
//! the times the schedule gives them (see [`ratelimit_benches::keyspace`]), so
//! each key starts with three messages spread over the last hour and goes on
//! at three per hour. Neither limit can refuse at that rate; every bench
//! asserts that every check was allowed, so both libraries did the same work.
//!
//! The first round (which creates the keys) visits them in another shuffled
//! order than the later rounds and the measurement: users do not send mail in
//! the order in which they first appeared. With one order for both, whatever a
//! library allocates per key in creation order (governor's key strings, or a
//! slab of entries) would be read back sequentially, and the prefetcher would
//! hide misses that production pays.
//!
//! Time: neither library reads a real clock. ratelimit is passed a
//! `Timestamp`; governor gets a `FakeRelativeClock` (its default clock is
//! `quanta`, a TSC read, which ratelimit would not pay here). Both clocks are
//! one shared atomic advanced every [`TICK`] checks, so the clock is the same
//! (negligible) cost for both. Key counts can be narrowed with
//! `CORE_BENCH_KEYS=1000,100000`.

use std::hint::black_box;
use std::sync::Barrier;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{BenchmarkGroup, BenchmarkId, Criterion, Throughput, measurement::WallTime};
use governor::clock::{Clock, FakeRelativeClock};
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};
use ratelimit_benches::keyspace::{Cursor, T0_MS, render_key, step_nanos};
use ratelimit_core::{Cost, Limit, MemoryStore, Mode, Store, Timestamp};

/// Checks between two advances of the simulated clock.
const TICK: u64 = 64;
/// Rounds over every key before measuring (messages already sent this hour).
const PRE_TOUCH_ROUNDS: u64 = 3;
/// The shuffle of the first round, which creates the keys.
const CREATION_SEED: u64 = 99;
/// The quota of both libraries: 100 per hour, burst 100.
const COUNT: u32 = 100;

/// A limiter under test, driven by simulated time.
trait Target: Sync {
    /// What a check needs to know about the time.
    type Now: Copy;
    /// Moves simulated time on by `nanos`; returns the new time.
    fn advance(&self, nanos: u64) -> Self::Now;
    /// One acquire of one message; whether it was allowed. `&String` because
    /// governor's keyed limiter over `String` keys takes `&K`.
    #[allow(clippy::ptr_arg)]
    fn check(&self, key: &String, now: Self::Now) -> bool;
}

struct Ours {
    store: MemoryStore,
    limits: [Limit; 1],
    /// Simulated nanoseconds since [`T0_MS`].
    sim_nanos: AtomicU64,
}

impl Target for Ours {
    type Now = Timestamp;

    fn advance(&self, nanos: u64) -> Timestamp {
        let t = self.sim_nanos.fetch_add(nanos, Ordering::Relaxed) + nanos;
        Timestamp::from_millis(T0_MS + t / 1_000_000)
    }

    #[inline]
    fn check(&self, key: &String, now: Timestamp) -> bool {
        self.store
            .check(key, &self.limits, Cost::message(1, 0), now, Mode::Acquire)
            .expect("the memory store is below its key cap")
            .is_allowed()
    }
}

struct Governor {
    limiter: RateLimiter<
        String,
        DefaultKeyedStateStore<String>,
        FakeRelativeClock,
        NoOpMiddleware<<FakeRelativeClock as Clock>::Instant>,
    >,
    /// The limiter's clock (a clone shares the same atomic).
    clock: FakeRelativeClock,
}

impl Target for Governor {
    type Now = ();

    fn advance(&self, nanos: u64) {
        self.clock.advance(Duration::from_nanos(nanos));
    }

    #[inline]
    fn check(&self, key: &String, (): ()) -> bool {
        self.limiter.check_key(key).is_ok()
    }
}

/// The loop alone: what both targets pay besides their own work.
struct Overhead {
    sim_nanos: AtomicU64,
}

impl Target for Overhead {
    type Now = u64;

    fn advance(&self, nanos: u64) -> u64 {
        self.sim_nanos.fetch_add(nanos, Ordering::Relaxed) + nanos
    }

    #[inline]
    fn check(&self, key: &String, now: u64) -> bool {
        black_box((key.len() as u64) ^ now) != u64::MAX
    }
}

/// Runs `iters` checks on `target` from `cursor`, advancing time by `step`
/// nanoseconds per check; returns how many were allowed.
fn drive<T: Target>(target: &T, cursor: &mut Cursor, step: u64, iters: u64) -> u64 {
    let mut key = String::with_capacity(32);
    let mut now = target.advance(0);
    let mut allowed = 0;
    for i in 0..iters {
        if i % TICK == TICK - 1 {
            now = target.advance(TICK * step);
        }
        render_key(cursor.next_index(), &mut key);
        allowed += u64::from(target.check(black_box(&key), now));
    }
    black_box(allowed)
}

/// `iters` checks on one thread; asserts that all were allowed.
fn one_thread<T: Target>(target: &T, cursor: &mut Cursor, step: u64, iters: u64) -> Duration {
    let start = Instant::now();
    let allowed = drive(target, cursor, step, iters);
    let elapsed = start.elapsed();
    assert_eq!(allowed, iters, "some checks were refused");
    elapsed
}

/// `iters` checks split over two threads with disjoint keys; wall time from the
/// first start to the last end. Asserts that all were allowed.
fn two_threads<T: Target>(
    target: &T,
    cursors: &mut [Cursor; 2],
    step: u64,
    iters: u64,
) -> Duration {
    let barrier = Barrier::new(2);
    let halves = [iters / 2, iters - iters / 2];
    let [c0, c1] = cursors;
    let spans = std::thread::scope(|s| {
        let barrier = &barrier;
        let [a, b] = [(c0, halves[0]), (c1, halves[1])].map(|(cursor, n)| {
            s.spawn(move || {
                barrier.wait();
                let start = Instant::now();
                let allowed = drive(target, cursor, step, n);
                (start, Instant::now(), allowed)
            })
        });
        [a.join().unwrap(), b.join().unwrap()]
    });
    let allowed: u64 = spans.iter().map(|s| s.2).sum();
    assert_eq!(allowed, iters, "some checks were refused");
    let start = spans.iter().map(|s| s.0).min().unwrap();
    let end = spans.iter().map(|s| s.1).max().unwrap();
    end - start
}

/// Adds the 1- and 2-thread benches of one target at one key count.
fn bench_target<T: Target>(
    group: &mut BenchmarkGroup<'_, WallTime>,
    name: &str,
    target: &T,
    keys: u32,
) {
    let step = step_nanos(u64::from(keys));
    // Pre-touch: the same schedule as the measurement, started earlier; the
    // keys are created in another order than the one they are then visited in.
    let mut first = Cursor::all(keys, CREATION_SEED);
    let n = u64::from(keys);
    assert_eq!(drive(target, &mut first, step, n), n, "first touch refused");
    let mut all = Cursor::all(keys, 1);
    let pre = (PRE_TOUCH_ROUNDS - 1) * n;
    assert_eq!(drive(target, &mut all, step, pre), pre, "pre-touch refused");

    group.bench_function(BenchmarkId::new(format!("{name}/1-thread"), keys), |b| {
        b.iter_custom(|iters| one_thread(target, &mut all, step, iters))
    });
    let half = keys / 2;
    let mut halves = [
        Cursor::new((0..half).collect(), 2),
        Cursor::new((half..keys).collect(), 3),
    ];
    group.bench_function(BenchmarkId::new(format!("{name}/2-threads"), keys), |b| {
        b.iter_custom(|iters| two_threads(target, &mut halves, step, iters))
    });
}

fn key_counts() -> Vec<u32> {
    match std::env::var("CORE_BENCH_KEYS") {
        Ok(list) => list
            .split(',')
            .map(|k| {
                k.trim()
                    .parse()
                    .expect("CORE_BENCH_KEYS: comma-separated counts")
            })
            .collect(),
        Err(_) => vec![1_000, 100_000, 1_000_000],
    }
}

fn governor_quota() -> Quota {
    let n = std::num::NonZeroU32::new(COUNT).unwrap();
    Quota::per_hour(n).allow_burst(n)
}

fn acquire(c: &mut Criterion, group_name: &str, limit: Limit) {
    let mut group = c.benchmark_group(group_name);
    group.throughput(Throughput::Elements(1));
    for keys in key_counts() {
        let overhead = Overhead {
            sim_nanos: AtomicU64::new(0),
        };
        let step = step_nanos(u64::from(keys));
        let mut all = Cursor::all(keys, 1);
        group.bench_function(BenchmarkId::new("overhead/1-thread", keys), |b| {
            b.iter_custom(|iters| one_thread(&overhead, &mut all, step, iters))
        });

        let ours = Ours {
            store: MemoryStore::new(),
            limits: [limit],
            sim_nanos: AtomicU64::new(0),
        };
        bench_target(&mut group, "ratelimit", &ours, keys);
        drop(ours);

        let clock = FakeRelativeClock::default();
        let theirs = Governor {
            limiter: RateLimiter::new(
                governor_quota(),
                DefaultKeyedStateStore::default(),
                clock.clone(),
            ),
            clock,
        };
        bench_target(&mut group, "governor", &theirs, keys);
        assert_eq!(theirs.limiter.len(), keys as usize);
    }
    group.finish();
}

fn sliding(c: &mut Criterion) {
    acquire(c, "acquire/sliding", format!("{COUNT}/1h").parse().unwrap());
}

fn bucket(c: &mut Criterion) {
    let hour = Duration::from_secs(3600);
    let limit = Limit::token_bucket(u64::from(COUNT), hour, u64::from(COUNT)).unwrap();
    acquire(c, "acquire/bucket", limit);
}

criterion::criterion_group!(benches, sliding, bucket);
criterion::criterion_main!(benches);
