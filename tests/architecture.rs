//! The dependency rule of docs/ARCHITECTURE.md, kept true: every `crate::…`, `super::…` and
//! `self::…` path in `src/` is read, resolved to the module it names, and checked.
//!
//! - Between top-level modules, imports point down the order [`ORDER`] only.
//! - Inside any folder, its children import each other without a circle.
//!
//! The rule is checked on the crate itself, and on small made-up trees that break it, so that the
//! checker is seen to fail.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// The top-level modules, from the top of the dependency order down: a module may import only
/// modules after it in this list (docs/ARCHITECTURE.md).
const ORDER: &[&str] = &[
    "cli",
    "tools",
    "train",
    "distributed",
    "observe",
    "store",
    "backend",
    "model",
    "optim",
    "data",
    "limits",
    "rng",
];

/// A module's path below the crate root (`["train", "step"]` for `src/train/step.rs`).
type ModPath = Vec<String>;

/// Every module of the tree with its source: `(path, text)`; `lib.rs` is the empty path.
fn modules_of(files: &[(String, String)]) -> Vec<(ModPath, String)> {
    files
        .iter()
        .filter(|(rel, _)| rel != "main.rs")
        .map(|(rel, text)| {
            let rel = rel.trim_end_matches(".rs");
            let mut parts: Vec<String> = rel.split('/').map(str::to_string).collect();
            if parts.last().is_some_and(|p| p == "mod" || p == "lib") {
                parts.pop();
            }
            (parts, text.clone())
        })
        .collect()
}

/// The text with `//` comments and string literals blanked, so that paths in docs and messages
/// do not count.
fn code_only(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        let mut in_str = false;
        let mut prev = ' ';
        let mut chars = line.chars().peekable();
        while let Some(c) = chars.next() {
            if in_str {
                if c == '"' && prev != '\\' {
                    in_str = false;
                }
                prev = if prev == '\\' && c == '\\' { ' ' } else { c };
                continue;
            }
            if c == '/' && chars.peek() == Some(&'/') {
                break;
            }
            if c == '"' && prev != '\'' {
                in_str = true;
                prev = ' ';
                continue;
            }
            out.push(c);
            prev = c;
        }
        out.push('\n');
    }
    out
}

/// The paths a module's code names, each as written: `crate::a::b`, `super::super::c`, and the
/// members of groups (`crate::{a::x, b}` gives `crate::a::x` and `crate::b`).
fn paths_in(code: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let bytes = code.as_bytes();
    let is_ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    for start in ["crate::", "super::", "self::"] {
        let mut from = 0;
        while let Some(i) = code[from..].find(start) {
            let at = from + i;
            from = at + start.len();
            if at > 0 && (is_ident(bytes[at - 1]) || bytes[at - 1] == b':') {
                continue;
            }
            let head = start.trim_end_matches("::").to_string();
            let mut segs = vec![head];
            let mut j = from;
            loop {
                let s = j;
                while j < bytes.len() && is_ident(bytes[j]) {
                    j += 1;
                }
                if j > s {
                    segs.push(code[s..j].to_string());
                    if code[j..].starts_with("::") {
                        j += 2;
                        continue;
                    }
                } else if code[j..].starts_with('{') {
                    // a group: each member is a path of its own after this prefix
                    let end = matching_brace(code, j);
                    expand(&segs, &code[j + 1..end], &mut out);
                    segs.clear();
                }
                break;
            }
            if !segs.is_empty() {
                out.push(segs);
            }
        }
    }
    out
}

fn matching_brace(code: &str, open: usize) -> usize {
    let mut depth = 0;
    for (i, c) in code[open..].char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return open + i;
                }
            }
            _ => {}
        }
    }
    code.len()
}

/// The members of a group, split at its top-level commas (nested groups kept whole).
fn split_top(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let (mut depth, mut cur) = (0, String::new());
    for c in s.chars() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                out.push(std::mem::take(&mut cur));
                continue;
            }
            _ => {}
        }
        cur.push(c);
    }
    out.push(cur);
    out.into_iter()
        .map(|m| m.trim().to_string())
        .filter(|m| !m.is_empty())
        .collect()
}

