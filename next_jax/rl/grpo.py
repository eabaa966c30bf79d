"""GRPO-family objectives with verl's semantics, and the jitted policy update.

Shapes: N sequences in contiguous groups of G (rows [p·G, (p+1)·G) answer prompt p); token-level arrays are
aligned to *targets*: index j scores token j+1 of `tokens` given tokens[:j+1], so they are [N, T−1].

Every aggregation returns (sum, denominator) with the denominator fixed for the whole mini-batch, so
accumulating gradients of sum/denominator over micro-batches gives the full-batch gradient exactly.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax

from next_jax.core import config
from next_jax.core.registry import Registry
from next_jax.models.policy import (
  LoraConfig,
  ModelConfig,
  Params,
  forward,
  head_logprobs,
)
from next_jax.rl import trained

# verl 0.9.1 (verl.trainer.ppo.core_algos: agg_loss, kl_penalty); tests/test_verl.py runs verl's own functions
AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
_KL_BASE = ("k1", "kl", "abs", "k2", "mse", "k3", "low_var_kl")
KL_ESTIMATORS = _KL_BASE + tuple(f"{k}+" for k in _KL_BASE)  # "+": straight-through k2 gradient

# ------------------------------------------------------------------------------------ advantages


def _groups(x: jax.Array, group_size: int) -> jax.Array:
  if x.shape[0] % group_size:
    raise ValueError(f"{x.shape[0]} rewards do not split into groups of {group_size}")
  return x.reshape(-1, group_size)


def grpo_advantages(rewards: jax.Array, group_size: int, eps: float = 1e-6,
                    norm_by_std: bool = True) -> jax.Array:
  """verl GRPO outcome advantage: A_i = (r_i − mean_g) / (std_g + eps), std unbiased (ddof 1).

  norm_by_std=False is Dr.GRPO's A_i = r_i − mean_g. A group of one has no baseline: A = 0 (verl instead
  leaves r/(1+eps) there). rewards: fp32[N] → fp32[N].
  """
  r = _groups(rewards.astype(jnp.float32), group_size)
  if group_size == 1:
    return jnp.zeros_like(rewards, jnp.float32)
  centred = r - r.mean(axis=1, keepdims=True)
  if norm_by_std:
    centred = centred / (r.std(axis=1, ddof=1, keepdims=True) + eps)
  return centred.reshape(-1)


def drgrpo_advantages(rewards: jax.Array, group_size: int) -> jax.Array:
  """Dr.GRPO (Liu et al. 2025): A_i = r_i − mean_g, no std normalisation."""
  return grpo_advantages(rewards, group_size, norm_by_std=False)


def rloo_advantages(rewards: jax.Array, group_size: int) -> jax.Array:
  """RLOO (Ahmadian et al. 2024): A_i = r_i − (Σ_{j≠i} r_j)/(G−1) = G/(G−1)·(r_i − mean_g); G = 1 → 0."""
  if group_size == 1:
    return jnp.zeros_like(rewards, jnp.float32)
  r = _groups(rewards.astype(jnp.float32), group_size)
  loo = (r.sum(axis=1, keepdims=True) - r) / (group_size - 1)
  return (r - loo).reshape(-1)


def masked_whiten(x: jax.Array, mask: jax.Array, eps: float = 1e-8) -> jax.Array:
  """verl masked_whiten: (x − mean)/√(var + eps) over masked entries, var unbiased (× n/(n−1))."""
  m = mask.astype(jnp.float32)
  n = jnp.maximum(m.sum(), 1.0)
  mean = (x * m).sum() / n
  var = ((x - mean) ** 2 * m).sum() / n * n / jnp.maximum(n - 1.0, 1.0)
  return (x - mean) * jax.lax.rsqrt(var + eps)


def outcome_token_rewards(rewards: jax.Array, mask: jax.Array) -> jax.Array:
  """Place each sequence's scalar reward on its last response token. rewards [N], mask [N, T] → [N, T]."""
  last = mask.shape[1] - 1 - jnp.argmax(mask[:, ::-1], axis=1)
  onehot = jax.nn.one_hot(last, mask.shape[1], dtype=jnp.float32) * mask.any(axis=1, keepdims=True)
  return onehot * rewards[:, None].astype(jnp.float32)


