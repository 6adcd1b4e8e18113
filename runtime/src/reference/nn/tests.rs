//! The composites against direct formulas and hand-computed values, at odd sizes, in
//! `f64` (so the comparisons are tight) and `f32` where precision handling matters.

use super::*;
use crate::reference::ErrorKind;
use dsc_compiler::ir::Float;

/// A deterministic, irregular fill in [-1, 1) (the backward kernels' tests use it too).
pub(super) fn fill(shape: &[usize], seed: u64) -> Tensor {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    let v = (0..numel(shape))
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
        })
        .collect();
    Tensor::f64(shape, v)
}

fn close(a: &[f64], b: &[f64], tol: f64) {
    assert_eq!(a.len(), b.len());
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!((x - y).abs() <= tol, "element {i}: {x} vs {y}");
    }
}

#[test]
fn softmax_rows_columns_and_masked() {
    let x = Tensor::f64(&[2, 3], vec![1.0, 2.0, 3.0, -1.0, f64::NEG_INFINITY, 0.5]);
    let y = softmax::<f64>(&x, 1).unwrap().to_f64_vec();
    let e: Vec<f64> = [1.0f64, 2.0, 3.0].iter().map(|v| v.exp()).collect();
    let s: f64 = e.iter().sum();
    close(&y[..3], &[e[0] / s, e[1] / s, e[2] / s], 1e-15);
    let d = (-1.0f64).exp() + 0.5f64.exp();
    close(&y[3..], &[(-1.0f64).exp() / d, 0.0, 0.5f64.exp() / d], 1e-15);
    // Along axis 0 each column is a lane.
    let c = softmax::<f64>(&x, 0).unwrap();
    let col0 = 1.0 / (1.0 + (-2.0f64).exp());
    assert!((c.get(&[0, 0]).unwrap() - col0).abs() < 1e-15);
    assert_eq!(c.get(&[0, 1]), Some(1.0));
    // Large inputs do not overflow (max subtraction), and an all -inf lane is zeros.
    let big = Tensor::f32(&[1, 2], vec![1000.0, 1000.0]);
    assert_eq!(softmax::<f32>(&big, 1).unwrap().to_f32_vec(), vec![0.5, 0.5]);
    let dead = Tensor::f32(&[2], vec![f32::NEG_INFINITY; 2]);
    assert_eq!(softmax::<f32>(&dead, 0).unwrap().to_f32_vec(), vec![0.0, 0.0]);
}

#[test]
fn rms_norm_by_hand() {
    // Row [3, 4]: mean of squares 12.5.
    let x = Tensor::f64(&[1, 2, 2], vec![3.0, 4.0, 0.0, 0.0]);
    let g = Tensor::f64(&[2], vec![2.0, 0.5]);
    let y = rms_norm::<f64>(&x, &g, 1e-6).unwrap().to_f64_vec();
    let r = 1.0 / (12.5f64 + 1e-6).sqrt();
    close(&y, &[3.0 * r * 2.0, 4.0 * r * 0.5, 0.0, 0.0], 1e-15);
    assert!(rms_norm::<f64>(&x, &Tensor::f64(&[3], vec![1.0; 3]), 1e-6).is_err());
    assert!(rms_norm::<f64>(&x.to_f32(), &g, 1e-6).is_err(), "an f32 tensor in an f64 run");
}

/// The rotation written out directly from the formulas, per element.
fn rope_direct(x: &Tensor, pos: &[i64], half_split: bool, rd: usize, freqs: &[f64], ms: f64) -> Vec<f64> {
    let sh = x.shape();
    let d = sh[sh.len() - 1];
    let per_pos = numel(&sh[2..]);
    let v = x.to_f64_vec();
    let mut out = v.clone();
    for (flat, o) in out.iter_mut().enumerate() {
        let p = pos[flat / per_pos] as f64;
        let j = flat % d;
        if j >= rd {
            continue;
        }
        let base = flat - j;
        let (i, partner, first) = if half_split {
            if j < rd / 2 {
                (j, j + rd / 2, true)
            } else {
                (j - rd / 2, j - rd / 2, false)
            }
        } else {
            (j / 2, j ^ 1, j.is_multiple_of(2))
        };
        let (c, s) = ((p * freqs[i]).cos() * ms, (p * freqs[i]).sin() * ms);
        let (me, other) = (v[base + j], v[base + partner]);
        *o = if first { me * c - other * s } else { me * c + other * s };
    }
    out
}

