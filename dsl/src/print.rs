//! The canonical spec printer: a resolved [`Model`] written back as spec text.
//!
//! Every field is written out, documented defaults included, in one fixed order and
//! layout (that of `specs/deepseek_v3.dsc`), so the text is a complete, self-contained
//! description of the model: `dsc check --resolved` shows it and `dsc import` emits it.
//! The contract, tested over every spec in `specs/`: for every model `m` that came out of
//! [`crate::resolve`], `load_str(path, &print_model(&m), None)` gives back exactly `m`.

use crate::model::*;
use std::fmt::Write;

/// Writes `m` as canonical spec text (one `model` block, no comments, no `extends`).
pub fn print_model(m: &Model) -> String {
    let mut p = Printer { out: String::new(), depth: 0 };
    p.open(&format!("model {}", m.name));
    p.field("vocab", m.vocab);
    p.field("hidden", m.hidden);
    p.field("layers", m.layers);
    p.field("dtype", m.dtype.name());
    p.field("tie_embeddings", m.tie_embeddings);
    p.field("norm_eps", float(m.norm_eps));

    p.blank();
    attention(&mut p, &m.attention);
    p.blank();
    rope(&mut p, &m.rope);
    for block in &m.ffn {
        p.blank();
        ffn(&mut p, block, m.layers);
    }
    if let Some(mtp) = &m.mtp {
        p.blank();
        p.open("mtp");
        p.field("depth", mtp.depth);
        p.field("loss_weight", float(mtp.loss_weight));
        p.field("concat", format!("[{}, {}]", mtp_input(mtp.concat[0]), mtp_input(mtp.concat[1])));
        // The resolver turns the kind named here into the index of the first block of that
        // kind; a resolved model has at most one block per kind, so the kind is enough.
        let kind = m.ffn.get(mtp.ffn).map_or("moe", |b| ffn_kind(&b.kind));
        p.field("ffn", kind);
        p.close();
    }
    p.close();
    p.out
}

struct Printer {
    out: String,
    depth: usize,
}

impl Printer {
    fn indent(&mut self) {
        for _ in 0..self.depth {
            self.out.push_str("  ");
        }
    }
    fn open(&mut self, head: &str) {
        self.indent();
        let _ = writeln!(self.out, "{head} {{");
        self.depth += 1;
    }
    fn close(&mut self) {
        self.depth -= 1;
        self.indent();
        self.out.push_str("}\n");
    }
    fn field(&mut self, key: &str, value: impl std::fmt::Display) {
        self.indent();
        let _ = writeln!(self.out, "{key} = {value}");
    }
    fn blank(&mut self) {
        self.out.push('\n');
    }
}

fn attention(p: &mut Printer, a: &Attention) {
    match a {
        // `mha` takes no `kv_heads`: the resolver sets it to `heads`.
        Attention::Gqa(g) if g.kv_heads == g.heads => {
            p.open("attention mha");
            p.field("heads", g.heads);
            p.field("head_dim", g.head_dim);
            p.close();
        }
        Attention::Gqa(g) => {
            p.open("attention gqa");
            p.field("heads", g.heads);
            p.field("kv_heads", g.kv_heads);
            p.field("head_dim", g.head_dim);
            p.close();
        }
        Attention::Mla(m) => {
            p.open("attention mla");
            p.field("heads", m.heads);
            match m.q_lora_rank {
                Some(r) => p.field("q_lora_rank", r),
                None => p.field("q_lora_rank", "none"),
            }
            p.field("kv_lora_rank", m.kv_lora_rank);
            p.field("qk_nope_head_dim", m.qk_nope_head_dim);
            p.field("qk_rope_head_dim", m.qk_rope_head_dim);
            p.field("v_head_dim", m.v_head_dim);
            p.field("latent_norm_eps", float(m.latent_norm_eps));
            p.close();
        }
    }
}

fn rope(p: &mut Printer, r: &Rope) {
    p.open("rope");
    p.field("theta", float(r.theta));
    p.field(
        "layout",
        match r.layout {
            RopeLayout::HalfSplit => "half_split",
            RopeLayout::Interleaved => "interleaved",
        },
    );
    if let Some(y) = &r.yarn {
        p.open("yarn");
        p.field("factor", float(y.factor));
        p.field("original_context", y.original_context);
        p.field("beta_fast", float(y.beta_fast));
        p.field("beta_slow", float(y.beta_slow));
        p.field("mscale", float(y.mscale));
        p.field("mscale_all_dim", float(y.mscale_all_dim));
        p.close();
    }
    p.close();
}

