//! The limiter against an exact model: fuzzer-chosen limits and steps drive
//! `KeyState::apply` and two `MemoryStore`s, and every decision is checked.
//!
//! - Sliding window: the cost accepted in any closed interval of length W never exceeds
//!   N (checked against an exact sliding log), and a refusal happens only when the exact
//!   log over W plus one sub-window would refuse too.
//! - Token bucket: the cost accepted in any `[a, b]` never exceeds
//!   `burst + N·(b − a)/W`.
//! - Refusals and peeks change no state; the memory store decides exactly like one
//!   `KeyState` per key; a store with a tiny key cap never tracks more than its cap,
//!   refuses only new keys, and decides like the model for the keys it does track.
//!
//! With bit 7 of byte 0 set the clock may also step backwards (a wall-clock jump): then
//! only "no panic", the key cap and the uncapped store's equivalence are checked.
#![no_main]

use std::time::Duration;

use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use ratelimit_core::store::Scan;
use ratelimit_core::{
    Algorithm, Cost, KeyState, Limit, MemoryStore, MemoryStoreConfig, Mode, Store, StoreError,
    Tier, Timestamp, Unit,
};

const T0: u64 = 1_700_000_000_000;
const KEYS: usize = 4;
const CAP: usize = 2;

struct Step {
    t: u64,
    key: usize,
    cost: Cost,
    mode: Mode,
}

fn limit(u: &mut Unstructured<'_>) -> Result<Limit> {
    let n = u.int_in_range(1u64..=12)?;
    let unit = *u.choose(&[Unit::Messages, Unit::Recipients, Unit::Bytes])?;
    let l = if u.ratio(1, 3)? {
        let w = u.int_in_range(1u64..=5_000)?;
        let burst = u.int_in_range(1u64..=12)?;
        Limit::token_bucket(n, Duration::from_millis(w), burst)
    } else {
        let p = u.int_in_range(1u64..=8)?;
        let sub = u.int_in_range(1u64..=2_000)?;
        Limit::sliding(n, Duration::from_millis(p * sub)).and_then(|l| l.with_precision(p))
    };
    Ok(l.expect("built within the valid ranges").with_unit(unit))
}

fn steps(u: &mut Unstructured<'_>, chaos: bool) -> Result<Vec<Step>> {
    let mut t = T0;
    let mut out = Vec::new();
    while !u.is_empty() && out.len() < 400 {
        let dt = u.int_in_range(0u64..=3_000)?;
        t = if chaos && u.ratio(1, 8)? {
            t.saturating_sub(dt * 10)
        } else {
            t + dt
        };
        let key = u.int_in_range(0..=KEYS - 1)?;
        let cost = Cost {
            messages: u.int_in_range(0u64..=3)?,
            recipients: u.int_in_range(0u64..=14)?,
            bytes: u.int_in_range(0u64..=14)?,
        };
        let mode = if u.ratio(1, 6)? {
            Mode::Peek
        } else {
            Mode::Acquire
        };
        out.push(Step { t, key, cost, mode });
    }
    Ok(out)
}

