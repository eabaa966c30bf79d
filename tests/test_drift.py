"""next_jax.nxt.drift: Γ-based drift measures equal their dense definitions, and read 1 / 0.5 / 0 where a straight
drift, a random walk and a reversal say they must."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from next_jax.nxt import drift
from next_jax.nxt.trajectory import Trajectory, delta_gram


def dense_traj(ws):
  """[K, m, n] numpy snapshots → a one-layer dense trajectory module (our kernel layout [K, L, n, m])."""
  return {"kernel": jnp.asarray(np.swapaxes(ws, -1, -2)[:, None], jnp.float32)}


def random_lora(seed, k=7, layers=2, r=3, m=6, n=5):
  rng = np.random.default_rng(seed)
  return {"a": jnp.asarray(rng.normal(size=(k, layers, r, n)), jnp.float32),
          "b": jnp.asarray(rng.normal(size=(k, layers, m, r)), jnp.float32)}


def test_lora_gram_equals_the_dense_gram_of_merged_snapshots():
  mod = random_lora(0)
  dense = {"kernel": 2.0 * jnp.einsum("klri,klor->klio", mod["a"], mod["b"])}
  np.testing.assert_allclose(delta_gram(mod, 2.0, lora=True), delta_gram(dense, 1.0, lora=False), rtol=1e-4, atol=1e-3)


def test_gram_by_hand():
  ws = np.random.default_rng(1).normal(size=(4, 3, 2))
  d = (ws - ws[0]).reshape(4, -1)
  np.testing.assert_allclose(delta_gram(dense_traj(ws), 1.0, lora=False)[0], d @ d.T, rtol=1e-5, atol=1e-5)


def test_a_straight_drift_scores_one_everywhere():
  direction = np.random.default_rng(2).normal(size=(5, 4))
  steps = np.arange(16) * 10
  ws = steps[:, None, None] * 0.01 * direction
  med, _ = drift.trajectory_drift(Trajectory({"w": dense_traj(ws)}, steps, lora=False), horizon=5)
  for key in ("increment_cos", "local_cos", "growth_exp", "r2_linear", "skill_vs_hold"):
    assert med[key] == pytest.approx(1.0, abs=1e-4), key


def test_a_random_walk_has_uncorrelated_increments_and_sqrt_growth():
  rng = np.random.default_rng(3)
  ws = np.cumsum(rng.normal(size=(65, 60, 50)), axis=0)  # 3000 coordinates, 64 steps
  med, _ = drift.trajectory_drift(Trajectory({"w": dense_traj(ws)}, np.arange(65), lora=False), horizon=5)
  assert abs(med["local_cos"]) < 0.05
  assert med["growth_exp"] == pytest.approx(0.5, abs=0.1)
  assert med["skill_vs_hold"] < 0.0  # a line through a random walk forecasts worse than holding still


def test_a_reversal_has_negative_increment_cosine():
  d = np.ones((2, 2))
  ws = np.array([0.0, 1, 2, 1, 0])[:, None, None] * d
  gram = delta_gram(dense_traj(ws), 1.0, lora=False)
  assert float(drift.increment_cos(gram, 4, 2, 0)[0]) == pytest.approx(-1.0, abs=1e-6)


def test_linear_fit_scores_by_hand():
  """Scalar trajectory: fit a line on snapshots 1..3 with numpy, score it on 4..5 against mean and hold."""
  steps = np.array([0, 10, 20, 30, 40, 50])
  y = np.array([0.0, 1.0, 3.0, 2.5, 5.0, 4.0])
  slope, icpt = np.polyfit(steps[1:4], y[1:4], 1)
  pred = slope * steps[4:] + icpt
  r2 = 1 - ((pred - y[4:]) ** 2).sum() / ((y[4:] - y[4:].mean()) ** 2).sum()
  skill = 1 - ((pred - y[4:]) ** 2).sum() / ((y[3] - y[4:]) ** 2).sum()
  gram = delta_gram(dense_traj(y[:, None, None]), 1.0, lora=False)
  got_r2, got_skill = drift.linear_fit_scores(gram, steps, 2)
  assert float(got_r2[0]) == pytest.approx(r2, rel=1e-4)
  assert float(got_skill[0]) == pytest.approx(skill, rel=1e-4)


def test_energy_ratios_reported_when_spectra_are_given():
  mod = random_lora(4)
  spectra = jnp.asarray([[3.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
  med, values = drift.trajectory_drift(Trajectory({"w": mod}, np.arange(7)), horizon=2, spectra=spectra)
  np.testing.assert_allclose(values["E1"], [0.75, 1 / 3], rtol=1e-6)
  assert med["E1_sq"] == pytest.approx(np.median([0.9, 1 / 3]), rel=1e-6)