def reinforce_pp_advantages(token_rewards: jax.Array, mask: jax.Array, gamma: float = 1.0) -> jax.Array:
  """REINFORCE++ (Hu 2025, verl 0.9.1): G_t = r_t + γ·G_{t+1} on response tokens, the running return
  carried unchanged across masked positions; A = masked_whiten(G) over every response token of the batch,
  zero outside the mask. [N, T] → [N, T]."""
  m = mask.astype(jnp.float32)

  def step(running, xs):
    r_t, m_t = xs
    new = r_t + gamma * running
    return new * m_t + running * (1.0 - m_t), new * m_t

  _, returns = jax.lax.scan(step, jnp.zeros(token_rewards.shape[0]), (token_rewards.T, m.T), reverse=True)
  return masked_whiten(returns.T, m) * m


def reinforce_pp_estimator(rewards: jax.Array, mask: jax.Array, group_size: int, *,
                           token_kl: jax.Array | None = None, kl_in_reward: float = 0.0, gamma: float = 1.0,
                           **_) -> jax.Array:
  """REINFORCE++ from outcome rewards: r_tok = outcome-on-last-token − kl_in_reward·token_kl (verl's
  KL-in-reward, rl.kl_in_reward; the KL *loss* coefficient is LossConfig.kl_coef), then
  `reinforce_pp_advantages`. group_size is unused (the baseline is the batch whitening)."""
  token_rewards = outcome_token_rewards(rewards, mask)
  if token_kl is not None and kl_in_reward:
    token_rewards = token_rewards - kl_in_reward * token_kl * mask.astype(jnp.float32)
  return reinforce_pp_advantages(token_rewards, mask, gamma)


def _on_tokens(adv: jax.Array, mask: jax.Array) -> jax.Array:
  """An outcome advantage A_i [N] on every response token of sequence i: A_i·mask [N, T]."""
  return adv[:, None] * mask.astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class Estimator:
  """fn(rewards fp32[N], mask [N, T], group_size, *, token_kl, kl_in_reward, gamma, eps) → fp32[N, T].
  token_kl: fn reads the per-token KL(π‖π_ref) [N, T], which the trainer computes for it (one extra
  log-prob pass) when rl.kl_in_reward > 0; otherwise fn gets token_kl=None."""
  fn: Callable
  token_kl: bool = False


ESTIMATORS = Registry("advantage estimator")


def register_estimator(name: str, fn: Callable, token_kl: bool = False) -> None:
  """Adding an advantage estimator: its function, then one line at the bottom of this section; rl.estimator,
  config validation and the trainer read ESTIMATORS (tests/test_registry.py adds one)."""
  ESTIMATORS.register(name, Estimator(fn, token_kl))


def compute_advantages(estimator: str, rewards: jax.Array, mask: jax.Array, group_size: int, *,
                       token_kl: jax.Array | None = None, kl_in_reward: float = 0.0, gamma: float = 1.0,
                       eps: float = 1e-6) -> jax.Array:
  """Token-level advantages [N, T] of the registered `estimator` (ESTIMATORS)."""
  return ESTIMATORS.lookup(estimator).fn(rewards, mask, group_size, token_kl=token_kl,
                                         kl_in_reward=kl_in_reward, gamma=gamma, eps=eps)


register_estimator("grpo", lambda r, m, g, *, eps, **_: _on_tokens(grpo_advantages(r, g, eps), m))
register_estimator("drgrpo", lambda r, m, g, **_: _on_tokens(drgrpo_advantages(r, g), m))
register_estimator("rloo", lambda r, m, g, **_: _on_tokens(rloo_advantages(r, g), m))
register_estimator("reinforce_pp", reinforce_pp_estimator, token_kl=True)


def overlong_penalty(lengths: jax.Array, max_len: int, cache_len: int) -> jax.Array:
  """DAPO soft overlong punishment in tokens: 0 if |y| ≤ L−C; (L−C−|y|)/C if L−C < |y| ≤ L; −1 beyond."""
  excess = lengths.astype(jnp.float32) - (max_len - cache_len)
  pen = jnp.where(excess <= 0, 0.0, -excess / max(cache_len, 1))
  return jnp.where(lengths > max_len, -1.0, pen)


# ------------------------------------------------------------------------------------------ losses


