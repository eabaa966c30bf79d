"""Deltas of a weight trajectory and their top singular triplets (σ, u, v): Δ ≈ σ·u·vᵀ.

Orientation: Δ is [m, n] = [out, in] (torch / PEFT layout), so u ∈ ℝᵐ lives in the output space and
v ∈ ℝⁿ in the input space, for LoRA and dense trajectories alike.

LoRA path (exact, never forms Δ): a LoRA delta is s·B·A (B: m×r, A: r×n), and a difference of two LoRA
states is s·[B₁, −B₂]·[A₁; A₂], rank ≤ 2r. For Δ = s·P·Q (P: m×k, Q: k×n):
    P = Q_P R_P,  Qᵀ = Q_Q R_Q  (thin QR),   s·R_P R_Qᵀ = U Σ Vᵀ  (k×k SVD)
    ⇒ σ₁ = Σ₀,  u₁ = Q_P U[:, 0],  v₁ = Q_Q V[:, 0],  and Σ is Δ's whole non-zero spectrum.
Cost O((m+n)k²) instead of O(mn·min(m, n)) for the dense SVD.

Batching: same-shape matrices form one leading axis; `vmap` within a device, `jax.pmap` across devices
(the batch is padded to a multiple of the device count and the padding dropped after).
"""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

SIGN_MODES = ("max_abs_u", "none")


class Triplet(flax.struct.PyTreeNode):
  """Top singular triplet(s): sigma [...], u [..., m], v [..., n]; spectrum [..., k] (all σᵢ, descending)."""

  sigma: jax.Array
  u: jax.Array
  v: jax.Array
  spectrum: jax.Array


# ---------------------------------------------------------------------------------------- one matrix


def factored_triplet(p: jax.Array, q: jax.Array, scale: float | jax.Array = 1.0) -> Triplet:
  """Exact top triplet of Δ = scale·P·Q from thin QRs and a k×k SVD. p: [m, k], q: [k, n].

  The second QR waits for the first through a real data dependency (+ 0·R_P[0, 0]; an
  optimization_barrier does not order XLA:CPU thunks). jaxlib's CPU LAPACK kernels split a batch over
  XLA's intra-op thread pool and block a pool thread while they wait, so two batched QRs running at once
  can hold every pool thread and never finish: a vmapped batch of 56 [1536, 128] pairs deadlocked
  reproducibly on 2 cores (jax 0.10.2) before this."""
  qp, rp = jnp.linalg.qr(p.astype(jnp.float32))
  qq, rq = jnp.linalg.qr(q.T.astype(jnp.float32) + 0.0 * rp[0, 0])  # after QR(P): see the docstring
  u_c, s, vt_c = jnp.linalg.svd(scale * rp @ rq.T)
  return Triplet(sigma=s[0], u=qp @ u_c[:, 0], v=qq @ vt_c[0], spectrum=s)


def dense_triplet(delta: jax.Array) -> Triplet:
  """Top triplet of a dense Δ [m, n] by `jnp.linalg.svd` (full-parameter runs; the "w/o LoRA" ablation)."""
  u, s, vt = jnp.linalg.svd(delta.astype(jnp.float32), full_matrices=False)
  return Triplet(sigma=s[0], u=u[:, 0], v=vt[0], spectrum=s)


def canonical_sign(t: Triplet, mode: str = "max_abs_u") -> Triplet:
  """(u, v) and (−u, −v) are the same triplet. "max_abs_u": flip both so u's largest-|entry| is positive
  (ties → first index); "none": keep the SVD's arbitrary sign (the official NExt code)."""
  if mode == "none":
    return t
  if mode != "max_abs_u":
    raise ValueError(f"sign={mode!r}; choose from {SIGN_MODES}")
  idx = jnp.argmax(jnp.abs(t.u), axis=-1)
  pick = jnp.take_along_axis(t.u, idx[..., None], axis=-1)
  sign = jnp.where(pick >= 0, 1.0, -1.0)
  return t.replace(u=t.u * sign, v=t.v * sign)


def energy_ratios(spectrum: jax.Array) -> tuple[jax.Array, jax.Array]:
  """E₁ = σ₁/Σσᵢ (the paper's ratio) and the squared variant σ₁²/Σσᵢ² (rank-1 energy); 0 for Δ = 0."""
  s = spectrum.astype(jnp.float32)
  e1 = s[..., 0] / jnp.maximum(s.sum(-1), 1e-30)
  e1_sq = s[..., 0] ** 2 / jnp.maximum((s * s).sum(-1), 1e-30)
  return e1, e1_sq


# --------------------------------------------------------------------------------------------- batches


def _factored_signed(p, q, sign):
  return canonical_sign(factored_triplet(p, q), sign)


def _dense_signed(delta, sign):
  return canonical_sign(dense_triplet(delta), sign)


