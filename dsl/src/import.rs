//! Import of Hugging Face `config.json` files into a [`Model`].
//!
//! Four `model_type`s: `llama` (DeepSeek LLM 7B/67B), `deepseek` (DeepSeekMoE 16B, remote
//! code), `deepseek_v2` and `deepseek_v3`, each in both config layouts: the legacy one of
//! the published checkpoints (`rope_theta` + `rope_scaling`) and the transformers-5 one
//! (`rope_parameters`). The mapping reproduces what the *modeling code* computes, not
//! what the key names suggest; where transformers and DeepSeek's own code disagree the
//! choice is stated at the place it is made. The fixtures in `golden/hf/` (run by
//! transformers) pin the common cases.
//!
//! A key that is absent or `null` takes the default of the configuration class that
//! reads it (transformers' for `llama`/`deepseek_v2`/`deepseek_v3`, DeepSeek's for
//! `deepseek`), except the sizes that define the network (vocabulary, widths, layer and
//! head counts, ranks, expert counts), which must be given. Every imported model is
//! printed and resolved again before it is returned, so it obeys every rule of the spec
//! language.

use crate::model::*;
use serde_json::{Map, Value};
use std::path::Path;

/// Reads a Hugging Face `config.json` text as the model named `name`.
pub fn import_hf_config(json: &str, name: &str) -> Result<Model, String> {
    if !is_identifier(name) {
        return Err(format!("`{name}` cannot be a model name: use letters, digits and `_`, not starting with a digit"));
    }
    let root: Value = serde_json::from_str(json).map_err(|e| format!("not valid JSON: {e}"))?;
    let Value::Object(obj) = root else {
        return Err(format!("a config.json holds one JSON object, found {}", describe(&root)));
    };
    let cfg = Cfg { obj: &obj, prefix: "" };
    let family = match cfg.str("model_type")? {
        Some("llama") => Family::Llama,
        Some("deepseek") => Family::DeepseekMoe,
        Some("deepseek_v2") => Family::V2,
        Some("deepseek_v3") => Family::V3,
        Some(other) => {
            return Err(format!(
                "unsupported `model_type` = \"{other}\": dsc imports `llama` (DeepSeek LLM), `deepseek` (DeepSeekMoE), `deepseek_v2` and `deepseek_v3`"
            ))
        }
        None => return Err("missing required key `model_type`".to_string()),
    };
    let model = build(&cfg, family, name)?;
    // The printer and resolver are the single definition of a valid model: whatever slipped
    // past the checks above (a limit, a divisibility rule) is reported in the spec's words.
    let text = crate::print::print_model(&model);
    match crate::resolve::load_str(Path::new("<imported>"), &text, None) {
        Ok(spec) => Ok(spec.model),
        Err(f) => Err(format!("the imported model is not a valid spec:\n{}", f.render())),
    }
}

/// Reads the `config.json` at `path`. The model is named `name`, or after the directory
/// that holds the file (see [`model_name_for`]).
pub fn import_hf_config_file(path: &Path, name: Option<&str>) -> Result<Model, String> {
    let text = crate::files::read_text(path, crate::files::JSON_LIMIT).map_err(|e| format!("cannot read `{}`: {e}", path.display()))?;
    let name = match name {
        Some(n) => n.to_string(),
        None => model_name_for(path),
    };
    import_hf_config(&text, &name).map_err(|e| format!("{}: {e}", path.display()))
}

/// The default model name for a config file: its directory's name made an identifier
/// (`DeepSeek-V2-Lite/config.json` → `deepseek_v2_lite`), else `imported`.
pub fn model_name_for(path: &Path) -> String {
    // A bare `config.json` has an empty parent; the absolute path names the directory.
    let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    abs.parent()
        .and_then(|d| d.file_name())
        .and_then(|n| sanitize_identifier(&n.to_string_lossy()))
        .unwrap_or_else(|| "imported".to_string())
}

