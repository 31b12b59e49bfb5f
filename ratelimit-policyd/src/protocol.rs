//! The Postfix policy delegation protocol (`SMTPD_POLICY_README`), both directions.
//!
//! A request is a block of `name=value` lines ended by an empty line; the reply is one
//! `action=...` line, also ended by an empty line. The connection then carries the next
//! request.
//!
//! This module is pure and synchronous: it never reads a socket (see
//! [`crate::connection`] for that) and never allocates on the request path.
//!
//! - [`parse_request`] is incremental and zero-copy, in the httparse style: incomplete
//!   input is [`Status::Partial`] (never an error), attributes borrow from the input buffer
//!   and go into slots the caller owns. [`Limits`] bound line length, attribute count and
//!   request size, and a violation is reported as soon as the offending byte is seen, so a
//!   huge line without a newline is refused without being buffered.
//! - [`PolicyRequest`] is the typed view the policy works with.
//! - [`Action`] and [`encode_response`] build the reply; [`parse_response`] decodes one
//!   (for tests, the load generator and fuzzing).
//!
//! # Examples
//!
//! ```
//! use ratelimit_policyd::protocol::{
//!     parse_request, Action, Attribute, Limits, PolicyRequest, Stage, Status, encode_response,
//! };
//!
//! let buf = b"request=smtpd_access_policy\nprotocol_state=RCPT\nsasl_username=alice\n\n";
//! let mut slots = [Attribute::EMPTY; 64];
//! let Status::Complete(parsed) = parse_request(buf, &Limits::default(), &mut slots)? else {
//!     panic!("the request is complete");
//! };
//! assert_eq!(parsed.consumed, buf.len());
//!
//! let request = PolicyRequest::from_attributes(&slots[..parsed.attributes])?;
//! assert_eq!(request.protocol_state, Stage::Rcpt);
//! assert_eq!(request.sasl_username_str(), Some("alice"));
//!
//! let mut out = Vec::new();
//! encode_response(&Action::defer_if_permit("4.7.1 Too much mail, try again later"), &mut out);
//! assert_eq!(out, b"action=DEFER_IF_PERMIT 4.7.1 Too much mail, try again later\n\n");
//! # Ok::<(), ratelimit_policyd::protocol::ParseError>(())
//! ```

use std::borrow::Cow;
use std::fmt;

/// The outcome of parsing a buffer that may not hold a whole message yet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use]
pub enum Status<T> {
    /// The buffer holds a whole message.
    Complete(T),
    /// The buffer is a valid beginning of a message: read more bytes and parse again.
    Partial,
}

impl<T> Status<T> {
    /// `true` for [`Status::Complete`].
    pub fn is_complete(&self) -> bool {
        matches!(self, Status::Complete(_))
    }

    /// `true` for [`Status::Partial`].
    pub fn is_partial(&self) -> bool {
        matches!(self, Status::Partial)
    }

    /// The complete value, or `None` when partial.
    pub fn complete(self) -> Option<T> {
        match self {
            Status::Complete(value) => Some(value),
            Status::Partial => None,
        }
    }
}

/// What a complete request took from the buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Parsed {
    /// Bytes the request took, including its terminating empty line. Bytes after this
    /// belong to the next (pipelined) request.
    pub consumed: usize,
    /// Slots filled, in input order: `slots[..attributes]`.
    pub attributes: usize,
}

/// Bounds on what one request may take, so a broken or hostile client cannot make the
/// server buffer without limit. Each violation is a [`ParseError`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Longest line, in bytes, not counting the LF (a CR before it counts).
    ///
    /// Default 4096. Postfix copies SMTP command arguments (`helo_name`, `sender`,
    /// `recipient`) into attributes, and its own `line_length_limit` (default 2048) bounds
    /// those commands, so a legitimate value can approach 2048 bytes; with the name and
    /// `=`, a 2048 limit could refuse a request Postfix considers valid. 4096 leaves room
    /// for that and for long xtext-encoded certificate subjects.
    pub max_line: usize,
    /// Most attribute lines in one request (repeated names count each time).
    ///
    /// Default 64: Postfix 3.7 sends 29 attributes and 3.12 about 32, so this is twice
    /// the largest real request.
    pub max_attributes: usize,
    /// Most bytes in one request, including the terminating empty line.
    ///
    /// Default 16 KiB: a real request is about 700 bytes; even with several values near
    /// Postfix's 2048-byte line limit it stays under 10 KiB.
    pub max_request: usize,
}

