//! Shared helpers for the benchmarks, the load generator and the do-nothing
//! server.
//!
//! The benches speak the Postfix policy delegation protocol themselves (it is
//! a few lines of framing) so that they do not depend on the internals of
//! `ratelimit-policyd`, and so that the load generator stays cheap:
//!
//! - [`request`] renders requests once, as Postfix 3.7 sends them (all 29
//!   attributes, in Postfix's order), and patches only the user number,
//!   `instance` and `queue_id` in place before each send.
//! - [`reply`] frames and reads replies (`action=...` then an empty line) and
//!   counts the action words without allocating per reply.
//! - [`framing`] finds the end of a request (an empty line) for the
//!   do-nothing server.
//! - [`users`] picks which user sends the next message (uniform, Zipf, or
//!   sequential).
//! - [`duration`] parses `10s`-style command-line durations.
//! - [`keyspace`] renders keys, orders them and paces simulated time for the
//!   in-process store benches (`benches/core.rs`, `benches/keymem.rs`).
//!
//! # Examples
//!
//! ```
//! use ratelimit_benches::request::{Mix, MessageStream, StreamConfig};
//!
//! let cfg = StreamConfig { mix: Mix::Postfix, recipients: 2, users: 1000, connection: 0 };
//! let mut stream = MessageStream::new(&cfg);
//! assert_eq!(stream.requests_per_message(), 4); // RCPT, RCPT, DATA, END-OF-MESSAGE
//! stream.begin_message(42, 7);
//! let first = String::from_utf8(stream.request(0).to_vec()).unwrap();
//! assert!(first.starts_with("request=smtpd_access_policy\nprotocol_state=RCPT\n"));
//! assert!(first.contains("\nsasl_username=u042@example.com\n"));
//! assert!(first.ends_with("\n\n"));
//! ```

pub mod duration;
pub mod framing;
pub mod keyspace;
pub mod reply;
pub mod request;
pub mod users;
