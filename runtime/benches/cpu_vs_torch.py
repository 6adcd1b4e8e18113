#!/usr/bin/env python3
"""Inference on the CPU: dsc's reference backend vs transformers eager, one run, interleaved.

On the same random-weight DeepSeek-V3-shaped checkpoint (train_vs_torch.py makes it), in
float32, with T threads each:

- prefill of a P-token prompt, last position's logits only (transformers:
  ``logits_to_keep=1``; dsc: the prompt pass of ``generate``), tokens/s;
- greedy decode of N new tokens after that prompt at batch 1, 8 and 32 (transformers:
  ``model.generate(do_sample=False)`` on a batch of equal-length prompts, decode time =
  total - one prefill of the batch; dsc: ``GenerationStats``' decode time), tokens/s;
- peak RSS of each process (``ru_maxrss`` / ``VmHWM``);
- that both pick the same greedy tokens for the batch-1 prompt (the length of the common
  prefix is printed: random weights leave near-ties that f32 rounding may break).

With ``--bf16`` dsc also runs a bf16 copy of the checkpoint (made once with transformers,
``MODEL_DIR-bf16``), its weights kept in bf16, as a third column; ``--bf16-inputs`` adds
its ``--bf16-inputs`` run (bf16 matmul inputs, AVX-512 BF16 where the CPU has it).
``--fp8`` adds dsc on an FP8 copy in DeepSeek-V3's layout (``MODEL_DIR-fp8``: every
``*_proj`` weight of the layers as float8_e4m3fn with a float32 ``weight_scale_inv`` per
128×128 block, amax / 448; the embedding, head, norms and router in bf16, the router's
bias in f32, as the published checkpoints hold them), its weights kept as stored.

With ``--llama-cpp BIN_DIR`` llama.cpp runs the checkpoint converted to GGUF, in f32 and in
bf16 (``--gguf-f32`` / ``--gguf-bf16``, by default ``MODEL_DIR-f32.gguf`` and
``MODEL_DIR-bf16.gguf``; a column for each that exists), its KV cache in its default f16:

- prefill: ``llama-bench -p P -n 0`` (the prompt in one batch, last position's logits);
- decode at batch 1: ``llama-bench -p 0 -n N -d P`` (N tokens after a P-token context);
- decode at the other batches: ``llama-batched-bench -npp P -ntg N -npl B,...`` (S_TG, every
  sequence its own P-token prompt, its own KV stream);
- peak RSS: the larger of those processes' (the weights are mmapped: their pages count);
- no greedy tokens: both tools decode random tokens, none sampled.

Each side runs in its own subprocess, interleaved (torch, dsc, torch, dsc, ...).

Dependencies, in a venv OUTSIDE the repository (tests never need Python)::

    python3 -m venv /tmp/venv-bench
    /tmp/venv-bench/bin/pip install torch==2.15.0 transformers==5.24.0 safetensors
    cargo bench -p dsc-runtime --bench cpu --no-run
    /tmp/venv-bench/bin/python runtime/benches/cpu_vs_torch.py [--size full|small] \\
        [--prompt 512] [--new 128] [--batches 1,8,32] [--threads 2] [--rounds 2] [--bf16] [--bf16-inputs] [--fp8] \\
        [--llama-cpp /tmp/llamacpp-build/bin [--gguf-f32 PATH] [--gguf-bf16 PATH]]

llama.cpp, built and its GGUFs made OUTSIDE the repository too (tried with the tree vendored in
llama-cpp-python 0.3.36: ggml 0.25.3, commit 0c1e570)::

    cd /tmp && /tmp/venv-bench/bin/pip download --no-deps --no-binary llama-cpp-python llama-cpp-python==0.3.36
    tar xzf llama_cpp_python-0.3.36.tar.gz && L=/tmp/llama_cpp_python-0.3.36/vendor/llama.cpp
    /tmp/venv-bench/bin/pip install cmake -e $L/gguf-py
    /tmp/venv-bench/bin/cmake -S $L -B /tmp/llamacpp-build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \\
        -DGGML_CUDA=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF
    /tmp/venv-bench/bin/cmake --build /tmp/llamacpp-build -j2 --target llama-bench llama-batched-bench

The converter reads the router's scoring function from ``scoring_func`` in config.json, which
transformers does not write (without it llama.cpp would route with softmax, not V3's sigmoid):
add it in a copy of the directory, the weights linked. It also wants a tokenizer, which the
checkpoint has none of: give it llama.cpp's own 32000-token llama-spm vocabulary (cut to
``vocab_size``; the tools above only feed it random token ids)::

    M=/tmp/dsc-bench-dsv3-full; mkdir $M-gguf-src && ln -s $M/model.safetensors $M-gguf-src/
    /tmp/venv-bench/bin/python -c "import json, sys; c = json.load(open(sys.argv[1])); c['scoring_func'] = 'sigmoid'; \\
        json.dump(c, open(sys.argv[2], 'w'), indent=2)" $M/config.json $M-gguf-src/config.json
    cd $L && for t in f32 bf16; do /tmp/venv-bench/bin/python -c "import convert_hf_to_gguf as c; \\
        from conversion.deepseek import DeepseekV2Model as D; \\
        D.set_vocab = lambda s: s._set_vocab_builtin('llama-spm', s.hparams['vocab_size']); c.main()" \\
        $M-gguf-src --outtype $t --outfile $M-$t.gguf; done
"""

