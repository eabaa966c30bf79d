"""Diagnostics plots: E₁ over a trajectory's snapshots, and the figure's panels."""

import numpy as np
import pytest

from next_jax.nxt import plots
from next_jax.nxt.trajectory import Trajectory

K, L, R, N_IN, N_OUT = 4, 2, 3, 6, 5


def lora_trajectory(rng, rank1_drift: bool):
  """{q: {a: [K, L, r, in], b: [K, L, out, r]}} with B₀ = 0 (PEFT init), so G_i = s·B_i·A_i."""
  a = np.broadcast_to(rng.normal(size=(1, L, R, N_IN)), (K, L, R, N_IN)).copy()
  if rank1_drift:  # B_i = i·(u ⊗ e₀): every G_i is rank 1
    u = rng.normal(size=(L, N_OUT, 1))
    b = np.stack([i * np.concatenate([u, np.zeros((L, N_OUT, R - 1))], -1) for i in range(K)])
  else:
    b = np.concatenate([np.zeros((1, L, N_OUT, R)), rng.normal(size=(K - 1, L, N_OUT, R))])
  return {"q": {"a": a.astype(np.float32), "b": b.astype(np.float32)}}


def traj_of(snapshots, scale, lora=True):
  num = next(iter(snapshots.values()))["a" if lora else "kernel"].shape[0]
  return Trajectory(snapshots, np.arange(num), scale, lora)


def test_e1_is_one_for_a_rank1_drift():
  e1 = plots.e1_over_snapshots(traj_of(lora_trajectory(np.random.default_rng(0), True), 2.0))
  assert sorted(e1) == ["q/0", "q/1"]
  for values in e1.values():
    assert values.shape == (K - 1,)
    np.testing.assert_allclose(values, 1.0, atol=1e-5)


def test_e1_matches_the_dense_singular_values_of_w_i_minus_w0():
  traj = lora_trajectory(np.random.default_rng(1), False)
  e1 = plots.e1_over_snapshots(traj_of(traj, 0.5))
  a, b = traj["q"]["a"], traj["q"]["b"]
  for i in range(1, K):
    for layer in range(L):
      delta = 0.5 * (b[i, layer] @ a[i, layer] - b[0, layer] @ a[0, layer])
      s = np.linalg.svd(delta, compute_uv=False)
      assert e1[f"q/{layer}"][i - 1] == pytest.approx(s[0] / s.sum(), rel=1e-4)


def test_e1_of_a_full_parameter_trajectory():
  rng = np.random.default_rng(2)
  kernel = rng.normal(size=(K, L, N_IN, N_OUT)).astype(np.float32)
  e1 = plots.e1_over_snapshots(traj_of({"down": {"kernel": kernel}}, 1.0, lora=False))
  s = np.linalg.svd(kernel[2, 1] - kernel[0, 1], compute_uv=False)
  assert e1["down/1"][1] == pytest.approx(s[0] / s.sum(), rel=1e-4)


def test_e1_needs_two_snapshots():
  traj = lora_trajectory(np.random.default_rng(0), True)
  with pytest.raises(ValueError, match="snapshot"):
    plots.e1_over_snapshots(traj_of({"q": {k: v[:1] for k, v in traj["q"].items()}}, 1.0))


def test_figure_has_one_panel_per_diagnostic_and_marks_the_jump():
  rows = [{"step": s, "reward_mean": 0.1 * s, "accuracy": 0.05 * s} for s in range(1, 13)]
  e1 = {"q/0": np.array([0.5, 0.6, 0.7]), "down/0": np.array([0.2, 0.3, 0.4])}
  fig = plots.diagnostics_figure(rows, [8], {0: 0.1, 8: 0.3, 12: 0.4}, [2, 4, 6], e1,
                                 {"32": [1.0, 0.5, 0.25], "1": [0.1, 0.05, 0.02]})
  train, e1_ax, loss_ax = fig.axes
  assert [ln.get_label() for ln in train.get_lines()] == ["batch reward_mean", "batch accuracy",
                                                          "test accuracy", "jump"]
  assert train.get_lines()[-1].get_xdata()[0] == 8
  assert len(e1_ax.get_lines()) == 2 and len(loss_ax.get_lines()) == 2
  assert loss_ax.get_yscale() == "log"


def test_figure_without_a_jump_has_only_the_training_panel():
  fig = plots.diagnostics_figure([{"step": 1, "reward_mean": 0.0, "accuracy": 0.0}])
  assert len(fig.axes) == 1
