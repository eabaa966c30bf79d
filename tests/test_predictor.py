"""next_jax.nxt.predictor: MatrixPredict's shapes, PyTorch-default init, layer order against a numpy forward, the
official L1 loss by hand, the optimiser schedule, training (loss falls, deterministic), the ablation switch,
rows ↔ triplets, and the paper's default config."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from next_jax.nxt import predictor as pred_lib
from next_jax.nxt.rank1 import Triplet

# Same config and row shapes as test_extrapolate.py's NExt test ([S=5, R=8, 16] and [5, 4, 1]): the ~10 s
# compile of `train_predictor` per (shape, config) is shared by the session.
FAST = pred_lib.PredictorConfig(hidden=64, epochs=400, lr=1e-3)
S, R, DIM = 5, 8, 16
# Jitted once per (dim, hidden): eager jax.random would compile a kernel for every layer shape.
init = jax.jit(pred_lib.init_matrix_predict, static_argnums=(1, 2))


def numpy_block(layers, x):
  """Linear → Linear → ReLU → Linear → Linear, written out in float64."""
  w = [(np.asarray(p["w"], np.float64), np.asarray(p["b"], np.float64)) for p in layers]
  h = x @ w[0][0] + w[0][1]
  h = np.maximum(h @ w[1][0] + w[1][1], 0.0)
  h = h @ w[2][0] + w[2][1]
  return h @ w[3][0] + w[3][1]


def numpy_predict(params, g, l):
  eg, el = numpy_block(params["enc_g"], g), numpy_block(params["enc_l"], l)
  return numpy_block(params["dec"], np.concatenate([eg, el], -1))


def crafted_params(dim, hidden, seed):
  """N(0, 1) weights and biases: half the pre-activations are negative, so a ReLU in the wrong place shows."""
  rng = np.random.default_rng(seed)
  block = lambda widths: [{"w": jnp.asarray(rng.normal(size=(widths[i], widths[i + 1])), jnp.float32),
                           "b": jnp.asarray(rng.normal(size=widths[i + 1]), jnp.float32)} for i in range(4)]
  return {"enc_g": block([dim, hidden, dim, hidden, dim]), "enc_l": block([dim, hidden, dim, hidden, dim]),
          "dec": block([2 * dim, hidden, 2 * dim, hidden, dim])}


def synthetic_rows(seed):
  """g, l, t: [S, R, DIM] with t a fixed smooth function of (g, l) (a rotation of l plus a bit of g)."""
  rng = np.random.default_rng(seed)
  g, l = rng.normal(size=(2, S, R, DIM))
  rot = np.linalg.qr(rng.normal(size=(DIM, DIM)))[0]
  t = l @ rot + 0.3 * g
  return tuple(jnp.asarray(x, jnp.float32) for x in (g, l, t))


# -------------------------------------------------------------------------------------------- network


@pytest.mark.parametrize("dim", [1, 4])
def test_apply_keeps_the_row_shape_of_each_group(dim):
  params = crafted_params(dim, 8, seed=dim)
  x = jnp.ones((3, 5, dim))
  assert pred_lib.apply_matrix_predict(params, x, x).shape == (3, 5, dim)


def test_init_layer_widths_are_the_official_ones():
  params = init(jax.random.key(1), DIM, 64)
  enc = [(16, 64), (64, 16), (16, 64), (64, 16)]
  widths = {k: [tuple(p["w"].shape) for p in v] for k, v in params.items()}
  assert widths == {"enc_g": enc, "enc_l": enc, "dec": [(32, 64), (64, 32), (32, 64), (64, 16)]}
  assert all(p["b"].shape == (p["w"].shape[1],) for v in params.values() for p in v)


def test_init_is_pytorch_default_uniform_within_one_over_sqrt_fan_in():
  params = init(jax.random.key(1), DIM, 64)  # the shapes `trained` compiles too
  for block in params.values():
    for p in block:
      bound = 1.0 / math.sqrt(p["w"].shape[0])
      for x in (np.asarray(p["w"]), np.asarray(p["b"])):
        assert np.abs(x).max() <= bound
        assert np.abs(x).max() > 0.5 * bound  # fills the range: not all zero, not a narrower init
      assert np.abs(np.asarray(p["w"])).max() > 0.9 * bound  # ≥ 1024 draws: the max is near the bound
  assert not np.array_equal(np.asarray(params["enc_g"][0]["w"]), np.asarray(params["enc_l"][0]["w"]))


def test_apply_equals_numpy_forward_with_one_relu_per_sub_network():
  params = crafted_params(4, 8, seed=2)
  rng = np.random.default_rng(3)
  g, l = rng.normal(size=(2, 3, 5, 4))
  got = pred_lib.apply_matrix_predict(params, jnp.asarray(g, jnp.float32), jnp.asarray(l, jnp.float32))
  np.testing.assert_allclose(np.asarray(got), numpy_predict(params, g, l), rtol=1e-4, atol=1e-4)


def test_use_global_false_makes_the_prediction_independent_of_g():
  params = crafted_params(4, 8, seed=4)
  rng = np.random.default_rng(5)
  g1, g2, l = (jnp.asarray(x, jnp.float32) for x in rng.normal(size=(3, 2, 3, 4)))
  off = [pred_lib.apply_matrix_predict(params, g, l, use_global=False) for g in (g1, g2)]
  np.testing.assert_array_equal(np.asarray(off[0]), np.asarray(off[1]))
  on = [pred_lib.apply_matrix_predict(params, g, l) for g in (g1, g2)]
  assert np.abs(np.asarray(on[0]) - np.asarray(on[1])).max() > 1e-2
  # the global encoder's output is replaced by zeros
  dec_in = np.concatenate([np.zeros((2, 3, 4)), numpy_block(params["enc_l"], np.asarray(l))], -1)
  np.testing.assert_allclose(np.asarray(off[0]), numpy_block(params["dec"], dec_in), rtol=1e-4, atol=1e-4)


def test_use_local_false_makes_the_prediction_independent_of_l():
  params = crafted_params(4, 8, seed=6)
  rng = np.random.default_rng(7)
  g, l1, l2 = (jnp.asarray(x, jnp.float32) for x in rng.normal(size=(3, 2, 3, 4)))
  off = [pred_lib.apply_matrix_predict(params, g, l, use_local=False) for l in (l1, l2)]
  np.testing.assert_array_equal(np.asarray(off[0]), np.asarray(off[1]))


def test_config_rejects_dropping_both_branches_and_unknown_loss():
  with pytest.raises(ValueError, match="both"):
    pred_lib.PredictorConfig(use_global=False, use_local=False)
  with pytest.raises(ValueError, match="loss"):
    pred_lib.PredictorConfig(loss="huber")


# ------------------------------------------------------------------------------------------ loss


def test_l1_loss_is_sum_of_abs_errors_over_training_snapshots():
  params = crafted_params(4, 8, seed=8)
  rng = np.random.default_rng(9)
  g, l, t = rng.normal(size=(3, 3, 5, 4))  # S = 3 snapshots, 5 rows
  loss = pred_lib.predictor_loss(params, *(jnp.asarray(x, jnp.float32) for x in (g, l, t)),
                                 pred_lib.PredictorConfig())
  expected = np.abs(numpy_predict(params, g, l) - t).sum() / 3
  assert float(loss) == pytest.approx(expected, rel=1e-4)


def test_l2_loss_is_sum_of_squared_errors_over_training_snapshots():
  params = crafted_params(4, 8, seed=8)
  rng = np.random.default_rng(9)
  g, l, t = rng.normal(size=(3, 3, 5, 4))
  loss = pred_lib.predictor_loss(params, *(jnp.asarray(x, jnp.float32) for x in (g, l, t)),
                                 pred_lib.PredictorConfig(loss="l2"))
  expected = ((numpy_predict(params, g, l) - t) ** 2).sum() / 3
  assert float(loss) == pytest.approx(expected, rel=1e-4)


# ------------------------------------------------------------------------------------- optimiser


def _updates(cfg, params, steps):
  """Updates of make_optimizer(cfg) for a constant gradient of ones."""
  tx = pred_lib.make_optimizer(cfg)
  state, out = tx.init(params), []
  for _ in range(steps):
    u, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
    params = optax.apply_updates(params, u)
    out.append(u)
  return out


def test_optimizer_is_adamw_with_weight_decay_001():
  cfg = pred_lib.PredictorConfig()
  (u,) = _updates(cfg, {"x": jnp.asarray([0.0, 2.0])}, 1)
  # Adam's first bias-corrected step on a constant gradient is 1 per entry; AdamW adds wd·p: −lr·(1 + 0.01·p)
  np.testing.assert_allclose(np.asarray(u["x"]), [-2e-5, -2e-5 * 1.02], rtol=5e-5)  # fp32 bias corrections


def test_optimizer_lr_follows_cosine_decay_to_a_tenth():
  cfg = dataclasses.replace(pred_lib.PredictorConfig(), epochs=4)
  ups = _updates(cfg, {"x": jnp.zeros(1)}, 6)
  # p stays ≈ −lr·step ≈ 0, so the decay term is ≤ 1e-6 relative; Adam's step is 1 on a constant gradient
  lr = [2e-5 * (0.1 + 0.9 * (1 + math.cos(math.pi * min(t, 4) / 4)) / 2) for t in range(6)]
  np.testing.assert_allclose([-float(u["x"][0]) for u in ups], lr, rtol=5e-5)
  assert lr[4] == pytest.approx(2e-6) and lr[5] == pytest.approx(2e-6)  # held at 0.1·lr after `epochs`


def test_default_config_is_the_papers():
  assert pred_lib.PredictorConfig() == pred_lib.PredictorConfig(
      hidden=256, epochs=1000, lr=2e-5, weight_decay=0.01, final_lr_ratio=0.1, loss="l1", use_global=True,
      use_local=True)
  assert dataclasses.asdict(pred_lib.PredictorConfig()) == {
      "hidden": 256, "epochs": 1000, "lr": 2e-5, "weight_decay": 0.01, "final_lr_ratio": 0.1, "loss": "l1",
      "use_global": True, "use_local": True, "pad_snapshots": 0, "reassociate": False}


# ----------------------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def trained():
  g, l, t = synthetic_rows(10)
  return (g, l, t), pred_lib.train_predictor(jax.random.key(3), g, l, t, FAST)


def test_training_loss_falls_on_a_synthetic_mapping(trained):
  (g, l, t), (_, losses) = trained
  losses = np.asarray(losses)
  assert losses.shape == (FAST.epochs,) and np.all(np.isfinite(losses))
  assert losses[-1] < 0.5 * losses[0]  # measured: 0.24×
  assert losses[-1] < losses[FAST.epochs // 2] < losses[0]
  assert losses[-1] < 0.5 * float(np.abs(np.asarray(t)).sum() / S)  # well below predicting zero
  # losses[i] is the loss *before* step i: the first one is the loss of the initial parameters
  p0 = init(jax.random.key(3), DIM, FAST.hidden)
  assert losses[0] == pytest.approx(float(pred_lib.predictor_loss(p0, g, l, t, FAST)), rel=1e-5)


def test_training_is_deterministic_given_the_key(trained):
  (g, l, t), (params, losses) = trained
  params2, losses2 = pred_lib.train_predictor(jax.random.key(3), g, l, t, FAST)
  np.testing.assert_array_equal(np.asarray(losses), np.asarray(losses2))
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  _, losses3 = pred_lib.train_predictor(jax.random.key(4), g, l, t, FAST)
  assert losses3[0] != losses[0]  # another key, another init


def test_padded_snapshots_train_the_same_predictor(trained):
  """pad_snapshots adds zero-weight snapshots (one compiled program for every trajectory length): the loss
  curve and the parameters equal the unpadded run's up to summation order, which Adam amplifies slowly at
  the paper's lr (measured 1.5e-6 relative on the loss after 500 epochs, 8e-5 after 1000)."""
  (g, l, t), _ = trained
  cfg = pred_lib.PredictorConfig(hidden=64, epochs=300)  # the paper's lr
  params, losses = pred_lib.train_predictor(jax.random.key(3), g, l, t, cfg)
  pad = lambda x: jnp.pad(x, ((0, 3), (0, 0), (0, 0)))  # noqa: E731
  w = (jnp.arange(S + 3) < S).astype(jnp.float32)
  params2, losses2 = pred_lib.train_predictor(jax.random.key(3), pad(g), pad(l), pad(t),
                                              dataclasses.replace(cfg, pad_snapshots=S + 3), w)
  np.testing.assert_allclose(np.asarray(losses2), np.asarray(losses), rtol=1e-5)
  out, out2 = (np.asarray(pred_lib.apply_matrix_predict(p, g, l)) for p in (params, params2))
  # Adam moves a coordinate whose gradient is ~0 by ±lr per step, so an output bias whose gradient sign
  # differs in the last bit drifts apart by up to a few hundred lr (measured 3.6e-4 here; lr = 2e-5)
  np.testing.assert_allclose(out2, out, atol=5e-3 * np.abs(out).max())


