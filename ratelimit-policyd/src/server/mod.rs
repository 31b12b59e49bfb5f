//! The policy server: listeners, the connection cap, the client allowlist, one
//! connection loop per client ([`connection`]) and graceful shutdown.
//!
//! At the connection cap the connection that has waited longest between requests is
//! closed to admit the new one (Postfix reconnects by itself), so idle connections
//! cannot hold every slot: one local process opening `max_connections` connections
//! and sending nothing would otherwise lock Postfix out for `idle_timeout`.
//!
//! [`serve`] accepts on every listener until `shutdown` completes, then stops
//! accepting and lets every connection finish the request it is on. It decides with
//! a [`Policy`] and counts into [`ServerStats`]; it knows nothing of operations or
//! administration, which the daemon starts beside it.

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, TryAcquireError, watch};

use crate::logthrottle::{LOG_EVERY, LogThrottle};
use crate::policy::Policy;
use crate::policy::keying::canonical_ip;

pub mod connection;
pub mod listener;
pub mod stats;

pub use connection::Workers;
pub use listener::Listener;
pub use stats::ServerStats;

use listener::{Accepted, accept};

/// Connections refused by the allowlist: one log line per interval (`suppressed`
/// says how many were left out), so a flood cannot flood the log.
static REFUSED_LOG: LogThrottle = LogThrottle::new(LOG_EVERY);

/// Unix-socket peers refused by `[server] allow_uids`: one log line per interval.
static REFUSED_UID_LOG: LogThrottle = LogThrottle::new(LOG_EVERY);

/// Connections closed at the cap to admit new ones: one log line per interval.
static EVICTED_LOG: LogThrottle = LogThrottle::new(LOG_EVERY);

/// How long connections get to finish their current request at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// At the cap, only a connection idle at least this long yields its slot to a new
/// one. Postfix's connections wait minutes between requests and yield at once; a
/// burst of new connections (a Postfix restart starting hundreds of smtpd processes)
/// waits up to this long rather than evicting clients that are busy right now.
const EVICT_AFTER_IDLE: Duration = Duration::from_secs(1);

/// At the cap, how often the accept loop looks again for a connection to evict
/// while every connection is busy or idle for less than [`EVICT_AFTER_IDLE`].
const EVICT_RETRY: Duration = Duration::from_millis(100);

/// How long the accept loop waits for the slot of the connection it evicted (its
/// thread wakes at once and ends) before it evicts another.
const EVICTED_WAIT: Duration = Duration::from_secs(1);

/// Serves `listeners` with `policy` until `shutdown` completes, then stops accepting
/// and lets every connection finish the request it is on (connections stop only
/// between requests), waiting at most `SHUTDOWN_GRACE` (10 s).
pub async fn serve(
    listeners: Vec<Listener>,
    policy: Arc<Policy>,
    stats: Arc<ServerStats>,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let max = policy
        .config()
        .server
        .max_connections
        .min(Semaphore::MAX_PERMITS);
    let permits = Arc::new(Semaphore::new(max));
    let (stop_tx, stop_rx) = watch::channel(false);
    let workers = Workers::new();
    let mut tasks = tokio::task::JoinSet::new();
    for listener in listeners {
        tracing::info!(listen = %listener.describe(), "listening");
        tasks.spawn(accept_loop(
            listener,
            Arc::clone(&policy),
            Arc::clone(&stats),
            Arc::clone(&permits),
            Arc::clone(&workers),
            stop_rx.clone(),
        ));
    }
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
    Ok(())
}

