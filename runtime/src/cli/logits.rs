//! `dsc logits --model DIR --input IDS.json --out OUT.safetensors [--backend reference]`:
//! one full forward pass over equal-length sequences (positions from 0), written as
//! `logits`, `f32 [batch, seq, vocab]`, to a safetensors file.
//!
//! `IDS.json` is `{"input_ids": [[...], ...]}` (other keys are ignored, so the fixtures'
//! `input_ids.json` works as it is).

use crate::checkpoint::{CheckpointWeights, ModelDir, OpenOptions};
use crate::generate::{forward, Backend, CompileOptions, ReferenceBackend, BACKENDS};
use crate::output::write_output;
use crate::reference::Options;
use clap::Args;
use dsc_compiler::passes::mla_absorb::MlaMode;
use dsc_compiler::passes::PassSelection;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Where the model comes from and how it runs: shared by `logits` and `generate`.
#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// The model directory: config.json (or spec.dsc), model.safetensors (or shards with
    /// their index), and optionally generation_config.json and tokenizer.json.
    #[arg(long)]
    pub model: PathBuf,
    /// Use this spec instead of importing DIR/config.json.
    #[arg(long)]
    pub spec: Option<PathBuf>,
    /// Which model of the spec file (default: its only one).
    #[arg(long, requires = "spec")]
    pub spec_model: Option<String>,
    /// The backend to run on: `reference` (the CPU interpreter), `wgpu` (the compiled
    /// kernels on a wgpu adapter) or `cuda` (the same on an NVIDIA GPU; feature `cuda`).
    #[arg(long, default_value = "reference", value_parser = crate::generate::parse_backend)]
    pub backend: String,
    /// The wgpu adapter: `default`, `cpu`, `discrete[:N]`, `integrated[:N]`, `virtual[:N]`.
    #[arg(long, default_value = "default")]
    pub adapter: String,
    /// The CUDA device index for `--backend cuda` (default 0).
    #[arg(long, allow_negative_numbers = true, value_parser = super::unsigned::<usize>)]
    pub device: Option<usize>,
    /// Turn compiler passes off (`-cse`) or on, comma-separated, as `dsc compile`.
    #[arg(long, allow_hyphen_values = true)]
    pub passes: Option<String>,
    /// MLA attention absorbed, decompressed (as Hugging Face runs it), or as the cost
    /// model decides per entry point.
    #[arg(long, default_value = "auto", value_parser = MlaMode::parse)]
    pub mla: MlaMode,
    /// Threads for the run, 1 to the number of cores (default: all cores).
    #[arg(long, allow_negative_numbers = true, value_parser = super::unsigned::<usize>)]
    pub threads: Option<usize>,
    /// The longest sequence accepted, prompt and new tokens together (default: the
    /// model's `max_position_embeddings` from DIR/config.json). Raise it to run past the
    /// context the model was trained for.
    #[arg(long, allow_negative_numbers = true, value_parser = super::unsigned::<u64>)]
    pub max_context: Option<u64>,
    /// With the reference backend, matmuls whose weight is bf16 round their input to bf16
    /// and sum the exact products in f32, as a GPU's bf16 kernels do; the prompt pass then
    /// multiplies with AVX-512 BF16 where the CPU has it (about 1.3-1.8x the f32 matmul).
    /// Logits move by about what bf16 activations cost (README: "CPU precision").
    #[arg(long)]
    pub bf16_inputs: bool,
    /// With the reference backend, hold the KV cache in bf16 between decode steps: half
    /// its memory, at the cost of rounding what it holds (README: "CPU precision").
    #[arg(long)]
    pub bf16_cache: bool,
}

/// The files a run over a model directory reads: the directory's files, the spec that
/// replaces its config, and the input; what its output may not be.
pub(super) fn run_inputs(model: &Path, spec: Option<&Path>, input: &Path) -> Vec<PathBuf> {
    let mut inputs = crate::output::files_in(model);
    inputs.push(input.to_path_buf());
    inputs.extend(spec.map(Path::to_path_buf));
    inputs
}

/// `dsc logits`.
#[derive(Args, Debug, Clone)]
pub struct LogitsArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// `{"input_ids": [[...], ...]}`, sequences of equal length.
    #[arg(long)]
    pub input: PathBuf,
    /// Where to write `logits` (safetensors, written atomically).
    #[arg(long)]
    pub out: PathBuf,
}

/// An opened model on its backend.
pub struct Loaded {
    pub backend: Box<dyn Backend>,
    pub info: ModelInfo,
}

/// What the commands need of the [`ModelDir`] once its weights went to the backend.
pub struct ModelInfo {
    pub generation: crate::checkpoint::GenerationConfig,
    pub tokenizer: Option<PathBuf>,
    /// The weights the backend reads, for memory reports.
    pub weights: Arc<CheckpointWeights>,
    /// The longest sequence a run may reach (`--max-context`, else the model's), and
    /// where that figure comes from.
    pub max_context: Option<(u64, String)>,
}

impl ModelInfo {
    /// Refuses a run whose sequences reach `len` positions past [`ModelInfo::max_context`]:
    /// an error naming both numbers, not a silent extrapolation (and, on a long enough
    /// input, not an allocation the machine cannot make).
    pub fn check_context(&self, len: usize, what: &str) -> Result<(), String> {
        match &self.max_context {
            Some((max, from)) if len as u64 > *max => {
                Err(format!("{what} reaches {len} positions, more than the {max} of {from}; pass --max-context {len} to run it anyway"))
            }
            _ => Ok(()),
        }
    }
}

