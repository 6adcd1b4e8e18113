#!/usr/bin/env python3
"""Cross-check ``dsc grpo-loss`` against an independent f64 reference of the GRPO loss.

The reference is written from the formulas in shared/reference/README.md (section "GRPO",
TRL's ``GRPOConfig`` conventions): group-relative advantages (sample std + 1e-4, scaled per
``group``, ``batch`` or ``none``), token or sequence (GSPO, gradient through the mean log-ratio)
importance ratios, clip-higher, two-sided clipping with ``delta``, the k3 KL penalty weighted by
``beta``, the aggregations ``grpo``/``bnpo``/``dr_grpo``/``dapo`` (TRL's ``clamp(min=1)`` on
token counts) and ``mask_truncated_completions`` (truncated rows get mask 0 but still count in G).
Its gradient with respect to ``logp_pi`` is taken by central finite differences, not derived.

For every loss_type x scale_rewards x importance_sampling_level x option (plain, epsilon_high,
delta, beta with logp_ref, mask_truncated_completions) it makes ``--cases`` seeded random batches
(2-3 groups of 3-5 completions in shuffled order, ragged masks with junk in the padding, ratios
clipped on both sides, rewards with ties and sometimes a constant group; dapo sometimes with a
larger ``num_items_in_batch``), runs dsc on each and compares the advantages, the loss and
``grad_logp_pi`` (which must be exactly 0 where the mask is 0). Entries whose ratio lies within
1e-4 of a clip/delta kink are left out of the gradient comparison (finite differences are not
meaningful there) and counted. Standard library only; from the repository root::

    python3 runtime/benches/grpo_loss_check.py [--dsc PATH] [--cases N] [--seed S] [--json]

Exit code 0 when every maximum absolute error is within 1e-6, 1 otherwise.
"""
import argparse
import itertools
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile

TOL = 1e-6
FD_H = 1e-6
KINK = 1e-4
LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo"]
SCALES = ["group", "batch", "none"]
LEVELS = ["token", "sequence"]
OPTIONS = {
    "plain": {},
    "epsilon_high": {"epsilon_high": 0.28},
    "delta": {"delta": 1.25},
    "beta": {"beta": 0.04},
    "mask_truncated": {"mask_truncated_completions": True},
}


# ---------------------------------------------------------------- reference (README formulas)
def sample_std(v):
    if len(v) < 2:
        return 0.0
    mu = sum(v) / len(v)
    return math.sqrt(sum((x - mu) ** 2 for x in v) / (len(v) - 1))


def advantages(b):
    r, ids = b["rewards"], b["groups"]
    batch_std = sample_std(r)
    adv = []
    for i, ri in enumerate(r):
        group = [r[j] for j in range(len(r)) if ids[j] == ids[i]]
        mu = sum(group) / len(group)
        div = {"group": sample_std(group) + 1e-4, "batch": batch_std + 1e-4, "none": 1.0}[b["scale_rewards"]]
        adv.append((ri - mu) / div)
    return adv


def effective_mask(b):
    cut = b.get("truncated") if b.get("mask_truncated_completions") else None
    return [[0 if (cut and cut[i]) else m for m in row] for i, row in enumerate(b["mask"])]


def ratios(b, x, m):
    """The importance ratio of every token, [G][T] (padding: 1, never used)."""
    out = []
    for i, row in enumerate(m):
        logr = [x[i][t] - b["logp_old"][i][t] if row[t] else 0.0 for t in range(len(row))]
        if b.get("importance_sampling_level") == "sequence":
            out.append([math.exp(sum(logr) / max(sum(row), 1))] * len(row))
        else:
            out.append([math.exp(v) for v in logr])
    return out


