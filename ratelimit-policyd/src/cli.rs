//! The command line, as data: `main` parses it, and as a library module the
//! definition is there for more than `main` to read.
// The doc comments below are help texts: `[admin] socket` names a section of the
// configuration file, not an item.
#![allow(rustdoc::broken_intra_doc_links)]

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::config::ListenAddr;

/// A Postfix policy server that rate-limits outbound mail per SASL user.
///
/// With no arguments it listens on 127.0.0.1:10031 with in-memory counters and one
/// default tier of 100 messages per hour.
#[derive(Debug, Parser)]
#[command(name = "ratelimit-policyd", version, about)]
pub struct Cli {
    /// Configuration file (TOML). Without it, the built-in default is used.
    #[arg(short, long, global = true)]
    pub config: Option<PathBuf>,
    /// Listen here instead of the configured addresses (host:port or unix:/path); repeatable.
    #[arg(short, long)]
    pub listen: Vec<ListenAddr>,
    /// What to do instead of serving.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check a configuration file and print what it sets up.
    CheckConfig {
        /// The file.
        file: PathBuf,
    },
    /// Talk to a running server over its admin socket.
    Admin {
        /// The admin socket (default: [admin] socket of --config, else the built-in default).
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Print the reply as JSON.
        #[arg(long)]
        json: bool,
        /// The command.
        #[command(subcommand)]
        command: AdminCommand,
    },
    /// Print the main.cf lines that wire Postfix to the server --config sets up (the
    /// lines the server logs at start).
    PostfixConfig,
    /// Run recorded requests ([record] path) through --config offline and print who
    /// would have been refused, when, and by which limit.
    Replay {
        /// The record file (JSON lines).
        log: PathBuf,
    },
}

/// The admin commands.
#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// A user's tier, usage per limit, and retry time.
    Show {
        /// The user (sasl_username).
        user: String,
    },
    /// Forget a user's counters (unblock).
    Reset {
        /// The user.
        user: String,
    },
    /// Move a user (or @domain) to a tier; persisted across restarts and reloads.
    Tier {
        /// The user.
        user: String,
        /// The tier.
        tier: String,
    },
    /// The heaviest senders now.
    Top {
        /// How many.
        n: Option<usize>,
    },
    /// Request, decision and connection counters.
    Stats,
    /// Re-read the configuration (like SIGHUP).
    Reload,
}