# --------------------------------------------------------------------------------------- rows ↔ triplets


def _triplets(seed, steps=2):
  """Two modules of different shapes: "q" (L=2, m=6, n=4) and "o" (L=3, m=4, n=6)."""
  rng = np.random.default_rng(seed)
  mk = lambda layers, m, n: Triplet(
      sigma=jnp.asarray(rng.normal(size=(steps, layers)), jnp.float32),
      u=jnp.asarray(rng.normal(size=(steps, layers, m)), jnp.float32),
      v=jnp.asarray(rng.normal(size=(steps, layers, n)), jnp.float32), spectrum=jnp.zeros((steps, layers, 1)))
  return {"q": mk(2, 6, 4), "o": mk(3, 4, 6)}


def test_to_rows_groups_rows_by_the_official_shape_keys_in_a_fixed_order():
  """u (m, 1) → "m;1", v (1, n) → "1;n", σ → "1;1": q's v and o's u (both length 4) are different groups."""
  trip = _triplets(11)
  rows, layout = pred_lib.to_rows(trip)
  assert {k: x.shape for k, x in rows.items()} == {"1;1": (2, 5, 1), "4;1": (2, 3, 4), "1;6": (2, 3, 6),
                                                   "6;1": (2, 2, 6), "1;4": (2, 2, 4)}
  assert layout == [("o", "sigma", "1;1", 0), ("o", "u", "4;1", 0), ("o", "v", "1;6", 0),
                    ("q", "sigma", "1;1", 3), ("q", "u", "6;1", 0), ("q", "v", "1;4", 0)]
  np.testing.assert_array_equal(np.asarray(rows["1;4"]), np.asarray(trip["q"].v))
  np.testing.assert_array_equal(np.asarray(rows["4;1"]), np.asarray(trip["o"].u))
  np.testing.assert_array_equal(np.asarray(rows["1;1"][:, :3, 0]), np.asarray(trip["o"].sigma))


