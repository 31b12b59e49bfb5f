//! The connection loop: each connection served by one OS thread, with blocking
//! socket I/O.
//!
//! Postfix keeps one persistent policy connection per smtpd process and sends one
//! request at a time on it, waiting for the reply. For that pattern a thread blocked
//! in `read` costs two system calls per request (`read`, `write`); an async task
//! costs four or more (`epoll_wait`, `read`, `write`, and a `read` that returns
//! `EAGAIN`), plus a cross-thread wake-up. Measured with the load generator on this
//! project's 2-core machine, the async handler reached about 0.6x the throughput of
//! a do-nothing thread-per-connection server, so connections are served here; the
//! accept loop, the store's network calls (Redis), timers and maintenance stay on
//! the tokio runtime. Threads are bounded by `max_connections` (each holds a
//! connection permit) and have small stacks.
//!
//! Timeouts are kept by one watchdog thread, not by socket timeouts: each connection
//! publishes a deadline (waiting for a request, or writing a reply: `idle_timeout`
//! from when it began; a request that arrives in pieces must be whole within
//! [`REQUEST_DEADLINE`] of its first byte, and bytes dripping in never extend it), and
//! every 100 ms the watchdog shuts down the sockets whose deadline
//! has passed, so a client that stalls half-way through a request, drips bytes, or
//! stops reading replies is dropped. (`SO_RCVTIMEO` arms a kernel timer on every
//! blocking read; measured, it cost about 7% of throughput.) At shutdown every
//! connection's read side is shut down: a thread waiting for the next request wakes
//! with end-of-file and exits; a thread deciding a request finishes it and answers
//! first.
//!
//! Each connection also publishes since when it has been idle: waiting for a request
//! with nothing of it read yet. At the connection cap the accept loop closes the
//! connection idle longest ([`Workers::evict_longest_idle`]) to admit a new one, so
//! idle connections cannot hold every slot and lock Postfix out (Postfix reconnects
//! by itself). A connection that has read part of a request, is deciding one or is
//! writing its answer is never chosen: the connection claims itself busy and the
//! evictor claims it evicted with one compare-and-swap each, so exactly one of them
//! wins.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use ratelimit_core::Timestamp;
use tokio::runtime::Handle;
use tokio::sync::OwnedSemaphorePermit;

use super::stats::ServerStats;
use crate::logthrottle::{LOG_EVERY, LogThrottle};
use crate::policy::{ConnState, Policy, Verdict};
use crate::protocol::{
    Attribute, ParseError, PolicyRequest, RequestBounds, Status, encode_response, parse_request,
};

/// Bad requests: one log line per interval (`suppressed` says how many were left
/// out), so a garbage flood cannot flood the log.
static BAD_REQUEST_LOG: LogThrottle = LogThrottle::new(LOG_EVERY);

/// Logs a malformed request (its connection is closed without a reply).
fn log_bad_request(peer: &str, e: &ParseError) {
    if let Some(suppressed) = BAD_REQUEST_LOG.allow() {
        tracing::warn!(client = peer, error = %e, suppressed, "closing connection: bad request");
    }
}

/// How long a request may take to arrive once its first bytes have: a client that
/// drips a request holds a connection slot that cannot be given to another, so it
/// gets seconds, not `idle_timeout`.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(10);

/// Stack size of a connection thread: the handler keeps its buffers on the heap.
const STACK_SIZE: usize = 256 * 1024;

/// An accepted connection, switched to blocking I/O.
#[derive(Debug)]
pub enum Stream {
    /// TCP.
    Tcp(std::net::TcpStream),
    /// Unix socket.
    Unix(std::os::unix::net::UnixStream),
}

impl Stream {
    /// A second handle to the same socket, to shut it down from another thread.
    fn closer(&self) -> io::Result<Stream> {
        match self {
            Stream::Tcp(s) => s.try_clone().map(Stream::Tcp),
            Stream::Unix(s) => s.try_clone().map(Stream::Unix),
        }
    }

