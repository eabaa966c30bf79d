"""Fixed-shape autoregressive sampling with a KV cache: jitted prefill + `lax.while_loop` decode.

Group sampling (GRPO): each prompt is prefilled once and its cache is tiled G times, so rows
[p·G, (p+1)·G) of every output are prompt p's samples (contiguous groups). Shapes are static: prompts are
left-padded to a bucket length, responses to `max_new_tokens`; temperature, top-p and greedy are traced
values, so a sweep over them reuses one compiled program.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.random import threefry2x32_p

from next_jax.core.sharding import BATCH, constrain_cache
from next_jax.models.policy import (
  KVCache,
  LoraConfig,
  ModelConfig,
  Params,
  forward,
  init_cache,
  logits_from_hidden,
)

DEFAULT_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
DEFAULT_SEGMENT = 64  # response slots the first decode segment attends to; each later one doubles them
CPU_NOISE_ROWS = 1  # rows per block of the Gumbel draw on XLA:CPU (`gumbel_argmax`); 0 = the whole batch


class SamplingState(flax.struct.PyTreeNode):
  """Loop state of R rows. tokens/logprobs/mask: [R, max_new]; done, last: [R]; position: int32[R] of
  `last`; rows: int32[R] each row's index in the full batch (n_rows: a padding row of a compacted batch)."""

  step: jax.Array
  tokens: jax.Array
  logprobs: jax.Array
  mask: jax.Array
  done: jax.Array
  last: jax.Array
  position: jax.Array
  rows: jax.Array
  cache: KVCache
  rng: jax.Array


class SampleOutput(flax.struct.PyTreeNode):
  """tokens int32[N, T_new] (pad after stop); logprobs fp32[N, T_new]: log π_sample(token);
  mask bool[N, T_new]: real response tokens, the stop token included; lengths int32[N]."""

  tokens: jax.Array
  logprobs: jax.Array
  mask: jax.Array
  lengths: jax.Array


def bucket_length(n: int, buckets: Sequence[int] = DEFAULT_BUCKETS) -> int:
  """Smallest bucket ≥ n (compile once per bucket, not once per length)."""
  for b in buckets:
    if b >= n:
      return b
  raise ValueError(f"prompt length {n} exceeds the largest bucket {max(buckets)}")


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int, length: int | None = None,
                buckets: Sequence[int] = DEFAULT_BUCKETS) -> tuple[np.ndarray, np.ndarray]:
  """Left-pad token lists to one (bucketed) length → (int32[B, T] tokens, bool[B, T] mask)."""
  if not prompts or min(len(p) for p in prompts) == 0:
    raise ValueError("pad_prompts: every prompt needs at least one token")
  length = length or bucket_length(max(len(p) for p in prompts), buckets)
  tokens = np.full((len(prompts), length), pad_id, np.int32)
  mask = np.zeros((len(prompts), length), bool)
  for i, p in enumerate(prompts):
    if len(p) > length:
      raise ValueError(f"prompt {i} has {len(p)} tokens > length {length}")
    tokens[i, length - len(p):], mask[i, length - len(p):] = p, True
  return tokens, mask


def _ordered_bits(x: jax.Array) -> jax.Array:
  """float32 → uint32 with the same order (flip the magnitude bits of negatives, then offset the sign)."""
  i = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
  i = jnp.where(i < 0, i ^ jnp.int32(0x7FFFFFFF), i)
  return jax.lax.bitcast_convert_type(i ^ jnp.int32(-2 ** 31), jnp.uint32)


def nucleus_threshold(logits: jax.Array, top_p: jax.Array) -> jax.Array:
  """τ [..., 1]: the smallest logit whose strictly-larger mass M(>τ) = Σ_{z_k > τ} softmax(z)_k is < p.

  Keeping z ≥ τ is top-p: the smallest most-likely prefix of the sorted vocabulary whose mass reaches p
  (a token goes when the mass strictly before it is ≥ p; ties at τ stay; the most likely token always
  does). M(>t) is non-increasing in t and changes only at logit values, so τ is found by bisection over the
  32-bit order of float32 values: 32 masked sums over V instead of a sort."""
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  bits = _ordered_bits(logits)
  lo = jnp.zeros(logits.shape[:-1] + (1,), jnp.uint32)  # M(> smallest float) = 1 ≥ p
  hi = jnp.max(bits, axis=-1, keepdims=True)  # M(> max) = 0 < p

  def step(_, bounds):
    lo, hi = bounds
    mid = lo + (hi - lo) // 2
    below = jnp.sum(jnp.where(bits > mid, probs, 0.0), axis=-1, keepdims=True) < top_p
    return jnp.where(below, lo, mid), jnp.where(below, mid, hi)

  _, hi = jax.lax.fori_loop(0, 32, step, (lo, hi))
  return jnp.min(jnp.where(bits >= hi, logits, jnp.inf), axis=-1, keepdims=True)


