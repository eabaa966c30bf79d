"""The paper's tables at CPU scale, on the toy task: every method branches from one shared COLLECT phase.

    python -m experiments.reproduce                 # 3 seeds, the paper's schedule (150 + 100 vs 250 / 400)
    python -m experiments.reproduce --quick         # CI-sized smoke run (seconds per family)
    python -m experiments.reproduce --seeds 0 --families lora,alpha

Per seed, a *family* is one RL run from the backbone to the jump point (step 150, a snapshot every 10)
and the branches taken from that state (each a fresh copy, so every method sees the same trajectory):
  lora     GRPO-LoRA continued to 400 (the 250/400 baselines, and the true future W₂₀₀ − W₁₅₀);
           NExt, RL-Extra, AlphaRL, RELEX jumps + 100 steps; ablations w/o global delta, w/o local delta,
           sign="none"; predicted-vs-actual Δ agreement; drift measures
  alpha    the α grid from the same step-150 state (accuracy right after the jump and 100 steps later)
  full     GRPO full-parameter to 400; NExt on the dense trajectory (the "w/o LoRA" ablation)
  rloo, reinforce_pp   the compatibility study: plain to 250/400 and NExt at 250
  cyclic   NExt with a jump every 60 steps (cycles=3), evaluated along the way
Rows go to <out>/rows.jsonl as each family finishes (a killed run resumes at family granularity);
`experiments.report` turns them into Markdown + CSV tables and PNG plots.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]

from experiments import report
from next_jax.configs import toy_arith
from next_jax.core.metrics import progress
from next_jax.nxt import drift, rank1
from next_jax.nxt import extrapolate as ex
from next_jax.nxt.trajectory import Trajectory
from next_jax.rl import trained
from next_jax.run import driver, experiment
from next_jax.run import state_machine as sm
from next_jax.run.toy_base import build_toy_base

FAMILIES = ("lora", "full", "rloo", "reinforce_pp", "cyclic", "alpha")


@dataclasses.dataclass(frozen=True)
class Schedule:
  jump: int = 150  # extrapolate_at
  interval: int = 10
  k: int = 5
  extra: int = 100  # RL steps after the jump
  long: int = 400  # the long baseline
  cyclic_every: int = 60

  @property
  def short(self) -> int:
    return self.jump + self.extra


PAPER = Schedule()
QUICK = Schedule(jump=8, interval=2, k=2, extra=4, long=16, cyclic_every=6)


def make_config(seed: int, sched: Schedule, quick: bool, algo: str = "grpo", trainable: str = "lora"):
  c = toy_arith.get_config(f"algo={algo},seed={seed},trainable={trainable}" + (",quick" if quick else ""))
  c.nxt.extrapolate_at, c.nxt.interval, c.nxt.k = sched.jump, sched.interval, sched.k
  c.total_steps = sched.long
  c.eval.every, c.log.progress = 0, False
  if quick:  # a smoke run: a small predictor, trained briefly
    c.nxt.predictor.hidden, c.nxt.predictor.epochs = 32, 20
  return c


# -------------------------------------------------------------------------------------------- running


def advance(exp, ncfg, state, until: int, evals=(), snaps=(), desc: str = ""):
  """`driver.advance` to RL step `until` (or the next jump point); accuracy at `evals`, trained matrices
  at `snaps`; returns (state, accs, mats, median seconds per RL step: evaluation and compilation excluded)."""
  accs, mats, times = {}, {}, []
  bar = progress(until - int(state.rl.step), desc=desc)
  clock = [time.perf_counter()]

  def on_step(s, _):
    times.append(time.perf_counter() - clock[0])
    bar.update(1)
    step = int(s.rl.step)
    if step in snaps:
      mats[step] = driver.fork(trained.matrices(s.rl.train.params, exp.setup.lora_cfg))
    if step in evals:
      accs[step] = experiment.accuracy(exp, s, exp.test)
    clock[0] = time.perf_counter()

  state = driver.advance(exp.setup, ncfg, state, until, on_step)
  bar.close()
  return state, accs, mats, float(np.median(times)) if times else 0.0


def collect(exp, sched: Schedule, desc: str):
  """Backbone → the jump point (phase EXTRAPOLATE), evaluating every `jump/3` steps."""
  backbone = experiment.accuracy(exp, exp.state, exp.test)
  marks = {sched.jump * i // 3 for i in (1, 2, 3)}
  state, accs, _, sec = advance(exp, exp.ncfg, driver.fork(exp.state), sched.jump, evals=marks, desc=desc)
  assert int(state.phase) == sm.EXTRAPOLATE, "COLLECT did not end at the jump point"
  return state, backbone, accs, sec


def jump_and_continue(exp, ncfg, s_jump, sched, deltas=None, desc="", at_jump: bool = False):
  """A jump from a copy of the jump-point state, then `extra` steps → (acc after them, info); with
  at_jump, info["acc_at_jump"] is the accuracy right after the jump (before any further RL)."""
  state, info = driver.jump(exp.setup, ncfg, driver.fork(s_jump), deltas=deltas)
  if at_jump:
    info["acc_at_jump"] = experiment.accuracy(exp, state, exp.test)
  state, accs, _, _ = advance(exp, ncfg, state, sched.short, evals={sched.short}, desc=desc)
  return accs[sched.short], info


def actual_future(exp, s_jump, mats_future) -> dict:
  """Dense W_{t+h} − W_t per module ([L, n, m]) from the jump-point state and the trained matrices at t+h."""
  now = trained.matrices(s_jump.rl.train.params, exp.setup.lora_cfg)
  pair = jax.tree.map(lambda a, b: jnp.stack([a, b]), now, mats_future)
  lcfg = exp.setup.lora_cfg
  return Trajectory(pair, np.arange(2), trained.scale(lcfg), lcfg is not None).deltas(1, 0)


def trajectory_analysis(exp, s_jump, sched: Schedule) -> dict:
  """E₁ of G_i at every snapshot, the drift measures and the per-matrix R² values at the jump point."""
  traj = sm.trajectory(exp.setup, exp.ncfg, s_jump)
  num = traj.num
  trip = traj.global_triplets("none")
  spectra = jnp.concatenate([t.spectrum.reshape(num - 1, -1, t.spectrum.shape[-1]) for t in trip.values()], 1)
  e1 = [float(jnp.median(rank1.energy_ratios(spectra[i])[0])) for i in range(num - 1)]
  med, values = drift.trajectory_drift(traj, sched.k, spectra[-1])
  return {"E1_steps": traj.steps[1:].tolist(), "E1_by_step": e1, "drift": med,
          "r2_values": values["r2_linear"].tolist()}


def row(table, family, seed, method, steps, acc, backbone, **extra):
  return {"table": table, "family": family, "seed": seed, "method": method, "steps": steps, "acc": acc,
          "backbone": backbone, **extra}


def branch_methods(exp, s_jump, sched, actual, seed, at_jump: bool = False,
                   methods=tuple(ex.METHODS)) -> tuple[dict, dict, float]:
  """Every registered method (or the `methods` named) jumps from the same jump-point state and continues
  `extra` steps.

  Returns ({label: acc after the extra steps}, {label: agreement of its Δ with `actual`}, NExt's
  extrapolation seconds); with at_jump also {label + "@jump": acc right after the jump} in the first."""
  ncfg, traj = exp.ncfg, sm.trajectory(exp.setup, exp.ncfg, s_jump)
  accs, agreement, t_next = {}, {}, 0.0
  for m, name in ((m, ex.label(m)) for m in methods):
    n = dataclasses.replace(ncfg, method=m)
    t0 = time.perf_counter()
    d, _ = ex.method_deltas(n, traj, sm.jump_key(s_jump))
    jax.block_until_ready(d)
    t_next = time.perf_counter() - t0 if m == "next" else t_next
    agreement[name] = ex.delta_agreement(d, actual)
    accs[name], info = jump_and_continue(exp, n, s_jump, sched, d, f"s{seed} {name}", at_jump)
    if at_jump:
      accs[name + "@jump"] = info["acc_at_jump"]
  return accs, agreement, t_next


def lora_family(exp, sched, seed, methods=tuple(ex.METHODS), ablate: bool = True) -> list[dict]:
  """GRPO-LoRA to 400, every method (or those in `methods`) from the same step-150 state, Δ agreement,
  drift, and (ablate) NExt's ablations."""
  s_jump, bb, accs, sec = collect(exp, sched, f"s{seed} lora collect")
  h = sched.k * sched.interval
  ncfg = exp.ncfg
  rows = [row("curve", "lora", seed, "GRPO-LoRA", s, a, bb) for s, a in accs.items()]
  marks = set(range(sched.jump + h, sched.long + 1, h)) | {sched.short, sched.long}
  _, accs, mats, sec2 = advance(exp, ncfg, driver.skip_jump(driver.fork(s_jump)), sched.long, evals=marks,
                                snaps={sched.jump + h}, desc=f"s{seed} GRPO-LoRA")
  rows += [row("curve", "lora", seed, "GRPO-LoRA", s, a, bb) for s, a in accs.items()]
  rows += [row("main", "lora", seed, "GRPO-LoRA", s, accs[s], bb) for s in (sched.short, sched.long)]
  actual = actual_future(exp, s_jump, mats[sched.jump + h])
  analysis = trajectory_analysis(exp, s_jump, sched)
  accs, agreement, t_next = branch_methods(exp, s_jump, sched, actual, seed, methods=methods)
  for name, acc in accs.items():
    rows.append(row("main", "lora", seed, name, sched.short, acc, bb,
                    **({"alpha": ncfg.alpha} if name == ex.label("next") else {})))
  rows.append({"table": "overhead", "family": "lora", "seed": seed, "extrapolate_s": t_next,
               "sec_per_step": (sec + sec2) / 2, "steps_saved": sched.long - sched.short})
  rows.append({"table": "analysis", "family": "lora", "seed": seed, "agreement": agreement, **analysis})
  return rows + (ablations(exp, ncfg, s_jump, sched, seed, bb) if ablate else [])