    fn shutdown(&self, how: Shutdown) {
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(how),
            Stream::Unix(s) => s.shutdown(how),
        };
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.write_all(buf),
            Stream::Unix(s) => s.write_all(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// How often the watchdog looks for connections past their deadline.
const WATCHDOG_EVERY: Duration = Duration::from_millis(100);

/// [`Slot::idle_since_ms`] while the connection is busy: part of a request read, a
/// decision or a write in progress.
const BUSY: u64 = u64::MAX;
/// [`Slot::idle_since_ms`] once the connection was chosen to yield its slot.
const EVICTED: u64 = u64::MAX - 1;

/// What a connection publishes for the watchdog and the evictor, in milliseconds
/// since the [`Workers`] were created.
struct Slot {
    /// When the connection is shut down; `u64::MAX` while no deadline applies (a
    /// decision in progress).
    deadline_ms: AtomicU64,
    /// Since when it has been waiting for a request with nothing of it read, or
    /// [`BUSY`], or [`EVICTED`].
    idle_since_ms: AtomicU64,
}

impl Slot {
    /// The deadline `within` from `now`.
    fn set_deadline(&self, workers: &Workers, now: Instant, within: Duration) {
        let ms = workers
            .ms_at(now)
            .saturating_add(u64::try_from(within.as_millis()).unwrap_or(u64::MAX));
        self.deadline_ms.store(ms, Ordering::Relaxed);
    }
    /// The deadline `within` from `now`, unless the one set is sooner.
    fn tighten_deadline(&self, workers: &Workers, now: Instant, within: Duration) {
        let ms = workers
            .ms_at(now)
            .saturating_add(u64::try_from(within.as_millis()).unwrap_or(u64::MAX));
        self.deadline_ms.fetch_min(ms, Ordering::Relaxed);
    }
    fn clear_deadline(&self) {
        self.deadline_ms.store(u64::MAX, Ordering::Relaxed);
    }

    /// Idle from `now_ms` on; `false` when the connection was evicted (it must stop).
    fn idle(&self, now_ms: u64) -> bool {
        self.idle_since_ms
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
                (v != EVICTED).then_some(now_ms.min(EVICTED - 1))
            })
            .is_ok()
    }

    /// Busy (bytes of a request arrived); `false` when the connection was evicted
    /// first (it must stop without answering: the evictor has shut it down).
    fn busy(&self) -> bool {
        self.idle_since_ms.swap(BUSY, Ordering::AcqRel) != EVICTED
    }
}

/// An open connection, as the watchdog and the evictor see it.
struct Open {
    /// A second handle to the socket, to shut it down.
    closer: Stream,
    slot: Arc<Slot>,
    /// The client, for logs.
    peer: Arc<str>,
}

/// A connection closed to free its slot: who, and how long it had been idle.
#[derive(Debug, Clone)]
pub struct Evicted {
    /// The client (`127.0.0.1:41234`, `unix:uid=106`).
    pub peer: Arc<str>,
    /// How long it had waited for a request.
    pub idle: Duration,
}

/// The connection threads of one server.
pub struct Workers {
    stopping: AtomicBool,
    next: AtomicU64,
    open: Mutex<HashMap<u64, Open>>,
    started: Instant,
    watchdog: std::sync::Once,
}

impl Workers {
    /// A new, empty set.
    pub fn new() -> Arc<Workers> {
        Arc::new(Workers {
            stopping: AtomicBool::new(false),
            next: AtomicU64::new(0),
            open: Mutex::new(HashMap::new()),
            started: Instant::now(),
            watchdog: std::sync::Once::new(),
        })
    }

    fn elapsed_ms(&self) -> u64 {
        self.ms_at(Instant::now())
    }