#[test]
fn rope_both_layouts_match_the_formula() {
    let x = fill(&[2, 3, 2, 6], 1);
    let pos = Tensor::i64(&[2, 3], vec![0, 1, 2, 7, 100, 5]);
    let theta = 10000.0;
    let freqs: Vec<f64> = (0..2).map(|i| theta.powf(-(2.0 * i as f64) / 4.0)).collect();
    assert_eq!(freqs, vec![1.0, 0.01]);
    let p = pos.to_i64_vec().unwrap();
    for (layout, half) in [(RopeLayout::HalfSplit, true), (RopeLayout::Interleaved, false)] {
        let y = rope::<f64>(&x, &pos, layout, theta, 4, None).unwrap();
        close(&y.to_f64_vec(), &rope_direct(&x, &p, half, 4, &freqs, 1.0), 1e-12);
    }
    // Rank 3 (one head), i32 positions, the whole dim rotated.
    let x3 = fill(&[1, 2, 4], 2);
    let pos3 = Tensor::i32(&[1, 2], vec![3, 9]);
    let f4: Vec<f64> = (0..2).map(|i| 500f64.powf(-(2.0 * i as f64) / 4.0)).collect();
    let y3 = rope::<f64>(&x3, &pos3, RopeLayout::HalfSplit, 500.0, 4, None).unwrap();
    close(&y3.to_f64_vec(), &rope_direct(&x3, &[3, 9], true, 4, &f4, 1.0), 1e-12);
    // Position 0 is the identity; rotations preserve each pair's norm.
    let y0 = rope::<f64>(&x3, &Tensor::i32(&[1, 2], vec![0, 0]), RopeLayout::Interleaved, 500.0, 4, None).unwrap();
    close(&y0.to_f64_vec(), &x3.to_f64_vec(), 0.0);
    assert!(rope::<f64>(&x3, &pos3, RopeLayout::HalfSplit, 500.0, 6, None).is_err());
    assert!(rope::<f64>(&x3, &Tensor::i32(&[2, 1], vec![0, 0]), RopeLayout::HalfSplit, 500.0, 4, None).is_err());
}

fn yarn(factor: f64, orig: u64, mscale: f64, mscale_all_dim: f64) -> Yarn {
    Yarn {
        factor: Float::new(factor),
        original_context: orig,
        beta_fast: Float::new(32.0),
        beta_slow: Float::new(1.0),
        mscale: Float::new(mscale),
        mscale_all_dim: Float::new(mscale_all_dim),
    }
}

#[test]
fn yarn_frequencies_deepseek_v2() {
    // DeepSeek-V2's own numbers: rope dim 64, theta 1e4, 4096 original tokens, factor 40.
    // The correction range is dims [10, 23] (floor of 10.47, ceil of 22.51): the ramp is
    // 0 up to pair 10 (original frequency), 1 from pair 23 (frequency / 40).
    let (inv, ms) = rope_frequencies(10000.0, 64, Some(&yarn(40.0, 4096, 0.707, 0.707)));
    assert_eq!(inv.len(), 32);
    let f = |i: usize| 10000f64.powf(-(i as f64) / 32.0);
    for (i, &v) in inv.iter().enumerate().take(11) {
        assert!((v - f(i)).abs() <= 1e-15 * f(i), "pair {i} keeps its frequency");
    }
    for (i, &v) in inv.iter().enumerate().skip(23) {
        assert!((v - f(i) / 40.0).abs() <= 1e-15 * f(i), "pair {i} is interpolated");
    }
    let r = 6.0 / 13.0; // pair 16
    assert!((inv[16] - (f(16) / 40.0 * r + f(16) * (1.0 - r))).abs() < 1e-15);
    assert_eq!(ms, 1.0, "mscale = mscale_all_dim cancels");
}