/// Lower-cases `s` and turns every run of other characters into one `_`; `None` when
/// nothing usable is left or the result is a keyword of the spec language.
pub fn sanitize_identifier(s: &str) -> Option<String> {
    let mut out = String::new();
    for c in s.chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c.to_ascii_lowercase());
        } else if !out.ends_with('_') {
            out.push('_');
        }
    }
    let out = out.trim_matches('_');
    if out.is_empty() {
        return None;
    }
    let out = if out.starts_with(|c: char| c.is_ascii_digit()) { format!("m_{out}") } else { out.to_string() };
    is_identifier(&out).then_some(out)
}

/// Whether `s` reads as an `ident` of the grammar (and not as a keyword).
fn is_identifier(s: &str) -> bool {
    const KEYWORDS: [&str; 6] = ["true", "false", "none", "model", "extends", "include"];
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !KEYWORDS.contains(&s)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    /// `LlamaForCausalLM` (transformers): DeepSeek LLM.
    Llama,
    /// `DeepseekForCausalLM` (DeepSeek's remote code; transformers has no such class).
    DeepseekMoe,
    /// `DeepseekV2ForCausalLM` (transformers).
    V2,
    /// `DeepseekV3ForCausalLM` (transformers).
    V3,
}

impl Family {
    fn name(self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::DeepseekMoe => "deepseek",
            Family::V2 => "deepseek_v2",
            Family::V3 => "deepseek_v3",
        }
    }
}

/// One JSON object of the config, with the dotted prefix its keys are reported under.
struct Cfg<'a> {
    obj: &'a Map<String, Value>,
    prefix: &'static str,
}

impl<'a> Cfg<'a> {
    fn key(&self, k: &str) -> String {
        format!("{}{k}", self.prefix)
    }
    /// The value of `k`; `null` counts as absent.
    fn get(&self, k: &str) -> Option<&'a Value> {
        self.obj.get(k).filter(|v| !v.is_null())
    }
    fn u64(&self, k: &str) -> Result<Option<u64>, String> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => {
                v.as_u64().map(Some).ok_or_else(|| format!("`{}` must be a non-negative integer, found {}", self.key(k), describe(v)))
            }
        }
    }
    /// A size that must be given and positive.
    fn size(&self, k: &str, family: Family) -> Result<u64, String> {
        match self.u64(k)? {
            None => Err(format!("missing required key `{}` (needed for model_type `{}`)", self.key(k), family.name())),
            Some(0) => Err(format!("`{}` must be positive, found 0", self.key(k))),
            Some(n) => Ok(n),
        }
    }
    fn f64(&self, k: &str) -> Result<Option<f64>, String> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .filter(|x| x.is_finite())
                .map(Some)
                .ok_or_else(|| format!("`{}` must be a number, found {}", self.key(k), describe(v))),
        }
    }
    fn bool(&self, k: &str) -> Result<Option<bool>, String> {
        match self.get(k) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(format!("`{}` must be true or false, found {}", self.key(k), describe(v))),
        }
    }
    fn str(&self, k: &str) -> Result<Option<&'a str>, String> {
        match self.get(k) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.as_str())),
            Some(v) => Err(format!("`{}` must be a string, found {}", self.key(k), describe(v))),
        }
    }
    fn object(&self, k: &str, prefix: &'static str) -> Result<Option<Cfg<'a>>, String> {
        match self.get(k) {
            None => Ok(None),
            Some(Value::Object(o)) => Ok(Some(Cfg { obj: o, prefix })),
            Some(v) => Err(format!("`{}` must be an object, found {}", self.key(k), describe(v))),
        }
    }
}

fn describe(v: &Value) -> String {
    let kind = match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(n) if n.is_f64() => "a floating-point number",
        Value::Number(n) if n.is_i64() && n.as_i64().is_some_and(|i| i < 0) => "a negative number",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    };
    let text = v.to_string();
    if text.len() <= 40 {
        format!("{kind} ({text})")
    } else {
        kind.to_string()
    }
}

