//! Replies: the [`Action`] the server answers with, its encoder and its decoder.
//!
//! [`encode_response`] writes `action=<value>\n\n` into a reused byte buffer, sanitizing
//! the text on the way; [`parse_response`] reads a reply back as Postfix would (for tests,
//! the load generator and fuzzing), framed by the same scanner as requests.

use std::borrow::Cow;
use std::fmt;

use super::request::{ParseError, RequestBounds, Status, scan};

/// Longest reply text [`encode_response`] writes, in bytes; longer text is cut at a
/// character boundary.
///
/// An SMTP reply line may be 512 bytes (RFC 5321 §4.5.3.1.5). Postfix puts a code, an
/// enhanced status code and often a prefix such as `<addr>: Recipient address rejected: `
/// before our text, so 400 bytes of text keeps the whole line within bounds.
pub const MAX_TEXT: usize = 400;

/// Text used for a [`Action::Code`] whose text is blank after sanitizing.
///
/// A bare `451` would be all digits, which Postfix reads as OK (a legacy permit), so an
/// explicit code always carries text.
pub const DEFAULT_CODE_TEXT: &str = "Refused by policy";

/// An SMTP reply code for an explicit `4NN text` / `5NN text` action: three digits,
/// 400 to 599.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ReplyCode(u16);

/// A number that is not a 4xx or 5xx SMTP reply code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0} is not a 4xx or 5xx reply code")]
pub struct InvalidReplyCode(pub u16);

impl ReplyCode {
    /// Checks that `code` is in 400..=599.
    ///
    /// # Examples
    ///
    /// ```
    /// use ratelimit_policyd::protocol::ReplyCode;
    /// assert_eq!(ReplyCode::new(451).unwrap().get(), 451);
    /// assert!(ReplyCode::new(250).is_err());
    /// assert!(ReplyCode::new(4510).is_err());
    /// ```
    pub const fn new(code: u16) -> Result<ReplyCode, InvalidReplyCode> {
        if code >= 400 && code <= 599 {
            Ok(ReplyCode(code))
        } else {
            Err(InvalidReplyCode(code))
        }
    }

    /// The number.
    pub const fn get(self) -> u16 {
        self.0
    }

    /// `true` for 4xx (temporary: the client keeps the mail and retries).
    pub const fn is_temporary(self) -> bool {
        self.0 < 500
    }
}