#[test]
fn yarn_frequencies_fixture_config() {
    // The HF fixtures' config: rope dim 8, factor 8, 32 original tokens. corr(32) =
    // 8 ln(1/2π)/(2 ln 1e4) = -0.80 → low 0; corr(1) = 8 ln(32/2π)/(2 ln 1e4) = 0.71 →
    // high 1: pair 0 keeps 1.0, every other pair is divided by 8.
    let (inv, ms) = rope_frequencies(10000.0, 8, Some(&yarn(8.0, 32, 1.0, 0.707)));
    close(&inv, &[1.0, 0.1 / 8.0, 0.01 / 8.0, 0.001 / 8.0], 1e-16);
    let want = (0.1 * 8f64.ln() + 1.0) / (0.1 * 0.707 * 8f64.ln() + 1.0);
    assert!((ms - want).abs() < 1e-15);
    assert!((ms - 1.053_118).abs() < 1e-6);
    // A factor <= 1 scales nothing.
    assert_eq!(yarn_mscale(1.0, 5.0), 1.0);
    // The factor multiplies cos and sin: at position 0 the rotary dims are scaled by it.
    let x = fill(&[1, 1, 1, 10], 3);
    let y = rope::<f64>(&x, &Tensor::i32(&[1, 1], vec![0]), RopeLayout::Interleaved, 10000.0, 8, Some(&yarn(8.0, 32, 1.0, 0.707))).unwrap();
    let (xv, yv) = (x.to_f64_vec(), y.to_f64_vec());
    close(&yv[..8], &xv[..8].iter().map(|v| v * ms).collect::<Vec<_>>(), 1e-15);
    close(&yv[8..], &xv[8..], 0.0);
}

#[test]
fn large_inputs_take_the_parallel_paths() {
    // Past PAR_MIN elements the kernels split rows over threads; the answers must be the
    // same formulas.
    let x = fill(&[1, 64, 8, 64], 5);
    let pos: Vec<i64> = (0..64).map(|p| p * 3).collect();
    let freqs: Vec<f64> = (0..32).map(|i| 10000f64.powf(-(2.0 * i as f64) / 64.0)).collect();
    let y = rope::<f64>(&x, &Tensor::i64(&[1, 64], pos.clone()), RopeLayout::HalfSplit, 10000.0, 64, None).unwrap();
    close(&y.to_f64_vec(), &rope_direct(&x, &pos, true, 64, &freqs, 1.0), 1e-12);
    let flat = x.clone().reshape(vec![512, 64]).unwrap();
    let ones = Tensor::f64(&[64], vec![1.0; 64]);
    let r = rms_norm::<f64>(&flat, &ones, 1e-6).unwrap().to_f64_vec();
    let s = softmax::<f64>(&flat, 1).unwrap().to_f64_vec();
    for (row, (rr, sr)) in flat.to_f64_vec().chunks(64).zip(r.chunks(64).zip(s.chunks(64))) {
        let inv = 1.0 / (row.iter().map(|v| v * v).sum::<f64>() / 64.0 + 1e-6).sqrt();
        close(rr, &row.iter().map(|v| v * inv).collect::<Vec<_>>(), 1e-12);
        let z: f64 = row.iter().map(|v| v.exp()).sum();
        close(sr, &row.iter().map(|v| v.exp() / z).collect::<Vec<_>>(), 1e-12);
    }
}

#[test]
fn rope_f32_follows_f64() {
    let x = fill(&[2, 4, 3, 8], 4);
    let pos = Tensor::i64(&[2, 4], vec![0, 1, 2, 3, 10, 11, 12, 13]);
    let y = yarn(8.0, 32, 1.0, 0.707);
    let a = rope::<f64>(&x, &pos, RopeLayout::Interleaved, 10000.0, 8, Some(&y)).unwrap();
    let b = rope::<f32>(&x.to_f32(), &pos, RopeLayout::Interleaved, 10000.0, 8, Some(&y)).unwrap();
    assert!(b.max_abs_diff(&a).unwrap() < 1e-6);
}

