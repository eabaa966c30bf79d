"""The mesh module: device meshes, batch shardings, each host's rows, pmap padding, partition rules.

    data    batch split; parameters replicated across it (pure data parallelism)
    fsdp    batch split AND every large matrix split along its model dimension D (ZeRO-3 / FSDP:
            XLA all-gathers one layer's weights inside the layer scan and reduce-scatters its gradient)
    tensor  Megatron split: heads / intermediate F / vocabulary V over devices

`make_mesh` gives the 1-D ("data",) mesh when fsdp = tensor = 1 and the ("data", "fsdp", "tensor") mesh
otherwise. Data parallelism is `jax.jit` over arrays whose batch axis is split over the batch axes
(`BATCH`: "data", and "fsdp" where the mesh has it) with parameters replicated; XLA inserts the gradient
all-reduce. On CPU, test it with `XLA_FLAGS=--xla_force_host_platform_device_count=N` set before jax is
imported.

Multi-host, a process touches only the batch rows its devices hold: `process_rows` names them,
`from_process_rows` builds the global array from each host's rows, `local_rows` reads them back without
communication, and `host_array` all-gathers a small per-row vector (rewards) when every host needs it.

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
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA, FSDP, TENSOR = "data", "fsdp", "tensor"
AXES = (DATA, FSDP, TENSOR)
BATCH = (DATA, FSDP)  # the batch axes: FSDP splits the batch as well as the weights

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
# KV cache k, v: [L, B, KVH, S, hd]; activations x: [B, T, D].
CACHE_DIMS = (None, BATCH, TENSOR, None, None)
ACTIVATION_DIMS = (BATCH, None, None)


# ------------------------------------------------------------------------------------------- mesh


def initialize_distributed(coordinator_address: str = "", num_processes: int = 0,
                           process_id: int = -1) -> None:
  """`jax.distributed.initialize` for multi-host runs (call once, before any other JAX work).

  Empty/zero/negative fields are left for JAX to discover (Cloud TPU, SLURM, Open MPI environments).
  Every host then sees all devices in `jax.devices()`; a mesh over them shards the batch across hosts and
  each host feeds only its rows (`process_rows`). A second call is a no-op."""
  if jax.distributed.is_initialized():
    return
  kwargs = {}
  if coordinator_address:
    kwargs["coordinator_address"] = coordinator_address
  if num_processes:
    kwargs["num_processes"] = num_processes
  if process_id >= 0:
    kwargs["process_id"] = process_id
  jax.distributed.initialize(**kwargs)


def make_mesh(data: int = 0, fsdp: int = 1, tensor: int = 1, devices=None) -> Mesh:
  """A mesh over the first data·fsdp·tensor of `devices` (default: all); data=0 takes all that remain.

  fsdp = tensor = 1 gives the 1-D ("data",) mesh (pure data parallelism), otherwise the axes are
  ("data", "fsdp", "tensor"). Axes are `Auto` (GSPMD propagates shardings; `with_sharding_constraint` is
  a hint, not an assert)."""
  devices = list(devices if devices is not None else jax.devices())
  if fsdp < 1 or tensor < 1 or data < 0:
    raise ValueError(f"mesh data={data}, fsdp={fsdp}, tensor={tensor}: fsdp, tensor ≥ 1 and data ≥ 0")
  data = data or len(devices) // (fsdp * tensor)
  n = data * fsdp * tensor
  if n == 0 or n > len(devices):
    raise ValueError(f"mesh data×fsdp×tensor = {data}×{fsdp}×{tensor} = {n} needs ≥1 and ≤ "
                     f"{len(devices)} available devices")
  grid = np.asarray(devices[:n])
  if fsdp * tensor == 1:
    return Mesh(grid, (DATA,))
  return Mesh(grid.reshape(data, fsdp, tensor), AXES)


def use_mesh(mesh: Mesh | None):
  """`jax.set_mesh(mesh)` (activates `constrain`), or a null context for mesh=None."""
  return jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()


def batch_axes(axis_sizes: Mapping[str, int]) -> tuple[str, ...]:
  """The batch axes present in a mesh (`mesh.shape`, or a plain {axis: size} dict)."""
  return tuple(a for a in BATCH if a in axis_sizes)


# -------------------------------------------------------------------------------- batch placement


def replicated(mesh: Mesh) -> NamedSharding:
  """Every device holds the whole array (parameters under data parallelism)."""
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over the mesh's batch axes, other axes replicated."""
  axes = batch_axes(mesh.shape)
  return NamedSharding(mesh, P(axes[0] if len(axes) == 1 else axes))


