"""When does trajectory extrapolation pay? NExt and its baselines across the gradient signal-to-noise range.

    python -m experiments.snr_study                      # every point × 3 seeds → experiments/results/snr/
    python -m experiments.snr_study --drift-only         # COLLECT only: the drift measures of each point
    python -m experiments.snr_study --points n512,n2048 --seeds 0
    python -m experiments.snr_study --quick              # CI-sized smoke run

A *point* is one setting of the knobs that move the gradient signal-to-noise ratio of an RL step: samples
per step (prompts × G), mini-batch updates per step, learning rate (POINTS). Per (point, seed), on the toy
task with the paper's schedule (reproduce.PAPER: jump at 150, snapshot every 10, k = 5, +100):
  1. one COLLECT run from the backbone to the jump point; the trajectory's drift measures there
     (next_jax.nxt.drift: increment cosine, growth exponent, linear-fit R² and skill vs hold-last, E₁);
  2. GRPO-LoRA continued to 400 (accuracy at 250 and 400; W₂₀₀ − W₁₅₀ is the true future);
  3. NExt, RL-Extra, AlphaRL and RELEX each jump from that same state (accuracy right after the jump) and
     continue to 250; each Δ's agreement with the true future.
Every branch is evaluated on the same 2048 test problems with the same sampling seed, so differences
between methods of one (point, seed) are paired. Rows go to <out>/rows.jsonl as each (point, seed)
finishes (a killed study resumes there); the report is <out>/snr_study.md + CSV + PNG.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

from experiments import reproduce as rp
from experiments import snr_report
from next_jax.run import driver, experiment
from next_jax.run.toy_base import build_toy_base


@dataclasses.dataclass(frozen=True)
class Point:
  """Knobs of one RL step: prompts × group_size samples, split into `mini_batches` optimiser steps."""

  prompts: int
  group: int = 8
  mini_batches: int = 1
  lr: float = 1e-3

  @property
  def samples(self) -> int:
    return self.prompts * self.group


POINTS = {
    "n128": Point(16),
    "n512": Point(64),
    "n2048": Point(256),
    "n512_lr3e-4": Point(64, lr=3e-4),
    "n2048_lr3e-4": Point(256, lr=3e-4),
    "n2048_mb4_lr3e-4": Point(256, mini_batches=4, lr=3e-4),  # the paper's shape: 4 updates per step
}
QUICK_POINTS = {"q8": Point(4, group=2), "q16_mb2": Point(4, group=4, mini_batches=2)}


def configure(c, p: Point):
  c.rollout.prompts_per_step, c.rollout.group_size = p.prompts, p.group
  c.rl.num_mini_batches, c.rl.lr = p.mini_batches, p.lr
  return c


def run_point(name: str, p: Point, seed: int, sched: rp.Schedule, quick: bool, drift_only: bool,
              model_dir=None) -> dict:
  """One (point, seed): COLLECT, drift at the jump, and unless drift_only GRPO to 400 and every jump."""
  exp = experiment.build(configure(rp.make_config(seed, sched, quick), p), model_dir)
  t0 = time.perf_counter()
  s_jump, bb, accs, sec = rp.collect(exp, sched, f"{name} s{seed} collect")
  out = {"table": "snr", "point": name, "seed": seed, **dataclasses.asdict(p), "samples": p.samples,
         "backbone": bb, "acc": {"GRPO-LoRA@jump": accs[sched.jump]}, "sec_per_step": sec,
         "drift": rp.trajectory_analysis(exp, s_jump, sched)["drift"]}
  if not drift_only:
    h = sched.k * sched.interval
    _, g, mats, sec2 = rp.advance(exp, exp.ncfg, driver.skip_jump(driver.fork(s_jump)), sched.long,
                                  evals={sched.short, sched.long}, snaps={sched.jump + h},
                                  desc=f"{name} s{seed} GRPO-LoRA")
    out["acc"].update({f"GRPO-LoRA@{sched.short}": g[sched.short], f"GRPO-LoRA@{sched.long}": g[sched.long]})
    actual = rp.actual_future(exp, s_jump, mats[sched.jump + h])
    jumped, out["agreement"], out["extrapolate_s"] = rp.branch_methods(exp, s_jump, sched, actual, seed,
                                                                      at_jump=True)
    out["acc"].update(jumped)
    out["sec_per_step"] = (sec + sec2) / 2
  out["minutes"] = (time.perf_counter() - t0) / 60
  return out


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--quick", action="store_true")
  ap.add_argument("--drift-only", action="store_true", help="stop each run at the jump point")
  ap.add_argument("--points", default=None, help=f"comma-separated subset of {sorted(POINTS)}")
  ap.add_argument("--seeds", default="0,1,2")
  ap.add_argument("--out", default=None, help="default experiments/results/snr[_drift][_quick]")
  ap.add_argument("--model-dir", default=None, help="default: the toy base (built if missing)")
  args = ap.parse_args(argv)
  from absl import logging as absl_logging  # noqa: PLC0415
  absl_logging.set_verbosity(absl_logging.WARNING)
  os.chdir(rp.ROOT)
  table = QUICK_POINTS if args.quick else POINTS
  names = args.points.split(",") if args.points else list(table)
  unknown = [n for n in names if n not in table]
  if unknown:
    raise SystemExit(f"--points: unknown {unknown}; choose from {sorted(table)}")
  sched = rp.QUICK if args.quick else rp.PAPER
  suffix = ("_drift" if args.drift_only else "") + ("_quick" if args.quick else "")
  out = Path(args.out or f"experiments/results/snr{suffix}")
  out.mkdir(parents=True, exist_ok=True)
  rows_path = out / "rows.jsonl"
  rows = [json.loads(x) for x in rows_path.read_text().splitlines()] if rows_path.exists() else []
  done = {(r["point"], r["seed"]) for r in rows}
  if args.model_dir is None:
    build_toy_base("artifacts/toy_base")
  todo = [(n, int(s)) for s in args.seeds.split(",") for n in names if (n, int(s)) not in done]
  t_all = time.time()
  for i, (name, seed) in enumerate(todo):  # seed-major: a cut-short study still covers every point
    print(f"== [{i + 1}/{len(todo)}] point {name} {table[name]}, seed {seed}", flush=True)
    r = run_point(name, table[name], seed, sched, args.quick, args.drift_only, args.model_dir)
    with rows_path.open("a") as f:
      f.write(json.dumps(r, default=float) + "\n")
    rows.append(r)
    print(f"{name} seed {seed}: {r['minutes']:.1f} min, drift {r['drift']}", flush=True)
  command = "python -m experiments.snr_study" + (" --quick" if args.quick else "") + (
      " --drift-only" if args.drift_only else "")
  snr_report.write(rows, out, command=command, schedule=dataclasses.asdict(sched))
  print(f"done in {(time.time() - t_all) / 60:.1f} min; report: {out}/snr_study.md")


if __name__ == "__main__":
  main()
