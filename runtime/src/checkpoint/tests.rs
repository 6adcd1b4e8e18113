//! The loader on checkpoints written here: the fixtures of `golden/hf/` rewritten as
//! shards, fused experts, other dtypes, FP8 with block scales whose dequantised values are
//! known, with an MTP layer, and broken in every way the loader must report.

use super::*;
use crate::reference::weights::f8e4m3_to_f32;
use crate::reference::Tensor;
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use std::sync::atomic::{AtomicUsize, Ordering};

/// One tensor as stored.
#[derive(Clone)]
struct Raw {
    name: String,
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl Raw {
    fn f32(name: &str, shape: &[usize], v: &[f32]) -> Raw {
        Raw { name: name.into(), dtype: Dtype::F32, shape: shape.to_vec(), bytes: v.iter().flat_map(|x| x.to_le_bytes()).collect() }
    }
    fn values(&self) -> Vec<f32> {
        assert_eq!(self.dtype, Dtype::F32);
        self.bytes.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
    }
}

fn golden(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../golden/hf").join(case)
}

fn read_raw(path: &Path) -> Vec<Raw> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut v: Vec<Raw> = st
        .tensors()
        .into_iter()
        .map(|(name, t)| Raw { name, dtype: t.dtype(), shape: t.shape().to_vec(), bytes: t.data().to_vec() })
        .collect();
    v.sort_by(|a, b| a.name.cmp(&b.name));
    v
}

fn serialize(tensors: &[Raw]) -> Vec<u8> {
    let views: Vec<(String, TensorView)> =
        tensors.iter().map(|t| (t.name.clone(), TensorView::new(t.dtype, t.shape.clone(), &t.bytes).unwrap())).collect();
    safetensors::tensor::serialize(views, None).unwrap()
}