impl fmt::Display for ReplyCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A reply to Postfix: the value of the `action` attribute (an access(5) action).
///
/// Text is free-form and optional (empty means none). It is sanitized when written: each
/// control character (CR, LF, NUL, ...) becomes a space, surrounding whitespace is
/// trimmed, and it is cut to [`MAX_TEXT`] bytes. [`Action::sanitized`] gives the action
/// exactly as [`parse_response`] will read it back.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Action<'a> {
    /// `DUNNO`: no decision; Postfix goes on to the next restriction.
    Dunno,
    /// `OK`: permit (ends the restriction list it is in).
    Ok,
    /// `DEFER_IF_PERMIT text`: 450 4.7.1, but only if the final result would be a permit.
    DeferIfPermit(Cow<'a, str>),
    /// `DEFER text`: 450 4.7.1 (`access_map_defer_code`).
    Defer(Cow<'a, str>),
    /// `REJECT text`: 554 5.7.1 (`access_map_reject_code`); permanent.
    Reject(Cow<'a, str>),
    /// `HOLD text`: accept into the hold queue (quarantine for review).
    Hold(Cow<'a, str>),
    /// `NNN text`: an explicit 4xx/5xx reply, e.g. `451 4.7.1 Slow down`.
    Code {
        /// The reply code.
        code: ReplyCode,
        /// The text after it, usually starting with an enhanced status code.
        text: Cow<'a, str>,
    },
    /// `WARN text`: log a warning, no decision.
    Warn(Cow<'a, str>),
    /// `INFO text` (Postfix ≥ 3.0): log, no decision.
    Info(Cow<'a, str>),
    /// `PREPEND header: value`: add a header (ignored by Postfix at END-OF-MESSAGE).
    Prepend(Cow<'a, str>),
}

impl<'a> Action<'a> {
    /// `DEFER_IF_PERMIT text`.
    pub fn defer_if_permit(text: impl Into<Cow<'a, str>>) -> Self {
        Action::DeferIfPermit(text.into())
    }

    /// `DEFER text`.
    pub fn defer(text: impl Into<Cow<'a, str>>) -> Self {
        Action::Defer(text.into())
    }

    /// `REJECT text`.
    pub fn reject(text: impl Into<Cow<'a, str>>) -> Self {
        Action::Reject(text.into())
    }

    /// `HOLD text`.
    pub fn hold(text: impl Into<Cow<'a, str>>) -> Self {
        Action::Hold(text.into())
    }

    /// `NNN text`, checking that `code` is a 4xx or 5xx code.
    ///
    /// # Examples
    ///
    /// ```
    /// use ratelimit_policyd::protocol::{encode_response, Action};
    /// let action = Action::code(451, "4.7.1 Try again in 10 minutes")?;
    /// let mut out = Vec::new();
    /// encode_response(&action, &mut out);
    /// assert_eq!(out, b"action=451 4.7.1 Try again in 10 minutes\n\n");
    /// assert!(Action::code(250, "fine").is_err());
    /// # Ok::<(), ratelimit_policyd::protocol::InvalidReplyCode>(())
    /// ```
    pub fn code(code: u16, text: impl Into<Cow<'a, str>>) -> Result<Self, InvalidReplyCode> {
        Ok(Action::Code {
            code: ReplyCode::new(code)?,
            text: text.into(),
        })
    }

    /// `WARN text`.
    pub fn warn(text: impl Into<Cow<'a, str>>) -> Self {
        Action::Warn(text.into())
    }

    /// `INFO text`.
    pub fn info(text: impl Into<Cow<'a, str>>) -> Self {
        Action::Info(text.into())
    }

    /// `PREPEND header: value`.
    pub fn prepend(header: impl Into<Cow<'a, str>>) -> Self {
        Action::Prepend(header.into())
    }

    /// The action word (`"DEFER_IF_PERMIT"`); for [`Action::Code`] the empty string.
    pub fn keyword(&self) -> &'static str {
        match self {
            Action::Dunno => "DUNNO",
            Action::Ok => "OK",
            Action::DeferIfPermit(_) => "DEFER_IF_PERMIT",
            Action::Defer(_) => "DEFER",
            Action::Reject(_) => "REJECT",
            Action::Hold(_) => "HOLD",
            Action::Code { .. } => "",
            Action::Warn(_) => "WARN",
            Action::Info(_) => "INFO",
            Action::Prepend(_) => "PREPEND",
        }
    }

    /// The text as given (not sanitized); `None` for [`Action::Dunno`] and [`Action::Ok`].
    pub fn text(&self) -> Option<&str> {
        match self {
            Action::Dunno | Action::Ok => None,
            Action::DeferIfPermit(text)
            | Action::Defer(text)
            | Action::Reject(text)
            | Action::Hold(text)
            | Action::Code { text, .. }
            | Action::Warn(text)
            | Action::Info(text)
            | Action::Prepend(text) => Some(text),
        }
    }

    /// `true` when Postfix will refuse (temporarily or not) or hold the mail.
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            Action::DeferIfPermit(_)
                | Action::Defer(_)
                | Action::Reject(_)
                | Action::Hold(_)
                | Action::Code { .. }
        )
    }

    /// The action as [`encode_response`] writes it: text sanitized (and a blank
    /// [`Action::Code`] text replaced by [`DEFAULT_CODE_TEXT`]). Borrows when nothing
    /// changes.
    pub fn sanitized(&self) -> Action<'_> {
        match self {
            Action::Dunno => Action::Dunno,
            Action::Ok => Action::Ok,
            Action::DeferIfPermit(text) => Action::DeferIfPermit(clean(text)),
            Action::Defer(text) => Action::Defer(clean(text)),
            Action::Reject(text) => Action::Reject(clean(text)),
            Action::Hold(text) => Action::Hold(clean(text)),
            Action::Code { code, text } => {
                let text = clean(text);
                Action::Code {
                    code: *code,
                    text: if text.is_empty() {
                        Cow::Borrowed(DEFAULT_CODE_TEXT)
                    } else {
                        text
                    },
                }
            }
            Action::Warn(text) => Action::Warn(clean(text)),
            Action::Info(text) => Action::Info(clean(text)),
            Action::Prepend(text) => Action::Prepend(clean(text)),
        }
    }

    /// An owned copy, independent of any buffer.
    pub fn into_owned(self) -> Action<'static> {
        let own = |text: Cow<'_, str>| Cow::Owned(text.into_owned());
        match self {
            Action::Dunno => Action::Dunno,
            Action::Ok => Action::Ok,
            Action::DeferIfPermit(text) => Action::DeferIfPermit(own(text)),
            Action::Defer(text) => Action::Defer(own(text)),
            Action::Reject(text) => Action::Reject(own(text)),
            Action::Hold(text) => Action::Hold(own(text)),
            Action::Code { code, text } => Action::Code {
                code,
                text: own(text),
            },
            Action::Warn(text) => Action::Warn(own(text)),
            Action::Info(text) => Action::Info(own(text)),
            Action::Prepend(text) => Action::Prepend(own(text)),
        }
    }

    /// The same action with `text` as its text ([`Action::Dunno`] and [`Action::Ok`]
    /// have none and stay as they are). Lets a caller keep texts in buffers it reuses.
    ///
    /// # Examples
    ///
    /// ```
    /// use ratelimit_policyd::protocol::Action;
    /// let kept = String::from("4.7.1 Slow down");
    /// let action = Action::code(451, "")?.with_text(kept.as_str().into());
    /// assert_eq!(action.to_string(), "451 4.7.1 Slow down");
    /// assert_eq!(Action::Dunno.with_text("ignored".into()), Action::Dunno);
    /// # Ok::<(), ratelimit_policyd::protocol::InvalidReplyCode>(())
    /// ```
    pub fn with_text<'b>(&self, text: Cow<'b, str>) -> Action<'b> {
        match self {
            Action::Dunno => Action::Dunno,
            Action::Ok => Action::Ok,
            Action::DeferIfPermit(_) => Action::DeferIfPermit(text),
            Action::Defer(_) => Action::Defer(text),
            Action::Reject(_) => Action::Reject(text),
            Action::Hold(_) => Action::Hold(text),
            Action::Code { code, .. } => Action::Code { code: *code, text },
            Action::Warn(_) => Action::Warn(text),
            Action::Info(_) => Action::Info(text),
            Action::Prepend(_) => Action::Prepend(text),
        }
    }

    /// Writes the `action` value (without `action=` and the line ends), sanitized.
    fn write_value<W: fmt::Write>(&self, out: &mut W) -> fmt::Result {
        let (head, text) = match self {
            Action::Code { code, text } => {
                write!(out, "{code}")?;
                let text = sanitized_slice(text);
                out.write_char(' ')?;
                if text.is_empty() {
                    return out.write_str(DEFAULT_CODE_TEXT);
                }
                return write_sanitized(out, text);
            }
            other => (other.keyword(), other.text().map(sanitized_slice)),
        };
        out.write_str(head)?;
        match text {
            Some(text) if !text.is_empty() => {
                out.write_char(' ')?;
                write_sanitized(out, text)
            }
            _ => Ok(()),
        }
    }
}

