//! The backward kernels against central finite differences of the forward kernels, in
//! `f64`: for a random cotangent `u` of the outputs, `⟨u, f(x + h·e_i) − f(x − h·e_i)⟩ / 2h`
//! must match the analytic gradient at element `i` of every differentiable input (all
//! elements of small inputs, 50 of larger ones) within 1e-7 of the largest gradient.
//! Then the `f32` kernels must agree with the `f64` ones.

use super::grad::*;
use super::tests::fill;
use super::*;
use crate::reference::linalg::linear;
use dsc_compiler::ir::Float;

fn scaled(t: &Tensor, by: f64) -> Tensor {
    Tensor::f64(t.shape(), t.to_f64_vec().into_iter().map(|v| v * by).collect())
}

fn dot(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.shape(), b.shape());
    a.to_f64_vec().iter().zip(b.to_f64_vec()).map(|(x, y)| x * y).sum()
}

fn max_abs(t: &Tensor) -> f64 {
    t.to_f64_vec().iter().fold(0.0, |a, v| a.max(v.abs()))
}

const H: f64 = 1e-6;
const TOL: f64 = 1e-7;

/// Central finite differences of the scalar `f` at `x` against `grad`; returns the worst
/// error relative to the largest gradient element, and fails above [`TOL`] or when the
/// gradient is (nearly) all zero.
fn fd(name: &str, x: &Tensor, grad: &Tensor, f: impl Fn(&Tensor) -> f64) -> f64 {
    assert_eq!(x.shape(), grad.shape(), "{name}: gradient shape");
    let (xv, g) = (x.to_f64_vec(), grad.to_f64_vec());
    assert!(g.iter().all(|v| v.is_finite()), "{name}: non-finite gradient");
    let top = max_abs(grad);
    assert!(top > 1e-3, "{name}: the gradient is (nearly) all zero: {top:e}");
    let n = xv.len();
    let picks: Vec<usize> = if n <= 96 {
        (0..n).collect()
    } else {
        let mut s = 0x9e3779b97f4a7c15u64 ^ n as u64;
        (0..50)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                (s >> 33) as usize % n
            })
            .collect()
    };
    let mut worst = 0.0f64;
    for &i in &picks {
        let mut p = xv.clone();
        p[i] += H;
        let fp = f(&Tensor::f64(x.shape(), p));
        let mut m = xv.clone();
        m[i] -= H;
        let fm = f(&Tensor::f64(x.shape(), m));
        let num = (fp - fm) / (2.0 * H);
        let err = (num - g[i]).abs() / top;
        assert!(err <= TOL, "{name}: element {i}: finite difference {num} vs analytic {} (max |grad| {top})", g[i]);
        worst = worst.max(err);
    }
    eprintln!("fd {name:<40} max rel err {worst:.2e} ({} of {n} elements, max |grad| {top:.3})", picks.len());
    worst
}

/// The `f32` kernel's result against the `f64` one, relative to the largest element.
fn agree(name: &str, f64_result: &Tensor, f32_result: &Tensor) {
    assert!(matches!(f32_result.data(), Data::F32(_)), "{name}: not an f32 result");
    let (a, b) = (f64_result.to_f64_vec(), f32_result.to_f64_vec());
    assert_eq!(f64_result.shape(), f32_result.shape());
    let top = max_abs(f64_result).max(1e-30);
    let worst = a.iter().zip(&b).fold(0.0f64, |w, (x, y)| w.max((x - y).abs() / top));
    eprintln!("f32 {name:<39} max rel diff {worst:.2e}");
    assert!(worst <= 1e-5, "{name}: f32 differs from f64 by {worst:e} of the largest element");
}

#[test]
fn weight_grad_fd() {
    let (x, w, u) = (fill(&[2, 3, 5], 1), fill(&[4, 5], 2), fill(&[2, 3, 4], 3));
    let dw = weight_grad::<f64>(&u, &x).unwrap();
    let xv = x.to_f64_vec();
    let f = |w: &Tensor| {
        let y = linear(&xv, 6, 5, w.as_f64().unwrap(), 4, false).unwrap();
        dot(&u, &Tensor::f64(&[2, 3, 4], y))
    };
    fd("weight_grad dw", &w, &dw, f);
    agree("weight_grad dw", &dw, &weight_grad::<f32>(&u.to_f32(), &x.to_f32()).unwrap());
    assert!(weight_grad::<f64>(&u, &fill(&[3, 2, 5], 1)).is_err());
}