fn build(cfg: &Cfg, family: Family, name: &str) -> Result<Model, String> {
    unsupported_features(cfg)?;
    let vocab = cfg.size("vocab_size", family)?;
    let hidden = cfg.size("hidden_size", family)?;
    let layers = cfg.size("num_hidden_layers", family)?;
    let norm_eps = cfg.f64("rms_norm_eps")?.unwrap_or(1e-6);
    let tie_embeddings = cfg.bool("tie_word_embeddings")?.unwrap_or(false);
    let dtype = dtype(cfg)?;
    let attention = attention(cfg, family, hidden)?;
    let rope = rope(cfg, family)?;
    let (ffn, moe_layer) = ffn(cfg, family, layers)?;
    let mtp = mtp(cfg, family, &ffn, moe_layer(layers))?;
    Ok(Model { name: name.to_string(), vocab, hidden, layers, dtype, tie_embeddings, norm_eps, attention, rope, ffn, mtp })
}

/// Settings the spec language has no way to express; importing them silently would give a
/// model that computes something else.
fn unsupported_features(cfg: &Cfg) -> Result<(), String> {
    if let Some(act) = cfg.str("hidden_act")? {
        if act != "silu" {
            return Err(format!("`hidden_act` = \"{act}\" is not supported: dsc feed-forward blocks are SwiGLU (silu)"));
        }
    }
    for k in ["attention_bias", "mlp_bias"] {
        if cfg.bool(k)? == Some(true) {
            return Err(format!("`{k}` = true is not supported: dsc projections have no bias"));
        }
    }
    // Only Llama reads `head_dim`/`partial_rotary_factor` for its rotary dims; in the MLA
    // configs transformers sets `head_dim` to `qk_rope_head_dim` itself.
    if let Some(f) = cfg.f64("partial_rotary_factor")? {
        if f != 1.0 {
            return Err(format!("`partial_rotary_factor` = {f} is not supported: RoPE rotates all of its dims"));
        }
    }
    Ok(())
}

fn dtype(cfg: &Cfg) -> Result<DType, String> {
    // Quantised weights decide what is stored, whatever the compute dtype says.
    if let Some(q) = cfg.object("quantization_config", "quantization_config.")? {
        return match q.str("quant_method")? {
            Some("fp8") => Ok(DType::Fp8),
            Some(other) => Err(format!("`quantization_config.quant_method` = \"{other}\" is not supported (only fp8)")),
            None => Err("missing key `quantization_config.quant_method`".to_string()),
        };
    }
    // transformers 5 writes `dtype`, earlier versions `torch_dtype`.
    let key = if cfg.get("dtype").is_some() { "dtype" } else { "torch_dtype" };
    match cfg.str(key)? {
        Some("float32") => Ok(DType::F32),
        Some("bfloat16") => Ok(DType::Bf16),
        Some("float16") => Ok(DType::F16),
        Some(other) => Err(format!("`{key}` = \"{other}\" is not supported (float32, bfloat16 or float16)")),
        // transformers computes in float32 when the config records no dtype.
        None => Ok(DType::F32),
    }
}

