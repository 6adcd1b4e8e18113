//! Model directories as the hub ships them: `config.json`, the weights
//! (`model.safetensors`, or shards named by `model.safetensors.index.json`), and the
//! optional `generation_config.json` and `tokenizer.json`.
//!
//! [`ModelDir::open`] does everything that can fail before a run starts:
//!
//! 1. the spec: `--spec FILE` when the user has one, else `config.json` imported as
//!    `dsc import` does (both the legacy `rope_scaling` and the transformers-5
//!    `rope_parameters` layouts);
//! 2. the files: memory-mapped, headers parsed and checked against the file sizes, so a
//!    truncated or corrupt file is an error here ([`files`]);
//! 3. the tensors against the spec: the params the lowered module reads
//!    ([`dsc_compiler::lower`]) must all be there with their shapes; hub names map to them
//!    as [`layout`] describes (per-expert, fused and stacked experts, FP8 block scales,
//!    MTP layers). Missing, unexpected and mis-shaped tensors come back together in one
//!    [`CheckpointError::Tensors`].
//!
//! No tensor is decoded then: [`CheckpointWeights`] decodes each param on first use
//! (`f32`, `bf16`, `f16`, and FP8 e4m3 dequantised by its `weight_scale_inv` blocks) and
//! keeps it. `e_score_correction_bias` stays in `f32` like every other param: the
//! reference backend computes in `f32` throughout and never narrows a weight.

pub mod error;
pub mod files;
pub mod layout;
pub mod store;
#[cfg(test)]
mod tests;

pub use error::{CheckpointError, TensorReport};
pub use store::CheckpointWeights;

use dsc_compiler::ir::{param_path, Function, Mode, Module, Op};
use dsc_dsl::Spec;
use layout::{Expect, Facts};
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// How to open a model directory; the defaults read everything from the directory.
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// A spec file to use instead of importing the directory's `config.json`.
    pub spec: Option<PathBuf>,
    /// Which model of the spec file (default: its only one).
    pub spec_model: Option<String>,
    /// The config to import instead of `DIR/config.json` (e.g. the legacy-layout copy).
    pub config: Option<PathBuf>,
}

/// What `generation_config.json` (or `config.json`) says about special tokens.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerationConfig {
    /// Tokens that end a sequence (`eos_token_id`, one id or a list).
    pub eos: Vec<i64>,
    pub bos: Option<i64>,
    pub pad: Option<i64>,
    /// Values that were present but unusable (a string, a float, a negative id), each
    /// with its file; the commands print them.
    pub warnings: Vec<String>,
}

/// An opened model directory: its spec, its checked weights, and its extras.
pub struct ModelDir {
    pub dir: PathBuf,
    pub spec: Spec,
    pub weights: CheckpointWeights,
    pub generation: GenerationConfig,
    /// `DIR/tokenizer.json`, when there is one.
    pub tokenizer: Option<PathBuf>,
    /// `config.json`'s `max_position_embeddings`: the longest sequence the model was
    /// made for (RoPE positions past it were never trained, and YaRN is scaled to it).
    pub max_positions: Option<u64>,
}

impl ModelDir {
    /// Opens `dir`: the spec, the files, and the tensors checked against the spec.
    pub fn open(dir: &Path, opts: &OpenOptions) -> Result<ModelDir, CheckpointError> {
        let config_path = opts.config.clone().unwrap_or_else(|| dir.join("config.json"));
        let config = read_json(&config_path, opts.spec.is_none())?;
        let spec = match &opts.spec {
            Some(path) => dsc_dsl::load(path, opts.spec_model.as_deref()).map_err(|f| CheckpointError::config(path, f.render()))?,
            None => {
                // A model named after the directory, as `dsc import DIR/config.json` names it.
                let name = dsc_dsl::import::model_name_for(&dir.join("config.json"));
                let model = dsc_dsl::import::import_hf_config_file(&config_path, Some(&name)).map_err(|e| {
                    // The importer already names the file.
                    let shown = format!("{}: ", config_path.display());
                    CheckpointError::config(&config_path, e.strip_prefix(&shown).unwrap_or(&e))
                })?;
                let text = dsc_dsl::print::print_model(&model);
                dsc_dsl::load_str(&config_path, &text, None).map_err(|f| CheckpointError::config(&config_path, f.render()))?
            }
        };
        let block = block_size(config.as_ref(), &config_path)?;
        let gen_path = dir.join("generation_config.json");
        let gen_json = read_json(&gen_path, false)?;
        let generation = generation_config(&[(&gen_path, gen_json.as_ref()), (&config_path, config.as_ref())]);

        let expected = expected_params(&spec).map_err(|e| CheckpointError::config(&config_path, e))?;
        let shards = files::open_all(dir)?;
        let m = &spec.model;
        let facts = Facts { layers: m.layers, mtp_depth: m.mtp.as_ref().map_or(0, |t| t.depth), tie_embeddings: m.tie_embeddings, block };
        let mut report = TensorReport { dir: dir.to_path_buf(), model: m.name.clone(), ..TensorReport::default() };
        let plan = layout::plan(&shards, &expected, &facts, &mut report);
        if !report.is_empty() {
            report.sort();
            return Err(CheckpointError::Tensors(Box::new(report)));
        }
        let tokenizer = Some(dir.join("tokenizer.json")).filter(|p| p.is_file());
        let max_positions = config.as_ref().and_then(|c| c.get("max_position_embeddings")).and_then(Value::as_u64).filter(|&n| n > 0);
        let weights = CheckpointWeights::new(shards, plan, block);
        Ok(ModelDir { dir: dir.to_path_buf(), spec, weights, generation, tokenizer, max_positions })
    }
}

