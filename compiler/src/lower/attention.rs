//! The attention sublayer: multi-head latent attention (DeepSeek-V2 §2.1, Hugging Face
//! `DeepseekV2Attention` / `DeepseekV3Attention`) and multi-head / grouped-query attention
//! (Hugging Face `LlamaAttention`), with the per-layer KV cache each one keeps.
//!
//! MLA is emitted in its *decompressed* form, the one Hugging Face computes: the cache
//! holds only the normalised latent and the rotated decoupled key, and `kv_b_proj`
//! re-expands keys and values over all positions at every step. The node chain is fixed
//! (see the module doc of [`crate::lower`]) so that the absorption pass can find
//! `kv_b_proj`'s matmul, the `k_nope | v` slices and the attention by pattern.

use super::builder::Builder;
use super::{Cx, LowerError};
use crate::ir::{Dim, Op, RopeLayout, Ty, Value, Yarn};
use dsc_dsl::model::{yarn_mscale, Attention, Gqa, Mla};

/// What a layer does with its KV cache, which is what distinguishes the modes' layer
/// functions.
pub(super) enum Kv {
    /// Training: no cache.
    None,
    /// Prefill: no cache comes in; the new entries (`[b, s, ..]`) go out.
    Emit,
    /// Decode: the cache (`[b, c, ..]`, two tensors) comes in, the new entries are
    /// appended along the sequence axis and the longer cache goes out.
    Append([Value; 2]),
}

