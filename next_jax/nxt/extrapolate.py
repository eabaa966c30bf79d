"""Jumps along a weight trajectory: NExt's predict-extend and the baselines it must beat, in one registry.

Every method reads a `Trajectory` (next_jax.nxt.trajectory: K snapshots, index 0 = W₀, with their RL steps)
and returns, per module, a dense Δ [L, n, m] (our layout) to add to the *current* weights W_t (t = the last
snapshot); the jump is W_t + α·Δ for methods registered with `alpha=True` (NExt), W_t + Δ otherwise.

Horizon: NExt's target is k snapshots ahead; baselines extrapolate to t_target = t + horizon steps, by
default horizon = k·interval, the same distance NExt predicts (`target_step`).

Adding a method: write its function, then one `register(name, label, fn)` line at the bottom; the state
machine (`nxt.method=<name>`), the reproduction, post-hoc back-test and every report pick it up.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from next_jax.core import config
from next_jax.core.registry import Registry, resolve_knobs
from next_jax.nxt import predictor as pred_lib
from next_jax.nxt import rank1
from next_jax.nxt.predictor import PredictorConfig
from next_jax.nxt.rank1 import Triplet
from next_jax.nxt.trajectory import Trajectory

# ------------------------------------------------------------------------------------ the jump's settings


_NXT, _RUN = config.defaults("nxt"), config.defaults("")  # every default below is the schema's (config.base)


@dataclasses.dataclass(frozen=True)
class NExtConfig:
  """The jump schedule (paper: 150 steps, snapshot every 10, k = 5, α = 1.5, then 100 steps)."""

  method: str = _NXT.method  # a name in METHODS (next, rl_extra, alpharl, relex), or none (plain RL)
  extrapolate_at: int = _NXT.extrapolate_at  # COLLECT steps per cycle
  interval: int = _NXT.interval
  k: int = _NXT.k  # target T_i = W_{i+k} − W_i, in snapshots
  alpha: float | str = _NXT.alpha  # or "auto": best of alpha_grid on the validation set
  alpha_grid: tuple[float, ...] = _NXT.alpha_grid
  total_steps: int = _RUN.total_steps  # real RL steps of the whole run (config.total_steps)
  cycles: int = _NXT.cycles
  sign: str = _NXT.sign
  continue_mode: str = _NXT.continue_mode  # keep | merge
  faithful: bool = _NXT.faithful  # NExt also moves never-trained parameters by their predicted deltas (official code)
  horizon: int | None = _NXT.horizon or None  # baselines extrapolate this many steps ahead (None: k·interval)
  predictor: PredictorConfig = PredictorConfig()
  knobs: tuple[tuple[str, Any], ...] = ()  # the method's own knobs (config.nxt.knobs), sorted (name, value)

  def __post_init__(self):
    if self.method not in (*METHODS, "none"):
      raise ValueError(f"nxt.method={self.method!r}; choose from {(*METHODS, 'none')}")
    if self.extrapolate_at % self.interval:
      raise ValueError(f"nxt.extrapolate_at={self.extrapolate_at} is not a multiple of "
                       f"nxt.interval={self.interval}")
    if self.method == "next" and self.extrapolate_at // self.interval < self.k + 1:
      raise ValueError(f"nxt.k={self.k} needs ≥ k+1 snapshot intervals before the jump; extrapolate_at/"
                       f"interval = {self.extrapolate_at // self.interval}")
    if self.method != "none" and self.cycles * self.extrapolate_at > self.total_steps:
      raise ValueError(f"nxt.cycles·extrapolate_at = {self.cycles * self.extrapolate_at} > "
                       f"total_steps = {self.total_steps}")
    if self.method != "none":
      method_knobs(self)  # a knob the method does not declare is refused, naming it
    elif self.knobs:
      raise ValueError(f"nxt.knobs={dict(self.knobs)}: method 'none' has no knobs")
    if not self.alpha_grid or any(not a > 0 for a in self.alpha_grid):
      raise ValueError(f"nxt.alpha_grid={self.alpha_grid}: give one or more positive α values")
    if self.faithful and self.method != "next":
      raise ValueError(f"nxt.faithful=True applies to method 'next' only, not {self.method!r}")
    if self.continue_mode not in ("keep", "merge"):
      raise ValueError(f"nxt.continue_mode={self.continue_mode!r}; choose 'keep' or 'merge'")
    if self.alpha != "auto" and (isinstance(self.alpha, (str, bool)) or not self.alpha > 0):
      raise ValueError(f"nxt.alpha={self.alpha!r}; a positive number or 'auto'")

  @property
  def num_snapshots(self) -> int:
    return self.extrapolate_at // self.interval + 1


# ------------------------------------------------------------------------------------ triplet → Δ


def normalised(t: Triplet) -> Triplet:
  """û = u/‖u‖, v̂ = v/‖v‖ (a predicted triplet's vectors are not unit length; σ is kept as predicted)."""
  unit = lambda x: x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)  # noqa: E731
  return t.replace(u=unit(t.u), v=unit(t.v))