/// Shows the action value as sent, e.g. `DEFER_IF_PERMIT 4.7.1 Slow down`.
impl fmt::Display for Action<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.write_value(f)
    }
}

fn is_blank(c: char) -> bool {
    c.is_whitespace() || c.is_control()
}

/// The part of `text` that is sent: trimmed of whitespace and control characters at both
/// ends and cut to [`MAX_TEXT`] bytes at a character boundary. Control characters inside
/// are replaced while writing.
fn sanitized_slice(text: &str) -> &str {
    let text = text.trim_start_matches(is_blank);
    let mut end = text.len().min(MAX_TEXT);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].trim_end_matches(is_blank)
}

/// [`sanitized_slice`] with control characters replaced; borrows when none are.
fn clean(text: &str) -> Cow<'_, str> {
    let trimmed = sanitized_slice(text);
    if trimmed.contains(char::is_control) {
        Cow::Owned(
            trimmed
                .chars()
                .map(|c| if c.is_control() { ' ' } else { c })
                .collect(),
        )
    } else {
        Cow::Borrowed(trimmed)
    }
}

/// Writes `text` with each control character replaced by a space.
fn write_sanitized<W: fmt::Write>(out: &mut W, text: &str) -> fmt::Result {
    // Printable ASCII, as every text this server writes is, has none.
    if text.bytes().all(|b| (b' '..=b'~').contains(&b)) {
        return out.write_str(text);
    }
    let mut pieces = text.split(char::is_control);
    if let Some(first) = pieces.next() {
        out.write_str(first)?;
    }
    for piece in pieces {
        out.write_char(' ')?;
        out.write_str(piece)?;
    }
    Ok(())
}

/// Lets the `fmt::Write`-based encoder append to a byte buffer.
struct ByteSink<'o>(&'o mut Vec<u8>);

impl fmt::Write for ByteSink<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

