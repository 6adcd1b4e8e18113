//! Golden snapshots of the GPU kernel sources `dsc compile --target` writes for one tiny
//! spec (`golden/kernels/`): every distinct kernel of `tiny_llama`'s decode step, as CUDA
//! C++ and as WGSL, with the list of unsupported ops. A change to a kernel, to how specs
//! are derived from nodes, or to CubeCL's output shows up as a diff; generating twice in
//! one process must give the same bytes (the snapshot pins it across runs).

use dsc_compiler::codegen::Target;
use dsc_compiler::ir::Mode;
use dsc_compiler::passes::mla_absorb::MlaMode;
use dsc_runtime::cli::compile::compile_target_cmd;
use std::path::{Path, PathBuf};

/// Compiles `tiny_llama.dsc` for decode into a fresh directory and returns every file
/// it wrote but `ir.txt` (covered by `golden/ir`), concatenated under their names.
fn generate(target: Target, tag: &str) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let spec = root.join("specs/tiny/tiny_llama.dsc");
    let dir: PathBuf = std::env::temp_dir().join(format!("dsc-kernels-golden-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let n = compile_target_cmd(&spec, None, Mode::Decode, None, MlaMode::Auto, target, &dir).unwrap();
    assert!(n > 0, "no kernels");
    let mut names: Vec<PathBuf> = std::fs::read_dir(dir.join("kernels")).unwrap().map(|e| e.unwrap().path()).collect();
    names.sort();
    assert_eq!(names.len(), n);
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

#[test]
fn tiny_llama_decode_kernels() {
    let mut settings = insta::Settings::clone_current();
    settings.set_snapshot_path("../../golden/kernels");
    settings.set_prepend_module_to_snapshot(false);
    settings.bind(|| {
        for (target, name) in [(Target::Cuda, "cuda"), (Target::Wgsl, "wgsl")] {
            let a = generate(target, &format!("{name}-a"));
            let b = generate(target, &format!("{name}-b"));
            assert!(a == b, "{name}: two generations differ");
            insta::assert_snapshot!(format!("tiny_llama_decode_{name}"), a);
        }
    });
}