def _check_divisible(rows: int, mesh: Mesh) -> None:
  """ValueError unless `rows` splits evenly over the mesh's batch axes."""
  axes = batch_axes(mesh.shape)
  n = math.prod(mesh.shape[a] for a in axes)
  if rows % n:
    raise ValueError(f"batch axis {rows} is not divisible by mesh {'×'.join(axes)}={n}")


def shard_batch(tree, mesh: Mesh):
  """Place every leaf with its leading axis sharded over the batch axes (its size must divide evenly).
  Every process passes the whole batch (single-process use; see from_process_rows for multi-host)."""

  def put(x):
    _check_divisible(x.shape[0], mesh)
    return jax.device_put(x, batch_sharding(mesh))

  return jax.tree.map(put, tree)


# ------------------------------------------------------------------ per-process rows (multi-host)


def process_rows(mesh: Mesh | None, n: int) -> np.ndarray:
  """int[n_local]: global indices, ascending, of the rows of a batch-sharded [n, ...] array that this
  process's devices hold. A data axis spanning P processes gives each a contiguous n/P block (process
  order); one process, or no mesh, holds all n rows."""
  if mesh is None:
    return np.arange(n)
  _check_divisible(n, mesh)
  index = batch_sharding(mesh).addressable_devices_indices_map((n,))
  return np.unique(np.concatenate([np.arange(n)[idx[0]] for idx in index.values()]))


def from_process_rows(tree, mesh: Mesh | None, n: int):
  """The global batch-sharded [n, ...] arrays whose rows `process_rows(mesh, n)` are this process's
  leaves (`jax.make_array_from_process_local_data`: each host supplies only its rows). No mesh: unchanged."""
  if mesh is None:
    return tree
  _check_divisible(n, mesh)
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x),
                                                                       (n, *np.shape(x)[1:])), tree)


def local_rows(x) -> np.ndarray:
  """This process's rows of a batch-sharded array, in `process_rows` order, read from its own devices
  (no communication). Shards that differ only along a replicated axis are read once."""
  if not isinstance(x, jax.Array) or x.is_fully_addressable:
    return np.asarray(x)
  blocks = {s.index[0].indices(x.shape[0])[0]: s.data for s in x.addressable_shards}
  return np.concatenate([np.asarray(blocks[start]) for start in sorted(blocks)])


def host_array(x) -> np.ndarray:
  """The full value of a (possibly multi-host sharded) array on every host: `process_allgather` when it
  spans processes. Meant for small per-row vectors (rewards, lengths), not token arrays."""
  if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
    return np.asarray(x)
  from jax.experimental import multihost_utils  # noqa: PLC0415
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


# ----------------------------------------------------------------------------------- pmap padding


def pad_to_multiple(x: jax.Array, multiple: int, axis: int = 0) -> tuple[jax.Array, int]:
  """Zero-pad `axis` up to a multiple (e.g. of the device count for pmap) → (padded, original size)."""
  n = x.shape[axis]
  extra = -n % multiple
  if not extra:
    return x, n
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jax.numpy.pad(x, widths), n


# ------------------------------------------------------------------------------------------ specs


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
  """The trailing-dim axis wishes of the first rule whose pattern matches `path` (none: replicated)."""
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
  """A PartitionSpec is a leaf (it is a tuple, which jax.tree would descend into)."""
  return isinstance(x, P)


# ------------------------------------------------------------------------------------ constraints


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
  """KV cache k, v [L, B, KVH, S, hd]: batch over data×fsdp, KV heads over tensor; key_mask [B, S]."""
  return cache.replace(k=constrain(cache.k, CACHE_DIMS), v=constrain(cache.v, CACHE_DIMS),
                       key_mask=constrain(cache.key_mask, (BATCH, None)))
