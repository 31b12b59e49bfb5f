//! The daemon: configuration, the store backend (and its snapshot), the policy and
//! its observers, listeners, signals, reload, and the periodic sweep and snapshot.
//!
//! [`Daemon::new`] builds everything but the listeners; [`Daemon::run`] serves them
//! (telling systemd `READY=1` once it does, when `NOTIFY_SOCKET` is set)
//! until a shutdown future completes (tests and embedders call it with their own);
//! [`serve`] is what `main` calls: load, build, bind, run until SIGTERM or SIGINT,
//! reload on SIGHUP.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use ratelimit_core::store::SnapshotError;
use ratelimit_core::{Clock, SystemClock};
use tokio::sync::watch;

use crate::admin::{self, ReloadFn};
use crate::backend::{Backend, CallBounds, OpenError};
use crate::config::{self, Config, ConfigError, ListenAddr};
use crate::ops::{self, Ops, View};
use crate::policy::{Observer, Policy};
use crate::server::{self, Listener, ServerStats};

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configuration is invalid.
    #[error("{0}")]
    Config(#[from] ConfigError),
    /// The snapshot could not be restored (and `on_bad_snapshot = "refuse"`).
    #[error(
        "{0}\n(to start with empty counters instead, set on_bad_snapshot = \"start-empty\" in [store], or move the file away)"
    )]
    Snapshot(SnapshotError),
    /// A listening socket could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: String,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The store backend could not be set up.
    #[error("store: {0}")]
    Store(String),
}

impl From<OpenError> for StartError {
    fn from(e: OpenError) -> StartError {
        match e {
            OpenError::Snapshot(s) => StartError::Snapshot(s),
            OpenError::Store(s) => StartError::Store(s.to_string()),
        }
    }
}

/// Loads the configuration: the file if given, else the built-in default; `listen`
/// (from the command line) replaces the configured addresses when not empty; the
/// tier moves made with `admin tier` are applied on top.
pub fn load_config(path: Option<&Path>, listen: &[ListenAddr]) -> Result<Config, ConfigError> {
    let mut cfg = match path {
        Some(p) => config::load(p)?,
        None => config::builtin(),
    };
    if !listen.is_empty() {
        cfg.server.listen = listen.to_vec();
    }
    admin::overrides::apply(&mut cfg)?;
    Ok(cfg)
}

/// Binds every configured listener.
pub async fn bind(cfg: &Config) -> Result<Vec<Listener>, StartError> {
    let mut out = Vec::new();
    for addr in &cfg.server.listen {
        out.push(
            Listener::bind(addr, &cfg.server)
                .await
                .map_err(|source| StartError::Bind {
                    addr: addr.to_string(),
                    source,
                })?,
        );
    }
    Ok(out)
}

/// Everything the daemon runs, built and wired, before it listens.
#[derive(Clone)]
pub struct Daemon {
    /// The policy.
    pub policy: Arc<Policy>,
    /// The server's counts.
    pub server: Arc<ServerStats>,
    /// The policy's observer: incident lines, alerts, records.
    pub ops: Arc<Ops>,
    reload: Option<ReloadFn>,
}

impl Daemon {
    /// Builds the daemon for `cfg` at the times `clock` gives: the store backend
    /// (restored from its snapshot when configured), the policy and its observers.
    /// `admin reload` re-reads the file the configuration came from, if any.
    pub fn new(cfg: Config, clock: Arc<dyn Clock>) -> Result<Daemon, StartError> {
        let backend = Backend::open(&cfg.store, CallBounds::of(&cfg.server), clock.now())?;
        Ok(Daemon::with_backend(cfg, backend, clock, None))
    }

