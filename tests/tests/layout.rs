//! The code's layout holds: no file of a crate imports a file that (directly or through others)
//! imports it back. A file's imports are the `crate::…` and `super::…` paths it names outside its
//! `#[cfg(test)] mod tests`; each resolves to the file that defines the longest module prefix of
//! the path (`crate::outbound::retry::decide` → `outbound/retry.rs`). A `mod` declaration is not an
//! import: a parent composes its children, and children must not reach back into it.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

/// Every crate of the workspace with a `src/`.
const CRATES: [&str; 8] = [
    "proto",
    "control-plane",
    "meshctl",
    "sidecar",
    "market-service",
    "crates/runtime",
    "crates/testkit",
    "bench",
];

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// The `.rs` files under `dir`, relative to it (test-only `tests.rs` children left out).
fn sources(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let p = entry.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|e| e == "rs")
                && p.file_name().is_some_and(|n| n != "tests.rs")
            {
                out.push(p.strip_prefix(dir).unwrap().to_path_buf());
            }
        }
    }
    out.sort();
    out
}

/// The module path of a file (`outbound/mod.rs` → `[outbound]`, `lib.rs` → `[]`).
fn module_of(file: &Path) -> Vec<String> {
    let mut parts: Vec<String> = file.iter().map(|s| s.to_string_lossy().into_owned()).collect();
    let last = parts.pop().unwrap_or_default();
    let stem = last.trim_end_matches(".rs");
    let root = parts.is_empty() && matches!(stem, "lib" | "main");
    if stem != "mod" && !root {
        parts.push(stem.to_string());
    }
    parts
}

/// The file defining the longest prefix of `path` that is a module of the crate.
fn resolve(files: &BTreeSet<PathBuf>, root: &Path, path: &[String]) -> PathBuf {
    for n in (1..=path.len()).rev() {
        let base: PathBuf = path[..n].iter().collect();
        for candidate in [base.with_extension("rs"), base.join("mod.rs")] {
            if files.contains(&candidate) {
                return candidate;
            }
        }
    }
    root.to_path_buf()
}

/// `use` trees flattened: `a::{b, c::{d, e}}` → `a::b`, `a::c::d`, `a::c::e`.
fn flatten(tree: &str) -> Vec<String> {
    let tree = tree.trim();
    let Some(open) = tree.find('{') else {
        let path = tree.split(" as ").next().unwrap_or("").trim();
        return if path.is_empty() || path == "self" { Vec::new() } else { vec![path.to_string()] };
    };
    let prefix = tree[..open].trim_end_matches("::");
    let inner = &tree[open + 1..tree.rfind('}').unwrap_or(tree.len())];
    let (mut parts, mut depth, mut cur) = (Vec::new(), 0, String::new());
    for c in inner.chars() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(std::mem::take(&mut cur));
                continue;
            }
            _ => {}
        }
        cur.push(c);
    }
    parts.push(cur);
    parts
        .iter()
        .filter(|p| !p.trim().is_empty())
        .flat_map(|p| flatten(p))
        .map(|p| if prefix.is_empty() { p } else { format!("{prefix}::{p}") })
        .collect()
}

/// The paths after `crate::` (or, made absolute, after `super::`) that `text` names.
fn imports(text: &str, module: &[String]) -> Vec<Vec<String>> {
    let code: String =
        text.lines().map(|l| l.split("//").next().unwrap_or("")).collect::<Vec<_>>().join("\n");
    let mut paths = Vec::new();
    let mut rest = code.as_str();
    // `use crate::…;` statements, trees included.
    while let Some(i) = rest.find("use crate::") {
        let after = &rest[i + "use crate::".len()..];
        let end = after.find(';').unwrap_or(after.len());
        paths.extend(flatten(&after[..end]));
        rest = &after[end..];
    }
    // Paths in code: `crate::a::b::Item` (a `use` statement's tree is read above).
    for (prefix, base) in
        [("crate::", Vec::new()), ("super::", module[..module.len().saturating_sub(1)].to_vec())]
    {
        let mut rest = code.as_str();
        while let Some(i) = rest.find(prefix) {
            let before = rest[..i].chars().next_back();
            let after = &rest[i + prefix.len()..];
            let len =
                after.find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':')).unwrap_or(after.len());
            let path = after[..len].trim_end_matches(':');
            let tree = after[len..].starts_with('{');
            if !tree
                && !before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':')
                && !path.is_empty()
            {
                let mut full = base.clone();
                full.extend(path.split("::").map(str::to_string));
                paths.push(full.join("::"));
            }
            rest = &after[len..];
        }
    }
    paths.into_iter().map(|p| p.split("::").map(str::to_string).collect()).collect()
}

