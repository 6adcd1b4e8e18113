//! The architecture cost model behind `dsc stats`: parameter counts, KV-cache size and
//! forward FLOPs per token, computed from a resolved [`Model`] alone.
//!
//! Every count follows the tensors of the Hugging Face checkpoints (names below are HF's),
//! so a count can be checked against a `model.safetensors` header.
//!
//! # Parameters ([`Params`])
//! Per layer: two RMSNorm gains (`input_layernorm`, `post_attention_layernorm`, `hidden`
//! each), the attention and the feed-forward block of that layer.
//! - GQA/MHA: `q_proj` hidden·heads·hd, `k_proj` and `v_proj` hidden·kv_heads·hd each,
//!   `o_proj` heads·hd·hidden.
//! - MLA: with a query rank, `q_a_proj` hidden·q_lora + `q_a_layernorm` q_lora +
//!   `q_b_proj` q_lora·heads·(nope+rope); without, `q_proj` hidden·heads·(nope+rope); then
//!   `kv_a_proj_with_mqa` hidden·(kv_lora+rope), `kv_a_layernorm` kv_lora, `kv_b_proj`
//!   kv_lora·heads·(nope+v), `o_proj` heads·v·hidden.
//! - Dense SwiGLU: 3·hidden·intermediate (`gate_proj`, `up_proj`, `down_proj`).
//! - MoE: routed experts E·3·hidden·inter_e, shared experts 3·hidden·(shared·inter_e),
//!   router `gate` E·hidden, plus E for the selection bias (`e_score_correction_bias`).
//!
//! The counts reported:
//! - `total`: every parameter of the main model: embedding table, output head (unless tied
//!   to the embedding), final norm and all layers. MTP modules are not included.
//! - `active`: what one token uses: `total` minus, in each MoE layer, the
//!   `routed_experts - top_k` routed experts it is not sent to. The embedding table and the
//!   head are counted in full.
//! - `active_non_embedding`: `active` minus the input embedding table (with tied embeddings
//!   that table is also the head, so the head goes with it).
//! - `mtp`: parameters unique to the MTP modules, per depth: `enorm` and `hnorm` (hidden
//!   each), `eh_proj` 2·hidden·hidden, one full transformer block (two norms, attention,
//!   the feed-forward kind named by `mtp.ffn`, all its experts) and the `shared_head` norm
//!   (hidden). The embedding and the output head are shared with the main model and are
//!   not counted (the published V3 checkpoint stores copies of both in its MTP layer).
//! - `embedding`: vocab·hidden. `head`: vocab·hidden, or 0 when tied.
//!
//! # KV cache ([`KvCache`])
//! Elements cached per token over all main-model layers: GQA caches K and V per KV head,
//! 2·kv_heads·head_dim per layer; MLA caches the normalised latent and the rotated shared
//! rope key, kv_lora + rope per layer. `naive` is what full per-head K and V would hold:
//! 2·heads·head_dim (GQA), heads·(nope+rope) + heads·v (MLA).
//!
//! # FLOPs ([`Flops`])
//! Forward FLOPs for one token that attends to `context` positions (a multiply-add is 2):
//! ```text
//! matmul    = 2 · (weight-matrix parameters the token multiplies by)
//! attention = Σ_layers 2·heads·qk_dim·context + 2·heads·v_dim·context
//! per_token = matmul + attention
//! ```
//! The matrices are the attention projections, the dense FFN, the `top_k` routed experts
//! and the shared experts of each MoE layer, the router gate and the output head (also
//! when tied); the embedding lookup, norms and biases are not matrix multiplies. The
//! attention term counts QKᵀ and AV: GQA has qk_dim = v_dim = head_dim; MLA is counted in
//! its decompressed form, qk_dim = nope+rope and v_dim = v, with `kv_b_proj` applied once
//! to the token's own latent (as if decompressed K/V were cached; re-expanding every cached
//! latent at every step, as the unabsorbed reference code does, is not counted). MTP
//! modules (a training-time objective, optional speculative decoding) are not included.
//!
//! Counts are u128: the resolver bounds every dimension, and within those bounds an
//! absurd spec can exceed u64 (2^16 experts × 2^24 × 2^24 weights per layer), while u128
//! holds every count exactly; nothing saturates or wraps.

