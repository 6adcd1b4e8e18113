//! What commands refuse before any work: an output that is one of their inputs or lies
//! in a directory that does not exist (the file-level rules are tested in
//! `dsc_runtime::output`), and a thread count the machine does not have.

use dsc_compiler::ir::Mode;
use dsc_runtime::cli::compile::compile_cmd;
use dsc_runtime::cli::logits::{logits_cmd, LogitsArgs, ModelArgs};
use std::path::{Path, PathBuf};

fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("dsc-outputs-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// `dsc logits --model MODEL --input INPUT --out OUT` on the reference backend.
pub fn logits_args(model: &Path, input: &Path, out: &Path) -> LogitsArgs {
    LogitsArgs {
        model: ModelArgs {
            model: model.to_path_buf(),
            spec: None,
            spec_model: None,
            backend: "reference".into(),
            adapter: "default".into(),
            device: None,
            passes: None,
            mla: Default::default(),
            threads: None,
            max_context: None,
            bf16_inputs: false,
            bf16_cache: false,
        },
        input: input.to_path_buf(),
        out: out.to_path_buf(),
    }
}

#[test]
fn inputs_are_never_outputs() {
    let d = scratch("inputs");
    // A copy of a fixture: if the refusal failed, only the copy would be lost.
    let golden = Path::new(env!("CARGO_MANIFEST_DIR")).join("../golden/hf/llama_dense");
    let model = d.join("model");
    std::fs::create_dir_all(&model).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(golden.join(f), model.join(f)).unwrap();
    }
    let input = d.join("ids.json");
    std::fs::write(&input, "{\"input_ids\": [[1, 2, 3]]}").unwrap();
    let weights = std::fs::read(model.join("model.safetensors")).unwrap();
    for out in [model.join("model.safetensors"), input.clone(), d.join("model/../ids.json")] {
        let e = logits_cmd(&logits_args(&model, &input, &out)).unwrap_err();
        assert!(e.contains("one of this command's inputs"), "{e}");
    }
    assert_eq!(std::fs::read(model.join("model.safetensors")).unwrap(), weights);
    let e = logits_cmd(&logits_args(&model, &input, &d.join("missing/logits.safetensors"))).unwrap_err();
    assert!(e.contains("does not exist") && e.contains("missing"), "{e}");
    logits_cmd(&logits_args(&model, &input, &d.join("logits.safetensors"))).unwrap();

    let spec = d.join("s.dsc");
    std::fs::copy(Path::new(env!("CARGO_MANIFEST_DIR")).join("../specs/tiny/tiny_llama.dsc"), &spec).unwrap();
    let e = compile_cmd(&spec, None, Mode::Prefill, None, "ir", Some(&spec)).unwrap_err();
    assert!(e.contains("one of this command's inputs"), "{e}");
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn thread_counts_are_bounded_by_the_machine() {
    let d = scratch("threads");
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../golden/hf/llama_dense");
    let input = d.join("ids.json");
    std::fs::write(&input, "{\"input_ids\": [[1, 2, 3]]}").unwrap();
    for n in [0, 100_000] {
        let mut args = logits_args(&model, &input, &d.join("l.safetensors"));
        args.model.threads = Some(n);
        let e = logits_cmd(&args).unwrap_err();
        assert!(e.starts_with(&format!("--threads {n}: expected 1 to ")), "{e}");
    }
    let _ = std::fs::remove_dir_all(&d);
}
