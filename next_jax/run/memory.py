"""Per-device memory plan of an RLVR/NExt run on a ("data", "fsdp", "tensor") mesh, without any device.

State sizes come from `jax.eval_shape` of the real initialisers (params, LoRA, the run's optax optimiser,
the NExt trajectory) and the per-device share from the partition rules in `sharding`. Activations are an
estimate from shapes (formulas below): the live tensors our code materialises, not XLA's buffer
assignment, which can fuse some away or hold extra temporaries.

    train  = params + trainable + optimiser + 2·grads (accumulator + micro-step) + trajectory + update acts
    sample = params + trainable + optimiser + trajectory + KV cache (prefill + tiled) + max(prefill, decode)
    peak   = max(train, sample)          (rollout and update run one after the other)

Update activations, one micro-batch of b rows and T = seq − 1 tokens, per layer and in total:
    residual   L · [b, T, D]                                   (scan carries saved for the backward pass)
    internals  q,o-in [b,T,H·hd]×2 + k,v [b,T,KVH·hd]×2 + gate,up,act [b,T,F]×3 + norms [b,T,D]×2
               + scores fp32 and probs [b, H, T, T]             (no flash attention)
               × L without remat, × 1 with remat (the layer being recomputed)
    head       3 · [b, C, V] fp32                              (logits, log-softmax, its exp for entropy)
               C = min(logprob_chunk or max_new, max_new): only response targets get logits (logprob_tail)
Sampler, P prompts of Tp tokens per call (sample_chunk, or all), N = P·G rows, S = Tp + max_new slots,
in cfg.kv_cache_dtype (default the model dtype):
    KV cache   2 · [L, N, KVH, S, hd] + 2 · [L, max(P·[G > 1], ⌊N/2⌋), KVH, S, hd]
               (the second term: the prefill cache before it is tiled G×, or the copy that compacting the
               live rows into ≤ N/2 rows makes between decode segments, whichever is larger)
    prefill    one layer's scores fp32 + probs [P, H, Tp, S] + q,k,v,o,gate,up,act + [P, 1, V] logits
    decode     3 · [N, V] fp32 (logits, processed, log-softmax)
Batch dims are split over data×fsdp, heads/F/V over tensor, with the same divisibility rule as the params.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import numpy as np

from next_jax.core import sharding
from next_jax.models import policy
from next_jax.models.policy import LoraConfig, ModelConfig
from next_jax.rl import trained

GB = 1e9
ACCELERATORS = {"TPU v5e": 16 * GB, "TPU v5p": 95 * GB, "H100": 80 * GB}  # HBM per chip (decimal GB)
B, TENSOR = sharding.BATCH, sharding.TENSOR


@dataclasses.dataclass(frozen=True)
class Workload:
  """Shapes of one RL step: prompts·group_size rows, sampled sample_chunk prompts at a time (0: all in one
  call); micro_batch rows per gradient pass, whose log-probs take logprob_chunk positions at a time (0: all);
  snapshots: NExt trajectory length K (0: plain RL)."""

  prompts: int
  group_size: int
  prompt_len: int
  max_new_tokens: int
  micro_batch: int
  snapshots: int = 0
  sample_chunk: int = 0
  logprob_chunk: int = 0

  @property
  def seq(self) -> int:
    return self.prompt_len + self.max_new_tokens

  @property
  def head_positions(self) -> int:
    """Target positions whose fp32 logits the update holds at once (trainer: logprob_tail = max_new)."""
    return min(self.logprob_chunk or self.max_new_tokens, self.max_new_tokens)

  @property
  def prompts_per_call(self) -> int:
    return min(self.sample_chunk or self.prompts, self.prompts)


def abstract_state(cfg: ModelConfig, lcfg: LoraConfig | None, tx, snapshots: int = 0) -> dict:
  """ShapeDtypeStruct trees of params, trainable (LoRA, or a full copy), optimiser state and trajectory."""
  key = jax.random.key(0)
  params = jax.eval_shape(lambda: policy.init_params(cfg, key))
  trainable = params if lcfg is None else jax.eval_shape(lambda: policy.init_lora(cfg, lcfg, key))
  mats = trained.matrices(trainable, lcfg)
  traj = jax.tree.map(lambda x: jax.ShapeDtypeStruct((snapshots, *x.shape), x.dtype), mats)
  return {"params": params, "trainable": trainable, "optimizer": jax.eval_shape(tx.init, trainable),
          "trajectory": traj}


def _bytes(shape, dims, itemsize: int, sizes: Mapping[str, int]) -> int:
  """Per-device bytes of an activation; `dims` names the wish of every dim (same rule as the params)."""
  return sharding.shard_bytes(shape, itemsize, sharding.fit_dims(shape, dims, sizes), sizes)


def _layer_internals(cfg: ModelConfig, b: int, t: int, s: int, sizes) -> int:
  """One layer's projections, MLP and attention scores/probs for b rows, t queries, s keys."""
  it = np.dtype(cfg.jnp_dtype).itemsize
  h, kvh, hd, d, f = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size, cfg.intermediate_size
  act = lambda width: _bytes((b, t, width), (B, None, TENSOR), it, sizes)  # noqa: E731
  return (2 * act(h * hd) + 2 * act(kvh * hd) + 3 * act(f) + 2 * _bytes((b, t, d), (B, None, None), it, sizes)
          + _bytes((b, h, t, s), (B, TENSOR, None, None), 4 + it, sizes))


