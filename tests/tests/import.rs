//! `dsc import`: Hugging Face `config.json` → `Model`.
//!
//! Against the transformers fixtures in `golden/hf/`: both config layouts give the same
//! model, its parameter count is the number of elements in the checkpoint, and it matches
//! the hand-written tiny spec of the same dimensions. Against the published DeepSeek
//! configs (architecture keys inlined below): the import matches `specs/`. And the errors
//! name the key at fault.

use dsc_dsl::import::import_hf_config;
use dsc_dsl::model::*;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The fixture directories; the five of the README must all be there.
fn fixtures() -> Vec<PathBuf> {
    let dir = root().join("golden/hf");
    let mut out: Vec<PathBuf> =
        std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).filter(|p| p.join("config.json").is_file()).collect();
    out.sort();
    let names: Vec<String> = out.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
    for want in ["deepseek_v2", "deepseek_v2_lite", "deepseek_v3", "llama_dense", "llama_gqa"] {
        assert!(names.iter().any(|n| n == want), "fixture {want} missing from {}", dir.display());
    }
    out
}

fn import_file(path: &Path, name: &str) -> Model {
    let text = std::fs::read_to_string(path).unwrap();
    import_hf_config(&text, name).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Elements in a safetensors file, from its header.
fn checkpoint_elements(path: &Path) -> u64 {
    let bytes = std::fs::read(path).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    meta.tensors().values().map(|t| t.shape.iter().product::<usize>() as u64).sum()
}

#[test]
fn fixtures_import_identically_from_both_layouts() {
    for dir in fixtures() {
        let name = dir.file_name().unwrap().to_str().unwrap().to_string();
        let new = import_file(&dir.join("config.json"), &name);
        let legacy = import_file(&dir.join("config_legacy.json"), &name);
        assert_eq!(new, legacy, "{name}: config.json and config_legacy.json disagree");
    }
}

#[test]
fn fixture_parameter_counts_match_their_checkpoints() {
    for dir in fixtures() {
        let name = dir.file_name().unwrap().to_str().unwrap().to_string();
        let model = import_file(&dir.join("config.json"), &name);
        let stats = dsc_compiler::stats::stats(&model, 4096);
        let elements = checkpoint_elements(&dir.join("model.safetensors"));
        assert_eq!(stats.params.total, elements as u128, "{name}: stats count vs model.safetensors elements");
    }
}

#[test]
fn imported_models_print_and_resolve_back() {
    for dir in fixtures() {
        let name = dir.file_name().unwrap().to_str().unwrap().to_string();
        let model = import_file(&dir.join("config_legacy.json"), &name);
        let text = dsc_dsl::print::print_model(&model);
        let back =
            dsc_dsl::load_str(Path::new("imported.dsc"), &text, None).unwrap_or_else(|f| panic!("{name}:\n{}\n{text}", f.render())).model;
        assert_eq!(back, model, "{name}:\n{text}");
    }
}

/// Clears what a config cannot know (the name; training-only balance settings; MTP, which
/// transformers drops) so that forward-pass semantics can be compared.
fn forward_only(mut m: Model) -> Model {
    m.name = String::new();
    m.mtp = None;
    for b in &mut m.ffn {
        if let Ffn::Moe(moe) = &mut b.kind {
            moe.balance = Balance { expert_aux: 0.0, device_aux: 0.0, comm_aux: 0.0, sequence_aux: 0.0, bias_update_speed: 0.0 };
        }
    }
    m
}

fn spec(rel: &str) -> Model {
    let path = root().join(rel);
    dsc_dsl::load(&path, None).unwrap_or_else(|f| panic!("{rel}:\n{}", f.render())).model
}

#[test]
fn fixtures_match_the_tiny_specs() {
    for (fixture, tiny) in [
        ("llama_dense", "specs/tiny/tiny_llama.dsc"),
        ("llama_gqa", "specs/tiny/tiny_llama_gqa.dsc"),
        ("deepseek_v2", "specs/tiny/tiny_v2.dsc"),
        ("deepseek_v2_lite", "specs/tiny/tiny_v2_lite.dsc"),
        ("deepseek_v3", "specs/tiny/tiny_v3.dsc"),
    ] {
        let imported = import_file(&root().join("golden/hf").join(fixture).join("config.json"), fixture);
        assert_eq!(forward_only(imported), forward_only(spec(tiny)), "{fixture} vs {tiny}");
    }
}

/// The architecture keys of deepseek-ai/DeepSeek-V3's config.json (legacy layout).
const DEEPSEEK_V3: &str = r#"{
  "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
  "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
  "num_hidden_layers": 61, "num_nextn_predict_layers": 1, "num_attention_heads": 128, "num_key_value_heads": 128,
  "n_shared_experts": 1, "n_routed_experts": 256, "ep_size": 1, "routed_scaling_factor": 2.5,
  "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128,
  "topk_method": "noaux_tc", "n_group": 8, "topk_group": 4, "num_experts_per_tok": 8, "moe_layer_freq": 1,
  "first_k_dense_replace": 3, "norm_topk_prob": true, "scoring_func": "sigmoid", "aux_loss_alpha": 0.001,
  "seq_aux": true, "hidden_act": "silu", "max_position_embeddings": 163840, "rms_norm_eps": 1e-06,
  "tie_word_embeddings": false, "rope_theta": 10000, "attention_bias": false, "attention_dropout": 0.0,
  "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                   "original_max_position_embeddings": 4096, "type": "yarn"},
  "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]},
  "torch_dtype": "bfloat16"
}"#;