fn attention(cfg: &Cfg, family: Family, hidden: u64) -> Result<Attention, String> {
    let heads = cfg.size("num_attention_heads", family)?;
    match family {
        Family::Llama | Family::DeepseekMoe => {
            let kv_heads = cfg.u64("num_key_value_heads")?.unwrap_or(heads);
            if kv_heads == 0 || heads % kv_heads != 0 {
                return Err(format!("`num_key_value_heads` = {kv_heads} must divide `num_attention_heads` = {heads}"));
            }
            let head_dim = match cfg.u64("head_dim")? {
                Some(d) => d,
                None if hidden.is_multiple_of(heads) => hidden / heads,
                None => {
                    return Err(format!(
                        "`hidden_size` = {hidden} is not divisible by `num_attention_heads` = {heads}, and there is no `head_dim`"
                    ))
                }
            };
            Ok(Attention::Gqa(Gqa { heads, kv_heads, head_dim }))
        }
        Family::V2 | Family::V3 => {
            // null means a plain `q_proj` (V2-Lite); an absent key would silently take the
            // transformers default of 1536, so it must be written.
            if !cfg.obj.contains_key("q_lora_rank") {
                return Err(format!(
                    "missing required key `q_lora_rank` (needed for model_type `{}`; null means no query compression)",
                    family.name()
                ));
            }
            let q_lora_rank = match cfg.u64("q_lora_rank")? {
                Some(0) => return Err("`q_lora_rank` must be positive or null, found 0".to_string()),
                r => r,
            };
            let kv_lora_rank = cfg.size("kv_lora_rank", family)?;
            let qk_nope_head_dim = cfg.size("qk_nope_head_dim", family)?;
            let qk_rope_head_dim = cfg.size("qk_rope_head_dim", family)?;
            let v_head_dim = cfg.size("v_head_dim", family)?;
            // transformers 5 also writes the derived `qk_head_dim`; a disagreement means the
            // file was edited by hand and one of the two is wrong.
            if let Some(q) = cfg.u64("qk_head_dim")? {
                if q != qk_nope_head_dim + qk_rope_head_dim {
                    return Err(format!(
                        "`qk_head_dim` = {q} is not `qk_nope_head_dim` + `qk_rope_head_dim` = {}",
                        qk_nope_head_dim + qk_rope_head_dim
                    ));
                }
            }
            Ok(Attention::Mla(Mla {
                heads,
                q_lora_rank,
                kv_lora_rank,
                qk_nope_head_dim,
                qk_rope_head_dim,
                v_head_dim,
                // Both transformers and DeepSeek's code build q_a_layernorm/kv_a_layernorm
                // with the RMSNorm default eps of 1e-6, not `rms_norm_eps`.
                latent_norm_eps: 1e-6,
            }))
        }
    }
}

fn rope(cfg: &Cfg, family: Family) -> Result<Rope, String> {
    let layout = match family {
        // Llama's and DeepSeekMoE's `rotate_half`.
        Family::Llama | Family::DeepseekMoe => RopeLayout::HalfSplit,
        // transformers' V2 rotates adjacent pairs as complex numbers.
        Family::V2 => RopeLayout::Interleaved,
        // V3 de-interleaves the pairs before `rotate_half` unless told the weights are
        // already in half-split order.
        Family::V3 => {
            if cfg.bool("rope_interleave")?.unwrap_or(true) {
                RopeLayout::Interleaved
            } else {
                RopeLayout::HalfSplit
            }
        }
    };
    // transformers' conversion lets a legacy `rope_scaling` win over `rope_parameters`,
    // and takes `rope_theta` from the dict first, then from the top level.
    let scaling = match cfg.object("rope_scaling", "rope_scaling.")? {
        Some(s) => Some(s),
        None => cfg.object("rope_parameters", "rope_parameters.")?,
    };
    let theta = match scaling.as_ref().map(|s| s.f64("rope_theta")).transpose()?.flatten() {
        Some(t) => t,
        None => cfg.f64("rope_theta")?.unwrap_or(10000.0),
    };
    let Some(s) = scaling else { return Ok(Rope { theta, layout, yarn: None }) };
    let (kind, kind_key) = match (s.str("rope_type")?, s.str("type")?) {
        (Some(a), Some(b)) if a != b => {
            return Err(format!("`{}` = \"{a}\" contradicts `{}` = \"{b}\"", s.key("rope_type"), s.key("type")))
        }
        (Some(a), _) => (a, s.key("rope_type")),
        (None, Some(b)) => (b, s.key("type")),
        (None, None) => {
            // Per-layer-type parameters ({"full_attention": {...}, ...}) have no type of their own.
            if s.obj.values().any(Value::is_object) {
                return Err(format!("per-layer-type `{}` are not supported", s.prefix.trim_end_matches('.')));
            }
            ("default", s.key("rope_type"))
        }
    };
    let yarn = match kind {
        "default" => None,
        "yarn" if family == Family::DeepseekMoe => {
            return Err(format!(
            "`{kind_key}` = \"yarn\" is not supported by model_type `deepseek` (DeepSeekMoE's code knows only linear and dynamic scaling)"
        ))
        }
        "yarn" => Some(yarn(cfg, &s, family)?),
        other => return Err(format!("`{kind_key}` = \"{other}\" is not supported: dsc models plain RoPE and YaRN")),
    };
    Ok(Rope { theta, layout, yarn })
}

