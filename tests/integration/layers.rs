//! No import cycle in the workspace: between files, and between a crate's top-level modules
//! (a folder taken as one). Each crate's modules form layers, each using only those below it,
//! so that a reader can take a crate from the bottom up (mini-redis: `server` → `cmd` →
//! `connection` → `frame`).
//!
//! What counts as a use: any path through `crate::`, `super::` or `self::`, or through the name
//! of a child module a file declares, in any item or macro (unit tests excluded: a module's
//! tests may use anything). A path to an item a module re-exports (`pub use`) counts as a use
//! of where the item is defined, so that a crate's root re-exporting its parts is no cycle.
//! A parent module that its children use is a cycle: what children share lives in a file of
//! its own below them (`session/state.rs`, `transport/admit.rs`).

use crate::common;

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

/// The crates' source roots.
const CRATES: [&str; 6] = [
    "src",
    "api/src",
    "ws/src",
    "all-in-one/src",
    "bench/src",
    "testkit/src",
];

/// A module: its path inside the crate (empty: the root).
type Module = Vec<String>;

#[test]
fn no_module_uses_one_that_uses_it() {
    let mut found = Vec::new();
    for root in CRATES {
        let crate_ = Crate::read(&common::workspace().join(root));
        let files = crate_.file_graph();
        for cycle in cycles(&files) {
            found.push(format!("{root}: files {}", names(&cycle)));
        }
        let mut top: BTreeMap<Module, BTreeSet<Module>> = BTreeMap::new();
        for (from, tos) in &files {
            let from = first(from);
            top.entry(from.clone()).or_default();
            for to in tos {
                let to = first(to);
                if to != from {
                    top.get_mut(&from).unwrap().insert(to);
                }
            }
        }
        for cycle in cycles(&top) {
            found.push(format!("{root}: top-level modules {}", names(&cycle)));
        }
    }
    assert!(found.is_empty(), "import cycles:\n{}", found.join("\n"));
}

/// The checker itself finds what it must: a cycle through a child's `super::`, one through a
/// `use` tree, and none through a re-export at the root.
#[test]
fn the_checker_sees_cycles_and_sees_through_re_exports() {
    let dir = tempfile::tempdir().unwrap();
    let write = |path: &str, text: &str| {
        let path = dir.path().join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    };
    write("lib.rs", "mod a;\nmod b;\nmod c;\npub use c::Thing;\n");
    write(
        "a/mod.rs",
        "mod child;\npub struct A;\nfn f() { child::g(); }\n",
    );
    write("a/child.rs", "pub fn g() { let _ = super::A; }\n");
    write(
        "b.rs",
        "use crate::{Thing, a::{self}};\n// crate::c::nothing\nconst S: &str = \"crate::c\";\n",
    );
    write(
        "c.rs",
        "pub struct Thing;\n#[cfg(test)]\nmod tests { use crate::b; }\n",
    );
    let files = Crate::read(dir.path()).file_graph();
    let m = |path: &str| -> Module {
        path.split("::")
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect()
    };
    assert_eq!(files[&m("b")], [m("a"), m("c")].into_iter().collect());
    assert!(
        files[&m("c")].is_empty(),
        "tests, comments and strings are not uses"
    );
    assert_eq!(cycles(&files), vec![vec![m("a"), m("a::child")]]);
}

fn first(module: &Module) -> Module {
    module.iter().take(1).cloned().collect()
}

