//! Store conformance: every [`Store`] must give exactly the same decisions.
//!
//! [`conformance`] runs table-driven scenarios, each asserting exact [`Decision`]s
//! worked out by hand from the algorithm's definition (not by calling it), against
//! any store. It runs on [`MemoryStore`] here, and with the `redis` feature on
//! [`RedisStore`] (ignored tests: they need a Redis server; `scripts/with-redis` starts
//! one and sets `RATELIMIT_TEST_REDIS_URL`). A proptest then drives a `MemoryStore`
//! and a `RedisStore` with the same random histories and requires identical decisions
//! at every step.

use std::time::Duration;

use ratelimit_core::store::Forget;
use ratelimit_core::{
    Cost, Decision, Denial, Limit, LimitStatus, MemoryStore, Mode, Store, Timestamp, Unit,
};

/// A base time that is a whole number of days, so sub-windows of every limit used
/// here start at the base.
const BASE: u64 = 1_700_006_400_000;

fn lim(text: &str) -> Limit {
    text.parse().unwrap_or_else(|e| panic!("{e}"))
}

fn bucket(count: u64, window_ms: u64, burst: u64) -> Limit {
    Limit::token_bucket(count, Duration::from_millis(window_ms), burst).unwrap()
}

/// What a step must return: `None` (allowed) or the refusing limit and its
/// `retry_after` in ms; then `(used, limit, remaining)` per limit.
struct Expect {
    denied: Option<(usize, Option<u64>)>,
    statuses: Vec<(u64, u64, u64)>,
}

fn ok(statuses: &[(u64, u64, u64)]) -> Expect {
    Expect {
        denied: None,
        statuses: statuses.to_vec(),
    }
}

fn no(limit: usize, retry_ms: Option<u64>, statuses: &[(u64, u64, u64)]) -> Expect {
    Expect {
        denied: Some((limit, retry_ms)),
        statuses: statuses.to_vec(),
    }
}

impl Expect {
    fn decision(&self) -> Decision {
        let statuses: Vec<LimitStatus> = self
            .statuses
            .iter()
            .map(|&(used, limit, remaining)| LimitStatus {
                used,
                limit,
                remaining,
            })
            .collect();
        Decision::new(self.denial(), &statuses)
    }

    fn denial(&self) -> Option<Denial> {
        self.denied.map(|(limit, retry)| Denial {
            limit,
            retry_after: retry.map(Duration::from_millis),
        })
    }
}

/// One step of a scenario.
enum Step {
    /// At `t` ms after the base, check `cost` against tier `tier` in `mode`.
    Check {
        t: u64,
        tier: usize,
        cost: Cost,
        mode: Mode,
        expect: Expect,
    },
    /// Forget the key; expect whether anything was recorded.
    Forget(bool),
}

use Mode::{Acquire as A, Peek as P};

fn at(t: u64, tier: usize, cost: Cost, mode: Mode, expect: Expect) -> Step {
    Step::Check {
        t,
        tier,
        cost,
        mode,
        expect,
    }
}

fn n(units: u64) -> Cost {
    Cost::units(units)
}

fn bytes(b: u64) -> Cost {
    Cost {
        messages: 0,
        recipients: 0,
        bytes: b,
    }
}

struct Scenario {
    name: &'static str,
    tiers: Vec<Vec<Limit>>,
    steps: Vec<Step>,
}

const H: u64 = 3_600_000;
/// 2^30 ms: with one unit per window, a bucket's level is 2^30 per unit.
const W30: u64 = 1 << 30;

