//! `mla_absorb`: multi-head latent attention in its *absorbed* form (DeepSeek-V2 §2.1,
//! the `attn_impl = "absorb"` path of DeepSeek-V3's inference code), chosen per
//! attention by a small cost model.
//!
//! # The algebra
//!
//! Per head `h`, `kv_b_proj` (`W [H·(nope+v), kv_lora]`, viewed `[H, nope+v, kv_lora]`)
//! splits into a key half `W_UK[h] [nope, kv_lora]` and a value half
//! `W_UV[h] [v, kv_lora]`. With `cᵢ` the cached (normalised) latent of key position `i`:
//!
//! ```text
//!   decompressed (what lowering emits)           absorbed (what this pass makes)
//!
//!   k_nope[i,h] = W_UK[h] · cᵢ                   q_lat[h]   = W_UK[h]ᵀ · q_nope[h]     [kv_lora]
//!   v[i,h]      = W_UV[h] · cᵢ
//!   score[h,i]  = q_nope[h]·k_nope[i,h]          score[h,i] = q_lat[h]·cᵢ
//!               + q_pe[h]·k_pe[i]                           + q_pe[h]·k_pe[i]
//!   o[h]        = Σᵢ p[h,i] · v[i,h]             o_lat[h]   = Σᵢ p[h,i] · cᵢ               [kv_lora]
//!                                                o[h]       = W_UV[h] · o_lat[h]             [v]
//! ```
//!
//! Both lines are the same numbers: `q_nope·(W_UK c) = (W_UKᵀ q_nope)·c` and
//! `Σ p·(W_UV c) = W_UV·(Σ p·c)`. The scores thus become one attention with a single
//! shared key/value head over the cache itself, `q = q_lat | q_pe`, `k = c | k_pe`,
//! `v = c`, and the softmax scale is unchanged. No per-head key or value
//! `[b, c+s, H, ·]` is ever built: the cost per step no longer has the
//! `(c+s)·kv_lora·H·(nope+v)` re-expansion of the whole cache.
//!
//! # The rewrite
//!
//! From each `attention` node whose `k` and `v` come out of the lowering's chain
//! (see [`crate::lower`]):
//!
//! ```text
//!   R = reshape(matmul(latent, W), [b,sk,H,nope+v])        latent [b,sk,kv_lora], W a param
//!   k = concat(slice(R, 3, 0, nope), broadcast(reshape(k_pe, [b,sk,1,rope]), [b,sk,H,rope]), 3)
//!   v = slice(R, 3, nope, v)
//!   o = attention(q, k, v) heads=H kv_heads=H
//! ```
//!
//! it builds (weights as graph ops on the param, which constant folding can precompute)
//!
//! ```text
//!   W_UK = slice(reshape(W, [H,nope+v,kv_lora]), 1, 0, nope)          [H, nope, kv_lora]
//!   W_UV = slice(reshape(W, [H,nope+v,kv_lora]), 1, nope, v)          [H, v, kv_lora]
//!   q_lat = permute(batch_matmul(permute(q_nope, [0,2,1,3]), broadcast(W_UK, [b,H,nope,kv_lora])), [0,2,1,3])
//!   c4    = reshape(latent, [b,sk,1,kv_lora])
//!   o_lat = attention(concat(q_lat, q_pe, 3), concat(c4, reshape(k_pe, [b,sk,1,rope]), 3), c4)
//!               heads=H kv_heads=1, same scale, causal and mask
//!   o     = permute(batch_matmul(permute(o_lat, [0,2,1,3]), broadcast(W_UVᵀ, [b,H,kv_lora,v])), [0,2,1,3])
//! ```
//!
//! and the attention's users read `o` (`[b,s,H,v]`, as before), so `o_proj` is
//! untouched. The weights are broadcast over the batch because
//! [`Op::BatchMatMul`] does not broadcast and tokens
//! `[b, s]` cannot be flattened (a product of symbols is not a [`Dim`]). What the rewrite
//! orphans (the `kv_b_proj` matmul over the cache and its slices) is removed at once.
//!
//! # Which form, where
//!
//! Only functions reachable from the prefill and decode entries are considered: the
//! train pipeline keeps the decompressed form, the one the weights' gradients are
//! defined on. [`PassCx::mla`] says [`MlaMode::Absorb`], [`MlaMode::Decompress`] or
//! [`MlaMode::Auto`] (the default), which asks the cost model at the sizes the function
//! runs at: [`PassCx::sizes`] for the mode being compiled, [`PassCx::default_sizes`] for
//! another mode's entry. With `b` sequences, `s` new tokens, `sk = c + s` key positions,
//! `H` heads, `r = kv_lora`, `ρ = rope` and `δ` bytes per element:
//!
//! ```text
//!   FLOPs   absorbed     2bHs·sk·(r+ρ) + 2bHs·sk·r          scores over c|k_pe, p·c
//!                      + 2bHs·nope·r + 2bHs·r·v              q·W_UK, o_lat·W_UV
//!           decompressed 2b·sk·r·H·(nope+v)                  kv_b_proj over every key
//!                      + 2bHs·sk·(nope+ρ) + 2bHs·sk·v        scores, p·v
//!   bytes   both         b·sk·(r+ρ)·δ + H·(nope+v)·r·δ       read the cache and W once
//!           absorbed     + 2b·sk·(r+ρ)·δ + 4bHs·r·δ          the joined key; q_lat, o_lat (write + read)
//!           decompressed + 2b·sk·H·(nope+ρ+v)·δ              per-head K and V (write + read)
//!   cost  = FLOPs + FLOPS_PER_BYTE · bytes                   a roofline sum, FLOPS_PER_BYTE = 100
//! ```
//!
//! The smaller cost wins. Dividing the FLOPs by `2bH·sk`, absorption costs
//! `s·(2r+ρ) + (s/sk)·r·(nope+v)` against `r·(nope+v) + s·(nope+ρ+v)`:
//!
//! - over a long cache (`sk ≫ s`) absorption wins for every `s` below
//!   `r·(nope+v) / (2r-nope-v)`, about 170 query tokens for DeepSeek-V3: decode
//!   (`s = 1`) absorbs, and so would speculative decoding or chunked prefill with a few
//!   tokens per step;
//! - without a cache (`sk = s`: prefill as lowered) absorbing the queries costs what
//!   decompressing the keys does, and the scores at the latent width cost more whenever
//!   `2r+ρ > nope+ρ+v` (every DeepSeek model), so prefill stays decompressed at any
//!   prompt length;
//! - decode over an empty cache (`c = 0`) is the same near-tie and may go either way.
//!
//! The machine balance only tips close calls.
//!
//! The pass reports, per rewritten or kept attention, the choice and both costs.

