//! The TCP / Unix-socket server: connections, allowlist, cap, idle timeout, graceful
//! shutdown, and the periodic sweep and snapshot.
//!
//! [`run`] is what `main` calls and what the integration tests call.

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpSocket, UnixListener};
use tokio::sync::{Semaphore, watch};

use crate::config::ListenAddr;
use crate::connection::Connection;
use crate::logthrottle::{LOG_EVERY, LogThrottle};
use crate::policy::{ConnState, Engine};
use crate::protocol::{Attribute, Limits, ParseError};
use crate::threaded::Workers;

/// Logs a malformed request (its connection is closed without a reply).
pub(crate) fn log_bad_request(peer: &str, e: &ParseError) {
    if let Some(suppressed) = BAD_REQUEST_LOG.allow() {
        tracing::warn!(client = peer, error = %e, suppressed, "closing connection: bad request");
    }
}

/// A bound listening socket.
#[derive(Debug)]
pub enum Listener {
    /// TCP: clients are checked against `[server] allow`.
    Tcp(TcpListener),
    /// A Unix socket (mode 0660: give its group to Postfix).
    Unix(UnixListener, std::path::PathBuf),
}

impl Listener {
    /// Binds `addr`. A stale Unix socket file at the path is replaced.
    pub async fn bind(addr: &ListenAddr) -> io::Result<Listener> {
        match addr {
            ListenAddr::Tcp(a) => {
                let socket = if a.is_ipv4() {
                    TcpSocket::new_v4()?
                } else {
                    TcpSocket::new_v6()?
                };
                socket.set_reuseaddr(true)?;
                socket.bind(*a)?;
                Ok(Listener::Tcp(socket.listen(LISTEN_BACKLOG)?))
            }
            ListenAddr::Unix(path) => {
                use std::os::unix::fs::{FileTypeExt, PermissionsExt};
                if let Ok(meta) = std::fs::symlink_metadata(path)
                    && meta.file_type().is_socket()
                {
                    std::fs::remove_file(path)?;
                }
                let l = UnixListener::bind(path)?;
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
                Ok(Listener::Unix(l, path.clone()))
            }
        }
    }

    /// The address bound (TCP).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        match self {
            Listener::Tcp(l) => l.local_addr().ok(),
            Listener::Unix(..) => None,
        }
    }

    /// A description for logs.
    pub fn describe(&self) -> String {
        match self {
            Listener::Tcp(l) => l
                .local_addr()
                .map_or_else(|_| "tcp".into(), |a| a.to_string()),
            Listener::Unix(_, p) => format!("unix:{}", p.display()),
        }
    }
}

/// Pending TCP connections the kernel queues before it drops new ones (capped by
/// `net.core.somaxconn`). `TcpListener::bind` would use 128: a Postfix restart starts
/// hundreds of smtpd processes that connect at once, and at `max_connections` new
/// clients wait here, so a short queue turns a burst into SYN retries of 1 s, 3 s, ...
const LISTEN_BACKLOG: u32 = 1024;

/// Connections refused by the allowlist, and bad requests: one log line per interval
/// (`suppressed` says how many were left out), so a flood cannot flood the log.
static REFUSED_LOG: LogThrottle = LogThrottle::new(LOG_EVERY);
static BAD_REQUEST_LOG: LogThrottle = LogThrottle::new(LOG_EVERY);

