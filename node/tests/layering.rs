//! The layering of `maos-node` and `maos-raft-store`, checked from the sources: a module that
//! imports a layer above it, an import cycle between sibling files, a server module that reaches
//! the CLI or the test harnesses, or an oversized file fails here rather than in a review.
//!
//! `LAYERS` is the declared architecture (ARCHITECTURE.md, "Code map" explains each entry): every
//! top-level module of the server library, and the modules it may import. A new module must be
//! placed in it, and the table itself must stay acyclic.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Each top-level module of the server library (`node/src/lib.rs`) and what it may import, in
/// layer order: a module only imports modules listed before it.
const LAYERS: &[(&str, &[&str])] = &[
    ("transport", &[]),
    ("proto", &[]),
    ("config", &[]),
    ("telemetry", &[]),
    ("raft", &["transport", "proto", "config", "telemetry"]),
    ("storage", &["config", "raft", "telemetry"]),
    ("agents", &["config", "raft", "storage", "telemetry"]),
    ("scheduling", &["config", "raft", "telemetry"]),
    ("api", &["transport", "config", "raft", "storage", "agents", "telemetry"]),
    ("dashboard", &["transport", "config", "telemetry", "raft", "storage", "agents", "api"]),
    (
        "server",
        &["transport", "proto", "config", "telemetry", "raft", "storage", "agents", "scheduling", "api", "dashboard"],
    ),
];

/// What the `maos` binary (`main.rs`, `cli/`) may use of the server library: its declared
/// boundary for a command line. It never reaches the API, Raft or agent internals.
const CLI_MAY_USE: &[&str] = &["config", "server", "storage", "telemetry"];

/// Lines per source file, at most, unless `LONG_FILES` names the file and why.
const FILE_LINES_MAX: usize = 650;
/// Files allowed past `FILE_LINES_MAX`, with the reason (also in ARCHITECTURE.md).
const LONG_FILES: &[(&str, &str)] = &[];

/// The workspace checked: this one, or another checkout named by `MAOS_LAYERING_ROOT` (to see
/// what the check says of an older tree).
fn workspace() -> PathBuf {
    match std::env::var_os("MAOS_LAYERING_ROOT") {
        Some(root) => PathBuf::from(root),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("node/ is inside the workspace").to_path_buf(),
    }
}

/// Every `.rs` file under `dir`, sorted.
fn sources(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("read {}: {e}", dir.display())) {
            let path = entry.expect("a directory entry").path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

/// The source without comments (`//` to the end of the line, doc comments included): a path in
/// a doc link is not an import.
fn code_of(text: &str) -> String {
    text.lines().map(|line| line.split_once("//").map_or(line, |(code, _)| code)).collect::<Vec<_>>().join("\n")
}

/// The first path segment after each `prefix` (`crate::`, `super::`, `maos_node::`), including
/// every member of a `prefix{a, b::c}` group.
fn references(code: &str, prefix: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let ident = |s: &str| s.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect::<String>();
    for (at, _) in code.match_indices(prefix) {
        let before = code[..at].chars().next_back();
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
            continue; // `my_crate::`, `a::crate::` are other paths
        }
        let rest = &code[at + prefix.len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 0usize;
            let mut member_start = true;
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => member_start = true,
                    c if c.is_whitespace() => {}
                    _ if member_start => {
                        let name = ident(&group[i..]);
                        if !name.is_empty() {
                            found.insert(name);
                        }
                        member_start = false;
                    }
                    _ => {}
                }
            }
        } else {
            let name = ident(rest);
            if !name.is_empty() {
                found.insert(name);
            }
        }
    }
    found
}

/// The cycles of a directed graph (its strongly connected components of more than one node, or
/// a node with an edge to itself), each as a sorted list.
fn cycles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    // Small graphs: two nodes share a cycle when each reaches the other.
    let reach = |from: &str| -> BTreeSet<String> {
        let mut seen = BTreeSet::new();
        let mut stack: Vec<String> = graph.get(from).into_iter().flatten().cloned().collect();
        while let Some(node) = stack.pop() {
            if seen.insert(node.clone()) {
                stack.extend(graph.get(&node).into_iter().flatten().cloned());
            }
        }
        seen
    };
    let reachable: BTreeMap<&String, BTreeSet<String>> = graph.keys().map(|k| (k, reach(k))).collect();
    let mut out: BTreeSet<Vec<String>> = BTreeSet::new();
    for (node, reached) in &reachable {
        if !reached.contains(*node) {
            continue;
        }
        let component: Vec<String> =
            reached.iter().filter(|other| reachable.get(other).is_some_and(|r| r.contains(*node))).cloned().collect();
        out.insert(component);
    }
    out.into_iter().collect()
}