/// Each member of the group `body` after `prefix`, nested groups expanded.
fn expand(prefix: &[String], body: &str, out: &mut Vec<Vec<String>>) {
    for member in split_top(body) {
        let (head, nested) = match member.find('{') {
            Some(i) => (
                &member[..i],
                Some(&member[i + 1..member.rfind('}').unwrap_or(member.len())]),
            ),
            None => (member.as_str(), None),
        };
        let mut m = prefix.to_vec();
        m.extend(
            head.split("::")
                .map(|p| p.split_whitespace().next().unwrap_or("").to_string())
                .filter(|p| !p.is_empty() && p != "self" && p != "*"),
        );
        match nested {
            Some(body) => expand(&m, body, out),
            None => out.push(m),
        }
    }
}

/// The module a path written in module `here` names: the longest prefix that is a module.
fn resolve(here: &ModPath, path: &[String], known: &BTreeSet<ModPath>) -> ModPath {
    // `super` of a file module is its folder; of a folder's mod.rs, the folder above
    let mut base: ModPath = match path[0].as_str() {
        "crate" => Vec::new(),
        _ => here.clone(),
    };
    let mut rest = &path[1..];
    if path[0] == "super" {
        base.pop();
        while rest.first().is_some_and(|s| s == "super") {
            base.pop();
            rest = &rest[1..];
        }
    }
    let mut best = base.clone();
    let mut cur = base;
    for s in rest {
        cur.push(s.clone());
        if known.contains(&cur) {
            best = cur.clone();
        } else {
            break;
        }
    }
    best
}

/// Every rule broken by the tree `files` (paths relative to `src/`, with their text).
fn violations(files: &[(String, String)]) -> Vec<String> {
    let mods = modules_of(files);
    let known: BTreeSet<ModPath> = mods.iter().map(|(p, _)| p.clone()).collect();
    let rank = |m: &str| ORDER.iter().position(|o| *o == m);
    let mut bad = Vec::new();
    // folder → (child → children it imports)
    let mut edges: BTreeMap<ModPath, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
    for (here, text) in &mods {
        if here.is_empty() {
            continue;
        }
        if rank(&here[0]).is_none() {
            bad.push(format!(
                "src/{}: the top-level module `{}` has no place in the dependency order",
                here.join("/"),
                here[0]
            ));
            continue;
        }
        for path in paths_in(&code_only(text)) {
            let to = resolve(here, &path, &known);
            if to.is_empty() {
                continue;
            }
            let common = here.iter().zip(&to).take_while(|(a, b)| a == b).count();
            if common == here.len() || common == to.len() {
                // a module and its own descendants or ancestors
                continue;
            }
            if common == 0 {
                let (a, b) = (rank(&here[0]), rank(&to[0]));
                match (a, b) {
                    (Some(a), Some(b)) if b > a => {}
                    (_, None) => bad.push(format!(
                        "{}: imports `{}`, which has no place in the dependency order",
                        here.join("::"),
                        to.join("::")
                    )),
                    _ => bad.push(format!(
                        "{} imports {} (`{}`): against the order {}",
                        here.join("::"),
                        to.join("::"),
                        path.join("::"),
                        ORDER.join(" → ")
                    )),
                }
                continue;
            }
            edges
                .entry(here[..common].to_vec())
                .or_default()
                .entry(here[common].clone())
                .or_default()
                .insert(to[common].clone());
        }
    }
    for (folder, g) in &edges {
        if let Some(cycle) = find_cycle(g) {
            let name = if folder.is_empty() {
                "crate".to_string()
            } else {
                folder.join("::")
            };
            bad.push(format!("a circle inside {name}: {}", cycle.join(" → ")));
        }
    }
    bad
}

/// A circle in a directed graph, as the names along it (first = last), if there is one.
fn find_cycle(g: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        n: &str,
        g: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(n.to_string(), 1);
        stack.push(n.to_string());
        for m in g.get(n).into_iter().flatten() {
            match state.get(m.as_str()) {
                Some(1) => {
                    let i = stack.iter().position(|s| s == m).unwrap_or(0);
                    let mut c = stack[i..].to_vec();
                    c.push(m.clone());
                    return Some(c);
                }
                Some(_) => {}
                None => {
                    if let Some(c) = visit(m, g, state, stack) {
                        return Some(c);
                    }
                }
            }
        }
        stack.pop();
        state.insert(n.to_string(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for n in g.keys() {
        if !state.contains_key(n.as_str()) {
            let mut stack = Vec::new();
            if let Some(c) = visit(n, g, &mut state, &mut stack) {
                return Some(c);
            }
        }
    }
    None
}

fn read_tree(root: &Path) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).expect("src/ is readable") {
            let p = e.expect("a folder entry").path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                let rel = p
                    .strip_prefix(root)
                    .expect("under src/")
                    .to_string_lossy()
                    .replace('\\', "/");
                out.push((rel, std::fs::read_to_string(&p).expect("a source file")));
            }
        }
    }
    out.sort();
    out
}

