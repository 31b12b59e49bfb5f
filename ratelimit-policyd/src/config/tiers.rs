//! The tiers: `[tiers.*]` (limits, action, reply code, message), `default_tier`,
//! `[assign]`, `assign_file`, and the tier map file format ([`apply_map_file`]).

use std::collections::BTreeMap;

use ahash::AHashMap;
use ratelimit_core::{Limit, Tier, TierMap, Unit};
use toml::Spanned;

use super::raw::{RawLimit, RawTier};
use super::{ActionKind, ConfigError, Ctx, TierPolicy, TiersConfig, defaults, limit_texts};
use crate::key;
use crate::template::Template;

impl Default for TiersConfig {
    /// The configuration without `[tiers]`: one tier, [`defaults::TIER`], with
    /// [`defaults::TIER_LIMIT_COUNT`] messages per [`defaults::TIER_LIMIT_WINDOW`].
    fn default() -> Self {
        let tier = Tier::new(
            defaults::TIER,
            Limit::sliding(defaults::TIER_LIMIT_COUNT, defaults::TIER_LIMIT_WINDOW).ok(),
        )
        .unwrap_or_else(|_| unreachable_tier());
        let mut policies = AHashMap::new();
        policies.insert(
            defaults::TIER.to_string(),
            TierPolicy {
                action: defaults::TIER_ACTION,
                message: Template::new(defaults::MESSAGE),
                limits: limit_texts(tier.limits()),
            },
        );
        TiersConfig {
            map: TierMap::new(tier),
            policies,
            assign_file: None,
        }
    }
}

fn unreachable_tier() -> Tier {
    // The default name is a valid name and no limits is a valid tier.
    match Tier::new(defaults::TIER, []) {
        Ok(t) => t,
        Err(_) => unreachable!("an empty tier with the default name is valid"),
    }
}

/// Longest tier name.
pub const MAX_TIER_NAME: usize = 64;

/// Whether `name` is a valid tier name, or why not: 1 to [`MAX_TIER_NAME`] ASCII
/// letters, digits, `-`, `_` or `.`. Tier names are written in the tier map and
/// overrides files (`user tier` lines), in log lines and in metric labels; such a
/// name needs no quoting in any of them.
pub fn check_tier_name(name: &str) -> Result<(), String> {
    if name.is_empty()
        || name.len() > MAX_TIER_NAME
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err(format!(
            "\"{}\": a tier name is 1 to {MAX_TIER_NAME} ASCII letters, digits, '-', '_' or '.'",
            crate::escape::Escaped(name)
        ));
    }
    Ok(())
}

