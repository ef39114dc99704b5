//! The import rule of docs/architecture.md, kept by a test: no import circles between the
//! crate's files. A file may use its ancestors (a submodule is part of its parent's
//! implementation), but any other `crate::`, `super::` or `self::` path it names is an edge,
//! and the edges must form no cycle. Test-only code (this file is compiled only for tests).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// A file of the crate as a module path (`turn::core`), with its source.
struct File {
    module: Vec<String>,
    text: String,
}

/// Reads every `.rs` file under `src` as a module; `lib.rs` and `main.rs` are the root.
fn read_tree(src: &Path) -> std::io::Result<Vec<File>> {
    let mut out = Vec::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().and_then(|e| e.to_str()) != Some("rs") {
                continue;
            }
            let rel = path.strip_prefix(src).map_err(std::io::Error::other)?;
            let mut module: Vec<String> = rel
                .with_extension("")
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            if matches!(
                module.last().map(String::as_str),
                Some("mod" | "lib" | "main")
            ) {
                module.pop();
            }
            if module.is_empty() && rel != Path::new("lib.rs") {
                // main.rs is a separate crate root that imports the library by name.
                continue;
            }
            out.push(File {
                module,
                text: std::fs::read_to_string(&path)?,
            });
        }
    }
    Ok(out)
}

/// A token of Rust source, once comments, strings and char literals are gone.
#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    Path, // `::`
    Open,
    Close,
    Comma,
    Other,
}

/// Splits source into the tokens paths are made of; everything else is `Other`.
fn tokens(src: &str) -> Vec<Tok> {
    let b = src.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c == b'/' && b.get(i + 1) == Some(&b'/') {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if c == b'/' && b.get(i + 1) == Some(&b'*') {
            let mut depth = 0;
            while i < b.len() {
                if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
                    depth += 1;
                    i += 2;
                } else if b[i] == b'*' && b.get(i + 1) == Some(&b'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
        } else if c == b'r' && matches!(b.get(i + 1), Some(b'#' | b'"')) {
            // Raw string: r"…", r#"…"#.
            let mut j = i + 1;
            let mut hashes = 0;
            while b.get(j) == Some(&b'#') {
                hashes += 1;
                j += 1;
            }
            if b.get(j) != Some(&b'"') {
                i += 1;
                continue;
            }
            j += 1;
            'raw: while j < b.len() {
                if b[j] == b'"' && (0..hashes).all(|k| b.get(j + 1 + k) == Some(&b'#')) {
                    j += 1 + hashes;
                    break 'raw;
                }
                j += 1;
            }
            i = j;
            out.push(Tok::Other);
        } else if c == b'"' {
            i += 1;
            while i < b.len() && b[i] != b'"' {
                if b[i] == b'\\' {
                    i += 1;
                }
                i += 1;
            }
            i += 1;
            out.push(Tok::Other);
        } else if c == b'\'' {
            // A char literal ('a', '\n', '\u{1F}') or a lifetime ('a).
            if b.get(i + 1) == Some(&b'\\') {
                i += 2;
                while i < b.len() && b[i] != b'\'' {
                    i += 1;
                }
                i += 1;
            } else if b.get(i + 2) == Some(&b'\'') {
                i += 3;
            } else {
                i += 1;
            }
            out.push(Tok::Other);
        } else if c.is_ascii_alphabetic() || c == b'_' {
            let start = i;
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                i += 1;
            }
            out.push(Tok::Ident(src[start..i].to_string()));
        } else if c == b':' && b.get(i + 1) == Some(&b':') {
            out.push(Tok::Path);
            i += 2;
        } else {
            out.push(match c {
                b'{' => Tok::Open,
                b'}' => Tok::Close,
                b',' => Tok::Comma,
                _ => Tok::Other,
            });
            i += 1;
        }
    }
    out
}

