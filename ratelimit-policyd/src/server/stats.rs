//! The server's own counts: connections, and how long requests take to answer.
//! Metrics and `admin stats` read them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::striped::StripedCounters;

/// Upper bounds of the request latency histogram, in microseconds.
pub const LATENCY_BUCKETS_US: [u64; 14] = [
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000,
];

/// The histogram's sum (µs), after its buckets and `+Inf`.
const LATENCY_SUM: usize = LATENCY_BUCKETS_US.len() + 1;
/// The histogram's count.
const LATENCY_COUNT: usize = LATENCY_SUM + 1;

/// Request latency: time from a complete request to its answer written. Striped
/// (every request observes it): non-cumulative counts per bucket and `+Inf`, then
/// the sum in µs and the count.
#[derive(Debug, Default)]
pub struct Histogram(StripedCounters<{ LATENCY_COUNT + 1 }>);

impl Histogram {
    /// Records one observation.
    pub fn observe(&self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        let i = LATENCY_BUCKETS_US
            .iter()
            .position(|b| us <= *b)
            .unwrap_or(LATENCY_BUCKETS_US.len());
        self.0.add(i, 1);
        self.0.add(LATENCY_SUM, us);
        self.0.add(LATENCY_COUNT, 1);
    }

    /// Cumulative counts per bucket (the last is `+Inf`), the sum in µs, the count.
    pub fn snapshot(&self) -> (Vec<u64>, u64, u64) {
        let all = self.0.all();
        let mut acc = 0u64;
        let cumulative = all
            .iter()
            .take(LATENCY_SUM)
            .map(|n| {
                acc = acc.wrapping_add(*n);
                acc
            })
            .collect();
        let at = |i: usize| all.get(i).copied().unwrap_or(0);
        (cumulative, at(LATENCY_SUM), at(LATENCY_COUNT))
    }
}

/// Connection counters and request latency.
#[derive(Debug)]
pub struct ServerStats {
    /// Open connections (policy clients).
    pub connections_open: AtomicU64,
    /// Connections accepted since start.
    pub connections_total: AtomicU64,
    /// TCP connections refused because the client is not in `[server] allow`.
    pub connections_refused: AtomicU64,
    /// Unix-socket connections refused because the peer's uid is not in
    /// `[server] allow_uids`.
    pub connections_refused_uid: AtomicU64,
    /// Connections closed at the cap, the one idle longest, to admit a new one.
    pub connections_evicted: AtomicU64,
    /// Request latency.
    pub latency: Histogram,
    next_conn: AtomicU64,
    started: Instant,
}

impl Default for ServerStats {
    fn default() -> Self {
        ServerStats {
            connections_open: AtomicU64::new(0),
            connections_total: AtomicU64::new(0),
            connections_refused: AtomicU64::new(0),
            connections_refused_uid: AtomicU64::new(0),
            connections_evicted: AtomicU64::new(0),
            latency: Histogram::default(),
            next_conn: AtomicU64::new(0),
            started: Instant::now(),
        }
    }
}

impl ServerStats {
    /// Counts a connection opened; the guard counts it closed. Returns its id too
    /// (records keep connections apart by it).
    pub fn connection_opened(&self) -> (u64, ConnectionGuard<'_>) {
        self.connections_open.fetch_add(1, Ordering::Relaxed);
        self.connections_total.fetch_add(1, Ordering::Relaxed);
        let id = self.next_conn.fetch_add(1, Ordering::Relaxed) + 1;
        (id, ConnectionGuard(self))
    }

    /// Time since the server's counters were made (its start).
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }
}

/// Counts the connection closed when dropped.
pub struct ConnectionGuard<'a>(&'a ServerStats);

impl Drop for ConnectionGuard<'_> {
    fn drop(&mut self) {
        self.0.connections_open.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(40));
        h.observe(Duration::from_micros(300));
        h.observe(Duration::from_secs(5));
        let (b, sum, n) = h.snapshot();
        assert_eq!(b.first(), Some(&1));
        assert_eq!(b.get(3), Some(&2));
        assert_eq!(b.last(), Some(&3));
        assert_eq!(n, 3);
        assert_eq!(sum, 5_000_340);
    }
}