/// YaRN as transformers computes it (`_compute_yarn_parameters`, and the MLA softmax
/// scale in `DeepseekV2Attention`/`DeepseekV3Attention`).
fn yarn(cfg: &Cfg, s: &Cfg, family: Family) -> Result<Yarn, String> {
    if s.bool("truncate")? == Some(false) {
        return Err(format!("`{}` = false is not supported: dsc rounds the YaRN correction range", s.key("truncate")));
    }
    if let Some(f) = s.f64("partial_rotary_factor")? {
        if f != 1.0 {
            return Err(format!("`{}` = {f} is not supported", s.key("partial_rotary_factor")));
        }
    }
    let max_pos = cfg.u64("max_position_embeddings")?;
    let original_context = match (s.u64("original_max_position_embeddings")?, max_pos) {
        (Some(o), _) | (None, Some(o)) => o,
        (None, None) => return Err(format!("YaRN needs `{}` or `max_position_embeddings`", s.key("original_max_position_embeddings"))),
    };
    // transformers 5: an absent factor is the context extension itself.
    let factor = match (s.f64("factor")?, max_pos) {
        (Some(f), _) => f,
        (None, Some(m)) if s.get("original_max_position_embeddings").is_some() && original_context > 0 => {
            m as f64 / original_context as f64
        }
        _ => return Err(format!("missing required key `{}` for YaRN", s.key("factor"))),
    };
    // `x or default`: transformers treats 0 like an absent value here.
    let nonzero = |x: Option<f64>| x.filter(|v| *v != 0.0);
    let beta_fast = nonzero(s.f64("beta_fast")?).unwrap_or(32.0);
    let beta_slow = nonzero(s.f64("beta_slow")?).unwrap_or(1.0);
    let mscale = nonzero(s.f64("mscale")?);
    let mscale_all_dim = nonzero(s.f64("mscale_all_dim")?);
    let attention_factor = s.f64("attention_factor")?;

    // What transformers applies. cos/sin: `attention_factor` if given, else
    // mscale(s, mscale) / mscale(s, mscale_all_dim) when both are set (non-zero), else
    // mscale(s, 1). Softmax: times mscale(s, mscale_all_dim)^2 when it is set, in the MLA
    // attention only (Llama's attention has no such term).
    let soft_m = if matches!(family, Family::V2 | Family::V3) { mscale_all_dim.unwrap_or(0.0) } else { 0.0 };
    let (m, d) = match (attention_factor, mscale, mscale_all_dim) {
        // The DeepSeek checkpoints' case, and the one the `Yarn` fields describe directly.
        (None, Some(m), Some(d)) if soft_m == d => (m, d),
        // mscale(s, 1) / mscale(s, 0) = mscale(s, 1): the defaults of DeepSeek's code too.
        (None, None, _) | (None, _, None) if soft_m == 0.0 => (1.0, 0.0),
        _ => {
            // Otherwise find the `mscale` whose ratio to the softmax term's gives the
            // cos/sin factor transformers uses.
            let cos_sin = match (attention_factor, mscale, mscale_all_dim) {
                (Some(a), _, _) => a,
                (None, Some(m), Some(d)) => yarn_mscale(factor, m) / yarn_mscale(factor, d),
                _ => yarn_mscale(factor, 1.0),
            };
            (mscale_for(factor, cos_sin * yarn_mscale(factor, soft_m), s)?, soft_m)
        }
    };
    Ok(Yarn { factor, original_context, beta_fast, beta_slow, mscale: m, mscale_all_dim: d })
}

