//! `check-config`: what a configuration sets up, in a few lines, without secrets.

use super::{Backend, Config, FailMode, ListenAddr};

/// A URL with any password replaced by `***` (for logs and `check-config`), as the
/// Redis client's own logs redact it.
pub fn redact_url(url: &str) -> String {
    ratelimit_core::store::redis::redact_url(url)
}

/// A human summary of what a configuration sets up (no secrets).
pub fn describe(cfg: &Config) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let list = |v: &[String]| {
        if v.is_empty() {
            "-".to_string()
        } else {
            v.join(", ")
        }
    };
    let _ = writeln!(
        s,
        "listen: {}",
        list(
            &cfg.server
                .listen
                .iter()
                .map(|l| l.to_string())
                .collect::<Vec<_>>()
        )
    );
    let _ = writeln!(
        s,
        "allow: {}",
        list(
            &cfg.server
                .allow
                .iter()
                .map(|n| n.to_string())
                .collect::<Vec<_>>()
        )
    );
    if cfg
        .server
        .listen
        .iter()
        .any(|l| matches!(l, ListenAddr::Unix(_)))
    {
        let group = cfg
            .server
            .socket_group
            .as_ref()
            .map_or("(the daemon's)".to_string(), |g| {
                format!("{} ({})", g.name, g.gid)
            });
        let uids = cfg
            .server
            .allow_uids
            .as_ref()
            .map_or("any peer that can open the socket".to_string(), |u| {
                list(&u.iter().map(|u| u.to_string()).collect::<Vec<_>>())
            });
        let _ = writeln!(
            s,
            "unix sockets: mode {:04o}, group {group}, allow_uids: {uids}",
            cfg.server.socket_mode
        );
    }
    let on_store_error = match cfg.server.on_store_error {
        FailMode::Open => "open".to_string(),
        FailMode::Closed => "closed".to_string(),
        FailMode::Local => format!("local (local_fraction {})", cfg.server.local_fraction),
    };
    let _ = writeln!(
        s,
        "max_connections: {}, idle_timeout: {:?}, decision_timeout: {:?}, on_store_error: {on_store_error}, max_store_calls_in_flight: {}",
        cfg.server.max_connections,
        cfg.server.idle_timeout,
        cfg.server.decision_timeout,
        cfg.server.max_store_calls_in_flight,
    );
    match &cfg.store.backend {
        Backend::Memory { max_keys } => {
            let _ = writeln!(s, "store: memory, max_keys {max_keys}");
        }
        Backend::Redis {
            url,
            cluster_nodes,
            tls,
            password,
            key_prefix,
            server_time,
            batch,
            ..
        } => {
            let at = if cluster_nodes.is_empty() {
                redact_url(url)
            } else {
                let nodes: Vec<String> = cluster_nodes.iter().map(|n| redact_url(n)).collect();
                format!("cluster {}", nodes.join(","))
            };
            let _ = writeln!(
                s,
                "store: redis {at}{}{}{} (prefix \"{key_prefix}\", {} time{})",
                if tls.ca.is_some() {
                    " with the CA from redis_ca_file"
                } else {
                    ""
                },
                if tls.client.is_some() {
                    " with a client certificate"
                } else {
                    ""
                },
                if password.is_some() {
                    " with the password from redis_password_file"
                } else {
                    ""
                },
                if *server_time { "server" } else { "local" },
                if *batch { ", batched" } else { "" }
            );
        }
    }
    if let Some(snap) = &cfg.store.snapshot {
        let _ = writeln!(
            s,
            "snapshot: {} every {:?}{}",
            snap.path.display(),
            snap.interval,
            if snap.start_empty_if_bad {
                " (start empty if unreadable)"
            } else {
                ""
            }
        );
    }
    let _ = writeln!(s, "without sasl: {:?}", cfg.keying.without_sasl);
    let mut tiers: Vec<_> = cfg.tiers.map.tiers().collect();
    tiers.sort_by(|a, b| a.name().cmp(b.name()));
    for t in tiers {
        let limits: Vec<String> = t.limits().iter().map(|l| l.to_string()).collect();
        let action = cfg
            .tiers
            .policies
            .get(t.name())
            .map(|p| format!("{:?}", p.action))
            .unwrap_or_else(|| "Defer".into());
        let default = if t.name() == cfg.tiers.map.default_tier().name() {
            " (default)"
        } else {
            ""
        };
        let _ = writeln!(
            s,
            "tier {}{default}: {} -> {action}",
            t.name(),
            if limits.is_empty() {
                "unlimited".to_string()
            } else {
                limits.join(", ")
            }
        );
    }
    let mut watched: Vec<_> = cfg.networks.by_tier.iter().collect();
    watched.sort_by(|a, b| a.0.cmp(b.0));
    for (tier, n) in watched {
        let _ = writeln!(s, "tier {tier}: networks {} -> {:?}", n.limit, n.action);
    }
    let mut judged: Vec<_> = cfg.baseline.by_tier.iter().collect();
    judged.sort_by(|a, b| a.0.cmp(b.0));
    for (tier, b) in judged {
        let _ = writeln!(
            s,
            "tier {tier}: baseline > max({}, {} x usual) after {}s -> {:?}",
            b.cfg.min(),
            b.cfg.factor(),
            b.cfg.learn().as_secs(),
            b.action
        );
    }
    if !cfg.exempt.baseline_users.is_empty() {
        let _ = writeln!(
            s,
            "baseline-exempt users: {}",
            cfg.exempt.baseline_users.len()
        );
    }
    let mut assigned: Vec<_> = cfg.tiers.map.assignments().collect();
    assigned.sort();
    let _ = writeln!(s, "assignments: {}", assigned.len());
    let _ = writeln!(
        s,
        "exempt: {} users, {} domains, {} client networks",
        cfg.exempt.users.len(),
        cfg.exempt.domains.len(),
        cfg.exempt.clients.len()
    );
    if !cfg.exempt.roaming_users.is_empty() {
        let _ = writeln!(s, "roaming users: {}", cfg.exempt.roaming_users.len());
    }
    s.push_str(&super::ops::describe(&cfg.ops));
    s
}
