"""Does NExt's predictor fit its training pairs at the paper's settings, and does fitting them help?

    python -m experiments.predictor_fit                  # seeds 0,1; lr 2e-5 (paper), 1e-4, 1e-3
    python -m experiments.predictor_fit --quick          # CI-sized smoke run
    python -m experiments.predictor_fit --lrs 2e-5,1e-3 --seeds 2

Per seed, on the toy preset with the paper's schedule (reproduce.PAPER): one COLLECT run to the jump point,
GRPO-LoRA continued to W₂₀₀ (the true future of the k·interval = 50-step target) and to 250. For each
predictor learning rate (1000 full-batch epochs, everything else as the paper): the loss before and after
training per shape group, the predicted σ̂ against the σ of the last training target, the agreement of
ΔŴ with W₂₀₀ − W₁₅₀, and the test accuracy after the jump (α = 1.5) and 100 more RL steps.
Writes <out>/predictor_fit.md and rows.jsonl.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path

import numpy as np

from experiments import reproduce as rp
from experiments.report import _table, mean_std
from next_jax.nxt import extrapolate as ex
from next_jax.nxt import predictor as pred_lib
from next_jax.run import driver, experiment
from next_jax.run import state_machine as sm
from next_jax.run.toy_base import build_toy_base

LRS = (2e-5, 1e-4, 1e-3)


def _median(trips, field, index=None) -> float:
  """Median over every matrix (and layer) of a Triplet field; `index` picks one entry of the leading axis."""
  vals = [np.asarray(getattr(t, field) if index is None else getattr(t, field)[index]).ravel()
          for t in trips.values()]
  return float(np.median(np.concatenate(vals)))


def run_seed(seed: int, sched: rp.Schedule, quick: bool, lrs, model_dir=None) -> list[dict]:
  """One COLLECT run to the jump point, GRPO-LoRA to `short` (the true future W_{jump+k·interval}), then
  NExt with each predictor lr from that same state: one row per lr."""
  exp = experiment.build(rp.make_config(seed, sched, quick), model_dir)
  s_jump, bb, _, _ = rp.collect(exp, sched, f"s{seed} collect")
  h = sched.k * sched.interval
  _, accs, mats, _ = rp.advance(exp, exp.ncfg, driver.skip_jump(driver.fork(s_jump)), sched.short,
                                evals={sched.short}, snaps={sched.jump + h}, desc=f"s{seed} GRPO-LoRA")
  actual = rp.actual_future(exp, s_jump, mats[sched.jump + h])
  traj = sm.trajectory(exp.setup, exp.ncfg, s_jump)
  rows = []
  for lr in lrs:
    n = dataclasses.replace(exp.ncfg, predictor=dataclasses.replace(exp.ncfg.predictor, lr=lr))
    d, info = ex.method_deltas(n, traj, sm.jump_key(s_jump))
    acc, _ = rp.jump_and_continue(exp, n, s_jump, sched, d, f"s{seed} lr {lr:g}")
    rows.append({"seed": seed, "lr": lr, "backbone": bb, "grpo": accs[sched.short], "acc": acc,
                 "loss": {k: [float(v[0]), float(v[-1])] for k, v in info["loss_curves"].items()},
                 "sigma_hat": _median(info["predicted"], "sigma"),
                 "sigma_target": _median(info["triplets"]["target"], "sigma", -1),
                 "agreement": ex.delta_agreement(d, actual)})
  return rows


def report(rows, out: Path, command: str, sched: rp.Schedule) -> str:
  """Per lr, means over seeds: final/initial loss per group, σ̂, agreement, accuracy → Markdown + CSV."""
  body = []
  for lr in sorted({r["lr"] for r in rows}):
    rs = [r for r in rows if r["lr"] == lr]
    dims = sorted({d for r in rs for d in r["loss"]}, key=pred_lib.group_order)
    fit = ", ".join(f"{d}: {np.mean([r['loss'][d][1] / r['loss'][d][0] for r in rs]):.2f}" for d in dims)
    body.append([f"{lr:g}", fit, f"{np.mean([r['sigma_hat'] for r in rs]):.4f}",
                 f"{np.mean([r['sigma_target'] for r in rs]):.4f}",
                 f"{np.mean([r['agreement']['cos_global'] for r in rs]):.3f}",
                 mean_std([100 * r["acc"] for r in rs]), mean_std([100 * (r["acc"] - r["grpo"]) for r in rs]),
                 len(rs)])
  head = ["predictor lr", "final / initial loss per shape group", "median σ̂", "median σ of last target",
          f"cos(ΔŴ, W_{{t+{sched.k * sched.interval}}} − W_t)", f"NExt {sched.short} (%)",
          f"Δ vs GRPO-LoRA {sched.short} (paired)", "seeds"]
  grpo = mean_std([100 * r["grpo"] for r in rows if r["lr"] == rows[0]["lr"]])
  md = (f"# NExt's predictor: fit vs learning rate\n\ncommand: `{command}`; jump at step {sched.jump}; GRPO-LoRA {sched.short}: {grpo} %\n\n"
        + _table(head, body, out / "predictor_fit.csv"))
  (out / "predictor_fit.md").write_text(md)
  return md


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--quick", action="store_true")
  ap.add_argument("--seeds", default="0,1")
  ap.add_argument("--lrs", default=",".join(f"{lr:g}" for lr in LRS), help="predictor learning rates")
  ap.add_argument("--out", default=None, help="default experiments/results/predictor_fit[_quick]")
  ap.add_argument("--model-dir", default=None, help="default: the toy base (built if missing)")
  args = ap.parse_args(argv)
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.WARNING)
  os.chdir(rp.ROOT)
  sched = rp.QUICK if args.quick else rp.PAPER
  out = Path(args.out or f"experiments/results/predictor_fit{'_quick' if args.quick else ''}")
  out.mkdir(parents=True, exist_ok=True)
  rows_path = out / "rows.jsonl"
  rows = [json.loads(x) for x in rows_path.read_text().splitlines()] if rows_path.exists() else []
  if args.model_dir is None:
    build_toy_base("artifacts/toy_base")
  for seed in [int(s) for s in args.seeds.split(",") if int(s) not in {r["seed"] for r in rows}]:
    new = run_seed(seed, sched, args.quick, [float(x) for x in args.lrs.split(",")], args.model_dir)
    with rows_path.open("a") as f:
      f.writelines(json.dumps(r) + "\n" for r in new)
    rows += new
  print(report(rows, out, "python -m experiments.predictor_fit" + (" --quick" if args.quick else ""), sched))


if __name__ == "__main__":
  main()