use dsc_dsl::model::{Attention, DType, Ffn, Model};
use serde::Serialize;
use std::collections::BTreeMap;

/// What [`stats`] computes for one model at one context length.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Stats {
    pub params: Params,
    pub kv_cache: KvCache,
    pub flops: Flops,
}

/// Parameter counts; see the module documentation for what each one includes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Params {
    pub total: u128,
    pub active: u128,
    pub active_non_embedding: u128,
    pub mtp: u128,
    pub embedding: u128,
    pub head: u128,
}

/// KV-cache size per token, summed over the main model's layers.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct KvCache {
    pub elements_per_token: u128,
    /// What caching full per-head K and V would take (MHA with the same heads and dims).
    pub naive_elements_per_token: u128,
    /// `elements_per_token` times the element size, keyed by dtype name
    /// (`f32`, `bf16`, `f16`, `fp8`).
    pub bytes_per_token: BTreeMap<String, u128>,
    /// `1 - elements / naive_elements`.
    pub reduction_vs_naive: f64,
}

/// Forward FLOPs of one token at a given context length.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Flops {
    /// `matmul + attention`.
    pub per_token: u128,
    /// Positions attended to.
    pub context: u128,
    /// 2 · active weight-matrix parameters.
    pub matmul: u128,
    /// QKᵀ and AV over `context` positions, all layers.
    pub attention: u128,
}

/// Computes parameter counts, KV-cache size and the FLOPs of one token attending to
/// `context` positions. See the module documentation for the definitions.
pub fn stats(model: &Model, context: u64) -> Stats {
    let h = model.hidden as u128;
    let vocab = model.vocab as u128;
    let attn = attention_counts(model);

    let embedding = vocab * h;
    let head = if model.tie_embeddings { 0 } else { vocab * h };
    let final_norm = h;
    let layer_norms = 2 * h;

    let mut total = embedding + head + final_norm;
    let mut active = embedding + head + final_norm;
    // The output head is a matmul whether or not it shares its weights with the embedding.
    let mut matrix = vocab * h;
    for l in 0..model.layers {
        let f = ffn_counts(h, model.ffn_for_layer(l));
        total += layer_norms + attn.params + f.total;
        active += layer_norms + attn.params + f.active;
        matrix += attn.matrix + f.active_matrix;
    }

    let mtp = match &model.mtp {
        Some(m) => {
            let ffn = ffn_counts(h, &model.ffn[m.ffn].kind);
            let enorm_hnorm = 2 * h;
            let eh_proj = 2 * h * h;
            let block = layer_norms + attn.params + ffn.total;
            let shared_head_norm = h;
            m.depth as u128 * (enorm_hnorm + eh_proj + block + shared_head_norm)
        }
        None => 0,
    };

    let layers = model.layers as u128;
    let (kv, naive, heads, qk_dim, v_dim) = match &model.attention {
        Attention::Gqa(a) => (
            2 * a.kv_heads as u128 * a.head_dim as u128,
            2 * a.heads as u128 * a.head_dim as u128,
            a.heads as u128,
            a.head_dim as u128,
            a.head_dim as u128,
        ),
        Attention::Mla(a) => {
            let qk = (a.qk_nope_head_dim + a.qk_rope_head_dim) as u128;
            let heads = a.heads as u128;
            ((a.kv_lora_rank + a.qk_rope_head_dim) as u128, heads * qk + heads * a.v_head_dim as u128, heads, qk, a.v_head_dim as u128)
        }
    };
    let kv_elems = layers * kv;
    let naive_elems = layers * naive;
    let bytes_per_token = DType::ALL.iter().map(|d| (d.name().to_string(), (kv_elems * d.bytes() as u128))).collect();

    let ctx = context as u128;
    let attention = layers * (2 * heads * qk_dim * ctx + 2 * heads * v_dim * ctx);
    let matmul = 2 * matrix;

    Stats {
        params: Params {
            total: (total),
            active: (active),
            active_non_embedding: (active - embedding),
            mtp: (mtp),
            embedding: (embedding),
            head: (head),
        },
        kv_cache: KvCache {
            elements_per_token: (kv_elems),
            naive_elements_per_token: (naive_elems),
            bytes_per_token,
            reduction_vs_naive: 1.0 - kv_elems as f64 / naive_elems as f64,
        },
        flops: Flops { per_token: matmul + attention, context: ctx, matmul, attention },
    }
}

