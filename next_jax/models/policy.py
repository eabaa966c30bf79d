"""Qwen2 / Llama decoder as pure functions over a params pytree, with LoRA.

Layout (ours, `x @ kernel`): kernels are [in, out]; every per-layer tensor is stacked on a leading layer
axis L and the layers run under `lax.scan`, so compile time is flat in depth and every module's LoRA factors
are already a batch for rank-1 extraction.

    params = {"embed": [V, D], "final_norm": [D], "lm_head": [D, V] (untied only),
              "layers": {"attn_norm": [L, D], "mlp_norm": [L, D],
                         "q": {"kernel": [L, D, H*hd], "bias": [L, H*hd]}, "k": …, "v": …  (bias: Qwen2),
                         "o": {"kernel": [L, H*hd, D]},
                         "gate": {"kernel": [L, D, F]}, "up": …, "down": {"kernel": [L, F, D]}}}

LoRA factors are stored exactly as PEFT stores them, so export is a reshape-free copy:

    lora = {module: {"a": [L, r, in], "b": [L, out, r]}},   ΔW_torch = s·B·A  ([out, in]),  s = alpha/r

and in our [in, out] layout the merged kernel is W + s·(B·A)ᵀ. The reference policy of a LoRA run is this
same forward with `lora=None`: no second copy of the base weights.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from next_jax.core import config
from next_jax.core.sharding import constrain_activation

Params = dict[str, Any]
ATTN_MODULES = ("q", "k", "v", "o")
MLP_MODULES = ("gate", "up", "down")
ALL_MODULES = ATTN_MODULES + MLP_MODULES
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture of a Qwen2/Llama-family decoder. Hashable: pass it as a static jit argument."""

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int | None = None  # default hidden_size // num_heads
  rope_theta: float = 1_000_000.0
  rms_norm_eps: float = 1e-6
  qkv_bias: bool = True  # Qwen2: True; Llama: False
  tie_embeddings: bool = False
  max_position_embeddings: int = 32768
  dtype: str = "float32"  # params and activations; "bfloat16" supported
  kv_cache_dtype: str = ""  # the sampler's KV cache ("": dtype); bfloat16 halves it on accelerators
  remat: bool = False  # jax.checkpoint each layer (trade compute for activation memory)

  def __post_init__(self):
    if self.head_dim is None:
      object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
    if self.dtype not in _DTYPES:
      raise ValueError(f"dtype={self.dtype!r}; expected one of {sorted(_DTYPES)}")
    if self.kv_cache_dtype and self.kv_cache_dtype not in _DTYPES:
      raise ValueError(f"kv_cache_dtype={self.kv_cache_dtype!r}; expected '' (dtype) or one of {sorted(_DTYPES)}")

  @property
  def jnp_dtype(self):
    return _DTYPES[self.dtype]

  @property
  def kv_jnp_dtype(self):
    return _DTYPES[self.kv_cache_dtype or self.dtype]

  def module_shape(self, name: str) -> tuple[int, int]:
    """(in, out) of one projection."""
    d, f, q, kv = self.hidden_size, self.intermediate_size, self.num_heads * self.head_dim, \
        self.num_kv_heads * self.head_dim
    return {"q": (d, q), "k": (d, kv), "v": (d, kv), "o": (q, d), "gate": (d, f), "up": (d, f),
            "down": (f, d)}[name]


_MODEL = config.defaults("model")  # every default below is the schema's (config.base)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """PEFT LoRA semantics: ΔW = s·B·A, s = alpha/r (rslora: alpha/√r); A Kaiming-uniform, B zeros."""

  rank: int = _MODEL.lora_rank
  alpha: float = _MODEL.lora_alpha
  targets: tuple[str, ...] = ALL_MODULES
  rslora: bool = _MODEL.rslora

  def __post_init__(self):
    bad = [t for t in self.targets if t not in ALL_MODULES]
    if bad or not self.targets:
      raise ValueError(f"LoraConfig.targets={self.targets!r}: unknown {bad}; choose from {ALL_MODULES}")
    if self.rank < 1:
      raise ValueError(f"LoraConfig.rank={self.rank} must be >= 1")

  @property
  def scale(self) -> float:
    return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


class KVCache(flax.struct.PyTreeNode):
  """Fixed-size cache. k, v: [L, B, KVH, S, hd] (the layout attention reads: a layer's first W slots are
  a slice, not a transpose); key_mask: bool[B, S] (slot holds a real token);
  index: int32[] next slot to write (shared by the batch: prompts are left-padded to one length)."""

  k: jax.Array
  v: jax.Array
  key_mask: jax.Array
  index: jax.Array


# ----------------------------------------------------------------------------------------------- init


def _uniform(key, shape, bound, dtype):
  return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)


