//! The canonical printer's contract: printing a resolved model and resolving the text
//! again gives the identical `Model`, for every spec in `specs/` (found at test time, so
//! new specs are covered without touching this file) and for hand-made models that
//! exercise what the specs do not (no YaRN, tied embeddings, stepped layer lists, ...).

use dsc_dsl::model::*;
use dsc_dsl::print::print_model;
use std::path::{Path, PathBuf};

fn specs_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../specs")
}

/// Every `.dsc` file under `dir`, subdirectories included, in a stable order.
fn spec_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(spec_files(&path));
        } else if path.extension().is_some_and(|e| e == "dsc") {
            out.push(path);
        }
    }
    out.sort();
    out
}

/// The names of the models a file itself defines (not those it includes).
fn models_in(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap();
    let file = dsc_dsl::parse::parse_file(dsc_dsl::span::FileId(0), &text)
        .unwrap_or_else(|d| panic!("{} does not parse: {}", path.display(), d.message));
    file.items
        .iter()
        .filter_map(|i| match i {
            dsc_dsl::ast::Item::Model(m) => Some(m.name.node.clone()),
            dsc_dsl::ast::Item::Include(_) => None,
        })
        .collect()
}

/// Prints `m`, resolves the text, and checks that nothing changed; also that printing is
/// a fixed point (the text of the re-resolved model is the same text).
fn assert_round_trip(m: &Model, origin: &str) {
    let text = print_model(m);
    let back = match dsc_dsl::load_str(Path::new("printed.dsc"), &text, None) {
        Ok(spec) => spec.model,
        Err(f) => panic!("printed {origin} does not resolve:\n{}\n--- text ---\n{text}", f.render()),
    };
    assert_eq!(&back, m, "printed {origin} resolves to a different model; text:\n{text}");
    assert_eq!(print_model(&back), text, "printing {origin} is not a fixed point");
}

#[test]
fn every_spec_round_trips_through_the_printer() {
    let files = spec_files(&specs_dir());
    assert!(files.len() >= 3, "expected the specs in {}, found {files:?}", specs_dir().display());
    let mut checked = 0;
    for path in &files {
        for name in models_in(path) {
            let spec = dsc_dsl::load(path, Some(&name))
                .unwrap_or_else(|f| panic!("{} model {name} does not resolve:\n{}", path.display(), f.render()));
            assert_round_trip(&spec.model, &format!("{} model {name}", path.display()));
            checked += 1;
        }
    }
    assert!(checked >= files.len());
}

#[test]
fn printed_text_is_canonical() {
    let spec = dsc_dsl::load(&specs_dir().join("deepseek_v2_lite.dsc"), None).unwrap();
    let text = print_model(&spec.model);
    // Inherited fields and documented defaults are written out; removed ones say `none`.
    for line in [
        "model deepseek_v2_lite {",
        "  dtype = bf16",
        "  tie_embeddings = false",
        "    q_lora_rank = none",
        "    latent_norm_eps = 1e-6",
        "    layers = 1..",
        "      selection_bias = false",
        "      group_score = none",
        "      sequence_aux = 0.0",
        "      beta_fast = 32.0",
    ] {
        assert!(text.lines().any(|l| l == line), "missing line {line:?} in:\n{text}");
    }
    assert!(!text.contains("extends") && !text.contains("include"));
}

fn moe(groups: u64, kept: u64, score: Option<GroupScore>) -> Moe {
    Moe {
        routed_experts: 16,
        shared_experts: 0,
        expert_intermediate: 24,
        router: Router {
            top_k: 2,
            scoring: Scoring::Softmax,
            selection_bias: false,
            groups,
            groups_kept: kept,
            group_score: score,
            normalize: Normalize::TopKGt1,
            scale: 1.0,
            scale_normalized: true,
        },
        balance: Balance { expert_aux: 0.0, device_aux: 0.0, comm_aux: 0.0, sequence_aux: 0.0, bias_update_speed: 0.0 },
    }
}

fn range(start: u64, end: u64, step: u64) -> LayerRange {
    LayerRange { start, end, step }
}