/// Validates `[tiers.*]` and `default_tier` (assignments come later, from
/// [`assign`]). No `[tiers]` at all is the default tier alone.
pub(super) fn build(
    cx: &Ctx<'_>,
    raw: &BTreeMap<String, Spanned<RawTier>>,
    default_tier: Option<&Spanned<String>>,
) -> Result<TiersConfig, ConfigError> {
    if raw.is_empty() {
        return Ok(TiersConfig::default());
    }
    let default_name = match default_tier {
        Some(d) => {
            if !raw.contains_key(d.get_ref()) {
                return cx.err(
                    Some(d.span()),
                    "default_tier",
                    format!("tier \"{}\" is not defined under [tiers]", d.get_ref()),
                );
            }
            d.get_ref().clone()
        }
        None if raw.contains_key(defaults::TIER) => defaults::TIER.to_string(),
        None => {
            return cx.err(
                None,
                "default_tier",
                "no tier is called \"default\": name one with default_tier = \"...\"",
            );
        }
    };
    let mut policies = AHashMap::new();
    let mut built = Vec::new();
    for (name, tier) in raw {
        // Escaped: a name with a newline is refused below, and the error names it.
        let field = format!("tiers.{}", crate::escape::Escaped(name));
        let span = tier.span();
        check_tier_name(name).or_else(|e| cx.err(Some(span.clone()), &field, e))?;
        let tier = tier.get_ref();
        let mut limits = Vec::new();
        for l in &tier.limits {
            limits.push(
                build_limit(l.get_ref())
                    .or_else(|e| cx.err(Some(l.span()), &format!("{field}.limits"), e))?,
            );
        }
        let t = Tier::new(name.clone(), limits)
            .or_else(|e| cx.err(Some(span.clone()), &field, e.to_string()))?;
        let action = build_action(cx, &field, tier)?;
        policies.insert(
            name.clone(),
            TierPolicy {
                action,
                message: Template::new(
                    tier.message
                        .clone()
                        .unwrap_or_else(|| defaults::MESSAGE.to_string()),
                ),
                limits: limit_texts(t.limits()),
            },
        );
        built.push(t);
    }
    let pos = built
        .iter()
        .position(|t| t.name() == default_name)
        .unwrap_or(0);
    let default = built.remove(pos);
    let mut map = TierMap::new(default);
    for t in built {
        let name = t.name().to_string();
        map.add_tier(t)
            .or_else(|e| cx.err(None, &format!("tiers.{name}"), e.to_string()))?;
    }
    Ok(TiersConfig {
        map,
        policies,
        assign_file: None,
    })
}

/// Applies `[assign]` and then `assign_file` (relative to the configuration's
/// directory) to the tiers built by [`build`].
pub(super) fn assign(
    cx: &Ctx<'_>,
    raw: &BTreeMap<String, Spanned<String>>,
    file: Option<&Spanned<String>>,
    tiers: &mut TiersConfig,
) -> Result<(), ConfigError> {
    for (key, tier) in raw {
        let key = key::from_text(key);
        tiers.map.assign(&key, tier.get_ref()).or_else(|e| {
            cx.err(
                Some(tier.span()),
                &format!("assign.\"{key}\""),
                e.to_string(),
            )
        })?;
    }
    if let Some(f) = file {
        let p = cx.resolve(f.get_ref());
        let text = std::fs::read_to_string(&p).or_else(|e| {
            cx.err(
                Some(f.span()),
                "assign_file",
                format!("cannot read {}: {e}", p.display()),
            )
        })?;
        apply_map_file(&mut tiers.map, &text, &p.display().to_string())?;
        tiers.assign_file = Some(p);
    }
    Ok(())
}

fn build_limit(raw: &RawLimit) -> Result<Limit, String> {
    match raw {
        RawLimit::Text(t) => t.parse::<Limit>().map_err(|e| e.to_string()),
        RawLimit::Table(t) => {
            let base: Limit = t
                .limit
                .parse()
                .map_err(|e: ratelimit_core::LimitError| e.to_string())?;
            let mut l = match t.algorithm.as_deref() {
                None | Some("window") | Some("sliding") => {
                    if t.burst.is_some() {
                        return Err("burst applies only to algorithm = \"bucket\"".into());
                    }
                    match t.precision {
                        Some(p) => base.with_precision(p).map_err(|e| e.to_string())?,
                        None => base,
                    }
                }
                Some("bucket") => {
                    if t.precision.is_some() {
                        return Err("precision applies only to sliding windows".into());
                    }
                    Limit::token_bucket(
                        base.count(),
                        base.window(),
                        t.burst.unwrap_or(base.count()),
                    )
                    .map_err(|e| e.to_string())?
                }
                Some(other) => {
                    return Err(format!(
                        "algorithm \"{other}\": expected \"window\" or \"bucket\""
                    ));
                }
            };
            if let Some(u) = &t.unit {
                l = l.with_unit(u.parse::<Unit>()?);
            }
            Ok(l)
        }
    }
}