/// The file-level import graph of the crate at `src`.
fn graph(src: &Path) -> BTreeMap<PathBuf, BTreeSet<PathBuf>> {
    let files: BTreeSet<PathBuf> = sources(src).into_iter().collect();
    let root =
        if files.contains(Path::new("lib.rs")) { PathBuf::from("lib.rs") } else { PathBuf::from("main.rs") };
    let mut g = BTreeMap::new();
    for file in &files {
        let text = std::fs::read_to_string(src.join(file)).unwrap();
        let text = match text.find("#[cfg(test)]\nmod tests") {
            Some(i) => &text[..i],
            None => &text,
        };
        let module = module_of(file);
        let edges: BTreeSet<PathBuf> =
            imports(text, &module).iter().map(|p| resolve(&files, &root, p)).filter(|t| t != file).collect();
        g.insert(file.clone(), edges);
    }
    g
}

/// Import cycles (strongly connected components of more than one file), Tarjan's algorithm.
fn cycles(g: &BTreeMap<PathBuf, BTreeSet<PathBuf>>) -> Vec<Vec<PathBuf>> {
    struct T<'a> {
        g: &'a BTreeMap<PathBuf, BTreeSet<PathBuf>>,
        index: BTreeMap<&'a PathBuf, usize>,
        low: BTreeMap<&'a PathBuf, usize>,
        stack: Vec<&'a PathBuf>,
        on: BTreeSet<&'a PathBuf>,
        out: Vec<Vec<PathBuf>>,
    }
    fn visit<'a>(t: &mut T<'a>, v: &'a PathBuf) {
        let n = t.index.len();
        t.index.insert(v, n);
        t.low.insert(v, n);
        t.stack.push(v);
        t.on.insert(v);
        for w in t.g.get(v).into_iter().flatten() {
            let Some((w, _)) = t.g.get_key_value(w) else { continue };
            if !t.index.contains_key(w) {
                visit(t, w);
                let lw = t.low[w];
                t.low.insert(v, t.low[v].min(lw));
            } else if t.on.contains(w) {
                let iw = t.index[w];
                t.low.insert(v, t.low[v].min(iw));
            }
        }
        if t.low[v] == t.index[v] {
            let mut comp = Vec::new();
            while let Some(w) = t.stack.pop() {
                t.on.remove(w);
                comp.push(w.clone());
                if w == v {
                    break;
                }
            }
            if comp.len() > 1 {
                comp.sort();
                t.out.push(comp);
            }
        }
    }
    let mut t = T {
        g,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on: BTreeSet::new(),
        out: Vec::new(),
    };
    for v in g.keys() {
        if !t.index.contains_key(v) {
            visit(&mut t, v);
        }
    }
    t.out
}

#[test]
fn no_file_imports_a_file_that_imports_it() {
    let mut found = Vec::new();
    for krate in CRATES {
        let src = workspace().join(krate).join("src");
        for c in cycles(&graph(&src)) {
            found.push(format!(
                "{krate}: {}",
                c.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(" ⇄ ")
            ));
        }
    }
    assert!(found.is_empty(), "import circles between files:\n{}", found.join("\n"));
}

/// Negative control: the checker sees a circle through `use` trees, inline paths and `super::`.
#[test]
fn the_checker_finds_a_circle() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path();
    std::fs::create_dir_all(src.join("a")).unwrap();
    std::fs::write(src.join("lib.rs"), "mod a;\nmod b;\n").unwrap();
    std::fs::write(src.join("a/mod.rs"), "pub mod c;\nuse crate::{b::{B, self}};\n").unwrap();
    std::fs::write(src.join("a/c.rs"), "fn f() { super::f(); }\n").unwrap();
    std::fs::write(src.join("b.rs"), "pub struct B;\nfn g() { crate::a::c::f(); }\n").unwrap();
    let g = graph(src);
    assert_eq!(
        cycles(&g),
        vec![vec![PathBuf::from("a/c.rs"), PathBuf::from("a/mod.rs"), PathBuf::from("b.rs")]],
        "{g:?}"
    );
    // Without the child's reach back into its parent there is no circle.
    std::fs::write(src.join("a/c.rs"), "fn f() {}\n").unwrap();
    assert!(cycles(&graph(src)).is_empty());
}
