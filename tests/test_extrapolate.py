"""next_jax.nxt.extrapolate: the baselines on hand-computed trajectories (dense and LoRA give the same jump),
`delta_agreement` by hand, the Δ orientation, and NExt's premise: on a nonlinear (rotating) rank-1 trajectory
the trained predictor beats every linear extrapolation of the same snapshots."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from next_jax.models import policy
from next_jax.nxt import extrapolate as ex
from next_jax.nxt import predictor as pred_lib
from next_jax.nxt import rank1
from next_jax.nxt.trajectory import Trajectory

# A predictor config that trains in well under a second; test_predictor.py uses the same config and the same
# row shapes ([5, 4, 1] and [5, 8, 16]), so the ~10 s compile of `train_predictor` happens once per session.
FAST = pred_lib.PredictorConfig(hidden=64, epochs=400, lr=1e-3)


def dense_of(lora_traj, scale):
  """The equivalent full-parameter trajectory: kernels s·(B·A)ᵀ per snapshot, our [in, out] layout."""
  return {m: {"kernel": scale * jnp.einsum("klri,klor->klio", mod["a"], mod["b"])}
          for m, mod in lora_traj.items()}


def random_lora_traj(seed, k=6, layers=2, r=2, m=5, n=4):
  """Random LoRA snapshots; snapshot 0 is *not* zero (a window that starts mid-run), which a method that
  confuses W_t − W₀ with the LoRA delta s·B_t·A_t gets wrong."""
  rng = np.random.default_rng(seed)
  return {"w": {"a": jnp.asarray(rng.normal(size=(k, layers, r, n)), jnp.float32),
                "b": jnp.asarray(rng.normal(size=(k, layers, m, r)), jnp.float32)}}


def T(snapshots, scale=1.0, steps=None) -> Trajectory:
  """A Trajectory of hand-made snapshots (LoRA when the modules hold "a"; steps default to 0, 1, …)."""
  mod = next(iter(snapshots.values()))
  lora = "a" in mod
  num = mod["a" if lora else "kernel"].shape[0]
  return Trajectory(snapshots, np.asarray(steps if steps is not None else np.arange(num)), scale, lora)


def assert_close(x, y, rtol=1e-5):
  x, y = np.asarray(x), np.asarray(y)
  np.testing.assert_allclose(x, y, atol=rtol * np.abs(y).max())


# ---------------------------------------------------------------------------------- orientation


def test_triplet_delta_of_rank1_lora_is_the_dense_lora_delta_in_our_layout():
  rng = np.random.default_rng(0)
  a = jnp.asarray(rng.normal(size=(3, 1, 7)), jnp.float32)  # [L, r=1, in]
  b = jnp.asarray(rng.normal(size=(3, 5, 1)), jnp.float32)  # [L, out, r=1]
  t = rank1.batched_factored_triplets(b, a, 2.0, devices="vmap")
  d = ex.triplet_delta(t, normalise=False)
  assert d.shape == (3, 7, 5)  # [L, in, out]
  assert_close(d, policy.lora_delta({"a": a, "b": b}, 2.0))


def test_triplet_delta_normalises_u_and_v_of_predictions():
  t = rank1.Triplet(sigma=jnp.asarray([2.0]), u=jnp.asarray([[3.0, 4.0]]), v=jnp.asarray([[0.0, 0.0, 10.0]]),
                    spectrum=jnp.asarray([[2.0]]))
  np.testing.assert_allclose(np.asarray(ex.triplet_delta(t)[0]), [[0, 0], [0, 0], [1.2, 1.6]], rtol=1e-6)


def test_pair_triplets_of_lora_and_dense_trajectories_are_equal():
  traj = random_lora_traj(1)
  pairs = [(3, 0), (4, 3), (5, 1), (2, 1), (5, 4)]
  tl = T(traj, 2.0).triplets(pairs, "max_abs_u", "vmap")["w"]
  td = T(dense_of(traj, 2.0), 2.0).triplets(pairs, "max_abs_u", "vmap")["w"]
  assert tl.u.shape == (5, 2, 5) and tl.v.shape == (5, 2, 4) and tl.sigma.shape == (5, 2)
  for x, y in ((tl.sigma, td.sigma), (tl.u, td.u), (tl.v, td.v)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5)


def test_pair_triplets_in_chunks_equal_one_batch():
  traj = random_lora_traj(1)
  pairs = [(3, 0), (4, 3), (5, 1), (2, 1), (5, 4)]
  whole = T(traj, 2.0).triplets(pairs, "max_abs_u", "vmap")["w"]
  chunked = T(traj, 2.0).triplets(pairs, "max_abs_u", "vmap", max_batch=4)["w"]  # 2 pairs × 2 layers
  for x, y in zip(jax.tree.leaves(chunked), jax.tree.leaves(whole)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6)


def test_snapshot_delta_is_the_difference_of_merged_kernels():
  traj = random_lora_traj(2)
  dense = dense_of(traj, 0.5)["w"]["kernel"]
  assert_close(T({"w": traj["w"]}, 0.5).delta("w", 4, 1), dense[4] - dense[1])


# --------------------------------------------------------------------------------------- RL-Extra


def _hand_dense():
  w0 = [[1.0, 0.0], [0.0, 1.0]]
  w1 = [[2.0, 0.0], [0.0, 1.0]]
  w2 = [[3.0, 1.0], [0.0, 1.0]]
  return {"w": {"kernel": jnp.asarray([[w0], [w1], [w2]])}}  # [K=3, L=1, 2, 2]


def test_rl_extra_by_hand_from_step_zero():
  d = ex.rl_extra(T(_hand_dense(), 1.0, jnp.asarray([0.0, 10.0, 20.0])), 30.0)["w"]
  # β = 30/20 = 1.5, Δ = 0.5·(W₂ − W₀) = 0.5·[[2, 1], [0, 0]]
  np.testing.assert_allclose(np.asarray(d), [[[1.0, 0.5], [0.0, 0.0]]], rtol=1e-6)


def test_rl_extra_by_hand_from_a_later_start_step():
  d = ex.rl_extra(T(_hand_dense(), 1.0, jnp.asarray([10.0, 20.0, 30.0])), 50.0)["w"]
  # β = (50 − 10)/(30 − 10) = 2, Δ = W₂ − W₀
  np.testing.assert_allclose(np.asarray(d), [[[2.0, 1.0], [0.0, 0.0]]], rtol=1e-6)


def test_rl_extra_of_lora_and_dense_trajectories_are_equal():
  traj, steps = random_lora_traj(3), STEPS
  d = ex.rl_extra(T(traj, 2.0, steps), 80.0)["w"]
  dd = ex.rl_extra(T(dense_of(traj, 2.0), 2.0, steps), 80.0)["w"]
  assert_close(d, dd)
  k = dense_of(traj, 2.0)["w"]["kernel"]
  assert_close(d, (80.0 / 50.0 - 1.0) * (k[5] - k[0]))


# ------------------------------------------------------------------------------------------ RELEX

# The hand trajectories share random_lora_traj's shapes (6 snapshots, 2 layers, r = 2, 5×4), so the eager ops
# compile once. c_t = 0.5 + 0.1·t for t ≥ 10 (c₀ = 0: W₀ itself); t_target = 70 → c = 7.5, so the exact jump
# from W₅₀ is (7.5 − 5.5)·D = 2·D.
STEPS = jnp.arange(6.0) * 10
COEF = np.asarray([0.0, 1.5, 2.5, 3.5, 4.5, 5.5])
TARGET = 70.0


def _line_lora(seed, scale=2.0):
  """LoRA snapshots with W_t − W₀ = c_t·D exactly: B_t = [B₀, c_t·B_d], A_t = [A₀; A_d] (r = 2), so that
  s·B_t·A_t = s·B₀A₀ + c_t·s·B_dA_d with a non-zero W₀ part; returns (traj, D in our layout [L, n, m])."""
  rng = np.random.default_rng(seed)
  layers, m, n = 2, 5, 4
  b0, bd = rng.normal(size=(layers, m, 1)), rng.normal(size=(layers, m, 1))
  a0, ad = rng.normal(size=(layers, 1, n)), rng.normal(size=(layers, 1, n))
  b = np.stack([np.concatenate([b0, c * bd], -1) for c in COEF])
  a = np.broadcast_to(np.concatenate([a0, ad], -2), (len(COEF), layers, 2, n))
  d = scale * np.einsum("lri,lor->lio", ad, bd)
  return {"w": {"a": jnp.asarray(a, jnp.float32), "b": jnp.asarray(b, jnp.float32)}}, d


def test_relex_on_a_linear_single_direction_trajectory_is_exact():
  rng = np.random.default_rng(4)
  w0, d = rng.normal(size=(2, 4, 5)), rng.normal(size=(2, 4, 5))  # [L, n, m]
  traj = {"w": {"kernel": jnp.asarray(np.stack([w0 + c * d for c in COEF]), jnp.float32)}}
  assert_close(ex.relex(T(traj, 1.0, STEPS), TARGET)["w"], 2.0 * d)


def test_relex_on_a_linear_lora_trajectory_with_nonzero_start_is_exact():
  traj, d = _line_lora(5)
  assert_close(ex.relex(T(traj, 2.0, STEPS), TARGET)["w"], 2.0 * d)


def test_relex_of_lora_and_dense_trajectories_are_equal():
  traj, steps = random_lora_traj(6), STEPS
  assert_close(ex.relex(T(traj, 2.0, steps), 80.0)["w"], ex.relex(T(dense_of(traj, 2.0), 2.0, steps), 80.0)["w"])


# ---------------------------------------------------------------------------------------- AlphaRL


def _rank1_line_lora(seed, scale=2.0):
  """W_t = W₀ + σ_t·u·vᵀ with σ_t = COEF (linear in t for t ≥ 10): B_t = [b₀, σ_t·u], A_t = [a₀; v].
  Returns (traj, u vᵀ in our layout [L, n, m])."""
  rng = np.random.default_rng(seed)
  layers, m, n = 2, 5, 4
  b0, u = rng.normal(size=(layers, m, 1)), rng.normal(size=(layers, m, 1))
  a0, v = rng.normal(size=(layers, 1, n)), rng.normal(size=(layers, 1, n))
  b = np.stack([np.concatenate([b0, c * u], -1) for c in COEF])
  a = np.broadcast_to(np.concatenate([a0, v], -2), (len(COEF), layers, 2, n))
  uv = scale * np.einsum("lri,lor->lio", v, u)
  return {"w": {"a": jnp.asarray(a, jnp.float32), "b": jnp.asarray(np.ascontiguousarray(b), jnp.float32)}}, uv


def test_alpharl_on_a_linear_rank1_trajectory_is_exact():
  traj, uv = _rank1_line_lora(7)
  assert_close(ex.alpharl(T(traj, 2.0, STEPS), TARGET, devices="vmap")["w"], 2.0 * uv, rtol=1e-4)


def test_alpharl_on_the_dense_rank1_trajectory_is_exact():
  traj, uv = _rank1_line_lora(7)
  assert_close(ex.alpharl(T(dense_of(traj, 2.0), 2.0, STEPS), TARGET, devices="vmap")["w"], 2.0 * uv, rtol=1e-4)


def test_alpharl_ignores_flipping_b_and_a_of_a_middle_snapshot():
  traj, _ = _rank1_line_lora(8)
  a, b = np.array(traj["w"]["a"]), np.array(traj["w"]["b"])
  a[2], b[2] = -a[2], -b[2]  # the same ΔW₂
  flipped = {"w": {"a": jnp.asarray(a), "b": jnp.asarray(b)}}
  assert_close(ex.alpharl(T(flipped, 2.0, STEPS), TARGET, devices="vmap")["w"],
               ex.alpharl(T(traj, 2.0, STEPS), TARGET, devices="vmap")["w"])


def test_alpharl_aligns_a_sign_flipped_middle_triplet(monkeypatch):
  """SVD signs are arbitrary: flip (u, v) of snapshot 2's triplet; AlphaRL's neighbour alignment undoes it."""
  traj, uv = _rank1_line_lora(9)
  real = Trajectory.triplets
  seen = {}

  def flipping(self, *args, **kwargs):
    out = real(self, *args, **kwargs)
    sign = jnp.asarray([1.0, -1.0, 1.0, 1.0, 1.0])[:, None, None]  # pairs (1,0) (2,0) … (5,0)
    out = {m: t.replace(u=t.u * sign, v=t.v * sign) for m, t in out.items()}
    seen["u"] = out["w"].u
    return out

  monkeypatch.setattr(Trajectory, "triplets", flipping)
  d = ex.alpharl(T(traj, 2.0, STEPS), TARGET, devices="vmap")["w"]
  u = np.asarray(seen["u"])
  assert np.all(np.sum(u[1] * u[0], -1) < 0) and np.all(np.sum(u[2] * u[1], -1) < 0)  # really misaligned
  assert_close(d, 2.0 * uv, rtol=1e-4)


def test_alpharl_of_lora_and_dense_trajectories_are_equal():
  traj, steps = random_lora_traj(10), STEPS
  assert_close(ex.alpharl(T(traj, 2.0, steps), 80.0, devices="vmap")["w"],
               ex.alpharl(T(dense_of(traj, 2.0), 2.0, steps), 80.0, devices="vmap")["w"], rtol=1e-4)


# ------------------------------------------------------------------------------------ agreement


def test_delta_agreement_of_identical_deltas():
  d = {"w": jnp.asarray(np.random.default_rng(11).normal(size=(3, 4, 5)), jnp.float32)}
  r = ex.delta_agreement(d, d)
  assert r["cos_median"] == pytest.approx(1.0, abs=1e-6) and r["cos_global"] == pytest.approx(1.0, abs=1e-6)
  assert r["relerr_median"] == 0.0 and r["relerr_global"] == 0.0


def test_delta_agreement_of_negated_deltas():
  d = {"w": jnp.asarray(np.random.default_rng(12).normal(size=(3, 4, 5)), jnp.float32)}
  r = ex.delta_agreement({"w": -d["w"]}, d)
  assert r["cos_median"] == pytest.approx(-1.0, abs=1e-6) and r["cos_global"] == pytest.approx(-1.0, abs=1e-6)
  assert r["relerr_median"] == pytest.approx(2.0, abs=1e-6)
  assert r["relerr_global"] == pytest.approx(2.0, abs=1e-6)


def test_delta_agreement_by_hand():
  pred = {"a": jnp.asarray([[[1.0, 0.0], [0.0, 0.0]]]), "b": jnp.asarray([[[0.0, 0.0], [0.0, 3.0]]])}
  actual = {"a": jnp.asarray([[[1.0, 1.0], [0.0, 0.0]]]), "b": jnp.asarray([[[0.0, 0.0], [0.0, 1.0]]])}
  r = ex.delta_agreement(pred, actual)
  # per matrix: cos (1/√2, 1), relerr (1/√2, 2); whole model: cos 4/√(10·3), relerr √(5/3)
  assert r["cos_median"] == pytest.approx((1 / math.sqrt(2) + 1) / 2, rel=1e-6)
  assert r["relerr_median"] == pytest.approx((1 / math.sqrt(2) + 2) / 2, rel=1e-6)
  assert r["cos_global"] == pytest.approx(4 / math.sqrt(30), rel=1e-6)
  assert r["relerr_global"] == pytest.approx(math.sqrt(5 / 3), rel=1e-6)
  assert r["alpha_star"] == pytest.approx(4 / 10, rel=1e-6)  # ⟨Δ̂, Δ⟩ = 1 + 3, ‖Δ̂‖² = 1 + 9


# ---------------------------------------------------------------------------------- NExt premise


def test_next_predict_rejects_a_trajectory_without_training_pairs():
  with pytest.raises(ValueError, match="no training pair"):
    ex.next_predict(T(random_lora_traj(13, k=6), 2.0), 5, FAST, jax.random.key(0), devices="vmap")


# Rotation trajectory. Every layer's snapshot i is W_i = u(θ_i)·vᵀ with u(θ) = cos θ·f₁ + sin θ·f₂ on one
# plane (shared by the layers, so the u rows of all layers are samples of one function), v a fixed random unit
# vector per layer, θ_i = ω·i + φ_layer: a circle, as nonlinear as a path gets. A chord is
# W_a − W_b = 2 sin((a−b)ω/2)·u(θ̄ + π/2)·vᵀ (θ̄ the midpoint angle), so σ(T_i) is constant and T_i's u is
# L_i's u rotated in the plane by (k+1)ω/2 (midpoints (i + k/2)ω and (i − 1/2)ω): a fixed linear map the
# predictor can learn. The phases φ spread the layers so that the jump point's (G, L) lies inside the range
# the other layers trained on (with φ = 0 for all layers NExt only reaches cos ≈ 0.80).
# Sign canonicalisation: f₁ = 0.9·e₀ + √0.19·h₁, f₂ = h₂ with h₁ ⊥ h₂ spread evenly (±1/√14) over
# coordinates 2..15. Every canonicalised chord direction (pairs up to snapshot 10) has angle
# ψ ∈ [−4.5ω − 0.3, 4.5ω + 0.3] = ±0.75 rad from f₁, so u₀ = 0.9·cos ψ ≥ 0.66 > 1/√14 ≥ |u_c| (c ≥ 1):
# "max_abs_u" always reads coordinate 0 and never flips a sign along the path (asserted below).
ROT_K, ROT_LAYERS, ROT_DIM, ROT_SCALE, ROT_OMEGA, ROT_HORIZON = 16, 4, 16, 2.0, 0.1, 5
ROT_PHASES = np.linspace(-0.3, 0.3, ROT_LAYERS)
# Measured cos_global: NExt 0.946–0.973 over seeds 0–5; RL-Extra 0.732 (= cos 7.5ω), AlphaRL 0.683,
# RELEX 0.483.
NEXT_MARGIN = 0.15  # below the smallest measured gap, 0.21


def rotation_trajectory(seed):
  rng = np.random.default_rng(seed)
  coords, signs = rng.permutation(np.arange(2, ROT_DIM)), rng.choice([-1.0, 1.0], ROT_DIM - 2)
  h1, h2 = np.zeros(ROT_DIM), np.zeros(ROT_DIM)
  h1[coords] = signs / math.sqrt(ROT_DIM - 2)
  h2[coords] = signs * np.tile([1.0, -1.0], (ROT_DIM - 2) // 2) / math.sqrt(ROT_DIM - 2)
  f1, f2 = math.sqrt(0.19) * h1, h2
  f1[0] = 0.9
  centre = math.pi / 2 + 5 * ROT_OMEGA  # puts the chords of snapshots 0..10 around f₁
  a = np.zeros((ROT_K, ROT_LAYERS, 2, ROT_DIM))
  b = np.zeros((ROT_K, ROT_LAYERS, ROT_DIM, 2))
  for layer, phase in enumerate(ROT_PHASES):
    v = rng.normal(size=ROT_DIM)
    a[:, layer] = v / np.linalg.norm(v) / ROT_SCALE  # s·B·A = (cos θ·f₁ + sin θ·f₂)·vᵀ
    theta = ROT_OMEGA * np.arange(ROT_K) + phase - centre
    b[:, layer, :, 0] = np.cos(theta)[:, None] * f1
    b[:, layer, :, 1] = np.sin(theta)[:, None] * f2
  return {"w": {"a": jnp.asarray(a, jnp.float32), "b": jnp.asarray(b, jnp.float32)}}


def _observed(traj, num=11):
  return {m: {key: x[:num] for key, x in mod.items()} for m, mod in traj.items()}


@pytest.fixture(scope="module")
def rotation_baselines():
  """Baseline agreements with the actual W₁₅ − W₁₀ (the geometry, hence these, is the same for every seed)."""
  traj = rotation_trajectory(0)
  obs, steps = _observed(traj), jnp.arange(11.0) * 10
  actual = {"w": T({"w": traj["w"]}, ROT_SCALE).delta("w", 15, 10)}
  return {"rl_extra": ex.delta_agreement(ex.rl_extra(T(obs, ROT_SCALE, steps), 150.0), actual),
          "alpharl": ex.delta_agreement(ex.alpharl(T(obs, ROT_SCALE, steps), 150.0, devices="vmap"), actual),
          "relex": ex.delta_agreement(ex.relex(T(obs, ROT_SCALE, steps), 150.0), actual)}


def test_rl_extra_on_the_rotation_misses_by_the_chord_angle(rotation_baselines):
  # RL-Extra jumps along chord 0→10 (midpoint 5ω), the truth is chord 10→15 (midpoint 12.5ω): cos(7.5ω).
  assert rotation_baselines["rl_extra"]["cos_global"] == pytest.approx(math.cos(7.5 * ROT_OMEGA), abs=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_next_beats_linear_baselines_on_a_rotating_rank1_trajectory(seed, rotation_baselines):
  traj = rotation_trajectory(seed)
  obs = _observed(traj)  # snapshots 0..10 = steps 0..100: training pairs i = 1..5, jump from snapshot 10
  deltas, info = ex.next_predict(T(obs, ROT_SCALE, 10 * np.arange(11)), ROT_HORIZON, FAST, jax.random.key(seed),
                                 devices="vmap")
  for kind, trip in info["triplets"].items():  # the canonical sign is stable along the path (see above)
    u = np.asarray(trip["w"].u)
    assert np.all(np.argmax(np.abs(u), -1) == 0) and u[..., 0].min() > 0.6, kind
  assert {k: c.shape for k, c in info["loss_curves"].items()} == {
      "1;1": (FAST.epochs,), f"{ROT_DIM};1": (FAST.epochs,), f"1;{ROT_DIM}": (FAST.epochs,)}
  assert deltas["w"].shape == (ROT_LAYERS, ROT_DIM, ROT_DIM)
  nxt = ex.delta_agreement(deltas, {"w": T({"w": traj["w"]}, ROT_SCALE).delta("w", 15, 10)})
  best = max(r["cos_global"] for r in rotation_baselines.values())
  assert nxt["cos_global"] > best + NEXT_MARGIN, (nxt, rotation_baselines)
  assert nxt["cos_global"] > 0.9


# ---------------------------------------------------------------------------------- faithful mode


def test_untrained_rows_are_the_official_codes_zero_delta_rows():
  """A zero matrix → (σ 0, u = e₀ of length out, v = e₀ of length in); a 1-D leaf → its raw zero row."""
  rows, layout = ex.untrained_rows({"layers/q/bias": (2, 6), "layers/o/kernel": (2, 6, 4), "embed": (9, 4)})
  assert {(n, f, k) for n, f, k, _, _ in layout} == {
      ("embed", "sigma", "1;1"), ("embed", "u", "9;1"), ("embed", "v", "1;4"), ("layers/o/kernel", "sigma", "1;1"),
      ("layers/o/kernel", "u", "4;1"), ("layers/o/kernel", "v", "1;6"), ("layers/q/bias", "raw", "6;1")}
  assert rows["1;1"].shape == (3, 1) and not rows["1;1"].any()
  np.testing.assert_array_equal(rows["1;4"], [[1.0, 0, 0, 0]])  # embed's v = e₀ (D = 4)
  np.testing.assert_array_equal(rows["6;1"], np.zeros((2, 6)))  # the bias joins the u group of its length


def test_untrained_deltas_have_each_leafs_shape_and_orientation():
  rows, layout = ex.untrained_rows({"layers/q/bias": (2, 6), "layers/o/kernel": (2, 6, 4), "embed": (9, 4),
                                    "final_norm": (4,)})
  rng = np.random.default_rng(0)
  preds = {d: jnp.asarray(rng.normal(size=r.shape), jnp.float32) for d, r in rows.items()}
  out = ex.untrained_deltas(preds, layout)
  assert {k: v.shape for k, v in out.items()} == {"layers/q/bias": (2, 6), "layers/o/kernel": (2, 6, 4),
                                                  "embed": (9, 4), "final_norm": (4,)}
  rows_of = {(n, f): np.asarray(preds[d][off:off + layers]) for n, f, d, off, layers in layout}
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)

  def by_hand(name):  # σ̂·û·v̂ᵀ per layer, û / v̂ the torch layout's (out / in) directions
    sigma, u, v = (rows_of[name, f] for f in ("sigma", "u", "v"))
    return sigma[:, :, None] * unit(u)[:, :, None] * unit(v)[:, None, :]  # [L, torch out, torch in]

  np.testing.assert_allclose(out["embed"], by_hand("embed")[0], rtol=1e-5, atol=1e-7)  # embed [V, D] as torch's
  np.testing.assert_allclose(out["layers/o/kernel"], np.swapaxes(by_hand("layers/o/kernel"), 1, 2), rtol=1e-5,
                             atol=1e-7)  # a kernel: ours is [in, out], torch's transpose
  np.testing.assert_array_equal(out["layers/q/bias"], rows_of["layers/q/bias", "raw"])
  np.testing.assert_array_equal(out["final_norm"], rows_of["final_norm", "raw"][0])


def test_next_predict_faithful_moves_untrained_leaves_and_keeps_shapes():
  untrained = {"layers/w/bias": (2, 5), "embed": (7, 4)}
  traj = Trajectory(random_lora_traj(5, k=6), np.arange(6), 1.0, True, untrained)
  plain, info0 = ex.next_predict(traj, 2, FAST, jax.random.key(0), devices="vmap")
  faith, info1 = ex.next_predict(traj, 2, FAST, jax.random.key(0), devices="vmap", faithful=True)
  assert info0["untrained_deltas"] == {}
  assert {k: v.shape for k, v in info1["untrained_deltas"].items()} == {"layers/w/bias": (2, 5), "embed": (7, 4)}
  # the zero rows join the trained rows of their group (the bias's "5;1" = w's u, out = 5) in one predictor's
  # training set, as in the official code: the same key gives another prediction for w
  assert np.abs(np.asarray(faith["w"]) - np.asarray(plain["w"])).max() > 1e-3
  bias = np.asarray(info1["untrained_deltas"]["layers/w/bias"])  # the official code's noise: the predictor's
  np.testing.assert_array_equal(bias[0], bias[1])  # output for a zero row, so the same for both layers
  assert np.abs(bias).max() > 0


# ------------------------------------------------------------------------- shape groups at paper scale

# The official code's predictors for Qwen2.5-1.5B (28 layers, hidden 1536, kv 2×128 = 256, ffn 8960, vocab
# 151936, tied embedding, q/k/v biases), LoRA on all seven projections. LoRA rows per group: σ of 7·28
# matrices; u of q, o, down (out 1536) and k, v (256), gate, up (8960); v of q, k, v, o, gate, up (in 1536)
# and down (8960). Faithful mode adds the never-trained parameters: the embedding's σ, u (151936) and v
# (1536); every raw 1-D delta unsqueezed into its length's u group: 2·28 + 1 norms and 28 q biases (1536),
# 2·28 k/v biases (256).
QWEN15_LORA_ROWS = {"1;1": 196, "1536;1": 84, "256;1": 56, "8960;1": 56, "1;1536": 168, "1;8960": 28}
QWEN15_FAITHFUL_ROWS = {"1;1": 197, "1536;1": 169, "256;1": 112, "8960;1": 56, "1;1536": 169, "1;8960": 28,
                        "151936;1": 1}


def test_qwen25_15b_shape_groups_are_the_official_codes_seven_predictors():
  """Abstractly (jax.eval_shape, no weights): the group keys and row counts of a Qwen2.5-1.5B r-64 LoRA
  trajectory, in LoRA mode and in faithful mode (the official table: "1536;1", "256;1", "8960;1",
  "1;1536", "1;8960", "151936;1", "1;1")."""
  from next_jax.nxt.trajectory import untrained_leaves  # noqa: PLC0415
  from next_jax.rl import trained  # noqa: PLC0415

  cfg, lcfg = policy.QWEN25["1.5B"], policy.LoraConfig(rank=64, alpha=32.0)
  lora = jax.eval_shape(lambda: policy.init_lora(cfg, lcfg, jax.random.key(0)))  # {module: {"a", "b"}}
  s = 10  # training snapshots
  trip = {m: rank1.Triplet(sigma=jax.ShapeDtypeStruct((s, cfg.num_layers), jnp.float32),
                           u=jax.ShapeDtypeStruct((s, cfg.num_layers, f["b"].shape[1]), jnp.float32),
                           v=jax.ShapeDtypeStruct((s, cfg.num_layers, f["a"].shape[2]), jnp.float32),
                           spectrum=jax.ShapeDtypeStruct((s, cfg.num_layers, 128), jnp.float32))
          for m, f in lora.items()}
  rows = jax.eval_shape(lambda t: pred_lib.to_rows(t)[0], trip)
  assert {k: x.shape[1] for k, x in rows.items()} == QWEN15_LORA_ROWS
  assert all(x.shape == (s, x.shape[1], max(map(int, k.split(";")))) for k, x in rows.items())
  base = jax.eval_shape(lambda: policy.init_params(cfg, jax.random.key(0)))
  extra = jax.eval_shape(lambda: ex.untrained_rows(untrained_leaves(base, trained.paths(lcfg)))[0])
  faithful = {k: QWEN15_LORA_ROWS.get(k, 0) + (extra[k].shape[0] if k in extra else 0)
              for k in set(QWEN15_LORA_ROWS) | set(extra)}
  assert faithful == QWEN15_FAITHFUL_ROWS


def test_sigma_spread_flags_one_sigma_for_every_matrix():
  def trip(values):  # {module: Triplet [1, L]} with σ = values split over two modules
    x = jnp.asarray(values, jnp.float32)[None]
    return {"a": rank1.Triplet(sigma=x[:, :2], u=x[:, :2, None], v=x[:, :2, None], spectrum=x[:, :2, None]),
            "b": rank1.Triplet(sigma=x[:, 2:], u=x[:, 2:, None], v=x[:, 2:, None], spectrum=x[:, 2:, None])}

  varied = ex.sigma_spread(trip([0.1, 0.3, 0.2, 0.4]), 0)
  assert varied == pytest.approx({"min": 0.1, "median": 0.25, "max": 0.4, "matrices": 4, "at_median": 0.0})
  const = ex.sigma_spread(trip([0.4422466] * 4), -1)
  assert const["at_median"] == 1.0 and const["min"] == const["max"]
  assert ex.sigma_collapse_warning({"predicted": varied, "target": varied}) is None
  warning = ex.sigma_collapse_warning({"predicted": const, "target": varied})
  assert "every one of 4 matrices" in warning and "0.442247" in warning and "0.1 … 0.4" in warning
  assert ex.sigma_spread(trip([0.2, 0.2, 0.2, 0.2000004]), 0)["at_median"] == 0.75  # 2e-6 relative: not equal
