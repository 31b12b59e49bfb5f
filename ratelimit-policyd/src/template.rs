//! Reply text templates (`message` in a tier), compiled once when the configuration
//! is loaded and written straight into a reused buffer for each refusal.
//!
//! A template is text with placeholders: `{user}`, `{tier}`, `{limit}`, `{retry}`,
//! `{retry_at}`. Anything else between braces is left as written.
//!
//! Filling used to be five chained `str::replace` calls, and that stays the meaning:
//! a template whose braces are all placeholders, filled with a user, a tier name and
//! a limit without braces (every real one), gives the same text in one pass without
//! allocating. Otherwise (a stray brace, a value that itself spells a placeholder)
//! [`Template::write`] falls back to the chained replacements, so the text is the
//! same in every case.
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
}

/// The placeholders, longest first where one is a prefix of another.
const PLACEHOLDERS: [(&str, Piece); 5] = [
    ("{user}", Piece::User),
    ("{tier}", Piece::Tier),
    ("{limit}", Piece::Limit),
    ("{retry_at}", Piece::RetryAt),
    ("{retry}", Piece::Retry),
];

/// A reply text template, compiled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    source: String,
    pieces: Vec<Piece>,
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
}

impl Template {
    /// Compiles `source`.
    pub fn new(source: impl Into<String>) -> Template {
        let source = source.into();
        let mut pieces = Vec::new();
        let mut one_pass = true;
        let (mut text_start, mut at) = (0, 0);
        while let Some(i) = memchr::memchr2(b'{', b'}', &source.as_bytes()[at..]) {
            let brace = at + i;
            let rest = &source[brace..];
            match PLACEHOLDERS.iter().find(|(name, _)| rest.starts_with(name)) {
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
            };
        }
    }

    /// The filled template, as five chained replacements (the reference meaning).
    pub fn replace_chained(&self, fill: &Fill<'_>) -> String {
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
        for source in templates {
            let t = Template::new(source);
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
}