/// Attention by definition, one query at a time.
fn attention_naive(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>, spec: AttentionSpec) -> Vec<f64> {
    let (b, sq, hq, dk) = (q.shape()[0], q.shape()[1], q.shape()[2], q.shape()[3]);
    let (sk, hk, dv) = (k.shape()[1], k.shape()[2], v.shape()[3]);
    let mut out = vec![0.0; b * sq * hq * dv];
    for bi in 0..b {
        for h in 0..hq {
            let kh = h / (hq / hk);
            for i in 0..sq {
                let mut s: Vec<f64> = (0..sk)
                    .map(|j| {
                        let dot: f64 = (0..dk).map(|c| q.get(&[bi, i, h, c]).unwrap() * k.get(&[bi, j, kh, c]).unwrap()).sum();
                        dot * spec.scale + mask.map_or(0.0, |m| m.get(&[bi, i, j]).unwrap())
                    })
                    .collect();
                if spec.causal {
                    for (j, x) in s.iter_mut().enumerate() {
                        if j + sq > sk + i {
                            *x = f64::NEG_INFINITY;
                        }
                    }
                }
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for c in 0..dv {
                    let o: f64 = (0..sk).map(|j| e[j] / z * v.get(&[bi, j, kh, c]).unwrap()).sum();
                    out[((bi * sq + i) * hq + h) * dv + c] = o;
                }
            }
        }
    }
    out
}

#[test]
fn attention_gqa_causal_and_masked() {
    // sq = 3 new queries after 2 cached keys (sk = 5), 6 query heads on 2 kv heads,
    // dk != dv.
    let (q, k, v) = (fill(&[2, 3, 6, 5], 10), fill(&[2, 5, 2, 5], 11), fill(&[2, 5, 2, 3], 12));
    let mask = fill(&[2, 3, 5], 13);
    for causal in [true, false] {
        for m in [None, Some(&mask)] {
            let spec = AttentionSpec { heads: 6, kv_heads: 2, scale: 0.37, causal };
            let got = attention::<f64>(&q, &k, &v, m, spec).unwrap();
            assert_eq!(got.shape(), &[2, 3, 6, 3]);
            close(&got.to_f64_vec(), &attention_naive(&q, &k, &v, m, spec), 1e-12);
        }
    }
    // GQA grouping: heads 0..3 read kv head 0, so with kv head 1's values zeroed those
    // heads are unchanged and heads 3..6 become 0.
    let mut vz = v.to_f64_vec();
    for (i, x) in vz.iter_mut().enumerate() {
        if (i / 3) % 2 == 1 {
            *x = 0.0;
        }
    }
    let vz = Tensor::f64(&[2, 5, 2, 3], vz);
    let spec = AttentionSpec { heads: 6, kv_heads: 2, scale: 0.37, causal: true };
    let (a, z) = (attention::<f64>(&q, &k, &v, None, spec).unwrap(), attention::<f64>(&q, &k, &vz, None, spec).unwrap());
    for bi in 0..2 {
        for i in 0..3 {
            for h in 0..6 {
                for c in 0..3 {
                    let (x, y) = (a.get(&[bi, i, h, c]).unwrap(), z.get(&[bi, i, h, c]).unwrap());
                    if h < 3 {
                        assert_eq!(x, y);
                    } else {
                        assert_eq!(y, 0.0);
                    }
                }
            }
        }
    }
    // The causal diagonal: the first of 3 queries over 5 keys ignores keys 3 and 4.
    let mut k2 = k.to_f64_vec();
    let mut v2 = v.to_f64_vec();
    for j in 3..5 {
        for x in &mut k2[j * 10..(j + 1) * 10] {
            *x = 99.0;
        }
        for x in &mut v2[j * 6..(j + 1) * 6] {
            *x = 99.0;
        }
    }
    let b2 = attention::<f64>(&q, &Tensor::f64(&[2, 5, 2, 5], k2), &Tensor::f64(&[2, 5, 2, 3], v2), None, spec).unwrap();
    for h in 0..6 {
        assert_eq!(a.get(&[0, 0, h, 1]), b2.get(&[0, 0, h, 1]));
    }
}