def init_params(cfg: ModelConfig, key: jax.Array) -> Params:
  """Random params with PyTorch nn.Linear default init (U(±1/√in)), N(0,1) embeddings, unit norms."""
  dt, L, d = cfg.jnp_dtype, cfg.num_layers, cfg.hidden_size
  keys = iter(jax.random.split(key, 2 * len(ALL_MODULES) + 2))
  layers: Params = {"attn_norm": jnp.ones((L, d), dt), "mlp_norm": jnp.ones((L, d), dt)}
  for name in ALL_MODULES:
    n_in, n_out = cfg.module_shape(name)
    bound = 1.0 / math.sqrt(n_in)
    layers[name] = {"kernel": _uniform(next(keys), (L, n_in, n_out), bound, dt)}
    if cfg.qkv_bias and name in ("q", "k", "v"):
      layers[name]["bias"] = _uniform(next(keys), (L, n_out), bound, dt)
  params = {"embed": jax.random.normal(next(keys), (cfg.vocab_size, d), jnp.float32).astype(dt),
            "layers": layers, "final_norm": jnp.ones((d,), dt)}
  if not cfg.tie_embeddings:
    params["lm_head"] = _uniform(next(keys), (d, cfg.vocab_size), 1.0 / math.sqrt(d), dt)
  return params


def init_lora(cfg: ModelConfig, lcfg: LoraConfig, key: jax.Array) -> Params:
  """PEFT init: A ~ Kaiming-uniform(a=√5) = U(±1/√in) (fan_in = in of A: [r, in]); B = 0."""
  out = {}
  for name, k in zip(lcfg.targets, jax.random.split(key, len(lcfg.targets))):
    n_in, n_out = cfg.module_shape(name)
    out[name] = {"a": _uniform(k, (cfg.num_layers, lcfg.rank, n_in), 1.0 / math.sqrt(n_in), cfg.jnp_dtype),
                 "b": jnp.zeros((cfg.num_layers, n_out, lcfg.rank), cfg.jnp_dtype)}
  return out


def lora_delta(lora_module: Params, scale: float) -> jax.Array:
  """Dense ΔW in our [in, out] layout: s·(B·A)ᵀ = s·Aᵀ·Bᵀ, stacked over layers: [L, in, out]."""
  return scale * jnp.einsum("lri,lor->lio", lora_module["a"], lora_module["b"])


def merge_lora(params: Params, lora: Params, lcfg: LoraConfig) -> Params:
  """Dense params whose plain forward equals the LoRA forward: kernel ← kernel + s·(B·A)ᵀ."""
  layers = dict(params["layers"])
  for name, mod in lora.items():
    kernel = layers[name]["kernel"]
    delta = lora_delta(mod, lcfg.scale).astype(jnp.float32)
    layers[name] = {**layers[name], "kernel": (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)}
  return {**params, "layers": layers}


def count_params(tree) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