def alpha_family(exp, sched, seed) -> list[dict]:
  """Accuracy right after the jump and after the `extra` steps for each α of the grid (0 = no jump),
  from the same (deterministic) step-150 state and NExt prediction as the lora family."""
  s_jump, bb, _, _ = collect(exp, sched, f"s{seed} alpha collect")
  ncfg = exp.ncfg
  deltas, _ = ex.method_deltas(ncfg, sm.trajectory(exp.setup, ncfg, s_jump), sm.jump_key(s_jump))
  rows = []
  for a in (0.0,) + ncfg.alpha_grid:
    n = dataclasses.replace(ncfg, alpha=a)
    state, _ = driver.jump(exp.setup, n, driver.fork(s_jump), deltas=deltas)
    rows.append(row("alpha", "lora", seed, "NExt", sched.jump, experiment.accuracy(exp, state, exp.test),
                    bb, alpha=a, when="before"))
    _, accs, _, _ = advance(exp, n, state, sched.short, evals={sched.short}, desc=f"s{seed} α={a}")
    rows.append(row("alpha", "lora", seed, "NExt", sched.short, accs[sched.short], bb, alpha=a, when="after"))
  return rows


def ablations(exp, ncfg, s_jump, sched, seed, bb) -> list[dict]:
  variants = {"w/o global delta": dict(predictor=dataclasses.replace(ncfg.predictor, use_global=False)),
              "w/o local delta": dict(predictor=dataclasses.replace(ncfg.predictor, use_local=False)),
              "sign none (official)": dict(sign="none")}
  rows = []
  for name, kw in variants.items():
    acc, _ = jump_and_continue(exp, dataclasses.replace(ncfg, **kw), s_jump, sched, desc=f"s{seed} {name}")
    rows.append(row("ablation", "lora", seed, name, sched.short, acc, bb))
  return rows


