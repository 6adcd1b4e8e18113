//! The cost model against numbers it did not compute: parameter counts written out per
//! Hugging Face tensor from each published config, the figures the DeepSeek papers publish,
//! the V2 paper's 93.3% KV-cache claim, and the tensor sizes of the golden checkpoints.

use dsc_compiler::stats::{stats, Stats};
use dsc_dsl::Model;
use std::path::Path;

fn load(file: &str) -> Model {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../specs").join(file);
    match dsc_dsl::load(&path, None) {
        Ok(spec) => spec.model,
        Err(f) => panic!("{file} does not resolve:\n{}", f.render()),
    }
}

/// `got` rounds to `published` at the precision it was published with (`unit`), that is
/// |got - published| ≤ unit / 2.
fn assert_rounds_to(what: &str, got: u128, published: f64, unit: f64) {
    let diff = (got as f64 - published).abs();
    assert!(diff <= unit / 2.0, "{what}: {got} does not round to the published {published} (unit {unit})");
}

fn assert_within(what: &str, got: u128, published: f64, rel: f64) {
    let err = (got as f64 - published).abs() / published;
    assert!(err <= rel, "{what}: {got} is {:.2}% from the published {published}, more than {:.2}%", err * 100.0, rel * 100.0);
}

const B: f64 = 1e9;

// ---------------------------------------------------------------------------------------
// Independent counts, one HF tensor per line. `Vec<(name, numel)>` per layer keeps the
// arithmetic readable; the sums are what the specs must give.

/// `(tensor name, element count)`, one entry per HF tensor.
type Tensors = Vec<(&'static str, u128)>;
/// A layer's tensors, and its routed experts if it is a MoE layer.
type Layer<'a> = (Tensors, Option<&'a MoeDims>);

fn sum(tensors: &[(&str, u128)]) -> u128 {
    tensors.iter().map(|t| t.1).sum()
}

/// `model.embed_tokens`, `model.norm`, `lm_head` (untied in every DeepSeek model).
fn outer(vocab: u128, h: u128) -> Tensors {
    vec![("model.embed_tokens.weight", vocab * h), ("model.norm.weight", h), ("lm_head.weight", vocab * h)]
}

/// Llama-style attention (`LlamaAttention`, `DeepseekAttention` of DeepSeekMoE).
fn llama_attention(h: u128, heads: u128, kv_heads: u128, hd: u128) -> Tensors {
    vec![
        ("self_attn.q_proj.weight", heads * hd * h),
        ("self_attn.k_proj.weight", kv_heads * hd * h),
        ("self_attn.v_proj.weight", kv_heads * hd * h),
        ("self_attn.o_proj.weight", h * heads * hd),
    ]
}

struct MlaDims {
    heads: u128,
    q_lora: Option<u128>,
    kv_lora: u128,
    nope: u128,
    rope: u128,
    v: u128,
}

/// `DeepseekV2Attention` / `DeepseekV3Attention`.
fn mla_attention(h: u128, d: &MlaDims) -> Tensors {
    let mut t = match d.q_lora {
        Some(r) => vec![
            ("self_attn.q_a_proj.weight", r * h),
            ("self_attn.q_a_layernorm.weight", r),
            ("self_attn.q_b_proj.weight", d.heads * (d.nope + d.rope) * r),
        ],
        None => vec![("self_attn.q_proj.weight", d.heads * (d.nope + d.rope) * h)],
    };
    t.extend([
        ("self_attn.kv_a_proj_with_mqa.weight", (d.kv_lora + d.rope) * h),
        ("self_attn.kv_a_layernorm.weight", d.kv_lora),
        ("self_attn.kv_b_proj.weight", d.heads * (d.nope + d.v) * d.kv_lora),
        ("self_attn.o_proj.weight", h * d.heads * d.v),
    ]);
    t
}

