//! The documentation says what the code does: the main.cf lines in the README and
//! in docs/install.md are the ones the daemon prints at start and
//! `ratelimit-policyd postfix-config` prints, and every relative link in the docs
//! leads to a file that exists.

use std::path::{Path, PathBuf};

use ratelimit_policyd::daemon;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The fenced block right after `marker` in `text`.
fn block_after<'t>(text: &'t str, marker: &str) -> Option<&'t str> {
    let rest = &text[text.find(marker)? + marker.len()..];
    let open = rest.find("```")?;
    let body = &rest[open..];
    let body = &body[body.find('\n')? + 1..];
    Some(&body[..body.find("```")?])
}

#[test]
fn the_readme_shows_the_main_cf_lines_the_daemon_prints() {
    let readme = std::fs::read_to_string(root().join("README.md")).expect("README.md");
    let marker =
        "<!-- main.cf: printed by the daemon at start; tests/docs.rs checks this block -->";
    let block = block_after(&readme, marker).expect("the README's main.cf block");
    assert_eq!(block, daemon::main_cf_lines("inet:127.0.0.1:10031"));
    // And the daemon's start-up line carries the same lines.
    let printed = daemon::postfix_wiring(&["127.0.0.1:10031".to_string()]);
    for line in block.lines() {
        assert!(printed.contains(line), "{line:?} is not in {printed}");
    }
}

/// `ratelimit-policyd [--config FILE] postfix-config`'s output.
fn postfix_config(config: Option<&Path>) -> String {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_ratelimit-policyd"));
    if let Some(c) = config {
        cmd.arg("--config").arg(c);
    }
    let out = cmd.arg("postfix-config").output().expect("the binary runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8")
}

#[test]
fn postfix_config_prints_the_readmes_lines_for_the_builtin_default() {
    let readme = std::fs::read_to_string(root().join("README.md")).expect("README.md");
    let marker =
        "<!-- main.cf: printed by the daemon at start; tests/docs.rs checks this block -->";
    let block = block_after(&readme, marker).expect("the README's main.cf block");
    assert_eq!(postfix_config(None), block);
}

#[test]
fn install_md_shows_the_lines_postfix_config_prints_for_its_unix_socket() {
    let install = std::fs::read_to_string(root().join("docs/install.md")).expect("install.md");
    let marker = "<!-- main.cf for the Unix socket: tests/docs.rs checks this block -->";
    let block = block_after(&install, marker).expect("install.md's Unix-socket main.cf block");
    let dir = tempfile::tempdir().expect("a temporary directory");
    let cfg = dir.path().join("unix.toml");
    std::fs::write(
        &cfg,
        "[server]\nlisten = [\"unix:/var/spool/postfix/ratelimit/policy\"]\n",
    )
    .expect("written");
    let printed = postfix_config(Some(&cfg));
    assert!(
        printed.contains("check_policy_service unix:ratelimit/policy,"),
        "{printed}"
    );
    assert_eq!(printed, block);
    // The daemon's start-up line for that listener carries the same lines.
    let logged = daemon::postfix_wiring(&["unix:/var/spool/postfix/ratelimit/policy".to_string()]);
    for line in block.lines() {
        assert!(logged.contains(line), "{line:?} is not in {logged}");
    }
}

#[test]
fn postfix_config_names_a_socket_in_private_as_smtpd_sees_it() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let cfg = dir.path().join("private.toml");
    std::fs::write(
        &cfg,
        "[server]\nlisten = [\"127.0.0.1:10099\", \"unix:/srv/queue/private/rl\"]\n",
    )
    .expect("written");
    assert_eq!(
        postfix_config(Some(&cfg)),
        daemon::main_cf_lines("unix:private/rl")
    );
}

#[test]
fn relative_links_in_the_docs_lead_to_files() {
    let root = root();
    let mut docs = vec![
        root.join("README.md"),
        root.join("CONTRIBUTING.md"),
        root.join("ARCHITECTURE.md"),
        root.join("benches/README.md"),
    ];
    for entry in std::fs::read_dir(root.join("docs")).expect("docs/") {
        docs.push(entry.expect("an entry").path());
    }
    let mut broken = Vec::new();
    for doc in docs
        .iter()
        .filter(|d| d.extension().is_some_and(|e| e == "md"))
    {
        let text =
            std::fs::read_to_string(doc).unwrap_or_else(|e| panic!("{}: {e}", doc.display()));
        let dir = doc.parent().expect("a folder");
        for part in text.split("](").skip(1) {
            let Some(target) = part.split(')').next() else {
                continue;
            };
            let target = target.split('#').next().unwrap_or("");
            if target.is_empty() || target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            if !dir.join(target).exists() {
                broken.push(format!("{}: {target}", doc.display()));
            }
        }
    }
    assert!(broken.is_empty(), "links to missing files: {broken:#?}");
}