fn scenarios() -> Vec<Scenario> {
    // Bucket used below: 10 per minute, burst 3 (level in unit*ms; one unit = 60,000).
    let b10 = bucket(10, 60_000, 3);
    let big_bytes = bucket(1, 1 << 40, (1 << 24) - 1).with_unit(Unit::Bytes);
    const BIG: u64 = 1 << 40;
    const BURST: u64 = (1 << 24) - 1;
    vec![
        Scenario {
            name: "a window admits exactly its count",
            // 3/1m: 60 sub-windows of 1 s.
            tiers: vec![vec![lim("3/1m")]],
            steps: vec![
                at(0, 0, n(1), A, ok(&[(0, 3, 2)])),
                at(1_000, 0, n(1), A, ok(&[(1, 3, 1)])),
                at(2_000, 0, n(1), A, ok(&[(2, 3, 0)])),
                // Sub-window 0 leaves the counted span when sub-window 61 begins.
                at(3_000, 0, n(1), A, no(0, Some(58_000), &[(3, 3, 0)])),
                at(60_999, 0, n(1), A, no(0, Some(1), &[(3, 3, 0)])),
                at(61_000, 0, n(1), A, ok(&[(2, 3, 0)])),
            ],
        },
        Scenario {
            name: "a refusal is not charged",
            tiers: vec![vec![lim("2/1m")]],
            steps: vec![
                at(0, 0, n(2), A, ok(&[(0, 2, 0)])),
                at(10, 0, n(1), A, no(0, Some(60_990), &[(2, 2, 0)])),
                at(20, 0, n(1), A, no(0, Some(60_980), &[(2, 2, 0)])),
                // More than the limit itself: never.
                at(30, 0, n(3), A, no(0, None, &[(2, 2, 0)])),
                at(61_000, 0, n(2), A, ok(&[(0, 2, 0)])),
            ],
        },
        Scenario {
            name: "a peek charges nothing",
            tiers: vec![vec![lim("2/1m")]],
            steps: vec![
                at(0, 0, n(1), P, ok(&[(0, 2, 2)])),
                at(0, 0, n(5), P, no(0, None, &[(0, 2, 2)])),
                at(0, 0, n(2), A, ok(&[(0, 2, 0)])),
                at(0, 0, n(1), P, no(0, Some(61_000), &[(2, 2, 0)])),
                at(0, 0, Cost::ZERO, P, ok(&[(2, 2, 0)])),
                at(61_000, 0, n(1), P, ok(&[(0, 2, 2)])),
            ],
        },
        Scenario {
            name: "all or nothing across limits",
            tiers: vec![
                vec![lim("10/1m"), lim("2/1h")],
                vec![lim("1/30s"), lim("5/2h")],
                vec![lim("1/30s"), lim("1/2h")],
            ],
            steps: vec![
                at(0, 0, n(1), A, ok(&[(0, 10, 9), (0, 2, 1)])),
                at(0, 0, n(1), A, ok(&[(1, 10, 8), (1, 2, 0)])),
                // The hourly limit refuses (its sub-windows are 60 s)...
                at(
                    0,
                    0,
                    n(1),
                    A,
                    no(1, Some(61 * 60_000), &[(2, 10, 8), (2, 2, 0)]),
                ),
                // ...and the per-minute one was not charged for it.
                at(
                    1_000,
                    0,
                    n(1),
                    A,
                    no(1, Some(61 * 60_000 - 1_000), &[(2, 10, 8), (2, 2, 0)]),
                ),
                // The other way round, on other counters (1/30s has 500 ms sub-windows).
                at(2_000, 1, n(1), A, ok(&[(0, 1, 0), (0, 5, 4)])),
                at(
                    2_000,
                    1,
                    n(1),
                    A,
                    no(0, Some(30_500), &[(1, 1, 0), (1, 5, 4)]),
                ),
                at(32_500, 1, n(1), A, ok(&[(0, 1, 0), (1, 5, 3)])),
                // Both refuse: the first is reported.
                at(
                    32_500,
                    2,
                    n(1),
                    A,
                    no(0, Some(30_500), &[(1, 1, 0), (2, 1, 0)]),
                ),
            ],
        },
        Scenario {
            name: "units are counted separately",
            tiers: vec![vec![
                lim("2/1h"),
                lim("5/1h").with_unit(Unit::Recipients),
                lim("1000/1h").with_unit(Unit::Bytes),
            ]],
            steps: vec![
                at(
                    0,
                    0,
                    Cost::message(3, 400),
                    A,
                    ok(&[(0, 2, 1), (0, 5, 2), (0, 1000, 600)]),
                ),
                at(
                    0,
                    0,
                    Cost::message(3, 100),
                    A,
                    no(
                        1,
                        Some(61 * 60_000),
                        &[(1, 2, 1), (3, 5, 2), (400, 1000, 600)],
                    ),
                ),
                at(
                    0,
                    0,
                    Cost::message(2, 700),
                    A,
                    no(
                        2,
                        Some(61 * 60_000),
                        &[(1, 2, 1), (3, 5, 2), (400, 1000, 600)],
                    ),
                ),
                at(
                    0,
                    0,
                    Cost::message(2, 600),
                    A,
                    ok(&[(1, 2, 0), (3, 5, 0), (400, 1000, 0)]),
                ),
                at(
                    0,
                    0,
                    Cost::ZERO,
                    A,
                    ok(&[(2, 2, 0), (5, 5, 0), (1000, 1000, 0)]),
                ),
                at(
                    0,
                    0,
                    bytes(u64::MAX),
                    P,
                    no(2, None, &[(2, 2, 0), (5, 5, 0), (1000, 1000, 0)]),
                ),
            ],
        },
        Scenario {
            name: "limits sharing a counter are charged once",
            tiers: vec![vec![lim("10/1h"), lim("20/1h")], vec![lim("20/1h")]],
            steps: vec![
                at(0, 0, n(3), A, ok(&[(0, 10, 7), (0, 20, 17)])),
                at(0, 0, n(3), A, ok(&[(3, 10, 4), (3, 20, 14)])),
                at(
                    0,
                    0,
                    n(5),
                    A,
                    no(0, Some(61 * 60_000), &[(6, 10, 4), (6, 20, 14)]),
                ),
                at(0, 1, n(5), A, ok(&[(6, 20, 9)])),
            ],
        },
        Scenario {
            name: "moving between tiers keeps usage",
            tiers: vec![vec![lim("10/1h")], vec![lim("100/1h")]],
            steps: vec![
                at(0, 0, n(8), A, ok(&[(0, 10, 2)])),
                at(1_000, 1, n(1), A, ok(&[(8, 100, 91)])),
                at(
                    2_000,
                    0,
                    n(2),
                    A,
                    no(0, Some(61 * 60_000 - 2_000), &[(9, 10, 1)]),
                ),
                at(2_000, 0, n(1), A, ok(&[(9, 10, 0)])),
            ],
        },
        Scenario {
            name: "window retry_after waits for enough sub-windows to leave",
            tiers: vec![vec![lim("4/1m")]],
            steps: vec![
                at(0, 0, n(1), A, ok(&[(0, 4, 3)])),
                at(10_000, 0, n(2), A, ok(&[(1, 4, 1)])),
                at(20_000, 0, n(1), A, ok(&[(3, 4, 0)])),
                // Needs 2: sub-windows 0 and 10 must both leave (at 71 s).
                at(30_000, 0, n(2), A, no(0, Some(41_000), &[(4, 4, 0)])),
                // Needs 1: sub-window 0 leaving (at 61 s) is enough.
                at(30_000, 0, n(1), P, no(0, Some(31_000), &[(4, 4, 0)])),
                at(61_000, 0, n(1), A, ok(&[(3, 4, 0)])),
            ],
        },
        Scenario {
            name: "token bucket retry_after is exact",
            tiers: vec![vec![b10], vec![bucket(20, 60_000, 5)]],
            steps: vec![
                at(0, 0, n(1), A, ok(&[(0, 3, 2)])),
                at(0, 0, n(1), A, ok(&[(1, 3, 1)])),
                at(0, 0, n(1), A, ok(&[(2, 3, 0)])),
                // One unit drains every 6 s.
                at(0, 0, n(1), A, no(0, Some(6_000), &[(3, 3, 0)])),
                at(5_999, 0, n(1), A, no(0, Some(1), &[(3, 3, 0)])),
                at(6_000, 0, n(1), A, ok(&[(2, 3, 0)])),
                at(6_000, 0, n(4), A, no(0, None, &[(3, 3, 0)])),
                // 2.5 units left: used rounds up, remaining down.
                at(9_000, 0, n(1), P, no(0, Some(3_000), &[(3, 3, 0)])),
                // A tier with a bigger bucket on the same counter (draining 20 a
                // minute, so the level is 120,000 now) may fill it past the small
                // tier's burst...
                at(9_000, 1, n(2), A, ok(&[(2, 5, 1)])),
                // ...and then even a zero cost waits in the small tier until the
                // level is back under its burst.
                at(9_000, 0, Cost::ZERO, P, no(0, Some(6_000), &[(4, 3, 0)])),
                at(15_000, 0, Cost::ZERO, P, ok(&[(3, 3, 0)])),
                at(39_000, 0, Cost::ZERO, P, ok(&[(0, 3, 3)])),
            ],
        },
        Scenario {
            name: "a bucket is idle only once fully drained, to the millisecond",
            // 3 per 10 ms: one unit (10 unit*ms) drains in 3 1/3 ms.
            tiers: vec![vec![bucket(3, 10, 2)]],
            steps: vec![
                at(0, 0, n(1), A, ok(&[(0, 2, 1)])),
                at(3, 0, Cost::ZERO, P, ok(&[(1, 2, 1)])),
                at(3, 0, n(2), P, no(0, Some(1), &[(1, 2, 1)])),
                at(4, 0, Cost::ZERO, P, ok(&[(0, 2, 2)])),
            ],
        },
        Scenario {
            name: "a clock stepping back loses nothing",
            tiers: vec![vec![lim("2/1m")], vec![b10]],
            steps: vec![
                at(30_000, 0, n(1), A, ok(&[(0, 2, 1)])),
                // 20 s back: the event in the "future" sub-window still counts, and the
                // new one is added to it.
                at(10_000, 0, n(1), A, ok(&[(1, 2, 0)])),
                at(10_000, 0, n(1), A, no(0, Some(81_000), &[(2, 2, 0)])),
                at(90_999, 0, n(1), A, no(0, Some(1), &[(2, 2, 0)])),
                at(91_000, 0, n(1), A, ok(&[(0, 2, 1)])),
                // A bucket does not drain while the clock is behind its last event.
                at(100_000, 1, n(3), A, ok(&[(0, 3, 0)])),
                at(95_000, 1, n(1), A, no(0, Some(6_000), &[(3, 3, 0)])),
                at(106_000, 1, n(1), A, ok(&[(2, 3, 0)])),
            ],
        },
        Scenario {
            name: "bucket levels beyond 2^53 are exact",
            // Level in unit*ms up to about 2^64: one unit is 2^40 ms.
            tiers: vec![vec![big_bytes], vec![lim("5/1m").with_unit(Unit::Bytes)]],
            steps: vec![
                at(0, 0, bytes(BURST - 1), A, ok(&[(0, BURST, 1)])),
                at(
                    0,
                    0,
                    bytes(2),
                    A,
                    no(0, Some(BIG), &[(BURST - 1, BURST, 1)]),
                ),
                at(1, 0, bytes(1), A, ok(&[(BURST - 1, BURST, 0)])),
                at(
                    2,
                    0,
                    bytes(1),
                    A,
                    no(0, Some(BIG - 2), &[(BURST, BURST, 0)]),
                ),
                at(2, 0, bytes(u64::MAX), P, no(0, None, &[(BURST, BURST, 0)])),
                at(2, 1, bytes(u64::MAX), A, no(0, None, &[(0, 5, 5)])),
                at(2, 1, bytes(5), A, ok(&[(0, 5, 0)])),
            ],
        },
        Scenario {
            name: "buckets either side of 2^52 and 2^53 share a counter exactly",
            // Three bursts on one counter (1 byte per 2^30 ms, so the level drains 1
            // per ms): capacities 2^52 (the Redis script's double path), 2^52 + 2^30
            // and 2^54 (its big-integer path).
            tiers: vec![
                vec![bucket(1, W30, 1 << 22).with_unit(Unit::Bytes)],
                vec![bucket(1, W30, (1 << 22) + 1).with_unit(Unit::Bytes)],
                vec![bucket(1, W30, 1 << 24).with_unit(Unit::Bytes)],
            ],
            steps: vec![
                // Filled to exactly 2^52.
                at(0, 0, bytes(1 << 22), A, ok(&[(0, 1 << 22, 0)])),
                at(
                    1,
                    0,
                    bytes(1),
                    A,
                    no(0, Some(W30 - 1), &[(1 << 22, 1 << 22, 0)]),
                ),
                // The bigger tier takes the level to 2^52 + 2^30 - 1...
                at(1, 1, bytes(1), A, ok(&[(1 << 22, (1 << 22) + 1, 0)])),
                // ...past the small tier's capacity, which even a zero cost waits out.
                at(
                    1,
                    0,
                    Cost::ZERO,
                    P,
                    no(0, Some(W30 - 1), &[((1 << 22) + 1, 1 << 22, 0)]),
                ),
                at(
                    1,
                    2,
                    bytes(3 << 22),
                    A,
                    no(0, Some(W30 - 1), &[((1 << 22) + 1, 1 << 24, (3 << 22) - 1)]),
                ),
                // The level reaches 2^54 - 1...
                at(
                    1,
                    2,
                    bytes((3 << 22) - 1),
                    A,
                    ok(&[((1 << 22) + 1, 1 << 24, 0)]),
                ),
                // ...which the small tier reads exactly: 3 * 2^52 - 2 ms until it is
                // back under 2^52.
                at(
                    2,
                    0,
                    Cost::ZERO,
                    P,
                    no(0, Some(3 * (1 << 52) - 2), &[(1 << 24, 1 << 22, 0)]),
                ),
                at(
                    2,
                    2,
                    bytes(1),
                    P,
                    no(0, Some(W30 - 2), &[(1 << 24, 1 << 24, 0)]),
                ),
            ],
        },
        Scenario {
            name: "an unlimited tier admits anything and records nothing",
            tiers: vec![vec![], vec![lim("1/1h")]],
            steps: vec![
                at(0, 0, n(u64::MAX), A, ok(&[])),
                at(0, 1, n(1), P, ok(&[(0, 1, 1)])),
            ],
        },
        Scenario {
            name: "forget forgets a key",
            tiers: vec![vec![lim("1/1h")]],
            steps: vec![
                Step::Forget(false),
                at(0, 0, n(1), A, ok(&[(0, 1, 0)])),
                at(0, 0, n(1), A, no(0, Some(61 * 60_000), &[(1, 1, 0)])),
                Step::Forget(true),
                Step::Forget(false),
                at(0, 0, n(1), A, ok(&[(0, 1, 0)])),
            ],
        },
    ]
}

