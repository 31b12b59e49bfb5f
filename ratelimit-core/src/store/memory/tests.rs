//! The memory store's own tests: sharding, the key cap, sweeps, the two forms
//! of a state, and the store held to [`KeyState::apply`] through random
//! histories (which covers [`super::packed::apply`], the packed fast path).

// Many tests record events only to set up a state; the decisions they need, they
// assert. One allow here instead of `let _ =` on each setup line.
#![allow(unused_must_use)]

use super::packed::GENERAL;
use super::table::{Bucket, WAYS};
use super::*;
use crate::store::Evictions;
use proptest::prelude::*;
use std::collections::HashMap;
use std::time::Duration;

const T0: u64 = 1_700_000_000_000;

fn limits() -> [Limit; 1] {
    ["2/1m".parse().unwrap()]
}

fn acquire(s: &MemoryStore, key: &str, t: u64) -> Result<Decision, StoreError> {
    s.check(
        key,
        &limits(),
        Cost::units(1),
        Timestamp::from_millis(T0 + t),
        Mode::Acquire,
    )
}

#[test]
fn shard_count_is_a_power_of_two() {
    let s = MemoryStore::with_config(MemoryStoreConfig {
        shards: 5,
        max_keys: 10,
    });
    assert_eq!(s.shard_count(), 8);
}

#[test]
fn peeks_and_refusals_do_not_create_keys() {
    let s = MemoryStore::new();
    let now = Timestamp::from_millis(T0);
    s.check("a", &limits(), Cost::units(1), now, Mode::Peek)
        .unwrap();
    s.check("b", &limits(), Cost::units(5), now, Mode::Acquire)
        .unwrap();
    assert_eq!(s.key_count(), 0);
    acquire(&s, "a", 0).unwrap();
    assert_eq!(s.key_count(), 1);
}

#[test]
fn sweep_forgets_only_idle_keys() {
    let s = MemoryStore::new();
    acquire(&s, "old", 0).unwrap();
    acquire(&s, "new", 30_000).unwrap();
    assert_eq!(s.sweep(Timestamp::from_millis(T0 + 61_000)), 1);
    assert_eq!(s.key_count(), 1);
    let mut keys = Vec::new();
    s.scan(&mut |k, _| keys.push(k.to_string())).unwrap();
    assert_eq!(keys, ["new"]);
    assert_eq!(acquire(&s, "new", 31_000).unwrap().statuses()[0].used, 1);
}

/// Each shard's prefetch hint names its current table, through the growth
/// to tables mapped on huge pages (2 MiB and more) and a rebuild that
/// shrinks them back, and every key is still found.
#[test]
fn the_prefetch_hint_follows_each_table() {
    let s = MemoryStore::with_config(MemoryStoreConfig {
        shards: 2,
        max_keys: 1_000_000,
    });
    let hints_match = |s: &MemoryStore| {
        for (shard, hint) in s.shards.iter().zip(s.hints.iter()) {
            let shard = shard.lock();
            let base = shard.table.buckets.as_ptr() as usize;
            assert_eq!(hint.base.load(Ordering::Relaxed), base);
            assert_eq!(
                hint.buckets.load(Ordering::Relaxed),
                shard.table.buckets.len()
            );
        }
    };
    let keys = 100_000;
    for i in 0..keys {
        acquire(&s, &format!("user{i}@example.com"), 0).unwrap();
    }
    hints_match(&s);
    let bytes = s.shards[0].lock().table.buckets.len() * std::mem::size_of::<Bucket>();
    assert!(bytes >= huge::HUGE_PAGE, "a shard's table is {bytes} bytes");
    #[cfg(target_os = "linux")]
    assert!(MemoryStore::mapped_bytes() >= bytes);
    for i in 0..keys {
        let d = acquire(&s, &format!("user{i}@example.com"), 1).unwrap();
        assert_eq!(d.statuses()[0].used, 1, "the first message is counted");
    }
    assert_eq!(s.sweep(Timestamp::from_millis(T0 + 61_000)), keys);
    hints_match(&s);
    assert!(s.shards[0].lock().table.buckets.len() < 10);
}

