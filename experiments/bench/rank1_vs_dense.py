"""Rank-1 extraction for a whole Qwen2.5-1.5B-shaped LoRA trajectory: factored (ours) vs dense SVD (official).

Workload: 28 layers × 7 modules, r = 64, K = 16 snapshots (paper: 150 steps, every 10, plus W₀), k = 5:
per matrix the deltas NExt needs — 10 global, 10 local, 10 target, and the last snapshot's G and L —
32 top triplets × 196 matrices = 6272 triplets. Random factors with the real shapes (B ≠ 0).

  ours      every triplet, from the factors: thin QR of [B_i, −B_j] and [A_i; A_j]ᵀ + a 128×128 SVD, vmap'ed
            (and pmap'ed across devices when there are several).
  official  merge both snapshots to dense ΔW = s(B_iA_i − B_jA_j) (m×n) and take its full SVD, as the
            official code does on merged checkpoints. Far too slow to run 6272 times here: we time one delta
            per module shape (each of the 7 modules) and scale by 28 layers × 32 deltas; said in the output.
Both sides run in this process, one after the other; peak memory is each side's RSS high-water mark
measured in a fresh subprocess. σ error and |cos| of u, v compare the two on the timed sample.

    python -m experiments.bench.rank1_vs_dense [--layers 28] [--rank 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from next_jax.models import policy
from next_jax.nxt import rank1
from next_jax.nxt.trajectory import Trajectory

SHAPES = {m: policy.QWEN25["1.5B"].module_shape(m) for m in policy.ALL_MODULES}  # (in, out)


def make_trajectory(layers: int, rank: int, snapshots: int, seed: int = 0):
  """{module: {"a": [K, L, r, in], "b": [K, L, out, r]}} of random factors (fp32)."""
  traj = {}
  for i, (m, (n_in, n_out)) in enumerate(SHAPES.items()):
    ka, kb = jax.random.split(jax.random.PRNGKey(seed + i))
    traj[m] = {"a": jax.random.normal(ka, (snapshots, layers, rank, n_in)) / np.sqrt(n_in),
               "b": 0.01 * jax.random.normal(kb, (snapshots, layers, n_out, rank))}
  return traj


def ours(traj, pairs, scale):
  t0 = time.perf_counter()
  t = Trajectory(traj, np.arange(next(iter(traj.values()))["a"].shape[0]), scale)
  out = jax.block_until_ready(t.triplets(pairs, "max_abs_u"))
  return out, time.perf_counter() - t0


def dense_one(mod, i, j, scale):
  """Merge two snapshots of layer 0 and take the full SVD of their difference ([out, in])."""
  delta = scale * (mod["b"][i, 0] @ mod["a"][i, 0] - mod["b"][j, 0] @ mod["a"][j, 0])
  t0 = time.perf_counter()
  u, s, vt = jax.block_until_ready(jnp.linalg.svd(delta, full_matrices=False))
  return (s[0], u[:, 0], vt[0]), time.perf_counter() - t0


def peak_rss_subprocess(side: str, args) -> float:
  """Peak RSS (GB) of a fresh process that runs only `side`."""
  cmd = [sys.executable, "-m", "experiments.bench.rank1_vs_dense", "--only", side, "--layers", str(args.layers),
         "--rank", str(args.rank), "--repeats", "1"]
  out = subprocess.run(cmd, capture_output=True, text=True, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_gb"]


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--layers", type=int, default=28)
  ap.add_argument("--rank", type=int, default=64)
  ap.add_argument("--snapshots", type=int, default=16)
  ap.add_argument("--k", type=int, default=5)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--only", choices=["ours", "dense"], default=None, help=argparse.SUPPRESS)
  ap.add_argument("--out", default="experiments/results/bench_rank1.md")
  args = ap.parse_args()
  scale = 32.0 / args.rank  # paper: alpha 32, r 64
  traj = make_trajectory(args.layers, args.rank, args.snapshots)
  pr = rank1.delta_pairs(args.snapshots, args.k)
  pairs = [p for kind in ("global", "local", "target", "last_global", "last_local") for p in pr[kind]]
  n_trip = len(pairs) * args.layers * len(SHAPES)
  if args.only:
    if args.only == "ours":
      ours(traj, pairs, scale)
    else:
      for mod in traj.values():
        dense_one(mod, pairs[0][0], pairs[0][1], scale)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps({"peak_rss_gb": peak}))
    return

  ours(traj, pairs[:1], scale)  # compile
  times = []
  for _ in range(args.repeats):
    trip, t = ours(traj, pairs, scale)
    times.append(t)
  t_ours = float(np.median(times))
  dense_t, sig_err, cos_u, cos_v = {}, [], [], []
  i, j = pairs[0]
  for m, mod in traj.items():
    dense_one(mod, i, j, scale)  # compile for this shape
    (s, u, v), t = dense_one(mod, i, j, scale)
    dense_t[m] = t
    mine = jax.tree.map(lambda x: x[0, 0], trip[m])
    sig_err.append(float(abs(mine.sigma - s) / s))
    cos_u.append(float(abs(jnp.dot(mine.u, u))))
    cos_v.append(float(abs(jnp.dot(mine.v, v))))
  t_dense = sum(dense_t.values()) * args.layers * len(pairs)
  rss_ours, rss_dense = peak_rss_subprocess("ours", args), peak_rss_subprocess("dense", args)
  rows = [
      "| side | triplets | time (s) | peak RSS (GB) |", "|---|---|---|---|",
      f"| ours: factored QR + {2 * args.rank}×{2 * args.rank} SVD (all, median of {args.repeats}) | {n_trip} "
      f"| {t_ours:.2f} | {rss_ours:.2f} |",
      f"| official: merged dense SVD (7 timed, ×{args.layers * len(pairs)} scaled) | {n_trip} | {t_dense:.0f} "
      f"| {rss_dense:.2f} (one delta at a time) |",
  ]
  summary = (f"speed-up {t_dense / t_ours:.0f}×; max σ rel. error {max(sig_err):.1e}; "
             f"min |cos| u {min(cos_u):.7f}, v {min(cos_v):.7f}")
  per_module = ", ".join(f"{m} {t:.2f}s" for m, t in dense_t.items())
  text = "\n".join([
      f"# Rank-1 extraction: Qwen2.5-1.5B-shaped LoRA trajectory ({args.layers} layers × 7 modules, "
      f"r={args.rank}, K={args.snapshots}, k={args.k})", "",
      f"Command: `python -m experiments.bench.rank1_vs_dense --layers {args.layers} --rank {args.rank}`  ",
      f"Date: {time.strftime('%Y-%m-%d')}; machine: {os.cpu_count()} CPU cores; jax {jax.__version__}; "
      f"devices {jax.local_device_count()}", "", *rows, "", summary, "",
      f"Dense SVD per delta (layer 0, one per module): {per_module}.", ""])
  print(text)
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    f.write(text)


if __name__ == "__main__":
  main()
