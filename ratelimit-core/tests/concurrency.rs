//! Several threads hammering the same keys never exceed a limit in total.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use ratelimit_core::{Clock, MemoryStoreConfig};
use ratelimit_core::{Cost, Limit, ManualClock, MemoryStore, Mode, Store, Timestamp};

fn hammer(limits: &[Limit], expected_per_key: u64) {
    const THREADS: usize = 8;
    const KEYS: usize = 4;
    const TRIES: usize = 2_000;
    let store = Arc::new(MemoryStore::with_config(
        MemoryStoreConfig::default()
            .with_shards(2)
            .with_max_keys(1000),
    ));
    let clock = ManualClock::new(Timestamp::from_millis(1_700_000_000_000));
    let allowed: Arc<Vec<AtomicU64>> = Arc::new((0..KEYS).map(|_| AtomicU64::new(0)).collect());
    std::thread::scope(|s| {
        for th in 0..THREADS {
            let store = Arc::clone(&store);
            let allowed = Arc::clone(&allowed);
            let clock = clock.clone();
            s.spawn(move || {
                for i in 0..TRIES {
                    let k = (i + th) % KEYS;
                    let key = format!("user{k}");
                    let d = store
                        .check(
                            &key,
                            limits,
                            Cost::message(2, 100),
                            clock.now(),
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
        assert_eq!(a.load(Ordering::Relaxed), expected_per_key, "key user{k}");
    }
}

#[test]
fn concurrent_acquires_admit_exactly_the_limit_per_key() {
    hammer(&["100/1h".parse().unwrap()], 100);
}

#[test]
fn concurrent_acquires_respect_the_tightest_of_mixed_limits() {
    let limits = [
        "500/1h".parse::<Limit>().unwrap(),
        "300/1d"
            .parse::<Limit>()
            .unwrap()
            .with_unit(ratelimit_core::Unit::Recipients),
        Limit::token_bucket(10, Duration::from_secs(3600), 400).unwrap(),
    ];
    // Two recipients per message: 300 recipients = 150 messages.
    hammer(&limits, 150);
}

#[test]
fn concurrent_acquires_with_time_moving_stay_within_any_window() {
    // Threads record while another moves the clock; each accepted event's time is
    // logged and checked afterwards against the guarantee.
    let store = Arc::new(MemoryStore::new());
    let clock = ManualClock::new(Timestamp::from_millis(1_700_000_000_000));
    let limits: [Limit; 1] = ["20/10s".parse().unwrap()];
    let log = parking_lot::Mutex::new(Vec::new());
    let done = std::sync::atomic::AtomicBool::new(false);
    let order = parking_lot::Mutex::new(());
    std::thread::scope(|s| {
        let ticker = clock.clone();
        let done = &done;
        s.spawn(move || {
            for _ in 0..3_000 {
                ticker.advance(Duration::from_millis(10));
                std::thread::yield_now();
            }
            done.store(true, Ordering::SeqCst);
        });
        for _ in 0..4 {
            let store = Arc::clone(&store);
            let clock = clock.clone();
            let log = &log;
            let order = &order;
            s.spawn(move || {
                while !done.load(Ordering::SeqCst) {
                    // The guarantee is stated for the timestamps a key's decisions are
                    // made with, in the order they are made. Reading the clock and
                    // deciding under one lock keeps that order; the store itself still
                    // decides concurrently with the other threads' keys.
                    let _order = order.lock();
                    let now = clock.now();
                    let d = store
                        .check("k", &limits, Cost::units(1), now, Mode::Acquire)
                        .unwrap();
                    if d.is_allowed() {
                        log.lock().push(now.as_millis());
                    }
                }
            });
        }
    });
    let mut times = log.into_inner();
    times.sort_unstable();
    assert!(times.len() >= 20, "only {} accepted", times.len());
    for (i, &end) in times.iter().enumerate() {
        let in_window = times[..=i].iter().filter(|&&t| t + 10_000 >= end).count();
        assert!(
            in_window <= 20,
            "{in_window} accepted in the 10 s before {end}"
        );
    }
}

#[test]
fn concurrent_new_keys_never_exceed_the_key_cap_and_each_past_it_evicts_one() {
    use ratelimit_core::store::StoreError;
    for _ in 0..20 {
        let store = MemoryStore::with_config(
            MemoryStoreConfig::default()
                .with_shards(16)
                .with_max_keys(100),
        );
        let limits: [Limit; 1] = ["10/1h".parse().unwrap()];
        let now = Timestamp::from_millis(1_700_000_000_000);
        let admitted = AtomicU64::new(0);
        std::thread::scope(|s| {
            for t in 0..8 {
                let (store, admitted, limits) = (&store, &admitted, &limits);
                s.spawn(move || {
                    for i in 0..200 {
                        match store.check(
                            &format!("t{t}-u{i}"),
                            limits,
                            Cost::units(1),
                            now,
                            Mode::Acquire,
                        ) {
                            Ok(_) => {
                                admitted.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(StoreError::Full { .. }) => {}
                            Err(e) => panic!("{e}"),
                        }
                    }
                });
            }
        });
        // Past the cap new keys evict old ones (rarely, a shard with nothing to
        // evict refuses one): the count never goes over, every eviction made room
        // for one admitted key.
        let admitted = admitted.load(Ordering::Relaxed);
        let ev = store.evictions();
        assert_eq!(store.key_count(), 100);
        assert_eq!(admitted, 100 + ev.idle + ev.lru);
        assert!(admitted > 100, "{admitted}");
    }
}