/// How long connections get to finish their current request at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Serves `listeners` with `engine` until `shutdown` completes, then stops accepting,
/// lets every connection finish the request it is on (connections stop only between
/// requests), and writes a last snapshot if snapshots are configured.
///
/// Also runs the periodic sweep of idle keys and the periodic snapshot.
pub async fn run(
    listeners: Vec<Listener>,
    engine: Arc<Engine>,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let cfg = engine.config();
    let max = cfg.server.max_connections.min(Semaphore::MAX_PERMITS);
    let permits = Arc::new(Semaphore::new(max));
    let (stop_tx, stop_rx) = watch::channel(false);
    let workers = Workers::new();
    let mut tasks = tokio::task::JoinSet::new();
    for listener in listeners {
        tracing::info!(listen = %listener.describe(), "listening");
        tasks.spawn(accept_loop(
            listener,
            Arc::clone(&engine),
            Arc::clone(&permits),
            Arc::clone(&workers),
            stop_rx.clone(),
        ));
    }
    tasks.spawn(maintenance(Arc::clone(&engine), stop_rx.clone()));
    crate::ops::start(&engine, &mut tasks, stop_rx.clone()).await;
    shutdown.await;
    tracing::info!("shutting down: finishing requests in flight");
    let _ = stop_tx.send(true);
    while tasks.join_next().await.is_some() {}
    workers.shutdown();
    // Every connection holds a permit; when all are back, all connections are done.
    let all = u32::try_from(max).unwrap_or(u32::MAX);
    if tokio::time::timeout(SHUTDOWN_GRACE, permits.acquire_many(all))
        .await
        .is_err()
    {
        tracing::warn!("some connections did not finish within {SHUTDOWN_GRACE:?}");
    }
    write_snapshot(&engine);
    tracing::info!("stopped");
    Ok(())
}