import argparse
import glob
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_vs_torch import REPO, SIZES, make_model, n_params, run_json  # noqa: E402


def prompt_ids(vocab, batch, length, seed):
    import random

    r = random.Random(seed)
    return [[r.randrange(2, vocab) for _ in range(length)] for _ in range(batch)]


def torch_worker(a):
    import resource
    import time

    import torch
    from transformers import DeepseekV3ForCausalLM

    torch.set_num_threads(a.threads)
    model = DeepseekV3ForCausalLM.from_pretrained(a.model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    vocab = model.config.vocab_size
    out = {"tool": "torch", "decode": {}}
    with torch.inference_mode():
        ids = torch.tensor(prompt_ids(vocab, 1, a.prompt, 1))
        model(input_ids=ids, logits_to_keep=1)  # warm-up
        t = time.perf_counter()
        model(input_ids=ids, logits_to_keep=1)
        out["prefill_tokens_per_s"] = a.prompt / (time.perf_counter() - t)
        for b in a.batches:
            # Batch 1 is the prompt dsc gets too (--ids), so their greedy tokens compare.
            ids = torch.tensor(prompt_ids(vocab, b, a.prompt, 1 if b == 1 else 10 + b))
            t = time.perf_counter()
            model(input_ids=ids, logits_to_keep=1)
            prefill = time.perf_counter() - t
            t = time.perf_counter()
            g = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=a.new, min_new_tokens=a.new,
                               do_sample=False, eos_token_id=None, pad_token_id=0)
            total = time.perf_counter() - t
            out["decode"][str(b)] = b * a.new / max(total - prefill, 1e-9)
            if b == 1:
                out["greedy"] = g[0, a.prompt:].tolist()
            print(f"torch batch {b}: {out['decode'][str(b)]:.1f} tokens/s", file=sys.stderr)
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(out))


def llama_worker(a):
    """llama.cpp on one GGUF: llama-bench for prefill and decode at batch 1, llama-batched-bench
    for decode at the other batches; one run each, after their own warm-up."""
    import resource
    import subprocess

    def tool(name, *flags):
        cmd = [os.path.join(a.llama_cpp, name), "-m", a.gguf, "-t", str(a.threads)] + [str(f) for f in flags]
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if p.returncode != 0:
            sys.exit(f"{' '.join(cmd)}: exit {p.returncode}\n{p.stderr[-4000:]}")
        return p.stdout

    def bench(*flags):
        return json.loads(tool("llama-bench", "-r", 1, "-o", "json", *flags))[0]["avg_ts"]

    out = {"tool": "llama.cpp", "decode": {}}
    out["prefill_tokens_per_s"] = bench("-p", a.prompt, "-n", 0)
    if 1 in a.batches:
        out["decode"]["1"] = bench("-p", 0, "-n", a.new, "-d", a.prompt)
    rest = [b for b in a.batches if b != 1]
    if rest:
        # Room for the largest batch's sequences, P + N each (it skips what does not fit).
        lines = tool("llama-batched-bench", "-npp", a.prompt, "-ntg", a.new, "-npl", ",".join(map(str, rest)),
                     "-c", max(rest) * (a.prompt + a.new), "--output-format", "jsonl")
        for r in (json.loads(x) for x in lines.splitlines() if x.startswith("{")):
            out["decode"][str(r["pl"])] = r["speed_tg"]
        if missing := [b for b in rest if str(b) not in out["decode"]]:
            sys.exit(f"llama-batched-bench: no result for batch {missing}")
    for b in a.batches:
        print(f"llama.cpp {os.path.basename(a.gguf)} batch {b}: {out['decode'][str(b)]:.1f} tokens/s", file=sys.stderr)
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps(out))