#[test]
fn at_the_cap_a_new_key_evicts_idle_keys_first_then_the_least_recently_used() {
    let s = MemoryStore::with_config(MemoryStoreConfig {
        shards: 1,
        max_keys: 3,
    });
    let keys = |s: &MemoryStore| {
        let mut k = Vec::new();
        s.scan(&mut |key, _| k.push(key.to_string())).unwrap();
        k.sort();
        k
    };
    acquire(&s, "old", 0).unwrap();
    acquire(&s, "a", 30_000).unwrap();
    acquire(&s, "b", 30_000).unwrap();
    // "old" has decayed at 61 s, "a" and "b" have not: "old" goes, for nothing.
    assert!(acquire(&s, "c", 61_000).unwrap().is_allowed());
    assert_eq!(keys(&s), ["a", "b", "c"]);
    assert_eq!(s.evictions(), Evictions { idle: 1, lru: 0 });
    // Nothing is idle: of the keys not used since, the least recently charged
    // goes. "a" was used again (even a peek or a refusal counts), so "b" goes.
    s.check(
        "a",
        &limits(),
        Cost::units(1),
        Timestamp::from_millis(T0 + 62_000),
        Mode::Peek,
    )
    .unwrap();
    assert!(acquire(&s, "d", 62_000).unwrap().is_allowed());
    assert_eq!(keys(&s), ["a", "c", "d"]);
    assert_eq!(s.evictions(), Evictions { idle: 1, lru: 1 });
    // Tracked keys are never refused, and keep what they hold.
    assert_eq!(acquire(&s, "a", 62_000).unwrap().statuses()[0].used, 1);
    assert!(!acquire(&s, "a", 62_000).unwrap().is_allowed());
    assert_eq!(s.key_count(), 3);
}

#[test]
fn when_every_key_the_hand_sees_was_used_a_new_key_is_refused_and_later_ones_get_in() {
    // Enough keys that a hand's 4 passes (128 slots) do not go round the table.
    let s = MemoryStore::with_config(MemoryStoreConfig {
        shards: 1,
        max_keys: 400,
    });
    for i in 0..400 {
        acquire(&s, &format!("u{i}"), 0).unwrap();
    }
    for i in 0..400 {
        acquire(&s, &format!("u{i}"), 0).unwrap();
    }
    let err = acquire(&s, "new0", 0).unwrap_err();
    assert!(matches!(err, StoreError::Full { max_keys: 400 }), "{err}");
    assert_eq!(
        err.to_string(),
        "the store is full: it tracks its maximum of 400 keys"
    );
    // The hand cleared what it went by: within a turn of the table, new keys get in.
    let admitted = (1..=5)
        .filter(|i| acquire(&s, &format!("new{i}"), 0).is_ok())
        .count();
    assert!(admitted >= 1, "{admitted}");
    assert_eq!(s.key_count(), 400);
    // Existing keys are never refused because the table is full.
    for i in 0..400 {
        let _ = s
            .check(
                &format!("u{i}"),
                &limits(),
                Cost::units(1),
                Timestamp::from_millis(T0),
                Mode::Peek,
            )
            .unwrap();
    }
}

#[test]
fn forget_unblocks_a_key() {
    let s = MemoryStore::new();
    acquire(&s, "a", 0).unwrap();
    acquire(&s, "a", 0).unwrap();
    assert!(!acquire(&s, "a", 0).unwrap().is_allowed());
    assert!(s.forget("a").unwrap());
    assert!(!s.forget("a").unwrap());
    assert!(acquire(&s, "a", 0).unwrap().is_allowed());
}

#[test]
fn unlimited_tiers_track_nothing() {
    let s = MemoryStore::new();
    let d = s
        .check(
            "a",
            &[],
            Cost::units(1_000_000),
            Timestamp::from_millis(T0),
            Mode::Acquire,
        )
        .unwrap();
    assert!(d.is_allowed());
    assert_eq!(d.remaining(), u64::MAX);
    assert_eq!(s.key_count(), 0);
}

#[test]
fn a_key_flood_is_given_back_by_a_sweep() {
    let s = MemoryStore::with_config(MemoryStoreConfig {
        shards: 2,
        max_keys: 1_000_000,
    });
    for i in 0..20_000 {
        acquire(&s, &format!("flood{i}@example.com"), 0).unwrap();
    }
    acquire(&s, "stays", 100_000).unwrap();
    assert_eq!(s.sweep(Timestamp::from_millis(T0 + 100_000)), 20_000);
    assert_eq!(s.key_count(), 1);
    for shard in s.shards.iter() {
        let shard = shard.lock();
        assert!(shard.table.slots() <= 2 * WAYS, "the table was shrunk");
    }
    let d = acquire(&s, "stays", 100_001).unwrap();
    assert_eq!(d.statuses()[0].used, 1);
}

/// The state of `key` as the store holds it.
fn state_of(s: &MemoryStore, key: &str) -> Option<KeyState> {
    let mut found = None;
    s.scan(&mut |k, state| {
        if k == key {
            found = Some(state.clone());
        }
    })
    .unwrap();
    found
}