/// The `m` with `yarn_mscale(factor, m) == target`.
fn mscale_for(factor: f64, target: f64, s: &Cfg) -> Result<f64, String> {
    if factor <= 1.0 {
        // No scaling: every mscale is 1, so only a factor of 1 can be expressed.
        return if (target - 1.0).abs() < 1e-12 {
            Ok(1.0)
        } else {
            Err(format!("`{}` = {target} cannot apply without context extension (factor <= 1)", s.key("attention_factor")))
        };
    }
    let m = (target - 1.0) / (0.1 * factor.ln());
    if m.is_finite() && m >= 0.0 {
        Ok(m)
    } else {
        Err(format!(
            "the YaRN attention factor {target} is below 1, which `mscale` cannot express (from `{}`)",
            s.prefix.trim_end_matches('.')
        ))
    }
}

/// The feed-forward blocks, and which layer index is MoE (also asked of the MTP layer).
fn ffn(cfg: &Cfg, family: Family, layers: u64) -> Result<(Vec<FfnBlock>, impl Fn(u64) -> bool), String> {
    // Llama is dense throughout. For the DeepSeek families layer i is MoE iff
    // `n_routed_experts` is set, i >= first_k_dense_replace and i % moe_layer_freq == 0,
    // as DeepSeek's code builds them (transformers' V2/V3 ignore `moe_layer_freq`, which is
    // 1 in every published checkpoint).
    let routed = match family {
        Family::Llama => None,
        _ => {
            // Absent is not the same as null: transformers would default to a MoE with 64
            // or 256 experts, DeepSeek's code to a dense model.
            if !cfg.obj.contains_key("n_routed_experts") {
                return Err(format!(
                    "missing required key `n_routed_experts` (needed for model_type `{}`; null means a dense model)",
                    family.name()
                ));
            }
            match cfg.u64("n_routed_experts")? {
                Some(0) => return Err("`n_routed_experts` must be positive or null, found 0".to_string()),
                r => r,
            }
        }
    };
    // The placement keys only matter (and are only read) when there are experts to place.
    let (first_dense, freq) = match routed {
        None => (0, 1),
        Some(_) => {
            let first_dense = cfg.u64("first_k_dense_replace")?.unwrap_or(if family == Family::V3 { 3 } else { 0 });
            let freq = match cfg.u64("moe_layer_freq")? {
                Some(0) => return Err("`moe_layer_freq` must be positive, found 0".to_string()),
                f => f.unwrap_or(1),
            };
            (first_dense, freq)
        }
    };
    let is_moe = move |i: u64| routed.is_some() && i >= first_dense && i.is_multiple_of(freq);
    // The first MoE layer; the MoE layers are `first..layers step freq`.
    let first = first_dense.div_ceil(freq).saturating_mul(freq);

    let mut blocks = Vec::new();
    let mut dense = Vec::new();
    if routed.is_none() || first >= layers {
        dense.push(LayerRange { start: 0, end: layers, step: 1 });
    } else {
        if first > 0 {
            dense.push(LayerRange { start: 0, end: first, step: 1 });
        }
        for r in 1..freq {
            if first + r < layers {
                dense.push(LayerRange { start: first + r, end: layers, step: freq });
            }
        }
    }
    if !dense.is_empty() {
        let intermediate = cfg.size("intermediate_size", family)?;
        blocks.push(FfnBlock { layers: LayerSet { ranges: dense }, kind: Ffn::Dense { intermediate } });
    }
    if let Some(routed) = routed.filter(|_| first < layers) {
        let moe = moe(cfg, family, routed)?;
        blocks.push(FfnBlock {
            layers: LayerSet { ranges: vec![LayerRange { start: first, end: layers, step: freq }] },
            kind: Ffn::Moe(moe),
        });
    }
    Ok((blocks, is_moe))
}