# -------------------------------------------------------------------------------------------- blocks


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
  """HF RMSNorm: w · (x / √(mean(x²) + eps)), statistics in fp32, result cast back to x's dtype."""
  xf = x.astype(jnp.float32)
  xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
  return weight * xf.astype(x.dtype)


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding, HF "rotate_half" layout. x: [B, T, H, hd]; positions: int32[B, T].

  θ_i = pos · theta^(−2i/hd);  x' = x·cos θ + rotate_half(x)·sin θ,  rotate_half([x₁, x₂]) = [−x₂, x₁].
  """
  hd = x.shape[-1]
  inv_freq = 1.0 / theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd)
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, hd/2]
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
  cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
  x1, x2 = jnp.split(x, 2, axis=-1)
  return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


def _linear(x, p: Params, lora: Params | None, scale: float):
  """x @ W (+ b) + s·(x Aᵀ) Bᵀ. The LoRA branch never forms the dense ΔW."""
  y = x @ p["kernel"]
  if "bias" in p:
    y = y + p["bias"]
  if lora is not None:
    y = y + scale * ((x @ lora["a"].T.astype(x.dtype)) @ lora["b"].T.astype(x.dtype))
  return y


def attention(q, k, v, mask) -> jax.Array:
  """Grouped-query softmax attention, scores in fp32.

  q: [B, T, H, hd]; k, v: [B, KVH, S, hd] (the cache's layout); mask: bool[B, T, S] → [B, T, H·hd].
  softmax(q kᵀ/√hd + (0 | min)) v, each KV head shared by H/KVH query heads.
  """
  b, t, h, hd = q.shape
  kvh = k.shape[1]
  q = q.reshape(b, t, kvh, h // kvh, hd)
  scores = jnp.einsum("btkgd,bksd->bkgts", q, k, preferred_element_type=jnp.float32) / math.sqrt(hd)
  scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  return jnp.einsum("bkgts,bksd->btkgd", probs, v).reshape(b, t, h * hd)


def _layer(cfg: ModelConfig, scale: float, x, positions, mask, p, lora, cache_kv, index):
  """One pre-norm decoder layer.

  cache_kv: None, or (layer i, k, v) with the whole stacked cache [L, B, KVH, S, hd]: the new keys/values
  are written in place at [i, :, :, index:index+T] and layer i's first W slots are attended to (W = the last
  dim of `mask`: only those are read). Returns (x, cache_kv).
  """
  b, t, _ = x.shape
  lo = lambda name: None if lora is None else lora.get(name)  # noqa: E731
  h = rms_norm(x, p["attn_norm"], cfg.rms_norm_eps)
  q = _linear(h, p["q"], lo("q"), scale).reshape(b, t, cfg.num_heads, cfg.head_dim)
  k = _linear(h, p["k"], lo("k"), scale).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
  v = _linear(h, p["v"], lo("v"), scale).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
  q, k = rope(q, positions, cfg.rope_theta), rope(k, positions, cfg.rope_theta)
  k, v = k.swapaxes(1, 2), v.swapaxes(1, 2)  # [B, KVH, T, hd]
  if cache_kv is not None:
    i, ck, cv = cache_kv
    ck = jax.lax.dynamic_update_slice(ck, k[None].astype(ck.dtype), (i, 0, 0, index, 0))
    cv = jax.lax.dynamic_update_slice(cv, v[None].astype(cv.dtype), (i, 0, 0, index, 0))
    window = (1, b, cfg.num_kv_heads, mask.shape[-1], cfg.head_dim)
    k, v = (jax.lax.dynamic_slice(c, (i, 0, 0, 0, 0), window)[0] for c in (ck, cv))
    cache_kv = (i, ck, cv)
  x = x + _linear(attention(q, k, v, mask), p["o"], lo("o"), scale)
  h = rms_norm(x, p["mlp_norm"], cfg.rms_norm_eps)
  gate, up = _linear(h, p["gate"], lo("gate"), scale), _linear(h, p["up"], lo("up"), scale)
  x = x + _linear(jax.nn.silu(gate) * up, p["down"], lo("down"), scale)
  return x, cache_kv


# ------------------------------------------------------------------------------------------- forward


def positions_from_mask(mask: jax.Array) -> jax.Array:
  """Left-padded rows start counting at their first real token: pos = max(cumsum(mask) − 1, 0)."""
  return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0)


def init_cache(cfg: ModelConfig, batch: int, size: int, dtype=None) -> KVCache:
  """Empty cache of `size` slots in `dtype` (default cfg.kv_cache_dtype, else the model dtype)."""
  shape = (cfg.num_layers, batch, cfg.num_kv_heads, size, cfg.head_dim)
  dtype = dtype or cfg.kv_jnp_dtype
  return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                 key_mask=jnp.zeros((batch, size), bool), index=jnp.zeros((), jnp.int32))


def forward(params: Params, tokens: jax.Array, cfg: ModelConfig, *, mask: jax.Array | None = None,
            positions: jax.Array | None = None, lora: Params | None = None,
            lora_cfg: LoraConfig | None = None, cache: KVCache | None = None,
            return_hidden: bool = False, window: int = 0):
  """Logits of a decoder. tokens: int32[B, T]; mask: bool[B, T] (real tokens; prompts left-padded).

  Without a cache, token t attends to real tokens s ≤ t. With a cache, the T new tokens are written at
  slots [index, index+T) and attend to every real slot s ≤ index + t; window > 0 (static, ≥ index + T)
  reads only the first `window` slots, so a step costs the filled part of the cache, not all of it.
  Positions default to `positions_from_mask(mask)` (no cache) and must be passed when decoding with a cache.
  Returns (logits fp32[B, T, V], new cache or None); with return_hidden, the final normed hidden state
  [B, T, D] instead of logits (for chunked log-prob computation).
  """
  b, t = tokens.shape
  mask = jnp.ones((b, t), bool) if mask is None else mask.astype(bool)
  if positions is None:
    if cache is not None:
      raise ValueError("forward with a cache needs explicit positions")
    positions = positions_from_mask(mask)
  scale = lora_cfg.scale if lora is not None else 0.0
  if lora is not None and lora_cfg is None:
    raise ValueError("forward: lora given without lora_cfg")
  x = params["embed"][tokens].astype(cfg.jnp_dtype)

  if cache is None:
    causal = jnp.tril(jnp.ones((t, t), bool))
    attn_mask = causal[None] & mask[:, None, :]
    index = jnp.zeros((), jnp.int32)
    key_mask = None
  else:
    key_mask = jax.lax.dynamic_update_slice_in_dim(cache.key_mask, mask, cache.index, axis=1)
    slots = jnp.arange(window or cache.k.shape[3])
    causal = slots[None, :] <= (cache.index + jnp.arange(t))[:, None]  # [T, W]
    attn_mask = causal[None] & key_mask[:, None, :slots.shape[0]]
    index = cache.index

  def body(carry, xs):
    x, ck, cv = carry
    i, p, lo = xs
    x = constrain_activation(x)  # layer boundary: batch over data×fsdp (no-op without an active mesh)
    x, kv = _layer(cfg, scale, x, positions, attn_mask, p, lo, None if ck is None else (i, ck, cv), index)
    return (x,) + ((None, None) if kv is None else kv[1:]), None

  if cfg.remat:
    body = jax.checkpoint(body)
  ck, cv = (None, None) if cache is None else (cache.k, cache.v)
  xs = (jnp.arange(cfg.num_layers), params["layers"], lora)
  (x, ck, cv), _ = jax.lax.scan(body, (x, ck, cv), xs)
  x = rms_norm(x, params["final_norm"], cfg.rms_norm_eps)
  new_cache = None if cache is None else KVCache(k=ck, v=cv, key_mask=key_mask, index=cache.index + t)
  if return_hidden:
    return x, new_cache
  return logits_from_hidden(params, x, cfg), new_cache


def logits_from_hidden(params: Params, x: jax.Array, cfg: ModelConfig) -> jax.Array:
  """lm_head (or the tied embedding) applied to normed hidden states, accumulated in fp32."""
  head = params["embed"].T if cfg.tie_embeddings else params["lm_head"]
  return jnp.einsum("...d,dv->...v", x, head.astype(x.dtype), preferred_element_type=jnp.float32)


def head_logprobs(params: Params, hidden: jax.Array, targets: jax.Array, cfg: ModelConfig,
                  chunk: int = 0) -> tuple[jax.Array, jax.Array]:
  """Per-position log π(target) = z[target] − logsumexp(z) and entropy H = −Σ_v p_v log p_v, p = softmax(z),
  z = head(hidden): fp32[B, T] each, from hidden [B, T, D] and targets int32[B, T].

  chunk > 0 splits T into blocks of `chunk` positions (the last one zero-padded), mapped by `lax.map` under
  `jax.checkpoint`: the forward holds one block's fp32 [B, chunk, V] logits at a time and the backward
  recomputes them block by block, so neither pass materialises [B, T, V] (3 fp32 copies of it otherwise:
  logits, log-softmax and its exp). Same formula per position; only the matmul blocking differs.
  """
  def block(h, tgt):
    z = logits_from_hidden(params, h, cfg)
    logp_all = z - jax.nn.logsumexp(z, axis=-1, keepdims=True)
    logp = jnp.take_along_axis(logp_all, tgt[..., None], axis=-1)[..., 0]
    return logp, -(jnp.exp(logp_all) * logp_all).sum(axis=-1)

  b, t = targets.shape
  if not chunk or chunk >= t:
    return block(hidden, targets)
  n = -(-t // chunk)
  to_blocks = lambda x: jnp.pad(x, [(0, 0), (0, n * chunk - t)] + [(0, 0)] * (x.ndim - 2)).reshape(  # noqa: E731
      b, n, chunk, *x.shape[2:]).swapaxes(0, 1)
  logp, entropy = jax.lax.map(jax.checkpoint(lambda xs: block(*xs)), (to_blocks(hidden), to_blocks(targets)))
  from_blocks = lambda x: x.swapaxes(0, 1).reshape(b, n * chunk)[:, :t]  # noqa: E731
  return from_blocks(logp), from_blocks(entropy)


def token_logprobs(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """log softmax(logits)[target]: fp32[B, T, V], int32[B, T] → fp32[B, T]."""
  logz = jax.nn.logsumexp(logits, axis=-1)
  return jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0] - logz


# ------------------------------------------------------------------------------------- paper presets

# Qwen2.5-*-Instruct architectures (their config.json files), for abstract shape tests and paper configs.
QWEN25 = {
    "1.5B": ModelConfig(151936, 1536, 8960, 28, 12, 2, rope_theta=1e6, tie_embeddings=True,
                        dtype="bfloat16"),
    "3B": ModelConfig(151936, 2048, 11008, 36, 16, 2, rope_theta=1e6, tie_embeddings=True, dtype="bfloat16"),
    "7B": ModelConfig(152064, 3584, 18944, 28, 28, 4, rope_theta=1e6, tie_embeddings=False,
                      dtype="bfloat16"),
    "14B": ModelConfig(152064, 5120, 13824, 48, 40, 8, rope_theta=1e6, rms_norm_eps=1e-5,
                       tie_embeddings=False, dtype="bfloat16"),
}
