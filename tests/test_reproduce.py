"""experiments.reproduce --quick end to end on a tiny random model (the lora and cyclic families) with
conftest's first_char_reward (so the policy moves): every table gets its rows and columns, the branches share
the jump point, RL-Extra's agreement and E₁ recomputed by hand from a rerun, the plot draws the rows, a rerun
resumes instead of recomputing; and experiments.report's aggregation on hand-made rows (mean ± std, ICER,
paired Δ, α table)."""

from __future__ import annotations

import csv
import json

import jax
import numpy as np
import pytest
from figures import assert_png_of, errorbars, lines, recorded_figures

from experiments import report, reproduce
from next_jax.run import driver, experiment

FIGURES = {}  # file name → (Figure, dpi) of the quick run's plots


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, toy_model_dir, first_char_reward):
  out = tmp_path_factory.mktemp("repro")
  with recorded_figures() as figs:
    reproduce.main(["--quick", "--seeds", "0", "--families", "lora,cyclic", "--out", str(out),
                    "--model-dir", str(toy_model_dir)])
  FIGURES.update(figs)
  rows = [json.loads(x) for x in (out / "rows.jsonl").read_text().splitlines()]
  return out, rows


def test_every_requested_table_has_rows(quick_run):
  _, rows = quick_run
  tables = {r["table"] for r in rows}
  assert {"main", "curve", "ablation", "analysis", "cyclic", "overhead", "done"} <= tables
  methods = {r["method"] for r in rows if r["table"] == "main"}
  assert methods == {"GRPO-LoRA", "NExt", "RL-Extra", "AlphaRL", "RELEX"}
  c = reproduce.make_config(0, reproduce.QUICK, True)
  n_eval = c.task.n_test * c.eval.samples  # responses per evaluation, each right or wrong
  accs = [r[k] for r in rows for k in ("acc", "backbone") if k in r]
  assert all(a * n_eval == pytest.approx(round(a * n_eval), abs=1e-9) for a in accs), accs
  assert 0 < min(accs)  # first_char_reward: the random model scores, so these counts are not all 0


def test_branches_share_the_backbone_and_jump_point(quick_run):
  _, rows = quick_run
  with_backbone = [r for r in rows if "backbone" in r]  # the lora and the cyclic family: same model, test
  assert {r["family"] for r in with_backbone} == {"lora", "cyclic"}  # set and sampling seed
  assert len({r["backbone"] for r in with_backbone}) == 1
  sched = reproduce.QUICK
  jumped = {r["steps"] for r in rows if r["table"] == "main" and not r["method"].startswith("GRPO")}
  assert jumped == {sched.short}
  assert len([r for r in rows if r["table"] == "ablation"]) == 3


def test_analysis_rows_hold_drift_and_agreement_for_every_method(quick_run):
  _, rows = quick_run
  an = [r for r in rows if r["table"] == "analysis" and r["family"] == "lora"][0]
  assert set(an["agreement"]) == {"NExt", "RL-Extra", "AlphaRL", "RELEX"}
  assert {"increment_cos", "growth_exp", "r2_linear", "skill_vs_hold", "E1"} <= set(an["drift"])
  s = reproduce.QUICK
  assert an["E1_steps"] == list(range(s.interval, s.jump + 1, s.interval))
  assert an["drift"]["E1"] == pytest.approx(an["E1_by_step"][-1], abs=1e-6)  # both: E₁ of W_jump − W₀


