"""The real model of the speed benchmarks: SmolLM2-135M-Instruct (or any HF directory / GGUF) and the
chat prompts `next_jax/configs/smollm2.py` trains on, so both stacks in a benchmark see the same text and tokens."""

from __future__ import annotations

from pathlib import Path

from next_jax.models import hf, model_files
from next_jax.rl import data, tasks

ROOT = Path(__file__).resolve().parents[2]
DEFAULT = "smollm2-135m-instruct"


def load(spec: str = DEFAULT):
  """→ (HF directory, ModelConfig, params, tokenizer), fp32; a GGUF or packaged name is converted once."""
  model_dir = model_files.resolve(spec)
  cfg, params, tok = hf.load_model(model_dir, dtype="float32")
  return model_dir, cfg, params, tok


def chat_prompts(tok, n: int, seed: int = 0, task: str = "compare") -> list[str]:
  """n problems of `task` posed as next_jax/configs/smollm2.py poses them (system prompt, instruction, chat template)."""
  from next_jax.configs import smollm2

  c = smollm2.get_config(f"task={task}")
  problems = tasks.make_task(task, n, seed=seed, split="test")
  return data.format_prompts(problems, tok, system=c.task.system, instruction=c.task.instruction)
