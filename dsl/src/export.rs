//! Export of a [`Model`] as a Hugging Face `config.json`: the inverse of [`crate::import`].
//!
//! Three `model_type`s, chosen by what the model uses: `llama` (grouped-query attention,
//! dense, half-split RoPE), `deepseek_v2` (MLA with softmax routing, interleaved RoPE)
//! and `deepseek_v3` (MLA with sigmoid routing and a selection bias, or MTP, or
//! half-split RoPE). Every field is written so that [`crate::import::import_hf_config`]
//! gives the model back; a model no such config can describe (a combination the
//! modeling code does not have) is an error naming the field.
//!
//! Training-only settings a config has no key for (`balance` except its first loss
//! weight, and `mtp.loss_weight`/`concat`) do not change the function the weights
//! compute; they are listed in [`Export::dropped`] so a caller can keep them elsewhere.

use crate::model::*;
use serde_json::{json, Map, Value};

/// A config and what it could not hold.
#[derive(Debug, Clone, PartialEq)]
pub struct Export {
    pub config: Value,
    /// Training-only settings left out, as `field = value` in the spec's words.
    pub dropped: Vec<String>,
}

/// `max_position_embeddings` when the model does not say (only YaRN reads it, and then
/// it is the extended context).
pub const DEFAULT_MAX_POSITIONS: u64 = 4096;

