#!/usr/bin/env python3
"""Training-step throughput and peak memory: dsc's reference backend vs PyTorch eager.

Measures, on one machine and in one run, the same training step -- forward, backward,
global-norm gradient clipping to 1.0 and AdamW (lr 1e-4, betas (0.9, 0.999), eps 1e-8,
weight decay 0.01 on tensors of rank >= 2) of next-token cross-entropy on random token
ids, float32, CPU -- done two ways on the same checkpoint:

- torch: transformers' ``DeepseekV3ForCausalLM`` (``attn_implementation="eager"``),
  ``torch.set_num_threads(T)``, ``torch.optim.AdamW``; peak memory is the worker
  process's ``resource.getrusage(RUSAGE_SELF).ru_maxrss``;
- dsc: the ``train_step`` bench (runtime/benches/train_step.rs), rayon pool of T threads;
  peak memory is the bench process's ``VmHWM``.

Each runs in its own subprocess, interleaved (torch, dsc, torch, dsc, ...), each run
``--warmup`` untimed steps then ``--steps`` timed ones; the table gives tokens/s (B*S over
the mean timed step) per run and the mean over runs, the ratio dsc/torch, and peak RSS.

The checkpoint is made once (``--model-dir``, default /tmp/dsc-bench-dsv3-<size>): random
float32 weights, DeepSeek-V3's shape scaled down -- MLA with q_lora_rank/kv_lora_rank and
separate nope/rope/v head dims (interleaved RoPE), MoE with a shared expert, sigmoid
routing with ``e_score_correction_bias``, ``n_group``/``topk_group`` (noaux_tc),
``first_k_dense_replace``, no MTP. ``--size full`` is 132M parameters, ``--size small``
10M (for a quick check on a busy machine).

Dependencies (Python is never needed by the tests): a venv OUTSIDE the repository,
from plain PyPI (the PyTorch CPU index is not reachable here)::

    python3 -m venv /tmp/venv-bench
    /tmp/venv-bench/bin/pip install torch==2.15.0 transformers==5.24.0 safetensors

Build the dsc side in release, then run::

    cargo bench -p dsc-runtime --bench train_step --no-run
    /tmp/venv-bench/bin/python runtime/benches/train_vs_torch.py \\
        [--size full|small] [--batch 4] [--seq 256] [--threads 2] [--steps 3] [--warmup 1] \\
        [--rounds 2] [--dsc-bin PATH]

Without ``--dsc-bin`` the newest ``train_step-*`` executable under
``$CARGO_TARGET_DIR/release/deps`` (default ``target/``) is used, else ``cargo bench``.
"""

import argparse
import glob
import json
import os
import statistics
import subprocess
import sys

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))

# DeepSeek-V3 (hidden 7168, 61 layers, 256 experts top-8 in 8 groups top-4, 1 shared,
# 3 dense layers first, q_lora 1536, kv_lora 512, nope 128 / rope 64 / v 128) scaled down.
SIZES = {
    "full": dict(
        vocab_size=32000, hidden_size=512, intermediate_size=1408, moe_intermediate_size=256,
        num_hidden_layers=8, first_k_dense_replace=1, num_attention_heads=8, num_key_value_heads=8,
        q_lora_rank=192, kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
        n_routed_experts=32, num_experts_per_tok=4, n_group=4, topk_group=2, n_shared_experts=1,
    ),
    "small": dict(
        vocab_size=8192, hidden_size=256, intermediate_size=704, moe_intermediate_size=128,
        num_hidden_layers=4, first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4,
        q_lora_rank=96, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
        n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2, n_shared_experts=1,
    ),
}


def make_model(model_dir, size, seed):
    """Writes a random-weight DeepseekV3ForCausalLM checkpoint to `model_dir` (once)."""
    if os.path.exists(os.path.join(model_dir, "config.json")):
        return
    import torch
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(seed)
    cfg = DeepseekV3Config(
        **SIZES[size],
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
        max_position_embeddings=4096,
        rope_interleave=True,
        tie_word_embeddings=False,
        num_nextn_predict_layers=0,
        rms_norm_eps=1e-6,
        bos_token_id=0,
        eos_token_id=1,
    )
    model = DeepseekV3ForCausalLM(cfg).to(torch.float32)
    # The selection bias is zero at init; make it random so routing is not just the scores.
    with torch.no_grad():
        for name, buf in list(model.named_buffers()) + list(model.named_parameters()):
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.randn_like(buf) * 0.1)
    model.save_pretrained(model_dir, safe_serialization=True)


def n_params(model_dir):
    """Parameters in the checkpoint's safetensors files (header only)."""
    total = 0
    for path in glob.glob(os.path.join(model_dir, "*.safetensors")):
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        for k, v in header.items():
            if k != "__metadata__":
                c = 1
                for d in v["shape"]:
                    c *= d
                total += c
    return total


