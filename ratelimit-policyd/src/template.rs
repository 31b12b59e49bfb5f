//! Reply texts: every refusal's text (a tier's `message`, the networks signal's
//! `networks_message`) is a template compiled once when the configuration is loaded
//! and written straight into a reused buffer for each refusal.
//!
//! A tier's template has the placeholders `{user}`, `{tier}`, `{limit}`, `{retry}`,
//! `{retry_at}`; the networks signal's ([`Template::networks`]) also `{max}`,
//! `{window}` and `{networks}`. Anything else between braces is left as written.
//!
//! The meaning of filling is chained `str::replace` calls, one per placeholder
//! ([`Template::replace_chained`]). A template whose braces all belong to
//! placeholders, filled with values without braces (every real one), gives the same
//! text in one pass without allocating; otherwise (a stray brace, a value that
//! itself spells a placeholder) [`Template::write`] falls back to the chained
//! replacements, so the text is the same in every case.
//!
//! # Examples
//!
//! ```
//! use ratelimit_policyd::template::{Fill, Template};
//! use std::time::Duration;
//!
//! let t = Template::new("{user} hit {limit}; retry in {retry}");
//! let mut out = String::new();
//! t.write(
//!     &mut out,
//!     &Fill {
//!         user: "a@b",
//!         tier: "default",
//!         limit: "100/1h",
//!         retry_after: Some(Duration::from_secs(90)),
//!         clears_at: None,
//!         networks: None,
//!     },
//! );
//! assert_eq!(out, "a@b hit 100/1h; retry in 1m30s");
//! ```

use std::fmt::{self, Write};
use std::ops::Range;
use std::time::Duration;

/// One part of a compiled template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    /// Literal text: a range of the source.
    Text(Range<usize>),
    User,
    Tier,
    Limit,
    Retry,
    RetryAt,
    Max,
    Window,
    Networks,
}

/// The placeholders, longest first where one is a prefix of another.
const PLACEHOLDERS: [(&str, Piece); 5] = [
    ("{user}", Piece::User),
    ("{tier}", Piece::Tier),
    ("{limit}", Piece::Limit),
    ("{retry_at}", Piece::RetryAt),
    ("{retry}", Piece::Retry),
];

/// The networks signal's placeholders, beside [`PLACEHOLDERS`].
const NETWORKS_PLACEHOLDERS: [(&str, Piece); 3] = [
    ("{max}", Piece::Max),
    ("{window}", Piece::Window),
    ("{networks}", Piece::Networks),
];

/// A reply text template, compiled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    source: String,
    pieces: Vec<Piece>,
    /// Has the networks signal's placeholders.
    networks: bool,
    /// Every brace of the source belongs to a placeholder: filling in one pass gives
    /// what the chained replacements give (when the values have no braces either).
    one_pass: bool,
}

/// The values a template is filled with.
#[derive(Debug, Clone, Copy)]
pub struct Fill<'a> {
    /// `{user}`: the key.
    pub user: &'a str,
    /// `{tier}`: the tier's name.
    pub tier: &'a str,
    /// `{limit}`: the limit that refused, as written (`100/1h`), or empty.
    pub limit: &'a str,
    /// `{retry}`: when to retry (`12m30s`); `None` for a message over the limit itself.
    pub retry_after: Option<Duration>,
    /// `{retry_at}`: when the limit clears (ms since the epoch), as `14:05:30 UTC`.
    pub clears_at: Option<u64>,
    /// The networks signal's values (for [`Template::networks`] templates).
    pub networks: Option<NetworksFill>,
}

/// `{max}`, `{window}` and `{networks}`.
#[derive(Debug, Clone, Copy)]
pub struct NetworksFill {
    /// `{max}`: the most networks allowed per window.
    pub max: u32,
    /// `{window}`: the window (`1h`).
    pub window: Duration,
    /// `{networks}`: the networks seen.
    pub seen: u32,
}

impl Template {
    /// Compiles a tier's `source`.
    pub fn new(source: impl Into<String>) -> Template {
        Template::compile(source.into(), false)
    }

    /// Compiles the networks signal's `source`.
    pub fn networks(source: impl Into<String>) -> Template {
        Template::compile(source.into(), true)
    }

