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
//! from when it began; a request that arrives in pieces keeps the deadline of its
//! first byte), and every 100 ms the watchdog shuts down the sockets whose deadline
//! has passed, so a client that stalls half-way through a request, drips bytes, or
//! stops reading replies is dropped. (`SO_RCVTIMEO` arms a kernel timer on every
//! blocking read; measured, it cost about 7% of throughput.) At shutdown every
//! connection's read side is shut down: a thread waiting for the next request wakes
//! with end-of-file and exits; a thread deciding a request finishes it and answers
//! first.

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

/// A connection's deadline, in milliseconds since the [`Workers`] were created;
/// `u64::MAX` while none applies (a decision in progress).
struct Deadline {
    at_ms: AtomicU64,
}

impl Deadline {
    /// The deadline `within` from `now`.
    fn set(&self, workers: &Workers, now: Instant, within: Duration) {
        let ms = workers
            .ms_at(now)
            .saturating_add(u64::try_from(within.as_millis()).unwrap_or(u64::MAX));
        self.at_ms.store(ms, Ordering::Relaxed);
    }
    fn clear(&self) {
        self.at_ms.store(u64::MAX, Ordering::Relaxed);
    }
}

/// The connection threads of one server.
pub struct Workers {
    stopping: AtomicBool,
    next: AtomicU64,
    open: Mutex<HashMap<u64, (Stream, Arc<Deadline>)>>,
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
                        for (closer, deadline) in w.open.lock().values() {
                            if deadline.at_ms.load(Ordering::Relaxed) <= now {
                                deadline.clear();
                                closer.shutdown(Shutdown::Both);
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
        let deadline = Arc::new(Deadline {
            at_ms: AtomicU64::new(u64::MAX),
        });
        deadline.set(self, Instant::now(), policy.config().server.idle_timeout);
        match stream.closer() {
            Ok(c) => {
                self.open.lock().insert(id, (c, Arc::clone(&deadline)));
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
                        deadline: &deadline,
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
        for (closer, _) in self.open.lock().values() {
            closer.shutdown(Shutdown::Read);
        }
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
    deadline: &'a Deadline,
}

impl Connection<'_> {
    /// Decides on this thread: an in-process store never waits, so one poll completes
    /// the future; a store with network calls (Redis) is driven by the runtime.
    fn decide<'c>(
        &self,
        req: &PolicyRequest<'_>,
        state: &'c mut ConnState,
        now: Timestamp,
    ) -> Verdict<'c> {
        let mut fut = std::pin::pin!(self.policy.decide(req, state, now));
        if self.policy.backend().decides_inline()
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
        let (policy, workers, deadline, peer) =
            (self.policy, self.workers, self.deadline, self.peer);
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
                        deadline.clear();
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
                    deadline.set(workers, Instant::now(), idle);
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
                    Ok(n) => end += n,
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
            deadline.set(workers, answered, idle);
            if let Err(e) = stream.write_all(&out) {
                tracing::debug!(client = peer, error = %e, "write failed (or the client does not read its replies)");
                return;
            }
        }
    }
}
