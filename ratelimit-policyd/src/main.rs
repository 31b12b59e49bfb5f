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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::CheckConfig { file }) => check_config(&file),
        None => {
            let cfg_json = daemon::load_config(cli.config.as_deref(), &cli.listen)
                .map(|c| c.log_json)
                .unwrap_or(false);
            init_logging(cfg_json);
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

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("RATELIMIT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        let _ = builder.json().try_init();
    } else {
        let _ = builder.try_init();
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