impl Limits {
    /// The defaults documented on each field.
    pub const DEFAULT: Limits = Limits {
        max_line: 4096,
        max_attributes: 64,
        max_request: 16 * 1024,
    };
}

impl Default for Limits {
    fn default() -> Self {
        Limits::DEFAULT
    }
}

/// One `name=value` line of a request, borrowed from the input buffer.
///
/// Names and values are raw bytes: the protocol does not promise UTF-8, so invalid UTF-8
/// is not an error here (see [`Attribute::value_str`]). A value never contains NUL or LF.
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Attribute<'b> {
    /// The bytes before the first `=`; never empty.
    pub name: &'b [u8],
    /// The bytes after the first `=`, without the line ending (a trailing CR is stripped).
    pub value: &'b [u8],
}

impl<'b> Attribute<'b> {
    /// An empty slot, to initialise slot arrays: `[Attribute::EMPTY; 64]`.
    pub const EMPTY: Attribute<'static> = Attribute {
        name: b"",
        value: b"",
    };

    /// The name, when it is valid UTF-8.
    pub fn name_str(&self) -> Option<&'b str> {
        std::str::from_utf8(self.name).ok()
    }

    /// The value, when it is valid UTF-8.
    pub fn value_str(&self) -> Option<&'b str> {
        std::str::from_utf8(self.value).ok()
    }
}

impl fmt::Debug for Attribute<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}={}",
            self.name.escape_ascii(),
            self.value.escape_ascii()
        )
    }
}

/// Why a request was refused. Line numbers count from 1 at the start of the request.
///
/// Every variant except [`ParseError::InvalidNumber`] comes from [`parse_request`];
/// that one comes from [`PolicyRequest::from_attributes`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// A line has no `=` separating name and value.
    #[error("line {line}: no '=' between attribute name and value")]
    MissingEquals {
        /// The offending line.
        line: usize,
    },
    /// A line starts with `=`: the attribute name is empty.
    #[error("line {line}: empty attribute name")]
    EmptyName {
        /// The offending line.
        line: usize,
    },
    /// A NUL byte, which the protocol forbids in names and values.
    #[error("line {line}: NUL byte")]
    Nul {
        /// The offending line.
        line: usize,
    },
    /// A line is longer than [`Limits::max_line`].
    #[error("line {line}: longer than {limit} bytes")]
    LineTooLong {
        /// The offending line.
        line: usize,
        /// The limit it exceeds.
        limit: usize,
    },
    /// The request has more than [`Limits::max_attributes`] attribute lines.
    #[error("more than {limit} attributes in one request")]
    TooManyAttributes {
        /// The limit it exceeds.
        limit: usize,
    },
    /// The request is larger than [`Limits::max_request`] bytes.
    #[error("request larger than {limit} bytes")]
    RequestTooLarge {
        /// The limit it exceeds.
        limit: usize,
    },
    /// The request has more attributes than the caller gave slots for.
    #[error("more attributes than the {slots} slots given")]
    OutOfSlots {
        /// How many slots there were.
        slots: usize,
    },
    /// A numeric attribute (`size`, `recipient_count`) is neither empty nor a decimal
    /// number that fits in a `u64`.
    #[error("attribute {name}: not a decimal number")]
    InvalidNumber {
        /// The attribute's name.
        name: &'static str,
    },
}

impl ParseError {
    /// `true` when a [`Limits`] bound was exceeded (as opposed to malformed input).
    pub fn is_limit(&self) -> bool {
        matches!(
            self,
            ParseError::LineTooLong { .. }
                | ParseError::TooManyAttributes { .. }
                | ParseError::RequestTooLarge { .. }
        )
    }
}

