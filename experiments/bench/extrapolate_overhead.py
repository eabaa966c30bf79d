"""What one NExt jump costs on the toy preset, in RL steps: rank-1 triplets, predictor training, the whole
extrapolate_step — each against the median RL step of the same run.

    python -m experiments.bench.extrapolate_overhead [--repeats 3] [--out experiments/results/bench_extrapolate.md]

Workload: `next_jax/configs/toy_arith.py` with the paper's schedule (reproduce.PAPER: 16 snapshots, k = 5, the
paper's predictor: hidden 256, 1000 full-batch epochs). The trajectory's values are random (timing does not
depend on them; 150 real steps would only add minutes). The RL step is `state_machine.train_step` on the
same state: sampling 64 prompts × G 8, verification, one update. Each piece runs once to compile, then
`--repeats` times; medians are reported, the first call separately (compile + run).

Floor: per shape group, XLA's FLOP count of one predictor epoch (forward, backward, AdamW;
`predictor.epoch_step`) × epochs, divided by this core's f32 matmul rate measured in the same run
(bench.common.matmul_peak, [1024]² @ [1024]²): the time exact f32 full-batch training cannot beat here.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
from pathlib import Path

import jax

from experiments import reproduce as rp
from experiments.bench.common import first_and_median, matmul_peak
from next_jax.nxt import extrapolate, rank1
from next_jax.nxt import predictor as pred_lib
from next_jax.run import driver, experiment
from next_jax.run import state_machine as sm
from next_jax.run.toy_base import build_toy_base


def random_trajectory(state: sm.NExtState, key: jax.Array, scale: float = 0.02) -> sm.NExtState:
  """Fill every snapshot with N(0, scale²) entries (LoRA A and B alike, so B ≠ 0)."""
  leaves, tree = jax.tree.flatten(state.trajectory)
  keys = jax.random.split(key, len(leaves))
  filled = [scale * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
  return state.replace(trajectory=jax.tree.unflatten(tree, filled))


def epoch_flops(g: jax.Array, cfg: pred_lib.PredictorConfig) -> float:
  """XLA's FLOP count of one training epoch of one group's predictor on rows shaped like g [S, R, dim]."""
  tx = pred_lib.make_optimizer(cfg)
  params = jax.eval_shape(lambda k: pred_lib.init_matrix_predict(k, g.shape[-1], cfg.hidden), jax.random.key(0))
  carry = (params, jax.eval_shape(tx.init, params))
  rows = jax.ShapeDtypeStruct(g.shape, g.dtype)
  step = jax.jit(lambda c, g, l, t: pred_lib.epoch_step(tx, g, l, t, cfg)(c, None))
  cost = step.lower(carry, rows, rows, rows).compile().cost_analysis()
  return float((cost[0] if isinstance(cost, list) else cost)["flops"])


def group_table(traj, ncfg, key, repeats: int, rl_step: float) -> list[str]:
  """Per shape group: rows, GFLOP of the whole training, measured time and the FLOP floor, both orders.
  The rows are the predictor's training inputs (`predictor.to_rows` of the G, L, T triplets)."""
  pairs = rank1.delta_pairs(ncfg.num_snapshots, ncfg.k)
  rows = {kind: pred_lib.to_rows(traj.triplets(pairs[kind], ncfg.sign))[0] for kind in ("global", "local", "target")}
  peak = matmul_peak(1024, 10)
  lines = ["", f"Per shape group (`train_predictor`, {ncfg.predictor.epochs} epochs). This core's f32 matmul "
           f"rate: **{peak / 1e9:.0f} GFLOP/s**; floor = GFLOP / that rate.", "",
           "| group | rows S × R | reassociate | GFLOP | median s | floor s | achieved / rate |",
           "|---|---|---|---|---|---|---|"]
  total = {False: [0.0, 0.0], True: [0.0, 0.0]}
  for dim in sorted(rows["global"]):
    g, l, t = (rows[kind][dim] for kind in ("global", "local", "target"))
    for re in (False, True):
      cfg = dataclasses.replace(ncfg.predictor, reassociate=re)
      flops = epoch_flops(g, cfg) * cfg.epochs
      _, med = first_and_median(lambda: pred_lib.train_predictor(key, g, l, t, cfg)[1], repeats)
      total[re][0] += med
      total[re][1] += flops / peak
      lines.append(f"| {dim} | {g.shape[0]} × {g.shape[1]} | {re} | {flops / 1e9:.1f} | {med:.2f} | "
                   f"{flops / peak:.2f} | {flops / med / peak:.0%} |")
  for re, (med, floor) in total.items():
    lines.append(f"| all | | {re} | | **{med:.2f}** = {med / rl_step:.1f} RL steps | **{floor:.2f}** = "
                 f"{floor / rl_step:.1f} RL steps | |")
  return lines


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--out", default="experiments/results/bench_extrapolate.md")
  args = ap.parse_args()
  load0 = os.getloadavg()
  sched = rp.PAPER
  build_toy_base("artifacts/toy_base")
  exp = experiment.build(rp.make_config(0, sched, quick=False))
  ncfg, setup = exp.ncfg, exp.setup

  state, _, _, rl_step = rp.advance(exp, ncfg, driver.fork(exp.state), 12, desc="RL steps")  # median s/step

  state = random_trajectory(state, jax.random.key(0))
  traj = sm.trajectory(setup, ncfg, state)
  pairs = rank1.delta_pairs(ncfg.num_snapshots, ncfg.k)
  flat = [p for kind in ("global", "local", "target", "last_global", "last_local") for p in pairs[kind]]
  key = sm.jump_key(state)
  fast = dataclasses.replace(ncfg, predictor=dataclasses.replace(ncfg.predictor, reassociate=True))
  rows = {
      f"rank-1 triplets ({len(flat)} deltas × {len(state.trajectory)} modules)":
          lambda: traj.triplets(flat, ncfg.sign),
      "NExt Δ: rank-1 + predictors (one per shape group) + ΔŴ":
          lambda: extrapolate.method_deltas(ncfg, traj, key)[0],
      "whole extrapolate_step (+ drift measures, the jump)":
          lambda: sm.extrapolate_step(setup, ncfg, state.replace(phase=sm.EXTRAPOLATE))[0].base_params,
      "NExt Δ, nxt.predictor.reassociate=True":
          lambda: extrapolate.method_deltas(fast, traj, key)[0],
      "whole extrapolate_step, nxt.predictor.reassociate=True":
          lambda: sm.extrapolate_step(setup, fast, state.replace(phase=sm.EXTRAPOLATE))[0].base_params,
  }
  timed = {name: first_and_median(fn, args.repeats) for name, fn in rows.items()}
  names = list(timed)
  pred_first = timed[names[1]][0] - timed[names[0]][0]
  pred_med = timed[names[1]][1] - timed[names[0]][1]
  table = [(n, *timed[n]) for n in names[:1]] + [("predictor training (difference of the two above)",
                                                  pred_first, pred_med)] + [(n, *timed[n]) for n in names[1:]]
  lines = [
      "# One NExt jump on the toy preset, in RL steps",
      "",
      f"Command: `python -m experiments.bench.extrapolate_overhead --repeats {args.repeats}`  ",
      (f"Date: {datetime.date.today()}; {os.cpu_count()} CPU cores; jax {jax.__version__}; "
       f"predictor hidden {ncfg.predictor.hidden}, {ncfg.predictor.epochs} epochs; {ncfg.num_snapshots} "
       f"snapshots, k = {ncfg.k}"),
      "",
      f"Median RL step (train_step, 64 prompts × G 8): **{rl_step:.3f} s**",
      "",
      "| piece | first call (s, incl. compile) | median later call (s) | later call in RL steps |",
      "|---|---|---|---|",
  ]
  lines += [f"| {n} | {first:.2f} | {med:.2f} | {med / rl_step:.1f} |" for n, first, med in table]
  lines += group_table(traj, ncfg, key, args.repeats, rl_step)
  load = lambda xs: ", ".join(f"{x:.1f}" for x in xs)  # noqa: E731
  lines[3] += f"; load average {load(load0)} before, {load(os.getloadavg())} after"
  md = "\n".join(lines) + "\n"
  Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  Path(args.out).write_text(md)
  print(md)


if __name__ == "__main__":
  main()