fn moe(cfg: &Cfg, family: Family, routed_experts: u64) -> Result<Moe, String> {
    let expert_intermediate = cfg.size("moe_intermediate_size", family)?;
    let top_k = cfg.size("num_experts_per_tok", family)?;
    if top_k > routed_experts {
        return Err(format!("`num_experts_per_tok` = {top_k} exceeds `n_routed_experts` = {routed_experts}"));
    }
    // null builds no shared experts (DeepSeek's `if config.n_shared_experts is not None`);
    // absent takes the configuration class default.
    let shared_experts = if cfg.obj.contains_key("n_shared_experts") {
        cfg.u64("n_shared_experts")?.unwrap_or(0)
    } else {
        match family {
            Family::V2 => 2,
            Family::V3 => 1,
            _ => 0,
        }
    };
    let scoring_func = cfg.str("scoring_func")?;
    let router = match family {
        Family::Llama => unreachable!("llama has no MoE layers"),
        // DeepSeekMoE's MoEGate: softmax, plain top-k, weights normalised only when
        // `top_k > 1 and norm_topk_prob`, no scaling factor.
        Family::DeepseekMoe => {
            softmax_only(scoring_func, family)?;
            let norm = cfg.bool("norm_topk_prob")?.unwrap_or(false);
            Router {
                top_k,
                scoring: Scoring::Softmax,
                selection_bias: false,
                groups: 1,
                groups_kept: 1,
                group_score: None,
                normalize: if norm { Normalize::TopKGt1 } else { Normalize::Never },
                scale: 1.0,
                scale_normalized: true,
            }
        }
        // transformers' DeepseekV2Moe: softmax, greedy or group-limited (group score = max)
        // top-k, then *always* times `routed_scaling_factor`; `norm_topk_prob` is ignored.
        // (DeepSeek's V2 code normalises when `top_k > 1 and norm_topk_prob` and then does
        // not scale; every published V2 checkpoint has norm_topk_prob = false, where the two
        // agree.)
        Family::V2 => {
            softmax_only(scoring_func, family)?;
            let (groups, groups_kept, group_score) = match cfg.str("topk_method")?.unwrap_or("greedy") {
                "greedy" => (1, 1, None),
                "group_limited_greedy" => {
                    let groups = cfg.size("n_group", family)?;
                    let kept = cfg.size("topk_group", family)?;
                    grouped(groups, kept, routed_experts, top_k, GroupScore::Max)?
                }
                other => {
                    return Err(format!(
                        "`topk_method` = \"{other}\" is not supported for model_type `deepseek_v2` (greedy or group_limited_greedy)"
                    ))
                }
            };
            Router {
                top_k,
                scoring: Scoring::Softmax,
                selection_bias: false,
                groups,
                groups_kept,
                group_score,
                normalize: Normalize::Never,
                scale: cfg.f64("routed_scaling_factor")?.unwrap_or(1.0),
                scale_normalized: false,
            }
        }
        // transformers' DeepseekV3MoE: sigmoid scores (whatever `scoring_func` says),
        // `e_score_correction_bias` for selection, group-limited top-k with the group score
        // the sum of the top-2 biased scores (whatever `topk_method` says), normalised when
        // `norm_topk_prob`, then always times `routed_scaling_factor`.
        Family::V3 => {
            let groups = cfg.u64("n_group")?.unwrap_or(8);
            let kept = cfg.u64("topk_group")?.unwrap_or(4);
            if groups == 0 || kept == 0 {
                return Err("`n_group` and `topk_group` must be positive".to_string());
            }
            let (groups, groups_kept, group_score) = grouped(groups, kept, routed_experts, top_k, GroupScore::Top2Sum)?;
            let norm = cfg.bool("norm_topk_prob")?.unwrap_or(true);
            Router {
                top_k,
                scoring: Scoring::Sigmoid,
                selection_bias: true,
                groups,
                groups_kept,
                group_score,
                normalize: if norm { Normalize::Always } else { Normalize::Never },
                scale: cfg.f64("routed_scaling_factor")?.unwrap_or(2.5),
                scale_normalized: true,
            }
        }
    };
    // Training-only settings, recorded when the config has them. `aux_loss_alpha` is the
    // expert-level balance loss of DeepSeekMoE and V2 (alpha_1; `seq_aux` only says it is
    // averaged per sequence, as both papers define it) and V3's sequence-wise balance loss.
    let mut balance = Balance { expert_aux: 0.0, device_aux: 0.0, comm_aux: 0.0, sequence_aux: 0.0, bias_update_speed: 0.0 };
    if let Some(alpha) = cfg.f64("aux_loss_alpha")? {
        if family == Family::V3 {
            balance.sequence_aux = alpha;
        } else {
            balance.expert_aux = alpha;
        }
    }
    Ok(Moe { routed_experts, shared_experts, expert_intermediate, router, balance })
}

