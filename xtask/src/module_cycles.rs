//! Finds import cycles between the modules of one crate.
//!
//! A cycle (`proxy::http` uses `proxy::outbound`, which uses `proxy::http`) means neither module
//! can be read, tested or moved without the other; a newcomer has to hold both in their head.
//! This reads the crate's sources with `syn`, as rustc would find them (`mod x;` → `x.rs` or
//! `x/mod.rs`; `#[cfg(test)]` items left out), collects every `crate::`/`super::`/`self::` path,
//! and lifts each reference to the two sibling modules it connects: a reference from
//! `proxy::http::pool` to `proxy::outbound::connect` is an edge `proxy::http → proxy::outbound`,
//! one from `xds::route` to `proxy::peek` an edge `xds → proxy`. References to a module's own
//! ancestors or descendants are the tree itself, not edges. Any strongly connected set of
//! siblings is a cycle.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    path::{Path, PathBuf},
};

use anyhow::Context;
use syn::visit::Visit;

type ModPath = Vec<String>;

/// One module and the paths its own items (not its submodules') mention.
struct Module {
    path: ModPath,
    file: PathBuf,
    references: Vec<Reference>,
}

struct Reference {
    segments: Vec<String>,
    line: usize,
}

/// Why `from` depends on `to`: the first reference found, for the report.
struct Evidence {
    file: PathBuf,
    line: usize,
    written: String,
}

/// A set of sibling modules that all reach each other, with one reference per edge.
pub(crate) struct Cycle {
    edges: Vec<(String, String, Evidence)>,
}

impl fmt::Display for Cycle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let members: BTreeSet<&str> =
            self.edges.iter().flat_map(|(a, b, _)| [a.as_str(), b.as_str()]).collect();
        writeln!(f, "import cycle between {}:", members.into_iter().collect::<Vec<_>>().join(", "))?;
        for (from, to, why) in &self.edges {
            writeln!(f, "    {from} → {to}   ({}:{} uses {})", why.file.display(), why.line, why.written)?;
        }
        Ok(())
    }
}

/// The cycles in the crate whose root file (`src/lib.rs`, `src/main.rs`) is `root`.
pub(crate) fn find(root: &Path) -> anyhow::Result<Vec<Cycle>> {
    let mut modules = Vec::new();
    let dir = root.parent().context("crate root has no directory")?;
    load(Vec::new(), root, dir, parse(root)?.items, &mut modules)?;
    let known: BTreeSet<ModPath> = modules.iter().map(|m| m.path.clone()).collect();

    let mut edges: BTreeMap<(ModPath, ModPath), Evidence> = BTreeMap::new();
    for module in &modules {
        for reference in &module.references {
            let Some(target) = resolve(&module.path, &reference.segments, &known) else { continue };
            let Some(edge) = sibling_edge(&module.path, &target) else { continue };
            edges.entry(edge).or_insert_with(|| Evidence {
                file: module.file.clone(),
                line: reference.line,
                written: reference.segments.join("::"),
            });
        }
    }
    Ok(strongly_connected(&edges)
        .into_iter()
        .map(|members| Cycle {
            edges: edges
                .iter()
                .filter(|((a, b), _)| members.contains(a) && members.contains(b))
                .map(|((a, b), why)| {
                    (
                        display(a),
                        display(b),
                        Evidence { file: why.file.clone(), line: why.line, written: why.written.clone() },
                    )
                })
                .collect(),
        })
        .collect())
}

fn display(path: &ModPath) -> String {
    if path.is_empty() { "crate".into() } else { path.join("::") }
}

fn parse(file: &Path) -> anyhow::Result<syn::File> {
    let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    syn::parse_file(&text).with_context(|| format!("parsing {}", file.display()))
}

/// `#[cfg(test)]` (or `cfg(all(test, ...))`): code the crate does not build into itself.
fn is_test_only(attrs: &[syn::Attribute]) -> bool {
    attrs.iter().any(|attr| match &attr.meta {
        syn::Meta::List(list) if list.path.is_ident("cfg") => {
            let tokens = list.tokens.to_string();
            let words: Vec<&str> = tokens.split(|c: char| !c.is_alphanumeric() && c != '_').collect();
            words.contains(&"test") && !words.contains(&"not")
        }
        _ => false,
    })
}

