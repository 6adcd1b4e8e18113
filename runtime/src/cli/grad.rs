//! `dsc grad --model DIR --input IDS.json --out GRADS.safetensors [--mtp] [--aux]`: the
//! mean next-token cross-entropy over every position of equal-length sequences and its
//! gradient for every tensor of the checkpoint, under the checkpoint's own names and
//! per-expert layout, plus the scalar `loss` (what transformers' `loss.backward()` gives,
//! for cross-checking). `--mtp` and `--aux` add DeepSeek-V3's multi-token-prediction loss
//! and the spec's balance losses to the objective; `loss` is then that objective.
//! Tensors with no gradient (the selection bias) are written as zeros.

use super::logits::read_ids;
use crate::checkpoint::{ModelDir, OpenOptions};
use crate::output::write_output;
use crate::reference::{Precision, Tensor, Weights};
use crate::train::model::{hub_names, hub_tensors, Terms, TrainModel};
use clap::Args;
use dsc_compiler::passes::autodiff::{Recompute, TrainOptions};
use dsc_compiler::passes::PassSelection;
use std::collections::BTreeMap;
use std::path::PathBuf;

/// `dsc grad`.
#[derive(Args, Debug, Clone)]
pub struct GradArgs {
    /// The model directory (config.json and the weights, as the hub ships them).
    #[arg(long)]
    pub model: PathBuf,
    /// Use this spec instead of importing DIR/config.json.
    #[arg(long)]
    pub spec: Option<PathBuf>,
    /// `{"input_ids": [[...], ...]}`, sequences of equal length; every next token counts.
    #[arg(long)]
    pub input: PathBuf,
    /// Where to write the gradients (safetensors, written atomically).
    #[arg(long)]
    pub out: PathBuf,
    /// `reference` (the CPU interpreter), `wgpu` (the train graph's kernels on the default
    /// wgpu adapter) or `cuda` (device 0; feature `cuda`).
    #[arg(long, default_value = "reference")]
    pub backend: String,
    /// Add the multi-token-prediction loss (λ/D Σ L_k).
    #[arg(long)]
    pub mtp: bool,
    /// Add the balance losses the spec defines.
    #[arg(long)]
    pub aux: bool,
    /// What the backward recomputes instead of storing: none, norms, mla, layer.
    #[arg(long, default_value = "none", value_parser = parse_recompute)]
    pub recompute: Recompute,
}

/// [`TrainModel::run_on`] from the train entry's plan on `engine`.
#[allow(dead_code)] // unused in a build with neither device feature
fn on_device<D>(
    tm: &TrainModel,
    engine: &crate::plan_exec::PlanEngine<D>,
    weights: &dyn Weights,
    batch: [&Tensor; 3],
    terms: Terms,
) -> Result<crate::train::model::GradOutput, String>
where
    D: crate::plan_exec::Device + Send + Sync,
{
    use crate::generate::Engine;
    let plan = engine
        .prepare(&tm.module, dsc_compiler::ir::Mode::Train)
        .map_err(|e| format!("the train graph cannot run on {} yet: {e}", <D as crate::plan_exec::Device>::NAME))?;
    tm.run_on(engine, &plan, weights, batch, terms)
}

/// What `--backend` accepts for gradients.
const GRAD_BACKENDS: &[&str] = &[
    "reference",
    #[cfg(feature = "wgpu")]
    "wgpu",
    #[cfg(feature = "cuda")]
    "cuda",
];

pub fn parse_recompute(s: &str) -> Result<Recompute, String> {
    Recompute::parse(s).ok_or_else(|| format!("unknown recompute policy `{s}`; expected none, norms, mla or layer"))
}

/// `dsc grad`.
pub fn grad_cmd(args: &GradArgs) -> Result<(), String> {
    // Before any work: where the output goes, and that it is none of the inputs.
    crate::output::check_output(&args.out, &super::logits::run_inputs(&args.model, args.spec.as_deref(), &args.input))?;
    if !GRAD_BACKENDS.contains(&args.backend.as_str()) {
        return Err(format!("`--backend {}`: gradients run on {}", args.backend, GRAD_BACKENDS.join(" or ")));
    }
    let rows = read_ids(&args.input)?;
    let s = rows.first().map_or(0, Vec::len);
    if rows.is_empty() || s < 2 || rows.iter().any(|r| r.len() != s) {
        return Err(format!("`{}`: need sequences of one length of at least 2 tokens", args.input.display()));
    }
    let opts = OpenOptions { spec: args.spec.clone(), ..OpenOptions::default() };
    let md = ModelDir::open(&args.model, &opts).map_err(|e| e.to_string())?;
    let vocab = md.spec.model.vocab as i64;
    if let Some(bad) = rows.iter().flatten().find(|&&t| t < 0 || t >= vocab) {
        return Err(format!("`{}`: token id {bad} is outside the vocabulary 0..{vocab}", args.input.display()));
    }
    let train = TrainOptions { recompute: args.recompute, mtp_stop_gradient: false };
    let tm = TrainModel::compile(&md.spec, train, &PassSelection::default())?;
    let b = rows.len();
    let ids: Vec<i64> = rows.concat();
    let pos: Vec<i64> = (0..b * s).map(|i| (i % s) as i64).collect();
    let (ids, pos, labels) = (Tensor::i64(&[b, s], ids.clone()), Tensor::i64(&[b, s], pos), Tensor::i64(&[b, s], ids));
    let terms = Terms { main: 1.0, mtp: if args.mtp { 1.0 } else { 0.0 }, aux: if args.aux { 1.0 } else { 0.0 } };
    let weights: &dyn Weights = &md.weights;
    let batch = [&ids, &pos, &labels];
    let out = match args.backend.as_str() {
        #[cfg(feature = "wgpu")]
        "wgpu" => {
            let engine = crate::wgpu::exec::WgpuEngine::new();
            eprintln!("wgpu adapter: {}", engine.backend().adapter_name());
            on_device(&tm, &engine, weights, batch, terms)?
        }
        #[cfg(feature = "cuda")]
        "cuda" => {
            let engine = crate::cuda::CudaEngine::new(0)?;
            eprintln!("cuda device 0: {}", engine.backend().device_name());
            on_device(&tm, &engine, weights, batch, terms)?
        }
        _ => tm.run(weights, batch, terms, Precision::F32).map_err(|e| e.to_string())?,
    };

    let mut tensors: BTreeMap<String, Tensor> = hub_tensors(out.grads);
    // Every stored tensor gets an entry: the ones without a gradient are zeros.
    for name in md.weights.names() {
        if let Some(w) = md.weights.get(name) {
            for (hub, shape) in hub_names(name, w.shape()) {
                tensors.entry(hub).or_insert_with(|| Tensor::zeros(&shape));
            }
        }
    }
    tensors.insert("loss".into(), Tensor::scalar(out.objective as f32));
    let bytes: Vec<(String, Vec<u8>, Vec<usize>)> =
        tensors.into_iter().map(|(k, t)| (k, t.to_f32_vec().iter().flat_map(|x| x.to_le_bytes()).collect(), t.shape().to_vec())).collect();
    let views = bytes
        .iter()
        .map(|(k, b, shape)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), b)
                .map(|v| (k.as_str(), v))
                .map_err(|e| e.to_string())
        })
        .collect::<Result<Vec<_>, _>>()?;
    let file = safetensors::tensor::serialize(views, None).map_err(|e| format!("cannot serialise the gradients: {e}"))?;
    write_output(&args.out, &file)?;
    eprintln!("loss {:.6} ({} tensors) → {}", out.objective, bytes.len(), args.out.display());
    Ok(())
}