use super::dce::dce_graph;
use super::{Changed, Pass, PassCx, PassError};
use crate::ir::{Bindings, Dim, Float, Graph, Mode, Module, NodeId, Op, Shape, Value};
use std::collections::BTreeMap;
use std::fmt;

/// Which form MLA attention takes in inference ([`PassCx::mla`]; `dsc compile --mla`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MlaMode {
    /// The cost model decides per attention, at the sizes its function runs at.
    #[default]
    Auto,
    /// Always absorb.
    Absorb,
    /// Never absorb: keep what lowering emitted.
    Decompress,
}

impl MlaMode {
    pub const NAMES: &'static str = "auto, absorb, decompress";

    pub fn name(self) -> &'static str {
        match self {
            MlaMode::Auto => "auto",
            MlaMode::Absorb => "absorb",
            MlaMode::Decompress => "decompress",
        }
    }

    pub fn parse(s: &str) -> Result<MlaMode, String> {
        [MlaMode::Auto, MlaMode::Absorb, MlaMode::Decompress]
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| format!("unknown MLA form `{s}`; expected one of: {}", MlaMode::NAMES))
    }
}

impl fmt::Display for MlaMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The assumed machine balance: FLOPs that cost as much time as moving one byte.
/// Between a CPU's (tens) and an accelerator's (hundreds); it only tips close calls.
pub const FLOPS_PER_BYTE: f64 = 100.0;