/// Runs every scenario against `store`, each on its own key, with times counted from
/// `base` (a whole number of days since the epoch). Panics on the first decision
/// that differs, naming the scenario and step.
fn conformance<S: Store + Forget>(store: &S, base: Timestamp) {
    assert_eq!(
        base.as_millis() % (24 * H),
        0,
        "the base must be a whole day"
    );
    for sc in scenarios() {
        let key = format!("conformance {}", sc.name);
        for (i, step) in sc.steps.iter().enumerate() {
            match step {
                Step::Check {
                    t,
                    tier,
                    cost,
                    mode,
                    expect,
                } => {
                    let now = Timestamp::from_millis(base.as_millis() + t);
                    let got = store
                        .check(&key, &sc.tiers[*tier], *cost, now, *mode)
                        .unwrap_or_else(|e| panic!("{}: step {i}: {e}", sc.name));
                    assert_eq!(
                        got,
                        expect.decision(),
                        "{}: step {i} (t={t}, {mode:?})",
                        sc.name
                    );
                }
                Step::Forget(had) => {
                    let got = store
                        .forget(&key)
                        .unwrap_or_else(|e| panic!("{}: step {i}: {e}", sc.name));
                    assert_eq!(got, *had, "{}: step {i} (forget)", sc.name);
                }
            }
        }
    }
}

