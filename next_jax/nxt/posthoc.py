"""Would extrapolation pay on this run? The analyses of a finished trajectory (one of ours, or one read by
`next_jax.nxt.runs` from verl / TRL checkpoints), each a function of its `Trajectory`:

    e1_series       E₁ = σ₁/Σσᵢ and σ₁²/Σσᵢ² of every global delta G_i = W_i − W₀, per matrix
    r2_analysis     the paper's linearity test: a line fitted on the first snapshots predicts the last h,
                    on ΔW element-wise (sign-free) and on the triplet's u, v, σ with and without sign
                    canonicalisation
    backtest        from every snapshot t that has a real future W_{t+k}, each method predicts
                    W_{t+k} − W_t from snapshots 0..t only; cosine, relative error and the best scale α*
                    (extrapolate.delta_agreement)
    verdict         one line per method from the back-test's medians
"""

from __future__ import annotations

import jax
import numpy as np

from next_jax.core.metrics import progress
from next_jax.nxt import drift, extrapolate, rank1
from next_jax.nxt.predictor import PredictorConfig
from next_jax.nxt.trajectory import Trajectory


def e1_series(traj: Trajectory):
  """({"E1"|"E1_sq": {module: [K−1, L]}} for G_1 … G_{K−1}, those G's triplets with sign "none")."""
  trip = traj.global_triplets("none")
  ratios = {m: rank1.energy_ratios(t.spectrum) for m, t in trip.items()}
  return {key: {m: np.asarray(r[i]) for m, r in ratios.items()} for i, key in enumerate(("E1", "E1_sq"))}, trip


def r2_horizon(num_snapshots: int) -> int:
  """h for the linearity test: the paper fits 10 of W₁..W₁₅ and predicts 5, i.e. h = (K−1)/3."""
  return max(1, round((num_snapshots - 1) / 3))


def r2_analysis(traj: Trajectory, horizon: int, triplets_none=None, sign: str = "max_abs_u") -> dict[str, np.ndarray]:
  """Per-matrix R² of the line fit (drift.line_r2 / drift.linear_fit_scores) → {row label: [N]}.

  Rows: "ΔW element-wise" (sign-free), "u"/"v" of G_t's top triplet with the SVD's own sign ("none", as
  the official code keeps it) and canonicalised (`sign`), and "σ". triplets_none: G_t's triplets with
  sign "none" if already computed (e1_series returns them)."""
  if triplets_none is None:
    triplets_none = traj.global_triplets("none")
  canon = {m: rank1.canonical_sign(t, sign) for m, t in triplets_none.items()}  # same SVDs, signs fixed
  x = traj.steps[1:]
  out = {"ΔW element-wise": np.concatenate([np.asarray(drift.linear_fit_scores(
      traj.gram(m), traj.steps, horizon)[0]) for m in traj.snapshots])}
  for field in ("u", "v"):
    for label, trip in ((f"{field} (sign none)", triplets_none), (f"{field} (sign {sign})", canon)):
      out[label] = np.concatenate([drift.line_r2(x, np.asarray(getattr(t, field)), horizon)
                                   for t in trip.values()])
  out["σ"] = np.concatenate([drift.line_r2(x, np.asarray(t.sigma)[..., None], horizon)
                             for t in triplets_none.values()])
  return out


# ------------------------------------------------------------------------------------------ back-test


def backtest_origins(num_snapshots: int, k: int, which: str = "all") -> list[int]:
  """Snapshot indices t with k+1 ≤ t (NExt needs one training pair) and t + k ≤ K−1 (a real future)."""
  ts = list(range(k + 1, num_snapshots - k))
  return {"all": ts, "last": ts[-1:], "none": []}[which]


def backtest(traj: Trajectory, k: int, origins: list[int], pcfg: PredictorConfig, key: jax.Array,
             sign: str = "max_abs_u", methods=tuple(extrapolate.METHODS)) -> list[dict]:
  """One row per (origin t, method): the method sees snapshots 0..t only and predicts W_{t+k} − W_t
  (NExt: its predicted target at α = 1; baselines: t_target = step_t + k·interval); scored against the
  real checkpoint overall and per module. Deterministic: NExt's key is fold_in(key, t)."""
  interval, steps = traj.interval, traj.steps
  rows = []
  bar = progress(len(origins) * len(methods), desc="back-test")
  for t in origins:
    sub, actual = traj.window(t), traj.deltas(t + k, t)
    for method in methods:
      ncfg = extrapolate.NExtConfig(method=method, extrapolate_at=t * interval, interval=interval, k=k,
                           total_steps=t * interval, sign=sign, predictor=pcfg)
      deltas, _ = extrapolate.method_deltas(ncfg, sub, jax.random.fold_in(key, t))
      agree = extrapolate.delta_agreement
      row = {"origin": int(steps[t]), "target": int(steps[t + k]), "method": method, **agree(deltas, actual)}
      row["modules"] = {m: agree({m: deltas[m]}, {m: actual[m]}) for m in deltas}
      rows.append(row)
      bar.update(1)
  bar.close()
  return rows


def summarise(rows: list[dict]) -> dict[str, dict[str, float]]:
  """{method: medians over origins of cos_global, relerr_global, alpha_star; per module too}."""
  out = {}
  for method in dict.fromkeys(r["method"] for r in rows):
    mine = [r for r in rows if r["method"] == method]
    med = lambda key, rs=mine: float(np.median([r[key] for r in rs]))  # noqa: E731
    out[method] = {"origins": len(mine), "cos": med("cos_global"), "relerr": med("relerr_global"),
                   "alpha_star": med("alpha_star"),
                   "modules": {m: {"cos": float(np.median([r["modules"][m]["cos_global"] for r in mine])),
                                   "relerr": float(np.median([r["modules"][m]["relerr_global"] for r in mine]))}
                               for m in mine[0]["modules"]}}
  return out


def verdict(s: dict[str, float]) -> str:
  """One line from a method's back-test medians. Not jumping has relative error exactly 1."""
  if s["relerr"] < 1.0:
    return (f"helps: its jump lands closer to the real future than not jumping (rel. err. {s['relerr']:.2f} "
            f"< 1, cos {s['cos']:.2f}; best scale α* ≈ {s['alpha_star']:.2f})")
  if s["cos"] > 0:
    return (f"points the right way (cos {s['cos']:.2f}) but misses by more than the future itself (rel. err. "
            f"{s['relerr']:.2f} ≥ 1); scaled by α* ≈ {s['alpha_star']:.2f} it would have helped")
  return f"no use here: its prediction points away from the real future (cos {s['cos']:.2f})"
