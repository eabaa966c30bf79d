"""Post-hoc NExt over a Qwen2.5-1.5B-shaped LoRA run: our pipeline against the official procedure's dense path.

Workload: a random Qwen2.5-1.5B-shaped base (bf16, 28 layers, hidden 1536, MLP 8960, vocab 151936) and 16
PEFT LoRA checkpoints (r 64, lora_alpha 32, all seven projections, fp32 factors: a random walk of B from 0
and of A around its init) written as verl lays them out, RUN/global_step_{10..160}/actor/lora_adapter.
Nothing here is trained: the factors are random with the real shapes, which is all the timing depends on.

  ours      `python -m next_jax.cli.posthoc --backtest none --alphas 1 --write merged`, end to end in a fresh
            process: read and check the 16 adapters, E₁ / R² / drift analyses, the factored triplets of every
            G/L/T delta, the paper's predictor (1000 epochs), and one α written as a merged bf16 HF model.
  official  the official scripts' dense path: merge every checkpoint into a full model with peft
            (`merge_and_unload`, base dtype) and save it, then a dense `torch.linalg.svd` of every G/L/T delta
            from the merged weights (28 layers × 7 modules × 32 deltas = 6272 SVDs), then one merged model
            written for the α. Far too slow to run whole here: we merge-and-save `--merges` checkpoints and
            SVD `--svds` deltas of layer 0 per module, and scale by the counts above (said in the output).
            The predictor training is the same computation on both sides: the official side is charged
            our measured predictor time (its triplets differ only in how they are computed).
Each side runs in its own subprocess; its peak RSS is that process's high-water mark. The sampled dense
triplets are compared with our exact factored ones (σ relative error, |cos| of u and v): the official path
takes the SVD of differences of bf16-rounded merged weights, so it is not exact.

    python -m experiments.bench.posthoc_vs_dense [--layers 28] [--merges 2] [--svds 3] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
RANK, LORA_ALPHA, CHECKPOINTS, INTERVAL, K = 64, 32.0, 16, 10, 5
HF = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
      "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}


def model_cfg(layers: int):
  import dataclasses  # noqa: PLC0415

  from next_jax.models.policy import QWEN25  # noqa: PLC0415
  return dataclasses.replace(QWEN25["1.5B"], num_layers=layers)


def peak_rss_gb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def dir_gb(path: Path) -> float:
  return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 1e9


# ------------------------------------------------------------------------------------------ the run


def make_run(work: Path, layers: int, seed: int = 0) -> tuple[Path, Path]:
  """(base dir, run dir) under work/, written once and reused while the manifest matches."""
  import ml_dtypes  # noqa: PLC0415

  from next_jax.core import outdir  # noqa: PLC0415
  from next_jax.models import hf, peft_io  # noqa: PLC0415
  from next_jax.models.policy import LoraConfig  # noqa: PLC0415
  base, run = work / "base", work / "run"
  manifest = {"layers": layers, "rank": RANK, "checkpoints": CHECKPOINTS, "seed": seed}
  if (work / "manifest.json").exists() and json.loads((work / "manifest.json").read_text()) == manifest:
    return base, run
  shutil.rmtree(work, ignore_errors=True)
  cfg = model_cfg(layers)
  rng = np.random.default_rng(seed)

  def write_base(tmp: Path):
    tensors = {name: (0.02 * rng.standard_normal(shape, dtype=np.float32)).astype(ml_dtypes.bfloat16)
               for name, shape in hf.expected_shapes(cfg).items()}
    (tmp / "config.json").write_text(json.dumps(hf.config_to_hf(cfg), indent=2))
    hf.write_safetensors(tmp / "model.safetensors", tensors)

  outdir.atomic_dir(base, write_base)
  lcfg = LoraConfig(rank=RANK, alpha=LORA_ALPHA, targets=tuple(HF))
  shapes = {m: cfg.module_shape(m) for m in HF}  # (in, out)
  a0 = {m: rng.standard_normal((layers, RANK, n), dtype=np.float32) / math.sqrt(n) for m, (n, _) in shapes.items()}
  lora = {m: {"a": a0[m].copy(), "b": np.zeros((layers, o, RANK), np.float32)} for m, (_, o) in shapes.items()}
  for i in range(1, CHECKPOINTS + 1):
    for m, (n, o) in shapes.items():
      lora[m]["a"] += (0.02 / math.sqrt(n)) * rng.standard_normal((layers, RANK, n), dtype=np.float32)
      lora[m]["b"] += 2e-3 * rng.standard_normal((layers, o, RANK), dtype=np.float32)
    peft_io.save_peft_adapter(run / f"global_step_{INTERVAL * i}" / "actor" / "lora_adapter", cfg, lora, lcfg,
                         base_model_name_or_path=str(base))
  (work / "manifest.json").write_text(json.dumps(manifest))
  return base, run


def pattern(run: Path) -> str:
  return str(run / "global_step_*" / "actor" / "lora_adapter")


# ------------------------------------------------------------------------------------------ the two sides


def side_ours(base: Path, run: Path, work: Path) -> dict:
  from next_jax.cli import posthoc
  out = work / "ours"
  t0 = time.perf_counter()
  res = posthoc.main(["--base", str(base), "--checkpoints", pattern(run), "--out", str(out), "--overwrite",
                      "--backtest", "none", "--alphas", "1", "--write", "merged"])
  return {"wall_s": time.perf_counter() - t0, "times": res["times"], "out_gb": dir_gb(out)}


def side_official(base: Path, run: Path, work: Path, merges: int, svds: int) -> dict:
  """Merge-and-save `merges` checkpoints with peft; dense SVD of layer 0's G_1, G_2, L_2, … per module."""
  import torch  # noqa: PLC0415
  from peft import PeftModel  # noqa: PLC0415
  from safetensors import safe_open  # noqa: PLC0415
  from transformers import AutoModelForCausalLM  # noqa: PLC0415
  merged_dirs, merge_s = [], []
  for i in range(1, merges + 1):
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    model = PeftModel.from_pretrained(model, run / f"global_step_{INTERVAL * i}" / "actor" / "lora_adapter")
    d = work / "official" / f"global_step_{INTERVAL * i}" / "hf_model"
    model.merge_and_unload().save_pretrained(d, safe_serialization=True)
    merge_s.append(time.perf_counter() - t0)
    merged_dirs.append(d)
    del model
  dirs = [base, *merged_dirs]
  pairs = ([(i, 0) for i in range(1, len(dirs))] + [(i, i - 1) for i in range(2, len(dirs))])[:svds]

  def weight(d: Path, name: str):
    with safe_open(str(d / "model.safetensors"), framework="pt") as f:
      return f.get_tensor(name).float()

  svd_s, triplets = {}, {}
  for m, hf_name in HF.items():
    name = f"model.layers.0.{hf_name}.weight"
    w = [weight(d, name) for d in dirs]
    torch.linalg.svd(w[1] - w[0], full_matrices=False)  # warm-up for this shape
    for i, j in pairs:
      t0 = time.perf_counter()
      u, s, vh = torch.linalg.svd(w[i] - w[j], full_matrices=False)
      svd_s.setdefault(m, []).append(time.perf_counter() - t0)
      triplets[f"{m}/{i}/{j}"] = (float(s[0]), u[:, 0].numpy().tolist(), vh[0].numpy().tolist())
  return {"merge_s": merge_s, "svd_s": svd_s, "pairs": pairs, "triplets": triplets,
          "merged_gb": dir_gb(merged_dirs[0])}


