//! The pass order, per goal, as explicit slices: the whole order on one screen, as in
//! cranelift's `Context::optimize` and rustc's `mir_promoted`. The runner
//! ([`super::runner`]) adds verification, dumps and timing around each entry.
//!
//! Passes being written next slot in where the comments say; a name is listed only once
//! its pass exists, so every entry here is a real pass in [`super::PASSES`].

use super::autodiff::Autodiff;
use super::cse::Cse;
use super::dce::Dce;
use super::decompose::Decompose;
use super::fuse_attention::FuseAttention;
use super::fuse_elementwise::FuseElementwise;
use super::fuse_rope::FuseRope;
use super::fuse_swiglu::FuseSwiGlu;
use super::memory_plan::MemoryPlan;
use super::mla_absorb::MlaAbsorb;
use super::mtp_strip::MtpStrip;
use super::shape_infer::ShapeInfer;
use super::simplify::Simplify;
use super::verify::Verify;
use super::Pass;
use crate::ir::Mode;

/// Prefill and decode: make the graph cheap to run.
static INFERENCE: &[&dyn Pass] = &[
    &Verify,     // the lowered module is well-formed before anything relies on it
    &ShapeInfer, // every type re-derived from its shape rule; phase → typed
    &Simplify,   // algebraic identities and layout no-ops, to a fixed point
    // fold W_UK into the query and W_UV into the attention output where the cost model
    // (or --mla) says so; after simplify, so it matches reshapes/permutes already canonical
    &MlaAbsorb,
    &MtpStrip,  // check: no multi-token-prediction module is reachable from inference
    &Cse,       // after the rewrites above, which expose duplicates
    &Dce,       // removes what absorption, stripping and CSE left unused
    &Decompose, // opt-in (--passes +decompose): composites to primitives, before fusion
    // fusion, phase → fused: the composite recognisers first, so the elementwise fuser
    // does not swallow the products and sums they match; epilogues and chains last
    &FuseSwiGlu,
    &FuseRope,
    &FuseAttention,
    &FuseElementwise,
    &MemoryPlan, // last: plans the buffers of the graph that will actually run
];

/// Train: keep the graph differentiable and close to the spec. No MLA absorption (the
/// naive form is what the weights' gradients are defined on) and no MTP stripping (the
/// MTP loss is part of the objective).
static TRAINING: &[&dyn Pass] = &[
    &Verify,
    &ShapeInfer,
    &Simplify,
    // the reverse pass: a backward function per layer function, gradients from the entry;
    // before fusion and memory planning, so the backward is fused and planned like the rest
    &Autodiff,
    &Cse, // after autodiff, which re-derives many forward values
    &Dce,
    &Decompose, // opt-in, as in inference
    &FuseSwiGlu,
    &FuseRope,
    &FuseAttention,
    &FuseElementwise,
    &MemoryPlan, // forward activations kept for the backward pass dominate here
];

/// The inference pipeline (prefill and decode).
pub fn inference() -> &'static [&'static dyn Pass] {
    INFERENCE
}

/// The training pipeline.
pub fn training() -> &'static [&'static dyn Pass] {
    TRAINING
}

/// The pipeline that compiles `mode`.
pub fn for_mode(mode: Mode) -> &'static [&'static dyn Pass] {
    match mode {
        Mode::Prefill | Mode::Decode => inference(),
        Mode::Train => training(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::passes::{find_pass, Phase};

    fn names(p: &[&dyn Pass]) -> Vec<&'static str> {
        p.iter().map(|p| p.name()).collect()
    }

    #[test]
    fn pipelines_read_as_documented() {
        let fusion = ["decompose", "fuse_swiglu", "fuse_rope", "fuse_attention", "fuse_elementwise", "memory_plan"];
        let inf = ["verify", "shape_infer", "simplify", "mla_absorb", "mtp_strip", "cse", "dce"];
        assert_eq!(names(inference()), [&inf[..], &fusion[..]].concat());
        assert_eq!(names(training()), [&["verify", "shape_infer", "simplify", "autodiff", "cse", "dce"][..], &fusion[..]].concat());
        // decompose is the one opt-in pass.
        let off: Vec<_> = inference().iter().filter(|p| !p.on_by_default()).map(|p| p.name()).collect();
        assert_eq!(off, ["decompose"]);
        assert_eq!(names(for_mode(Mode::Decode)), names(inference()));
        assert_eq!(names(for_mode(Mode::Train)), names(training()));
    }

    #[test]
    fn pipelines_use_registered_passes_in_phase_order() {
        for mode in Mode::ALL {
            let mut phase = Phase::Lowered;
            for p in for_mode(mode) {
                assert!(find_pass(p.name()).is_some(), "{} is not registered", p.name());
                if let Some(next) = p.phase() {
                    assert!(next >= phase, "{mode}: {} moves the phase back", p.name());
                    phase = next;
                }
            }
            // Every required pass is in every pipeline, first thing.
            let required: Vec<_> = for_mode(mode).iter().take_while(|p| p.is_required()).map(|p| p.name()).collect();
            assert_eq!(required, ["verify", "shape_infer"]);
        }
    }
}