def llama_command(a, gguf):
    return [sys.executable, os.path.abspath(__file__), "--llama-worker", "--llama-cpp", os.path.abspath(a.llama_cpp),
            "--gguf", os.path.abspath(gguf), "--prompt", str(a.prompt), "--new", str(a.new),
            "--batches", ",".join(map(str, a.batches)), "--threads", str(a.threads)]


def make_fp8_copy(src, dst, block=128):
    """``src`` quantised as DeepSeek-V3's checkpoints are: see the module docstring."""
    import torch
    from safetensors.torch import load_file, save_file

    os.makedirs(dst, exist_ok=True)
    out = {}
    for name, t in load_file(os.path.join(src, "model.safetensors")).items():
        if not (name.startswith("model.layers.") and name.endswith("_proj.weight") and t.dim() == 2):
            out[name] = t if name.endswith("e_score_correction_bias") else t.to(torch.bfloat16)
            continue
        n, k = t.shape
        sn, sk = -(-n // block), -(-k // block)
        padded = torch.zeros(sn * block, sk * block)
        padded[:n, :k] = t.float()
        blocks = padded.view(sn, block, sk, block)
        scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0
        q = (blocks / scale[:, None, :, None]).view(sn * block, sk * block)[:n, :k]
        out[name] = q.contiguous().to(torch.float8_e4m3fn)
        out[name + "_scale_inv"] = scale.contiguous()
    save_file(out, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    config = json.load(open(os.path.join(src, "config.json")))
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                                     "weight_block_size": [block, block]}
    json.dump(config, open(os.path.join(dst, "config.json"), "w"), indent=2)


def dsc_command(a, ids_file, model_dir):
    flags = ["--model", model_dir, "--prompt", str(a.prompt), "--new", str(a.new), "--passes", "1",
             "--batches", ",".join(map(str, a.batches)), "--threads", str(a.threads), "--ids", ids_file, "--json"]
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(REPO, "target"))
    bins = [p for p in glob.glob(os.path.join(target, "release", "deps", "cpu-*")) if os.access(p, os.X_OK) and not p.endswith(".d")]
    if bins:
        return [max(bins, key=os.path.getmtime)] + flags
    return ["cargo", "bench", "-q", "-p", "dsc-runtime", "--bench", "cpu", "--"] + flags


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir")
    ap.add_argument("--size", choices=sorted(SIZES), default="full")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--bf16", action="store_true", help="also dsc on a bf16 copy of the checkpoint")
    ap.add_argument("--bf16-inputs", action="store_true", help="also dsc on the bf16 copy with --bf16-inputs")
    ap.add_argument("--fp8", action="store_true", help="also dsc on an FP8 (block-scaled) copy of the checkpoint")
    ap.add_argument("--llama-cpp", metavar="BIN_DIR", help="also llama.cpp: the directory of its llama-bench and llama-batched-bench")
    ap.add_argument("--gguf-f32", help="the checkpoint as an f32 GGUF (default MODEL_DIR-f32.gguf)")
    ap.add_argument("--gguf-bf16", help="the checkpoint as a bf16 GGUF (default MODEL_DIR-bf16.gguf)")
    ap.add_argument("--torch-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--llama-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--gguf", help=argparse.SUPPRESS)
    a = ap.parse_args()
    a.batches = [int(b) for b in a.batches.split(",")]
    a.model_dir = os.path.abspath(a.model_dir or f"/tmp/dsc-bench-dsv3-{a.size}")
    if a.torch_worker:
        return torch_worker(a)
    if a.llama_worker:
        return llama_worker(a)
    make_model(a.model_dir, a.size, 0)
    vocab = json.load(open(os.path.join(a.model_dir, "config.json")))["vocab_size"]
    ids_file = os.path.join(a.model_dir, "bench_prompt.json")
    with open(ids_file, "w") as f:
        json.dump({"input_ids": prompt_ids(vocab, 1, a.prompt, 1)}, f)
    torch_cmd = [sys.executable, os.path.abspath(__file__), "--torch-worker", "--model-dir", a.model_dir, "--prompt", str(a.prompt),
                 "--new", str(a.new), "--batches", ",".join(map(str, a.batches)), "--threads", str(a.threads)]
    sides = {"dsc": dsc_command(a, ids_file, a.model_dir)}
    if a.bf16 or a.bf16_inputs:
        bf16_dir = a.model_dir + "-bf16"
        if not os.path.exists(os.path.join(bf16_dir, "model.safetensors")):
            import torch
            from transformers import DeepseekV3ForCausalLM

            DeepseekV3ForCausalLM.from_pretrained(a.model_dir, dtype=torch.bfloat16).save_pretrained(bf16_dir)
        if a.bf16:
            sides["dsc bf16"] = dsc_command(a, ids_file, bf16_dir)
        if a.bf16_inputs:
            sides["dsc bf16 inputs"] = dsc_command(a, ids_file, bf16_dir) + ["--bf16-inputs"]
    if a.fp8:
        fp8_dir = a.model_dir + "-fp8"
        if not os.path.exists(os.path.join(fp8_dir, "model.safetensors")):
            make_fp8_copy(a.model_dir, fp8_dir)
        sides["dsc fp8"] = dsc_command(a, ids_file, fp8_dir)
    if a.llama_cpp:
        ggufs = {"llama.cpp f32": a.gguf_f32 or a.model_dir + "-f32.gguf", "llama.cpp bf16": a.gguf_bf16 or a.model_dir + "-bf16.gguf"}
        ggufs = {k: p for k, p in ggufs.items() if os.path.exists(p)}
        if not ggufs:
            sys.exit("--llama-cpp: no GGUF (--gguf-f32, --gguf-bf16; the docstring says how to make them)")
        sides.update({k: llama_command(a, p) for k, p in ggufs.items()})
    runs = {"torch": [], **{k: [] for k in sides}}
    for r in range(a.rounds):
        runs["torch"].append(run_json(torch_cmd))
        for k, cmd in sides.items():
            runs[k].append(run_json(cmd))
    print(f"{n_params(a.model_dir) / 1e6:.0f}M parameters, prompt {a.prompt}, {a.new} new tokens, {a.threads} threads, "
          f"{a.rounds} rounds (per-round figures, then each / torch of the means)")

    def row(name, key):
        t = [key(x) for x in runs["torch"]]
        mt = sum(t) / len(t)
        line = f"  {name:<34} torch {' '.join(f'{v:8.1f}' for v in t)}"
        for k in sides:
            d = [key(x) for x in runs[k]]
            line += f"   {k} {' '.join(f'{v:8.1f}' for v in d)} {sum(d) / len(d) / mt:5.2f}x"
        print(line)

    row("prefill tokens/s (last logits)", lambda x: x["prefill_tokens_per_s"])
    for b in a.batches:
        row(f"decode tokens/s at batch {b}", lambda x, b=b: x["decode"][str(b)])
    row("peak RSS MB", lambda x: x["peak_rss_mb"])
    for k in (k for k in sides if "greedy" in runs[k][0]):
        t, d = runs["torch"][0]["greedy"], runs[k][0]["greedy"]
        same = next((i for i, (x, y) in enumerate(zip(t, d)) if x != y), min(len(t), len(d)))
        print(f"  greedy tokens at batch 1, {k} vs torch: the first {same} of {len(t)} agree")


if __name__ == "__main__":
    main()
