//! `[server]`: sockets, clients, timeouts, the failure answer, the log format and
//! target, and who may use a Unix socket (mode, group, peer uids).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ahash::AHashMap;
use ipnet::IpNet;
use nix::unistd::{Group, User};
use ratelimit_core::{Algorithm, Limit, Tier, TierMap};
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
            max_store_calls_in_flight: defaults::MAX_STORE_CALLS_IN_FLIGHT,
            local_fraction: defaults::LOCAL_FRACTION,
            local_tiers: AHashMap::new(),
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
            ("local", FailMode::Local),
        ],
        "expected \"open\" (answer DUNNO), \"closed\" (defer) or \"local\" (this server's own counters)",
    )?;
    let max_store_calls_in_flight = match &raw.max_store_calls_in_flight {
        None => defaults::MAX_STORE_CALLS_IN_FLIGHT,
        Some(m) if *m.get_ref() == 0 => {
            return cx.err(
                Some(m.span()),
                "server.max_store_calls_in_flight",
                "must be at least 1",
            );
        }
        Some(m) => *m.get_ref(),
    };
    let local_fraction = match &raw.local_fraction {
        None => defaults::LOCAL_FRACTION,
        Some(f) if on_store_error != FailMode::Local => {
            return cx.err(
                Some(f.span()),
                "server.local_fraction",
                "applies to on_store_error = \"local\" only",
            );
        }
        Some(f) if !(*f.get_ref() > 0.0 && *f.get_ref() <= 1.0) => {
            return cx.err(
                Some(f.span()),
                "server.local_fraction",
                format!(
                    "{}: must be more than 0 and at most 1 (the share of each limit one server enforces on its own)",
                    f.get_ref()
                ),
            );
        }
        Some(f) => *f.get_ref(),
    };
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
        max_store_calls_in_flight,
        local_fraction,
        local_tiers: AHashMap::new(),
        log_json,
        log_target,
        syslog_socket,
        socket_mode,
        socket_group,
        allow_uids,
    })
}

/// The tiers of `map` with every limit scaled by `server.local_fraction`, for the
/// local fallback (`on_store_error = "local"`; empty otherwise). A count (and a
/// bucket's burst) is rounded down, but never below 1.
pub(super) fn local_tiers(
    cx: &Ctx<'_>,
    server: &ServerConfig,
    map: &TierMap,
) -> Result<AHashMap<String, Arc<Tier>>, ConfigError> {
    if server.on_store_error != FailMode::Local {
        return Ok(AHashMap::new());
    }
    let fraction = server.local_fraction;
    map.tiers()
        .map(|tier| {
            if fraction >= 1.0 {
                return Ok((tier.name().to_string(), Arc::clone(tier)));
            }
            let limits = tier
                .limits()
                .iter()
                .map(|l| scale_limit(l, fraction))
                .collect::<Result<Vec<_>, _>>();
            match limits.and_then(|l| Tier::new(tier.name(), l).map_err(|e| e.to_string())) {
                Ok(scaled) => Ok((tier.name().to_string(), Arc::new(scaled))),
                Err(e) => cx.err(
                    None,
                    "server.local_fraction",
                    format!("tier \"{}\" cannot be scaled: {e}", tier.name()),
                ),
            }
        })
        .collect()
}

/// `n × fraction`, rounded down, at least 1.
fn scale(n: u64, fraction: f64) -> u64 {
    // The product of a u32-sized count and a fraction in (0, 1] fits a u64.
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    let scaled = (n as f64 * fraction).floor() as u64;
    scaled.max(1)
}

/// `limit` with its count (and a bucket's burst) scaled by `fraction`.
fn scale_limit(limit: &Limit, fraction: f64) -> Result<Limit, String> {
    let count = scale(limit.count(), fraction);
    let window: Duration = limit.window();
    let scaled = match limit.algorithm() {
        Algorithm::SlidingWindow { precision } => {
            Limit::sliding(count, window).and_then(|l| l.with_precision(u64::from(precision)))
        }
        Algorithm::TokenBucket { burst } => {
            Limit::token_bucket(count, window, scale(u64::from(burst), fraction))
        }
        // An algorithm this build does not know how to scale keeps its count.
        _ => Ok(*limit),
    };
    scaled
        .map(|l| l.with_unit(limit.unit()))
        .map_err(|e| e.to_string())
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

#[cfg(test)]
mod tests {
    use super::super::parse;
    use ratelimit_core::Algorithm;

    fn err(text: &str) -> String {
        parse(text, "t.toml", None).unwrap_err().to_string()
    }

    #[test]
    fn local_tiers_scale_every_limit_down_but_never_below_one() {
        let c = parse(
            "[server]\non_store_error = \"local\"\nlocal_fraction = 0.5\n\n\
             [tiers.default]\nlimits = [\"11/1h\", \"1/1m\", { limit = \"9/1h\", algorithm = \"bucket\", burst = 5 }]\n\
             [tiers.free]\nlimits = []\n",
            "t.toml",
            None,
        )
        .unwrap();
        let local = &c.server.local_tiers["default"];
        let texts: Vec<String> = local.limits().iter().map(|l| l.to_string()).collect();
        assert_eq!(texts[..2], ["5/1h", "1/1m"]);
        let full = &c.tiers.map.get("default").unwrap().limits()[2];
        let bucket = local.limits()[2];
        assert_eq!((bucket.count(), bucket.window()), (4, full.window()));
        match bucket.algorithm() {
            Algorithm::TokenBucket { burst } => assert_eq!(burst, 2, "the burst is halved too"),
            other => panic!("{other:?}"),
        }
        assert!(c.server.local_tiers["free"].is_unlimited());
    }

    #[test]
    fn local_tiers_are_built_only_for_the_local_fallback() {
        let c = parse("[tiers.default]\nlimits = [\"10/1h\"]\n", "t.toml", None).unwrap();
        assert!(c.server.local_tiers.is_empty());
        let c = parse(
            "[server]\non_store_error = \"local\"\n[tiers.default]\nlimits = [\"10/1h\"]\n",
            "t.toml",
            None,
        )
        .unwrap();
        assert_eq!(c.server.local_fraction, 1.0);
        assert_eq!(c.server.local_tiers["default"].limits()[0].count(), 10);
    }

    #[test]
    fn local_fraction_is_checked() {
        for f in ["0", "0.0", "-0.5", "1.01", "nan"] {
            let text = format!("[server]\non_store_error = \"local\"\nlocal_fraction = {f}\n");
            assert!(
                err(&text).starts_with("t.toml:3: server.local_fraction: "),
                "{f}: {}",
                err(&text)
            );
        }
        assert_eq!(
            err("[server]\nlocal_fraction = 0.5\n"),
            "t.toml:2: server.local_fraction: applies to on_store_error = \"local\" only"
        );
        assert_eq!(
            err("[server]\nmax_store_calls_in_flight = 0\n"),
            "t.toml:2: server.max_store_calls_in_flight: must be at least 1"
        );
    }
}
