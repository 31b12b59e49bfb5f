//! `ratelimit-policyd`: parse the command line, then hand over to the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use ratelimit_policyd::cli::{AdminCommand, Cli, Command, Generate};
use ratelimit_policyd::daemon;

fn main() -> ExitCode {
    // Before any thread starts (see trim.rs: how glibc's arenas hold free memory).
    ratelimit_policyd::trim::cap_arenas();
    let cli = Cli::parse();
    match cli.command {
        Some(Command::CheckConfig { file }) => check_config(&file),
        Some(Command::Admin {
            socket,
            json,
            command,
        }) => admin(cli.config.as_deref(), socket, json, command),
        Some(Command::Replay {
            log,
            json,
            write_snapshot,
        }) => replay(cli.config.as_deref(), &log, json, write_snapshot.as_deref()),
        Some(Command::ImportBaselines { file, replace }) => {
            import_baselines(cli.config.as_deref(), &file, replace)
        }
        Some(Command::Generate { what }) => generate(what),
        Some(Command::PostfixConfig) => postfix_config(cli.config.as_deref()),
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

/// The configuration for an offline subcommand (`--config`, or the built-in
/// default), or the failure exit after saying what was wrong.
fn load_config(
    config: Option<&std::path::Path>,
) -> Result<ratelimit_policyd::config::Config, ExitCode> {
    daemon::load_config(config, &[]).map_err(|e| {
        eprintln!("{e}");
        ExitCode::FAILURE
    })
}

fn import_baselines(
    config: Option<&std::path::Path>,
    file: &std::path::Path,
    replace: bool,
) -> ExitCode {
    let cfg = match load_config(config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    match ratelimit_policyd::backend::import_baselines(&cfg, file, replace) {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("ratelimit-policyd: import-baselines: {e}");
            ExitCode::FAILURE
        }
    }
}

fn generate(what: Generate) -> ExitCode {
    use ratelimit_policyd::manual;
    let written = match what {
        Generate::Man { dir } => manual::write_man_pages(&dir),
        Generate::Completions { shell, dir } => {
            manual::write_completions(shell, &dir).map(|p| vec![p])
        }
    };
    match written {
        Ok(paths) => {
            for p in paths {
                println!("{}", p.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("ratelimit-policyd: generate: {e}");
            ExitCode::FAILURE
        }
    }
}

fn postfix_config(config: Option<&std::path::Path>) -> ExitCode {
    let cfg = match config {
        Some(p) => ratelimit_policyd::config::load(p),
        None => Ok(ratelimit_policyd::config::builtin()),
    };
    match cfg {
        Ok(cfg) => {
            let listen: Vec<String> = cfg.server.listen.iter().map(|a| a.to_string()).collect();
            print!(
                "{}",
                daemon::main_cf_lines(&daemon::postfix_target(&listen))
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
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
        AdminCommand::Reset { user, baseline } => C::Reset(admin::reset::Reset { user, baseline }),
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

fn replay(
    config: Option<&std::path::Path>,
    log: &std::path::Path,
    json: bool,
    write_snapshot: Option<&std::path::Path>,
) -> ExitCode {
    let cfg = match load_config(config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let source = cfg.source.clone();
    let file = match std::fs::File::open(log) {
        Ok(f) => std::io::BufReader::new(f),
        Err(e) => {
            eprintln!("ratelimit-policyd: cannot read {}: {e}", log.display());
            return ExitCode::FAILURE;
        }
    };
    match ratelimit_policyd::replay::run_to(cfg, file, write_snapshot) {
        Ok(report) if json => {
            print!(
                "{}",
                ratelimit_policyd::replay::render_json(&report, &source)
            );
            ExitCode::SUCCESS
        }
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
