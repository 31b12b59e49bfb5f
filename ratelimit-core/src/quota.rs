//! What is allowed: [`Limit`] (`N per window`), its [`Unit`] and [`Algorithm`].
//!
//! A limit is checked when it is built: a zero count, a zero window, or a precision
//! that does not divide the window cannot be constructed, and the error quotes the
//! text that was given.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use crate::clock::duration_to_millis;

/// The default number of sub-windows in a sliding window.
pub const DEFAULT_PRECISION: u16 = 60;
/// The largest precision a sliding window may have.
pub const MAX_PRECISION: u16 = 8191;
/// The longest window, in milliseconds (2^48 ms, about 8900 years).
pub const MAX_WINDOW_MS: u64 = (1 << 48) - 1;

/// What a limit counts.
///
/// With the cargo feature `serde`, it (de)serializes as its lowercase name
/// (`"messages"`), as [`Unit::as_str`] writes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "lowercase"))]
#[non_exhaustive]
pub enum Unit {
    /// One per message.
    #[default]
    Messages,
    /// One per accepted recipient.
    Recipients,
    /// The message size in bytes.
    Bytes,
}

impl Unit {
    fn code(self) -> u64 {
        match self {
            Unit::Messages => 0,
            Unit::Recipients => 1,
            Unit::Bytes => 2,
        }
    }

    /// The unit's name as written in configuration: `messages`, `recipients`, `bytes`.
    pub fn as_str(self) -> &'static str {
        match self {
            Unit::Messages => "messages",
            Unit::Recipients => "recipients",
            Unit::Bytes => "bytes",
        }
    }
}

impl fmt::Display for Unit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Unit {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "message" | "messages" => Ok(Unit::Messages),
            "recipient" | "recipients" => Ok(Unit::Recipients),
            "byte" | "bytes" => Ok(Unit::Bytes),
            other => Err(format!(
                "unknown unit \"{other}\" (expected messages, recipients or bytes)"
            )),
        }
    }
}

/// How a limit is decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Algorithm {
    /// A ring of `precision` sub-windows. Guarantee: the cost accepted in any interval
    /// of length `window` never exceeds `count`. It may over-count by at most one
    /// sub-window's worth of time, never under-count.
    SlidingWindow {
        /// Number of sub-windows in the window.
        precision: u16,
    },
    /// A token bucket decided by GCRA: `count` per `window` drain rate, holding at
    /// most `burst` at once. `retry_after` is exact to the millisecond. Note that a
    /// bucket admits up to `burst + count` in one window; use a sliding window for a
    /// hard "at most N per window".
    TokenBucket {
        /// The most cost the bucket holds.
        burst: u32,
    },
}

/// Why a limit could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid limit \"{text}\": {reason}")]
#[non_exhaustive]
pub struct LimitError {
    /// The text (or parameters) that were given.
    pub text: String,
    /// What is wrong with it.
    pub reason: LimitErrorKind,
}

/// What is wrong with a limit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LimitErrorKind {
    /// The text is not of the form `N/window`.
    #[error("expected the form N/window, such as 100/1h or 5000/1d")]
    Syntax,
    /// The count is missing, zero, or not a number.
    #[error("the count must be a whole number from 1 to 4294967295")]
    Count,
    /// The window could not be read.
    #[error("bad window \"{0}\" (use a number and a unit: ms, s, m, h, d, w; e.g. 1h, 90m, 1d)")]
    Window(String),
    /// The window is zero or too long.
    #[error("the window must be at least 1ms and at most 8900 years")]
    WindowRange,
    /// The precision is zero, too large, or does not divide the window.
    #[error(
        "the precision {0} must be from 1 to 8191 and divide the window into whole milliseconds"
    )]
    Precision(u64),
    /// The burst is zero or too large for the window.
    #[error("the burst {0} must be at least 1, and burst x window (in ms) must fit in 64 bits")]
    Burst(u64),
}

/// A limit: at most `count` units per `window`, decided by an [`Algorithm`].
///
/// # Examples
///
/// ```
/// use ratelimit_core::{Algorithm, Limit, Unit};
/// use std::time::Duration;
///
/// let hourly: Limit = "100/1h".parse().unwrap();
/// assert_eq!(hourly.count(), 100);
/// assert_eq!(hourly.window(), Duration::from_secs(3600));
/// assert_eq!(hourly.algorithm(), Algorithm::SlidingWindow { precision: 60 });
///
/// let daily_rcpt = Limit::sliding(2000, Duration::from_secs(86_400))
///     .unwrap()
///     .with_unit(Unit::Recipients);
/// assert_eq!(daily_rcpt.to_string(), "2000/1d recipients");
///
/// assert!("0/1h".parse::<Limit>().is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Limit {
    count: u32,
    window_ms: u64,
    unit: Unit,
    algorithm: Algorithm,
}

