"""Issue 27, study item 2: the paper's comparison on SmolLM2-135M-Instruct and rg:basic_arithmetic, scaled
(jump at 75, a snapshot every 5, k = 5: "125 vs 200" for the paper's "250 vs 400").

    python -m experiments.rg_compare --stage collect    # backbone → 75: the shared jump-point state
    python -m experiments.rg_compare --stage grpo       # plain GRPO 75 → 200 (its LoRA at 100 is the true future)
    python -m experiments.rg_compare --stage next       # NExt (α 1.5, official predictor) jumps at 75, GRPO to 125
    python -m experiments.rg_compare --stage rl_extra   # RL-Extra jumps at 75, GRPO to 125 (also relex, alpharl)
    python -m experiments.rg_compare --stage analysis   # drift at 75; each Δ against W₁₀₀ − W₇₅ (needs grpo ≥ 100)
    python -m experiments.rg_compare --report-only      # compare.md from compare.jsonl

The setting is the probe's (experiments/rg_probe.py: lr 2e-5, 8 prompts × 8 samples, 16 new tokens), so
its first 75 steps are this collect stage. Every stage after `collect` starts from the checkpointed
step-75 state and is its own process: two of them can run at once, one per core. Each stage checkpoints
every 5 steps under <out>/ckpt/cmp_s<seed>/ and resumes when rerun. Test accuracy: T = 1, one sample per
problem, the same --n-test held-out problems and sampling seed for every branch, so differences are
paired; each evaluation's per-problem results are kept in the row. Rows go to <out>/compare.jsonl as they
come; <out>/compare.md and compare.png are rendered from them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

import numpy as np

from experiments import reproduce as rp
from experiments import rg_probe
from experiments.real_compare import SAVED, resumable
from next_jax.core.checkpoint import Checkpointer
from next_jax.nxt import extrapolate as ex
from next_jax.rl import trainer
from next_jax.run import driver, experiment
from next_jax.run import state_machine as sm

ROOT = Path(__file__).resolve().parents[1]
SCHED = rp.Schedule(jump=75, interval=5, k=5, extra=50, long=200)
QUICK = rp.Schedule(jump=4, interval=1, k=2, extra=2, long=6)  # --quick: a smoke run of every stage
BRANCHES = ("next", "rl_extra", "relex", "alpharl")
EVAL_SEED = 12345  # the probe's: every branch samples its test answers with the same keys
ALL_FIELDS = SAVED + ("base_params", "cycle", "cycle_start")  # after a jump the base weights moved


# ------------------------------------------------------------------------------------------- rows


def read(path: Path) -> list[dict]:
  return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


class Run:
  """One seed's experiment, its rows file and its checkpoint folder."""

  def __init__(self, args, out: Path):
    self.args, self.out, self.rows_path = args, out, out / "compare.jsonl"
    probe_args = argparse.Namespace(task=args.task, extract="", seed=args.seed, n_test=args.n_test,
                                    prompts=2 if args.quick else 8, group=4 if args.quick else 8, lr=2e-5,
                                    max_new_tokens=0, jump=SCHED.jump, interval=SCHED.interval)
    self.config = rg_probe.make_config(probe_args)
    self.config.nxt.k = SCHED.k
    if args.quick:
      self.config.nxt.predictor.hidden, self.config.nxt.predictor.epochs = 16, 10
    self.exp = experiment.build(self.config)
    self.ck = out / "ckpt" / f"cmp_s{args.seed}"

  def has(self, **key) -> bool:
    return any(all(r.get(k) == v for k, v in key.items()) for r in read(self.rows_path))

  def write(self, row: dict) -> None:
    row = {"seed": self.args.seed, "task": self.args.task, **row}
    with self.rows_path.open("a") as f:
      f.write(json.dumps(row, default=float) + "\n")
    print(json.dumps({k: v for k, v in row.items() if k != "solved"}), flush=True)

  def evaluate(self, state, method: str, step: int, when: str = "") -> None:
    """Test accuracy of `state` (recorded once per (method, step, when))."""
    if self.has(kind="eval", method=method, step=step, when=when):
      return
    t0 = time.perf_counter()
    c = self.config
    out = trainer.evaluate(self.exp.setup, state.base_params, state.rl.train.params, self.exp.test,
                           chunk=c.eval.chunk, samples=1, temperature=c.eval.temperature, seed=EVAL_SEED)
    self.write({"kind": "eval", "method": method, "step": step, "when": when, "acc": out["accuracy"],
                "n": len(self.exp.test), "eval_seconds": time.perf_counter() - t0,
                "solved": "".join("1" if s > 0.5 else "0" for s in out["solved"])})

  def timing(self, stage: str):
    def progress(state, sec):
      self.write({"kind": "steps", "method": stage, "step": int(state.rl.step), "sec_per_step": sec})
    return progress

  def jump_state(self):
    """The step-75 state of the collect stage (run it first)."""
    ck = Checkpointer(self.ck / "collect", max_to_keep=1)
    if ck.latest_step() != SCHED.jump:
      raise SystemExit(f"no step-{SCHED.jump} state in {self.ck / 'collect'}: run --stage collect first")
    state, _ = resumable(self.exp, driver.fork(self.exp.state), SCHED.jump, ck, "collect", SCHED.interval)
    ck.close()
    return state


