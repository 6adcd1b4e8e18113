//! From checkpoint tensor names to the IR's params: which stored tensors (and which part
//! of them) make up each param, checked against what the spec's lowered module reads.
//!
//! Hub checkpoints of llama, deepseek, deepseek_v2 and deepseek_v3 name tensors as the
//! IR does ([`dsc_compiler::lower`] documents the list), except for:
//!
//! - **Routed experts**, stored one by one (`mlp.experts.{e}.gate_proj.weight [i, h]`):
//!   stacked in expert-id order under `mlp.experts.gate_proj.weight [E, i, h]`. The fused
//!   layout transformers 5 keeps in memory (`mlp.experts.gate_up_proj [E, 2i, h]`, gate
//!   rows first as its `chunk(2)` reads them, and `mlp.experts.down_proj [E, h, i]`) is
//!   accepted too, as is an already stacked `mlp.experts.gate_proj.weight`.
//! - **FP8 block scales**: `X.weight_scale_inv` (or `X_scale_inv` for fused experts) belongs
//!   to `X.weight` and is consumed by it; it is never a param.
//! - Tensors that are stored but never read, accepted and skipped: `*.rotary_emb.inv_freq`
//!   (older Llama checkpoints), the MTP layers' own copies of the embedding and head
//!   (`model.layers.{N+k-1}.embed_tokens.weight`, `.shared_head.head.weight`, which
//!   DeepSeek-V3 shares with the main model), and `lm_head.weight` of a tied model.
//!
//! Everything else must be a param, of the param's shape. Params only the training entry
//! reads (the MTP modules) may be absent: inference does not need them.

use super::error::TensorReport;
use super::files::Shard;
use safetensors::tensor::TensorInfo;
use safetensors::Dtype;
use std::collections::{BTreeMap, HashMap, HashSet};

/// What the spec expects of one param.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expect {
    pub shape: Vec<usize>,
    /// Read by prefill or decode (else only by training, and it may be absent).
    pub required: bool,
}

/// Facts about the model the name rules need.
#[derive(Debug, Clone)]
pub struct Facts {
    pub layers: u64,
    pub mtp_depth: u64,
    pub tie_embeddings: bool,
    /// FP8 block size `[rows, cols]` of the weight scales (`quantization_config.weight_block_size`).
    pub block: [usize; 2],
}

/// One stored tensor.
#[derive(Debug, Clone)]
pub struct Stored {
    pub shard: usize,
    pub name: String,
    pub info: TensorInfo,
}

/// A stored tensor as (part of) a param: dequantised by its block scale when it has one,
/// and cut to the rows `start..start+len` of its second-to-last axis when fused.
#[derive(Debug, Clone)]
pub struct Piece {
    pub data: Stored,
    pub scale: Option<Stored>,
    pub rows: Option<(usize, usize)>,
}

impl Piece {
    /// The shape of the piece once cut.
    pub fn shape(&self) -> Vec<usize> {
        let mut s = self.data.info.shape.clone();
        if let (Some((_, len)), Some(n)) = (self.rows, s.len().checked_sub(2)) {
            s[n] = len;
        }
        s
    }
}

/// How a param is assembled.
#[derive(Debug, Clone)]
pub enum Source {
    One(Piece),
    /// Stacked along a new leading axis, expert 0 first.
    Stack(Vec<Piece>),
}

/// Element types a weight may be stored in.
fn loadable(d: Dtype) -> bool {
    matches!(d, Dtype::F32 | Dtype::F64 | Dtype::BF16 | Dtype::F16 | Dtype::F8_E4M3)
}

/// How one stored name contributes.
enum Role {
    /// Read by nothing; skipped.
    Skip,
    /// A block scale of the tensor named here.
    Scale(String),
    /// The whole of this param.
    Direct(String),
    /// Expert `e` of this stacked param.
    Expert(String, usize),
    /// `gate_up_proj`: the first half of its rows are the gate param, the second the up.
    GateUp { gate: String, up: String },
}

fn role(name: &str, f: &Facts, expected: &HashMap<String, Expect>) -> Role {
    if let Some(owner) = name.strip_suffix("_scale_inv") {
        return Role::Scale(owner.to_string());
    }
    if name.ends_with(".rotary_emb.inv_freq") || (name == "lm_head.weight" && f.tie_embeddings && !expected.contains_key(name)) {
        return Role::Skip;
    }
    let parts: Vec<&str> = name.split('.').collect();
    if let ["model", "layers", l, "embed_tokens" | "shared_head", ..] = parts[..] {
        let is_copy = matches!(parts[3..], ["embed_tokens", "weight"] | ["shared_head", "head", "weight"]);
        if is_copy && l.parse::<u64>().is_ok_and(|l| l >= f.layers && l < f.layers + f.mtp_depth) {
            return Role::Skip;
        }
    }
    if let Some(i) = parts.iter().position(|p| *p == "experts") {
        if i > 0 && parts[i - 1] == "mlp" {
            let head = parts[..=i].join(".");
            match &parts[i + 1..] {
                [e, rest @ ..] if !rest.is_empty() && e.parse::<usize>().is_ok() => {
                    return Role::Expert(format!("{head}.{}", rest.join(".")), e.parse().expect("checked"));
                }
                ["gate_up_proj"] | ["gate_up_proj", "weight"] => {
                    return Role::GateUp { gate: format!("{head}.gate_proj.weight"), up: format!("{head}.up_proj.weight") };
                }
                ["down_proj"] => return Role::Direct(format!("{head}.down_proj.weight")),
                _ => {}
            }
        }
    }
    Role::Direct(name.to_string())
}

