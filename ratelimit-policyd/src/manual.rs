//! The manual: the man pages `ratelimit-policyd(8)` (from the clap definition in
//! [`crate::cli`] and the texts below, which `--help` shows too) and
//! `ratelimit-policyd.toml(5)` (from docs/configuration.md, the one configuration
//! reference), and the shell completions. `ratelimit-policyd generate` writes them.

use std::io;
use std::path::{Path, PathBuf};

use clap::CommandFactory;

use crate::cli::{CONFIG_FILE, Cli, SECTIONS};

/// The configuration reference the toml(5) page is made from.
pub const CONFIGURATION_MD: &str = include_str!("../../docs/configuration.md");

/// `ratelimit-policyd(8)`.
pub fn daemon_page() -> io::Result<String> {
    let cmd = Cli::command();
    let man = clap_mangen::Man::new(cmd)
        .section("8")
        .manual("System Manager's Manual");
    let mut out = Vec::new();
    man.render_title(&mut out)?;
    man.render_name_section(&mut out)?;
    man.render_synopsis_section(&mut out)?;
    man.render_description_section(&mut out)?;
    man.render_options_section(&mut out)?;
    let mut roff = String::from_utf8(out).map_err(io::Error::other)?;
    roff.push_str(".SH COMMANDS\n");
    commands(&mut roff, &Cli::command(), "");
    for (title, entries) in SECTIONS {
        roff.push_str(&format!(".SH \"{title}\"\n"));
        for (term, text) in *entries {
            roff.push_str(&format!(
                ".TP\n\\fB{}\\fR\n{}\n",
                escape(term),
                inline(text)
            ));
        }
    }
    roff.push_str(
        ".SH \"SEE ALSO\"\n\\fBratelimit-policyd.toml\\fR(5), \\fBpostconf\\fR(5), \\fBsystemd.service\\fR(5)\n",
    );
    Ok(roff)
}

/// One `.TP` per visible subcommand of `cmd` (and, indented, theirs): its usage
/// and what it does, in this page (clap_mangen would point at a page per command).
fn commands(roff: &mut String, cmd: &clap::Command, prefix: &str) {
    for sub in cmd.get_subcommands() {
        if sub.is_hide_set() || sub.get_name() == "help" {
            continue;
        }
        let mut usage = format!("{prefix}{}", sub.get_name());
        for arg in sub.get_arguments().filter(|a| !a.is_global_set()) {
            let id = arg.get_id().as_str();
            if id == "help" || id == "version" {
                continue;
            }
            let name = arg
                .get_value_names()
                .and_then(|names| names.first())
                .map_or_else(|| id.to_uppercase(), |n| n.to_string());
            usage.push(' ');
            usage.push_str(&match (arg.get_long(), arg.is_positional()) {
                (Some(long), _) if arg.get_action().takes_values() => format!("[--{long} {name}]"),
                (Some(long), _) => format!("[--{long}]"),
                (None, _) if arg.is_required_set() => name,
                (None, _) => format!("[{name}]"),
            });
        }
        if sub.has_subcommands() {
            usage.push_str(" COMMAND");
        }
        let about = sub
            .get_long_about()
            .or(sub.get_about())
            .map(|a| a.to_string());
        roff.push_str(&format!(
            ".TP\n\\fB{}\\fR\n{}\n",
            escape(&usage),
            escape(about.as_deref().unwrap_or(""))
        ));
        if sub.has_subcommands() {
            roff.push_str(".RS\n");
            commands(roff, sub, &format!("{} ", sub.get_name()));
            roff.push_str(".RE\n");
        }
    }
}

/// `ratelimit-policyd.toml(5)`, from `markdown` (docs/configuration.md).
pub fn config_page(markdown: &str) -> String {
    let mut roff = format!(
        ".TH ratelimit-policyd.toml 5 \"\" \"ratelimit-policyd {}\" \"File Formats Manual\"\n\
         .SH NAME\nratelimit\\-policyd.toml \\- configuration of ratelimit\\-policyd(8)\n\
         .SH SYNOPSIS\n\\fB{}\\fR\n.SH DESCRIPTION\n",
        env!("CARGO_PKG_VERSION"),
        escape(CONFIG_FILE)
    );
    let mut lines = markdown.lines().peekable();
    let mut para = false;
    while let Some(line) = lines.next() {
        let trimmed = line.trim_start();
        if line.starts_with("# ") {
            continue;
        } else if let Some(h) = line.strip_prefix("## ") {
            // `[server]` keeps its case: it is what the file says.
            let title = if h.starts_with('`') {
                plain(h)
            } else {
                plain(h).to_uppercase()
            };
            roff.push_str(&format!(".SH \"{title}\"\n"));
        } else if let Some(h) = line.strip_prefix("### ") {
            roff.push_str(&format!(".SS \"{}\"\n", plain(h)));
        } else if trimmed.starts_with("```") {
            roff.push_str(".RS\n.nf\n");
            for code in lines.by_ref() {
                if code.trim_start().starts_with("```") {
                    break;
                }
                roff.push_str(&format!("\\&{}\n", escape(code.trim_start())));
            }
            roff.push_str(".fi\n.RE\n");
        } else if trimmed.starts_with('|') {
            table_row(&mut roff, trimmed);
        } else if trimmed.is_empty() {
            para = false;
            continue;
        } else if let Some(item) = trimmed.strip_prefix("- ") {
            roff.push_str(&format!(".IP \\(bu 2\n{}\n", inline(item)));
        } else if let Some((n, item)) = numbered(trimmed) {
            roff.push_str(&format!(".IP {n}. 4\n{}\n", inline(item)));
        } else {
            if !para {
                // An indented paragraph continues a list item.
                roff.push_str(if line.starts_with(' ') {
                    ".IP\n"
                } else {
                    ".PP\n"
                });
            }
            roff.push_str(&inline(trimmed));
            roff.push('\n');
        }
        para = true;
    }
    roff.push_str(".SH \"SEE ALSO\"\n\\fBratelimit-policyd\\fR(8)\n");
    roff
}