#[test]
fn memory_store_conforms() {
    conformance(&MemoryStore::new(), Timestamp::from_millis(BASE));
}

#[cfg(feature = "redis")]
mod redis_store {
    use std::sync::atomic::{AtomicU64, Ordering};

    use proptest::prelude::*;
    use ratelimit_core::store::{RedisStore, RedisStoreConfig, TimeSource};
    use ratelimit_core::{Cost, Limit, MemoryStore, Mode, Store, StoreError, Timestamp, Unit};

    use super::{BASE, bucket, conformance, lim};

    const NEEDS_REDIS: &str = "needs redis-server; scripts/test installs and starts it";

    fn redis_url() -> String {
        std::env::var("RATELIMIT_TEST_REDIS_URL")
            .unwrap_or_else(|_| "redis://127.0.0.1:6379/".into())
    }

    /// A config for `test`, with its own key prefix so tests can run in parallel.
    fn config(test: &str, time: TimeSource) -> RedisStoreConfig {
        let mut c = RedisStoreConfig::new(redis_url());
        c.key_prefix = format!("rltest:{}:{test}:", std::process::id());
        c.time_source = time;
        // Test clocks run far from the server's: keep hashes long after idle_at.
        c.ttl_grace = std::time::Duration::from_secs(3600);
        c
    }

    /// A store that answers, or a panic saying why not (an ignored test that is run
    /// must fail without Redis, never pass silently).
    fn store_from(c: RedisStoreConfig) -> RedisStore {
        let url = c.redacted_url();
        let store = RedisStore::new(c).unwrap();
        if let Err(e) = store.ping() {
            panic!(
                "Redis is not reachable at {url} ({e}). Run the tests through \
                 scripts/with-redis, or point RATELIMIT_TEST_REDIS_URL at a server."
            );
        }
        store
    }

    fn store(test: &str, time: TimeSource) -> RedisStore {
        store_from(config(test, time))
    }

    /// A plain connection for looking at what the store wrote.
    fn inspect() -> redis::Connection {
        redis::Client::open(redis_url())
            .unwrap()
            .get_connection()
            .unwrap()
    }

    #[test]
    #[ignore = "needs redis-server; scripts/test installs and starts it"]
    fn redis_store_conforms() {
        let _ = NEEDS_REDIS;
        conformance(
            &store("conformance", TimeSource::Caller),
            Timestamp::from_millis(BASE),
        );
    }

    /// A server that refuses functions (before Redis 7, or an ACL user without
    /// `FCALL` and `FUNCTION`) gets the same code as a script, and it decides the same.
    #[test]
    #[ignore = "needs redis-server; scripts/test installs and starts it"]
    fn where_functions_are_refused_the_script_conforms() {
        let _ = NEEDS_REDIS;
        let user = format!("rl-no-functions-{}", std::process::id());
        let _: () = redis::cmd("ACL")
            .arg("SETUSER")
            .arg(&user)
            .arg("reset")
            .arg("on")
            .arg(">secret")
            .arg("~*")
            .arg("+@all")
            .arg("-fcall")
            .arg("-function")
            .query(&mut inspect())
            .unwrap();
        let base = redis_url();
        let mut c = config("no-functions", TimeSource::Caller);
        c.url = base.replacen("redis://", &format!("redis://{user}:secret@"), 1);
        let store = store_from(c);
        // The user really cannot call functions: every decision below is a script's.
        let mut con = redis::Client::open(store.config().url.as_str())
            .unwrap()
            .get_connection()
            .unwrap();
        let refused = redis::cmd("FCALL")
            .arg("anything")
            .arg(0)
            .query::<redis::Value>(&mut con)
            .unwrap_err();
        assert_eq!(refused.code(), Some("NOPERM"), "{refused}");
        conformance(&store, Timestamp::from_millis(BASE));
        let limits = [lim("2/1h")];
        let t = Timestamp::from_millis(BASE);
        let acquire = || store.check("carol", &limits, Cost::units(1), t, Mode::Acquire);
        assert_eq!(acquire().unwrap().statuses()[0].used, 0);
        // A lost script cache: the next call sends the script's text (EVAL).
        redis::cmd("SCRIPT")
            .arg("FLUSH")
            .query::<()>(&mut inspect())
            .unwrap();
        assert_eq!(acquire().unwrap().statuses()[0].used, 1);
        assert!(!acquire().unwrap().is_allowed());
        let _: i64 = redis::cmd("ACL")
            .arg("DELUSER")
            .arg(&user)
            .query(&mut inspect())
            .unwrap();
    }

    #[test]
    #[ignore = "needs redis-server; scripts/test installs and starts it"]
    fn redis_store_lays_out_one_hash_per_key_with_a_ttl_and_writes_nothing_on_peek_or_refusal() {
        let store = store("layout", TimeSource::Caller);
        let mut con = inspect();
        let limits = [lim("2/1m"), bucket(10, 60_000, 3)];
        let t = Timestamp::from_millis(BASE);
        let name = store.key_name("u{1}@example.com");
        assert_eq!(
            name,
            format!(
                "rltest:{}:layout:{{u%7B1%7D@example.com}}",
                std::process::id()
            )
        );

        let _ = store
            .check("u{1}@example.com", &limits, Cost::units(1), t, Mode::Peek)
            .unwrap();
        let exists: bool = redis::cmd("EXISTS").arg(&name).query(&mut con).unwrap();
        assert!(!exists, "a peek created the key");

        let _ = store
            .check(
                "u{1}@example.com",
                &limits,
                Cost::units(2),
                t,
                Mode::Acquire,
            )
            .unwrap();
        let mut fields: Vec<(String, String)> =
            redis::cmd("HGETALL").arg(&name).query(&mut con).unwrap();
        fields.sort();
        let window_id = limits[0].counter_id().as_u64().to_string();
        let bucket_id = limits[1].counter_id().as_u64().to_string();
        // Sub-window BASE/1000 mod 2^32 holds 2; the bucket holds 2 units (2 * 60,000
        // unit*ms) as of BASE; idle when the bucket has drained (12 s), but the window
        // lasts 61 s.
        let mut want = vec![
            (window_id, format!("{}:2", (BASE / 1000) % (1 << 32))),
            (bucket_id, format!("120000:{BASE}")),
            ("i".to_string(), (BASE + 61_000).to_string()),
        ];
        want.sort();
        assert_eq!(fields, want);
        let ttl: i64 = redis::cmd("PTTL").arg(&name).query(&mut con).unwrap();
        assert!(
            (3_600_000 + 60_000..=3_600_000 + 61_000).contains(&ttl),
            "ttl {ttl}"
        );

        // A refusal and a peek leave everything as it was, TTL included.
        redis::cmd("PEXPIRE")
            .arg(&name)
            .arg(5_000_000)
            .query::<()>(&mut con)
            .unwrap();
        let d = store
            .check(
                "u{1}@example.com",
                &limits,
                Cost::units(1),
                t,
                Mode::Acquire,
            )
            .unwrap();
        assert!(!d.is_allowed());
        let _ = store
            .check("u{1}@example.com", &limits, Cost::units(0), t, Mode::Peek)
            .unwrap();
        let mut after: Vec<(String, String)> =
            redis::cmd("HGETALL").arg(&name).query(&mut con).unwrap();
        after.sort();
        assert_eq!(after, want);
        let ttl: i64 = redis::cmd("PTTL").arg(&name).query(&mut con).unwrap();
        assert!(ttl > 4_000_000, "ttl {ttl} was refreshed");
    }