/// One attention block: all its parameters (including the MLA latent norms) and the part
/// that is weight matrices.
struct AttnCounts {
    params: u128,
    matrix: u128,
}

fn attention_counts(model: &Model) -> AttnCounts {
    let h = model.hidden as u128;
    match &model.attention {
        Attention::Gqa(a) => {
            let (heads, kv, hd) = (a.heads as u128, a.kv_heads as u128, a.head_dim as u128);
            let q = h * heads * hd;
            let k_v = 2 * h * kv * hd;
            let o = heads * hd * h;
            AttnCounts { params: q + k_v + o, matrix: q + k_v + o }
        }
        Attention::Mla(a) => {
            let heads = a.heads as u128;
            let (nope, rope, v) = (a.qk_nope_head_dim as u128, a.qk_rope_head_dim as u128, a.v_head_dim as u128);
            let kv_lora = a.kv_lora_rank as u128;
            let (q_matrix, q_norm) = match a.q_lora_rank {
                Some(r) => {
                    let r = r as u128;
                    (h * r + r * heads * (nope + rope), r)
                }
                None => (h * heads * (nope + rope), 0),
            };
            let kv_a = h * (kv_lora + rope);
            let kv_b = kv_lora * heads * (nope + v);
            let o = heads * v * h;
            let matrix = q_matrix + kv_a + kv_b + o;
            AttnCounts { params: matrix + q_norm + kv_lora, matrix }
        }
    }
}

/// One feed-forward block: all its parameters, those one token uses, and the weight
/// matrices one token multiplies by.
struct FfnCounts {
    total: u128,
    active: u128,
    active_matrix: u128,
}

fn ffn_counts(h: u128, ffn: &Ffn) -> FfnCounts {
    match ffn {
        Ffn::Dense { intermediate } => {
            let p = 3 * h * *intermediate as u128;
            FfnCounts { total: p, active: p, active_matrix: p }
        }
        Ffn::Moe(m) => {
            let e = m.routed_experts as u128;
            let k = m.router.top_k as u128;
            let expert = 3 * h * m.expert_intermediate as u128;
            let shared = 3 * h * (m.shared_experts as u128 * m.expert_intermediate as u128);
            let gate = e * h;
            let bias = if m.router.selection_bias { e } else { 0 };
            let total = e * expert + shared + gate + bias;
            FfnCounts { total, active: total - (e - k) * expert, active_matrix: k * expert + shared + gate }
        }
    }
}

impl Stats {
    /// A readable, aligned table: parameters in billions and exactly, KV-cache bytes per
    /// token for each dtype (and for the whole context in the model's dtype), FLOPs in GFLOP.
    pub fn render_table(&self, model: &Model) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let attn = match &model.attention {
            Attention::Gqa(a) if a.kv_heads == a.heads => format!("MHA {} heads × {}", a.heads, a.head_dim),
            Attention::Gqa(a) => format!("GQA {} heads / {} KV heads × {}", a.heads, a.kv_heads, a.head_dim),
            Attention::Mla(a) => format!("MLA {} heads, latent {} + rope {}", a.heads, a.kv_lora_rank, a.qk_rope_head_dim),
        };
        let _ = writeln!(s, "{}: {} layers, hidden {}, {attn}, {}", model.name, model.layers, model.hidden, model.dtype.name());

