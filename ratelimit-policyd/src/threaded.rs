//! Connections served by one OS thread each, with blocking socket I/O.
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
//! Timeouts are socket timeouts (`SO_RCVTIMEO`/`SO_SNDTIMEO` = `idle_timeout`), so a
//! client that stalls half-way through a request, or stops reading replies, is
//! dropped. At shutdown every connection's read side is shut down: a thread waiting
//! for the next request wakes with end-of-file and exits; a thread deciding a
//! request finishes it and answers first.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::runtime::Handle;
use tokio::sync::OwnedSemaphorePermit;

use crate::policy::{ConnState, Engine};
use crate::protocol::{
    Action, Attribute, Limits, PolicyRequest, Status, encode_response, frame_request, parse_request,
};

/// Stack size of a connection thread: the handler keeps its buffers on the heap.
const STACK_SIZE: usize = 256 * 1024;

/// A blocking stream a connection thread can serve.
pub trait BlockingStream: Read + Write + Send + 'static {
    /// Sets the read and write timeouts.
    fn set_timeouts(&self, d: Duration) -> io::Result<()>;
    /// A second handle to the same socket, used to shut its read side at shutdown.
    fn closer(&self) -> io::Result<Closer>;
}

/// A duplicate handle to a connection's socket.
pub enum Closer {
    /// TCP.
    Tcp(std::net::TcpStream),
    /// Unix socket.
    Unix(std::os::unix::net::UnixStream),
}

impl Closer {
    fn shutdown_read(&self) {
        let _ = match self {
            Closer::Tcp(s) => s.shutdown(Shutdown::Read),
            Closer::Unix(s) => s.shutdown(Shutdown::Read),
        };
    }
}

impl BlockingStream for std::net::TcpStream {
    fn set_timeouts(&self, d: Duration) -> io::Result<()> {
        self.set_read_timeout(Some(d))?;
        self.set_write_timeout(Some(d))
    }
    fn closer(&self) -> io::Result<Closer> {
        self.try_clone().map(Closer::Tcp)
    }
}

impl BlockingStream for std::os::unix::net::UnixStream {
    fn set_timeouts(&self, d: Duration) -> io::Result<()> {
        self.set_read_timeout(Some(d))?;
        self.set_write_timeout(Some(d))
    }
    fn closer(&self) -> io::Result<Closer> {
        self.try_clone().map(Closer::Unix)
    }
}

/// The connection threads of one server.
#[derive(Default)]
pub struct Workers {
    stopping: AtomicBool,
    next: AtomicU64,
    open: Mutex<HashMap<u64, Closer>>,
}

impl Workers {
    /// A new, empty set.
    pub fn new() -> Arc<Workers> {
        Arc::new(Workers::default())
    }

    /// Serves `stream` on a new thread; the permit is released when it ends.
    pub fn spawn<S: BlockingStream>(
        self: &Arc<Self>,
        stream: S,
        peer: String,
        engine: Arc<Engine>,
        rt: Handle,
        permit: OwnedSemaphorePermit,
    ) {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        match stream.closer() {
            Ok(c) => {
                self.open.lock().insert(id, c);
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
                    let open = engine.ops.connection_opened();
                    serve(stream, &peer, &engine, &rt, &workers);
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
        for closer in self.open.lock().values() {
            closer.shutdown_read();
        }
    }

    fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }
}

/// Decides on this thread: the memory store never waits, so one poll completes the
/// future; a store with network calls (Redis) is driven by the runtime.
fn decide(
    engine: &Engine,
    rt: &Handle,
    req: &PolicyRequest<'_>,
    state: &mut ConnState,
) -> Action<'static> {
    let mut fut = std::pin::pin!(engine.decide(req, state));
    if engine.counters().memory().is_some()
        && let Poll::Ready(a) = fut.as_mut().poll(&mut Context::from_waker(Waker::noop()))
    {
        return a;
    }
    rt.block_on(fut)
}

fn serve<S: BlockingStream>(
    mut stream: S,
    peer: &str,
    engine: &Engine,
    rt: &Handle,
    workers: &Workers,
) {
    let limits = Limits::DEFAULT;
    let mut buf = vec![0u8; 4096];
    let (mut start, mut end) = (0usize, 0usize);
    let mut out = Vec::with_capacity(256);
    let mut state = ConnState::default();
    let conn_id = engine.ops.next_connection_id();
    let mut timeout = Duration::ZERO;
    let mut request_started: Option<Instant> = None;
    loop {
        // Frame the next request from what is buffered, reading only when partial.
        let consumed = loop {
            match frame_request(&buf[start..end], &limits) {
                Ok(Status::Complete(p)) => break p.consumed,
                Ok(Status::Partial) => {}
                Err(e) => {
                    crate::server::log_bad_request(peer, &e);
                    return;
                }
            }
            if workers.stopping() {
                return; // between requests
            }
            // The idle timeout bounds the wait for a request and the whole request
            // (a client dripping one byte at a time is cut off as well).
            let idle = engine.config().idle_timeout;
            let wait = match request_started {
                None => idle,
                Some(t) => match idle.checked_sub(t.elapsed()) {
                    Some(left) if !left.is_zero() => left,
                    _ => {
                        tracing::debug!(
                            client = peer,
                            "closing connection: request not completed in time"
                        );
                        return;
                    }
                },
            };
            if wait != timeout {
                if stream.set_timeouts(wait).is_err() {
                    return;
                }
                timeout = wait;
            }
            if start > 0 {
                buf.copy_within(start..end, 0);
                end -= start;
                start = 0;
            }
            if end == buf.len() {
                // frame_request refuses a request over max_request, so this stays bounded.
                let grown = (buf.len() * 2).min(limits.max_request + 4096);
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
                    if end == start {
                        request_started = Some(Instant::now());
                    }
                    end += n;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    tracing::debug!(client = peer, "closing idle connection");
                    return;
                }
                Err(e) => {
                    tracing::debug!(client = peer, error = %e, "read failed");
                    return;
                }
            }
        };
        let started = Instant::now();
        let action = {
            let mut slots = [Attribute::EMPTY; 64];
            let parsed = parse_request(&buf[start..start + consumed], &limits, &mut slots);
            let req = match parsed {
                Ok(Status::Complete(p)) => PolicyRequest::from_attributes(&slots[..p.attributes]),
                Ok(Status::Partial) => return,
                Err(e) => Err(e),
            };
            match req {
                Ok(req) => {
                    let at = engine.now();
                    let action = decide(engine, rt, &req, &mut state);
                    engine.ops.record(conn_id, at, &req, &action);
                    action
                }
                Err(e) => {
                    crate::server::log_bad_request(peer, &e);
                    return;
                }
            }
        };
        start += consumed;
        if start == end {
            (start, end) = (0, 0);
            request_started = None;
        } else {
            // A pipelined request already began arriving.
            request_started = Some(Instant::now());
        }
        out.clear();
        encode_response(&action, &mut out);
        // Observed before the reply goes out, so a client that has its answer sees it
        // counted (the time to write is the kernel's, not ours).
        engine.ops.latency.observe(started.elapsed());
        if let Err(e) = stream.write_all(&out) {
            tracing::debug!(client = peer, error = %e, "write failed (or the client does not read its replies)");
            return;
        }
    }
}