def reference_loss(b, x, adv):
    m = effective_mask(b)
    rho = ratios(b, x, m)
    eps, beta = b["epsilon"], b["beta"]
    lo, hi, delta = 1 - eps, 1 + b.get("epsilon_high", eps), b.get("delta")
    G = len(m)
    row_sums = []
    for i, row in enumerate(m):
        s = 0.0
        for t, on in enumerate(row):
            if not on:
                continue
            p, a = rho[i][t], adv[i]
            unclipped = (min(p, delta) if delta is not None else p) * a
            surr = min(unclipped, min(max(p, lo), hi) * a)
            kl = 0.0
            if beta > 0:
                d = b["logp_ref"][i][t] - x[i][t]
                kl = math.exp(d) - d - 1
            s += -(surr - beta * kl)
        row_sums.append(s)
    counts = [sum(row) for row in m]
    total = sum(counts)
    lt = b["loss_type"]
    if lt == "grpo":
        return sum(s / max(n, 1) for s, n in zip(row_sums, counts)) / G
    if lt == "bnpo":
        return sum(row_sums) / max(total, 1)
    if lt == "dr_grpo":
        return sum(row_sums) / (G * b["max_completion_length"])
    return sum(row_sums) / max(b.get("num_items_in_batch", total), 1)  # dapo


def near_kink(b, x):
    """[G][T] True where the (token or sequence) ratio is within KINK of a clip or delta bound."""
    m = effective_mask(b)
    bounds = [1 - b["epsilon"], 1 + b.get("epsilon_high", b["epsilon"])] + ([b["delta"]] if "delta" in b else [])
    return [[any(abs(p - k) < KINK for k in bounds) for p in row] for row in ratios(b, x, m)]


def fd_grad(b, adv):
    x = b["logp_pi"]
    m = effective_mask(b)
    grad = [[0.0] * len(row) for row in x]
    for i, row in enumerate(m):
        for t, on in enumerate(row):
            if not on:
                continue
            xp = [r[:] for r in x]
            xp[i][t] = x[i][t] + FD_H
            up = reference_loss(b, xp, adv)
            xp[i][t] = x[i][t] - FD_H
            grad[i][t] = (up - reference_loss(b, xp, adv)) / (2 * FD_H)
    return grad


# ---------------------------------------------------------------- random batches
def make_batch(rng, loss_type, scale, level, option):
    group_ids = rng.sample(range(10), rng.randint(2, 3))
    groups = [gid for gid in group_ids for _ in range(rng.randint(3, 5))]
    rng.shuffle(groups)  # ids need not be contiguous nor sorted
    G, T = len(groups), rng.randint(3, 8)
    lens = [rng.randint(1, T) for _ in range(G)]
    full, short = rng.sample(range(G), 2)
    lens[full], lens[short] = T, rng.randint(1, T - 1)
    mask = [[1 if t < n else 0 for t in range(T)] for n in lens]
    pad = lambda: rng.uniform(-30.0, 0.0)  # junk: padding must never be read
    pi = [[rng.uniform(-3.0, -0.01) if mask[i][t] else pad() for t in range(T)] for i in range(G)]
    old = []
    for i in range(G):
        shift = rng.uniform(-0.3, 0.3)  # per-row shift so sequence ratios are clipped too
        old.append([pi[i][t] - shift - rng.uniform(-0.2, 0.2) if mask[i][t] else pad() for t in range(T)])
    values = rng.choice([[0.0, 1.0], [0.0, 0.5, 1.0], [-1.0, 0.0, 2.0, 3.5]])
    rewards = [rng.choice(values) for _ in range(G)]
    if rng.random() < 0.4:  # one group with all rewards equal: advantages 0 (or ~0)
        const_id, v = rng.choice(group_ids), rng.choice(values)
        rewards = [v if g == const_id else r for g, r in zip(groups, rewards)]
    b = {
        "rewards": rewards, "groups": groups, "mask": mask, "logp_pi": pi, "logp_old": old,
        "truncated": [False] * G, "epsilon": 0.2, "beta": 0.0, "loss_type": loss_type,
        "scale_rewards": scale, "importance_sampling_level": level,
        "max_completion_length": T + rng.choice([0, 0, 3]),
    }
    b.update(OPTIONS[option])
    if b["beta"] > 0:
        b["logp_ref"] = [[p + rng.uniform(-0.5, 0.5) if mask[i][t] else pad() for t, p in enumerate(r)]
                         for i, r in enumerate(pi)]
    for i in rng.sample(range(G), rng.randint(1, 2)):  # read only with mask_truncated_completions
        b["truncated"][i] = True
    if loss_type == "dapo" and rng.random() < 0.5:
        b["num_items_in_batch"] = sum(map(sum, effective_mask(b))) + rng.randint(0, 20)
    return b


