"""How drift-dominated a weight trajectory is: the measures that say whether extrapolating it can pay.

Everything is computed from the Gram matrix of the global deltas D_t = W_t − W₀ (t = 0..K−1, D₀ = 0),
per trained matrix: Γ[s, t] = ⟨D_s, D_t⟩_F. Any increment W_a − W_b = D_a − D_b, and any linear
combination of snapshots, has its norms and inner products in Γ, so LoRA trajectories never form a dense
matrix: D_t = s·[B_t, −B₀]·[A_t; A₀] and ⟨s·P₁Q₁, s·P₂Q₂⟩ = s²·Σ (P₁ᵀP₂) ∘ (Q₁Q₂ᵀ), O((m+n)r²).

Measures (per matrix; `trajectory_drift` reports medians over all matrices of all modules):
  increment_cos   cos(W_T − W_{T−h}, W_{T−h} − W_{T−2h}): successive h-snapshot increments at the end.
                  ≈ 1 for a straight drift, ≈ 0 for a random walk, < 0 when the walk turns back.
  local_cos       mean over t of cos(L_t, L_{t−1}), L_t = W_t − W_{t−1}: the same at one-interval lag.
  growth_exp      slope of log‖D_t‖ against log(step_t − step₀): 1 = drift, 0.5 = random walk.
  r2_linear       element-wise least-squares line through D_1..D_{K−1−h} (in step), evaluated at the last
                  h snapshots: R² = 1 − Σ‖D̂_t − D_t‖² / Σ‖D_t − D̄‖² (D̄: mean of those h targets), the
                  paper's analysis statistic (fit 10 snapshots, predict the next 5).
  skill_vs_hold   1 − SSE_linear / SSE_hold, SSE_hold = Σ‖D_{K−1−h} − D_t‖²: > 0 when the line beats
                  "hold the last value", the naive forecast any extrapolation must beat.
E₁ = σ₁/Σσᵢ and σ₁²/Σσᵢ² of D_{K−1} come from `rank1.energy_ratios` on the triplet spectra.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from next_jax.nxt import rank1

if TYPE_CHECKING:
  from next_jax.nxt.trajectory import Trajectory


def combo_sq_norm(gram: jax.Array, w: jax.Array) -> jax.Array:
  """‖Σ_t w_t D_t‖² = wᵀΓw per matrix. gram: [L, K, K], w: [K] or [L, K] → [L]."""
  w = jnp.broadcast_to(w, gram.shape[:-1])
  return jnp.einsum("ls,lst,lt->l", w, gram, w)


def _increment(num: int, a: int, b: int) -> jax.Array:
  """Weights over D_0..D_{K−1} of W_a − W_b = D_a − D_b."""
  return jnp.zeros(num).at[a].add(1.0).at[b].add(-1.0)


def increment_cos(gram: jax.Array, a: int, b: int, c: int) -> jax.Array:
  """cos(W_a − W_b, W_b − W_c) per matrix [L] (0 where either increment is zero)."""
  num = gram.shape[-1]
  x, y = _increment(num, a, b), _increment(num, b, c)
  xy = jnp.einsum("s,lst,t->l", x, gram, y)
  return xy / jnp.maximum(jnp.sqrt(combo_sq_norm(gram, x) * combo_sq_norm(gram, y)), 1e-30)


def growth_exponent(gram: jax.Array, steps: np.ndarray) -> jax.Array:
  """Least-squares slope of log‖D_t‖ on log(step_t − step₀), t = 1..K−1, per matrix [L]."""
  x = jnp.log(jnp.asarray(steps[1:] - steps[0], jnp.float32))
  y = 0.5 * jnp.log(jnp.maximum(jnp.diagonal(gram, axis1=1, axis2=2)[:, 1:], 1e-30))
  xc = x - x.mean()
  return ((y - y.mean(-1, keepdims=True)) * xc).sum(-1) / (xc * xc).sum()


def linear_fit_scores(gram: jax.Array, steps: np.ndarray, horizon: int) -> tuple[jax.Array, jax.Array]:
  """(R² of the element-wise line, skill vs hold-last) per matrix [L]; see the module docstring.

  The line through D_s (s ∈ fit = 1..K−1−h, x_s = step_s) evaluated at x is Σ_s w_s(x)·D_s with the hat
  weights w_s(x) = 1/n + (x_s − x̄)(x − x̄)/Σ(x_s − x̄)², so every residual is a combination of D's."""
  num = gram.shape[-1]
  fit = np.arange(1, num - horizon)
  targets = np.arange(num - horizon, num)
  if len(fit) < 2:
    raise ValueError(f"{num} snapshots leave {len(fit)} to fit a line before the last {horizon}")
  xs = np.asarray(steps, np.float64)
  xf = xs[fit]
  xc = xf - xf.mean()
  sse_lin, sse_hold, sst = 0.0, 0.0, 0.0
  mean_t = np.zeros(num)
  mean_t[targets] = 1.0 / horizon
  for t in targets:
    w = np.zeros(num)
    w[fit] = 1.0 / len(fit) + xc * (xs[t] - xf.mean()) / (xc * xc).sum()
    w[t] -= 1.0
    sse_lin = sse_lin + combo_sq_norm(gram, jnp.asarray(w, jnp.float32))
    sse_hold = sse_hold + combo_sq_norm(gram, _increment(num, fit[-1], t))
    sst = sst + combo_sq_norm(gram, jnp.asarray(mean_t, jnp.float32) - _increment(num, t, 0))
  return 1.0 - sse_lin / jnp.maximum(sst, 1e-30), 1.0 - sse_lin / jnp.maximum(sse_hold, 1e-30)


