"""The benchmarks' own input handling (their timings live in experiments/bench, not in tests)."""

import pytest

from experiments.bench import grpo_step_vs_trl


def char_tok(text):
  return {"input_ids": list(text)}


def test_make_prompts_returns_distinct_prompts_that_fit():
  out = grpo_step_vs_trl.make_prompts(char_tok, 50, 26, seed=0)
  assert len(out) == len(set(out)) == 50 and max(map(len, out)) <= 26


def test_make_prompts_stops_when_too_few_distinct_prompts_fit():
  """With max_len 24 only single-digit questions fit (10³ of them): asking for more used to loop forever."""
  with pytest.raises(ValueError, match=r"--prompt-len 24: only \d+ distinct questions"):
    grpo_step_vs_trl.make_prompts(char_tok, 2000, 24, seed=0)
  with pytest.raises(ValueError, match="shorter than any question prompt"):
    grpo_step_vs_trl.make_prompts(char_tok, 1, 10, seed=0)
