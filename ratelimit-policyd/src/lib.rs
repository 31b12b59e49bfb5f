//! A Postfix policy server that rate-limits outbound mail per SASL user.
//!
//! Postfix asks about every message (policy delegation protocol); the server counts
//! per `sasl_username` — whatever IP the client comes from — against the limits of
//! the user's tier, and answers a temporary refusal once a user is over, so a phished
//! account cannot flood the ISP's outbound IPs onto blocklists, and no mail is lost.
//!
//! # Modules, top to bottom
//!
//! Each layer imports only the ones below it (`ARCHITECTURE.md` has the map and the
//! path of one request):
//! - [`cli`]: the command line, for `main`; [`manual`]: the man pages and shell
//!   completions made from it and from docs/configuration.md.
//! - [`daemon`]: start-up, signals, reload, the periodic sweep and snapshot;
//!   [`Daemon::run`](daemon::Daemon::run) serves listeners until a shutdown future.
//! - [`admin`] (the admin socket and CLI) and [`ops`] (incident lines, alerts,
//!   metrics, records): they observe the policy and the server.
//! - [`server`]: listeners, the connection cap, the allowlist, the connection loop.
//! - [`replay`]: recorded requests through a configuration, offline.
//! - [`policy`]: request → key → tier → signals → [`Verdict`](policy::Verdict).
//! - [`backend`]: the store seam, the one module that names the stores.
//! - [`config`]: TOML configuration, validated once per section.
//! - [`logging`]: where log lines go (journald, syslog facility `mail`, stderr).
//! - Leaves: [`protocol`] (the request parser and reply encoder), [`key`] (the user-key
//!   normalizer), [`template`] (reply texts and time formats), [`logthrottle`],
//!   [`notify`] (systemd readiness), [`striped`] (per-thread counters), [`escape`]
//!   (client text made safe to print).

pub mod admin;
pub mod backend;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod escape;
pub mod key;
pub mod logging;
pub mod logthrottle;
pub mod manual;
pub mod notify;
pub mod ops;
pub mod policy;
pub mod protocol;
pub mod replay;
pub mod server;
pub mod striped;
pub mod template;
pub mod trim;
