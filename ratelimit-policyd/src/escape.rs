//! Text a client controls (user names, sender addresses, client addresses) and names
//! read from files (tiers from the overrides file), made safe to print on a terminal
//! or in a text log: control characters are written as escapes, so a name with a
//! carriage return cannot forge a log line and an `ESC [` sequence cannot drive the
//! operator's terminal.
//!
//! - [`Escaped`] is the `Display` wrapper for human-readable output (the admin CLI's
//!   text replies, `replay`).
//! - [`TextFields`] formats the fields of text log lines (the daemon's text format):
//!   every field value, the message included, is escaped as it is written, so every
//!   log site is covered without wrapping each value. The JSON log format keeps
//!   its own field formatter: it writes the original string, which JSON escapes by
//!   itself (`\u001b`).
//!
//! Escapes: `\t`, `\n`, `\r` by name; other C0 controls and DEL as `\xHH` (`\x1b`);
//! C1 controls as `\u{HH}` (`\u{85}`). A backslash is left as it is, so a key that
//! spells a byte as `\XE9` (see [`key`](crate::key)) prints the same in a log line
//! and in an admin command.

use std::fmt::{self, Write};

use tracing::field::{Field, Visit};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::FormatFields;
use tracing_subscriber::fmt::format::Writer;

/// `text` with its control characters escaped, for printing.
///
/// # Examples
///
/// ```
/// use ratelimit_policyd::escape::Escaped;
/// assert_eq!(Escaped("ev\x1b[2Jil\r\n").to_string(), "ev\\x1b[2Jil\\r\\n");
/// assert_eq!(Escaped("caf\u{e9}\u{85}").to_string(), "caf\u{e9}\\u{85}");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Escaped<'a>(pub &'a str);

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        EscapeWriter(f).write_str(self.0)
    }
}

/// Whether `c` is written as an escape: C0 controls, DEL, C1 controls.
pub fn needs_escape(c: char) -> bool {
    c.is_control()
}

/// `text` escaped as [`Escaped`] prints it; borrowed when nothing needs escaping.
pub fn escape(text: &str) -> std::borrow::Cow<'_, str> {
    if text.chars().any(needs_escape) {
        std::borrow::Cow::Owned(Escaped(text).to_string())
    } else {
        std::borrow::Cow::Borrowed(text)
    }
}

/// A `fmt::Write` that escapes what is written through it.
pub struct EscapeWriter<W>(pub W);

impl<W: Write> Write for EscapeWriter<W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut rest = s;
        while let Some(i) = rest.find(needs_escape) {
            let (clean, tail) = rest.split_at(i);
            self.0.write_str(clean)?;
            let mut chars = tail.chars();
            if let Some(c) = chars.next() {
                write_escape(&mut self.0, c)?;
            }
            rest = chars.as_str();
        }
        self.0.write_str(rest)
    }
}

fn write_escape(w: &mut impl Write, c: char) -> fmt::Result {
    match c {
        '\t' => w.write_str("\\t"),
        '\n' => w.write_str("\\n"),
        '\r' => w.write_str("\\r"),
        c if (c as u32) < 0x80 => write!(w, "\\x{:02x}", c as u32),
        c => write!(w, "\\u{{{:x}}}", c as u32),
    }
}

/// The field formatter of text log lines: `message key=value key=value`, like
/// tracing's default, with every value escaped ([`Escaped`]). String values passed
/// as such (`client = peer`) are quoted, `%value` and `?value` fields are not, as
/// in the default format.
///
/// # Examples
///
/// ```
/// let subscriber = tracing_subscriber::fmt()
///     .fmt_fields(ratelimit_policyd::escape::TextFields)
///     .finish();
/// # drop(subscriber);
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct TextFields;

impl<'w> FormatFields<'w> for TextFields {
    fn format_fields<R: RecordFields>(&self, writer: Writer<'w>, fields: R) -> fmt::Result {
        let mut v = TextVisitor {
            writer,
            first: true,
            result: Ok(()),
        };
        fields.record(&mut v);
        v.result
    }
}

struct TextVisitor<'w> {
    writer: Writer<'w>,
    first: bool,
    result: fmt::Result,
}

impl Visit for TextVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.record_debug(field, &format_args!("{value}"));
        } else {
            self.record_debug(field, &value);
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if self.result.is_err() {
            return;
        }
        let sep = if self.first { "" } else { " " };
        self.first = false;
        let w = &mut self.writer;
        self.result = if field.name() == "message" {
            w.write_str(sep)
                .and_then(|()| write!(EscapeWriter(&mut *w), "{value:?}"))
        } else {
            write!(w, "{sep}{}=", field.name())
                .and_then(|()| write!(EscapeWriter(&mut *w), "{value:?}"))
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_and_the_rest_kept() {
        let cases = [
            ("alice@example.com", "alice@example.com"),
            ("a\rb\nc\td", "a\\rb\\nc\\td"),
            ("\x1b[31mred\x1b[0m", "\\x1b[31mred\\x1b[0m"),
            ("\0\x7f", "\\x00\\x7f"),
            ("\u{85}\u{9b}31m", "\\u{85}\\u{9b}31m"),
            ("Élodie jos\\XE9", "Élodie jos\\XE9"),
        ];
        for (raw, want) in cases {
            assert_eq!(Escaped(raw).to_string(), want, "{raw:?}");
            assert_eq!(escape(raw), want, "{raw:?}");
        }
        assert!(matches!(escape("plain"), std::borrow::Cow::Borrowed(_)));
    }

    #[derive(Clone, Default)]
    struct Buf(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn text_log_lines_escape_every_field_and_quote_plain_strings() {
        let buf = Buf::default();
        let out = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .fmt_fields(TextFields)
            .with_ansi(false)
            .without_time()
            .with_target(false)
            .with_writer(move || out.clone())
            .finish();
        let user = "eve\r\n WARN forged";
        let client = "192.0.2.1\x1b[2J";
        tracing::subscriber::with_default(subscriber, || {
            tracing::warn!(user = %user, client, n = 3, "bad {}", "na\x07me");
        });
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        assert_eq!(
            text,
            " WARN bad na\\x07me user=eve\\r\\n WARN forged client=\"192.0.2.1\\u{1b}[2J\" n=3\n"
        );
    }
}