# ----------------------------------------------------------------------------------------- stages


def collect(run: Run) -> None:
  run.evaluate(run.exp.state, "backbone", 0)
  ck = Checkpointer(run.ck / "collect", max_to_keep=1)
  state, _ = resumable(run.exp, driver.fork(run.exp.state), SCHED.jump, ck, "collect", SCHED.interval,
                       run.timing("collect"))
  ck.close()
  assert int(state.phase) == sm.EXTRAPOLATE, "COLLECT did not end at the jump point"
  run.evaluate(state, "GRPO-LoRA", SCHED.jump)


def grpo(run: Run) -> None:
  """Plain GRPO from the jump point to the long mark; its LoRA factors at 75 + k·interval are kept."""
  future = SCHED.jump + SCHED.k * SCHED.interval
  keep = Checkpointer(run.ck / "future", max_to_keep=1)
  ck = Checkpointer(run.ck / "grpo", max_to_keep=1)
  timing = run.timing("grpo")

  def progress(state, sec):
    timing(state, sec)
    step = int(state.rl.step)
    if step == future:
      keep.save(step, {"params": state.rl.train.params})
    if step in (SCHED.short, SCHED.long):
      run.evaluate(state, "GRPO-LoRA", step)

  resumable(run.exp, driver.skip_jump(run.jump_state()), SCHED.long, ck, "grpo", SCHED.interval, progress)
  for x in (ck, keep):
    x.close()


def branch(run: Run, method: str) -> None:
  """`method` jumps from the step-75 state (α 1.5 for NExt), then GRPO to the short mark."""
  ncfg = dataclasses.replace(run.exp.ncfg, method=method)
  name = ex.label(method)
  ck = Checkpointer(run.ck / method, max_to_keep=1)
  s_jump = run.jump_state()
  if ck.latest_step() is None:
    t0 = time.perf_counter()
    state, info = driver.jump(run.exp.setup, ncfg, driver.fork(s_jump))
    run.write({"kind": "jump", "method": name, "step": SCHED.jump, "seconds": time.perf_counter() - t0,
               **{k: info[k] for k in ("alpha", "finite", "sigma_spread") if k in info},
               "drift": {k: v for k, v in info.items() if k.startswith("drift/")}})
    ck.save(SCHED.jump, {k: getattr(state, k) for k in ALL_FIELDS}, {"tag": method})
    run.evaluate(state, name, SCHED.jump, when="after jump")
  else:
    state = driver.skip_jump(s_jump)  # a template: resumable restores every field, base weights included
  state, _ = resumable(run.exp, state, SCHED.short, ck, method, SCHED.interval, run.timing(method), ALL_FIELDS)
  ck.close()
  run.evaluate(state, name, SCHED.short)


