//! `ratelimit-policyd`: parse the command line, then hand over to the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use ratelimit_policyd::config::ListenAddr;
use ratelimit_policyd::daemon;

/// A Postfix policy server that rate-limits outbound mail per SASL user.
///
/// With no arguments it listens on 127.0.0.1:10031 with in-memory counters and one
/// default tier of 100 messages per hour.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Configuration file (TOML). Without it, the built-in default is used.
    #[arg(short, long, global = true)]
    config: Option<PathBuf>,
    /// Listen here instead of the configured addresses (host:port or unix:/path); repeatable.
    #[arg(short, long)]
    listen: Vec<ListenAddr>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
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
        #[command(subcommand)]
        command: AdminCommand,
    },
    /// Run recorded requests ([record] path) through --config offline and print who
    /// would have been refused, when, and by which limit.
    Replay {
        /// The record file (JSON lines).
        log: PathBuf,
    },
}

#[derive(Subcommand)]
enum AdminCommand {
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::CheckConfig { file }) => check_config(&file),
        Some(Command::Admin {
            socket,
            json,
            command,
        }) => admin(cli.config.as_deref(), socket, json, command),
        Some(Command::Replay { log }) => replay(cli.config.as_deref(), &log),
        None => {
            let server = daemon::load_config(cli.config.as_deref(), &cli.listen)
                .map(|c| c.server)
                .unwrap_or_default();
            ratelimit_policyd::logging::init(&server);
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("ratelimit-policyd: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match rt.block_on(daemon::serve(cli.config, cli.listen)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e}");
                    eprintln!("ratelimit-policyd: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn check_config(file: &std::path::Path) -> ExitCode {
    match ratelimit_policyd::config::load(file) {
        Ok(cfg) => {
            println!("{}: OK", file.display());
            print!("{}", ratelimit_policyd::config::describe(&cfg));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}

fn admin(
    config: Option<&std::path::Path>,
    socket: Option<PathBuf>,
    json: bool,
    command: AdminCommand,
) -> ExitCode {
    use ratelimit_policyd::admin::{self, Command as C};
    let socket = match socket {
        Some(s) => s,
        None => {
            let cfg = match config {
                Some(p) => match ratelimit_policyd::config::load(p) {
                    Ok(c) => c,
                    Err(e) => {
                        eprintln!("{e}");
                        return ExitCode::FAILURE;
                    }
                },
                None => ratelimit_policyd::config::builtin(),
            };
            match cfg.ops.admin.socket {
                Some(s) => s,
                None => {
                    eprintln!(
                        "ratelimit-policyd: the admin socket is disabled in {} ([admin] enabled = false)",
                        cfg.source
                    );
                    return ExitCode::FAILURE;
                }
            }
        }
    };
    let cmd = match command {
        AdminCommand::Show { user } => C::Show(admin::show::Show { user }),
        AdminCommand::Reset { user } => C::Reset(admin::reset::Reset { user }),
        AdminCommand::Tier { user, tier } => C::Tier(admin::tier::SetTier { user, tier }),
        AdminCommand::Top { n } => C::Top(admin::top::Top { n }),
        AdminCommand::Stats => C::Stats(admin::stats::Stats {}),
        AdminCommand::Reload => C::Reload(admin::reload::Reload {}),
    };
    match admin::client::run(&socket, &cmd, json) {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("ratelimit-policyd: {e}");
            ExitCode::FAILURE
        }
    }
}

fn replay(config: Option<&std::path::Path>, log: &std::path::Path) -> ExitCode {
    let cfg = match daemon::load_config(config, &[]) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let source = cfg.source.clone();
    let file = match std::fs::File::open(log) {
        Ok(f) => std::io::BufReader::new(f),
        Err(e) => {
            eprintln!("ratelimit-policyd: cannot read {}: {e}", log.display());
            return ExitCode::FAILURE;
        }
    };
    match ratelimit_policyd::replay::run(cfg, file) {
        Ok(report) => {
            print!("{}", ratelimit_policyd::replay::render(&report, &source));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("ratelimit-policyd: replaying {}: {e}", log.display());
            ExitCode::FAILURE
        }
    }
}
