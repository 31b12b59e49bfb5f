//! The Postfix policy delegation protocol (`SMTPD_POLICY_README`), both directions.
//!
//! Postfix's `smtpd` sends a request: a block of `name=value` lines (`sasl_username`,
//! `protocol_state`, `recipient`, ...) ended by an empty line. The server answers with one
//! `action=...` line, also ended by an empty line, where the action is an access(5) result
//! such as `DUNNO` or `DEFER_IF_PERMIT text`. The connection then carries the next request.
//!
//! This module is pure and synchronous: it never reads a socket (see
//! [`crate::server::connection`] for that) and never allocates on the request path.
//!
//! # Map
//!
//! - `request.rs`: the request side. [`parse_request`] is incremental and zero-copy, in
//!   the httparse style: incomplete input is [`Status::Partial`] (never an error),
//!   attributes borrow from the input buffer and go into slots the caller owns.
//!   [`RequestBounds`] bound line length, attribute count and request size, and a
//!   violation is reported as soon as the offending byte is seen, so a huge line without a
//!   newline is refused without being buffered. [`frame_request`] finds where a request
//!   ends without storing its attributes. [`PolicyRequest`] is the typed view the policy
//!   works with.
//! - `response.rs`: the reply side. [`Action`] and [`encode_response`] build the reply;
//!   [`parse_response`] decodes one (for tests, the load generator and fuzzing).
//!
//! Both submodules are private; everything public is re-exported here, so every item is
//! named `protocol::Item`.
//!
//! # Examples
//!
//! ```
//! use ratelimit_policyd::protocol::{
//!     parse_request, Action, Attribute, PolicyRequest, RequestBounds, Stage, Status,
//!     encode_response,
//! };
//!
//! let buf = b"request=smtpd_access_policy\nprotocol_state=RCPT\nsasl_username=alice\n\n";
//! let mut slots = [Attribute::EMPTY; 64];
//! let bounds = RequestBounds::default();
//! let Status::Complete(parsed) = parse_request(buf, &bounds, &mut slots)? else {
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

mod request;
mod response;

pub use request::{
    ACCESS_POLICY_REQUEST, Attribute, ParseError, Parsed, PolicyRequest, RequestBounds, Stage,
    Status, frame_request, parse_request,
};
pub use response::{
    Action, DEFAULT_CODE_TEXT, InvalidReplyCode, MAX_TEXT, ReplyCode, ResponseError,
    encode_response, parse_response,
};