fn run(data: &[u8]) -> Result<()> {
    let mut u = Unstructured::new(data);
    let control: u8 = u.arbitrary()?;
    let chaos = control & 0x80 != 0;
    let count = 1 + usize::from(control & 3);
    let limits = (0..count)
        .map(|_| limit(&mut u))
        .collect::<Result<Vec<_>>>()?;
    // Only tiers a configuration can hold (e.g. not two buckets sharing a counter at
    // different rates).
    if Tier::new("fuzz", limits.iter().copied()).is_err() {
        return Ok(());
    }
    let steps = steps(&mut u, chaos)?;

    let store = MemoryStore::new();
    let capped = MemoryStore::with_config(
        MemoryStoreConfig::default()
            .with_shards(1)
            .with_max_keys(CAP),
    );
    let mut states = vec![KeyState::new(); KEYS];
    let mut capped_states = vec![KeyState::new(); KEYS];
    // Accepted events per key: (time, cost).
    let mut logs: Vec<Vec<(u64, Cost)>> = vec![Vec::new(); KEYS];

    for step in &steps {
        let now = Timestamp::from_millis(step.t);
        let key = format!("user{}@example.com", step.key);
        let state = &mut states[step.key];
        let before = state.clone();
        let want = state.apply(&limits, step.cost, now, step.mode);
        let got = store
            .check(&key, &limits, step.cost, now, step.mode)
            .unwrap();
        assert_eq!(got, want, "memory store and model disagree");

        match capped.check(&key, &limits, step.cost, now, step.mode) {
            // With the clock stepping back, a key swept as idle at a later time may not
            // be idle in the model at an earlier one: only the cap is checked then.
            Ok(d) => {
                let model = capped_states[step.key].apply(&limits, step.cost, now, step.mode);
                assert!(chaos || d == model, "capped store and model disagree");
            }
            Err(StoreError::Full { max_keys }) => {
                assert_eq!(max_keys, CAP);
                let idle = capped_states[step.key].is_idle(now);
                assert!(chaos || idle, "a tracked key was refused");
            }
            Err(e) => panic!("unexpected store error {e}"),
        }
        assert!(capped.key_count() <= CAP, "key cap exceeded");
        // At the cap a new key evicts one: an evicted key starts over, in the model too.
        let mut held = vec![false; KEYS];
        capped
            .scan(&mut |k, _| {
                if let Some(i) = k
                    .strip_prefix("user")
                    .and_then(|k| k.strip_suffix("@example.com"))
                    .and_then(|i| i.parse::<usize>().ok())
                    && let Some(h) = held.get_mut(i)
                {
                    *h = true;
                }
            })
            .unwrap();
        for (state, held) in capped_states.iter_mut().zip(held) {
            if !held {
                *state = KeyState::new();
            }
        }

        match want.denial() {
            Some(denial) => {
                assert_eq!(*state, before, "a refusal changed the state");
                if !chaos {
                    check_refusal(
                        &limits[denial.limit],
                        &logs[step.key],
                        step,
                        denial.retry_after,
                    );
                }
            }
            None if step.mode == Mode::Peek => {
                assert_eq!(*state, before, "a peek changed the state")
            }
            None => logs[step.key].push((step.t, step.cost)),
        }
    }
    if !chaos {
        for log in &logs {
            for l in &limits {
                check_log(l, log);
            }
        }
    }
    Ok(())
}

fn sum(log: &[(u64, Cost)], unit: Unit, from: u64, to: u64) -> u64 {
    log.iter()
        .filter(|(t, _)| (from..=to).contains(t))
        .map(|(_, c)| c.get(unit))
        .sum()
}

/// A sliding window refuses only when the exact log over `W + sub` would refuse too.
fn check_refusal(l: &Limit, log: &[(u64, Cost)], step: &Step, retry: Option<Duration>) {
    let cost = step.cost.get(l.unit());
    if retry.is_none() {
        let cap = match l.algorithm() {
            Algorithm::TokenBucket { burst } => u64::from(burst),
            _ => l.count(),
        };
        assert!(
            cost > cap,
            "retry_after None but the cost {cost} fits {cap}"
        );
    }
    if let Algorithm::SlidingWindow { precision } = l.algorithm() {
        let w = l.window_ms();
        let sub = w / u64::from(precision);
        let exact = sum(log, l.unit(), (step.t + 1).saturating_sub(w + sub), step.t);
        assert!(
            exact + cost > l.count(),
            "refused {cost} with only {exact} in the last W+sub"
        );
    }
}

/// What was accepted respects the limit in every interval.
fn check_log(l: &Limit, log: &[(u64, Cost)]) {
    let (n, w) = (l.count(), l.window_ms());
    match l.algorithm() {
        Algorithm::SlidingWindow { .. } => {
            for &(end, _) in log {
                let s = sum(log, l.unit(), end.saturating_sub(w), end);
                assert!(
                    s <= n,
                    "{s} accepted within {w} ms before {end} with limit {n}"
                );
            }
        }
        Algorithm::TokenBucket { burst } => {
            for &(a, _) in log {
                for &(b, _) in log.iter().filter(|(b, _)| *b >= a) {
                    let s = u128::from(sum(log, l.unit(), a, b));
                    let bound =
                        u128::from(burst) * u128::from(w) + u128::from(n) * u128::from(b - a);
                    assert!(
                        s * u128::from(w) <= bound,
                        "bucket accepted {s} in [{a}, {b}]"
                    );
                }
            }
        }
        // `Algorithm` is non-exhaustive; `limit` above builds only these two.
        other => unreachable!("no model for {other:?}"),
    }
}

fuzz_target!(|data: &[u8]| {
    let _ = run(data);
});