fn norms(h: u128) -> Tensors {
    vec![("input_layernorm.weight", h), ("post_attention_layernorm.weight", h)]
}

fn dense_mlp(h: u128, inter: u128) -> Tensors {
    vec![("mlp.gate_proj.weight", inter * h), ("mlp.up_proj.weight", inter * h), ("mlp.down_proj.weight", h * inter)]
}

/// One routed expert: `mlp.experts.E.{gate,up,down}_proj`.
fn expert(h: u128, inter: u128) -> u128 {
    inter * h + inter * h + h * inter
}

struct MoeDims {
    routed: u128,
    shared: u128,
    inter: u128,
    top_k: u128,
    bias: bool,
}

fn moe_mlp(h: u128, m: &MoeDims) -> Tensors {
    let shared_inter = m.shared * m.inter; // the shared experts are stored as one wide MLP
    let mut t = vec![
        ("mlp.experts.*", m.routed * expert(h, m.inter)),
        ("mlp.shared_experts.gate_proj.weight", shared_inter * h),
        ("mlp.shared_experts.up_proj.weight", shared_inter * h),
        ("mlp.shared_experts.down_proj.weight", h * shared_inter),
        ("mlp.gate.weight", m.routed * h),
    ];
    if m.bias {
        t.push(("mlp.gate.e_score_correction_bias", m.routed));
    }
    t
}

/// Totals of a model given its per-layer tensors: (total, active), where active drops the
/// routed experts a token is not sent to.
fn count(vocab: u128, h: u128, layers: &[Layer]) -> (u128, u128) {
    let total = sum(&outer(vocab, h)) + layers.iter().map(|(t, _)| sum(t)).sum::<u128>();
    let unused: u128 = layers.iter().filter_map(|(_, m)| m.map(|m| (m.routed - m.top_k) * expert(h, m.inter))).sum();
    (total, total - unused)
}

// ---------------------------------------------------------------------------------------

#[test]
fn deepseek_llm_7b() {
    // config.json: vocab 102400, hidden 4096, 30 layers, 32 heads (MHA, head_dim 128),
    // intermediate 11008, untied.
    let (v, h, l) = (102400, 4096, 30);
    let layer = [norms(h), llama_attention(h, 32, 32, 128), dense_mlp(h, 11008)].concat();
    let layers: Vec<_> = (0..l).map(|_| (layer.clone(), None)).collect();
    let (total, active) = count(v, h, &layers);
    assert_eq!(total, 6_910_365_696);

    let s = stats(&load("deepseek_llm_7b.dsc"), 4096);
    assert_eq!(s.params.total, total);
    assert_eq!(s.params.active, active);
    assert_eq!(s.params.active_non_embedding, total - v * h);
    assert_eq!(s.params.mtp, 0);
    // K and V, 32 heads × 128, in each of 30 layers; MHA is its own naive baseline.
    assert_eq!(s.kv_cache.elements_per_token, 30 * 2 * 32 * 128);
    assert_eq!(s.kv_cache.reduction_vs_naive, 0.0);
    assert_rounds_to("7B total", s.params.total, 6.9 * B, 0.1 * B);
}

#[test]
fn deepseek_llm_67b() {
    // config.json: vocab 102400, hidden 8192, 95 layers, 64 heads, 8 KV heads (head_dim 128),
    // intermediate 22016, untied.
    let (v, h, l) = (102400, 8192, 95);
    let layer = [norms(h), llama_attention(h, 64, 8, 128), dense_mlp(h, 22016)].concat();
    let layers: Vec<_> = (0..l).map(|_| (layer.clone(), None)).collect();
    let (total, _) = count(v, h, &layers);
    assert_eq!(total, 67_425_001_472);

    let s = stats(&load("deepseek_llm_67b.dsc"), 4096);
    assert_eq!(s.params.total, total);
    assert_eq!(s.params.active, total);
    assert_eq!(s.kv_cache.elements_per_token, 95 * 2 * 8 * 128);
    assert_eq!(s.kv_cache.naive_elements_per_token, 95 * 2 * 64 * 128);
    assert_rounds_to("67B total", s.params.total, 67.0 * B, 1.0 * B);
}