/// The top-level module a file of a crate's `src/` belongs to (`raft` for `raft/core.rs`).
fn top_module(src: &Path, file: &Path) -> String {
    let relative = file.strip_prefix(src).expect("under src");
    let first = relative.components().next().expect("a path").as_os_str().to_string_lossy().to_string();
    first.trim_end_matches(".rs").to_string()
}

/// For every directory below `src`, the import graph between its sibling files (edges through
/// `super::x` and `crate::<dir path>::x`), with cycles reported as `dir: a <-> b`.
fn sibling_cycles(crate_name: &str, src: &Path) -> Vec<String> {
    let mut by_dir: BTreeMap<PathBuf, Vec<PathBuf>> = BTreeMap::new();
    for file in sources(src) {
        by_dir.entry(file.parent().expect("a parent").to_path_buf()).or_default().push(file);
    }
    let mut problems = Vec::new();
    for (dir, files) in by_dir {
        let module_of = |file: &Path| -> Option<String> {
            let stem = file.file_stem()?.to_string_lossy().to_string();
            (!["mod", "lib", "main"].contains(&stem.as_str())).then_some(stem)
        };
        let siblings: BTreeSet<String> = files.iter().filter_map(|f| module_of(f)).collect();
        // The path of this directory as a module path, for `crate::dir::sibling` references.
        let dir_path: Vec<String> = dir
            .strip_prefix(src)
            .expect("under src")
            .components()
            .map(|c| c.as_os_str().to_string_lossy().to_string())
            .collect();
        if dir_path.is_empty() {
            continue; // the top level: see `top_level_cycles`
        }
        let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for file in &files {
            let Some(me) = module_of(file) else { continue };
            let code = code_of(&std::fs::read_to_string(file).expect("readable"));
            let prefix = format!("crate::{}::", dir_path.join("::"));
            let mut targets: BTreeSet<String> =
                references(&code, &prefix).into_iter().chain(references(&code, "super::")).collect();
            targets.retain(|t| siblings.contains(t) && *t != me);
            graph.insert(me, targets);
        }
        for cycle in cycles(&graph) {
            problems.push(format!("{crate_name} {}: {}", dir.display(), cycle.join(" <-> ")));
        }
    }
    problems
}

#[test]
fn each_server_module_imports_only_the_layers_below_it() {
    let src = workspace().join("node/src");
    let allowed: BTreeMap<&str, BTreeSet<&str>> =
        LAYERS.iter().map(|(module, may)| (*module, may.iter().copied().collect())).collect();
    let mut problems = Vec::new();
    let mut seen_modules = BTreeSet::new();
    for file in sources(&src) {
        let module = top_module(&src, &file);
        if module == "main" || module == "cli" || module == "lib" {
            continue; // the binary, checked below; the crate root declares the modules
        }
        seen_modules.insert(module.clone());
        let Some(may) = allowed.get(module.as_str()) else {
            problems.push(format!("{}: module `{module}` is not in LAYERS; place it in a layer", file.display()));
            continue;
        };
        let code = code_of(&std::fs::read_to_string(&file).expect("readable"));
        for target in references(&code, "crate::") {
            let is_module = allowed.contains_key(target.as_str());
            if is_module && target != module && !may.contains(target.as_str()) {
                problems.push(format!("{}: `{module}` imports `{target}`, which is not below it", file.display()));
            }
        }
        if code.contains("maos_testkit") {
            problems.push(format!("{}: the server library uses the test harnesses (maos_testkit)", file.display()));
        }
    }
    // Every layer in the table exists (a stale entry would hide a renamed module).
    for (module, _) in LAYERS {
        if *module != "proto" && !seen_modules.contains(*module) {
            problems.push(format!("LAYERS names `{module}`, which node/src does not have"));
        }
    }
    // The table itself is acyclic.
    let table: BTreeMap<String, BTreeSet<String>> =
        LAYERS.iter().map(|(m, may)| (m.to_string(), may.iter().map(|s| s.to_string()).collect())).collect();
    for cycle in cycles(&table) {
        problems.push(format!("LAYERS has a cycle: {}", cycle.join(" <-> ")));
    }
    assert!(problems.is_empty(), "layering broken:\n  {}", problems.join("\n  "));
}