def test_rl_extra_agreement_and_e1_by_hand_from_a_rerun_of_the_lora_family(quick_run, toy_model_dir):
  """The lora family's first 12 RL steps again (deterministic: same config, seed and reward), then by numpy:
  E₁ = σ₁/Σσ of each G_i = W_i − W₀, and RL-Extra's Δ = (β − 1)(W₈ − W₀), β = (8 + k·interval)/8, against
  the true future W₁₂ − W₈ (whole-model cosine, relative error and best scale α*)."""
  _, rows = quick_run
  an = next(r for r in rows if r["table"] == "analysis" and r["family"] == "lora")
  s = reproduce.QUICK
  exp = experiment.build(reproduce.make_config(0, s, True), str(toy_model_dir))
  at_jump = driver.advance(exp.setup, exp.ncfg, driver.fork(exp.state), s.jump)
  assert int(at_jump.rl.step) == s.jump
  traj = jax.tree.map(lambda x: np.asarray(x, np.float64), at_jump.trajectory)  # factors at 0, 2, …, 8
  later = driver.advance(exp.setup, exp.ncfg, driver.skip_jump(driver.fork(at_jump)), s.short)
  future = jax.tree.map(lambda x: np.asarray(x, np.float64), later.rl.train.params)  # factors at step 12
  scale = exp.setup.lora_cfg.scale
  w = lambda f: scale * np.einsum("lri,lor->lio", f["a"], f["b"])  # W − W_base, [L, in, out]
  snap = lambda m, i: {k: x[i] for k, x in traj[m].items()}
  e1 = []
  for i in range(1, len(an["E1_by_step"]) + 1):
    sv = [np.linalg.svd(g, compute_uv=False) for m in traj for g in w(snap(m, i)) - w(snap(m, 0))]
    e1.append(np.median([x[0] / x.sum() for x in sv]))
  np.testing.assert_allclose(an["E1_by_step"], e1, rtol=1e-4)
  beta = (s.jump + s.k * s.interval) / s.jump
  pred = {m: (beta - 1) * (w(snap(m, -1)) - w(snap(m, 0))) for m in traj}
  true = {m: w(future[m]) - w(snap(m, -1)) for m in traj}
  dot = sum((pred[m] * true[m]).sum() for m in traj)
  pp, tt = sum((pred[m] ** 2).sum() for m in traj), sum((true[m] ** 2).sum() for m in traj)
  dd = sum(((pred[m] - true[m]) ** 2).sum() for m in traj)
  got = an["agreement"]["RL-Extra"]
  assert got["cos_global"] == pytest.approx(dot / np.sqrt(pp * tt), rel=1e-4, abs=1e-6)
  assert got["relerr_global"] == pytest.approx(np.sqrt(dd / tt), rel=1e-4)
  assert got["alpha_star"] == pytest.approx(dot / pp, rel=1e-4, abs=1e-6)
  assert tt > 0 and abs(got["cos_global"]) > 0.1  # the policy moved: these are not 0 = 0


def test_tables_and_csv_columns(quick_run):
  out, _ = quick_run
  md = (out / "tables.md").read_text()
  for title in ("1. Main table", "2. Ablation", "5a. Drift", "5b. Predicted vs actual", "6. Cyclic", "7. Overhead"):
    assert title in md
  with (out / "main.csv").open() as f:
    head = next(csv.reader(f))
  assert head == ["method", "RL steps", "accuracy (%)", "ICER", "Δ vs GRPO-LoRA 250 (paired)", "seeds"]


def test_the_plot_draws_the_rows(quick_run):
  out, rows = quick_run
  fig, dpi = FIGURES["reproduction.png"]
  assert_png_of(out / "reproduction.png", fig, dpi)
  acc_ax, e1_ax, _ = fig.axes
  curve = sorted((r["steps"], 100 * r["acc"]) for r in rows if r["table"] == "curve")
  np.testing.assert_allclose(np.stack(errorbars(acc_ax)["GRPO-LoRA"], 1), curve)  # one seed: the mean is it
  cyclic = sorted((r["steps"], 100 * r["acc"]) for r in rows if r["table"] == "cyclic")
  np.testing.assert_allclose(np.stack(lines(acc_ax)["cyclic NExt"], 1), cyclic)
  an = next(r for r in rows if r["table"] == "analysis")
  np.testing.assert_allclose(np.stack(lines(e1_ax)["lora"], 1), np.stack([an["E1_steps"], an["E1_by_step"]], 1))


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