def torch_worker(a):
    """One torch run in this process; prints the JSON line the dsc bench prints."""
    import resource
    import time

    import torch
    from transformers import DeepseekV3ForCausalLM

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    t0 = time.perf_counter()
    model = DeepseekV3ForCausalLM.from_pretrained(a.model_dir, dtype=torch.float32, attn_implementation="eager")
    model.train()
    load_s = time.perf_counter() - t0
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.01},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.999), eps=1e-8)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(a.seed)
    times, losses = [], []
    for step in range(a.warmup + a.steps):
        ids = torch.randint(vocab, (a.batch, a.seq), generator=gen)
        start = time.perf_counter()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - start
        print(f"torch step {step}{' (warm-up)' if step < a.warmup else ''}: loss {out.loss.item():.4f} {dt * 1e3:.0f} ms",
              file=sys.stderr)
        if step >= a.warmup:
            times.append(dt)
            losses.append(out.loss.item())
    mean = sum(times) / len(times)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(json.dumps({
        "tool": "torch", "tokens_per_s": a.batch * a.seq / mean, "step_ms": mean * 1e3, "min_step_ms": min(times) * 1e3,
        "peak_rss_mb": peak_kb / 1024, "params": sum(p.numel() for p in params), "batch": a.batch, "seq": a.seq,
        "threads": a.threads, "steps": a.steps, "warmup": a.warmup, "load_s": load_s, "losses": losses,
        "torch": torch.__version__, "experts_implementation": getattr(model.config, "_experts_implementation", None),
    }))


def dsc_command(a):
    flags = ["--model", a.model_dir, "--batch", str(a.batch), "--seq", str(a.seq), "--steps", str(a.steps),
             "--warmup", str(a.warmup), "--threads", str(a.threads), "--seed", str(a.seed)]
    if a.dsc_bin:
        return [a.dsc_bin] + flags
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(REPO, "target"))
    bins = [p for p in glob.glob(os.path.join(target, "release", "deps", "train_step-*"))
            if os.access(p, os.X_OK) and not p.endswith(".d")]
    if bins:
        return [max(bins, key=os.path.getmtime)] + flags
    return ["cargo", "bench", "-q", "-p", "dsc-runtime", "--bench", "train_step", "--"] + flags


def run_json(cmd, env=None):
    """Runs `cmd`, passes its stderr through, returns its last stdout line as JSON."""
    p = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, env=env, text=True)
    if p.returncode != 0:
        sys.exit(f"{' '.join(cmd)}: exit {p.returncode}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir")
    ap.add_argument("--size", choices=sorted(SIZES), default="full")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per run")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per run, first")
    ap.add_argument("--rounds", type=int, default=2, help="torch, dsc pairs, interleaved")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dsc-bin", help="the built train_step bench executable")
    ap.add_argument("--only", choices=["torch", "dsc"], help="run one side only")
    ap.add_argument("--torch-worker", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    a.model_dir = os.path.abspath(a.model_dir or f"/tmp/dsc-bench-dsv3-{a.size}")
    if a.torch_worker:
        torch_worker(a)
        return

    make_model(a.model_dir, a.size, a.seed)
    print(f"model {a.model_dir}: {n_params(a.model_dir) / 1e6:.1f}M params; B={a.batch} S={a.seq} T={a.threads}, "
          f"{a.warmup} warm-up + {a.steps} timed steps per run, {a.rounds} rounds", file=sys.stderr)
    torch_cmd = [sys.executable, os.path.abspath(__file__), "--torch-worker", "--model-dir", a.model_dir,
                 "--batch", str(a.batch), "--seq", str(a.seq), "--threads", str(a.threads), "--steps", str(a.steps),
                 "--warmup", str(a.warmup), "--seed", str(a.seed)]
    # The same thread count for torch's intra-op pool and anything that reads these.
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads))
    results = {"torch": [], "dsc": []}
    for r in range(a.rounds):
        if a.only != "dsc":
            results["torch"].append(run_json(torch_cmd, env))
            print(json.dumps(results["torch"][-1]))
        if a.only != "torch":
            results["dsc"].append(run_json(dsc_command(a), env))
            print(json.dumps(results["dsc"][-1]))

    def summary(rs):
        if not rs:
            return None
        return statistics.mean(x["tokens_per_s"] for x in rs), max(x["peak_rss_mb"] for x in rs)

    print()
    print(f"{'run':<8}{'tool':<7}{'tokens/s':>10}{'step ms':>10}{'peak RSS MiB':>14}")
    for r in range(a.rounds):
        for tool in ("torch", "dsc"):
            if r < len(results[tool]):
                x = results[tool][r]
                print(f"{r + 1:<8}{tool:<7}{x['tokens_per_s']:>10.1f}{x['step_ms']:>10.0f}{x['peak_rss_mb']:>14.0f}")
    t, d = summary(results["torch"]), summary(results["dsc"])
    for tool, s in (("torch", t), ("dsc", d)):
        if s:
            print(f"{'mean':<8}{tool:<7}{s[0]:>10.1f}{'':>10}{s[1]:>14.0f}")
    if t and d:
        print(f"\ndsc/torch: tokens/s x{d[0] / t[0]:.3f}, peak memory x{d[1] / t[1]:.3f}")
        print(json.dumps({"tokens_per_s_ratio": d[0] / t[0], "peak_rss_ratio": d[1] / t[1],
                          "torch_tokens_per_s": t[0], "dsc_tokens_per_s": d[0],
                          "torch_peak_rss_mb": t[1], "dsc_peak_rss_mb": d[1]}))


if __name__ == "__main__":
    main()