    #[test]
    #[ignore = "needs redis-server; scripts/test installs and starts it"]
    fn server_time_decides_on_the_redis_clock() {
        let store = store("server-time", TimeSource::Server);
        let limits = [lim("3/1h")];
        // The caller's clock is ignored: decades off, and going backwards.
        for (i, now) in [0, u64::MAX, 5].into_iter().enumerate() {
            let d = store
                .check(
                    "alice",
                    &limits,
                    Cost::units(1),
                    Timestamp::from_millis(now),
                    Mode::Acquire,
                )
                .unwrap();
            assert_eq!(d.statuses()[0].used, i as u64);
            assert!(d.is_allowed());
        }
        let d = store
            .check(
                "alice",
                &limits,
                Cost::units(1),
                Timestamp::EPOCH,
                Mode::Acquire,
            )
            .unwrap();
        let retry = d.denial().unwrap().retry_after.unwrap();
        // Sub-windows are 60 s: the first event leaves between 60 and 61 minutes on.
        assert!(
            retry > std::time::Duration::from_secs(3600)
                && retry <= std::time::Duration::from_secs(3660),
            "{retry:?}"
        );
        // The TTL follows the server's clock: idle_at - now + grace.
        let ttl: i64 = redis::cmd("PTTL")
            .arg(store.key_name("alice"))
            .query(&mut inspect())
            .unwrap();
        assert!(
            (3_600_000 + 3_600_000..=3_600_000 + 3_660_000).contains(&ttl),
            "ttl {ttl}"
        );
    }

    #[test]
    #[ignore = "needs redis-server; scripts/test installs and starts it"]
    fn the_store_recovers_from_a_lost_script_cache_and_killed_connections() {
        // This store alone uses database 9, so its connections can be told apart
        // from other tests' in CLIENT LIST.
        let base = redis_url();
        let root = base
            .trim_end_matches(|c: char| c.is_ascii_digit())
            .trim_end_matches('/');
        let mut c = config("recover", TimeSource::Caller);
        c.url = format!("{root}/9");
        let store = store_from(c);
        let limits = [lim("100/1h")];
        let t = Timestamp::from_millis(BASE);
        let acquire = || store.check("bob", &limits, Cost::units(1), t, Mode::Acquire);
        assert_eq!(acquire().unwrap().statuses()[0].used, 0);
        let mut con = inspect();
        // What a Redis restart without persistence does to the functions and the
        // script cache: the library is loaded again.
        let libraries = |con: &mut redis::Connection| -> String {
            let list: redis::Value = redis::cmd("FUNCTION").arg("LIST").query(con).unwrap();
            format!("{list:?}")
        };
        assert!(libraries(&mut con).contains("ratelimit_"));
        redis::cmd("FUNCTION")
            .arg("FLUSH")
            .query::<()>(&mut con)
            .unwrap();
        redis::cmd("SCRIPT")
            .arg("FLUSH")
            .query::<()>(&mut con)
            .unwrap();
        // (Other tests share this server and may load it first; the restart test
        // below has a server of its own, which starts without it.)
        assert_eq!(acquire().unwrap().statuses()[0].used, 1);
        assert!(libraries(&mut con).contains("ratelimit_"));
        // What a restart does to connections: they are closed under the store.
        let list: String = redis::cmd("CLIENT").arg("LIST").query(&mut con).unwrap();
        let ours: Vec<&str> = list
            .lines()
            .filter(|l| l.contains(" db=9 "))
            .filter_map(|l| l.strip_prefix("id=")?.split(' ').next())
            .collect();
        assert!(!ours.is_empty(), "{list}");
        for id in ours {
            redis::cmd("CLIENT")
                .arg("KILL")
                .arg("ID")
                .arg(id)
                .query::<i64>(&mut con)
                .unwrap();
        }
        assert_eq!(acquire().unwrap().statuses()[0].used, 2);
        assert_eq!(acquire().unwrap().statuses()[0].used, 3);
    }

    /// The test's configuration for a private redis-server on a loopback port
    /// nothing listens on yet (see `OwnServer`), and that port.
    fn own_server_config(test: &str, time: TimeSource) -> (RedisStoreConfig, u16) {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut c = config(test, time);
        c.url = format!("redis://127.0.0.1:{port}/");
        (c, port)
    }

    /// A private redis-server for tests that stop and restart it; killed on drop.
    struct OwnServer {
        child: std::process::Child,
    }

    impl OwnServer {
        fn start(port: u16) -> OwnServer {
            let bin = std::env::var("REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
            let child = std::process::Command::new(&bin)
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no", "--dir", "/tmp"])
                .stdout(std::process::Stdio::null())
                .spawn()
                .unwrap_or_else(|e| {
                    panic!("cannot start {bin} (apt-get install redis-server): {e}")
                });
            OwnServer { child }
        }
    }

    impl Drop for OwnServer {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    fn wait_until_up(store: &RedisStore) {
        for _ in 0..100 {
            if store.ping().is_ok() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        store
            .ping()
            .expect("the test's own redis-server did not come up");
    }