/// A stacked-expert param's per-expert name: `…mlp.experts.gate_proj.weight` with `e`
/// → `…mlp.experts.{e}.gate_proj.weight`.
fn expert_name(stacked: &str, e: &str) -> String {
    match stacked.split_once(".experts.") {
        Some((head, rest)) => format!("{head}.experts.{e}.{rest}"),
        None => stacked.to_string(),
    }
}

/// What arrived for one param before it is checked.
#[derive(Default)]
struct Acc {
    direct: Vec<Piece>,
    experts: BTreeMap<usize, Vec<Piece>>,
}

/// Maps the tensors of `shards` to params; every disagreement with `expected` goes into
/// `report`. The plan holds a source for every param that could be assembled.
pub fn plan(shards: &[Shard], expected: &HashMap<String, Expect>, facts: &Facts, report: &mut TensorReport) -> HashMap<String, Source> {
    // Every stored tensor, once.
    let mut stored: BTreeMap<String, Stored> = BTreeMap::new();
    for (si, shard) in shards.iter().enumerate() {
        for (name, info) in &shard.tensors {
            if let Some(prev) = stored.get(name) {
                let why = format!("stored in both `{}` and `{}`", shards[prev.shard].path.display(), shard.path.display());
                report.invalid.push((name.clone(), why));
                continue;
            }
            stored.insert(name.clone(), Stored { shard: si, name: name.clone(), info: info.clone() });
        }
    }

    let mut scales: HashMap<String, Stored> = HashMap::new();
    let mut acc: BTreeMap<String, Acc> = BTreeMap::new();
    let mut arrivals: Vec<(Role, Stored)> = Vec::new();
    for (name, s) in stored {
        match role(&name, facts, expected) {
            Role::Skip => {}
            Role::Scale(owner) => {
                scales.insert(owner, s);
            }
            r => arrivals.push((r, s)),
        }
    }

    let mut used_scales: HashSet<String> = HashSet::new();
    // Stored tensors already reported for what they are: their params are not "missing" too.
    let mut reported: HashSet<String> = HashSet::new();
    for (r, s) in arrivals {
        if !loadable(s.info.dtype) {
            let why = format!("element type {:?}, which dsc does not load (f32, f64, bf16, f16, f8_e4m3)", s.info.dtype);
            report.invalid.push((s.name.clone(), why));
            reported.insert(s.name.clone());
            continue;
        }
        let scale = scales.get(&s.name).cloned();
        if scale.is_some() {
            used_scales.insert(s.name.clone());
        }
        if s.info.dtype == Dtype::F8_E4M3 && scale.is_none() {
            report.missing.push((format!("{}_scale_inv", s.name), scale_shape(&s.info.shape, facts.block)));
            reported.insert(s.name.clone());
            continue;
        }
        if let Some(sc) = &scale {
            let want = scale_shape(&s.info.shape, facts.block);
            let problem = if s.info.shape.len() < 2 {
                report.invalid.push((sc.name.clone(), format!("a block scale for `{}`, which is not a matrix", s.name)));
                true
            } else if !matches!(sc.info.dtype, Dtype::F32 | Dtype::F64 | Dtype::BF16 | Dtype::F16) {
                report.invalid.push((sc.name.clone(), format!("element type {:?} for a block scale", sc.info.dtype)));
                true
            } else if sc.info.shape != want {
                report.misshaped.push((sc.name.clone(), sc.info.shape.clone(), want));
                true
            } else {
                false
            };
            if problem {
                reported.insert(s.name.clone());
                continue;
            }
        }
        let whole = Piece { data: s.clone(), scale, rows: None };
        match r {
            Role::Direct(target) => route(&mut acc, expected, report, target, None, whole),
            Role::Expert(target, e) => route(&mut acc, expected, report, target, Some(e), whole),
            Role::GateUp { gate, up } => {
                let shape = &s.info.shape;
                // [E, 2i, h]: the expected gate param says what i is.
                let want = expected.get(&gate).map(|x| {
                    let mut w = x.shape.clone();
                    if let Some(n) = w.len().checked_sub(2) {
                        w[n] *= 2;
                    }
                    w
                });
                match want {
                    None => report.unexpected.push((s.name.clone(), shape.clone())),
                    Some(w) if *shape != w => report.misshaped.push((s.name.clone(), shape.clone(), w)),
                    Some(_) => {
                        let half = shape[shape.len() - 2] / 2;
                        let g = Piece { rows: Some((0, half)), ..whole.clone() };
                        let u = Piece { rows: Some((half, half)), ..whole };
                        route(&mut acc, expected, report, gate, None, g);
                        route(&mut acc, expected, report, up, None, u);
                    }
                }
            }
            Role::Skip | Role::Scale(_) => unreachable!("handled above"),
        }
    }
    for (owner, sc) in &scales {
        if !used_scales.contains(owner) {
            report.unexpected.push((sc.name.clone(), sc.info.shape.clone()));
        }
    }

    // Assemble and check every expected param.
    let mut out = HashMap::new();
    for (name, want) in expected {
        let a = acc.remove(name).unwrap_or_default();
        let stacked = name.contains(".mlp.experts.") && want.shape.len() == 3;
        match (a.direct.len(), a.experts.is_empty()) {
            (0, true) => {
                let already = reported.contains(name)
                    || (stacked && (0..want.shape[0]).any(|e| reported.contains(&expert_name(name, &e.to_string()))));
                if want.required && !already {
                    if stacked {
                        let e = format!("{{0..{}}}", want.shape[0].saturating_sub(1));
                        report.missing.push((expert_name(name, &e), want.shape[1..].to_vec()));
                    } else {
                        report.missing.push((name.clone(), want.shape.clone()));
                    }
                }
            }
            (1, true) => {
                let p = a.direct.into_iter().next().expect("one");
                if p.shape() != want.shape {
                    report.misshaped.push((p.data.name.clone(), p.shape(), want.shape.clone()));
                } else {
                    out.insert(name.clone(), Source::One(p));
                }
            }
            (0, false) => {
                let (n, each) = (want.shape[0], &want.shape[1..]);
                let mut pieces = Vec::with_capacity(n);
                let mut ok = true;
                for e in 0..n {
                    match a.experts.get(&e).map(|v| &v[..]) {
                        None | Some([]) if reported.contains(&expert_name(name, &e.to_string())) => ok = false,
                        None | Some([]) => {
                            report.missing.push((expert_name(name, &e.to_string()), each.to_vec()));
                            ok = false;
                        }
                        Some([p]) if p.shape() != each => {
                            report.misshaped.push((p.data.name.clone(), p.shape(), each.to_vec()));
                            ok = false;
                        }
                        Some([p]) => pieces.push(p.clone()),
                        Some(many) => {
                            let names: Vec<&str> = many.iter().map(|p| p.data.name.as_str()).collect();
                            report.invalid.push((expert_name(name, &e.to_string()), format!("given more than once: {}", names.join(", "))));
                            ok = false;
                        }
                    }
                }
                // Expert ids past the spec's count.
                for p in a.experts.range(n..).flat_map(|(_, ps)| ps) {
                    report.unexpected.push((p.data.name.clone(), p.data.info.shape.clone()));
                }
                if ok {
                    out.insert(name.clone(), Source::Stack(pieces));
                }
            }
            _ => {
                let mut names: Vec<&str> = a.direct.iter().map(|p| p.data.name.as_str()).collect();
                names.extend(a.experts.values().flatten().map(|p| p.data.name.as_str()));
                names.truncate(6);
                report.invalid.push((name.clone(), format!("given more than once, by {}", names.join(", "))));
            }
        }
    }
    out
}

/// Sends a piece to its param's accumulator, or reports it as unexpected.
fn route(
    acc: &mut BTreeMap<String, Acc>,
    expected: &HashMap<String, Expect>,
    report: &mut TensorReport,
    target: String,
    expert: Option<usize>,
    p: Piece,
) {
    if !expected.contains_key(&target) {
        report.unexpected.push((p.data.name.clone(), p.data.info.shape.clone()));
        return;
    }
    let a = acc.entry(target).or_default();
    match expert {
        None => a.direct.push(p),
        Some(e) => a.experts.entry(e).or_default().push(p),
    }
}

/// The shape of the block scale of a weight `[lead.., r, c]`: `[lead.., ⌈r/b₀⌉, ⌈c/b₁⌉]`.
pub fn scale_shape(weight: &[usize], block: [usize; 2]) -> Vec<usize> {
    let mut s = weight.to_vec();
    let n = s.len();
    if n >= 2 {
        s[n - 2] = s[n - 2].div_ceil(block[0].max(1));
        s[n - 1] = s[n - 1].div_ceil(block[1].max(1));
    }
    s
}