impl Limit {
    /// A sliding-window limit of `count` messages per `window`, with the default precision.
    pub fn sliding(count: u64, window: Duration) -> Result<Limit, LimitError> {
        let text = || format!("{count}/{}", fmt_window(duration_to_millis(window)));
        let count = check_count(count).map_err(|reason| LimitError {
            text: text(),
            reason,
        })?;
        let window_ms = check_window(window).map_err(|reason| LimitError {
            text: text(),
            reason,
        })?;
        Limit {
            count,
            window_ms,
            unit: Unit::Messages,
            algorithm: Algorithm::SlidingWindow { precision: 1 },
        }
        .with_precision(u64::from(DEFAULT_PRECISION))
        .or_else(|_| {
            // Short or odd windows: fall back to the largest precision that divides them.
            let p = (1..=u64::from(DEFAULT_PRECISION))
                .rev()
                .find(|p| window_ms % p == 0)
                .unwrap_or(1);
            Limit {
                count,
                window_ms,
                unit: Unit::Messages,
                algorithm: Algorithm::SlidingWindow { precision: 1 },
            }
            .with_precision(p)
        })
    }

    /// A token-bucket (GCRA) limit: drains `count` per `window`, holds at most `burst`.
    pub fn token_bucket(count: u64, window: Duration, burst: u64) -> Result<Limit, LimitError> {
        let text = || {
            format!(
                "{count}/{} burst {burst}",
                fmt_window(duration_to_millis(window))
            )
        };
        let err = |reason| LimitError {
            text: text(),
            reason,
        };
        let count = check_count(count).map_err(err)?;
        let window_ms = check_window(window).map_err(err)?;
        let burst32 = u32::try_from(burst)
            .ok()
            .filter(|b| *b >= 1)
            .filter(|b| u128::from(*b) * u128::from(window_ms) <= u128::from(u64::MAX))
            .ok_or_else(|| err(LimitErrorKind::Burst(burst)))?;
        Ok(Limit {
            count,
            window_ms,
            unit: Unit::Messages,
            algorithm: Algorithm::TokenBucket { burst: burst32 },
        })
    }

    /// The same limit counting `unit` instead.
    pub fn with_unit(mut self, unit: Unit) -> Limit {
        self.unit = unit;
        self
    }

    /// The same sliding-window limit with `precision` sub-windows. The precision must
    /// divide the window into whole milliseconds. A token bucket is returned unchanged.
    pub fn with_precision(mut self, precision: u64) -> Result<Limit, LimitError> {
        if let Algorithm::SlidingWindow { .. } = self.algorithm {
            let p = u16::try_from(precision)
                .ok()
                .filter(|p| (1..=MAX_PRECISION).contains(p))
                .filter(|p| self.window_ms.is_multiple_of(u64::from(*p)))
                .ok_or_else(|| LimitError {
                    text: self.to_string(),
                    reason: LimitErrorKind::Precision(precision),
                })?;
            self.algorithm = Algorithm::SlidingWindow { precision: p };
        }
        Ok(self)
    }

    /// The most units admitted per window (for a bucket: the drain per window).
    pub fn count(&self) -> u64 {
        u64::from(self.count)
    }

    /// The window length.
    pub fn window(&self) -> Duration {
        Duration::from_millis(self.window_ms)
    }

    /// The window length in milliseconds.
    pub fn window_ms(&self) -> u64 {
        self.window_ms
    }

    /// What is counted.
    pub fn unit(&self) -> Unit {
        self.unit
    }

    /// How it is decided.
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// Sub-window length in ms (sliding windows; the whole window for a bucket).
    pub(crate) fn sub_ms(&self) -> u64 {
        match self.algorithm {
            Algorithm::SlidingWindow { precision } => self.window_ms / u64::from(precision),
            Algorithm::TokenBucket { .. } => self.window_ms,
        }
    }

    /// The identity of the counter this limit reads and writes.
    ///
    /// Counters are keyed by algorithm, unit, window and precision, **not by count**: two
    /// tiers whose limits differ only in `N` share one counter, which is what makes
    /// moving a key to another tier keep what it has already sent.
    pub fn counter_id(&self) -> CounterId {
        let (kind, extra) = match self.algorithm {
            Algorithm::SlidingWindow { precision } => (0u64, u64::from(precision)),
            Algorithm::TokenBucket { .. } => (1u64, 0),
        };
        CounterId((kind << 63) | (self.unit.code() << 61) | (extra << 48) | self.window_ms)
    }
}

