//! Bounded failure for a store that waits on the network (Redis): a cap on the calls
//! in flight, and a circuit that stops calling a store that keeps failing.
//!
//! - **In flight.** At most `[server] max_store_calls_in_flight` calls run at once
//!   (counted until the call really returns, not until its caller gave up at
//!   `decision_timeout`: a hung store would otherwise pile up blocked threads). A
//!   request beyond the cap is refused at once ([`Guard::admit`]) and gets the
//!   `on_store_error` answer.
//! - **Circuit.** After [`OPEN_AFTER`] calls in a row failed (a timeout, or the store
//!   unavailable; a reply the store did not understand is an answer, and counts as
//!   neither), the circuit opens: every request is refused at once, without calling
//!   the store, and one background thread probes the store ([`VolumeStore::probe`]),
//!   one call at a time: first after [`FIRST_OPEN`], then after twice as long after
//!   each failed probe, up to [`MAX_OPEN`]. A probe (or a late call) that succeeds
//!   closes the circuit. A circuit that opens again within [`REOPEN_WITHIN`] of
//!   closing starts from the period it had reached, so a store that answers probes
//!   but fails real calls is not hammered every second.
//! - **Local fallback** (`on_store_error = "local"`): while the circuit is open and
//!   requests are decided with the server's own counters, the fallback is *active*:
//!   one line is logged when it starts and one when the circuit closes, and the
//!   time is counted ([`Health::local_seconds`]). Single failures while the circuit
//!   is closed are decided locally too, without a switch.
//!
//! The probe thread holds only a weak reference: it ends when the circuit closes or
//! the backend is dropped.
//!
//! [`VolumeStore::probe`]: super::VolumeStore::probe

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use ratelimit_core::StoreError;

/// Failed calls in a row that open the circuit.
pub const OPEN_AFTER: u32 = 5;
/// How long the circuit stays open before the first probe.
pub const FIRST_OPEN: Duration = Duration::from_secs(1);
/// The longest wait between two probes.
pub const MAX_OPEN: Duration = Duration::from_secs(8);
/// A circuit opening again this soon after it closed waits as long as it last did.
pub const REOPEN_WITHIN: Duration = Duration::from_secs(30);
/// How often a waiting probe thread checks that it is still wanted.
const PROBE_TICK: Duration = Duration::from_millis(50);

/// Checks that the store answers (a background probe).
pub(super) type Probe = Box<dyn Fn() -> Result<(), StoreError> + Send + Sync>;

/// What the guard counts, for `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Health {
    /// Store calls running now.
    pub in_flight: usize,
    /// Whether the circuit is open (the store is not called).
    pub circuit_open: bool,
    /// How many times the circuit opened.
    pub circuit_opens: u64,
    /// Requests refused without a call: the cap on calls in flight was reached.
    pub refused_in_flight: u64,
    /// Requests refused without a call: the circuit was open.
    pub refused_circuit_open: u64,
    /// Whether requests are decided with the server's own counters now.
    pub local_active: bool,
    /// Seconds spent deciding with the server's own counters, in all.
    pub local_seconds: f64,
}

/// The cap on calls in flight, and the circuit, of one backend.
pub(super) struct Guard {
    /// What logs call the store.
    name: &'static str,
    probe: Probe,
    in_flight: AtomicUsize,
    refused_in_flight: AtomicU64,
    refused_open: AtomicU64,
    /// Read on every call; written only when the circuit opens or closes.
    open: AtomicBool,
    /// Failed calls in a row.
    failures: AtomicU32,
    /// Whether the local fallback is active (mirrors `Inner::local_since`).
    local_active: AtomicBool,
    /// Counts openings; a probe thread ends when it is not its own.
    generation: AtomicU64,
    inner: Mutex<Inner>,
}

/// The guard's state that changes only when the circuit opens or closes.
struct Inner {
    /// How long the next wait for a probe is.
    period: Duration,
    opened_at: Option<Instant>,
    closed_at: Option<Instant>,
    /// Since when requests have been decided locally (the fallback is active).
    local_since: Option<Instant>,
    /// Time spent in the local fallback before `local_since`.
    local_total: Duration,
}