    /// `at` in milliseconds since the workers were created.
    fn ms_at(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.started).as_millis()).unwrap_or(u64::MAX)
    }

    /// Shuts down, every [`WATCHDOG_EVERY`], the connections past their deadline.
    fn start_watchdog(self: &Arc<Self>) {
        let workers = Arc::downgrade(self);
        self.watchdog.call_once(|| {
            let spawned = std::thread::Builder::new()
                .name("policy-watchdog".into())
                .stack_size(STACK_SIZE)
                .spawn(move || {
                    while let Some(w) = workers.upgrade() {
                        if w.stopping() {
                            return;
                        }
                        let now = w.elapsed_ms();
                        for open in w.open.lock().values() {
                            if open.slot.deadline_ms.load(Ordering::Relaxed) <= now {
                                open.slot.clear_deadline();
                                open.closer.shutdown(Shutdown::Both);
                            }
                        }
                        drop(w);
                        std::thread::sleep(WATCHDOG_EVERY);
                    }
                });
            if let Err(e) = spawned {
                tracing::error!(error = %e, "cannot start the connection watchdog: idle connections will not time out");
            }
        });
    }

    /// Serves `stream` on a new thread; the permit is released when it ends.
    pub fn spawn(
        self: &Arc<Self>,
        stream: Stream,
        peer: String,
        policy: Arc<Policy>,
        stats: Arc<ServerStats>,
        rt: Handle,
        permit: OwnedSemaphorePermit,
    ) {
        self.start_watchdog();
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        // Idle from the start: it waits for its first request.
        let slot = Arc::new(Slot {
            deadline_ms: AtomicU64::new(u64::MAX),
            idle_since_ms: AtomicU64::new(self.ms_at(now)),
        });
        slot.set_deadline(self, now, policy.config().server.idle_timeout);
        match stream.closer() {
            Ok(closer) => {
                let open = Open {
                    closer,
                    slot: Arc::clone(&slot),
                    peer: Arc::from(peer.as_str()),
                };
                self.open.lock().insert(id, open);
            }
            Err(e) => {
                tracing::warn!(client = %peer, error = %e, "cannot serve connection");
                return;
            }
        }
        let workers = Arc::clone(self);
        // Log where the accepting thread logs (a scoped subscriber of an embedder).
        let dispatch = tracing::dispatcher::get_default(|d| d.clone());
        let spawned = std::thread::Builder::new()
            .name("policy-conn".into())
            .stack_size(STACK_SIZE)
            .spawn(move || {
                tracing::dispatcher::with_default(&dispatch, || {
                    let (conn_id, open) = stats.connection_opened();
                    let conn = Connection {
                        peer: &peer,
                        policy: &policy,
                        stats: &stats,
                        rt: &rt,
                        workers: &workers,
                        slot: &slot,
                    };
                    conn.serve(stream, ConnState::new(conn_id));
                    drop(open);
                });
                workers.open.lock().remove(&id);
                drop(permit);
            });
        if let Err(e) = spawned {
            // The closure (stream, permit) was dropped with the error: the client sees
            // the connection close and Postfix retries.
            self.open.lock().remove(&id);
            tracing::error!(error = %e, "cannot start a connection thread; connection closed");
        }
    }

    /// Stops serving: connections end after the request they are on.
    pub fn shutdown(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        for open in self.open.lock().values() {
            open.closer.shutdown(Shutdown::Read);
        }
    }

    /// Closes the connection that has been waiting for a request longest, if one
    /// has waited at least `min_idle`, to free its slot: its thread ends and releases
    /// its permit. Connections in the middle of a request (part of it read, deciding,
    /// writing the answer) are never chosen. Returns the connection closed.
    ///
    /// Scans every open connection under the lock of the open set (taken otherwise
    /// only when a connection starts or ends, and by the watchdog).
    pub fn evict_longest_idle(&self, min_idle: Duration) -> Option<Evicted> {
        let min_idle_ms = u64::try_from(min_idle.as_millis()).unwrap_or(u64::MAX);
        let open = self.open.lock();
        // A connection that turns busy between the scan and the claim is skipped;
        // try the next oldest then.
        for _ in 0..8 {
            let now = self.elapsed_ms();
            let oldest = open
                .values()
                .filter_map(|o| {
                    let since = o.slot.idle_since_ms.load(Ordering::Acquire);
                    (since < EVICTED && now.saturating_sub(since) >= min_idle_ms)
                        .then_some((since, o))
                })
                .min_by_key(|(since, _)| *since);
            let (since, victim) = oldest?;
            if victim
                .slot
                .idle_since_ms
                .compare_exchange(since, EVICTED, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                victim.closer.shutdown(Shutdown::Both);
                return Some(Evicted {
                    peer: Arc::clone(&victim.peer),
                    idle: Duration::from_millis(now.saturating_sub(since)),
                });
            }
        }
        None
    }

    fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }
}

/// What a connection thread serves with.
struct Connection<'a> {
    peer: &'a str,
    policy: &'a Policy,
    stats: &'a ServerStats,
    rt: &'a Handle,
    workers: &'a Workers,
    slot: &'a Slot,
}

