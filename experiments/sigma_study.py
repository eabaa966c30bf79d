"""How often does NExt's σ predictor collapse to one number, and what would the true σ per matrix change?

    python -m experiments.sigma_study --toy --seeds 0,1,2,3,4            # the toy preset's trajectory
    python -m experiments.sigma_study --base BASE --checkpoints 'RUN/checkpoint-*' --k 2 --name trl
    python -m experiments.sigma_study --probe experiments/results/real_rg/ckpt/RUN/collect --seeds 0,1

For every predictor seed and every back-test origin t of the trajectory (a real future W_{t+k} exists),
NExt is fitted on snapshots 0..t (`extrapolate.next_triplets`, official predictor settings) and scored
against W_{t+k} − W_t at α = 1 (`extrapolate.delta_agreement`):
    collapsed   σ̂ is one number for every matrix (`extrapolate.sigma_spread`: at_median = 1)
    NExt        Δ̂ = σ̂·û·v̂ᵀ as published
    oracle σ    Δ̂ = σ·û·v̂ᵀ with σ the *true* top singular value of each matrix's W_{t+k} − W_t: an
                analysis of what the σ predictor costs, not a method (it reads the future)
Rows go to <out>/rows.jsonl as they finish (a killed run resumes where it stopped); <out>/sigma.md holds
the table. The toy trajectory is the preset's COLLECT phase (150 steps, a snapshot every 10), seed 0; a
--probe trajectory is SmolLM2's, the jump-point state `experiments.rg_probe` keeps (its default settings).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
from pathlib import Path

import jax
import numpy as np

from experiments import reproduce as rp
from next_jax.core.metrics import progress
from next_jax.nxt import extrapolate as ex
from next_jax.nxt import posthoc, runs
from next_jax.nxt.predictor import PredictorConfig
from next_jax.run import experiment
from next_jax.run import state_machine as sm
from next_jax.run.toy_base import build_toy_base


def toy_trajectory(seed: int):
  """The toy preset's trajectory at its jump point (snapshots 0..15, steps 0..150), its predictor config
  and sign mode."""
  build_toy_base("artifacts/toy_base")
  exp = experiment.build(rp.make_config(seed, rp.PAPER, quick=False))
  s_jump, _, _, _ = rp.collect(exp, rp.PAPER, f"toy seed {seed}: COLLECT")
  return sm.trajectory(exp.setup, exp.ncfg, s_jump), exp.ncfg.predictor, exp.ncfg.sign


def probe_trajectory(ckpt_dir: str, task: str):
  """SmolLM2's trajectory at the jump point of an `experiments.rg_probe` run (its default schedule: a
  snapshot every 5 steps to step 75), restored from the checkpoint that run keeps."""
  from experiments import real_compare, rg_probe  # noqa: PLC0415
  from next_jax.core.checkpoint import Checkpointer  # noqa: PLC0415

  args = argparse.Namespace(task=task, extract="", lr=2e-5, max_new_tokens=0, prompts=8, group=8, seed=0,
                            jump=75, interval=5, n_test=16)  # shapes only: the state is restored
  exp = experiment.build(rg_probe.make_config(args))
  reader = Checkpointer(Path(ckpt_dir), read_only=True)
  tree, _ = reader.restore({k: getattr(exp.state, k) for k in real_compare.SAVED})
  reader.close()
  state = exp.state.replace(**tree)
  if int(state.phase) != sm.EXTRAPOLATE:
    sys.exit(f"{ckpt_dir}: the latest checkpoint is at step {int(state.rl.step)}, not at the jump point yet")
  return sm.trajectory(exp.setup, exp.ncfg, state), exp.ncfg.predictor, exp.ncfg.sign


def score(traj, t: int, k: int, pcfg: PredictorConfig, key: jax.Array, sign: str) -> dict:
  """One fit from snapshots 0..t: σ̂'s spread, and NExt's and the oracle-σ jump's agreement with W_{t+k} − W_t."""
  predicted, info = ex.next_triplets(traj.window(t), k, pcfg, key, sign)
  actual = traj.deltas(t + k, t)
  true = traj.triplets([(t + k, t)], sign)
  oracle = {m: p.replace(sigma=true[m].sigma) for m, p in predicted.items()}
  delta = lambda trip: {m: ex.triplet_delta(x)[0] for m, x in trip.items()}  # noqa: E731
  sig = np.concatenate([np.asarray(p.sigma).ravel() for p in predicted.values()])
  sig_true = np.concatenate([np.asarray(x.sigma).ravel() for x in true.values()])
  return {"spread": info["sigma_spread"], "collapsed": info["sigma_spread"]["predicted"]["at_median"] == 1.0,
          "sigma_true": {"min": float(sig_true.min()), "median": float(np.median(sig_true)),
                         "max": float(sig_true.max())},
          "sigma_relerr_median": float(np.median(np.abs(sig - sig_true) / sig_true)),
          "next": ex.delta_agreement(delta(predicted), actual), "oracle": ex.delta_agreement(delta(oracle), actual)}


