//! `dsc grpo-loss` as a user runs it: JSON in, JSON out on stdout with exit code 0; bad input
//! is a message naming the field with exit code 1; a usage error is exit code 2.

use std::path::PathBuf;
use std::process::{Command, Output};

fn dsc(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dsc")).args(args).output().expect("run dsc")
}

fn write(name: &str, text: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("dsc-grpo-{}-{name}.json", std::process::id()));
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn grpo_loss_prints_the_loss_and_its_gradient() {
    // G = 2, T = 2, one group; ratios 1 and KL 0, so the loss is −mean_i A_i = 0, and with
    // rewards 1 and 0 the advantages are ±0.5 / (√0.5 + 1e-4).
    let input = write(
        "ok",
        r#"{"rewards": [1, 0], "mask": [[1, 1], [1, 0]], "logp_pi": [[-1, -2], [-0.5, 0]],
            "logp_ref": [[-1, -2], [-0.5, 0]], "epsilon": 0.2, "beta": 0.04,
            "loss_type": "grpo", "scale_rewards": "group", "max_completion_length": 2}"#,
    );
    let r = dsc(&["grpo-loss", "--input", input.to_str().unwrap()]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let out: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();
    let a = 0.5 / (0.5f64.sqrt() + 1e-4);
    assert!((out["advantages"][0].as_f64().unwrap() - a).abs() < 1e-15);
    assert!(out["loss"].as_f64().unwrap().abs() < 1e-15);
    // grpo: d/dx = −A·ρ / (G·n_i): −A/4 for row 0's two tokens, +A/2 for row 1's one.
    let g = &out["grad_logp_pi"];
    assert!((g[0][0].as_f64().unwrap() + a / 4.0).abs() < 1e-15 && (g[1][0].as_f64().unwrap() - a / 2.0).abs() < 1e-15);
    assert_eq!(g[1][1].as_f64().unwrap(), 0.0);
    assert_eq!(out["metrics"]["tokens"], 3);
}

#[test]
fn grpo_loss_rejects_bad_input_with_exit_code_1() {
    let input = write(
        "bad",
        r#"{"rewards": [1, 0], "mask": [[1, 1], [1, 0]], "logp_pi": [[-1, -2], [-0.5]],
            "epsilon": 0.2, "beta": 0, "loss_type": "grpo", "scale_rewards": "group", "max_completion_length": 2}"#,
    );
    let r = dsc(&["grpo-loss", "--input", input.to_str().unwrap()]);
    assert_eq!(r.status.code(), Some(1));
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(err.contains("`logp_pi[1]`: length 1, expected 2"), "{err}");
    let typo = write("typo", r#"{"rewards": [1], "betta": 0}"#);
    let r = dsc(&["grpo-loss", "--input", typo.to_str().unwrap()]);
    assert_eq!(r.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&r.stderr).contains("`betta`: unknown field; did you mean `beta`?"));
    assert_eq!(dsc(&["grpo-loss"]).status.code(), Some(2));
}
