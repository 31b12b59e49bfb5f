//! Per-user baselines (the second compromise signal) in every store.
//!
//! - [`scenario`]: a learned user flagged exactly at the threshold, the flag cleared
//!   by `clear_hour` with the history kept, and `forget`; run on the memory store here
//!   and on the Redis store in ignored tests that need a server (`scripts/with-redis`
//!   starts one and sets `RATELIMIT_TEST_REDIS_URL`).
//! - A proptest runs random histories through the memory store and through
//!   [`BaselineState`] directly; the Redis store must agree with the memory store on
//!   random histories too.

use std::time::Duration;

use proptest::prelude::*;
use ratelimit_core::Timestamp;
use ratelimit_core::baseline::{BaselineConfig, BaselineState, BaselineStore};
use ratelimit_core::store::BaselineMemoryStore;

const DAY: u64 = 86_400_000;
const MIN: u64 = 60_000;
/// Midnight UTC, 2023-11-15.
const BASE: u64 = 19_676 * DAY;

fn at(ms: u64) -> Timestamp {
    Timestamp::from_millis(BASE + ms)
}

fn cfg() -> BaselineConfig {
    BaselineConfig::new(Duration::from_secs(7 * 86_400), 5.0, 10, 7).unwrap()
}

fn scenario(store: &dyn BaselineStore) {
    let c = cfg();
    // Looking at a user never seen creates nothing and judges nothing.
    let j = store.observe("alice", 0, &c, at(0)).unwrap();
    assert_eq!((j.hour, j.threshold, j.flagged), (0, None, false));
    assert!(!store.forget("alice").unwrap());
    // Three weeks: 3 messages at 10:00, 1 at 15:00 every day; bob sends 30 at 09:00.
    for d in 0..21 {
        for _ in 0..3 {
            let _ = store
                .observe("alice", 1, &c, at(d * DAY + 600 * MIN))
                .unwrap();
        }
        let _ = store
            .observe("alice", 1, &c, at(d * DAY + 900 * MIN))
            .unwrap();
        let _ = store
            .observe("bob", 30, &c, at(d * DAY + 540 * MIN))
            .unwrap();
    }
    let now = at(21 * DAY + 720 * MIN);
    let j = store.observe("alice", 0, &c, now).unwrap();
    assert_eq!(
        (j.usual, j.threshold, j.flagged),
        (3 * 256, Some(15), false)
    );
    assert_eq!(j.learned_days(), 21);
    let b = store.observe("bob", 0, &c, now).unwrap();
    assert_eq!((b.usual, b.threshold), (30 * 256, Some(150)));
    // Taken over: the 15th message is accepted, the 16th would be flagged.
    for i in 1..=15 {
        let j = store.observe("alice", 1, &c, now).unwrap();
        assert_eq!((j.hour, j.flagged), (i, i == 15), "{i}");
    }
    assert_eq!(
        store.observe("alice", 0, &c, now).unwrap().clears_at,
        Some(BASE + 21 * DAY + 720 * MIN + 70 * MIN)
    );
    // Reset: the flag goes, the history stays.
    assert!(store.clear_hour("alice", &c, now).unwrap());
    let j = store.observe("alice", 0, &c, now).unwrap();
    assert_eq!((j.hour, j.flagged, j.usual), (0, false, 3 * 256));
    assert!(!store.clear_hour("alice", &c, now).unwrap());
    // Forget: history gone, not judged any more.
    assert!(store.forget("alice").unwrap());
    assert_eq!(store.observe("alice", 0, &c, now).unwrap().threshold, None);
    assert!(store.forget("bob").unwrap());
}

#[test]
fn the_memory_store_judges_as_worked_out_by_hand() {
    scenario(&BaselineMemoryStore::new(100));
}

/// One step of a random history: (minutes later, user, accepted, clear the hour).
fn steps() -> impl Strategy<Value = Vec<(u64, usize, u32, bool)>> {
    prop::collection::vec(
        (0u64..600, 0usize..3, 0u32..5, prop::bool::weighted(0.02)),
        1..200,
    )
}