/// Every module path a file names through `crate::`, `super::` or `self::`, resolved
/// against the module it sits in (inline `mod x { … }` blocks included).
fn named_paths(file: &File) -> Vec<Vec<String>> {
    let toks = tokens(&file.text);
    let mut out = Vec::new();
    // Inline modules open at a brace depth; `super` inside them starts from there.
    let mut inline: Vec<(String, usize)> = Vec::new();
    let mut depth = 0usize;
    let mut i = 0;
    while i < toks.len() {
        match &toks[i] {
            Tok::Open => depth += 1,
            Tok::Close => {
                depth = depth.saturating_sub(1);
                if inline.last().is_some_and(|(_, d)| *d == depth) {
                    inline.pop();
                }
            }
            Tok::Ident(kw) if kw == "mod" => {
                if let (Some(Tok::Ident(name)), Some(Tok::Open)) =
                    (toks.get(i + 1), toks.get(i + 2))
                {
                    inline.push((name.clone(), depth));
                }
            }
            Tok::Ident(head)
                if matches!(head.as_str(), "crate" | "super" | "self")
                    && toks.get(i + 1) == Some(&Tok::Path)
                    && !(i > 0 && toks[i - 1] == Tok::Path) =>
            {
                let mut here: Vec<String> = file.module.clone();
                here.extend(inline.iter().map(|(n, _)| n.clone()));
                let (prefix, next) = path_start(&toks, i, here);
                i = collect(&toks, next, prefix, &mut out);
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    out
}

/// Resolves the `crate`/`super`/`self` head of a path at `i`; returns the module it
/// starts from and the index of the first token after the head's `::`.
fn path_start(toks: &[Tok], mut i: usize, mut here: Vec<String>) -> (Vec<String>, usize) {
    let mut base = Vec::new();
    loop {
        match toks.get(i) {
            Some(Tok::Ident(h)) if h == "crate" => base.clear(),
            Some(Tok::Ident(h)) if h == "super" => {
                here.pop();
                base = here.clone();
            }
            Some(Tok::Ident(h)) if h == "self" => base = here.clone(),
            _ => return (base, i),
        }
        i += 2; // the head and its `::`
        if !matches!(toks.get(i), Some(Tok::Ident(h)) if h == "super") {
            return (base, i);
        }
    }
}

/// Reads `a::b::{c, d::e}` from `i`, pushing each full path; returns the index after it.
fn collect(
    toks: &[Tok],
    mut i: usize,
    mut prefix: Vec<String>,
    out: &mut Vec<Vec<String>>,
) -> usize {
    loop {
        match toks.get(i) {
            Some(Tok::Ident(seg)) => {
                if seg != "self" {
                    prefix.push(seg.clone());
                }
                if toks.get(i + 1) == Some(&Tok::Path) {
                    i += 2;
                    continue;
                }
                out.push(prefix);
                return i + 1;
            }
            Some(Tok::Open) => {
                i += 1;
                loop {
                    match toks.get(i) {
                        Some(Tok::Close) => return i + 1,
                        Some(Tok::Comma) => i += 1,
                        Some(Tok::Ident(_)) | Some(Tok::Open) => {
                            i = collect(toks, i, prefix.clone(), out);
                            // `x as y`
                            while let Some(Tok::Ident(_)) = toks.get(i) {
                                i += 1;
                            }
                        }
                        Some(_) => {
                            // `*`
                            out.push(prefix.clone());
                            i += 1;
                        }
                        None => return i,
                    }
                }
            }
            _ => {
                out.push(prefix);
                return i;
            }
        }
    }
}

/// The import edges between files: `from` → `to`, each with one path that makes it.
fn edges(files: &[File]) -> BTreeMap<(String, String), String> {
    let modules: BTreeSet<Vec<String>> = files.iter().map(|f| f.module.clone()).collect();
    let mut out = BTreeMap::new();
    for f in files {
        for path in named_paths(f) {
            // The file the path lands in: its longest prefix that is a file of the crate.
            let Some(to) = (0..=path.len())
                .rev()
                .map(|n| path[..n].to_vec())
                .find(|m| modules.contains(m))
            else {
                continue;
            };
            // A file may use itself and its ancestors.
            if f.module.starts_with(&to) {
                continue;
            }
            out.entry((name(&f.module), name(&to)))
                .or_insert_with(|| path.join("::"));
        }
    }
    out
}

fn name(module: &[String]) -> String {
    if module.is_empty() {
        "crate".into()
    } else {
        module.join("::")
    }
}

/// The import circles: strongly connected groups of more than one file (Tarjan).
fn circles(edges: &BTreeMap<(String, String), String>) -> Vec<Vec<String>> {
    let mut graph: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (a, b) in edges.keys() {
        graph.entry(a).or_default().push(b);
        graph.entry(b).or_default();
    }
    struct State<'a> {
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on: BTreeSet<&'a str>,
        out: Vec<Vec<String>>,
    }
    fn visit<'a>(v: &'a str, g: &BTreeMap<&'a str, Vec<&'a str>>, s: &mut State<'a>) {
        let n = s.index.len();
        s.index.insert(v, n);
        s.low.insert(v, n);
        s.stack.push(v);
        s.on.insert(v);
        for &w in &g[v] {
            if !s.index.contains_key(w) {
                visit(w, g, s);
                let lw = s.low[w];
                let lv = s.low.get_mut(v).expect("visited");
                *lv = (*lv).min(lw);
            } else if s.on.contains(w) {
                let iw = s.index[w];
                let lv = s.low.get_mut(v).expect("visited");
                *lv = (*lv).min(iw);
            }
        }
        if s.low[v] == s.index[v] {
            let mut group = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on.remove(w);
                group.push(w.to_string());
                if w == v {
                    break;
                }
            }
            if group.len() > 1 {
                group.sort();
                s.out.push(group);
            }
        }
    }
    let mut s = State {
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on: BTreeSet::new(),
        out: Vec::new(),
    };
    for v in graph.keys() {
        if !s.index.contains_key(v) {
            visit(v, &graph, &mut s);
        }
    }
    s.out.sort();
    s.out
}

