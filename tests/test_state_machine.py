"""The NExt state machine end to end on a tiny model, and resume from a checkpoint taken in each phase."""

import jax
import numpy as np
import pytest
from tiny_rl import LCFG, fresh_state, make_setup

from next_jax.core.checkpoint import Checkpointer
from next_jax.nxt import extrapolate as ex
from next_jax.nxt import predictor
from next_jax.run import driver
from next_jax.run import state_machine as sm

NCFG = ex.NExtConfig(method="next", extrapolate_at=8, interval=2, k=2, total_steps=12,
                     predictor=predictor.PredictorConfig(epochs=20, lr=1e-3))


def strip(rows):
  return [{k: v for k, v in r.items() if not k.startswith("time/") and k != "tokens_per_s"} for r in rows]


class Recorder:
  def __init__(self):
    self.rows = []

  def write(self, step, m):
    self.rows.append({"step": step, **m})


def run_from(setup, state, ckpt=None):
  rec, jumps = Recorder(), []
  state = driver.run(setup, NCFG, state, writer=rec, checkpointer=ckpt, checkpoint_every=3,
                     on_jump=lambda s, i: jumps.append(i))
  return state, strip(rec.rows), jumps


@pytest.fixture(scope="module")
def full_run(model, tmp_path_factory):
  params, lora = model
  setup = make_setup()
  ckpt = Checkpointer(tmp_path_factory.mktemp("nxt") / "ckpt", max_to_keep=None)
  state, rows, jumps = run_from(setup, sm.init(setup, NCFG, params, fresh_state(lora)), ckpt)
  return setup, state, rows, jumps, ckpt


def test_run_goes_collect_extrapolate_continue_done(full_run):
  _, state, rows, jumps, ckpt = full_run
  assert sm.PHASES[int(state.phase)] == "DONE" and int(state.rl.step) == NCFG.total_steps
  phases = [r["phase"] for r in rows if "phase" in r]
  assert phases[:7] == [sm.COLLECT] * 7 and phases[7] == sm.EXTRAPOLATE and phases[-1] == sm.DONE
  assert len(jumps) == 1 and jumps[0]["finite"] and jumps[0]["alpha"] == 1.5
  losses = next(iter(jumps[0]["predictor_loss"].values()))
  assert len(losses) == 20 and losses[-1] < losses[0]
  drift = {k: v for k, v in jumps[0].items() if k.startswith("drift/")}
  assert {"drift/increment_cos", "drift/growth_exp", "drift/r2_linear", "drift/skill_vs_hold",
          "drift/E1"} <= set(drift) and all(np.isfinite(v) for v in drift.values())
  # E₁ = σ₁/Σσ of the window's last global delta s·(B₄A₄ − B₀A₀), median over matrices, by numpy (the
  # trajectory is not touched after the last jump)
  e1 = []
  for mod in state.trajectory.values():
    a, b = np.asarray(mod["a"], np.float64), np.asarray(mod["b"], np.float64)
    for layer in range(a.shape[1]):
      sv = np.linalg.svd(LCFG.scale * (b[-1, layer] @ a[-1, layer] - b[0, layer] @ a[0, layer]), compute_uv=False)
      e1.append(sv[0] / sv.sum())
  assert drift["drift/E1"] == pytest.approx(np.median(e1), abs=1e-6)
  tags = {m["tag"] for m in (ckpt.restore(sm.init(full_run[0], NCFG, *_model_for(full_run)), s)[1]
                             for s in ckpt.all_steps())}
  assert {"EXTRAPOLATE", "jump", "DONE"} <= tags


def _model_for(full_run):
  _, state, *_ = full_run
  return state.base_params, fresh_state(state.rl.train.params)


def test_trajectory_holds_lora_factors_every_interval(model):
  params, lora = model
  setup = make_setup()
  state = sm.init(setup, NCFG, params, fresh_state(lora))
  assert int(state.count) == 1 and set(state.trajectory) == set(LCFG.targets)
  assert state.trajectory["q"]["a"].shape == (NCFG.num_snapshots, *lora["q"]["a"].shape)
  for _ in range(2):
    state, _ = sm.train_step(setup, NCFG, state)
  assert int(state.count) == 2
  np.testing.assert_array_equal(state.trajectory["q"]["b"][1], state.rl.train.params["q"]["b"])
  np.testing.assert_array_equal(state.trajectory["q"]["b"][0], np.zeros_like(lora["q"]["b"]))
  b = sm.trajectory_bytes(state)
  assert b["snapshot_bytes"] == sum(x.nbytes for x in jax.tree.leaves(lora))


