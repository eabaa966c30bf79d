"""A run's working directory: config.json, checkpoints, metrics, results.json; and what a resume may change.

A workdir holds one run. Starting in one that holds a run needs ckpt.resume (same config, up to the RESUMABLE
fields and those named in ckpt.allow_changes) or ckpt.overwrite (wiped first). Every check here runs before
anything is written (`experiment.run` checks, builds and restores, then `prepare`s), so a refused start
leaves the disk untouched. A run holds an exclusive lock on workdir/.lock (`locked`) for its whole life; a
second run (or a resume) of the same workdir is refused while it lives, and a lock left by a killed run
does not count (outdir.lock). Multi-host: the workdir is shared (orbax needs it) and process 0 writes and
locks.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax

from next_jax.core import outdir
from next_jax.core.checkpoint import Checkpointer
from next_jax.core.config import ConfigError
from next_jax.core.config import check as _check
from next_jax.core.metrics import is_primary


def check_path(workdir: str) -> None:
  """workdir names a directory that can exist: not a file, not under a file."""
  wd = Path(workdir)
  _check(bool(workdir) and not wd.is_file(), "workdir", workdir, "is a file, not a directory")
  under = next((p for p in wd.parents if p.exists() and not p.is_dir()), None)
  _check(under is None, "workdir", workdir, f"lies under {under}, which is a file")


# fields a resumed run may change (the last two differ per launch and per host); any other change is refused
RESUMABLE = ("ckpt.", "log.", "workdir", "mesh.coordinator_address", "mesh.process_id")


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
  """{"rl": {"lr": 1e-3}} → {"rl.lr": 1e-3}."""
  out = {}
  for k, v in d.items():
    out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
  return out


def _has_run(wd: Path) -> bool:
  return (wd / "ckpt").is_dir() and any((wd / "ckpt").iterdir())


LOCK = ".lock"


def _what(c) -> str:
  return f"config.workdir={c.workdir!r}"


def check(c) -> bool:
  """→ whether workdir holds a run to resume. Refuses a workdir another live run holds, and to mix two runs:
  an existing run needs ckpt.resume (with the same config, up to RESUMABLE fields) or ckpt.overwrite.
  Touches nothing."""
  wd = Path(c.workdir)
  try:
    outdir.check_unlocked(wd / LOCK, _what(c))
  except outdir.Busy as e:
    raise ConfigError(str(e)) from None
  has_run = _has_run(wd)
  if has_run and not (c.ckpt.resume or c.ckpt.overwrite):
    raise ConfigError(f"config.workdir={c.workdir!r} already holds a run; pass --config.ckpt.resume=True "
                      "to continue it or --config.ckpt.overwrite=True to replace it")
  if has_run and c.ckpt.resume:
    resume_changes(c)
  return has_run and bool(c.ckpt.resume)


def allowed_changes(c) -> set[str]:
  """The fields ckpt.allow_changes names (comma-separated); each must be a config field."""
  fields = {f.strip() for f in c.ckpt.allow_changes.split(",") if f.strip()}
  known = _flat(json.loads(c.to_json()))
  _check(fields <= known.keys(), "ckpt.allow_changes", c.ckpt.allow_changes,
         f"names no config field: {sorted(fields - known.keys())}")
  return fields


def resume_changes(c) -> list[dict[str, Any]]:
  """The fields a resume changes that ckpt.allow_changes permits ([{field, old, new}], recorded in
  results.json); any other change (outside RESUMABLE) raises ConfigError naming the fields."""
  new, allowed = _flat(json.loads(c.to_json())), allowed_changes(c)
  allowed_diff: dict[str, dict[str, Any]] = {}
  for source, old in _saved_configs(Path(c.workdir)):
    diff = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k) and not k.startswith(RESUMABLE))
    refused = [k for k in diff if k not in allowed]
    if refused:
      changes = "; ".join(f"{k}: {old.get(k)!r} → {new.get(k)!r}" for k in refused[:5])
      raise ConfigError(f"config.ckpt.resume=True but {', '.join(refused[:5])} differ from the run in "
                        f"{c.workdir!r} ({changes}; from {source}); resume with the same config, name the "
                        "fields in ckpt.allow_changes, or start a new workdir")
    allowed_diff.update({k: {"field": k, "old": old.get(k), "new": new.get(k)} for k in diff})
  return list(allowed_diff.values())


def _saved_configs(wd: Path) -> list[tuple[str, dict[str, Any]]]:
  """The run's configs to compare a resume with: the latest checkpoint's own copy (it decides) and
  config.json. A run with neither cannot be checked, and is refused."""
  out = []
  ckpt = Checkpointer(wd / "ckpt", read_only=True)
  step = ckpt.latest_step()
  if step is not None:
    saved = ckpt.read_meta(step).get("config")
    if saved is not None:
      out.append((f"checkpoint {wd / 'ckpt' / str(step)}", _flat(saved)))
  ckpt.close()
  if (wd / "config.json").is_file():
    try:
      out.append(("config.json", _flat(json.loads((wd / "config.json").read_text()))))
    except (json.JSONDecodeError, AttributeError) as e:
      raise ConfigError(f"config.workdir={str(wd)!r}: config.json is not a JSON object ({e})") from e
  if not out:
    raise ConfigError(f"config.ckpt.resume=True but the run in {str(wd)!r} has neither config.json nor a "
                      "checkpoint that records its config: nothing says what it was trained with")
  return out


def prepare(c) -> Path:
  """Create workdir (wipe an existing run only with ckpt.overwrite and not ckpt.resume), write config.json.
  Multi-host: process 0 does it (workdir is shared, as orbax requires) while the others wait."""
  wd = Path(c.workdir)
  check(c)
  if is_primary():
    if _has_run(wd) and c.ckpt.overwrite and not c.ckpt.resume:
      for p in wd.iterdir():  # all but the lock `locked` holds
        if p.name != LOCK:
          shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    wd.mkdir(parents=True, exist_ok=True)
    tmp = wd / "config.json.tmp"
    tmp.write_text(c.to_json(indent=2))
    tmp.replace(wd / "config.json")
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # noqa: PLC0415
    multihost_utils.sync_global_devices("next_jax.run.workdir.prepare")
  return wd


@contextlib.contextmanager
def locked(c) -> Iterator[None]:
  """Create workdir and hold its lock (process 0) until the block ends; a live holder raises ConfigError
  naming the workdir and its pid. Call after every check has passed: the directory is created here."""
  if not is_primary():
    yield
    return
  wd = Path(c.workdir)
  wd.mkdir(parents=True, exist_ok=True)
  with contextlib.ExitStack() as stack:
    try:
      stack.enter_context(outdir.lock(wd / LOCK, _what(c)))
    except outdir.Busy as e:
      raise ConfigError(str(e)) from None
    yield


def write_results(wd: Path, results: dict[str, Any]) -> None:
  """workdir/results.json, atomically (written beside it, then renamed); multi-host: process 0 only."""
  if is_primary():
    tmp = wd / "results.tmp"
    tmp.write_text(json.dumps(results, indent=2, default=float))
    tmp.replace(wd / "results.json")