/// Opens the model directory and puts it on the chosen backend.
pub fn load(args: &ModelArgs) -> Result<Loaded, String> {
    if !BACKENDS.contains(&args.backend.as_str()) {
        return Err(format!("unknown backend `{}`; available: {}", args.backend, BACKENDS.join(", ")));
    }
    let passes = PassSelection::parse(args.passes.as_deref().unwrap_or("")).map_err(|e| format!("--passes: {e}"))?;
    let opts = OpenOptions { spec: args.spec.clone(), spec_model: args.spec_model.clone(), config: None };
    let mut dir = ModelDir::open(&args.model, &opts).map_err(|e| e.to_string())?;
    // Inference keeps weights in their stored precision (bf16, f16, FP8 with its block
    // scales): a half or a quarter of the memory, and the matmuls widen them a block at a
    // time (to the values the f32 path would have: bf16 and f16 exactly, FP8 dequantised).
    dir.weights.keep_stored(true);
    let weights = Arc::new(dir.weights);
    let max_context = match (args.max_context, dir.max_positions) {
        (Some(n), _) => Some((n, "--max-context".to_string())),
        (None, Some(n)) => Some((n, format!("the model's max_position_embeddings ({})", dir.dir.join("config.json").display()))),
        (None, None) => None,
    };
    let rest = ModelInfo { generation: dir.generation, tokenizer: dir.tokenizer, weights: weights.clone(), max_context };
    // One pool for the whole command: `Options::threads` would build a pool per step.
    if let Some(n) = args.threads {
        // More threads than cores only adds switching; a typo like 100000 would spend
        // half a minute spawning them. Bounded by the machine, with the numbers named.
        let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
        if n == 0 || n > cores {
            return Err(format!("--threads {n}: expected 1 to {cores} (the cores this machine offers)"));
        }
        rayon::ThreadPoolBuilder::new().num_threads(n).build_global().map_err(|e| format!("--threads {n}: {e}"))?;
    }
    for (on, flag) in [(args.bf16_inputs, "--bf16-inputs"), (args.bf16_cache, "--bf16-cache")] {
        if on && args.backend != "reference" {
            return Err(format!(
                "{flag} applies to the reference backend; `--backend {}` runs its kernels in the spec's dtype",
                args.backend
            ));
        }
    }
    let compile = CompileOptions { passes, mla: args.mla };
    let backend: Box<dyn Backend> = match args.backend.as_str() {
        #[cfg(feature = "wgpu")]
        "wgpu" => {
            let device = crate::wgpu::WgpuBackend::with_adapter(&args.adapter)?;
            eprintln!("wgpu adapter: {}", device.adapter_name());
            let engine = crate::wgpu::exec::WgpuEngine::on(device);
            Box::new(crate::generate::ModelBackend::with_engine(dir.spec, weights, compile, engine))
        }
        #[cfg(feature = "cuda")]
        "cuda" => {
            let index = args.device.unwrap_or(0);
            let engine = crate::cuda::CudaEngine::new(index)?;
            eprintln!("cuda device {index}: {}", engine.backend().device_name());
            Box::new(crate::generate::ModelBackend::with_engine(dir.spec, weights, compile, engine))
        }
        _ => Box::new(ReferenceBackend::new(
            dir.spec,
            weights,
            compile,
            Options { bf16_inputs: args.bf16_inputs, bf16_cache: args.bf16_cache, ..Options::default() },
        )),
    };
    Ok(Loaded { backend, info: rest })
}

/// Reads `{"input_ids": [[...], ...]}` (a single flat list is one sequence).
pub fn read_ids(path: &Path) -> Result<Vec<Vec<i64>>, String> {
    let text = dsc_dsl::files::read_text(path, dsc_dsl::files::JSON_LIMIT).map_err(|e| format!("cannot read `{}`: {e}", path.display()))?;
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| format!("`{}`: not valid JSON: {e}", path.display()))?;
    let bad = || format!("`{}`: expected {{\"input_ids\": [[token ids...], ...]}}", path.display());
    let rows = json.get("input_ids").and_then(|v| v.as_array()).ok_or_else(bad)?;
    let as_ids = |r: &serde_json::Value| -> Option<Vec<i64>> { r.as_array()?.iter().map(|x| x.as_i64()).collect() };
    if rows.iter().all(|r| r.is_i64()) && !rows.is_empty() {
        return Ok(vec![rows.iter().filter_map(|x| x.as_i64()).collect()]);
    }
    rows.iter().map(as_ids).collect::<Option<Vec<_>>>().ok_or_else(bad)
}

/// `dsc logits`.
pub fn logits_cmd(args: &LogitsArgs) -> Result<(), String> {
    // Before any work: where the output goes, and that it is none of the inputs.
    crate::output::check_output(&args.out, &run_inputs(&args.model.model, args.model.spec.as_deref(), &args.input))?;
    let ids = read_ids(&args.input)?;
    let loaded = load(&args.model)?;
    loaded.info.check_context(ids.iter().map(Vec::len).max().unwrap_or(0), "the input")?;
    let out = forward(loaded.backend.as_ref(), &ids, false).map_err(|e| e.to_string())?;
    let t = &out.logits;
    let data = t.as_f32().ok_or("the backend returned non-f32 logits")?;
    let bytes: Vec<u8> = data.iter().flat_map(|x| x.to_le_bytes()).collect();
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, t.shape().to_vec(), &bytes).map_err(|e| e.to_string())?;
    let file = safetensors::tensor::serialize([("logits", view)], None).map_err(|e| format!("cannot serialise the logits: {e}"))?;
    write_output(&args.out, &file)
}