    #[test]
    #[ignore = "needs redis-server; scripts/test installs and starts it"]
    fn the_store_reconnects_after_redis_restarts() {
        let (mut c, port) = own_server_config("restart", TimeSource::Caller);
        c.connect_timeout = std::time::Duration::from_millis(300);
        let store = RedisStore::new(c).unwrap();
        let limits = [lim("100/1h")];
        let t = Timestamp::from_millis(BASE);
        let acquire = || store.check("carol", &limits, Cost::units(1), t, Mode::Acquire);

        let server = OwnServer::start(port);
        wait_until_up(&store);
        assert_eq!(acquire().unwrap().statuses()[0].used, 0);
        assert_eq!(acquire().unwrap().statuses()[0].used, 1);

        drop(server); // killed: the pooled connection is dead, nothing listens
        let err = acquire().unwrap_err();
        assert!(matches!(err, StoreError::Unavailable(_)), "{err}");

        let _server = OwnServer::start(port);
        wait_until_up(&store);
        // A new server (no persistence): counters and the functions are gone, and
        // the store reconnects and loads its library by itself.
        assert_eq!(acquire().unwrap().statuses()[0].used, 0);
        assert_eq!(acquire().unwrap().statuses()[0].used, 1);
    }

    /// A Redis out of memory (`maxmemory` reached, `noeviction`) refuses writes: an
    /// acquire fails, but a peek (RCPT, DATA) is still decided, as it was when the
    /// code was a script: peeks call the library's `no-writes` function.
    #[test]
    #[ignore = "needs redis-server; scripts/test installs and starts it"]
    fn out_of_memory_refuses_acquires_but_still_answers_peeks() {
        let (c, port) = own_server_config("oom", TimeSource::Server);
        let store = RedisStore::new(c).unwrap();
        let _server = OwnServer::start(port);
        wait_until_up(&store);
        let limits = [lim("3/1h")];
        let t = Timestamp::from_millis(BASE);
        let check = |mode| store.check("dave", &limits, Cost::units(1), t, mode);
        assert_eq!(check(Mode::Acquire).unwrap().statuses()[0].used, 0);
        let mut con = redis::Client::open(format!("redis://127.0.0.1:{port}/"))
            .unwrap()
            .get_connection()
            .unwrap();
        for (k, v) in [("maxmemory-policy", "noeviction"), ("maxmemory", "1")] {
            let _: () = redis::cmd("CONFIG")
                .arg("SET")
                .arg(k)
                .arg(v)
                .query(&mut con)
                .unwrap();
        }
        let peek = check(Mode::Peek).unwrap();
        assert_eq!(peek.statuses()[0].used, 1);
        assert!(peek.is_allowed());
        let err = check(Mode::Acquire).unwrap_err();
        assert!(err.to_string().contains("OOM"), "{err}");
        // Memory back: acquires are decided again, and nothing was charged meanwhile.
        let _: () = redis::cmd("CONFIG")
            .arg("SET")
            .arg("maxmemory")
            .arg("0")
            .query(&mut con)
            .unwrap();
        assert_eq!(check(Mode::Acquire).unwrap().statuses()[0].used, 1);
    }

    #[test]
    #[ignore = "needs redis-server; scripts/test installs and starts it"]
    fn wrong_credentials_are_reported_as_unavailable_without_the_password() {
        let url = redis_url().replacen("redis://", "redis://nobody:hunter2@", 1);
        let mut c = config("auth", TimeSource::Caller);
        c.url = url;
        let store = RedisStore::new(c).unwrap();
        let err = store.ping().unwrap_err();
        assert!(matches!(err, StoreError::Unavailable(_)), "{err}");
        assert!(!err.to_string().contains("hunter2"), "{err}");
    }

    #[test]
    #[ignore = "needs redis-server; scripts/test installs and starts it"]
    fn scan_reads_back_the_same_states_as_the_memory_store() {
        use ratelimit_core::store::Scan;
        use std::collections::BTreeMap;

        let redis = store("scan", TimeSource::Caller);
        let memory = MemoryStore::new();
        let tiers = tiers();
        let keys = ["alice@example.com", "odd {key} 100%", "ünï@例え.jp"];
        for step in 0..40u64 {
            let now = Timestamp::from_millis(BASE + step * 700);
            let key = keys[(step % 3) as usize];
            let limits = &tiers[(step % tiers.len() as u64) as usize];
            let cost = Cost::message(step % 4, step * 1000);
            let a = memory.check(key, limits, cost, now, Mode::Acquire).unwrap();
            let b = redis.check(key, limits, cost, now, Mode::Acquire).unwrap();
            assert_eq!(a, b);
        }
        let now = Timestamp::from_millis(BASE + 40 * 700);
        // Per key: (counters, idle, used by every limit of every tier).
        let summary = |store: &dyn Scan| {
            let mut out = BTreeMap::new();
            store
                .scan(&mut |key, state| {
                    let used: Vec<u64> =
                        tiers.iter().flatten().map(|l| state.used(l, now)).collect();
                    out.insert(
                        key.to_string(),
                        (state.counter_count(), state.is_idle(now), used),
                    );
                })
                .unwrap();
            out
        };
        let want = summary(&memory);
        assert_eq!(want.len(), 3);
        assert_eq!(summary(&redis), want);
        assert_eq!(redis.try_key_count().unwrap(), 3);
    }

