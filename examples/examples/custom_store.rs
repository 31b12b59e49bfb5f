//! A custom `Store`: keep key states wherever you like, decide exactly as the
//! built-in stores do by calling `KeyState::apply` under your own lock.
//!
//! This one keeps everything behind one mutex and counts decisions — the shape a
//! store for another backend (an embedded database, a shared-memory segment) takes.
//!
//! Run with `cargo run -p ratelimit-examples --example custom_store`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;
use ratelimit_core::store::StoreError;
use ratelimit_core::{
    Cost, Decision, KeyState, Limit, Limiter, ManualClock, Mode, Store, Tier, TierMap, Timestamp,
};

/// Every key behind one lock: simple, and atomic per key as the `Store` contract asks.
#[derive(Default)]
struct SingleLockStore {
    states: Mutex<HashMap<String, KeyState>>,
    decisions: AtomicU64,
}

impl Store for SingleLockStore {
    fn check(
        &self,
        key: &str,
        limits: &[Limit],
        cost: Cost,
        now: Timestamp,
        mode: Mode,
    ) -> Result<Decision, StoreError> {
        self.decisions.fetch_add(1, Ordering::Relaxed);
        let mut states = self.states.lock();
        // Look up without allocating; insert only when something is recorded.
        if let Some(state) = states.get_mut(key) {
            return Ok(state.apply(limits, cost, now, mode));
        }
        let mut state = KeyState::new();
        let decision = state.apply(limits, cost, now, mode);
        if !state.is_idle(now) {
            states.insert(key.to_string(), state);
        }
        Ok(decision)
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let tiers = TierMap::new(Tier::new("default", ["3/1m".parse()?])?);
    let clock = ManualClock::new(Timestamp::from_millis(1_700_000_000_000));
    let limiter = Limiter::new(SingleLockStore::default(), tiers, clock.clone());

    let accepted = (0..5)
        .filter(|_| {
            limiter
                .acquire("carol", Cost::message(1, 0))
                .is_ok_and(|d| d.is_allowed())
        })
        .count();
    println!("accepted {accepted} of 5 in the first minute");
    assert_eq!(accepted, 3);

    clock.advance(std::time::Duration::from_secs(61));
    let d = limiter.acquire("carol", Cost::message(1, 0))?;
    println!("a minute later: allowed = {}", d.is_allowed());
    assert!(d.is_allowed());
    println!(
        "the store made {} decisions",
        limiter.store().decisions.load(Ordering::Relaxed)
    );
    Ok(())
}
