"""`make demo`: the NExt pipeline on the toy task, end to end on the CPU.

1. Build the toy base model if it is missing: a tiny Qwen2 supervised on a+b*c with noisy answers, saved as
   a real HF directory in artifacts/toy_base and loaded through the path a real Qwen2.5 takes.
2. Run plain GRPO-LoRA and NExt with the paper's schedule at toy scale (NExt: 150 steps, snapshot every
   10, k = 5, α = 1.5, jump, then 100 steps, 250 real steps in total), from the same seed.
3. Print accuracy and ICER (RL steps per accuracy point gained over the backbone) and point to the logs.

    python -m experiments.demo [--quick] [--seed 0] [--workdir runs/demo] [--model-dir DIR]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from next_jax.configs import toy_arith
from next_jax.run import experiment
from next_jax.run.toy_base import build_toy_base


def config(method: str, total: int, seed: int, workdir: Path, quick: bool):
  c = toy_arith.get_config(f"method={method},seed={seed}" + (",quick" if quick else ""))
  c.workdir = str(workdir / f"{method}_{total}")
  c.total_steps = total
  c.ckpt.overwrite = True
  c.eval.every = 0 if quick else 50
  if quick:  # a smoke run: a small predictor, trained briefly
    c.nxt.predictor.hidden, c.nxt.predictor.epochs = 32, 20
  return c


def plot(results: dict, path: Path) -> None:
  try:
    import matplotlib  # noqa: PLC0415
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
  except ImportError:
    return
  fig, ax = plt.subplots(figsize=(6, 4))
  for name, r in results.items():
    steps = sorted(int(s) for s in r["evals"])
    ax.plot([0] + steps, [r["backbone"]] + [r["evals"][str(s)] for s in steps], marker="o", label=name)
  ax.axvline(results["NExt"]["jumps"][0]["step"] if results["NExt"]["jumps"] else 0, color="grey", ls=":")
  ax.set_xlabel("real RL steps")
  ax.set_ylabel("test accuracy (temperature 1)")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv=None):
  from absl import logging as absl_logging  # noqa: PLC0415
  absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every save at INFO
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--workdir", default="runs/demo")
  ap.add_argument("--quick", action="store_true", help="smoke-sized (12 steps; seconds, not minutes)")
  ap.add_argument("--model-dir", default=None, help="default: the toy base (built if missing)")
  args = ap.parse_args(argv)
  os.chdir(ROOT)
  t0 = time.time()
  if args.model_dir is None:
    build_toy_base("artifacts/toy_base")
  wd = Path(args.workdir)
  total = 12 if args.quick else 250
  runs = {"GRPO-LoRA": ("none", total), "NExt": ("next", total)}
  results = {}
  for name, (method, total) in runs.items():
    print(f"\n== {name}: {total} real steps ==", flush=True)
    results[name] = experiment.run(config(method, total, args.seed, wd, args.quick), args.model_dir)
  backbone = results["GRPO-LoRA"]["backbone"]
  lines = ["| method | real RL steps | test accuracy | ICER (steps / point) |", "|---|---|---|---|",
           f"| Backbone | – | {100 * backbone:.1f} | – |"]
  for name, r in results.items():
    lines.append(f"| {name} | {r['steps']} | {100 * r['final']:.1f} | {r['icer']:.1f} |")
  table = "\n".join(lines)
  plot(results, wd / "accuracy.png")
  (wd / "summary.md").write_text(table + "\n")
  print("\n" + table)
  print(f"\nlogs: {wd}/*/metrics.jsonl, TensorBoard: tensorboard --logdir {wd}; plot: {wd}/accuracy.png; "
        f"jump diagnostics: {wd}/next_{total}/results.json; total {time.time() - t0:.0f} s")


if __name__ == "__main__":
  main()
