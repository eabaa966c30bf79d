"""experiments.snr_study --quick end to end on a tiny random model (one point, one seed; conftest's
first_char_reward, so the policy moves): every method's accuracy, its jump-alone accuracy and its agreement
with the true future are recorded with the drift measures; the plot draws them; a rerun resumes;
--drift-only stops at the jump point; and experiments.snr_report's aggregation on hand-made rows (paired
gain, gap closed)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from figures import assert_png_of, bar_heights, lines, recorded_figures

from experiments import reproduce, snr_report, snr_study

METHODS = ("NExt", "RL-Extra", "AlphaRL", "RELEX")
FIGURES = {}  # file name → (Figure, dpi) of the quick study's plots


@pytest.fixture(scope="module")
def quick_study(tmp_path_factory, toy_model_dir, first_char_reward):
  out = tmp_path_factory.mktemp("snr")
  with recorded_figures() as figs:
    snr_study.main(["--quick", "--points", "q8", "--seeds", "0", "--out", str(out), "--model-dir",
                    str(toy_model_dir)])
  FIGURES.update(figs)
  return out, [json.loads(x) for x in (out / "rows.jsonl").read_text().splitlines()]


def test_a_run_records_drift_every_method_and_its_agreement(quick_study):
  _, rows = quick_study
  (r,) = rows
  s = reproduce.QUICK
  assert (r["point"], r["seed"], r["samples"], r["mini_batches"]) == ("q8", 0, 8, 1)
  expected = {"GRPO-LoRA@jump", f"GRPO-LoRA@{s.short}", f"GRPO-LoRA@{s.long}"}
  expected |= set(METHODS) | {m + "@jump" for m in METHODS}
  assert set(r["acc"]) == expected
  c = reproduce.make_config(0, s, True)
  n_eval = c.task.n_test * c.eval.samples  # responses per evaluation, each right or wrong
  accs = [r["backbone"], *r["acc"].values()]
  assert all(a * n_eval == pytest.approx(round(a * n_eval), abs=1e-9) for a in accs), accs
  assert min(accs) > 0  # first_char_reward: the random model scores, so these counts are not all 0
  assert set(r["agreement"]) == set(METHODS)
  assert {"increment_cos", "growth_exp", "r2_linear", "skill_vs_hold", "E1"} <= set(r["drift"])
  assert 0 < r["drift"]["E1"] <= 1  # the LoRA moved (E₁ of a zero delta is 0)
  # timings (seconds) lie inside the row's wall time: sec_per_step is the mean of two medians over the
  # jump COLLECT steps and the long − jump GRPO steps (each ≥ half its steps took as long), and NExt's
  # extrapolation comes after both
  n = min(s.jump, s.long - s.jump)
  assert 0 < n * r["sec_per_step"] + r["extrapolate_s"] <= 60 * r["minutes"]


def test_report_tables_and_columns(quick_study):
  out, _ = quick_study
  md = (out / "snr_study.md").read_text()
  for title in ("Drift of the observed trajectory", "Test accuracy at equal real steps", "The jump alone",
                "Predicted vs actual"):
    assert title in md
  with (out / "accuracy.csv").open() as f:
    head = next(csv.reader(f))
  assert head[:5] == ["point", "backbone", "GRPO @jump", "GRPO 12", "GRPO 16"]
  assert "NExt Δ vs GRPO 12" in head and "RELEX gap closed" in head


def test_the_plot_draws_each_methods_accuracy(quick_study):
  out, (r,) = quick_study
  s = reproduce.QUICK
  fig, dpi = FIGURES["snr_study.png"]
  assert_png_of(out / "snr_study.png", fig, dpi)
  per_point = fig.axes[2]  # one point: one bar per method, and the long GRPO run as a tick
  expected = {f"GRPO-LoRA {s.short}": 100 * r["acc"][f"GRPO-LoRA@{s.short}"]}
  expected |= {f"{m} {s.short}": 100 * r["acc"][m] for m in METHODS}
  assert {k: v[0] for k, v in bar_heights(per_point).items()} == pytest.approx(expected)
  np.testing.assert_allclose(lines(per_point)[f"GRPO {s.long}"][1], [100 * r["acc"][f"GRPO-LoRA@{s.long}"]])


def test_a_rerun_resumes_and_drift_only_stops_at_the_jump(quick_study, toy_model_dir, tmp_path):
  out, rows = quick_study
  snr_study.main(["--quick", "--points", "q8", "--seeds", "0", "--out", str(out), "--model-dir", str(toy_model_dir)])
  assert len((out / "rows.jsonl").read_text().splitlines()) == len(rows)
  snr_study.main(["--quick", "--drift-only", "--points", "q8", "--seeds", "0", "--out", str(tmp_path),
                  "--model-dir", str(toy_model_dir)])
  (r,) = [json.loads(x) for x in (tmp_path / "rows.jsonl").read_text().splitlines()]
  assert set(r["acc"]) == {"GRPO-LoRA@jump"} and "agreement" not in r
  assert r["drift"] == rows[0]["drift"]  # the same seed reaches the same jump-point trajectory
  assert r["acc"] == {"GRPO-LoRA@jump": rows[0]["acc"]["GRPO-LoRA@jump"]} and r["backbone"] == rows[0]["backbone"]


def test_unknown_point_is_refused():
  with pytest.raises(SystemExit, match="unknown"):
    snr_study.main(["--quick", "--points", "nope"])


def hand_row(point, seed, g250, g400, nxt, samples=512):
  acc = {"GRPO-LoRA@jump": 0.15, "GRPO-LoRA@250": g250, "GRPO-LoRA@400": g400}
  for m in METHODS:
    acc[m] = acc[m + "@jump"] = nxt if m == "NExt" else g250
  return {"table": "snr", "point": point, "seed": seed, "prompts": samples // 8, "group": 8, "mini_batches": 1,
          "lr": 1e-3, "samples": samples, "backbone": 0.10, "acc": acc, "sec_per_step": 0.2, "minutes": 1.0,
          "drift": {k: 0.5 for k in snr_report.DRIFT_KEYS},
          "agreement": {m: {"cos_global": 0.1, "relerr_global": 1.0} for m in METHODS}}


def test_report_paired_gain_and_gap_closed_by_hand(tmp_path):
  rows = [hand_row("a", 0, 0.20, 0.24, 0.23), hand_row("a", 1, 0.22, 0.26, 0.23)]
  md = snr_report.write(rows, tmp_path, command="cmd")
  # NExt − GRPO 250 per seed: +3, +1 → 2.0 ± 1.4; gap 400 − 250 = 4 points → 2 / 4 = 0.50 closed
  with (tmp_path / "accuracy.csv").open() as f:
    body = list(csv.DictReader(f))
  assert body[0]["NExt Δ vs GRPO 250"] == "2.0 ± 1.4" and body[0]["NExt gap closed"] == "0.50"
  assert body[0]["RL-Extra Δ vs GRPO 250"] == "0.0 ± 0.0" and body[0]["GRPO 400"] == "25.0 ± 1.4"
  assert "| a | 512 | 1 | 0.001 | 0.20 |" in md
