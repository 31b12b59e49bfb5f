//! ratelimit-policyd: a Postfix policy server that rate-limits outbound mail per SASL user.
//!
//! - [`protocol`]: the policy delegation protocol (request parser, typed request, replies).
//! - [`connection`]: framing over an async stream (buffering, pipelining, EOF handling).

pub mod connection;
pub mod protocol;
