//! `dsc logits` and `dsc generate` as a user runs them, on the transformers fixtures in
//! `golden/hf/`: the written logits and the printed greedy tokens are the reference's,
//! and bad input is an error message with exit code 1, never a panic.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn golden(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../golden/hf").join(case)
}

fn dsc(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dsc")).args(args).output().expect("run dsc")
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("dsc-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn f32s(bytes: &[u8], name: &str) -> (Vec<usize>, Vec<f32>) {
    let st = safetensors::SafeTensors::deserialize(bytes).unwrap();
    let t = st.tensor(name).unwrap();
    assert_eq!(t.dtype(), safetensors::Dtype::F32);
    (t.shape().to_vec(), t.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect())
}

#[test]
fn logits_writes_the_reference_logits() {
    let d = scratch("logits");
    let out = d.join("out.safetensors");
    let case = golden("deepseek_v2");
    let r = dsc(&["logits", "--model", s(&case), "--input", s(&case.join("input_ids.json")), "--out", s(&out), "--backend", "reference"]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let (shape, got) = f32s(&std::fs::read(&out).unwrap(), "logits");
    let (want_shape, want) = f32s(&std::fs::read(case.join("logits.safetensors")).unwrap(), "logits");
    assert_eq!(shape, want_shape);
    for (g, w) in got.iter().zip(&want) {
        assert!((g - w).abs() <= 1e-4 + 1e-4 * w.abs(), "{g} vs {w}");
    }
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn generate_prints_the_greedy_tokens() {
    for case in ["llama_gqa", "deepseek_v3"] {
        let dir = golden(case);
        let r = dsc(&[
            "generate",
            "--model",
            s(&dir),
            "--input",
            s(&dir.join("input_ids.json")),
            "--max-new-tokens",
            "8",
            "--temperature",
            "0",
            "--json",
        ]);
        assert!(r.status.success(), "{case}: {}", String::from_utf8_lossy(&r.stderr));
        let got: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();
        let want: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("generated.json")).unwrap()).unwrap();
        assert_eq!(got["generated"][0], want["generated"], "{case}");
        assert_eq!(got["generated"].as_array().unwrap().len(), 2, "one list per input sequence");
        assert_eq!(got["generated"][1].as_array().unwrap().len(), 8);
    }
    // Sampling is reproducible from the seed; --stats reports to stderr only.
    let dir = golden("llama_dense");
    let ids = dir.join("input_ids.json");
    let sample = |seed: &str| {
        let args = ["generate", "--model", s(&dir), "--input", s(&ids), "--max-new-tokens", "5"];
        let r =
            dsc(&[&args[..], &["--temperature", "1.0", "--top-k", "20", "--top-p", "0.9", "--seed", seed, "--json", "--stats"]].concat());
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
        assert!(String::from_utf8_lossy(&r.stderr).contains("tokens/s"));
        serde_json::from_slice::<serde_json::Value>(&r.stdout).unwrap()
    };
    assert_eq!(sample("7"), sample("7"));
}

#[test]
fn bad_input_is_an_error_message() {
    let dir = golden("llama_gqa");
    let ids = dir.join("input_ids.json");
    let d = scratch("bad");
    let ragged = d.join("ragged.json");
    std::fs::write(&ragged, r#"{"input_ids": [[1, 2, 3], [4, 5]]}"#).unwrap();
    let oov = d.join("oov.json");
    std::fs::write(&oov, r#"{"input_ids": [[1, 2, 999]]}"#).unwrap();
    let out = d.join("o.safetensors");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["logits", "--model", s(&d), "--input", s(&ids), "--out", s(&out)], "config.json"),
        (vec!["logits", "--model", s(&dir), "--input", s(&ragged), "--out", s(&out)], "equal lengths"),
        (vec!["logits", "--model", s(&dir), "--input", s(&oov), "--out", s(&out)], "outside the vocabulary"),
        (vec!["generate", "--model", s(&dir), "--prompt", "hello"], "tokenizer.json"),
        (vec!["generate", "--model", s(&dir), "--input", s(&ids), "--temperature", "-1"], "temperature"),
        (vec!["generate", "--model", s(&dir), "--input", s(&ids), "--passes", "-nonsense"], "nonsense"),
    ];
    for (args, want) in cases {
        let r = dsc(&args);
        let err = String::from_utf8_lossy(&r.stderr);
        assert_eq!(r.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: `{want}` not in {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
    assert!(!out.exists(), "nothing written on failure");
    let _ = std::fs::remove_dir_all(&d);
}

/// `--prompt TEXT` through a `tokenizer.json` (a word-level vocabulary `t0`..`t255`).
#[cfg(feature = "tokenizer")]
#[test]
fn prompt_goes_through_the_tokenizer() {
    let d = scratch("tok");
    for f in ["config.json", "model.safetensors", "generation_config.json"] {
        std::fs::copy(golden("llama_gqa").join(f), d.join(f)).unwrap();
    }
    let vocab: serde_json::Map<String, serde_json::Value> = (0..256).map(|i| (format!("t{i}"), serde_json::json!(i))).collect();
    let tok = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "t0"}
    });
    std::fs::write(d.join("tokenizer.json"), tok.to_string()).unwrap();
    let prompt: Vec<String> = [63, 30, 143, 241, 58, 134, 9, 244, 186, 199, 241, 209].iter().map(|i| format!("t{i}")).collect();
    let ids_file = d.join("ids.json");
    std::fs::write(&ids_file, r#"{"input_ids": [[63, 30, 143, 241, 58, 134, 9, 244, 186, 199, 241, 209]]}"#).unwrap();
    let by_text = dsc(&["generate", "--model", s(&d), "--prompt", &prompt.join(" "), "--max-new-tokens", "4", "--json"]);
    assert!(by_text.status.success(), "{}", String::from_utf8_lossy(&by_text.stderr));
    let by_ids = dsc(&["generate", "--model", s(&d), "--input", s(&ids_file), "--max-new-tokens", "4", "--json"]);
    let (t, i): (serde_json::Value, serde_json::Value) =
        (serde_json::from_slice(&by_text.stdout).unwrap(), serde_json::from_slice(&by_ids.stdout).unwrap());
    assert_eq!(t["generated"], i["generated"]);
    let words: Vec<String> = t["generated"][0].as_array().unwrap().iter().map(|x| format!("t{x}")).collect();
    assert_eq!(t["text"][0], serde_json::json!(words.join(" ")));
    let _ = std::fs::remove_dir_all(&d);
}

/// Usage errors exit with 2 and say what is expected; a backend this build left out says
/// how to build it in.
#[test]
fn usage_errors_exit_with_2() {
    let case = golden("llama_dense");
    let input = case.join("input_ids.json");
    let r = dsc(&["logits", "--model", s(&case), "--input", s(&input), "--out", "/dev/null", "--backend", "metal"]);
    assert_eq!(r.status.code(), Some(2), "{}", String::from_utf8_lossy(&r.stderr));
    assert!(String::from_utf8_lossy(&r.stderr).contains("unknown backend `metal`; available: reference"));
    let spec = Path::new(env!("CARGO_MANIFEST_DIR")).join("../specs/tiny/tiny_llama.dsc");
    let r = dsc(&["compile", s(&spec), "--target", "cuda"]);
    assert_eq!(r.status.code(), Some(2), "{}", String::from_utf8_lossy(&r.stderr));
    assert!(String::from_utf8_lossy(&r.stderr).contains("--out"), "{}", String::from_utf8_lossy(&r.stderr));
    if cfg!(not(feature = "cuda")) {
        let r = dsc(&["logits", "--model", s(&case), "--input", s(&input), "--out", "/dev/null", "--backend", "cuda"]);
        assert_eq!(r.status.code(), Some(2));
        assert!(String::from_utf8_lossy(&r.stderr).contains("--features cuda"), "{}", String::from_utf8_lossy(&r.stderr));
    }
}

/// A negative number for a count is a usage error that says a count is expected, not
/// clap's bare "unexpected argument '-1'".
#[test]
fn negative_counts_say_what_is_expected() {
    let case = golden("llama_dense");
    let input = case.join("input_ids.json");
    for flag in ["--max-new-tokens", "--top-k", "--seed", "--threads", "--max-context"] {
        let r = dsc(&["generate", "--model", s(&case), "--input", s(&input), flag, "-1"]);
        let err = String::from_utf8_lossy(&r.stderr);
        assert_eq!(r.status.code(), Some(2), "{flag}: {err}");
        assert!(err.contains("`-1` is negative; expected a whole number, 0 or more"), "{flag}: {err}");
    }
    let spec = Path::new(env!("CARGO_MANIFEST_DIR")).join("../specs/tiny/tiny_llama.dsc");
    let r = dsc(&["stats", s(&spec), "--context", "-5"]);
    assert_eq!(r.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&r.stderr).contains("`-5` is negative"), "{}", String::from_utf8_lossy(&r.stderr));
}

/// A run longer than the model's context is refused with both numbers before any work,
/// unless `--max-context` raises the limit.
#[test]
fn runs_past_the_models_context_are_refused() {
    let d = scratch("context");
    let case = golden("llama_dense");
    let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(case.join("config.json")).unwrap()).unwrap();
    let max = config["max_position_embeddings"].as_u64().unwrap() as usize;
    let input = d.join("long.json");
    std::fs::write(&input, serde_json::json!({ "input_ids": [vec![1; max + 1]] }).to_string()).unwrap();
    let out = d.join("logits.safetensors");
    let r = dsc(&["logits", "--model", s(&case), "--input", s(&input), "--out", s(&out)]);
    let err = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("the input reaches {} positions, more than the {max} of the model's max_position_embeddings", max + 1)),
        "{err}"
    );
    assert!(err.contains(&format!("--max-context {}", max + 1)), "{err}");
    assert!(!out.exists());
    let r = dsc(&["logits", "--model", s(&case), "--input", s(&input), "--out", s(&out), "--max-context", &(max + 1).to_string()]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    // generate counts the new tokens too: a prompt of max - 2 with 3 new tokens is over.
    std::fs::write(&input, serde_json::json!({ "input_ids": [vec![1; max - 2]] }).to_string()).unwrap();
    let r = dsc(&["generate", "--model", s(&case), "--input", s(&input), "--max-new-tokens", "3"]);
    assert_eq!(r.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&r.stderr).contains(&format!("with 3 new tokens reaches {}", max + 1)),
        "{}",
        String::from_utf8_lossy(&r.stderr)
    );
    let r = dsc(&["generate", "--model", s(&case), "--input", s(&input), "--max-new-tokens", "2", "--json"]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let _ = std::fs::remove_dir_all(&d);
}

/// An adapter kind the machine lacks is an error naming the adapters it has (CubeCL
/// panicked on it, twice, with exit code 101).
#[cfg(feature = "wgpu")]
#[test]
fn a_missing_wgpu_adapter_is_named() {
    let case = golden("llama_dense");
    let input = case.join("input_ids.json");
    for adapter in ["virtual:7", "integrated:9"] {
        let r =
            dsc(&["logits", "--model", s(&case), "--input", s(&input), "--out", "/dev/null", "--backend", "wgpu", "--adapter", adapter]);
        let err = String::from_utf8_lossy(&r.stderr);
        assert_eq!(r.status.code(), Some(1), "{adapter}: {err}");
        assert!(err.contains(&format!("no wgpu adapter `{adapter}`")) && err.contains("this machine has"), "{adapter}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}
