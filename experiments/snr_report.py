"""Rows from `experiments.snr_study` → snr_study.md + CSV tables + PNG plots.

    python -m experiments.snr_report experiments/results/snr      # re-render from rows.jsonl

Accuracy in points (temperature 1, the toy test set), mean ± std over seeds. "Δ vs GRPO 250" is the paired
per-seed difference from plain GRPO-LoRA at the same real step count; "gap closed" = Δ / (GRPO 400 −
GRPO 250) from the seed means (1 = the 400-step accuracy reached in 250 steps).
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import numpy as np

from experiments.report import MARKERS, _table, mean_std, method_labels

DRIFT_KEYS = ("increment_cos", "local_cos", "growth_exp", "r2_linear", "skill_vs_hold", "E1")


def _points(rows) -> list[str]:
  """Point names in increasing samples per step, then decreasing lr (more drift to the right)."""
  first = {}
  for r in rows:
    first.setdefault(r["point"], r)
  return sorted(first, key=lambda n: (first[n]["samples"], -first[n]["lr"], first[n]["mini_batches"]))


def _of(rows, point):
  return [r for r in rows if r["point"] == point]


def _steps(rows) -> tuple[int, int]:
  keys = [k for r in rows for k in r["acc"] if k.startswith("GRPO-LoRA@") and k != "GRPO-LoRA@jump"]
  steps = sorted({int(k.split("@")[1]) for k in keys})
  return (steps[0], steps[-1]) if steps else (0, 0)


def _accs(rs, key: str) -> list[float]:
  return [100 * r["acc"][key] for r in rs if key in r["acc"]]


def paired_gain(rs, method: str, short: int) -> np.ndarray:
  """Per-seed accuracy points of `method` minus GRPO-LoRA at `short` steps."""
  return np.asarray([100 * (r["acc"][method] - r["acc"][f"GRPO-LoRA@{short}"]) for r in rs
                     if method in r["acc"] and f"GRPO-LoRA@{short}" in r["acc"]])


def drift_table(rows, out: Path) -> str:
  body = []
  for p in _points(rows):
    rs = _of(rows, p)
    r0 = rs[0]
    body.append([p, r0["samples"], r0["mini_batches"], f"{r0['lr']:g}", f"{np.mean([r['sec_per_step'] for r in rs]):.2f}"]
                + [f"{np.mean([r['drift'][k] for r in rs]):.3f}" for k in DRIFT_KEYS] + [len(rs)])
  head = ["point", "samples/step", "mini-batches", "lr", "s/step"] + list(DRIFT_KEYS) + ["seeds"]
  return _table(head, body, out / "drift.csv")


def accuracy_table(rows, out: Path) -> str:
  short, long = _steps(rows)
  head = ["point", "backbone", "GRPO @jump", f"GRPO {short}", f"GRPO {long}"]
  head += [f"{m} {short}" for m in method_labels()] + [f"{m} Δ vs GRPO {short}" for m in method_labels()]
  head += [f"{m} gap closed" for m in method_labels()]
  body = []
  for p in _points(rows):
    rs = [r for r in _of(rows, p) if f"GRPO-LoRA@{short}" in r["acc"]]
    if not rs:
      continue
    acc = functools.partial(_accs, rs)
    gap = np.mean(acc(f"GRPO-LoRA@{long}")) - np.mean(acc(f"GRPO-LoRA@{short}"))
    line = [p, mean_std([100 * r["backbone"] for r in rs]), mean_std(acc("GRPO-LoRA@jump")),
            mean_std(acc(f"GRPO-LoRA@{short}")), mean_std(acc(f"GRPO-LoRA@{long}"))]
    line += [mean_std(acc(m)) for m in method_labels()]
    gains = {m: paired_gain(rs, m, short) for m in method_labels()}
    line += [mean_std(gains[m]) for m in method_labels()]
    line += [f"{gains[m].mean() / gap:.2f}" if gap > 0.5 else "– (GRPO gains < 0.5 pt)" for m in method_labels()]
    body.append(line)
  return _table(head, body, out / "accuracy.csv")


def jump_table(rows, out: Path) -> str:
  """Accuracy right after the jump minus the jump-point accuracy: what the jump alone does."""
  body = []
  for p in _points(rows):
    rs = [r for r in _of(rows, p) if "NExt@jump" in r["acc"]]
    if rs:
      body.append([p] + [mean_std([100 * (r["acc"][f"{m}@jump"] - r["acc"]["GRPO-LoRA@jump"]) for r in rs])
                         for m in method_labels()])
  return _table(["point"] + [f"{m}: jump alone (pt)" for m in method_labels()], body, out / "jump.csv")


def agreement_table(rows, out: Path) -> str:
  body = []
  for p in _points(rows):
    rs = [r for r in _of(rows, p) if "agreement" in r]
    if rs:
      body.append([p] + [f"{np.mean([r['agreement'][m]['cos_global'] for r in rs]):.3f}" for m in method_labels()]
                  + [f"{np.mean([r['agreement'][m]['relerr_global'] for r in rs]):.2f}" for m in method_labels()])
  head = ["point"] + [f"{m} cos" for m in method_labels()] + [f"{m} rel. err" for m in method_labels()]
  return _table(head, body, out / "agreement.csv")


def plots(rows, out: Path) -> list[str]:
  try:
    import matplotlib  # noqa: PLC0415
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
  except ImportError:
    return []
  short, _ = _steps(rows)
  pts = [p for p in _points(rows) if any("NExt" in r["acc"] for r in _of(rows, p))]
  if not pts:
    return []
  fig, axes = plt.subplots(1, 3, figsize=(15, 4))
  for ax, key, label in ((axes[0], "increment_cos", "increment cosine at the jump (1 = straight drift)"),
                         (axes[1], "skill_vs_hold", "linear fit's skill vs hold-last (> 0: line wins)")):
    for m, marker in zip(method_labels(), MARKERS):
      xs = [np.mean([r["drift"][key] for r in _of(rows, p)]) for p in pts]
      g = [paired_gain(_of(rows, p), m, short) for p in pts]
      ax.errorbar(xs, [x.mean() for x in g], [x.std(ddof=1) / np.sqrt(len(x)) if len(x) > 1 else 0 for x in g],
                  marker=marker, ls="", ms=9, capsize=3, label=m)
    ax.axhline(0, color="grey", ls=":")
    ax.set(xlabel=label, ylabel=f"accuracy gain over GRPO {short} (pt, paired, ± s.e.)")
    ax.legend(fontsize=8)
  xs = np.arange(len(pts))
  for j, m in enumerate(("GRPO-LoRA", ) + method_labels()):
    vals = [np.mean([100 * r["acc"].get(f"GRPO-LoRA@{short}" if m == "GRPO-LoRA" else m, np.nan)
                     for r in _of(rows, p)]) for p in pts]
    axes[2].bar(xs + (j - 2) * 0.16, vals, 0.16, label=f"{m} {short}")
  axes[2].plot(xs, [np.mean([100 * r["acc"][f"GRPO-LoRA@{_steps(rows)[1]}"] for r in _of(rows, p)])
                    for p in pts], "k_", ms=20, mew=2, label=f"GRPO {_steps(rows)[1]}")
  axes[2].set_xticks(xs, pts, rotation=20, fontsize=8)
  axes[2].set(ylabel="test accuracy (%)", title="per point")
  axes[2].set_ylim(bottom=min(np.mean([100 * r["backbone"] for r in rows]) - 2, 100))
  axes[2].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(out / "snr_study.png", dpi=110)
  return ["snr_study.png"]


def write(rows: list[dict], out: Path, command: str, schedule: dict | None = None) -> str:
  out = Path(out)
  minutes = sum(r["minutes"] for r in rows)
  sched = f"schedule {schedule}; " if schedule else ""
  parts = [f"# When does trajectory extrapolation pay?\n\ncommand: `{command}`; {sched}"
           f"{len(rows)} runs, {minutes:.0f} min in all (per run: "
           + ", ".join(f"{r['point']}/s{r['seed']} {r['minutes']:.1f}" for r in rows) + ")",
           "## Drift of the observed trajectory at the jump point (mean over seeds of the median matrix)\n\n"
           + drift_table(rows, out)]
  if any("NExt" in r["acc"] for r in rows):
    parts += ["## Test accuracy at equal real steps (%)\n\n" + accuracy_table(rows, out),
              "## The jump alone: accuracy right after it minus the jump-point accuracy\n\n" + jump_table(rows, out),
              "## Predicted vs actual Δ over the next k·interval steps (whole model)\n\n"
              + agreement_table(rows, out)]
  made = plots(rows, out)
  if made:
    parts.append("Plots: " + ", ".join(f"![{m}]({m})" for m in made))
  md = "\n".join(parts) + "\n"
  (out / "snr_study.md").write_text(md)
  return md


def main():
  out = Path(sys.argv[1] if len(sys.argv) > 1 else "experiments/results/snr")
  rows = [json.loads(x) for x in (out / "rows.jsonl").read_text().splitlines()]
  print(write(rows, out, command=f"python -m experiments.snr_report {out}"))


if __name__ == "__main__":
  main()