#[test]
fn deepseek_moe_16b() {
    // config.json: vocab 102400, hidden 2048, 28 layers, 16 heads (MHA, 128), layer 0 dense
    // with intermediate 10944, layers 1..28 MoE: 64 routed + 2 shared experts of 1408,
    // 6 per token.
    let (v, h, l) = (102400, 2048, 28);
    let moe = MoeDims { routed: 64, shared: 2, inter: 1408, top_k: 6, bias: false };
    let attn = llama_attention(h, 16, 16, 128);
    let layers: Vec<_> = (0..l)
        .map(|i| match i {
            0 => ([norms(h), attn.clone(), dense_mlp(h, 10944)].concat(), None),
            _ => ([norms(h), attn.clone(), moe_mlp(h, &moe)].concat(), Some(&moe)),
        })
        .collect();
    let (total, active) = count(v, h, &layers);
    assert_eq!((total, active), (16_375_728_128, 2_828_650_496));

    let s = stats(&load("deepseek_moe_16b.dsc"), 4096);
    assert_eq!((s.params.total, s.params.active), (total, active));
    assert_eq!(s.kv_cache.elements_per_token, 28 * 2 * 16 * 128);
    // DeepSeekMoE paper: 16.4B total, 2.8B activated.
    assert_rounds_to("MoE 16B total", s.params.total, 16.4 * B, 0.1 * B);
    assert_rounds_to("MoE 16B active", s.params.active, 2.8 * B, 0.1 * B);
}

fn v2_family(v: u128, h: u128, l: u128, mla: &MlaDims, dense: (u128, u128), moe: &MoeDims) -> (u128, u128) {
    let attn = mla_attention(h, mla);
    let layers: Vec<_> = (0..l)
        .map(|i| {
            if i < dense.0 {
                ([norms(h), attn.clone(), dense_mlp(h, dense.1)].concat(), None)
            } else {
                ([norms(h), attn.clone(), moe_mlp(h, moe)].concat(), Some(moe))
            }
        })
        .collect();
    count(v, h, &layers)
}

#[test]
fn deepseek_v2() {
    // config.json: vocab 102400, hidden 5120, 60 layers; MLA 128 heads, q rank 1536, kv rank
    // 512, nope 128, rope 64, v 128; layer 0 dense 12288; then 160 routed + 2 shared experts
    // of 1536, 6 per token.
    let mla = MlaDims { heads: 128, q_lora: Some(1536), kv_lora: 512, nope: 128, rope: 64, v: 128 };
    let moe = MoeDims { routed: 160, shared: 2, inter: 1536, top_k: 6, bias: false };
    let (total, active) = v2_family(102400, 5120, 60, &mla, (1, 12288), &moe);
    assert_eq!((total, active), (235_741_434_880, 21_375_800_320));

    let s = stats(&load("deepseek_v2.dsc"), 4096);
    assert_eq!((s.params.total, s.params.active), (total, active));
    assert_eq!(s.params.mtp, 0);
    // The 512-dim latent plus the 64-dim rope key, 60 layers.
    assert_eq!(s.kv_cache.elements_per_token, 60 * (512 + 64));
    assert_eq!(s.kv_cache.naive_elements_per_token, 60 * (128 * (128 + 64) + 128 * 128));
    // V2 paper: 236B total, 21B activated.
    assert_rounds_to("V2 total", s.params.total, 236.0 * B, 1.0 * B);
    assert_rounds_to("V2 active", s.params.active, 21.0 * B, 1.0 * B);
}

