//! The baseline signal: `[baseline]` (learn, factor, min, half_life, action, message)
//! and the tiers' `baseline_factor` and `baseline_exempt`.
//!
//! The signal is on when the file has a `[baseline]` section. Every tier is watched
//! then, with the section's factor or its own `baseline_factor`, except the tiers
//! with `baseline_exempt = true`; users in `[exempt] baseline_users` are never
//! watched.

use std::collections::BTreeMap;

use ahash::AHashMap;
use ratelimit_core::TierMap;
use ratelimit_core::baseline::BaselineConfig;
use toml::Spanned;

use super::raw::{RawBaseline, RawTier};
use super::{ActionKind, BaselinePolicy, BaselineSignal, ConfigError, Ctx, defaults};
use crate::template::Template;

/// The signal of every tier in `map`, or none when there is no `[baseline]`.
pub(super) fn build(
    cx: &Ctx<'_>,
    raw: Option<&RawBaseline>,
    tiers: &BTreeMap<String, Spanned<RawTier>>,
    map: &TierMap,
) -> Result<BaselineSignal, ConfigError> {
    let Some(raw) = raw else {
        for (name, t) in tiers {
            if let Some(f) = &t.get_ref().baseline_factor {
                return cx.err(
                    Some(f.span()),
                    &format!("tiers.{name}.baseline_factor"),
                    "needs a [baseline] section (the signal is off without one)",
                );
            }
        }
        return Ok(BaselineSignal::default());
    };
    let learn = match &raw.learn {
        None => defaults::BASELINE_LEARN,
        Some(s) => match ratelimit_core::quota::parse_duration_ms(s.get_ref()) {
            Ok(ms) => std::time::Duration::from_millis(ms),
            Err(e) => return cx.err(Some(s.span()), "baseline.learn", e),
        },
    };
    let half_life = cx.duration(
        &raw.half_life,
        "baseline.half_life",
        defaults::BASELINE_HALF_LIFE,
    )?;
    let half_life_days = half_life.as_secs() / 86_400;
    if half_life.as_millis() % 86_400_000 != 0 || !(1..=365).contains(&half_life_days) {
        let span = raw.half_life.as_ref().map(|h| h.span());
        return cx.err(
            span,
            "baseline.half_life",
            "must be whole days, from 1d to 365d",
        );
    }
    let factor = raw
        .factor
        .as_ref()
        .map_or(defaults::BASELINE_FACTOR, |f| *f.get_ref());
    let min = raw
        .min
        .as_ref()
        .map_or(defaults::BASELINE_MIN, |m| *m.get_ref());
    let base = match BaselineConfig::new(learn, factor, min, half_life_days as u32) {
        Ok(c) => c,
        Err(e) => {
            use ratelimit_core::baseline::BaselineConfigError as E;
            let (span, field) = match e {
                E::Factor => (raw.factor.as_ref().map(|f| f.span()), "baseline.factor"),
                E::Min => (raw.min.as_ref().map(|m| m.span()), "baseline.min"),
                E::Learn => (raw.learn.as_ref().map(|l| l.span()), "baseline.learn"),
                _ => (
                    raw.half_life.as_ref().map(|h| h.span()),
                    "baseline.half_life",
                ),
            };
            return cx.err(span, field, e.to_string());
        }
    };
    let action = cx.keyword(
        &raw.action,
        "baseline.action",
        defaults::BASELINE_ACTION,
        &[
            ("hold", ActionKind::Hold),
            ("defer", ActionKind::Defer),
            ("reject", ActionKind::Reject(None)),
            ("warn", ActionKind::Warn),
            ("dry-run", ActionKind::Warn),
        ],
        "expected hold, defer, reject or warn",
    )?;
    let message = Template::new(raw.message.clone().unwrap_or_else(|| {
        match action {
            ActionKind::Hold | ActionKind::Warn => defaults::BASELINE_MESSAGE,
            _ => defaults::BASELINE_REFUSAL,
        }
        .to_string()
    }));
    let mut by_tier = AHashMap::new();
    for tier in map.tiers() {
        let name = tier.name();
        let t = tiers.get(name).map(|t| t.get_ref());
        let field = |f: &str| format!("tiers.{name}.{f}");
        let factor = t.and_then(|t| t.baseline_factor.as_ref());
        if let Some(e) = t.and_then(|t| t.baseline_exempt.as_ref())
            && *e.get_ref()
        {
            if factor.is_some() {
                return cx.err(
                    Some(e.span()),
                    &field("baseline_exempt"),
                    "baseline_exempt = true and baseline_factor contradict each other",
                );
            }
            continue;
        }
        let cfg = match factor {
            None => base,
            Some(f) => match base.with_factor(*f.get_ref()) {
                Ok(c) => c,
                Err(e) => return cx.err(Some(f.span()), &field("baseline_factor"), e.to_string()),
            },
        };
        by_tier.insert(
            name.to_string(),
            BaselinePolicy {
                cfg,
                action: action.clone(),
                message: message.clone(),
            },
        );
    }
    Ok(BaselineSignal {
        by_tier,
        half_life_days: half_life_days as u32,
    })
}

#[cfg(test)]
mod tests {
    use super::super::parse;

    fn err(text: &str) -> String {
        match parse(text, "t.toml", None) {
            Ok(_) => panic!("accepted: {text}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn the_section_turns_the_signal_on_for_every_tier_but_the_exempt() {
        let off = parse("[tiers.default]\nlimits = [\"10/1h\"]\n", "t.toml", None).unwrap();
        assert!(!off.baseline.is_on());
        let cfg = parse(
            "[baseline]\nfactor = 2.5\n[tiers.default]\nlimits = [\"10/1h\"]\n\
             [tiers.bulk]\nbaseline_factor = 8\n[tiers.free]\nbaseline_exempt = true\n",
            "t.toml",
            None,
        )
        .unwrap();
        let by = &cfg.baseline.by_tier;
        assert_eq!(by.len(), 2);
        assert_eq!(by["default"].cfg.factor(), 2.5);
        assert_eq!(by["bulk"].cfg.factor(), 8.0);
        assert_eq!(by["default"].cfg.min(), 10);
        assert_eq!(by["default"].cfg.learn().as_secs(), 7 * 86_400);
        assert_eq!(cfg.baseline.half_life_days, 7);
    }

    #[test]
    fn bad_values_name_the_line_and_the_key() {
        assert_eq!(
            err("[baseline]\nfactor = 0.5\n"),
            "t.toml:2: baseline.factor: the factor must be a number from 1 to 255"
        );
        assert_eq!(
            err("[baseline]\nmin = 0\n"),
            "t.toml:2: baseline.min: the minimum must be from 1 to 1000000 messages"
        );
        assert_eq!(
            err("[baseline]\nhalf_life = \"36h\"\n"),
            "t.toml:2: baseline.half_life: must be whole days, from 1d to 365d"
        );
        assert_eq!(
            err("[baseline]\naction = \"drop\"\n"),
            "t.toml:2: baseline.action: \"drop\": expected hold, defer, reject or warn"
        );
        assert_eq!(
            err("[tiers.default]\nbaseline_factor = 3\n"),
            "t.toml:2: tiers.default.baseline_factor: needs a [baseline] section (the signal is off without one)"
        );
        assert_eq!(
            err("[baseline]\n[tiers.default]\nbaseline_factor = 3\nbaseline_exempt = true\n"),
            "t.toml:4: tiers.default.baseline_exempt: baseline_exempt = true and baseline_factor contradict each other"
        );
        assert!(err("[baseline]\nlearn = \"soon\"\n").starts_with("t.toml:2: baseline.learn: "));
    }
}