/// `1. text` → ("1", "text").
fn numbered(line: &str) -> Option<(&str, &str)> {
    let (n, rest) = line.split_once(". ")?;
    (!n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())).then_some((n, rest))
}

/// A row of a `| key | default | meaning |` table; the header and its rule are skipped.
fn table_row(roff: &mut String, row: &str) {
    let cells: Vec<&str> = row.trim_matches('|').split(" | ").map(str::trim).collect();
    if cells
        .first()
        .is_some_and(|c| *c == "key" || c.starts_with("---"))
    {
        return;
    }
    match cells.as_slice() {
        [key, default, meaning] => roff.push_str(&format!(
            ".TP\n\\fB{}\\fR (default: {})\n{}\n",
            plain(key),
            inline(default),
            inline(meaning)
        )),
        _ => roff.push_str(&format!(".PP\n{}\n", inline(&cells.join(" \u{2014} ")))),
    }
}

/// Roff-escapes text: backslashes, and a leading dot or quote.
fn escape(text: &str) -> String {
    let s = text.replace('\\', "\\e").replace('-', "\\-");
    if s.starts_with('.') || s.starts_with('\'') {
        format!("\\&{s}")
    } else {
        s
    }
}

/// Markdown inline text without its marks: `code`, **bold**, [text](link).
fn plain(text: &str) -> String {
    escape(&strip_links(text).replace(['`', '*'], ""))
}

/// Markdown inline text in roff: `code` and **bold** in bold, links as their text.
fn inline(text: &str) -> String {
    let text = escape(&strip_links(text));
    let mut out = String::with_capacity(text.len());
    let mut bold = false;
    let mut rest = text.as_str();
    while let Some(i) = rest.find(['`', '*']) {
        out.push_str(&rest[..i]);
        let mark = if rest[i..].starts_with("**") { 2 } else { 1 };
        if mark == 1 && rest[i..].starts_with('*') {
            out.push('*');
        } else {
            out.push_str(if bold { "\\fR" } else { "\\fB" });
            bold = !bold;
        }
        rest = &rest[i + mark..];
    }
    out.push_str(rest);
    if bold {
        out.push_str("\\fR");
    }
    out
}

/// `[text](target)` → `text`.
fn strip_links(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(open) = rest.find('[') {
        let after = &rest[open + 1..];
        let link = after.find("](").filter(|&c| after.find(']') == Some(c));
        match link.and_then(|close| {
            let tail = &after[close + 2..];
            tail.find(')').map(|end| (close, close + 2 + end + 1))
        }) {
            Some((close, end)) => {
                out.push_str(&rest[..open]);
                out.push_str(&after[..close]);
                rest = &after[end..];
            }
            None => {
                out.push_str(&rest[..=open]);
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// Writes both man pages under `dir` (`man8/ratelimit-policyd.8`,
/// `man5/ratelimit-policyd.toml.5`) and returns their paths.
pub fn write_man_pages(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let pages = [
        ("man8", "ratelimit-policyd.8", daemon_page()?),
        (
            "man5",
            "ratelimit-policyd.toml.5",
            config_page(CONFIGURATION_MD),
        ),
    ];
    let mut written = Vec::new();
    for (sub, name, text) in pages {
        let path = dir.join(sub).join(name);
        std::fs::create_dir_all(dir.join(sub))?;
        std::fs::write(&path, text)?;
        written.push(path);
    }
    Ok(written)
}

/// Writes the completion script for `shell` into `dir` and returns its path.
pub fn write_completions(shell: clap_complete::Shell, dir: &Path) -> io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    clap_complete::generate_to(shell, &mut Cli::command(), "ratelimit-policyd", dir)
}