    #[test]
    #[ignore = "needs redis-server; scripts/test installs and starts it"]
    fn concurrent_callers_together_never_exceed_a_limit() {
        let store = store("concurrent", TimeSource::Server);
        let limits = [lim("100/1h"), bucket(1, 3_600_000, 120)];
        let admitted = AtomicU64::new(0);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..60 {
                        let d = store
                            .check(
                                "shared",
                                &limits,
                                Cost::units(1),
                                Timestamp::EPOCH,
                                Mode::Acquire,
                            )
                            .unwrap();
                        if d.is_allowed() {
                            admitted.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        assert_eq!(admitted.load(Ordering::Relaxed), 100);
    }

    // --- Memory and Redis decide alike on random histories --------------------------

    /// Tiers mixing both algorithms, shared counters, odd windows, and bucket levels
    /// far beyond 2^53.
    fn tiers() -> Vec<Vec<Limit>> {
        vec![
            vec![lim("3/10s"), bucket(2, 5_000, 3)],
            vec![lim("5/10s"), lim("4/1m").with_unit(Unit::Recipients)],
            vec![bucket(4, 5_000, 2), lim("2/3s").with_precision(3).unwrap()],
            vec![],
            vec![
                bucket(1, 1 << 40, (1 << 24) - 1).with_unit(Unit::Bytes),
                lim("1000000/1m").with_unit(Unit::Bytes),
            ],
            vec![bucket(u64::from(u32::MAX), 7, 5), lim("1/7ms")],
            // Drains 3 per 10 ms: idle_at has a fractional part to round up.
            vec![bucket(3, 10, 2)],
            vec![
                lim("5/10s"),
                lim("5/10s"),
                bucket(3, 2_000, 1).with_unit(Unit::Recipients),
            ],
            // One sliding window: the script's shortcut. Each shares its counter
            // with a limit of a tier above, so one hash is written by both paths.
            vec![lim("3/10s")],
            vec![lim("4/1m").with_unit(Unit::Recipients)],
            vec![lim("2/3s").with_precision(3).unwrap()],
            vec![lim("1/7ms")],
        ]
    }

    #[derive(Debug, Clone)]
    struct Op {
        dt: i64,
        key: u8,
        tier: usize,
        cost: Cost,
        acquire: bool,
    }

    fn op() -> impl Strategy<Value = Op> {
        let dt = prop_oneof![
            // Tiny steps land exactly on sub-window and idle_at boundaries.
            3 => 0i64..=4,
            6 => 0i64..=1_000,
            2 => 0i64..=20_000,
            1 => -15_000i64..0,
            1 => 50_000i64..=200_000,
        ];
        let bytes = prop_oneof![
            4 => 0u64..2_000,
            1 => 1u64 << 20..1 << 30,
            1 => (1u64 << 40)..u64::MAX,
            1 => Just(u64::MAX),
        ];
        (
            dt,
            0u8..3,
            0..tiers().len(),
            0u64..=3,
            0u64..=5,
            bytes,
            prop::bool::weighted(0.8),
        )
            .prop_map(|(dt, key, tier, messages, recipients, bytes, acquire)| Op {
                dt,
                key,
                tier,
                cost: Cost {
                    messages,
                    recipients,
                    bytes,
                },
                acquire,
            })
    }

    #[test]
    #[ignore = "needs redis-server; scripts/test installs and starts it"]
    fn redis_store_decides_exactly_as_the_memory_store() {
        let redis = store("proptest", TimeSource::Caller);
        let tiers = tiers();
        let case = AtomicU64::new(0);
        let config = ProptestConfig {
            cases: 512,
            ..ProptestConfig::default()
        };
        proptest!(config, |(ops in prop::collection::vec(op(), 1..60))| {
            let memory = MemoryStore::new();
            let case = case.fetch_add(1, Ordering::Relaxed);
            let mut t = BASE as i64;
            for (i, op) in ops.iter().enumerate() {
                t = (t + op.dt).max(BASE as i64);
                let now = Timestamp::from_millis(t as u64);
                let key = format!("case{case}-key{}", op.key);
                let mode = if op.acquire { Mode::Acquire } else { Mode::Peek };
                let limits = &tiers[op.tier];
                let want = memory.check(&key, limits, op.cost, now, mode).unwrap();
                let got = redis.check(&key, limits, op.cost, now, mode).unwrap();
                prop_assert_eq!(got, want, "step {} ({:?}) at base+{}", i, op, t as u64 - BASE);
            }
        });
    }

    // --- The same around 2^53, where the script changes arithmetic -----------------

    /// Buckets whose capacity, level or drain sits either side of 2^52 and 2^53 (the
    /// script decides in doubles below, in big integers above): three capacities on
    /// one counter (just under 2^52, just past it, about 2^54) so that levels cross
    /// 2^53 both ways, a drain of about 2^32 per ms whose elapsed x rate passes 2^53,
    /// and a window beside. Odd windows and rates make levels odd, so a level past
    /// 2^53 held in a double would lose its last bit.
    fn tiers_2_53() -> Vec<Vec<Limit>> {
        let b = |n: u64, w: u64, burst: u64| bucket(n, w, burst).with_unit(Unit::Bytes);
        let (n, w) = ((1 << 20) + 1, (1 << 30) - 1);
        let small = b(n, w, 1 << 22);
        let past = b(n, w, (1 << 22) + 1);
        let huge = b(n, w, 1 << 24);
        vec![
            vec![small],
            vec![past],
            vec![huge],
            vec![small, huge],
            vec![huge, lim("3/10s"), small],
            vec![b(u64::from(u32::MAX), (1 << 21) - 1, 1 << 31)],
            vec![lim("3/10s"), small, bucket(2, 5_000, 3)],
            // 1 ms sub-windows kept live by the bucket across 2^31 of them, where
            // sub-window numbers wrap (mod 2^32) and an old slot reads as future.
            vec![lim("3/7ms"), huge],
            // The same windows alone (the script's one-window shortcut), on hashes
            // whose idle_at the buckets above pushed past 2^53.
            vec![lim("3/7ms")],
            vec![lim("3/10s")],
        ]
    }

    fn op_2_53() -> impl Strategy<Value = Op> {
        let dt = prop_oneof![
            3 => 0i64..=4,
            3 => 0i64..=3_000_000,
            // Long enough to drain 2^52 (and 2^53) at 2^20 per ms.
            2 => (1i64 << 30)..(1i64 << 34),
            1 => ((1i64 << 31) - 8)..((1i64 << 31) + 8),
            1 => -15_000i64..0,
        ];
        // Around one and two capacities' worth of each bucket, and the extremes.
        let bytes = prop_oneof![
            2 => 0u64..4,
            2 => ((1u64 << 22) - 2)..((1u64 << 22) + 2),
            2 => ((1u64 << 23) - 2)..((1u64 << 23) + 2),
            1 => ((3u64 << 22) - 2)..((3u64 << 22) + 2),
            1 => ((1u64 << 31) - 2)..((1u64 << 31) + 2),
            1 => 0u64..(1 << 24),
            1 => Just(u64::MAX),
        ];
        (
            dt,
            0u8..2,
            0..tiers_2_53().len(),
            0u64..=3,
            bytes,
            prop::bool::weighted(0.8),
        )
            .prop_map(|(dt, key, tier, messages, bytes, acquire)| Op {
                dt,
                key,
                tier,
                cost: Cost {
                    messages,
                    recipients: 0,
                    bytes,
                },
                acquire,
            })
    }

    #[test]
    #[ignore = "needs redis-server; scripts/test installs and starts it"]
    fn redis_store_decides_exactly_as_the_memory_store_around_2_pow_53() {
        let redis = store("proptest-2-53", TimeSource::Caller);
        let tiers = tiers_2_53();
        let case = AtomicU64::new(0);
        let config = ProptestConfig {
            cases: 256,
            ..ProptestConfig::default()
        };
        proptest!(config, |(ops in prop::collection::vec(op_2_53(), 1..60))| {
            let memory = MemoryStore::new();
            let case = case.fetch_add(1, Ordering::Relaxed);
            let mut t = BASE as i64;
            for (i, op) in ops.iter().enumerate() {
                t = (t + op.dt).max(BASE as i64);
                let now = Timestamp::from_millis(t as u64);
                let key = format!("case{case}-key{}", op.key);
                let mode = if op.acquire { Mode::Acquire } else { Mode::Peek };
                let limits = &tiers[op.tier];
                let want = memory.check(&key, limits, op.cost, now, mode).unwrap();
                let got = redis.check(&key, limits, op.cost, now, mode).unwrap();
                prop_assert_eq!(got, want, "step {} ({:?}) at base+{}", i, op, t as u64 - BASE);
            }
        });
    }

    /// Sub-window numbers are kept mod 2^32: a key kept live across 2^31 sub-windows
    /// (here by a bucket) has old slots that read as in the future while a newer one
    /// has expired, so the slots kept are not the newest ones. Rare, but the
    /// script must still do what `KeyState` does.
    #[test]
    #[ignore = "needs redis-server; scripts/test installs and starts it"]
    fn redis_store_reads_wrapped_sub_window_numbers_as_the_memory_store_does() {
        let redis = store("wrap", TimeSource::Caller);
        let memory = MemoryStore::new();
        let limits = [
            lim("3/7ms"),
            bucket((1 << 20) + 1, (1 << 30) - 1, 1 << 24).with_unit(Unit::Bytes),
        ];
        let wrap = 1u64 << 31;
        let steps = [
            (0, 1 << 23, Mode::Acquire),
            (1, 0, Mode::Acquire),
            (6, 0, Mode::Acquire),
            (wrap + 3, 0, Mode::Peek),
            (wrap + 3, 0, Mode::Acquire),
            (wrap + 3, 0, Mode::Acquire),
            (wrap + 4, 0, Mode::Acquire),
            (wrap + 10, 0, Mode::Peek),
            (wrap + 13, 0, Mode::Acquire),
        ];
        let mut refused = 0;
        for (i, (t, bytes, mode)) in steps.into_iter().enumerate() {
            let now = Timestamp::from_millis(BASE + t);
            let cost = Cost::message(0, bytes);
            let cost = Cost {
                messages: 1,
                ..cost
            };
            let want = memory.check("w", &limits, cost, now, mode).unwrap();
            let got = redis.check("w", &limits, cost, now, mode).unwrap();
            assert_eq!(got, want, "step {i} at base+{t}");
            refused += usize::from(!want.is_allowed());
        }
        // The wrapped slot counts: the window fills and refuses.
        assert!(refused > 0);
    }

    /// The TTL ends at idle_at plus the grace; an event that leaves idle_at where it
    /// was (one more in the same sub-window) leaves the TTL too, and one that moves
    /// it sets it again.
    #[test]
    #[ignore = "needs redis-server; scripts/test installs and starts it"]
    fn redis_store_sets_the_ttl_when_idle_at_moves() {
        let store = store("ttl", TimeSource::Caller);
        let mut con = inspect();
        let limits = [lim("10/1m")];
        let name = store.key_name("t");
        let acquire = |t: u64| {
            let d = store
                .check(
                    "t",
                    &limits,
                    Cost::units(1),
                    Timestamp::from_millis(BASE + t),
                    Mode::Acquire,
                )
                .unwrap();
            assert!(d.is_allowed(), "at base+{t}");
        };
        let pttl = |con: &mut redis::Connection| -> i64 {
            redis::cmd("PTTL").arg(&name).query(con).unwrap()
        };
        let idle_at = |con: &mut redis::Connection| -> String {
            redis::cmd("HGET").arg(&name).arg("i").query(con).unwrap()
        };
        // 1 s sub-windows: idle 61 s on; the grace is an hour.
        acquire(0);
        assert_eq!(idle_at(&mut con), (BASE + 61_000).to_string());
        let ttl = pttl(&mut con);
        assert!((3_660_000..=3_661_000).contains(&ttl), "ttl {ttl}");
        redis::cmd("PEXPIRE")
            .arg(&name)
            .arg(5_000_000)
            .query::<()>(&mut con)
            .unwrap();
        acquire(500);
        assert_eq!(idle_at(&mut con), (BASE + 61_000).to_string());
        let ttl = pttl(&mut con);
        assert!(ttl > 4_900_000, "ttl {ttl} was set although idle_at stayed");
        acquire(1_000);
        assert_eq!(idle_at(&mut con), (BASE + 62_000).to_string());
        let ttl = pttl(&mut con);
        assert!((3_660_000..=3_661_000).contains(&ttl), "ttl {ttl}");
    }

    #[test]
    #[ignore = "needs redis-server; scripts/test installs and starts it"]
    fn a_batched_redis_store_conforms() {
        conformance(
            &store_from(config("batched", TimeSource::Caller).with_batching(true)),
            Timestamp::from_millis(BASE),
        );
    }

    #[test]
    #[ignore = "needs redis-server; scripts/test installs and starts it"]
    fn batched_decisions_from_many_threads_admit_exactly_the_limit_on_one_connection() {
        use std::sync::atomic::{AtomicU64, Ordering};
        const THREADS: usize = 16;
        const KEYS: usize = 4;
        let store = store_from(config("batched-threads", TimeSource::Server).with_batching(true));
        let limits = [lim("150/1h"), bucket(10, 3_600_000, 400)];
        let allowed: Vec<AtomicU64> = (0..KEYS).map(|_| AtomicU64::new(0)).collect();
        std::thread::scope(|s| {
            for th in 0..THREADS {
                let (store, limits, allowed) = (&store, &limits, &allowed);
                s.spawn(move || {
                    for i in 0..300 {
                        let k = (i + th) % KEYS;
                        if i == 150 && th == 0 {
                            // The server loses the code mid-run: every call that
                            // found it missing is sent again, none is lost or doubled.
                            redis::cmd("FUNCTION")
                                .arg("FLUSH")
                                .query::<()>(&mut inspect())
                                .unwrap();
                        }
                        let d = store
                            .check(
                                &format!("user{k}"),
                                limits,
                                Cost::message(1, 0),
                                Timestamp::from_millis(BASE),
                                Mode::Acquire,
                            )
                            .unwrap();
                        if d.is_allowed() {
                            allowed[k].fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        for (k, a) in allowed.iter().enumerate() {
            assert_eq!(a.load(Ordering::Relaxed), 150, "user{k}");
        }
        // Sixteen threads shared one batch in flight at a time, so one connection
        // (unbatched, each waiting thread opens its own).
        let idle = format!("{store:?}");
        assert!(
            idle.contains("idle_connections: 1 "),
            "batched calls used more than one connection: {idle}"
        );
    }
}
