//! The manual: `--help`, the man pages and the shell completions are made from the
//! clap definition and docs/configuration.md, say what an administrator needs
//! (environment, signals, exit codes, files, every configuration key), and render.

use std::path::Path;
use std::process::Command;

use ratelimit_policyd::manual;

const BIN: &str = env!("CARGO_BIN_EXE_ratelimit-policyd");

fn run(args: &[&str]) -> String {
    let out = Command::new(BIN)
        .args(args)
        .output()
        .expect("the binary runs");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8")
}

/// What `--help` and the man page both carry.
const ADMIN_FACTS: &[&str] = &[
    "RATELIMIT_LOG",
    "SIGHUP",
    "SIGTERM, SIGINT",
    "EXIT STATUS",
    "/etc/ratelimit-policyd/ratelimit-policyd.toml",
    "/run/ratelimit-policyd/admin.sock",
    "/var/lib/ratelimit-policyd/",
];

#[test]
fn help_names_the_environment_signals_exit_codes_and_files() {
    let help = run(&["--help"]);
    for fact in ADMIN_FACTS {
        assert!(help.contains(fact), "--help lacks {fact:?}:\n{help}");
    }
    assert!(help.contains("postfix-config"), "{help}");
    assert!(
        !help.contains("generate"),
        "generate is for packagers: {help}"
    );
    // -h is short, and says where the rest is.
    assert!(run(&["-h"]).contains("--help also shows"));
}

/// The rows of docs/configuration.md's `| key | default | meaning |` tables.
fn documented_keys() -> Vec<String> {
    manual::CONFIGURATION_MD
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split_once("` |"))
        .map(|(key, _)| key.to_string())
        .collect()
}

#[test]
fn the_daemon_page_has_its_sections_options_and_commands() {
    let page = manual::daemon_page().expect("rendered");
    assert!(page.contains(".TH ratelimit-policyd 8"), "{page}");
    for section in [
        "NAME",
        "SYNOPSIS",
        "DESCRIPTION",
        "OPTIONS",
        "COMMANDS",
        "\"ENVIRONMENT\"",
        "\"SIGNALS\"",
        "\"EXIT STATUS\"",
        "\"FILES\"",
        "\"SEE ALSO\"",
    ] {
        assert!(
            page.contains(&format!(".SH {section}\n")),
            "no {section}:\n{page}"
        );
    }
    for option in ["\\-\\-config", "\\-\\-listen", "\\-\\-socket", "\\-\\-json"] {
        assert!(page.contains(option), "no {option}:\n{page}");
    }
    for command in [
        "check\\-config FILE",
        "admin [\\-\\-socket SOCKET] [\\-\\-json] COMMAND",
        "admin reload",
        "admin tier USER TIER",
        "postfix\\-config",
        "replay LOG [\\-\\-json] [\\-\\-write\\-snapshot FILE]",
    ] {
        assert!(
            page.contains(&format!("\\fB{command}\\fR")),
            "no {command}:\n{page}"
        );
    }
    assert!(!page.contains("generate"), "hidden from the page too");
    for fact in ADMIN_FACTS {
        let fact = fact.replace('-', "\\-");
        assert!(page.contains(&fact), "no {fact}:\n{page}");
    }
}

#[test]
fn the_toml_page_has_every_documented_key_and_section() {
    let keys = documented_keys();
    assert!(
        keys.len() > 50,
        "the reference's tables were not found: {keys:?}"
    );
    for must in [
        "listen",
        "redis_url",
        "snapshot_path",
        "limits",
        "tier_overrides",
    ] {
        assert!(keys.iter().any(|k| k == must), "{must} not in {keys:?}");
    }
    let page = manual::config_page(manual::CONFIGURATION_MD);
    assert!(page.contains(".TH ratelimit-policyd.toml 5"), "{page}");
    for key in &keys {
        let entry = format!(".TP\n\\fB{}\\fR (default: ", key.replace('-', "\\-"));
        assert!(page.contains(&entry), "no entry for {key}");
    }
    assert_eq!(
        page.matches(".TP\n").count(),
        keys.len(),
        "one entry per key"
    );
    for heading in manual::CONFIGURATION_MD
        .lines()
        .filter_map(|l| l.strip_prefix("## "))
    {
        let title = heading.replace('`', "");
        assert!(
            page.to_lowercase()
                .contains(&format!(".sh \"{}\"\n", title.to_lowercase())),
            "no section {heading}"
        );
    }
    // Links keep their text only; brackets that are not links stay.
    assert!(page.contains("\"[::1]:10031\""), "{page}");
    assert!(!page.contains("]("), "a link was left in");
}

#[test]
fn generate_man_writes_both_pages_and_they_render() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let out = run(&["generate", "man", dir.path().to_str().expect("UTF-8")]);
    let eight = dir.path().join("man8/ratelimit-policyd.8");
    let five = dir.path().join("man5/ratelimit-policyd.toml.5");
    assert_eq!(out, format!("{}\n{}\n", eight.display(), five.display()));
    assert_eq!(
        std::fs::read_to_string(&eight).expect("written"),
        manual::daemon_page().expect("rendered")
    );
    if Command::new("man").arg("--version").output().is_err() {
        eprintln!("man is not installed (apt package man-db): rendering not checked");
        return;
    }
    for (page, expect) in [
        (&eight, ["ratelimit-policyd(8)", "EXIT STATUS", "SIGHUP"]),
        (
            &five,
            [
                "ratelimit-policyd.toml(5)",
                "redis_command_timeout",
                "[server]",
            ],
        ),
    ] {
        let text = render(page);
        for e in expect {
            assert!(text.contains(e), "{}: no {e:?} in\n{text}", page.display());
        }
    }
}

/// `man -l PAGE` as plain text; fails on any warning.
fn render(page: &Path) -> String {
    let out = Command::new("man")
        .args(["--warnings", "-l"])
        .arg(page)
        .env("MANWIDTH", "80")
        .env("MANPAGER", "cat")
        .output()
        .expect("man runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.is_empty(),
        "{}: {stderr}",
        page.display()
    );
    // Overstrike bold (`X\bX`) and underline (`_\bX`) down to plain text, as col -b.
    let mut text = String::new();
    for c in String::from_utf8_lossy(&out.stdout).chars() {
        match c {
            '\u{8}' => {
                text.pop();
            }
            '\u{2010}' => text.push('-'),
            c => text.push(c),
        }
    }
    text
}

#[test]
fn generate_completions_writes_a_script_that_knows_the_commands() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    for (shell, file) in [
        ("bash", "ratelimit-policyd.bash"),
        ("zsh", "_ratelimit-policyd"),
        ("fish", "ratelimit-policyd.fish"),
    ] {
        let out = run(&[
            "generate",
            "completions",
            shell,
            dir.path().to_str().expect("UTF-8"),
        ]);
        let path = dir.path().join(file);
        assert_eq!(out.trim(), path.display().to_string());
        let script = std::fs::read_to_string(&path).expect("written");
        for word in ["check-config", "postfix-config", "reload", "--config"] {
            assert!(script.contains(word), "{shell}: no {word}");
        }
    }
}
