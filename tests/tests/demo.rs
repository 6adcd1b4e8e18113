//! The README's training demonstration at a reduced size: the shipped recipes
//! (`specs/recipes/sft_addition.yaml`, then `grpo_addition.yaml` from its `final/`) run
//! as written but for a few steps, small batches and a slice of the held-out problems.
//! The full run's figures are in the README (it takes minutes, not seconds); here the
//! recipes must parse, the two stages must chain (GRPO reads the SFT run's directory and
//! spec), the SFT loss must fall, and GRPO must log what the README promises.

use dsc_runtime::cli::train::{grpo_cmd, sft_cmd, SftArgs};
use dsc_runtime::train::metrics::Display;
use dsc_runtime::train::objective::reference_objective;
use std::path::{Path, PathBuf};

fn recipes() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../specs/recipes")
}

/// `text` with each `key:` line replaced by `key: value` (top-level keys only).
fn with(text: &str, fields: &[(&str, String)]) -> String {
    let mut out: Vec<String> = text.lines().map(str::to_string).collect();
    for (key, value) in fields {
        let line = format!("{key}: {value}");
        match out.iter().position(|l| l.starts_with(&format!("{key}:"))) {
            Some(i) => out[i] = line,
            None => panic!("the recipe has no `{key}` line"),
        }
    }
    out.join("\n") + "\n"
}

fn metrics(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn sft_then_grpo_on_additions_at_reduced_size() {
    let scratch = std::env::temp_dir().join(format!("dsc-demo-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch).unwrap();
    let data = recipes().join("data");

    let sft = std::fs::read_to_string(recipes().join("sft_addition.yaml")).unwrap();
    let sft = with(
        &sft,
        &[
            ("spec", recipes().join("../tiny/addition_v3.dsc").display().to_string()),
            ("data", data.join("addition_train.jsonl").display().to_string()),
            ("out", scratch.join("sft").display().to_string()),
            ("steps", "40".into()),
            ("batch_size", "8".into()),
            ("schedule", "{kind: cosine, warmup_steps: 5, min_lr_ratio: 0.1}".into()),
            ("checkpoint_every", "20".into()),
        ],
    );
    std::fs::write(scratch.join("sft.yaml"), sft).unwrap();
    sft_cmd(&SftArgs { config: scratch.join("sft.yaml"), resume: None }, &|spec, opts| reference_objective(spec, opts)).unwrap();
    let losses: Vec<f64> = metrics(&scratch.join("sft/metrics.jsonl")).iter().map(|l| l["loss"].as_f64().unwrap()).collect();
    assert_eq!(losses.len(), 40);
    let (first, last) = (losses[..5].iter().sum::<f64>() / 5.0, losses[35..].iter().sum::<f64>() / 5.0);
    assert!(last < first - 1.0, "the SFT loss falls: {first:.2} → {last:.2}");

    let heldout = std::fs::read_to_string(data.join("addition_heldout.jsonl")).unwrap();
    std::fs::write(scratch.join("heldout.jsonl"), heldout.lines().take(16).map(|l| format!("{l}\n")).collect::<String>()).unwrap();
    let grpo = std::fs::read_to_string(recipes().join("grpo_addition.yaml")).unwrap();
    let grpo = with(
        &grpo,
        &[
            ("model", scratch.join("sft/final").display().to_string()),
            ("prompts", data.join("addition_prompts.jsonl").display().to_string()),
            ("eval_prompts", scratch.join("heldout.jsonl").display().to_string()),
            ("eval_every", "2".into()),
            ("out", scratch.join("grpo").display().to_string()),
            ("steps", "4".into()),
            ("prompts_per_step", "4".into()),
            ("num_generations", "4".into()),
            ("checkpoint_every", "2".into()),
        ],
    );
    std::fs::write(scratch.join("grpo.yaml"), grpo).unwrap();
    let summary = grpo_cmd(&SftArgs { config: scratch.join("grpo.yaml"), resume: None }, Display::Quiet, None).unwrap();
    assert_eq!(summary.eval.iter().map(|e| e.0).collect::<Vec<_>>(), [0, 2, 4]);
    let lines = metrics(&scratch.join("grpo/metrics.jsonl"));
    assert_eq!(lines.len(), 4);
    for l in &lines {
        for k in ["loss", "reward", "accuracy", "entropy", "completion_length", "gen_tokens_per_s", "train_tokens_per_s", "load_balance"] {
            assert!(l.get(k).is_some(), "no `{k}` in {l}");
        }
        let d = l["logp_diff_max"].as_f64().unwrap();
        assert!(d < 1e-3, "rollout and training log-probabilities differ by {d}");
    }
    let run = scratch.join("grpo");
    assert!(run.join("grpo.svg").is_file() && run.join("final/model.safetensors").is_file() && run.join("checkpoint-2").is_dir());
    let _ = std::fs::remove_dir_all(&scratch);
}