#[test]
fn rms_norm_grad_fd() {
    let (x, u) = (fill(&[2, 3, 7], 11), fill(&[2, 3, 7], 12));
    let gain = Tensor::f64(&[7], fill(&[7], 13).to_f64_vec().iter().map(|v| v + 0.5).collect());
    let eps = 1e-6;
    let (dx, dg) = rms_norm_grad::<f64>(&x, &gain, &u, eps).unwrap();
    fd("rms_norm dx", &x, &dx, |x| dot(&u, &rms_norm::<f64>(x, &gain, eps).unwrap()));
    fd("rms_norm dgain", &gain, &dg, |g| dot(&u, &rms_norm::<f64>(&x, g, eps).unwrap()));
    let (dx32, dg32) = rms_norm_grad::<f32>(&x.to_f32(), &gain.to_f32(), &u.to_f32(), eps).unwrap();
    agree("rms_norm dx", &dx, &dx32);
    agree("rms_norm dgain", &dg, &dg32);
}

struct AttnCase {
    name: &'static str,
    b: usize,
    sq: usize,
    sk: usize,
    heads: usize,
    kv: usize,
    dk: usize,
    dv: usize,
    causal: bool,
    masked: bool,
}

fn attention_case(c: &AttnCase, seed: u64) {
    let AttnCase { name, b, sq, sk, heads, kv, dk, dv, causal, masked } = *c;
    let q = scaled(&fill(&[b, sq, heads, dk], seed), 1.5);
    let k = scaled(&fill(&[b, sk, kv, dk], seed + 1), 1.5);
    let v = fill(&[b, sk, kv, dv], seed + 2);
    let u = fill(&[b, sq, heads, dv], seed + 3);
    // Some -inf entries, and query row 1 of batch 0 sees no key at all.
    let mask = masked.then(|| {
        let mut m = fill(&[b, sq, sk], seed + 4).to_f64_vec();
        for (i, x) in m.iter_mut().enumerate() {
            if i % 7 == 3 || (sq > 1 && i / sk == 1) {
                *x = f64::NEG_INFINITY;
            }
        }
        Tensor::f64(&[b, sq, sk], m)
    });
    let spec = AttentionSpec { heads, kv_heads: kv, scale: 0.8, causal };
    let (o, l) = attention_lse::<f64>(&q, &k, &v, mask.as_ref(), spec).unwrap();
    assert_eq!(o, attention::<f64>(&q, &k, &v, mask.as_ref(), spec).unwrap());
    // The log-sum-exps against a direct computation.
    let (qv, kvv, lv) = (q.to_f64_vec(), k.to_f64_vec(), l.to_f64_vec());
    let mv = mask.as_ref().map(|m| m.to_f64_vec());
    for bi in 0..b {
        for i in 0..sq {
            for h in 0..heads {
                let kh = h / (heads / kv);
                let visible = if causal { sk - sq + i + 1 } else { sk };
                let mut terms = Vec::new();
                for j in 0..visible {
                    let s: f64 =
                        (0..dk).map(|d| qv[((bi * sq + i) * heads + h) * dk + d] * kvv[((bi * sk + j) * kv + kh) * dk + d]).sum::<f64>()
                            * 0.8
                            + mv.as_ref().map_or(0.0, |m| m[(bi * sq + i) * sk + j]);
                    terms.push(s);
                }
                let want = terms.iter().map(|s| s.exp()).sum::<f64>().ln();
                let got = lv[(bi * sq + i) * heads + h];
                if want == f64::NEG_INFINITY {
                    assert_eq!(got, f64::NEG_INFINITY, "{name}: lse of a row that sees nothing");
                } else {
                    assert!((got - want).abs() < 1e-12, "{name}: lse {got} vs {want}");
                }
            }
        }
    }
    let (dq, dk_, dv_) = attention_grad::<f64>(&q, &k, &v, mask.as_ref(), &o, &l, &u, spec).unwrap();
    let f = |q: &Tensor, k: &Tensor, v: &Tensor| dot(&u, &attention::<f64>(q, k, v, mask.as_ref(), spec).unwrap());
    fd(&format!("{name} dq"), &q, &dq, |x| f(x, &k, &v));
    fd(&format!("{name} dk"), &k, &dk_, |x| f(&q, x, &v));
    fd(&format!("{name} dv"), &v, &dv_, |x| f(&q, &k, x));
    if masked && sq > 1 {
        let dqv = dq.to_f64_vec();
        assert!(dqv[heads * dk..2 * heads * dk].iter().all(|&x| x == 0.0), "{name}: a row that sees nothing has a gradient");
    }
    let m32 = mask.as_ref().map(Tensor::to_f32);
    let (q32, k32, v32) = (q.to_f32(), k.to_f32(), v.to_f32());
    let (o32, l32) = attention_lse::<f32>(&q32, &k32, &v32, m32.as_ref(), spec).unwrap();
    agree(&format!("{name} lse"), &l, &l32);
    let (dq32, dk32, dv32) = attention_grad::<f32>(&q32, &k32, &v32, m32.as_ref(), &o32, &l32, &u.to_f32(), spec).unwrap();
    agree(&format!("{name} dq"), &dq, &dq32);
    agree(&format!("{name} dk"), &dk_, &dk32);
    agree(&format!("{name} dv"), &dv_, &dv32);
}

