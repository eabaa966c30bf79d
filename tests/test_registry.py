"""Adding an extrapolation method is one function and one `extrapolate.register` line: the state machine,
the post-hoc back-test and the reports pick it up with no other change."""

import dataclasses

import jax
import numpy as np
import pytest
from tiny_rl import LCFG, fresh_state, make_setup

from experiments import report
from next_jax import driver, posthoc
from next_jax import extrapolate as ex
from next_jax import state_machine as sm
from next_jax.predictor import PredictorConfig
from next_jax.trajectory import Trajectory


def half_step(traj: Trajectory, t_target: float) -> dict:
  """A made-up fifth method: half of the last interval's increment, Δ = ½(W_t − W_{t−1})."""
  return {m: 0.5 * d for m, d in traj.deltas(traj.num - 1, traj.num - 2).items()}


@pytest.fixture
def fifth(monkeypatch):
  monkeypatch.setattr(ex, "METHODS", dict(ex.METHODS))  # the registration is undone after the test
  ex.register("half", "Half-step", lambda traj, n, key: (half_step(traj, ex.target_step(traj, n)), {}))
  return "half"


def test_a_registered_method_jumps_through_the_state_machine(model, fifth):
  params, lora = model
  setup = make_setup()
  ncfg = sm.NExtConfig(method=fifth, extrapolate_at=4, interval=2, k=1, total_steps=6)
  state = sm.init(setup, ncfg, params, fresh_state(lora))
  state = driver.advance(setup, ncfg, state, None)
  assert int(state.phase) == sm.EXTRAPOLATE and int(state.rl.step) == 4
  snaps = jax.tree.map(np.asarray, state.trajectory)
  jumped, info = driver.jump(setup, ncfg, driver.fork(state))
  assert info["method"] == fifth and info["alpha"] == 1.0  # registered without alpha: W + Δ
  w = lambda i: LCFG.scale * np.einsum("lri,lor->lio", snaps["q"]["a"][i], snaps["q"]["b"][i])  # noqa: E731
  moved = np.asarray(jumped.base_params["layers"]["q"]["kernel"]) - np.asarray(params["layers"]["q"]["kernel"])
  np.testing.assert_allclose(moved, 0.5 * (w(2) - w(1)), rtol=0, atol=1e-7)
  assert np.abs(moved).max() > 1e-4


def test_a_registered_method_is_back_tested_and_reported(fifth):
  rng = np.random.default_rng(0)
  snaps = {"q": {"a": rng.normal(size=(6, 1, 2, 5)).astype(np.float32),
                 "b": rng.normal(size=(6, 1, 4, 2)).astype(np.float32)}}
  traj = Trajectory(snaps, 10 * np.arange(6), 0.5)
  rows = posthoc.backtest(traj, 1, [2, 3], PredictorConfig(hidden=8, epochs=2), jax.random.key(0),
                          methods=tuple(ex.METHODS))
  mine = [r for r in rows if r["method"] == fifth]
  assert [r["origin"] for r in mine] == [20, 30]
  want = ex.delta_agreement(half_step(traj.window(3), 0.0), traj.deltas(4, 3))
  assert mine[1]["cos_global"] == pytest.approx(want["cos_global"], rel=1e-6)
  assert "Half-step" in report.main_order() and "Half-step" in report.method_labels()


def test_the_config_accepts_exactly_the_registered_names(fifth):
  assert sm.NExtConfig(method=fifth).method == fifth
  with pytest.raises(ValueError, match="choose from"):
    sm.NExtConfig(method="halve")
  assert dataclasses.replace(sm.NExtConfig(), method="none").method == "none"
