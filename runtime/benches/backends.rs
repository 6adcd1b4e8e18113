//! The wgpu backend against the reference interpreter, in one run, as ratios:
//!
//! 1. per kernel class: one IR node at a size typical of a small model's decode or prefill,
//!    the reference interpreter's time vs the device kernel's (inputs already on the
//!    device, timed to completion with a device sync);
//! 2. matmul's achieved GFLOP/s on the device vs the machine's measured peak, taken as the
//!    reference backend's own multithreaded GEMM (the `gemm` crate) at a large size;
//! 3. whole models: prefill and greedy decode of the transformers fixtures in golden/hf
//!    on both backends.
//!
//! ```text
//! cargo bench -p dsc-runtime --bench backends            # lavapipe on a machine without a GPU
//! cargo bench -p dsc-runtime --bench backends -- matmul  # only lines whose name contains `matmul`
//! ```
//!
//! On lavapipe the "device" is the same CPU cores running SPIR-V through LLVM, so the
//! ratios say how well the generated kernels do against hand-tuned CPU code, not what a
//! GPU would do; runtime/benches/gpu.sh measures a real GPU.

use dsc_compiler::codegen::select::node_work;
use dsc_compiler::ir::{Bindings, DType, Dim, Float, Function, Graph, Mode, Module, Op, Routing, Scoring, Ty, Value};
use dsc_runtime::checkpoint::{ModelDir, OpenOptions};
use dsc_runtime::generate::{generate, Backend, CompileOptions, GenerateOptions, ModelBackend, ReferenceBackend};
use dsc_runtime::reference::{run, Options, Tensor};
use dsc_runtime::wgpu::exec::WgpuEngine;
use dsc_runtime::wgpu::{Repr, WgpuBackend};
use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

