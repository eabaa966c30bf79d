"""Device meshes and shardings.

Data parallelism is `jax.jit` over arrays whose batch axis is sharded on the mesh axis "data" and whose
parameters are replicated; XLA inserts the gradient all-reduce. On CPU, test it with
`XLA_FLAGS=--xla_force_host_platform_device_count=N` set before jax is imported.
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
  each host feeds only its `jax.process_index()` part."""
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


def shard_batch(tree, mesh: Mesh):
  """Place every leaf with its leading axis sharded over the batch axes (its size must divide evenly)."""
  axes = _batch_axes(mesh)
  n = int(np.prod([mesh.shape[a] for a in axes]))

  def put(x):
    if x.shape[0] % n:
      raise ValueError(f"batch axis {x.shape[0]} is not divisible by mesh {'×'.join(axes)}={n}")
    return jax.device_put(x, batch_sharding(mesh))

  return jax.tree.map(put, tree)


def pad_to_multiple(x: jax.Array, multiple: int, axis: int = 0) -> tuple[jax.Array, int]:
  """Zero-pad `axis` up to a multiple (e.g. of the device count for pmap) → (padded, original size)."""
  n = x.shape[axis]
  extra = -n % multiple
  if not extra:
    return x, n
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jax.numpy.pad(x, widths), n
