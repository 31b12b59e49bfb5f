//! Shared support code for integration tests. Include it from a test file with
//! `mod support;` and use e.g. `support::postfix::PostfixInstance`.
//! See `README.md` beside this file.
#![allow(dead_code)]

pub mod postfix;