#[test]
fn attention_grad_fd() {
    let cases = [
        AttnCase { name: "attn gqa causal masked", b: 2, sq: 5, sk: 5, heads: 4, kv: 2, dk: 3, dv: 2, causal: true, masked: true },
        AttnCase { name: "attn gqa plain", b: 2, sq: 5, sk: 5, heads: 4, kv: 2, dk: 3, dv: 5, causal: false, masked: false },
        AttnCase { name: "attn mha masked sq<sk", b: 2, sq: 3, sk: 7, heads: 4, kv: 4, dk: 5, dv: 3, causal: false, masked: true },
        AttnCase { name: "attn mha causal sq<sk", b: 2, sq: 3, sk: 7, heads: 4, kv: 4, dk: 3, dv: 2, causal: true, masked: false },
        AttnCase { name: "attn mqa causal masked decode", b: 2, sq: 2, sk: 6, heads: 4, kv: 1, dk: 4, dv: 6, causal: true, masked: true },
        // More query rows than one block of the backward (128), causal with sq < sk.
        AttnCase { name: "attn blocked causal masked", b: 1, sq: 130, sk: 133, heads: 2, kv: 1, dk: 3, dv: 2, causal: true, masked: true },
    ];
    for (i, c) in cases.iter().enumerate() {
        attention_case(c, 100 + 10 * i as u64);
    }
}

#[test]
fn attention_grad_checks_shapes() {
    let (q, k, v) = (fill(&[1, 2, 2, 3], 1), fill(&[1, 2, 1, 3], 2), fill(&[1, 2, 1, 4], 3));
    let spec = AttentionSpec { heads: 2, kv_heads: 1, scale: 1.0, causal: false };
    let (o, l) = attention_lse::<f64>(&q, &k, &v, None, spec).unwrap();
    assert!(attention_grad::<f64>(&q, &k, &v, None, &o, &o, &o, spec).is_err(), "lse of the wrong shape");
    assert!(attention_grad::<f64>(&q, &k, &v, None, &o, &l, &l, spec).is_err(), "dout of the wrong shape");
    assert!(attention_grad::<f64>(&q, &k, &v, None, &o, &l, &o, spec).is_ok());
}