/// Queries in several blocks of `ATTENTION_ROWS` (the last one partial), with and without
/// cached keys before them, the causal diagonal crossing block edges, a mask, and the
/// log-sum-exps: the same numbers as the unblocked formula.
#[test]
fn attention_over_several_query_blocks() {
    for (sq, sk) in [(150, 150), (130, 200), (64, 64), (65, 70)] {
        let (q, k, v) = (fill(&[1, sq, 2, 4], 30), fill(&[1, sk, 1, 4], 31), fill(&[1, sk, 1, 3], 32));
        let mask = fill(&[1, sq, sk], 33);
        for (causal, m) in [(true, None), (false, Some(&mask)), (true, Some(&mask))] {
            let spec = AttentionSpec { heads: 2, kv_heads: 1, scale: 0.41, causal };
            let (got, lse) = attention_lse::<f64>(&q, &k, &v, m, spec).unwrap();
            close(&got.to_f64_vec(), &attention_naive(&q, &k, &v, m, spec), 1e-12);
            // Each row's log-sum-exp, from the scores as the formula writes them.
            let (qv, kv, mv) = (q.to_f64_vec(), k.to_f64_vec(), mask.to_f64_vec());
            for i in [0, sq / 2, sq - 1] {
                for h in 0..2 {
                    let visible = if causal { (sk + i + 1).saturating_sub(sq).min(sk) } else { sk };
                    let scores: Vec<f64> = (0..visible)
                        .map(|j| {
                            let dot: f64 = (0..4).map(|d| qv[(i * 2 + h) * 4 + d] * kv[j * 4 + d]).sum();
                            dot * 0.41 + m.map_or(0.0, |_| mv[i * sk + j])
                        })
                        .collect();
                    let top = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let want = top + scores.iter().map(|s| (s - top).exp()).sum::<f64>().ln();
                    let got = lse.get(&[0, i, h]).unwrap();
                    assert!((got - want).abs() < 1e-12, "{sq}×{sk} row {i} head {h}: lse {got}, want {want}");
                }
            }
        }
    }
}

/// In an f32 run, few query rows against one shared key/value head (decode of MQA or
/// absorbed MLA) take every head at once through the dot kernels: the same numbers as
/// the formula (in f64) up to f32 rounding, with cached keys, the causal diagonal, a
/// mask, several sequences, the log-sum-exps, and queries that see no key.
#[test]
fn attention_of_few_rows_on_a_shared_kv_head() {
    for (b, sq, sk, heads) in [(1, 1, 37, 8), (3, 2, 20, 4), (2, 1, 1, 16), (1, 3, 2, 2), (2, 3, 9, 8)] {
        let (q, k, v) = (fill(&[b, sq, heads, 40], 40), fill(&[b, sk, 1, 40], 41), fill(&[b, sk, 1, 24], 42));
        let mask = fill(&[b, sq, sk], 43);
        for (causal, m) in [(true, None), (false, Some(&mask)), (true, Some(&mask))] {
            let spec = AttentionSpec { heads, kv_heads: 1, scale: 0.3, causal };
            let m32 = m.map(Tensor::to_f32);
            let (got, lse) = attention_lse::<f32>(&q.to_f32(), &k.to_f32(), &v.to_f32(), m32.as_ref(), spec).unwrap();
            assert_eq!(got.shape(), &[b, sq, heads, 24]);
            // A query that sees no key gets zeros (the formula's 0/0).
            let want: Vec<f64> = attention_naive(&q, &k, &v, m, spec).into_iter().map(|x| if x.is_nan() { 0.0 } else { x }).collect();
            close(&got.to_f64_vec(), &want, 1e-5);
            let (_, lse64) = attention_lse::<f64>(&q, &k, &v, m, spec).unwrap();
            let (l32, l64) = (lse.to_f64_vec(), lse64.to_f64_vec());
            for (x, y) in l32.iter().zip(&l64) {
                assert!(x == y || (x - y).abs() < 1e-4, "{b}×{sq}×{sk}×{heads}: lse {x} vs {y}");
            }
        }
    }
}

#[test]
fn attention_query_without_keys_is_zero() {
    // sq = 3 > sk = 2: bottom-right alignment leaves query 0 nothing to see.
    let (q, k, v) = (fill(&[1, 3, 1, 2], 20), fill(&[1, 2, 1, 2], 21), fill(&[1, 2, 1, 2], 22));
    let spec = AttentionSpec { heads: 1, kv_heads: 1, scale: 1.0, causal: true };
    let y = attention::<f64>(&q, &k, &v, None, spec).unwrap().to_f64_vec();
    assert_eq!(&y[..2], &[0.0, 0.0]);
    // Query 1 sees key 0 alone, so it returns that key's value exactly.
    assert_eq!(&y[2..4], &v.to_f64_vec()[..2]);
    let bad = AttentionSpec { heads: 2, kv_heads: 1, scale: 1.0, causal: true };
    assert!(attention::<f64>(&q, &k, &v, None, bad).is_err());
}