def plain_and_next(exp, sched, seed, family, label) -> list[dict]:
  """A family with GRPO(-like) to 250/400 and NExt from its step-150 state (full, rloo, reinforce_pp)."""
  s_jump, bb, accs, sec = collect(exp, sched, f"s{seed} {family} collect")
  rows = [row("curve", family, seed, label, s, a, bb) for s, a in accs.items()]
  _, accs, _, _ = advance(exp, exp.ncfg, driver.skip_jump(driver.fork(s_jump)), sched.long,
                          evals={sched.short, sched.long}, desc=f"s{seed} {label}")
  table = "main" if family == "full" else "compat"
  rows += [row(table, family, seed, label, s, accs[s], bb) for s in (sched.short, sched.long)]
  acc, info = jump_and_continue(exp, exp.ncfg, s_jump, sched, desc=f"s{seed} {label}+NExt")
  name = "w/o LoRA (dense SVD)" if family == "full" else f"{label} + NExt"
  rows.append(row("ablation" if family == "full" else "compat", family, seed, name, sched.short, acc, bb))
  if family == "full":
    rows.append({"table": "analysis", "family": "full", "seed": seed,
                 **trajectory_analysis(exp, s_jump, sched)})
  return rows


def cyclic_family(exp, sched, seed) -> list[dict]:
  """NExt jumping every `cyclic_every` steps (up to 3 jumps), evaluated every k·interval steps to 250."""
  bb = experiment.accuracy(exp, exp.state, exp.test)
  h = sched.k * sched.interval
  rows, jumps = [], []
  marks = set(range(h, sched.short + 1, h)) | {sched.short}

  def on_step(s, _):
    if int(s.rl.step) in marks:
      acc = experiment.accuracy(exp, s, exp.test)
      rows.append(row("cyclic", "cyclic", seed, "cyclic NExt", int(s.rl.step), acc, bb, jumps=list(jumps)))

  driver.run(exp.setup, exp.ncfg, driver.fork(exp.state), on_step=on_step, progress_bar=False,
             on_jump=lambda s, _: jumps.append(int(s.rl.step)))
  return rows