def test_group_key_is_the_official_tensor_shape_key():
  assert [pred_lib.group_key(f, 7) for f in ("sigma", "u", "v", "raw")] == ["1;1", "7;1", "1;7", "7;1"]
  assert sorted(["1;6", "6;1", "1;1", "4;1"], key=pred_lib.group_order) == ["1;1", "4;1", "1;6", "6;1"]


def test_from_rows_inverts_to_rows():
  trip = _triplets(12)
  rows, layout = pred_lib.to_rows(trip)
  back = pred_lib.from_rows(rows, layout, {"q": 2, "o": 3})
  assert set(back) == {"q", "o"}
  for name in trip:
    for field in ("sigma", "u", "v"):
      got, want = getattr(back[name], field), getattr(trip[name], field)
      np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    np.testing.assert_array_equal(np.asarray(back[name].spectrum), np.asarray(trip[name].sigma)[..., None])


def test_fit_and_predict_returns_one_triplet_per_module_and_a_curve_per_group():
  """One module, L = 4, m = n = DIM: groups σ [5, 4, 1], u [5, 4, DIM] and v [5, 4, DIM], FAST's shapes."""
  rng = np.random.default_rng(13)
  def mk(s):
    return Triplet(sigma=jnp.asarray(rng.uniform(size=(s, 4)), jnp.float32),
                   u=jnp.asarray(rng.normal(size=(s, 4, DIM)), jnp.float32),
                   v=jnp.asarray(rng.normal(size=(s, 4, DIM)), jnp.float32), spectrum=jnp.zeros((s, 4, 1)))

  pred, curves, extra = pred_lib.fit_and_predict(jax.random.key(0), {"w": mk(S)}, {"w": mk(S)}, {"w": mk(S)},
                                                 {"w": mk(1)}, {"w": mk(1)}, FAST)
  assert set(pred) == {"w"}
  assert (pred["w"].sigma.shape, pred["w"].u.shape, pred["w"].v.shape) == ((1, 4), (1, 4, DIM), (1, 4, DIM))
  u, v = f"{DIM};1", f"1;{DIM}"
  assert {k: c.shape for k, c in curves.items()} == {"1;1": (FAST.epochs,), u: (FAST.epochs,), v: (FAST.epochs,)}
  assert {k: x.shape for k, x in extra.items()} == {"1;1": (0, 1), u: (0, DIM), v: (0, DIM)}


