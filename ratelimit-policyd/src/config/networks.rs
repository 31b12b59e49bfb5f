//! The compromise signal: `[networks]` (defaults for every tier) and the tiers'
//! `max_networks`, `networks_window`, `networks_action`, `networks_message` and
//! `networks_exempt`.

use std::collections::BTreeMap;

use ahash::AHashMap;
use ratelimit_core::TierMap;
use ratelimit_core::distinct::DistinctLimit;
use toml::Spanned;

use super::raw::{RawNetworks, RawTier};
use super::{ActionKind, ConfigError, Ctx, NetworksConfig, NetworksPolicy, defaults};
use crate::template::Template;

/// The signal of every tier in `map`: the tier's own keys, else `[networks]` `max`,
/// `window`, `action` and `message`; none for a tier with `networks_exempt = true`
/// or with no threshold anywhere.
pub(super) fn build(
    cx: &Ctx<'_>,
    d: &RawNetworks,
    tiers: &BTreeMap<String, Spanned<RawTier>>,
    map: &TierMap,
) -> Result<NetworksConfig, ConfigError> {
    if let Some(m) = &d.max {
        check_max(cx, m, "networks.max")?;
    }
    let default_window = cx.duration(&d.window, "networks.window", defaults::NETWORKS_WINDOW)?;
    let default_action = action(cx, &d.action, "networks.action", defaults::NETWORKS_ACTION)?;
    if d.max.is_none() && (d.window.is_some() || d.action.is_some() || d.message.is_some()) {
        return cx.err(
            None,
            "networks",
            "window, action and message need a threshold: set max (or max_networks in a tier)",
        );
    }
    let mut by_tier = AHashMap::new();
    for tier in map.tiers() {
        let name = tier.name();
        let t = tiers.get(name).map(|t| t.get_ref());
        let field = |f: &str| format!("tiers.{name}.{f}");
        let exempt = t.and_then(|t| t.networks_exempt.as_ref());
        let max = t.and_then(|t| t.max_networks.as_ref());
        if let Some(m) = max {
            check_max(cx, m, &field("max_networks"))?;
        }
        if let Some(e) = exempt
            && *e.get_ref()
        {
            if max.is_some() {
                return cx.err(
                    Some(e.span()),
                    &field("networks_exempt"),
                    "networks_exempt = true and max_networks contradict each other",
                );
            }
            continue;
        }
        let Some(max) = max
            .map(|m| *m.get_ref())
            .or(d.max.as_ref().map(|m| *m.get_ref()))
        else {
            if let Some(t) = t
                && (t.networks_window.is_some()
                    || t.networks_action.is_some()
                    || t.networks_message.is_some())
            {
                return cx.err(
                    None,
                    &field("max_networks"),
                    "networks_window, networks_action and networks_message need a threshold: set max_networks here or max in [networks]",
                );
            }
            continue;
        };
        let window = match t {
            Some(t) => cx.duration(
                &t.networks_window,
                &field("networks_window"),
                default_window,
            )?,
            None => default_window,
        };
        let limit = match DistinctLimit::new(max, window) {
            Ok(l) => l,
            Err(e) => {
                let span = t
                    .and_then(|t| t.networks_window.as_ref())
                    .or(d.window.as_ref())
                    .map(|w| w.span());
                return cx.err(span, &field("networks_window"), e.to_string());
            }
        };
        let action = match t {
            Some(t) => action(
                cx,
                &t.networks_action,
                &field("networks_action"),
                default_action.clone(),
            )?,
            None => default_action.clone(),
        };
        let message = t
            .and_then(|t| t.networks_message.clone())
            .or_else(|| d.message.clone())
            .unwrap_or_else(|| {
                match action {
                    ActionKind::Hold | ActionKind::Warn => defaults::NETWORKS_MESSAGE,
                    _ => defaults::NETWORKS_REFUSAL,
                }
                .to_string()
            });
        by_tier.insert(
            name.to_string(),
            NetworksPolicy {
                limit,
                action,
                message: Template::networks(message),
            },
        );
    }
    Ok(NetworksConfig { by_tier })
}

fn check_max(cx: &Ctx<'_>, m: &Spanned<u32>, field: &str) -> Result<(), ConfigError> {
    let v = *m.get_ref();
    if v == 0 || v > DistinctLimit::MAX_THRESHOLD {
        return cx.err(
            Some(m.span()),
            field,
            format!(
                "{v}: must be from 1 to {} (the number of networks a user may send from per window)",
                DistinctLimit::MAX_THRESHOLD
            ),
        );
    }
    Ok(())
}

fn action(
    cx: &Ctx<'_>,
    a: &Option<Spanned<String>>,
    field: &str,
    default: ActionKind,
) -> Result<ActionKind, ConfigError> {
    cx.keyword(
        a,
        field,
        default,
        &[
            ("hold", ActionKind::Hold),
            ("defer", ActionKind::Defer),
            ("reject", ActionKind::Reject(None)),
            ("warn", ActionKind::Warn),
            ("dry-run", ActionKind::Warn),
        ],
        "expected hold, defer, reject or warn",
    )
}
