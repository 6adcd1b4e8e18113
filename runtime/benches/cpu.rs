//! Inference on the CPU reference backend, timed as ratios within one run (this machine
//! varies ±30% between runs): the prompt pass with every position's logits (`dsc logits`)
//! against the last position's only (the prompt pass of `dsc generate`), and greedy decode
//! through the KV cache at several batch sizes (the shape of GRPO rollouts).
//!
//! ```text
//! cargo bench -p dsc-runtime --bench cpu                    # runtime/benches/v3_small.dsc, random weights
//! cargo bench -p dsc-runtime --bench cpu -- --model DIR     # a hub model directory instead
//!     [--prompt 512] [--new 128] [--batches 1,8,32] [--passes 3] [--threads T]
//!     [--ids IDS.json] [--json] [--bf16] [--bf16-inputs] [--bf16-cache]
//! ```
//!
//! A model directory's bf16 weights stay bf16, as `dsc generate` keeps them; `--bf16`
//! rounds the random weights of the default spec to bf16 and keeps them so, to time the
//! bf16 path against the f32 one on the same shapes. `--bf16-inputs` runs the reference
//! backend with `Options::bf16_inputs` (bf16 matmul inputs; AVX-512 BF16 where the CPU
//! has it); `--bf16-cache` with `Options::bf16_cache` (the KV cache held in bf16).
//!
//! `--ids` gives the batch-1 prompt (`{"input_ids": [[...]]}`, its length replaces
//! `--prompt`); `--json` prints one line (`prefill_tokens_per_s` with the last logits,
//! `prefill_all_tokens_per_s`, `decode` by batch, the batch-1 `greedy` tokens,
//! `peak_rss_mb`) for runtime/benches/cpu_vs_torch.py, which runs this beside
//! transformers.
//!
//! Each pass runs every measurement once, in the same order, so drift in the machine's
//! speed touches them all alike; the lines give the median over passes. Decode at batch
//! `B` is `B × new` tokens over the decode steps' time (the prompt pass excluded), after a
//! prompt of `--prompt` tokens per sequence. `peak_rss_mb` is the process's `VmHWM`.
//! With `DSC_PROFILE=1` it also prints each measurement's time per op kind (one pass is
//! enough; the timing adds a little to each op).

mod common;
use common::peak_rss_mb;
use dsc_runtime::checkpoint::{ModelDir, OpenOptions};
use dsc_runtime::generate::{forward, forward_last_logits, generate, Backend, CompileOptions, GenerateOptions, ReferenceBackend};
use dsc_runtime::reference::{Options, Tensor, Weights};
use dsc_runtime::rng::SplitMix64;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

struct Args {
    model: Option<PathBuf>,
    prompt: usize,
    new: usize,
    batches: Vec<usize>,
    passes: usize,
    threads: Option<usize>,
    ids: Option<Vec<i64>>,
    json: bool,
    bf16: bool,
    bf16_inputs: bool,
    bf16_cache: bool,
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        model: None,
        prompt: 512,
        new: 128,
        batches: vec![1, 8, 32],
        passes: 3,
        threads: None,
        ids: None,
        json: false,
        bf16: false,
        bf16_inputs: false,
        bf16_cache: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = |name: &str| it.next().ok_or_else(|| format!("{name} needs a value"));
        let num = |v: String, name: &str| v.parse::<usize>().map_err(|_| format!("{name}: expected a whole number, got `{v}`"));
        match flag.as_str() {
            "--model" => a.model = Some(PathBuf::from(value("--model")?)),
            "--prompt" => a.prompt = num(value("--prompt")?, "--prompt")?,
            "--new" => a.new = num(value("--new")?, "--new")?,
            "--passes" => a.passes = num(value("--passes")?, "--passes")?.max(1),
            "--threads" => a.threads = Some(num(value("--threads")?, "--threads")?),
            "--json" => a.json = true,
            "--bf16" => a.bf16 = true,
            "--bf16-inputs" => a.bf16_inputs = true,
            "--bf16-cache" => a.bf16_cache = true,
            "--ids" => {
                let path = PathBuf::from(value("--ids")?);
                let rows = dsc_runtime::cli::logits::read_ids(&path)?;
                let row = rows.into_iter().next().ok_or_else(|| format!("{}: no prompt", path.display()))?;
                a.prompt = row.len();
                a.ids = Some(row);
            }
            "--batches" => a.batches = value("--batches")?.split(',').map(|b| num(b.to_string(), "--batches")).collect::<Result<_, _>>()?,
            // `cargo bench` passes `--bench`; anything else unknown is an error.
            "--bench" => {}
            other => return Err(format!("unknown flag `{other}`")),
        }
    }
    Ok(a)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Random token ids in `1..vocab`, one row per sequence.
fn prompts(batch: usize, len: usize, vocab: usize, seed: u64) -> Vec<Vec<i64>> {
    let mut rng = SplitMix64(seed);
    (0..batch).map(|_| (0..len).map(|_| 1 + (rng.next_u64() % (vocab as u64 - 1)) as i64).collect()).collect()
}

