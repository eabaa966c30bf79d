"""Our math verifier on every row of the real math test sets (data.BENCHMARKS, ../shared/data/math_eval).

    python -m experiments.verify_math_eval                        # every benchmark, the table on stdout
    python -m experiments.verify_math_eval --benchmarks math500 --data-dir /my/math_eval

For each row the ground truth g is written as a model would and scored by rewards.math_reward (its 2 s
budget per call):
    boxed_raw   "… so the answer is \\boxed{g}."         g exactly as stored (OlympiadBench's "$69$,$84$" too)
    boxed       "… so the answer is \\boxed{g'}."        g' = g less unescaped $ and a final period (rewards._bare)
    line        "The answer is $g'$."                      no box: the "answer is" fallback
    wrong       "… \\boxed{w}."  w = g' with its first digit d replaced by (d+1) mod 10 (rows with a digit)
A row is self-consistent when boxed_raw, boxed and line all score 1. "wrong = 1" counts rows where the
perturbed answer still scores 1 (too lenient, or a digit that does not change the value, e.g. in a unit).
Prints the counts table (markdown), then each exception with its reason, and the slowest call.
"""

from __future__ import annotations

import argparse
import re
import time

from next_jax.rl import data, rewards

_DIGIT = re.compile(r"[0-9]")


def model_forms(gold: str) -> dict[str, str]:
  """The responses a model would write for ground truth `gold` (module docstring), wrong one included
  when gold holds a digit."""
  clean = rewards._bare(gold)
  forms = {"boxed_raw": f"Adding these up, the answer is \\boxed{{{gold}}}.",
           "boxed": f"Adding these up, the answer is \\boxed{{{clean}}}.",
           "line": f"Checking each case gives the result.\nThe answer is ${clean}$."}
  m = _DIGIT.search(clean)
  if m:
    wrong = clean[:m.start()] + str((int(m.group()) + 1) % 10) + clean[m.end():]
    forms["wrong"] = f"Adding these up, the answer is \\boxed{{{wrong}}}."
  return forms


def score_row(problem: data.Problem) -> tuple[dict[str, float], float]:
  """({form: reward}, slowest call in seconds) for one row."""
  scores, slowest = {}, 0.0
  for form, text in model_forms(problem.answer).items():
    t0 = time.perf_counter()
    scores[form] = rewards.math_reward(text, problem.answer)
    slowest = max(slowest, time.perf_counter() - t0)
  return scores, slowest


def check_benchmark(name: str, data_dir: str | None = None) -> dict:
  """Counts and exceptions of one benchmark: rows, self-consistent, failures per form, wrong scored 1."""
  problems = data.load_benchmark(name, data_dir)
  out = {"name": name, "rows": len(problems), "consistent": 0, "fail": {}, "wrong_rows": 0, "wrong_1": [],
         "exceptions": [], "slowest": (0.0, "")}
  for p in problems:
    scores, slowest = score_row(p)
    if slowest > out["slowest"][0]:
      out["slowest"] = (slowest, p.id)
    failed = [f for f in ("boxed_raw", "boxed", "line") if scores[f] != 1.0]
    out["consistent"] += not failed
    for f in failed:
      out["fail"][f] = out["fail"].get(f, 0) + 1
    if failed:
      out["exceptions"].append((p.id, p.answer, failed))
    if "wrong" in scores:
      out["wrong_rows"] += 1
      if scores["wrong"] == 1.0:
        out["wrong_1"].append((p.id, p.answer))
  return out


def render(results: list[dict]) -> str:
  """The markdown counts table, then one line per exception."""
  lines = ["| benchmark | rows | self-consistent | boxed_raw ≠ 1 | boxed ≠ 1 | line ≠ 1 | wrong rows | wrong = 1 "
           "| slowest call |", "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
  for r in results:
    f = r["fail"]
    lines.append(f"| {r['name']} | {r['rows']} | {r['consistent']} | {f.get('boxed_raw', 0)} | "
                 f"{f.get('boxed', 0)} | {f.get('line', 0)} | {r['wrong_rows']} | {len(r['wrong_1'])} | "
                 f"{r['slowest'][0]:.2f} s ({r['slowest'][1]}) |")
  lines.append("")
  for r in results:
    for pid, gold, failed in r["exceptions"]:
      lines.append(f"- {pid} `{gold}`: {', '.join(failed)} ≠ 1")
    for pid, gold in r["wrong_1"]:
      lines.append(f"- {pid} `{gold}`: the first-digit perturbation still scores 1")
  return "\n".join(lines)


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--benchmarks", default=",".join(data.BENCHMARKS), help="comma-separated names")
  ap.add_argument("--data-dir", default=None, help="the math-eval directory (default: data.math_eval_dir)")
  args = ap.parse_args(argv)
  t0 = time.time()
  results = [check_benchmark(n, args.data_dir) for n in args.benchmarks.split(",") if n]
  print(render(results))
  print(f"\n{sum(r['rows'] for r in results)} rows in {time.time() - t0:.0f} s")


if __name__ == "__main__":
  main()
