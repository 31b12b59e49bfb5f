//! The Postfix policy server.
pub mod config;
