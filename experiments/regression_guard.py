"""Bit-for-bit regression guard for refactors: the quick toy run and three reproduce --quick families.

    python -m experiments.regression_guard --record   # before a refactor: writes experiments/results/regression
    python -m experiments.regression_guard            # after it: reruns, compares, exits 1 on any difference

Runs (seeded CPU runs are deterministic here, so every number must come back identical):
  main       next_jax.cli.run --config=toy_arith:quick → metrics.jsonl (every RL step's metrics)
             and results.json (evaluations, the jump's drift measures, the predictor's loss curve ends)
  reproduce  experiments.reproduce --quick --seeds 0 --families lora,cyclic,full → rows.jsonl (accuracies of
             every branch, Δ agreement with the true future, E₁, drift, R²)
Wall-clock fields (time/*, tokens_per_s, minutes, seconds, workdir paths) are dropped before comparing.
About 1.5 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "experiments/results/regression"
TIMING = ("time/", "tokens_per_s", "minutes", "seconds", "extrapolate_s", "sec_per_step", "workdir")
FILES = {"main_metrics.jsonl": "main/metrics.jsonl", "main_results.json": "main/results.json",
         "repro_rows.jsonl": "repro/rows.jsonl"}


def _strip(x):
  """x without wall-clock fields (recursively)."""
  if isinstance(x, dict):
    return {k: _strip(v) for k, v in x.items() if not str(k).startswith(TIMING)}
  if isinstance(x, list):
    return [_strip(v) for v in x]
  return x


def _load(path: Path) -> list:
  text = path.read_text()
  docs = [json.loads(line) for line in text.splitlines()] if path.suffix == ".jsonl" else [json.loads(text)]
  return [_strip(d) for d in docs]


def produce(out: Path) -> None:
  """Run the guarded commands with outputs under `out`."""
  py = sys.executable
  cmds = [[py, "-m", "next_jax.cli.run", "--config=toy_arith:quick", f"--config.workdir={out}/main",
           "--config.log.progress=False"],
          [py, "-m", "experiments.reproduce", "--quick", "--seeds", "0", "--families", "lora,cyclic,full",
           "--out", str(out / "repro")]]
  for cmd in cmds:
    print("$", " ".join(cmd[1:]), flush=True)
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
      sys.exit(f"{' '.join(cmd[1:])} failed:\n{done.stderr[-4000:]}")


def differences(a: list, b: list, name: str) -> list[str]:
  """Human-readable differences between two documents lists (first few)."""
  if len(a) != len(b):
    return [f"{name}: {len(a)} records here, {len(b)} in the reference"]
  out = []
  for i, (x, y) in enumerate(zip(a, b)):
    if x != y:
      keys = sorted(k for k in set(x) | set(y) if x.get(k) != y.get(k)) if isinstance(x, dict) else []
      out.append(f"{name} record {i}: differs in {keys[:8]}")
  return out[:10]


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--record", action="store_true", help="overwrite the reference with this run")
  ap.add_argument("--reference", default=str(REFERENCE))
  args = ap.parse_args(argv)
  ref = Path(args.reference)
  with tempfile.TemporaryDirectory() as tmp:
    produce(Path(tmp))
    if args.record:
      ref.mkdir(parents=True, exist_ok=True)
      for name, rel in FILES.items():
        (ref / name).write_text("".join(json.dumps(d, sort_keys=True) + "\n" for d in _load(Path(tmp) / rel)))
      print(f"recorded {ref}")
      return 0
    diffs = [d for name, rel in FILES.items()
             for d in differences(_load(Path(tmp) / rel), _load(ref / name), name)]
  print("\n".join(diffs) if diffs else f"identical to {ref} (timings excluded)")
  return 1 if diffs else 0


if __name__ == "__main__":
  sys.exit(main())