proptest! {
    #[test]
    fn the_memory_store_keeps_what_the_state_computes(steps in steps()) {
        let c = BaselineConfig::new(Duration::from_secs(86_400), 3.0, 4, 2).unwrap();
        let store = BaselineMemoryStore::new(100);
        let mut model = [BaselineState::new(); 3];
        let mut t = 0;
        for (dt, user, accepted, clear) in steps {
            t += dt * MIN;
            let key = format!("u{user}");
            if clear {
                model[user].roll(at(t), &c);
                prop_assert_eq!(store.clear_hour(&key, &c, at(t)).unwrap(), model[user].clear_hour());
                continue;
            }
            model[user].record(at(t), accepted, &c);
            let j = store.observe(&key, accepted, &c, at(t)).unwrap();
            prop_assert_eq!(j, model[user].judge(at(t), &c));
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
        // Generous: these tests check agreement, not speed, and share a loaded
        // machine with the rest of the suite (a 1 s timeout flaked there).
        c.command_timeout = std::time::Duration::from_secs(10);
        let store = RedisStore::new(c).unwrap();
        if let Err(e) = store.ping() {
            panic!(
                "Redis is not reachable ({e}). Run the tests through scripts/with-redis, \
                 or point RATELIMIT_TEST_REDIS_URL at a server."
            );
        }
        store
    }

    #[test]
    #[ignore = "needs redis-server; scripts/test installs and starts it"]
    fn the_redis_store_judges_as_worked_out_by_hand() {
        scenario(&store("baseline-scenario"));
    }

    #[test]
    #[ignore = "needs redis-server; scripts/test installs and starts it"]
    fn redis_and_memory_keep_the_same_baselines_on_random_histories() {
        let redis = store("baseline-random");
        let memory = BaselineMemoryStore::new(1000);
        let c = BaselineConfig::new(Duration::from_secs(86_400), 2.5, 3, 1).unwrap();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut now = 0;
        for i in 0..4000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // Mostly minutes apart, sometimes days (closing days, decaying to nothing).
            now += match x % 50 {
                0 => (x >> 8) % (40 * DAY),
                1..=5 => (x >> 8) % (2 * DAY),
                _ => (x >> 8) % (30 * MIN),
            };
            let key = format!("u{}", (x >> 20) % 4);
            if (x >> 30).is_multiple_of(97) {
                let a = memory.clear_hour(&key, &c, at(now)).unwrap();
                let b = BaselineStore::clear_hour(&redis, &key, &c, at(now)).unwrap();
                assert_eq!(a, b, "step {i}: clear {key}");
                continue;
            }
            let accepted = ((x >> 40) % 7) as u32;
            let a = memory.observe(&key, accepted, &c, at(now)).unwrap();
            let b = BaselineStore::observe(&redis, &key, accepted, &c, at(now)).unwrap();
            assert_eq!(a, b, "step {i}: {key} +{accepted} at {now}");
            let (_, state) = redis.baseline_state(&key, 0, &c, at(now)).unwrap();
            let mut kept = memory.state(&key).unwrap_or_default();
            kept.roll(at(now), &c);
            assert_eq!(state, kept, "step {i}: {key}");
        }
        for u in 0..4 {
            let key = format!("u{u}");
            assert_eq!(
                memory.forget(&key).unwrap(),
                BaselineStore::forget(&redis, &key).unwrap()
            );
        }
    }

    #[test]
    #[ignore = "needs redis-server; scripts/test installs and starts it"]
    fn a_baseline_is_one_small_string_with_a_ttl() {
        let store = store("baseline-bound");
        let c = cfg();
        for i in 0..500u64 {
            let _ = store.observe("mallory", 1, &c, at(i * MIN)).unwrap();
        }
        let url = std::env::var("RATELIMIT_TEST_REDIS_URL")
            .unwrap_or_else(|_| "redis://127.0.0.1:6379/".into());
        let mut con = redis::Client::open(url).unwrap().get_connection().unwrap();
        let name = store.baseline_key_name("mallory");
        let len: i64 = redis::cmd("STRLEN").arg(&name).query(&mut con).unwrap();
        assert_eq!(len, 34);
        let ttl: i64 = redis::cmd("PTTL").arg(&name).query(&mut con).unwrap();
        // 33 × (7 + 2) days plus the default grace.
        assert!(ttl > 297 * DAY as i64 && ttl <= 298 * DAY as i64, "{ttl}");
        assert_eq!(store.try_key_count().unwrap(), 0);
        assert!(BaselineStore::forget(&store, "mallory").unwrap());
    }

    #[test]
    #[ignore = "needs redis-server; scripts/test installs and starts it"]
    fn baselines_imported_into_redis_judge_as_the_memory_store_does() {
        // Day one for a fleet: a history learned elsewhere (replay), saved as a
        // snapshot, decoded, written into Redis.
        let c = cfg();
        let memory = BaselineMemoryStore::new(100);
        for d in 0..10 {
            for (user, n) in [("alice", 2), ("bob", 40)] {
                let _ = memory
                    .observe(user, n, &c, at(d * DAY + 600 * MIN))
                    .unwrap();
            }
        }
        let dir = std::env::temp_dir().join(format!("rl-import-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("learned.baseline");
        memory.save_snapshot(&path, at(10 * DAY)).unwrap();
        let states =
            ratelimit_core::store::decode_baselines(&std::fs::read(&path).unwrap(), &path).unwrap();
        assert_eq!(states.len(), 2);
        let redis = store("import");
        let done = redis.import_baselines(&states, &c, false).unwrap();
        assert_eq!((done.written, done.kept), (2, 0));
        // The same judgement in both stores, now and after another message.
        let now = at(10 * DAY + 720 * MIN);
        for user in ["alice", "bob"] {
            assert_eq!(
                redis.observe(user, 0, &c, now).unwrap(),
                memory.observe(user, 0, &c, now).unwrap(),
                "{user}"
            );
            assert_eq!(
                redis.observe(user, 1, &c, now).unwrap(),
                memory.observe(user, 1, &c, now).unwrap(),
                "{user}"
            );
        }
        // Without replace, what Redis already has stays; with it, it is overwritten.
        let again = redis.import_baselines(&states, &c, false).unwrap();
        assert_eq!((again.written, again.kept), (0, 2));
        let replaced = redis.import_baselines(&states, &c, true).unwrap();
        assert_eq!((replaced.written, replaced.kept), (2, 0));
        assert_eq!(
            redis.observe("alice", 0, &c, now).unwrap().hour,
            0,
            "the replaced state has not seen the message above"
        );
        for user in ["alice", "bob"] {
            redis.forget(user).unwrap();
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