    /// Builds the daemon for `cfg` over `backend` (any stores: see [`Backend::new`]);
    /// `also` sees every verdict after the daemon's own observer.
    pub fn with_backend(
        cfg: Config,
        backend: Backend,
        clock: Arc<dyn Clock>,
        also: Option<Arc<dyn Observer>>,
    ) -> Daemon {
        let source = PathBuf::from(&cfg.source);
        let shared = Arc::new(ArcSwap::from_pointee(cfg));
        let ops = Arc::new(Ops::new(Arc::clone(&shared)));
        let observer: Arc<dyn Observer> = match also {
            Some(also) => Arc::new(Both(Arc::clone(&ops), also)),
            None => Arc::clone(&ops) as _,
        };
        let policy = Arc::new(Policy::new(shared, backend, clock, observer));
        let mut daemon = Daemon {
            policy,
            server: Arc::new(ServerStats::default()),
            ops,
            reload: None,
        };
        if source.is_file() {
            daemon.reload_from(Some(source), Vec::new());
        }
        daemon
    }

    /// Makes `admin reload` (and [`Daemon::reload`]) re-read `path` (the built-in
    /// default when `None`) with `listen` overriding its addresses.
    pub fn reload_from(&mut self, path: Option<PathBuf>, listen: Vec<ListenAddr>) {
        let policy = Arc::downgrade(&self.policy);
        self.reload = Some(Arc::new(move || {
            let policy = policy.upgrade().ok_or("the server is stopping")?;
            try_reload(&policy, path.as_deref(), &listen).map_err(|e| e.to_string())
        }));
    }

    /// Reloads as `admin reload` does; `false` (logged) when the new configuration is
    /// invalid and the old one stays.
    pub fn reload(&self) -> bool {
        self.reload.as_ref().is_some_and(|r| r().is_ok())
    }

    /// What the operations endpoints and admin commands see.
    pub fn view(&self) -> View {
        View {
            policy: Arc::clone(&self.policy),
            server: Arc::clone(&self.server),
            ops: Arc::clone(&self.ops),
        }
    }

    /// Serves `listeners` until `shutdown` completes: starts the operational
    /// endpoints (alerts, records, metrics, the admin socket) and the periodic sweep
    /// and snapshot, serves, then lets connections finish their requests, stops the
    /// workers and writes a last snapshot if snapshots are configured.
    pub async fn run(
        &self,
        listeners: Vec<Listener>,
        shutdown: impl Future<Output = ()>,
    ) -> std::io::Result<()> {
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut tasks = tokio::task::JoinSet::new();
        let view = self.view();
        ops::start(&view, &mut tasks, stop_rx.clone()).await;
        self.start_admin(&view, &mut tasks, stop_rx.clone());
        tasks.spawn(maintenance(Arc::clone(&self.policy), stop_rx));
        ops::set_ready(&self.ops);
        // Every listener is bound (and the snapshot restored) before `run`: systemd's
        // Type=notify starts Postfix only now.
        crate::notify::tell("READY=1");
        let served = server::serve(
            listeners,
            Arc::clone(&self.policy),
            Arc::clone(&self.server),
            shutdown,
        )
        .await;
        crate::notify::tell("STOPPING=1");
        let _ = stop_tx.send(true);
        while tasks.join_next().await.is_some() {}
        write_snapshot(&self.policy);
        tracing::info!("stopped");
        served
    }

    fn start_admin(
        &self,
        view: &View,
        tasks: &mut tokio::task::JoinSet<()>,
        stop: watch::Receiver<bool>,
    ) {
        let Some(path) = self.policy.config().ops.admin.socket.clone() else {
            return;
        };
        match admin::bind(&path) {
            Ok(l) => {
                tracing::info!(socket = %path.display(), "admin socket");
                let ctx = admin::Context {
                    view: view.clone(),
                    reload: self.reload.clone(),
                };
                tasks.spawn(admin::serve(l, path, ctx, stop));
            }
            Err(e) => {
                tracing::warn!(socket = %path.display(), error = %e, "cannot create the admin socket; admin commands are unavailable (set [admin] socket, or enabled = false)")
            }
        }
    }
}

