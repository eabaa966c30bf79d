"""The RLVR loop: sample G responses per prompt → verify → advantages → `grpo_update`.

`train_step` is one RL step on an `RLState` (the trainable state, rng, RL step and data cursor: everything
that changes). Everything that does not change lives in an `RLSetup` (model config, base params, tokenizer
hooks, problems, knobs). The step's randomness is `fold_in(rng, step)` and its prompts come from the cursor,
so a run restored from a checkpoint continues with the same bits as the uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from next_jax.core import config, sharding
from next_jax.core.metrics import Timer
from next_jax.models.policy import LoraConfig, ModelConfig, Params
from next_jax.models.sampler import generate, pad_prompts
from next_jax.rl import grpo, trained

_ROLLOUT = config.defaults("rollout")  # every default below is the schema's (config.base)


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
  """config.rollout (defaults: the schema's, config.base; the batch shape has none)."""

  prompts_per_step: int
  prompt_len: int  # fixed (left-padded) prompt length: one compiled program
  max_new_tokens: int
  group_size: int = _ROLLOUT.group_size  # G responses per prompt
  temperature: float = _ROLLOUT.temperature
  top_p: float = _ROLLOUT.top_p
  top_k: int = _ROLLOUT.top_k
  dynamic_sampling: bool = _ROLLOUT.dynamic_sampling  # DAPO: keep only groups with reward spread, resample to fill
  max_sampling_rounds: int = _ROLLOUT.max_sampling_rounds  # dynamic sampling gives up after this many rounds; the rest is masked
  overlong_cache: int = _ROLLOUT.overlong_cache  # DAPO overlong penalty window in tokens (0: off); max_len = max_new_tokens
  sample_chunk: int = _ROLLOUT.sample_chunk  # prompts per sampler call in `collect` (0: all): the KV cache holds sample_chunk·G rows


_RL = config.defaults("rl")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """AdamW with linear warmup then constant or cosine decay, after global-norm clipping. Defaults are
  config.rl's (the schema, config.base); the learning rate has none."""

  lr: float
  warmup_steps: int = _RL.warmup_steps
  schedule: str = _RL.schedule  # "constant" | "cosine"
  decay_steps: int = 1000  # optimiser steps of the cosine (RL steps × num_mini_batches)
  min_lr_ratio: float = 0.0
  weight_decay: float = _RL.weight_decay
  b1: float = _RL.b1
  b2: float = _RL.b2
  eps: float = 1e-8
  grad_clip: float | None = _RL.grad_clip


def make_optimizer(oc: OptimConfig) -> optax.GradientTransformation:
  """clip_by_global_norm → AdamW(lr schedule). lr(t) = lr·t/warmup during warmup, then constant or
  cosine from lr to min_lr_ratio·lr over decay_steps."""
  if oc.schedule == "constant":
    main = optax.constant_schedule(oc.lr)
  elif oc.schedule == "cosine":
    main = optax.cosine_decay_schedule(oc.lr, max(oc.decay_steps - oc.warmup_steps, 1), oc.min_lr_ratio)
  else:
    raise ValueError(f"OptimConfig.schedule={oc.schedule!r}; choose 'constant' or 'cosine'")
  sched = (optax.join_schedules([optax.linear_schedule(0.0, oc.lr, oc.warmup_steps), main],
                                [oc.warmup_steps]) if oc.warmup_steps else main)
  adamw = optax.adamw(sched, b1=oc.b1, b2=oc.b2, eps=oc.eps, weight_decay=oc.weight_decay)
  return optax.chain(optax.clip_by_global_norm(oc.grad_clip), adamw) if oc.grad_clip else adamw


class RLState(flax.struct.PyTreeNode):
  """Everything a step changes. rng: raw uint32[2] key; step: RL steps done; cursor: problems consumed."""

  train: grpo.TrainState
  rng: jax.Array
  step: jax.Array
  cursor: jax.Array


@dataclasses.dataclass(frozen=True)
class RLSetup:
  """What a run holds fixed. encode(problem) → prompt token ids; reward(text, problem) → float;
  next_problems(cursor, n) → (problems, new cursor) in a deterministic order."""

  cfg: ModelConfig
  lora_cfg: LoraConfig | None
  loss_cfg: grpo.LossConfig
  rollout: RolloutConfig
  estimator: str
  encode: Callable[[Any], list[int]]
  decode: Callable[[list[int]], str]
  reward: Callable[[str, Any], float]
  next_problems: Callable[[int, int], tuple[Sequence[Any], int]]
  pad_id: int
  stop_ids: tuple[int, ...]
  mesh: Any = None  # sharding.make_mesh: (data,) or (data, fsdp, tensor); None: one device
  kl_in_reward: float = 0.0  # token-level KL-in-reward coefficient (estimators registered token_kl=True)


def init_state(trainable: Params, tx: optax.GradientTransformation, seed: int) -> RLState:
  return RLState(train=grpo.TrainState.create(trainable, tx), rng=jax.random.PRNGKey(seed),
                 step=jnp.zeros((), jnp.int32), cursor=jnp.zeros((), jnp.int32))


# --------------------------------------------------------------------------------------------- rollout


def _sample(setup: RLSetup, base_params, trainable, problems, key, group_size, temperature, prompt_chunk=0):
  """`group_size` responses to each of `problems` (the round's global list, P of them), `prompt_chunk`
  prompts per prefill + decode (0: all; `sampler.generate`).

  This process encodes only its prompts (`sharding.process_rows`) and the global batch is assembled from
  every process's rows; the mesh then samples each row on the device that holds it.
  → (prompts int32[P, T], pmask bool[P, T], SampleOutput with P·G rows): global arrays, rows split over
  the mesh's batch axes (numpy/one device without a mesh)."""
  params, lora_kw = trained.policy_args(base_params, trainable, setup.lora_cfg)
  ro, mesh = setup.rollout, setup.mesh
  mine = sharding.process_rows(mesh, len(problems))
  prompts, pmask = pad_prompts([setup.encode(problems[i]) for i in mine], setup.pad_id, ro.prompt_len)
  prompts, pmask = sharding.from_process_rows((prompts, pmask), mesh, len(problems))
  with sharding.use_mesh(mesh):  # activates the KV-cache / layer-boundary constraints
    out = generate(params, prompts, pmask, key, cfg=setup.cfg, **lora_kw,
                   max_new_tokens=ro.max_new_tokens, num_samples=group_size, temperature=temperature,
                   top_k=ro.top_k, top_p=ro.top_p, stop_ids=setup.stop_ids, pad_id=setup.pad_id,
                   prompt_chunk=prompt_chunk)
  if mesh is not None:  # rows of every output on the devices that sampled them (row r ↔ prompt r // G)
    out = _constrain_rows(out, sharding.batch_sharding(mesh))
  return prompts, pmask, out


def _constrain(tree, sharding):
  """with_sharding_constraint on every leaf (inside jit); sharding None: unchanged."""
  if sharding is None:
    return tree
  return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, sharding), tree)


