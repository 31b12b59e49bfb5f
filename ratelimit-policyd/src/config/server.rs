//! `[server]`: sockets, clients, timeouts, the failure answer, the log format and
//! target, and who may use a Unix socket (mode, group, peer uids).

use std::path::PathBuf;

use ipnet::IpNet;
use nix::unistd::{Group, User};
use toml::Spanned;

use super::raw::{RawId, RawServer};
use super::{
    ConfigError, Ctx, FailMode, ListenAddr, LogTarget, ServerConfig, SocketGroup, defaults,
};

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
            log_target: defaults::LOG_TARGET,
            syslog_socket: PathBuf::from(defaults::SYSLOG_SOCKET),
            socket_mode: defaults::SOCKET_MODE,
            socket_group: None,
            allow_uids: None,
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
    let log_target = cx.keyword(
        &raw.log_target,
        "server.log_target",
        defaults::LOG_TARGET,
        &[
            ("auto", LogTarget::Auto),
            ("stderr", LogTarget::Stderr),
            ("journald", LogTarget::Journald),
            ("syslog", LogTarget::Syslog),
        ],
        "expected \"auto\" (journald under systemd, else stderr), \"stderr\", \"journald\" or \"syslog\"",
    )?;
    let syslog_socket = match &raw.syslog_socket {
        None => PathBuf::from(defaults::SYSLOG_SOCKET),
        Some(s) if log_target != LogTarget::Syslog => {
            return cx.err(
                Some(s.span()),
                "server.syslog_socket",
                "applies to log_target = \"syslog\" only",
            );
        }
        Some(s) if s.get_ref().is_empty() => {
            return cx.err(Some(s.span()), "server.syslog_socket", "is empty");
        }
        Some(s) => cx.resolve(s.get_ref()),
    };
    let has_unix = listen.iter().any(|l| matches!(l, ListenAddr::Unix(_)));
    let unix_only = |span: std::ops::Range<usize>, field: &str| {
        if has_unix {
            Ok(())
        } else {
            cx.err(
                Some(span),
                field,
                "applies to unix: listeners only, and server.listen has none",
            )
        }
    };
    let allow_uids = match &raw.allow_uids {
        None => None,
        Some(uids) => {
            unix_only(uids.span(), "server.allow_uids")?;
            if uids.get_ref().is_empty() {
                return cx.err(
                    Some(uids.span()),
                    "server.allow_uids",
                    "is empty: no client could connect (leave it out to let every peer that can open the socket connect)",
                );
            }
            Some(
                uids.get_ref()
                    .iter()
                    .map(|u| uid(cx, u))
                    .collect::<Result<Vec<_>, _>>()?,
            )
        }
    };
    let socket_mode = match &raw.socket_mode {
        None => defaults::SOCKET_MODE,
        Some(m) => {
            unix_only(m.span(), "server.socket_mode")?;
            let mode = parse_mode(m.get_ref())
                .or_else(|e| cx.err(Some(m.span()), "server.socket_mode", e))?;
            if mode & 0o002 != 0 && allow_uids.is_none() {
                return cx.err(
                    Some(m.span()),
                    "server.socket_mode",
                    format!(
                        "\"{}\" lets every local user connect; give Postfix access with socket_group (mode \"0660\"), or name the peers allowed in allow_uids",
                        m.get_ref()
                    ),
                );
            }
            mode
        }
    };
    let socket_group = match &raw.socket_group {
        None => None,
        Some(g) => {
            unix_only(g.span(), "server.socket_group")?;
            Some(group(cx, g)?)
        }
    };
    Ok(ServerConfig {
        listen,
        allow,
        max_connections,
        idle_timeout,
        decision_timeout,
        on_store_error,
        log_json,
        log_target,
        syslog_socket,
        socket_mode,
        socket_group,
        allow_uids,
    })
}

/// An octal mode of at most `0777`: `"0660"`, `"660"`.
fn parse_mode(s: &str) -> Result<u32, String> {
    let digits = s.strip_prefix('0').filter(|d| d.len() == 3).unwrap_or(s);
    match u32::from_str_radix(digits, 8) {
        Ok(mode) if digits.len() == 3 && mode <= 0o777 => Ok(mode),
        _ => Err(format!(
            "\"{s}\": expected an octal mode of three digits, such as \"0660\""
        )),
    }
}

/// A group name (looked up now) or number.
fn group(cx: &Ctx<'_>, g: &Spanned<String>) -> Result<SocketGroup, ConfigError> {
    let name = g.get_ref();
    let field = "server.socket_group";
    if let Ok(gid) = name.parse::<u32>() {
        return Ok(SocketGroup {
            name: name.clone(),
            gid,
        });
    }
    match Group::from_name(name) {
        Ok(Some(found)) => Ok(SocketGroup {
            name: name.clone(),
            gid: found.gid.as_raw(),
        }),
        Ok(None) => cx.err(Some(g.span()), field, format!("no such group \"{name}\"")),
        Err(e) => cx.err(
            Some(g.span()),
            field,
            format!("cannot look up group \"{name}\": {e}"),
        ),
    }
}

/// A uid, or a user name (looked up now).
fn uid(cx: &Ctx<'_>, u: &Spanned<RawId>) -> Result<u32, ConfigError> {
    let field = "server.allow_uids";
    match u.get_ref() {
        RawId::Id(id) => Ok(*id),
        RawId::Name(name) => match User::from_name(name) {
            Ok(Some(user)) => Ok(user.uid.as_raw()),
            Ok(None) => cx.err(Some(u.span()), field, format!("no such user \"{name}\"")),
            Err(e) => cx.err(
                Some(u.span()),
                field,
                format!("cannot look up user \"{name}\": {e}"),
            ),
        },
    }
}
