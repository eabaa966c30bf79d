"""The paper's comparison on a real pretrained model, sized for one accelerator: SmolLM2-135M-Instruct.

    python -m experiments.real_repro                  # on a GPU/TPU: smollm2:gpu, 512 samples/step, rg:basic_arithmetic
    python -m experiments.real_repro --quick          # CPU smoke run: tiny schedule and batch
    python -m experiments.real_repro --seeds 0,1 --model-dir /path/to/hf_dir

One shared GRPO-LoRA run from the backbone to step 150 (a snapshot every 10 steps), then from that one
state: GRPO-LoRA continued to 400 (accuracy at 250 and 400; W₂₀₀ − W₁₅₀ is the true future), NExt (α 1.5)
and RL-Extra jumps each followed by 100 steps (250 real steps). Drift measures, every jump's agreement
with the true future, test accuracy (1,024 problems, T = 1) and the time per step are recorded, exactly as
experiments.reproduce does for the toy (`reproduce.lora_family` without the ablations). Rows go to
<out>/rows.jsonl per seed (a killed run resumes at seed granularity); tables, CSVs and plots as
experiments.report renders them, in <out>/tables.md. The task is --task (default rg:basic_arithmetic, the
task experiments/results/real_rg chose: SmolLM2 is still learning it at 200 CPU-scale steps; `compare`
saturates); --quick keeps the preset's task.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

import jax

ROOT = Path(__file__).resolve().parents[1]

from experiments import report
from experiments import reproduce as rp
from next_jax.configs import smollm2
from next_jax.run import experiment

METHODS = ("next", "rl_extra")


def make_config(seed: int, sched: rp.Schedule, quick: bool, task: str = ""):
  c = smollm2.get_config(f"seed={seed}," + ("quick" if quick else "gpu") + (f",task={task}" if task else ""))
  c.nxt.extrapolate_at, c.nxt.interval, c.nxt.k = sched.jump, sched.interval, sched.k
  c.total_steps = sched.long
  c.task.n_test = c.task.n_test if quick else 1024
  c.eval.every, c.log.progress = 0, False
  if quick:  # tiny random models earn no reward; an entropy bonus makes their LoRA move all the same
    c.rl.entropy_coef, c.rl.lr = 0.1, 1e-2
  return c


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--quick", action="store_true")
  ap.add_argument("--seeds", default="0")
  ap.add_argument("--task", default=None, help="default rg:basic_arithmetic (--quick: the preset's)")
  ap.add_argument("--out", default=None, help="default experiments/results/real_repro[_quick]")
  ap.add_argument("--model-dir", default=None, help="default: the preset's (SmolLM2, converted once)")
  args = ap.parse_args(argv)
  from absl import logging as absl_logging  # noqa: PLC0415
  absl_logging.set_verbosity(absl_logging.WARNING)
  os.chdir(ROOT)
  sched = rp.QUICK if args.quick else rp.PAPER
  out = Path(args.out or f"experiments/results/real_repro{'_quick' if args.quick else ''}")
  out.mkdir(parents=True, exist_ok=True)
  rows_path = out / "rows.jsonl"
  rows = [json.loads(x) for x in rows_path.read_text().splitlines()] if rows_path.exists() else []
  done = {r["seed"] for r in rows if r["table"] == "done"}
  print(f"backend {jax.default_backend()}: {jax.devices()}", flush=True)
  t_all = time.time()
  for seed in (int(s) for s in args.seeds.split(",") if int(s) not in done):
    t0 = time.time()
    task = args.task if args.task is not None else ("" if args.quick else "rg:basic_arithmetic")
    exp = experiment.build(make_config(seed, sched, args.quick, task), args.model_dir)
    new = rp.lora_family(exp, sched, seed, methods=METHODS, ablate=False)
    new.append({"table": "done", "family": "lora", "seed": seed, "minutes": (time.time() - t0) / 60,
                "backend": jax.default_backend(), "device": str(jax.devices()[0])})
    with rows_path.open("a") as f:
      f.writelines(json.dumps(r, default=float) + "\n" for r in new)
    rows += new
    print(f"seed {seed}: {(time.time() - t0) / 60:.1f} min", flush=True)
  command = "python -m experiments.real_repro" + (" --quick" if args.quick else "")
  report.write(rows, out, command=command, schedule=dataclasses.asdict(sched),
               heading="The paper's comparison on SmolLM2-135M-Instruct")
  print(f"done in {(time.time() - t_all) / 60:.1f} min; tables: {out}/tables.md")


if __name__ == "__main__":
  main()