def process_logits(logits: jax.Array, temperature: jax.Array, top_k: int, top_p: jax.Array) -> jax.Array:
  """The sampling distribution's logits: logits/T, then top-k (static, 0 = off), then nucleus top-p.

  Top-p keeps the smallest prefix of tokens sorted by probability whose mass reaches p (a token is dropped
  when the mass strictly before it is ≥ p; the most likely token always stays). Dropped → −inf. The
  threshold comes from `nucleus_threshold` (bisection, no vocabulary sort). top_p ≥ 1 skips the nucleus
  step at run time (in fp32 the mass can round up to 1 early and drop a tail that p = 1 must keep).
  """
  logits = logits / jnp.maximum(temperature, 1e-6)
  neg = jnp.finfo(logits.dtype).min
  if top_k:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, neg, logits)

  def nucleus(logits):
    return jnp.where(logits < nucleus_threshold(logits, top_p), neg, logits)

  return jax.lax.cond(jnp.any(top_p < 1.0), nucleus, lambda x: x, logits)


def _counter_noise(key: jax.Array, n_rows: int, vocab: int) -> bool:
  """Whether `row_gumbel` may hash counters itself: threefry keys, partitionable bits, counters < 2³²."""
  typed = jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
  impl = str(jax.random.key_impl(key)) if typed else jax.config.jax_default_prng_impl
  return jax.config.jax_threefry_partitionable and impl == "threefry2x32" and n_rows * vocab < 2 ** 32


def row_gumbel(key: jax.Array, rows: jax.Array, n_rows: int, vocab: int) -> jax.Array:
  """Gumbel noise fp32[R, V] equal, bit for bit, to `jax.random.gumbel(key, (n_rows, vocab))[rows]`.

  With partitionable threefry (JAX's default) element (r, j) of the [n_rows, V] draw hashes the counter
  c = r·V + j alone: bits = x₁ ⊕ x₂, (x₁, x₂) = threefry2x32(key, (0, c)); f = float(1.m) − 1 with the
  mantissa m = bits >> 9; u = max(tiny, f·(1 − tiny) + tiny); g = −log(−log u). So a row of a compacted
  batch draws exactly the noise it would have drawn in the full batch (rows ≥ n_rows, padding, draw
  junk). Other PRNG settings fall back to the full draw and a gather."""
  if not _counter_noise(key, n_rows, vocab):
    return jax.random.gumbel(key, (n_rows, vocab))[jnp.minimum(rows, n_rows - 1)]
  data = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
  count = rows.astype(jnp.uint32)[:, None] * jnp.uint32(vocab) + jnp.arange(vocab, dtype=jnp.uint32)
  k1, k2 = (jnp.broadcast_to(d, count.shape) for d in (data[0], data[1]))
  x1, x2 = threefry2x32_p.bind(k1, k2, jnp.zeros_like(count), count)
  mantissa = jax.lax.shift_right_logical(x1 ^ x2, jnp.uint32(9)) | jnp.uint32(0x3F800000)
  tiny = jnp.float32(jnp.finfo(jnp.float32).tiny)
  f = jax.lax.bitcast_convert_type(mantissa, jnp.float32) - jnp.float32(1.0)
  return -jnp.log(-jnp.log(jnp.maximum(tiny, f * (jnp.float32(1.0) - tiny) + tiny)))


def gumbel_argmax(key: jax.Array, rows: jax.Array, n_rows: int, logits: jax.Array) -> jax.Array:
  """argmax(logits + row_gumbel(key, rows, n_rows, V)) per row → int[R].

  On XLA:CPU without a mesh the rows go CPU_NOISE_ROWS at a time (`lax.map`): the hash's intermediates
  then stay in cache, with the same noise bit for bit (V = 49,152, one core: 427 → 164 ms at 64 rows,
  31 → 23 ms at 8; blocks of 2–8 rows gain less).
  Elsewhere, one [R, V] draw (a loop over rows would serialise an accelerator)."""
  r, v = logits.shape
  block = CPU_NOISE_ROWS
  if (not block or r % block or jax.default_backend() != "cpu" or not jax.sharding.get_abstract_mesh().empty
      or not _counter_noise(key, n_rows, v)):
    return jnp.argmax(row_gumbel(key, rows, n_rows, v) + logits, axis=-1)
  one = lambda x: jnp.argmax(row_gumbel(key, x[0], n_rows, v) + x[1], axis=-1)  # noqa: E731
  return jax.lax.map(one, (rows.reshape(-1, block), logits.reshape(-1, block, v))).reshape(r)


