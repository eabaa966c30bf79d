"""experiments.reproduce --quick end to end on a tiny random model: every table gets its rows and columns, the
branches really share the jump-point state, and a rerun resumes instead of recomputing."""

from __future__ import annotations

import csv
import json

import pytest

from experiments import report, reproduce


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, toy_model_dir):
  out = tmp_path_factory.mktemp("repro")
  reproduce.main(["--quick", "--seeds", "0", "--families", "lora,full,cyclic,alpha",
                  "--out", str(out), "--model-dir", str(toy_model_dir)])
  rows = [json.loads(x) for x in (out / "rows.jsonl").read_text().splitlines()]
  return out, rows


def test_every_requested_table_has_rows(quick_run):
  _, rows = quick_run
  tables = {r["table"] for r in rows}
  assert {"main", "curve", "alpha", "analysis", "cyclic", "overhead", "done"} <= tables
  methods = {r["method"] for r in rows if r["table"] == "main"}
  assert methods == {"GRPO-LoRA", "GRPO-full", "NExt", "RL-Extra", "AlphaRL", "RELEX"}
  assert all(0.0 <= r["acc"] <= 1.0 for r in rows if "acc" in r)


def test_branches_share_the_backbone_and_jump_point(quick_run):
  _, rows = quick_run
  lora = [r for r in rows if r.get("family") == "lora" and "backbone" in r]
  assert len({r["backbone"] for r in lora}) == 1
  sched = reproduce.QUICK
  jumped = {r["steps"] for r in rows if r["table"] == "main" and not r["method"].startswith("GRPO")}
  assert jumped == {sched.short}
  alpha0 = [r for r in rows if r["table"] == "alpha" and r["alpha"] == 0.0 and r["when"] == "before"][0]
  at_jump = [r for r in rows if r["table"] == "curve" and r["family"] == "lora" and r["steps"] == sched.jump]
  assert alpha0["acc"] == at_jump[0]["acc"]  # α = 0 is the jump-point policy itself, same eval prompts


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
  for title in ("1. Main table", "3. α sweep", "5a. Drift", "5b. Predicted vs actual", "6. Cyclic", "7. Overhead"):
    assert title in md
  with (out / "main.csv").open() as f:
    head = next(csv.reader(f))
  assert head == ["method", "RL steps", "accuracy (%)", "ICER", "Δ vs GRPO-LoRA 250 (paired)", "seeds"]
  with (out / "alpha.csv").open() as f:
    assert len(list(csv.reader(f))) == 1 + 9  # α = 0 and the grid 0.5 … 4.0
  assert (out / "reproduction.png").stat().st_size > 0


def test_a_rerun_resumes_finished_families(quick_run, toy_model_dir):
  out, rows = quick_run
  reproduce.main(["--quick", "--seeds", "0", "--families", "lora,full,cyclic,alpha", "--out", str(out),
                  "--model-dir", str(toy_model_dir)])
  assert len((out / "rows.jsonl").read_text().splitlines()) == len(rows)


def test_icer_formula():
  assert report._icer(250, 30.0, 20.0) == "25.0"
  assert report._icer(250, 19.0, 20.0).startswith("∞")
