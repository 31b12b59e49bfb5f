//! The backend's guarded calls over a store that waits on the network and fails on
//! demand (an embedder's store: no Redis needed).

use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::task::{Context, Poll, Waker};

use super::*;

/// A network store that answers from memory while `up`, and fails otherwise;
/// counts its calls.
struct Flaky {
    up: AtomicBool,
    calls: AtomicUsize,
    inner: MemoryStore,
    longest: Option<Duration>,
}

impl Store for Flaky {
    fn check(
        &self,
        key: &str,
        limits: &[ratelimit_core::Limit],
        cost: Cost,
        now: Timestamp,
        mode: Mode,
    ) -> Result<Decision, StoreError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self.up.load(Ordering::SeqCst) {
            self.inner.check(key, limits, cost, now, mode)
        } else {
            Err(StoreError::Unavailable("down".into()))
        }
    }
}

impl VolumeStore for Flaky {
    fn scan(&self, _: &mut dyn FnMut(&str, &KeyState)) -> Result<(), StoreError> {
        Ok(())
    }
    fn forget(&self, _: &str) -> Result<bool, StoreError> {
        Ok(false)
    }
    fn longest_call(&self) -> Option<Duration> {
        self.longest
    }
}

fn flaky(longest: Option<Duration>) -> (Arc<Flaky>, Backend) {
    let store = Arc::new(Flaky {
        up: AtomicBool::new(true),
        calls: AtomicUsize::new(0),
        inner: MemoryStore::new(),
        longest,
    });
    let backend = Backend::new(
        Arc::clone(&store) as Arc<dyn VolumeStore>,
        Arc::new(DistinctMemoryStore::new(10)),
        Calls::Blocking,
        "flaky",
    )
    .with_local_max_keys(10);
    (store, backend)
}

/// Polls `fut` once, on this thread (no runtime), as a connection thread does.
fn poll_once<T>(fut: impl Future<Output = T>) -> T {
    let mut fut = std::pin::pin!(fut);
    match fut.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("the call did not complete on this thread"),
    }
}

const BOUNDS: CallBounds = CallBounds {
    timeout: Duration::from_millis(500),
    max_in_flight: 4,
};

#[test]
fn a_store_bounding_its_calls_within_the_timeout_is_called_on_this_thread() {
    let (_, unknown) = flaky(None);
    assert!(!unknown.decides_inline(BOUNDS.timeout));
    let (_, slow) = flaky(Some(Duration::from_secs(1)));
    assert!(!slow.decides_inline(BOUNDS.timeout));
    // The network store's bound counts too: the memory one has none.
    let (_, fast) = flaky(Some(Duration::from_millis(400)));
    assert!(!fast.decides_inline(BOUNDS.timeout));
    let both = Backend {
        longest: (
            Some(Duration::from_millis(400)),
            Some(Duration::from_millis(400)),
        ),
        ..fast
    };
    assert!(both.decides_inline(BOUNDS.timeout));
    assert!(!both.decides_inline(Duration::from_millis(399)));
    assert!(Backend::memory(10).decides_inline(Duration::from_millis(1)));
}

#[test]
fn failures_open_the_circuit_and_the_local_stores_decide_meanwhile() {
    let (store, backend) = flaky(Some(Duration::from_millis(10)));
    let tier = Arc::new(Tier::new("t", ["2/1h".parse().unwrap()]).unwrap());
    let now = Timestamp::from_millis(1_000_000);
    let check = || {
        poll_once(backend.check(
            "alice",
            &tier,
            Cost::message(1, 0),
            now,
            Mode::Acquire,
            BOUNDS,
        ))
    };
    assert!(check().unwrap().is_allowed());
    store.up.store(false, Ordering::SeqCst);
    for _ in 0..OPEN_AFTER {
        assert!(check().is_err());
    }
    let calls = store.calls.load(Ordering::SeqCst);
    assert!(backend.health().circuit_open);
    assert!(check().is_err());
    assert_eq!(store.calls.load(Ordering::SeqCst), calls, "not called");
    assert_eq!(backend.health().refused_circuit_open, 1);
    assert_eq!(backend.health().in_flight, 0);

    // The local counters: their own count, swept with the rest.
    let local = |n: u64| {
        (0..n)
            .filter(|_| {
                backend
                    .check_local("alice", &tier, Cost::message(1, 0), now, Mode::Acquire)
                    .unwrap()
                    .is_allowed()
            })
            .count()
    };
    assert_eq!(local(3), 2);
    assert!(backend.health().local_active);
    assert_eq!(backend.local_tracked_keys(), 1);
    backend.sweep(now.saturating_add(Duration::from_secs(7200)));
    assert_eq!(backend.local_tracked_keys(), 0);
}
