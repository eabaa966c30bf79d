"""Named meshes ("data", "fsdp", "tensor") and partition rules for params, LoRA, optimiser state, KV cache.

    data    batch split; parameters replicated across it (pure data parallelism)
    fsdp    batch split AND every large matrix split along its model dimension D (ZeRO-3 / FSDP:
            XLA all-gathers one layer's weights inside the layer scan and reduce-scatters its gradient)
    tensor  Megatron split: heads / intermediate F / vocabulary V over devices

Rules match a leaf's path ("layers/q/kernel", "mu/q/a", …) with `re.search`, first match wins, and give
the partition of the leaf's *trailing* dims, so one rule serves a stacked [L, in, out] kernel, its optimiser
moments and a [K, L, in, out] trajectory alike:

    q,k,v,gate,up kernel [.., D, out]  → (fsdp, tensor)     o,down kernel [.., in, D] → (tensor, fsdp)
    q,k,v bias [.., out]               → (tensor,)          norms                     → replicated
    embed [V, D]                       → (tensor, fsdp)     lm_head [D, V]            → (fsdp, tensor)
    LoRA a [.., r, in], b [.., out, r] → the kernel's split of `in` / `out`; r is never split

A mesh axis is dropped from a dim it does not divide (e.g. 4 KV heads·128 on tensor=3), so every spec is
valid for every shape; `fit_dims` is the one place that decides this. Activations are constrained at layer
boundaries with `constrain`, a no-op outside `jax.set_mesh` (one device, or the 1-D data mesh stays as is).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import re
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA, FSDP, TENSOR = "data", "fsdp", "tensor"
AXES = (DATA, FSDP, TENSOR)
BATCH = (DATA, FSDP)  # FSDP splits the batch as well as the weights

_IN_D = r"(^|/)(q|k|v|gate|up)/"  # projections whose input is the model dim D
_OUT_D = r"(^|/)(o|down)/"  # projections whose output is D
RULES: tuple[tuple[str, tuple], ...] = (
    (_IN_D + r"kernel$", (FSDP, TENSOR)),
    (_OUT_D + r"kernel$", (TENSOR, FSDP)),
    (_IN_D + r"bias$", (TENSOR,)),
    (_IN_D + r"a$", (None, FSDP)),
    (_IN_D + r"b$", (TENSOR, None)),
    (_OUT_D + r"a$", (None, TENSOR)),
    (_OUT_D + r"b$", (FSDP, None)),
    (r"(^|/)embed$", (TENSOR, FSDP)),
    (r"(^|/)lm_head$", (FSDP, TENSOR)),
    (r"norm$", ()),
)
# KV cache k, v: [L, B, S, KVH, hd]; activations x: [B, T, D].
CACHE_DIMS = (None, BATCH, None, TENSOR, None)
ACTIVATION_DIMS = (BATCH, None, None)


# ----------------------------------------------------------------------------------------------- mesh


def make_mesh(data: int = 0, fsdp: int = 1, tensor: int = 1, devices=None) -> Mesh:
  """A ("data", "fsdp", "tensor") mesh over data·fsdp·tensor devices; data=0 takes all that remain.

  Axes are `Auto` (GSPMD propagates shardings; `with_sharding_constraint` is a hint, not an assert)."""
  devices = list(devices if devices is not None else jax.devices())
  if fsdp < 1 or tensor < 1 or data < 0:
    raise ValueError(f"mesh data={data}, fsdp={fsdp}, tensor={tensor}: fsdp, tensor ≥ 1 and data ≥ 0")
  data = data or len(devices) // (fsdp * tensor)
  n = data * fsdp * tensor
  if n == 0 or n > len(devices):
    raise ValueError(f"mesh data×fsdp×tensor = {data}×{fsdp}×{tensor} = {n} needs ≥1 and ≤ "
                     f"{len(devices)} available devices")
  return Mesh(np.asarray(devices[:n]).reshape(data, fsdp, tensor), AXES)


def use_mesh(mesh: Mesh | None):
  """`jax.set_mesh(mesh)` (activates `constrain`), or a null context for mesh=None."""
  return jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()


def batch_axes(axis_sizes: Mapping[str, int]) -> tuple[str, ...]:
  return tuple(a for a in BATCH if a in axis_sizes)


# ------------------------------------------------------------------------------------------- specs


def fit_dims(shape: Sequence[int], dims: Sequence, axis_sizes: Mapping[str, int]) -> P:
  """PartitionSpec for `shape` from per-dim axis wishes aligned to its trailing dims.

  Each wish is None, an axis name or a tuple of names; of the wished axes present in the mesh, the
  (order-keeping) subset with the largest product that divides the dim is kept: a batch of 8 on
  data=2 × fsdp=8 splits 8 ways over fsdp, not 2 over data. Leading dims beyond `dims` are replicated."""
  dims = tuple(dims)[-len(shape):] if shape else ()
  dims = (None,) * (len(shape) - len(dims)) + dims
  out = []
  for size, wish in zip(shape, dims):
    names = [a for a in ((wish,) if isinstance(wish, str) else tuple(wish or ())) if a in axis_sizes]
    subsets = (c for k in range(len(names), 0, -1) for c in itertools.combinations(names, k))
    fitting = [c for c in subsets if size % math.prod(axis_sizes[a] for a in c) == 0]
    kept = max(fitting, key=lambda c: math.prod(axis_sizes[a] for a in c), default=())
    out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  return P(*out)


def path_str(path) -> str:
  """"layers/q/kernel" from a tree path of dict keys, attributes and sequence indices."""
  parts = []
  for k in path:
    parts.append(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))))
  return "/".join(parts)


def rule_dims(path: str, rules=RULES) -> tuple:
  for pattern, dims in rules:
    if re.search(pattern, path):
      return dims
  return ()


def partition_specs(tree, axis_sizes: Mapping[str, int], rules=RULES):
  """PartitionSpec pytree for params, LoRA, optimiser state or trajectory (arrays or ShapeDtypeStructs).
  axis_sizes: `mesh.shape` of a Mesh or AbstractMesh, or a plain {axis: size} dict."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: fit_dims(x.shape, rule_dims(path_str(path), rules), axis_sizes), tree)