/// The head dims of one MLA attention, all constant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MlaDims {
    pub heads: u64,
    pub nope: u64,
    pub rope: u64,
    pub v: u64,
    pub kv_lora: u64,
}

/// The work of one form at one size.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Cost {
    pub flops: f64,
    pub bytes: f64,
}

impl Cost {
    /// FLOPs plus bytes at [`FLOPS_PER_BYTE`]: one number to compare.
    pub fn score(self) -> f64 {
        self.flops + FLOPS_PER_BYTE * self.bytes
    }
}

/// Both forms' costs for `batch` sequences of `s` new tokens over `sk` key positions
/// (`c + s`), elements of `elem_bytes` bytes. The formulas are the module doc's table.
pub fn costs(d: MlaDims, batch: u64, s: u64, sk: u64, elem_bytes: u64) -> (Cost, Cost) {
    let [h, nope, rope, v, r] = [d.heads, d.nope, d.rope, d.v, d.kv_lora].map(|x| x as f64);
    let [b, s, sk, e] = [batch, s, sk, elem_bytes].map(|x| x as f64);
    let common = (b * sk * (r + rope) + h * (nope + v) * r) * e;
    let absorbed = Cost {
        flops: 2.0 * b * h * s * sk * (r + rope) + 2.0 * b * h * s * sk * r + 2.0 * b * h * s * nope * r + 2.0 * b * h * s * r * v,
        bytes: common + (2.0 * b * sk * (r + rope) + 4.0 * b * h * s * r) * e,
    };
    let decompressed = Cost {
        flops: 2.0 * b * sk * r * h * (nope + v) + 2.0 * b * h * s * sk * (nope + rope) + 2.0 * b * h * s * sk * v,
        bytes: common + 2.0 * b * sk * h * (nope + rope + v) * e,
    };
    (absorbed, decompressed)
}

/// Whether `mode` absorbs at these sizes: forced, or the cheaper form under [`costs`].
pub fn choose(mode: MlaMode, d: MlaDims, batch: u64, s: u64, sk: u64, elem_bytes: u64) -> bool {
    match mode {
        MlaMode::Absorb => true,
        MlaMode::Decompress => false,
        MlaMode::Auto => {
            let (a, n) = costs(d, batch, s, sk, elem_bytes);
            a.score() < n.score()
        }
    }
}

/// Rewrites MLA attention to the absorbed form where [`PassCx::mla`] and the cost model
/// say so.
pub struct MlaAbsorb;

impl Pass for MlaAbsorb {
    fn name(&self) -> &'static str {
        "mla_absorb"
    }
    fn is_required(&self) -> bool {
        false
    }
    fn run(&self, m: &mut Module, cx: &mut PassCx) -> Result<Changed, PassError> {
        let mut lines = Vec::new();
        let mut changed = false;
        for (name, mode) in inference_functions(m) {
            let sizes = sizes_for(cx, mode);
            let Some(f) = m.function_mut(&name) else { continue };
            let g = &mut f.graph;
            let mut rewrote = false;
            for n in g.nodes() {
                let Some(site) = Site::find(g, n) else { continue };
                let (b, s, sk) = (at(Dim::B, &sizes), at(g.ty(site.q).shape[1], &sizes), at(g.ty(site.latent).shape[1], &sizes));
                let elem = g.ty(site.q).dtype.bytes();
                let (a, d) = costs(site.dims, b, s, sk, elem);
                let absorb = choose(cx.mla, site.dims, b, s, sk, elem);
                lines.push(format!(
                    "{name}: {} at b={b} s={s} c+s={sk} ({}: absorbed {} / {}, decompressed {} / {})",
                    if absorb { "absorbed" } else { "kept decompressed" },
                    cx.mla,
                    flops(a.flops),
                    bytes(a.bytes),
                    flops(d.flops),
                    bytes(d.bytes),
                ));
                if absorb {
                    site.absorb(g).map_err(|e| PassError::at(&name, g, n, format!("absorbing MLA: {e}")))?;
                    rewrote = true;
                }
            }
            if rewrote {
                // The decompression chain (kv_b_proj over the cache, K, V) is dead now.
                dce_graph(g, &name)?;
                changed = true;
            }
        }
        if !lines.is_empty() {
            cx.report(self.name(), lines.join("\n"));
        }
        Ok(changed.into())
    }
}