/// Appends the reply for `action` to `out`: `action=<value>\n\n`.
///
/// Text is sanitized on the way (see [`Action`]); nothing is allocated besides growing
/// `out`, so a reused buffer makes replies allocation-free.
///
/// # Examples
///
/// ```
/// use ratelimit_policyd::protocol::{encode_response, Action};
/// let mut out = Vec::new();
/// encode_response(&Action::Dunno, &mut out);
/// encode_response(&Action::hold("bad\nnews "), &mut out);
/// assert_eq!(out, b"action=DUNNO\n\naction=HOLD bad news\n\n");
/// ```
pub fn encode_response(action: &Action<'_>, out: &mut Vec<u8>) {
    out.extend_from_slice(b"action=");
    // Writing into a Vec cannot fail, and `write_value` only fails when its sink does.
    let _ = action.write_value(&mut ByteSink(out));
    out.extend_from_slice(b"\n\n");
}

/// Why a reply could not be decoded by [`parse_response`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ResponseError {
    /// The reply is not a well-formed attribute block.
    #[error("malformed reply: {0}")]
    Malformed(#[from] ParseError),
    /// The reply has no `action` attribute (Postfix would retry, then use its default).
    #[error("reply has no action attribute")]
    MissingAction,
    /// The action is not valid UTF-8.
    #[error("action is not valid UTF-8")]
    InvalidUtf8,
    /// The action word is not one [`Action`] covers.
    #[error("unknown or unsupported action word")]
    UnknownAction,
    /// A three-digit code that is not 4xx or 5xx.
    #[error(transparent)]
    InvalidCode(#[from] InvalidReplyCode),
}

/// Decodes one reply from the start of `buf`: the [`Action`] and the bytes it took.
///
/// The reply is framed like a request (same [`RequestBounds::DEFAULT`]), other attributes
/// are ignored as Postfix ignores them, and the last `action` wins. The action word is
/// matched case-insensitively and `RELAY` reads as [`Action::Ok`]. As in Postfix, a value
/// made only of digits is a (legacy) permit, so it reads as [`Action::Ok`]. Surrounding
/// whitespace of the text is dropped; for [`Action::Dunno`] and [`Action::Ok`] any text
/// is ignored.
///
/// Round trip: `parse_response(encode_response(a))` gives `a.sanitized()`.
///
/// # Examples
///
/// ```
/// use ratelimit_policyd::protocol::{parse_response, Action, Status};
/// let reply = parse_response(b"action=defer_if_permit 4.7.1 Slow down\n\n")?;
/// assert_eq!(reply, Status::Complete((Action::defer_if_permit("4.7.1 Slow down"), 40)));
/// assert!(parse_response(b"action=DUN")?.is_partial());
/// # Ok::<(), ratelimit_policyd::protocol::ResponseError>(())
/// ```
pub fn parse_response(buf: &[u8]) -> Result<Status<(Action<'_>, usize)>, ResponseError> {
    let mut action = None;
    let status = scan(buf, &RequestBounds::DEFAULT, |_, attribute| {
        if attribute.name == b"action" {
            action = Some(attribute.value);
        }
        Ok(())
    })?;
    let Status::Complete(parsed) = status else {
        return Ok(Status::Partial);
    };
    let value = action.ok_or(ResponseError::MissingAction)?;
    let value = std::str::from_utf8(value).map_err(|_| ResponseError::InvalidUtf8)?;
    Ok(Status::Complete((decode_action(value)?, parsed.consumed)))
}

/// Reads an `action` value as Postfix's `check_table_result` would, for the actions
/// [`Action`] covers.
fn decode_action(value: &str) -> Result<Action<'_>, ResponseError> {
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        return Ok(Action::Ok);
    }
    let (word, text) = match value.find([' ', '\t']) {
        Some(space) => (&value[..space], value[space + 1..].trim_matches(is_blank)),
        None => (value, ""),
    };
    if word.len() == 3 && word.bytes().all(|b| b.is_ascii_digit()) {
        let code = word.parse().map_err(|_| ResponseError::UnknownAction)?;
        return Ok(Action::Code {
            code: ReplyCode::new(code)?,
            text: Cow::Borrowed(text),
        });
    }
    let text = Cow::Borrowed(text);
    let is = |keyword: &str| word.eq_ignore_ascii_case(keyword);
    let action = if is("DUNNO") {
        Action::Dunno
    } else if is("OK") || is("RELAY") {
        Action::Ok
    } else if is("DEFER_IF_PERMIT") {
        Action::DeferIfPermit(text)
    } else if is("DEFER") {
        Action::Defer(text)
    } else if is("REJECT") {
        Action::Reject(text)
    } else if is("HOLD") {
        Action::Hold(text)
    } else if is("WARN") {
        Action::Warn(text)
    } else if is("INFO") {
        Action::Info(text)
    } else if is("PREPEND") {
        Action::Prepend(text)
    } else {
        return Err(ResponseError::UnknownAction);
    };
    Ok(action)
}