/// The prompt pass over `p` (equal lengths), all logits or the last position's.
fn prefill(b: &dyn Backend, p: &[Vec<i64>], last_logits: bool) -> f64 {
    let t = Instant::now();
    if last_logits { forward_last_logits(b, p) } else { forward(b, p, false) }.expect("prefill");
    t.elapsed().as_secs_f64()
}

fn run<W: Weights>(b: &ReferenceBackend<W>, name: &str, args: &Args) {
    let vocab = b.vocab();
    let p = match &args.ids {
        Some(row) => vec![row.clone()],
        None => prompts(1, args.prompt, vocab, 1),
    };
    // Compile every variant once before timing (the first call of each lowers and optimises).
    prefill(b, &p[..1], true);
    prefill(b, &p[..1], false);
    // With DSC_PROFILE=1 each measurement's time per op kind, as it is made.
    let profile = |what: &str| {
        let r = dsc_runtime::reference::profile::report();
        if !r.is_empty() {
            eprintln!("{what}:\n{r}");
        }
    };
    profile("compilation");
    let (mut all, mut last) = (Vec::new(), Vec::new());
    let mut decode: Vec<Vec<f64>> = vec![Vec::new(); args.batches.len()];
    let mut greedy = Vec::new();
    for pass in 0..args.passes {
        all.push(args.prompt as f64 / prefill(b, &p, false));
        profile("prefill, every position's logits");
        last.push(args.prompt as f64 / prefill(b, &p, true));
        profile("prefill, last position's logits");
        for (i, &batch) in args.batches.iter().enumerate() {
            let ps = if batch == 1 { p.clone() } else { prompts(batch, args.prompt, vocab, 10 + pass as u64) };
            let opts = GenerateOptions { max_new_tokens: args.new, ..GenerateOptions::default() };
            let g = generate(b, &ps, &opts).expect("generate");
            decode[i].push(g.stats.decode_tokens_per_sec());
            profile(&format!("generate at batch {batch} (prompt pass and decode)"));
            if batch == 1 {
                greedy = g.tokens[0].clone();
            }
        }
        eprintln!("pass {} of {} done", pass + 1, args.passes);
    }
    let (a, l) = (median(all), median(last));
    let decode: Vec<f64> = decode.into_iter().map(median).collect();
    if args.json {
        let by_batch: serde_json::Map<String, serde_json::Value> =
            args.batches.iter().zip(&decode).map(|(b, d)| (b.to_string(), serde_json::json!(d))).collect();
        let line = serde_json::json!({
            "tool": "dsc", "prefill_tokens_per_s": l, "prefill_all_tokens_per_s": a, "decode": by_batch,
            "greedy": greedy, "peak_rss_mb": peak_rss_mb(), "threads": rayon::current_num_threads(),
        });
        println!("{line}");
        return;
    }
    println!("{name}: median of {} passes, reference backend, {} threads", args.passes, rayon::current_num_threads());
    println!("  prefill {} tokens, every position's logits   {a:>9.1} tokens/s", args.prompt);
    println!("  prefill {} tokens, last position's logits    {l:>9.1} tokens/s   ({:.2}× the above)", args.prompt, l / a);
    for (&batch, &d) in args.batches.iter().zip(&decode) {
        println!("  decode {} tokens after {} at batch {batch:<3}        {d:>9.1} tokens/s", args.new, args.prompt);
    }
    println!("  peak_rss_mb {:.0}", peak_rss_mb());
}

fn main() {
    let args = parse().unwrap_or_else(|e| {
        eprintln!("{e}");
        std::process::exit(2)
    });
    if let Some(n) = args.threads {
        rayon::ThreadPoolBuilder::new().num_threads(n).build_global().expect("the first pool");
    }
    let compile = CompileOptions::default();
    let options = Options { bf16_inputs: args.bf16_inputs, bf16_cache: args.bf16_cache, ..Options::default() };
    match &args.model {
        Some(dir) => {
            let mut d = ModelDir::open(dir, &OpenOptions::default()).unwrap_or_else(|e| panic!("{e}"));
            d.weights.keep_stored(true);
            let b = ReferenceBackend::new(d.spec, d.weights, compile, options);
            b.weights().preload();
            run(&b, &dir.display().to_string(), &args);
        }
        None => {
            let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/v3_small.dsc");
            let spec = dsc_dsl::load(&path, None).unwrap_or_else(|f| panic!("{}", f.render()));
            let mut weights: HashMap<String, Tensor> = dsc_runtime::train::init::random_weights(&spec, 0).expect("random weights");
            if args.bf16 {
                for t in weights.values_mut() {
                    let bits = t.to_f32_vec().into_iter().map(dsc_runtime::reference::weights::f32_to_bf16).collect();
                    *t = Tensor::bf16_bits(t.shape(), bits);
                }
            }
            let b = ReferenceBackend::new(spec, weights, compile, options);
            run(&b, "runtime/benches/v3_small.dsc (random weights)", &args);
        }
    }
}