/// One call in flight; the count goes down when it is dropped.
pub(super) struct Permit {
    guard: Arc<Guard>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.guard.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Guard {
    pub(super) fn new(name: &'static str, probe: Probe) -> Guard {
        Guard {
            name,
            probe,
            in_flight: AtomicUsize::new(0),
            refused_in_flight: AtomicU64::new(0),
            refused_open: AtomicU64::new(0),
            open: AtomicBool::new(false),
            failures: AtomicU32::new(0),
            local_active: AtomicBool::new(false),
            generation: AtomicU64::new(0),
            inner: Mutex::new(Inner {
                period: FIRST_OPEN,
                opened_at: None,
                closed_at: None,
                local_since: None,
                local_total: Duration::ZERO,
            }),
        }
    }

    /// A permit for one call, or the error a request refused without a call gets:
    /// the circuit is open, or `max_in_flight` calls are running.
    pub(super) fn admit(self: &Arc<Self>, max_in_flight: usize) -> Result<Permit, StoreError> {
        if self.open.load(Ordering::Acquire) {
            self.refused_open.fetch_add(1, Ordering::Relaxed);
            return Err(StoreError::Unavailable(format!(
                "{} failed {OPEN_AFTER} times in a row: not called while the circuit is open",
                self.name
            )));
        }
        if self.in_flight.fetch_add(1, Ordering::AcqRel) >= max_in_flight {
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
            self.refused_in_flight.fetch_add(1, Ordering::Relaxed);
            return Err(StoreError::Unavailable(format!(
                "{max_in_flight} calls to {} in flight (max_store_calls_in_flight): not called",
                self.name
            )));
        }
        Ok(Permit {
            guard: Arc::clone(self),
        })
    }

    /// Notes how a call ended: a success closes the circuit; a timeout or an
    /// unavailable store counts toward opening it.
    pub(super) fn record<T>(self: &Arc<Self>, result: &Result<T, StoreError>) {
        match result {
            Ok(_) | Err(StoreError::Full { .. }) => self.succeeded(),
            Err(e @ (StoreError::Timeout(_) | StoreError::Unavailable(_))) => self.failed(e),
            // The store answered, with something unexpected: not an outage.
            Err(_) => {}
        }
    }

    fn succeeded(&self) {
        // Read first: a write on every call would take the line from other cores.
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
        }
        if self.open.load(Ordering::Acquire) {
            self.close("a call succeeded");
        }
    }

    fn failed(self: &Arc<Self>, error: &StoreError) {
        let n = self
            .failures
            .fetch_add(1, Ordering::Relaxed)
            .saturating_add(1);
        if n >= OPEN_AFTER && !self.open.load(Ordering::Acquire) {
            self.trip(n, error);
        }
    }

