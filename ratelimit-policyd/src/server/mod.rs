//! The policy server: listeners, the connection cap, the client allowlist, one
//! connection loop per client ([`connection`]) and graceful shutdown.
//!
//! [`serve`] accepts on every listener until `shutdown` completes, then stops
//! accepting and lets every connection finish the request it is on. It decides with
//! a [`Policy`] and counts into [`ServerStats`]; it knows nothing of operations or
//! administration, which the daemon starts beside it.

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Semaphore, watch};

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

/// How long connections get to finish their current request at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

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
        let (stream, peer) = match accepted {
            Ok(Accepted::Tcp(stream, peer)) => {
                backoff = Duration::from_millis(5);
                let ip = canonical_ip(peer.ip());
                if !policy.config().server.allow.iter().any(|n| n.contains(&ip)) {
                    stats
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
                    Ok(s) => (connection::Stream::Tcp(s), peer.to_string()),
                    Err(e) => {
                        tracing::warn!(client = %peer, error = %e, "cannot serve connection");
                        continue;
                    }
                }
            }
            Ok(Accepted::Unix(stream)) => {
                backoff = Duration::from_millis(5);
                match stream
                    .into_std()
                    .and_then(|s| s.set_nonblocking(false).map(|()| s))
                {
                    Ok(s) => (connection::Stream::Unix(s), "unix".to_string()),
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot serve connection");
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
