"""Orbax checkpoints of the whole run state (params, optimiser, step, rng, data cursor) plus JSON metadata.

Orbax writes each step into a temporary directory and renames it when complete, so a run killed during a
save leaves the previous checkpoint as the latest; `restore` never sees a half-written step.

Orbax/tensorstore keep no checksum of array bytes: a flipped bit restores silently. Every save therefore
stores a fingerprint per leaf in the metadata, f = Σ_i w_i·(2i+1) mod 2³² over the leaf's bits w_i
(computed on device, so it also works for arrays sharded over hosts), and `restore` recomputes it and raises
CorruptCheckpoint naming the leaf when they differ.

Multi-host: every process calls `save` and `restore` (orbax coordinates them; the directory must be shared).
Host-local leaves of the state (step, rng, cursor: equal on every host) are saved as replicated global
arrays and restored onto the template's device.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P


class CorruptCheckpoint(ValueError):
  """A checkpoint that cannot be read back as the expected state (missing/corrupt files, other structure)."""


class CheckpointWriteError(OSError):
  """A checkpoint that could not be written (disk full, quota): one message naming it, the last intact one
  and how to resume, instead of orbax's asyncio tracebacks."""


_FULL = (errno.ENOSPC, errno.EDQUOT)


class _HeldLogs(logging.Filter):
  """Holds back the records of a logger while a save runs (re-emitted unless the save ran out of space)."""

  def __init__(self):
    super().__init__()
    self.records: list[logging.LogRecord] = []

  def filter(self, record: logging.LogRecord) -> bool:
    self.records.append(record)
    return False


def _disk_full(e: BaseException | None, seen: int = 0) -> bool:
  """Whether ENOSPC/EDQUOT caused `e`, anywhere in its cause/context chain or exception group (tensorstore
  reports it only as text)."""
  if e is None or seen > 20:
    return False
  if isinstance(e, OSError) and e.errno in _FULL or "No space left on device" in str(e) or "quota" in str(e).lower():
    return True
  if isinstance(e, BaseExceptionGroup) and any(_disk_full(x, seen + 1) for x in e.exceptions):
    return True
  return _disk_full(e.__cause__ or e.__context__, seen + 1)


def _join(t: threading.Thread, deadline: float) -> None:
  """t.join() until `deadline` (time.monotonic), also for a thread `threading.enumerate` lists while it is
  still starting, whose join raises "cannot join thread before it is started": retried until it runs."""
  while time.monotonic() < deadline:
    try:
      return t.join(timeout=max(0.0, deadline - time.monotonic()))
    except RuntimeError:
      time.sleep(0.01)


def _words(x: jax.Array) -> jax.Array:
  """uint32[N]: the bits of x, one word per element (bool/8/16-bit types zero-extended)."""
  if x.dtype == jnp.bool_:
    return x.reshape(-1).astype(jnp.uint32)
  unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
  return jax.lax.bitcast_convert_type(x, unsigned).reshape(-1).astype(jnp.uint32)


@jax.jit
def _fingerprints(tree) -> list[jax.Array]:
  def one(x):
    w = _words(jnp.asarray(x))
    return jnp.sum(w * (2 * jnp.arange(w.size, dtype=jnp.uint32) + 1), dtype=jnp.uint32)
  return [one(x) for x in jax.tree.leaves(tree)]


def fingerprint(tree) -> list[int]:
  """One uint32 per leaf (see the module docstring); equal trees give equal lists."""
  return [int(np.asarray(f.addressable_data(0))) for f in _fingerprints(tree)]


def _host_local(x) -> bool:
  return isinstance(x, jax.Array) and x.is_fully_addressable


def to_global(tree):
  """Multi-host: orbax saves only global arrays, so each host-local leaf (step, rng, cursor, …: the same
  value on every host) becomes an array replicated over all devices. One process: unchanged."""
  if jax.process_count() == 1:
    return tree
  everywhere = NamedSharding(Mesh(np.asarray(jax.devices()), ("all",)), P())
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(everywhere, np.asarray(x), x.shape)
                      if _host_local(x) else x, tree)


def like_template(restored, template):
  """Undo `to_global`: leaves that are host-local in `template` come back host-local (uncommitted, so
  they join computations on any device, as fresh `jnp` values do)."""
  if jax.process_count() == 1:
    return restored
  return jax.tree.map(lambda x, t: jnp.asarray(np.asarray(x.addressable_data(0))) if _host_local(t) else x,
                      restored, template)