def exact_triplet(run: Path, m: str, i: int, j: int):
  """Our factored top triplet of layer 0's W_i − W_j from the adapters (snapshot 0 = the base)."""
  from next_jax.models import hf  # noqa: PLC0415
  from next_jax.nxt import rank1  # noqa: PLC0415
  pre = f"base_model.model.model.layers.0.{HF[m]}"

  def factors(s: int):
    t = hf.read_safetensors(run / f"global_step_{INTERVAL * s}" / "actor" / "lora_adapter"
                            / "adapter_model.safetensors")
    return np.asarray(t[f"{pre}.lora_B.weight"]), np.asarray(t[f"{pre}.lora_A.weight"])  # [out, r], [r, in]

  b_i, a_i = factors(i)
  if j == 0:
    p, q = b_i, a_i
  else:
    b_j, a_j = factors(j)
    p, q = np.concatenate([b_i, -b_j], 1), np.concatenate([a_i, a_j], 0)
  t = rank1.factored_triplet(p, q, LORA_ALPHA / RANK)
  return float(t.sigma), np.asarray(t.u), np.asarray(t.v)


# ------------------------------------------------------------------------------------------ driver


def run_side(side: str, args) -> dict:
  cmd = [sys.executable, "-m", "experiments.bench.posthoc_vs_dense", "--only", side, "--layers", str(args.layers),
         "--merges", str(args.merges), "--svds", str(args.svds), "--workdir", str(args.workdir)]
  out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
  if out.returncode:
    sys.exit(f"posthoc_vs_dense: the {side} side failed:\n{out.stderr[-4000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--layers", type=int, default=28)
  ap.add_argument("--merges", type=int, default=2, help="checkpoints the official side merges and saves")
  ap.add_argument("--svds", type=int, default=3, help="dense SVDs timed per module (layer 0)")
  ap.add_argument("--workdir", type=Path, default=Path("/tmp/next_jax_posthoc_bench"))
  ap.add_argument("--keep", action="store_true", help="keep the generated run and outputs")
  ap.add_argument("--only", choices=["ours", "official"], default=None, help=argparse.SUPPRESS)
  ap.add_argument("--out", default="experiments/results/bench_posthoc.md")
  args = ap.parse_args()
  if args.only:
    base, run = args.workdir / "base", args.workdir / "run"
    res = (side_ours(base, run, args.workdir) if args.only == "ours"
           else side_official(base, run, args.workdir, args.merges, args.svds))
    print(json.dumps({**res, "peak_rss_gb": peak_rss_gb()}))
    return
  load0 = os.getloadavg()
  t0 = time.perf_counter()
  base, run = make_run(args.workdir, args.layers)
  print(f"run written in {time.perf_counter() - t0:.0f} s: base {dir_gb(base):.2f} GB, "
        f"adapters {dir_gb(run):.2f} GB", flush=True)
  ours = run_side("ours", args)
  print(f"ours: {ours['wall_s']:.0f} s, peak RSS {ours['peak_rss_gb']:.1f} GB", flush=True)
  off = run_side("official", args)
  n_svd = args.layers * len(HF) * 32  # 10 G + 10 L + 10 T + last G, L per matrix (rank1.delta_pairs(16, 5))
  svd_per_layer = sum(float(np.median(v)) for v in off["svd_s"].values())  # one delta of each module
  t_merge = float(np.median(off["merge_s"]))
  t = ours["times"]
  proj = {"merge": CHECKPOINTS * t_merge, "svd": svd_per_layer * args.layers * 32,
          "predictor": t["next_predictor"], "write": t_merge}
  t_off = sum(proj.values())
  comparable = t["read"] + t["next_fit"] + t["write"]
  errs, cos_u, cos_v = [], [], []
  for key, (s, u, v) in off["triplets"].items():
    m, i, j = key.split("/")
    s2, u2, v2 = exact_triplet(run, m, int(i), int(j))
    errs.append(abs(s - s2) / s2)
    cos_u.append(abs(float(np.dot(u, u2))))
    cos_v.append(abs(float(np.dot(v, v2))))
  load1 = os.getloadavg()
  rows = [
      "| side | time (s) | peak RSS (GB) | kept on disk (GB) |", "|---|---|---|---|",
      f"| ours: whole `next_jax.cli.posthoc` (read, analyses, triplets, predictor, one α) | {ours['wall_s']:.0f} "
      f"| {ours['peak_rss_gb']:.1f} | {ours['out_gb']:.1f} (OUT: report + one merged model) |",
      f"| ours: read + NExt fit + write only | {comparable:.0f} | | |",
      f"| official: {CHECKPOINTS} merges+saves, {n_svd} dense SVDs, predictor, one α written (projected) "
      f"| {t_off:.0f} "
      f"| {off['peak_rss_gb']:.1f} | {CHECKPOINTS * off['merged_gb']:.1f} ({CHECKPOINTS} merged models) "
      f"+ one per α |"]
  text = "\n".join([
      f"# Post-hoc NExt: Qwen2.5-1.5B-shaped LoRA run ({args.layers} layers, r {RANK}, {CHECKPOINTS} checkpoints)",
      "", f"Command: `python -m experiments.bench.posthoc_vs_dense --layers {args.layers} --merges {args.merges} "
      f"--svds {args.svds}`  ",
      f"Date: {time.strftime('%Y-%m-%d')}; {os.cpu_count()} CPU cores; load average {load0[0]:.2f} before, "
      f"{load1[0]:.2f} after", "", *rows, "",
      f"Speed-up: {t_off / ours['wall_s']:.1f}× for the whole report, {t_off / comparable:.1f}× for the "
      f"same work as the official path; rank-1 extraction alone {proj['svd'] / t['next_triplets']:.0f}× "
      f"({t['next_triplets']:.0f} s factored vs {proj['svd']:.0f} s dense).", "",
      "Ours, by stage (s): " + ", ".join(f"{k} {v:.0f}" for k, v in t.items()) + ".  ",
      f"Official projection (s): merge+save {t_merge:.0f} per checkpoint (median of {len(off['merge_s'])}) × "
      f"{CHECKPOINTS} = {proj['merge']:.0f}; dense SVD per layer {svd_per_layer:.1f} (median of {args.svds} "
      f"per module: " + ", ".join(f"{m} {np.median(v):.2f}" for m, v in off["svd_s"].items()) +
      f") × {args.layers} layers × 32 deltas = {proj['svd']:.0f}; predictor (ours, measured) "
      f"{proj['predictor']:.0f}; one α written {proj['write']:.0f}.  ",
      f"Dense SVD of bf16 merged weights against our exact factored triplets ({len(errs)} deltas): σ rel. error "
      f"max {max(errs):.1e}, |cos| u min {min(cos_u):.6f}, v min {min(cos_v):.6f}.", ""])
  print(text)
  (ROOT / args.out).parent.mkdir(parents=True, exist_ok=True)
  (ROOT / args.out).write_text(text)
  if not args.keep:
    shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
  main()
