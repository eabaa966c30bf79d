"""Rows from `experiments.reproduce` → Markdown + CSV tables and PNG plots (mean ± std over seeds).

    python -m experiments.report experiments/results/repro     # re-render from rows.jsonl

Accuracy is test accuracy in points (temperature 1, the toy test set); ICER = steps / (Avg − Avg_backbone)
computed from the seed means (METHOD.md §5); "Δ vs GRPO-LoRA 250" is the paired per-seed difference.
"""

from __future__ import annotations

import csv
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from next_jax.nxt import extrapolate

MARKERS = "*v^sDPX<>"  # one per registered method, in registry order


def method_labels() -> tuple[str, ...]:
  """The registered extrapolation methods' labels (extrapolate.METHODS order: NExt first), read at call
  time so that a method registered after this import is reported too."""
  return tuple(m.label for m in extrapolate.METHODS.values())


def main_order() -> tuple[str, ...]:
  labels = method_labels()
  return ("GRPO-LoRA", "GRPO-full", *labels[1:], labels[0])  # NExt in the last row
DRIFT_KEYS = ("increment_cos", "local_cos", "growth_exp", "r2_linear", "skill_vs_hold", "E1", "E1_sq")


def mean_std(xs) -> str:
  xs = np.asarray(xs, float)
  return f"{xs.mean():.1f} ± {xs.std(ddof=1):.1f}" if len(xs) > 1 else f"{xs.mean():.1f}"


def _icer(steps: int, acc: float, backbone: float) -> str:
  gain = acc - backbone
  return f"{steps / gain:.1f}" if gain > 0 else "∞ (no gain)"


def _pick(rows, **kw):
  return [r for r in rows if all(r.get(k) == v for k, v in kw.items())]


def _by_seed(rows) -> dict[int, float]:
  return {r["seed"]: 100 * r["acc"] for r in rows}


def _table(head: list[str], body: list[list], path: Path | None) -> str:
  if path is not None:
    with path.open("w", newline="") as f:
      csv.writer(f).writerows([head] + body)
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  return "\n".join(lines + ["| " + " | ".join(str(x) for x in b) + " |" for b in body]) + "\n"


def accuracy_table(rows, table: str, order, ref: dict[int, float], out: Path, name: str) -> str:
  """method × steps with mean ± std accuracy, ICER from the means, paired Δ vs the reference run."""
  backbone = {r["seed"]: 100 * r["backbone"] for r in rows if r["table"] in ("main", "compat")}
  bb = float(np.mean(list(backbone.values())))
  body = [["Backbone", "–", mean_std(list(backbone.values())), "–", "–", len(backbone)]]
  for method in order:
    for steps in sorted({r["steps"] for r in _pick(rows, table=table, method=method)}):
      acc = _by_seed(_pick(rows, table=table, method=method, steps=steps))
      diff = [acc[s] - ref[s] for s in acc if s in ref]
      body.append([method, steps, mean_std(list(acc.values())), _icer(steps, np.mean(list(acc.values())), bb),
                   mean_std(diff) if diff else "–", len(acc)])
  head = ["method", "RL steps", "accuracy (%)", "ICER", "Δ vs GRPO-LoRA 250 (paired)", "seeds"]
  return _table(head, body, out / f"{name}.csv")


def alpha_table(rows, out: Path) -> str:
  body = []
  for a in sorted({r["alpha"] for r in _pick(rows, table="alpha")}):
    before = [100 * r["acc"] for r in _pick(rows, table="alpha", alpha=a, when="before")]
    after = [100 * r["acc"] for r in _pick(rows, table="alpha", alpha=a, when="after")]
    body.append([a, mean_std(before), mean_std(after), len(after)])
  return _table(["α", "right after the jump (%)", "after the extra steps (%)", "seeds"], body,
                out / "alpha.csv")