#[test]
fn the_command_line_uses_only_the_server_librarys_declared_boundary() {
    let src = workspace().join("node/src");
    let mut problems = Vec::new();
    let mut files = sources(&src.join("cli"));
    files.push(src.join("main.rs"));
    for file in files {
        let code = code_of(&std::fs::read_to_string(&file).expect("readable"));
        for target in references(&code, "maos_node::") {
            if !CLI_MAY_USE.contains(&target.as_str()) {
                problems.push(format!("{}: the CLI reaches `maos_node::{target}`", file.display()));
            }
        }
    }
    // And the server never reaches the CLI: it lives in the binary, so `crate::cli` from a
    // library file cannot even name it; a `cli` module in the library would be caught above.
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_storage_layer_knows_neither_tonic_nor_the_write_path() {
    let src = workspace().join("node/src/storage");
    let mut problems = Vec::new();
    for file in sources(&src) {
        let code = code_of(&std::fs::read_to_string(&file).expect("readable"));
        if code.contains("tonic::") {
            problems.push(format!("{}: builds tonic values; map StorageError in api/status.rs", file.display()));
        }
        if file.ends_with("storage/mod.rs") && code.contains("NodeCore") {
            problems.push(format!("{}: the storage facade takes the node's write path", file.display()));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// The cycles among a crate's top-level modules (its files and directories under `src/`), as
/// `crate: a <-> b`.
fn top_level_cycles(crate_name: &str, src: &Path) -> Vec<String> {
    let files = sources(src);
    let modules: BTreeSet<String> =
        files.iter().map(|f| top_module(src, f)).filter(|m| m != "lib" && m != "main").collect();
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in &files {
        let module = top_module(src, file);
        if !modules.contains(&module) {
            continue;
        }
        let code = code_of(&std::fs::read_to_string(file).expect("readable"));
        let targets: Vec<String> =
            references(&code, "crate::").into_iter().filter(|t| modules.contains(t) && *t != module).collect();
        graph.entry(module).or_default().extend(targets);
    }
    cycles(&graph).into_iter().map(|cycle| format!("{crate_name}: {}", cycle.join(" <-> "))).collect()
}

#[test]
fn no_import_cycle_between_modules_of_node_or_raft_store() {
    let root = workspace();
    let mut problems = Vec::new();
    for (crate_name, dir) in [("maos-node", "node/src"), ("maos-raft-store", "raft-store/src")] {
        problems.extend(top_level_cycles(crate_name, &root.join(dir)));
        problems.extend(sibling_cycles(crate_name, &root.join(dir)));
    }
    assert!(problems.is_empty(), "import cycles:\n  {}", problems.join("\n  "));
}

#[test]
fn no_source_file_is_over_the_line_limit_without_a_reason() {
    let root = workspace();
    let mut problems = Vec::new();
    for dir in ["node/src", "raft-store/src"] {
        for file in sources(&root.join(dir)) {
            let lines = std::fs::read_to_string(&file).expect("readable").lines().count();
            let relative = file.strip_prefix(&root).expect("under the workspace").to_string_lossy().to_string();
            if lines > FILE_LINES_MAX && !LONG_FILES.iter().any(|(name, _)| *name == relative) {
                problems.push(format!(
                    "{relative}: {lines} lines (split it by concern, or say why in LONG_FILES and ARCHITECTURE.md)"
                ));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_reference_finder_sees_plain_paths_and_groups_but_not_comments() {
    let code =
        code_of("use crate::{raft::core::NodeCore, config};\nlet x = crate::storage::Storage::new();\n// crate::api\n");
    let found = references(&code, "crate::");
    assert_eq!(found, ["config", "raft", "storage"].iter().map(|s| s.to_string()).collect());
    let graph = BTreeMap::from([
        ("a".to_string(), BTreeSet::from(["b".to_string()])),
        ("b".to_string(), BTreeSet::from(["a".to_string()])),
        ("c".to_string(), BTreeSet::from(["a".to_string()])),
    ]);
    assert_eq!(cycles(&graph), vec![vec!["a".to_string(), "b".to_string()]]);
}
