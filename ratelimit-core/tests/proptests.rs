//! Property tests of the algorithms against an exact sliding-log model.

use std::time::Duration;

use proptest::prelude::*;
use ratelimit_core::{Cost, KeyState, Limit, MemoryStore, Mode, Store, Timestamp};

const T0: u64 = 1_700_000_000_000;

/// One step of a random history: wait `dt` ms, then ask for `cost` for `key`.
#[derive(Debug, Clone)]
struct Step {
    dt: u64,
    key: usize,
    cost: u64,
    peek: bool,
}

fn steps(max_dt: u64, max_cost: u64) -> impl Strategy<Value = Vec<Step>> {
    prop::collection::vec(
        (
            0..=max_dt,
            0usize..3,
            0..=max_cost,
            prop::bool::weighted(0.15),
        )
            .prop_map(|(dt, key, cost, peek)| Step {
                dt,
                key,
                cost,
                peek,
            }),
        1..200,
    )
}

/// A sliding window: count 1..12, precision 1..8, sub-window 1..2000 ms.
fn window_limit() -> impl Strategy<Value = Limit> {
    (1u64..12, 1u64..8, 1u64..2000).prop_map(|(n, p, sub)| {
        Limit::sliding(n, Duration::from_millis(p * sub))
            .unwrap()
            .with_precision(p)
            .unwrap()
    })
}

/// Sum of accepted cost with time in `[from, to]` (inclusive both ends).
fn log_sum(log: &[(u64, u64)], from: u64, to: u64) -> u64 {
    log.iter()
        .filter(|(t, _)| *t >= from && *t <= to)
        .map(|(_, c)| c)
        .sum()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    /// (a) never more than N in any closed interval of length W; (b) a refusal only
    /// when the exact log over W plus one sub-window would also refuse; (c) refusals
    /// and peeks change no state; and retry_after is exact.
    #[test]
    fn sliding_window_matches_the_exact_log_model(limit in window_limit(), steps in steps(3000, 13)) {
        let n = limit.count();
        let w = limit.window_ms();
        let sub = w / match limit.algorithm() {
            ratelimit_core::Algorithm::SlidingWindow { precision } => u64::from(precision),
            _ => unreachable!(),
        };
        let limits = [limit];
        let mut states = vec![KeyState::new(); 3];
        let mut logs: Vec<Vec<(u64, u64)>> = vec![Vec::new(); 3];
        let mut t = T0;
        for step in &steps {
            t += step.dt;
            let now = Timestamp::from_millis(t);
            let state = &mut states[step.key];
            let before = state.clone();
            let mode = if step.peek { Mode::Peek } else { Mode::Acquire };
            let d = state.apply(&limits, Cost::units(step.cost), now, mode);
            let log = &mut logs[step.key];
            match d.denial() {
                None => {
                    if step.peek {
                        prop_assert_eq!(&*state, &before, "a peek changed the state");
                    } else {
                        log.push((t, step.cost));
                    }
                }
                Some(denial) => {
                    prop_assert_eq!(&*state, &before, "a refusal changed the state");
                    // (b): the exact log over (t - W - sub, t] would refuse too.
                    let exact = log_sum(log, (t + 1).saturating_sub(w + sub), t);
                    prop_assert!(exact + step.cost > n,
                        "refused cost {} at t={} with only {} in the last W+sub", step.cost, t - T0, exact);
                    // retry_after: exact to the millisecond, None only if cost > N.
                    match denial.retry_after {
                        None => prop_assert!(step.cost > n),
                        Some(r) => {
                            let r = r.as_millis() as u64;
                            prop_assert!(r >= 1);
                            let mut later = state.clone();
                            prop_assert!(later.apply(&limits, Cost::units(step.cost),
                                Timestamp::from_millis(t + r), Mode::Peek).is_allowed(),
                                "still refused after retry_after");
                            prop_assert!(!later.apply(&limits, Cost::units(step.cost),
                                Timestamp::from_millis(t + r - 1), Mode::Peek).is_allowed(),
                                "admitted before retry_after");
                        }
                    }
                }
            }
        }
        // (a): every closed interval of length W holds at most N (the worst one ends
        // at an accepted event).
        for log in &logs {
            for &(end, _) in log {
                let sum = log_sum(log, end.saturating_sub(w), end);
                prop_assert!(sum <= n, "{} accepted in [{}, {}] with limit {}", sum, end - w - T0, end - T0, n);
            }
        }
    }

    /// Token bucket: after waiting exactly retry_after the same request is accepted;
    /// one tick earlier it is refused. Refusals change no state.
    #[test]
    fn token_bucket_retry_after_is_exact(
        n in 1u64..50, w in 1u64..100_000, burst in 1u64..20, steps in steps(5000, 25)
    ) {
        let limits = [Limit::token_bucket(n, Duration::from_millis(w), burst).unwrap()];
        let mut state = KeyState::new();
        let mut t = T0;
        for step in &steps {
            t += step.dt;
            let before = state.clone();
            let d = state.apply(&limits, Cost::units(step.cost), Timestamp::from_millis(t), Mode::Acquire);
            if let Some(denial) = d.denial() {
                prop_assert_eq!(&state, &before);
                match denial.retry_after {
                    None => prop_assert!(step.cost > burst),
                    Some(r) => {
                        let r = r.as_millis() as u64;
                        prop_assert!(r >= 1);
                        let mut s = state.clone();
                        prop_assert!(s.apply(&limits, Cost::units(step.cost),
                            Timestamp::from_millis(t + r), Mode::Peek).is_allowed());
                        prop_assert!(!s.apply(&limits, Cost::units(step.cost),
                            Timestamp::from_millis(t + r - 1), Mode::Peek).is_allowed());
                    }
                }
            }
        }
    }

    /// The memory store decides exactly as one KeyState per key does.
    #[test]
    fn memory_store_decides_like_the_reference(
        a in window_limit(), steps in steps(3000, 13)
    ) {
        let b = Limit::token_bucket(a.count(), a.window(), a.count()).unwrap();
        let limits = [a, b];
        let store = MemoryStore::new();
        let mut states = vec![KeyState::new(); 3];
        let mut t = T0;
        for step in &steps {
            t += step.dt;
            let now = Timestamp::from_millis(t);
            let mode = if step.peek { Mode::Peek } else { Mode::Acquire };
            let key = format!("user{}@example.com", step.key);
            let got = store.check(&key, &limits, Cost::units(step.cost), now, mode).unwrap();
            let want = states[step.key].apply(&limits, Cost::units(step.cost), now, mode);
            prop_assert_eq!(got, want);
        }
    }
}