    fn compile(source: String, networks: bool) -> Template {
        let mut pieces = Vec::new();
        let mut one_pass = true;
        let (mut text_start, mut at) = (0, 0);
        while let Some(i) = memchr::memchr2(b'{', b'}', &source.as_bytes()[at..]) {
            let brace = at + i;
            let rest = &source[brace..];
            let extra: &[(&str, Piece)] = if networks {
                &NETWORKS_PLACEHOLDERS
            } else {
                &[]
            };
            match PLACEHOLDERS
                .iter()
                .chain(extra)
                .find(|(name, _)| rest.starts_with(name))
            {
                Some((name, piece)) => {
                    if text_start < brace {
                        pieces.push(Piece::Text(text_start..brace));
                    }
                    pieces.push(piece.clone());
                    at = brace + name.len();
                    text_start = at;
                }
                None => {
                    one_pass = false;
                    at = brace + 1;
                }
            }
        }
        if text_start < source.len() {
            pieces.push(Piece::Text(text_start..source.len()));
        }
        Template {
            source,
            pieces,
            networks,
            one_pass,
        }
    }

    /// The template as written.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// Appends the filled template to `out` (allocating nothing when `out` has room,
    /// except in the rare fallback described in the [module docs](self)).
    pub fn write(&self, out: &mut String, fill: &Fill<'_>) {
        let braces = |s: &str| memchr::memchr2(b'{', b'}', s.as_bytes()).is_some();
        if !self.one_pass || braces(fill.user) || braces(fill.tier) || braces(fill.limit) {
            out.push_str(&self.replace_chained(fill));
            return;
        }
        for piece in &self.pieces {
            // Writing into a String cannot fail.
            let _ = match piece {
                Piece::Text(range) => out.write_str(self.source.get(range.clone()).unwrap_or("")),
                Piece::User => out.write_str(fill.user),
                Piece::Tier => out.write_str(fill.tier),
                Piece::Limit => out.write_str(fill.limit),
                Piece::Retry => write!(out, "{}", Retry(fill.retry_after)),
                Piece::RetryAt => write!(out, "{}", RetryAt(fill.clears_at)),
                Piece::Max => write!(out, "{}", fill.networks.map_or(0, |n| n.max)),
                Piece::Window => match fill.networks {
                    Some(n) => write!(out, "{}", Approx(n.window)),
                    None => Ok(()),
                },
                Piece::Networks => write!(out, "{}", fill.networks.map_or(0, |n| n.seen)),
            };
        }
    }

    /// The filled template, as chained replacements (the reference meaning): the
    /// networks signal's placeholders and its `{limit}` first, then the others.
    pub fn replace_chained(&self, fill: &Fill<'_>) -> String {
        if self.networks {
            let n = fill.networks.unwrap_or(NetworksFill {
                max: 0,
                window: Duration::ZERO,
                seen: 0,
            });
            let first = self
                .source
                .replace("{max}", &n.max.to_string())
                .replace("{window}", &Approx(n.window).to_string())
                .replace("{networks}", &n.seen.to_string())
                .replace("{limit}", fill.limit);
            return Template::new(first).replace_chained(&Fill { limit: "", ..*fill });
        }
        self.source
            .replace("{user}", fill.user)
            .replace("{tier}", fill.tier)
            .replace("{limit}", fill.limit)
            .replace("{retry_at}", &RetryAt(fill.clears_at).to_string())
            .replace("{retry}", &Retry(fill.retry_after).to_string())
    }
}

impl PartialEq<&str> for Template {
    fn eq(&self, other: &&str) -> bool {
        self.source == *other
    }
}

impl fmt::Display for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

/// `1h5m`, `12m30s`, `45s` (rounded up to whole seconds).
#[derive(Debug, Clone, Copy)]
pub struct Approx(pub Duration);

impl fmt::Display for Approx {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = self.0.as_millis().div_ceil(1000) as u64;
        let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
        match (h, m, s) {
            (0, 0, s) => write!(f, "{s}s"),
            (0, m, 0) => write!(f, "{m}m"),
            (0, m, s) => write!(f, "{m}m{s}s"),
            (h, 0, _) => write!(f, "{h}h"),
            (h, m, _) => write!(f, "{h}h{m}m"),
        }
    }
}

/// `14:05:30 UTC` for a wall-clock time in ms.
#[derive(Debug, Clone, Copy)]
pub struct TimeOfDay(pub u64);

impl fmt::Display for TimeOfDay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = self.0.div_ceil(1000) % 86_400;
        write!(
            f,
            "{:02}:{:02}:{:02} UTC",
            secs / 3600,
            secs / 60 % 60,
            secs % 60
        )
    }
}

