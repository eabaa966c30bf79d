"""At equal batch, is a pretrained LLM's LoRA trajectory straighter than the toy's, and does any method's
prediction of the future agree better with it?

    python -m experiments.real_compare                    # toy + SmolLM2, seed 0: 150 steps + the next 50
    python -m experiments.real_compare --probe            # the cheap first look: jump at 50, k = 2 (+20)
    python -m experiments.real_compare --models smollm2 --seeds 0,1
    python -m experiments.real_compare --quick            # CI-sized smoke run on tiny models
    python -m experiments.real_compare --report-only      # re-render the report from the rows so far

Per (model, seed), with the same samples per step (8 prompts × G 8 = 64, the most this CPU affords for
SmolLM2) and the paper's schedule (snapshot every 10 steps, k = 5):
  1. GRPO-LoRA from the backbone to the jump point (150), the trajectory's drift measures there
     (next_jax.nxt.drift: increment cosine, growth exponent, linear-fit skill vs hold-last, E₁ over the steps);
  2. GRPO-LoRA continued k·interval steps: W₂₀₀ − W₁₅₀ is the true future;
  3. NExt, RL-Extra, AlphaRL and RELEX each predict that future from the same step-150 trajectory; the
     cosine and relative error of each prediction against it (extrapolate.delta_agreement).
Sampled test accuracy (T = 1) at 0, 150 and 200 shows whether RL is learning at all. Each run checkpoints
every 10 steps under <out>/ckpt/<model>_s<seed>/ (a killed study resumes there) and appends the drift of
its snapshots so far to <out>/compare_progress.jsonl (the partial record); its row goes to
<out>/compare_rows.jsonl when done. The report is <out>/compare.md + compare.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import time
from pathlib import Path

import jax
import numpy as np

ROOT = Path(__file__).resolve().parents[1]

from experiments import reproduce as rp
from next_jax.configs import (
  smollm2,
  toy_arith,
)
from next_jax.core.checkpoint import Checkpointer
from next_jax.nxt import extrapolate as ex
from next_jax.rl import trained
from next_jax.run import driver, experiment
from next_jax.run import state_machine as sm
from next_jax.run.toy_base import build_toy_base

MODELS = ("toy", "smollm2")
METHODS = {m: ex.label(m) for m in ex.METHODS}
PAPER = rp.Schedule(jump=150, interval=10, k=5)
PROBE = rp.Schedule(jump=50, interval=10, k=2)
QUICK = rp.Schedule(jump=4, interval=1, k=2)


def make_config(model: str, seed: int, sched: rp.Schedule, quick: bool, prompts: int, group: int):
  """The model's preset at the shared batch (prompts × group samples per step) and the schedule."""
  if model == "toy":
    c = toy_arith.get_config(f"seed={seed}" + (",quick" if quick else ""))
  else:
    c = smollm2.get_config(f"seed={seed}" + (",quick" if quick else ""))
    if not quick:
      c.task.n_test = 256
  c.rollout.prompts_per_step, c.rollout.group_size = prompts, group
  c.nxt.extrapolate_at, c.nxt.interval, c.nxt.k = sched.jump, sched.interval, sched.k
  c.total_steps = sched.jump + sched.k * sched.interval
  c.log.progress = False
  if quick:  # tiny random models earn no reward; an entropy bonus makes their LoRA move all the same
    c.nxt.predictor.hidden, c.nxt.predictor.epochs = 16, 10
    c.rl.entropy_coef, c.rl.lr = 0.1, 1e-2
  return c


def drift_so_far(exp, state) -> dict[str, float]:
  """The drift measures (sm.drift_diagnostics) of the snapshots taken so far: 0 … count−1."""
  return sm.drift_diagnostics(exp.ncfg, sm.trajectory(exp.setup, exp.ncfg, state).window(int(state.count) - 1))


SAVED = ("rl", "trajectory", "phase", "count")  # what `resumable` checkpoints of a state


