//! Shared helpers for the integration tests in tests/tests/: seeded random weights for a
//! lowered module. The tests themselves live in tests/tests/.

use dsc_compiler::ir::{param_path, Bindings, Mode, Module, Op, Ty};
use dsc_runtime::reference::Tensor;
pub use dsc_runtime::rng::SplitMix64;
use std::collections::{BTreeMap, HashMap};

/// Every param the entry point of `mode` reads (directly or through its calls), by full
/// checkpoint name, with its type. Sorted, so a seed always gives the same weights.
pub fn entry_params(m: &Module, mode: Mode) -> BTreeMap<String, Ty> {
    let entry = m.entry(mode).expect("the module has this entry point");
    let mut params = BTreeMap::new();
    let mut scan = |f: &str, layer: Option<u32>| {
        let g = &m.function(f).expect("callee exists").graph;
        for n in g.nodes() {
            if let Op::Param { name } = &g.node(n).op {
                params.insert(param_path(layer, name), g.node(n).ty().clone());
            }
        }
    };
    scan(&entry.name, None);
    for n in entry.graph.nodes() {
        if let Op::Call { function, layer } = &entry.graph.node(n).op {
            scan(function, *layer);
        }
    }
    params
}

/// A weight for every param: matrices (and stacked experts) `N(0, 1/fan_in)` with the last
/// axis as fan-in (torch's `[out, in]`), norm gains `1 + N(0, 0.1²)` (so activations
/// neither vanish nor blow up over the layers, which would make comparisons vacuous),
/// other vectors such as the router's selection bias `N(0, 0.1²)`. No weight is zero.
pub fn random_weights(params: &BTreeMap<String, Ty>, rng: &mut SplitMix64) -> HashMap<String, Tensor> {
    let none = Bindings::default();
    params
        .iter()
        .map(|(name, ty)| {
            let shape: Vec<usize> = ty.shape.eval(&none).into_iter().map(|d| d as usize).collect();
            let fan_in = *shape.last().unwrap_or(&1) as f64;
            let data: Vec<f32> = (0..shape.iter().product::<usize>())
                .map(|_| {
                    let z = rng.normal();
                    let x = match shape.len() {
                        0 | 1 if name.ends_with("norm.weight") => 1.0 + 0.1 * z,
                        0 | 1 => 0.1 * z,
                        _ => z / fan_in.sqrt(),
                    };
                    if x == 0.0 {
                        1e-3
                    } else {
                        x as f32
                    }
                })
                .collect();
            (name.clone(), Tensor::f32(&shape, data))
        })
        .collect()
}
