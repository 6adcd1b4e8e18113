//! Golden snapshots of the IR of every spec in `specs/` (`golden/ir/`), one per spec and
//! mode: the mode's entry point and the functions it calls, in the stable text form with
//! `@line:col` spans into the spec. `lowered_<mode>` is lowering's output;
//! `optimized_<mode>` is the same module after the mode's full default pipeline, compiled
//! the way `dsc compile` does ([`dsc_compiler::passes::compile`]). A change to lowering, to
//! a pass, to an op's printed form or to a spec shows up here as a diff. Every lowered
//! and every optimised module must also verify.

use dsc_compiler::ir::{print_module, verify, Mode, Module, Op};
use dsc_compiler::lower::{lower, lower_mode};
use dsc_compiler::passes::{compile, PassCx, PassSelection};
use std::collections::HashSet;

/// The part of `m` that `mode` runs: its entry and every function reachable by calls,
/// in module order.
fn for_mode(m: &Module, mode: Mode) -> Module {
    let mut reach: HashSet<&str> = HashSet::new();
    let mut todo = vec![m.entries[&mode].as_str()];
    while let Some(name) = todo.pop() {
        if !reach.insert(name) {
            continue;
        }
        let f = m.function(name).unwrap_or_else(|| panic!("no function `{name}`"));
        for n in f.graph.nodes() {
            if let Op::Call { function, .. } = &f.graph.node(n).op {
                todo.push(m.function(function).map(|f| f.name.as_str()).unwrap_or_else(|| panic!("no function `{function}`")));
            }
        }
    }
    let mut out = Module::new();
    for f in m.functions.iter().filter(|f| reach.contains(f.name.as_str())) {
        out.add_function(f.clone());
    }
    out.set_entry(mode, &m.entries[&mode]);
    out
}

/// Loads a globbed spec under a path relative to the package root: cargo runs tests from
/// there, so `../specs/x.dsc` names the spec (and the files it includes, which spans
/// print) the same way on every machine.
fn load_relative(path: &std::path::Path) -> (std::path::PathBuf, dsc_dsl::Spec) {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let rel = std::path::Path::new("..").join(path.strip_prefix(root).unwrap());
    let spec = dsc_dsl::load(&rel, None).unwrap_or_else(|f| panic!("{}:\n{}", rel.display(), f.render()));
    (rel, spec)
}

#[test]
fn every_spec_lowers_to_its_snapshots() {
    let mut settings = insta::Settings::clone_current();
    settings.set_snapshot_path("../../golden/ir");
    settings.set_prepend_module_to_snapshot(false);
    settings.bind(|| {
        insta::glob!("../..", "specs/**/*.dsc", |path| {
            let (rel, spec) = load_relative(path);
            let path = rel.as_path();
            let module = lower(&spec).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            if let Err(errors) = verify(&module) {
                let all: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
                panic!("{}: the lowered module does not verify:\n{}", path.display(), all.join("\n"));
            }
            for mode in Mode::ALL {
                let part = for_mode(&module, mode);
                assert_eq!(verify(&part), Ok(()), "{}: {mode} alone", path.display());
                let text = print_module(&part, Some(&spec.sources));
                insta::assert_snapshot!(format!("lowered_{mode}"), text);
            }
        });
    });
}

#[test]
fn every_spec_compiles_to_its_optimized_snapshots() {
    let mut settings = insta::Settings::clone_current();
    settings.set_snapshot_path("../../golden/ir");
    settings.set_prepend_module_to_snapshot(false);
    settings.bind(|| {
        insta::glob!("../..", "specs/**/*.dsc", |path| {
            let (rel, spec) = load_relative(path);
            let path = rel.as_path();
            for mode in Mode::ALL {
                let mut module = lower_mode(&spec, mode).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                let mut cx = PassCx::new(mode).with_sources(&spec.sources);
                compile(&mut module, &PassSelection::all(), &mut cx)
                    .unwrap_or_else(|e| panic!("{} {mode}: {}", path.display(), e.render(Some(&spec.sources))));
                assert_eq!(verify(&module), Ok(()), "{} {mode}", path.display());
                let text = print_module(&module, Some(&spec.sources));
                insta::assert_snapshot!(format!("optimized_{mode}"), text);
            }
        });
    });
}