#[test]
fn deepseek_v2_lite() {
    // config.json: vocab 102400, hidden 2048, 27 layers; MLA 16 heads without q compression,
    // kv rank 512, nope 128, rope 64, v 128; layer 0 dense 10944; then 64 routed + 2 shared
    // experts of 1408, 6 per token.
    let mla = MlaDims { heads: 16, q_lora: None, kv_lora: 512, nope: 128, rope: 64, v: 128 };
    let moe = MoeDims { routed: 64, shared: 2, inter: 1408, top_k: 6, bias: false };
    let (v, h) = (102400, 2048);
    let (total, active) = v2_family(v, h, 27, &mla, (1, 10944), &moe);
    assert_eq!((total, active), (15_706_484_224, 2_661_150_208));

    let s = stats(&load("deepseek_v2_lite.dsc"), 4096);
    assert_eq!((s.params.total, s.params.active), (total, active));
    assert_eq!(s.params.active_non_embedding, active - v * h);
    assert_eq!(s.kv_cache.elements_per_token, 27 * (512 + 64));
    // V2 paper, appendix: 15.7B total, 2.4B activated.
    assert_rounds_to("V2-Lite total", s.params.total, 15.7 * B, 0.1 * B);
    // The published 2.4B is not the full per-token count (2.66B, with the embedding table
    // and the head). It matches the count without the input embedding table, 2.451B, cut
    // rather than rounded to one decimal; hence 2.5% rather than a rounding check.
    assert_within("V2-Lite active without embedding", s.params.active_non_embedding, 2.4 * B, 0.025);
}

#[test]
fn deepseek_v3() {
    // config.json: vocab 129280, hidden 7168, 61 layers; MLA as V2 (128 heads, q rank 1536,
    // kv rank 512, nope 128, rope 64, v 128); layers 0..3 dense 18432; then 256 routed + 1
    // shared expert of 2048, 8 per token, with the selection bias; one MTP module.
    let mla = MlaDims { heads: 128, q_lora: Some(1536), kv_lora: 512, nope: 128, rope: 64, v: 128 };
    let moe = MoeDims { routed: 256, shared: 1, inter: 2048, top_k: 8, bias: true };
    let (v, h) = (129280, 7168);
    let (total, active) = v2_family(v, h, 61, &mla, (3, 18432), &moe);
    assert_eq!((total, active), (671_026_419_200, 37_552_297_472));
    // MTP layer 61 of the checkpoint, without its copies of embed_tokens and shared_head.head.
    let mtp = sum(&[("enorm.weight", h), ("hnorm.weight", h), ("eh_proj.weight", h * 2 * h), ("shared_head.norm.weight", h)])
        + sum(&[norms(h), mla_attention(h, &mla), moe_mlp(h, &moe)].concat());
    assert_eq!(mtp, 11_610_068_224);

    let s = stats(&load("deepseek_v3.dsc"), 4096);
    assert_eq!((s.params.total, s.params.active, s.params.mtp), (total, active, mtp));
    assert_eq!(s.kv_cache.elements_per_token, 61 * (512 + 64));
    // V3 report: 671B total, 37B activated.
    assert_rounds_to("V3 total", s.params.total, 671.0 * B, 1.0 * B);
    // 37.55B with the embedding table and the head would round to 38: the report's 37B is
    // either that number cut, or the count without the input embedding (36.63B) rounded.
    assert_within("V3 active", s.params.active, 37.0 * B, 0.015);
    assert_rounds_to("V3 active without embedding", s.params.active_non_embedding, 37.0 * B, 1.0 * B);
    // The Hub lists the checkpoint as 685B: main model + MTP + the MTP layer's own copies of
    // the embedding and the head = 684.49B; the remaining ~0.04B are FP8 block scales
    // (one per 128×128 block of every quantised matrix), which are not model parameters.
    let checkpoint = s.params.total + s.params.mtp + 2 * v * h;
    assert_within("V3 checkpoint", checkpoint, 685.0 * B, 0.001);
}

