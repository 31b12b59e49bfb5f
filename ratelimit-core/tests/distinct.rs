//! Distinct values per key per window (the compromise signal).
//!
//! - [`scenario`]: hand-worked observations, run on every [`DistinctStore`]
//!   (the memory store here; the Redis store in ignored tests that need a server —
//!   `scripts/with-redis` starts one and sets `RATELIMIT_TEST_REDIS_URL`).
//! - A proptest compares [`DistinctState`] (bounded: `max + 1` entries) with an exact,
//!   unbounded model that remembers every value ever seen.
//! - Memory stays bounded for a key observed with a million different values.

use std::collections::HashMap;
use std::time::Duration;

use proptest::prelude::*;
use ratelimit_core::Timestamp;
use ratelimit_core::distinct::{DistinctLimit, DistinctState, DistinctStore, Observation};
use ratelimit_core::store::DistinctMemoryStore;

const BASE: u64 = 1_700_006_400_000;
const MIN: u64 = 60_000;

fn limit(max: u32, window_ms: u64) -> DistinctLimit {
    DistinctLimit::new(max, Duration::from_millis(window_ms)).unwrap()
}

fn at(ms: u64) -> Timestamp {
    Timestamp::from_millis(BASE + ms)
}

/// `(t, key, value, distinct, flagged until, newly flagged)` with times relative to
/// [`BASE`]; worked out by hand for "more than 3 per 60 minutes".
#[allow(clippy::type_complexity)]
const STEPS: &[(u64, &str, &str, u32, Option<u64>, bool)] = &[
    // Two networks: nothing happens.
    (0, "alice", "192.0.2.0/24", 1, None, false),
    (MIN, "alice", "198.51.100.0/24", 2, None, false),
    // The same network again, at RCPT, DATA and END-OF-MESSAGE: counted once.
    (2 * MIN, "alice", "198.51.100.0/24", 2, None, false),
    (2 * MIN, "alice", "198.51.100.0/24", 2, None, false),
    (3 * MIN, "alice", "203.0.113.0/24", 3, None, false),
    // Another user is unaffected by alice.
    (3 * MIN, "bob", "192.0.2.0/24", 1, None, false),
    // The fourth network in the hour raises the flag for an hour.
    (
        4 * MIN,
        "alice",
        "2001:db8:1:2::/64",
        4,
        Some(64 * MIN),
        true,
    ),
    // Flagged, whatever she sends from; still four in the window, so the flag now
    // lasts an hour from here.
    (5 * MIN, "alice", "192.0.2.0/24", 4, Some(65 * MIN), false),
    // A fifth network: the oldest (198.51.100.0, 2 min) is evicted; still four in
    // the window: the flag moves on.
    (10 * MIN, "alice", "100.64.0.0/24", 4, Some(70 * MIN), false),
    // An hour after 10 min, the flag is down; 192.0.2.0 (seen at 5 min) and the
    // others have left the window: only the new one counts.
    (70 * MIN, "alice", "10.0.0.0/24", 1, None, false),
    (71 * MIN, "alice", "10.0.1.0/24", 2, None, false),
    (72 * MIN, "alice", "10.0.2.0/24", 3, None, false),
    (73 * MIN, "alice", "10.0.3.0/24", 4, Some(133 * MIN), true),
    // Bob's first network was seen at 3 min: out of the window by now.
    (74 * MIN, "bob", "198.51.100.0/24", 1, None, false),
];

/// Runs [`STEPS`] on `store` (which must be empty for `alice` and `bob`).
fn scenario(store: &dyn DistinctStore) {
    let l = limit(3, 60 * MIN);
    for (i, &(t, key, value, distinct, until, newly)) in STEPS.iter().enumerate() {
        let got = store.observe(key, value, &l, at(t)).unwrap();
        let want = Observation {
            distinct,
            flagged_until: until.map(at),
            newly_flagged: newly,
        };
        assert_eq!(got, want, "step {i}: {key} from {value} at {t} ms");
    }
    assert!(store.forget("alice").unwrap());
    assert!(!store.forget("alice").unwrap());
    let fresh = store
        .observe("alice", "10.0.4.0/24", &l, at(75 * MIN))
        .unwrap();
    assert_eq!((fresh.distinct, fresh.is_flagged()), (1, false));
}

#[test]
fn the_memory_store_observes_as_worked_out_by_hand() {
    scenario(&DistinctMemoryStore::new(1000));
}

#[test]
fn a_million_addresses_from_one_user_keep_its_state_bounded() {
    let store = DistinctMemoryStore::new(1000);
    let l = limit(5, 60 * MIN);
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    for i in 0..1_000_000u64 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let ip = format!("{}.{}.{}.0/24", x >> 56, (x >> 48) & 255, (x >> 40) & 255);
        let o = store
            .observe("mallory@example.com", &ip, &l, at(i))
            .unwrap();
        if i >= 5 {
            assert!(o.is_flagged(), "{i}");
        }
    }
    assert_eq!(store.key_count(), 1);
    assert_eq!(store.entry_count("mallory@example.com"), 6);
    // Six (hash, last seen) pairs of 16 bytes; the name fits inline.
    assert!(
        store.key_heap_bytes("mallory@example.com") <= 6 * 16,
        "{} bytes",
        store.key_heap_bytes("mallory@example.com")
    );
}