fn tree(files: &[(&str, &str)]) -> Vec<(String, String)> {
    files
        .iter()
        .map(|(p, t)| (p.to_string(), t.to_string()))
        .collect()
}

#[test]
fn the_crate_keeps_the_dependency_order_and_has_no_circles() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let files = read_tree(&src);
    assert!(files.len() > 40, "read only {} files", files.len());
    let bad = violations(&files);
    assert!(
        bad.is_empty(),
        "{} violations:\n{}",
        bad.len(),
        bad.join("\n")
    );
}

#[test]
fn every_top_level_module_is_in_the_order_and_lib_rs_lists_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let lib = std::fs::read_to_string(src.join("lib.rs")).unwrap();
    // the order, as lib.rs's header states it
    let stated: Vec<&str> = lib
        .lines()
        .filter_map(|l| l.strip_prefix("//! "))
        .find(|l| l.contains(" → "))
        .expect("lib.rs states the dependency order in its header")
        .split(" → ")
        .map(str::trim)
        .collect();
    assert_eq!(
        stated, ORDER,
        "lib.rs's header states the order this test checks"
    );
    // every module declared, each with a one-line doc saying what it owns
    let lines: Vec<&str> = lib.lines().collect();
    let mut declared: Vec<&str> = Vec::new();
    for (i, l) in lines.iter().enumerate() {
        if let Some(m) = l.strip_prefix("pub mod ") {
            declared.push(m.trim_end_matches(';').trim());
            assert!(
                i > 0 && lines[i - 1].starts_with("/// "),
                "lib.rs: `{l}` says in one line what it owns"
            );
        }
    }
    declared.sort_unstable();
    let mut order = ORDER.to_vec();
    order.sort_unstable();
    assert_eq!(
        declared, order,
        "lib.rs declares exactly the modules of the order"
    );
}

#[test]
fn an_import_up_the_order_is_caught() {
    let t = tree(&[
        ("lib.rs", "pub mod train;\npub mod backend;"),
        ("train/mod.rs", "use crate::backend::Backend;"),
        (
            "backend/mod.rs",
            "pub trait Backend {}\nfn f() { let _ = crate::train::go(); }",
        ),
    ]);
    let bad = violations(&t);
    assert_eq!(bad.len(), 1, "{bad:?}");
    assert!(bad[0].starts_with("backend imports train"), "{bad:?}");
    // the same import in a comment or a string is not an import
    let t = tree(&[
        ("train/mod.rs", "use crate::backend::Backend;"),
        (
            "backend/mod.rs",
            "// see crate::train::go\nconst S: &str = \"crate::train\";",
        ),
    ]);
    assert_eq!(violations(&t), Vec::<String>::new());
}

#[test]
fn grouped_and_relative_imports_are_read() {
    let t = tree(&[
        ("store/mod.rs", "pub mod checkpoint;"),
        (
            "store/checkpoint.rs",
            "use crate::{model::Spec, observe::{trace, record}};",
        ),
        ("observe/mod.rs", "pub mod trace;\npub mod record;"),
        ("model/mod.rs", ""),
    ]);
    let bad = violations(&t);
    assert_eq!(bad.len(), 2, "{bad:?}");
    assert!(
        bad.iter()
            .all(|b| b.starts_with("store::checkpoint imports observe"))
    );
}

#[test]
fn a_circle_inside_a_folder_is_caught() {
    let t = tree(&[
        (
            "distributed/mod.rs",
            "pub mod comm;\npub mod exchange;\npub mod gather;",
        ),
        ("distributed/comm.rs", "use super::gather::chunk;"),
        (
            "distributed/gather.rs",
            "use crate::distributed::exchange::Exchange;",
        ),
        ("distributed/exchange.rs", "use super::comm::Communicator;"),
    ]);
    let bad = violations(&t);
    assert_eq!(bad.len(), 1, "{bad:?}");
    assert!(
        bad[0].starts_with("a circle inside distributed: "),
        "{bad:?}"
    );
    // imports from the folder's own mod.rs, or of a child by its parent, are no circle
    let t = tree(&[
        (
            "backend/mod.rs",
            "pub mod cpu;\npub use cpu::Cpu;\npub trait Backend {}",
        ),
        ("backend/cpu.rs", "use super::Backend;"),
    ]);
    assert_eq!(violations(&t), Vec::<String>::new());
}
