//! Entry points: embedding, one call per layer, final norm and output head; for training,
//! the shifted next-token loss and the multi-token-prediction losses.

use super::attention::cache_slots;
use super::builder::Builder;
use super::layer::{layer_name, mtp_name};
use super::{Cx, LowerError};
use crate::ir::{BinaryOp, DType, Dim, Function, Mode, Op, Signature, Ty, Value};
use std::collections::HashMap;

/// Labels equal to this are skipped by the loss (PyTorch's and Hugging Face's default).
pub const IGNORE_INDEX: i64 = -100;

/// The entry function of `mode`; `sigs` holds the signatures of the functions it calls.
pub(super) fn entry_function(cx: &Cx, mode: Mode, sigs: &HashMap<String, Signature>) -> Result<Function, LowerError> {
    let m = cx.m;
    let seq = cx.seq(mode);
    let mut b = Builder::new(mode.name(), &cx.spec.spans);
    let tokens = Ty::new(DType::I64, [Dim::B, seq]);

    b.at(&["vocab"]);
    let ids = b.input("input_ids", tokens.clone());
    b.at(&["rope"]);
    let pos = b.input("positions", tokens.clone());
    let labels = if mode == Mode::Train {
        b.at(&["vocab"]);
        Some(b.input("labels", tokens))
    } else {
        None
    };
    let mut caches: Vec<[Value; 2]> = Vec::new();
    if mode == Mode::Decode {
        b.at(&["attention"]);
        for l in 0..m.layers {
            let [(n0, t0), (n1, t1)] = cache_slots(cx, Dim::C);
            caches.push([b.input(&format!("cache.{l}.{n0}"), t0), b.input(&format!("cache.{l}.{n1}"), t1)]);
        }
    }

    b.at(&["vocab"]);
    let embed = b.param("model.embed_tokens.weight", Ty::new(cx.dt, [Dim::from(m.vocab), Dim::from(m.hidden)]));
    let x0 = b.op(Op::Gather { axis: 0 }, &[embed, ids])?;

    let mut x = x0;
    let mut cache_out = Vec::new();
    // Training: each MoE layer's balance loss and expert loads, in layer order.
    let mut aux_terms: Vec<Value> = Vec::new();
    let mut loads: Vec<Value> = Vec::new();
    for l in 0..m.layers {
        let kind = &cx.kinds[cx.layer_kind[l as usize]];
        let callee = layer_name(mode, &kind.name);
        b.at(&[&format!("{}.layers", kind.key), &kind.key]);
        let mut args = vec![x, pos];
        if let Some(c) = caches.get(l as usize) {
            args.extend(c);
        }
        let call = b.call(&callee, Some(l as u32), &sigs[&callee], &args)?;
        x = call.out(0);
        if mode != Mode::Train {
            cache_out.extend([call.out(1), call.out(2)]);
        } else if sigs[&callee].outputs.len() == 3 {
            aux_terms.push(call.out(1));
            loads.push(call.out(2));
        }
    }

    if mode == Mode::Prefill && cx.logits == super::PrefillLogits::Last {
        // Only the last position's logits: the norm and the head see one row per sequence.
        b.at(&["vocab"]);
        x = b.slice(x, 1, Dim::S - 1, 1u64)?;
    }
    b.at(&["norm_eps"]);
    let normed = b.rms_norm(x, "model.norm.weight", m.norm_eps)?;
    b.at(&["vocab"]);
    let head = if m.tie_embeddings { embed } else { b.param("lm_head.weight", Ty::new(cx.dt, [Dim::from(m.vocab), Dim::from(m.hidden)])) };

    let Some(labels) = labels else {
        let logits = b.matmul(normed, head)?;
        b.at(&["layers"]);
        let mut results = vec![logits];
        results.extend(cache_out);
        b.ret(&results);
        return Ok(b.finish());
    };

    let loss = match cx.head {
        super::TrainHead::Loss => shifted_loss(&mut b, normed, head, labels, 0)?,
        super::TrainHead::LogProbs { temperature } => {
            let len = Dim::S - 1;
            let h = b.slice(normed, 1, 0u64, len)?;
            let mut logits = b.matmul(h, head)?;
            if temperature != 1.0 {
                // Sampling at temperature τ draws from softmax(logits / τ); the policy's
                // log-probabilities are of that distribution.
                let inv = b.constant(1.0 / temperature, cx.dt);
                logits = b.binary(BinaryOp::Mul, logits, inv)?;
            }
            let targets = b.slice(labels, 1, 1u64, len)?;
            b.op(Op::TokenLogProb { ignore_index: Some(IGNORE_INDEX) }, &[logits, targets])?
        }
    };
    let mut mtp_loss = None;
    if let Some(mtp) = &m.mtp {
        // Module k sees h_{k-1} and the embedding of the token k ahead, at the positions
        // that have one; h_0 is the main model's last hidden state before its final norm.
        let mut hidden = x;
        let mut sum: Option<Value> = None;
        for k in 1..=mtp.depth {
            b.at(&["mtp"]);
            let len = Dim::S - k as i64;
            let h = b.slice(hidden, 1, 0u64, len)?;
            let e = b.slice(x0, 1, k, len)?;
            let p = b.slice(pos, 1, 0u64, len)?;
            let callee = mtp_name(k);
            let call = b.call(&callee, Some((m.layers + k - 1) as u32), &sigs[&callee], &[h, e, p])?;
            hidden = call.out(0);
            if sigs[&callee].outputs.len() == 4 {
                aux_terms.push(call.out(2));
                loads.push(call.out(3));
            }
            let l = shifted_loss(&mut b, call.out(1), head, labels, k)?;
            sum = Some(match sum {
                None => l,
                Some(s) => b.binary(BinaryOp::Add, s, l)?,
            });
        }
        if let Some(sum) = sum {
            b.at(&["mtp.loss_weight", "mtp"]);
            let w = b.constant(mtp.loss_weight / mtp.depth as f64, DType::F32);
            mtp_loss = Some(b.binary(BinaryOp::Mul, sum, w)?);
        }
    }
    let mtp_loss = match mtp_loss {
        Some(l) => l,
        None => b.constant(0.0, DType::F32),
    };
    let mut aux = None;
    for t in aux_terms {
        aux = Some(match aux {
            None => t,
            Some(a) => b.binary(BinaryOp::Add, a, t)?,
        });
    }
    let aux = match aux {
        Some(a) => a,
        None => b.constant(0.0, DType::F32),
    };
    b.at(&["layers"]);
    let mut results = vec![loss, mtp_loss, aux];
    results.extend(loads);
    b.ret(&results);
    Ok(b.finish())
}

/// Cross-entropy of the head applied to `normed` (positions `0..s-k`, normalised) against
/// the labels `k+1` ahead: position `i` predicts `labels[i+k+1]`, so the last `k+1`
/// positions have no target and are sliced off before the head.
fn shifted_loss(b: &mut Builder, normed: Value, head: Value, labels: Value, k: u64) -> Result<Value, LowerError> {
    let len = Dim::S - (k as i64 + 1);
    let h = b.slice(normed, 1, 0u64, len)?;
    let logits = b.matmul(h, head)?;
    let targets = b.slice(labels, 1, k + 1, len)?;
    b.op(Op::CrossEntropy { ignore_index: Some(IGNORE_INDEX) }, &[logits, targets])
}