def analysis(run: Run) -> None:
  """Drift measures at the jump point, and each branch's Δ against the true future W₁₀₀ − W₇₅: a rerun
  adds a row for the branches that no row has yet (each method's Δ is computed once)."""
  done = {m for r in read(run.rows_path) if r["kind"] == "analysis" for m in r["agreement"]}
  todo = [m for m in BRANCHES if ex.label(m) not in done]
  if not todo:
    return
  future = SCHED.jump + SCHED.k * SCHED.interval
  keep = Checkpointer(run.ck / "future", max_to_keep=1)
  if keep.latest_step() != future:
    raise SystemExit(f"no step-{future} LoRA in {run.ck / 'future'}: the grpo stage has not reached it")
  s_jump = run.jump_state()
  params, _ = keep.restore({"params": s_jump.rl.train.params})
  actual = rp.actual_future(run.exp, s_jump, params["params"])
  traj = sm.trajectory(run.exp.setup, run.exp.ncfg, s_jump)
  agreement = {}
  for m in todo:
    d, _ = ex.method_deltas(dataclasses.replace(run.exp.ncfg, method=m), traj, sm.jump_key(s_jump))
    agreement[ex.label(m)] = ex.delta_agreement(d, actual)
  an = rp.trajectory_analysis(run.exp, s_jump, SCHED)
  run.write({"kind": "analysis", "step": SCHED.jump, "future_step": future, "agreement": agreement,
             "drift": an["drift"], "E1_by_step": dict(zip(an["E1_steps"], an["E1_by_step"]))})


# ----------------------------------------------------------------------------------------- report


def paired(a: str, b: str) -> tuple[float, float]:
  """Mean difference in accuracy points of per-problem results a − b, and its paired standard error."""
  x = np.array([int(c) for c in a], float) - np.array([int(c) for c in b], float)
  return 100 * x.mean(), 100 * x.std(ddof=1) / np.sqrt(len(x))


def table(rows: list[dict]) -> str:
  """The paper's table per seed: method, real steps, accuracy, Δ vs GRPO-short/long (paired), ICER."""
  lines = []
  for seed in sorted({r["seed"] for r in rows}):
    rs = [r for r in rows if r["seed"] == seed]
    ev = {(r["method"], r["step"], r["when"]): r for r in rs if r["kind"] == "eval"}
    bb, short, long = (ev.get(k) for k in (("backbone", 0, ""), ("GRPO-LoRA", SCHED.short, ""),
                                            ("GRPO-LoRA", SCHED.long, "")))
    secs = sorted(r["sec_per_step"] for r in rs if r["kind"] == "steps" and r.get("sec_per_step"))
    n = next(iter(ev.values()))["n"] if ev else 0
    lines += [f"### seed {seed}", "", f"{n} held-out problems, T = 1, one sample each, the same problems and "
              f"sampling keys for every row; Δ ± its paired standard error, in points. Median "
              f"{secs[len(secs) // 2] if secs else float('nan'):.1f} s per RL step ({len(secs)} chunks of "
              f"{SCHED.interval}).", "",
              f"| method | real RL steps | accuracy % | Δ vs GRPO-{SCHED.short} | Δ vs GRPO-{SCHED.long} | ICER |",
              "|---|---:|---:|---:|---:|---:|"]
    for (method, step, when), r in sorted(ev.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][0])):
      cells = []
      for ref in (short, long):
        cells.append("–" if ref is None or ref is r else "{:+.1f} ± {:.1f}".format(*paired(r["solved"],
                                                                                           ref["solved"])))
      icer = experiment.icer(step, r["acc"], bb["acc"]) if bb and step else float("nan")
      label = method + (f" ({when})" if when else "")
      lines.append(f"| {label} | {step} | {100 * r['acc']:.1f} | {cells[0]} | {cells[1]} | {icer:.2f} |")
    lines.append("")
    for r in rs:
      if r["kind"] == "jump":
        sp = r.get("sigma_spread", {}).get("predicted")
        lines.append(f"- {r['method']} jump: α {r['alpha']}, {r['seconds']:.0f} s" +
                     (f"; σ̂ min/median/max {sp['min']:.4g}/{sp['median']:.4g}/{sp['max']:.4g}, share at the "
                      f"median {sp['at_median']:.2f}" if sp else ""))
      if r["kind"] == "analysis":
        drift = "- drift at the jump point: " + ", ".join(f"{k} {v:.3f}" for k, v in sorted(r["drift"].items()))
        lines += [drift] if drift not in lines else []  # the same state: one line, however many rows
        for m, a in r["agreement"].items():
          lines.append(f"- {m} Δ vs the true future W{r['future_step']} − W{r['step']}: cos (whole model) "
                       f"{a['cos_global']:.3f}, median cos {a['cos_median']:.3f}, rel. err "
                       f"{a['relerr_global']:.3f}, α* {a['alpha_star']:.3f}")
    lines.append("")
  return "\n".join(lines)