/// A JSON file, or `None` when it is absent and optional.
fn read_json(path: &Path, required: bool) -> Result<Option<Value>, CheckpointError> {
    if !path.is_file() {
        return if required { Err(CheckpointError::io(path, "no such file")) } else { Ok(None) };
    }
    let text = dsc_dsl::files::read_text(path, dsc_dsl::files::JSON_LIMIT).map_err(|e| CheckpointError::io(path, e))?;
    serde_json::from_str(&text).map(Some).map_err(|e| CheckpointError::config(path, format!("not valid JSON: {e}")))
}

/// `quantization_config.weight_block_size`, 128×128 when not given (DeepSeek-V3/R1).
fn block_size(config: Option<&Value>, path: &Path) -> Result<[usize; 2], CheckpointError> {
    let Some(b) = config.and_then(|c| c.get("quantization_config")).and_then(|q| q.get("weight_block_size")) else {
        return Ok([128, 128]);
    };
    match b.as_array().map(|a| a.iter().map(|x| x.as_u64().filter(|&v| v > 0)).collect::<Option<Vec<u64>>>()) {
        Some(Some(v)) if v.len() == 2 => Ok([v[0] as usize, v[1] as usize]),
        _ => Err(CheckpointError::config(path, format!("`quantization_config.weight_block_size` must be two positive integers, got {b}"))),
    }
}

/// Special tokens from `generation_config.json`, each key falling back to `config.json`
/// (which has the same keys) where the first lacks it or holds something that is not a
/// token id or a list of them; such a value is named in a warning, never used.
fn generation_config(sources: &[(&Path, Option<&Value>)]) -> GenerationConfig {
    let mut warnings = Vec::new();
    let mut ids = |k: &str| -> Vec<i64> {
        for (path, json) in sources {
            let Some(v) = json.and_then(|j| j.get(k)) else { continue };
            let id = |x: &Value| x.as_i64().filter(|&i| i >= 0);
            let parsed = match v {
                Value::Null => continue,
                Value::Array(a) => a.iter().map(id).collect::<Option<Vec<i64>>>(),
                x => id(x).map(|i| vec![i]),
            };
            match parsed {
                Some(ids) => return ids,
                None => {
                    let mut shown = v.to_string();
                    if shown.len() > 60 {
                        let mut cut = 60;
                        while !shown.is_char_boundary(cut) {
                            cut -= 1;
                        }
                        shown = format!("{}…", &shown[..cut]);
                    }
                    warnings.push(format!("{}: `{k}` is {shown}, not a token id or a list of them; ignored", path.display()));
                }
            }
        }
        Vec::new()
    };
    let eos = ids("eos_token_id");
    let bos = ids("bos_token_id").first().copied();
    let pad = ids("pad_token_id").first().copied();
    GenerationConfig { eos, bos, pad, warnings }
}

/// Every param the spec's lowered module reads, by checkpoint name, with its shape;
/// `required` when prefill or decode reads it (not only training's MTP modules).
pub fn expected_params(spec: &Spec) -> Result<HashMap<String, Expect>, String> {
    let module = dsc_compiler::lower::lower(spec).map_err(|e| e.to_string())?;
    let mut out: HashMap<String, Expect> = HashMap::new();
    for mode in Mode::ALL {
        let Some(entry) = module.entry(mode) else { continue };
        let required = mode != Mode::Train;
        visit_params(&module, entry, None, &mut |name, shape| {
            let e = out.entry(name.clone()).or_insert(Expect { shape: shape.clone(), required });
            e.required |= required;
            if e.shape != shape {
                return Err(format!("the lowered module reads `{name}` as both {:?} and {shape:?}", e.shape));
            }
            Ok(())
        })?;
    }
    Ok(out)
}

/// Calls `f(full name, shape)` for every param `func` and its callees read.
fn visit_params(
    module: &Module,
    func: &Function,
    layer: Option<u32>,
    f: &mut dyn FnMut(String, Vec<usize>) -> Result<(), String>,
) -> Result<(), String> {
    let g = &func.graph;
    for n in g.nodes() {
        match &g.node(n).op {
            Op::Param { name } => {
                let full = param_path(layer, name);
                let shape: Option<Vec<usize>> =
                    g.node(n).ty().shape.0.iter().map(|d| d.as_const().and_then(|v| usize::try_from(v).ok())).collect();
                let shape = shape.ok_or_else(|| format!("param `{full}` has a symbolic shape"))?;
                f(full, shape)?;
            }
            Op::Call { function, layer: l } => {
                let callee = module.function(function).ok_or_else(|| format!("no function `{function}`"))?;
                visit_params(module, callee, l.or(layer), f)?;
            }
            _ => {}
        }
    }
    Ok(())
}