def triplet_delta(t: Triplet, normalise: bool = True) -> jax.Array:
  """σ·u·vᵀ in our layout: [..., n, m] = σ·v⊗u; u, v normalised to unit length first (predictions)."""
  if normalise:
    t = normalised(t)
  return t.sigma[..., None, None] * t.v[..., :, None] * t.u[..., None, :]


# --------------------------------------------------------------------------------------------- NExt


def next_triplets(traj: Trajectory, k: int, pcfg: pred_lib.PredictorConfig, key: jax.Array,
                  sign: str = "max_abs_u", devices: str = "pmap", faithful: bool = False):
  """NExt up to the prediction: rank-1 triplets of G_i, L_i, T_i → train one predictor per shape group →
  the target triplet predicted from the last (G, L), with no dense matrix formed (post-hoc use at full size).

  faithful: also feed the predictor the rows of every parameter the run never trains (traj.untrained), as
  the official code does, and return their predicted deltas.
  Returns ({module: Triplet [1, L]}, info with the loss curves, the triplets, "untrained_deltas" and
  "seconds" {triplets, predictor}: wall time of each stage, measured after blocking on its result)."""
  pairs = rank1.delta_pairs(traj.num, k)
  if not pairs["global"]:
    raise ValueError(f"trajectory of {traj.num} snapshots has no training pair for k={k} (needs ≥ k+2)")
  kinds = ("global", "local", "target", "last_global", "last_local")
  flat = [p for kind in kinds for p in pairs[kind]]
  t0 = time.perf_counter()
  allt = jax.block_until_ready(traj.triplets(flat, sign, devices))
  t1 = time.perf_counter()
  split, start = {}, 0
  for kind in kinds:
    n = len(pairs[kind])
    split[kind] = {m: jax.tree.map(lambda x, s=start, n=n: x[s:s + n], t) for m, t in allt.items()}
    start += n
  rows, layout = untrained_rows(traj.untrained if faithful else {})
  predicted, curves, extra = jax.block_until_ready(pred_lib.fit_and_predict(
      key, split["global"], split["local"], split["target"], split["last_global"], split["last_local"], pcfg,
      rows))
  seconds = {"triplets": t1 - t0, "predictor": time.perf_counter() - t1}
  spread = {"predicted": sigma_spread(predicted, 0), "target": sigma_spread(split["target"], -1)}
  return predicted, {"loss_curves": curves, "triplets": split, "predicted": predicted, "seconds": seconds,
                     "untrained_deltas": untrained_deltas(extra, layout), "sigma_spread": spread}


def next_predict(traj: Trajectory, k: int, pcfg: pred_lib.PredictorConfig, key: jax.Array,
                 sign: str = "max_abs_u", devices: str = "pmap", faithful: bool = False):
  """NExt: `next_triplets`, then ΔŴ = σ̂·û·v̂ᵀ (û, v̂ normalised).
  Returns ({module: ΔŴ [L, n, m]}, next_triplets' info)."""
  predicted, info = next_triplets(traj, k, pcfg, key, sign, devices, faithful)
  return {m: triplet_delta(t)[0] for m, t in predicted.items()}, info


