"""experiments.predictor_fit --quick end to end on the tiny random model (one seed, the paper's predictor
learning rate and 1e-3): every lr branches from the same jump-point state; a larger lr fits its training pairs
better; the report's table and CSV are written; a rerun resumes."""

from __future__ import annotations

import csv
import json

import pytest

from experiments import predictor_fit
from experiments import reproduce as rp


@pytest.fixture(scope="module")
def quick_fit(tmp_path_factory, toy_model_dir, first_char_reward):  # the reward makes the LoRA move
  out = tmp_path_factory.mktemp("pfit")
  predictor_fit.main(["--quick", "--seeds", "0", "--lrs", "2e-5,1e-3", "--out", str(out),
                      "--model-dir", str(toy_model_dir)])
  return out, [json.loads(x) for x in (out / "rows.jsonl").read_text().splitlines()]


def test_one_row_per_lr_from_one_jump_point(quick_fit):
  _, rows = quick_fit
  assert [r["lr"] for r in rows] == [2e-5, 1e-3]
  assert len({r["grpo"] for r in rows}) == 1 and len({r["backbone"] for r in rows}) == 1
  # the same trajectory: the same last training target, and the same initial loss of each shape group's
  # predictor (same key, same rows; the lr only acts from the first update on)
  assert rows[0]["sigma_target"] == rows[1]["sigma_target"] > 0  # > 0: the LoRA moved
  assert {d: first for d, (first, _) in rows[0]["loss"].items()} == \
      {d: first for d, (first, _) in rows[1]["loss"].items()}
  c = rp.make_config(0, rp.QUICK, True)
  n_eval = c.task.n_test * c.eval.samples  # responses per evaluation, each right or wrong
  accs = [a for r in rows for a in (r["acc"], r["grpo"], r["backbone"])]
  assert all(a * n_eval == pytest.approx(round(a * n_eval), abs=1e-9) for a in accs) and min(accs) > 0, accs


def test_a_larger_lr_fits_better(quick_fit):
  _, rows = quick_fit
  ratio = {r["lr"]: sum(last / first for first, last in r["loss"].values()) for r in rows}
  assert ratio[1e-3] < ratio[2e-5]


def test_report_and_resume(quick_fit, toy_model_dir):
  out, rows = quick_fit
  md = (out / "predictor_fit.md").read_text()
  assert "predictor lr" in md and md.count("\n| ") >= 1 + len(rows)
  with (out / "predictor_fit.csv").open() as f:
    table = list(csv.reader(f))
  assert table[0][0] == "predictor lr" and len(table) == 1 + len(rows)
  predictor_fit.main(["--quick", "--seeds", "0", "--lrs", "2e-5,1e-3", "--out", str(out),
                      "--model-dir", str(toy_model_dir)])
  assert len((out / "rows.jsonl").read_text().splitlines()) == len(rows)
