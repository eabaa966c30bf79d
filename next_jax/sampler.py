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

from next_jax.policy import (KVCache, LoraConfig, ModelConfig, Params, forward, init_cache,
                             logits_from_hidden)
from next_jax.sharding import constrain_cache

DEFAULT_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


class SamplingState(flax.struct.PyTreeNode):
  """Loop state. tokens/logprobs/mask: [N, max_new]; done, last: [N]; position: int32[N] of `last`."""

  step: jax.Array
  tokens: jax.Array
  logprobs: jax.Array
  mask: jax.Array
  done: jax.Array
  last: jax.Array
  position: jax.Array
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


def _choose(logits, rng, temperature, top_k, top_p):
  """Sample (or argmax when temperature == 0) → (token int32[N], log π_sample(token) fp32[N]).

  Greedy logprobs are those of the unprocessed model distribution (temperature 1). An all-greedy call skips
  `process_logits` and the random draw at run time (`lax.cond`): same result, no vocabulary sort."""
  greedy = temperature <= 0.0

  def argmax(_):
    return jnp.argmax(logits, axis=-1).astype(jnp.int32), logits

  def sample(_):
    proc = process_logits(logits, temperature, top_k, top_p)
    sampled = jax.random.categorical(rng, proc, axis=-1)
    token = jnp.where(greedy, jnp.argmax(logits, axis=-1), sampled).astype(jnp.int32)
    return token, jnp.where(greedy, logits, proc)

  token, dist = jax.lax.cond(jnp.all(greedy), argmax, sample, None)
  logp = jnp.take_along_axis(jax.nn.log_softmax(dist, axis=-1), token[:, None], axis=-1)[:, 0]
  return token, logp


def _tile(x: jax.Array, g: int, axis: int) -> jax.Array:
  return jnp.repeat(x, g, axis=axis) if g > 1 else x


@functools.partial(jax.jit, static_argnames=("cfg", "lora_cfg", "max_new_tokens", "num_samples", "top_k",
                                             "stop_ids", "pad_id", "prompt_chunk"))
def generate(params: Params, prompts: jax.Array, prompt_mask: jax.Array, rng: jax.Array, *,
             cfg: ModelConfig, lora: Params | None = None, lora_cfg: LoraConfig | None = None,
             max_new_tokens: int, num_samples: int = 1, temperature=1.0, top_k: int = 0, top_p=1.0,
             stop_ids: tuple[int, ...] = (), pad_id: int = 0, prompt_chunk: int = 0) -> SampleOutput:
  """Sample `num_samples` responses per left-padded prompt. prompts: int32[B, T]; prompt_mask: bool[B, T].

  Returns a SampleOutput with N = B·num_samples rows, grouped by prompt. A row stops after emitting any of
  `stop_ids` (kept, mask 1) or at max_new_tokens; later slots hold pad_id with mask 0. The loop exits as
  soon as every row has stopped.

  prompt_chunk > 0 (dividing B): prompts go `prompt_chunk` at a time through prefill + decode (`lax.map`),
  so the KV cache holds prompt_chunk·num_samples rows, not N; chunk i draws with fold_in(rng, i) and stops
  when its own rows have. Greedy output equals the one-call result.
  """
  kw = dict(cfg=cfg, lora=lora, lora_cfg=lora_cfg, max_new_tokens=max_new_tokens, num_samples=num_samples,
            temperature=temperature, top_k=top_k, top_p=top_p, stop_ids=stop_ids, pad_id=pad_id)
  b = prompts.shape[0]
  if not prompt_chunk or prompt_chunk >= b:
    return _generate(params, prompts, prompt_mask, rng, **kw)
  if b % prompt_chunk:
    raise ValueError(f"generate: prompt_chunk={prompt_chunk} does not divide the {b} prompts")
  n = b // prompt_chunk
  split = lambda x: x.reshape(n, prompt_chunk, *x.shape[1:])  # noqa: E731
  keys = jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(n))
  out = jax.lax.map(lambda xs: _generate(params, *xs, **kw), (split(prompts), split(prompt_mask), keys))
  return jax.tree.map(lambda x: x.reshape(b * num_samples, *x.shape[2:]), out)


def _generate(params, prompts, prompt_mask, rng, *, cfg, lora, lora_cfg, max_new_tokens, num_samples,
              temperature, top_k, top_p, stop_ids, pad_id) -> SampleOutput:
  """One prefill + decode over all of `prompts` (generate's docstring)."""
  b, t = prompts.shape
  g, n = num_samples, prompts.shape[0] * num_samples
  temperature = jnp.asarray(temperature, jnp.float32)
  top_p = jnp.asarray(top_p, jnp.float32)
  cache = constrain_cache(init_cache(cfg, b, t + max_new_tokens))  # batch × KV heads (under a mesh)
  positions = jnp.maximum(jnp.cumsum(prompt_mask.astype(jnp.int32), axis=-1) - 1, 0)
  hidden, cache = forward(params, prompts, cfg, mask=prompt_mask, positions=positions, lora=lora,
                          lora_cfg=lora_cfg, cache=cache, return_hidden=True)
  logits = logits_from_hidden(params, hidden[:, -1:], cfg)  # only the last position: no [B, T, V] logits
  cache = constrain_cache(KVCache(k=_tile(cache.k, g, 1), v=_tile(cache.v, g, 1),
                                  key_mask=_tile(cache.key_mask, g, 0), index=cache.index))
  rng, first = jax.random.split(rng)
  token, logp = _choose(_tile(logits[:, -1], g, 0), first, temperature, top_k, top_p)
  stops = jnp.asarray(stop_ids if stop_ids else (-1,), jnp.int32)
  state = SamplingState(
      step=jnp.ones((), jnp.int32),
      tokens=jnp.full((n, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(token),
      logprobs=jnp.zeros((n, max_new_tokens), jnp.float32).at[:, 0].set(logp),
      mask=jnp.zeros((n, max_new_tokens), bool).at[:, 0].set(True),
      done=jnp.isin(token, stops), last=token, position=_tile(positions[:, -1], g, 0) + 1, cache=cache,
      rng=rng)

  def cond(s: SamplingState):
    return (s.step < max_new_tokens) & ~jnp.all(s.done)

  def body(s: SamplingState):
    logits, cache = forward(params, s.last[:, None], cfg, mask=jnp.ones((n, 1), bool),
                            positions=s.position[:, None], lora=lora, lora_cfg=lora_cfg, cache=s.cache)
    rng, key = jax.random.split(s.rng)
    token, logp = _choose(logits[:, 0], key, temperature, top_k, top_p)
    live = ~s.done
    token = jnp.where(live, token, pad_id)
    return SamplingState(
        step=s.step + 1,
        tokens=jax.lax.dynamic_update_slice_in_dim(s.tokens, token[:, None], s.step, axis=1),
        logprobs=jax.lax.dynamic_update_slice_in_dim(s.logprobs, jnp.where(live, logp, 0.0)[:, None],
                                                     s.step, axis=1),
        mask=jax.lax.dynamic_update_slice_in_dim(s.mask, live[:, None], s.step, axis=1),
        done=s.done | jnp.isin(token, stops), last=token, position=s.position + 1, cache=cache, rng=rng)

  state = jax.lax.while_loop(cond, body, state)
  return SampleOutput(tokens=state.tokens, logprobs=state.logprobs, mask=state.mask,
                      lengths=state.mask.sum(axis=1).astype(jnp.int32))
