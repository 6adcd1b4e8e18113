//! Training checkpoints: `RUN_DIR/checkpoint-N/` and `RUN_DIR/final/`, each a model
//! directory in the hub's layout (what `dsc generate --model` and transformers open)
//! plus the optimizer and trainer state to resume from.
//!
//! ```text
//! config.json            the source model's (or the spec's, exported), weights marked f32
//! spec.dsc               the resolved spec trained, training-only settings included
//! model.safetensors      f32, hub names: routed experts one by one
//!                        (`mlp.experts.{e}.gate_proj.weight`), MTP layers with their copies
//!                        of the embedding and head as DeepSeek-V3 stores them
//! optimizer.safetensors  AdamW's `exp_avg.NAME` and `exp_avg_sq.NAME` under IR names;
//!                        per-param step counts in the metadata (`steps`)
//! trainer_state.json     step, data cursor (with the shuffling RNG's state), recipe hash
//! ```
//!
//! (plus the source directory's tokenizer and generation config, copied). The directory
//! appears whole or not at all: it is written as `NAME.tmp-PID-K/`, every file synced,
//! then renamed; a resume ignores `*.tmp-*`. An existing directory of the same name is
//! replaced only once the new one is complete.

use super::data::Cursor;
use super::optim::{OptimizerState, ParamState};
use super::TrainError;
use crate::reference::Tensor;
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

pub const MODEL: &str = "model.safetensors";
pub const OPTIMIZER: &str = "optimizer.safetensors";
pub const STATE: &str = "trainer_state.json";
pub const CONFIG: &str = "config.json";
pub const SPEC: &str = "spec.dsc";
/// GRPO's reference policy (IR names, f32), when the run has one.
pub const REFERENCE: &str = "ref_model.safetensors";
/// Files of the source model directory copied into every checkpoint when present.
pub const COPIED: [&str; 4] = ["generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"];

/// Where the loop stands, saved as `trainer_state.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps taken.
    pub step: u64,
    /// The data order: epoch, index, and the state of the RNG that shuffles.
    pub cursor: Cursor,
    /// [`super::recipe::Recipe::hash`] of the recipe that made the run.
    pub recipe_hash: String,
}

/// How the checkpoints describe the model, besides its weights.
#[derive(Debug, Clone, Default)]
pub struct ModelFiles {
    /// `config.json`; [`ModelFiles::new`] marks it as holding f32 weights.
    pub config: Value,
    /// `spec.dsc`.
    pub spec_text: String,
    /// Layers of the main model and MTP depth: the MTP layers are `layers..layers+depth`.
    pub layers: u64,
    pub mtp_depth: u64,
    /// Other files copied verbatim: (name, bytes).
    pub extra: Vec<(String, Vec<u8>)>,
}

impl ModelFiles {
    /// For `spec`, with `config` (the source directory's or the exported one) changed to
    /// say what the files hold: f32 weights, not quantised.
    pub fn new(spec: &dsc_dsl::Spec, mut config: Value, extra: Vec<(String, Vec<u8>)>) -> ModelFiles {
        if let Some(c) = config.as_object_mut() {
            c.remove("quantization_config");
            let key = if c.contains_key("dtype") { "dtype" } else { "torch_dtype" };
            c.insert(key.into(), Value::from("float32"));
        }
        let m = &spec.model;
        ModelFiles {
            config,
            spec_text: dsc_dsl::print::print_model(m),
            layers: m.layers,
            mtp_depth: m.mtp.as_ref().map_or(0, |t| t.depth),
            extra,
        }
    }
}

/// A checkpoint read back.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub dir: PathBuf,
    pub weights: HashMap<String, Tensor>,
    pub optimizer: OptimizerState,
    pub state: TrainerState,
    /// GRPO's reference policy, when the checkpoint holds one.
    pub reference: Option<HashMap<String, Tensor>>,
}

