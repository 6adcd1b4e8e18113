//! Helpers shared by the pass tests: small types, one-function modules, the text of a
//! graph, and scratch directories.

use crate::ir::print::print_graph;
use crate::ir::{DType, Dim, Function, Graph, Mode, Module, Shape, Ty};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

/// `f32` of the given shape.
pub fn f32t(s: impl Into<Shape>) -> Ty {
    Ty::new(DType::F32, s)
}

/// A constant dim.
pub fn n(v: i64) -> Dim {
    Dim::lit(v)
}

/// A module whose only function, `name`, is the entry point for `mode`.
pub fn module_of(name: &str, g: Graph, mode: Mode) -> Module {
    let mut m = Module::new();
    m.add_function(Function { name: name.into(), graph: g });
    m.set_entry(mode, name);
    m
}

/// The graph's text form, one node per line, without spans.
pub fn text(g: &Graph) -> String {
    print_graph(g, None).join("\n")
}

/// A fresh, empty directory under the system temp dir, unique per test process and call.
pub fn scratch_dir(tag: &str) -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let k = NEXT.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("dsc-passes-{tag}-{}-{k}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