/// Parses one request from the start of `buf` into `slots`, without copying.
///
/// Returns [`Status::Partial`] when `buf` is a valid beginning of a request (read more and
/// call again with the longer buffer), or [`Status::Complete`] with the bytes the request
/// took and the number of slots filled. Bytes after `consumed` (a pipelined request) are
/// not looked at.
///
/// - Lines end with LF or CRLF (one trailing CR is stripped); the request ends with an
///   empty line. A request with no attributes (a lone empty line) is complete.
/// - Every attribute line goes into a slot, in input order, including repeated names and
///   names this crate does not know (the caller ignores those). [`PolicyRequest`] keeps
///   the **last** value of a repeated name.
/// - Errors, each reported as soon as the offending byte is in `buf`: a line without `=`,
///   an empty name, a NUL byte, and any [`Limits`] bound exceeded. Running out of `slots`
///   is [`ParseError::OutOfSlots`]. Because checks happen in byte order, parsing a prefix
///   of some input gives either `Partial` or the same result as parsing all of it.
///
/// Work per call is linear in the bytes of the request, and never looks further than
/// [`Limits::max_request`] bytes into `buf`.
///
/// # Examples
///
/// ```
/// use ratelimit_policyd::protocol::{parse_request, Attribute, Limits, Status};
///
/// let mut slots = [Attribute::EMPTY; 8];
/// let limits = Limits::default();
/// assert!(parse_request(b"size=12\nsend", &limits, &mut slots)?.is_partial());
///
/// let buf = b"size=12\nsender=a@example.org\n\nnext=request";
/// let parsed = parse_request(buf, &limits, &mut slots)?.complete().unwrap();
/// assert_eq!(parsed.consumed, 30);
/// assert_eq!(slots[1].value, b"a@example.org");
/// # Ok::<(), ratelimit_policyd::protocol::ParseError>(())
/// ```
pub fn parse_request<'b>(
    buf: &'b [u8],
    limits: &Limits,
    slots: &mut [Attribute<'b>],
) -> Result<Status<Parsed>, ParseError> {
    let available = slots.len();
    scan(buf, limits, |index, attribute| {
        let slot = slots
            .get_mut(index)
            .ok_or(ParseError::OutOfSlots { slots: available })?;
        *slot = attribute;
        Ok(())
    })
}

/// Like [`parse_request`], but only finds where the request ends: the same checks and
/// results, without slots (so never [`ParseError::OutOfSlots`]).
///
/// Useful to frame requests before deciding where their attributes go.
pub fn frame_request(buf: &[u8], limits: &Limits) -> Result<Status<Parsed>, ParseError> {
    scan(buf, limits, |_, _| Ok(()))
}

/// The scanner behind [`parse_request`], [`frame_request`] and [`parse_response`]: calls
/// `on_attribute(index, attribute)` for every attribute line, in order.
///
/// Each line is searched for its LF only within the bytes the limits still allow, so a
/// violation is found at the first byte that makes it certain, and no byte beyond
/// `max_request` is ever read.
fn scan<'b>(
    buf: &'b [u8],
    limits: &Limits,
    mut on_attribute: impl FnMut(usize, Attribute<'b>) -> Result<(), ParseError>,
) -> Result<Status<Parsed>, ParseError> {
    let mut start: usize = 0;
    let mut count = 0;
    let mut line = 1;
    loop {
        // The LF ending this line must be at an index below both caps: content of at most
        // `max_line` bytes, and a request of at most `max_request` bytes.
        let line_cap = start.saturating_add(limits.max_line).saturating_add(1);
        let window_end = line_cap.min(limits.max_request).max(start);
        let present_end = window_end.min(buf.len());
        let window = &buf[start.min(present_end)..present_end];
        match memchr::memchr2(b'\n', 0, window) {
            Some(i) if window[i] == 0 => return Err(ParseError::Nul { line }),
            Some(i) => {
                let lf = start + i;
                let content = match &buf[start..lf] {
                    [rest @ .., b'\r'] => rest,
                    content => content,
                };
                if content.is_empty() {
                    return Ok(Status::Complete(Parsed {
                        consumed: lf + 1,
                        attributes: count,
                    }));
                }
                // Names are short and the '=' comes early: a plain loop stops there,
                // where a memchr call costs more to set up than it saves.
                let eq = content
                    .iter()
                    .position(|&b| b == b'=')
                    .ok_or(ParseError::MissingEquals { line })?;
                if eq == 0 {
                    return Err(ParseError::EmptyName { line });
                }
                if count == limits.max_attributes {
                    return Err(ParseError::TooManyAttributes {
                        limit: limits.max_attributes,
                    });
                }
                on_attribute(
                    count,
                    Attribute {
                        name: &content[..eq],
                        value: &content[eq + 1..],
                    },
                )?;
                count += 1;
                line += 1;
                start = lf + 1;
            }
            None if present_end < window_end => return Ok(Status::Partial),
            None if line_cap <= limits.max_request => {
                return Err(ParseError::LineTooLong {
                    line,
                    limit: limits.max_line,
                });
            }
            None => {
                return Err(ParseError::RequestTooLarge {
                    limit: limits.max_request,
                });
            }
        }
    }
}