@pytest.mark.parametrize("phase", ["COLLECT", "EXTRAPOLATE", "CONTINUE"])
def test_resume_from_a_checkpoint_in_each_phase_gives_identical_results(full_run, phase):
  setup, final, rows, _, ckpt = full_run
  template = sm.init(setup, NCFG, *_model_for(full_run))
  metas = {s: ckpt.restore(template, s)[1] for s in ckpt.all_steps()}
  idx = next(s for s, m in sorted(metas.items()) if m["phase"] == phase and m["tag"] != "jump") \
      if phase != "CONTINUE" else next(s for s, m in sorted(metas.items()) if m["tag"] == "jump")
  state, meta = ckpt.restore(template, idx)
  resumed, rows_b, _ = run_from(setup, state)
  done = [r for r in rows if r["step"] > meta["step"] or (phase == "EXTRAPOLATE" and "alpha" in r)]
  assert rows_b == done
  for a, b in zip(jax.tree.leaves(final), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_schedule_errors_name_the_field():
  with pytest.raises(ValueError, match="extrapolate_at"):
    ex.NExtConfig(extrapolate_at=15, interval=10)
  with pytest.raises(ValueError, match="nxt.k"):
    ex.NExtConfig(extrapolate_at=40, interval=10, k=5)
  with pytest.raises(ValueError, match="method"):
    ex.NExtConfig(method="magic")


@pytest.mark.parametrize("method", ["rl_extra", "relex", "alpharl"])
def test_baselines_jump_through_the_same_state_machine(model, method):
  import dataclasses
  params, lora = model
  setup = make_setup()
  ncfg = dataclasses.replace(NCFG, method=method, total_steps=9)
  state = sm.init(setup, ncfg, params, fresh_state(lora))
  jumps, at_jump = [], {}

  def on_step(s, _):  # the jump point: the method's Δ of this trajectory, and the trajectory
    if int(s.phase) == sm.EXTRAPOLATE:
      deltas, _ = ex.method_deltas(ncfg, sm.trajectory(setup, ncfg, s), sm.jump_key(s))
      at_jump.update(deltas=jax.tree.map(np.asarray, deltas), traj=jax.tree.map(np.asarray, s.trajectory))

  state = driver.run(setup, ncfg, state, on_step=on_step, on_jump=lambda s, i: jumps.append(i))
  assert jumps[0]["method"] == method and jumps[0]["finite"] and int(state.rl.step) == 9
  # "keep" mode: the base weights moved by exactly Δ (α = 1 for a baseline), in every module
  moved = {m: np.asarray(state.base_params["layers"][m]["kernel"]) - np.asarray(params["layers"][m]["kernel"])
           for m in LCFG.targets}
  for m in LCFG.targets:
    np.testing.assert_allclose(moved[m], at_jump["deltas"][m], rtol=0, atol=1e-6, err_msg=m)
  if method == "rl_extra":  # by hand: (β − 1)·(W₈ − W₀), β = (t + k·interval)/t = 12/8, W = s·(BA)ᵀ
    a, b = at_jump["traj"]["q"]["a"], at_jump["traj"]["q"]["b"]
    w = lambda i: LCFG.scale * np.einsum("lri,lor->lio", a[i], b[i])
    np.testing.assert_allclose(moved["q"], 0.5 * (w(-1) - w(0)), rtol=0, atol=1e-6)
  assert np.abs(moved["q"]).max() > 0.05  # the Δ is not (near) zero, so the checks above have teeth


def test_extrapolate_step_with_precomputed_deltas_equals_computing_them(model):
  """What `reproduce` relies on to sweep α: method_deltas at jump_key, passed in, gives the same jump."""
  import dataclasses
  params, lora = model
  setup = make_setup()
  ncfg = dataclasses.replace(NCFG, method="rl_extra", total_steps=9)
  state = sm.init(setup, ncfg, params, fresh_state(lora))
  while int(state.phase) != sm.EXTRAPOLATE:
    state, _ = sm.train_step(setup, ncfg, state)
  deltas, _ = ex.method_deltas(ncfg, sm.trajectory(setup, ncfg, state), sm.jump_key(state))
  a, _ = sm.extrapolate_step(setup, ncfg, state)
  b, _ = sm.extrapolate_step(setup, ncfg, state, deltas=deltas)
  for x, y in zip(jax.tree.leaves(a.base_params), jax.tree.leaves(b.base_params)):
    np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("cycles", [1, 2])
def test_a_jump_due_at_the_last_step_is_made_then_the_run_ends(model, cycles):
  """cycles·extrapolate_at == total_steps is accepted: the last jump must happen (it used to be skipped:
  train_step set EXTRAPOLATE, then DONE overwrote it)."""
  import dataclasses
  params, lora = model
  setup = make_setup()
  ncfg = dataclasses.replace(NCFG, method="rl_extra", extrapolate_at=4, k=1, total_steps=4 * cycles, cycles=cycles)
  jumps = []
  state = driver.run(setup, ncfg, sm.init(setup, ncfg, params, fresh_state(lora)), progress_bar=False,
                     on_jump=lambda s, i: jumps.append(int(s.rl.step)))
  assert jumps == [4 * (c + 1) for c in range(cycles)]
  assert sm.PHASES[int(state.phase)] == "DONE" and int(state.rl.step) == 4 * cycles and int(state.cycle) == cycles
