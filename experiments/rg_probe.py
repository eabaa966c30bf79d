"""The plain GRPO-LoRA probe on the chosen task (issue 27, study item 1): is the curve still rising where the
scaled comparison needs it to be (jump at 75, short mark 125, long mark 200)?

    python -m experiments.rg_probe --task rg:basic_arithmetic             # 200 steps, lr 2e-5
    python -m experiments.rg_probe --task add --lr 5e-5 --max-new-tokens 32 --until 120
    python -m experiments.rg_probe --report-only

next_jax/configs/smollm2.py poses the task (task=…, its easy knobs; --extract overrides the rg extraction); GRPO-LoRA at
--prompts × --group samples per step, one update per step. The state machine collects the trajectory (a
snapshot every --interval steps) to the jump point --jump, whose state stays checkpointed under
<out>/ckpt/<run>/collect/ (the shared jump-point state a NExt / RL-Extra branch starts from); then plain
GRPO continues (no jump) to --until, checkpointed every --interval steps under <out>/ckpt/<run>/continue/.
A killed probe resumes from its last checkpoint. Sampled test accuracy (T = 1, one sample per problem, the
same --n-test problems every time) every --eval-every steps, and seconds per RL step for every chunk, are
appended to <out>/probe.jsonl as they come; <out>/probe.md is rendered from those rows.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from experiments.real_compare import resumable
from next_jax.configs import smollm2
from next_jax.core.checkpoint import Checkpointer
from next_jax.run import driver, experiment


def make_config(args):
  """The preset's posing of the task with the probe's batch, lr and schedule."""
  c = smollm2.get_config(f"task={args.task},seed={args.seed}")
  if args.extract:
    c.task.knobs.extract = args.extract
  c.task.n_train, c.task.n_test, c.task.n_val = 4000, args.n_test, 0
  c.rollout.prompts_per_step, c.rollout.group_size = args.prompts, args.group
  c.rl.lr = args.lr
  c.rollout.max_new_tokens = args.max_new_tokens or c.rollout.max_new_tokens
  # the probe stops at --until itself: a run whose phase became DONE at the old end could not be extended
  # to a longer --until (the lr is constant, so total_steps changes nothing else)
  c.nxt.extrapolate_at, c.nxt.interval, c.nxt.k, c.total_steps = args.jump, args.interval, 5, 10 ** 6
  assert c.rl.schedule == "constant", c.rl.schedule
  c.eval.every, c.eval.samples, c.log.progress = 0, 1, False
  return c


def run_name(args) -> str:
  tokens = f"_t{args.max_new_tokens}" if args.max_new_tokens else ""
  return (f"{args.task.replace(':', '_')}_{args.extract or 'preset'}_lr{args.lr:g}_p{args.prompts}g{args.group}"
          f"{tokens}_s{args.seed}")


def probe(args, out: Path) -> None:
  """Collect to the jump point, then plain GRPO to --until; rows to probe.jsonl as they come."""
  name, path = run_name(args), out / "probe.jsonl"
  done = {r["step"] for r in read(path) if r["run"] == name and "acc" in r}
  c = make_config(args)
  exp = experiment.build(c)
  base = {"run": name, "task": args.task, "extract": c.task.knobs.to_dict().get("extract", ""), "lr": args.lr,
          "samples": args.prompts * args.group, "max_new_tokens": c.rollout.max_new_tokens, "seed": args.seed,
          "n_test": len(exp.test)}

  def record(state, sec):
    step = int(state.rl.step)
    row = {**base, "step": step, "sec_per_step": sec}
    if step % args.eval_every == 0 and step not in done:
      t0 = time.perf_counter()
      row["acc"] = experiment.accuracy(exp, state, exp.test, seed=12345)
      row["eval_seconds"] = time.perf_counter() - t0
    with path.open("a") as f:
      f.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)

  if 0 not in done:
    record(exp.state, None)
  ck = out / "ckpt" / name
  collect = Checkpointer(ck / "collect", max_to_keep=2)
  s_jump, _ = resumable(exp, driver.fork(exp.state), args.jump, collect, "collect", args.interval, record)
  cont = Checkpointer(ck / "continue", max_to_keep=1)
  resumable(exp, driver.skip_jump(s_jump), args.until, cont, "continue", args.interval, record)
  for x in (collect, cont):
    x.close()


def read(path: Path) -> list[dict]:
  return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def table(rows: list[dict]) -> str:
  """Accuracy by step per run, and the median seconds per RL step."""
  lines = []
  for name in dict.fromkeys(r["run"] for r in rows):
    rs = [r for r in rows if r["run"] == name]
    secs = sorted(r["sec_per_step"] for r in rs if r.get("sec_per_step"))
    acc = {}
    for r in rs:
      if "acc" in r:
        acc.setdefault(r["step"], r["acc"])
    r0 = rs[0]
    lines += [f"### {name}", "",
              f"{r0['task']} (extract={r0['extract']}), lr {r0['lr']:g}, {r0['samples']} samples/step, seed "
              f"{r0['seed']}; test accuracy at T = 1 on {r0['n_test']} problems, one sample each (± its "
              f"binomial s.e.); median {secs[len(secs) // 2] if secs else float('nan'):.1f} s per RL step.", "",
              "| RL step | " + " | ".join(str(s) for s in sorted(acc)) + " |",
              "|---|" + "---:|" * len(acc),
              "| accuracy % | " + " | ".join(f"{100 * a:.1f} ± {100 * (a * (1 - a) / r0['n_test']) ** 0.5:.1f}"
                                           for a in (acc[s] for s in sorted(acc))) + " |", ""]
  return "\n".join(lines) + "\n"


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--task", default="rg:basic_arithmetic")
  ap.add_argument("--extract", default="", help="rg tasks: tag | number (default: the preset's)")
  ap.add_argument("--lr", type=float, default=2e-5)
  ap.add_argument("--max-new-tokens", type=int, default=0, help="default: the preset's (16)")
  ap.add_argument("--prompts", type=int, default=8)
  ap.add_argument("--group", type=int, default=8)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--jump", type=int, default=75)
  ap.add_argument("--interval", type=int, default=5)
  ap.add_argument("--until", type=int, default=200)
  ap.add_argument("--eval-every", type=int, default=25)
  ap.add_argument("--n-test", type=int, default=256)
  ap.add_argument("--out", default="experiments/results/real_rg")
  ap.add_argument("--report-only", action="store_true")
  args = ap.parse_args(argv)
  from absl import logging as absl_logging  # noqa: PLC0415
  absl_logging.set_verbosity(absl_logging.WARNING)
  os.chdir(ROOT)
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  if not args.report_only:
    probe(args, out)
  (out / "probe.md").write_text(table(read(out / "probe.jsonl")))
  print((out / "probe.md").read_text())


if __name__ == "__main__":
  main()
