//! The lowered IR binds to real checkpoints by name: for every transformers fixture in
//! `golden/hf/`, the params the prefill entry reaches (scoped through its layer calls)
//! are exactly the tensors of `model.safetensors`, with the same shapes, once routed
//! experts are stacked as the lowering documents (`mlp.experts.{e}.gate_proj.weight`
//! `[i, h]` × E → `mlp.experts.gate_proj.weight` `[E, i, h]`).

use dsc_compiler::ir::{param_path, Mode, Op};
use dsc_compiler::lower::lower_mode;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn fixtures() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../golden/hf");
    let mut out: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("config.json").is_file() && p.join("model.safetensors").is_file())
        .collect();
    out.sort();
    assert!(out.len() >= 5, "fixtures missing from {}", dir.display());
    out
}

/// Checkpoint tensor name → shape, with per-expert tensors stacked under one name.
fn checkpoint(path: &Path) -> BTreeMap<String, Vec<i64>> {
    let bytes = std::fs::read(path).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let mut out: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    let mut experts: BTreeMap<String, (Vec<i64>, Vec<usize>)> = BTreeMap::new();
    for (name, info) in meta.tensors() {
        let shape: Vec<i64> = info.shape.iter().map(|&d| d as i64).collect();
        // `model.layers.L.mlp.experts.E.rest` → `model.layers.L.mlp.experts.rest`
        let parts: Vec<&str> = name.split('.').collect();
        match parts.iter().position(|p| *p == "experts") {
            Some(i) if parts.get(i + 1).is_some_and(|e| e.parse::<usize>().is_ok()) => {
                let e: usize = parts[i + 1].parse().unwrap();
                let stacked = [&parts[..=i], &parts[i + 2..]].concat().join(".");
                let entry = experts.entry(stacked).or_insert((shape.clone(), Vec::new()));
                assert_eq!(entry.0, shape, "{name}: experts of one layer differ in shape");
                entry.1.push(e);
            }
            _ => {
                out.insert(name.clone(), shape);
            }
        }
    }
    for (name, (shape, mut ids)) in experts {
        ids.sort_unstable();
        assert!(ids.iter().enumerate().all(|(i, &e)| i == e), "{name}: expert ids {ids:?} are not 0..E");
        let mut s = vec![ids.len() as i64];
        s.extend(shape);
        out.insert(name, s);
    }
    out
}

#[test]
fn lowered_params_are_the_checkpoint_tensors() {
    for dir in fixtures() {
        let name = dir.file_name().unwrap().to_str().unwrap();
        let config = std::fs::read_to_string(dir.join("config.json")).unwrap();
        let model = dsc_dsl::import::import_hf_config(&config, name).unwrap();
        let text = dsc_dsl::print::print_model(&model);
        let spec = dsc_dsl::load_str(Path::new("fixture.dsc"), &text, None).unwrap_or_else(|f| panic!("{}", f.render()));
        let module = lower_mode(&spec, Mode::Prefill).unwrap_or_else(|e| panic!("{name}: {e}"));

        let entry = module.entry(Mode::Prefill).unwrap();
        let mut params: BTreeMap<String, Vec<i64>> = BTreeMap::new();
        let mut visit = |f: &dsc_compiler::ir::Function, layer: Option<u32>| {
            for n in f.graph.nodes() {
                if let Op::Param { name } = &f.graph.node(n).op {
                    let shape: Option<Vec<i64>> = f.graph.node(n).ty().shape.iter().map(|d| d.as_const()).collect();
                    let prev = params.insert(param_path(layer, name), shape.expect("params have constant shapes"));
                    assert!(prev.is_none(), "{name} bound twice");
                }
            }
        };
        visit(entry, None);
        for n in entry.graph.nodes() {
            if let Op::Call { function, layer } = &entry.graph.node(n).op {
                visit(module.function(function).unwrap(), *layer);
            }
        }

        let want = checkpoint(&dir.join("model.safetensors"));
        let missing: Vec<_> = want.keys().filter(|k| !params.contains_key(*k)).collect();
        let extra: Vec<_> = params.keys().filter(|k| !want.contains_key(*k)).collect();
        assert!(missing.is_empty(), "{name}: checkpoint tensors the IR never reads: {missing:?}");
        assert!(extra.is_empty(), "{name}: IR params the checkpoint lacks: {extra:?}");
        for (k, shape) in &want {
            assert_eq!(&params[k], shape, "{name}: {k}");
        }
    }
}