def kl_estimate(logp: jax.Array, ref_logp: jax.Array, kind: str) -> jax.Array:
  """Per-token KL(π‖π_ref) estimators (verl `kl_penalty`), with x = logp − ref_logp:

  k1 ("kl"): x;  abs: |x|;  k2 ("mse"): ½x²;
  k3 ("low_var_kl", Schulman): d = clamp(−x, ±20); clamp(eᵈ − d − 1, ±10);
  "<kind>+" (e.g. k3+): the value of <kind> with the gradient of k2, ½x² − sg(½x²) + sg(<kind>), whose
  expected gradient is the KL's (k1's and k3's are not).
  """
  if kind.endswith("+") and kind in KL_ESTIMATORS:
    k2 = kl_estimate(logp, ref_logp, "k2")
    return k2 - jax.lax.stop_gradient(k2) + jax.lax.stop_gradient(kl_estimate(logp, ref_logp, kind[:-1]))
  x = logp - ref_logp
  if kind in ("k1", "kl"):
    return x
  if kind == "abs":
    return jnp.abs(x)
  if kind in ("k2", "mse"):
    return 0.5 * x * x
  if kind in ("k3", "low_var_kl"):
    d = jnp.clip(-x, -20.0, 20.0)
    return jnp.clip(jnp.exp(d) - d - 1.0, -10.0, 10.0)
  raise ValueError(f"kl estimator {kind!r}; choose from {KL_ESTIMATORS}")


def ppo_token_loss(logp, old_logp, advantages, clip_low: float, clip_high: float, clip_c: float | None):
  """verl "vanilla" PPO loss per token, with clip-higher and dual-clip.

  ρ = exp(clamp(logp − old, ±20));  L₁ = max(−Aρ, −A·clip(ρ, 1−ε_low, 1+ε_high));
  for A < 0 and dual-clip c: L = min(L₁, −A·c), else L₁.
  Returns (loss, clipped = [−A·clip(ρ) > −Aρ], clipped_lower = [A<0 ∧ L₁ > −A·c], log ρ).
  """
  log_ratio = jnp.clip(logp - old_logp, -20.0, 20.0)
  ratio = jnp.exp(log_ratio)
  l1, l2 = -advantages * ratio, -advantages * jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
  loss = jnp.maximum(l1, l2)
  clipped_lower = jnp.zeros_like(loss, bool)
  if clip_c is not None:
    l3 = -advantages * clip_c
    clipped_lower = (advantages < 0) & (loss > l3)
    loss = jnp.where(advantages < 0, jnp.minimum(loss, l3), loss)
  return loss, l2 > l1, clipped_lower, log_ratio


def agg_denominator(mask: jax.Array, mode: str, loss_scale_factor: float | None = None) -> jax.Array:
  """The fixed denominator of `mode` for a whole (mini-)batch. mask: [N, T].

  token-mean: Σ mask;  token-sum: 1;  seq-mean-*: B = #sequences with ≥1 token (empty padding rows do not
  count);  seq-mean-token-sum-norm (Dr.GRPO): B·loss_scale_factor, i.e. the mean over sequences of each
  one's token sum, divided by the response-length budget (verl's default for it: T, the mask's width).
  """
  m = mask.astype(jnp.float32)
  if mode == "token-mean":
    return jnp.maximum(m.sum(), 1.0)
  if mode == "token-sum":
    return jnp.ones((), jnp.float32)
  seqs = jnp.maximum((m.sum(axis=-1) > 0).sum().astype(jnp.float32), 1.0)
  if mode in ("seq-mean-token-mean", "seq-mean-token-sum"):
    return seqs
  if mode == "seq-mean-token-sum-norm":
    return seqs * float(loss_scale_factor or mask.shape[-1])
  raise ValueError(f"loss_agg_mode {mode!r}; choose from {AGG_MODES}")


def agg_numerator(loss: jax.Array, mask: jax.Array, mode: str) -> jax.Array:
  """The additive numerator of `mode`: Σ_tok ℓ·m, or Σ_seq (Σ_tok ℓ·m / Σ_tok m) for seq-mean-token-mean."""
  m = mask.astype(jnp.float32)
  if mode == "seq-mean-token-mean":
    return ((loss * m).sum(axis=-1) / jnp.maximum(m.sum(axis=-1), 1.0)).sum()
  return (loss * m).sum()


def aggregate(loss: jax.Array, mask: jax.Array, mode: str, loss_scale_factor: float | None = None):
  """verl `agg_loss` as (sum, denominator): agg = sum / denominator."""
  return agg_numerator(loss, mask, mode), agg_denominator(mask, mode, loss_scale_factor)


