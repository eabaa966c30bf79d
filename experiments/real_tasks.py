"""Which verifiable task does the real model partly solve? Base pass@1 / pass@8 of SmolLM2-135M-Instruct.

    python -m experiments.real_tasks                    # 4 tasks × 256 test problems × 8 samples, T = 1
    python -m experiments.real_tasks --tasks add,compare --n 64

Per task (next_jax/configs/smollm2.py:task=…, posed through the chat template with its instruction): pass@1 = the
mean over 8 samples at temperature 1 (avg@8), pass@8 = the share of problems with ≥ 1 correct sample, and
greedy accuracy. The regime RLVR sharpens is pass@1 ≈ 5–40 % with pass@8 ≥ 2 × pass@1. Rows go to
<out>/tasks.jsonl as each task finishes (a rerun skips finished tasks); the table is <out>/tasks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from next_jax.configs import smollm2
from next_jax.rl import trainer
from next_jax.run import experiment


def measure(task: str, n: int, samples: int, system: str | None = None, max_new_tokens: int | None = None,
            seed: int = 0) -> dict:
  """pass@1, pass@samples and greedy accuracy of the base model; system/max_new_tokens override the
  preset's posing ("" = the chat template's default system prompt, 19 tokens longer)."""
  c = smollm2.get_config(f"task={task}")
  c.task.n_test, c.task.n_val = n, 0
  if system is not None and system != c.task.system:
    c.task.system = system
    c.rollout.prompt_len += 0 if system else 32
  c.rollout.max_new_tokens = max_new_tokens or c.rollout.max_new_tokens
  exp = experiment.build(c)
  base, lora = exp.state.base_params, exp.state.rl.train.params
  t0 = time.perf_counter()
  sampled = trainer.evaluate(exp.setup, base, lora, exp.test, chunk=c.eval.chunk, samples=samples,
                             temperature=1.0, seed=seed)
  greedy = trainer.evaluate(exp.setup, base, lora, exp.test, chunk=c.eval.chunk, temperature=0.0, seed=seed)
  examples = []
  for p in exp.test[:3]:
    ids = exp.setup.encode(p)
    examples.append({"prompt": exp.tokenizer.decode(ids), "answer": p.answer})
  return {"task": task, "n": len(exp.test), "samples": samples, "pass@1": sampled["accuracy"],
          f"pass@{samples}": sampled[f"pass@{samples}"], "greedy": greedy["accuracy"],
          "system": c.task.system, "instruction": c.task.instruction, "max_new_tokens": c.rollout.max_new_tokens,
          "seconds": time.perf_counter() - t0, "examples": examples}


def command(r: dict) -> str:
  """The command that makes row r."""
  return (f"python -m experiments.real_tasks --tasks {r['task']} --n {r['n']} --system '{r.get('system', '')}' "
          f"--max-new-tokens {r['max_new_tokens']}")


def table(rows: list[dict]) -> str:
  lines = ["Base SmolLM2-135M-Instruct, chat template, temperature 1. Each row: `" + command(
               {"task": "TASK", "n": "N", "system": "SYSTEM", "max_new_tokens": "TOKENS"}) + "`.", "",
           "| task | system prompt | new tokens | problems | pass@1 (avg@8) | pass@8 | pass@8 / pass@1 | greedy "
           "| in the RLVR regime? |",
           "|---|---|---:|---:|---:|---:|---:|---:|---|"]
  for r in rows:
    p1, p8 = r["pass@1"], r[f"pass@{r['samples']}"]
    ok = 0.05 <= p1 <= 0.40 and p8 >= 2 * p1
    system = f"“{r['system']}”" if r.get("system") else "template default"
    lines.append(f"| {r['task']} | {system} | {r['max_new_tokens']} | {r['n']} | {100 * p1:.1f} | {100 * p8:.1f} | "
                 f"{p8 / p1 if p1 else float('inf'):.1f}× | {100 * r['greedy']:.1f} | {'yes' if ok else 'no'} |")
  return "\n".join(lines) + "\n"


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--tasks", default=",".join(smollm2.TASKS))
  ap.add_argument("--n", type=int, default=256, help="test problems per task")
  ap.add_argument("--samples", type=int, default=8)
  ap.add_argument("--out", default="experiments/results/real")
  ap.add_argument("--system", default=None, help="system prompt ('' = the template's default); "
                  "default: the preset's")
  ap.add_argument("--max-new-tokens", type=int, default=None, help="default: the preset's")
  args = ap.parse_args(argv)
  os.chdir(ROOT)
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  path = out / "tasks.jsonl"
  rows = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
  posing = lambda r: (r["task"], r["n"], r["samples"], r.get("system", ""), r["max_new_tokens"])  # noqa: E731
  c0 = smollm2.get_config()
  system = c0.task.system if args.system is None else args.system
  max_new = args.max_new_tokens or c0.rollout.max_new_tokens
  done = {posing(r) for r in rows}
  for task in args.tasks.split(","):
    if (task, args.n, args.samples, system, max_new) in done:
      continue
    r = measure(task, args.n, args.samples, system, max_new)
    print(json.dumps({k: v for k, v in r.items() if k != "examples"}), flush=True)
    with path.open("a") as f:
      f.write(json.dumps(r) + "\n")
    rows.append(r)
  (out / "tasks.md").write_text(table([r for r in rows if r["n"] == args.n]))
  print((out / "tasks.md").read_text())


if __name__ == "__main__":
  main()