@functools.lru_cache(maxsize=None)
def _batched_fn(kind: str, sign: str, devices: str):
  """jit(vmap) or pmap(vmap) of one triplet function, built once per (kind, sign, devices)."""
  fn = functools.partial(_factored_signed if kind == "factored" else _dense_signed, sign=sign)
  return jax.pmap(jax.vmap(fn)) if devices == "pmap" else jax.jit(jax.vmap(fn))


def gather_factors(x: jax.Array) -> jax.Array:
  """An array sharded over a mesh (fsdp/tensor LoRA factors [N, m, k]) as one uncommitted whole copy:
  pmap takes only uncommitted or pmap-sharded inputs. Only the small factors come here, never W."""
  if not isinstance(x, jax.Array) or len(x.sharding.device_set) == 1:
    return x
  if not x.is_fully_addressable:
    from jax.experimental import multihost_utils  # noqa: PLC0415
    return jnp.asarray(multihost_utils.process_allgather(x, tiled=True))
  return jnp.asarray(np.asarray(x))


def _run_batched(kind: str, sign: str, devices: str, *arrays):
  """vmap over the leading axis N; with devices="pmap", N is split over all local devices (padded to a
  multiple of the device count, padding dropped after)."""
  n_dev = jax.local_device_count() if devices == "pmap" else 1
  if devices not in ("pmap", "vmap"):
    raise ValueError(f"devices={devices!r}; choose 'pmap' or 'vmap'")
  if n_dev == 1:
    return _batched_fn(kind, sign, "vmap")(*arrays)
  arrays = [gather_factors(a) for a in arrays]
  n = arrays[0].shape[0]
  pad = -n % n_dev
  padded = [jnp.concatenate([a, jnp.zeros((pad, *a.shape[1:]), a.dtype)]) if pad else a for a in arrays]
  split = [a.reshape(n_dev, (n + pad) // n_dev, *a.shape[1:]) for a in padded]
  out = _batched_fn(kind, sign, "pmap")(*split)
  return jax.tree.map(lambda x: x.reshape(n + pad, *x.shape[2:])[:n], out)


def batched_factored_triplets(p: jax.Array, q: jax.Array, scale: float, sign: str = "max_abs_u",
                              devices: str = "pmap") -> Triplet:
  """Top triplets of Δᵢ = scale·Pᵢ·Qᵢ for a batch. p: [N, m, k], q: [N, k, n] → Triplet with leading N.

  devices="pmap": split N over local devices (vmap within each); "vmap": one device. The scale is folded
  into P (σ scales linearly), so one compiled program serves every LoRA scale."""
  return _run_batched("factored", sign, devices, p * jnp.asarray(scale, p.dtype), q)


def batched_dense_triplets(delta: jax.Array, sign: str = "max_abs_u", devices: str = "pmap") -> Triplet:
  """Top triplets of a batch of dense deltas [N, m, n] (vmap within a device, pmap across devices)."""
  return _run_batched("dense", sign, devices, delta)


# ----------------------------------------------------------------------------------- trajectory deltas


def lora_delta_factors(a: jax.Array, b: jax.Array, i: jax.Array | int, j: jax.Array | int | None):
  """Factors of ΔW_i − ΔW_j (ΔW_j = 0 when j is None) for stacked LoRA snapshots.

  a: [K, L, r, n], b: [K, L, m, r] (snapshot K, layer L) → P [L, m, k], Q [L, k, n] with Δ = s·P·Q.
  """
  if j is None:
    return b[i], a[i]
  return jnp.concatenate([b[i], -b[j]], axis=-1), jnp.concatenate([a[i], a[j]], axis=-2)


@jax.jit
def pair_factors(a: jax.Array, b: jax.Array, i: jax.Array, j: jax.Array):
  """Factors of W_i − W_j for index arrays i, j (int32[n]), flattened over (pair, layer), in one jitted
  gather: a [K, L, r, n], b [K, L, m, r] → P [n·L, m, 2r], Q [n·L, 2r, n]."""
  p = jnp.concatenate([b[i], -b[j]], axis=-1)
  q = jnp.concatenate([a[i], a[j]], axis=-2)
  return p.reshape(-1, *p.shape[2:]), q.reshape(-1, *q.shape[2:])


def delta_pairs(num_snapshots: int, k: int) -> dict[str, list[tuple[int, int | None]]]:
  """Index pairs (i, j) meaning W_i − W_j for snapshots 0 (= W₀) … K−1, as in METHOD §1:

  global G_i = W_i − W₀ (j = 0: snapshot 0 is W₀), local L_i = W_i − W_{i−1},
  target T_i = W_{i+k} − W_i, for the training snapshots i = 1 … K−1−k (those that have a target),
  plus "last": G and L of the final snapshot K−1, the predictor's input at the jump.
  """
  last = num_snapshots - 1
  train = list(range(1, last - k + 1))
  return {"global": [(i, 0) for i in train], "local": [(i, i - 1) for i in train],
          "target": [(i + k, i) for i in train], "last_global": [(last, 0)], "last_local": [(last, last - 1)]}