        let p = &self.params;
        let _ = writeln!(s, "\nparameters                      billions            exact");
        let mut row = |label: &str, v: u128| {
            let _ = writeln!(s, "  {label:<26} {:>12.3}  {:>15}", v as f64 / 1e9, grouped(v));
        };
        row("total", p.total);
        row("active per token", p.active);
        row("active, without embedding", p.active_non_embedding);
        row("embedding", p.embedding);
        row(if model.tie_embeddings { "output head (tied)" } else { "output head" }, p.head);
        if model.mtp.is_some() {
            row("MTP modules (not in total)", p.mtp);
        }

        let kv = &self.kv_cache;
        let _ = writeln!(
            s,
            "\nKV cache per token: {} elements ({} with full per-head K and V: {:.1}% smaller)",
            grouped(kv.elements_per_token),
            grouped(kv.naive_elements_per_token),
            kv.reduction_vs_naive * 100.0
        );
        for d in DType::ALL {
            let bytes = kv.bytes_per_token.get(d.name()).copied().unwrap_or(0);
            let mark = if d == model.dtype { "  (model dtype)" } else { "" };
            let _ = writeln!(s, "  {:<26} {:>12} bytes  {:>10.1} KiB{mark}", d.name(), grouped(bytes), bytes as f64 / 1024.0);
        }
        let ctx = self.flops.context;
        let per_token = kv.bytes_per_token.get(model.dtype.name()).copied().unwrap_or(0);
        let whole = per_token as f64 * ctx as f64;
        let _ = writeln!(s, "  at context {}: {:.3} GiB per sequence in {}", grouped(ctx), whole / (1u64 << 30) as f64, model.dtype.name());

        let f = &self.flops;
        let _ = writeln!(s, "\nforward FLOPs per token at context {}", grouped(ctx));
        for (label, v) in [("matmul", f.matmul), ("attention", f.attention), ("total", f.per_token)] {
            let _ = writeln!(s, "  {label:<26} {:>12.3} GFLOP  {:>19}", v as f64 / 1e9, grouped(v));
        }
        s
    }
}

/// The least one step of a model must do, whatever the plan that runs it: what the
/// traffic model (`codegen::traffic`) compares a compiled plan against. Bytes are in the
/// model's dtype (token ids are 8 bytes).
///
/// - `weight_bytes`: every weight the step touches, read once: all of them but the routed
///   experts, which count the experts `tokens = b·s` tokens reach under uniform routing
///   (`E·(1 - (1 - k/E)^tokens)` per MoE layer, as `codegen::launch::expert_fraction`), and
///   the embedding, which counts the rows looked up (the whole table when tied to the
///   head). Training adds the MTP modules and writes one gradient per weight touched.
/// - `kv_read_bytes` / `kv_write_bytes`: the KV cache read once (`b·c` positions) and the
///   new entries written once (`b·s`); training keeps no cache.
/// - `io_bytes`: the token ids in, the logits of every position out (training: ids and
///   labels in, the loss out).
/// - `flops`: the forward of the unfused spec as [`Flops`] defines it (a query at position
///   `c + i` attends to `c + i` positions, so prefill's causal attention is counted once
///   per visible pair), three times for training (the backward's two products per
///   matmul), with the MTP modules' blocks and heads.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct StepIdeal {
    pub weight_bytes: f64,
    pub kv_read_bytes: f64,
    pub kv_write_bytes: f64,
    pub io_bytes: f64,
    pub flops: f64,
}