def sigma_spread(triplets: dict[str, Triplet], index: int, rtol: float = 1e-6) -> dict[str, float]:
  """σ over every matrix (modules × layers) of snapshot `index` of {module: Triplet [S, L]}: min, median,
  max and at_median, the share with |σ − median| ≤ rtol·|median|. NExt's σ predictor (width 1, L1 loss)
  tends to output one constant, its training targets' median, so at_median = 1 flags a jump that moves
  every matrix by the same α·σ̂."""
  x = np.concatenate([np.asarray(t.sigma[index], np.float64).ravel() for t in triplets.values()])
  med = float(np.median(x))
  return {"min": float(x.min()), "median": med, "max": float(x.max()), "matrices": int(x.size),
          "at_median": float(np.mean(np.abs(x - med) <= rtol * abs(med)))}


def sigma_collapse_warning(spread: dict[str, dict[str, float]]) -> str | None:
  """One line when the predicted σ̂ is the same for every matrix (`sigma_spread`), else None."""
  p, t = spread["predicted"], spread["target"]
  if p["matrices"] < 2 or p["at_median"] < 1.0:
    return None
  return (f"NExt's σ predictor collapsed: every one of {p['matrices']} matrices is jumped by the same "
          f"σ̂ = {p['median']:.6g} (the last target's σ spans {t['min']:.3g} … {t['max']:.3g}); "
          "this is the official predictor's behaviour, see docs/posthoc.md")


# ------------------------------------------------------------------------- faithful: untrained params


def _torch_shape(name: str, shape: tuple[int, ...]) -> tuple[tuple[int, ...], bool]:
  """(per-matrix torch-layout shape, whether ours is its transpose): kernels and lm_head are [in, out]
  here and [out, in] in torch; embed is [V, D] in both; stacked layer leaves lose their leading L."""
  per = shape[1:] if name.startswith("layers/") else shape
  if len(per) == 2 and not name.startswith("embed"):
    return (per[1], per[0]), True
  return per, False


def untrained_rows(untrained: dict[str, tuple[int, ...]]):
  """The rows the official code feeds its predictor for never-trained parameters, whose deltas are exactly
  zero: a zero matrix's SVD is (σ = 0, u = e₀, v = e₀) (LAPACK returns identity singular vectors), and a
  1-D delta goes in raw (zeros), in the u group of its length (`predictor.group_key`).
  Returns ({group key: [R, dim]}, layout [(name, field, group key, offset, L)])."""
  groups: dict[str, list[jax.Array]] = {}
  layout = []

  def add(name, field, x, layers):
    key = pred_lib.group_key(field, x.shape[-1])
    layout.append((name, field, key, sum(a.shape[0] for a in groups.get(key, [])), layers))
    groups.setdefault(key, []).append(x)

  for name in sorted(untrained):
    shape = untrained[name]
    layers = shape[0] if name.startswith("layers/") else 1
    per, _ = _torch_shape(name, shape)
    if len(per) == 2:
      add(name, "sigma", jnp.zeros((layers, 1)), layers)
      add(name, "u", jnp.zeros((layers, per[0])).at[:, 0].set(1.0), layers)
      add(name, "v", jnp.zeros((layers, per[1])).at[:, 0].set(1.0), layers)
    else:
      add(name, "raw", jnp.zeros((layers, per[0])), layers)
  return {k: jnp.concatenate(xs) for k, xs in groups.items()}, layout


def untrained_deltas(preds: dict[str, jax.Array], layout) -> dict[str, jax.Array]:
  """Predicted rows → {path: Δ in that leaf's own shape}: σ̂·û·v̂ᵀ (û, v̂ normalised) or the raw row."""
  fields: dict[str, dict[str, jax.Array]] = {}
  for name, field, key, offset, layers in layout:
    fields.setdefault(name, {})[field] = preds[key][offset:offset + layers]
  out = {}
  for name, f in fields.items():
    if "raw" in f:
      d = f["raw"]
    else:
      d = triplet_delta(Triplet(sigma=f["sigma"][:, 0], u=f["u"], v=f["v"], spectrum=f["sigma"]))  # [L, n, m]
      if name.startswith("embed"):
        d = jnp.swapaxes(d, -1, -2)
    out[name] = d if name.startswith("layers/") else d[0]
  return out


# ---------------------------------------------------------------------------------------- baselines


def _steps(traj: Trajectory) -> jax.Array:
  return jnp.asarray(traj.steps, jnp.float32)


