//! The Redis store on a real Redis Cluster: three masters, three replicas, started by
//! `scripts/with-redis-cluster` (which sets `RATELIMIT_TEST_REDIS_CLUSTER_NODES` and
//! `RATELIMIT_TEST_REDIS_CLUSTER_PIDS`). `scripts/test` runs these.
//!
//! The tests take turns (one kills a master), each under its own key prefix.
#![cfg(feature = "redis")]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ratelimit_core::distinct::{DistinctLimit, DistinctStore};
use ratelimit_core::store::{RedisStore, RedisStoreConfig, Scan};
use ratelimit_core::{Cost, Limit, Mode, Store, StoreError, Timestamp};

/// One test at a time: the failover test takes a master away from the others.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is not set: run these tests through scripts/with-redis-cluster \
             (scripts/test does)"
        )
    })
}

fn seed_nodes() -> Vec<String> {
    env("RATELIMIT_TEST_REDIS_CLUSTER_NODES")
        .split(',')
        .map(str::to_string)
        .collect()
}

/// The pid of the node on each port.
fn pids() -> HashMap<u16, u32> {
    env("RATELIMIT_TEST_REDIS_CLUSTER_PIDS")
        .split(',')
        .map(|pair| {
            let (port, pid) = pair.split_once(':').expect("PORT:PID");
            (port.parse().unwrap(), pid.parse().unwrap())
        })
        .collect()
}

fn config(test: &str) -> RedisStoreConfig {
    let mut c = RedisStoreConfig::cluster(seed_nodes());
    c.key_prefix = format!("rlc:{}:{test}:", std::process::id());
    c
}

/// A store that answers, or a panic saying why not.
fn store_from(c: RedisStoreConfig) -> RedisStore {
    let endpoint = c.endpoint();
    let store = RedisStore::new(c).unwrap();
    if let Err(e) = store.ping() {
        panic!(
            "the cluster at {endpoint} does not answer ({e}); run through scripts/with-redis-cluster"
        );
    }
    store
}

/// A plain connection to one node (no cluster routing).
fn node(port: u16) -> redis::Connection {
    redis::Client::open(format!("redis://127.0.0.1:{port}/"))
        .unwrap()
        .get_connection_with_timeout(Duration::from_secs(2))
        .unwrap()
}

/// The first node of the seed list that answers.
fn any_live_node(except: Option<u16>) -> redis::Connection {
    for (port, _) in pids() {
        if Some(port) == except {
            continue;
        }
        if let Ok(c) = redis::Client::open(format!("redis://127.0.0.1:{port}/"))
            .unwrap()
            .get_connection_with_timeout(Duration::from_millis(500))
        {
            return c;
        }
    }
    panic!("no cluster node answers");
}

/// The master port of every slot range, from `CLUSTER SLOTS`.
fn slot_masters(con: &mut redis::Connection) -> Vec<(u16, u16, u16)> {
    let ranges: Vec<redis::Value> = redis::cmd("CLUSTER").arg("SLOTS").query(con).unwrap();
    ranges
        .iter()
        .map(|r| {
            let redis::Value::Array(items) = r else {
                panic!("CLUSTER SLOTS: {r:?}")
            };
            let start: u16 = redis::from_redis_value_ref(&items[0]).unwrap();
            let end: u16 = redis::from_redis_value_ref(&items[1]).unwrap();
            let redis::Value::Array(master) = &items[2] else {
                panic!("CLUSTER SLOTS: {r:?}")
            };
            let port: u16 = redis::from_redis_value_ref(&master[1]).unwrap();
            (start, end, port)
        })
        .collect()
}

fn keyslot(con: &mut redis::Connection, name: &str) -> u16 {
    redis::cmd("CLUSTER")
        .arg("KEYSLOT")
        .arg(name)
        .query(con)
        .unwrap()
}

fn master_of(ranges: &[(u16, u16, u16)], slot: u16) -> u16 {
    ranges
        .iter()
        .find(|(s, e, _)| (*s..=*e).contains(&slot))
        .map(|r| r.2)
        .unwrap_or_else(|| panic!("slot {slot} has no master in {ranges:?}"))
}

fn now() -> Timestamp {
    Timestamp::from_millis(1_700_000_000_000)
}