# ---------------------------------------------------------------- driver
def find_dsc(arg):
    if arg:
        return arg
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    local = os.path.join(root, "target", "release", "dsc")
    return local if os.path.isfile(local) else (shutil.which("dsc") or sys.exit("dsc not found; pass --dsc"))


def run_dsc(dsc, batch, tmpdir):
    path = os.path.join(tmpdir, "batch.json")
    with open(path, "w") as f:
        json.dump(batch, f)
    p = subprocess.run([dsc, "grpo-loss", "--input", path], capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"dsc failed ({p.returncode}): {p.stderr.strip()}\ninput: {json.dumps(batch)}")
    return json.loads(p.stdout)


def check(dsc, batch, tmpdir):
    """Max abs errors (advantages, loss, grad) and the number of near-kink entries skipped."""
    got = run_dsc(dsc, batch, tmpdir)
    adv = advantages(batch)
    err_a = max(abs(g - w) for g, w in zip(got["advantages"], adv))
    err_l = abs(got["loss"] - reference_loss(batch, batch["logp_pi"], adv))
    want, kink, m = fd_grad(batch, adv), near_kink(batch, batch["logp_pi"]), effective_mask(batch)
    err_g, skipped = 0.0, 0
    for i, row in enumerate(m):
        for t, on in enumerate(row):
            g = got["grad_logp_pi"][i][t]
            if not on:
                err_g = max(err_g, abs(g) if g != 0.0 else 0.0)  # must be exactly 0
            elif kink[i][t]:
                skipped += 1
            else:
                err_g = max(err_g, abs(g - want[i][t]))
    return err_a, err_l, err_g, skipped


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dsc", help="the dsc binary (default: target/release/dsc, else dsc on PATH)")
    ap.add_argument("--cases", type=int, default=5, help="random batches per combination (default 5)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print a JSON summary instead of the table")
    args = ap.parse_args()
    dsc, rng = find_dsc(args.dsc), random.Random(args.seed)

    rows, skipped_total = [], 0
    with tempfile.TemporaryDirectory() as tmpdir:
        for lt, sc, lv, opt in itertools.product(LOSS_TYPES, SCALES, LEVELS, OPTIONS):
            errs = [0.0, 0.0, 0.0]
            for _ in range(args.cases):
                *e, skipped = check(dsc, make_batch(rng, lt, sc, lv, opt), tmpdir)
                errs = [max(a, b) for a, b in zip(errs, e)]
                skipped_total += skipped
            rows.append(((lt, sc, lv, opt), errs))

    def worst(pred):
        sel = [e for key, e in rows if pred(key)]
        return {k: max(e[j] for e in sel) for j, k in enumerate(("advantages", "loss", "grad"))}

    overall = worst(lambda k: True)
    ok = all(v <= TOL for v in overall.values())
    summary = {
        "dsc": dsc, "cases_per_combination": args.cases, "seed": args.seed, "batches": len(rows) * args.cases,
        "tolerance": TOL, "grad_entries_skipped_near_kink": skipped_total, "max_abs_error": overall,
        "by_loss_type": {lt: worst(lambda k, lt=lt: k[0] == lt) for lt in LOSS_TYPES},
        "by_option": {o: worst(lambda k, o=o: k[3] == o) for o in OPTIONS},
        "pass": ok,
    }
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"{'loss_type':9} {'scale':6} {'level':9} {'option':15} {'adv':>9} {'loss':>9} {'grad':>9}")
        for (lt, sc, lv, opt), (ea, el, eg) in rows:
            print(f"{lt:9} {sc:6} {lv:9} {opt:15} {ea:9.1e} {el:9.1e} {eg:9.1e}")
        print(f"\n{summary['batches']} batches ({args.cases} per combination, seed {args.seed}); "
              f"{skipped_total} gradient entries skipped near a kink")
        for name, table in (("loss_type", summary["by_loss_type"]), ("option", summary["by_option"])):
            for key, e in table.items():
                print(f"  {name} {key:15} adv {e['advantages']:.1e}  loss {e['loss']:.1e}  grad {e['grad']:.1e}")
        print(f"overall max abs error: adv {overall['advantages']:.1e}  loss {overall['loss']:.1e}  "
              f"grad {overall['grad']:.1e}  (tolerance {TOL:g}): {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