/// A tier's `action` with its `reply_code`: the code is checked first, then the
/// action, then that the two go together. `field` is `tiers.NAME`.
fn build_action(cx: &Ctx<'_>, field: &str, t: &RawTier) -> Result<ActionKind, ConfigError> {
    let code_field = format!("{field}.reply_code");
    let code = match &t.reply_code {
        None => None,
        Some(c) => Some((
            check_code(c.get_ref()).or_else(|e| cx.err(Some(c.span()), &code_field, e))?,
            c.span(),
        )),
    };
    let action = cx.keyword(
        &t.action,
        &format!("{field}.action"),
        defaults::TIER_ACTION,
        &[
            ("defer", ActionKind::Defer),
            ("reject", ActionKind::Reject(None)),
            ("hold", ActionKind::Hold),
            ("warn", ActionKind::Warn),
            ("dry-run", ActionKind::Warn),
        ],
        "expected defer, hold, reject or warn",
    )?;
    let Some((c, span)) = code else {
        return Ok(action);
    };
    match action {
        ActionKind::Defer if c.starts_with('4') => Ok(ActionKind::Code(c)),
        ActionKind::Defer => cx.err(
            Some(span),
            &code_field,
            format!("\"{c}\": action \"defer\" needs a 4xx code"),
        ),
        ActionKind::Reject(_) if c.starts_with('5') => Ok(ActionKind::Reject(Some(c))),
        ActionKind::Reject(_) => cx.err(
            Some(span),
            &code_field,
            format!("\"{c}\": action \"reject\" needs a 5xx code"),
        ),
        _ => cx.err(
            Some(span),
            &code_field,
            "reply_code applies only to defer and reject",
        ),
    }
}

/// Checks an SMTP reply code with an optional enhanced status: `451` or `451 4.7.1`.
fn check_code(s: &str) -> Result<String, String> {
    let mut parts = s.split_whitespace();
    let code = parts.next().unwrap_or("");
    let valid_code = code.len() == 3
        && code.bytes().all(|b| b.is_ascii_digit())
        && matches!(code.as_bytes()[0], b'4' | b'5');
    let enhanced = parts.next();
    let valid_enh = enhanced.is_none_or(|e| {
        let f: Vec<&str> = e.split('.').collect();
        f.len() == 3
            && f.iter()
                .all(|x| !x.is_empty() && x.len() <= 3 && x.bytes().all(|b| b.is_ascii_digit()))
            && f[0].as_bytes().first() == code.as_bytes().first()
    });
    if !valid_code || !valid_enh || parts.next().is_some() {
        return Err(format!(
            "\"{s}\": expected a 4xx or 5xx code, optionally with a matching enhanced status (e.g. \"451 4.7.1\")"
        ));
    }
    Ok(s.split_whitespace().collect::<Vec<_>>().join(" "))
}

/// Applies a tier map file: one `user tier` or `@domain tier` per line; `#` starts a
/// comment; blank lines are ignored. Errors name the file and line.
pub fn apply_map_file(map: &mut TierMap, text: &str, file: &str) -> Result<usize, ConfigError> {
    let mut n = 0;
    for (i, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let err = |message: String| ConfigError {
            file: file.to_string(),
            line: Some(i + 1),
            field: None,
            message,
        };
        let mut words = line.split_whitespace();
        let (Some(key), Some(tier), None) = (words.next(), words.next(), words.next()) else {
            return Err(err(format!(
                "expected \"user tier\" or \"@domain tier\", found \"{line}\""
            )));
        };
        map.assign(&key::from_text(key), tier)
            .map_err(|e| err(e.to_string()))?;
        n += 1;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_validated() {
        assert_eq!(check_code("451 4.7.1"), Ok("451 4.7.1".into()));
        assert_eq!(check_code("421"), Ok("421".into()));
        for bad in [
            "45",
            "351",
            "451 5.7.1",
            "451 4.7",
            "abc",
            "451 4.7.1 extra",
        ] {
            assert!(check_code(bad).is_err(), "{bad}");
        }
    }
}