fn softmax_only(scoring_func: Option<&str>, family: Family) -> Result<(), String> {
    match scoring_func {
        None | Some("softmax") => Ok(()),
        Some(other) => {
            Err(format!("`scoring_func` = \"{other}\" is not supported for model_type `{}`, whose gate is softmax only", family.name()))
        }
    }
}

/// Group-limited routing; one group is no limit at all.
fn grouped(groups: u64, kept: u64, routed: u64, top_k: u64, score: GroupScore) -> Result<(u64, u64, Option<GroupScore>), String> {
    if groups == 1 {
        return Ok((1, 1, None));
    }
    if !routed.is_multiple_of(groups) {
        return Err(format!("`n_group` = {groups} does not divide `n_routed_experts` = {routed}"));
    }
    if kept > groups {
        return Err(format!("`topk_group` = {kept} exceeds `n_group` = {groups}"));
    }
    if kept * (routed / groups) < top_k {
        return Err(format!(
            "`topk_group` = {kept} keeps {} experts, fewer than `num_experts_per_tok` = {top_k}",
            kept * (routed / groups)
        ));
    }
    Ok((groups, kept, Some(score)))
}

fn mtp(cfg: &Cfg, family: Family, ffn: &[FfnBlock], mtp_is_moe: bool) -> Result<Option<Mtp>, String> {
    if family != Family::V3 {
        return Ok(None);
    }
    let depth = cfg.u64("num_nextn_predict_layers")?.unwrap_or(0);
    if depth == 0 {
        return Ok(None);
    }
    // The MTP modules are stored as layers `num_hidden_layers..`, built like any other
    // layer of that index: MoE past `first_k_dense_replace`.
    let Some(index) = ffn.iter().position(|b| matches!(b.kind, Ffn::Moe(_)) == mtp_is_moe) else {
        return Err(format!(
            "`num_nextn_predict_layers` = {depth}: the MTP layer would be {} but the main model has no such layer",
            if mtp_is_moe { "MoE" } else { "dense" }
        ));
    };
    Ok(Some(Mtp {
        depth,
        // lambda = 0.3 for the first 10T training tokens (DeepSeek-V3 report §4.2); the
        // config does not record it.
        loss_weight: 0.3,
        // eh_proj(concat(enorm(embedding), hnorm(hidden))), as in the V3 checkpoint.
        concat: [MtpInput::Embedding, MtpInput::Hidden],
        ffn: index,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_sanitised_to_identifiers() {
        assert_eq!(sanitize_identifier("DeepSeek-V2-Lite").as_deref(), Some("deepseek_v2_lite"));
        assert_eq!(sanitize_identifier("  7b chat ").as_deref(), Some("m_7b_chat"));
        assert_eq!(sanitize_identifier("--").as_deref(), None);
        assert_eq!(sanitize_identifier("model").as_deref(), None);
        assert!(is_identifier("deepseek_v3") && !is_identifier("none") && !is_identifier("3x"));
    }

    #[test]
    fn model_name_comes_from_the_directory() {
        assert_eq!(model_name_for(Path::new("/x/DeepSeek-V3/config.json")), "deepseek_v3");
        assert_eq!(model_name_for(Path::new("/config.json")), "imported");
    }

    #[test]
    fn mscale_solves_the_yarn_formula() {
        let s = Cfg { obj: &Map::new(), prefix: "rope_scaling." };
        let m = mscale_for(40.0, yarn_mscale(40.0, 0.707), &s).unwrap();
        assert!((m - 0.707).abs() < 1e-12);
        assert!(mscale_for(40.0, 0.5, &s).is_err());
    }
}
