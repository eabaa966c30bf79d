"""experiments.reproduce --quick end to end on a tiny random model (the lora and cyclic families): every table
gets its rows and columns, the branches share the jump point, a rerun resumes instead of recomputing; and
experiments.report's aggregation on hand-made rows (mean ± std, ICER, paired Δ, α table)."""

from __future__ import annotations

import csv
import json

import pytest

from experiments import report, reproduce


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, toy_model_dir):
  out = tmp_path_factory.mktemp("repro")
  reproduce.main(["--quick", "--seeds", "0", "--families", "lora,cyclic", "--out", str(out), "--model-dir", str(toy_model_dir)])
  rows = [json.loads(x) for x in (out / "rows.jsonl").read_text().splitlines()]
  return out, rows


def test_every_requested_table_has_rows(quick_run):
  _, rows = quick_run
  tables = {r["table"] for r in rows}
  assert {"main", "curve", "ablation", "analysis", "cyclic", "overhead", "done"} <= tables
  methods = {r["method"] for r in rows if r["table"] == "main"}
  assert methods == {"GRPO-LoRA", "NExt", "RL-Extra", "AlphaRL", "RELEX"}
  assert all(0.0 <= r["acc"] <= 1.0 for r in rows if "acc" in r)


def test_branches_share_the_backbone_and_jump_point(quick_run):
  _, rows = quick_run
  lora = [r for r in rows if r.get("family") == "lora" and "backbone" in r]
  assert len({r["backbone"] for r in lora}) == 1
  sched = reproduce.QUICK
  jumped = {r["steps"] for r in rows if r["table"] == "main" and not r["method"].startswith("GRPO")}
  assert jumped == {sched.short}
  assert len([r for r in rows if r["table"] == "ablation"]) == 3


def test_analysis_rows_hold_drift_and_agreement_for_every_method(quick_run):
  _, rows = quick_run
  an = [r for r in rows if r["table"] == "analysis" and r["family"] == "lora"][0]
  assert set(an["agreement"]) == {"NExt", "RL-Extra", "AlphaRL", "RELEX"}
  assert all(-1.0 <= a["cos_median"] <= 1.0 and a["relerr_global"] >= 0 for a in an["agreement"].values())
  assert {"increment_cos", "growth_exp", "r2_linear", "skill_vs_hold", "E1"} <= set(an["drift"])
  assert len(an["E1_by_step"]) == reproduce.QUICK.jump // reproduce.QUICK.interval


def test_tables_and_csv_columns(quick_run):
  out, _ = quick_run
  md = (out / "tables.md").read_text()
  for title in ("1. Main table", "2. Ablation", "5a. Drift", "5b. Predicted vs actual", "6. Cyclic", "7. Overhead"):
    assert title in md
  with (out / "main.csv").open() as f:
    head = next(csv.reader(f))
  assert head == ["method", "RL steps", "accuracy (%)", "ICER", "Δ vs GRPO-LoRA 250 (paired)", "seeds"]
  assert (out / "reproduction.png").stat().st_size > 0


def test_a_rerun_resumes_finished_families(quick_run, toy_model_dir):
  out, rows = quick_run
  reproduce.main(["--quick", "--seeds", "0", "--families", "lora,cyclic", "--out", str(out),
                  "--model-dir", str(toy_model_dir)])
  assert len((out / "rows.jsonl").read_text().splitlines()) == len(rows)


def test_icer_formula():
  assert report._icer(250, 30.0, 20.0) == "25.0"
  assert report._icer(250, 19.0, 20.0).startswith("∞")


def synthetic_rows():
  rows = []
  for seed, (bb, g250, nxt) in enumerate([(0.10, 0.20, 0.25), (0.12, 0.22, 0.21)]):
    rows.append(report_row("main", seed, "GRPO-LoRA", 250, g250, bb))
    rows.append(report_row("main", seed, "NExt", 250, nxt, bb))
    for a, before, after in ((0.0, 0.15, g250), (1.5, 0.16, nxt)):
      rows += [report_row("alpha", seed, "NExt", 150, before, bb, alpha=a, when="before"),
               report_row("alpha", seed, "NExt", 250, after, bb, alpha=a, when="after")]
    rows.append({"table": "done", "family": "lora", "seed": seed, "minutes": 1.0})
  return rows


def report_row(table, seed, method, steps, acc, bb, **kw):
  return reproduce.row(table, "lora", seed, method, steps, acc, bb, **kw)


def test_report_aggregates_by_hand(tmp_path):
  md = report.write(synthetic_rows(), tmp_path, command="cmd")
  # NExt: mean 23.0 ± std(25, 21) = 2.8; backbone mean 11.0 → ICER 250 / 12 = 20.8; paired Δ (+5, −1) → 2.0 ± 4.2
  assert "| NExt | 250 | 23.0 ± 2.8 | 20.8 | 2.0 ± 4.2 | 2 |" in md
  assert "| GRPO-LoRA | 250 | 21.0 ± 1.4 | 25.0 | 0.0 ± 0.0 | 2 |" in md
  with (tmp_path / "alpha.csv").open() as f:
    assert list(csv.reader(f))[1:] == [["0.0", "15.0 ± 0.0", "21.0 ± 1.4", "2"],
                                            ["1.5", "16.0 ± 0.0", "23.0 ± 2.8", "2"]]
