"""Metric writers (JSONL + TensorBoard), wall-clock timing splits, and a progress bar; in a multi-host run
only process 0 writes files or shows bars (`is_primary`)."""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np


def _scalar(v: Any) -> float | int | str:
  if isinstance(v, str):
    return v
  a = np.asarray(v)
  return a.item() if a.size == 1 else float(a.mean())


def is_primary() -> bool:
  """True on JAX process 0 (or the only process): the one process of a multi-host run that writes logs,
  results and progress bars. Every process still takes part in checkpoint saves and restores."""
  import jax  # noqa: PLC0415

  return jax.process_index() == 0


class MetricWriter:
  """Append {step, **scalars} to <dir>/metrics.jsonl and, when tensorboardX is installed, to TensorBoard
  event files in <dir>/tb. `truncate_rows(n)` / `truncate_after(step)` drop rows past a resumed checkpoint;
  metrics.jsonl is the record, and the event files are rebuilt from it then (a killed run's TensorBoard
  writer loses its unflushed points and keeps the ones the resumed run writes again).

  enabled=None writes only on process 0 of a multi-host run (`is_primary`); a disabled writer touches no
  file and only counts the rows it was given, so `num_rows` agrees on every process."""

  def __init__(self, log_dir: str | os.PathLike, tensorboard: bool = True, enabled: bool | None = None):
    self.dir = Path(log_dir)
    self.path = self.dir / "metrics.jsonl"
    self.enabled = is_primary() if enabled is None else enabled
    self._tb, self._rows = None, 0
    if not self.enabled:
      return
    self.dir.mkdir(parents=True, exist_ok=True)
    self._tensorboard = tensorboard
    self._open_tensorboard()

  def _open_tensorboard(self) -> None:
    if self._tensorboard:
      try:
        from tensorboardX import SummaryWriter  # noqa: PLC0415
        self._tb = SummaryWriter(str(self.dir / "tb"))
      except ImportError:
        self._tb = None

  def _add_scalars(self, row: dict[str, Any]) -> None:
    for k, v in row.items():
      if k != "step" and isinstance(v, (int, float)):
        self._tb.add_scalar(k, v, row["step"])

  def _rewrite(self, rows: list[dict[str, Any]]) -> None:
    """metrics.jsonl := rows (atomically), and the TensorBoard event files rebuilt from them."""
    tmp = self.path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, self.path)
    if self._tb is not None:
      self._tb.close()
      for f in (self.dir / "tb").glob("events.out.tfevents.*"):
        f.unlink()
      self._open_tensorboard()
      for r in rows:
        self._add_scalars(r)
      self._tb.flush()

  def truncate_after(self, step: int) -> None:
    """Keep only rows with row['step'] ≤ step (a resumed run rewrites what followed its checkpoint)."""
    if not self.enabled or not self.path.exists():
      return
    self._rewrite([r for r in self.read() if r["step"] <= step])

  def num_rows(self) -> int:
    return len(self.read()) if self.enabled else self._rows

  def truncate_rows(self, n: int) -> None:
    """Keep only the first n rows (what was written before a checkpoint; a resumed run rewrites the rest)."""
    self._rows = n
    if not self.enabled or not self.path.exists():
      return
    self._rewrite(self.read()[:n])

  def write(self, step: int, scalars: dict[str, Any]) -> dict[str, Any]:
    row = {"step": int(step), **{k: _scalar(v) for k, v in scalars.items()}}
    self._rows += 1
    if not self.enabled:
      return row
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")
    if self._tb is not None:
      self._add_scalars(row)
    return row

  def read(self) -> list[dict[str, Any]]:
    """All rows; a torn last line (the process was killed mid-write) is dropped."""
    if not self.path.exists():
      return []
    lines = [line for line in self.path.read_text().splitlines() if line.strip()]
    rows = [json.loads(line) for line in lines[:-1]]
    try:
      rows += [json.loads(line) for line in lines[-1:]]
    except json.JSONDecodeError:
      pass
    return rows

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


class Timer:
  """Named wall-clock splits: `with timer("sample"): ...`; `timer.pop()` → {"time/sample": s, ...}."""

  def __init__(self):
    self._acc: dict[str, float] = defaultdict(float)

  @contextlib.contextmanager
  def __call__(self, name: str):
    t0 = time.perf_counter()
    try:
      yield
    finally:
      self._acc[name] += time.perf_counter() - t0

  def pop(self) -> dict[str, float]:
    out = {f"time/{k}": v for k, v in self._acc.items()}
    self._acc.clear()
    return out


def progress(total: int, initial: int = 0, desc: str = "", disable: bool | None = None):
  """A tqdm bar; disable=None shows it on process 0 only, unless NEXT_JAX_PROGRESS=0 (CI logs)."""
  from tqdm.auto import tqdm  # noqa: PLC0415

  if disable is None:
    disable = os.environ.get("NEXT_JAX_PROGRESS", "") == "0" or not is_primary()
  return tqdm(total=total, initial=initial, desc=desc, disable=disable, dynamic_ncols=True)