#[test]
fn swiglu_grad_fd() {
    let (x, u) = (fill(&[2, 3, 5], 21), fill(&[2, 3, 5], 22));
    let (gate, up, down) = (scaled(&fill(&[4, 5], 23), 1.5), scaled(&fill(&[4, 5], 24), 1.5), fill(&[5, 4], 25));
    let g = swiglu_grad::<f64>(&x, &gate, &up, &down, &u).unwrap();
    let f = |x: &Tensor, g: &Tensor, p: &Tensor, d: &Tensor| dot(&u, &swiglu::<f64>(x, g, p, d, false).unwrap());
    fd("swiglu dx", &x, &g[0], |t| f(t, &gate, &up, &down));
    fd("swiglu dgate", &gate, &g[1], |t| f(&x, t, &up, &down));
    fd("swiglu dup", &up, &g[2], |t| f(&x, &gate, t, &down));
    fd("swiglu ddown", &down, &g[3], |t| f(&x, &gate, &up, t));
    let g32 = swiglu_grad::<f32>(&x.to_f32(), &gate.to_f32(), &up.to_f32(), &down.to_f32(), &u.to_f32()).unwrap();
    for (i, n) in ["dx", "dgate", "dup", "ddown"].iter().enumerate() {
        agree(&format!("swiglu {n}"), &g[i], &g32[i]);
    }
}

#[test]
fn expert_ffn_grad_fd() {
    let (t, h, inter, e, k) = (10, 4, 3, 6, 2);
    let x = scaled(&fill(&[2, 5, h], 31), 1.5);
    let u = fill(&[2, 5, h], 32);
    // Two distinct experts per token out of {0, 1, 2, 3, 5}: expert 4 is never chosen.
    let pick = |j: usize| if j == 4 { 5 } else { j as i32 };
    let ids: Vec<i32> = (0..t).flat_map(|i| [pick(i % 5), pick((i + 1 + i / 5) % 5)]).collect();
    let idx = Tensor::i32(&[2, 5, k], ids);
    let w = fill(&[2, 5, k], 33);
    let (gate, up, down) = (scaled(&fill(&[e, inter, h], 34), 1.5), scaled(&fill(&[e, inter, h], 35), 1.5), fill(&[e, h, inter], 36));
    let g = expert_ffn_grad::<f64>(&x, &idx, &w, &gate, &up, &down, &u).unwrap();
    let f = |x: &Tensor, w: &Tensor, g: &Tensor, p: &Tensor, d: &Tensor| dot(&u, &expert_ffn::<f64>(x, &idx, w, g, p, d, false).unwrap());
    fd("expert_ffn dx", &x, &g[0], |a| f(a, &w, &gate, &up, &down));
    fd("expert_ffn dweights", &w, &g[1], |a| f(&x, a, &gate, &up, &down));
    fd("expert_ffn dgate", &gate, &g[2], |a| f(&x, &w, a, &up, &down));
    fd("expert_ffn dup", &up, &g[3], |a| f(&x, &w, &gate, a, &down));
    fd("expert_ffn ddown", &down, &g[4], |a| f(&x, &w, &gate, &up, a));
    for (j, wt) in g[2..].iter().enumerate() {
        let v = wt.to_f64_vec();
        let per = inter * h;
        assert!(v[4 * per..5 * per].iter().all(|&x| x == 0.0), "unchosen expert 4 has a gradient in output {}", j + 2);
        assert!(v[3 * per..4 * per].iter().any(|&x| x != 0.0), "chosen expert 3 has no gradient in output {}", j + 2);
    }
    let g32 = expert_ffn_grad::<f32>(&x.to_f32(), &idx, &w.to_f32(), &gate.to_f32(), &up.to_f32(), &down.to_f32(), &u.to_f32()).unwrap();
    for (i, n) in ["dx", "dweights", "dgate", "dup", "ddown"].iter().enumerate() {
        agree(&format!("expert_ffn {n}"), &g[i], &g32[i]);
    }
    let bad = Tensor::i32(&[2, 5, k], vec![6; t * k]);
    assert!(expert_ffn_grad::<f64>(&x, &bad, &w, &gate, &up, &down, &u).is_err());
}

#[allow(clippy::too_many_arguments)]
fn routing(k: u32, scoring: Scoring, bias: bool, groups: u32, kept: u32, gs: Option<GroupScore>, normalize: bool, scale: f64) -> Routing {
    Routing { top_k: k, scoring, selection_bias: bias, groups, groups_kept: kept, group_score: gs, normalize, scale: Float::from(scale) }
}