def drift_table(rows, out: Path) -> str:
  body = []
  for fam in ("lora", "full"):
    an = _pick(rows, table="analysis", family=fam)
    if an:
      r2 = np.concatenate([r["r2_values"] for r in an])
      body.append([fam] + [f"{np.mean([r['drift'][k] for r in an]):.3f}" for k in DRIFT_KEYS]
                  + [f"{np.mean(r2 < 0):.0%}"])
  return _table(["trajectory"] + list(DRIFT_KEYS) + ["matrices with R² < 0"], body, out / "drift.csv")


def agreement_table(rows, out: Path) -> str:
  an = _pick(rows, table="analysis", family="lora")
  body = []
  for m in method_labels():
    vals = [r["agreement"][m] for r in an if m in r.get("agreement", {})]
    if vals:
      body.append([m] + [f"{np.mean([v[k] for v in vals]):.3f} ± {np.std([v[k] for v in vals]):.3f}"
                         for k in ("cos_median", "cos_global", "relerr_global")])
  return _table(["method", "cos (median matrix)", "cos (whole model)", "relative error (whole model)"], body,
                out / "agreement.csv")


def cyclic_table(rows, out: Path) -> str:
  cyc = _pick(rows, table="cyclic")
  grpo = _pick(rows, table="curve", family="lora")
  body = []
  for steps in sorted({r["steps"] for r in cyc}):
    c = [100 * r["acc"] for r in _pick(cyc, steps=steps)]
    g = [100 * r["acc"] for r in _pick(grpo, steps=steps)]
    body.append([steps, mean_std(c), mean_std(g) if g else "–", _pick(cyc, steps=steps)[0]["jumps"]])
  return _table(["RL steps", "cyclic NExt (%)", "GRPO-LoRA (%)", "jumps at"], body, out / "cyclic.csv")


def overhead_table(rows, out: Path) -> str:
  body = []
  for r in _pick(rows, table="overhead"):
    saved = r["steps_saved"] * r["sec_per_step"]
    body.append([r["seed"], f"{r['sec_per_step']:.3f}", f"{r['extrapolate_s']:.1f}", r["steps_saved"],
                 f"{saved:.0f}", f"{r['extrapolate_s'] / saved:.2f}"])
  return _table(["seed", "s / RL step", "NExt extrapolation (s)", "steps saved", "RL time saved (s)",
                 "extrapolation / saved"], body, out / "overhead.csv")


def _legend(ax, **kw):
  if ax.get_legend_handles_labels()[0]:
    ax.legend(**kw)


def plots(rows, out: Path) -> list[str]:
  try:
    import matplotlib  # noqa: PLC0415
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
  except ImportError:
    return []
  made = []
  fig, axes = plt.subplots(1, 3, figsize=(15, 4))
  curve = defaultdict(list)
  for r in _pick(rows, table="curve", family="lora"):
    curve[r["steps"]].append(100 * r["acc"])
  xs = sorted(curve)
  axes[0].errorbar(xs, [np.mean(curve[x]) for x in xs], [np.std(curve[x]) for x in xs], label="GRPO-LoRA",
                   marker="o")
  for name, marker in zip(method_labels(), MARKERS):
    acc = [100 * r["acc"] for r in _pick(rows, table="main", method=name)]
    if acc:
      axes[0].errorbar([_pick(rows, table="main", method=name)[0]["steps"]], [np.mean(acc)], [np.std(acc)],
                       marker=marker, ls="", ms=10, label=name)
  cyc = defaultdict(list)
  for r in _pick(rows, table="cyclic"):
    cyc[r["steps"]].append(100 * r["acc"])
  if cyc:
    xs = sorted(cyc)
    axes[0].plot(xs, [np.mean(cyc[x]) for x in xs], marker="x", ls="--", label="cyclic NExt")
  axes[0].set(xlabel="real RL steps", ylabel="test accuracy (%)", title="accuracy vs real steps")
  _legend(axes[0], fontsize=8)
  for fam, style in (("lora", "-"), ("full", "--")):
    an = _pick(rows, table="analysis", family=fam)
    if an:
      axes[1].plot(an[0]["E1_steps"], np.mean([r["E1_by_step"] for r in an], 0), style, marker="o", label=fam)
      axes[2].hist(np.concatenate([r["r2_values"] for r in an]).clip(-5, 1), bins=30, alpha=0.5, label=fam)
  axes[1].set(xlabel="RL step", ylabel="median E₁ = σ₁/Σσ of W_t − W₀", title="rank-1 dominance")
  _legend(axes[1])
  axes[2].set(xlabel="R² (clipped at −5)", ylabel="matrices", title="linear fit: 10 snapshots → next 5")
  axes[2].axvline(0, color="grey", ls=":")
  _legend(axes[2])
  fig.tight_layout()
  fig.savefig(out / "reproduction.png", dpi=110)
  made.append("reproduction.png")
  alpha = _pick(rows, table="alpha")
  if alpha:
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for when in ("before", "after"):
      pts = sorted({r["alpha"] for r in alpha})
      ax.plot(pts, [np.mean([100 * r["acc"] for r in _pick(alpha, alpha=a, when=when)]) for a in pts],
              marker="o", label=f"{when} the extra steps")
    ax.set(xlabel="α (0 = no jump)", ylabel="test accuracy (%)", title="NExt α sweep")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "alpha.png", dpi=110)
    made.append("alpha.png")
  return made


