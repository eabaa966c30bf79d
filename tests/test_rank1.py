"""next_jax.nxt.rank1: the factored (QR + small SVD) top triplet against a float64 dense SVD, sign
canonicalisation, energy ratios, METHOD §1's delta index pairs, LoRA difference factors, and pmap over 4 host
devices against vmap on one (in a subprocess, since the device count is fixed when jax initialises)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import numpy as np
import pytest

from next_jax.models import policy
from next_jax.nxt import rank1
from next_jax.nxt.rank1 import Triplet

SIGMA_RTOL = 1e-5
COS_TOL = 1e-6


def dense_reference(delta: np.ndarray):
  """float64 SVD of Δ [m, n] → (σ descending, u₁, v₁)."""
  u, s, vt = np.linalg.svd(np.asarray(delta, np.float64))
  return s, u[:, 0], vt[0]


def abs_cos(x, y) -> float:
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  return abs(float(x @ y)) / (np.linalg.norm(x) * np.linalg.norm(y))


def assert_matches_dense(t: Triplet, delta: np.ndarray):
  s, u, v = dense_reference(delta)
  assert abs(float(t.sigma) - s[0]) <= SIGMA_RTOL * s[0]
  assert abs_cos(t.u, u) >= 1 - COS_TOL
  assert abs_cos(t.v, v) >= 1 - COS_TOL
  np.testing.assert_allclose(np.linalg.norm(np.asarray(t.u)), 1.0, atol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(t.v)), 1.0, atol=1e-6)


def random_lora_pair(rng, m: int, n: int, r: int):
  """Factors P [m, 2r], Q [2r, n] of B₁A₁ − B₂A₂ (the difference of two LoRA states)."""
  b1, b2 = rng.normal(size=(m, r)), rng.normal(size=(m, r))
  a1, a2 = rng.normal(size=(r, n)), rng.normal(size=(r, n))
  return np.concatenate([b1, -b2], 1), np.concatenate([a1, a2], 0)


# ------------------------------------------------------------------------------- factored vs dense SVD


# Few distinct shapes on purpose: every new shape compiles each eager QR / SVD op again.
@pytest.mark.parametrize("m, n, k", [(12, 7, 3), (7, 12, 3), (12, 7, 6), (7, 12, 6)])
def test_factored_triplet_equals_dense_svd(m, n, k):
  rng = np.random.default_rng(m * 100 + n * 10 + k)
  p, q, scale = rng.normal(size=(m, k)), rng.normal(size=(k, n)), 0.7
  t = rank1.factored_triplet(jnp.asarray(p, jnp.float32), jnp.asarray(q, jnp.float32), scale)
  assert_matches_dense(t, scale * p @ q)


@pytest.mark.parametrize("m, n, r", [(12, 7, 3), (7, 12, 3)])
def test_factored_triplet_of_lora_difference_equals_dense_svd(m, n, r):
  rng = np.random.default_rng(m + n + r)
  p, q = random_lora_pair(rng, m, n, r)  # k = 2r
  t = rank1.factored_triplet(jnp.asarray(p, jnp.float32), jnp.asarray(q, jnp.float32), 2.0)
  assert_matches_dense(t, 2.0 * p @ q)


def test_factored_triplet_with_duplicate_columns_equals_dense_svd():
  rng = np.random.default_rng(1)
  p, q = rng.normal(size=(12, 6)), rng.normal(size=(6, 7))
  p[:, 2] = p[:, 0]  # rank-deficient P: its QR has a (near-)zero diagonal in R
  q[3] = q[1]  # and rank-deficient Q
  t = rank1.factored_triplet(jnp.asarray(p, jnp.float32), jnp.asarray(q, jnp.float32), 1.0)
  assert_matches_dense(t, p @ q)
  s, _, _ = dense_reference(p @ q)  # rank 4: the factored spectrum's last two values are (near) zero, not NaN
  np.testing.assert_allclose(np.asarray(t.spectrum), s[:6], rtol=0, atol=SIGMA_RTOL * s[0])


def test_factored_triplet_with_zero_b_columns_equals_dense_svd():
  """A LoRA whose B has zero columns (e.g. B just after its zero init, or partially trained)."""
  rng = np.random.default_rng(2)
  b, a = rng.normal(size=(12, 6)), rng.normal(size=(6, 7))
  b[:, 1] = 0.0
  b[:, 3] = 0.0
  b[:, 4] = 0.0
  t = rank1.factored_triplet(jnp.asarray(b, jnp.float32), jnp.asarray(a, jnp.float32), 0.5)
  assert_matches_dense(t, 0.5 * b @ a)
  np.testing.assert_allclose(np.asarray(t.spectrum)[3:], 0.0, atol=1e-5)  # rank 3


def test_factored_triplet_of_zero_delta_is_zero_sigma_without_nan():
  t = rank1.factored_triplet(jnp.zeros((12, 3)), jnp.zeros((3, 7)), 1.0)
  assert float(t.sigma) == 0.0
  np.testing.assert_array_equal(np.asarray(t.spectrum), 0.0)
  for x in (t.u, t.v):  # still unit vectors (no 0/0): every consumer of a triplet relies on ‖u‖ = ‖v‖ = 1
    np.testing.assert_allclose(np.linalg.norm(np.asarray(x)), 1.0, atol=1e-6)
  e1, e1_sq = rank1.energy_ratios(t.spectrum)
  assert (float(e1), float(e1_sq)) == (0.0, 0.0)


def test_spectrum_equals_dense_nonzero_singular_values():
  rng = np.random.default_rng(3)
  p, q = random_lora_pair(rng, 12, 7, 3)  # rank 6 = k: the whole factored spectrum is non-zero
  t = rank1.factored_triplet(jnp.asarray(p, jnp.float32), jnp.asarray(q, jnp.float32), 1.5)
  s, _, _ = dense_reference(1.5 * p @ q)
  assert t.spectrum.shape == (6,)
  np.testing.assert_allclose(np.asarray(t.spectrum), s[:6], rtol=1e-5)
  np.testing.assert_allclose(s[6:], 0.0, atol=1e-12)  # the dense rest is exactly the zero tail


def test_dense_triplet_equals_numpy_svd():
  rng = np.random.default_rng(4)
  d = rng.normal(size=(12, 7))
  t = rank1.dense_triplet(jnp.asarray(d, jnp.float32))
  assert_matches_dense(t, d)
  np.testing.assert_allclose(np.asarray(t.spectrum), dense_reference(d)[0], rtol=1e-5)


# ------------------------------------------------------------------------------------------ signs


def _sign_trajectory():
  """Five triplets [T=5, m=4] / [5, n=3] with the largest-|entry| of u at different positions and signs."""
  u = np.array([[0.1, -0.9, 0.3, 0.2], [0.8, 0.1, -0.5, 0.0], [-0.2, 0.3, 0.1, -0.7],
                [0.5, -0.5, 0.1, 0.1], [-0.6, 0.6, 0.0, 0.2]], np.float32)  # rows 3, 4: ties
  v = np.arange(15, dtype=np.float32).reshape(5, 3) - 7.0
  s = np.arange(1, 6, dtype=np.float32)
  return Triplet(sigma=jnp.asarray(s), u=jnp.asarray(u), v=jnp.asarray(v), spectrum=jnp.asarray(s[:, None]))


def test_canonical_sign_makes_largest_abs_entry_of_u_positive_ties_to_first_index():
  t = rank1.canonical_sign(_sign_trajectory())
  expected_sign = np.array([-1, 1, -1, 1, -1], np.float32)  # of u[1], u[0], u[3], u[0] (tie), u[0] (tie)
  raw = _sign_trajectory()
  np.testing.assert_array_equal(np.asarray(t.u), np.asarray(raw.u) * expected_sign[:, None])
  np.testing.assert_array_equal(np.asarray(t.v), np.asarray(raw.v) * expected_sign[:, None])
  np.testing.assert_array_equal(np.asarray(t.sigma), np.asarray(raw.sigma))


def test_canonical_sign_is_invariant_to_flipping_u_and_v_together():
  raw = _sign_trajectory()
  flip = jnp.asarray([1.0, -1.0, -1.0, 1.0, -1.0])[:, None]
  flipped = raw.replace(u=raw.u * flip, v=raw.v * flip)
  a, b = rank1.canonical_sign(raw), rank1.canonical_sign(flipped)
  np.testing.assert_array_equal(np.asarray(a.u), np.asarray(b.u))
  np.testing.assert_array_equal(np.asarray(a.v), np.asarray(b.v))


def test_canonical_sign_none_keeps_the_raw_sign():
  raw = _sign_trajectory()
  t = rank1.canonical_sign(raw, "none")
  np.testing.assert_array_equal(np.asarray(t.u), np.asarray(raw.u))
  np.testing.assert_array_equal(np.asarray(t.v), np.asarray(raw.v))


def test_canonical_sign_rejects_unknown_mode():
  with pytest.raises(ValueError, match="sign="):
    rank1.canonical_sign(_sign_trajectory(), "largest")


# ---------------------------------------------------------------------------------------- energies


def test_energy_ratios_by_hand():
  e1, e1_sq = rank1.energy_ratios(jnp.asarray([[3.0, 1.0], [2.0, 0.0]]))
  np.testing.assert_allclose(np.asarray(e1), [0.75, 1.0], rtol=1e-7)
  np.testing.assert_allclose(np.asarray(e1_sq), [0.9, 1.0], rtol=1e-7)


def test_energy_ratios_of_three_values_by_hand():
  e1, e1_sq = rank1.energy_ratios(jnp.asarray([4.0, 2.0, 2.0]))
  assert float(e1) == pytest.approx(0.5, rel=1e-7)
  assert float(e1_sq) == pytest.approx(16 / 24, rel=1e-7)


# ------------------------------------------------------------------------------------- delta pairs


def test_delta_pairs_match_method_for_16_snapshots_k5():
  pairs = rank1.delta_pairs(16, 5)
  assert pairs["global"] == [(i, 0) for i in range(1, 11)]
  assert pairs["local"] == [(i, i - 1) for i in range(1, 11)]
  assert pairs["target"] == [(i + 5, i) for i in range(1, 11)]
  assert pairs["target"][0] == (6, 1) and pairs["target"][-1] == (15, 10)  # steps 10→60 … 100→150
  assert pairs["last_global"] == [(15, 0)]
  assert pairs["last_local"] == [(15, 14)]


def test_delta_pairs_with_too_few_snapshots_have_no_training_pair():
  pairs = rank1.delta_pairs(6, 5)  # W₀…W₅: W₁'s target would be W₆
  assert pairs["global"] == [] and pairs["target"] == []
  assert pairs["last_global"] == [(5, 0)] and pairs["last_local"] == [(5, 4)]


# ---------------------------------------------------------------------------------- LoRA factors


def _lora_stack(rng, k=4, layers=2, r=3, m=6, n=5):
  a = rng.normal(size=(k, layers, r, n)).astype(np.float32)
  b = rng.normal(size=(k, layers, m, r)).astype(np.float32)
  return a, b


def test_lora_delta_factors_reproduce_difference_of_snapshots():
  rng = np.random.default_rng(5)
  a, b = _lora_stack(rng)
  scale = 0.5
  p, q = rank1.lora_delta_factors(jnp.asarray(a), jnp.asarray(b), 3, 1)
  assert p.shape == (2, 6, 6) and q.shape == (2, 6, 5)  # [L, m, 2r], [L, 2r, n]
  w = lambda i: scale * np.einsum("lmr,lrn->lmn", b[i], a[i])
  np.testing.assert_allclose(scale * np.einsum("lmk,lkn->lmn", p, q), w(3) - w(1), atol=1e-5)


def test_lora_delta_factors_without_j_are_the_lora_itself():
  rng = np.random.default_rng(6)
  a, b = _lora_stack(rng)
  p, q = rank1.lora_delta_factors(jnp.asarray(a), jnp.asarray(b), 2, None)
  np.testing.assert_array_equal(np.asarray(p), b[2])
  np.testing.assert_array_equal(np.asarray(q), a[2])


def test_lora_delta_factors_agree_with_policy_lora_delta_layout():
  """s·P·Q is [out, in]; policy.lora_delta is our [in, out] layout: one is the transpose of the other."""
  rng = np.random.default_rng(7)
  a, b = _lora_stack(rng)
  p, q = rank1.lora_delta_factors(jnp.asarray(a), jnp.asarray(b), 2, 0)
  ours = lambda i: policy.lora_delta({"a": jnp.asarray(a[i]), "b": jnp.asarray(b[i])}, 2.0)
  np.testing.assert_allclose(np.swapaxes(2.0 * np.einsum("lmk,lkn->lmn", p, q), -1, -2), ours(2) - ours(0),
                             atol=1e-5)


# -------------------------------------------------------------------------------------------- batches


def _batch(rng, n=6, m=12, k=6, cols=7):
  p = rng.normal(size=(n, m, k)).astype(np.float32)
  q = rng.normal(size=(n, k, cols)).astype(np.float32)
  return p, q


def test_batched_factored_triplets_equal_per_matrix_canonical_triplets():
  rng = np.random.default_rng(8)
  p, q = _batch(rng)
  t = rank1.batched_factored_triplets(jnp.asarray(p), jnp.asarray(q), 0.5, devices="vmap")
  assert t.sigma.shape == (6,) and t.u.shape == (6, 12) and t.v.shape == (6, 7) and t.spectrum.shape == (6, 6)
  for i in range(6):
    one = rank1.canonical_sign(rank1.factored_triplet(jnp.asarray(p[i]), jnp.asarray(q[i]), 0.5))
    np.testing.assert_allclose(np.asarray(t.sigma[i]), np.asarray(one.sigma), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(t.u[i]), np.asarray(one.u), atol=1e-6)
    np.testing.assert_allclose(np.asarray(t.v[i]), np.asarray(one.v), atol=1e-6)


def test_batched_factored_and_dense_triplets_agree_elementwise_after_canonical_sign():
  rng = np.random.default_rng(9)
  p, q = _batch(rng)
  f = rank1.batched_factored_triplets(jnp.asarray(p), jnp.asarray(q), 1.0, devices="pmap")  # 1 device here
  d = rank1.batched_dense_triplets(jnp.asarray(np.einsum("nmk,nkc->nmc", p, q)), devices="pmap")
  np.testing.assert_allclose(np.asarray(f.sigma), np.asarray(d.sigma), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(f.u), np.asarray(d.u), atol=1e-5)
  np.testing.assert_allclose(np.asarray(f.v), np.asarray(d.v), atol=1e-5)
  u_idx = np.argmax(np.abs(np.asarray(f.u)), -1)
  assert np.all(np.asarray(f.u)[np.arange(6), u_idx] > 0)


def test_batched_triplets_reject_unknown_devices():
  with pytest.raises(ValueError, match="devices="):
    rank1.batched_dense_triplets(jnp.ones((2, 3, 3)), devices="shard_map")


# Fresh interpreter with 4 host devices: pmap (N = 6 → padded to 8, 2 per device) against vmap on one.
_CHILD = textwrap.dedent("""
    import json
    import jax, jax.numpy as jnp, numpy as np
    jax.config.update("jax_default_matmul_precision", "highest")
    from next_jax.nxt import rank1
    rng = np.random.default_rng(0)
    p = jnp.asarray(rng.normal(size=(6, 9, 4)), jnp.float32)
    q = jnp.asarray(rng.normal(size=(6, 4, 7)), jnp.float32)
    d = jnp.asarray(rng.normal(size=(6, 9, 7)), jnp.float32)
    def diff(x, y):
      return max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y)))
    fp, fv = (rank1.batched_factored_triplets(p, q, 0.5, devices=dv) for dv in ("pmap", "vmap"))
    dp, dv = (rank1.batched_dense_triplets(d, devices=dv) for dv in ("pmap", "vmap"))
    print(json.dumps({"devices": jax.local_device_count(), "factored": diff(fp, fv), "dense": diff(dp, dv),
                      "shapes": [list(x.shape) for x in jax.tree.leaves(fp) + jax.tree.leaves(dp)],
                      "sigma_factored": fp.sigma.tolist(), "sigma_dense": dp.sigma.tolist()}))
