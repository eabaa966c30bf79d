"""experiments.real_compare and experiments.real_repro --quick end to end, with tiny random models in the
toy's and SmolLM2's places: every row, table and plot is written, a rerun resumes instead of recomputing,
and a killed comparison resumes from its checkpoints."""

from __future__ import annotations

import json

import numpy as np
import pytest
from figures import assert_png_of, bar_heights, errorbars, lines, recorded_figures

from experiments import real_compare, real_repro

METHODS = ("NExt", "RL-Extra", "AlphaRL", "RELEX")
FIGURES = {}  # file name → (Figure, dpi) of the comparison's plots


@pytest.fixture(scope="module")
def compare(tmp_path_factory, toy_model_dir, chat_model_dir):
  out = tmp_path_factory.mktemp("compare")
  argv = ["--quick", "--prompts", "2", "--group", "2", "--out", str(out),
          "--model-dirs", f"toy={toy_model_dir},smollm2={chat_model_dir}"]
  with recorded_figures() as figs:
    real_compare.main(argv)
  FIGURES.update(figs)
  return out, argv, [json.loads(x) for x in (out / "compare_rows.jsonl").read_text().splitlines()]


def test_compare_records_drift_and_every_methods_agreement_for_both_models(compare):
  out, _, rows = compare
  s = real_compare.QUICK
  assert [(r["model"], r["seed"], r["samples"]) for r in rows] == [("toy", 0, 4), ("smollm2", 0, 4)]
  for r in rows:
    assert set(r["acc"]) == {"0", str(s.jump), str(s.jump + s.k * s.interval)}
    assert {"increment_cos", "local_cos", "growth_exp", "skill_vs_hold", "E1"} <= set(r["drift"])
    assert set(r["agreement"]) == set(METHODS)  # their values: by hand in test_reproduce, on resume below
    # the quick config's entropy bonus moves the LoRA of a model that earns no reward: else every Δ,
    # agreement and E₁ is 0 and the checks on them hold whatever the code computes
    assert len(r["E1_by_step"]) == s.jump // s.interval and r["future_norm"] > 0 and min(r["E1_by_step"]) > 0
  md = (out / "compare.md").read_text()
  for m in ("toy", "smollm2"):
    assert f"| {m} | 1 | 4 |" in md  # the drift table: one seed, 4 samples per step
    assert all(f"| {m} | {name} |" in md for name in METHODS)  # the agreement table
    assert [f"| {m} | 0 | {t} |" in md for t in range(1, s.jump + 1)] == [False, True, True, True]  # ≥ 3 snapshots
  fig, dpi = FIGURES["compare.png"]  # the plot: E₁ along each run, and each method's cosine per model
  assert_png_of(out / "compare.png", fig, dpi)
  e1_ax, cos_ax = fig.axes
  drawn = lines(e1_ax)
  for r in rows:
    np.testing.assert_allclose(np.stack(drawn[f"{r['model']} s0"], 1), np.stack([r["E1_steps"], r["E1_by_step"]], 1))
  assert bar_heights(cos_ax) == {r["model"]: pytest.approx([r["agreement"][m]["cos_global"] for m in METHODS])
                                 for r in rows}
  assert not (out / "ckpt" / "toy_s0").exists()  # a finished run's checkpoints are removed


def test_compare_rerun_resumes_instead_of_recomputing(compare):
  out, argv, rows = compare
  real_compare.main(argv)
  assert len((out / "compare_rows.jsonl").read_text().splitlines()) == len(rows)


def test_compare_resumes_a_run_from_its_checkpoint(tmp_path, toy_model_dir, compare):
  """A run whose COLLECT checkpoint exists continues from it and ends with the same trajectory measures."""
  _, _, rows = compare
  s = real_compare.QUICK
  from next_jax.core.checkpoint import Checkpointer
  from next_jax.run import driver, experiment
  c = real_compare.make_config("toy", 0, s, True, 2, 2)
  exp = experiment.build(c, str(toy_model_dir))
  ck = Checkpointer(tmp_path / "ckpt" / "toy_s0" / "collect", max_to_keep=1)
  real_compare.resumable(exp, driver.fork(exp.state), 2, ck, "collect", s.interval)  # killed after step 2
  ck.close()
  r = real_compare.run_model("toy", 0, s, True, 2, 2, tmp_path, str(toy_model_dir))
  assert r["drift"] == pytest.approx(rows[0]["drift"], rel=1e-5)
  assert r["agreement"]["RL-Extra"] == pytest.approx(rows[0]["agreement"]["RL-Extra"], rel=1e-5)


def test_real_repro_quick_writes_the_paper_comparison(tmp_path, chat_model_dir):
  with recorded_figures() as figs:
    real_repro.main(["--quick", "--out", str(tmp_path), "--model-dir", str(chat_model_dir)])
  rows = [json.loads(x) for x in (tmp_path / "rows.jsonl").read_text().splitlines()]
  main = {(r["method"], r["steps"]) for r in rows if r["table"] == "main"}
  s = real_repro.rp.QUICK
  assert main == {("GRPO-LoRA", s.short), ("GRPO-LoRA", s.long), ("NExt", s.short), ("RL-Extra", s.short)}
  (done,) = [r for r in rows if r["table"] == "done"]
  assert done["backend"] == "cpu"
  md = (tmp_path / "tables.md").read_text()
  assert md.startswith("# The paper's comparison on SmolLM2-135M-Instruct") and "## 1. Main table" in md
  fig, dpi = figs["reproduction.png"]  # the jumps' accuracies, each at its step
  assert_png_of(tmp_path / "reproduction.png", fig, dpi)
  drawn = errorbars(fig.axes[0])
  for method in ("NExt", "RL-Extra"):
    (r,) = [r for r in rows if r["table"] == "main" and r["method"] == method]
    np.testing.assert_allclose(np.concatenate(drawn[method]), [r["steps"], 100 * r["acc"]])