/// The architecture keys of deepseek-ai/DeepSeek-V2's config.json.
const DEEPSEEK_V2: &str = r#"{
  "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2",
  "vocab_size": 102400, "hidden_size": 5120, "intermediate_size": 12288, "moe_intermediate_size": 1536,
  "num_hidden_layers": 60, "num_attention_heads": 128, "num_key_value_heads": 128,
  "n_shared_experts": 2, "n_routed_experts": 160, "routed_scaling_factor": 16.0,
  "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128,
  "topk_method": "group_limited_greedy", "n_group": 8, "topk_group": 3, "num_experts_per_tok": 6,
  "moe_layer_freq": 1, "first_k_dense_replace": 1, "norm_topk_prob": false, "scoring_func": "softmax",
  "aux_loss_alpha": 0.001, "seq_aux": true, "hidden_act": "silu", "max_position_embeddings": 163840,
  "rms_norm_eps": 1e-06, "tie_word_embeddings": false, "rope_theta": 10000, "attention_bias": false,
  "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                   "original_max_position_embeddings": 4096, "type": "yarn"},
  "torch_dtype": "bfloat16"
}"#;

/// DeepSeek-V2-Lite differs from V2 in these keys.
fn deepseek_v2_lite() -> String {
    let mut v: serde_json::Value = serde_json::from_str(DEEPSEEK_V2).unwrap();
    let o = v.as_object_mut().unwrap();
    for (k, x) in [
        ("hidden_size", serde_json::json!(2048)),
        ("num_hidden_layers", serde_json::json!(27)),
        ("num_attention_heads", serde_json::json!(16)),
        ("num_key_value_heads", serde_json::json!(16)),
        ("q_lora_rank", serde_json::Value::Null),
        ("intermediate_size", serde_json::json!(10944)),
        ("moe_intermediate_size", serde_json::json!(1408)),
        ("n_routed_experts", serde_json::json!(64)),
        ("topk_method", serde_json::json!("greedy")),
        ("n_group", serde_json::json!(1)),
        ("topk_group", serde_json::json!(1)),
        ("routed_scaling_factor", serde_json::json!(1.0)),
    ] {
        o.insert(k.to_string(), x);
    }
    v.to_string()
}