async fn stopped(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

async fn accept_loop(
    listener: Listener,
    engine: Arc<Engine>,
    permits: Arc<Semaphore>,
    workers: Arc<Workers>,
    stop: watch::Receiver<bool>,
) {
    let rt = tokio::runtime::Handle::current();
    let mut backoff = Duration::from_millis(5);
    loop {
        // Take a connection slot first: at the cap, new clients wait in the backlog
        // while served clients keep being served.
        let permit = tokio::select! {
            p = Arc::clone(&permits).acquire_owned() => match p { Ok(p) => p, Err(_) => return },
            _ = stopped(stop.clone()) => return,
        };
        let accepted = tokio::select! {
            r = accept(&listener) => r,
            _ = stopped(stop.clone()) => return,
        };
        match accepted {
            Ok(Accepted::Tcp(stream, peer)) => {
                backoff = Duration::from_millis(5);
                let ip = canonical(peer.ip());
                if !engine.config().server.allow.iter().any(|n| n.contains(&ip)) {
                    engine
                        .ops
                        .connections_refused
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if let Some(suppressed) = REFUSED_LOG.allow() {
                        tracing::warn!(client = %peer, suppressed, "connection refused: client not in [server] allow");
                    }
                    continue;
                }
                let _ = stream.set_nodelay(true);
                match stream
                    .into_std()
                    .and_then(|s| s.set_nonblocking(false).map(|()| s))
                {
                    Ok(s) => {
                        workers.spawn(s, peer.to_string(), Arc::clone(&engine), rt.clone(), permit)
                    }
                    Err(e) => tracing::warn!(client = %peer, error = %e, "cannot serve connection"),
                }
            }
            Ok(Accepted::Unix(stream)) => {
                backoff = Duration::from_millis(5);
                match stream
                    .into_std()
                    .and_then(|s| s.set_nonblocking(false).map(|()| s))
                {
                    Ok(s) => workers.spawn(
                        s,
                        "unix".to_string(),
                        Arc::clone(&engine),
                        rt.clone(),
                        permit,
                    ),
                    Err(e) => tracing::warn!(error = %e, "cannot serve connection"),
                }
            }
            Err(e) => {
                // Out of file descriptors and the like: wait, then try again.
                tracing::warn!(error = %e, "accept failed; retrying in {backoff:?}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}

enum Accepted {
    Tcp(tokio::net::TcpStream, SocketAddr),
    Unix(tokio::net::UnixStream),
}

async fn accept(l: &Listener) -> io::Result<Accepted> {
    match l {
        Listener::Tcp(l) => l.accept().await.map(|(s, a)| Accepted::Tcp(s, a)),
        Listener::Unix(l, _) => l.accept().await.map(|(s, _)| Accepted::Unix(s)),
    }
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Serves one connection on the async runtime until the client closes it, it idles
/// out, it sends a malformed request (logged; nothing is sent; only this connection
/// is closed), or the server shuts down (between requests). The server itself serves
/// connections on threads ([`crate::threaded`]); this is for embedding over any
/// async stream.
pub async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    peer: &str,
    engine: &Engine,
    stop: watch::Receiver<bool>,
) {
    let mut conn = Connection::new(stream, Limits::DEFAULT);
    let mut state = ConnState::default();
    let conn_id = engine.ops.next_connection_id();
    loop {
        let idle = engine.config_for(&mut state).server.idle_timeout;
        let next = tokio::select! {
            r = tokio::time::timeout(idle, conn.read_request()) => r,
            _ = stopped(stop.clone()) => return,
        };
        match next {
            Err(_) => {
                tracing::debug!(client = peer, "closing idle connection");
                return;
            }
            Ok(Ok(None)) => return,
            Ok(Err(e)) => {
                if let Some(suppressed) = BAD_REQUEST_LOG.allow() {
                    tracing::warn!(client = peer, error = %e, suppressed, "closing connection: bad request");
                }
                return;
            }
            Ok(Ok(Some(_))) => {}
        }
        let started = std::time::Instant::now();
        let action = {
            let mut slots = [Attribute::EMPTY; 64];
            match conn.request(&mut slots) {
                Ok(req) => {
                    let at = engine.now();
                    let action = engine.decide_at(&req, &mut state, at).await;
                    engine.ops.record(conn_id, at, &req, &action);
                    action
                }
                Err(e) => {
                    if let Some(suppressed) = BAD_REQUEST_LOG.allow() {
                        tracing::warn!(client = peer, error = %e, suppressed, "closing connection: bad request");
                    }
                    return;
                }
            }
        };
        // A client that stops reading its replies would otherwise hold its connection
        // slot for ever: the reply gets the same time a request gets.
        match tokio::time::timeout(idle, conn.write_response(&action)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::debug!(client = peer, error = %e, "write failed");
                return;
            }
            Err(_) => {
                tracing::debug!(
                    client = peer,
                    "closing connection: client does not read its replies"
                );
                return;
            }
        }
        engine.ops.latency.observe(started.elapsed());
    }
}

async fn maintenance(engine: Arc<Engine>, stop: watch::Receiver<bool>) {
    let cfg = engine.config();
    let mut sweep = tokio::time::interval(cfg.store.sweep_interval);
    let snap_every = cfg
        .store
        .snapshot
        .as_ref()
        .map_or(Duration::from_secs(3600), |s| s.interval);
    let mut snap = tokio::time::interval(snap_every);
    sweep.tick().await;
    snap.tick().await;
    loop {
        tokio::select! {
            _ = sweep.tick() => {
                let e = Arc::clone(&engine);
                let removed = tokio::task::spawn_blocking(move || e.sweep()).await.unwrap_or(0);
                tracing::debug!(removed, "swept idle keys");
            }
            _ = snap.tick() => {
                let e = Arc::clone(&engine);
                let _ = tokio::task::spawn_blocking(move || write_snapshot(&e)).await;
            }
            _ = stopped(stop.clone()) => return,
        }
    }
}

/// Writes the memory store's snapshot, if configured; logs the outcome.
pub fn write_snapshot(engine: &Engine) -> Option<ratelimit_core::store::snapshot::SnapshotStats> {
    let cfg = engine.config();
    let snap = cfg.store.snapshot.as_ref()?;
    let mem = engine.counters().memory()?;
    match mem.save_snapshot(&snap.path, engine.now()) {
        Ok(stats) => {
            engine.note_snapshot(engine.now());
            tracing::debug!(path = %snap.path.display(), keys = stats.keys, bytes = stats.bytes, "snapshot written");
            Some(stats)
        }
        Err(e) => {
            tracing::error!(error = %e, "snapshot failed");
            None
        }
    }
}