/// Walks `items` of the module at `path`: submodules recurse (files found as rustc finds them),
/// everything else is scanned for references.
fn load(
    path: ModPath,
    file: &Path,
    child_dir: &Path,
    items: Vec<syn::Item>,
    out: &mut Vec<Module>,
) -> anyhow::Result<()> {
    let mut collector = Collector::default();
    for item in items {
        match item {
            syn::Item::Mod(m) if is_test_only(&m.attrs) => {}
            syn::Item::Mod(m) => {
                let name = m.ident.to_string();
                let mut child = path.clone();
                child.push(name.clone());
                match m.content {
                    Some((_, inline)) => load(child, file, &child_dir.join(&name), inline, out)?,
                    None => {
                        let flat = child_dir.join(format!("{name}.rs"));
                        let (child_file, grandchild_dir) = if flat.exists() {
                            (flat, child_dir.join(&name))
                        } else {
                            let nested = child_dir.join(&name).join("mod.rs");
                            (nested, child_dir.join(&name))
                        };
                        let parsed = parse(&child_file)?;
                        load(child, &child_file, &grandchild_dir, parsed.items, out)?;
                    }
                }
            }
            other if item_is_test_only(&other) => {}
            other => collector.visit_item(&other),
        }
    }
    out.push(Module { path, file: file.to_path_buf(), references: collector.references });
    Ok(())
}

fn item_is_test_only(item: &syn::Item) -> bool {
    let attrs = match item {
        syn::Item::Fn(i) => &i.attrs,
        syn::Item::Use(i) => &i.attrs,
        syn::Item::Impl(i) => &i.attrs,
        syn::Item::Struct(i) => &i.attrs,
        syn::Item::Enum(i) => &i.attrs,
        syn::Item::Const(i) => &i.attrs,
        syn::Item::Static(i) => &i.attrs,
        syn::Item::Trait(i) => &i.attrs,
        syn::Item::Type(i) => &i.attrs,
        _ => return false,
    };
    is_test_only(attrs)
}

/// Every path in the items it visits: `use` trees flattened, expression and type paths.
#[derive(Default)]
struct Collector {
    references: Vec<Reference>,
}

impl<'ast> Visit<'ast> for Collector {
    fn visit_item_use(&mut self, item: &'ast syn::ItemUse) {
        flatten_use(&item.tree, &mut Vec::new(), &mut self.references);
    }

    fn visit_path(&mut self, path: &'ast syn::Path) {
        let segments: Vec<String> = path.segments.iter().map(|s| s.ident.to_string()).collect();
        let line = path.segments.first().map(|s| s.ident.span().start().line).unwrap_or(0);
        self.references.push(Reference { segments, line });
        syn::visit::visit_path(self, path);
    }

    // Nested `mod` blocks inside functions are rare; their paths still count for the function's
    // module, which is what they can reach.
    fn visit_item_mod(&mut self, item: &'ast syn::ItemMod) {
        if !is_test_only(&item.attrs) {
            syn::visit::visit_item_mod(self, item);
        }
    }
}

fn flatten_use(tree: &syn::UseTree, prefix: &mut Vec<String>, out: &mut Vec<Reference>) {
    match tree {
        syn::UseTree::Path(p) => {
            prefix.push(p.ident.to_string());
            flatten_use(&p.tree, prefix, out);
            prefix.pop();
        }
        syn::UseTree::Name(n) => push_use(prefix, Some(&n.ident), out),
        syn::UseTree::Rename(r) => push_use(prefix, Some(&r.ident), out),
        syn::UseTree::Glob(_) => push_use(prefix, None, out),
        syn::UseTree::Group(g) => g.items.iter().for_each(|t| flatten_use(t, prefix, out)),
    }
}

fn push_use(prefix: &[String], last: Option<&syn::Ident>, out: &mut Vec<Reference>) {
    let mut segments = prefix.to_vec();
    let line = match last {
        Some(ident) => {
            segments.push(ident.to_string());
            ident.span().start().line
        }
        None => 0,
    };
    // `use super::{self, x}` names the prefix itself.
    if segments.last().is_some_and(|s| s == "self") {
        segments.pop();
    }
    out.push(Reference { segments, line });
}

/// The module a path written in `from` points into, if it is one of this crate's.
fn resolve(from: &ModPath, segments: &[String], known: &BTreeSet<ModPath>) -> Option<ModPath> {
    let (mut absolute, rest) = match segments.first().map(String::as_str) {
        Some("crate") => (Vec::new(), &segments[1..]),
        Some("self") => (from.clone(), &segments[1..]),
        Some("super") => {
            let ups = segments.iter().take_while(|s| *s == "super").count();
            (from[..from.len().checked_sub(ups)?].to_vec(), &segments[ups..])
        }
        // A bare path is a child module, a local item or another crate: never a sibling.
        _ => return None,
    };
    let mut deepest = absolute.clone();
    for segment in rest {
        absolute.push(segment.clone());
        if known.contains(&absolute) {
            deepest = absolute.clone();
        } else {
            break;
        }
    }
    Some(deepest)
}

/// Lifts a reference `from → to` to the siblings under their closest common ancestor; `None`
/// when one contains the other.
fn sibling_edge(from: &ModPath, to: &ModPath) -> Option<(ModPath, ModPath)> {
    let common = from.iter().zip(to).take_while(|(a, b)| a == b).count();
    if common == from.len() || common == to.len() {
        return None;
    }
    Some((from[..=common].to_vec(), to[..=common].to_vec()))
}

