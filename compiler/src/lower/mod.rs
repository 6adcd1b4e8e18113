//! Lowering: a resolved spec ([`dsc_dsl::Spec`]) to an IR [`Module`] with one entry point
//! per [`Mode`].
//!
//! The lowered module computes exactly what Hugging Face transformers computes for the
//! same architecture (`LlamaForCausalLM` for DeepSeek LLM, `DeepseekV2ForCausalLM`,
//! `DeepseekV3ForCausalLM`), so that a runtime executing it on a checkpoint reproduces the
//! reference logits. It is built from composites (`rms_norm`, `rope`, `attention`,
//! `moe_route`, `expert_ffn`, `swiglu`, `cross_entropy`, `cache_append`) plus layout ops,
//! and is never unrolled: DeepSeek-V3 (61 layers, 256 experts) lowers to about 700 nodes
//! for all three modes together, in about a millisecond.
//!
//! [`lower`] builds all three modes into one module; [`lower_mode`] builds one. Both
//! return a module that passes [`crate::ir::verify()`].
//!
//! # Functions
//!
//! | function | what |
//! | --- | --- |
//! | `prefill`, `decode`, `train` | entry points ([`Module::entries`]) |
//! | `{mode}.layer.{kind}` | one transformer block, `kind` = `dense` or `moe` (the `ffn` block that owns the layer); called once per layer with `layer=L` |
//! | `train.mtp.{k}` | MTP module `k` (1-based), only when the spec has `mtp`; called once with `layer=layers+k-1` |
//!
//! Functions are added per mode in the order prefill, decode, train; within a mode, layer
//! functions in the order of the first layer of each kind, then MTP modules, then the
//! entry. Inference entry points never contain MTP.
//!
//! # Entry signatures and the KV cache
//!
//! Token ids, positions and labels are `i64`; activations and caches use the model dtype.
//! Per layer the cache is two tensors, `cache.{L}.{a}` and `cache.{L}.{b}`, position-major
//! (`[c, b, ..]`: a step's entries are appended after the older ones, so a runtime with
//! room in its buffer appends in place, [`crate::ir::Op::CacheAppend`]):
//!
//! - MLA: `kv_latent [c, b, kv_lora_rank]` (the `kv_a_layernorm`-normalised latent) and
//!   `k_pe [c, b, qk_rope_head_dim]` (the decoupled key after RoPE), the compressed cache
//!   of DeepSeek-V2 §2.1; as lowered, full keys and values are re-expanded from it at
//!   every step (the `mla_absorb` pass makes decode attend over it directly);
//! - MHA/GQA: `k` and `v`, `[c, b, kv_heads, head_dim]`, keys after RoPE.
//!
//! ```text
//! prefill(input_ids [b,s], positions [b,s])
//!     → (logits [b,s,V], cache.0.a [s,b,..], cache.0.b [s,b,..], cache.1.a, ...)
//! decode(input_ids [b,1], positions [b,1], cache.0.a [c,b,..], cache.0.b [c,b,..], ...)
//!     → (logits [b,1,V], cache.0.a [c+1,b,..], cache.0.b [c+1,b,..], ...)
//! train(input_ids [b,s], positions [b,s], labels [b,s])
//!     → (loss f32[], mtp_loss f32[], aux_loss f32[], load f32[E] per MoE layer, ...)
//! ```
//!
//! The train entry returns the objective's terms separately, so a runtime (and the
//! cotangents autodiff adds, [`crate::passes::autodiff`]) chooses which to train on:
//! `loss` is the main next-token cross-entropy; `mtp_loss` is DeepSeek-V3's
//! `λ/D · Σ_k L_k` (0 without `mtp`); `aux_loss` sums every MoE layer's balance losses
//! (0 without them; see `ffn.rs`); then one expert-load vector (tokens sent to each
//! expert) per MoE layer, main layers first, then MTP modules, in layer order.
//!
//! Prefill takes no cache: it attends within the prompt and returns the new entries for
//! every position (`[s,b,..]`), which become decode's first cache (`c = s`). Decode adds
//! one token per sequence and returns the caches one position longer; the runtime may
//! keep them in place ([`crate::ir::Op::CacheAppend`]). Logits are returned for every
//! position. Results are ordered as the arguments: logits first, then layer 0's two tensors, layer
//! 1's, and so on. Layer functions have the same shape minus the embedding and head:
//! `(x, positions[, cache.a, cache.b]) → (y[, cache.a, cache.b])`.
//!
//! `labels` follow Hugging Face's convention: unshifted, `labels[i]` is the token at
//! position `i` (usually `input_ids`), and [`IGNORE_INDEX`] (−100) marks positions
//! without a target. The loss is the mean cross-entropy of position `i` predicting
//! `labels[i+1]` over the first `s-1` positions, as `ForCausalLMLoss` computes it.
//!
//! # Parameters
//!
//! Params carry Hugging Face checkpoint names. Inside a layer or MTP function they are
//! relative to the layer, and a call with `layer=L` scopes them to
//! `model.layers.{L}.{name}` ([`crate::ir::param_path`]); entry points name them in full.
//! Weight matrices are `[out, in]`, as torch's `Linear` stores them.
//!
//! | param | shape |
//! | --- | --- |
//! | `model.embed_tokens.weight`, `lm_head.weight` (absent when `tie_embeddings`: the head is the embedding) | `[vocab, hidden]` |
//! | `model.norm.weight`, `input_layernorm.weight`, `post_attention_layernorm.weight` | `[hidden]` |
//! | MHA/GQA `self_attn.{q,k,v,o}_proj.weight` | `[heads·hd, hidden]`, `[kv_heads·hd, hidden]` ×2, `[hidden, heads·hd]` |
//! | MLA `self_attn.q_a_proj.weight`, `self_attn.q_a_layernorm.weight` | `[q_lora, hidden]`, `[q_lora]` |
//! | MLA `self_attn.q_b_proj.weight` (or `self_attn.q_proj.weight` without q_lora_rank) | `[heads·(nope+rope), q_lora or hidden]` |
//! | MLA `self_attn.kv_a_proj_with_mqa.weight`, `self_attn.kv_a_layernorm.weight` | `[kv_lora+rope, hidden]`, `[kv_lora]` |
//! | MLA `self_attn.kv_b_proj.weight`, `self_attn.o_proj.weight` | `[heads·(nope+v), kv_lora]`, `[hidden, heads·v]` |
//! | dense `mlp.{gate,up}_proj.weight`, `mlp.down_proj.weight` | `[i, hidden]`, `[hidden, i]` |
//! | MoE `mlp.gate.weight`, `mlp.gate.e_score_correction_bias` (f32, only with `selection_bias`) | `[E, hidden]`, `[E]` |
//! | MoE `mlp.experts.{gate,up}_proj.weight`, `mlp.experts.down_proj.weight` | `[E, i, hidden]`, `[E, hidden, i]` |
//! | MoE `mlp.shared_experts.{gate,up}_proj.weight`, `mlp.shared_experts.down_proj.weight` | `[shared·i, hidden]`, `[hidden, shared·i]` |
//! | MTP `enorm.weight`, `hnorm.weight`, `shared_head.norm.weight` | `[hidden]` |
//! | MTP `eh_proj.weight` | `[hidden, 2·hidden]` |
//!
//! **Stacked experts.** Checkpoints store routed experts one by one
//! (`model.layers.L.mlp.experts.{e}.gate_proj.weight`, `[i, hidden]` each). The IR names
//! one stacked tensor per projection, `model.layers.L.mlp.experts.gate_proj.weight`
//! `[E, i, hidden]`, whose row `e` is expert `e`'s matrix; the weight loader stacks the
//! per-expert tensors in expert-id order under that name. The shared experts are stored
//! already fused (one SwiGLU of width `shared·i`) and need no stacking.
//!
//! **MTP.** Module `k` is stored as layer `layers + k - 1` (`model.layers.61.eh_proj.weight`
//! for V3) and reuses the main model's embedding and output head, as DeepSeek-V3 §2.2
//! shares them; the checkpoint's copies under `model.layers.61.embed_tokens.weight` and
//! `model.layers.61.shared_head.head.weight` are not params of the IR.
//!
//! # Semantics
//!
//! - Block: `h = x + attn(rms(x)); y = h + ffn(rms(h))`, norms with `norm_eps`.
//! - MLA (DeepSeek-V2 §2.1), emitted decompressed, node for node:
//!   ```text
//!   q     = q_b_proj(rms(q_a_proj(x), latent_norm_eps))    or q_proj(x)
//!   q     = reshape(q, [b,s,H,nope+rope]);  q_nope = slice(q, 3, 0, nope);  q_pe = slice(q, 3, nope, rope)
//!   q     = concat(q_nope, rope(q_pe, positions), axis 3)
//!   ckv   = kv_a_proj_with_mqa(x);  latent = rms(slice(ckv, 2, 0, kv_lora), latent_norm_eps)
//!   k_pe  = rope(slice(ckv, 2, kv_lora, rope), positions)           # [b,s,rope], one head
//!   latent, k_pe = cache_append(cache, ·, axis 0)                   # decode only
//!   kv    = reshape(kv_b_proj(latent), [b,sk,H,nope+v]);  k_nope = slice(kv, 3, 0, nope);  v = slice(kv, 3, nope, v)
//!   k     = concat(k_nope, broadcast(reshape(k_pe, [b,sk,1,rope]), [b,sk,H,rope]), axis 3)
//!   o     = o_proj(reshape(attention(q, k, v, heads=H, kv_heads=H, causal), [b,s,H·v]))
//!   ```
//!   The absorption pass ([`crate::passes::mla_absorb`]) recognises the chain from the
//!   `attention` node: its `k` is `concat(slice(reshape(matmul(latent, kv_b))),
//!   broadcast(reshape(k_pe)))` and its `v` a slice of the same reshape; it folds
//!   `kv_b_proj`'s key rows into the query (`q_nope · W_UK`) and its value rows into the
//!   attention output, and attends over the latent with `kv_heads = 1`.
//! - Softmax scale: MLA `(nope+rope)^-½`, times `mscale(factor, mscale_all_dim)²` with
//!   YaRN ([`dsc_dsl::model::yarn_mscale`]); MHA/GQA `head_dim^-½` (Llama applies YaRN to
//!   cos/sin only). The rope op carries the YaRN settings and scales cos/sin itself.
//! - RoPE: the spec's layout and theta; `rotary_dim` is `qk_rope_head_dim` (MLA) or
//!   `head_dim`. Keys are cached after RoPE.
//! - MoE: router logits `x · gate.weightᵀ` in f32 (both cast), then `moe_route` with the
//!   spec's [`Routing`](crate::ir::Routing) (and the bias input when `selection_bias`),
//!   `expert_ffn` over the stacked experts, plus the shared experts' SwiGLU when there are
//!   any. In training the layer also returns its balance loss and expert loads.
//! - MTP (DeepSeek-V3 §2.2), train only: `h_0` is the main model's last hidden state
//!   before the final norm. For `k = 1..=depth`, module `k` runs on positions `0..s-k`:
//!   `h_k = block_k(eh_proj(concat(enorm(embed(tokens k..s)), hnorm(h_{k-1}[0..s-k]))))`
//!   (concat order from `mtp.concat`), with the RoPE positions of the hidden stream
//!   (`positions[0..s-k]`); `shared_head.norm(h_k)` goes through the shared head and is
//!   scored against `labels[k+1..s]`; `mtp_loss = loss_weight / depth · Σ_k loss_k`.
//!
//! # Spans
//!
//! Every node carries the span of the spec text it comes from: attention ops, their
//! params and the cache arguments → `attention`; rope ops → `rope`; block and final norms
//! → `norm_eps`; dense SwiGLU → `ffn.dense.intermediate`; router (casts, matmul,
//! `moe_route`, gate params) → `ffn.moe.router`; routed experts →
//! `ffn.moe.routed_experts`; shared experts → `ffn.moe.shared_experts`; a layer
//! function's arguments, residual adds and return → its `ffn` block (`ffn.moe`); a call
//! of layer L → the `layers` entry of the block that owns L; embedding, head, `input_ids`,
//! `labels` and the main loss → `vocab`;
//! `positions` → `rope`; MTP → `mtp`, its concat → `mtp.concat`, the loss weighting →
//! `mtp.loss_weight`; an entry's return → `layers`.