#[test]
fn common_states_are_packed_and_others_kept_whole() {
    let s = MemoryStore::with_config(MemoryStoreConfig {
        shards: 1,
        max_keys: 100,
    });
    let now = |ms| Timestamp::from_millis(T0 + ms);
    let hourly: Limit = "100/1h".parse().unwrap();
    let daily: Limit = "1000/1d".parse().unwrap();
    let bucket = Limit::token_bucket(100, Duration::from_secs(3600), 100).unwrap();
    let form = |key: &str| {
        let shard = s.shards[0].lock();
        let pos = shard.find(s.hasher.hash_one(key), key).unwrap();
        shard.table.get(pos).tag()
    };
    for i in 0..4 {
        s.check(
            "w",
            &[hourly],
            Cost::units(1),
            now(i * 60_000),
            Mode::Acquire,
        )
        .unwrap();
    }
    assert!(form("w") < GENERAL, "four sub-windows pack");
    let packed = state_of(&s, "w").unwrap();
    s.check(
        "w",
        &[hourly],
        Cost::units(1),
        now(4 * 60_000),
        Mode::Acquire,
    )
    .unwrap();
    assert_eq!(form("w"), GENERAL, "a fifth does not");
    assert_eq!(state_of(&s, "w").unwrap().used(&hourly, now(4 * 60_000)), 5);
    assert!(packed.used(&hourly, now(0)) == 4);
    s.check("b", &[bucket], Cost::units(3), now(0), Mode::Acquire)
        .unwrap();
    assert!(form("b") < GENERAL);
    s.check(
        "two",
        &[hourly, daily],
        Cost::units(1),
        now(0),
        Mode::Acquire,
    )
    .unwrap();
    assert_eq!(form("two"), GENERAL, "two counters do not pack");
    // Once everything has decayed, the next event packs again.
    s.check(
        "w",
        &[hourly],
        Cost::units(1),
        now(10_000_000),
        Mode::Acquire,
    )
    .unwrap();
    assert!(form("w") < GENERAL);
    // A count too big for a packed sub-window.
    let bytes: Limit = "100000000/1h".parse().unwrap();
    s.check("big", &[bytes], Cost::units(300_000), now(0), Mode::Acquire)
        .unwrap();
    assert_eq!(form("big"), GENERAL);
    assert_eq!(state_of(&s, "big").unwrap().used(&bytes, now(0)), 300_000);
    let shard = s.shards[0].lock();
    assert_eq!(shard.general.len() - shard.general_free.len(), 2);
}

/// One step of a random history over a few keys and tiers.
#[derive(Debug, Clone)]
enum Op {
    Check {
        dt: i64,
        key: u16,
        tier: usize,
        cost: u64,
        acquire: bool,
    },
    Sweep,
    Forget(u16),
}