/// The exact answer: every value with its last-seen time, forever.
#[derive(Default)]
struct Model {
    seen: HashMap<u64, u64>,
    flagged_until: u64,
}

impl Model {
    fn observe(&mut self, value: u64, l: &DistinctLimit, now: u64) -> Observation {
        let was = now < self.flagged_until;
        let e = self.seen.entry(value).or_insert(now);
        *e = (*e).max(now);
        let in_window = self
            .seen
            .values()
            .filter(|&&t| t + l.window_ms() > now)
            .count() as u32;
        if in_window > l.max() {
            self.flagged_until = self.flagged_until.max(now + l.window_ms());
        }
        let flagged = now < self.flagged_until;
        Observation {
            // A state keeps max + 1 values: it counts up to there.
            distinct: in_window.min(l.max() + 1),
            flagged_until: flagged.then_some(Timestamp::from_millis(self.flagged_until)),
            newly_flagged: flagged && !was,
        }
    }
}

proptest! {
    #[test]
    fn bounded_state_answers_exactly_as_the_unbounded_model(
        max in 1u32..6,
        window in 1u64..50,
        steps in prop::collection::vec((0u64..20, 0u64..12), 1..200),
    ) {
        let l = limit(max, window);
        let mut state = DistinctState::new();
        let mut model = Model::default();
        let mut now = BASE;
        for (dt, value) in steps {
            now += dt;
            let got = state.observe(value, &l, Timestamp::from_millis(now));
            let want = model.observe(value, &l, now);
            prop_assert_eq!(got, want);
            prop_assert!(state.len() <= l.capacity());
        }
    }
}

#[cfg(feature = "redis")]
mod redis_store {
    use ratelimit_core::store::{RedisStore, RedisStoreConfig, TimeSource};

    use super::*;

    fn store(test: &str) -> RedisStore {
        let url = std::env::var("RATELIMIT_TEST_REDIS_URL")
            .unwrap_or_else(|_| "redis://127.0.0.1:6379/".into());
        let mut c = RedisStoreConfig::new(url);
        c.key_prefix = format!("rltest:{}:{test}:", std::process::id());
        c.time_source = TimeSource::Caller;
        c.ttl_grace = Duration::from_secs(3600);
        let store = RedisStore::new(c).unwrap();
        if let Err(e) = store.ping() {
            panic!(
                "Redis is not reachable ({e}). Run the tests through scripts/with-redis, \
                 or point RATELIMIT_TEST_REDIS_URL at a server."
            );
        }
        store
    }

    fn inspect() -> redis::Connection {
        let url = std::env::var("RATELIMIT_TEST_REDIS_URL")
            .unwrap_or_else(|_| "redis://127.0.0.1:6379/".into());
        redis::Client::open(url).unwrap().get_connection().unwrap()
    }

    #[test]
    #[ignore = "needs redis-server; scripts/test installs and starts it"]
    fn the_redis_store_observes_as_worked_out_by_hand() {
        scenario(&store("distinct-scenario"));
    }

    #[test]
    #[ignore = "needs redis-server; scripts/test installs and starts it"]
    fn redis_and_memory_observe_the_same_random_histories() {
        let redis = store("distinct-random");
        let memory = DistinctMemoryStore::new(1000);
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut now = 0;
        for i in 0..3000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let l = limit((x % 4) as u32 + 1, 40 * MIN);
            now += (x >> 8) % (3 * MIN);
            let key = format!("u{}", (x >> 20) % 3);
            let value = format!("net{}", (x >> 30) % 9);
            let a = memory.observe(&key, &value, &l, at(now)).unwrap();
            let b = redis.observe(&key, &value, &l, at(now)).unwrap();
            assert_eq!(a, b, "step {i}: {key} {value} at {now}");
        }
    }

    #[test]
    #[ignore = "needs redis-server; scripts/test installs and starts it"]
    fn a_spray_of_addresses_keeps_one_small_hash_with_a_ttl() {
        let store = store("distinct-bound");
        let prefix = store.config().key_prefix.clone();
        let l = limit(5, 60 * MIN);
        for i in 0..5000u64 {
            let ip = format!("10.{}.{}.0/24", i / 256, i % 256);
            let o = store.observe("mallory", &ip, &l, at(i)).unwrap();
            assert_eq!(o.is_flagged(), i >= 5, "{i}");
        }
        let mut con = inspect();
        let name = store.distinct_key_name("mallory");
        let fields: i64 = redis::cmd("HLEN").arg(&name).query(&mut con).unwrap();
        assert_eq!(fields, 6 + 1, "six values and the flag");
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{prefix}*"))
            .query(&mut con)
            .unwrap();
        assert_eq!(keys, std::slice::from_ref(&name));
        let ttl: i64 = redis::cmd("PTTL").arg(&name).query(&mut con).unwrap();
        // Flagged until an hour after the last observation, plus the hour of grace.
        assert!(ttl > 0 && ttl <= 2 * 60 * MIN as i64, "{ttl}");
        // Counter listings do not see it.
        assert_eq!(store.try_key_count().unwrap(), 0);
        assert!(store.forget("mallory").unwrap());
    }
}