def test_reassociated_network_is_the_same_function_and_trains_to_the_same_losses():
  """reassociate=True: forward equal to the numpy forward; the first loss and gradient equal (same function);
  200 AdamW epochs at lr 1e-3 give the same loss curve to 2e-3 relative. Rows [S=5, R=8, dim 16], hidden 64:
  every pair goes through the product (16·16·(64 + 40) < 40·64·32, and 32·32·104 < 40·64·64)."""
  (a, hid), n = (DIM, FAST.hidden), S * R
  assert a * a * (hid + n) < n * hid * 2 * a and (2 * a) ** 2 * (hid + n) < n * hid * 4 * a  # the product path
  params = crafted_params(DIM, FAST.hidden, seed=4)
  rng = np.random.default_rng(5)
  g, l, t = (jnp.asarray(x, jnp.float32) for x in rng.normal(size=(3, S, R, DIM)))
  got = pred_lib.apply_matrix_predict(params, g, l, reassociate=True)
  want = numpy_predict(params, np.asarray(g), np.asarray(l))  # float64; entries up to ~1e3 here
  np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-5 * np.abs(want).max())
  fast = dataclasses.replace(FAST, epochs=200)
  start = init(jax.random.key(0), DIM, FAST.hidden)  # train_predictor's own initial weights
  grads = [jax.grad(pred_lib.predictor_loss)(start, g, l, t, dataclasses.replace(fast, reassociate=r))
           for r in (False, True)]
  for x, y in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1]), strict=True):
    np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=0, atol=1e-5 * np.abs(np.asarray(x)).max())
  curves = [np.asarray(pred_lib.train_predictor(jax.random.key(0), g, l, t, dataclasses.replace(fast, reassociate=r))[1])
            for r in (False, True)]
  assert curves[0][-1] < 0.5 * curves[0][0]  # it trained, so the curves are compared where they move
  assert curves[1][0] == pytest.approx(curves[0][0], rel=1e-6)  # the same function before any update
  # then Adam amplifies the different rounding; at this lr (50× the paper's) it stays < 2e-3 relative
  np.testing.assert_allclose(curves[1], curves[0], rtol=2e-3)
  assert not np.array_equal(curves[1], curves[0])  # and the product path did run
