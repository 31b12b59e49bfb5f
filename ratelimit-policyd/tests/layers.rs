//! The module graph of both crates has no import cycle: for every source file, the
//! module files its `crate::`, `super::` and `self::` paths (and paths through the
//! submodules it declares) name are its edges, and no set of files reaches itself.
//! (Item-level graph tools count every type ↔ method pair as a cycle, so this looks
//! at files, which is what a reader navigates.) A child module using its parent's
//! items (`super::Policy` in `policy/volume.rs`, which declares `impl Policy`) is
//! how Rust splits one type over files, so edges from a module to its own ancestors
//! are not counted; every other edge is, including a parent's uses and re-exports of
//! its children, so a cycle through a parent (`policy` → `ops` → `admin` →
//! `admin::reload` → `daemon` → `policy`) is found.
//!
//! `cargo test -p ratelimit-policyd --test layers -- --nocapture` prints each crate's
//! modules, edges and cycles.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// One crate's module files: module path (`crate::policy::tally`) → its file.
fn module_files(src: &Path) -> BTreeMap<String, PathBuf> {
    let mut out = BTreeMap::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("read the source folder") {
            let path = entry.expect("a folder entry").path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let rel = path.strip_prefix(src).expect("under src");
            let mut parts: Vec<String> = rel
                .iter()
                .map(|p| p.to_string_lossy().trim_end_matches(".rs").to_string())
                .collect();
            if parts
                .last()
                .is_some_and(|l| l == "mod" || l == "lib" || l == "main")
            {
                parts.pop();
            }
            if rel == Path::new("main.rs") {
                continue; // the binary is its own crate
            }
            let module = std::iter::once("crate".to_string())
                .chain(parts)
                .collect::<Vec<_>>()
                .join("::");
            out.insert(module, path);
        }
    }
    out
}

/// The child modules a file declares (`mod x;`, `pub mod x;`, `pub(crate) mod x;`).
fn child_modules(code: &str) -> Vec<String> {
    code.lines()
        .filter_map(|l| {
            let l = l.trim();
            let rest = l
                .strip_prefix("pub(crate) mod ")
                .or_else(|| l.strip_prefix("pub mod "))
                .or_else(|| l.strip_prefix("mod "))?;
            rest.strip_suffix(';').map(|n| n.trim().to_string())
        })
        .collect()
}

/// The paths a source text names: `crate::a::b`, `super::c`, `self::d`, and paths
/// through the child modules it declares (`x::Y` for `mod x;`, as `self::x::Y`), with
/// one level of `{...}` groups expanded (`crate::a::{b::C, D}` names `crate::a::b::C`
/// and `crate::a::D`). Comments and the code after `#[cfg(test)]` (unit tests, whose
/// `super` is the file itself) are skipped.
fn named_paths(text: &str) -> Vec<String> {
    let text = text.split("#[cfg(test)]").next().unwrap_or("");
    let code: String = text
        .lines()
        .map(|l| match l.find("//") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n");
    let children: Vec<String> = child_modules(&code)
        .into_iter()
        .map(|c| format!("{c}::"))
        .collect();
    let bytes = code.as_bytes();
    let is_ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let start_ok = i == 0 || !is_ident(bytes[i - 1]) && bytes[i - 1] != b':';
        let head = ["crate::", "super::", "self::"]
            .into_iter()
            .find(|h| bytes[i..].starts_with(h.as_bytes()));
        let child = children
            .iter()
            .find(|c| bytes[i..].starts_with(c.as_bytes()));
        let (mut j, mut path) = match (head, child, start_ok) {
            (Some(h), _, true) => (i + h.len(), h.trim_end_matches("::").to_string()),
            (None, Some(c), true) => (i + c.len(), format!("self::{}", c.trim_end_matches("::"))),
            _ => {
                i += 1;
                continue;
            }
        };
        // Read `seg::seg::...` (and `super::super::`).
        loop {
            let s = j;
            while j < bytes.len() && is_ident(bytes[j]) {
                j += 1;
            }
            if j > s {
                path.push_str("::");
                path.push_str(&code[s..j]);
            }
            if bytes[j..].starts_with(b"::") {
                j += 2;
                if bytes[j..].starts_with(b"{") {
                    let end = bytes[j..]
                        .iter()
                        .position(|b| *b == b'}')
                        .map_or(bytes.len(), |e| j + e);
                    for item in code[j + 1..end].split(',') {
                        let item: String = item
                            .trim()
                            .chars()
                            .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
                            .collect();
                        if !item.is_empty() {
                            out.push(format!("{path}::{item}"));
                        }
                    }
                    j = end;
                    break;
                }
                continue;
            }
            break;
        }
        out.push(path);
        i = j.max(i + 1);
    }
    out
}

/// `path` (as written in `from`'s module) resolved to the deepest module file it names.
fn resolve(path: &str, from: &str, modules: &BTreeMap<String, PathBuf>) -> Option<String> {
    let mut segs: Vec<&str> = path.split("::").collect();
    let mut base: Vec<&str> = from.split("::").collect();
    match segs.first().copied() {
        Some("crate") => {
            segs.remove(0);
            base = vec!["crate"];
        }
        Some("self") => {
            segs.remove(0);
        }
        _ => {
            while segs.first() == Some(&"super") {
                segs.remove(0);
                base.pop();
            }
        }
    }
    let mut best = None;
    let mut cur = base.join("::");
    if modules.contains_key(&cur) {
        best = Some(cur.clone());
    }
    for s in segs {
        cur = format!("{cur}::{s}");
        if modules.contains_key(&cur) {
            best = Some(cur.clone());
        } else {
            break;
        }
    }
    best
}