/// `threads` threads over `stores` (round robin), `tries` acquisitions each of `key`:
/// how many were admitted. Every call must succeed.
fn hammer(
    stores: &[&RedisStore],
    key: &str,
    limits: &[Limit],
    threads: usize,
    tries: usize,
) -> u64 {
    let admitted = AtomicU64::new(0);
    std::thread::scope(|s| {
        for t in 0..threads {
            let store = stores[t % stores.len()];
            let admitted = &admitted;
            s.spawn(move || {
                for _ in 0..tries {
                    let d = store
                        .check(key, limits, Cost::units(1), now(), Mode::Acquire)
                        .unwrap();
                    if d.is_allowed() {
                        admitted.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
    });
    admitted.into_inner()
}

#[test]
#[ignore = "needs a Redis Cluster (scripts/test runs it under scripts/with-redis-cluster)"]
fn two_stores_on_one_cluster_admit_exactly_the_limit() {
    let _turn = serial();
    let a = store_from(config("exact"));
    let b = store_from(config("exact"));
    let limits: [Limit; 2] = ["50/1h".parse().unwrap(), "20/1m".parse().unwrap()];
    // 8 threads, half on each store, 120 attempts on one user: the smaller limit wins.
    assert_eq!(hammer(&[&a, &b], "alice@example.com", &limits, 8, 15), 20);
    // Both see the same counters.
    let d = b
        .check(
            "alice@example.com",
            &limits,
            Cost::units(1),
            now(),
            Mode::Peek,
        )
        .unwrap();
    assert!(!d.is_allowed());
    assert_eq!(d.statuses()[1].used, 20);
    // Every node loses its scripts and functions (as a restart without persistence
    // does): the next decision loads them again where needed.
    // (A node the failover test killed is skipped.)
    let mut flushed = 0;
    for port in pids().keys() {
        let client = redis::Client::open(format!("redis://127.0.0.1:{port}/")).unwrap();
        if let Ok(mut con) = client.get_connection_with_timeout(Duration::from_millis(500)) {
            let _: () = redis::cmd("SCRIPT").arg("FLUSH").query(&mut con).unwrap();
            // A replica refuses FUNCTION FLUSH (READONLY): its master's flush reaches it.
            let _ = redis::cmd("FUNCTION").arg("FLUSH").query::<()>(&mut con);
            flushed += 1;
        }
    }
    assert!(flushed >= 5, "{flushed} nodes answered");
    let d = a
        .check(
            "alice@example.com",
            &limits,
            Cost::units(1),
            now(),
            Mode::Peek,
        )
        .unwrap();
    assert_eq!(d.statuses()[1].used, 20);
    let networks = DistinctLimit::new(3, Duration::from_secs(3600)).unwrap();
    assert_eq!(
        a.observe("alice@example.com", "192.0.2.0/24", &networks, now())
            .unwrap()
            .distinct,
        1
    );
    assert!(a.forget_key("alice@example.com"));
    let d = b
        .check(
            "alice@example.com",
            &limits,
            Cost::units(1),
            now(),
            Mode::Acquire,
        )
        .unwrap();
    assert!(d.is_allowed(), "forgotten on one store, fresh on the other");
}

/// `Forget` under a shorter name for the tests.
trait ForgetKey {
    fn forget_key(&self, key: &str) -> bool;
}

impl ForgetKey for RedisStore {
    fn forget_key(&self, key: &str) -> bool {
        ratelimit_core::store::Forget::forget(self, key).unwrap()
    }
}

#[test]
#[ignore = "needs a Redis Cluster (scripts/test runs it under scripts/with-redis-cluster)"]
fn users_spread_over_every_master_and_scan_walks_them_all() {
    let _turn = serial();
    let store = store_from(config("spread"));
    let mut con = any_live_node(None);
    let ranges = slot_masters(&mut con);
    let masters: BTreeSet<u16> = ranges.iter().map(|r| r.2).collect();
    assert_eq!(masters.len(), 3, "{ranges:?}");

    let limits: [Limit; 1] = ["10/1h".parse().unwrap()];
    let networks = DistinctLimit::new(3, Duration::from_secs(3600)).unwrap();
    let users: Vec<String> = (0..60).map(|i| format!("user{i}@example.com")).collect();
    let mut per_master: BTreeMap<u16, usize> = BTreeMap::new();
    for user in &users {
        let d = store
            .check(user, &limits, Cost::units(3), now(), Mode::Acquire)
            .unwrap();
        assert!(d.is_allowed());
        let seen = store
            .observe(user, "192.0.2.0/24", &networks, now())
            .unwrap();
        assert_eq!(seen.distinct, 1);

        // The counters' hash and the networks' hash share the slot (the hash tag)...
        let name = store.key_name(user);
        let slot = keyslot(&mut con, &name);
        assert_eq!(
            keyslot(&mut con, &store.distinct_key_name(user)),
            slot,
            "{user}"
        );
        // ...and both live on that slot's master.
        let port = master_of(&ranges, slot);
        let mut owner = node(port);
        let exists: u32 = redis::cmd("EXISTS")
            .arg(&name)
            .arg(store.distinct_key_name(user))
            .query(&mut owner)
            .unwrap();
        assert_eq!(exists, 2, "{user} on {port}");
        *per_master.entry(port).or_default() += 1;
    }
    assert_eq!(
        per_master.keys().copied().collect::<BTreeSet<_>>(),
        masters,
        "{per_master:?}"
    );

    // Scan walks every master: every user, with its count.
    let mut scanned = BTreeMap::new();
    store
        .scan(&mut |key, state| {
            scanned.insert(key.to_string(), state.counter_count());
        })
        .unwrap();
    assert_eq!(
        scanned.keys().cloned().collect::<BTreeSet<_>>(),
        users.iter().cloned().collect::<BTreeSet<_>>()
    );
    assert!(scanned.values().all(|n| *n == 1), "{scanned:?}");
    assert_eq!(store.try_key_count().unwrap(), users.len());
    let d = store
        .check(&users[7], &limits, Cost::units(1), now(), Mode::Peek)
        .unwrap();
    assert_eq!(d.statuses()[0].used, 3);
}

#[test]
#[ignore = "needs a Redis Cluster (scripts/test runs it under scripts/with-redis-cluster)"]
fn a_killed_master_fails_calls_fast_and_its_promoted_replica_decides_exactly() {
    let _turn = serial();
    let timeout = Duration::from_millis(500);
    let store = store_from(
        config("failover")
            .with_command_timeout(timeout)
            .with_connect_timeout(timeout),
    );
    let mut con = any_live_node(None);
    let ranges = slot_masters(&mut con);
    // The victim: the master of the first user's slot. Users on every master.
    let users: Vec<String> = (0..30).map(|i| format!("load{i}@example.com")).collect();
    let victim = master_of(&ranges, keyslot(&mut con, &store.key_name(&users[0])));
    let victim_ranges: Vec<(u16, u16)> = ranges
        .iter()
        .filter(|r| r.2 == victim)
        .map(|r| (r.0, r.1))
        .collect();
    let on_victim = |con: &mut redis::Connection, name: &str| {
        let slot = keyslot(con, name);
        victim_ranges.iter().any(|(s, e)| (*s..=*e).contains(&slot))
    };
    let pid = pids()[&victim];
    let limits: [Limit; 1] = ["1000000/1h".parse().unwrap()];

    // Load on every user from 4 threads; a master is killed in the middle.
    let stop = AtomicBool::new(false);
    let slowest = AtomicU64::new(0);
    let (ok, failed) = (AtomicU64::new(0), AtomicU64::new(0));
    let mut promoted_after = Duration::ZERO;
    std::thread::scope(|s| {
        for t in 0..4 {
            let (store, users, limits) = (&store, &users, &limits);
            let (stop, slowest, ok, failed) = (&stop, &slowest, &ok, &failed);
            s.spawn(move || {
                let mut i = t;
                while !stop.load(Ordering::Relaxed) {
                    let user = &users[i % users.len()];
                    i += 1;
                    let start = Instant::now();
                    let result = store.check(user, limits, Cost::units(1), now(), Mode::Acquire);
                    let took = start.elapsed();
                    slowest.fetch_max(took.as_millis() as u64, Ordering::Relaxed);
                    match result {
                        Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                        Err(StoreError::Unavailable(_) | StoreError::Timeout(_)) => {
                            failed.fetch_add(1, Ordering::Relaxed)
                        }
                        Err(e) => panic!("{user}: unexpected {e}"),
                    };
                }
            });
        }
        std::thread::sleep(Duration::from_millis(300));
        let killed = Instant::now();
        let status = std::process::Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -9 {pid}");
        // Promoted when a surviving node reports the cluster ok with another master
        // for the victim's slots.
        let deadline = killed + Duration::from_secs(30);
        loop {
            assert!(Instant::now() < deadline, "no replica was promoted in 30 s");
            std::thread::sleep(Duration::from_millis(100));
            let mut con = any_live_node(Some(victim));
            let info: String = redis::cmd("CLUSTER").arg("INFO").query(&mut con).unwrap();
            if info.contains("cluster_state:ok")
                && master_of(&slot_masters(&mut con), victim_ranges[0].0) != victim
            {
                break;
            }
        }
        promoted_after = killed.elapsed();
        // Keep the load on the new topology for a while.
        std::thread::sleep(Duration::from_millis(500));
        stop.store(true, Ordering::Relaxed);
    });
    let slowest = Duration::from_millis(slowest.into_inner());
    let (ok, failed) = (ok.into_inner(), failed.into_inner());
    eprintln!(
        "master {victim} killed: replica promoted after {promoted_after:?}; \
         {ok} calls ok, {failed} failed, the slowest took {slowest:?}"
    );
    // The margin covers a busy, shared test machine (threads waiting for a core);
    // the client's own retry policy, which the store turns off, would take many
    // seconds here (16 retries, waits from 1.28 s).
    assert!(
        slowest <= timeout + Duration::from_millis(1500),
        "a call took {slowest:?} (command_timeout {timeout:?})"
    );
    // The victim's slots had no master for most of `promoted_after` (at least the
    // 1 s node timeout): calls for its users failed meanwhile, the others went on.
    assert!(
        promoted_after >= Duration::from_secs(1),
        "{promoted_after:?}"
    );
    assert!(failed > 0, "no call failed while a master was down");
    assert!(ok > 0);

    // The same store, no restart: exact again, on the promoted replica.
    let mut con = any_live_node(Some(victim));
    let user = (0..)
        .map(|i| format!("after{i}@example.com"))
        .find(|u| on_victim(&mut con, &store.key_name(u)))
        .unwrap();
    let limits: [Limit; 1] = ["25/1h".parse().unwrap()];
    let other = store_from(config("failover"));
    assert_eq!(hammer(&[&store, &other], &user, &limits, 6, 10), 25);
    let new_master = master_of(
        &slot_masters(&mut con),
        keyslot(&mut con, &store.key_name(&user)),
    );
    assert_ne!(new_master, victim);
    let exists: u32 = redis::cmd("EXISTS")
        .arg(store.key_name(&user))
        .query(&mut node(new_master))
        .unwrap();
    assert_eq!(exists, 1, "{user} on the promoted node {new_master}");
}

#[test]
#[ignore = "needs a Redis Cluster (scripts/test runs it under scripts/with-redis-cluster)"]
fn a_slot_moving_to_another_master_is_followed_by_ask_then_moved() {
    use redis::cluster_routing::Slot;
    let _turn = serial();
    let store = store_from(config("reshard"));
    let mut con = any_live_node(None);
    let ranges = slot_masters(&mut con);
    let limits: [Limit; 1] = ["100/1h".parse().unwrap()];
    let used = |user: &str| {
        store
            .check(user, &limits, Cost::units(1), now(), Mode::Peek)
            .unwrap()
            .statuses()[0]
            .used
    };
    let charge = |user: &str| {
        let d = store
            .check(user, &limits, Cost::units(1), now(), Mode::Acquire)
            .unwrap();
        assert!(d.is_allowed());
    };
    let moved = "mover@example.com";
    charge(moved); // the store's pooled connection now holds the slot map
    let name = store.key_name(moved);
    let slot = keyslot(&mut con, &name);
    let source = master_of(&ranges, slot);
    let target = ranges.iter().map(|r| r.2).find(|p| *p != source).unwrap();
    let id = |port: u16| -> String {
        redis::cmd("CLUSTER")
            .arg("MYID")
            .query(&mut node(port))
            .unwrap()
    };
    let (source_id, target_id) = (id(source), id(target));
    let (mut src, mut dst) = (node(source), node(target));
    let setslot = |con: &mut redis::Connection, args: &[&str]| {
        let _: () = redis::cmd("CLUSTER")
            .arg("SETSLOT")
            .arg(slot)
            .arg(args)
            .query(con)
            .unwrap();
    };

    // Migrating: the key moves; the source answers ASK for it.
    setslot(&mut dst, &["IMPORTING", &source_id]);
    setslot(&mut src, &["MIGRATING", &target_id]);
    let _: () = redis::cmd("MIGRATE")
        .arg("127.0.0.1")
        .arg(target)
        .arg("")
        .arg(0)
        .arg(5000)
        .arg("KEYS")
        .arg(&name)
        .query(&mut src)
        .unwrap();
    charge(moved);
    assert_eq!(used(moved), 2, "followed ASK to the importing node");
    // A new user in the same slot is created on the importing node.
    let newcomer = (0..)
        .map(|i| format!("newcomer{i}@example.com"))
        .find(|u| Slot::for_key(store.key_name(u)) == Slot::for_key(&name))
        .unwrap();
    charge(&newcomer);
    // Both live on the importing node (asked with ASKING while the slot migrates).
    let (on_target,): (u32,) = redis::pipe()
        .cmd("ASKING")
        .ignore()
        .cmd("EXISTS")
        .arg(&name)
        .arg(store.key_name(&newcomer))
        .query(&mut dst)
        .unwrap();
    assert_eq!(on_target, 2);

    // Migrated: every master learns the slot's new owner; the store's old slot map
    // now gets MOVED.
    for (_, _, port) in &ranges {
        let mut c = node(*port);
        setslot(&mut c, &["NODE", &target_id]);
    }
    charge(moved);
    assert_eq!(used(moved), 3, "followed MOVED to the new owner");
    assert_eq!(used(&newcomer), 1);
    let exists: u32 = redis::cmd("EXISTS")
        .arg(store.key_name(&newcomer))
        .query(&mut dst)
        .unwrap();
    assert_eq!(exists, 1, "{newcomer} on the new owner");
}