/// DeepSeek-V2 §3 / abstract: MLA "reduces the KV cache by 93.3%" compared with DeepSeek
/// 67B. That compares V2's cache as deployed (FP8 with KV-cache quantisation to 6 bits per
/// element on average, §3.2.3) against 67B's in bf16 (16 bits).
#[test]
fn v2_kv_cache_is_93_3_percent_smaller_than_67b() {
    let v2 = stats(&load("deepseek_v2.dsc"), 4096).kv_cache.elements_per_token;
    let llm67 = stats(&load("deepseek_llm_67b.dsc"), 4096).kv_cache.elements_per_token;
    assert_eq!((v2, llm67), (34_560, 194_560));
    let reduction = 1.0 - (v2 as f64 * 6.0) / (llm67 as f64 * 16.0);
    assert!((reduction - 0.933).abs() < 0.0005, "reduction {reduction}");
}

#[test]
fn flops_follow_the_documented_formula() {
    // 7B at context 4096: matrices = 30 layers · (attention 4·4096² + FFN 3·4096·11008) +
    // head 102400·4096; attention = 30 · 2 · (2·32·128·4096).
    let s = stats(&load("deepseek_llm_7b.dsc"), 4096);
    let matrices: u128 = 30 * (4 * 4096 * 4096 + 3 * 4096 * 11008) + 102400 * 4096;
    let attention: u128 = 30 * 2 * (2 * 32 * 128 * 4096);
    assert_eq!(s.flops.matmul, 2 * matrices);
    assert_eq!(s.flops.attention, attention);
    assert_eq!(s.flops.per_token, 2 * matrices + attention);
    // For an untied dense model the matrices are everything but the embedding and norms.
    assert_eq!(matrices, s.params.total - 102400 * 4096 - (30 * 2 + 1) * 4096);

    // V3: MLA attention counted decompressed: qk 192, v 128 per head.
    let s = stats(&load("deepseek_v3.dsc"), 4096);
    assert_eq!(s.flops.attention, 61 * (2 * 128 * 192 * 4096 + 2 * 128 * 128 * 4096));
    // Matrices = active minus the embedding gather, the norms (2 per layer, final, and the
    // two latent norms per layer) and the selection biases of the 58 MoE layers.
    let non_matrix = 129280 * 7168 + (61 * 2 + 1) * 7168 + 61 * (1536 + 512) + 58 * 256;
    assert_eq!(s.flops.matmul, 2 * (s.params.active - non_matrix));
}

// ---------------------------------------------------------------------------------------
// The golden checkpoints (tiny models written by transformers, golden/hf/*): the total
// must equal the number of elements actually stored.

fn stored_elements(case: &str) -> u128 {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../golden/hf").join(case).join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.iter().map(|(_, t)| t.shape().iter().product::<usize>() as u128).sum()
}

/// Stats of a spec in specs/tiny/, which mirror the golden checkpoints' dimensions.
fn tiny(file: &str) -> Stats {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../specs/tiny").join(file);
    match dsc_dsl::load(&path, None) {
        Ok(spec) => stats(&spec.model, 12),
        Err(f) => panic!("{}", f.render()),
    }
}

#[test]
fn golden_checkpoints_match_the_tiny_specs() {
    for (file, case) in [
        ("tiny_llama.dsc", "llama_dense"),
        ("tiny_llama_gqa.dsc", "llama_gqa"),
        ("tiny_v2.dsc", "deepseek_v2"),
        ("tiny_v2_lite.dsc", "deepseek_v2_lite"),
        // The golden V3 has no MTP layer (num_nextn_predict_layers = 0), like HF's own
        // class; tiny_v3 has one, which `params.total` leaves out by definition.
        ("tiny_v3.dsc", "deepseek_v3"),
    ] {
        assert_eq!(tiny(file).params.total, stored_elements(case), "{file} vs golden/hf/{case}");
    }
    assert!(tiny("tiny_v3.dsc").params.mtp > 0);
}