impl Connection<'_> {
    /// Decides on this thread: an in-process store never waits, nor does a network
    /// store whose own timeouts are within `decision_timeout` (it is called on this
    /// thread), so one poll completes the future; otherwise the runtime drives it
    /// (its calls go to the blocking pool, bounded by `decision_timeout`).
    fn decide<'c>(
        &self,
        req: &PolicyRequest<'_>,
        state: &'c mut ConnState,
        now: Timestamp,
    ) -> Verdict<'c> {
        let timeout = self.policy.config_for(state).server.decision_timeout;
        let mut fut = std::pin::pin!(self.policy.decide(req, state, now));
        if self.policy.backend().decides_inline(timeout)
            && let Poll::Ready(v) = fut.as_mut().poll(&mut Context::from_waker(Waker::noop()))
        {
            return v;
        }
        self.rt.block_on(fut)
    }

    /// Serves requests until the client closes the connection, it idles out, it sends
    /// a malformed request (logged; nothing is sent; only this connection is closed),
    /// or the server shuts down (between requests).
    fn serve(&self, mut stream: Stream, mut state: ConnState) {
        let (policy, workers, slot, peer) = (self.policy, self.workers, self.slot, self.peer);
        let bounds = RequestBounds::DEFAULT;
        let mut buf = vec![0u8; 4096];
        let (mut start, mut end) = (0usize, 0usize);
        let mut out = Vec::with_capacity(256);
        // Whether the wait for the next request has begun (its deadline is set).
        let mut waiting = false;
        loop {
            // Parse the next request straight from the buffer (once: the attributes
            // borrow it), and read more only when it is incomplete.
            let served = {
                let mut slots = [Attribute::EMPTY; 64];
                match parse_request(&buf[start..end], &bounds, &mut slots) {
                    Ok(Status::Complete(p)) => {
                        let started = Instant::now();
                        slot.clear_deadline();
                        match PolicyRequest::from_attributes(&slots[..p.attributes]) {
                            Ok(req) => {
                                let verdict = self.decide(&req, &mut state, policy.now());
                                out.clear();
                                encode_response(&verdict.action, &mut out);
                                Some((p.consumed, started))
                            }
                            Err(e) => {
                                log_bad_request(peer, &e);
                                return;
                            }
                        }
                    }
                    Ok(Status::Partial) => None,
                    Err(e) => {
                        log_bad_request(peer, &e);
                        return;
                    }
                }
            };
            let Some((consumed, started)) = served else {
                if workers.stopping() {
                    return; // between requests
                }
                // The deadline (set when the wait for this request began) bounds the
                // wait and the whole request: bytes dripping in do not extend it.
                if start == end && !waiting {
                    let idle = policy.config_for(&mut state).server.idle_timeout;
                    let now = Instant::now();
                    slot.set_deadline(workers, now, idle);
                    // Between requests: this connection may yield its slot.
                    if !slot.idle(workers.ms_at(now)) {
                        return;
                    }
                    waiting = true;
                }
                if start > 0 {
                    buf.copy_within(start..end, 0);
                    end -= start;
                    start = 0;
                }
                if end == buf.len() {
                    // parse_request refuses a request over max_request, so this stays
                    // bounded.
                    let grown = (buf.len() * 2).min(bounds.max_request + 4096);
                    if grown <= buf.len() {
                        return;
                    }
                    buf.resize(grown, 0);
                }
                match stream.read(&mut buf[end..]) {
                    Ok(0) => {
                        if end > start {
                            tracing::debug!(
                                client = peer,
                                buffered = end - start,
                                "connection closed in the middle of a request"
                            );
                        }
                        return;
                    }
                    Ok(n) => {
                        // A request has begun: never evicted from here until it is
                        // answered; if the evictor came first, stop (it shut the
                        // socket down).
                        if start == end {
                            if !slot.busy() {
                                return;
                            }
                            // Postfix writes a request at once: one still arriving
                            // after REQUEST_DEADLINE holds a slot no evictor may take,
                            // so the watchdog closes it then.
                            slot.tighten_deadline(workers, Instant::now(), REQUEST_DEADLINE);
                        }
                        end += n;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        // Including a socket shut down by the watchdog or at shutdown.
                        tracing::debug!(client = peer, error = %e, "read failed");
                        return;
                    }
                }
                continue;
            };
            start += consumed;
            if start == end {
                (start, end) = (0, 0);
            }
            waiting = false;
            // Observed before the reply goes out, so a client that has its answer sees
            // it counted (the time to write is the kernel's, not ours).
            let answered = Instant::now();
            self.stats
                .latency
                .observe(answered.saturating_duration_since(started));
            // A reply gets idle_timeout to be taken; then the wait for the next
            // request starts its own.
            let idle = policy.config_for(&mut state).server.idle_timeout;
            slot.set_deadline(workers, answered, idle);
            if let Err(e) = stream.write_all(&out) {
                tracing::debug!(client = peer, error = %e, "write failed (or the client does not read its replies)");
                return;
            }
        }
    }
}
