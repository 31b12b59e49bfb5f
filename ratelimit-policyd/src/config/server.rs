//! `[server]`: sockets, clients, timeouts, the failure answer, the log format.

use ipnet::IpNet;

use super::raw::RawServer;
use super::{ConfigError, Ctx, FailMode, ListenAddr, ServerConfig, defaults};

impl Default for ServerConfig {
    /// Every `[server]` key at its default ([`defaults`]).
    fn default() -> Self {
        ServerConfig {
            listen: default_listen(),
            allow: default_allow(),
            max_connections: defaults::MAX_CONNECTIONS,
            idle_timeout: defaults::IDLE_TIMEOUT,
            decision_timeout: defaults::DECISION_TIMEOUT,
            on_store_error: defaults::ON_STORE_ERROR,
            log_json: defaults::LOG_JSON,
        }
    }
}

fn default_listen() -> Vec<ListenAddr> {
    vec![ListenAddr::Tcp(defaults::LISTEN)]
}

fn default_allow() -> Vec<IpNet> {
    defaults::ALLOW
        .iter()
        .filter_map(|s| s.parse().ok())
        .collect()
}

/// Validates `[server]`.
pub(super) fn build(cx: &Ctx<'_>, raw: &RawServer) -> Result<ServerConfig, ConfigError> {
    let listen = match &raw.listen {
        None => default_listen(),
        Some(listen) if listen.is_empty() => {
            return cx.err(None, "server.listen", "needs at least one address");
        }
        Some(listen) => listen
            .iter()
            .map(|l| {
                l.get_ref()
                    .parse()
                    .or_else(|e: String| cx.err(Some(l.span()), "server.listen", e))
            })
            .collect::<Result<_, _>>()?,
    };
    let allow = match &raw.allow {
        None => default_allow(),
        Some(allow) => cx.nets(allow, "server.allow")?,
    };
    let max_connections = match &raw.max_connections {
        None => defaults::MAX_CONNECTIONS,
        Some(m) if *m.get_ref() == 0 => {
            return cx.err(
                Some(m.span()),
                "server.max_connections",
                "must be at least 1",
            );
        }
        Some(m) => *m.get_ref(),
    };
    let idle_timeout = cx.duration(
        &raw.idle_timeout,
        "server.idle_timeout",
        defaults::IDLE_TIMEOUT,
    )?;
    let decision_timeout = cx.duration(
        &raw.decision_timeout,
        "server.decision_timeout",
        defaults::DECISION_TIMEOUT,
    )?;
    let on_store_error = cx.keyword(
        &raw.on_store_error,
        "server.on_store_error",
        defaults::ON_STORE_ERROR,
        &[
            ("open", FailMode::Open),
            ("dunno", FailMode::Open),
            ("closed", FailMode::Closed),
            ("defer", FailMode::Closed),
        ],
        "expected \"open\" (answer DUNNO) or \"closed\" (defer)",
    )?;
    let log_json = cx.keyword(
        &raw.log_format,
        "server.log_format",
        defaults::LOG_JSON,
        &[("text", false), ("json", true)],
        "expected \"text\" or \"json\"",
    )?;
    Ok(ServerConfig {
        listen,
        allow,
        max_connections,
        idle_timeout,
        decision_timeout,
        on_store_error,
        log_json,
    })
}