fn ffn(p: &mut Printer, block: &FfnBlock, layers: u64) {
    p.open(&format!("ffn {}", ffn_kind(&block.kind)));
    p.field("layers", layer_set(&block.layers, layers));
    match &block.kind {
        Ffn::Dense { intermediate } => p.field("intermediate", intermediate),
        Ffn::Moe(moe) => {
            p.field("routed_experts", moe.routed_experts);
            p.field("shared_experts", moe.shared_experts);
            p.field("expert_intermediate", moe.expert_intermediate);
            let r = &moe.router;
            p.open("router");
            p.field("top_k", r.top_k);
            p.field(
                "scoring",
                match r.scoring {
                    Scoring::Softmax => "softmax",
                    Scoring::Sigmoid => "sigmoid",
                },
            );
            p.field("selection_bias", r.selection_bias);
            p.field("groups", r.groups);
            p.field("groups_kept", r.groups_kept);
            p.field(
                "group_score",
                match r.group_score {
                    Some(GroupScore::Max) => "max",
                    Some(GroupScore::Top2Sum) => "top2_sum",
                    // Written out so that the absence is visible; `none` reads as absent.
                    None => "none",
                },
            );
            p.field(
                "normalize",
                match r.normalize {
                    Normalize::Always => "always",
                    Normalize::Never => "never",
                    Normalize::TopKGt1 => "top_k_gt_1",
                },
            );
            p.field("scale", float(r.scale));
            p.field("scale_normalized", r.scale_normalized);
            p.close();
            let b = &moe.balance;
            p.open("balance");
            p.field("expert_aux", float(b.expert_aux));
            p.field("device_aux", float(b.device_aux));
            p.field("comm_aux", float(b.comm_aux));
            p.field("sequence_aux", float(b.sequence_aux));
            p.field("bias_update_speed", float(b.bias_update_speed));
            p.close();
        }
    }
    p.close();
}

fn ffn_kind(f: &Ffn) -> &'static str {
    match f {
        Ffn::Dense { .. } => "dense",
        Ffn::Moe(_) => "moe",
    }
}

fn mtp_input(i: MtpInput) -> &'static str {
    match i {
        MtpInput::Embedding => "embedding",
        MtpInput::Hidden => "hidden",
    }
}

/// `0..3`, `3..` (a step-1 range that runs to the last layer), `1..28 step 2`, or a list
/// of those when the set has several ranges.
fn layer_set(set: &LayerSet, layers: u64) -> String {
    let one = |r: &LayerRange| {
        let mut s = format!("{}..", r.start);
        if r.end != layers || r.step != 1 {
            let _ = write!(s, "{}", r.end);
        }
        if r.step != 1 {
            let _ = write!(s, " step {}", r.step);
        }
        s
    };
    match set.ranges.as_slice() {
        [r] => one(r),
        rs => format!("[{}]", rs.iter().map(one).collect::<Vec<_>>().join(", ")),
    }
}

/// A float the grammar reads back as the identical f64. Rust's `{:?}` is the shortest
/// representation that round-trips, and always has a `.` or an exponent (`10000.0`,
/// `1e-6`, `1e20`), both of which the `float` rule accepts; integer-looking text would
/// also do (float fields accept ints) but could not carry fractions or exponents.
fn float(x: f64) -> String {
    debug_assert!(x.is_finite(), "a resolved model holds only finite numbers");
    format!("{x:?}")
}

#[cfg(test)]
mod tests {
    use super::float;

    #[test]
    fn floats_round_trip_through_their_text() {
        for x in [0.0, 1.0, 10000.0, 1e-6, 1e-5, 0.0001, 0.707, 2.5, 1e12, 1e20, 0.1 + 0.2, 5e-324, f64::MAX] {
            let s = float(x);
            assert!(s.contains('.') || s.contains('e'), "{s} would read as an integer");
            assert_eq!(s.parse::<f64>().unwrap(), x, "{s}");
        }
    }
}
