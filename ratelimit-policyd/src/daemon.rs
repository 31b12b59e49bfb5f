//! Starting the daemon: configuration, counters (and snapshot restore), listeners,
//! signals. `main.rs` parses the command line and calls [`start`] and [`serve`].

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ratelimit_core::store::{RedisStore, RedisStoreConfig, SnapshotError, TimeSource};
use ratelimit_core::{Clock, MemoryStore, MemoryStoreConfig, SystemClock};

use crate::config::{self, Backend, Config, ConfigError, ListenAddr};
use crate::policy::{Counters, Engine};
use crate::server::{self, Listener};

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
    Snapshot(#[from] SnapshotError),
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
    crate::admin::overrides::apply(&mut cfg)?;
    Ok(cfg)
}

/// Builds the engine for `cfg`: the store, restored from its snapshot when configured.
pub fn build_engine(cfg: Config, clock: Arc<dyn Clock>) -> Result<Arc<Engine>, StartError> {
    let counters = match &cfg.store.backend {
        Backend::Memory { max_keys } => {
            let store = MemoryStore::with_config(MemoryStoreConfig {
                max_keys: *max_keys,
                ..MemoryStoreConfig::default()
            });
            if let Some(snap) = &cfg.store.snapshot {
                restore(&store, &snap.path, snap.start_empty_if_bad, clock.now())?;
            }
            Counters::Memory(Arc::new(store))
        }
        Backend::Redis {
            url,
            key_prefix,
            connect_timeout,
            command_timeout,
            server_time,
        } => {
            let mut rc = RedisStoreConfig::new(url.clone());
            rc.key_prefix = key_prefix.clone();
            rc.connect_timeout = *connect_timeout;
            rc.command_timeout = *command_timeout;
            rc.time_source = if *server_time {
                TimeSource::Server
            } else {
                TimeSource::Caller
            };
            let store = RedisStore::new(rc).map_err(|e| StartError::Store(e.to_string()))?;
            // Not fatal: Redis may come up after us; decisions fail per on_store_error until it does.
            match store.ping() {
                Ok(()) => {
                    tracing::info!(redis = %store.config().redacted_url(), "connected to Redis")
                }
                Err(e) => {
                    tracing::warn!(redis = %store.config().redacted_url(), error = %e, "Redis is not answering yet; answering per on_store_error until it does")
                }
            }
            Counters::Remote(Arc::new(store))
        }
    };
    Ok(Arc::new(Engine::new(cfg, counters, clock)))
}