_constrain_rows = jax.jit(_constrain, static_argnames=("sharding",))


def _rows_sharding(setup: RLSetup):
  return sharding.batch_sharding(setup.mesh) if setup.mesh is not None else None


def _score(setup: RLSetup, problems, group_size, out) -> np.ndarray:
  """Verify this process's rows of `out` (row r answers problems[r // G]); only its own shards are read,
  no tokens cross hosts. → fp32[rows of this process] (all rows on one process)."""
  rows = sharding.process_rows(setup.mesh, out.tokens.shape[0])
  tokens, mask = sharding.local_rows(out.tokens), sharding.local_rows(out.mask)
  texts = (setup.decode(t[m].tolist()) for t, m in zip(tokens, mask))
  return np.asarray([setup.reward(x, problems[r // group_size]) for x, r in zip(texts, rows)], np.float32)


@functools.partial(jax.jit, static_argnames=("group_size", "sharding"))
def _take_rows(rounds, rows, *, group_size, sharding):
  """One batch from the sampling rounds: prompts/pmask repeated G times (row r ↔ prompt r // G), every
  array concatenated over rounds, then rows `rows` (int32[N], or None: all, one round). Runs on the mesh,
  so a kept group moves to the device of its batch slot."""
  def one(k):
    xs = [jnp.repeat(r[k], group_size, 0) if k in ("prompts", "pmask") else r[k] for r in rounds]
    return xs[0] if rows is None else jnp.concatenate(xs)[rows]
  return _constrain({k: one(k) for k in rounds[0]}, sharding)


def collect(setup: RLSetup, base_params: Params, state: RLState):
  """Sample and verify one RL batch of prompts_per_step × G responses.

  Every process draws the same global prompts from the cursor; each encodes, and verifies, only its own
  rows (`sharding.process_rows`): rewards are the only per-row data shared between hosts.
  With dynamic sampling (DAPO), groups whose rewards are all equal are dropped and fresh prompts are
  sampled until the buffer holds prompts_per_step groups or max_sampling_rounds is reached; unfilled
  slots keep the last groups sampled with their loss masked out, so shapes never change.
  Returns (arrays, new cursor, metrics). arrays: prompts, pmask, tokens, rmask, logprobs, rewards as
  global [N, ...] arrays (rows split over the mesh); live: bool[N] numpy, the same on every host.
  """
  ro, g, p = setup.rollout, setup.rollout.group_size, setup.rollout.prompts_per_step
  key, cursor = jax.random.fold_in(state.rng, state.step), int(state.cursor)
  rounds, kept, seen_groups, zero_spread = [], [], 0, 0  # kept: (round, group, live)
  for rnd in range(ro.max_sampling_rounds if ro.dynamic_sampling else 1):
    problems, cursor = setup.next_problems(cursor, p)
    prompts, pmask, out = _sample(setup, base_params, state.train.params, problems,
                                  jax.random.fold_in(key, rnd), g, ro.temperature, ro.sample_chunk)
    rewards = _score(setup, problems, g, out)
    if ro.overlong_cache:
      rewards = rewards + np.asarray(grpo.overlong_penalty(sharding.local_rows(out.lengths),
                                                           ro.max_new_tokens, ro.overlong_cache))
    rewards = sharding.from_process_rows(rewards, setup.mesh, p * g)
    spread = sharding.host_array(rewards).reshape(p, g).std(axis=1) > 0  # [p] on every host
    seen_groups, zero_spread = seen_groups + p, zero_spread + int((~spread).sum())
    rounds.append({"prompts": prompts, "pmask": pmask, "tokens": out.tokens, "rmask": out.mask,
                   "logprobs": out.logprobs, "rewards": rewards})
    kept += [(rnd, i, True) for i in range(p) if spread[i] or not ro.dynamic_sampling]
    if len(kept) >= p:
      break
  while len(kept) < p:  # dynamic sampling ran out of rounds: pad with masked groups of the last round
    kept.append((rnd, len(kept) % p, False))
  kept = kept[:p]
  rows = None if kept == [(0, i, True) for i in range(p)] else \
      np.concatenate([(r * p + i) * g + np.arange(g, dtype=np.int32) for r, i, _ in kept])
  arrays = _take_rows(rounds, rows, group_size=g, sharding=_rows_sharding(setup))
  arrays["live"] = np.repeat(np.asarray([live for _, _, live in kept]), g)
  metrics = {"zero_spread_frac": zero_spread / seen_groups, "sampling_rounds": rnd + 1,
             "masked_groups": int((~arrays["live"]).sum()) // g}
  return arrays, cursor, metrics


@functools.partial(jax.jit, static_argnames=("sharding",))
def _assemble(arrays, live, advantages, sharding=None) -> grpo.Batch:
  """prompts [N, Tp] ++ tokens [N, Tr] → a Batch over targets [N, Tp+Tr−1]; the loss sees live rows'
  response tokens only, advantages [N, Tr] are placed on them."""
  tp = arrays["prompts"].shape[1]
  tokens = jnp.concatenate([arrays["prompts"], arrays["tokens"]], axis=1)
  mask = jnp.concatenate([arrays["pmask"], arrays["rmask"]], axis=1)
  pad = jnp.zeros((tokens.shape[0], tp - 1), jnp.float32)
  loss_mask = jnp.concatenate([pad.astype(bool), arrays["rmask"] & live[:, None]], axis=1)
  batch = grpo.Batch(tokens=tokens, mask=mask, loss_mask=loss_mask,
                     advantages=jnp.concatenate([pad, advantages], axis=1) * loss_mask,
                     sampler_logprobs=jnp.concatenate([pad, arrays["logprobs"]], axis=1))
  return _constrain(batch, sharding)


def make_batch(setup: RLSetup, arrays: dict, advantages: jax.Array) -> grpo.Batch:
  """Concatenate prompt ++ response and align masks/logprobs/advantages to targets ([N, T−1]), on the
  devices that hold each row (a global, batch-sharded Batch under a mesh)."""
  keys = ("prompts", "pmask", "tokens", "rmask", "logprobs")
  return _assemble({k: arrays[k] for k in keys}, arrays["live"], advantages, _rows_sharding(setup))


@functools.partial(jax.jit, static_argnames=("cfg", "lora_cfg", "chunk"))
def _token_kl(base_params, trainable, tokens, mask, *, cfg, lora_cfg, chunk=0):
  """k1 KL of the current policy to the reference per target token: log π − log π_ref."""
  params, lora_kw = trained.policy_args(base_params, trainable, lora_cfg)
  logp, _ = grpo.sequence_logprobs(params, tokens, mask, cfg, **lora_kw, chunk=chunk)
  ref, _ = grpo.sequence_logprobs(base_params, tokens, mask, cfg, chunk=chunk)
  return logp - ref


def train_step(setup: RLSetup, base_params: Params, state: RLState, timer: Timer | None = None):
  """One RL step → (new state, metrics). The trainable state is donated to the update."""
  timer = timer or Timer()
  with timer("sample"):
    arrays, cursor, metrics = collect(setup, base_params, state)
  live = arrays["live"]
  resp_mask = arrays["rmask"] & live[:, None]
  token_kl = None
  if grpo.ESTIMATORS[setup.estimator].token_kl and setup.kl_in_reward:
    with timer("logprob"):
      toks = jnp.concatenate([arrays["prompts"], arrays["tokens"]], 1)
      msk = jnp.concatenate([arrays["pmask"], arrays["rmask"]], 1)
      kl = _token_kl(base_params, state.train.params, toks, msk, cfg=setup.cfg, lora_cfg=setup.lora_cfg,
                     chunk=setup.loss_cfg.logprob_chunk)
      token_kl = kl[:, arrays["prompts"].shape[1] - 1:]
  adv = grpo.compute_advantages(setup.estimator, jnp.asarray(arrays["rewards"]), jnp.asarray(resp_mask),
                                setup.rollout.group_size, token_kl=token_kl, kl_in_reward=setup.kl_in_reward)
  batch = make_batch(setup, arrays, adv)
  with timer("update"), sharding.use_mesh(setup.mesh):
    # the batch is prompt ++ response: only its last max_new_tokens targets carry loss, so only they get
    # logits; Dr.GRPO divides by that response budget, as verl (its loss mask is [B, response_length])
    budget = setup.rollout.max_new_tokens
    loss_cfg = dataclasses.replace(setup.loss_cfg, logprob_tail=budget,
                                   loss_scale_factor=setup.loss_cfg.loss_scale_factor or budget)
    train, upd = grpo.grpo_update(state.train, base_params, batch, cfg=setup.cfg, lora_cfg=setup.lora_cfg,
                                  loss_cfg=loss_cfg)
    upd = jax.device_get(upd)
  rewards = sharding.host_array(arrays["rewards"])  # [N] on every host: per-row numbers, not tokens
  lengths = sharding.host_array(arrays["rmask"].sum(1))
  rewards = rewards[live] if live.any() else rewards
  times = timer.pop()
  n_tokens = int(lengths.sum())
  metrics.update({k: float(v) for k, v in upd.items()})
  metrics.update({"reward_mean": float(rewards.mean()), "reward_std": float(rewards.std()),
                  "accuracy": float((rewards > 0.5).mean()), "response_len": float(lengths.mean()),
                  "tokens_per_s": n_tokens / max(times.get("time/sample", 0.0), 1e-9), **times})
  new = state.replace(train=train, step=state.step + 1, cursor=jnp.asarray(cursor, jnp.int32))
  return new, metrics


# ------------------------------------------------------------------------------------------ evaluate


def evaluate(setup: RLSetup, base_params: Params, trainable: Params, problems: Sequence[Any], *,
             chunk: int, samples: int = 1, temperature: float = 0.0, seed: int = 0) -> dict[str, Any]:
  """Accuracy over `problems` (avg@samples, i.e. pass@1), mean reward, pass@samples (the share of
  problems with ≥ 1 correct sample) and `solved`, each problem's share of correct samples (for paired
  comparisons of two policies on the same problems). Problems go in equal chunks (the last is padded with repeats and
  ignored), so evaluation compiles once. temperature 0 = greedy. Like `collect`, each process encodes
  and verifies only its rows of a chunk; the rewards are then shared."""
  scores = []
  for start in range(0, len(problems), chunk):
    part = list(problems[start:start + chunk])
    n_real = len(part)
    part += [part[-1]] * (chunk - n_real)
    _, _, out = _sample(setup, base_params, trainable, part, jax.random.PRNGKey(seed + start), samples,
                        temperature)
    rewards = sharding.from_process_rows(_score(setup, part, samples, out), setup.mesh, chunk * samples)
    scores.append(sharding.host_array(rewards)[:n_real * samples])
  r = np.concatenate(scores)
  solved = (r > 0.5).reshape(-1, samples)
  return {"accuracy": float(solved.mean()), "reward_mean": float(r.mean()), "n": int(r.size),
          f"pass@{samples}": float(solved.any(axis=1).mean()), "solved": solved.mean(axis=1).tolist()}
