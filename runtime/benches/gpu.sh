#!/usr/bin/env bash
# The CUDA backend on a machine with an NVIDIA GPU, in one run (about 10 minutes at most):
#   1. build the tests with `--features cuda` (debug profile: the host side does little);
#   2. kernel parity: every codegen kernel on the GPU against the reference interpreter
#      (the wgpu kernel suites run on CUDA), plus NVRTC on every tiny-spec kernel;
#   3. model parity: the golden/hf fixtures on `--backend cuda` against transformers'
#      logits, routing and greedy tokens (`*_on_cuda` in tests/tests/hf_parity.rs);
#   4. training: the fixtures' gradients and five SFT steps (weights and AdamW on the GPU)
#      against torch (`*cuda*` in tests/tests/train_parity.rs);
#   5. throughput: each DeepSeek-V3-sized kernel's time, bandwidth and FLOP/s against the
#      device's copy and cuBLAS GEMM peaks measured in the same run (runtime/src/cuda/bench.rs).
# Needs cargo with the crates available (run `cargo fetch` first where the machine is
# offline), the NVIDIA driver, NVRTC 12 and the CUDA headers (the CUDA toolkit, or the pip
# wheels nvidia-cuda-nvrtc-cu12 and nvidia-cuda-runtime-cu12). Exit status: 0 when steps 1-4 pass; the report is stdout.
set -uo pipefail
cd "$(dirname "$0")/../.."
t0=$SECONDS
step() { echo; echo "==== $1 ($((SECONDS - t0)) s)"; }

step "device"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 || echo "nvidia-smi: not found"
# libnvrtc.so.12 from the toolkit or a pip wheel, if it is not on the loader path already.
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib \
    $(python3 -c 'import nvidia.cuda_nvrtc as m; print(m.__path__[0] + "/lib")' 2>/dev/null) \
    $(python3 -c 'import nvidia.cublas as m; print(m.__path__[0] + "/lib")' 2>/dev/null); do
    [ -d "$d" ] && export LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}"
done
# cuda_fp16.h for the f16 kernels: the toolkit's (CUDA_PATH, /usr/local/cuda) or the pip wheel's.
d=$(python3 -c 'import nvidia.cuda_runtime as m; print(m.__path__[0] + "/include")' 2>/dev/null) && [ -e "$d/cuda_fp16.h" ] &&
    export DSC_CUDA_INCLUDE="${DSC_CUDA_INCLUDE:-$d}"
echo "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-} DSC_CUDA_INCLUDE=${DSC_CUDA_INCLUDE:-}"
export DSC_REQUIRE_NVRTC=1 RUST_BACKTRACE=1

step "build"
cargo test -p dsc-runtime --features cuda --lib --no-run -q && cargo test -p dsc-tests --features cuda --test integration --no-run -q || {
    echo "BUILD FAILED"
    exit 1
}

step "kernel parity (CUDA vs reference) and NVRTC"
timeout 150 cargo test -q -p dsc-runtime --features cuda --lib cuda:: -- --nocapture 2>&1 | grep -v "^$"
kernels=${PIPESTATUS[0]}

step "model parity (golden/hf on --backend cuda)"
timeout 200 cargo test -q -p dsc-tests --features cuda --test integration on_cuda -- --nocapture 2>&1 | grep -v "^$"
models=${PIPESTATUS[0]}

step "training on CUDA (gradients against torch; five SFT steps with the optimizer on the device)"
timeout 120 cargo test -q -p dsc-tests --features cuda --test integration on_cuda_match_pytorch -- --nocapture 2>&1 | grep -v "^$"
train=${PIPESTATUS[0]}

step "throughput (per kernel, vs measured peaks)"
timeout 150 cargo test -q -p dsc-runtime --features cuda --lib cuda::bench -- --ignored --nocapture --test-threads 1 2>&1 | grep -v "^$"
bench=${PIPESTATUS[0]}

step "summary"
echo "kernel parity: exit $kernels; model parity: exit $models; training: exit $train; throughput: exit $bench (124 = timed out)"
[ "$kernels" = 0 ] && [ "$models" = 0 ] && [ "$train" = 0 ]