fn tiers() -> Vec<Vec<Limit>> {
    let l = |s: &str| s.parse::<Limit>().unwrap();
    let b = |n, w, burst| Limit::token_bucket(n, Duration::from_millis(w), burst).unwrap();
    vec![
        vec![l("5/10s")],
        vec![l("3/10s")],
        vec![b(2, 5_000, 3)],
        vec![l("5/10s"), l("7/10s")],
        vec![l("5/10s"), b(2, 5_000, 3)],
        vec![l("400000/10s")],
        vec![l("2/1s").with_precision(1000).unwrap()],
        vec![b(u64::from(u32::MAX), 7, 5)],
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        30 => (
            prop_oneof![5 => 0i64..=700, 1 => -20_000i64..0, 1 => 0i64..=40_000],
            // Mostly a few keys with long histories, some of many.
            prop_oneof![4 => 0u16..4, 1 => 0u16..300],
            0..tiers().len(),
            prop_oneof![5 => 0u64..=3, 1 => 0u64..=300_000],
            prop::bool::weighted(0.8),
        )
            .prop_map(|(dt, key, tier, cost, acquire)| Op::Check {
                dt,
                key,
                tier,
                cost,
                acquire
            }),
        1 => Just(Op::Sweep),
        1 => prop_oneof![3 => 0u16..4, 1 => 0u16..300].prop_map(Op::Forget),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// Whatever form each key is in (packed or whole), moving between tiers,
    /// sweeps and forgets: the store decides and holds exactly what one
    /// `KeyState` per key does. Single-limit tiers go through the packed fast
    /// path (`packed::apply`), the others through `decide` on a `OneCounter`
    /// or a whole `KeyState` (`Shard::apply`).
    #[test]
    fn the_store_holds_exactly_what_key_states_hold(ops in prop::collection::vec(op(), 1..400)) {
        let store = MemoryStore::with_config(MemoryStoreConfig { shards: 2, max_keys: 10_000 });
        let tiers = tiers();
        let mut model: HashMap<String, KeyState> = HashMap::new();
        let mut t = T0 as i64;
        for op in &ops {
            match op {
                Op::Check { dt, key, tier, cost, acquire } => {
                    t = (t + dt).max(T0 as i64);
                    let now = Timestamp::from_millis(t as u64);
                    let key = format!("user{key}@example.com");
                    let mode = if *acquire { Mode::Acquire } else { Mode::Peek };
                    let limits = &tiers[*tier];
                    let got = store.check(&key, limits, Cost::units(*cost), now, mode).unwrap();
                    let state = model.entry(key.clone()).or_default();
                    let want = state.apply(limits, Cost::units(*cost), now, mode);
                    prop_assert_eq!(got, want);
                    if state.counter_count() == 0 {
                        model.remove(&key);
                    }
                }
                Op::Sweep => {
                    let now = Timestamp::from_millis(t as u64);
                    let before = model.len();
                    model.retain(|_, s| !s.is_idle(now));
                    prop_assert_eq!(store.sweep(now), before - model.len());
                }
                Op::Forget(key) => {
                    let key = format!("user{key}@example.com");
                    prop_assert_eq!(store.forget(&key).unwrap(), model.remove(&key).is_some());
                }
            }
        }
        let mut held = HashMap::new();
        store.scan(&mut |k, s| { held.insert(k.to_string(), s.clone()); }).unwrap();
        prop_assert_eq!(held, model.clone());
        prop_assert_eq!(store.key_count(), model.len());
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// A full store (one shard whose table the hand sees in one pass) under
    /// random checks of more keys than it holds: an existing key is never
    /// refused; a new key evicts an idle key if there is one, else one not used
    /// since the last eviction whose state decays first, else the key whose
    /// state decays first; and the keys left decide exactly as their
    /// `KeyState`s (an evicted key starts over).
    #[test]
    fn a_full_store_evicts_idle_keys_first_then_the_least_recently_used(
        ops in prop::collection::vec(
            (prop_oneof![3 => 0i64..=2_000, 1 => 0i64..=70_000], 0u8..20, 0usize..3, 0u64..=2, prop::bool::weighted(0.7)),
            1..400,
        )
    ) {
        const MAX: usize = 8;
        let store = MemoryStore::with_config(MemoryStoreConfig { shards: 1, max_keys: MAX });
        let tiers = tiers();
        let mut model: HashMap<String, KeyState> = HashMap::new();
        let mut used_since_eviction = std::collections::HashSet::new();
        let mut t = T0 as i64;
        for (dt, key, tier, cost, acquire) in ops {
            t += dt;
            let now = Timestamp::from_millis(t as u64);
            let key = format!("user{key}@example.com");
            let mode = if acquire { Mode::Acquire } else { Mode::Peek };
            let limits = &tiers[tier];
            let existed = model.contains_key(&key);
            let before = model.clone();
            let got = store.check(&key, limits, Cost::units(cost), now, mode);
            let got = match got {
                Ok(d) => d,
                Err(e) => return Err(TestCaseError::fail(format!("{key} existed={existed}: {e}"))),
            };
            let state = model.entry(key.clone()).or_default();
            let want = state.apply(limits, Cost::units(cost), now, mode);
            prop_assert_eq!(got, want);
            if state.counter_count() == 0 {
                model.remove(&key);
            }
            if existed {
                used_since_eviction.insert(key.clone());
            }
            let mut held = HashMap::new();
            store.scan(&mut |k, s| { held.insert(k.to_string(), s.clone()); }).unwrap();
            prop_assert!(held.len() <= MAX);
            let gone: Vec<String> = model.keys().filter(|k| !held.contains_key(*k)).cloned().collect();
            prop_assert!(gone.len() <= 1, "{:?}", gone);
            if let Some(victim) = gone.first() {
                prop_assert!(!existed, "checking the tracked {} evicted {}", key, victim);
                prop_assert!(victim != &key);
                prop_assert_eq!(before.len(), MAX);
                let at = |k: &String| before.get(k).map_or(0, |s| s.idle_at);
                let idle: Vec<&String> = before.keys().filter(|k| at(k) <= t as u64).collect();
                if !idle.is_empty() {
                    prop_assert!(idle.contains(&victim), "idle {:?}, evicted {}", idle, victim);
                } else {
                    let unused: Vec<&String> = before.keys().filter(|k| !used_since_eviction.contains(*k)).collect();
                    let pool = if unused.is_empty() { before.keys().collect() } else { unused };
                    prop_assert!(pool.contains(&victim), "evicted {} used since the last eviction", victim);
                    let min = pool.iter().map(|k| at(k)).min().unwrap_or(0);
                    prop_assert_eq!(at(victim), min, "evicted {} not the least recently charged", victim);
                }
                model.remove(victim);
                used_since_eviction.clear();
            }
            prop_assert_eq!(held, model.clone());
            prop_assert_eq!(store.key_count(), model.len());
        }
    }
}