mod attention;
mod builder;
mod entry;
mod ffn;
mod layer;
#[cfg(test)]
mod tests;

pub use entry::IGNORE_INDEX;

use crate::ir::{verify, DType, Dim, Function, InferError, Mode, Module, Signature, Ty, VerifyError};
use dsc_dsl::model::{Ffn, Model};
use dsc_dsl::span::Span;
use dsc_dsl::Spec;
use std::collections::HashMap;
use std::fmt;

/// Why a spec could not be lowered.
#[derive(Debug, Clone, PartialEq)]
pub enum LowerError {
    /// A node broke its op's shape rule while being built: a bug in lowering, since a
    /// resolved spec is consistent. The error carries the node's span.
    Shape { function: String, error: InferError },
    /// The finished module failed the verifier (also a bug in lowering).
    Invalid(Vec<VerifyError>),
    /// The model is valid but outside what the IR can express.
    Unsupported { span: Option<Span>, message: String },
}

impl LowerError {
    /// The spec text the error concerns, when known.
    pub fn span(&self) -> Option<Span> {
        match self {
            LowerError::Shape { error, .. } => error.span,
            LowerError::Invalid(errors) => errors.iter().find_map(|e| e.span),
            LowerError::Unsupported { span, .. } => *span,
        }
    }
}