# ------------------------------------------------------------------------------------------ update


_RL = config.defaults("rl")  # every default below is the schema's (config.base)


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """Static knobs of the policy objective (verl names in comments)."""

  clip_low: float = _RL.clip_low  # clip_ratio_low
  clip_high: float = _RL.clip_high  # clip_ratio_high (DAPO clip-higher: 0.28)
  clip_c: float | None = _RL.clip_c  # clip_ratio_c, dual-clip for A < 0; None disables
  kl_coef: float = _RL.kl_coef  # kl_loss_coef (use_kl_loss when > 0)
  kl_estimator: str = _RL.kl_estimator  # kl_loss_type
  entropy_coef: float = _RL.entropy_coef  # entropy bonus: loss −= coef·entropy
  agg_mode: str = _RL.agg_mode  # loss_agg_mode
  # seq-mean-token-sum-norm's divisor (None: the loss mask's width; trainer.train_step sets the response
  # budget max_new_tokens, as verl's mask is [batch, response_length])
  loss_scale_factor: int | None = _RL.loss_scale_factor or None
  # an optimiser step whose update is larger than max_update_ratio·‖θ‖ is skipped like a non-finite one
  # (0: off): lr 1e4 or 1e30 gives finite updates that replace the weights (the policy is destroyed, not NaN)
  max_update_ratio: float = _RL.max_update_ratio
  num_mini_batches: int = _RL.num_mini_batches  # optimiser steps per RL step (ppo_mini_batch)
  micro_batch_size: int | None = _RL.micro_batch_size or None  # rows per gradient-accumulation micro-batch (None: whole mini)
  # only the last `logprob_tail` target positions get logits (0: all). Exact when loss_mask is zero before
  # them; trainer.train_step sets it to max_new_tokens (its batches are prompt ++ response), which saves
  # the [N, T_prompt, V] logits of the prompt, whose loss weight is zero anyway.
  logprob_tail: int = 0
  # positions per block of the lm_head + log-softmax (0: all at once): bounds the fp32 logits held at once by
  # [micro-batch, logprob_chunk, V] in the forward and the backward pass (policy.head_logprobs)
  logprob_chunk: int = _RL.logprob_chunk

  def __post_init__(self):
    if self.agg_mode not in AGG_MODES:
      raise ValueError(f"LossConfig.agg_mode={self.agg_mode!r}; choose from {AGG_MODES}")
    if self.kl_estimator not in KL_ESTIMATORS:  # by name: no JAX work may precede jax.distributed
      raise ValueError(f"kl estimator {self.kl_estimator!r}; choose from {KL_ESTIMATORS}")


class TrainState(flax.struct.PyTreeNode):
  """The trainable side: LoRA factors (LoRA runs) or all parameters (full runs), and the optimiser."""

  step: jax.Array
  params: Params
  opt_state: optax.OptState
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)

  @classmethod
  def create(cls, params: Params, tx: optax.GradientTransformation) -> "TrainState":
    """A fresh state on a *copy* of params (updates donate the state; the caller keeps its arrays)."""
    params = jax.tree.map(jnp.copy, params)
    return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), tx=tx)


class Batch(flax.struct.PyTreeNode):
  """One RL batch. tokens int32[N, T] = left-padded prompt ++ response; mask bool[N, T] real tokens;
  loss_mask bool[N, T−1] response targets; advantages, sampler_logprobs fp32[N, T−1]."""

  tokens: jax.Array
  mask: jax.Array
  loss_mask: jax.Array
  advantages: jax.Array
  sampler_logprobs: jax.Array


def sequence_logprobs(params: Params, tokens: jax.Array, mask: jax.Array, cfg: ModelConfig,
                      lora: Params | None = None, lora_cfg: LoraConfig | None = None, tail: int = 0,
                      chunk: int = 0):
  """log π(tokens[:, j+1] | tokens[:, :j+1]) and the entropy of that distribution: fp32[N, T−1] each.

  tail > 0: logits only for the last `tail` targets (the lm_head and softmax never see the others);
  the earlier positions of both outputs are 0. chunk > 0: those logits `chunk` positions at a time
  (`policy.head_logprobs`), never [N, T, V] at once."""
  hidden, _ = forward(params, tokens[:, :-1], cfg, mask=mask[:, :-1], lora=lora, lora_cfg=lora_cfg,
                      return_hidden=True)
  targets = tokens[:, 1:]
  skip = max(targets.shape[1] - tail, 0) if tail else 0
  logp, entropy = head_logprobs(params, hidden[:, skip:], targets[:, skip:], cfg, chunk)
  pad = lambda x: jnp.pad(x, ((0, 0), (skip, 0))) if skip else x  # noqa: E731
  return pad(logp), pad(entropy)


