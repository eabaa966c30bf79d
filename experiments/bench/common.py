"""Timing shared by the benchmarks that time one jitted call against itself."""

from __future__ import annotations

import time

import jax
import numpy as np


def first_and_median(fn, repeats: int) -> tuple[float, float]:
  """(first call incl. compilation, median of `repeats` later calls) in seconds; fn blocks on its result."""
  times = []
  for _ in range(repeats + 1):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return times[0], float(np.median(times[1:]))