/// The SMTP stage a request is about (`protocol_state`), matched case-insensitively.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Stage {
    /// `CONNECT`: the client connected.
    Connect,
    /// `EHLO`.
    Ehlo,
    /// `HELO`.
    Helo,
    /// `MAIL FROM`.
    Mail,
    /// `RCPT TO`: one request per recipient.
    Rcpt,
    /// `DATA`, before the body is sent. Postfix ≥ 3.4 also reports `BDAT` as `DATA`; a
    /// literal `BDAT` is accepted here as well.
    Data,
    /// `END-OF-MESSAGE`: after the body; the only stage with the real `size`.
    EndOfMessage,
    /// `VRFY`.
    Vrfy,
    /// `ETRN`.
    Etrn,
    /// Anything else, or no `protocol_state` at all.
    Other,
}

impl Stage {
    /// The stage named by a `protocol_state` value; [`Stage::Other`] when unknown.
    ///
    /// # Examples
    ///
    /// ```
    /// use ratelimit_policyd::protocol::Stage;
    /// assert_eq!(Stage::parse(b"end-of-message"), Stage::EndOfMessage);
    /// assert_eq!(Stage::parse(b"QUIT"), Stage::Other);
    /// ```
    pub fn parse(value: &[u8]) -> Stage {
        const NAMES: [(&[u8], Stage); 10] = [
            (b"RCPT", Stage::Rcpt),
            (b"END-OF-MESSAGE", Stage::EndOfMessage),
            (b"DATA", Stage::Data),
            (b"MAIL", Stage::Mail),
            (b"CONNECT", Stage::Connect),
            (b"EHLO", Stage::Ehlo),
            (b"HELO", Stage::Helo),
            (b"VRFY", Stage::Vrfy),
            (b"ETRN", Stage::Etrn),
            (b"BDAT", Stage::Data),
        ];
        NAMES
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(value))
            .map_or(Stage::Other, |&(_, stage)| stage)
    }

    /// The protocol spelling (`"END-OF-MESSAGE"`); `"OTHER"` for [`Stage::Other`].
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Connect => "CONNECT",
            Stage::Ehlo => "EHLO",
            Stage::Helo => "HELO",
            Stage::Mail => "MAIL",
            Stage::Rcpt => "RCPT",
            Stage::Data => "DATA",
            Stage::EndOfMessage => "END-OF-MESSAGE",
            Stage::Vrfy => "VRFY",
            Stage::Etrn => "ETRN",
            Stage::Other => "OTHER",
        }
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The value `request` has in every policy query Postfix sends.
pub const ACCESS_POLICY_REQUEST: &[u8] = b"smtpd_access_policy";