/// The hub name and layout of every weight: stacked experts split, MTP copies added.
pub fn hub_tensors(weights: &HashMap<String, Tensor>, files: &ModelFiles) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let mut out = Vec::new();
    for (name, t) in weights {
        // Stacked experts `[E, i, h]` become E tensors `[i, h]` (`hub_names`).
        let parts = super::model::hub_names(name, t.shape());
        let v = t.to_f32_vec();
        let each = v.len() / parts.len();
        for (i, (hub, shape)) in parts.into_iter().enumerate() {
            out.push((hub, shape, v[i * each..(i + 1) * each].to_vec()));
        }
    }
    // DeepSeek-V3 stores each MTP layer's (shared) embedding and head with it.
    let head = weights.get("lm_head.weight").or_else(|| weights.get("model.embed_tokens.weight"));
    if let (Some(emb), Some(head)) = (weights.get("model.embed_tokens.weight"), head) {
        for l in files.layers..files.layers + files.mtp_depth {
            if weights.keys().any(|n| n.starts_with(&format!("model.layers.{l}."))) {
                out.push((format!("model.layers.{l}.embed_tokens.weight"), emb.shape().to_vec(), emb.to_f32_vec()));
                out.push((format!("model.layers.{l}.shared_head.head.weight"), head.shape().to_vec(), head.to_f32_vec()));
            }
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Writes the checkpoint `run_dir/name` atomically and returns its path.
pub fn save(
    run_dir: &Path,
    name: &str,
    weights: &HashMap<String, Tensor>,
    optimizer: &OptimizerState,
    state: &TrainerState,
    files: &ModelFiles,
) -> Result<PathBuf, TrainError> {
    save_with_reference(run_dir, name, weights, optimizer, state, files, None)
}

/// [`save`], with GRPO's reference policy in `ref_model.safetensors` when given (it moves
/// with `ref_sync_steps`, so a resumed run needs it back).
pub fn save_with_reference(
    run_dir: &Path,
    name: &str,
    weights: &HashMap<String, Tensor>,
    optimizer: &OptimizerState,
    state: &TrainerState,
    files: &ModelFiles,
    reference: Option<&HashMap<String, Tensor>>,
) -> Result<PathBuf, TrainError> {
    let final_dir = run_dir.join(name);
    let tmp = TempDir::create(run_dir, name)?;
    let t = &tmp.0;
    let model = safetensors_bytes(hub_tensors(weights, files), BTreeMap::new(), &t.join(MODEL))?;
    write_synced(&t.join(MODEL), &model)?;
    let mut opt = Vec::new();
    let mut steps = BTreeMap::new();
    for (n, s) in &optimizer.params {
        let shape = weights.get(n).map(|w| w.shape().to_vec()).unwrap_or_else(|| vec![s.exp_avg.len()]);
        opt.push((format!("exp_avg.{n}"), shape.clone(), s.exp_avg.clone()));
        opt.push((format!("exp_avg_sq.{n}"), shape, s.exp_avg_sq.clone()));
        steps.insert(n.clone(), s.step);
    }
    let meta = BTreeMap::from([("steps".to_string(), serde_json::to_string(&steps).expect("a map serialises"))]);
    write_synced(&t.join(OPTIMIZER), &safetensors_bytes(opt, meta, &t.join(OPTIMIZER))?)?;
    if let Some(r) = reference {
        let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> =
            r.iter().map(|(n, t)| (n.clone(), t.shape().to_vec(), t.to_f32_vec())).collect();
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        write_synced(&t.join(REFERENCE), &safetensors_bytes(tensors, BTreeMap::new(), &t.join(REFERENCE))?)?;
    }
    write_synced(&t.join(STATE), pretty(state).as_bytes())?;
    write_synced(&t.join(CONFIG), pretty(&files.config).as_bytes())?;
    write_synced(&t.join(SPEC), files.spec_text.as_bytes())?;
    for (n, bytes) in &files.extra {
        write_synced(&t.join(n), bytes)?;
    }
    sync_dir(t)?;
    tmp.commit(&final_dir)?;
    Ok(final_dir)
}

/// Pretty JSON with a final newline.
fn pretty<T: Serialize>(v: &T) -> String {
    serde_json::to_string_pretty(v).expect("plain data serialises") + "\n"
}

fn safetensors_bytes(
    tensors: Vec<(String, Vec<usize>, Vec<f32>)>,
    mut meta: BTreeMap<String, String>,
    path: &Path,
) -> Result<Vec<u8>, TrainError> {
    // transformers checks the format before it loads a file.
    meta.insert("format".into(), "pt".into());
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> =
        tensors.into_iter().map(|(n, s, v)| (n, s, v.iter().flat_map(|x| x.to_le_bytes()).collect())).collect();
    let views = bytes
        .iter()
        .map(|(n, s, b)| TensorView::new(Dtype::F32, s.clone(), b).map(|v| (n.clone(), v)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TrainError::io(path, e))?;
    safetensors::tensor::serialize(views, Some(meta.into_iter().collect())).map_err(|e| TrainError::io(path, e))
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), TrainError> {
    let mut f = File::create(path).map_err(|e| TrainError::io(path, e))?;
    f.write_all(bytes).and_then(|()| f.sync_all()).map_err(|e| TrainError::io(path, e))
}

fn sync_dir(dir: &Path) -> Result<(), TrainError> {
    File::open(dir).and_then(|f| f.sync_all()).map_err(|e| TrainError::io(dir, e))
}

/// A directory being written, removed on drop unless committed.
struct TempDir(PathBuf);

impl TempDir {
    fn create(parent: &Path, name: &str) -> Result<TempDir, TrainError> {
        let pid = std::process::id();
        for k in 0..1000 {
            let p = parent.join(format!("{name}.tmp-{pid}-{k}"));
            match std::fs::create_dir(&p) {
                Ok(()) => return Ok(TempDir(p)),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(TrainError::io(&p, e)),
            }
        }
        Err(TrainError::io(parent, format!("cannot create a temporary directory for `{name}`")))
    }

    /// Renames the directory to `to`. An existing `to` is moved aside first and removed
    /// only once the new directory is in place.
    fn commit(self, to: &Path) -> Result<(), TrainError> {
        let parent = to.parent().unwrap_or(Path::new("."));
        let aside = if to.exists() {
            let a = TempDir::create(parent, &format!("{}.replaced", to.file_name().unwrap_or_default().to_string_lossy()))?;
            std::fs::remove_dir(&a.0).map_err(|e| TrainError::io(&a.0, e))?;
            std::fs::rename(to, &a.0).map_err(|e| TrainError::io(to, e))?;
            Some(a)
        } else {
            None
        };
        if let Err(e) = std::fs::rename(&self.0, to) {
            if let Some(a) = &aside {
                let _ = std::fs::rename(&a.0, to);
            }
            return Err(TrainError::io(to, e));
        }
        std::mem::forget(self);
        // `aside` is removed as it drops.
        drop(aside);
        sync_dir(parent)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The complete checkpoint of `run_dir` with the most steps (`checkpoint-N/` or
/// `final/`), ignoring directories still being written (`*.tmp-*`).
pub fn latest(run_dir: &Path) -> Result<Option<PathBuf>, TrainError> {
    let entries = std::fs::read_dir(run_dir).map_err(|e| TrainError::io(run_dir, e))?;
    let mut best: Option<(u64, PathBuf)> = None;
    for e in entries {
        let e = e.map_err(|e| TrainError::io(run_dir, e))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if name.contains(".tmp-") || !(name == "final" || name.strip_prefix("checkpoint-").is_some_and(|n| n.parse::<u64>().is_ok())) {
            continue;
        }
        let state = e.path().join(STATE);
        if !state.is_file() {
            continue;
        }
        let step = read_state(&state)?.step;
        if best.as_ref().is_none_or(|(s, _)| step > *s) {
            best = Some((step, e.path()));
        }
    }
    Ok(best.map(|(_, p)| p))
}

fn read_state(path: &Path) -> Result<TrainerState, TrainError> {
    let text = std::fs::read_to_string(path).map_err(|e| TrainError::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| TrainError::invalid(format!("{}: not a trainer state: {e}", path.display())))
}

/// Reads a checkpoint written by [`save`]: weights under IR names (experts stacked again,
/// the MTP layers' copies of the embedding and head dropped), optimizer and trainer state.
pub fn load(dir: &Path) -> Result<Loaded, TrainError> {
    let state = read_state(&dir.join(STATE))?;
    let mut stacked: BTreeMap<String, BTreeMap<usize, Tensor>> = BTreeMap::new();
    let mut weights = HashMap::new();
    for (name, t) in read_f32(&dir.join(MODEL))?.1 {
        if let ["model", "layers", _, "embed_tokens" | "shared_head", ..] = name.split('.').collect::<Vec<_>>()[..] {
            if name.ends_with(".embed_tokens.weight") || name.ends_with(".shared_head.head.weight") {
                continue;
            }
        }
        match name.split_once(".mlp.experts.").and_then(|(h, r)| r.split_once('.').map(|(e, rest)| (h, e, rest))) {
            Some((head, e, rest)) if e.parse::<usize>().is_ok() => {
                stacked.entry(format!("{head}.mlp.experts.{rest}")).or_default().insert(e.parse().expect("checked"), t);
            }
            _ => {
                weights.insert(name, t);
            }
        }
    }
    for (name, experts) in stacked {
        let first = experts.values().next().expect("at least one").shape().to_vec();
        if experts.keys().copied().ne(0..experts.len()) || experts.values().any(|t| t.shape() != first.as_slice()) {
            return Err(TrainError::invalid(format!(
                "{}: the experts of `{name}` are not 0..{} of one shape",
                dir.join(MODEL).display(),
                experts.len()
            )));
        }
        let mut shape = vec![experts.len()];
        shape.extend(&first);
        let data: Vec<f32> = experts.values().flat_map(|t| t.to_f32_vec()).collect();
        weights.insert(name, Tensor::f32(&shape, data));
    }

    let opt_path = dir.join(OPTIMIZER);
    let (meta, tensors) = read_f32(&opt_path)?;
    let bad = |m: String| TrainError::invalid(format!("{}: {m}", opt_path.display()));
    let steps: BTreeMap<String, u64> = meta
        .get("steps")
        .map(|s| serde_json::from_str(s))
        .transpose()
        .map_err(|e| bad(format!("bad `steps` metadata: {e}")))?
        .unwrap_or_default();
    let mut tensors: HashMap<String, Tensor> = tensors.into_iter().collect();
    let mut optimizer = OptimizerState::default();
    for (n, step) in steps {
        let (Some(m), Some(v)) = (tensors.remove(&format!("exp_avg.{n}")), tensors.remove(&format!("exp_avg_sq.{n}"))) else {
            return Err(bad(format!("no `exp_avg.{n}` and `exp_avg_sq.{n}`")));
        };
        optimizer.params.insert(n, ParamState { step, exp_avg: m.to_f32_vec(), exp_avg_sq: v.to_f32_vec() });
    }
    if let Some(stray) = tensors.keys().next() {
        return Err(bad(format!("`{stray}` has no step count")));
    }
    let ref_path = dir.join(REFERENCE);
    let reference = if ref_path.is_file() { Some(read_f32(&ref_path)?.1.into_iter().collect()) } else { None };
    Ok(Loaded { dir: dir.to_path_buf(), weights, optimizer, state, reference })
}

/// The metadata and `f32` tensors of a safetensors file.
type F32File = (HashMap<String, String>, Vec<(String, Tensor)>);

fn read_f32(path: &Path) -> Result<F32File, TrainError> {
    let bytes = std::fs::read(path).map_err(|e| TrainError::io(path, e))?;
    let bad = |e: String| TrainError::invalid(format!("{}: {e}", path.display()));
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| bad(e.to_string()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| bad(e.to_string()))?;
    let mut out = Vec::new();
    for (name, t) in st.tensors() {
        if t.dtype() != Dtype::F32 {
            return Err(bad(format!("`{name}` is {:?}; training checkpoints hold f32", t.dtype())));
        }
        let v: Vec<f32> = t.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes"))).collect();
        out.push((name, Tensor::f32(t.shape(), v)));
    }
    Ok((meta.metadata().clone().unwrap_or_default(), out))
}

/// Checks loaded weights against what the model reads: the same names and shapes.
pub fn check_weights(weights: &HashMap<String, Tensor>, expected: &HashMap<String, Vec<usize>>, dir: &Path) -> Result<(), TrainError> {
    let mut problems = Vec::new();
    for (n, shape) in expected {
        match weights.get(n) {
            None => problems.push(format!("missing `{n}` {shape:?}")),
            Some(t) if t.shape() != shape.as_slice() => problems.push(format!("`{n}` is {:?}, expected {shape:?}", t.shape())),
            _ => {}
        }
    }
    problems.extend(weights.keys().filter(|n| !expected.contains_key(*n)).map(|n| format!("unexpected `{n}`")));
    if problems.is_empty() {
        return Ok(());
    }
    problems.sort();
    Err(TrainError::invalid(format!("{}: the checkpoint does not fit the model:\n  {}", dir.display(), problems.join("\n  "))))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::checkpoint::{ModelDir, OpenOptions};

    pub(crate) fn scratch(tag: &str) -> PathBuf {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let d = std::env::temp_dir().join(format!("dsc-train-{}-{}-{tag}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn spec(name: &str) -> dsc_dsl::Spec {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../specs/tiny").join(name);
        dsc_dsl::load(&p, None).unwrap()
    }

    /// Random weights for a tiny spec (V3: MoE with stacked experts, MTP, selection bias).
    #[test]
    fn saved_checkpoints_open_as_hub_model_directories() {
        for name in ["tiny_v3.dsc", "tiny_llama_gqa.dsc", "tiny_v2_lite.dsc"] {
            let s = spec(name);
            let weights = super::super::init::random_weights(&s, 3).unwrap();
            let config = dsc_dsl::export::export_hf_config(&s.model).unwrap().config;
            let files = ModelFiles::new(&s, config, vec![("tokenizer.json".into(), b"{}".to_vec())]);
            let mut opt = OptimizerState::default();
            let some = "model.norm.weight".to_string();
            opt.params.insert(some.clone(), ParamState { step: 4, exp_avg: vec![0.5; 48], exp_avg_sq: vec![0.25; 48] });
            let state = TrainerState { step: 4, cursor: Cursor { epoch: 1, index: 2, rng: 99 }, recipe_hash: "abc".into() };
            let run = scratch("ckpt");
            let dir = save(&run, "checkpoint-4", &weights, &opt, &state, &files).unwrap();

            // A hub directory: the loader opens it from config.json alone, every param equal.
            let md = ModelDir::open(&dir, &OpenOptions::default()).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(md.spec.model.mtp.is_some(), s.model.mtp.is_some());
            for (n, t) in &weights {
                assert_eq!(md.weights.get(n), Some(t), "{name}: {n}");
            }
            assert_eq!(md.weights.names().len(), weights.len());
            assert!(md.tokenizer.is_some());
            if name == "tiny_v3.dsc" {
                let raw = std::fs::read(dir.join(MODEL)).unwrap();
                let st = safetensors::SafeTensors::deserialize(&raw).unwrap();
                let names: Vec<String> = st.names().into_iter().map(|n| n.to_string()).collect();
                assert!(names.iter().any(|n| n == "model.layers.2.mlp.experts.11.down_proj.weight"), "per-expert layout");
                assert!(!names.iter().any(|n| n == "model.layers.2.mlp.experts.down_proj.weight"));
                assert!(names.iter().any(|n| n == "model.layers.4.mlp.experts.0.up_proj.weight"), "MTP experts too");
                assert!(names.iter().any(|n| n == "model.layers.4.shared_head.head.weight"));
                assert!(!names.iter().any(|n| n == "lm_head.weight") || !s.model.tie_embeddings);
            }

            // Our own reader: the same weights, optimizer and state.
            let back = load(&dir).unwrap();
            assert_eq!(back.weights, weights, "{name}");
            assert_eq!((back.optimizer, back.state), (opt.clone(), state.clone()));
            let expected: HashMap<String, Vec<usize>> = weights.iter().map(|(n, t)| (n.clone(), t.shape().to_vec())).collect();
            check_weights(&back.weights, &expected, &dir).unwrap();
            let mut fewer = expected.clone();
            fewer.remove(&some);
            fewer.insert("extra.weight".into(), vec![1]);
            let e = check_weights(&back.weights, &fewer, &dir).unwrap_err().to_string();
            assert!(e.contains("missing `extra.weight` [1]") && e.contains("unexpected `model.norm.weight`"), "{e}");

            // Saving again over it replaces it whole; no temporary directory stays.
            let state5 = TrainerState { step: 5, ..state };
            save(&run, "checkpoint-4", &weights, &opt, &state5, &files).unwrap();
            assert_eq!(load(&dir).unwrap().state.step, 5);
            let names: Vec<String> =
                std::fs::read_dir(&run).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
            assert_eq!(names, ["checkpoint-4"]);
            let _ = std::fs::remove_dir_all(&run);
        }
    }

    #[test]
    fn latest_skips_partial_and_temporary_directories() {
        let run = scratch("latest");
        assert_eq!(latest(&run).unwrap(), None);
        let state = |step| TrainerState { step, cursor: Cursor { epoch: 0, index: 0, rng: 0 }, recipe_hash: String::new() };
        for (d, step) in [("checkpoint-2", 2), ("checkpoint-10", 10), ("checkpoint-20.tmp-1-0", 20)] {
            std::fs::create_dir_all(run.join(d)).unwrap();
            std::fs::write(run.join(d).join(STATE), serde_json::to_string(&state(step)).unwrap()).unwrap();
        }
        // A directory without its trainer state is not a checkpoint.
        std::fs::create_dir_all(run.join("checkpoint-30")).unwrap();
        assert_eq!(latest(&run).unwrap(), Some(run.join("checkpoint-10")));
        let _ = std::fs::remove_dir_all(&run);
    }
}
