"""The tiny RL setup shared by the trainer, state-machine, fault and multi-process tests (and their subprocess
children, which import this module by path: `sys.path` holds tests/, never the `tests.` package name, since
verl installs a top-level package by that name).

A one-layer model over 16 token ids; the "problems" are pairs of ids and the reward is the fraction of
response tokens with id < 4, which RL can learn in a few steps. conftest's `model` fixture is `init_model()`.
"""

from __future__ import annotations

import jax
import numpy as np

from next_jax.models import policy
from next_jax.rl import grpo, trainer

CFG = policy.ModelConfig(vocab_size=16, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                         num_kv_heads=1)
LCFG = policy.LoraConfig(rank=4, alpha=8)
PROBLEMS = [[1 + a, 1 + b] for b in range(10) for a in range(10)]  # first ids alternate in parity
SETUP_FLAGS = {"constant_even": False}  # True: prompts starting with an even id always score 1


def low_token_reward(text, problem):
  """Fraction of response tokens with id < 4; with SETUP_FLAGS["constant_even"], prompts starting with an
  even id always score 1 (groups without reward spread, for dynamic sampling)."""
  ids = [int(x) for x in text.split()]
  if problem[0] % 2 == 0 and SETUP_FLAGS["constant_even"]:
    return 1.0
  return float(np.mean([i < 4 for i in ids])) if ids else 0.0


def make_setup(**rollout_kw) -> trainer.RLSetup:
  """4 prompts × 8 samples per step, 4 prompt and 4 response tokens; `rollout_kw` overrides RolloutConfig."""
  ro = {"prompts_per_step": 4, "group_size": 8, "prompt_len": 4, "max_new_tokens": 4}
  ro.update(rollout_kw)
  return trainer.RLSetup(
      cfg=CFG, lora_cfg=LCFG, loss_cfg=grpo.LossConfig(), rollout=trainer.RolloutConfig(**ro),
      estimator="grpo", encode=lambda q: q, decode=lambda ids: " ".join(map(str, ids)),
      reward=low_token_reward, pad_id=0, stop_ids=(),
      next_problems=lambda c, n: ([PROBLEMS[(c + i) % len(PROBLEMS)] for i in range(n)], c + n))


def init_model():
  """(base params, LoRA) of CFG / LCFG from keys 0 and 1."""
  return policy.init_params(CFG, jax.random.key(0)), policy.init_lora(CFG, LCFG, jax.random.key(1))


def fresh_state(lora, lr=3e-2, seed=0) -> trainer.RLState:
  return trainer.init_state(lora, trainer.make_optimizer(trainer.OptimConfig(lr=lr)), seed)


def run(setup, params, state, steps):
  """`steps` RL steps → (state, metric rows without the timings, which differ run to run)."""
  rows = []
  for _ in range(steps):
    state, m = trainer.train_step(setup, params, state)
    rows.append({k: v for k, v in m.items() if not k.startswith("time/") and k != "tokens_per_s"})
  return state, rows