impl fmt::Display for LowerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LowerError::Shape { function, error } => write!(f, "lowering `{function}`: {error}"),
            LowerError::Invalid(errors) => {
                write!(f, "the lowered module is invalid:")?;
                for e in errors {
                    write!(f, "\n  {e}")?;
                }
                Ok(())
            }
            LowerError::Unsupported { message, .. } => write!(f, "cannot lower: {message}"),
        }
    }
}

impl std::error::Error for LowerError {}

/// What the train entry's first result is.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum TrainHead {
    /// `loss: f32[]`, the mean next-token cross-entropy over labelled positions (SFT,
    /// pre-training).
    #[default]
    Loss,
    /// `logp: f32[b, s-1]`, the log-probability of each next label at `temperature`
    /// (`log_softmax(logits / temperature)[label]`, 0 where the label is ignored): what a
    /// policy-gradient objective such as GRPO is a function of. The rest of the entry's
    /// results are unchanged.
    LogProbs { temperature: f64 },
}

/// Which positions the prefill entry computes logits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum PrefillLogits {
    /// `logits: [b, s, vocab]`, every position (`dsc logits`, scoring a sequence).
    #[default]
    All,
    /// `logits: [b, 1, vocab]`, the last position only: what a generation's prompt pass
    /// samples from. The final norm and the output head run on one row per sequence
    /// instead of `s` (the head is the largest single matmul of a small model's prefill).
    Last,
}