def rl_extra(traj: Trajectory, t_target: float) -> dict[str, jax.Array]:
  """RL-Extra (arXiv 2601.04537): W = W₀ + β(W_t − W₀), β = (t_target − t₀)/(t − t₀), element-wise.
  Δ = (β − 1)(W_t − W₀). (Norms are untrained here, so "copied" is automatic.)"""
  steps = _steps(traj)
  beta = (t_target - steps[0]) / (steps[-1] - steps[0])
  return {m: (beta - 1.0) * d for m, d in traj.deltas(traj.num - 1, 0).items()}


def _line_fit(x: jax.Array, y: jax.Array, x_new: float) -> jax.Array:
  """Least-squares line through (x_t, y_t) per trailing coordinate, evaluated at x_new. y: [T, ...]."""
  xc = x - x.mean()
  slope = jnp.tensordot(xc, y - y.mean(0), axes=(0, 0)) / jnp.maximum((xc * xc).sum(), 1e-30)
  return y.mean(0) + slope * (x_new - x.mean())


@jax.jit
def _align_signs(u: jax.Array, v: jax.Array, sigma: jax.Array):
  """Flip (u_t, v_t) when ⟨u_t, u_{t−1}⟩ < 0 (after the previous flips), along the leading axis."""
  def align(prev_u, cur):
    u, v, s = cur
    flip = jnp.where(jnp.sum(u * prev_u, -1, keepdims=True) < 0, -1.0, 1.0)
    return u * flip, (u * flip, v * flip, s)
  return jax.lax.scan(align, u[0], (u, v, sigma))[1]


def alpharl(traj: Trajectory, t_target: float, devices: str = "pmap") -> dict[str, jax.Array]:
  """AlphaRL (arXiv 2510.00553), linear-in-step stand-in for its PLS-on-accuracy fit.

  Per matrix: rank-1 of ΔW_t = W_t − W₀ at every snapshot, a_t = σ₁u₁ with signs aligned to the previous
  snapshot (flip (u, v) when ⟨u_t, u_{t−1}⟩ < 0); least-squares line a(t) per coordinate; the jump target is
  Ŵ = W₀ + â(t_target)·v_lastᵀ, so Δ = Ŵ − W_t."""
  steps = _steps(traj)
  trip = traj.triplets([(i, 0) for i in range(1, traj.num)], "none", devices)
  out = {}
  for m, t in trip.items():
    u, v, s = _align_signs(t.u, t.v, t.sigma)
    a_hat = _line_fit(steps[1:], s[..., None] * u, t_target)  # [L, m]
    target = triplet_delta(Triplet(sigma=jnp.ones(a_hat.shape[:-1]), u=a_hat, v=v[-1], spectrum=s[-1]),
                           normalise=False)
    out[m] = target - traj.delta(m, traj.num - 1, 0)
  return out


def relex(traj: Trajectory, t_target: float) -> dict[str, jax.Array]:
  """RELEX (arXiv 2605.21468): per matrix, M = [vec(ΔW_t)]_t (T×d); top right-singular direction
  v = Mᵀe/√λ from the T×T Gram matrix's top eigenpair (λ, e); c_t = M v = √λ·e; least-squares line
  c(t) = a·t + b; θ̂ = θ₀ + c(t_target)·v = θ₀ + (c(t_target)/√λ)·Σ_t e_t ΔW_t; Δ = θ̂ − θ_t."""
  steps, num = _steps(traj), traj.num
  out = {}
  for m, mod in traj.snapshots.items():
    gram = traj.gram(m)[:, 1:, 1:]  # [L, T, T], T = num − 1
    lam, vecs = jnp.linalg.eigh(gram)
    lam1, e = jnp.maximum(lam[:, -1], 1e-30), vecs[:, :, -1]  # [L], [L, T]
    e = e * jnp.where(e.sum(-1, keepdims=True) < 0, -1.0, 1.0)
    c = jnp.sqrt(lam1)[:, None] * e  # [L, T]
    c_hat = _line_fit(steps[1:], c.T, t_target)  # [L]
    w = (c_hat / jnp.sqrt(lam1))[:, None] * e  # weights of ΔW_t, [L, T]
    combo = sum(w[:, t - 1, None, None] * traj.delta(m, t, 0) for t in range(1, num))
    out[m] = combo - traj.delta(m, num - 1, 0)
  return out


