"""Pick the RLVR task by measurement: base SmolLM2-135M-Instruct pass@1 / pass@8 on reasoning-gym tasks at
easy settings and on our own `add` / `extract` (issue 27, study item 1).

    python -m experiments.rg_select                                  # the candidates below, 256 problems each
    python -m experiments.rg_select --tasks rg:chain_sum,add --n 64
    python -m experiments.rg_select --report-only                    # re-render README table from the rows

Each task is posed by next_jax/configs/smollm2.py (task=…: system "Be brief.", the task's instruction; rg tasks ask
for <answer></answer> tags; --instruction replaces it), --max-new-tokens new tokens, temperature 1, 8 samples
per problem, on the task's test split (seed 1, disjoint by content from every train split). One sampling
pass is scored by every verifier that can read the task (rg tasks: "rg" = the tag only, reasoning-gym's
convention, and "rg_number" = the tag, else the last number), so the two extractions are compared on the
same responses.

A row per (task, chunk of --chunk problems) goes to <out>/rows.jsonl as soon as it is sampled: the per-
problem count of correct samples under each verifier. A rerun skips the rows already there (resumable at
chunk granularity). The table (pass@1 = avg@8, pass@8, their ratio, the best format guess) is rendered
from the rows into <out>/select.md.

Format guess: the share of problems a response made only of a number copied from the question would solve,
scored by the same verifier: "any" = some number in the question is the answer (an upper bound for every
copy strategy), "best position" = always copying the number at one fixed position (the best position).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import time
from pathlib import Path

import jax
import numpy as np

ROOT = Path(__file__).resolve().parents[1]

from next_jax.configs import smollm2
from next_jax.rl import rewards, trainer
from next_jax.run import experiment

CANDIDATES = ("rg:basic_arithmetic", "rg:leg_counting", "rg:chain_sum", "add", "extract", "rg:simple_equations")
_NUM = re.compile(r"-?\d+")


def make_config(task: str, n: int, max_new_tokens: int, instruction: str | None = None):
  """The preset's posing of `task` (or `instruction` instead of its own), n test problems, no training or
  validation problems to speak of."""
  c = smollm2.get_config(f"task={task}")
  c.task.n_train, c.task.n_test, c.task.n_val = 1, n, 0
  c.rollout.max_new_tokens = max_new_tokens
  c.task.instruction = c.task.instruction if instruction is None else instruction
  if task.startswith("rg:"):
    c.task.knobs.extract = "tag"
  return c


def verifiers_for(problem) -> list[str]:
  """Every verifier that reads this problem's ground truth: rg tasks both extractions, others their own."""
  return ["rg", "rg_number"] if problem.verifier.startswith("rg") else [problem.verifier]


def guess_scores(problem, verifier: str) -> list[float]:
  """The verifier's reward for "<answer>x</answer>" (rg) or "x" for each number x in the question, in order."""
  fn = rewards.get_reward(verifier)
  wrap = (lambda x: f"<answer>{x}</answer>") if verifier.startswith("rg") else str
  return [fn(wrap(x), problem.answer) for x in _NUM.findall(problem.prompt)]