#[test]
fn published_configs_match_the_specs() {
    let v3 = import_hf_config(DEEPSEEK_V3, "deepseek_v3").unwrap();
    assert_eq!(v3.dtype, DType::Fp8, "the published V3 weights are fp8");
    assert_eq!(v3.mtp, spec("specs/deepseek_v3.dsc").mtp);
    let mut bf16 = v3.clone();
    bf16.dtype = DType::Bf16;
    assert_eq!(forward_only(bf16), forward_only(spec("specs/deepseek_v3.dsc")));

    let v2 = import_hf_config(DEEPSEEK_V2, "deepseek_v2").unwrap();
    assert_eq!(forward_only(v2), forward_only(spec("specs/deepseek_v2.dsc")));

    let lite = import_hf_config(&deepseek_v2_lite(), "deepseek_v2_lite").unwrap();
    assert_eq!(forward_only(lite), forward_only(spec("specs/deepseek_v2_lite.dsc")));

    // For the softmax families aux_loss_alpha is the expert-level balance loss (alpha_1,
    // averaged per sequence); for V3 it is the sequence-wise balance loss.
    let Ffn::Moe(moe) = &import_hf_config(DEEPSEEK_V2, "v2").unwrap().ffn[1].kind else { panic!() };
    assert_eq!(moe.balance.expert_aux, 0.001);
    assert_eq!(moe.balance.sequence_aux, 0.0);
}

/// DeepSeekMoE 16B (remote code, model_type `deepseek`): the architecture keys of its config.
const DEEPSEEK_MOE_16B: &str = r#"{
  "model_type": "deepseek", "vocab_size": 102400, "hidden_size": 2048, "intermediate_size": 10944,
  "moe_intermediate_size": 1408, "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 16,
  "n_shared_experts": 2, "n_routed_experts": 64, "num_experts_per_tok": 6, "moe_layer_freq": 1,
  "first_k_dense_replace": 1, "norm_topk_prob": false, "scoring_func": "softmax", "aux_loss_alpha": 0.001,
  "seq_aux": true, "hidden_act": "silu", "max_position_embeddings": 4096, "rms_norm_eps": 1e-06,
  "rope_theta": 10000, "rope_scaling": null, "tie_word_embeddings": false, "torch_dtype": "bfloat16"
}"#;

/// deepseek-ai/deepseek-llm-7b-base's config.json (LlamaForCausalLM).
const DEEPSEEK_LLM_7B: &str = r#"{
  "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 102400, "hidden_size": 4096,
  "intermediate_size": 11008, "num_hidden_layers": 30, "num_attention_heads": 32, "num_key_value_heads": 32,
  "hidden_act": "silu", "max_position_embeddings": 4096, "rms_norm_eps": 1e-06, "rope_scaling": null,
  "rope_theta": 10000.0, "tie_word_embeddings": false, "pretraining_tp": 1, "torch_dtype": "bfloat16"
}"#;

#[test]
fn published_dense_and_moe_configs_match_the_specs() {
    let llm7 = import_hf_config(DEEPSEEK_LLM_7B, "deepseek_llm_7b").unwrap();
    assert_eq!(forward_only(llm7), forward_only(spec("specs/deepseek_llm_7b.dsc")));
    // 67B: wider, deeper, 8 KV heads.
    let mut v: serde_json::Value = serde_json::from_str(DEEPSEEK_LLM_7B).unwrap();
    for (k, x) in [
        ("hidden_size", 8192),
        ("intermediate_size", 22016),
        ("num_hidden_layers", 95),
        ("num_attention_heads", 64),
        ("num_key_value_heads", 8),
    ] {
        v[k] = x.into();
    }
    let llm67 = import_hf_config(&v.to_string(), "deepseek_llm_67b").unwrap();
    assert_eq!(forward_only(llm67), forward_only(spec("specs/deepseek_llm_67b.dsc")));

    let moe = import_hf_config(DEEPSEEK_MOE_16B, "deepseek_moe_16b").unwrap();
    assert_eq!(forward_only(moe), forward_only(spec("specs/deepseek_moe_16b.dsc")));
}

