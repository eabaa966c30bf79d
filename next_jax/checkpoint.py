"""Orbax checkpoints of the whole run state (params, optimiser, step, rng, data cursor) plus JSON metadata.

Orbax writes each step into a temporary directory and renames it when complete, so a run killed during a
save leaves the previous checkpoint as the latest; `restore` never sees a half-written step.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """Save/restore `state` (any pytree of arrays) and `meta` (JSON) under directory/<step>/."""

  def __init__(self, directory: str | os.PathLike, max_to_keep: int | None = 3):
    self.directory = Path(directory).absolute()
    policy = ocp.checkpoint_managers.LatestN(max_to_keep) if max_to_keep else None
    options = ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False,
                                           preservation_policy=policy, cleanup_tmp_directories=True)
    self._mngr = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._mngr.all_steps())

  def save(self, step: int, state, meta: dict[str, Any] | None = None) -> None:
    """Write a complete checkpoint for `step` (synchronously; atomic by rename)."""
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta or {}))
    self._mngr.save(step, args=args, force=True)
    self._mngr.wait_until_finished()

  def restore(self, template, step: int | None = None):
    """→ (state with template's structure/shardings, meta). template: a state of the right shapes."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"{self.directory}: no checkpoint to restore")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    try:
      out = self._mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                             meta=ocp.args.JsonRestore()))
    except (ValueError, KeyError, FileNotFoundError) as e:
      raise ValueError(f"{self.directory}/{step}: cannot restore a state of the expected structure "
                       f"({type(e).__name__}: {e})") from e
    return out.state, dict(out.meta)

  def close(self) -> None:
    self._mngr.close()