#[allow(clippy::too_many_arguments)] // one argument per Routing field reads best in the tests
fn routing(
    top_k: u32,
    scoring: Scoring,
    bias: bool,
    groups: u32,
    kept: u32,
    gs: Option<GroupScore>,
    normalize: bool,
    scale: f64,
) -> Routing {
    Routing { top_k, scoring, selection_bias: bias, groups, groups_kept: kept, group_score: gs, normalize, scale: Float::new(scale) }
}

#[test]
fn moe_route_softmax_group_max() {
    // 8 experts in 4 groups of 2; keep 2 groups by their best expert, then top 3.
    // Logits (token 0): group maxima are g0: 2.0, g1: 1.9, g2: 3.0, g3: 0.0, so groups 2
    // and 0 are kept although expert 3 (1.9) beats expert 0's partner (1.5).
    let l = vec![2.0, 1.5, 1.9, 1.8, 3.0, -1.0, 0.0, -5.0];
    let logits = Tensor::f64(&[1, 8], l.clone());
    let r = routing(3, Scoring::Softmax, false, 4, 2, Some(GroupScore::Max), false, 2.5);
    let (i, w) = moe_route::<f64>(&logits, None, &r).unwrap();
    assert_eq!(i.as_i32().unwrap(), &[4, 0, 1]);
    let z: f64 = l.iter().map(|x| x.exp()).sum();
    close(&w.to_f64_vec(), &[3f64.exp() / z * 2.5, 2f64.exp() / z * 2.5, 1.5f64.exp() / z * 2.5], 1e-15);
    // Without groups the best three win outright.
    let flat = routing(3, Scoring::Softmax, false, 1, 1, None, false, 1.0);
    let (i, _) = moe_route::<f64>(&logits, None, &flat).unwrap();
    assert_eq!(i.as_i32().unwrap(), &[4, 0, 2]);
    // normalize: the chosen weights sum to scale.
    let norm = routing(3, Scoring::Softmax, false, 1, 1, None, true, 1.5);
    let (_, w) = moe_route::<f64>(&logits, None, &norm).unwrap();
    assert!((w.to_f64_vec().iter().sum::<f64>() - 1.5).abs() < 1e-12);
}

#[test]
fn moe_route_sigmoid_bias_top2_sum() {
    // 6 experts in 3 groups of 2, keep 1 group, top 2. Sigmoid scores of the logits:
    let l: Vec<f64> = vec![2.0, -2.0, 1.0, 1.0, 0.5, 0.4];
    let s: Vec<f64> = l.iter().map(|x| 1.0 / (1.0 + (-x).exp())).collect();
    let logits = Tensor::f64(&[1, 1, 6], l);
    let r = routing(2, Scoring::Sigmoid, true, 3, 1, Some(GroupScore::Top2Sum), true, 2.0);
    // No bias: group sums are g0 1.000, g1 1.462, g2 1.221, so group 1 wins.
    let zero = Tensor::f64(&[6], vec![0.0; 6]);
    let (i, w) = moe_route::<f64>(&logits, Some(&zero), &r).unwrap();
    assert_eq!(i.shape(), &[1, 1, 2]);
    assert_eq!(i.as_i32().unwrap(), &[2, 3], "ties go to the lower expert id");
    close(&w.to_f64_vec(), &[1.0, 1.0], 1e-15);
    // A bias on expert 5 makes group 2 win (top-2 sum) and puts expert 5 first, but the
    // weights stay the unbiased sigmoid scores, normalised, times 2.
    let bias = Tensor::f64(&[6], vec![0.0, 0.0, 0.0, 0.0, 0.0, 0.5]);
    let (i, w) = moe_route::<f64>(&logits, Some(&bias), &r).unwrap();
    assert_eq!(i.as_i32().unwrap(), &[5, 4]);
    let d = s[5] + s[4] + 1e-20;
    close(&w.to_f64_vec(), &[s[5] / d * 2.0, s[4] / d * 2.0], 1e-15);
    // Group max instead of top-2 sum (no bias): group 0's best (0.881) beats group 1's
    // (0.731) and group 2's (0.622), although group 1 has the larger sum.
    let rmax = routing(2, Scoring::Sigmoid, true, 3, 1, Some(GroupScore::Max), false, 1.0);
    let (i, w) = moe_route::<f64>(&logits, Some(&zero), &rmax).unwrap();
    assert_eq!(i.as_i32().unwrap(), &[0, 1]);
    close(&w.to_f64_vec(), &[s[0], s[1]], 1e-15);
    // Shape errors are errors.
    assert!(moe_route::<f64>(&logits, Some(&Tensor::f64(&[5], vec![0.0; 5])), &r).is_err());
    assert!(moe_route::<f64>(&logits, None, &r).is_err());
}

