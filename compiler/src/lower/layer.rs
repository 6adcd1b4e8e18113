//! Layer bodies: the pre-norm transformer block, once per (mode, layer kind), and the
//! multi-token-prediction modules of the training entry point.
//!
//! A block is `h = x + attn(rms(x)); y = h + ffn(rms(h))` (Hugging Face
//! `DeepseekV3DecoderLayer`, `LlamaDecoderLayer`), with `input_layernorm` and
//! `post_attention_layernorm` gains and `norm_eps`. Modes differ only in the sequence
//! length and in what the block does with its KV cache ([`Kv`]).

use super::attention::{attention, cache_slots, Kv};
use super::builder::Builder;
use super::ffn::{ffn, RouterStats};
use super::{Cx, LowerError};
use crate::ir::{BinaryOp, DType, Dim, Function, Mode, Ty, Value};
use dsc_dsl::model::{Ffn, Mtp, MtpInput};

/// `{mode}.layer.{kind}`, e.g. `decode.layer.moe`.
pub(super) fn layer_name(mode: Mode, kind: &str) -> String {
    format!("{mode}.layer.{kind}")
}

/// `train.mtp.{k}` for depth `k` (1-based, as in DeepSeek-V3 §2.2).
pub(super) fn mtp_name(k: u64) -> String {
    format!("train.mtp.{k}")
}

/// The layer function of one kind for one mode:
///
/// - prefill: `(x [b,s,h], positions [b,s]) → (y [b,s,h], cache₀ [b,s,..], cache₁ [b,s,..])`
/// - decode: `(x [b,1,h], positions [b,1], cache₀ [b,c,..], cache₁ [b,c,..])
///   → (y [b,1,h], cache₀ [b,c+1,..], cache₁ [b,c+1,..])`
/// - train: `(x [b,s,h], positions [b,s]) → (y [b,s,h])`, and for a MoE layer also its
///   balance loss `f32[]` and expert loads `f32[E]` (`ffn`'s module doc)
///
/// `key` is the spec path of the layer kind's ffn block (`ffn.moe`).
pub(super) fn layer_function(cx: &Cx, mode: Mode, kind: &str, key: &str, ffn: &Ffn) -> Result<Function, LowerError> {
    let seq = cx.seq(mode);
    let mut b = Builder::new(&layer_name(mode, kind), &cx.spec.spans);
    b.at(&[key]);
    let x = b.input("x", cx.act(seq));
    let pos = b.input("positions", Ty::new(DType::I64, [Dim::B, seq]));
    let kv = match mode {
        Mode::Train => Kv::None,
        Mode::Prefill => Kv::Emit,
        Mode::Decode => {
            b.at(&["attention"]);
            let [(n0, t0), (n1, t1)] = cache_slots(cx, Dim::C);
            Kv::Append([b.input(&format!("cache.{n0}"), t0), b.input(&format!("cache.{n1}"), t1)])
        }
    };
    let (y, caches, router) = block(&mut b, cx, x, pos, seq, &kv, ffn, key, mode == Mode::Train)?;
    b.at(&[key]);
    let mut results = vec![y];
    results.extend(caches);
    if let Some(r) = router {
        results.extend([r.aux, r.load]);
    }
    b.ret(&results);
    Ok(b.finish())
}

/// One transformer block on `x: [b, seq, hidden]`; returns its output, the cache
/// values [`attention`] hands back, and in training a MoE block's router statistics.
#[allow(clippy::too_many_arguments)]
fn block(
    b: &mut Builder,
    cx: &Cx,
    x: Value,
    pos: Value,
    seq: Dim,
    kv: &Kv,
    kind: &Ffn,
    key: &str,
    train: bool,
) -> Result<(Value, Vec<Value>, Option<RouterStats>), LowerError> {
    let eps = cx.m.norm_eps;
    b.at(&["norm_eps"]);
    let n = b.rms_norm(x, "input_layernorm.weight", eps)?;
    let (a, caches) = attention(b, cx, n, pos, seq, kv)?;
    b.at(&[key]);
    let h = b.binary(BinaryOp::Add, x, a)?;
    b.at(&["norm_eps"]);
    let n = b.rms_norm(h, "post_attention_layernorm.weight", eps)?;
    let f = ffn(b, cx, kind, key, n, train)?;
    b.at(&[key]);
    let y = b.binary(BinaryOp::Add, h, f.y)?;
    Ok((y, caches, f.router))
}

/// MTP module `k` (DeepSeek-V3 §2.2), over the `s-k` positions that have a token `k`
/// ahead: `(hidden [b,s-k,h], embedding [b,s-k,h], positions [b,s-k]) → (h_k [b,s-k,h],
/// shared_head.norm(h_k) [b,s-k,h])`, plus the balance loss and expert loads when the
/// module's ffn is MoE. `hidden` is `h_{k-1}` at positions `0..s-k`;
/// `embedding` is the main model's embedding of the tokens at `k..s`.
///
/// `h'_k = eh_proj(concat(enorm(embedding), hnorm(hidden)))` in the order `mtp.concat`
/// gives, then one block of the `mtp.ffn` kind; `h_k` feeds module `k+1` and its
/// normalised form the shared output head. Each depth has its own function because the
/// sequence length (`s-k`) is part of the signature; depths are few (V3: 1) and each is
/// called once.
pub(super) fn mtp_function(cx: &Cx, mtp: &Mtp, k: u64) -> Result<Function, LowerError> {
    let seq = Dim::S - k as i64;
    let eps = cx.m.norm_eps;
    let mut b = Builder::new(&mtp_name(k), &cx.spec.spans);
    b.at(&["mtp"]);
    let hidden = b.input("hidden", cx.act(seq));
    let embedding = b.input("embedding", cx.act(seq));
    let pos = b.input("positions", Ty::new(DType::I64, [Dim::B, seq]));
    let e = b.rms_norm(embedding, "enorm.weight", eps)?;
    let h = b.rms_norm(hidden, "hnorm.weight", eps)?;
    b.at(&["mtp.concat", "mtp"]);
    let parts = mtp.concat.map(|i| match i {
        MtpInput::Embedding => e,
        MtpInput::Hidden => h,
    });
    let joined = b.concat(&parts, 2)?;
    b.at(&["mtp"]);
    let x = b.linear(joined, "eh_proj.weight", cx.m.hidden)?;

    let kind = &cx.m.ffn[mtp.ffn].kind;
    let key = format!("ffn.{}", super::kind_name(kind));
    let (y, _, router) = block(&mut b, cx, x, pos, seq, &Kv::None, kind, &key, true)?;
    b.at(&["mtp"]);
    let out = b.rms_norm(y, "shared_head.norm.weight", eps)?;
    let mut results = vec![y, out];
    if let Some(r) = router {
        results.extend([r.aux, r.load]);
    }
    b.ret(&results);
    Ok(b.finish())
}