/// Dense MHA, no YaRN, no MTP, tied embeddings, one MoE layer set with a step, groups = 1.
fn plain() -> Model {
    Model {
        name: "plain".into(),
        vocab: 1000,
        hidden: 64,
        layers: 8,
        dtype: DType::F16,
        tie_embeddings: true,
        norm_eps: 1e-5,
        attention: Attention::Gqa(Gqa { heads: 4, kv_heads: 4, head_dim: 16 }),
        rope: Rope { theta: 500000.0, layout: RopeLayout::HalfSplit, yarn: None },
        ffn: vec![
            // {0, 2, 4, 6} and {1, 3, 5, 7}: neither ends with an open range.
            FfnBlock { layers: LayerSet { ranges: vec![range(0, 1, 1), range(2, 8, 2)] }, kind: Ffn::Dense { intermediate: 128 } },
            FfnBlock { layers: LayerSet { ranges: vec![range(1, 8, 2)] }, kind: Ffn::Moe(moe(1, 1, None)) },
        ],
        mtp: None,
    }
}

#[test]
fn hand_made_models_round_trip() {
    assert_round_trip(&plain(), "plain");

    // GQA with a head_dim that is not hidden / heads, fp8, awkward floats.
    let mut gqa = plain();
    gqa.name = "gqa".into();
    gqa.dtype = DType::Fp8;
    gqa.tie_embeddings = false;
    gqa.norm_eps = 0.1 + 0.2;
    gqa.attention = Attention::Gqa(Gqa { heads: 8, kv_heads: 2, head_dim: 24 });
    gqa.rope = Rope {
        theta: 1e6 + 0.5,
        layout: RopeLayout::Interleaved,
        yarn: Some(Yarn { factor: 1.0, original_context: 7, beta_fast: 1e-3, beta_slow: 1e-7, mscale: 0.0, mscale_all_dim: 99.999 }),
    };
    // One dense block covering everything: `0..`.
    gqa.ffn = vec![FfnBlock { layers: LayerSet { ranges: vec![range(0, 8, 1)] }, kind: Ffn::Dense { intermediate: 1 } }];
    assert_round_trip(&gqa, "gqa");

    // MLA without q compression; MoE first, then dense; a stepped range that runs to the
    // last layer (written with its end); every router and balance field off its default;
    // MTP on the dense block with the inputs swapped.
    let mut mla = plain();
    mla.name = "mla_mix".into();
    mla.dtype = DType::Bf16;
    mla.attention = Attention::Mla(Mla {
        heads: 4,
        q_lora_rank: None,
        kv_lora_rank: 32,
        qk_nope_head_dim: 16,
        qk_rope_head_dim: 8,
        v_head_dim: 12,
        latent_norm_eps: 1e-5,
    });
    let mut m = moe(4, 1, Some(GroupScore::Top2Sum));
    m.shared_experts = 3;
    m.router.top_k = 4;
    m.router.scoring = Scoring::Sigmoid;
    m.router.selection_bias = true;
    m.router.normalize = Normalize::Always;
    m.router.scale = 2.5;
    m.router.scale_normalized = false;
    m.balance = Balance { expert_aux: 0.003, device_aux: 0.05, comm_aux: 0.02, sequence_aux: 1e-4, bias_update_speed: 0.001 };
    mla.ffn = vec![
        FfnBlock { layers: LayerSet { ranges: vec![range(0, 3, 1), range(3, 8, 2)] }, kind: Ffn::Moe(m) },
        FfnBlock { layers: LayerSet { ranges: vec![range(4, 8, 2)] }, kind: Ffn::Dense { intermediate: 96 } },
    ];
    mla.mtp = Some(Mtp { depth: 2, loss_weight: 0.1, concat: [MtpInput::Hidden, MtpInput::Embedding], ffn: 1 });
    assert_round_trip(&mla, "mla_mix");

    // Group-limited routing with the V2 group score, and MTP on MoE.
    let mut grouped = mla.clone();
    grouped.name = "grouped".into();
    grouped.ffn[0].kind = Ffn::Moe(moe(8, 2, Some(GroupScore::Max)));
    grouped.mtp = Some(Mtp { depth: 1, loss_weight: 0.3, concat: [MtpInput::Embedding, MtpInput::Hidden], ffn: 0 });
    assert_round_trip(&grouped, "grouped");
}

#[test]
fn layer_sets_print_in_their_short_forms() {
    let text = print_model(&plain());
    assert!(text.contains("    layers = [0..1, 2..8 step 2]\n"), "{text}");
    assert!(text.contains("    layers = 1..8 step 2\n"), "{text}");
    assert!(text.contains("  attention mha {\n    heads = 4\n    head_dim = 16\n  }"), "{text}");
    assert!(!text.contains("yarn") && !text.contains("mtp"), "{text}");
}