impl StepIdeal {
    pub fn bytes(&self) -> f64 {
        self.weight_bytes + self.kv_read_bytes + self.kv_write_bytes + self.io_bytes
    }
}

/// [`StepIdeal`] of a step over `batch` sequences of `seq` new tokens after `cache` cached
/// positions; `train` for a training step (forward and backward, `cache` ignored).
pub fn step_ideal(model: &Model, train: bool, batch: u64, cache: u64, seq: u64) -> StepIdeal {
    let (h, vocab) = (model.hidden as f64, model.vocab as f64);
    let cache = if train { 0 } else { cache };
    // In f64 throughout: the sizes are a user's, and their products may leave u64.
    let (bf, cf, sf) = (batch as f64, cache as f64, seq as f64);
    let tokens = bf * sf;
    let elem = model.dtype.bytes() as f64;
    let st = stats(model, 1);
    let attn = attention_counts(model);
    // Elements of one FFN block a batch of `tokens` touches, and its matrix FLOPs per token.
    let ffn_touched = |ffn: &Ffn| -> f64 {
        let c = ffn_counts(model.hidden as u128, ffn);
        match ffn {
            Ffn::Dense { .. } => c.total as f64,
            Ffn::Moe(m) => {
                let (e, k) = (m.routed_experts as i64, m.router.top_k as i64);
                let expert = 3.0 * h * m.expert_intermediate as f64;
                let reached = e as f64 * crate::codegen::launch::expert_fraction(e, k, tokens.min(i64::MAX as f64) as i64);
                c.total as f64 - e as f64 * expert + reached * expert
            }
        }
    };
    let embedding = st.params.embedding as f64;
    let looked_up = if model.tie_embeddings { embedding } else { tokens.min(vocab) * h };
    let mut weights = (st.params.total as f64 - embedding) + looked_up;
    for l in 0..model.layers {
        let ffn = model.ffn_for_layer(l);
        weights += ffn_touched(ffn) - ffn_counts(model.hidden as u128, ffn).total as f64;
    }
    // Per position attended to, all layers: QKᵀ and AV.
    let attn_per_position = st.flops.attention as f64;
    let visible = sf * cf + sf * (sf + 1.0) / 2.0;
    let mut flops = tokens * st.flops.matmul as f64 + bf * attn_per_position * visible;
    let kv = st.kv_cache.elements_per_token as f64 * elem;
    if !train {
        return StepIdeal {
            weight_bytes: weights * elem,
            kv_read_bytes: bf * cf * kv,
            kv_write_bytes: tokens * kv,
            io_bytes: tokens * 8.0 + tokens * vocab * elem,
            flops,
        };
    }
    if let Some(mtp) = &model.mtp {
        let ffn = &model.ffn[mtp.ffn].kind;
        let block = 2.0 * h + attn.params as f64 + ffn_touched(ffn);
        weights += mtp.depth as f64 * (2.0 * h + 2.0 * h * h + block + h);
        // Per token and module: eh_proj, the block's matrices, the shared head; attention
        // as one more layer.
        let matrix = 2.0 * (2.0 * h * h + attn.matrix as f64 + ffn_counts(model.hidden as u128, ffn).active_matrix as f64 + vocab * h);
        let attn_one_layer = attn_per_position / model.layers as f64;
        flops += mtp.depth as f64 * (tokens * matrix + bf * attn_one_layer * visible);
    }
    StepIdeal {
        weight_bytes: 2.0 * weights * elem,
        kv_read_bytes: 0.0,
        kv_write_bytes: 0.0,
        io_bytes: 2.0 * tokens * 8.0 + 4.0,
        flops: 3.0 * flops,
    }
}