/// Median seconds of `f` over at least 3 runs and ~0.5 s (after one warm-up run).
fn time(mut f: impl FnMut()) -> f64 {
    f();
    let mut t = Vec::new();
    let start = Instant::now();
    while t.len() < 3 || (start.elapsed().as_secs_f64() < 0.5 && t.len() < 200) {
        let s = Instant::now();
        f();
        t.push(s.elapsed().as_secs_f64());
    }
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

fn random(shape: &[usize], seed: u64) -> Tensor {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    Tensor::from_fn(shape, |_| {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0
    })
}

/// One node over inputs of the given types; returns the graph, the node and a module
/// running it as its prefill entry.
fn one_node(op: Op, inputs: &[Ty]) -> (Graph, dsc_compiler::ir::NodeId, Module) {
    let mut g = Graph::new();
    let args: Vec<Value> = inputs.iter().enumerate().map(|(i, t)| g.input(i as u32, &format!("x{i}"), t.clone(), None).into()).collect();
    let n = g.add_inferred(op, &args, None).expect("a well-typed benchmark node");
    let outs: Vec<Value> = (0..g.node(n).outputs.len()).map(|i| n.out(i as u16)).collect();
    g.ret(&outs, None);
    let mut m = Module::new();
    m.add_function(Function { name: "main".into(), graph: g.clone() });
    m.set_entry(Mode::Prefill, "main");
    (g, n, m)
}

fn ty(dtype: DType, shape: &[usize]) -> Ty {
    Ty::new(dtype, shape.iter().map(|&d| Dim::lit(d as i64)).collect::<Vec<_>>())
}

struct Case {
    name: &'static str,
    op: Op,
    inputs: Vec<(Ty, Tensor)>,
    flops: f64,
}

fn cases() -> Vec<Case> {
    let f = |shape: &[usize], seed| (ty(DType::F32, shape), random(shape, seed));
    let ids = |shape: &[usize], hi: i64| {
        let n: usize = shape.iter().product();
        (ty(DType::I64, shape), Tensor::i64(shape, (0..n as i64).map(|i| (i * 7919) % hi).collect()))
    };
    let (m, k, n) = (64, 1024, 1024);
    let (b, c, h, d) = (4, 1024, 16, 128);
    let (t, e, hid, inter, top) = (64, 64, 512, 256, 6);
    let route = Routing {
        top_k: top as u32,
        scoring: Scoring::Softmax,
        selection_bias: false,
        groups: 1,
        groups_kept: 1,
        group_score: None,
        normalize: false,
        scale: Float::new(1.0),
    };
    let idx: Vec<i64> = (0..t * top).map(|i| ((i * 37) % e) as i64).collect();
    vec![
        Case {
            name: "matmul 64x1024 · 1024x1024ᵀ",
            op: Op::MatMul,
            inputs: vec![f(&[m, k], 1), f(&[n, k], 2)],
            flops: 2.0 * (m * k * n) as f64,
        },
        Case {
            name: "rms_norm 64x4096",
            op: Op::RmsNorm { eps: Float::new(1e-6) },
            inputs: vec![f(&[64, 4096], 3), f(&[4096], 4)],
            flops: 0.0,
        },
        Case { name: "softmax 1024x1024", op: Op::Softmax { axis: 1 }, inputs: vec![f(&[1024, 1024], 5)], flops: 0.0 },
        Case {
            name: "mul 64x8192",
            op: Op::Binary(dsc_compiler::ir::BinaryOp::Mul),
            inputs: vec![f(&[64, 8192], 6), f(&[64, 8192], 7)],
            flops: 0.0,
        },
        Case {
            name: "attention decode b4 c1024 h16 d128",
            op: Op::Attention {
                heads: h as u32,
                kv_heads: h as u32,
                scale: Float::new(1.0 / (d as f64).sqrt()),
                causal: true,
                masked: false,
                lse: false,
            },
            inputs: vec![f(&[b, 1, h, d], 8), f(&[b, c, h, d], 9), f(&[b, c, h, d], 10)],
            flops: 4.0 * (b * c * h * d) as f64,
        },
        Case {
            name: "rope b4 s64 h16 d128",
            op: Op::Rope { layout: dsc_compiler::ir::RopeLayout::HalfSplit, theta: Float::new(10000.0), rotary_dim: 128, yarn: None },
            inputs: vec![f(&[4, 64, 16, 128], 11), ids(&[4, 64], 4096)],
            flops: 0.0,
        },
        Case { name: "moe_route 256 tokens, 64 experts, top 6", op: Op::MoeRoute(route), inputs: vec![f(&[256, e], 12)], flops: 0.0 },
        Case {
            name: "expert_ffn 64 tokens, 64 experts 512→256, top 6",
            op: Op::ExpertFfn,
            inputs: vec![
                f(&[t, hid], 13),
                (ty(DType::I64, &[t, top]), Tensor::i64(&[t, top], idx)),
                f(&[t, top], 14),
                f(&[e, inter, hid], 15),
                f(&[e, inter, hid], 16),
                f(&[e, hid, inter], 17),
            ],
            flops: 6.0 * (t * top * hid * inter) as f64,
        },
    ]
}

fn main() {
    let filter: Option<String> = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let want = |name: &str| filter.as_deref().is_none_or(|f| name.contains(f));
    let dev = WgpuBackend::new();
    println!("adapter: {}", dev.adapter_name());
    println!("reference: {} threads", rayon::current_num_threads());

    println!("\n== kernels: reference interpreter vs device (inputs resident, synced) ==");
    println!("{:<48} {:>12} {:>12} {:>9} {:>12}", "node", "reference ms", "device ms", "ref/dev", "dev GFLOP/s");
    let no_weights: HashMap<String, Tensor> = HashMap::new();
    let mut device_matmul_gflops = None;
    for c in cases() {
        if !want(c.name) {
            continue;
        }
        let tys: Vec<Ty> = c.inputs.iter().map(|(t, _)| t.clone()).collect();
        let (g, n, module) = one_node(c.op.clone(), &tys);
        let host: Vec<Tensor> = c.inputs.iter().map(|(_, t)| t.clone()).collect();
        let r = time(|| {
            run(&module, Mode::Prefill, &host, &no_weights, &Options::default()).expect("reference run");
        });
        let work = match node_work(&g, n) {
            Ok(w) => w,
            Err(u) => {
                println!("{:<48} {:>12.3} {:>12} (no kernel: {})", c.name, r * 1e3, "-", u.reason);
                continue;
            }
        };
        let bind = Bindings::default();
        let ins: Vec<_> = host.iter().zip(&tys).map(|(t, ty)| dev.upload(t, Repr::of(ty.dtype).unwrap()).unwrap()).collect();
        let outs: Vec<_> = g.node(n).outputs.iter().map(|t| dev.empty(numel(t), Repr::of(t.dtype).unwrap()).unwrap()).collect();
        let d = time(|| {
            dev.execute(&work, &ins, &outs, &bind).expect("device run");
            dev.sync();
        });
        let gflops = if c.flops > 0.0 { format!("{:.2}", c.flops / d / 1e9) } else { "-".into() };
        if matches!(c.op, Op::MatMul) {
            device_matmul_gflops = Some(c.flops / d / 1e9);
        }
        println!("{:<48} {:>12.3} {:>12.3} {:>9.2} {:>12}", c.name, r * 1e3, d * 1e3, r / d, gflops);
    }

    if want("peak") || want("matmul") {
        // The machine's measured peak: the reference backend's multithreaded GEMM on a
        // square problem large enough to be compute-bound.
        let s = 1024;
        let (_, _, module) = one_node(Op::MatMul, &[ty(DType::F32, &[s, s]), ty(DType::F32, &[s, s])]);
        let host = vec![random(&[s, s], 21), random(&[s, s], 22)];
        let t = time(|| {
            run(&module, Mode::Prefill, &host, &no_weights, &Options::default()).expect("reference run");
        });
        let peak = 2.0 * (s * s * s) as f64 / t / 1e9;
        println!("\nmachine peak (reference gemm, f32 {s}³): {peak:.1} GFLOP/s");
        if let Some(g) = device_matmul_gflops {
            println!("device tiled matmul: {g:.2} GFLOP/s = {:.1}% of the measured peak", 100.0 * g / peak);
        }
    }

    println!("\n== whole models (golden/hf fixtures): prefill of both prompts, greedy decode of 16 tokens ==");
    println!(
        "{:<18} {:>14} {:>14} {:>9} {:>14} {:>14} {:>9}",
        "case", "ref prefill ms", "dev prefill ms", "ref/dev", "ref decode t/s", "dev decode t/s", "dev/ref"
    );
    for case in ["llama_dense", "llama_gqa", "deepseek_v2", "deepseek_v2_lite", "deepseek_v3"] {
        if !want(case) {
            continue;
        }
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../golden/hf").join(case);
        let open = || ModelDir::open(&dir, &OpenOptions::default()).expect("fixture");
        let text = std::fs::read_to_string(dir.join("input_ids.json")).expect("input_ids.json");
        let json: serde_json::Value = serde_json::from_str(&text).expect("json");
        let prompts: Vec<Vec<i64>> = json["input_ids"]
            .as_array()
            .expect("input_ids")
            .iter()
            .map(|r| r.as_array().expect("row").iter().map(|x| x.as_i64().expect("id")).collect())
            .collect();
        let md = open();
        let reference = ReferenceBackend::new(md.spec, md.weights, CompileOptions::default(), Options::default());
        let md = open();
        let device = ModelBackend::with_engine(md.spec, md.weights, CompileOptions::default(), WgpuEngine::on(WgpuBackend::new()));
        let measure = |b: &dyn Backend| -> Result<(f64, f64), String> {
            let opts = GenerateOptions { max_new_tokens: 16, ..GenerateOptions::default() };
            generate(b, &prompts, &opts).map_err(|e| e.to_string())?; // warm-up: compiles, uploads weights
            let mut best = (f64::MAX, 0.0f64);
            for _ in 0..3 {
                let g = generate(b, &prompts, &opts).map_err(|e| e.to_string())?;
                let tps = (g.stats.decode_steps * g.stats.batch) as f64 / g.stats.decode_secs;
                best = (best.0.min(g.stats.prefill_secs), best.1.max(tps));
            }
            Ok(best)
        };
        let r = measure(&reference).expect("reference generate");
        match measure(&device) {
            Ok(d) => println!(
                "{case:<18} {:>14.2} {:>14.2} {:>9.2} {:>14.0} {:>14.0} {:>9.2}",
                r.0 * 1e3,
                d.0 * 1e3,
                r.0 / d.0,
                r.1,
                d.1,
                d.1 / r.1
            ),
            Err(e) => println!("{case:<18} {:>14.2} (wgpu: {e})", r.0 * 1e3),
        }
    }
}

fn numel(t: &Ty) -> usize {
    t.shape.0.iter().map(|d| d.as_const().expect("constant benchmark shapes") as usize).product()
}
