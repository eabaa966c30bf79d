"""What a run trains: LoRA factors on a frozen base (lora_cfg set), or every weight (lora_cfg None).

The one place that branches on it. `trainable` is what the optimiser moves: the LoRA factors
{module: {"a": [L, r, in], "b": [L, out, r]}}, or the whole parameter tree of a full run (whose `base`
is then the frozen reference copy the KL term is measured against).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from next_jax.models.policy import ALL_MODULES, LoraConfig, Params, merge_lora


def policy_args(base: Params, trainable: Params, lora_cfg: LoraConfig | None) -> tuple[Params, dict]:
  """(params, keyword arguments) for `policy.forward`, `grpo.sequence_logprobs` and `sampler.generate`:
  (base, {lora, lora_cfg}) for LoRA, (trainable, {}) for a full run."""
  if lora_cfg is None:
    return trainable, {}
  return base, {"lora": trainable, "lora_cfg": lora_cfg}


def scale(lora_cfg: LoraConfig | None) -> float:
  """The factor between a snapshot's difference and the weight difference: LoRA s = α/r, else 1."""
  return lora_cfg.scale if lora_cfg is not None else 1.0


def matrices(trainable: Params, lora_cfg: LoraConfig | None) -> Params:
  """What a trajectory records: the LoRA factors as they are, or the 7 projection kernels of a full run."""
  if lora_cfg is not None:
    return trainable
  return {m: {"kernel": trainable["layers"][m]["kernel"]} for m in ALL_MODULES}


def paths(lora_cfg: LoraConfig | None) -> set[str]:
  """Paths of the base leaves a trajectory covers: the LoRA targets' kernels, or all seven (full)."""
  mods = lora_cfg.targets if lora_cfg is not None else ALL_MODULES
  return {f"layers/{m}/kernel" for m in mods}


def add_to_kernels(params: Params, deltas: Params, alpha: float) -> Params:
  """W ← W + α·Δ on each module's stacked kernel ({module: Δ [L, n, m]}), computed in fp32."""
  layers = dict(params["layers"])
  for m, d in deltas.items():
    k = layers[m]["kernel"]
    layers[m] = {**layers[m], "kernel": (k.astype(jnp.float32) + alpha * d).astype(k.dtype)}
  return {**params, "layers": layers}


def leaf_name(path) -> str:
  """A pytree key path as "a/b/c" (the names `paths`, `add_to_paths` and `untrained_leaves` use)."""
  return "/".join(str(getattr(k, "key", k)) for k in path)


def add_to_paths(params: Params, deltas: dict[str, jax.Array], alpha: float) -> Params:
  """params[path] += α·Δ for {"a/b/c": Δ} (never-trained leaves, faithful mode)."""
  def add(path, x):
    name = leaf_name(path)
    return (x.astype(jnp.float32) + alpha * deltas[name]).astype(x.dtype) if name in deltas else x
  return jax.tree_util.tree_map_with_path(add, params)


def jump(base: Params, trainable: Params, lora_cfg: LoraConfig | None, deltas: Params, alpha: float,
         merge: bool, untrained: dict | None = None) -> tuple[Params, Params]:
  """W ← W + α·Δ on every trained matrix (and on the never-trained base leaves in `untrained` {path: Δ})
  → (base, trainable).

  LoRA: the jump goes into the base; merge=True first merges s·BA into it and zeroes B (A kept), so the
  adapter restarts from the jumped weights. Full: the jump goes into the trainable weights."""
  if lora_cfg is None:
    return base, add_to_kernels(trainable, deltas, alpha)
  if merge:
    base = merge_lora(base, trainable, lora_cfg)
    trainable = jax.tree.map(jnp.copy, {m: {"a": p["a"], "b": jnp.zeros_like(p["b"])}
                                        for m, p in trainable.items()})
  base = add_to_kernels(base, deltas, alpha)
  return (add_to_paths(base, untrained, alpha) if untrained else base), trainable
