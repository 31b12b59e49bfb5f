//! A Postfix policy server that rate-limits outbound mail per SASL user.
//!
//! Postfix asks about every message (policy delegation protocol); the server counts
//! per `sasl_username` — whatever IP the client comes from — against the limits of
//! the user's tier, and answers a temporary refusal once a user is over, so a phished
//! account cannot flood the ISP's outbound IPs onto blocklists, and no mail is lost.
//!
//! # Modules
//! - [`protocol`]: the request parser and reply encoder; [`connection`]: framing.
//! - [`config`]: TOML configuration, validated once.
//! - [`policy`]: request → key → tier → decision → action; [`template`]: reply texts.
//! - [`server`]: listeners, connections, shutdown; [`run`](server::run) is what `main` calls.
//! - [`daemon`]: start-up (config, snapshot restore, signals).
//! - [`ops`]: incident alerts, Prometheus metrics, request recording.
//! - [`admin`]: the admin socket and the `admin` CLI commands.
//! - [`replay`]: recorded requests through a configuration, offline.
//! - [`logthrottle`]: one log line per interval for events a client can repeat at will.

pub mod admin;
pub mod config;
pub mod connection;
pub mod daemon;
pub mod key;
pub mod logthrottle;
pub mod ops;
pub mod policy;
pub mod protocol;
pub mod replay;
pub mod server;
pub mod template;
pub mod threaded;