/// Lowers `spec` to one module with the prefill, decode and train entry points.
pub fn lower(spec: &Spec) -> Result<Module, LowerError> {
    build(spec, &Mode::ALL, TrainHead::Loss)
}

/// Lowers `spec` to a module with only `mode`'s entry point and the functions it calls
/// (the same functions, node for node, as [`lower`] builds for that mode).
pub fn lower_mode(spec: &Spec, mode: Mode) -> Result<Module, LowerError> {
    build(spec, &[mode], TrainHead::Loss)
}

/// Lowers `spec`'s train entry with `head` as its first result.
pub fn lower_train(spec: &Spec, head: TrainHead) -> Result<Module, LowerError> {
    if let TrainHead::LogProbs { temperature } = head {
        if !(temperature.is_finite() && temperature > 0.0) {
            return Err(LowerError::Unsupported {
                span: None,
                message: format!("log-probabilities need a temperature > 0, got {temperature}"),
            });
        }
    }
    build(spec, &[Mode::Train], head)
}

/// Lowers `spec`'s prefill entry with logits for the positions `logits` says (the same
/// module as [`lower_mode`]`(spec, Mode::Prefill)` for [`PrefillLogits::All`]).
pub fn lower_prefill(spec: &Spec, logits: PrefillLogits) -> Result<Module, LowerError> {
    let mut cx = Cx::new(spec)?;
    cx.logits = logits;
    build_with(cx, &[Mode::Prefill])
}

fn build(spec: &Spec, modes: &[Mode], head: TrainHead) -> Result<Module, LowerError> {
    let mut cx = Cx::new(spec)?;
    cx.head = head;
    build_with(cx, modes)
}