/// Whether `inner` is `outer` or one of its submodules (`crate` contains every module).
fn within(inner: &str, outer: &str) -> bool {
    inner == outer
        || inner
            .strip_prefix(outer)
            .is_some_and(|rest| rest.starts_with("::"))
}

/// Edges between module files.
fn edges(modules: &BTreeMap<String, PathBuf>) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (module, file) in modules {
        let text = std::fs::read_to_string(file).expect("read a source file");
        let targets = out.entry(module.clone()).or_default();
        for path in named_paths(&text) {
            if let Some(to) = resolve(&path, module, modules)
                && !within(module, &to)
            {
                targets.insert(to);
            }
        }
    }
    out
}

/// The sets of more than one module that reach each other (Tarjan's algorithm).
fn cycles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    struct State<'g> {
        graph: &'g BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'g str, usize>,
        low: BTreeMap<&'g str, usize>,
        stack: Vec<&'g str>,
        on_stack: BTreeSet<&'g str>,
        next: usize,
        out: Vec<Vec<String>>,
    }
    fn visit<'g>(s: &mut State<'g>, v: &'g str) {
        s.index.insert(v, s.next);
        s.low.insert(v, s.next);
        s.next += 1;
        s.stack.push(v);
        s.on_stack.insert(v);
        if let Some(ws) = s.graph.get(v) {
            for w in ws {
                let w = w.as_str();
                if !s.index.contains_key(w) {
                    visit(s, w);
                    let lw = s.low[w];
                    let lv = s.low.get_mut(v).expect("visited");
                    *lv = (*lv).min(lw);
                } else if s.on_stack.contains(w) {
                    let iw = s.index[w];
                    let lv = s.low.get_mut(v).expect("visited");
                    *lv = (*lv).min(iw);
                }
            }
        }
        if s.low[v] == s.index[v] {
            let mut scc = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on_stack.remove(w);
                scc.push(w.to_string());
                if w == v {
                    break;
                }
            }
            if scc.len() > 1 {
                scc.sort();
                s.out.push(scc);
            }
        }
    }
    let mut s = State {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        next: 0,
        out: Vec::new(),
    };
    for v in graph.keys() {
        if !s.index.contains_key(v.as_str()) {
            visit(&mut s, v);
        }
    }
    s.out
}

fn check(krate: &str) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(krate)
        .join("src");
    let modules = module_files(&src);
    let graph = edges(&modules);
    let found = cycles(&graph);
    let n_edges: usize = graph.values().map(BTreeSet::len).sum();
    println!(
        "{krate}: {} modules, {n_edges} edges, {} cycles",
        modules.len(),
        found.len()
    );
    for (from, to) in &graph {
        if !to.is_empty() {
            let to: Vec<&str> = to.iter().map(|t| t.trim_start_matches("crate::")).collect();
            println!(
                "  {} -> {}",
                from.trim_start_matches("crate::"),
                to.join(", ")
            );
        }
    }
    assert!(found.is_empty(), "{krate}: import cycles: {found:#?}");
}

#[test]
fn the_server_crate_has_no_import_cycle() {
    check("ratelimit-policyd");
}

#[test]
fn the_library_crate_has_no_import_cycle() {
    check("ratelimit-core");
}

#[test]
fn the_checker_sees_edges_and_cycles() {
    let paths = named_paths(
        "mod k;\nuse crate::a::{b::C, D};\n// use crate::z;\nfn f() { super::e::F; crate::g::H; k::L }\n#[cfg(test)]\nmod tests { use super::*; }",
    );
    assert_eq!(
        paths,
        [
            "crate::a::b::C",
            "crate::a::D",
            "crate::a",
            "super::e::F",
            "crate::g::H",
            "self::k::L"
        ]
    );
    assert!(within("crate::a::b", "crate::a"));
    assert!(within("crate::a", "crate"));
    assert!(!within("crate::a", "crate::a::b"));
    assert!(!within("crate::ab", "crate::a"));
    assert!(!within("crate::a::b", "crate::a::c"));
    let mut graph = BTreeMap::new();
    graph.insert("a".to_string(), BTreeSet::from(["b".to_string()]));
    graph.insert("b".to_string(), BTreeSet::from(["c".to_string()]));
    graph.insert("c".to_string(), BTreeSet::from(["a".to_string()]));
    graph.insert("d".to_string(), BTreeSet::from(["a".to_string()]));
    assert_eq!(cycles(&graph), [vec!["a", "b", "c"]]);
}

/// Longest source file, in lines: past it, a file holds more than one job.
const MAX_LINES: usize = 700;

#[test]
fn no_source_file_is_over_700_lines() {
    let mut long = Vec::new();
    for krate in ["ratelimit-core", "ratelimit-policyd"] {
        let src = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join(krate)
            .join("src");
        let mut files: Vec<PathBuf> = module_files(&src).into_values().collect();
        files.push(src.join("main.rs"));
        for file in files.iter().filter(|f| f.exists()) {
            let lines = std::fs::read_to_string(file)
                .expect("read a source file")
                .lines()
                .count();
            if lines > MAX_LINES {
                long.push(format!("{}: {lines} lines", file.display()));
            }
        }
    }
    assert!(long.is_empty(), "split these: {long:#?}");
}