class Checkpointer:
  """Save/restore `state` (any pytree of arrays) and `meta` (JSON) under directory/<step>/."""

  def __init__(self, directory: str | os.PathLike, max_to_keep: int | None = 3, read_only: bool = False):
    """read_only: only read (no directory created, no temporary directory of a killed save removed)."""
    self.directory = Path(directory).absolute()
    policy = ocp.checkpoint_managers.LatestN(max_to_keep) if max_to_keep and not read_only else None
    options = ocp.CheckpointManagerOptions(create=not read_only, enable_async_checkpointing=False,
                                           preservation_policy=policy, cleanup_tmp_directories=not read_only,
                                           read_only=read_only)
    self._mngr = ocp.CheckpointManager(self.directory, options=options)
    if max_to_keep and not read_only:  # a kill between a save's commit and orbax's pruning leaves one more
      for step in sorted(self.all_steps())[:-max_to_keep]:
        self._mngr.delete(step)

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._mngr.all_steps())

  def save(self, step: int, state, meta: dict[str, Any] | None = None) -> None:
    """Write a complete checkpoint for `step` (synchronously; atomic by rename)."""
    meta = {**(meta or {}), "fingerprint": fingerprint(state)}
    args = ocp.args.Composite(state=ocp.args.StandardSave(to_global(state)), meta=ocp.args.JsonSave(meta))
    held, threads = _HeldLogs(), set(threading.enumerate())
    logging.getLogger("absl").addFilter(held)  # orbax logs a traceback per writer thread when a save fails
    try:
      self._mngr.save(step, args=args, force=True)
      self._mngr.wait_until_finished()
    except Exception as e:
      if not _disk_full(e):
        raise
      deadline = time.monotonic() + 10
      for t in set(threading.enumerate()) - threads:  # let orbax's other writer threads stop first
        _join(t, deadline)
      held.records.clear()
      raise CheckpointWriteError(self._full_message(step)) from None
    finally:
      logging.getLogger("absl").removeFilter(held)
      for record in held.records:
        logging.getLogger("absl").handle(record)

  def _full_message(self, step: int) -> str:
    """The disk-full message (orbax removes the failed save's temporary directory on the next start)."""
    intact = [s for s in self.all_steps() if s != step]
    last = (f"the last intact checkpoint is step {max(intact)} ({self.directory}/{max(intact)}); free space, then "
            "resume from it with --config.ckpt.resume=True" if intact else
            "no checkpoint of this run was written yet; free space, then start it again")
    return f"checkpoint {step}: no space left on the device writing {self.directory}/{step}; {last}"

  def read_meta(self, step: int | None = None) -> dict[str, Any]:
    """The JSON metadata of `step` (default: the latest) without reading the arrays."""
    step = self.latest_step() if step is None else step
    where = f"{self.directory}/{step}"
    try:
      meta = self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    except Exception as e:  # noqa: BLE001
      raise CorruptCheckpoint(f"{where}: cannot read its metadata ({type(e).__name__}: {str(e)[:300]})") from e
    if not isinstance(meta, dict):
      raise CorruptCheckpoint(f"{where}: its metadata is a JSON {type(meta).__name__}, not an object")
    return meta

  def restore(self, template, step: int | None = None):
    """→ (state with template's structure/shardings, meta). template: a state of the right shapes.
    A damaged checkpoint raises CorruptCheckpoint, naming the newest other step that restores intact."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"{self.directory}: no checkpoint to restore")
    try:
      return self._restore(template, step)
    except CorruptCheckpoint as e:
      raise CorruptCheckpoint(f"{e}{self._hint(template, step)}") from e

  def _hint(self, template, step: int) -> str:
    for s in sorted((s for s in self.all_steps() if s != step), reverse=True):
      try:
        self._restore(template, s)
      except CorruptCheckpoint:
        continue
      return f"; step {s} is intact: delete {self.directory}/{step} to resume from step {s} instead"
    return "; no other checkpoint in this directory is intact"

  def _restore(self, template, step: int):
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, to_global(template))
    where = f"{self.directory}/{step}"
    try:
      out = self._mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                             meta=ocp.args.JsonRestore()))
    except Exception as e:  # noqa: BLE001  (tensorstore raises bare Exception on unreadable data)
      raise CorruptCheckpoint(f"{where}: cannot restore the run state: files missing or corrupt, or a state "
                              f"of another structure ({type(e).__name__}: {str(e)[:300]})") from e
    if not isinstance(out.meta, dict):
      raise CorruptCheckpoint(f"{where}: its metadata is a JSON {type(out.meta).__name__}, not an object")
    meta, state = dict(out.meta), like_template(out.state, template)
    want = meta.pop("fingerprint", None)
    if not isinstance(want, list):
      raise CorruptCheckpoint(f"{where}: its metadata has no fingerprint list, so its array data cannot be "
                              "verified (every checkpoint this code writes has one)")
    got = fingerprint(state)
    bad = [jax.tree_util.keystr(p) for (p, _), a, b in
           zip(jax.tree_util.tree_flatten_with_path(state)[0], want, got) if a != b]
    if bad or len(want) != len(got):
      raise CorruptCheckpoint(f"{where}: array data does not match the fingerprint written with it "
                              f"(corrupt: {', '.join(bad[:3]) or 'leaf count'})")
    return state, meta

  def close(self) -> None:
    self._mngr.close()