def sample_chunk(exp, problems, samples: int, seed: int) -> dict:
  """Correct-sample counts per problem under each verifier, and a few example responses."""
  _, _, out = trainer._sample(exp.setup, exp.state.base_params, exp.state.rl.train.params, list(problems),
                              jax.random.PRNGKey(seed), samples, 1.0)
  tokens, mask = np.asarray(out.tokens), np.asarray(out.mask)
  texts = [exp.setup.decode(t[m].tolist()) for t, m in zip(tokens, mask)]
  counts = {}
  for v in verifiers_for(problems[0]):
    fn = rewards.get_reward(v)
    hits = np.asarray([fn(x, problems[r // samples].answer) for r, x in enumerate(texts)]).reshape(-1, samples)
    counts[v] = [int(h) for h in (hits == 1.0).sum(axis=1)]
  return {"counts": counts, "examples": texts[:samples], "mean_len": float(mask.sum(axis=1).mean())}


def key(r: dict) -> tuple:
  """What makes two rows the same measurement: task, problems, tokens, posing (and the chunk: r["start"])."""
  return r["task"], r["n"], r["max_new_tokens"], r["instruction"], r["system"]


def measure(task: str, n: int, samples: int, chunk: int, max_new_tokens: int, instruction: str | None,
            done: set, path: Path) -> None:
  """Sample the task's chunks not yet in rows.jsonl; append one row per chunk."""
  c = make_config(task, n, max_new_tokens, instruction)
  todo = [i for i in range(0, n, chunk)
          if (task, n, max_new_tokens, c.task.instruction, c.task.system, i) not in done]
  if not todo:
    return
  exp = experiment.build(c)
  for start in todo:
    probs = exp.test[start:start + chunk]
    t0 = time.perf_counter()
    got = sample_chunk(exp, probs, samples, seed=start)
    guesses = {v: [guess_scores(p, v) for p in probs] for v in got["counts"]}
    row = {"task": task, "n": n, "max_new_tokens": max_new_tokens, "start": start, "samples": samples,
           "problems": len(probs), "system": c.task.system, "instruction": c.task.instruction,
           "knobs": c.task.knobs.to_dict(), "seconds": time.perf_counter() - t0,
           "rows_per_s": len(probs) * samples / (time.perf_counter() - t0), "guesses": guesses,
           "example_prompt": exp.tokenizer.decode(exp.setup.encode(probs[0])), **got}
    with path.open("a") as f:
      f.write(json.dumps(row) + "\n")
    print(f"{task} [{start}:{start + len(probs)}] {row['seconds']:.0f} s "
          f"{ {v: sum(x) / (len(x) * samples) for v, x in got['counts'].items()} }", flush=True)


def summarize(rows: list[dict]) -> list[dict]:
  """One line per (task, n, tokens, verifier): pass@1 ± s.e. (over problems), pass@8, format guesses."""
  groups: dict[tuple, list[dict]] = {}
  for r in rows:
    groups.setdefault(key(r), []).append(r)
  out = []
  for (task, n, tokens, instruction, _), rs in groups.items():
    for v in rs[0]["counts"]:
      k = rs[0]["samples"]
      c = np.asarray([x for r in rs for x in r["counts"][v]], float)
      g = [x for r in rs for x in r["guesses"][v]]
      width = max((len(x) for x in g), default=0)
      pos = [np.mean([x[j] == 1.0 if j < len(x) else False for x in g]) for j in range(width)]
      out.append({"task": task, "verifier": v, "tokens": tokens, "instruction": instruction,
                  "problems": int(c.size), "complete": c.size >= n,
                  "pass@1": c.mean() / k, "se": (c / k).std(ddof=1) / math.sqrt(c.size) if c.size > 1 else 0.0,
                  f"pass@{k}": float((c > 0).mean()), "k": k,
                  "guess_any": float(np.mean([any(s == 1.0 for s in x) for x in g])),
                  "guess_best_pos": float(max(pos, default=0.0)),
                  "s_per_row": sum(r["seconds"] for r in rs) / sum(r["problems"] * k for r in rs)})
  return out


def table(rows: list[dict]) -> str:
  lines = ["| task | instruction | verifier | new tokens | problems | pass@1 (avg@8) | pass@8 | pass@8 / pass@1 "
           "| guess: any number | guess: best position | RLVR regime? | s / sample |",
           "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
  for s in summarize(rows):
    p1, p8 = s["pass@1"], s[f"pass@{s['k']}"]
    ok = 0.05 <= p1 <= 0.40 and p8 >= 2 * p1
    partial = "" if s["complete"] else " (partial)"
    lines.append(f"| {s['task']} | {s['instruction']} | {s['verifier']} | {s['tokens']} | {s['problems']}{partial}"
                 f" | {100 * p1:.1f} ± {100 * s['se']:.1f} | {100 * p8:.1f} "
                 f"| {p8 / p1 if p1 else float('inf'):.1f}× "
                 f"| {100 * s['guess_any']:.1f} | {100 * s['guess_best_pos']:.1f} | {'yes' if ok else 'no'} "
                 f"| {s['s_per_row']:.2f} |")
  return "\n".join(lines) + "\n"


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--tasks", default=",".join(CANDIDATES))
  ap.add_argument("--n", type=int, default=256, help="test problems per task")
  ap.add_argument("--samples", type=int, default=8)
  ap.add_argument("--chunk", type=int, default=64, help="problems per sampler call and per row")
  ap.add_argument("--max-new-tokens", type=int, default=16)
  ap.add_argument("--instruction", default=None, help="instead of the preset's (e.g. 'Answer with just the number.')")
  ap.add_argument("--out", default="experiments/results/real_rg")
  ap.add_argument("--report-only", action="store_true")
  args = ap.parse_args(argv)
  from absl import logging as absl_logging  # noqa: PLC0415
  absl_logging.set_verbosity(absl_logging.WARNING)
  os.chdir(ROOT)
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  path = out / "rows.jsonl"
  read = lambda: [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []  # noqa: E731
  if not args.report_only:
    for task in args.tasks.split(","):
      done = {(*key(r), r["start"]) for r in read()}
      try:
        measure(task, args.n, args.samples, args.chunk, args.max_new_tokens, args.instruction, done, path)
      except experiment.ConfigError as e:  # e.g. too few distinct problems at these knobs: the next task
        print(f"{task}: skipped: {e}", flush=True)
      (out / "select.md").write_text(table(read()))
  (out / "select.md").write_text(table(read()))
  print((out / "select.md").read_text())


if __name__ == "__main__":
  main()