#[test]
fn moe_route_grad_fd() {
    use GroupScore::*;
    use Scoring::*;
    let cases = [
        ("route softmax norm scale", routing(2, Softmax, false, 1, 1, None, true, 2.5)),
        ("route sigmoid norm bias groups", routing(2, Sigmoid, true, 3, 2, Some(Top2Sum), true, 2.5)),
        ("route softmax raw groups max", routing(2, Softmax, false, 2, 1, Some(Max), false, 1.7)),
        ("route sigmoid raw", routing(2, Sigmoid, false, 1, 1, None, false, 0.6)),
        ("route softmax norm k3 bias", routing(3, Softmax, true, 1, 1, None, true, 1.0)),
    ];
    let e = 6;
    for (n, (name, r)) in cases.iter().enumerate() {
        let seed = 40 + 10 * n as u64;
        let logits = scaled(&fill(&[2, 5, e], seed), 2.0);
        let bias = scaled(&fill(&[e], seed + 1), 0.3);
        let b = r.selection_bias.then_some(&bias);
        let (idx, _) = moe_route::<f64>(&logits, b, r).unwrap();
        let u = fill(&[2, 5, r.top_k as usize], seed + 2);
        let dl = moe_route_grad::<f64>(&logits, &idx, &u, r).unwrap();
        let f = |l: &Tensor| {
            let (i, w) = moe_route::<f64>(l, b, r).unwrap();
            assert_eq!(i, idx, "{name}: the perturbation changed the selection");
            dot(&u, &w)
        };
        fd(&format!("moe_route {name}"), &logits, &dl, f);
        agree(&format!("moe_route {name}"), &dl, &moe_route_grad::<f32>(&logits.to_f32(), &idx, &u.to_f32(), r).unwrap());
    }
    // One expert, normalised: the weight is s/(s + 1e-20), flat up to the 1e-20.
    let r = routing(1, Softmax, false, 1, 1, None, true, 1.0);
    let logits = fill(&[3, e], 7);
    let (idx, _) = moe_route::<f64>(&logits, None, &r).unwrap();
    let dl = moe_route_grad::<f64>(&logits, &idx, &fill(&[3, 1], 8), &r).unwrap();
    assert!(max_abs(&dl) < 1e-15, "top-1 normalised routing has a gradient of {:e}", max_abs(&dl));
    assert!(moe_route_grad::<f64>(&logits, &Tensor::i32(&[3, 1], vec![0, 6, 1]), &fill(&[3, 1], 8), &r).is_err());
}

#[test]
fn cross_entropy_grad_fd() {
    let logits = scaled(&fill(&[2, 4, 7], 61), 2.0);
    for (name, ignore, labels) in [
        ("cross_entropy ignore", Some(-100), Tensor::i32(&[2, 4], vec![3, -100, 0, 6, 2, 2, -100, 5])),
        ("cross_entropy all", None, Tensor::i64(&[2, 4], vec![3, 1, 0, 6, 2, 2, 4, 5])),
    ] {
        let dloss = 0.83;
        let dl = cross_entropy_grad::<f64>(&logits, &labels, &Tensor::f64(&[], vec![dloss]), ignore).unwrap();
        fd(name, &logits, &dl, |l| dloss * cross_entropy::<f64>(l, &labels, ignore).unwrap().to_f64_vec()[0]);
        if ignore.is_some() {
            let v = dl.to_f64_vec();
            assert!(v[7..14].iter().chain(&v[42..49]).all(|&x| x == 0.0), "an ignored row has a gradient");
        }
        let dl32 = cross_entropy_grad::<f32>(&logits.to_f32(), &labels, &Tensor::f32(&[], vec![dloss as f32]), ignore).unwrap();
        agree(name, &dl, &dl32);
    }
    let bad = Tensor::i32(&[2, 4], vec![7; 8]);
    assert!(cross_entropy_grad::<f64>(&logits, &bad, &Tensor::f64(&[], vec![1.0]), None).is_err());
}
