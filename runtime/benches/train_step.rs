//! One training step of the reference backend, timed: forward + backward of the train
//! entry ([`TrainModel::run`], main loss), global-norm clipping to 1 and AdamW
//! (lr 1e-4, betas (0.9, 0.999), eps 1e-8, weight decay 0.01 on tensors of rank ≥ 2),
//! on random token ids, in `f32`. Prints one JSON line:
//!
//! ```text
//! {"tool":"dsc","tokens_per_s":..,"step_ms":..,"peak_rss_mb":..,...}
//! ```
//!
//! `tokens_per_s` is `B·S` over the mean step time of the timed steps (after the
//! warm-up steps); `peak_rss_mb` is the process's `VmHWM` from /proc/self/status at the
//! end (weights, optimizer state, activations of the biggest step, compiled module).
//! runtime/benches/train_vs_torch.py runs it beside PyTorch eager training of the same
//! transformers checkpoint.
//!
//! ```text
//! cargo bench -p dsc-runtime --bench train_step -- --model DIR [--batch 4] [--seq 256]
//!     [--steps 3] [--warmup 1] [--threads 2] [--seed 0]
//! ```
//!
//! Each flag can come from the environment instead (a flag wins): `DSC_BENCH_MODEL`,
//! `DSC_BENCH_BATCH`, `DSC_BENCH_SEQ`, `DSC_BENCH_STEPS`, `DSC_BENCH_WARMUP`,
//! `DSC_BENCH_THREADS`, `DSC_BENCH_SEED`. `DIR` is a hub model directory (config.json and
//! safetensors) that [`ModelDir::open`] accepts. The reference backend runs on rayon's
//! global pool, built here with `--threads` threads.

mod common;
use common::peak_rss_mb;
use dsc_compiler::passes::autodiff::TrainOptions;
use dsc_compiler::passes::PassSelection;
use dsc_runtime::checkpoint::{ModelDir, OpenOptions};
use dsc_runtime::reference::{Precision, Tensor};
use dsc_runtime::rng::SplitMix64;
use dsc_runtime::train::model::{Terms, TrainModel};
use dsc_runtime::train::optim::{clip_grad_norm, AdamW, OptimizerState};
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

struct Args {
    model: PathBuf,
    batch: usize,
    seq: usize,
    steps: usize,
    warmup: usize,
    threads: usize,
    seed: u64,
}

fn parse() -> Result<Args, String> {
    let mut flags: HashMap<String, String> = HashMap::new();
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        // `cargo bench` passes `--bench` to every bench; ignore it and any other bare flag.
        let Some(key) = a.strip_prefix("--") else { continue };
        if let Some((k, v)) = key.split_once('=') {
            flags.insert(k.to_string(), v.to_string());
        } else if ["model", "batch", "seq", "steps", "warmup", "threads", "seed"].contains(&key) {
            let v = it.next().ok_or_else(|| format!("--{key} needs a value"))?;
            flags.insert(key.to_string(), v);
        }
    }
    let get = |k: &str| flags.get(k).cloned().or_else(|| std::env::var(format!("DSC_BENCH_{}", k.to_uppercase())).ok());
    let num = |k: &str, default: u64| -> Result<u64, String> {
        match get(k) {
            Some(v) => v.parse().map_err(|_| format!("--{k} {v}: not a number")),
            None => Ok(default),
        }
    };
    let model = get("model").ok_or("no model: pass --model DIR or set DSC_BENCH_MODEL")?;
    Ok(Args {
        model: PathBuf::from(model),
        batch: num("batch", 4)? as usize,
        seq: num("seq", 256)? as usize,
        steps: num("steps", 3)?.max(1) as usize,
        warmup: num("warmup", 1)? as usize,
        threads: num("threads", 2)?.max(1) as usize,
        seed: num("seed", 0)?,
    })
}

fn main() {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("train_step: {e}");
            std::process::exit(2);
        }
    };
    rayon::ThreadPoolBuilder::new().num_threads(args.threads).build_global().expect("rayon global pool");

    let t0 = Instant::now();
    let md = ModelDir::open(&args.model, &OpenOptions::default()).unwrap_or_else(|e| panic!("{}: {e}", args.model.display()));
    let mut weights: HashMap<String, Tensor> =
        md.weights.names().into_iter().map(|n| (n.to_string(), md.weights.get(n).expect("listed weight").clone())).collect();
    // The checkpoint store keeps its own decoded copies: drop it so only `weights` stays.
    let spec = md.spec.clone();
    drop(md);
    let params: usize = weights.values().map(|t| t.numel()).sum();
    let load_s = t0.elapsed().as_secs_f64();

    let t1 = Instant::now();
    let tm = TrainModel::compile(&spec, TrainOptions::default(), &PassSelection::default()).expect("compile the train entry");
    let compile_s = t1.elapsed().as_secs_f64();

    let (b, s) = (args.batch, args.seq);
    let mut rng = SplitMix64(args.seed);
    let vocab = spec.model.vocab;
    let adamw = AdamW { betas: [0.9, 0.999], eps: 1e-8, weight_decay: 0.01 };
    let lr = 1e-4;
    let frozen = |n: &str| n.ends_with("e_score_correction_bias");
    let mut state = OptimizerState::default();
    let mut times = Vec::new();
    let mut losses = Vec::new();
    for step in 0..args.warmup + args.steps {
        // A fresh batch per step, labels the inputs (the entry shifts them, as transformers does).
        let ids: Vec<i64> = (0..b * s).map(|_| rng.below(vocab) as i64).collect();
        let pos: Vec<i64> = (0..b * s).map(|i| (i % s) as i64).collect();
        let (ids, pos, labels) = (Tensor::i64(&[b, s], ids.clone()), Tensor::i64(&[b, s], pos), Tensor::i64(&[b, s], ids));
        let start = Instant::now();
        let out = tm.run(&weights, [&ids, &pos, &labels], Terms::MAIN, Precision::F32).expect("train step");
        let mut grads = out.grads;
        clip_grad_norm(&mut grads, 1.0);
        adamw.step(lr, &mut state, &mut weights, &grads, &frozen).expect("AdamW step");
        drop(grads);
        let dt = start.elapsed().as_secs_f64();
        eprintln!("dsc step {step}{}: loss {:.4} {:.0} ms", if step < args.warmup { " (warm-up)" } else { "" }, out.loss, dt * 1e3);
        if step >= args.warmup {
            times.push(dt);
            losses.push(out.loss);
        }
    }
    let mean = times.iter().sum::<f64>() / times.len() as f64;
    let min = times.iter().cloned().fold(f64::INFINITY, f64::min);
    let json = serde_json::json!({
        "tool": "dsc",
        "tokens_per_s": (b * s) as f64 / mean,
        "step_ms": mean * 1e3,
        "min_step_ms": min * 1e3,
        "peak_rss_mb": peak_rss_mb(),
        "params": params,
        "batch": b,
        "seq": s,
        "threads": args.threads,
        "steps": args.steps,
        "warmup": args.warmup,
        "load_s": load_s,
        "compile_s": compile_s,
        "losses": losses,
    });
    println!("{json}");
}