fn build_with(cx: Cx, modes: &[Mode]) -> Result<Module, LowerError> {
    let mut module = Module::new();
    for &mode in modes {
        add_mode(&cx, &mut module, mode)?;
    }
    verify(&module).map_err(LowerError::Invalid)?;
    Ok(module)
}

fn add_mode(cx: &Cx, module: &mut Module, mode: Mode) -> Result<(), LowerError> {
    let mut sigs: HashMap<String, Signature> = HashMap::new();
    let mut add = |module: &mut Module, f: Function| {
        sigs.insert(f.name.clone(), f.graph.signature());
        module.add_function(f);
    };
    for kind in &cx.kinds {
        add(module, layer::layer_function(cx, mode, &kind.name, &kind.key, kind.ffn)?);
    }
    if mode == Mode::Train {
        if let Some(mtp) = &cx.m.mtp {
            for k in 1..=mtp.depth {
                add(module, layer::mtp_function(cx, mtp, k)?);
            }
        }
    }
    let f = entry::entry_function(cx, mode, &sigs)?;
    module.set_entry(mode, &f.name);
    module.add_function(f);
    Ok(())
}

/// A layer kind: one `ffn` block of the model that owns at least one layer.
struct Kind<'s> {
    /// `dense` or `moe`: the function name suffix.
    name: String,
    /// The block's spec path (`ffn.moe`), for spans.
    key: String,
    ffn: &'s Ffn,
}

/// What every part of lowering reads: the spec, and the layer kinds worked out once.
struct Cx<'s> {
    spec: &'s Spec,
    m: &'s Model,
    /// Weight and activation dtype.
    dt: DType,
    /// Layer kinds in the order of their first layer.
    kinds: Vec<Kind<'s>>,
    /// Index into `kinds` for every layer.
    layer_kind: Vec<usize>,
    /// The train entry's first result.
    head: TrainHead,
    /// The prefill entry's logits.
    logits: PrefillLogits,
}

/// The spec's name for a feed-forward kind (the `ffn` label).
fn kind_name(f: &Ffn) -> &'static str {
    match f {
        Ffn::Dense { .. } => "dense",
        Ffn::Moe(_) => "moe",
    }
}

impl<'s> Cx<'s> {
    fn new(spec: &'s Spec) -> Result<Cx<'s>, LowerError> {
        let m = &spec.model;
        // Layer and MTP indices are u32 in calls; resolution bounds them far lower.
        let depth = m.mtp.as_ref().map_or(0, |t| t.depth);
        if m.layers + depth > u64::from(u32::MAX) {
            let message = format!("{} layers and {depth} MTP modules exceed the IR's u32 layer index", m.layers);
            return Err(LowerError::Unsupported { span: spec.spans.get("layers"), message });
        }
        let mut kinds: Vec<Kind> = Vec::new();
        let mut block_kind: HashMap<usize, usize> = HashMap::new();
        let mut layer_kind = Vec::with_capacity(m.layers as usize);
        for l in 0..m.layers {
            let Some(bi) = m.ffn.iter().position(|b| b.layers.contains(l)) else {
                let message = format!("no ffn block owns layer {l}");
                return Err(LowerError::Unsupported { span: spec.spans.get("layers"), message });
            };
            let k = *block_kind.entry(bi).or_insert_with(|| {
                let base = kind_name(&m.ffn[bi].kind);
                // Resolution allows one block per kind; a hand-built model with two gets
                // distinct function names all the same.
                let taken = kinds.iter().any(|k| k.name == base);
                let name = if taken { format!("{base}{bi}") } else { base.to_string() };
                kinds.push(Kind { name, key: format!("ffn.{base}"), ffn: &m.ffn[bi].kind });
                kinds.len() - 1
            });
            layer_kind.push(k);
        }
        Ok(Cx { spec, m, dt: m.dtype.into(), kinds, layer_kind, head: TrainHead::Loss, logits: PrefillLogits::All })
    }

    /// New tokens per sequence: `s` for prefill and train, 1 for decode.
    fn seq(&self, mode: Mode) -> Dim {
        match mode {
            Mode::Prefill | Mode::Train => Dim::S,
            Mode::Decode => Dim::lit(1),
        }
    }

    /// The residual stream `[b, seq, hidden]`.
    fn act(&self, seq: Dim) -> Ty {
        Ty::new(self.dt, [Dim::B, seq, Dim::from(self.m.hidden)])
    }
}