# -------------------------------------------------------------------------------------- diagnostics


def delta_agreement(pred: dict[str, jax.Array], actual: dict[str, jax.Array]) -> dict[str, float]:
  """Cosine and relative error ‖Δ̂ − Δ‖/‖Δ‖ of predicted vs actual future deltas: per-matrix medians and
  the whole-model values (all trained matrices flattened together), and the whole-model best scale
  α* = ⟨Δ̂, Δ⟩/‖Δ̂‖² (the multiple of the prediction closest to the real future)."""
  cos, rel, dot, n_p, n_a, n_d = [], [], 0.0, 0.0, 0.0, 0.0
  for m in pred:
    p, a = pred[m].astype(jnp.float32), actual[m].astype(jnp.float32)
    pa, pp, aa = (p * a).sum((-1, -2)), (p * p).sum((-1, -2)), (a * a).sum((-1, -2))
    dd = ((p - a) ** 2).sum((-1, -2))
    cos.append(pa / jnp.maximum(jnp.sqrt(pp * aa), 1e-30))
    rel.append(jnp.sqrt(dd / jnp.maximum(aa, 1e-30)))
    dot, n_p, n_a, n_d = dot + pa.sum(), n_p + pp.sum(), n_a + aa.sum(), n_d + dd.sum()
  return {"cos_median": float(jnp.median(jnp.concatenate(cos))),
          "relerr_median": float(jnp.median(jnp.concatenate(rel))),
          "cos_global": float(dot / jnp.maximum(jnp.sqrt(n_p * n_a), 1e-30)),
          "relerr_global": float(jnp.sqrt(n_d / jnp.maximum(n_a, 1e-30))),
          "alpha_star": float(dot / jnp.maximum(n_p, 1e-30))}


# ---------------------------------------------------------------------------------------- registry


@dataclasses.dataclass(frozen=True)
class Method:
  """label: the name tables print; deltas(traj, ncfg, key) → ({module: Δ}, info), ncfg the run's
  NExtConfig (unpacked here, at the boundary); alpha: whether the jump is scaled by nxt.alpha; knobs: the
  method's own settings and their defaults (set from config.nxt.knobs; read with `method_knobs(ncfg)`)."""

  label: str
  deltas: Callable
  alpha: bool = False
  knobs: Mapping[str, Any] = dataclasses.field(default_factory=dict)


METHODS = Registry("extrapolation method")


def register(name: str, label: str, deltas: Callable, alpha: bool = False,
             knobs: Mapping[str, Any] | None = None) -> None:
  """Adding a method: its function and this one call (tests/test_registry.py adds one with a knob)."""
  METHODS.register(name, Method(label, deltas, alpha, dict(knobs or {})))


def method_knobs(ncfg) -> dict[str, Any]:
  """The knobs of ncfg.method: its declared defaults updated by ncfg.knobs (config.nxt.knobs)."""
  return resolve_knobs(METHODS.lookup(ncfg.method).knobs, dict(ncfg.knobs),
                       f"method {ncfg.method!r} (nxt.knobs)")


def label(name: str) -> str:
  return METHODS[name].label


def target_step(traj: Trajectory, ncfg) -> float:
  """t_target = step of the last snapshot + horizon (nxt.horizon, default k·interval)."""
  horizon = ncfg.horizon if ncfg.horizon is not None else ncfg.k * ncfg.interval
  return float(_steps(traj)[-1]) + horizon


def method_deltas(ncfg, traj: Trajectory, key: jax.Array):
  """Δ per module for the configured method (ncfg.method) → (deltas, info)."""
  return METHODS.lookup(ncfg.method).deltas(traj, ncfg, key)


register("next", "NExt", lambda traj, n, key: next_predict(traj, n.k, n.predictor, key, n.sign,
                                                           faithful=n.faithful), alpha=True)
register("rl_extra", "RL-Extra", lambda traj, n, key: (rl_extra(traj, target_step(traj, n)), {}))
register("alpharl", "AlphaRL", lambda traj, n, key: (alpharl(traj, target_step(traj, n)), {}))
register("relex", "RELEX", lambda traj, n, key: (relex(traj, target_step(traj, n)), {}))
