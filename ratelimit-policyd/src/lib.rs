//! ratelimit-policyd: a Postfix policy server that rate-limits outbound mail per SASL user.
//!
//! - [`protocol`]: the policy delegation protocol (request parser, typed request, replies).

pub mod protocol;