def table(rows: list[dict]) -> str:
  """Per source: fits, collapse rate, σ̂ vs true σ, and NExt vs oracle-σ agreement (medians over fits)."""
  lines = ["| trajectory | fits (seeds) | σ̂ collapsed | median σ̂ | true σ (min … max, median of fits) | "
           "median abs. rel. error of σ̂ | NExt cos / rel. err. | oracle-σ cos / rel. err. |",
           "|---|---|---|---|---|---|---|---|"]
  for name in dict.fromkeys(r["source"] for r in rows):
    rs = [r for r in rows if r["source"] == name]
    med = lambda f: float(np.median([f(r) for r in rs]))  # noqa: E731
    seeds = len({r["seed"] for r in rs})
    lines.append(
        f"| {name} | {len(rs)} ({seeds} seeds) | {sum(r['collapsed'] for r in rs)}/{len(rs)} | "
        f"{med(lambda r: r['spread']['predicted']['median']):.4g} | "
        f"{med(lambda r: r['sigma_true']['min']):.4g} … {med(lambda r: r['sigma_true']['max']):.4g} | "
        f"{med(lambda r: r['sigma_relerr_median']):.2f} | "
        f"{med(lambda r: r['next']['cos_global']):.3f} / {med(lambda r: r['next']['relerr_global']):.3f} | "
        f"{med(lambda r: r['oracle']['cos_global']):.3f} / {med(lambda r: r['oracle']['relerr_global']):.3f} |")
  return "\n".join(lines)


def main(argv=None):
  argv = sys.argv[1:] if argv is None else list(argv)
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--toy", action="store_true", help="the toy preset's trajectory (seed 0 RL run)")
  ap.add_argument("--base", help="post-hoc: the base model's HF directory")
  ap.add_argument("--checkpoints", help="post-hoc: glob of checkpoint directories")
  ap.add_argument("--probe", help="an experiments.rg_probe run's collect/ checkpoint directory (SmolLM2)")
  ap.add_argument("--probe-task", default="rg:basic_arithmetic", help="that run's --task")
  ap.add_argument("--origins", default="all", choices=("all", "last"), help="back-test origins")
  ap.add_argument("--name", default=None, help="the trajectory's name in the table (default: toy / posthoc)")
  ap.add_argument("--k", type=int, default=5, help="NExt's target k snapshots ahead")
  ap.add_argument("--seeds", default="0,1,2,3,4", help="predictor seeds")
  ap.add_argument("--out", default="experiments/results/sigma")
  ap.add_argument("--report-only", action="store_true", help="re-render sigma.md from rows.jsonl")
  args = ap.parse_args(argv)
  if not args.report_only and args.toy + bool(args.checkpoints) + bool(args.probe) != 1:
    ap.error("give one of --toy, --base/--checkpoints, --probe")
  from absl import logging as absl_logging  # noqa: PLC0415
  absl_logging.set_verbosity(absl_logging.WARNING)
  name = args.name or ("toy" if args.toy else "SmolLM2 probe" if args.probe else "posthoc")
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  rows_path = out / "rows.jsonl"
  rows = [json.loads(x) for x in rows_path.read_text().splitlines()] if rows_path.exists() else []
  done = {(r["source"], r["seed"], r["origin"]) for r in rows}
  if not args.report_only:  # the fits not yet in rows.jsonl, each appended as it comes
    if args.toy:
      traj, pcfg, sign = toy_trajectory(0)
    elif args.probe:
      traj, pcfg, sign = probe_trajectory(args.probe, args.probe_task)
    else:
      traj, pcfg, sign = runs.read(args.base, args.checkpoints).trajectory, PredictorConfig(), "max_abs_u"
    pcfg = dataclasses.replace(pcfg, pad_snapshots=traj.num - 1 - args.k)  # every origin: one compile
    origins = posthoc.backtest_origins(traj.num, args.k, args.origins)
    todo = [(int(s), t) for s in args.seeds.split(",") for t in origins if (name, int(s), t) not in done]
    bar = progress(len(todo), desc="σ study")
    for seed, t in todo:
      r = {"source": name, "command": f"python -m experiments.sigma_study {shlex.join(argv)}", "seed": seed,
           "origin": t, "step": int(traj.steps[t]), "k": args.k,
           **score(traj, t, args.k, pcfg, jax.random.fold_in(jax.random.PRNGKey(seed), t), sign)}
      with rows_path.open("a") as f:
        f.write(json.dumps(r) + "\n")
      rows.append(r)
      bar.update(1)
    bar.close()
  commands = "\n".join(f"- {n}: `{c}`" for n, c in dict.fromkeys((r["source"], r["command"]) for r in rows))
  md = f"# σ̂ collapse and the oracle σ\n\n{commands}\n\n{table(rows)}\n"
  (out / "sigma.md").write_text(md)
  print(md)


if __name__ == "__main__":
  main()
