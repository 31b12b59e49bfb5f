//! Shared support code for the integration tests. Include it from a test file with
//! `mod support;` and use e.g. `support::server::Server`. See `README.md` beside
//! this file.
#![allow(dead_code)]

pub mod logs;
pub mod postfix;
pub mod proc;
pub mod server;