fn names(cycle: &[Module]) -> String {
    cycle
        .iter()
        .map(|m| {
            if m.is_empty() {
                "<root>".to_string()
            } else {
                m.join("::")
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// One crate's files, as the modules they are.
struct Crate {
    files: BTreeMap<Module, Source>,
}

struct Source {
    /// The file's tokens, without comments, literals and unit tests.
    tokens: Vec<String>,
}

impl Crate {
    fn read(root: &Path) -> Crate {
        let mut files = BTreeMap::new();
        for path in rust_files(root) {
            let rel = path.strip_prefix(root).unwrap().with_extension("");
            let mut module: Module = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            if matches!(
                module.last().map(String::as_str),
                Some("mod" | "lib" | "main")
            ) {
                module.pop();
            }
            let text = std::fs::read_to_string(&path).unwrap();
            let tokens = without_tests(tokenize(&text));
            files.insert(module, Source { tokens });
        }
        Crate { files }
    }

    /// Which files each file uses.
    fn file_graph(&self) -> BTreeMap<Module, BTreeSet<Module>> {
        let exports: BTreeMap<&Module, BTreeMap<String, Module>> = self
            .files
            .iter()
            .map(|(module, source)| (module, self.re_exports(module, source)))
            .collect();
        self.files
            .iter()
            .map(|(module, source)| {
                let uses = self
                    .paths(module, source)
                    .into_iter()
                    .filter_map(|path| self.resolve(&path, &exports, 0))
                    .filter(|target| target != module)
                    .collect();
                (module.clone(), uses)
            })
            .collect()
    }

    /// Every path the file names through `crate`, `super`, `self` or a child module, made
    /// absolute; `use` trees expanded.
    fn paths(&self, module: &Module, source: &Source) -> Vec<Module> {
        let children: BTreeSet<&str> = self
            .files
            .keys()
            .filter(|m| m.len() == module.len() + 1 && m.starts_with(module))
            .map(|m| m.last().unwrap().as_str())
            .collect();
        let tokens = &source.tokens;
        let mut paths = Vec::new();
        let mut i = 0;
        while i < tokens.len() {
            let word = tokens[i].as_str();
            let after_colons = i > 0 && tokens[i - 1] == "::";
            let follows = tokens.get(i + 1).is_some_and(|t| t == "::");
            let start = match word {
                _ if after_colons || !follows => None,
                "crate" => Some(Vec::new()),
                "super" => Some(module[..module.len().saturating_sub(1)].to_vec()),
                "self" => Some(module.clone()),
                child if children.contains(child) => Some(module.clone()),
                _ => None,
            };
            match start {
                Some(mut prefix) => {
                    if !matches!(word, "crate" | "super" | "self") {
                        prefix.push(word.to_string());
                    }
                    i = tree(tokens, i + 2, prefix, &mut paths);
                }
                // A path through another crate (`fanout::{presence::Change}`): none of its
                // names are this crate's modules.
                None if follows && !after_colons && is_ident(word) => {
                    i = tree(tokens, i + 2, Vec::new(), &mut Vec::new());
                }
                None => i += 1,
            }
        }
        paths
    }

    /// What a module re-exports: the name, and the path it stands for.
    fn re_exports(&self, module: &Module, source: &Source) -> BTreeMap<String, Module> {
        let tokens = &source.tokens;
        let mut exports = BTreeMap::new();
        for (i, token) in tokens.iter().enumerate() {
            if token != "use" || !tokens[..i].last().is_some_and(|t| t == "pub" || t == ")") {
                continue;
            }
            let mut j = i + 1;
            let mut prefix = module.clone();
            match tokens.get(j).map(String::as_str) {
                Some("crate") => {
                    prefix = Vec::new();
                    j += 2;
                }
                Some("super") => {
                    prefix.pop();
                    j += 2;
                }
                Some("self") => j += 2,
                _ => {}
            }
            let mut leaves = Vec::new();
            tree(tokens, j, prefix, &mut leaves);
            for leaf in leaves {
                if let Some(name) = leaf.last() {
                    exports.insert(name.clone(), leaf.clone());
                }
            }
        }
        exports
    }

    /// The file that defines what `path` names: the longest module prefix, followed through
    /// re-exports.
    fn resolve(
        &self,
        path: &Module,
        exports: &BTreeMap<&Module, BTreeMap<String, Module>>,
        depth: usize,
    ) -> Option<Module> {
        let n = (0..=path.len())
            .rev()
            .find(|&n| self.files.contains_key(&path[..n]))?;
        let module = path[..n].to_vec();
        if let Some(name) = path.get(n)
            && let Some(target) = exports.get(&module).and_then(|e| e.get(name))
            && target != path
            && depth < 8
        {
            let mut followed = target.clone();
            followed.extend(path[n + 1..].iter().cloned());
            return self.resolve(&followed, exports, depth + 1);
        }
        Some(module)
    }
}

/// Reads a path (or `use` tree) from `tokens[i]` on, after `prefix`; pushes every leaf path.
/// Returns the index after it.
fn tree(tokens: &[String], mut i: usize, mut prefix: Module, out: &mut Vec<Module>) -> usize {
    loop {
        match tokens.get(i).map(String::as_str) {
            Some("{") => {
                i += 1;
                loop {
                    match tokens.get(i).map(String::as_str) {
                        Some("}") => return i + 1,
                        Some(",") => i += 1,
                        Some("self") => {
                            out.push(prefix.clone());
                            i += 1;
                        }
                        Some(_) => i = tree(tokens, i, prefix.clone(), out),
                        None => return i,
                    }
                }
            }
            Some(word) if is_ident(word) => {
                prefix.push(word.to_string());
                if tokens.get(i + 1).is_some_and(|t| t == "::") {
                    i += 2;
                    continue;
                }
                out.push(prefix);
                return i + 1;
            }
            _ => {
                out.push(prefix);
                return i;
            }
        }
    }
}

fn is_ident(word: &str) -> bool {
    word.chars()
        .next()
        .is_some_and(|c| c.is_alphabetic() || c == '_')
        && word.chars().all(|c| c.is_alphanumeric() || c == '_')
}

/// Identifiers, `::` and single punctuation; comments, strings and characters left out.
fn tokenize(text: &str) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    let mut tokens = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        if c == '/' && next == Some('/') {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            let mut depth = 0;
            while i < chars.len() {
                if chars[i] == '/' && chars.get(i + 1) == Some(&'*') {
                    depth += 1;
                    i += 2;
                } else if chars[i] == '*' && chars.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
        } else if c == 'r' && matches!(next, Some('#' | '"')) && raw_string_at(&chars, i) {
            let mut hashes = 0;
            i += 1;
            while chars[i] == '#' {
                hashes += 1;
                i += 1;
            }
            i += 1; // the opening quote
            while i < chars.len() {
                if chars[i] == '"' && (1..=hashes).all(|h| chars.get(i + h) == Some(&'#')) {
                    i += 1 + hashes;
                    break;
                }
                i += 1;
            }
        } else if c == '"' {
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                i += if chars[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
        } else if c == '\'' {
            // A character literal ('x', '\n', '\''), or a lifetime ('a).
            if next == Some('\\') {
                i += 2;
                while i < chars.len() && chars[i] != '\'' {
                    i += 1;
                }
                i += 1;
            } else if chars.get(i + 2) == Some(&'\'') {
                i += 3;
            } else {
                i += 1;
            }
        } else if c.is_alphabetic() || c == '_' {
            let start = i;
            while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
            tokens.push(chars[start..i].iter().collect());
        } else if c == ':' && next == Some(':') {
            tokens.push("::".into());
            i += 2;
        } else if c.is_whitespace() {
            i += 1;
        } else {
            tokens.push(c.to_string());
            i += 1;
        }
    }
    tokens
}

/// Whether `chars[i..]` starts a raw string (`r"`, `r#"`, ...), not an identifier's `r`.
fn raw_string_at(chars: &[char], i: usize) -> bool {
    if i > 0 && (chars[i - 1].is_alphanumeric() || chars[i - 1] == '_') {
        return false;
    }
    let mut j = i + 1;
    while chars.get(j) == Some(&'#') {
        j += 1;
    }
    chars.get(j) == Some(&'"')
}

/// The tokens without `#[cfg(test)]` items (a module's unit tests).
fn without_tests(tokens: Vec<String>) -> Vec<String> {
    let mut out = Vec::with_capacity(tokens.len());
    let mut i = 0;
    while i < tokens.len() {
        let is_cfg_test = tokens[i] == "#"
            && tokens.get(i + 1).is_some_and(|t| t == "[")
            && tokens.get(i + 2).is_some_and(|t| t == "cfg")
            && tokens.get(i + 3).is_some_and(|t| t == "(")
            && tokens.get(i + 4).is_some_and(|t| t == "test")
            && tokens.get(i + 5).is_some_and(|t| t == ")")
            && tokens.get(i + 6).is_some_and(|t| t == "]");
        if !is_cfg_test {
            out.push(tokens[i].clone());
            i += 1;
            continue;
        }
        // Skip the attribute and the item it guards: to its `;`, or its balanced braces.
        i += 7;
        let mut depth = 0;
        while i < tokens.len() {
            match tokens[i].as_str() {
                "{" => depth += 1,
                "}" => {
                    depth -= 1;
                    if depth == 0 {
                        i += 1;
                        break;
                    }
                }
                ";" if depth == 0 => {
                    i += 1;
                    break;
                }
                _ => {}
            }
            i += 1;
        }
    }
    out
}

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            files.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
    files
}

/// The strongly connected components of more than one module (Tarjan), each sorted.
fn cycles(graph: &BTreeMap<Module, BTreeSet<Module>>) -> Vec<Vec<Module>> {
    struct State<'a> {
        graph: &'a BTreeMap<Module, BTreeSet<Module>>,
        index: BTreeMap<&'a Module, usize>,
        low: BTreeMap<&'a Module, usize>,
        stack: Vec<&'a Module>,
        on_stack: BTreeSet<&'a Module>,
        found: Vec<Vec<Module>>,
    }
    fn visit<'a>(s: &mut State<'a>, v: &'a Module) {
        let n = s.index.len();
        s.index.insert(v, n);
        s.low.insert(v, n);
        s.stack.push(v);
        s.on_stack.insert(v);
        for w in s.graph.get(v).into_iter().flatten() {
            let Some((w, _)) = s.graph.get_key_value(w) else {
                continue;
            };
            if !s.index.contains_key(w) {
                visit(s, w);
                let low = s.low[v].min(s.low[w]);
                s.low.insert(v, low);
            } else if s.on_stack.contains(w) {
                let low = s.low[v].min(s.index[w]);
                s.low.insert(v, low);
            }
        }
        if s.low[v] == s.index[v] {
            let mut component = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on_stack.remove(w);
                component.push(w.clone());
                if w == v {
                    break;
                }
            }
            if component.len() > 1 {
                component.sort();
                s.found.push(component);
            }
        }
    }
    let mut state = State {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        found: Vec::new(),
    };
    for v in graph.keys() {
        if !state.index.contains_key(v) {
            visit(&mut state, v);
        }
    }
    state.found
}