def write(rows: list[dict], out: Path, command: str, schedule: dict | None = None,
          heading: str = "Reproduction at CPU scale") -> str:
  """Render every table that has rows into out/tables.md (+ one CSV each, + PNGs); returns the Markdown."""
  out = Path(out)
  ref = _by_seed(_pick(rows, table="main", method="GRPO-LoRA", steps=min(
      [r["steps"] for r in _pick(rows, table="main", method="GRPO-LoRA")] or [0])))
  done = _pick(rows, table="done")
  seeds = sorted({r["seed"] for r in done})
  parts = [f"# {heading}\n\ncommand: `{command}`; seeds {seeds}; schedule {schedule}; "
           f"family run times (min): " + ", ".join(f"{r['family']}/s{r['seed']} {r['minutes']:.1f}" for r in done)]
  sections = [("1. Main table", lambda: accuracy_table(rows, "main", main_order(), ref, out, "main")),
              ("2. Ablation (NExt variants at the same step count)", lambda: accuracy_table(
                  rows + [{**r, "table": "ablation"} for r in _pick(rows, table="main", method="NExt")],
                  "ablation", ("NExt", "w/o LoRA (dense SVD)", "w/o global delta", "w/o local delta",
                                     "sign none (official)"), ref, out, "ablation")),
              ("3. α sweep (0 = no jump)", lambda: alpha_table(rows, out)),
              ("4. Compatibility", lambda: accuracy_table(
                  rows, "compat", ("RLOO", "RLOO + NExt", "REINFORCE++", "REINFORCE++ + NExt"), ref, out, "compat")),
              ("5a. Drift of the observed trajectory at the jump point (mean over seeds of the median matrix)",
               lambda: drift_table(rows, out)),
              ("5b. Predicted vs actual Δ over the next k·interval steps (W_{t+h} − W_t, GRPO-LoRA continuation)",
               lambda: agreement_table(rows, out)),
              ("6. Cyclic NExt vs GRPO-LoRA at equal real steps", lambda: cyclic_table(rows, out)),
              ("7. Overhead", lambda: overhead_table(rows, out))]
  present = {r["table"] for r in rows}
  for (title, fn), key in zip(sections, ("main", "ablation", "alpha", "compat", "analysis", "analysis",
                                         "cyclic", "overhead")):
    if key in present:
      parts.append(f"## {title}\n\n{fn()}")
  made = plots(rows, out)
  if made:
    parts.append("Plots: " + ", ".join(f"![{m}]({m})" for m in made))
  md = "\n".join(parts) + "\n"
  (out / "tables.md").write_text(md)
  return md


def main():
  out = Path(sys.argv[1] if len(sys.argv) > 1 else "experiments/results/repro")
  rows = [json.loads(x) for x in (out / "rows.jsonl").read_text().splitlines()]
  print(write(rows, out, command=f"python -m experiments.report {out}"))


if __name__ == "__main__":
  main()