/// The Hugging Face config of `m`.
pub fn export_hf_config(m: &Model) -> Result<Export, String> {
    let mut c = Map::new();
    let mut dropped = Vec::new();
    let moe = m.ffn.iter().find_map(|b| match &b.kind {
        Ffn::Moe(x) => Some((b, x)),
        Ffn::Dense { .. } => None,
    });
    let dense = m.ffn.iter().find_map(|b| match b.kind {
        Ffn::Dense { intermediate } => Some(intermediate),
        Ffn::Moe(_) => None,
    });
    let model_type = match &m.attention {
        Attention::Gqa(_) if moe.is_some() => {
            return Err("a grouped-query attention model with MoE layers has no exporter (DeepSeekMoE's `deepseek` model type is remote code): use MLA, or dense layers".into())
        }
        Attention::Gqa(_) => "llama",
        Attention::Mla(_) => {
            let sigmoid = moe.is_some_and(|(_, x)| x.router.scoring == Scoring::Sigmoid);
            if sigmoid || m.mtp.is_some() || m.rope.layout == RopeLayout::HalfSplit {
                "deepseek_v3"
            } else {
                "deepseek_v2"
            }
        }
    };
    let arch = match model_type {
        "llama" => "LlamaForCausalLM",
        "deepseek_v2" => "DeepseekV2ForCausalLM",
        _ => "DeepseekV3ForCausalLM",
    };
    c.insert("architectures".into(), json!([arch]));
    c.insert("model_type".into(), json!(model_type));
    c.insert("vocab_size".into(), json!(m.vocab));
    c.insert("hidden_size".into(), json!(m.hidden));
    c.insert("num_hidden_layers".into(), json!(m.layers));
    c.insert("rms_norm_eps".into(), json!(m.norm_eps));
    c.insert("tie_word_embeddings".into(), json!(m.tie_embeddings));
    c.insert("hidden_act".into(), json!("silu"));
    c.insert("attention_bias".into(), json!(false));
    match m.dtype {
        DType::F32 => c.insert("torch_dtype".into(), json!("float32")),
        DType::Bf16 => c.insert("torch_dtype".into(), json!("bfloat16")),
        DType::F16 => c.insert("torch_dtype".into(), json!("float16")),
        DType::Fp8 => c.insert(
            "quantization_config".into(),
            json!({"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3", "weight_block_size": [128, 128]}),
        ),
    };

    match &m.attention {
        Attention::Gqa(a) => {
            c.insert("num_attention_heads".into(), json!(a.heads));
            c.insert("num_key_value_heads".into(), json!(a.kv_heads));
            c.insert("head_dim".into(), json!(a.head_dim));
            c.insert("mlp_bias".into(), json!(false));
        }
        Attention::Mla(a) => {
            if a.latent_norm_eps != 1e-6 {
                return Err(format!(
                    "`attention mla {{ latent_norm_eps = {} }}`: the DeepSeek modeling code fixes it at 1e-6",
                    a.latent_norm_eps
                ));
            }
            c.insert("num_attention_heads".into(), json!(a.heads));
            c.insert("num_key_value_heads".into(), json!(a.heads));
            c.insert("q_lora_rank".into(), json!(a.q_lora_rank));
            c.insert("kv_lora_rank".into(), json!(a.kv_lora_rank));
            c.insert("qk_nope_head_dim".into(), json!(a.qk_nope_head_dim));
            c.insert("qk_rope_head_dim".into(), json!(a.qk_rope_head_dim));
            c.insert("v_head_dim".into(), json!(a.v_head_dim));
        }
    }

    // RoPE: llama and V2 have one layout each; V3 says which.
    match (model_type, m.rope.layout) {
        ("llama", RopeLayout::Interleaved) => {
            return Err("`rope { layout = interleaved }` with grouped-query attention: Llama rotates half-split only".into())
        }
        ("deepseek_v3", l) => {
            c.insert("rope_interleave".into(), json!(l == RopeLayout::Interleaved));
        }
        _ => {}
    }
    c.insert("rope_theta".into(), json!(m.rope.theta));
    let mut max_positions = DEFAULT_MAX_POSITIONS;
    if let Some(y) = &m.rope.yarn {
        let mut s = Map::new();
        s.insert("type".into(), json!("yarn"));
        s.insert("rope_type".into(), json!("yarn"));
        s.insert("factor".into(), json!(y.factor));
        s.insert("original_max_position_embeddings".into(), json!(y.original_context));
        s.insert("beta_fast".into(), json!(y.beta_fast));
        s.insert("beta_slow".into(), json!(y.beta_slow));
        let mla = model_type != "llama";
        match (y.mscale, y.mscale_all_dim) {
            (m1, d) if mla && d != 0.0 && m1 != 0.0 => {
                s.insert("mscale".into(), json!(m1));
                s.insert("mscale_all_dim".into(), json!(d));
            }
            (1.0, 0.0) => {}
            (m1, d) => {
                return Err(format!(
                "`yarn {{ mscale = {m1}, mscale_all_dim = {d} }}` has no {model_type} config (it needs both non-zero for MLA, or 1 and 0)"
            ))
            }
        }
        if y.beta_fast == 0.0 || y.beta_slow == 0.0 {
            return Err("`yarn { beta_fast, beta_slow }` of 0 read as the defaults in transformers".into());
        }
        max_positions = (y.original_context as f64 * y.factor).round() as u64;
        c.insert("rope_scaling".into(), Value::Object(s));
    }
    c.insert("max_position_embeddings".into(), json!(max_positions));

    // Feed-forward layout: MoE on `first..layers step freq`, dense elsewhere.
    if let Some(i) = dense {
        c.insert("intermediate_size".into(), json!(i));
    }
    let mut is_moe_layer: Box<dyn Fn(u64) -> bool> = Box::new(|_| false);
    match moe {
        None if model_type != "llama" => {
            c.insert("n_routed_experts".into(), Value::Null);
        }
        None => {}
        Some((block, x)) => {
            let r = match block.layers.ranges[..] {
                [r] if r.end == m.layers && r.start % r.step == 0 => r,
                _ => {
                    return Err(
                        "`ffn moe { layers }` must be one range `first.. step k` with `first` a multiple of `k` (DeepSeek's `first_k_dense_replace` and `moe_layer_freq`)".into(),
                    )
                }
            };
            let (first, freq) = (r.start, r.step);
            is_moe_layer = Box::new(move |i| i >= first && i % freq == 0);
            c.insert("first_k_dense_replace".into(), json!(first));
            c.insert("moe_layer_freq".into(), json!(freq));
            c.insert("n_routed_experts".into(), json!(x.routed_experts));
            c.insert("n_shared_experts".into(), if x.shared_experts == 0 { Value::Null } else { json!(x.shared_experts) });
            c.insert("moe_intermediate_size".into(), json!(x.expert_intermediate));
            c.insert("num_experts_per_tok".into(), json!(x.router.top_k));
            let rt = &x.router;
            let groups = |c: &mut Map<String, Value>, want: GroupScore| -> Result<(), String> {
                match rt.group_score {
                    None => {
                        c.insert("n_group".into(), json!(1));
                        c.insert("topk_group".into(), json!(1));
                    }
                    Some(g) if g == want => {
                        c.insert("n_group".into(), json!(rt.groups));
                        c.insert("topk_group".into(), json!(rt.groups_kept));
                    }
                    Some(g) => return Err(format!("`router {{ group_score = {g:?} }}` is not what {model_type} computes ({want:?})")),
                }
                Ok(())
            };
            if model_type == "deepseek_v2" {
                // transformers' V2 gate: softmax, always scaled, never normalised.
                if rt.normalize != Normalize::Never || rt.scale_normalized {
                    return Err("`router { normalize, scale_normalized }`: deepseek_v2 never normalises and always scales (normalize = never, scale_normalized = false)".into());
                }
                if rt.selection_bias {
                    return Err("`router { selection_bias = true }` needs sigmoid scoring (deepseek_v3)".into());
                }
                groups(&mut c, GroupScore::Max)?;
                c.insert("topk_method".into(), json!(if rt.group_score.is_some() { "group_limited_greedy" } else { "greedy" }));
                c.insert("scoring_func".into(), json!("softmax"));
                c.insert("norm_topk_prob".into(), json!(false));
            } else {
                if rt.scoring != Scoring::Sigmoid || !rt.selection_bias || !rt.scale_normalized || rt.normalize == Normalize::TopKGt1 {
                    return Err("`router`: deepseek_v3 scores with sigmoid and a selection bias, normalises always or never, and scales normalised weights (scoring = sigmoid, selection_bias = true, scale_normalized = true)".into());
                }
                groups(&mut c, GroupScore::Top2Sum)?;
                c.insert("topk_method".into(), json!("noaux_tc"));
                c.insert("scoring_func".into(), json!("sigmoid"));
                c.insert("norm_topk_prob".into(), json!(rt.normalize == Normalize::Always));
            }
            c.insert("routed_scaling_factor".into(), json!(rt.scale));
            // One balance weight has a key: V3's sequence-wise α, or DeepSeekMoE/V2's α1.
            let b = &x.balance;
            let v3 = model_type == "deepseek_v3";
            let (alpha, others): (f64, Vec<(&str, f64)>) = if v3 {
                (b.sequence_aux, vec![("expert_aux", b.expert_aux), ("device_aux", b.device_aux), ("comm_aux", b.comm_aux)])
            } else {
                (b.expert_aux, vec![("sequence_aux", b.sequence_aux), ("device_aux", b.device_aux), ("comm_aux", b.comm_aux)])
            };
            c.insert("aux_loss_alpha".into(), json!(alpha));
            c.insert("seq_aux".into(), json!(true));
            for (k, v) in others.into_iter().chain([("bias_update_speed", b.bias_update_speed)]) {
                if v != 0.0 {
                    dropped.push(format!("ffn moe balance {{ {k} = {v} }}"));
                }
            }
        }
    }

    match (&m.mtp, model_type) {
        (None, "deepseek_v3") => {
            c.insert("num_nextn_predict_layers".into(), json!(0));
        }
        (None, _) => {}
        (Some(t), _) => {
            // The importer gives the MTP block the kind layer `layers` would have.
            let want_moe = is_moe_layer(m.layers);
            if matches!(m.ffn[t.ffn].kind, Ffn::Moe(_)) != want_moe {
                return Err(format!(
                    "`mtp {{ ffn }}`: the MTP layer is stored as layer {}, which would be {}",
                    m.layers,
                    if want_moe { "MoE" } else { "dense" }
                ));
            }
            c.insert("num_nextn_predict_layers".into(), json!(t.depth));
            if t.loss_weight != 0.3 {
                dropped.push(format!("mtp {{ loss_weight = {} }}", t.loss_weight));
            }
            if t.concat != [MtpInput::Embedding, MtpInput::Hidden] {
                return Err("`mtp { concat = [hidden, embedding] }`: the V3 checkpoints' `eh_proj` reads [embedding, hidden]".into());
            }
        }
    }
    Ok(Export { config: Value::Object(c), dropped })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::import::import_hf_config;

    /// The model the importer can give back: training-only settings at their defaults.
    fn without_dropped(m: &Model) -> Model {
        let mut m = m.clone();
        let v3 = m.mtp.is_some() || m.ffn.iter().any(|b| matches!(&b.kind, Ffn::Moe(x) if x.router.scoring == Scoring::Sigmoid));
        for b in &mut m.ffn {
            if let Ffn::Moe(x) = &mut b.kind {
                let b = &mut x.balance;
                let keep = if v3 { b.sequence_aux } else { b.expert_aux };
                *b = Balance { expert_aux: 0.0, device_aux: 0.0, comm_aux: 0.0, sequence_aux: 0.0, bias_update_speed: 0.0 };
                if v3 {
                    b.sequence_aux = keep;
                } else {
                    b.expert_aux = keep;
                }
            }
        }
        if let Some(t) = &mut m.mtp {
            t.loss_weight = 0.3;
        }
        m
    }

    fn specs() -> Vec<std::path::PathBuf> {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../specs");
        let mut v: Vec<_> = ["", "tiny"]
            .iter()
            .flat_map(|d| std::fs::read_dir(root.join(d)).unwrap())
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "dsc"))
            .collect();
        v.sort();
        v
    }

    /// Every spec of the repository that has a config exports and imports back to itself.
    #[test]
    fn round_trip_through_the_importer() {
        let mut exported = 0;
        for path in specs() {
            let spec = crate::load(&path, None).unwrap_or_else(|f| panic!("{}", f.render()));
            let m = &spec.model;
            let e = match export_hf_config(m) {
                Ok(e) => e,
                // DeepSeekMoE (GQA + MoE) has no exporter; everything else must export.
                Err(err) => {
                    assert!(matches!(m.attention, Attention::Gqa(_)), "{}: {err}", path.display());
                    assert!(err.contains("MoE"), "{err}");
                    continue;
                }
            };
            let back = import_hf_config(&e.config.to_string(), &m.name).unwrap_or_else(|err| panic!("{}: {err}", path.display()));
            assert_eq!(back, without_dropped(m), "{}", path.display());
            assert_eq!(back == *m, e.dropped.is_empty(), "{}: dropped {:?}", path.display(), e.dropped);
            exported += 1;
        }
        assert!(exported >= 9, "{exported}");
    }

    #[test]
    fn v3_config_keys_and_dropped_settings() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../specs/tiny/tiny_v3.dsc");
        let m = crate::load(&path, None).unwrap().model;
        let e = export_hf_config(&m).unwrap();
        let c = &e.config;
        assert_eq!(c["model_type"], "deepseek_v3");
        assert_eq!((c["first_k_dense_replace"].as_u64(), c["n_group"].as_u64(), c["topk_group"].as_u64()), (Some(2), Some(3), Some(2)));
        assert_eq!((c["num_nextn_predict_layers"].as_u64(), c["rope_interleave"].as_bool()), (Some(1), Some(true)));
        assert_eq!(e.dropped, ["ffn moe balance { bias_update_speed = 0.001 }"]);

        // Unrepresentable: an interleaved Llama, a non-default latent eps.
        let mut m2 = crate::load(&path.with_file_name("tiny_llama.dsc"), None).unwrap().model;
        m2.rope.layout = RopeLayout::Interleaved;
        assert!(export_hf_config(&m2).unwrap_err().contains("layout = interleaved"));
        let mut m3 = m.clone();
        if let Attention::Mla(a) = &mut m3.attention {
            a.latent_norm_eps = 1e-5;
        }
        assert!(export_hf_config(&m3).unwrap_err().contains("latent_norm_eps"));
    }
}
