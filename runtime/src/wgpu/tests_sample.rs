//! Sampling on the device (`kernels::sample`) against the host: greedy picks the host's
//! argmax (ties to the lowest index, NaN never), the log-probabilities and entropies are
//! the host's `token_logprob`, temperature draws follow softmax(logits / T), and a row
//! holding NaN comes back with a NaN log-probability (an error for the backend). Runs on
//! CUDA too (`cuda/tests.rs` includes it; `super::test_engine` is that device's).

use super::test_engine;
use crate::generate::{token_logprob, Engine, SampleParams};
use crate::plan_exec::{Device, Held, PlanEngine};
use crate::reference::Tensor;
use crate::sampling::argmax;
use dsc_compiler::ir::DType;

fn held<D: Device>(engine: &PlanEngine<D>, rows: &[Vec<f32>]) -> Held<D::Buf> {
    let v = rows[0].len();
    let t = Tensor::f32(&[rows.len(), 1, v], rows.concat());
    let buf = Device::upload(engine.backend(), &t, DType::F32).unwrap();
    Held { buf, shape: vec![rows.len(), 1, v], dtype: DType::F32, bytes: 0, room: None }
}

#[test]
fn greedy_matches_the_host() {
    let engine = test_engine();
    let v = 300; // more than one pass of the cube's units
    let mut rows: Vec<Vec<f32>> = (0..5).map(|r| (0..v).map(|i| ((i * 7 + r * 13) as f32 * 0.37).sin() * 4.0).collect()).collect();
    rows[1][3] = 9.0; // a tie: the lower index wins
    rows[1][250] = 9.0;
    rows[2][17] = f32::NEG_INFINITY;
    rows[3][0] = 50.0; // far ahead of the rest
    let s = engine.sample(&held(&engine, &rows), &SampleParams { temperature: 0.0, seed: 1, step: 0 }).unwrap();
    for (r, row) in rows.iter().enumerate() {
        assert_eq!(s.tokens[r], argmax(row) as i64, "row {r}");
        let (lp, h) = token_logprob(row, s.tokens[r] as usize, 0.0);
        assert!(
            (s.logprobs[r] - lp).abs() < 1e-5 && (s.entropy[r] - h).abs() < 1e-4,
            "row {r}: {} {} vs {lp} {h}",
            s.logprobs[r],
            s.entropy[r]
        );
    }
    assert_eq!(s.tokens[1], 3);
}

#[test]
fn temperature_draws_follow_the_softmax() {
    let engine = test_engine();
    let logits = vec![1.0f32, 0.0, -1.0, 0.5, f32::NEG_INFINITY];
    let n = 4000;
    let rows = vec![logits.clone(); n];
    let t = 0.8f32;
    let p = |seed, step| engine.sample(&held(&engine, &rows), &SampleParams { temperature: t, seed, step }).unwrap();
    let s = p(7, 3);
    // softmax(x / T), each row an independent draw.
    let z: Vec<f64> = logits.iter().map(|&x| (x as f64 / t as f64).exp()).collect();
    let total: f64 = z.iter().sum();
    for (k, zk) in z.iter().enumerate() {
        let want = zk / total;
        let got = s.tokens.iter().filter(|&&x| x == k as i64).count() as f64 / n as f64;
        // Four standard deviations of a binomial frequency at n = 4000 (≤ 0.032).
        assert!((got - want).abs() <= 4.0 * (want * (1.0 - want) / n as f64).sqrt() + 1e-9, "token {k}: {got} vs {want}");
    }
    let (lp, h) = token_logprob(&logits, s.tokens[0] as usize, t);
    assert!((s.logprobs[0] - lp).abs() < 1e-5 && (s.entropy[0] - h).abs() < 1e-5);
    // Reproducible from (seed, step); another step or seed draws anew.
    assert_eq!(p(7, 3).tokens, s.tokens);
    assert_ne!(p(7, 4).tokens, s.tokens);
    assert_ne!(p(8, 3).tokens, s.tokens);
}

#[test]
fn a_row_with_nan_has_no_log_probability() {
    let engine = test_engine();
    let rows = vec![vec![0.5f32, f32::NAN, 0.25], vec![0.5, 1.0, 0.25]];
    let s = engine.sample(&held(&engine, &rows), &SampleParams { temperature: 1.0, seed: 0, step: 0 }).unwrap();
    assert!(s.logprobs[0].is_nan(), "{:?}", s.logprobs);
    assert!(s.logprobs[1].is_finite() && s.tokens[0] != 1, "NaN never wins: {:?}", s.tokens);
}