/// Two observers, one after the other.
struct Both(Arc<Ops>, Arc<dyn Observer>);

impl Observer for Both {
    fn decided(
        &self,
        conn: u64,
        at: ratelimit_core::Timestamp,
        req: &crate::protocol::PolicyRequest<'_>,
        verdict: &crate::policy::Verdict<'_>,
    ) {
        self.0.decided(conn, at, req, verdict);
        self.1.decided(conn, at, req, verdict);
    }
}

/// The main.cf lines that wire Postfix to a policy server at `target`
/// (`inet:127.0.0.1:10031`, `unix:/path`).
pub fn main_cf_lines(target: &str) -> String {
    format!(
        "smtpd_relay_restrictions = permit_mynetworks, permit_sasl_authenticated, reject_unauth_destination\n\
         smtpd_recipient_restrictions = check_policy_service {target}, permit_sasl_authenticated, permit_mynetworks, reject_unauth_destination\n\
         smtpd_data_restrictions = check_policy_service {target}\n\
         smtpd_end_of_data_restrictions = check_policy_service {target}\n\
         smtpd_policy_service_default_action = DUNNO\n"
    )
}

/// The `check_policy_service` target of a Unix socket inside a Postfix queue
/// directory, as smtpd names it (chrooted or not, smtpd runs in the queue
/// directory): `unix:/var/spool/postfix/private/ratelimit` is `unix:private/ratelimit`,
/// and so is `unix:/srv/queue/private/ratelimit`; `unix:/var/spool/postfix/ratelimit/policy`
/// is `unix:ratelimit/policy`. `None` for other addresses.
fn queue_relative(addr: &str) -> Option<String> {
    let path = std::path::Path::new(addr.strip_prefix("unix:")?);
    if let Ok(rel) = path.strip_prefix("/var/spool/postfix")
        && rel.parent().is_some_and(|p| !p.as_os_str().is_empty())
    {
        return Some(format!("unix:{}", rel.display()));
    }
    let parts: Vec<&std::ffi::OsStr> = path.iter().collect();
    let dir = parts.iter().rposition(|c| *c == "private")?;
    let rel: std::path::PathBuf = parts.get(dir..)?.iter().collect();
    (parts.len() > dir + 1).then(|| format!("unix:{}", rel.display()))
}

/// The `check_policy_service` target for a server listening on `listen` (`host:port`
/// or `unix:/path`): a Unix socket inside Postfix's queue directory comes first,
/// named as smtpd sees it (`unix:private/NAME`); then the first TCP listener
/// (`inet:host:port`); then any other Unix socket.
pub fn postfix_target(listen: &[String]) -> String {
    listen
        .iter()
        .find_map(|a| queue_relative(a))
        .or_else(|| {
            listen
                .iter()
                .find(|a| !a.starts_with("unix:"))
                .map(|a| format!("inet:{a}"))
        })
        .or_else(|| listen.first().cloned())
        .unwrap_or_else(|| "inet:127.0.0.1:10031".into())
}

/// What the daemon logs at start: how to wire Postfix to this server, at
/// [`postfix_target`].
pub fn postfix_wiring(listen: &[String]) -> String {
    let target = postfix_target(listen);
    let mut out =
        String::from("wire Postfix to this server in main.cf (or per service in master.cf):\n");
    for line in main_cf_lines(&target).lines() {
        out.push_str("  ");
        out.push_str(line);
        out.push('\n');
    }
    out.push_str(
        "  (smtpd_policy_service_default_action = DUNNO: while this server is down mail goes through; Postfix's default, 451 4.3.5, defers it)",
    );
    out
}