    /// Opens the circuit (if another call has not) and starts the probe thread.
    fn trip(self: &Arc<Self>, failures: u32, error: &StoreError) {
        let (generation, period) = {
            let mut inner = self.inner.lock();
            if self.open.load(Ordering::Acquire) {
                return;
            }
            let now = Instant::now();
            if inner
                .closed_at
                .is_none_or(|c| now.saturating_duration_since(c) > REOPEN_WITHIN)
            {
                inner.period = FIRST_OPEN;
            }
            inner.opened_at = Some(now);
            self.open.store(true, Ordering::Release);
            (
                self.generation.fetch_add(1, Ordering::AcqRel) + 1,
                inner.period,
            )
        };
        tracing::warn!(
            store = self.name,
            failures,
            error = %error,
            first_probe_in = ?period,
            "store circuit open: answering per on_store_error without calling the store, and probing it in the background"
        );
        let weak = Arc::downgrade(self);
        // Log where the tripping thread logs (a scoped subscriber of an embedder).
        let dispatch = tracing::dispatcher::get_default(|d| d.clone());
        let spawned = std::thread::Builder::new()
            .name("store-probe".into())
            .stack_size(256 * 1024)
            .spawn(move || {
                tracing::dispatcher::with_default(&dispatch, || {
                    probe_until_closed(&weak, generation);
                });
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the store probe thread: closing the circuit again");
            self.close("no probe thread");
        }
    }

    /// Closes the circuit; ends the local fallback if it was active.
    fn close(&self, why: &str) {
        let mut inner = self.inner.lock();
        if !self.open.load(Ordering::Acquire) {
            return;
        }
        self.open.store(false, Ordering::Release);
        self.failures.store(0, Ordering::Relaxed);
        let now = Instant::now();
        inner.closed_at = Some(now);
        let open_for = inner
            .opened_at
            .map_or(Duration::ZERO, |at| now.saturating_duration_since(at));
        match inner.local_since.take() {
            Some(since) => {
                let local = now.saturating_duration_since(since);
                inner.local_total += local;
                self.local_active.store(false, Ordering::Release);
                tracing::warn!(
                    store = self.name,
                    after = ?local,
                    "switching back to the shared store: it answers again ({why}); the local fallback has ended"
                );
            }
            None => tracing::info!(
                store = self.name,
                open_for = ?open_for,
                "store circuit closed: the store answers again ({why})"
            ),
        }
    }

    /// Notes that a request was decided with the server's own counters: while the
    /// circuit is open this is the local fallback, switched on once (logged).
    pub(super) fn decided_locally(&self) {
        if self.local_active.load(Ordering::Acquire) || !self.open.load(Ordering::Acquire) {
            return;
        }
        let mut inner = self.inner.lock();
        if !self.open.load(Ordering::Acquire) || inner.local_since.is_some() {
            return;
        }
        inner.local_since = Some(Instant::now());
        self.local_active.store(true, Ordering::Release);
        tracing::warn!(
            store = self.name,
            "switching to the local fallback: the shared store is failing, so this server decides with its own counters (on_store_error = \"local\") until it answers again"
        );
    }

    /// What the guard counts now.
    pub(super) fn health(&self) -> Health {
        let inner = self.inner.lock();
        let local = inner.local_total + inner.local_since.map_or(Duration::ZERO, |s| s.elapsed());
        Health {
            in_flight: self.in_flight.load(Ordering::Relaxed),
            circuit_open: self.open.load(Ordering::Acquire),
            circuit_opens: self.generation.load(Ordering::Relaxed),
            refused_in_flight: self.refused_in_flight.load(Ordering::Relaxed),
            refused_circuit_open: self.refused_open.load(Ordering::Relaxed),
            local_active: inner.local_since.is_some(),
            local_seconds: local.as_secs_f64(),
        }
    }
}

/// The probe thread: waits the open period, probes, and either closes the circuit
/// or doubles the period. Ends when the circuit closes, opens anew (another thread
/// probes then), or the backend is gone.
fn probe_until_closed(weak: &Weak<Guard>, generation: u64) {
    let current = |g: &Guard| {
        g.open.load(Ordering::Acquire) && g.generation.load(Ordering::Acquire) == generation
    };
    loop {
        let wait = match weak.upgrade() {
            Some(g) if current(&g) => g.inner.lock().period,
            _ => return,
        };
        let until = Instant::now() + wait;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            std::thread::sleep(left.min(PROBE_TICK));
            match weak.upgrade() {
                Some(g) if current(&g) => {}
                _ => return,
            }
        }
        let Some(g) = weak.upgrade() else { return };
        if !current(&g) {
            return;
        }
        match (g.probe)() {
            Ok(()) => {
                g.close("a probe succeeded");
                return;
            }
            Err(e) => {
                let mut inner = g.inner.lock();
                inner.period = (inner.period * 2).min(MAX_OPEN);
                tracing::debug!(store = g.name, error = %e, next_probe_in = ?inner.period, "store probe failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    fn guard(up: &Arc<AtomicBool>) -> Arc<Guard> {
        let up = Arc::clone(up);
        Arc::new(Guard::new(
            "test",
            Box::new(move || {
                if up.load(Ordering::SeqCst) {
                    Ok(())
                } else {
                    Err(StoreError::Unavailable("down".into()))
                }
            }),
        ))
    }

    fn down() -> Result<(), StoreError> {
        Err(StoreError::Timeout(Duration::from_millis(1)))
    }

    #[test]
    fn calls_beyond_the_cap_are_refused_until_one_returns() {
        let g = guard(&Arc::new(AtomicBool::new(true)));
        let a = g.admit(2).unwrap();
        let _b = g.admit(2).unwrap();
        assert!(g.admit(2).is_err());
        assert_eq!(g.health().in_flight, 2);
        assert_eq!(g.health().refused_in_flight, 1);
        drop(a);
        assert!(g.admit(2).is_ok());
    }

    #[test]
    fn the_circuit_opens_after_failures_in_a_row_only() {
        let up = Arc::new(AtomicBool::new(false));
        let g = guard(&up);
        for _ in 0..OPEN_AFTER - 1 {
            g.record(&down());
        }
        // A success in between starts the count again.
        g.record(&Ok(()));
        for _ in 0..OPEN_AFTER - 1 {
            g.record(&down());
        }
        // An unexpected reply is an answer: it counts as neither.
        g.record::<()>(&Err(StoreError::Protocol("?".into())));
        assert!(g.admit(10).is_ok(), "still closed");
        g.record(&down());
        assert!(g.health().circuit_open);
        assert!(g.admit(10).is_err(), "open: refused without a call");
        assert_eq!(g.health().refused_circuit_open, 1);
        assert_eq!(g.health().circuit_opens, 1);
        // A call that was in flight and succeeds closes it.
        g.record(&Ok(()));
        assert!(!g.health().circuit_open);
        assert!(g.admit(10).is_ok());
    }

    #[test]
    fn the_local_fallback_is_active_only_while_the_circuit_is_open() {
        let up = Arc::new(AtomicBool::new(false));
        let g = guard(&up);
        g.decided_locally();
        assert!(!g.health().local_active, "a single failure is no switch");
        for _ in 0..OPEN_AFTER {
            g.record(&down());
        }
        g.decided_locally();
        g.decided_locally();
        assert!(g.health().local_active);
        g.record(&Ok(()));
        let h = g.health();
        assert!(!h.local_active && !h.circuit_open);
        assert!(h.local_seconds > 0.0);
    }

    #[test]
    fn a_probe_closes_the_circuit_once_the_store_answers() {
        let up = Arc::new(AtomicBool::new(false));
        let g = guard(&up);
        for _ in 0..OPEN_AFTER {
            g.record(&down());
        }
        assert!(g.health().circuit_open);
        up.store(true, Ordering::SeqCst);
        // The first probe comes after FIRST_OPEN (real time: the probe thread
        // sleeps; this is the one test here that waits).
        let start = Instant::now();
        while g.health().circuit_open {
            assert!(start.elapsed() < FIRST_OPEN * 5, "no probe closed it");
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(start.elapsed() >= FIRST_OPEN / 2);
    }
}