def matrix_drift(gram: jax.Array, steps: np.ndarray, horizon: int) -> dict[str, jax.Array]:
  """All Γ-based measures of one module from its Gram matrix [L, K, K], per layer: {name: [L]}."""
  last, h = gram.shape[-1] - 1, horizon
  local = [increment_cos(gram, t, t - 1, t - 2) for t in range(2, last + 1)]
  r2, skill = linear_fit_scores(gram, steps, h) if last - h >= 2 else (None, None)
  out = {"increment_cos": increment_cos(gram, last, last - h, last - 2 * h) if last >= 2 * h else None,
         "local_cos": jnp.mean(jnp.stack(local), 0) if local else None,
         "growth_exp": growth_exponent(gram, steps) if last >= 2 else None,
         "r2_linear": r2, "skill_vs_hold": skill}
  return {k: v for k, v in out.items() if v is not None}


def trajectory_drift(traj: Trajectory, horizon: int, spectra: jax.Array | None = None):
  """Medians over all trained matrices of the drift measures (and E₁ when `spectra` is given).

  horizon: h in snapshots (the paper's k = 5); spectra: [N, k] singular values of the last global delta
  of every matrix (e.g. `Trajectory.triplets` of (K−1, 0)). Returns ({measure: median}, {measure: values})."""
  per: dict[str, list[np.ndarray]] = {}
  for name in traj.snapshots:
    for measure, v in matrix_drift(traj.gram(name), np.asarray(traj.steps), horizon).items():
      per.setdefault(measure, []).append(np.asarray(v))
  if spectra is not None:
    e1, e1sq = rank1.energy_ratios(spectra)
    per["E1"], per["E1_sq"] = [np.asarray(e1)], [np.asarray(e1sq)]
  values = {k: np.concatenate(v) for k, v in per.items()}
  return {k: float(np.median(v)) for k, v in values.items()}, values


def line_r2(steps: np.ndarray, y: np.ndarray, horizon: int) -> np.ndarray:
  """R² of a least-squares line in step through the first T−h vectors y_t, evaluated at the last h:
  1 − Σ_targets ‖ŷ_t − y_t‖² / Σ_targets ‖y_t − ȳ‖² (ȳ: mean of the h targets), as `linear_fit_scores`
  but on any per-snapshot vectors (e.g. the u of each G_t's triplet, where the SVD's sign matters).
  steps: [T]; y: [T, N, d] → R² [N]."""
  x, y = np.asarray(steps, np.float64), np.asarray(y, np.float64)
  n_fit = len(x) - horizon
  if n_fit < 2:
    raise ValueError(f"{len(x)} snapshots leave {n_fit} to fit a line before the last {horizon}")
  xf, yf, yt = x[:n_fit], y[:n_fit], y[n_fit:]
  xc = xf - xf.mean()
  slope = np.tensordot(xc, yf - yf.mean(0), axes=(0, 0)) / (xc @ xc)
  pred = yf.mean(0) + slope * (x[n_fit:] - xf.mean())[:, None, None]
  sse = ((pred - yt) ** 2).sum((0, 2))
  sst = ((yt - yt.mean(0)) ** 2).sum((0, 2))
  return 1.0 - sse / np.maximum(sst, 1e-30)