def update_activations(cfg: ModelConfig, b: int, t: int, sizes, remat: bool, head_t: int | None = None) -> int:
  """Estimated bytes live at the peak of one micro-batch's forward+backward (module docstring); head_t:
  positions whose logits are live at once (None: all t)."""
  it = np.dtype(cfg.jnp_dtype).itemsize
  residual = cfg.num_layers * _bytes((b, t, cfg.hidden_size), (B, None, None), it, sizes)
  internals = _layer_internals(cfg, b, t, t, sizes) * (1 if remat else cfg.num_layers)
  head = 3 * _bytes((b, min(head_t or t, t), cfg.vocab_size), (B, None, TENSOR), 4, sizes)
  return residual + internals + head


def sampler_bytes(cfg: ModelConfig, w: Workload, sizes) -> dict[str, int]:
  """KV cache (tiled, plus the prefill cache or a compaction's copy) and the larger of the prefill / decode
  transients."""
  it = np.dtype(cfg.kv_jnp_dtype).itemsize
  p = w.prompts_per_call
  n, s = p * w.group_size, w.seq
  kv = lambda rows: 2 * _bytes((cfg.num_layers, rows, cfg.num_kv_heads, s, cfg.head_dim),  # noqa: E731
                               sharding.CACHE_DIMS, it, sizes)
  cache = kv(n) + max(kv(p) if w.group_size > 1 else 0, kv(n // 2))
  prefill = (_layer_internals(cfg, p, w.prompt_len, s, sizes)
             + _bytes((p, 1, cfg.vocab_size), (B, None, TENSOR), 4, sizes))
  decode = 3 * _bytes((n, cfg.vocab_size), (B, TENSOR), 4, sizes)
  return {"kv_cache": cache, "sampler_activations": max(prefill, decode)}


def plan(cfg: ModelConfig, lcfg: LoraConfig | None, tx, w: Workload, sizes: Mapping[str, int]) -> dict:
  """Per-device bytes of every component and the train / sample / peak totals, for remat on and off."""
  state = abstract_state(cfg, lcfg, tx, w.snapshots)
  out = {k: sharding.tree_shard_bytes(v, sizes) for k, v in state.items()}
  out["grads"] = 2 * out["trainable"]
  out.update(sampler_bytes(cfg, w, sizes))
  resident = out["params"] + out["trainable"] + out["optimizer"] + out["trajectory"]
  for remat in (True, False):
    key = "remat" if remat else "no_remat"
    acts = update_activations(cfg, w.micro_batch, w.seq - 1, sizes, remat, w.head_positions)
    out[f"update_activations_{key}"] = acts
    out[f"train_{key}"] = resident + out["grads"] + out[f"update_activations_{key}"]
  out["sample"] = resident + out["kv_cache"] + out["sampler_activations"]
  for key in ("remat", "no_remat"):
    out[f"peak_{key}"] = max(out[f"train_{key}"], out["sample"])
  return out


def fits(peak: int) -> dict[str, bool]:
  """{accelerator: peak ≤ its HBM}."""
  return {name: peak <= cap for name, cap in ACCELERATORS.items()}
