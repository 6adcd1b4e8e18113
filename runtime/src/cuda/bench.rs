//! Per-kernel throughput on the CUDA device against peaks measured in the same run
//! (`runtime/benches/gpu.sh`; ignored by `cargo test`, it needs a device):
//!
//! * copy peak: a 2 GiB device-to-device copy (bytes read + written per second);
//! * matmul peak: an 8192³ f32 GEMM through cuBLAS (when libcublas loads; otherwise the
//!   row says so and FLOP/s percentages are left out).
//!
//! The kernels are those of DeepSeek-V3's own sizes (`specs/deepseek_v3.dsc` with
//! `dtype = f32`, the element type the fixtures use): every node of its decode module
//! (`b = 8, c = 4096, s = 1`) and prefill module (`b = 1, s = 2048`) that has kernels,
//! one per distinct launch, on device-filled inputs (floats 0.01, integers 0: so every
//! token routes to expert 0; routing does not change a dense kernel's work). Bytes are
//! the buffers each launch binds, each counted once (compulsory traffic, a lower bound
//! on what moves); FLOPs are counted for matmuls only (`2·m·n·k`).

use super::{CudaBackend, Repr};
use dsc_compiler::codegen::launch::{Arg, NodeWork};
use dsc_compiler::codegen::select::node_work;
use dsc_compiler::codegen::KernelSpec;
use dsc_compiler::ir::{Bindings, DType, Mode, Op};
use std::collections::BTreeMap;

/// Seconds per iteration of `f`, after one warm-up, by events on the stream.
fn time(b: &CudaBackend, reps: usize, mut f: impl FnMut()) -> f64 {
    use cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT;
    f();
    let s = b.stream().record_event(Some(CU_EVENT_DEFAULT)).unwrap();
    for _ in 0..reps {
        f();
    }
    let e = b.stream().record_event(Some(CU_EVENT_DEFAULT)).unwrap();
    b.sync().unwrap();
    s.elapsed_ms(&e).unwrap() as f64 / 1e3 / reps as f64
}

fn copy_peak(b: &CudaBackend) -> f64 {
    let n = 2usize << 30;
    let src = b.filled(n / 4, Repr::F32, 0).unwrap();
    let mut dst = unsafe { b.stream().alloc::<u8>(n) }.unwrap();
    let src_view = src_slice(&src);
    let t = time(b, 5, || b.stream().memcpy_dtod(src_view, &mut dst).unwrap());
    2.0 * n as f64 / t
}

fn src_slice(d: &super::DeviceBuf) -> &cudarc::driver::CudaSlice<u8> {
    d.mem()
}

/// FLOP/s of an 8192³ f32 GEMM in cuBLAS, or why there is none.
fn matmul_peak(b: &CudaBackend) -> Result<f64, String> {
    use cudarc::cublas::{CudaBlas, Gemm, GemmConfig};
    if !unsafe { cudarc::cublas::sys::is_culib_present() } {
        return Err("libcublas not found".into());
    }
    let n = 8192usize;
    let x = b.stream().alloc_zeros::<f32>(n * n).map_err(|e| e.to_string())?;
    let y = b.stream().alloc_zeros::<f32>(n * n).map_err(|e| e.to_string())?;
    let mut z = b.stream().alloc_zeros::<f32>(n * n).map_err(|e| e.to_string())?;
    let blas = CudaBlas::new(b.stream().clone()).map_err(|e| format!("{e:?}"))?;
    let cfg = GemmConfig {
        transa: cudarc::cublas::sys::cublasOperation_t::CUBLAS_OP_N,
        transb: cudarc::cublas::sys::cublasOperation_t::CUBLAS_OP_N,
        m: n as i32,
        n: n as i32,
        k: n as i32,
        alpha: 1.0f32,
        lda: n as i32,
        ldb: n as i32,
        beta: 0.0f32,
        ldc: n as i32,
    };
    let t = time(b, 5, || unsafe { blas.gemm(cfg, &x, &y, &mut z) }.unwrap());
    Ok(2.0 * (n as f64).powi(3) / t)
}