#[test]
fn moe_route_replay_reweighs_given_experts() {
    // Replaying the router's own choice gives its weights bit for bit, in f64 and f32,
    // for every scoring / grouping / normalisation (the selection settings play no part).
    let logits = fill(&[2, 3, 8], 11);
    let bias = fill(&[8], 12);
    for r in [
        routing(3, Scoring::Softmax, false, 4, 2, Some(GroupScore::Max), false, 2.5),
        routing(2, Scoring::Sigmoid, true, 4, 2, Some(GroupScore::Top2Sum), true, 1.7),
        routing(3, Scoring::Softmax, false, 1, 1, None, true, 1.0),
    ] {
        let b = r.selection_bias.then_some(&bias);
        let (i, w) = moe_route::<f64>(&logits, b, &r).unwrap();
        let (ri, rw) = moe_route_replay::<f64>(&logits, &i, &r).unwrap();
        assert_eq!((ri.as_i32(), rw.to_f64_vec()), (i.as_i32(), w.to_f64_vec()));
        let l32 = logits.to_f32();
        let (i, w) = moe_route::<f32>(&l32, b.map(|b| b.to_f32()).as_ref(), &r).unwrap();
        let (_, rw) = moe_route_replay::<f32>(&l32, &i, &r).unwrap();
        assert_eq!(rw.to_f32_vec(), w.to_f32_vec());
    }
    // Other experts: their scores, normalised and scaled; i64 indices come back as i32.
    let l = vec![2.0, 1.5, 1.9, 1.8];
    let r = routing(2, Scoring::Softmax, true, 2, 1, Some(GroupScore::Max), true, 2.0);
    let idx = Tensor::i64(&[1, 2], vec![3, 1]);
    let (i, w) = moe_route_replay::<f64>(&Tensor::f64(&[1, 4], l.clone()), &idx, &r).unwrap();
    assert_eq!(i.as_i32().unwrap(), &[3, 1]);
    let (a, b) = (l[3].exp(), l[1].exp());
    close(&w.to_f64_vec(), &[a / (a + b + 1e-20) * 2.0, b / (a + b + 1e-20) * 2.0], 1e-15);
    // Out-of-range experts are index errors, a wrong shape a shape error; never a panic.
    for bad in [vec![4, 0], vec![-1, 0]] {
        let e = moe_route_replay::<f64>(&Tensor::f64(&[1, 4], l.clone()), &Tensor::i32(&[1, 2], bad), &r).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Index, "{}", e.message);
        assert!(e.message.contains("out of range for 4 experts"), "{}", e.message);
    }
    let e = moe_route_replay::<f64>(&Tensor::f64(&[1, 4], l), &Tensor::i32(&[1, 3], vec![0, 1, 2]), &r).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Shape);
}