""")


@pytest.mark.slow
def test_pmap_over_four_devices_equals_vmap_with_padding():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run([sys.executable, "-c", _CHILD], env=env, cwd=root, capture_output=True, text=True,
                       timeout=300, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  res = json.loads(out.stdout.strip().splitlines()[-1])
  assert res["devices"] == 4
  # Triplet leaves in field order sigma, u, v, spectrum: padding rows dropped, N = 6 kept.
  assert res["shapes"] == [[6], [6, 9], [6, 7], [6, 4], [6], [6, 9], [6, 7], [6, 7]]
  assert res["factored"] <= 1e-6 and res["dense"] <= 1e-6
  # the kept rows are the 6 real matrices (a padded zero matrix in their place has σ = 0): the child's inputs
  # again, and their top singular values by numpy
  rng = np.random.default_rng(0)
  p, q, d = (rng.normal(size=shape).astype(np.float32) for shape in ((6, 9, 4), (6, 4, 7), (6, 9, 7)))
  np.testing.assert_allclose(res["sigma_factored"], [dense_reference(0.5 * p[i] @ q[i])[0][0] for i in range(6)],
                             rtol=SIGMA_RTOL)
  np.testing.assert_allclose(res["sigma_dense"], [dense_reference(d[i])[0][0] for i in range(6)], rtol=SIGMA_RTOL)


def test_a_large_batch_finishes_instead_of_deadlocking_the_cpu_thread_pool():
  """Regression: two batched LAPACK QRs in flight at once held both pool threads of a 2-core CPU forever
  (56 pairs of [1536, 128]); the second QR now depends on the first. Run in a child so a hang is a
  timeout, not a stuck suite."""
  code = textwrap.dedent("""
      import jax, jax.numpy as jnp
      from next_jax.nxt import rank1
      p = jax.random.normal(jax.random.key(0), (56, 1536, 128))
      q = jax.random.normal(jax.random.key(1), (56, 128, 1536))
      t = rank1.batched_factored_triplets(p, q, 0.5, devices="vmap")
      print(float(jax.block_until_ready(t.sigma).min()) > 0)
  """)
  env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
  out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=240, env=env,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip().endswith("True")