/// Functions reachable from the prefill and decode entries, in module order, each with
/// the first such mode that reaches it (lowering gives every mode its own functions).
fn inference_functions(m: &Module) -> Vec<(String, Mode)> {
    let mut reached: BTreeMap<String, Mode> = BTreeMap::new();
    for mode in [Mode::Prefill, Mode::Decode] {
        let Some(entry) = m.entries.get(&mode) else { continue };
        let mut stack = vec![entry.clone()];
        while let Some(name) = stack.pop() {
            if reached.contains_key(&name) {
                continue;
            }
            let Some(f) = m.function(&name) else { continue };
            for n in f.graph.nodes() {
                if let Op::Call { function, .. } = &f.graph.node(n).op {
                    stack.push(function.clone());
                }
            }
            reached.insert(name, mode);
        }
    }
    m.functions.iter().filter_map(|f| reached.get(&f.name).map(|&mode| (f.name.clone(), mode))).collect()
}

fn flops(x: f64) -> String {
    si(x, "FLOP")
}

fn bytes(x: f64) -> String {
    si(x, "B")
}

/// `1.23 GFLOP`, `512 kB`: three significant digits are all a cost model is good for.
fn si(x: f64, unit: &str) -> String {
    let (k, p) = [(1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")].into_iter().find(|(k, _)| x >= *k).unwrap_or((1.0, ""));
    format!("{:.3} {p}{unit}", x / k)
}

/// One matched MLA attention: the values the absorbed form is built from.
struct Site {
    att: NodeId,
    heads: u32,
    scale: Float,
    causal: bool,
    /// The `[b, sq, sk]` additive mask of a masked attention.
    mask: Option<Value>,
    /// `[b, s, H, nope+rope]`.
    q: Value,
    /// `q`'s nope and rope halves when `q` is their concat (as lowering builds it).
    q_parts: Option<(Value, Value)>,
    /// The latent over every key position, `[b, sk, kv_lora]`.
    latent: Value,
    /// The rope key reshaped to one head, `[b, sk, 1, rope]`.
    k_pe4: Value,
    /// `kv_b_proj.weight`, `[H·(nope+v), kv_lora]`.
    w: Value,
    dims: MlaDims,
}

/// The single input of `n` if its op satisfies `want`.
fn only_input(g: &Graph, n: NodeId, want: impl Fn(&Op) -> bool) -> Option<Value> {
    let ins = g.inputs(n);
    (want(&g.node(n).op) && ins.len() == 1).then(|| ins[0])
}

/// A dim at concrete sizes (never negative for the dims the pass asks about).
fn at(d: Dim, sizes: &Bindings) -> u64 {
    d.eval(sizes).max(0) as u64
}

fn konst(d: Dim) -> Option<u64> {
    d.as_const().and_then(|v| u64::try_from(v).ok())
}

impl Site {
    /// The lowering's decompressed MLA chain feeding attention node `n`, if it is one.
    fn find(g: &Graph, n: NodeId) -> Option<Site> {
        let Op::Attention { heads, kv_heads, scale, causal, masked, lse: false } = g.node(n).op else { return None };
        if heads != kv_heads {
            return None;
        }
        let ins = g.inputs(n);
        let (q, k, v) = (ins[0], ins[1], ins[2]);
        let mask = masked.then(|| ins[3]);

        // v = slice(R, 3, nope, vd); R = reshape(matmul(latent, W), [b, sk, H, nope+vd])
        let Op::Slice { axis: 3, start, len } = g.node(v.node).op else { return None };
        let r = only_input(g, v.node, |_| true)?;
        let Op::Reshape { shape } = &g.node(r.node).op else { return None };
        let mm = only_input(g, r.node, |_| true)?;
        if g.node(mm.node).op != Op::MatMul {
            return None;
        }
        let [latent, w] = g.inputs(mm.node)[..] else { return None };
        if !matches!(g.node(w.node).op, Op::Param { .. }) || g.ty(latent).rank() != 3 || shape.rank() != 4 {
            return None;
        }
        let (h, nope, vd) = (konst(shape[2])?, konst(start)?, konst(len)?);
        let kv_lora = konst(g.ty(latent).shape[2])?;
        if h != u64::from(heads) || konst(shape[3])? != nope + vd || shape[..2] != g.ty(latent).shape[..2] {
            return None;
        }

        // k = concat(slice(R, 3, 0, nope), broadcast(reshape(k_pe, [b, sk, 1, rope])), 3)
        let Op::Concat { axis: 3 } = g.node(k.node).op else { return None };
        let [k_nope, k_pe] = g.inputs(k.node)[..] else { return None };
        let Op::Slice { axis: 3, start: s0, len: l0 } = g.node(k_nope.node).op else { return None };
        if g.inputs(k_nope.node) != [r] || konst(s0)? != 0 || konst(l0)? != nope {
            return None;
        }
        let k_pe4 = only_input(g, k_pe.node, |op| matches!(op, Op::Broadcast { .. }))?;
        let pe4 = &g.ty(k_pe4).shape;
        if pe4.rank() != 4 || !pe4[2].is(1) || pe4[..2] != shape[..2] {
            return None;
        }
        let rope = konst(pe4[3])?;

        let qt = &g.ty(q).shape;
        if qt.rank() != 4 || konst(qt[3])? != nope + rope || qt[0] != shape[0] {
            return None;
        }
        // Use the halves directly when q is their concat, so no slice re-splits it.
        let q_parts = match (&g.node(q.node).op, &g.inputs(q.node)[..]) {
            (Op::Concat { axis: 3 }, [a, b]) if konst(g.ty(*a).shape[3]) == Some(nope) => Some((*a, *b)),
            _ => None,
        };
        let dims = MlaDims { heads: h, nope, rope, v: vd, kv_lora };
        Some(Site { att: n, heads, scale, causal, mask, q, q_parts, latent, k_pe4, w, dims })
    }

    /// Build the absorbed form and point the attention's users at it.
    fn absorb(&self, g: &mut Graph) -> Result<(), String> {
        let span = g.node(self.att).span;
        let MlaDims { heads, nope, rope, v, kv_lora } = self.dims;
        let (h, nope_d, rope_d, v_d, r) = (Dim::from(heads), Dim::from(nope), Dim::from(rope), Dim::from(v), Dim::from(kv_lora));
        let b = g.ty(self.q).shape[0];
        let sk = g.ty(self.latent).shape[1];
        let op = |g: &mut Graph, op: Op, ins: &[Value]| -> Result<Value, String> {
            g.add_inferred(op, ins, span).map(Value::from).map_err(|e| e.to_string())
        };
        let reshape = |s: &[Dim]| Op::Reshape { shape: Shape::from(s.to_vec()) };
        let broadcast = |s: &[Dim]| Op::Broadcast { shape: Shape::from(s.to_vec()) };
        let heads_first = || Op::Permute { perm: vec![0, 2, 1, 3] };

        // W [H·(nope+v), r] → W_UK [H, nope, r] and W_UV [H, v, r].
        let w3 = op(g, reshape(&[h, nope_d + v_d, r]), &[self.w])?;
        let w_uk = op(g, Op::Slice { axis: 1, start: Dim::lit(0), len: nope_d }, &[w3])?;
        let w_uv = op(g, Op::Slice { axis: 1, start: nope_d, len: v_d }, &[w3])?;

        // q_lat[b,s,h] = W_UK[h]ᵀ · q_nope[b,s,h], as [b,h,s,nope] × [b,h,nope,r].
        let (q_nope, q_pe) = match self.q_parts {
            Some(parts) => parts,
            None => (
                op(g, Op::Slice { axis: 3, start: Dim::lit(0), len: nope_d }, &[self.q])?,
                op(g, Op::Slice { axis: 3, start: nope_d, len: rope_d }, &[self.q])?,
            ),
        };
        let qn = op(g, heads_first(), &[q_nope])?;
        let w_uk_b = op(g, broadcast(&[b, h, nope_d, r]), &[w_uk])?;
        let q_lat = op(g, Op::BatchMatMul, &[qn, w_uk_b])?;
        let q_lat = op(g, heads_first(), &[q_lat])?;
        let q_abs = op(g, Op::Concat { axis: 3 }, &[q_lat, q_pe])?;

        // One key/value head: the latent itself (| the rope key for the scores).
        let c4 = op(g, reshape(&[b, sk, Dim::lit(1), r]), &[self.latent])?;
        let k_abs = op(g, Op::Concat { axis: 3 }, &[c4, self.k_pe4])?;
        let att = Op::Attention {
            heads: self.heads,
            kv_heads: 1,
            scale: self.scale,
            causal: self.causal,
            masked: self.mask.is_some(),
            lse: false,
        };
        let mut att_in = vec![q_abs, k_abs, c4];
        att_in.extend(self.mask);
        let o_lat = op(g, att, &att_in)?;

        // o[b,s,h] = W_UV[h] · o_lat[b,s,h], as [b,h,s,r] × [b,h,r,v].
        let w_uv_t = op(g, Op::Permute { perm: vec![0, 2, 1] }, &[w_uv])?;
        let w_uv_b = op(g, broadcast(&[b, h, r, v_d]), &[w_uv_t])?;
        let o = op(g, heads_first(), &[o_lat])?;
        let o = op(g, Op::BatchMatMul, &[o, w_uv_b])?;
        let o = op(g, heads_first(), &[o])?;

        if g.ty(o) != g.node(self.att).ty() {
            return Err(format!("the absorbed output is {}, the attention's {}", g.ty(o), g.node(self.att).ty()));
        }
        g.replace_uses(self.att.out(0), o);
        Ok(())
    }
}

/// Attention nodes of `g` that match the decompressed MLA chain, with their dims (for
/// tests and tools that want to know what the pass would see).
pub fn mla_sites(g: &Graph) -> Vec<(NodeId, MlaDims)> {
    g.nodes().into_iter().filter_map(|n| Site::find(g, n).map(|s| (n, s.dims))).collect()
}

/// The sizes a function reached from `mode`'s entry runs at under `cx`: the compiled
/// mode's [`PassCx::sizes`], another mode's defaults.
pub fn sizes_for(cx: &PassCx, mode: Mode) -> Bindings {
    if mode == cx.mode {
        cx.sizes
    } else {
        PassCx::default_sizes(mode)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::{verify, Sym};
    use crate::lower::lower_mode;
    use crate::passes::{compile, PassSelection};

    fn spec(name: &str) -> dsc_dsl::Spec {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../specs").join(name);
        dsc_dsl::load(&path, None).unwrap_or_else(|f| panic!("{}", f.render()))
    }

    const V3: MlaDims = MlaDims { heads: 128, nope: 128, rope: 64, v: 128, kv_lora: 512 };
    const TINY: MlaDims = MlaDims { heads: 3, nope: 16, rope: 8, v: 12, kv_lora: 24 };

    #[test]
    fn cost_model_absorbs_decode_and_keeps_long_prefill() {
        for d in [V3, TINY] {
            // Decode: one new token over any cache.
            for c in [64, 4096, 131072] {
                assert!(choose(MlaMode::Auto, d, 1, 1, c + 1, 2), "{d:?} decode c={c}");
            }
            // Prefill, no cache: absorbing s queries costs what decompressing s keys does,
            // and scoring s² pairs at the latent width costs more.
            for s in [4, 64, 1024, 4096] {
                assert!(!choose(MlaMode::Auto, d, 1, s, s, 2), "{d:?} prefill s={s}");
            }
            // Forcing overrides the model.
            assert!(choose(MlaMode::Absorb, d, 1, 4096, 4096, 2));
            assert!(!choose(MlaMode::Decompress, d, 1, 1, 4097, 2));
        }
        // A few tokens per step over a long cache (speculative decoding, chunked prefill)
        // absorb; the crossover for V3 is near 200 query tokens whatever the cache.
        assert!(choose(MlaMode::Auto, V3, 1, 16, 4096 + 16, 2));
        assert!(choose(MlaMode::Auto, V3, 1, 150, 4096 + 150, 2));
        assert!(!choose(MlaMode::Auto, V3, 1, 300, 4096 + 300, 2));
        // The FLOP counts are the documented ones: V3 decode at c = 4095.
        let (a, n) = costs(V3, 1, 1, 4096, 2);
        let (h, sk) = (128.0, 4096.0);
        assert_eq!(a.flops, 2.0 * h * sk * 576.0 + 2.0 * h * sk * 512.0 + 2.0 * h * 128.0 * 512.0 * 2.0);
        assert_eq!(n.flops, 2.0 * sk * 512.0 * h * 256.0 + 2.0 * h * sk * 192.0 + 2.0 * h * sk * 128.0);
        assert!(n.flops / a.flops > 100.0 && n.bytes > a.bytes);
    }

    #[test]
    fn modes_parse() {
        for m in [MlaMode::Auto, MlaMode::Absorb, MlaMode::Decompress] {
            assert_eq!(MlaMode::parse(m.name()), Ok(m));
        }
        assert_eq!(MlaMode::parse("naive").unwrap_err(), "unknown MLA form `naive`; expected one of: auto, absorb, decompress");
    }

    /// Whether a type is a per-head tensor over every key position, `[b, c+s, H, ·]`.
    fn per_head_keys(t: &crate::ir::Ty, heads: i64) -> bool {
        t.rank() == 4 && t.shape[1].coeff(Sym::Cache) == 1 && t.shape[2].is(heads)
    }

    fn compiled(name: &str, mode: Mode, mla: MlaMode) -> (Module, PassCx<'static>) {
        let mut m = lower_mode(&spec(name), mode).unwrap();
        let mut cx = PassCx::new(mode);
        cx.mla = mla;
        compile(&mut m, &PassSelection::all(), &mut cx).unwrap();
        (m, cx)
    }

    #[test]
    fn decode_attends_over_the_latent() {
        let (before, _) = compiled("tiny/tiny_v3.dsc", Mode::Decode, MlaMode::Decompress);
        let (after, cx) = compiled("tiny/tiny_v3.dsc", Mode::Decode, MlaMode::Auto);
        assert_eq!(verify(&after), Ok(()));
        for name in ["decode.layer.dense", "decode.layer.moe"] {
            let (g0, g1) = (&before.function(name).unwrap().graph, &after.function(name).unwrap().graph);
            assert_eq!(mla_sites(g0).len(), 1, "{name}");
            assert!(mla_sites(g1).is_empty(), "{name}");
            assert!(g0.nodes().iter().any(|&n| g0.node(n).outputs.iter().any(|t| per_head_keys(t, 3))));
            assert!(!g1.nodes().iter().any(|&n| g1.node(n).outputs.iter().any(|t| per_head_keys(t, 3))), "{name}");
            let atts: Vec<_> = g1.nodes().into_iter().filter(|&n| matches!(g1.node(n).op, Op::Attention { .. })).collect();
            assert_eq!(atts.len(), 1);
            let Op::Attention { heads, kv_heads, .. } = g1.node(atts[0]).op else { unreachable!() };
            assert_eq!((heads, kv_heads), (3, 1));
            // The signature, caches included, is the lowering's.
            assert_eq!(g0.signature(), g1.signature(), "{name}");
        }
        let report = &cx.reports.iter().find(|r| r.pass == "mla_absorb").unwrap().text;
        assert!(report.starts_with("decode.layer.dense: absorbed at b=1 s=1 c+s=4097 (auto: absorbed "), "{report}");
    }

    #[test]
    fn prefill_stays_decompressed_unless_forced() {
        let (m, cx) = compiled("tiny/tiny_v3.dsc", Mode::Prefill, MlaMode::Auto);
        assert_eq!(mla_sites(&m.function("prefill.layer.moe").unwrap().graph).len(), 1);
        let report = &cx.reports.iter().find(|r| r.pass == "mla_absorb").unwrap().text;
        assert!(report.contains("prefill.layer.moe: kept decompressed at b=1 s=4096 c+s=4096"), "{report}");
        let (m, _) = compiled("tiny/tiny_v3.dsc", Mode::Prefill, MlaMode::Absorb);
        assert!(mla_sites(&m.function("prefill.layer.moe").unwrap().graph).is_empty());
        // Even a short prompt: with no cache there is nothing to save.
        let mut m = lower_mode(&spec("tiny/tiny_v3.dsc"), Mode::Prefill).unwrap();
        let mut cx = PassCx::new(Mode::Prefill);
        cx.sizes = Bindings { batch: 1, seq: 4, cache: 0 };
        compile(&mut m, &PassSelection::all(), &mut cx).unwrap();
        assert_eq!(mla_sites(&m.function("prefill.layer.moe").unwrap().graph).len(), 1);
    }

    #[test]
    fn training_and_gqa_are_untouched() {
        let s = spec("tiny/tiny_v3.dsc");
        let mut m = lower_mode(&s, Mode::Train).unwrap();
        let mut cx = PassCx::new(Mode::Train);
        cx.mla = MlaMode::Absorb;
        let sites = |m: &Module| m.functions.iter().map(|f| mla_sites(&f.graph).len()).sum::<usize>();
        let before = sites(&m);
        assert_eq!(before, 3, "two layer kinds and the MTP module");
        assert_eq!(MlaAbsorb.run(&mut m, &mut cx), Ok(Changed::No));
        assert_eq!(sites(&m), before);
        let mut m = lower_mode(&spec("tiny/tiny_llama_gqa.dsc"), Mode::Decode).unwrap();
        let mut cx = PassCx::new(Mode::Decode);
        cx.mla = MlaMode::Absorb;
        assert_eq!(MlaAbsorb.run(&mut m, &mut cx), Ok(Changed::No));
        assert!(cx.reports.is_empty());
    }

    #[test]
    fn full_size_specs_absorb_in_decode() {
        for name in ["deepseek_v2.dsc", "deepseek_v2_lite.dsc", "deepseek_v3.dsc"] {
            let (m, _) = compiled(name, Mode::Decode, MlaMode::Auto);
            for f in &m.functions {
                assert!(mla_sites(&f.graph).is_empty(), "{name} {}", f.name);
                let heads = m.function(&f.name).unwrap().graph.nodes().into_iter().find_map(|n| match f.graph.node(n).op {
                    Op::Attention { heads, kv_heads, .. } => Some((heads, kv_heads)),
                    _ => None,
                });
                assert!(heads.is_none_or(|(_, kv)| kv == 1), "{name} {}", f.name);
            }
        }
    }
}