fn restore(
    store: &MemoryStore,
    path: &Path,
    start_empty_if_bad: bool,
    now: ratelimit_core::Timestamp,
) -> Result<(), StartError> {
    if !path.exists() {
        tracing::info!(path = %path.display(), "no snapshot yet: starting with empty counters");
        return Ok(());
    }
    match store.load_snapshot(path, now) {
        Ok(stats) => {
            tracing::info!(path = %path.display(), keys = stats.keys, restored = stats.restored, "counters restored from snapshot");
            Ok(())
        }
        Err(e) if start_empty_if_bad => {
            tracing::error!(error = %e, "SNAPSHOT UNREADABLE: starting with EMPTY counters (on_bad_snapshot = \"start-empty\"); every user's quota is reset");
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

/// Binds every configured listener.
pub async fn bind(cfg: &Config) -> Result<Vec<Listener>, StartError> {
    let mut out = Vec::new();
    for addr in &cfg.server.listen {
        out.push(
            Listener::bind(addr)
                .await
                .map_err(|source| StartError::Bind {
                    addr: addr.to_string(),
                    source,
                })?,
        );
    }
    Ok(out)
}

/// The main.cf lines that wire Postfix to this server.
pub fn postfix_wiring(listen: &[String]) -> String {
    let target = listen
        .iter()
        .find(|a| !a.starts_with("unix:"))
        .map(|a| format!("inet:{a}"))
        .or_else(|| listen.first().cloned())
        .unwrap_or_else(|| "inet:127.0.0.1:10031".into());
    format!(
        "wire Postfix to this server in main.cf (or per service in master.cf):\n  \
         smtpd_relay_restrictions = permit_mynetworks, permit_sasl_authenticated, reject_unauth_destination\n  \
         smtpd_recipient_restrictions = check_policy_service {target}, permit_sasl_authenticated, permit_mynetworks, reject_unauth_destination\n  \
         smtpd_data_restrictions = check_policy_service {target}\n  \
         smtpd_end_of_data_restrictions = check_policy_service {target}\n  \
         smtpd_policy_service_default_action = DUNNO   # when this server is down: DUNNO lets mail through, the default 451 4.3.5 defers it"
    )
}

/// Starts everything and serves until SIGTERM or SIGINT; SIGHUP reloads the
/// configuration (keeping the old one if the new one is invalid).
pub async fn serve(
    config_path: Option<PathBuf>,
    listen: Vec<ListenAddr>,
) -> Result<(), StartError> {
    let cfg = load_config(config_path.as_deref(), &listen)?;
    let engine = build_engine(cfg, Arc::new(SystemClock))?;
    let cfg = engine.config();
    let listeners = bind(&cfg).await?;
    let addrs: Vec<String> = listeners.iter().map(|l| l.describe()).collect();
    tracing::info!(
        config = %cfg.source,
        store = match &cfg.store.backend { Backend::Memory { .. } => "memory", Backend::Redis { .. } => "redis" },
        tiers = cfg.tiers.map.tiers().count(),
        "ratelimit-policyd {} started",
        env!("CARGO_PKG_VERSION")
    );
    tracing::info!("{}", postfix_wiring(&addrs));
    let (hook_path, hook_listen) = (config_path.clone(), listen.clone());
    engine.ops.set_reload_hook(Arc::new(move |e: &Engine| {
        try_reload(e, hook_path.as_deref(), &hook_listen).map_err(|err| err.to_string())
    }));
    let reload_engine = Arc::clone(&engine);
    let reload_path = config_path.clone();
    let reload_listen = listen.clone();
    tokio::spawn(async move {
        let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        else {
            return;
        };
        while hup.recv().await.is_some() {
            reload(&reload_engine, reload_path.as_deref(), &reload_listen);
        }
    });
    server::run(listeners, engine, shutdown_signal())
        .await
        .map_err(|e| StartError::Bind {
            addr: addrs.join(", "),
            source: e,
        })
}

/// Re-reads the configuration and swaps it in; on error keeps the old one and logs why.
/// Listeners, the store backend and the connection cap need a restart to change.
pub fn reload(engine: &Engine, path: Option<&Path>, listen: &[ListenAddr]) -> bool {
    try_reload(engine, path, listen).is_ok()
}

/// [`reload`], returning what was loaded or why not (for `admin reload`).
pub fn try_reload(
    engine: &Engine,
    path: Option<&Path>,
    listen: &[ListenAddr],
) -> Result<String, ConfigError> {
    let _overrides = crate::admin::overrides::lock();
    match load_config(path, listen) {
        Ok(new) => {
            let old = engine.config();
            if new.server.listen != old.server.listen
                || new.store.backend != old.store.backend
                || new.server.max_connections != old.server.max_connections
            {
                tracing::warn!(
                    "reload: changes to listen, store backend or max_connections take effect only after a restart"
                );
            }
            tracing::info!(config = %new.source, tiers = new.tiers.map.tiers().count(), "configuration reloaded");
            let summary = format!(
                "reloaded {} ({} tiers)",
                new.source,
                new.tiers.map.tiers().count()
            );
            engine.set_config(new);
            Ok(summary)
        }
        Err(e) => {
            tracing::error!(error = %e, "reload failed; keeping the previous configuration");
            Err(e)
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