/// `1234567` → `1,234,567`.
fn grouped(v: u128) -> String {
    let digits = v.to_string();
    // Groups of three from the right; the digits are ASCII, so every chunk is valid UTF-8.
    let groups: Vec<&str> = digits.as_bytes().rchunks(3).rev().map(|c| std::str::from_utf8(c).unwrap_or("?")).collect();
    groups.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;
    use dsc_dsl::model::*;

    fn router(top_k: u64, selection_bias: bool) -> Router {
        Router {
            top_k,
            scoring: Scoring::Softmax,
            selection_bias,
            groups: 1,
            groups_kept: 1,
            group_score: None,
            normalize: Normalize::Never,
            scale: 1.0,
            scale_normalized: true,
        }
    }

    fn balance() -> Balance {
        Balance { expert_aux: 0.0, device_aux: 0.0, comm_aux: 0.0, sequence_aux: 0.0, bias_update_speed: 0.0 }
    }

    fn layers(start: u64, end: u64) -> LayerSet {
        LayerSet { ranges: vec![LayerRange { start, end, step: 1 }] }
    }

    /// vocab 10, hidden 4, 2 layers, GQA 2 heads / 1 KV head × 2, dense intermediate 6.
    fn tiny_gqa(tie: bool) -> Model {
        Model {
            name: "tiny_gqa".into(),
            vocab: 10,
            hidden: 4,
            layers: 2,
            dtype: DType::Bf16,
            tie_embeddings: tie,
            norm_eps: 1e-6,
            attention: Attention::Gqa(Gqa { heads: 2, kv_heads: 1, head_dim: 2 }),
            rope: Rope { theta: 10000.0, layout: RopeLayout::HalfSplit, yarn: None },
            ffn: vec![FfnBlock { layers: layers(0, 2), kind: Ffn::Dense { intermediate: 6 } }],
            mtp: None,
        }
    }

    #[test]
    fn gqa_dense_by_hand() {
        let s = stats(&tiny_gqa(false), 8);
        // embedding 10·4 = 40; head 40; final norm 4.
        // per layer: norms 2·4 = 8; q 4·2·2 = 16, k 4·1·2 = 8, v 8, o 2·2·4 = 16 → attn 48;
        //            ffn 3·4·6 = 72. Layer = 8 + 48 + 72 = 128.
        // total = 40 + 40 + 4 + 2·128 = 340.
        assert_eq!(s.params.total, 340);
        assert_eq!(s.params.active, 340);
        assert_eq!(s.params.active_non_embedding, 300);
        assert_eq!((s.params.embedding, s.params.head, s.params.mtp), (40, 40, 0));
        // KV: 2 layers · 2·1·2 = 8; naive 2 · 2·2·2 = 16 → 50% smaller.
        assert_eq!(s.kv_cache.elements_per_token, 8);
        assert_eq!(s.kv_cache.naive_elements_per_token, 16);
        assert_eq!(s.kv_cache.reduction_vs_naive, 0.5);
        assert_eq!(s.kv_cache.bytes_per_token["f32"], 32);
        assert_eq!(s.kv_cache.bytes_per_token["bf16"], 16);
        assert_eq!(s.kv_cache.bytes_per_token["f16"], 16);
        assert_eq!(s.kv_cache.bytes_per_token["fp8"], 8);
        // matrices: 2 · (48 + 72) + head 40 = 280 → matmul 560.
        // attention at context 8: 2 layers · (2·2·2·8 + 2·2·2·8) = 2 · 128 = 256.
        assert_eq!(s.flops, Flops { per_token: 816, context: 8, matmul: 560, attention: 256 });
    }

    #[test]
    fn tied_head_counts_once_but_still_multiplies() {
        let s = stats(&tiny_gqa(true), 8);
        // As above without the separate head: 340 - 40 = 300; the head matmul remains.
        assert_eq!(s.params.total, 300);
        assert_eq!(s.params.head, 0);
        assert_eq!(s.params.active_non_embedding, 260);
        assert_eq!(s.flops.matmul, 560);
    }

    /// vocab 10, hidden 4, 3 layers: MLA with 2 heads, optional q rank 3, kv rank 2,
    /// nope 2, rope 2, v 3; layer 0 dense (intermediate 6), layers 1..3 MoE with 4 routed
    /// experts (top 2), 1 shared, expert intermediate 2; an MTP module of depth 1.
    fn tiny_mla(q_lora: Option<u64>, selection_bias: bool) -> Model {
        Model {
            name: "tiny_mla".into(),
            vocab: 10,
            hidden: 4,
            layers: 3,
            dtype: DType::Bf16,
            tie_embeddings: false,
            norm_eps: 1e-6,
            attention: Attention::Mla(Mla {
                heads: 2,
                q_lora_rank: q_lora,
                kv_lora_rank: 2,
                qk_nope_head_dim: 2,
                qk_rope_head_dim: 2,
                v_head_dim: 3,
                latent_norm_eps: 1e-6,
            }),
            rope: Rope { theta: 10000.0, layout: RopeLayout::Interleaved, yarn: None },
            ffn: vec![
                FfnBlock { layers: layers(0, 1), kind: Ffn::Dense { intermediate: 6 } },
                FfnBlock {
                    layers: layers(1, 3),
                    kind: Ffn::Moe(Moe {
                        routed_experts: 4,
                        shared_experts: 1,
                        expert_intermediate: 2,
                        router: router(2, selection_bias),
                        balance: balance(),
                    }),
                },
            ],
            mtp: Some(Mtp { depth: 1, loss_weight: 0.3, concat: [MtpInput::Embedding, MtpInput::Hidden], ffn: 1 }),
        }
    }

    #[test]
    fn mla_moe_mtp_by_hand() {
        let s = stats(&tiny_mla(Some(3), true), 5);
        // Attention: q_a 4·3 = 12, q_a_norm 3, q_b 3·2·(2+2) = 24, kv_a 4·(2+2) = 16,
        //   kv_a_norm 2, kv_b 2·2·(2+3) = 20, o 2·3·4 = 24 → params 101, matrices 96.
        // Dense FFN 3·4·6 = 72. MoE: expert 3·4·2 = 24, routed 4·24 = 96, shared 3·4·2 = 24,
        //   gate 4·4 = 16, bias 4 → 140 total; active 140 - (4-2)·24 = 92; matrices
        //   2·24 + 24 + 16 = 88.
        // Layers: 8 + 101 + 72 = 181; 8 + 101 + 140 = 249 (twice).
        // total = 40 + 40 + 4 + 181 + 2·249 = 763.
        assert_eq!(s.params.total, 763);
        // active = 40 + 40 + 4 + 181 + 2·(8 + 101 + 92) = 667.
        assert_eq!(s.params.active, 667);
        assert_eq!(s.params.active_non_embedding, 627);
        // MTP: enorm + hnorm 8, eh_proj 2·4·4 = 32, block 8 + 101 + 140 = 249,
        //   shared_head norm 4 → 293.
        assert_eq!(s.params.mtp, 293);
        // KV: 3 layers · (2 + 2) = 12; naive 3 · (2·4 + 2·3) = 42.
        assert_eq!(s.kv_cache.elements_per_token, 12);
        assert_eq!(s.kv_cache.naive_elements_per_token, 42);
        assert!((s.kv_cache.reduction_vs_naive - (1.0 - 12.0 / 42.0)).abs() < 1e-15);
        // matrices: 3·96 + 72 + 2·88 + head 40 = 576 → matmul 1152.
        // attention at 5: 3 · (2·2·4·5 + 2·2·3·5) = 3 · 140 = 420.
        assert_eq!(s.flops, Flops { per_token: 1572, context: 5, matmul: 1152, attention: 420 });
    }

    #[test]
    fn mla_without_q_rank_and_bias() {
        let s = stats(&tiny_mla(None, false), 5);
        // q_proj 4·2·4 = 32 replaces q_a + norm + q_b (12 + 3 + 24 = 39): attention
        //   101 - 39 + 32 = 94 params, 96 - 36 + 32 = 92 matrices.
        //   MoE without bias: 136 total, 88 active.
        // total = 84 + (8+94+72) + 2·(8+94+136) = 84 + 174 + 476 = 734.
        assert_eq!(s.params.total, 734);
        // active = 84 + 174 + 2·(8+94+88) = 638.
        assert_eq!(s.params.active, 638);
        // mtp = 8 + 32 + (8 + 94 + 136) + 4 = 282.
        assert_eq!(s.params.mtp, 282);
        // matrices: 3·92 + 72 + 2·88 + 40 = 564.
        assert_eq!(s.flops.matmul, 1128);
    }

    #[test]
    fn mtp_on_dense_ffn_and_depth() {
        let mut m = tiny_mla(Some(3), true);
        m.mtp = Some(Mtp { depth: 2, loss_weight: 0.3, concat: [MtpInput::Embedding, MtpInput::Hidden], ffn: 0 });
        // Per depth: 8 + 32 + (8 + 101 + 72) + 4 = 225.
        assert_eq!(stats(&m, 1).params.mtp, 450);
        // MTP never changes the main-model numbers.
        let base = stats(&tiny_mla(Some(3), true), 1);
        assert_eq!(stats(&m, 1).params.total, base.params.total);
        assert_eq!(stats(&m, 1).flops, base.flops);
    }

    #[test]
    fn zero_context_leaves_only_matmuls() {
        let s = stats(&tiny_gqa(false), 0);
        assert_eq!(s.flops.attention, 0);
        assert_eq!(s.flops.per_token, s.flops.matmul);
    }

    #[test]
    fn counts_beyond_u64_stay_exact() {
        // Within the resolver's limits but far beyond u64 for the expert weights:
        // 65536 experts · 3 · 2^24 · 2^24 per layer.
        let big = 1u64 << 24;
        let mut m = tiny_mla(Some(3), false);
        m.hidden = big;
        m.ffn[1].kind = Ffn::Moe(Moe {
            routed_experts: 1 << 16,
            shared_experts: 0,
            expert_intermediate: big,
            router: router(1, false),
            balance: balance(),
        });
        let s = stats(&m, 1);
        assert!(s.params.total > u64::MAX as u128);
        // The experts a token skips: (2^16 - 1) of them, 3 · 2^24 · 2^24 weights each, per MoE layer.
        let moe_layers = m.ffn[1].layers.count() as u128;
        assert_eq!(s.params.total - s.params.active, moe_layers * ((1u128 << 16) - 1) * 3 * (1u128 << 48));
    }

    #[test]
    fn grouping_and_table() {
        assert_eq!(grouped(0), "0");
        assert_eq!(grouped(999), "999");
        assert_eq!(grouped(1000), "1,000");
        assert_eq!(grouped(671026419200), "671,026,419,200");
        let m = tiny_mla(Some(3), true);
        let t = stats(&m, 5).render_table(&m);
        assert!(t.starts_with("tiny_mla: 3 layers, hidden 4, MLA 2 heads, latent 2 + rope 2, bf16\n"), "{t}");
        assert!(t.contains("  total                             0.000              763\n"), "{t}");
        assert!(t.contains("MTP modules (not in total)"), "{t}");
        assert!(t.contains("  bf16                                 24 bytes         0.0 KiB  (model dtype)\n"), "{t}");
        assert!(t.contains("forward FLOPs per token at context 5\n"), "{t}");
        // Every row of a section lines up: the numbers end in the same column.
        let param_rows: Vec<&str> = t.lines().skip(3).take_while(|l| !l.is_empty()).collect();
        assert_eq!(param_rows.len(), 6, "{t}");
        assert!(param_rows.iter().all(|l| l.len() == param_rows[0].len()), "{param_rows:?}");
    }
}