def _choose(logits, rng, temperature, top_k, top_p, rows, n_rows):
  """Sample (or argmax when temperature == 0) → (token int32[R], log π_sample(token) fp32[R]).

  Row i is row `rows[i]` of an n_rows batch: the draw argmax(processed + g) uses that row's Gumbel noise
  (`row_gumbel`), identical to `jax.random.categorical(rng, processed_full)[rows]`. Greedy logprobs are
  those of the unprocessed model distribution (temperature 1). An all-greedy call skips `process_logits`
  and the random draw at run time (`lax.cond`): same result, no vocabulary sort."""
  greedy = temperature <= 0.0

  def argmax(_):
    return jnp.argmax(logits, axis=-1).astype(jnp.int32), logits

  def sample(_):
    proc = process_logits(logits, temperature, top_k, top_p)
    sampled = gumbel_argmax(rng, rows, n_rows, proc)
    token = jnp.where(greedy, jnp.argmax(logits, axis=-1), sampled).astype(jnp.int32)
    return token, jnp.where(greedy, logits, proc)

  token, dist = jax.lax.cond(jnp.all(greedy), argmax, sample, None)
  logp = jnp.take_along_axis(jax.nn.log_softmax(dist, axis=-1), token[:, None], axis=-1)[:, 0]
  return token, logp


def _tile(x: jax.Array, g: int, axis: int) -> jax.Array:
  return jnp.repeat(x, g, axis=axis) if g > 1 else x


