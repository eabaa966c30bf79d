"""One decode step against the attention window (issue 29's probe): `policy.forward` of one new token per
row on SmolLM2-135M-Instruct, batch B, a cache of --slots slots of which --filled hold tokens, reading only
the first W slots, for each W in --windows. Each W is one jitted, donated step (the cache written in
place, as in the sampler's loop); the Ws alternate over --reps calls. Prints median milliseconds per step
and the slope per slot, and writes the Markdown row to --out.

  OPENBLAS_NUM_THREADS=1 taskset -c 0 python -m experiments.bench.decode_step --batch 8 --slots 1064 \\
      --windows 168 552 1064 --reps 10
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from experiments.bench import real_model
from next_jax.models import policy


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--model", default=real_model.DEFAULT, help="HF dir, .gguf or packaged name")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--slots", type=int, default=1064, help="cache size S")
  p.add_argument("--filled", type=int, default=104, help="slots holding tokens (the write position)")
  p.add_argument("--windows", type=int, nargs="+", default=[168, 552, 1064])
  p.add_argument("--reps", type=int, default=10)
  p.add_argument("--out", default="", help="Markdown file to append the row to ('' = don't write)")
  return p.parse_args(argv)


def step(cfg, batch: int, filled: int, window: int):
  """jit((params, cache) → (logits, cache)): one token per row at position `filled`, cache donated."""
  tokens, pos = jnp.ones((batch, 1), jnp.int32), jnp.full((batch, 1), filled, jnp.int32)

  def f(params, cache):
    logits, new = policy.forward(params, tokens, cfg, mask=jnp.ones((batch, 1), bool), positions=pos,
                                 cache=cache, window=window)
    return logits, new.replace(index=cache.index)  # the next call writes the same slot again

  return jax.jit(f, donate_argnums=1)


def main(argv=None) -> str:
  args = parse_args(argv)
  _, cfg, params, _ = real_model.load(args.model)
  if not args.filled < min(args.windows) <= max(args.windows) <= args.slots:
    raise SystemExit(f"need --filled < every window ≤ --slots; got {args.filled}, {args.windows}, {args.slots}")
  k1, k2 = jax.random.split(jax.random.key(0))
  cache = policy.init_cache(cfg, args.batch, args.slots)
  cache = cache.replace(k=0.1 * jax.random.normal(k1, cache.k.shape, cache.k.dtype),
                        v=0.1 * jax.random.normal(k2, cache.v.shape, cache.v.dtype),
                        key_mask=cache.key_mask.at[:, :args.filled].set(True), index=jnp.int32(args.filled))
  fns = {w: step(cfg, args.batch, args.filled, w) for w in args.windows}
  times = {w: [] for w in fns}
  for rep in range(args.reps + 1):  # rep 0 compiles
    for w, f in fns.items():
      t0 = time.perf_counter()
      _, cache = f(params, cache)
      jax.block_until_ready(cache)
      if rep:
        times[w].append(time.perf_counter() - t0)
  ms = {w: 1e3 * float(np.median(t)) for w, t in times.items()}
  lo, hi = min(ms), max(ms)
  slope = (ms[hi] - ms[lo]) / (hi - lo) if hi > lo else float("nan")
  row = (f"| {args.batch} | {args.slots} | " + " | ".join(f"W {w}: {m:.1f}" for w, m in ms.items())
         + f" | {slope:.3f} |")
  cmd = shlex.join(["python", "-m", "experiments.bench.decode_step"] + (argv or sys.argv[1:]))
  text = f"{row}  <!-- `{cmd}`, load {os.getloadavg()[0]:.2f} -->\n"
  print("| batch | slots | ms per step at each window | ms per slot |\n|---:|---:|---|---:|\n" + text)
  if args.out:
    with Path(args.out).open("a") as f:
      f.write(text)
  return text


if __name__ == "__main__":
  main()
