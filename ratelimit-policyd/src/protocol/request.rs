//! Requests: the incremental, zero-copy parser for the attribute block Postfix sends, and
//! the typed view of it that the policy reads.
//!
//! [`parse_request`] fills caller-owned [`Attribute`] slots that borrow from the input
//! buffer; [`PolicyRequest::from_attributes`] turns the filled slots into named fields.
//! Incomplete input is [`Status::Partial`], never an error; every [`ParseError`] is
//! reported at the first byte that makes it certain.

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

/// Size bounds on one request: line length, attribute count and total bytes.
///
/// They keep a broken or hostile client from making the server buffer without limit;
/// each violation is a [`ParseError`] for which [`ParseError::is_limit`] is `true`. They
/// bound the *shape* of a request and have nothing to do with the mail rate limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestBounds {
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

impl RequestBounds {
    /// The defaults documented on each field.
    pub const DEFAULT: RequestBounds = RequestBounds {
        max_line: 4096,
        max_attributes: 64,
        max_request: 16 * 1024,
    };
}

impl Default for RequestBounds {
    fn default() -> Self {
        RequestBounds::DEFAULT
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
    /// A line is longer than [`RequestBounds::max_line`].
    #[error("line {line}: longer than {limit} bytes")]
    LineTooLong {
        /// The offending line.
        line: usize,
        /// The limit it exceeds.
        limit: usize,
    },
    /// The request has more than [`RequestBounds::max_attributes`] attribute lines.
    #[error("more than {limit} attributes in one request")]
    TooManyAttributes {
        /// The limit it exceeds.
        limit: usize,
    },
    /// The request is larger than [`RequestBounds::max_request`] bytes.
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
    /// `true` when a [`RequestBounds`] bound was exceeded (as opposed to malformed input).
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
///   an empty name, a NUL byte, and any [`RequestBounds`] bound exceeded. Running out of
///   `slots` is [`ParseError::OutOfSlots`]. Because checks happen in byte order, parsing a
///   prefix of some input gives either `Partial` or the same result as parsing all of it.
///
/// Work per call is linear in the bytes of the request, and never looks further than
/// [`RequestBounds::max_request`] bytes into `buf`.
///
/// # Examples
///
/// ```
/// use ratelimit_policyd::protocol::{parse_request, Attribute, RequestBounds, Status};
///
/// let mut slots = [Attribute::EMPTY; 8];
/// let bounds = RequestBounds::default();
/// assert!(parse_request(b"size=12\nsend", &bounds, &mut slots)?.is_partial());
///
/// let buf = b"size=12\nsender=a@example.org\n\nnext=request";
/// let parsed = parse_request(buf, &bounds, &mut slots)?.complete().unwrap();
/// assert_eq!(parsed.consumed, 30);
/// assert_eq!(slots[1].value, b"a@example.org");
/// # Ok::<(), ratelimit_policyd::protocol::ParseError>(())
/// ```
pub fn parse_request<'b>(
    buf: &'b [u8],
    bounds: &RequestBounds,
    slots: &mut [Attribute<'b>],
) -> Result<Status<Parsed>, ParseError> {
    let available = slots.len();
    scan(buf, bounds, |index, attribute| {
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
pub fn frame_request(buf: &[u8], bounds: &RequestBounds) -> Result<Status<Parsed>, ParseError> {
    scan(buf, bounds, |_, _| Ok(()))
}

/// The scanner behind [`parse_request`], [`frame_request`] and
/// [`parse_response`](super::parse_response): calls
/// `on_attribute(index, attribute)` for every attribute line, in order.
///
/// Each line is searched for its LF only within the bytes the bounds still allow, so a
/// violation is found at the first byte that makes it certain, and no byte beyond
/// `max_request` is ever read.
pub(super) fn scan<'b>(
    buf: &'b [u8],
    bounds: &RequestBounds,
    mut on_attribute: impl FnMut(usize, Attribute<'b>) -> Result<(), ParseError>,
) -> Result<Status<Parsed>, ParseError> {
    let mut start: usize = 0;
    let mut count = 0;
    let mut line = 1;
    loop {
        // The LF ending this line must be at an index below both caps: content of at most
        // `max_line` bytes, and a request of at most `max_request` bytes.
        let line_cap = start.saturating_add(bounds.max_line).saturating_add(1);
        let window_end = line_cap.min(bounds.max_request).max(start);
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
                if count == bounds.max_attributes {
                    return Err(ParseError::TooManyAttributes {
                        limit: bounds.max_attributes,
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
            None if line_cap <= bounds.max_request => {
                return Err(ParseError::LineTooLong {
                    line,
                    limit: bounds.max_line,
                });
            }
            None => {
                return Err(ParseError::RequestTooLarge {
                    limit: bounds.max_request,
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