/// Identifies one counter of a key: algorithm, unit, window and precision packed in 64 bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CounterId(pub(crate) u64);

impl CounterId {
    /// The packed value (stable: it is written to snapshots and Redis).
    pub fn as_u64(self) -> u64 {
        self.0
    }

    /// Rebuilds an id read back from storage (snapshots, Redis), which checks it.
    ///
    /// Not public: an id means something only as [`Limit::counter_id`] made it, and
    /// arbitrary bits could name a precision or window no limit has.
    pub(crate) fn from_u64(v: u64) -> Self {
        CounterId(v)
    }

    /// Whether this counter is a token bucket (else a sliding window).
    pub fn is_bucket(self) -> bool {
        self.0 >> 63 == 1
    }

    /// Window length in ms.
    pub fn window_ms(self) -> u64 {
        self.0 & MAX_WINDOW_MS
    }

    /// Precision of a sliding-window counter (0 for a bucket).
    pub fn precision(self) -> u64 {
        (self.0 >> 48) & 0x1fff
    }
}

impl fmt::Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.count, fmt_window(self.window_ms))?;
        if self.unit != Unit::Messages {
            write!(f, " {}", self.unit)?;
        }
        if let Algorithm::TokenBucket { burst } = self.algorithm {
            write!(f, " (bucket, burst {burst})")?;
        }
        Ok(())
    }
}

impl FromStr for Limit {
    type Err = LimitError;

    /// Parses `N/window` into a sliding-window limit counting messages, with the
    /// default precision. The window is one or more `<number><unit>` parts (`1h`,
    /// `1h30m`, `90s`, `1d`), or a bare unit (`100/h`). Units: `ms`, `s`, `m`, `h`,
    /// `d`, `w` (and `sec`, `min`, `hour`, `day`, `week`).
    fn from_str(text: &str) -> Result<Limit, LimitError> {
        let err = |reason| LimitError {
            text: text.to_string(),
            reason,
        };
        let (count, window) = text
            .split_once('/')
            .ok_or_else(|| err(LimitErrorKind::Syntax))?;
        let count: u64 = count
            .trim()
            .parse()
            .map_err(|_| err(LimitErrorKind::Count))?;
        let window_ms = parse_window(window.trim()).map_err(err)?;
        Limit::sliding(count, Duration::from_millis(window_ms)).map_err(|e| err(e.reason))
    }
}

fn check_count(count: u64) -> Result<u32, LimitErrorKind> {
    u32::try_from(count)
        .ok()
        .filter(|c| *c >= 1)
        .ok_or(LimitErrorKind::Count)
}

fn check_window(window: Duration) -> Result<u64, LimitErrorKind> {
    let ms = duration_to_millis(window);
    if ms == 0 || ms > MAX_WINDOW_MS || !window.subsec_nanos().is_multiple_of(1_000_000) {
        return Err(LimitErrorKind::WindowRange);
    }
    Ok(ms)
}

/// Parses a duration such as `1h`, `90s`, `1h30m`, `2d`, `h` (= `1h`) into milliseconds.
///
/// # Examples
///
/// ```
/// assert_eq!(ratelimit_core::quota::parse_duration_ms("1h30m"), Ok(5_400_000));
/// assert!(ratelimit_core::quota::parse_duration_ms("1x").is_err());
/// ```
pub fn parse_duration_ms(text: &str) -> Result<u64, String> {
    parse_window(text).map_err(|_| {
        format!("\"{text}\" is not a duration (use a number and a unit: ms, s, m, h, d, w; e.g. 500ms, 30s, 1h)")
    })
}

fn parse_window(text: &str) -> Result<u64, LimitErrorKind> {
    let bad = || LimitErrorKind::Window(text.to_string());
    let s = text.trim();
    if s.is_empty() {
        return Err(bad());
    }
    let mut total: u64 = 0;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        let (num, tail) = rest.split_at(digits);
        let unit_len = tail
            .find(|c: char| !c.is_ascii_alphabetic())
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_len);
        let n: u64 = if num.is_empty() {
            // A bare unit ("100/h") means one of it, but only as the whole window.
            if rest.len() != s.len() {
                return Err(bad());
            }
            1
        } else {
            num.parse().map_err(|_| bad())?
        };
        let scale: u64 = match unit.to_ascii_lowercase().as_str() {
            "ms" => 1,
            "s" | "sec" | "secs" | "second" | "seconds" => 1_000,
            "m" | "min" | "mins" | "minute" | "minutes" => 60_000,
            "h" | "hr" | "hour" | "hours" => 3_600_000,
            "d" | "day" | "days" => 86_400_000,
            "w" | "week" | "weeks" => 604_800_000,
            _ => return Err(bad()),
        };
        total = n
            .checked_mul(scale)
            .and_then(|v| total.checked_add(v))
            .ok_or(LimitErrorKind::WindowRange)?;
        rest = tail.trim_start();
    }
    Ok(total)
}

