"""CPU default: NExt on the synthetic a+b*c task with the toy Qwen2 base model (next_jax/run/toy_base.py).

    next-jax-run --config=toy_arith
    next-jax-run --config=toy_arith:algo=rloo,seed=1 --config.rl.lr=3e-3
    next-jax-run --config=toy_arith:quick        # CI-sized smoke run

The paper's schedule (150 steps, snapshot every 10, k = 5, α = 1.5, then 100 more) at toy scale.
"""

from next_jax.core import config as common


def get_config(arg=None):
  a = common.parse_arg(arg, algo="grpo", seed=0, quick=False, method="next", trainable="lora")
  c = common.base()
  c.seed = a.seed
  c.workdir = f"runs/toy_arith/{a.algo}_{a.method}_{a.trainable}_s{a.seed}"
  c.model.dir = "artifacts/toy_base"  # built by `python -m next_jax.cli.toy_base` if missing
  c.model.trainable = a.trainable
  c.model.lora_rank, c.model.lora_alpha = 8, 16.0
  c.task.name, c.task.raw_prompt = "arith", True
  c.rollout.prompt_len, c.rollout.max_new_tokens = 8, 4  # "99+99*9=" is 8 characters; 3 digits + EOS
  c.rl.lr = 3e-4 if a.trainable == "lora" else 1e-4  # drift-dominated end of the affordable range (snr_study)
  c.nxt.method = a.method
  common.apply_algo(c, a.algo)
  if a.quick:
    c.workdir += "_quick"
    c.task.n_train, c.task.n_test, c.task.n_val = 512, 256, 64
    c.rollout.prompts_per_step, c.rollout.group_size = 8, 4
    c.nxt.extrapolate_at, c.nxt.interval, c.nxt.k, c.total_steps = 8, 2, 2, 12
    c.nxt.predictor.epochs = 50
    c.eval.every, c.eval.chunk = 0, 128
    c.ckpt.every = 4
  return c
