"""Timing shared by the benchmarks that time one jitted call against itself."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np


def first_and_median(fn, repeats: int) -> tuple[float, float]:
  """(first call incl. compilation, median of `repeats` later calls) in seconds; fn blocks on its result."""
  times = []
  for _ in range(repeats + 1):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return times[0], float(np.median(times[1:]))


def matmul_peak(n: int, reps: int) -> float:
  """FLOP/s of a jitted f32 [n, n] @ [n, n] (2n³ FLOPs), median of reps."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  mm = jax.jit(lambda x, y: x @ y)
  return 2 * n ** 3 / first_and_median(lambda: mm(a, b), reps)[1]
