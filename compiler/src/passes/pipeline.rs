//! The pass order, per goal, as explicit slices: the whole order on one screen, as in
//! cranelift's `Context::optimize` and rustc's `mir_promoted`. The runner
//! ([`super::runner`]) adds verification, dumps and timing around each entry.
//!
//! Passes being written next slot in where the comments say; a name is listed only once
//! its pass exists, so every entry here is a real pass in [`super::PASSES`].

use super::cse::Cse;
use super::dce::Dce;
use super::memory_plan::MemoryPlan;
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
    // mla_absorb: fold W_UK into the query and W_UV into o_proj (RoPE dims stay apart);
    //             after simplify, so it matches reshapes/permutes already canonical.
    // mtp_strip:  drop the multi-token-prediction modules inference does not run.
    &Cse, // after the rewrites above, which expose duplicates
    &Dce, // removes what absorption, stripping and CSE left unused
    // fuse:       group elementwise chains into kernels (burn-style fusers with scores).
    &MemoryPlan, // last: plans the buffers of the graph that will actually run
];

/// Train: keep the graph differentiable and close to the spec. No MLA absorption (the
/// naive form is what the weights' gradients are defined on) and no MTP stripping (the
/// MTP loss is part of the objective).
static TRAINING: &[&dyn Pass] = &[
    &Verify,
    &ShapeInfer,
    &Simplify,
    // autodiff:   append the reverse pass (rule table of local derivatives per op).
    &Cse, // after autodiff, which re-derives many forward values
    &Dce,
    // fuse
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
        assert_eq!(names(inference()), ["verify", "shape_infer", "simplify", "cse", "dce", "memory_plan"]);
        assert_eq!(names(training()), ["verify", "shape_infer", "simplify", "cse", "dce", "memory_plan"]);
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
