//! Golden snapshots of what `dsc compile --target` writes (`golden/kernels/`): every
//! distinct kernel of the decode step of `tiny_llama` (dense, MHA) and `tiny_v3` (MLA,
//! sigmoid group-limited MoE, YaRN), as CUDA C++ and as WGSL, with `plan.json` and the
//! list of unsupported ops. A change to a kernel, to how kernels are derived from nodes,
//! to the launch plan, or to CubeCL's output shows up as a diff; generating twice in one
//! process must give the same bytes (the snapshot pins it across runs).

use dsc_compiler::codegen::Target;
use dsc_compiler::ir::Mode;
use dsc_compiler::passes::mla_absorb::MlaMode;
use dsc_runtime::cli::compile::{compile_target_cmd, TargetEmit};
use std::path::{Path, PathBuf};

/// Compiles `specs/tiny/{name}.dsc` for decode into a fresh directory and returns every
/// file it wrote but `ir.txt` (covered by `golden/ir`), concatenated under their names.
fn generate(name: &str, target: Target, tag: &str) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let spec = root.join(format!("specs/tiny/{name}.dsc"));
    let dir: PathBuf = std::env::temp_dir().join(format!("dsc-kernels-golden-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let n = compile_target_cmd(&spec, None, Mode::Decode, None, MlaMode::Auto, target, TargetEmit::ALL, &dir).unwrap();
    assert!(n > 0, "no kernels");
    let mut names: Vec<PathBuf> = std::fs::read_dir(dir.join("kernels")).unwrap().map(|e| e.unwrap().path()).collect();
    names.sort();
    assert_eq!(names.len(), n);
    names.push(dir.join("plan.json"));
    names.push(dir.join("unsupported.txt"));
    assert!(dir.join("ir.txt").is_file());
    let mut text = String::new();
    for p in names {
        let body = std::fs::read_to_string(&p).unwrap();
        text.push_str(&format!("==== {}\n{body}\n", p.file_name().unwrap().to_string_lossy()));
    }
    std::fs::remove_dir_all(&dir).unwrap();
    text
}

fn check(spec: &str) {
    let mut settings = insta::Settings::clone_current();
    settings.set_snapshot_path("../../golden/kernels");
    settings.set_prepend_module_to_snapshot(false);
    settings.bind(|| {
        for (target, name) in [(Target::Cuda, "cuda"), (Target::Wgsl, "wgsl")] {
            let a = generate(spec, target, &format!("{spec}-{name}-a"));
            let b = generate(spec, target, &format!("{spec}-{name}-b"));
            assert!(a == b, "{spec} {name}: two generations differ");
            // Every node of a tiny decode step has a kernel now.
            assert!(
                a.ends_with("==== unsupported.txt\n# ops of the optimised IR without a GPU kernel yet: op, nodes, why\n\n"),
                "{spec}: unsupported ops"
            );
            insta::assert_snapshot!(format!("{spec}_decode_{name}"), a);
        }
    });
}

#[test]
fn tiny_llama_decode_kernels() {
    check("tiny_llama");
}

#[test]
fn tiny_v3_decode_kernels() {
    check("tiny_v3");
}