def _policy_logprobs(trainable, base_params, tokens, mask, cfg, lora_cfg, lc: LossConfig):
  """The trained policy: base + LoRA(trainable) when lora_cfg is set, else the full params `trainable`."""
  params, lora_kw = trained.policy_args(base_params, trainable, lora_cfg)
  return sequence_logprobs(params, tokens, mask, cfg, **lora_kw, tail=lc.logprob_tail, chunk=lc.logprob_chunk)


def _split(tree, n: int):
  """Leading axis N → [n, N/n, ...] (contiguous chunks, so groups stay together)."""
  def f(x):
    if x.shape[0] % n:
      raise ValueError(f"batch of {x.shape[0]} rows does not split into {n} equal parts")
    return x.reshape(n, x.shape[0] // n, *x.shape[1:])
  return jax.tree.map(f, tree)


_SUM_KEYS = ("pg_loss", "clipfrac", "clipfrac_lower", "ppo_kl", "kl_ref", "entropy", "mismatch_abs")


def _micro_loss(trainable, base_params, mb: Batch, old_logp, ref_logp, denom, cfg, lora_cfg,
                lc: LossConfig):
  """Σ-part of the objective on one micro-batch, divided by the mini-batch's denominator, + metrics.

  old_logp=None means on-policy (one mini-batch): old = stop_gradient(logp) of this very forward, which
  equals a separate no-grad pass before the update and saves it."""
  logp, entropy = _policy_logprobs(trainable, base_params, mb.tokens, mb.mask, cfg, lora_cfg, lc)
  if old_logp is None:
    old_logp = jax.lax.stop_gradient(logp)
  loss, clipped, clipped_lower, log_ratio = ppo_token_loss(logp, old_logp, mb.advantages, lc.clip_low,
                                                           lc.clip_high, lc.clip_c)
  m = mb.loss_mask
  total = agg_numerator(loss, m, lc.agg_mode)
  kl = kl_estimate(logp, ref_logp, lc.kl_estimator) if lc.kl_coef else jnp.zeros_like(logp)
  if lc.kl_coef:
    total = total + lc.kl_coef * agg_numerator(kl, m, lc.agg_mode)
  if lc.entropy_coef:
    total = total - lc.entropy_coef * agg_numerator(entropy, m, lc.agg_mode)
  mf = m.astype(jnp.float32)
  sums = {"pg_loss": agg_numerator(loss, m, lc.agg_mode) / denom, "clipfrac": (clipped * mf).sum(),
          "clipfrac_lower": (clipped_lower * mf).sum(), "ppo_kl": (-log_ratio * mf).sum(),
          "kl_ref": (kl * mf).sum(), "entropy": (entropy * mf).sum()}
  mismatch = jnp.abs(mb.sampler_logprobs - old_logp) * mf
  sums["mismatch_abs"], sums["mismatch_max"] = mismatch.sum(), mismatch.max()
  return total / denom, sums


def _accumulate(acc, new):
  """Add gradients and sums; keep the running maximum of "*_max" entries."""
  grads = jax.tree.map(jnp.add, acc[0], new[0])
  sums = {k: jnp.maximum(v, new[1][k]) if k.endswith("_max") else v + new[1][k] for k, v in acc[1].items()}
  return grads, sums


def _all_finite(tree) -> jax.Array:
  """bool[]: every entry of every floating leaf is finite."""
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in leaves]))


def keep_if_finite(ok: jax.Array, new, old):
  """new if ok else old, leaf by leaf: a non-finite loss/gradient/update leaves the state untouched."""
  return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)