def named_shardings(tree, mesh, rules=RULES):
  """NamedSharding pytree on a Mesh (or an AbstractMesh: shardings of paper-scale shapes without devices)."""
  return jax.tree.map(lambda s: NamedSharding(mesh, s), partition_specs(tree, mesh.shape, rules))


def shard(tree, mesh: Mesh, rules=RULES):
  """device_put every leaf per the rules (a host array goes straight to its shards)."""
  return jax.device_put(tree, named_shardings(tree, mesh, rules))


def shard_bytes(shape: Sequence[int], itemsize: int, spec: P, axis_sizes: Mapping[str, int]) -> int:
  """Bytes one device holds of an array of `shape` partitioned by `spec` (dims divide: see fit_dims)."""
  n = math.prod(shape) * itemsize
  for wish in spec:
    for a in (wish,) if isinstance(wish, str) else tuple(wish or ()):
      n //= axis_sizes[a]
  return n


def tree_shard_bytes(tree, axis_sizes: Mapping[str, int], rules=RULES) -> int:
  """Per-device bytes of a pytree sharded by the rules."""
  specs = partition_specs(tree, axis_sizes, rules)
  return sum(shard_bytes(x.shape, np.dtype(x.dtype).itemsize, s, axis_sizes)
             for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(specs, is_leaf=_is_spec)))


def _is_spec(x) -> bool:
  return isinstance(x, P)


# ------------------------------------------------------------------------------------- constraints


def constrain(x: jax.Array, dims: Sequence) -> jax.Array:
  """`with_sharding_constraint(x, fit_dims(x.shape, dims, active mesh))` inside `jax.set_mesh`; else x.
  Axes missing from the active mesh or not dividing a dim are dropped (so a 1-D data mesh works too)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, fit_dims(x.shape, dims, mesh.shape))


def constrain_activation(x: jax.Array) -> jax.Array:
  """Residual stream x [B, T, D]: batch over data×fsdp, replicated over tensor (layer boundaries)."""
  return constrain(x, ACTIVATION_DIMS)


def constrain_cache(cache):
  """KV cache k, v [L, B, S, KVH, hd]: batch over data×fsdp, KV heads over tensor; key_mask [B, S]."""
  return cache.replace(k=constrain(cache.k, CACHE_DIMS), v=constrain(cache.v, CACHE_DIMS),
                       key_mask=constrain(cache.key_mask, (BATCH, None)))
