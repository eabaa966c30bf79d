"""Time one RL step (sample + GRPO update) of a small random Qwen2 under several meshes on forced CPU devices.

    python -m experiments.bench.mesh_step --devices=2 --meshes=2x1x1,1x2x1,1x1x2

Each mesh is data×fsdp×tensor. The step is `sampler.generate` (prompts·G rows) then `grpo.grpo_update`
(LoRA), both under `jax.set_mesh`; the median wall time of --steps steps after one warm-up step.
CPU "devices" here are threads of one host: this measures partitioning overhead, not accelerator speed.
"""

import os
import sys

_N = next((a.split("=")[1] for a in sys.argv if a.startswith("--devices=")), "2")
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={_N}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import time

import jax
import numpy as np
from absl import app, flags

from next_jax.core import sharding
from next_jax.models import policy, sampler
from next_jax.rl import grpo, trainer

flags.DEFINE_integer("devices", 2, "forced host devices")
flags.DEFINE_string("meshes", "2x1x1,1x2x1,1x1x2", "comma-separated data×fsdp×tensor")
flags.DEFINE_integer("steps", 5, "timed steps per mesh")
FLAGS = flags.FLAGS

CFG = policy.ModelConfig(vocab_size=1024, hidden_size=256, intermediate_size=768, num_layers=4, num_heads=8,
                         num_kv_heads=2, dtype="float32")
LCFG = policy.LoraConfig(rank=8, alpha=16.0)
PROMPTS, G, PROMPT_LEN, NEW = 8, 4, 32, 32


def one_mesh(d: int, f: int, t: int) -> float:
  mesh = sharding.make_mesh(d, f, t)
  rng = np.random.default_rng(0)
  params = sharding.shard(policy.init_params(CFG, jax.random.key(0)), mesh)
  lora = sharding.shard(policy.init_lora(CFG, LCFG, jax.random.key(1)), mesh)
  prompts = rng.integers(0, CFG.vocab_size, (PROMPTS, PROMPT_LEN)).astype(np.int32)
  pmask = np.ones_like(prompts, bool)
  state = grpo.TrainState.create(lora, trainer.make_optimizer(trainer.OptimConfig(lr=1e-4)))
  times = []
  for step in range(FLAGS.steps + 1):
    t0 = time.perf_counter()
    with sharding.use_mesh(mesh):
      p, m = sharding.shard_batch((prompts, pmask), mesh)
      out = sampler.generate(params, p, m, jax.random.key(step), cfg=CFG, lora=state.params, lora_cfg=LCFG,
                             max_new_tokens=NEW, num_samples=G)
      n = PROMPTS * G
      tokens = np.concatenate([np.repeat(prompts, G, 0), np.asarray(out.tokens)], 1)
      mask = np.concatenate([np.repeat(pmask, G, 0), np.asarray(out.mask)], 1)
      loss_mask = np.concatenate([np.zeros((n, PROMPT_LEN - 1), bool), np.asarray(out.mask)], 1)
      batch = grpo.Batch(tokens=tokens, mask=mask, loss_mask=loss_mask,
                         advantages=rng.normal(size=loss_mask.shape).astype(np.float32) * loss_mask,
                         sampler_logprobs=np.zeros(loss_mask.shape, np.float32))
      state, metrics = grpo.grpo_update(state, params, sharding.shard_batch(batch, mesh), cfg=CFG,
                                        lora_cfg=LCFG, loss_cfg=grpo.LossConfig())
      jax.block_until_ready(metrics)
    if step:
      times.append(time.perf_counter() - t0)
  return float(np.median(times))


def main(argv):
  del argv
  print(f"{jax.device_count()} devices; model D={CFG.hidden_size} L={CFG.num_layers} V={CFG.vocab_size}; "
        f"{PROMPTS}×{G} rows, {PROMPT_LEN}+{NEW} tokens; median of {FLAGS.steps} steps")
  for spec in FLAGS.meshes.split(","):
    d, f, t = (int(x) for x in spec.split("x"))
    print(f"mesh {d}×{f}×{t}: {one_mesh(d, f, t) * 1e3:.0f} ms/step", flush=True)


if __name__ == "__main__":
  app.run(main)