/// `2024-05-01T10:00:00Z` (UTC) for milliseconds since the epoch.
pub fn rfc3339(ms: u64) -> String {
    let secs = ms / 1000;
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (proleptic Gregorian).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// `{retry}`.
struct Retry(Option<Duration>);

impl fmt::Display for Retry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(d) => Approx(d).fmt(f),
            None => f.write_str("never (the message exceeds the limit)"),
        }
    }
}

/// `{retry_at}`.
struct RetryAt(Option<u64>);

impl fmt::Display for RetryAt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(ms) => TimeOfDay(ms).fmt(f),
            None => f.write_str("never"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fill<'a>(user: &'a str, tier: &'a str) -> Fill<'a> {
        Fill {
            user,
            tier,
            limit: "100/1h",
            retry_after: Some(Duration::from_secs(90)),
            clears_at: Some(1_700_000_000_000),
            networks: Some(NetworksFill {
                max: 5,
                window: Duration::from_secs(3600),
                seen: 6,
            }),
        }
    }

    fn written(t: &Template, fill: &Fill<'_>) -> String {
        let mut out = String::from("prefix ");
        t.write(&mut out, fill);
        out.split_off("prefix ".len())
    }

    #[test]
    fn every_placeholder_is_filled() {
        let t = Template::new("{user} in {tier} hit {limit}; retry in {retry} ({retry_at})");
        assert_eq!(
            written(&t, &fill("a@b", "default")),
            "a@b in default hit 100/1h; retry in 1m30s (22:13:20 UTC)"
        );
    }

    #[test]
    fn missing_values_read_as_never() {
        let t = Template::new("[{limit}] {retry} / {retry_at}");
        let f = Fill {
            limit: "",
            retry_after: None,
            clears_at: None,
            ..fill("a", "t")
        };
        assert_eq!(
            written(&t, &f),
            "[] never (the message exceeds the limit) / never"
        );
    }

    #[test]
    fn one_pass_matches_the_chained_replacements() {
        let templates = [
            "",
            "no placeholders",
            "{user}",
            "{user}{user}{tier}{retry}{retry_at}{limit}",
            crate::config::DEFAULT_MESSAGE,
            // Not placeholders: left as written (and the fallback keeps them so).
            "{max} {USER} {retry_a} {{user}} {user",
            "}{tier}{",
            "{{user}tier}",
            "héllo {user} wörld {tier}",
        ];
        let fills = [
            fill("a@b", "default"),
            // Values that spell placeholders are replaced again by the chained form.
            fill("{tier}", "{limit}"),
            fill("tier}", "{"),
            fill("x{retry}", "y"),
        ];
        let networks_templates = [
            crate::config::DEFAULT_NETWORKS_MESSAGE,
            crate::config::DEFAULT_NETWORKS_REFUSAL,
            "{user} {max} {window} {networks} {limit} {retry} {retry_at} {tier}",
            "{maxx} {{networks}}",
        ];
        let compiled = templates
            .iter()
            .map(|s| Template::new(*s))
            .chain(networks_templates.iter().map(|s| Template::networks(*s)));
        for t in compiled {
            let source = t.as_str().to_string();
            for f in &fills {
                assert_eq!(
                    written(&t, f),
                    t.replace_chained(f),
                    "{source:?} {:?} {:?}",
                    f.user,
                    f.tier
                );
            }
        }
    }

    #[test]
    fn the_networks_signal_fills_its_own_placeholders() {
        let t = Template::networks(
            "{user}: {networks} networks, more than {max} in {window} ({limit})",
        );
        let f = Fill {
            limit: "networks5/1h",
            ..fill("a@b", "default")
        };
        assert_eq!(
            written(&t, &f),
            "a@b: 6 networks, more than 5 in 1h (networks5/1h)"
        );
        // A tier's template leaves them as written.
        assert_eq!(written(&Template::new("{max} {user}"), &f), "{max} a@b");
    }

    #[test]
    fn durations_read_naturally() {
        let d = |secs| Approx(Duration::from_secs(secs)).to_string();
        assert_eq!(Approx(Duration::from_millis(1)).to_string(), "1s");
        assert_eq!(d(45), "45s");
        assert_eq!(d(750), "12m30s");
        assert_eq!(d(600), "10m");
        assert_eq!(d(3900), "1h5m");
        assert_eq!(d(7200), "2h");
        assert_eq!(TimeOfDay(1_700_000_000_000).to_string(), "22:13:20 UTC");
    }

    #[test]
    fn dates_are_utc_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(4_102_444_799_999), "2099-12-31T23:59:59Z");
    }
}