/// Starts everything and serves until SIGTERM or SIGINT; SIGHUP reloads the
/// configuration (keeping the old one if the new one is invalid).
pub async fn serve(
    config_path: Option<PathBuf>,
    listen: Vec<ListenAddr>,
) -> Result<(), StartError> {
    let cfg = load_config(config_path.as_deref(), &listen)?;
    let mut daemon = Daemon::new(cfg, Arc::new(SystemClock))?;
    daemon.reload_from(config_path, listen);
    let cfg = daemon.policy.config();
    let listeners = bind(&cfg).await?;
    let addrs: Vec<String> = listeners.iter().map(|l| l.describe()).collect();
    tracing::info!(
        config = %cfg.source,
        store = daemon.policy.backend().name(),
        tiers = cfg.tiers.map.tiers().count(),
        "ratelimit-policyd {} started",
        env!("CARGO_PKG_VERSION")
    );
    // One line each: text logs escape a newline inside a message.
    for line in postfix_wiring(&addrs).lines() {
        tracing::info!("{line}");
    }
    let on_hup = daemon.clone();
    tokio::spawn(async move {
        let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        else {
            return;
        };
        while hup.recv().await.is_some() {
            let d = on_hup.clone();
            let _ = tokio::task::spawn_blocking(move || d.reload()).await;
        }
    });
    daemon
        .run(listeners, shutdown_signal())
        .await
        .map_err(|e| StartError::Bind {
            addr: addrs.join(", "),
            source: e,
        })
}

/// Re-reads the configuration and swaps it in; on error keeps the old one and logs
/// why. Listeners, the store backend and the connection cap need a restart to change.
pub fn try_reload(
    policy: &Policy,
    path: Option<&Path>,
    listen: &[ListenAddr],
) -> Result<String, ConfigError> {
    let _overrides = admin::overrides::lock();
    match load_config(path, listen) {
        Ok(new) => {
            let old = policy.config();
            if new.server.listen != old.server.listen
                || new.store.backend != old.store.backend
                || new.server.max_connections != old.server.max_connections
            {
                tracing::warn!(
                    "reload: changes to listen, store backend or max_connections take effect only after a restart"
                );
            }
            let summary = format!(
                "reloaded {} ({} tiers)",
                new.source,
                new.tiers.map.tiers().count()
            );
            let (source, tiers) = (new.source.clone(), new.tiers.map.tiers().count());
            policy.set_config(new);
            // Logged once in force: whoever reads the line finds the new configuration.
            tracing::info!(config = %source, tiers, "configuration reloaded");
            Ok(summary)
        }
        Err(e) => {
            tracing::error!(error = %e, "reload failed; keeping the previous configuration");
            Err(e)
        }
    }
}

/// The periodic sweep of idle keys and the periodic snapshot.
async fn maintenance(policy: Arc<Policy>, stop: watch::Receiver<bool>) {
    let cfg = policy.config();
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
                let p = Arc::clone(&policy);
                let swept = tokio::task::spawn_blocking(move || {
                    let removed = p.sweep();
                    let started = std::time::Instant::now();
                    let trimmed = crate::trim::give_back();
                    (removed, trimmed, started.elapsed())
                });
                if let Ok((removed, trimmed, took)) = swept.await {
                    tracing::debug!(removed, trimmed, trim_took = ?took, "swept idle keys, gave free memory back");
                }
            }
            _ = snap.tick() => {
                let p = Arc::clone(&policy);
                let _ = tokio::task::spawn_blocking(move || write_snapshot(&p)).await;
            }
            _ = server::stopped(stop.clone()) => return,
        }
    }
}

/// Writes the store's snapshot, if configured and the store keeps one; logs the
/// outcome.
pub fn write_snapshot(policy: &Policy) -> Option<ratelimit_core::store::snapshot::SnapshotStats> {
    let cfg = policy.config();
    let snap = cfg.store.snapshot.as_ref()?;
    match policy.backend().save_snapshot(&snap.path, policy.now())? {
        Ok(stats) => {
            tracing::debug!(path = %snap.path.display(), keys = stats.keys, bytes = stats.bytes, "snapshot written");
            Some(stats)
        }
        Err(e) => {
            tracing::error!(error = %e, "snapshot failed");
            None
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
    }
}