def resumable(exp, state, until: int, ckpt: Checkpointer, tag: str, every: int, progress=None, fields=SAVED):
  """rp.advance to RL step `until` in chunks of `every` steps, checkpointing the state's `fields` after each
  chunk (by default not the base weights: they are the same at every step before a jump; a branch after a
  jump saves them too); progress(state, seconds per step) runs after each chunk.
  → (state, median seconds per step of the steps run here)."""
  def saved(s):
    return {k: getattr(s, k) for k in fields}

  latest = ckpt.latest_step()
  if latest is not None and latest <= until:
    tree, meta = ckpt.restore(saved(state))
    if meta.get("tag") == tag:
      state = state.replace(**tree)
  times = []
  while int(state.rl.step) < until:
    stop = min(until, (int(state.rl.step) // every + 1) * every)
    state, _, _, sec = rp.advance(exp, exp.ncfg, state, stop, desc=f"{tag} → {stop}")
    times.append(sec)
    ckpt.save(int(state.rl.step), saved(state), {"tag": tag})
    if progress is not None:
      progress(state, sec)
  return state, float(np.median(times)) if times else None


def run_model(model: str, seed: int, sched: rp.Schedule, quick: bool, prompts: int, group: int,
              out: Path, model_dir: str | None = None) -> dict:
  """One (model, seed): COLLECT → drift, the true future, every method's agreement with it (module doc)."""
  c = make_config(model, seed, sched, quick, prompts, group)
  if model == "toy" and model_dir is None:
    model_dir = str(build_toy_base("artifacts/toy_base"))
  exp = experiment.build(c, model_dir)
  t0 = time.perf_counter()
  h = sched.k * sched.interval
  ckdir = out / "ckpt" / f"{model}_s{seed}"
  acc = {"0": experiment.accuracy(exp, exp.state, exp.test)}
  with_ckpt = Checkpointer(ckdir / "collect", max_to_keep=1)

  def progress(state, sec):  # a partial record while the run goes on: drift of the snapshots so far
    if int(state.count) >= 3:
      with (out / "compare_progress.jsonl").open("a") as f:
        f.write(json.dumps({"model": model, "seed": seed, "step": int(state.rl.step), "sec_per_step": sec,
                            **drift_so_far(exp, state)}) + "\n")

  s_jump, sec = resumable(exp, driver.fork(exp.state), sched.jump, with_ckpt, "collect", sched.interval, progress)
  assert int(s_jump.phase) == sm.EXTRAPOLATE, "COLLECT did not end at the jump point"
  acc[str(sched.jump)] = experiment.accuracy(exp, s_jump, exp.test)
  future_ckpt = Checkpointer(ckdir / "future", max_to_keep=1)
  s_future, sec2 = resumable(exp, driver.skip_jump(driver.fork(s_jump)), sched.jump + h, future_ckpt, "future",
                             sched.interval)
  acc[str(sched.jump + h)] = experiment.accuracy(exp, s_future, exp.test)
  lora = exp.setup.lora_cfg
  actual = rp.actual_future(exp, s_jump, trained.matrices(s_future.rl.train.params, exp.setup.lora_cfg))
  analysis = rp.trajectory_analysis(exp, s_jump, sched)
  traj = sm.trajectory(exp.setup, exp.ncfg, s_jump)
  agreement, seconds = {}, {}
  for m, name in METHODS.items():
    t1 = time.perf_counter()
    d, _ = ex.method_deltas(dataclasses.replace(exp.ncfg, method=m), traj, sm.jump_key(s_jump))
    jax.block_until_ready(d)
    seconds[name] = time.perf_counter() - t1
    agreement[name] = ex.delta_agreement(d, actual)
  future_norm = float(np.sqrt(sum(float((a.astype(np.float32) ** 2).sum()) for a in
                                  jax.tree.leaves(jax.device_get(actual)))))
  times = [s for s in (sec, sec2) if s is not None]
  row = {"model": model, "seed": seed, "samples": prompts * group, "lr": c.rl.lr,
         "lora": [lora.rank, lora.alpha], "params": int(sum(x.size for x in jax.tree.leaves(exp.base_params))),
         "schedule": dataclasses.asdict(sched), "acc": acc, "sec_per_step": float(np.median(times)) if times else None,
         "drift": analysis["drift"], "E1_steps": analysis["E1_steps"], "E1_by_step": analysis["E1_by_step"],
         "r2_values": analysis["r2_values"], "future_norm": future_norm, "agreement": agreement,
         "method_seconds": seconds, "minutes": (time.perf_counter() - t0) / 60}
  for ck in (with_ckpt, future_ckpt):
    ck.close()
  return row


# ---------------------------------------------------------------------------------------------- report

DRIFT_COLS = (("increment_cos", "increment cos"), ("local_cos", "step-to-step cos"),
              ("growth_exp", "growth exponent"), ("skill_vs_hold", "linear skill vs hold-last"),
              ("r2_linear", "linear R²"), ("E1", "E₁"))


def _fmt(values, digits: int = 3) -> str:
  """mean (± s.e. over more than one value); R²-like values far below 0 print as "< −100"."""
  v = [x for x in values if x is not None]
  if not v:
    return "–"
  if np.mean(v) < -100:
    return "< −100"
  return f"{np.mean(v):.{digits}f}" + (f" ± {np.std(v) / np.sqrt(len(v)):.{digits}f}" if len(v) > 1 else "")


def table(rows: list[dict], command: str) -> str:
  by = {m: [r for r in rows if r["model"] == m] for m in dict.fromkeys(r["model"] for r in rows)}
  lines = [f"`{command}` — mean ± s.e. over seeds where more than one.", "",
           "Drift measures of the observed trajectory at the jump point (medians over trained matrices):", "",
           "| model | seeds | samples/step | lr | s/step | acc 0 → jump → jump+h | "
           + " | ".join(n for _, n in DRIFT_COLS) + " |",
           "|---|---:|---:|---:|---:|---|" + "---:|" * len(DRIFT_COLS)]
  for m, rs in by.items():
    r0 = rs[0]
    acc = " → ".join(_fmt([100 * r["acc"][k] for r in rs], 1) for k in r0["acc"])
    drift = " | ".join(_fmt([r["drift"].get(k) for r in rs]) for k, _ in DRIFT_COLS)
    lines.append(f"| {m} | {len(rs)} | {r0['samples']} | {r0['lr']:g} | {_fmt([r['sec_per_step'] for r in rs], 2)} "
                 f"| {acc} | {drift} |")
  lines += ["", "Agreement of each method's predicted Δ with the true next k·interval steps "
            "(cosine / relative error ‖Δ̂ − Δ‖/‖Δ‖; median over matrices, and the whole model):", "",
            "| model | method | cos (median) | cos (global) | rel. error (median) | rel. error (global) |",
            "|---|---|---:|---:|---:|---:|"]
  for m, rs in by.items():
    for name in METHODS.values():
      a = [r["agreement"][name] for r in rs]
      lines.append(f"| {m} | {name} | " + " | ".join(_fmt([x[k] for x in a]) for k in
                                                     ("cos_median", "cos_global", "relerr_median",
                                                      "relerr_global")) + " |")
  return "\n".join(lines) + "\n"


def progress_table(progress: list[dict]) -> str:
  """Drift measures of the snapshots so far, every `interval` steps of COLLECT (the partial record)."""
  cols = [k for k, _ in DRIFT_COLS if any(f"drift/{k}" in p for p in progress)]
  lines = ["| model | seed | RL step | s/step | " + " | ".join(n for k, n in DRIFT_COLS if k in cols) + " |",
           "|---|---:|---:|---:|" + "---:|" * len(cols)]
  for p in progress:
    vals = " | ".join(_fmt([p.get(f"drift/{k}")]) for k in cols)
    lines.append(f"| {p['model']} | {p['seed']} | {p['step']} | {p['sec_per_step']:.2f} | {vals} |")
  return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
  import matplotlib  # noqa: PLC0415
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
  models = list(dict.fromkeys(r["model"] for r in rows))
  for r in rows:
    a1.plot(r["E1_steps"], r["E1_by_step"], marker="o", label=f"{r['model']} s{r['seed']}")
  a1.set(xlabel="RL step", ylabel="median E₁ = σ₁/Σσ of W_t − W₀", title="rank-1 dominance of the update")
  a1.legend()
  width = 0.8 / max(len(models), 1)
  for j, m in enumerate(models):
    rs = [r for r in rows if r["model"] == m]
    cos = [np.mean([r["agreement"][n]["cos_global"] for r in rs]) for n in METHODS.values()]
    a2.bar(np.arange(len(METHODS)) + j * width, cos, width, label=m)
  a2.set_xticks(np.arange(len(METHODS)) + width * (len(models) - 1) / 2, list(METHODS.values()))
  a2.axhline(0, color="k", lw=0.5)
  a2.set(ylabel="cos(Δ̂, true future), whole model", title="agreement with the next k·interval steps")
  a2.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  mode = ap.add_mutually_exclusive_group()
  mode.add_argument("--probe", action="store_true", help="jump at 50 with k = 2 (20 future steps)")
  mode.add_argument("--quick", action="store_true", help="CI-sized smoke run")
  ap.add_argument("--models", default=",".join(MODELS))
  ap.add_argument("--seeds", default="0")
  ap.add_argument("--prompts", type=int, default=8)
  ap.add_argument("--group", type=int, default=8)
  ap.add_argument("--out", default=None, help="default experiments/results/real[_probe|_quick]")
  ap.add_argument("--model-dirs", default="", help="override a preset's model: 'toy=DIR,smollm2=DIR'")
  ap.add_argument("--report-only", action="store_true", help="re-render compare.md/png from the rows so far")
  args = ap.parse_args(argv)
  from absl import logging as absl_logging  # noqa: PLC0415
  absl_logging.set_verbosity(absl_logging.WARNING)
  os.chdir(ROOT)
  sched = QUICK if args.quick else PROBE if args.probe else PAPER
  suffix = "_quick" if args.quick else "_probe" if args.probe else ""
  out = Path(args.out or f"experiments/results/real{suffix}")
  out.mkdir(parents=True, exist_ok=True)
  rows_path = out / "compare_rows.jsonl"
  rows = [json.loads(x) for x in rows_path.read_text().splitlines()] if rows_path.exists() else []
  done = {(r["model"], r["seed"]) for r in rows}
  todo = [(m, int(s)) for s in args.seeds.split(",") for m in args.models.split(",") if (m, int(s)) not in done]
  dirs = dict(kv.split("=", 1) for kv in filter(None, args.model_dirs.split(",")))
  bad = [m for m, _ in todo if m not in MODELS] + [m for m in dirs if m not in MODELS]
  if bad:
    raise SystemExit(f"--models: unknown {bad}; choose from {MODELS}")
  for i, (model, seed) in enumerate([] if args.report_only else todo):
    print(f"== [{i + 1}/{len(todo)}] {model}, seed {seed}", flush=True)
    r = run_model(model, seed, sched, args.quick, args.prompts, args.group, out, dirs.get(model))
    with rows_path.open("a") as f:
      f.write(json.dumps(r, default=float) + "\n")
    rows.append(r)
    shutil.rmtree(out / "ckpt" / f"{model}_s{seed}", ignore_errors=True)
    print(f"{model} seed {seed}: {r['minutes']:.1f} min, {r['sec_per_step']} s/step, drift {r['drift']}",
          flush=True)
  command = "python -m experiments.real_compare" + (" --quick" if args.quick else " --probe" if args.probe else "")
  write_report(rows, out, command)


def write_report(rows: list[dict], out: Path, command: str) -> None:
  """compare.md (finished runs' table + the drift-so-far record of every run) and compare.png."""
  path = out / "compare_progress.jsonl"
  progress = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
  md = table(rows, command) if rows else f"`{command}`: no run has finished yet.\n"
  if progress:
    md += ("\nDrift of the snapshots taken so far, after every checkpoint of COLLECT (measures that need more "
           "snapshots than exist are blank):\n\n" + progress_table(progress))
  (out / "compare.md").write_text(md)
  if rows:
    plot(rows, out / "compare.png")
  print((out / "compare.md").read_text())


if __name__ == "__main__":
  main()