@functools.partial(jax.jit, donate_argnums=0, static_argnames=("cfg", "lora_cfg", "loss_cfg"))
def grpo_update(state: TrainState, base_params: Params, batch: Batch, *, cfg: ModelConfig,
                lora_cfg: LoraConfig | None, loss_cfg: LossConfig):
  """One RL step's policy optimisation: num_mini_batches optimiser steps, each accumulating gradients
  over micro-batches with `lax.scan`.

  old logprobs: the current policy, recomputed by this training graph (the sampler's own logprobs only feed
  the mismatch metrics): a no-grad pass before the first step when there are several mini-batches, the
  gradient pass's own stop-gradient values when there is one (on-policy); reference: `base_params` without
  LoRA (LoRA runs — no second copy) or `base_params` as the frozen initial weights (full runs). Returns
  (new state, metrics).

  Fault tolerance: a mini-batch whose loss, gradient or updated parameters hold a NaN/Inf, or whose update
  is oversized (‖Δθ‖ > max_update_ratio·‖θ‖), is skipped: the optimiser step is not taken (params,
  opt_state and step stay bit-identical); metrics["nonfinite_updates"] and ["oversized_updates"] count them.
  """
  lc = loss_cfg
  n = batch.tokens.shape[0]
  micro = lc.micro_batch_size or n // lc.num_mini_batches
  n_micro = n // micro

  def no_grad_logprobs(p, lora_kw):
    chunks = _split((batch.tokens, batch.mask), n_micro)
    f = lambda c: sequence_logprobs(p, c[0], c[1], cfg, **lora_kw, tail=lc.logprob_tail,  # noqa: E731
                                    chunk=lc.logprob_chunk)[0]
    return jax.lax.map(f, chunks).reshape(n, -1)

  on_policy = lc.num_mini_batches == 1
  old_logp = None if on_policy else jax.lax.stop_gradient(
      no_grad_logprobs(*trained.policy_args(base_params, state.params, lora_cfg)))
  ref_logp = no_grad_logprobs(base_params, {}) if lc.kl_coef else batch.sampler_logprobs
  tokens_all = jnp.maximum(batch.loss_mask.sum(), 1)
  grad_fn = jax.grad(_micro_loss, has_aux=True)

  def mini_step(carry, mini):
    state = carry
    mb_batch, mb_old, mb_ref = mini
    denom = agg_denominator(mb_batch.loss_mask, lc.agg_mode, lc.loss_scale_factor)
    k = mb_batch.tokens.shape[0] // micro

    def micro_step(acc, xs):
      b, o, r = xs
      g, sums = grad_fn(state.params, base_params, b, o, r, denom, cfg, lora_cfg, lc)
      return _accumulate(acc, (g, sums)), None

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    zero_sums = {k_: jnp.zeros((), jnp.float32) for k_ in _SUM_KEYS + ("mismatch_max",)}
    (grads, sums), _ = jax.lax.scan(micro_step, (zeros, zero_sums), _split((mb_batch, mb_old, mb_ref), k))
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    new = state.replace(params=optax.apply_updates(state.params, updates), opt_state=opt_state,
                        step=state.step + 1)
    sums["grad_norm"] = optax.tree.norm(grads)
    finite = _all_finite((grads, sums["pg_loss"], new.params))
    sums["update_ratio"] = optax.tree.norm(updates) / jnp.maximum(optax.tree.norm(state.params), 1e-30)
    oversized = finite & (lc.max_update_ratio > 0) & (sums["update_ratio"] > lc.max_update_ratio)
    sums["nonfinite"], sums["oversized"] = 1.0 - finite.astype(jnp.float32), oversized.astype(jnp.float32)
    return keep_if_finite(finite & ~oversized, new, state), sums

  minis = _split((batch, old_logp, ref_logp), lc.num_mini_batches)
  state, sums = jax.lax.scan(mini_step, state, minis)
  metrics = {k: sums[k].sum() / tokens_all for k in ("clipfrac", "clipfrac_lower", "ppo_kl", "kl_ref",
                                                     "entropy")}
  metrics["pg_loss"] = sums["pg_loss"].mean()
  metrics["grad_norm"] = sums["grad_norm"].mean()
  # sampler vs trainer log-probs of the sampled tokens, against the first mini-batch's old policy
  metrics["sampler_logp_abs_diff"] = sums["mismatch_abs"].sum() / tokens_all
  metrics["sampler_logp_max_abs_diff"] = sums["mismatch_max"].max()
  metrics["nonfinite_updates"] = sums["nonfinite"].sum()  # skipped optimiser steps (state kept)
  metrics["oversized_updates"] = sums["oversized"].sum()
  metrics["update_ratio_max"] = jnp.where(sums["nonfinite"] > 0, 0.0, sums["update_ratio"]).max()
  return state, metrics
