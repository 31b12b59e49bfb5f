//! The command line, as data: `main` parses it, and the man page and the shell
//! completions are generated from the same definition (`ratelimit-policyd generate`,
//! [`crate::manual`]), and [`SECTIONS`] is in both `--help` and the man page.
// The doc comments below are help texts: `[admin] socket` names a section of the
// configuration file, not an item.
#![allow(rustdoc::broken_intra_doc_links)]

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::config::ListenAddr;

/// Where the packaged files live.
pub const CONFIG_FILE: &str = "/etc/ratelimit-policyd/ratelimit-policyd.toml";

/// Sections of `--help` and of the man page beyond the options: (title, entries of
/// (term, text)).
pub const SECTIONS: &[(&str, &[(&str, &str)])] = &[
    (
        "ENVIRONMENT",
        &[
            (
                "RATELIMIT_LOG",
                "The log level, in tracing's filter syntax: info (the default), debug, ratelimit_policyd=debug. Logs go to standard error.",
            ),
            (
                "NOTIFY_SOCKET",
                "Set by systemd (Type=notify): READY=1 is sent once the snapshot is restored and every listener is bound, STOPPING=1 at shutdown.",
            ),
        ],
    ),
    (
        "SIGNALS",
        &[
            (
                "SIGHUP",
                "Re-read the configuration, the assignments and the tier overrides; an invalid file keeps the old configuration and logs why. `admin reload` does the same and reports the outcome.",
            ),
            (
                "SIGTERM, SIGINT",
                "Graceful stop: stop accepting, finish the requests in flight (up to 10 s), write the snapshot, exit 0.",
            ),
        ],
    ),
    (
        "EXIT STATUS",
        &[
            (
                "0",
                "Success: a graceful stop, a valid configuration (check-config), an admin command done (admin reload: the new configuration is in force).",
            ),
            (
                "1",
                "Failure: an invalid configuration, a snapshot that cannot be restored, a listener that cannot be bound, an admin command refused or the server unreachable.",
            ),
            ("2", "A command line that cannot be parsed."),
        ],
    ),
    (
        "FILES",
        &[
            (
                CONFIG_FILE,
                "The configuration (ratelimit-policyd.toml(5)), given with --config.",
            ),
            (
                crate::config::defaults::ADMIN_SOCKET,
                "The admin socket (mode 0600), [admin] socket.",
            ),
            (
                "/var/lib/ratelimit-policyd/",
                "State: the counter snapshot ([store] snapshot_path) and the tier moves made with `admin tier` ([admin] tier_overrides).",
            ),
        ],
    ),
];

/// The text after the options in `--help`: [`SECTIONS`].
pub fn after_help() -> String {
    let mut out = String::new();
    for (title, entries) in SECTIONS {
        out.push_str(title);
        out.push_str(":\n");
        for (term, text) in *entries {
            out.push_str(&format!("  {term}\n      {}\n", text.replace('`', "")));
        }
        out.push('\n');
    }
    out.push_str("See ratelimit-policyd(8) and ratelimit-policyd.toml(5).");
    out
}

/// A Postfix policy server that rate-limits outbound mail per SASL user.
///
/// With no arguments it listens on 127.0.0.1:10031 with in-memory counters and one
/// default tier of 100 messages per hour.
#[derive(Debug, Parser)]
#[command(
    name = "ratelimit-policyd",
    version,
    about,
    after_help = "--help also shows the environment, the signals, the exit codes and the files.",
    after_long_help = after_help()
)]
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
    /// Write the man pages or the shell completions (for packagers).
    #[command(hide = true)]
    Generate {
        /// What to write.
        #[command(subcommand)]
        what: Generate,
    },
    /// Run recorded requests ([record] path) through --config offline and print who
    /// would have been refused, when, and by which limit.
    Replay {
        /// The record file (JSON lines).
        log: PathBuf,
        /// Print one JSON document (per user: accepted messages, the first refusal,
        /// by which limit or signal, and the messages accepted before it).
        #[arg(long)]
        json: bool,
        /// Write the baselines learned to FILE (restored at start from
        /// [store] snapshot_path + ".baseline"), so [baseline] judges from day one.
        #[arg(long, value_name = "FILE")]
        write_snapshot: Option<PathBuf>,
    },
    /// Write the baselines of a snapshot (replay --write-snapshot) into the Redis
    /// store --config names, so [baseline] judges a fleet from day one. A user who
    /// already has a baseline in Redis keeps it unless --replace.
    ImportBaselines {
        /// The baseline snapshot.
        file: PathBuf,
        /// Overwrite the baselines Redis already has.
        #[arg(long)]
        replace: bool,
    },
}

/// What `generate` writes.
#[derive(Debug, Subcommand)]
pub enum Generate {
    /// ratelimit-policyd(8) and ratelimit-policyd.toml(5), into DIR/man8 and DIR/man5.
    Man {
        /// The man directory (/usr/local/share/man).
        dir: PathBuf,
    },
    /// The completion script for SHELL, into DIR.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
        /// The directory.
        dir: PathBuf,
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
    /// Forget a user's counters (unblock) and baseline flag; the baseline history stays.
    Reset {
        /// The user.
        user: String,
        /// Also forget the user's baseline history (they learn again from nothing).
        #[arg(long)]
        baseline: bool,
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
