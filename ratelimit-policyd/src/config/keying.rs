//! `[keying]` (what a request is counted under) and `[exempt]` (who is never limited
//! or never watched). Names go through [`crate::key::from_text`], the one user-key
//! normalizer the request path and the admin commands use too.

use super::raw::{RawExempt, RawKeying};
use super::{ConfigError, Ctx, ExemptConfig, KeyingConfig, WithoutSasl, defaults};
use crate::key;

impl Default for KeyingConfig {
    /// Every `[keying]` key at its default ([`defaults`]).
    fn default() -> Self {
        KeyingConfig {
            without_sasl: defaults::WITHOUT_SASL,
            ipv4_prefix: defaults::IPV4_PREFIX,
            ipv6_prefix: defaults::IPV6_PREFIX,
        }
    }
}

/// Validates `[keying]`.
pub(super) fn build(cx: &Ctx<'_>, raw: &RawKeying) -> Result<KeyingConfig, ConfigError> {
    let without_sasl = cx.keyword(
        &raw.without_sasl,
        "keying.without_sasl",
        defaults::WITHOUT_SASL,
        &[
            ("skip", WithoutSasl::Skip),
            ("client_address", WithoutSasl::ClientAddress),
            ("client_prefix", WithoutSasl::ClientPrefix),
            ("sender", WithoutSasl::Sender),
        ],
        "expected skip, client_address, client_prefix or sender",
    )?;
    let ipv4_prefix = match &raw.ipv4_prefix {
        None => defaults::IPV4_PREFIX,
        Some(v) if *v.get_ref() > 32 => {
            return cx.err(Some(v.span()), "keying.ipv4_prefix", "must be from 0 to 32");
        }
        Some(v) => *v.get_ref(),
    };
    let ipv6_prefix = match &raw.ipv6_prefix {
        None => defaults::IPV6_PREFIX,
        Some(v) if *v.get_ref() > 128 => {
            return cx.err(
                Some(v.span()),
                "keying.ipv6_prefix",
                "must be from 0 to 128",
            );
        }
        Some(v) => *v.get_ref(),
    };
    Ok(KeyingConfig {
        without_sasl,
        ipv4_prefix,
        ipv6_prefix,
    })
}

/// Validates `[exempt]`: users and roaming users normalized, domains without a
/// leading `@`, client networks parsed.
pub(super) fn build_exempt(cx: &Ctx<'_>, raw: &RawExempt) -> Result<ExemptConfig, ConfigError> {
    Ok(ExemptConfig {
        users: raw.users.iter().map(|u| key::from_text(u)).collect(),
        domains: raw
            .domains
            .iter()
            .map(|d| key::from_text(d.trim_start_matches('@')))
            .collect(),
        clients: cx.nets(&raw.clients, "exempt.clients")?,
        roaming_users: raw
            .roaming_users
            .iter()
            .map(|u| key::from_text(u))
            .collect(),
        baseline_users: raw
            .baseline_users
            .iter()
            .map(|u| key::from_text(u))
            .collect(),
    })
}