/// A fresh, empty directory for one test.
fn scratch(name: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let d = std::env::temp_dir().join(format!("dsc-ckpt-{}-{}-{name}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A model directory: `case`'s config (edited by `config`) and `tensors` as one file.
fn model_dir(name: &str, case: &str, config: impl FnOnce(&mut Value), tensors: &[Raw]) -> PathBuf {
    let d = scratch(name);
    let mut c: Value = serde_json::from_str(&std::fs::read_to_string(golden(case).join("config.json")).unwrap()).unwrap();
    config(&mut c);
    std::fs::write(d.join("config.json"), c.to_string()).unwrap();
    std::fs::write(d.join(files::SINGLE), serialize(tensors)).unwrap();
    d
}

fn open(d: &Path) -> Result<ModelDir, CheckpointError> {
    ModelDir::open(d, &OpenOptions::default())
}

/// [`open`] with the params kept in their stored precision, as inference keeps them.
fn open_kept(d: &Path) -> ModelDir {
    let mut md = open(d).unwrap();
    md.weights.keep_stored(true);
    md
}

/// The reference backend's logits for a short prompt.
fn logits(md: ModelDir) -> Tensor {
    let b = crate::generate::ReferenceBackend::new(md.spec, md.weights, Default::default(), Default::default());
    crate::generate::forward(&b, &[vec![3, 1, 4, 1, 5, 9]], false).unwrap().logits
}

/// Logits kept narrow against logits widened at load: the same values up to the order
/// of the sums (a block of rows is widened, then multiplied as the `f32` weight is).
fn same_logits(kept: &Tensor, wide: &Tensor) {
    let scale = wide.to_f32_vec().iter().fold(0f32, |m, x| m.max(x.abs())) as f64;
    let d = kept.max_abs_diff(wide).unwrap();
    assert!(d <= 1e-5 * scale, "kept narrow: logits differ by {d} (largest |logit| {scale})");
}

fn report(d: &Path) -> TensorReport {
    match open(d) {
        Err(CheckpointError::Tensors(r)) => *r,
        Err(e) => panic!("expected a tensor report, got: {e}"),
        Ok(_) => panic!("expected a tensor report, got a model"),
    }
}

/// Every param of two opened directories is equal, bit for bit.
fn same_params(a: &ModelDir, b: &ModelDir) {
    assert_eq!(a.weights.names(), b.weights.names());
    for n in a.weights.names() {
        let (x, y): (&Tensor, &Tensor) = (a.weights.get(n).unwrap(), b.weights.get(n).unwrap());
        assert!(x == y, "{n} differs");
    }
}

#[test]
fn fixture_opens_lazily_with_stacked_experts() {
    let md = open(&golden("deepseek_v3")).unwrap();
    assert_eq!(md.generation.eos, vec![1]);
    assert_eq!(md.weights.decoded_bytes(), 0, "opening decodes nothing");
    assert!(md.weights.mapped_bytes() > 0);
    let w = md.weights.get("model.layers.2.mlp.experts.up_proj.weight").unwrap();
    assert_eq!(w.shape(), &[12, 16, 48]);
    // Row e of the stack is expert e's matrix.
    let raw = read_raw(&golden("deepseek_v3").join(files::SINGLE));
    let e7 = raw.iter().find(|r| r.name == "model.layers.2.mlp.experts.7.up_proj.weight").unwrap().values();
    assert_eq!(&w.to_f32_vec()[7 * 16 * 48..8 * 16 * 48], &e7[..]);
    assert_eq!(md.weights.decoded_bytes(), 12 * 16 * 48 * 4, "only what was asked for");
    assert!(md.weights.get("model.layers.2.mlp.experts.7.up_proj.weight").is_none(), "params go by IR name");
}

#[test]
fn sharded_checkpoint_is_the_same_model() {
    let raw = read_raw(&golden("deepseek_v3").join(files::SINGLE));
    let d = scratch("sharded");
    std::fs::copy(golden("deepseek_v3").join("config.json"), d.join("config.json")).unwrap();
    let mut map = serde_json::Map::new();
    for k in 0..3 {
        let file = format!("model-{:05}-of-00003.safetensors", k + 1);
        let part: Vec<Raw> = raw.iter().enumerate().filter(|(i, _)| i % 3 == k).map(|(_, r)| r.clone()).collect();
        for r in &part {
            map.insert(r.name.clone(), Value::String(file.clone()));
        }
        std::fs::write(d.join(&file), serialize(&part)).unwrap();
    }
    std::fs::write(d.join(files::INDEX), serde_json::json!({ "metadata": {}, "weight_map": map }).to_string()).unwrap();
    let sharded = open(&d).unwrap();
    same_params(&sharded, &open(&golden("deepseek_v3")).unwrap());

    // The index and the shards must agree.
    let mut bad = map.clone();
    bad.insert("model.norm.weight".into(), Value::String("model-00002-of-00003.safetensors".into()));
    std::fs::write(d.join(files::INDEX), serde_json::json!({ "weight_map": bad }).to_string()).unwrap();
    let e = open(&d).err().unwrap().to_string();
    assert!(e.contains("lacks 1 tensor(s)") && e.contains("does not list") && e.contains("model.norm.weight"), "{e}");
    let mut gone = map.clone();
    gone.insert("model.norm.weight".into(), Value::String("model-00009-of-00009.safetensors".into()));
    std::fs::write(d.join(files::INDEX), serde_json::json!({ "weight_map": gone }).to_string()).unwrap();
    let e = open(&d).err().unwrap();
    assert!(
        matches!(e, CheckpointError::Index { .. })
            && e.to_string().contains("model-00009-of-00009.safetensors` (named for 1 tensors) is not there"),
        "{e}"
    );
    let mut escape = map.clone();
    escape.insert("model.norm.weight".into(), Value::String("../elsewhere.safetensors".into()));
    std::fs::write(d.join(files::INDEX), serde_json::json!({ "weight_map": escape }).to_string()).unwrap();
    assert!(open(&d).err().unwrap().to_string().contains("not a file beside the index"));
    std::fs::write(d.join(files::INDEX), "{ not json").unwrap();
    assert!(open(&d).err().unwrap().to_string().contains("not valid JSON"));
    std::fs::write(d.join(files::INDEX), "{}").unwrap();
    assert!(open(&d).err().unwrap().to_string().contains("no `weight_map`"));
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn fused_expert_layout_is_the_same_model() {
    let raw = read_raw(&golden("deepseek_v3").join(files::SINGLE));
    let (e, i, h) = (12usize, 16usize, 48usize);
    let mut out: Vec<Raw> = raw.iter().filter(|r| !r.name.contains(".mlp.experts.")).cloned().collect();
    for l in [2, 3] {
        let get =
            |e: usize, p: &str| raw.iter().find(|r| r.name == format!("model.layers.{l}.mlp.experts.{e}.{p}.weight")).unwrap().values();
        // transformers 5: gate_up_proj [E, 2i, h], gate rows first; down_proj [E, h, i].
        let gate_up: Vec<f32> = (0..e).flat_map(|x| [get(x, "gate_proj"), get(x, "up_proj")].concat()).collect();
        let down: Vec<f32> = (0..e).flat_map(|x| get(x, "down_proj")).collect();
        out.push(Raw::f32(&format!("model.layers.{l}.mlp.experts.gate_up_proj"), &[e, 2 * i, h], &gate_up));
        out.push(Raw::f32(&format!("model.layers.{l}.mlp.experts.down_proj"), &[e, h, i], &down));
    }
    let d = model_dir("fused", "deepseek_v3", |_| {}, &out);
    same_params(&open(&d).unwrap(), &open(&golden("deepseek_v3")).unwrap());
    let _ = std::fs::remove_dir_all(&d);
}

/// Narrow float storage is widened exactly.
#[test]
fn bf16_and_f16_weights_are_widened() {
    let raw = read_raw(&golden("llama_dense").join(files::SINGLE));
    let bf: Vec<Raw> = raw
        .iter()
        .map(|r| {
            let v = r.values();
            let bytes = v.iter().flat_map(|x| ((x.to_bits() >> 16) as u16).to_le_bytes()).collect();
            Raw { dtype: Dtype::BF16, bytes, ..r.clone() }
        })
        .collect();
    let d = model_dir("bf16", "llama_dense", |_| {}, &bf);
    let md = open(&d).unwrap();
    let name = "model.layers.1.self_attn.k_proj.weight";
    let want: Vec<f32> =
        raw.iter().find(|r| r.name == name).unwrap().values().iter().map(|x| f32::from_bits(x.to_bits() & 0xffff_0000)).collect();
    assert_eq!(md.weights.get(name).unwrap().to_f32_vec(), want);
    // f16 1.0 and -2.0 where the norm gains are.
    let f16: Vec<Raw> = raw
        .iter()
        .map(|r| {
            let n = r.shape.iter().product::<usize>();
            let bytes = (0..n).flat_map(|j| if j % 2 == 0 { 0x3c00u16 } else { 0xc000 }.to_le_bytes()).collect();
            Raw { dtype: Dtype::F16, bytes, ..r.clone() }
        })
        .collect();
    let d2 = model_dir("f16", "llama_dense", |_| {}, &f16);
    let md = open(&d2).unwrap();
    assert_eq!(&md.weights.get("model.norm.weight").unwrap().to_f32_vec()[..4], &[1.0, -2.0, 1.0, -2.0]);
    // Kept in f16 (inference): its bits, half the bytes, the same values and logits. The
    // weights here are the fixture's rounded to f16 (the pattern above is no model).
    let f16: Vec<Raw> = raw
        .iter()
        .map(|r| {
            let bytes = r.values().iter().flat_map(|&x| half::f16::from_f32(x).to_bits().to_le_bytes()).collect();
            Raw { dtype: Dtype::F16, bytes, ..r.clone() }
        })
        .collect();
    std::fs::write(d2.join(files::SINGLE), serialize(&f16)).unwrap();
    let kept = open_kept(&d2);
    let w = kept.weights.get(name).unwrap();
    assert!(matches!(w.data(), crate::reference::tensor::Data::F16(_)));
    assert_eq!(w.to_f32_vec(), open(&d2).unwrap().weights.get(name).unwrap().to_f32_vec());
    kept.weights.preload();
    assert_eq!(kept.weights.decoded_bytes() * 2, kept.weights.total_bytes());
    same_logits(&logits(kept), &logits(open(&d2).unwrap()));
    for d in [d, d2] {
        let _ = std::fs::remove_dir_all(&d);
    }
}

/// FP8 bit patterns with small magnitudes (exponent field ≤ 3), never NaN.
fn fp8_bits(n: usize, salt: usize) -> Vec<u8> {
    (0..n).map(|k| (((k * 37 + salt * 11) % 256) as u8) & 0b1001_1111).collect()
}

/// A scale per block with a value that says which block it is.
fn block_scales(rows: usize, cols: usize) -> Vec<f32> {
    (0..rows * cols).map(|k| 0.5 + (k / cols) as f32 + 0.25 * (k % cols) as f32).collect()
}

#[test]
fn fp8_block_scaled_weights_dequantise_to_known_values() {
    // Blocks of 16×32 on [48, 128] and [128, 48] matrices: full and partial edge blocks.
    let block = [16usize, 32usize];
    let raw = read_raw(&golden("llama_dense").join(files::SINGLE));
    let mut out = Vec::new();
    let mut want: HashMap<String, Vec<f32>> = HashMap::new();
    for (k, r) in raw.iter().enumerate() {
        if r.shape.len() != 2 || r.name.contains("embed") || r.name.contains("lm_head") {
            out.push(r.clone());
            continue;
        }
        let (rows, cols) = (r.shape[0], r.shape[1]);
        let bits = fp8_bits(rows * cols, k);
        let ss = layout::scale_shape(&r.shape, block);
        let sc = block_scales(ss[0], ss[1]);
        let w: Vec<f32> =
            (0..rows * cols).map(|x| f8e4m3_to_f32(bits[x]) * sc[(x / cols / block[0]) * ss[1] + (x % cols) / block[1]]).collect();
        want.insert(r.name.clone(), w);
        out.push(Raw { dtype: Dtype::F8_E4M3, bytes: bits, ..r.clone() });
        out.push(Raw::f32(&format!("{}_scale_inv", r.name), &ss, &sc));
    }
    let d = model_dir(
        "fp8",
        "llama_dense",
        |c| c["quantization_config"] = serde_json::json!({"quant_method": "fp8", "weight_block_size": block}),
        &out,
    );
    let md = open(&d).unwrap();
    assert!(want.len() >= 15);
    for (name, w) in &want {
        assert_eq!(&md.weights.get(name).unwrap().to_f32_vec(), w, "{name}");
    }

    // The same model stored as the dequantised f32 values runs to the same logits.
    let deq: Vec<Raw> = raw
        .iter()
        .map(|r| match want.get(&r.name) {
            Some(w) => Raw::f32(&r.name, &r.shape, w),
            None => r.clone(),
        })
        .collect();
    let d2 = model_dir("fp8-deq", "llama_dense", |_| {}, &deq);
    let (a, b) = (logits(open(&d).unwrap()), logits(open(&d2).unwrap()));
    assert!(a.to_f32_vec().iter().all(|x| x.is_finite()));
    assert!(a == b, "FP8 and its dequantised f32 copy give different logits");
    // Kept in FP8 (inference): its bytes and scales, the same values, the same logits.
    let kept = open_kept(&d);
    for (name, w) in &want {
        let t = kept.weights.get(name).unwrap();
        assert!(matches!(t.data(), crate::reference::tensor::Data::F8(_)), "{name}");
        assert_eq!(&t.to_f32_vec(), w, "{name}");
    }
    same_logits(&logits(kept), &a);
    for d in [d, d2] {
        let _ = std::fs::remove_dir_all(&d);
    }
}

#[test]
fn fp8_experts_are_dequantised_then_stacked() {
    // DeepSeek-V3's 128×128 blocks on 16×48 experts: one partial block each.
    let raw = read_raw(&golden("deepseek_v3").join(files::SINGLE));
    let mut out = Vec::new();
    let mut want = Vec::new();
    for r in &raw {
        let is_gate = r.name.starts_with("model.layers.3.mlp.experts.") && r.name.ends_with(".gate_proj.weight");
        if r.name.ends_with("self_attn.kv_b_proj.weight") {
            // Absorbed MLA reshapes and slices kv_b in decode: FP8 there is widened once.
            let bits = fp8_bits(r.shape.iter().product(), 7);
            let ss = layout::scale_shape(&r.shape, [128, 128]);
            out.push(Raw { dtype: Dtype::F8_E4M3, bytes: bits, ..r.clone() });
            out.push(Raw::f32(&format!("{}_scale_inv", r.name), &ss, &vec![0.5; ss.iter().product()]));
            continue;
        }
        if !is_gate {
            out.push(r.clone());
            continue;
        }
        let e: usize = r.name.split('.').nth(5).unwrap().parse().unwrap();
        let bits = fp8_bits(16 * 48, e);
        let scale = 0.125 * (e + 1) as f32;
        want.push((e, bits.iter().map(|&b| f8e4m3_to_f32(b) * scale).collect::<Vec<f32>>()));
        out.push(Raw { dtype: Dtype::F8_E4M3, bytes: bits, ..r.clone() });
        out.push(Raw::f32(&format!("{}_scale_inv", r.name), &[1, 1], &[scale]));
    }
    want.sort_by_key(|p| p.0);
    let d = model_dir("fp8-experts", "deepseek_v3", |_| {}, &out);
    let md = open(&d).unwrap();
    let stacked = md.weights.get("model.layers.3.mlp.experts.gate_proj.weight").unwrap().to_f32_vec();
    assert_eq!(stacked, want.into_iter().flat_map(|p| p.1).collect::<Vec<f32>>());
    // Kept in FP8, stacked with each expert's scale: the same values, and the experts
    // (each a slice of the stack) give the logits of the widened stack.
    let kept = open_kept(&d);
    let t = kept.weights.get("model.layers.3.mlp.experts.gate_proj.weight").unwrap();
    assert!(matches!(t.data(), crate::reference::tensor::Data::F8(_)));
    assert_eq!(t.to_f32_vec(), stacked);
    let greedy = |md: ModelDir| {
        let b = crate::generate::ReferenceBackend::new(md.spec, md.weights, Default::default(), Default::default());
        let opts = crate::generate::GenerateOptions { max_new_tokens: 4, ..Default::default() };
        crate::generate::generate(&b, &[vec![3, 1, 4, 1, 5, 9]], &opts).unwrap().tokens
    };
    assert_eq!(greedy(open_kept(&d)), greedy(open(&d).unwrap()), "decode (absorbed MLA reads kv_b in FP8)");
    same_logits(&logits(kept), &logits(md));
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn dequantise_handles_partial_blocks() {
    // [130, 260] with 128×128 blocks: scales [2, 3].
    let (r, c) = (130usize, 260usize);
    let mut w = vec![1.0f32; r * c];
    let s = block_scales(2, 3);
    store::dequantise(&mut w, &[r, c], &s, &[2, 3], [128, 128]);
    assert_eq!(w[0], s[0]);
    assert_eq!(w[127 * c + 255], s[1]);
    assert_eq!(w[127 * c + 256], s[2]);
    assert_eq!(w[128 * c], s[3]);
    assert_eq!(w[129 * c + 259], s[5]);
}

#[test]
fn every_tensor_problem_is_listed_in_one_error() {
    let raw = read_raw(&golden("deepseek_v3").join(files::SINGLE));
    let mut out: Vec<Raw> = raw
        .iter()
        .filter(|r| r.name != "model.layers.0.self_attn.q_b_proj.weight" && r.name != "model.layers.2.mlp.experts.5.up_proj.weight")
        .cloned()
        .collect();
    for r in out.iter_mut() {
        match r.name.as_str() {
            // Mis-shaped: the right number of elements in the wrong shape counts too.
            "model.norm.weight" => r.shape = vec![1, 48],
            "model.layers.3.mlp.experts.0.down_proj.weight" => r.shape = vec![16, 48],
            // Not a float.
            "lm_head.weight" => r.dtype = Dtype::I32,
            _ => {}
        }
    }
    out.push(Raw::f32("model.layers.0.self_attn.bogus.weight", &[2], &[0.0, 1.0]));
    out.push(Raw::f32("model.layers.2.mlp.experts.12.up_proj.weight", &[16, 48], &[0.0; 16 * 48]));
    out.push(Raw::f32("model.layers.9.input_layernorm.weight", &[48], &[1.0; 48]));
    // A block scale whose weight is not there.
    out.push(Raw::f32("model.layers.0.mlp.nothing.weight_scale_inv", &[1, 1], &[1.0]));
    // FP8 without a scale.
    for r in out.iter_mut().filter(|r| r.name == "model.layers.1.mlp.up_proj.weight") {
        r.dtype = Dtype::F8_E4M3;
        r.bytes.truncate(r.bytes.len() / 4);
    }
    let d = model_dir("broken", "deepseek_v3", |_| {}, &out);
    let r = report(&d);
    let names = |v: &[(String, Vec<usize>)]| v.iter().map(|p| p.0.clone()).collect::<Vec<_>>();
    assert_eq!(
        names(&r.missing),
        [
            "model.layers.0.self_attn.q_b_proj.weight",
            "model.layers.1.mlp.up_proj.weight_scale_inv",
            "model.layers.2.mlp.experts.5.up_proj.weight",
        ]
    );
    assert_eq!(r.missing[0].1, vec![72, 40], "the expected shape");
    assert_eq!(
        names(&r.unexpected),
        [
            "model.layers.0.mlp.nothing.weight_scale_inv",
            "model.layers.0.self_attn.bogus.weight",
            "model.layers.2.mlp.experts.12.up_proj.weight",
            "model.layers.9.input_layernorm.weight",
        ]
    );
    assert_eq!(
        r.misshaped,
        vec![
            ("model.layers.3.mlp.experts.0.down_proj.weight".to_string(), vec![16, 48], vec![48, 16]),
            ("model.norm.weight".to_string(), vec![1, 48], vec![48]),
        ]
    );
    assert_eq!(r.invalid.len(), 1);
    assert!(r.invalid[0].0 == "lm_head.weight" && r.invalid[0].1.contains("I32"), "{:?}", r.invalid);
    let text = CheckpointError::Tensors(Box::new(r)).to_string();
    for want in ["missing (3)", "unexpected (4)", "mis-shaped (2)", "invalid (1)", "model.layers.2.mlp.experts.5.up_proj.weight [16, 48]"] {
        assert!(text.contains(want), "`{want}` not in:\n{text}");
    }

    // Nothing of a layer's experts: one line for all of them, in the hub's naming.
    let none: Vec<Raw> = raw.iter().filter(|r| !r.name.starts_with("model.layers.3.mlp.experts.")).cloned().collect();
    let d2 = model_dir("no-experts", "deepseek_v3", |_| {}, &none);
    let r = report(&d2);
    assert_eq!(
        names(&r.missing),
        [
            "model.layers.3.mlp.experts.{0..11}.down_proj.weight",
            "model.layers.3.mlp.experts.{0..11}.gate_proj.weight",
            "model.layers.3.mlp.experts.{0..11}.up_proj.weight",
        ]
    );
    for d in [d, d2] {
        let _ = std::fs::remove_dir_all(&d);
    }
}

#[test]
fn fp8_scale_problems_are_listed() {
    let raw = read_raw(&golden("llama_dense").join(files::SINGLE));
    let mut out: Vec<Raw> = raw.clone();
    for r in out.iter_mut().filter(|r| r.name.ends_with("mlp.down_proj.weight")) {
        r.dtype = Dtype::F8_E4M3;
        r.bytes = fp8_bits(48 * 128, 0);
    }
    // Layer 0's scale has the wrong shape, layer 1's the wrong type; layer 2 has none.
    out.push(Raw::f32("model.layers.0.mlp.down_proj.weight_scale_inv", &[2, 2], &[1.0; 4]));
    out.push(Raw { dtype: Dtype::I64, ..Raw::f32("model.layers.1.mlp.down_proj.weight_scale_inv", &[1, 2], &[1.0; 4]) });
    let d = model_dir("fp8-bad", "llama_dense", |_| {}, &out);
    let r = report(&d);
    assert_eq!(r.misshaped, vec![("model.layers.0.mlp.down_proj.weight_scale_inv".to_string(), vec![2, 2], vec![1, 1])]);
    assert_eq!(r.invalid.len(), 1);
    assert!(r.invalid[0].0 == "model.layers.1.mlp.down_proj.weight_scale_inv", "{:?}", r.invalid);
    assert_eq!(r.missing, vec![("model.layers.2.mlp.down_proj.weight_scale_inv".to_string(), vec![1, 1])]);
    assert!(r.unexpected.is_empty());
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn corrupt_and_truncated_files_are_errors() {
    let bytes = std::fs::read(golden("llama_gqa").join(files::SINGLE)).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("truncated", bytes[..bytes.len() - 100].to_vec(), "truncated"),
        ("appended", [&bytes[..], b"tail"].concat(), "truncated, or has bytes appended"),
        ("cut-in-header", bytes[..header_len / 2].to_vec(), "runs past the end of the file"),
        ("tiny", b"abc".to_vec(), "shorter than the 8-byte header length"),
        ("empty", Vec::new(), "shorter than the 8-byte header length"),
        ("garbage-header", [&8u64.to_le_bytes()[..], b"not json"].concat(), "invalid JSON in header"),
        ("huge-header", [&u64::MAX.to_le_bytes()[..], b"{}"].concat(), "header"),
        (
            "bad-offsets",
            {
                let h = br#"{"model.norm.weight":{"dtype":"F32","shape":[48],"data_offsets":[0,4096]}}"#;
                [&(h.len() as u64).to_le_bytes()[..], h, &[0u8; 192]].concat()
            },
            "invalid shape, data type, or offset",
        ),
        (
            // Two entries under one name: JSON parsers keep one silently.
            "duplicate-name",
            {
                let t = r#"{"dtype":"F32","shape":[48],"data_offsets":[0,192]}"#;
                let h = format!(r#"{{"model.norm.weight":{t},"model.norm.weight":{t}}}"#);
                [&(h.len() as u64).to_le_bytes()[..], h.as_bytes(), &[0u8; 192]].concat()
            },
            "names tensor `model.norm.weight` twice",
        ),
    ];
    for (name, content, want) in cases {
        let d = scratch(name);
        std::fs::copy(golden("llama_gqa").join("config.json"), d.join("config.json")).unwrap();
        std::fs::write(d.join(files::SINGLE), &content).unwrap();
        let e = open(&d).err().unwrap_or_else(|| panic!("{name}: opened"));
        assert!(matches!(e, CheckpointError::Corrupt { .. }), "{name}: {e}");
        assert!(e.to_string().contains(want), "{name}: `{want}` not in: {e}");
        let _ = std::fs::remove_dir_all(&d);
    }
}

#[test]
fn missing_files_and_bad_configs_are_errors() {
    let d = scratch("empty");
    let e = open(&d).err().unwrap();
    assert!(matches!(e, CheckpointError::Io { .. }) && e.to_string().contains("config.json"), "{e}");
    std::fs::copy(golden("llama_gqa").join("config.json"), d.join("config.json")).unwrap();
    std::fs::write(d.join("weights.safetensors"), b"").unwrap();
    let e = open(&d).err().unwrap().to_string();
    assert!(e.contains("no `model.safetensors`") && e.contains("weights.safetensors"), "{e}");
    std::fs::write(d.join("config.json"), r#"{"model_type": "gpt2"}"#).unwrap();
    let e = open(&d).err().unwrap();
    assert!(matches!(e, CheckpointError::Config { .. }) && e.to_string().contains("gpt2"), "{e}");
    std::fs::write(d.join("config.json"), "{").unwrap();
    assert!(matches!(open(&d).err().unwrap(), CheckpointError::Config { .. }));
    let bad_block = model_dir(
        "bad-block",
        "llama_gqa",
        |c| c["quantization_config"] = serde_json::json!({"quant_method": "fp8", "weight_block_size": [0, 128]}),
        &[],
    );
    let e = open(&bad_block).err().unwrap().to_string();
    assert!(e.contains("weight_block_size"), "{e}");
    for d in [d, bad_block] {
        let _ = std::fs::remove_dir_all(&d);
    }
}

#[test]
fn spec_file_replaces_the_config() {
    let d = scratch("with-spec");
    for f in [files::SINGLE, "generation_config.json"] {
        std::fs::copy(golden("llama_gqa").join(f), d.join(f)).unwrap();
    }
    let model = dsc_dsl::import::import_hf_config_file(&golden("llama_gqa").join("config.json"), Some("gqa")).unwrap();
    let spec = d.join("gqa.dsc");
    std::fs::write(&spec, dsc_dsl::print::print_model(&model)).unwrap();
    let md = ModelDir::open(&d, &OpenOptions { spec: Some(spec.clone()), ..OpenOptions::default() }).unwrap();
    assert_eq!(md.spec.model.name, "gqa");
    assert_eq!(md.generation.eos, vec![1]);
    // A spec of another model: its tensors do not fit.
    let other = dsc_dsl::import::import_hf_config_file(&golden("llama_dense").join("config.json"), Some("dense")).unwrap();
    std::fs::write(&spec, dsc_dsl::print::print_model(&other)).unwrap();
    let r = match ModelDir::open(&d, &OpenOptions { spec: Some(spec), ..OpenOptions::default() }) {
        Err(CheckpointError::Tensors(r)) => *r,
        _ => panic!("expected a tensor report"),
    };
    assert!(!r.misshaped.is_empty());
    let _ = std::fs::remove_dir_all(&d);
}

/// DeepSeek-V3's MTP layer sits at `model.layers.{num_hidden_layers}` with its own copies
/// of the embedding and head: accepted (and checked) when the spec has `mtp`, optional
/// for inference, unexpected when it has none.
#[test]
fn mtp_layer_is_checked_and_optional() {
    let mtp = |c: &mut Value| c["num_nextn_predict_layers"] = serde_json::json!(1);
    let raw = read_raw(&golden("deepseek_v3").join(files::SINGLE));
    let d = model_dir("mtp-none", "deepseek_v3", mtp, &raw);
    let md = open(&d).unwrap();
    assert!(md.spec.model.mtp.is_some());
    assert!(!md.weights.names().iter().any(|n| n.starts_with("model.layers.4.")), "absent, and not required");

    // The MTP tensors in the hub's layout: per-expert, plus the embedding and head copies.
    let expected = expected_params(&md.spec).unwrap();
    let mut with = raw.clone();
    for (name, e) in expected.iter().filter(|(n, _)| n.starts_with("model.layers.4.")) {
        assert!(!e.required, "{name} is train-only");
        if e.shape.len() == 3 && name.contains(".experts.") {
            for x in 0..e.shape[0] {
                let n = name.replace(".experts.", &format!(".experts.{x}."));
                with.push(Raw::f32(&n, &e.shape[1..], &vec![0.5; e.shape[1] * e.shape[2]]));
            }
        } else {
            with.push(Raw::f32(name, &e.shape, &vec![0.5; e.shape.iter().product()]));
        }
    }
    with.push(Raw::f32("model.layers.4.embed_tokens.weight", &[256, 48], &[0.0; 256 * 48]));
    with.push(Raw::f32("model.layers.4.shared_head.head.weight", &[256, 48], &[0.0; 256 * 48]));
    let d2 = model_dir("mtp-full", "deepseek_v3", mtp, &with);
    let md = open(&d2).unwrap();
    for n in [
        "model.layers.4.eh_proj.weight",
        "model.layers.4.enorm.weight",
        "model.layers.4.hnorm.weight",
        "model.layers.4.shared_head.norm.weight",
    ] {
        assert!(md.weights.get(n).is_some(), "{n}");
    }
    assert_eq!(md.weights.get("model.layers.4.mlp.experts.gate_proj.weight").unwrap().shape(), &[12, 16, 48]);

    // Without `mtp` in the spec the same tensors are unexpected.
    std::fs::copy(golden("deepseek_v3").join("config.json"), d2.join("config.json")).unwrap();
    let r = report(&d2);
    assert!(r.unexpected.iter().any(|(n, _)| n == "model.layers.4.eh_proj.weight"));
    assert!(r.unexpected.iter().any(|(n, _)| n == "model.layers.4.embed_tokens.weight"));
    for d in [d, d2] {
        let _ = std::fs::remove_dir_all(&d);
    }
}

#[test]
fn ignorable_tensors_are_skipped() {
    let mut raw = read_raw(&golden("llama_dense").join(files::SINGLE));
    raw.push(Raw::f32("model.layers.0.self_attn.rotary_emb.inv_freq", &[8], &[1.0; 8]));
    let d = model_dir("inv-freq", "llama_dense", |_| {}, &raw);
    let md = open(&d).unwrap();
    assert!(!md.weights.names().iter().any(|n| n.contains("inv_freq")));
    let _ = std::fs::remove_dir_all(&d);
}

/// `generation_config.json` with an unusable special-token value: `config.json`'s is used,
/// and a warning names the file and the value; an absent key falls back silently.
#[test]
fn malformed_generation_config_falls_back_to_config_json() {
    let tensors = read_raw(&golden("llama_gqa").join(files::SINGLE));
    let cases: [(&str, serde_json::Value, Vec<i64>, Option<&str>); 5] = [
        ("string", serde_json::json!({"eos_token_id": "5"}), vec![7], Some("`eos_token_id` is \"5\"")),
        ("float", serde_json::json!({"eos_token_id": 2.5}), vec![7], Some("`eos_token_id` is 2.5")),
        ("mixed-list", serde_json::json!({"eos_token_id": [3, "x"]}), vec![7], Some("[3,\"x\"]")),
        ("absent", serde_json::json!({"bos_token_id": 0}), vec![7], None),
        ("list", serde_json::json!({"eos_token_id": [3, 4]}), vec![3, 4], None),
    ];
    for (name, gen, eos, warning) in cases {
        let d = model_dir(&format!("gen-{name}"), "llama_gqa", |c| c["eos_token_id"] = 7.into(), &tensors);
        std::fs::write(d.join("generation_config.json"), gen.to_string()).unwrap();
        let md = open(&d).unwrap();
        assert_eq!(md.generation.eos, eos, "{name}");
        match warning {
            Some(w) => {
                assert_eq!(md.generation.warnings.len(), 1, "{name}: {:?}", md.generation.warnings);
                let got = &md.generation.warnings[0];
                assert!(got.contains("generation_config.json") && got.contains(w), "{name}: {got}");
            }
            None => assert!(md.generation.warnings.is_empty(), "{name}: {:?}", md.generation.warnings),
        }
        let _ = std::fs::remove_dir_all(&d);
    }
}

/// A checkpoint truncated while it is mapped cannot be read (SIGBUS), but the process
/// says which file before it dies. Run in a child process (this test binary re-run on
/// this one test), since the parent must survive to check what the child printed.
#[cfg(unix)]
#[test]
fn truncated_while_mapped_names_the_file() {
    use std::os::unix::process::ExitStatusExt;
    const CHILD: &str = "DSC_SIGBUS_CHILD";
    if let Some(path) = std::env::var_os(CHILD) {
        let shard = files::Shard::open(Path::new(&path)).unwrap();
        let info = shard.tensors.values().max_by_key(|t| t.data_offsets.1).unwrap().clone();
        std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(0).unwrap();
        let sum: u64 = shard.bytes(&info).iter().map(|&b| b as u64).sum();
        panic!("read {sum} from a truncated mapping without SIGBUS");
    }
    let d = scratch("sigbus");
    let file = d.join("model.safetensors");
    // Several pages, so the tensor's bytes lie past the first page the kernel keeps.
    std::fs::write(&file, serialize(&[Raw::f32("w", &[4096, 4], &vec![1.0; 4096 * 4])])).unwrap();
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "checkpoint::tests::truncated_while_mapped_names_the_file", "--nocapture", "--test-threads", "1"])
        .env(CHILD, &file)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.signal(), Some(libc::SIGBUS), "{:?}: {stderr}", out.status);
    assert!(stderr.contains(&format!("`{}` changed while dsc had it mapped", file.display())), "{stderr}");
    std::fs::remove_dir_all(&d).unwrap();
}