#[test]
fn deepseek_moe_maps_to_softmax_top_k_with_half_split_rope() {
    let m = import_hf_config(DEEPSEEK_MOE_16B, "deepseek_moe_16b").unwrap();
    assert_eq!(m.rope, Rope { theta: 10000.0, layout: RopeLayout::HalfSplit, yarn: None });
    assert_eq!(m.attention, Attention::Gqa(Gqa { heads: 16, kv_heads: 16, head_dim: 128 }));
    assert_eq!(m.ffn.len(), 2);
    assert_eq!(m.ffn[0].layers, LayerSet { ranges: vec![LayerRange { start: 0, end: 1, step: 1 }] });
    assert_eq!(m.ffn[1].layers, LayerSet { ranges: vec![LayerRange { start: 1, end: 28, step: 1 }] });
    let Ffn::Moe(moe) = &m.ffn[1].kind else { panic!("layer 1.. is MoE") };
    assert_eq!((moe.routed_experts, moe.shared_experts, moe.expert_intermediate), (64, 2, 1408));
    let r = &moe.router;
    assert_eq!(
        (r.top_k, r.scoring, r.selection_bias, r.groups, r.normalize, r.scale),
        (6, Scoring::Softmax, false, 1, Normalize::Never, 1.0)
    );

    // norm_topk_prob in DeepSeekMoE's gate only acts when top_k > 1.
    let normed = DEEPSEEK_MOE_16B.replace(r#""norm_topk_prob": false"#, r#""norm_topk_prob": true"#);
    let Ffn::Moe(moe) = &import_hf_config(&normed, "m").unwrap().ffn[1].kind else { panic!() };
    assert_eq!(moe.router.normalize, Normalize::TopKGt1);
}

/// Edits one fixture config: `f` changes the JSON object.
fn edited(fixture: &str, f: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) -> String {
    let text = std::fs::read_to_string(root().join("golden/hf").join(fixture).join("config_legacy.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    f(v.as_object_mut().unwrap());
    v.to_string()
}

#[test]
fn moe_layer_frequency_gives_stepped_layer_sets() {
    // DeepSeek's rule: MoE iff i >= first_k_dense_replace and i % moe_layer_freq == 0.
    let text = edited("deepseek_v2", |o| {
        o.insert("num_hidden_layers".into(), 9.into());
        o.insert("first_k_dense_replace".into(), 3.into());
        o.insert("moe_layer_freq".into(), 2.into());
    });
    let m = import_hf_config(&text, "freq").unwrap();
    let moe_layers: Vec<u64> = (0..9).filter(|l| matches!(m.ffn_for_layer(*l), Ffn::Moe(_))).collect();
    assert_eq!(moe_layers, [4, 6, 8]);
    let printed = dsc_dsl::print::print_model(&m);
    assert!(printed.contains("layers = [0..4, 5..9 step 2]"), "{printed}");
    assert!(printed.contains("layers = 4..9 step 2"), "{printed}");

    // No routed experts: dense throughout, and `moe_intermediate_size` is not needed.
    let dense = edited("deepseek_v2", |o| {
        o.insert("n_routed_experts".into(), serde_json::Value::Null);
        o.remove("moe_intermediate_size");
    });
    let m = import_hf_config(&dense, "dense").unwrap();
    assert_eq!(m.ffn.len(), 1);
    assert!(matches!(m.ffn[0].kind, Ffn::Dense { intermediate: 80 }));
}

#[test]
fn v3_options_map_as_transformers_computes_them() {
    // rope_interleave = false: the weights are already in rotate_half order.
    let text = edited("deepseek_v3", |o| {
        o.insert("rope_interleave".into(), false.into());
    });
    assert_eq!(import_hf_config(&text, "v3").unwrap().rope.layout, RopeLayout::HalfSplit);

    // norm_topk_prob = false, and a scoring_func that transformers' V3 ignores (sigmoid).
    let text = edited("deepseek_v3", |o| {
        o.insert("norm_topk_prob".into(), false.into());
        o.insert("scoring_func".into(), "softmax".into());
    });
    let Ffn::Moe(moe) = &import_hf_config(&text, "v3").unwrap().ffn[1].kind else { panic!() };
    assert_eq!((moe.router.normalize, moe.router.scoring), (Normalize::Never, Scoring::Sigmoid));
    assert!(moe.router.selection_bias && moe.router.scale_normalized);

    // MTP layers are built like layer `num_hidden_layers`: MoE here.
    let text = edited("deepseek_v3", |o| {
        o.insert("num_nextn_predict_layers".into(), 1.into());
    });
    let m = import_hf_config(&text, "v3").unwrap();
    let mtp = m.mtp.clone().expect("mtp");
    assert_eq!((mtp.depth, mtp.loss_weight, mtp.concat), (1, 0.3, [MtpInput::Embedding, MtpInput::Hidden]));
    assert!(matches!(m.ffn[mtp.ffn].kind, Ffn::Moe(_)));
}

#[test]
fn yarn_mscale_follows_transformers_when_keys_are_missing() {
    let yarn = |edit: &dyn Fn(&mut serde_json::Map<String, serde_json::Value>)| {
        let text = edited("deepseek_v2", |o| edit(o.get_mut("rope_scaling").unwrap().as_object_mut().unwrap()));
        import_hf_config(&text, "y").unwrap().rope.yarn.unwrap()
    };
    // Neither: cos/sin times mscale(s, 1), softmax unchanged.
    let y = yarn(&|r| {
        r.remove("mscale");
        r.remove("mscale_all_dim");
    });
    assert_eq!((y.mscale, y.mscale_all_dim), (1.0, 0.0));
    // Only mscale: transformers falls back to mscale(s, 1) for cos/sin.
    let y = yarn(&|r| {
        r.remove("mscale_all_dim");
        r.insert("mscale".into(), 0.5.into());
    });
    assert_eq!((y.mscale, y.mscale_all_dim), (1.0, 0.0));
    // Only mscale_all_dim: cos/sin times mscale(s, 1), softmax times mscale(s, d)^2; the
    // model's ratio mscale(s, m) / mscale(s, d) must then equal mscale(s, 1).
    let y = yarn(&|r| {
        r.remove("mscale");
    });
    assert_eq!(y.mscale_all_dim, 0.707);
    let ratio = yarn_mscale(y.factor, y.mscale) / yarn_mscale(y.factor, y.mscale_all_dim);
    assert!((ratio - yarn_mscale(y.factor, 1.0)).abs() < 1e-12, "{ratio}");
    // Betas default to 32 / 1 (and 0 counts as absent, as in `x or 32`).
    let y = yarn(&|r| {
        r.remove("beta_fast");
        r.insert("beta_slow".into(), 0.into());
    });
    assert_eq!((y.beta_fast, y.beta_slow), (32.0, 1.0));
}

#[test]
fn llama_yarn_has_no_softmax_term() {
    // Llama's attention never multiplies the softmax scale, so the cos/sin factor must
    // come from mscale alone.
    let text = edited("llama_dense", |o| {
        o.insert(
            "rope_scaling".into(),
            serde_json::json!({"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "mscale": 1.0, "mscale_all_dim": 0.5}),
        );
    });
    let y = import_hf_config(&text, "l").unwrap().rope.yarn.unwrap();
    assert_eq!(y.mscale_all_dim, 0.0);
    let want = yarn_mscale(4.0, 1.0) / yarn_mscale(4.0, 0.5);
    assert!((yarn_mscale(4.0, y.mscale) - want).abs() < 1e-12);
}

fn err(json: &str) -> String {
    match import_hf_config(json, "e") {
        Ok(m) => panic!("expected an error, imported {m:?}"),
        Err(e) => e,
    }
}

#[test]
fn errors_name_the_key_at_fault() {
    let e = err(&edited("llama_dense", |o| {
        o.insert("model_type".into(), "mistral".into());
    }));
    assert!(e.contains("model_type") && e.contains("mistral"), "{e}");

    let e = err(&edited("deepseek_v3", |o| {
        o.remove("hidden_size");
    }));
    assert!(e.contains("missing required key `hidden_size`"), "{e}");

    let e = err(&edited("llama_gqa", |o| {
        o.insert("rope_scaling".into(), serde_json::json!({"type": "linear", "factor": 2.0}));
    }));
    assert!(e.contains("rope_scaling.type") && e.contains("linear"), "{e}");
    let e = err(&edited("deepseek_v2", |o| {
        o.get_mut("rope_scaling").unwrap().as_object_mut().unwrap().insert("type".into(), "dynamic".into());
    }));
    assert!(e.contains("dynamic"), "{e}");
    let e = err(&std::fs::read_to_string(root().join("golden/hf/deepseek_v2/config.json"))
        .unwrap()
        .replace(r#""rope_type": "yarn""#, r#""rope_type": "longrope""#));
    assert!(e.contains("rope_parameters.rope_type") && e.contains("contradicts"), "{e}");
    let e = err(&std::fs::read_to_string(root().join("golden/hf/llama_gqa/config.json"))
        .unwrap()
        .replace(r#""rope_type": "default""#, r#""rope_type": "llama3", "factor": 8.0"#));
    assert!(e.contains("`rope_parameters.rope_type` = \"llama3\" is not supported"), "{e}");
    let e = err(&DEEPSEEK_MOE_16B.replace(
        r#""rope_scaling": null"#,
        r#""rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024}"#,
    ));
    assert!(e.contains("rope_scaling.type") && e.contains("deepseek"), "{e}");

    let e = err(&edited("llama_dense", |o| {
        o.insert("hidden_size".into(), "48".into());
    }));
    assert!(e.contains("`hidden_size` must be a non-negative integer") && e.contains("string"), "{e}");
    let e = err(&edited("llama_dense", |o| {
        o.insert("num_hidden_layers".into(), 3.5.into());
    }));
    assert!(e.contains("num_hidden_layers"), "{e}");
    let e = err(&edited("deepseek_v3", |o| {
        o.insert("norm_topk_prob".into(), "yes".into());
    }));
    assert!(e.contains("norm_topk_prob") && e.contains("true or false"), "{e}");

    let e = err(&edited("deepseek_v2_lite", |o| {
        o.remove("q_lora_rank");
    }));
    assert!(e.contains("q_lora_rank"), "{e}");
    let e = err(&edited("deepseek_v2", |o| {
        o.insert("topk_method".into(), "noaux_tc".into());
    }));
    assert!(e.contains("topk_method"), "{e}");
    let e = err(&edited("deepseek_v2", |o| {
        o.remove("topk_group");
    }));
    assert!(e.contains("topk_group"), "{e}");
    let e = err(&edited("llama_dense", |o| {
        o.insert("attention_bias".into(), true.into());
    }));
    assert!(e.contains("attention_bias"), "{e}");
    let e = err(&edited("llama_gqa", |o| {
        o.insert("num_key_value_heads".into(), 3.into());
    }));
    assert!(e.contains("num_key_value_heads"), "{e}");

    assert!(err("[1, 2]").contains("one JSON object"));
    assert!(err("{").contains("not valid JSON"));
    assert!(import_hf_config(&edited("llama_dense", |_| {}), "not an ident").unwrap_err().contains("model name"));
}