#[test]
fn swiglu_and_experts_match_loops() {
    let (h, i, e) = (5, 3, 4);
    let silu = |x: f64| x / (1.0 + (-x).exp());
    // out[r] = Σ_c down[r, c] · silu(gate[c]·x) · (up[c]·x)
    let ffn = |x: &[f64], g: &[f64], u: &[f64], d: &[f64]| -> Vec<f64> {
        let a: Vec<f64> = (0..i)
            .map(|c| {
                let gx: f64 = (0..h).map(|j| g[c * h + j] * x[j]).sum();
                let ux: f64 = (0..h).map(|j| u[c * h + j] * x[j]).sum();
                silu(gx) * ux
            })
            .collect();
        (0..h).map(|r| (0..i).map(|c| d[r * i + c] * a[c]).sum()).collect()
    };
    let x = fill(&[2, 3, h], 30);
    let (g, u, d) = (fill(&[i, h], 31), fill(&[i, h], 32), fill(&[h, i], 33));
    let y = swiglu::<f64>(&x, &g, &u, &d, false).unwrap();
    let xv = x.to_f64_vec();
    let want: Vec<f64> = xv.chunks(h).flat_map(|row| ffn(row, &g.to_f64_vec(), &u.to_f64_vec(), &d.to_f64_vec())).collect();
    close(&y.to_f64_vec(), &want, 1e-12);

    let (ge, ue, de) = (fill(&[e, i, h], 34), fill(&[e, i, h], 35), fill(&[e, h, i], 36));
    let idx = Tensor::i32(&[2, 3, 2], vec![3, 0, 1, 1, 2, 0, 0, 3, 2, 1, 3, 2]);
    let w = fill(&[2, 3, 2], 37);
    let y = expert_ffn::<f64>(&x, &idx, &w, &ge, &ue, &de, false).unwrap();
    let (gv, uv, dv, wv) = (ge.to_f64_vec(), ue.to_f64_vec(), de.to_f64_vec(), w.to_f64_vec());
    let ids = idx.to_i64_vec().unwrap();
    let mut want = vec![0.0; 6 * h];
    for t in 0..6 {
        for j in 0..2 {
            let ex = ids[t * 2 + j] as usize;
            let o = ffn(&xv[t * h..(t + 1) * h], &gv[ex * i * h..], &uv[ex * i * h..], &dv[ex * h * i..]);
            for r in 0..h {
                want[t * h + r] += wv[t * 2 + j] * o[r];
            }
        }
    }
    close(&y.to_f64_vec(), &want, 1e-12);
    let bad = Tensor::i32(&[2, 3, 2], vec![4; 12]);
    let err = expert_ffn::<f64>(&x, &bad, &w, &ge, &ue, &de, false).unwrap_err();
    assert_eq!(err.kind, crate::reference::ErrorKind::Index);
}

#[test]
fn cross_entropy_by_hand() {
    let logits = Tensor::f64(&[1, 3, 2], vec![0.0, 0.0, 1.0, 3.0, 5.0, -5.0]);
    let labels = Tensor::i64(&[1, 3], vec![1, -100, 0]);
    let y = cross_entropy::<f64>(&logits, &labels, Some(-100)).unwrap();
    assert_eq!(y.shape(), &[] as &[usize]);
    let want = (2f64.ln() + (1.0 + (-10f64).exp()).ln()) / 2.0;
    assert!((y.to_f64_vec()[0] - want).abs() < 1e-15);
    let err = cross_entropy::<f64>(&logits, &labels, None).unwrap_err();
    assert!(err.message.contains("label -100"), "{}", err.message);
    let none = cross_entropy::<f64>(&logits, &Tensor::i64(&[1, 3], vec![-100; 3]), Some(-100)).unwrap();
    assert!(none.to_f64_vec()[0].is_nan());
}

/// A key/value view that would read past its buffer is refused (no panic, no read out of
/// bounds), and so is one whose parts disagree with the query's width.
#[test]
fn attention_views_out_of_their_buffer_are_errors() {
    let (q, cache) = (fill(&[2, 1, 4, 6], 50).to_f32(), fill(&[5, 2, 6], 51).to_f32());
    let spec = AttentionSpec { heads: 4, kv_heads: 1, scale: 0.5, causal: true };
    let view = |strides: [usize; 3], d: usize| KvView { data: &cache, offset: 0, strides, shape: [2, 5, 1, d] };
    // Position-major [5, 2, 6]: batch stride 6, key stride 12.
    assert!(attention_views::<f32>(&q, &[view([6, 12, 0], 6)], &view([6, 12, 0], 6), None, spec, false).is_ok());
    let e = attention_views::<f32>(&q, &[view([6, 13, 0], 6)], &view([6, 12, 0], 6), None, spec, false).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Shape, "{e}");
    assert!(e.message.contains("runs past"), "{e}");
    let e = attention_views::<f32>(&q, &[view([6, 12, 0], 5)], &view([6, 12, 0], 6), None, spec, false).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Shape, "{e}");
}