/// Writes a window in the largest unit that divides it (`1h`, `90s`, `1500ms`).
pub fn fmt_window(ms: u64) -> String {
    const UNITS: [(u64, &str); 5] = [
        (604_800_000, "w"),
        (86_400_000, "d"),
        (3_600_000, "h"),
        (60_000, "m"),
        (1_000, "s"),
    ];
    if ms == 0 {
        return "0s".into();
    }
    for (scale, name) in UNITS {
        if ms.is_multiple_of(scale) {
            return format!("{}{name}", ms / scale);
        }
    }
    format!("{ms}ms")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_usual_forms() {
        let cases: &[(&str, u32, u64)] = &[
            ("100/1h", 100, 3_600_000),
            ("5000/1d", 5000, 86_400_000),
            ("20/10m", 20, 600_000),
            ("3/30s", 3, 30_000),
            ("10/h", 10, 3_600_000),
            (" 7 / 1h30m ", 7, 5_400_000),
            ("1/1w", 1, 604_800_000),
            ("60/60000ms", 60, 60_000),
        ];
        for &(text, count, window) in cases {
            let l: Limit = text.parse().unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!((l.count, l.window_ms), (count, window), "{text}");
            assert_eq!(l.unit(), Unit::Messages);
        }
    }

    #[test]
    fn rejects_invalid_limits_quoting_the_text() {
        for text in [
            "0/1h",
            "100/0h",
            "100",
            "/1h",
            "x/1h",
            "100/1x",
            "100/",
            "-1/1h",
            "4294967296/1h",
            "1/h1",
        ] {
            let e = text.parse::<Limit>().expect_err(text);
            assert!(
                e.to_string().contains(&format!("\"{text}\"")),
                "{text}: {e}"
            );
        }
    }

    #[test]
    fn default_precision_is_60_and_must_divide_the_window() {
        let l: Limit = "100/1h".parse().unwrap();
        assert_eq!(l.algorithm(), Algorithm::SlidingWindow { precision: 60 });
        assert_eq!(l.sub_ms(), 60_000);
        assert!(l.with_precision(7).is_err());
        assert!(l.with_precision(0).is_err());
        assert_eq!(
            l.with_precision(3600).unwrap().algorithm(),
            Algorithm::SlidingWindow { precision: 3600 }
        );
        // A 7 ms window cannot be split in 60: the largest divisor is used.
        let short = Limit::sliding(1, Duration::from_millis(7)).unwrap();
        assert_eq!(short.algorithm(), Algorithm::SlidingWindow { precision: 7 });
    }

    #[test]
    fn counter_ids_ignore_the_count_but_not_the_shape() {
        let a: Limit = "100/1h".parse().unwrap();
        let b: Limit = "1000/1h".parse().unwrap();
        let c: Limit = "100/1d".parse().unwrap();
        assert_eq!(a.counter_id(), b.counter_id());
        assert_ne!(a.counter_id(), c.counter_id());
        assert_ne!(a.counter_id(), a.with_unit(Unit::Recipients).counter_id());
        let t = Limit::token_bucket(100, Duration::from_secs(3600), 10).unwrap();
        assert_ne!(a.counter_id(), t.counter_id());
        assert!(t.counter_id().is_bucket());
        assert_eq!(a.counter_id().precision(), 60);
        assert_eq!(a.counter_id().window_ms(), 3_600_000);
    }

    #[test]
    fn token_bucket_validates_burst() {
        assert!(Limit::token_bucket(10, Duration::from_secs(60), 0).is_err());
        assert!(Limit::token_bucket(10, Duration::from_secs(60), u64::from(u32::MAX)).is_ok());
        assert!(Limit::token_bucket(10, Duration::from_secs(60), 1 << 40).is_err());
        assert!(
            Limit::token_bucket(
                10,
                Duration::from_secs(3600 * 24 * 365 * 100),
                u64::from(u32::MAX)
            )
            .is_err()
        );
    }

    #[test]
    fn display_round_trips_through_parse() {
        for text in ["100/1h", "5000/1d", "20/10m", "7/90s", "3/1500ms"] {
            let l: Limit = text.parse().unwrap();
            assert_eq!(l.to_string(), text);
            assert_eq!(l.to_string().parse::<Limit>().unwrap(), l);
        }
    }
}