/// A typed view of one request, borrowing from the parsed attributes.
///
/// Postfix says an unavailable value is "omitted, empty, or 0 for numbers", so the byte
/// fields are `None` both when the attribute is absent and when it is empty; the raw
/// attributes stay available through [`PolicyRequest::attributes`]. With a repeated name
/// the **last** value wins. Attributes this type does not name are ignored (use
/// [`PolicyRequest::get`]).
///
/// Fields are raw bytes because the protocol does not promise UTF-8; the `*_str`
/// accessors give `&str` when the value is valid UTF-8.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PolicyRequest<'a> {
    /// `request`: always `smtpd_access_policy` from Postfix (see
    /// [`PolicyRequest::is_access_policy`]).
    pub request: Option<&'a [u8]>,
    /// `protocol_state`; [`Stage::Other`] when absent or unknown.
    pub protocol_state: Stage,
    /// `sasl_username`: the authenticated user; `None` without SASL authentication.
    pub sasl_username: Option<&'a [u8]>,
    /// `sasl_method` (`PLAIN`, `LOGIN`, `XCLIENT`, ...).
    pub sasl_method: Option<&'a [u8]>,
    /// `sender`: the envelope sender; `None` for the null sender `<>` and before MAIL.
    pub sender: Option<&'a [u8]>,
    /// `recipient`: at RCPT; at DATA and END-OF-MESSAGE only with exactly one recipient.
    pub recipient: Option<&'a [u8]>,
    /// `client_address`: the SMTP client's IP address.
    pub client_address: Option<&'a [u8]>,
    /// `client_name`: its verified hostname, or `unknown`.
    pub client_name: Option<&'a [u8]>,
    /// `instance`: the same for every request about one message delivery.
    pub instance: Option<&'a [u8]>,
    /// `queue_id`: empty until Postfix has created the queue file.
    pub queue_id: Option<&'a [u8]>,
    /// `policy_context` (Postfix ≥ 3.1): set per `check_policy_service` in main.cf.
    pub policy_context: Option<&'a [u8]>,
    /// `recipient_count`: accepted recipients; non-zero only at DATA and END-OF-MESSAGE.
    pub recipient_count: Option<u64>,
    /// `size`: the MAIL FROM `SIZE=` value, and the real size at END-OF-MESSAGE.
    pub size: Option<u64>,
    attributes: &'a [Attribute<'a>],
}