/// The two cache tensors of one layer: names and types for `len` cached positions.
/// MLA: `kv_latent [b, len, kv_lora]` and `k_pe [b, len, rope]`; MHA/GQA: `k` and `v`
/// `[b, len, kv_heads, head_dim]`.
pub(super) fn cache_slots(cx: &Cx, len: Dim) -> [(&'static str, Ty); 2] {
    let (b, dt) = (Dim::B, cx.dt);
    match &cx.m.attention {
        Attention::Mla(a) => {
            [("kv_latent", Ty::new(dt, [len, b, a.kv_lora_rank.into()])), ("k_pe", Ty::new(dt, [len, b, a.qk_rope_head_dim.into()]))]
        }
        Attention::Gqa(a) => {
            let t = Ty::new(dt, [len, b, a.kv_heads.into(), a.head_dim.into()]);
            [("k", t.clone()), ("v", t)]
        }
    }
}

/// `o_proj(attention(x))` for `x: [b, seq, hidden]` (already normalised) and the cache
/// values the layer returns, position-major: none (train), the new `[seq, b, ..]` entries
/// (prefill) or the appended `[c+seq, b, ..]` caches (decode).
pub(super) fn attention(b: &mut Builder, cx: &Cx, x: Value, pos: Value, seq: Dim, kv: &Kv) -> Result<(Value, Vec<Value>), LowerError> {
    b.at(&["attention"]);
    match &cx.m.attention {
        Attention::Mla(a) => mla(b, cx, a, x, pos, seq, kv),
        Attention::Gqa(a) => gqa(b, cx, a, x, pos, seq, kv),
    }
}

/// The Rope op for `rotary_dim` dims, with the spec's layout, theta and YaRN.
fn rope_op(cx: &Cx, rotary_dim: u64) -> Op {
    let r = &cx.m.rope;
    Op::Rope {
        layout: RopeLayout::from(r.layout),
        theta: r.theta.into(),
        rotary_dim: rotary_dim as u32,
        yarn: r.yarn.as_ref().map(Yarn::from),
    }
}

/// Applies the layer's cache policy to the two new cache entries (`[b, seq, ..]`);
/// returns the full key side to attend over (`[b, keys, ..]`) and what the layer returns.
///
/// The cache is held position-major (`[len, b, ..]`) so that appending a step's entries
/// writes past the end of what is there: a runtime that keeps the cache in a buffer with
/// room (the device engines) appends in place, and the older positions never move. The
/// layer reads it batch-major through a `permute`, which the device kernels read as a
/// strided view instead of copying.
fn keep(b: &mut Builder, kv: &Kv, new: [Value; 2]) -> Result<([Value; 2], Vec<Value>), LowerError> {
    match kv {
        Kv::None => Ok((new, Vec::new())),
        Kv::Emit => Ok((new, vec![swap_lead(b, new[0])?, swap_lead(b, new[1])?])),
        Kv::Append(cache) => {
            let mut all = [new[0]; 2];
            for i in 0..2 {
                let entries = swap_lead(b, new[i])?;
                all[i] = b.op(Op::CacheAppend { axis: 0 }, &[cache[i], entries])?;
            }
            Ok(([swap_lead(b, all[0])?, swap_lead(b, all[1])?], all.to_vec()))
        }
    }
}

/// `x` with its two leading axes swapped (`[b, len, ..]` ↔ `[len, b, ..]`).
fn swap_lead(b: &mut Builder, x: Value) -> Result<Value, LowerError> {
    let rank = b.ty(x).shape.rank() as u8;
    let perm: Vec<u8> = [1, 0].into_iter().chain(2..rank).collect();
    b.op(Op::Permute { perm }, &[x])
}

/// Keys attend over `seq` new positions, plus `c` cached ones when decoding.
fn key_len(kv: &Kv, seq: Dim) -> Dim {
    match kv {
        Kv::Append(_) => Dim::C + seq,
        Kv::None | Kv::Emit => seq,
    }
}

fn mla(b: &mut Builder, cx: &Cx, a: &Mla, x: Value, pos: Value, seq: Dim, kv: &Kv) -> Result<(Value, Vec<Value>), LowerError> {
    let (bt, h) = (Dim::B, Dim::from(a.heads));
    let (nope, rope, vd) = (a.qk_nope_head_dim, a.qk_rope_head_dim, a.v_head_dim);
    let qk = nope + rope;

    // Queries: q_b(rms(q_a(x))) or q_proj(x), heads split into nope | rope.
    let q = match a.q_lora_rank {
        Some(r) => {
            let qa = b.linear(x, "self_attn.q_a_proj.weight", r)?;
            let qa = b.rms_norm(qa, "self_attn.q_a_layernorm.weight", a.latent_norm_eps)?;
            b.linear(qa, "self_attn.q_b_proj.weight", a.heads * qk)?
        }
        None => b.linear(x, "self_attn.q_proj.weight", a.heads * qk)?,
    };
    let q = b.reshape(q, [bt, seq, h, qk.into()])?;
    let q_nope = b.slice(q, 3, 0u64, nope)?;
    let q_pe = b.slice(q, 3, nope, rope)?;
    b.at(&["rope"]);
    let q_pe = b.op(rope_op(cx, rope), &[q_pe, pos])?;
    b.at(&["attention"]);
    let q = b.concat(&[q_nope, q_pe], 3)?;

    // The compressed key/value: latent | decoupled rope key, one head shared by all.
    let ckv = b.linear(x, "self_attn.kv_a_proj_with_mqa.weight", a.kv_lora_rank + rope)?;
    let latent = b.slice(ckv, 2, 0u64, a.kv_lora_rank)?;
    let k_pe = b.slice(ckv, 2, a.kv_lora_rank, rope)?;
    let latent = b.rms_norm(latent, "self_attn.kv_a_layernorm.weight", a.latent_norm_eps)?;
    b.at(&["rope"]);
    let k_pe = b.op(rope_op(cx, rope), &[k_pe, pos])?;
    b.at(&["attention"]);
    let ([latent, k_pe], cache_out) = keep(b, kv, [latent, k_pe])?;

    // Decompression over every key position: kv_b(latent) → k_nope | v per head.
    let sk = key_len(kv, seq);
    let kvb = b.linear(latent, "self_attn.kv_b_proj.weight", a.heads * (nope + vd))?;
    let kvb = b.reshape(kvb, [bt, sk, h, (nope + vd).into()])?;
    let k_nope = b.slice(kvb, 3, 0u64, nope)?;
    let v = b.slice(kvb, 3, nope, vd)?;
    // The one rope key is shared by every head (torch's `k_pe.expand`).
    let k_pe = b.reshape(k_pe, [bt, sk, Dim::lit(1), rope.into()])?;
    let k_pe = b.op(Op::Broadcast { shape: [bt, sk, h, rope.into()].into() }, &[k_pe])?;
    let k = b.concat(&[k_nope, k_pe], 3)?;

    // Softmax scale 1/√(nope+rope), times mscale(factor, mscale_all_dim)² under YaRN
    // (Hugging Face DeepseekV2/V3Attention.scaling); the cos/sin factor is the rope op's.
    let mut scale = (qk as f64).powf(-0.5);
    if let Some(y) = &cx.m.rope.yarn {
        let m = yarn_mscale(y.factor, y.mscale_all_dim);
        scale *= m * m;
    }
    let heads = a.heads as u32;
    let att = Op::Attention { heads, kv_heads: heads, scale: scale.into(), causal: true, masked: false, lse: false };
    let o = b.op(att, &[q, k, v])?;
    let o = b.reshape(o, [bt, seq, Dim::from(a.heads * vd)])?;
    let o = b.linear(o, "self_attn.o_proj.weight", cx.m.hidden)?;
    Ok((o, cache_out))
}

fn gqa(b: &mut Builder, cx: &Cx, a: &Gqa, x: Value, pos: Value, seq: Dim, kv: &Kv) -> Result<(Value, Vec<Value>), LowerError> {
    let (bt, hd) = (Dim::B, Dim::from(a.head_dim));
    let q = b.linear(x, "self_attn.q_proj.weight", a.heads * a.head_dim)?;
    let k = b.linear(x, "self_attn.k_proj.weight", a.kv_heads * a.head_dim)?;
    let v = b.linear(x, "self_attn.v_proj.weight", a.kv_heads * a.head_dim)?;
    let q = b.reshape(q, [bt, seq, a.heads.into(), hd])?;
    let k = b.reshape(k, [bt, seq, a.kv_heads.into(), hd])?;
    let v = b.reshape(v, [bt, seq, a.kv_heads.into(), hd])?;
    b.at(&["rope"]);
    let q = b.op(rope_op(cx, a.head_dim), &[q, pos])?;
    let k = b.op(rope_op(cx, a.head_dim), &[k, pos])?;
    b.at(&["attention"]);
    let ([k, v], cache_out) = keep(b, kv, [k, v])?;
    // Plain 1/√head_dim: Hugging Face Llama applies YaRN's attention factor to cos/sin
    // only, never to the softmax scale.
    let scale = (a.head_dim as f64).powf(-0.5);
    let att =
        Op::Attention { heads: a.heads as u32, kv_heads: a.kv_heads as u32, scale: scale.into(), causal: true, masked: false, lse: false };
    let o = b.op(att, &[q, k, v])?;
    let o = b.reshape(o, [bt, seq, Dim::from(a.heads * a.head_dim)])?;
    let o = b.linear(o, "self_attn.o_proj.weight", cx.m.hidden)?;
    Ok((o, cache_out))
}