/// Tarjan's algorithm; only components with more than one module are cycles (a module cannot
/// have an edge to itself here).
fn strongly_connected(edges: &BTreeMap<(ModPath, ModPath), Evidence>) -> Vec<BTreeSet<ModPath>> {
    let mut graph: BTreeMap<&ModPath, Vec<&ModPath>> = BTreeMap::new();
    for (a, b) in edges.keys() {
        graph.entry(a).or_default().push(b);
        graph.entry(b).or_default();
    }
    let nodes: Vec<&ModPath> = graph.keys().copied().collect();
    let mut state = Tarjan {
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        counter: 0,
        found: Vec::new(),
    };
    for node in nodes {
        if !state.index.contains_key(node) {
            state.visit(node, &graph);
        }
    }
    state.found
}

struct Tarjan<'a> {
    index: BTreeMap<&'a ModPath, usize>,
    low: BTreeMap<&'a ModPath, usize>,
    stack: Vec<&'a ModPath>,
    counter: usize,
    found: Vec<BTreeSet<ModPath>>,
}

impl<'a> Tarjan<'a> {
    fn visit(&mut self, node: &'a ModPath, graph: &BTreeMap<&'a ModPath, Vec<&'a ModPath>>) {
        self.index.insert(node, self.counter);
        self.low.insert(node, self.counter);
        self.counter += 1;
        self.stack.push(node);
        for &next in &graph[node] {
            if !self.index.contains_key(next) {
                self.visit(next, graph);
                let low = self.low[node].min(self.low[next]);
                self.low.insert(node, low);
            } else if self.stack.contains(&next) {
                let low = self.low[node].min(self.index[next]);
                self.low.insert(node, low);
            }
        }
        if self.low[node] == self.index[node] {
            let mut component = BTreeSet::new();
            while let Some(member) = self.stack.pop() {
                component.insert(member.clone());
                if member == node {
                    break;
                }
            }
            if component.len() > 1 {
                self.found.push(component);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(p: &str) -> ModPath {
        p.split("::").filter(|s| !s.is_empty()).map(String::from).collect()
    }

    #[test]
    fn references_lift_to_the_siblings_under_the_common_ancestor() {
        assert_eq!(
            sibling_edge(&path("proxy::http::pool"), &path("proxy::outbound")),
            Some((path("proxy::http"), path("proxy::outbound")))
        );
        assert_eq!(
            sibling_edge(&path("xds::route"), &path("proxy::peek")),
            Some((path("xds"), path("proxy")))
        );
        assert_eq!(sibling_edge(&path("proxy::http"), &path("proxy")), None, "an ancestor is not an edge");
        assert_eq!(sibling_edge(&path("proxy"), &path("proxy::http")), None, "a child is not an edge");
    }

    #[test]
    fn paths_resolve_to_the_deepest_known_module() {
        let known: BTreeSet<ModPath> = ["", "proxy", "proxy::http", "xds"].iter().map(|p| path(p)).collect();
        let resolve = |from: &str, written: &str| resolve(&path(from), &path(written), &known);
        assert_eq!(resolve("xds", "crate::proxy::http::Pool"), Some(path("proxy::http")));
        assert_eq!(resolve("proxy::http", "super::super::xds::Cache"), Some(path("xds")));
        assert_eq!(resolve("proxy", "self::http"), Some(path("proxy::http")));
        assert_eq!(resolve("proxy", "tokio::net"), None);
    }

    #[test]
    fn a_cycle_is_found_and_a_chain_is_not() {
        let dir = std::env::temp_dir().join(format!("nm-cycles-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("a")).unwrap();
        std::fs::write(dir.join("lib.rs"), "mod a; mod b; mod c;").unwrap();
        std::fs::write(dir.join("a/mod.rs"), "use crate::b::B; mod inner;").unwrap();
        std::fs::write(dir.join("a/inner.rs"), "fn f() { crate::c::g(); }").unwrap();
        std::fs::write(dir.join("b.rs"), "pub struct B; #[cfg(test)] mod tests { use crate::a::X; }")
            .unwrap();
        std::fs::write(dir.join("c.rs"), "pub fn g() {} fn h() -> super::a::T { todo() }").unwrap();
        let cycles = find(&dir.join("lib.rs")).unwrap();
        let text: Vec<String> = cycles.iter().map(ToString::to_string).collect();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(cycles.len(), 1, "{text:?}");
        assert!(text[0].contains("a → c") && text[0].contains("c → a"), "{}", text[0]);
        assert!(
            text[0].starts_with("import cycle between a, c:"),
            "b is only used, and b's test module does not count: {}",
            text[0]
        );
    }
}