macro_rules! str_accessors {
    ($($(#[$doc:meta])* $method:ident => $field:ident;)*) => {
        $(
            $(#[$doc])*
            pub fn $method(&self) -> Option<&'a str> {
                self.$field.and_then(|value| std::str::from_utf8(value).ok())
            }
        )*
    };
}

impl<'a> PolicyRequest<'a> {
    /// Builds the typed view from parsed attributes (`&slots[..parsed.attributes]`).
    ///
    /// Fails only with [`ParseError::InvalidNumber`]: a `size` or `recipient_count` that
    /// is neither empty nor a plain decimal `u64`. That is an error rather than `None`
    /// because the policy charges by these numbers: treating garbage as "unknown" would
    /// let a malformed size charge nothing. Postfix always sends decimal digits, so this
    /// only refuses broken clients (and the server then drops the connection, as the
    /// protocol asks for any malformed request).
    pub fn from_attributes(attributes: &'a [Attribute<'a>]) -> Result<Self, ParseError> {
        let mut request = PolicyRequest {
            request: None,
            protocol_state: Stage::Other,
            sasl_username: None,
            sasl_method: None,
            sender: None,
            recipient: None,
            client_address: None,
            client_name: None,
            instance: None,
            queue_id: None,
            policy_context: None,
            recipient_count: None,
            size: None,
            attributes,
        };
        let mut protocol_state = None;
        let mut recipient_count = None;
        let mut size = None;
        for attribute in attributes {
            let value = Some(attribute.value).filter(|value| !value.is_empty());
            let field = match attribute.name {
                b"request" => &mut request.request,
                b"protocol_state" => &mut protocol_state,
                b"sasl_username" => &mut request.sasl_username,
                b"sasl_method" => &mut request.sasl_method,
                b"sender" => &mut request.sender,
                b"recipient" => &mut request.recipient,
                b"client_address" => &mut request.client_address,
                b"client_name" => &mut request.client_name,
                b"instance" => &mut request.instance,
                b"queue_id" => &mut request.queue_id,
                b"policy_context" => &mut request.policy_context,
                b"recipient_count" => &mut recipient_count,
                b"size" => &mut size,
                _ => continue,
            };
            *field = value;
        }
        request.protocol_state = protocol_state.map_or(Stage::Other, Stage::parse);
        request.recipient_count = parse_number(recipient_count, "recipient_count")?;
        request.size = parse_number(size, "size")?;
        Ok(request)
    }

    /// Every attribute line of the request, in input order (for recording and replay).
    pub fn attributes(&self) -> &'a [Attribute<'a>] {
        self.attributes
    }

    /// The raw value of any attribute (the last one when repeated), empty values included.
    ///
    /// # Examples
    ///
    /// ```
    /// use ratelimit_policyd::protocol::{Attribute, PolicyRequest};
    /// let attributes = [
    ///     Attribute { name: b"stress", value: b"" },
    ///     Attribute { name: b"helo_name", value: b"a.example" },
    ///     Attribute { name: b"helo_name", value: b"b.example" },
    /// ];
    /// let request = PolicyRequest::from_attributes(&attributes)?;
    /// assert_eq!(request.get(b"helo_name"), Some(&b"b.example"[..]));
    /// assert_eq!(request.get(b"stress"), Some(&b""[..]));
    /// assert_eq!(request.get(b"tls_sni"), None);
    /// # Ok::<(), ratelimit_policyd::protocol::ParseError>(())
    /// ```
    pub fn get(&self, name: &[u8]) -> Option<&'a [u8]> {
        self.attributes
            .iter()
            .rev()
            .find(|attribute| attribute.name == name)
            .map(|attribute| attribute.value)
    }

    /// `true` when `request=smtpd_access_policy`, the only request type Postfix sends.
    pub fn is_access_policy(&self) -> bool {
        self.request == Some(ACCESS_POLICY_REQUEST)
    }

    str_accessors! {
        /// [`Self::sasl_username`] as UTF-8.
        sasl_username_str => sasl_username;
        /// [`Self::sasl_method`] as UTF-8.
        sasl_method_str => sasl_method;
        /// [`Self::sender`] as UTF-8.
        sender_str => sender;
        /// [`Self::recipient`] as UTF-8.
        recipient_str => recipient;
        /// [`Self::client_address`] as UTF-8.
        client_address_str => client_address;
        /// [`Self::client_name`] as UTF-8.
        client_name_str => client_name;
        /// [`Self::instance`] as UTF-8.
        instance_str => instance;
        /// [`Self::queue_id`] as UTF-8.
        queue_id_str => queue_id;
        /// [`Self::policy_context`] as UTF-8.
        policy_context_str => policy_context;
    }
}

/// A plain decimal `u64`: digits only, no sign, no spaces, no overflow.
fn parse_number(value: Option<&[u8]>, name: &'static str) -> Result<Option<u64>, ParseError> {
    let Some(digits) = value else {
        return Ok(None);
    };
    digits
        .iter()
        .try_fold(0u64, |acc, &byte| {
            let digit = byte.wrapping_sub(b'0');
            if digit > 9 {
                return None;
            }
            acc.checked_mul(10)?.checked_add(u64::from(digit))
        })
        .map(Some)
        .ok_or(ParseError::InvalidNumber { name })
}

// ---------------------------------------------------------------------------------------
// Responses
// ---------------------------------------------------------------------------------------

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
/// The reply is framed like a request (same [`Limits::DEFAULT`]), other attributes are
/// ignored as Postfix ignores them, and the last `action` wins. The action word is
/// matched case-insensitively and `RELAY` reads as [`Action::Ok`]. As in Postfix, a value
/// made only of digits is a (legacy) permit, so it reads as [`Action::Ok`]. Surrounding
/// whitespace of the text is dropped; for [`Action::Dunno`] and [`Action::Ok`] any text is
/// ignored.
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
    let status = scan(buf, &Limits::DEFAULT, |_, attribute| {
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