def run_family(family: str, seed: int, sched: Schedule, quick: bool, model_dir=None) -> list[dict]:
  if family == "cyclic":
    c = make_config(seed, sched, quick)
    c.nxt.extrapolate_at, c.total_steps = sched.cyclic_every, sched.short
    c.nxt.cycles = min(3, sched.short // sched.cyclic_every)
    return cyclic_family(experiment.build(c, model_dir), sched, seed)
  algo = family if family in ("rloo", "reinforce_pp") else "grpo"
  c = make_config(seed, sched, quick, algo=algo, trainable="full" if family == "full" else "lora")
  exp = experiment.build(c, model_dir)
  if family == "lora":
    return lora_family(exp, sched, seed)
  if family == "alpha":
    return alpha_family(exp, sched, seed)
  label = {"full": "GRPO-full", "rloo": "RLOO", "reinforce_pp": "REINFORCE++"}[family]
  return plain_and_next(exp, sched, seed, family, label)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--quick", action="store_true")
  ap.add_argument("--seeds", default="0,1,2")
  ap.add_argument("--families", default=",".join(FAMILIES))
  ap.add_argument("--out", default=None, help="default experiments/results/repro[_quick]")
  ap.add_argument("--model-dir", default=None, help="default: the toy base (built if missing)")
  args = ap.parse_args(argv)
  from absl import logging as absl_logging  # noqa: PLC0415
  absl_logging.set_verbosity(absl_logging.WARNING)
  os.chdir(ROOT)
  sched = QUICK if args.quick else PAPER
  out = Path(args.out or f"experiments/results/repro{'_quick' if args.quick else ''}")
  out.mkdir(parents=True, exist_ok=True)
  rows_path = out / "rows.jsonl"
  rows = [json.loads(x) for x in rows_path.read_text().splitlines()] if rows_path.exists() else []
  done = {(r["family"], r["seed"]) for r in rows if r["table"] == "done"}
  if args.model_dir is None:
    build_toy_base("artifacts/toy_base")
  todo = [(f, int(s)) for f in args.families.split(",") for s in args.seeds.split(",")
          if (f, int(s)) not in done]  # family-major: an interrupted run still has whole tables
  t_all = time.time()
  for i, (family, seed) in enumerate(todo):
    print(f"== [{i + 1}/{len(todo)}] family {family}, seed {seed}", flush=True)
    t0 = time.time()
    new = run_family(family, seed, sched, args.quick, args.model_dir)
    new.append({"table": "done", "family": family, "seed": seed, "minutes": (time.time() - t0) / 60})
    with rows_path.open("a") as f:
      f.writelines(json.dumps(r, default=float) + "\n" for r in new)
    rows += new
    print(f"{family} seed {seed}: {(time.time() - t0) / 60:.1f} min", flush=True)
  command = "python -m experiments.reproduce" + (" --quick" if args.quick else "")
  report.write(rows, out, command=command, schedule=dataclasses.asdict(sched))
  print(f"done in {(time.time() - t_all) / 60:.1f} min; tables: {out}/tables.md")


if __name__ == "__main__":
  main()