def plot(rows: list[dict], path: Path, probe: list[dict] = ()) -> None:
  """Accuracy against real RL steps: GRPO-LoRA from the backbone, each branch from the step-75 state (its
  jump a vertical move at 75), error bars the binomial s.e.; the probe's curve (512 problems) for context."""
  import matplotlib  # noqa: PLC0415
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415
  ev = [r for r in rows if r["kind"] == "eval"]
  at = {(r["method"], r["step"], r["when"]): r for r in ev}
  shared = [at[k] for k in (("backbone", 0, ""), ("GRPO-LoRA", SCHED.jump, "")) if k in at]
  fig, ax = plt.subplots(figsize=(6.5, 4))
  if probe:
    pts = sorted((r["step"], 100 * r["acc"]) for r in probe if "acc" in r)
    ax.plot(*zip(*pts), ls="--", color="grey", alpha=0.6, label=f"GRPO-LoRA probe ({probe[0]['n_test']} problems)")
  for method in dict.fromkeys(r["method"] for r in ev if r["method"] != "backbone"):
    own = sorted((r for r in ev if r["method"] == method and r not in shared),
                 key=lambda r: (r["step"], r["when"] == ""))
    line = (shared if method == "GRPO-LoRA" else shared[1:]) + own  # a branch starts at the jump point
    ax.errorbar([r["step"] for r in line], [100 * r["acc"] for r in line], marker="o", capsize=3, label=method,
                yerr=[100 * (r["acc"] * (1 - r["acc"]) / r["n"]) ** 0.5 for r in line])
  ax.axvline(SCHED.jump, color="grey", lw=0.8, ls=":")
  ax.set_xlabel("real RL steps")
  ax.set_ylabel("held-out accuracy % (T = 1)")
  ax.set_title(f"SmolLM2-135M, {rows[0]['task']}: jump at {SCHED.jump}")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--stage", choices=("collect", "grpo", *BRANCHES, "analysis"))
  ap.add_argument("--task", default="rg:basic_arithmetic")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--n-test", type=int, default=1024)
  ap.add_argument("--out", default=str(ROOT / "experiments/results/real_rg"))
  ap.add_argument("--report-only", action="store_true")
  ap.add_argument("--quick", action="store_true", help="smoke run: a 6-step schedule, 2 × 4 samples per step")
  args = ap.parse_args(argv)
  if not args.report_only and args.stage is None:
    ap.error("give --stage or --report-only")
  global SCHED
  SCHED = QUICK if args.quick else SCHED
  from absl import logging as absl_logging  # noqa: PLC0415
  absl_logging.set_verbosity(absl_logging.WARNING)
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  if not args.report_only:
    os.chdir(ROOT)  # the preset's model cache and data paths
    run = Run(args, out)
    {"collect": collect, "grpo": grpo, "analysis": analysis}.get(args.stage, lambda r: branch(r, args.stage))(run)
  rows = read(out / "compare.jsonl")
  if rows:
    (out / "compare.md").write_text(table(rows))
    probe = [r for r in rg_probe.read(out / "probe.jsonl") if r["seed"] == rows[0]["seed"]]
    plot(rows, out / "compare.png", probe)
    print((out / "compare.md").read_text())


if __name__ == "__main__":
  main()
