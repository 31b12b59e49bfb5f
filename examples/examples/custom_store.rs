//! A custom `Store`: keep key states wherever you like, decide exactly as the
//! built-in stores do by calling `KeyState::apply` under your own lock.
//!
//! This one keeps everything behind one mutex and counts decisions — the shape a
//! store for another backend (an embedded database, a shared-memory segment) takes.
//! It serves a `Limiter`, and then the policy server's own policy: with the two
//! admin capabilities of `VolumeStore` (list and forget keys), a custom store runs
//! `ratelimit-policyd`'s decisions unchanged.
//!
//! Run with `cargo run -p ratelimit-examples --example custom_store`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

use std::sync::Arc;

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use ratelimit_core::store::{DistinctMemoryStore, StoreError};
use ratelimit_core::{
    Clock, Cost, Decision, KeyState, Limit, Limiter, ManualClock, Mode, Store, Tier, TierMap,
    Timestamp,
};
use ratelimit_policyd::backend::{Backend, Calls, VolumeStore};
use ratelimit_policyd::config;
use ratelimit_policyd::policy::{ConnState, NoObserver, Policy};
use ratelimit_policyd::protocol::{Attribute, PolicyRequest};

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

impl VolumeStore for SingleLockStore {
    fn scan(&self, f: &mut dyn FnMut(&str, &KeyState)) -> Result<(), StoreError> {
        for (key, state) in self.states.lock().iter() {
            f(key, state);
        }
        Ok(())
    }

    fn forget(&self, key: &str) -> Result<bool, StoreError> {
        Ok(self.states.lock().remove(key).is_some())
    }
}

/// The server's policy over the custom store: Postfix's END-OF-MESSAGE requests for
/// one user, the third refused by a tier of 2 per hour.
fn serve_the_policy() -> Result<(), Box<dyn std::error::Error>> {
    let cfg = config::parse(
        "[tiers.default]\nlimits = [\"2/1h\"]\n",
        "example.toml",
        None,
    )?;
    let store = Arc::new(SingleLockStore::default());
    let backend = Backend::new(
        Arc::clone(&store) as Arc<dyn VolumeStore>,
        Arc::new(DistinctMemoryStore::new(10_000)),
        Calls::Inline,
        "single-lock",
    );
    let clock = ManualClock::new(Timestamp::from_millis(1_700_000_000_000));
    let policy = Policy::new(
        Arc::new(ArcSwap::from_pointee(cfg)),
        backend,
        Arc::new(clock.clone()),
        Arc::new(NoObserver),
    );
    let rt = tokio::runtime::Builder::new_current_thread().build()?;
    let mut conn = ConnState::new(1);
    let mut answers = Vec::new();
    for instance in ["m1", "m2", "m3"] {
        let attrs = [
            ("request", "smtpd_access_policy"),
            ("protocol_state", "END-OF-MESSAGE"),
            ("sasl_username", "Dave@Example.com"),
            ("instance", instance),
            ("recipient_count", "1"),
        ]
        .map(|(name, value)| Attribute {
            name: name.as_bytes(),
            value: value.as_bytes(),
        });
        let req = PolicyRequest::from_attributes(&attrs)?;
        let verdict = rt.block_on(policy.decide(&req, &mut conn, clock.now()));
        answers.push(verdict.action.to_string());
    }
    println!("the policy over the custom store answered: {answers:?}");
    assert_eq!(answers[..2], ["DUNNO", "DUNNO"]);
    assert!(answers[2].starts_with("DEFER_IF_PERMIT"), "{answers:?}");
    let mut keys = Vec::new();
    store.scan(&mut |key, _| keys.push(key.to_string()))?;
    assert_eq!(keys, ["dave@example.com"]);
    assert!(policy.forget("dave@example.com")?);
    Ok(())
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
    serve_the_policy()
}
