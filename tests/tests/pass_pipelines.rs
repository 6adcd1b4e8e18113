//! The pass pipelines over every spec in `specs/`, in every mode: each pipeline finishes
//! with a module that verifies (the runner verifies after every pass in test builds, so a
//! failure names the pass), running it again changes nothing (the passes reach a fixed
//! point on real models, not just on hand-built graphs), and the memory plan's numbers
//! hang together.

use dsc_compiler::ir::{print_module, verify, Mode};
use dsc_compiler::lower::lower_mode;
use dsc_compiler::passes::{compile, pipeline, run_pipeline, Changed, PassCx, PassSelection};
use std::path::{Path, PathBuf};

fn specs() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().join("specs");
    let mut out = Vec::new();
    let mut todo = vec![root];
    while let Some(dir) = todo.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                todo.push(p);
            } else if p.extension().is_some_and(|x| x == "dsc") {
                out.push(p);
            }
        }
    }
    out.sort();
    assert!(out.len() >= 6, "{out:?}");
    out
}

#[test]
fn pipelines_verify_and_reach_a_fixed_point_on_every_spec() {
    for path in specs() {
        let spec = dsc_dsl::load(&path, None).unwrap_or_else(|f| panic!("{}:\n{}", path.display(), f.render()));
        for mode in Mode::ALL {
            let what = format!("{} {mode}", path.display());
            let mut m = lower_mode(&spec, mode).unwrap_or_else(|e| panic!("{what}: {e}"));
            let mut cx = PassCx::new(mode).with_sources(&spec.sources);
            cx.verify_each = true;
            compile(&mut m, &PassSelection::all(), &mut cx).unwrap_or_else(|e| panic!("{what}: {}", e.render(Some(&spec.sources))));
            assert_eq!(verify(&m), Ok(()), "{what}");
            let once = print_module(&m, Some(&spec.sources));

            // A second run: nothing left to simplify, merge or remove.
            let mut again = PassCx::new(mode);
            run_pipeline(&mut m, pipeline::for_mode(mode), &PassSelection::all(), &mut again).unwrap();
            for t in &again.timings {
                assert_eq!(t.changed, Changed::No, "{what}: `{}` changed the module on a second run", t.pass);
            }
            assert_eq!(print_module(&m, Some(&spec.sources)), once, "{what}");

            let plan = cx.memory_plan.as_ref().unwrap_or_else(|| panic!("{what}: no memory plan"));
            assert!(plan.peak_live_bytes() > 0, "{what}");
            assert!(plan.allocated_bytes() >= plan.peak_live_bytes(), "{what}: {}", plan.summary());
            assert!(plan.buffers_after() <= plan.buffers_before(), "{what}");
            assert!(plan.weight_bytes() > 0, "{what}");
        }
    }
}

#[test]
fn disabling_optional_passes_still_verifies() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../specs/tiny/tiny_v3.dsc");
    let spec = dsc_dsl::load(&path, None).unwrap_or_else(|f| panic!("{}", f.render()));
    let fusion = "-fuse_swiglu,-fuse_rope,-fuse_attention,-fuse_elementwise";
    let sel = PassSelection::parse(&format!("-simplify,-mla_absorb,-mtp_strip,-autodiff,-cse,-dce,{fusion},-memory_plan")).unwrap();
    for mode in Mode::ALL {
        let mut m = lower_mode(&spec, mode).unwrap();
        let mut cx = PassCx::new(mode);
        compile(&mut m, &sel, &mut cx).unwrap();
        let ran: Vec<&str> = cx.timings.iter().map(|t| t.pass).collect();
        assert_eq!(ran, ["verify", "shape_infer"], "{mode}");
        assert!(cx.memory_plan.is_none());
    }
}

/// `--passes +decompose` on every spec and mode: the pipeline verifies, and the fusion
/// passes after it re-form every `swiglu`, `rope` and `attention` the plain pipeline
/// keeps, leaving no composite but the ones decomposition keeps on purpose.
#[test]
fn decompose_then_fusion_reforms_the_composites_on_every_spec() {
    use dsc_compiler::ir::{Module, Op};
    let count = |m: &Module, name: &str| -> usize {
        m.functions.iter().map(|f| f.graph.nodes().into_iter().filter(|&n| f.graph.node(n).op.name() == name).count()).sum()
    };
    for path in specs() {
        let spec = dsc_dsl::load(&path, None).unwrap_or_else(|f| panic!("{}:\n{}", path.display(), f.render()));
        for mode in Mode::ALL {
            let what = format!("{} {mode}", path.display());
            let mut plain = lower_mode(&spec, mode).unwrap();
            compile(&mut plain, &PassSelection::all(), &mut PassCx::new(mode)).unwrap();
            let mut m = lower_mode(&spec, mode).unwrap();
            let mut cx = PassCx::new(mode);
            cx.verify_each = true;
            compile(&mut m, &PassSelection::parse("+decompose").unwrap(), &mut cx).unwrap_or_else(|e| panic!("{what}: {e}"));
            assert!(cx.timings.iter().any(|t| t.pass == "decompose" && t.changed.any()), "{what}");
            for op in ["swiglu", "rope", "attention"] {
                assert_eq!(count(&m, op), count(&plain, op), "{what}: {op}");
            }
            let expanded = |o: &Op| o.is_composite() && !dsc_compiler::passes::decompose::kept(o);
            let left: Vec<&str> = m
                .functions
                .iter()
                .flat_map(|f| f.graph.nodes().into_iter().map(move |n| f.graph.node(n).op.clone()))
                .filter(|o| expanded(o) && !matches!(o, Op::SwiGlu | Op::Rope { .. } | Op::Attention { .. }))
                .map(|o| o.name())
                .collect();
            assert!(left.is_empty(), "{what}: {left:?} survived decomposition");
        }
    }
}