/// The bench spec: DeepSeek-V3 in f32.
fn module(mode: Mode) -> dsc_compiler::ir::Module {
    let specs = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../specs").canonicalize().unwrap();
    let dir = std::env::temp_dir().join(format!("dsc-cuda-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("bench.dsc");
    let text = format!("include \"{}\"\nmodel bench extends deepseek_v3 {{ dtype = f32 }}\n", specs.join("deepseek_v3.dsc").display());
    std::fs::write(&file, text).unwrap();
    super::abi::tests::compiled(&file, mode, dsc_compiler::passes::mla_absorb::MlaMode::Absorb)
}

#[test]
#[ignore = "needs a CUDA device; runtime/benches/gpu.sh runs it"]
fn kernel_throughput() {
    let b = CudaBackend::new(0).unwrap_or_else(|e| panic!("{e}"));
    let copy = copy_peak(&b);
    let mm = matmul_peak(&b);
    println!("device: {}", b.device_name());
    println!("peak copy bandwidth: {:.0} GB/s (2 GiB device-to-device, read + write)", copy / 1e9);
    match &mm {
        Ok(f) => println!("peak matmul: {:.1} TFLOP/s (cuBLAS f32 GEMM 8192³)", f / 1e12),
        Err(e) => println!("peak matmul: n/a ({e})"),
    }
    println!(
        "{:<7} {:<36} {:<16} {:>10} {:>12} {:>9} {:>6} {:>10} {:>6}",
        "mode", "kernel", "node", "µs", "MB", "GB/s", "%copy", "TFLOP/s", "%mm"
    );
    for (mode, bind) in
        [(Mode::Decode, Bindings { batch: 8, seq: 1, cache: 4096 }), (Mode::Prefill, Bindings { batch: 1, seq: 2048, cache: 0 })]
    {
        let m = module(mode);
        let mut seen = BTreeMap::new();
        for f in &m.functions {
            for n in f.graph.nodes() {
                let g = &f.graph;
                if matches!(g.node(n).op, Op::Input { .. } | Op::Param { .. } | Op::Const { .. } | Op::Call { .. } | Op::Return) {
                    continue;
                }
                let Ok(work @ NodeWork::Launches { .. }) = node_work(g, n) else { continue };
                let ins: Vec<(DType, usize)> =
                    g.inputs(n).iter().map(|&v| (g.ty(v).dtype, g.ty(v).shape.eval(&bind).iter().product::<i64>() as usize)).collect();
                let key = format!("{:?} {ins:?}", work.kernels().map(|k| k.name()).collect::<Vec<_>>());
                if seen.insert(key, ()).is_some() {
                    continue;
                }
                let fill = |(d, len): (DType, usize)| {
                    let r = Repr::of(d)?;
                    let word = match r {
                        Repr::F32 => 0.01f32.to_bits(),
                        Repr::F16 => half::f16::from_f32(0.01).to_bits() as u32,
                        Repr::Bf16 => half::bf16::from_f32(0.01).to_bits() as u32,
                        Repr::I32 => 0,
                    };
                    b.filled(len, r, word)
                };
                let Ok(inb) = ins.iter().map(|&i| fill(i)).collect::<Result<Vec<_>, _>>() else { continue };
                let outs = g
                    .node(n)
                    .outputs
                    .iter()
                    .map(|t| fill((t.dtype, t.shape.eval(&bind).iter().product::<i64>() as usize)))
                    .collect::<Result<Vec<_>, _>>();
                let Ok(outs) = outs else { continue };
                let label = g.node(n).op.name();
                if let Err(e) = b.execute(&work, &inb, &outs, &bind).and_then(|_| b.sync()) {
                    println!("{:<7} {label}: {e}", mode.name());
                    continue;
                }
                b.start_profile();
                for _ in 0..5 {
                    b.execute(&work, &inb, &outs, &bind).unwrap();
                }
                let times = b.take_profile().unwrap();
                // The launches that ran at these sizes (a node may carry alternatives: a
                // skinny and a tiled matmul, split-K and plain attention), in order.
                let launches = work.at(&bind).1;
                for (i, l) in launches.iter().enumerate() {
                    let runs: Vec<_> = times.iter().skip(i).step_by(launches.len()).collect();
                    let s = runs.iter().map(|t| t.seconds).sum::<f64>() / runs.len() as f64;
                    let bytes = runs[0].bytes as f64;
                    let flops = match (&l.kernel, l.args.get(3..).unwrap_or(&[])) {
                        (KernelSpec::MatMul { .. }, [Arg::U32(m), Arg::U32(n), Arg::U32(k), ..]) => {
                            Some(2.0 * (m.eval(&bind) * n.eval(&bind) * k.eval(&bind)) as f64)
                        }
                        _ => None,
                    };
                    let (tf, pct) = match (flops, &mm) {
                        (Some(fl), Ok(p)) => (format!("{:.2}", fl / s / 1e12), format!("{:.0}", 100.0 * fl / s / p)),
                        (Some(fl), Err(_)) => (format!("{:.2}", fl / s / 1e12), "-".into()),
                        _ => ("-".into(), "-".into()),
                    };
                    println!(
                        "{:<7} {:<36} {:<16} {:>10.1} {:>12.2} {:>9.0} {:>6.0} {:>10} {:>6}",
                        mode.name(),
                        l.kernel.name(),
                        label,
                        s * 1e6,
                        bytes / 1e6,
                        bytes / s / 1e9,
                        100.0 * bytes / s / copy,
                        tf,
                        pct
                    );
                }
            }
        }
    }
}

/// The benchmark's module builds without a device, and has launches to time.
#[test]
fn bench_modules_have_kernels() {
    for mode in [Mode::Decode, Mode::Prefill] {
        let m = module(mode);
        let launches: usize = m
            .functions
            .iter()
            .flat_map(|f| f.graph.nodes().into_iter().map(move |n| node_work(&f.graph, n)))
            .filter_map(|w| match w {
                Ok(NodeWork::Launches { launches, .. }) => Some(launches.len()),
                _ => None,
            })
            .sum();
        assert!(launches > 10, "{mode}: {launches} launches");
    }
}
