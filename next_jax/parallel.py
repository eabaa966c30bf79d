"""Device meshes and shardings.

Data parallelism is `jax.jit` over arrays whose batch axis is sharded on the mesh axis "data" and whose
parameters are replicated; XLA inserts the gradient all-reduce. On CPU, test it with
`XLA_FLAGS=--xla_force_host_platform_device_count=N` set before jax is imported.

Multi-host, a process touches only the batch rows its devices hold: `process_rows` names them,
`from_process_rows` builds the global array from each host's rows, `local_rows` reads them back without
communication, and `host_array` all-gathers a small per-row vector (rewards) when every host needs it.
"""

from __future__ import annotations

import numpy as np
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA = "data"


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


def make_mesh(data: int | None = None, devices=None) -> Mesh:
  """A 1-D mesh ("data",) over `data` devices (default: all)."""
  devices = list(devices if devices is not None else jax.devices())
  data = data or len(devices)
  if data > len(devices):
    raise ValueError(f"mesh data={data} > {len(devices)} available devices")
  return Mesh(np.asarray(devices[:data]), (DATA,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def _batch_axes(mesh: Mesh) -> tuple[str, ...]:
  """"data", plus "fsdp" on a sharding.make_mesh mesh (FSDP splits the batch too)."""
  return tuple(a for a in (DATA, "fsdp") if a in mesh.axis_names)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over "data" (and "fsdp" when the mesh has it), other axes replicated."""
  axes = _batch_axes(mesh)
  return NamedSharding(mesh, P(axes[0] if len(axes) == 1 else axes))


def _check_divisible(rows: int, mesh: Mesh) -> None:
  axes = _batch_axes(mesh)
  n = int(np.prod([mesh.shape[a] for a in axes]))
  if rows % n:
    raise ValueError(f"batch axis {rows} is not divisible by mesh {'×'.join(axes)}={n}")


def shard_batch(tree, mesh: Mesh):
  """Place every leaf with its leading axis sharded over the batch axes (its size must divide evenly).
  Every process passes the whole batch (single-process use; see from_process_rows for multi-host)."""

  def put(x):
    _check_divisible(x.shape[0], mesh)
    return jax.device_put(x, batch_sharding(mesh))

  return jax.tree.map(put, tree)


# ------------------------------------------------------------------------- per-process rows (multi-host)


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


def pad_to_multiple(x: jax.Array, multiple: int, axis: int = 0) -> tuple[jax.Array, int]:
  """Zero-pad `axis` up to a multiple (e.g. of the device count for pmap) → (padded, original size)."""
  n = x.shape[axis]
  extra = -n % multiple
  if not extra:
    return x, n
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jax.numpy.pad(x, widths), n
