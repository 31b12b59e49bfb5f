//! Command-line durations: `10s`, `2.5s`, `500ms`, `1m`, `0`.

use std::fmt;
use std::time::Duration;

/// Why a duration string was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DurationError {
    /// The number part is missing or not a non-negative decimal number.
    BadNumber,
    /// The unit is not one of `ms`, `s`, `m`, `h` (or none, meaning seconds).
    BadUnit,
}

impl fmt::Display for DurationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DurationError::BadNumber => f.write_str("expected a non-negative number, e.g. 10s"),
            DurationError::BadUnit => f.write_str("unit must be ms, s, m or h, e.g. 500ms"),
        }
    }
}

impl std::error::Error for DurationError {}

/// Parses `10s`, `2.5s`, `500ms`, `1m`, `1h`; a bare number is seconds.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use ratelimit_benches::duration::parse_duration;
/// assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
/// assert_eq!(parse_duration("2.5s"), Ok(Duration::from_millis(2500)));
/// assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
/// ```
pub fn parse_duration(s: &str) -> Result<Duration, DurationError> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let value: f64 = num.parse().map_err(|_| DurationError::BadNumber)?;
    if !value.is_finite() || value < 0.0 {
        return Err(DurationError::BadNumber);
    }
    let scale = match unit.trim() {
        "ms" => 1e-3,
        "" | "s" => 1.0,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        _ => return Err(DurationError::BadUnit),
    };
    Ok(Duration::from_secs_f64(value * scale))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_scale_the_number() {
        let cases = [
            ("0", 0),
            ("10s", 10_000),
            ("500ms", 500),
            ("1m", 60_000),
            ("1h", 3_600_000),
            ("0.25s", 250),
        ];
        for (input, ms) in cases {
            assert_eq!(
                parse_duration(input),
                Ok(Duration::from_millis(ms)),
                "{input}"
            );
        }
    }

    #[test]
    fn garbage_is_refused() {
        assert_eq!(parse_duration("s"), Err(DurationError::BadNumber));
        assert_eq!(parse_duration("10x"), Err(DurationError::BadUnit));
        assert_eq!(parse_duration("-1s"), Err(DurationError::BadNumber));
    }
}