/// Renders each circle with the paths that close it, for the failure message.
fn explain(groups: &[Vec<String>], edges: &BTreeMap<(String, String), String>) -> String {
    let mut s = String::new();
    for g in groups {
        s.push_str(&format!("circle: {}\n", g.join(" , ")));
        for ((a, b), path) in edges {
            if g.contains(a) && g.contains(b) {
                s.push_str(&format!("  {a} -> {b}  (crate::{path})\n"));
            }
        }
    }
    s
}

fn file(module: &str, text: &str) -> File {
    File {
        module: module
            .split("::")
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect(),
        text: text.into(),
    }
}

#[test]
fn the_crate_has_no_import_circles() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let files = read_tree(&src).expect("read src");
    assert!(files.len() > 20, "found only {} files", files.len());
    let e = edges(&files);
    // The checker sees real edges (a sanity check that it parsed the tree).
    assert!(
        e.contains_key(&("http::login".to_string(), "auth".to_string())),
        "edge http::login -> auth not found"
    );
    let c = circles(&e);
    assert!(c.is_empty(), "import circles:\n{}", explain(&c, &e));
}

#[test]
fn a_circle_between_siblings_is_found() {
    let files = vec![
        file("", "pub mod a; pub mod b;"),
        file("a", "use crate::b::thing; pub fn other() {}"),
        file("b", "pub fn thing() { crate::a::other() }"),
    ];
    let e = edges(&files);
    assert_eq!(circles(&e), vec![vec!["a".to_string(), "b".to_string()]]);
}

#[test]
fn a_circle_through_groups_super_and_a_third_file_is_found() {
    let files = vec![
        file("", "pub mod net; pub mod turn;"),
        file("turn", "pub mod core; pub mod wire;"),
        // core → wire through a group, wire → net through `super::super`, net → core.
        file(
            "turn::core",
            "use super::{wire::{self, header as h}, Other};",
        ),
        file("turn::wire", "fn f() { super::super::net::bind(); }"),
        file(
            "net",
            "// crate::turn::wire in a comment is no edge\nuse crate::turn::core::Table;",
        ),
    ];
    let e = edges(&files);
    assert_eq!(
        circles(&e),
        vec![vec![
            "net".to_string(),
            "turn::core".to_string(),
            "turn::wire".to_string()
        ]]
    );
}

#[test]
fn children_using_their_parent_and_strings_are_no_circle() {
    let files = vec![
        file("", "pub mod turn;"),
        file(
            "turn",
            "mod core; pub use self::core::Table; const S: &str = \"crate::turn::core\";",
        ),
        file(
            "turn::core",
            "use super::Limits; #[cfg(test)] mod tests { use super::Table; }",
        ),
    ];
    let e = edges(&files);
    assert!(circles(&e).is_empty(), "{e:?}");
    assert!(e.contains_key(&("turn".to_string(), "turn::core".to_string())));
    assert!(!e.contains_key(&("turn::core".to_string(), "turn".to_string())));
}