/// Resolves once `rx` turns true.
pub(crate) async fn stopped(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

/// A connection slot for a client just accepted. At the cap, closes the connection
/// that has waited longest for a request (at least [`EVICT_AFTER_IDLE`]) and takes
/// its slot; while there is none, waits for one. `None` when the server stops.
async fn slot(
    permits: &Arc<Semaphore>,
    workers: &Workers,
    stats: &ServerStats,
    stop: &watch::Receiver<bool>,
) -> Option<OwnedSemaphorePermit> {
    loop {
        match Arc::clone(permits).try_acquire_owned() {
            Ok(p) => return Some(p),
            Err(TryAcquireError::Closed) => return None,
            Err(TryAcquireError::NoPermits) => {}
        }
        // The evicted connection's thread releases its permit as it ends.
        let wait = match workers.evict_longest_idle(EVICT_AFTER_IDLE) {
            Some(evicted) => {
                stats.connections_evicted.fetch_add(1, Ordering::Relaxed);
                if let Some(suppressed) = EVICTED_LOG.allow() {
                    tracing::warn!(
                        client = %evicted.peer,
                        idle = ?evicted.idle,
                        suppressed,
                        "max_connections reached: closed the connection idle longest to admit a new one"
                    );
                }
                EVICTED_WAIT
            }
            None => EVICT_RETRY,
        };
        tokio::select! {
            p = tokio::time::timeout(wait, Arc::clone(permits).acquire_owned()) => match p {
                Ok(Ok(p)) => return Some(p),
                Ok(Err(_)) => return None,
                Err(_) => {}
            },
            _ = stopped(stop.clone()) => return None,
        }
    }
}

async fn accept_loop(
    listener: Listener,
    policy: Arc<Policy>,
    stats: Arc<ServerStats>,
    permits: Arc<Semaphore>,
    workers: Arc<Workers>,
    stop: watch::Receiver<bool>,
) {
    let rt = tokio::runtime::Handle::current();
    let mut backoff = Duration::from_millis(5);
    loop {
        // Accept first, then find the client a slot: at the cap the connection idle
        // longest yields (see `slot`).
        let accepted = tokio::select! {
            r = accept(&listener) => r,
            _ = stopped(stop.clone()) => return,
        };
        let (stream, peer) = match accepted {
            Ok(Accepted::Tcp(stream, peer)) => {
                backoff = Duration::from_millis(5);
                let ip = canonical_ip(peer.ip());
                if !policy.config().server.allow.iter().any(|n| n.contains(&ip)) {
                    stats.connections_refused.fetch_add(1, Ordering::Relaxed);
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
                    Ok(s) => (connection::Stream::Tcp(s), peer.to_string()),
                    Err(e) => {
                        tracing::warn!(client = %peer, error = %e, "cannot serve connection");
                        continue;
                    }
                }
            }
            Ok(Accepted::Unix(stream)) => {
                backoff = Duration::from_millis(5);
                // The peer's credentials, as the kernel recorded them at connect.
                let cred = stream.peer_cred();
                let peer = match &cred {
                    Ok(c) => format!("unix:uid={}", c.uid()),
                    Err(_) => "unix".to_string(),
                };
                if let Some(uids) = &policy.config().server.allow_uids
                    && !cred.as_ref().is_ok_and(|c| uids.contains(&c.uid()))
                {
                    stats
                        .connections_refused_uid
                        .fetch_add(1, Ordering::Relaxed);
                    if let Some(suppressed) = REFUSED_UID_LOG.allow() {
                        let pid = cred.as_ref().ok().and_then(|c| c.pid());
                        tracing::warn!(client = %peer, pid, suppressed, "connection refused: peer uid not in [server] allow_uids");
                    }
                    continue;
                }
                match stream
                    .into_std()
                    .and_then(|s| s.set_nonblocking(false).map(|()| s))
                {
                    Ok(s) => (connection::Stream::Unix(s), peer),
                    Err(e) => {
                        tracing::warn!(client = %peer, error = %e, "cannot serve connection");
                        continue;
                    }
                }
            }
            Err(e) => {
                // Out of file descriptors and the like: wait, then try again.
                tracing::warn!(error = %e, "accept failed; retrying in {backoff:?}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let Some(permit) = slot(&permits, &workers, &stats, &stop).await else {
            return;
        };
        workers.spawn(
            stream,
            peer,
            Arc::clone(&policy),
            Arc::clone(&stats),
            rt.clone(),
            permit,
        );
    }
}
