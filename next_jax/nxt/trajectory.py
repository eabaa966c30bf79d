"""A weight trajectory: K snapshots of every trained matrix, and what they are.

Every consumer (the extrapolation methods, the drift measures, the post-hoc analyses) takes a `Trajectory`;
the state machine makes one from its state (`state_machine.trajectory`), `next_jax.nxt.runs` from a run's
checkpoints. Snapshot 0 is W₀, the start of the observation window. Layouts, stacked per module:
    LoRA   {module: {"a": [K, L, r, n], "b": [K, L, m, r]}}   W_i = W_base + s·(B_i A_i)ᵀ (our [in, out])
    dense  {module: {"kernel": [K, L, n, m]}}                  the kernels themselves (full-parameter runs)
Differences of snapshots are always formed from these: a LoRA trajectory never stores a dense matrix.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from next_jax.nxt import rank1
from next_jax.nxt.rank1 import Triplet
from next_jax.rl import trained as trained_lib


def delta_gram(mod, scale: float, lora: bool) -> jax.Array:
  """Γ[l, s, t] = ⟨W_s − W₀, W_t − W₀⟩_F of one module's snapshots: [L, K, K] (row/column 0 are zero).

  mod: LoRA (lora=True) {"a": [K, L, r, n], "b": [K, L, m, r]} (scale = LoRA α/r) or dense
  {"kernel": [K, L, n, m]} (`Trajectory.gram` passes the trajectory's own scale and layout)."""
  if lora:
    a0, b0 = mod["a"][0], mod["b"][0]
    num = mod["a"].shape[0]
    a = jnp.concatenate([mod["a"], jnp.broadcast_to(a0, (num, *a0.shape))], axis=-2)  # [K, L, 2r, n]
    b = jnp.concatenate([mod["b"], jnp.broadcast_to(-b0, (num, *b0.shape))], axis=-1)  # [K, L, m, 2r]
    bb = jnp.einsum("slmr,tlmq->lstrq", b.astype(jnp.float32), b.astype(jnp.float32))
    aa = jnp.einsum("slrn,tlqn->lstrq", a.astype(jnp.float32), a.astype(jnp.float32))
    gram = scale * scale * (bb * aa).sum((-1, -2))
  else:
    d = (mod["kernel"] - mod["kernel"][0]).astype(jnp.float32)
    gram = jnp.einsum("slnm,tlnm->lst", d, d)
  return gram.at[:, 0, :].set(0.0).at[:, :, 0].set(0.0)  # exact zeros, not rounding noise


@dataclasses.dataclass(frozen=True)
class Trajectory:
  """snapshots: the stacked factors or kernels (layout above); steps: int[K] RL step of each snapshot;
  scale: the LoRA scale s = α/r (1 for dense); lora: which layout; untrained: {"a/b/c": shape} of the base
  parameters the snapshots do not cover (those never trained: norms, embeddings, untargeted modules)."""

  snapshots: dict
  steps: np.ndarray
  scale: float = 1.0
  lora: bool = True
  untrained: dict = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    leaf = "a" if self.lora else "kernel"
    bad = [m for m, mod in self.snapshots.items() if leaf not in mod]
    if bad:
      raise ValueError(f"Trajectory(lora={self.lora}): modules {bad} have no {leaf!r} leaf")
    if len(self.steps) != self.num:
      raise ValueError(f"Trajectory: {len(self.steps)} steps for {self.num} snapshots")

  @property
  def num(self) -> int:
    """K, the number of snapshots."""
    mod = next(iter(self.snapshots.values()))
    return mod["a" if self.lora else "kernel"].shape[0]

  @property
  def interval(self) -> int:
    return int(self.steps[1] - self.steps[0])

  def window(self, last: int) -> Trajectory:
    """Snapshots 0 … `last` only (what a method saw at that point)."""
    snaps = jax.tree.map(lambda x: x[:last + 1], self.snapshots)
    return dataclasses.replace(self, snapshots=snaps, steps=self.steps[:last + 1])

  def at(self, i: int) -> dict:
    """The trained matrices of snapshot i ({module: {"a", "b"} or {"kernel"}})."""
    return jax.tree.map(lambda x: x[i], self.snapshots)

  def delta(self, module: str, i: int, j: int) -> jax.Array:
    """Dense W_i − W_j of one module in our layout [L, n, m]."""
    mod = self.snapshots[module]
    if self.lora:
      w = lambda t: jnp.einsum("lri,lor->lio", mod["a"][t], mod["b"][t])  # noqa: E731
      return self.scale * (w(i) - w(j))
    return mod["kernel"][i] - mod["kernel"][j]

  def deltas(self, i: int, j: int) -> dict[str, jax.Array]:
    """{module: W_i − W_j [L, n, m]}."""
    return {m: self.delta(m, i, j) for m in self.snapshots}

  def gram(self, module: str) -> jax.Array:
    """Γ[l, s, t] = ⟨W_s − W₀, W_t − W₀⟩_F of one module: [L, K, K] (`delta_gram`)."""
    return delta_gram(self.snapshots[module], self.scale, self.lora)

  def triplets(self, pairs, sign: str, devices: str = "pmap", max_batch: int = 256) -> dict[str, Triplet]:
    """Top triplets of W_i − W_j for each (i, j) in pairs → {module: Triplet [len(pairs), L, ...]}.

    LoRA: exact from the factors (rank ≤ 2r); dense: SVD of (W_i − W_j)ᵀ ([out, in]). Pairs go in chunks
    of ≤ max_batch matrices, which bounds memory at paper scale."""
    out = {}
    for name, mod in self.snapshots.items():
      layers = (mod["a"] if self.lora else mod["kernel"]).shape[1]
      step = max(1, max_batch // layers)
      parts = [self._chunk_triplets(mod, pairs[s:s + step], sign, devices) for s in range(0, len(pairs), step)]
      t = jax.tree.map(lambda *xs: jnp.concatenate(xs), *parts)
      out[name] = jax.tree.map(lambda x, n=len(pairs): x.reshape(n, -1, *x.shape[1:]), t)
    return out

  def _chunk_triplets(self, mod, pairs, sign, devices) -> Triplet:
    """Triplets of one module for a few pairs, flattened to [len(pairs)·L, ...]."""
    if self.lora:
      i, j = (jnp.asarray(x, jnp.int32) for x in zip(*pairs))
      p, q = rank1.pair_factors(mod["a"], mod["b"], i, j)  # [n_pairs·L, m, 2r], [n_pairs·L, 2r, n]
      return rank1.batched_factored_triplets(p, q, self.scale, sign, devices)
    d = jnp.stack([jnp.swapaxes(mod["kernel"][i] - mod["kernel"][j], -1, -2) for i, j in pairs])
    return rank1.batched_dense_triplets(d.reshape(-1, *d.shape[2:]), sign, devices)

  def global_triplets(self, sign: str = "none") -> dict[str, Triplet]:
    """Triplets of G_i = W_i − W₀ for i = 1 … K−1 → {module: Triplet [K−1, L, ...]}."""
    return self.triplets([(i, 0) for i in range(1, self.num)], sign)


def untrained_leaves(params, trained: set[str]) -> dict[str, tuple[int, ...]]:
  """{"a/b/c": shape} of every leaf of `params` whose path is not in `trained` (e.g. "layers/q/kernel")."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  out = {}
  for path, leaf in flat:
    name = trained_lib.leaf_name(path)
    if name not in trained:
      out[name] = tuple(leaf.shape)
  return out