def segment_windows(prompt_len: int, max_new_tokens: int, first: int) -> tuple[int, ...]:
  """Static attention lengths of the decode segments: W_k = T + min(first·2ᵏ, max_new), k = 0, 1, …
  (first = 0: one segment over the whole cache). Segment k decodes while the cache index is < W_k."""
  first = first or max_new_tokens
  sizes = [min(first << k, max_new_tokens) for k in range(max(max_new_tokens // first, 1).bit_length() + 1)]
  return tuple(sorted({prompt_len + m for m in sizes}))


def batch_bucket(live: int, quantum: int = 1) -> int:
  """Rows a compacted batch keeps: the smallest quantum·2ᵏ ≥ live (quantum: the mesh's batch shards)."""
  b = quantum
  while b < live:
    b *= 2
  return b


def _batch_quantum() -> int:
  """Product of the active mesh's batch axes (1 without a mesh): a compacted batch must still split."""
  mesh = jax.sharding.get_abstract_mesh()
  return 1 if mesh.empty else int(np.prod([mesh.shape[a] for a in BATCH if a in mesh.shape]))


_STATIC = ("cfg", "lora_cfg", "max_new_tokens", "top_k", "stop_ids", "pad_id")


@functools.partial(jax.jit, static_argnames=_STATIC + ("num_samples",))
def _prefill(params, prompts, prompt_mask, rng, temperature, top_p, *, cfg, lora, lora_cfg, max_new_tokens,
             num_samples, top_k, stop_ids, pad_id) -> SamplingState:
  """Prefill the B prompts (attending over their T slots only), tile the cache G×, choose token 0."""
  b, t = prompts.shape
  g, n = num_samples, b * num_samples
  cache = constrain_cache(init_cache(cfg, b, t + max_new_tokens))  # batch × KV heads (under a mesh)
  positions = jnp.maximum(jnp.cumsum(prompt_mask.astype(jnp.int32), axis=-1) - 1, 0)
  hidden, cache = forward(params, prompts, cfg, mask=prompt_mask, positions=positions, lora=lora,
                          lora_cfg=lora_cfg, cache=cache, return_hidden=True, window=t)
  logits = logits_from_hidden(params, hidden[:, -1:], cfg)  # only the last position: no [B, T, V] logits
  cache = constrain_cache(KVCache(k=_tile(cache.k, g, 1), v=_tile(cache.v, g, 1),
                                  key_mask=_tile(cache.key_mask, g, 0), index=cache.index))
  rng, first = jax.random.split(rng)
  rows = jnp.arange(n, dtype=jnp.int32)
  token, logp = _choose(_tile(logits[:, -1], g, 0), first, temperature, top_k, top_p, rows, n)
  return SamplingState(
      step=jnp.ones((), jnp.int32),
      tokens=jnp.full((n, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(token),
      logprobs=jnp.zeros((n, max_new_tokens), jnp.float32).at[:, 0].set(logp),
      mask=jnp.zeros((n, max_new_tokens), bool).at[:, 0].set(True),
      done=jnp.isin(token, jnp.asarray(stop_ids or (-1,), jnp.int32)), last=token,
      position=_tile(positions[:, -1], g, 0) + 1, rows=rows, cache=cache, rng=rng)


@functools.partial(jax.jit, static_argnames=_STATIC + ("n_rows", "window"), donate_argnums=1)
def _decode(params, state, temperature, top_p, *, cfg, lora, lora_cfg, max_new_tokens, top_k, stop_ids,
            pad_id, n_rows, window) -> SamplingState:
  """One segment: `lax.while_loop` over steps that attend to the first `window` cache slots, until the
  cache index reaches the window, the budget is spent or every row has stopped."""
  stops = jnp.asarray(stop_ids or (-1,), jnp.int32)
  n = state.done.shape[0]

  def cond(s: SamplingState):
    return (s.step < max_new_tokens) & (s.cache.index < window) & ~jnp.all(s.done)

  def body(s: SamplingState):
    logits, cache = forward(params, s.last[:, None], cfg, mask=jnp.ones((n, 1), bool),
                            positions=s.position[:, None], lora=lora, lora_cfg=lora_cfg, cache=s.cache,
                            window=window)
    rng, key = jax.random.split(s.rng)
    token, logp = _choose(logits[:, 0], key, temperature, top_k, top_p, s.rows, n_rows)
    live = ~s.done
    token = jnp.where(live, token, pad_id)
    put = lambda buf, x: jax.lax.dynamic_update_slice_in_dim(buf, x[:, None], s.step, axis=1)  # noqa: E731
    return s.replace(step=s.step + 1, tokens=put(s.tokens, token), mask=put(s.mask, live),
                     logprobs=put(s.logprobs, jnp.where(live, logp, 0.0)),
                     done=s.done | jnp.isin(token, stops), last=token, position=s.position + 1, cache=cache,
                     rng=rng)

  return jax.lax.while_loop(cond, body, state)


@jax.jit
def _live(state: SamplingState) -> jax.Array:
  return jnp.sum(~state.done, dtype=jnp.int32)


def _rows_of(state: SamplingState) -> SampleOutput:
  return SampleOutput(tokens=state.tokens, logprobs=state.logprobs, mask=state.mask,
                      lengths=state.mask.sum(axis=1).astype(jnp.int32))


def _write_back(out: SampleOutput, state: SamplingState) -> SampleOutput:
  """out's rows state.rows ← state's tokens, logprobs, mask (padding rows, index n_rows, are dropped)."""
  put = lambda full, part: full.at[state.rows].set(part, mode="drop")  # noqa: E731
  tokens, logprobs, mask = (put(getattr(out, k), getattr(state, k)) for k in ("tokens", "logprobs", "mask"))
  return SampleOutput(tokens=tokens, logprobs=logprobs, mask=mask, lengths=mask.sum(axis=1).astype(jnp.int32))


@functools.partial(jax.jit, static_argnames=("rows", "n_rows"))
def _compact(out: SampleOutput | None, state: SamplingState, *, rows: int, n_rows: int):
  """Write `state`'s rows into the full-batch output `out` (None: state is the full batch), then keep the
  first `rows` of a stable done-last order: the live rows in their order, padded with stopped rows marked
  as padding (rows = n_rows, done, dropped on write-back). → (out, state with `rows` rows). The old cache
  is freed when the caller drops `state`: the peak is the cache plus its compacted copy."""
  out = _rows_of(state) if out is None else _write_back(out, state)
  keep = jnp.argsort(state.done, stable=True)[:rows]
  real = jnp.arange(rows) < jnp.sum(~state.done)
  c = state.cache
  cache = constrain_cache(c.replace(k=c.k[:, keep], v=c.v[:, keep], key_mask=c.key_mask[keep]))
  return out, state.replace(
      tokens=state.tokens[keep], logprobs=state.logprobs[keep], mask=state.mask[keep],
      done=state.done[keep] | ~real, last=state.last[keep], position=state.position[keep],
      rows=jnp.where(real, state.rows[keep], n_rows), cache=cache)


_finish = jax.jit(_write_back, donate_argnums=0)


def _generate(params, prompts, prompt_mask, rng, *, temperature, top_p, num_samples, first_segment,
              compact, **kw) -> SampleOutput:
  """One prefill + segmented decode over all of `prompts` (generate's docstring)."""
  b, t = prompts.shape
  n, quantum = b * num_samples, _batch_quantum()
  windows = segment_windows(t, kw["max_new_tokens"], first_segment)
  state = _prefill(params, prompts, prompt_mask, rng, temperature, top_p, num_samples=num_samples, **kw)
  out = None
  for window in windows:
    state = _decode(params, state, temperature, top_p, n_rows=n, window=window, **kw)
    if window == windows[-1]:
      break
    live = int(_live(state))  # one host round trip per segment
    if live == 0:
      break
    rows = batch_bucket(live, quantum)
    if compact and rows <= state.done.shape[0] // 2:
      out, state = _compact(out, state, rows=rows, n_rows=n)
  return _rows_of(state) if out is None else _finish(out, state)


def compiled_programs() -> int:
  """Programs the sampler has compiled so far (prefill, decode segments, compaction, write-back)."""
  return sum(f._cache_size() for f in (_prefill, _decode, _live, _compact, _finish))  # noqa: SLF001


def generate(params: Params, prompts: jax.Array, prompt_mask: jax.Array, rng: jax.Array, *,
             cfg: ModelConfig, lora: Params | None = None, lora_cfg: LoraConfig | None = None,
             max_new_tokens: int, num_samples: int = 1, temperature=1.0, top_k: int = 0, top_p=1.0,
             stop_ids: tuple[int, ...] = (), pad_id: int = 0, prompt_chunk: int = 0,
             first_segment: int = DEFAULT_SEGMENT, compact: bool = True) -> SampleOutput:
  """Sample `num_samples` responses per left-padded prompt. prompts: int32[B, T]; prompt_mask: bool[B, T].

  Returns a SampleOutput with N = B·num_samples rows, grouped by prompt. A row stops after emitting any of
  `stop_ids` (kept, mask 1) or at max_new_tokens; later slots hold pad_id with mask 0. Decoding exits as
  soon as every row has stopped.

  Cost follows the filled cache: decode runs in segments whose steps attend to the first
  W_k = T + min(first_segment·2ᵏ, max_new) slots only (`segment_windows`; first_segment = 0: one segment
  over all T + max_new). Between segments, with `compact`, when the live rows fit in half the batch they
  are gathered into a smaller power-of-two batch (`batch_bucket`); output rows keep their order and each
  row its Gumbel noise (`row_gumbel`), so tokens do not depend on segments or compaction. Compiles: one
  prefill per prompt shape, one decode program per (batch bucket, window) visited.

  prompt_chunk > 0 (dividing B): prompts go `prompt_chunk` at a time through prefill + decode, so the KV
  cache holds prompt_chunk·num_samples rows, not N; chunk i draws with fold_in(rng, i) and stops when its
  own rows have. Greedy output equals the one-call result.
  """
  kw = dict(cfg=cfg, lora=lora, lora_cfg=lora_cfg, max_new_tokens=max_new_tokens, num_samples=num_samples,
            temperature=jnp.asarray(temperature, jnp.float32), top_p=jnp.asarray(top_p, jnp.float32),
            top_k=top_k, stop_ids=tuple(stop_ids), pad_id=pad_id, first_segment=first_segment,
            compact=compact)
  b = prompts.shape[0]
  if not prompt_chunk or prompt_chunk >= b:
    return _generate(params, prompts, prompt_mask, rng, **kw)
  if b % prompt_chunk:
    raise ValueError(f"generate: prompt_chunk={prompt_chunk} does not divide the {b} prompts")
  chunks = [_generate(params, prompts[i:i + prompt_chunk], prompt_mask[i:i + prompt_chunk],
                      jax.random.fold_in(rng, i // prompt_chunk), **kw) for i in range(0, b, prompt_chunk)]
  return jax.tree.map(lambda *xs: jnp.concatenate(xs), *chunks)
