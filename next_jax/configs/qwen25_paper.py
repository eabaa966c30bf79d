"""The paper's setting (METHOD.md §4) for Qwen2.5-{1.5B,3B,7B,14B}-Instruct on a local math data file.

    next-jax-run --config=qwen25_paper:size=7B \
        --config.model.dir=/data/Qwen2.5-7B-Instruct --config.task.path=/data/dapo-math-17k.parquet

Nothing is downloaded: point model.dir at a local HF checkpoint and task.path at the data file.

Evaluation (`next-jax-evaluate --config=qwen25_paper:size=7B --model=… --out=…`): the
paper's benchmarks by name (next_jax.rl.data.BENCHMARKS, files under eval.data_dir / $NEXT_JAX_MATH_EVAL), avg@8 at
temperature 1, top-p 1, 4096 new tokens. 1.5B/3B: AMC23 + Minerva (the paper's small-model tables); 7B/14B:
AIME24, AIME25, AMC23, Minerva and OlympiadBench, which stands in for OlymMATH (no public copy at hand).
Not stated by the paper (our choices, all fields here): KL off (verl default use_kl_loss=False), entropy
bonus 0, clip 0.2 with dual-clip 3, no warmup, LoRA on all seven projections, RL after the jump keeps the
adapter and optimiser state ("keep").
"""

from next_jax.core import config as common

SIZES = ("1.5B", "3B", "7B", "14B")
BENCHMARKS = {"1.5B": ("amc23", "minerva"), "3B": ("amc23", "minerva"),
              "7B": ("aime24", "aime25", "amc23", "minerva", "olympiadbench"),
              "14B": ("aime24", "aime25", "amc23", "minerva", "olympiadbench")}  # olympiadbench for OlymMATH


def get_config(arg=None):
  a = common.parse_arg(arg, size="7B", algo="grpo", seed=0, trainable="lora", method="next")
  if a.size not in SIZES:
    raise ValueError(f"size={a.size!r}; choose from {SIZES}")
  c = common.base()
  c.seed = a.seed
  c.workdir = f"runs/qwen25_{a.size}/{a.algo}_{a.method}_{a.trainable}_s{a.seed}"
  c.model.dir = ""  # required: a local Qwen2.5-*-Instruct directory
  c.model.dtype = "bfloat16"
  c.model.trainable = a.trainable
  c.model.lora_rank, c.model.lora_alpha = 64, 32.0
  c.model.remat = True
  c.model.preset = a.size
  c.task.name, c.task.path, c.task.raw_prompt = "file", "", False
  c.task.instruction = ""  # DAPO-Math prompts carry their own instruction
  c.task.n_test, c.task.n_val = 0, 64  # evaluation uses a separate benchmark file (task.test_path)
  c.rollout.prompts_per_step, c.rollout.group_size = 128, 8
  c.rollout.prompt_len, c.rollout.max_new_tokens = 1024, 4096
  c.rl.lr = 5e-6 if a.trainable == "lora" else 5e-7
  c.rl.b2 = 0.999
  c.rl.num_mini_batches = 4  # 128 prompts / mini-batch 32
  c.rl.micro_batch_size = 8
  # memory, not maths: the update's fp32 logits 512 positions at a time instead of all 4096 response
  # positions ([8, 512, 152k] = 2.5 GB, not 20 GB), and 32 prompts (256 rows) per sampler call (a quarter
  # of the KV cache). Greedy rollouts and every loss are unchanged; sampled rollouts draw per chunk.
  c.rl.logprob_chunk = 512
  c.rollout.sample_chunk = 32
  c.nxt.method = a.method
  c.nxt.extrapolate_at, c.nxt.interval, c.nxt.k, c.nxt.alpha, c.total_steps = 150, 10, 5, 1.5, 250
  c.eval.every, c.eval.chunk, c.eval.samples = 50, 64, 8  # avg@8 at temperature 1.0
  c.eval.benchmarks = BENCHMARKS[a.size]
  c.ckpt.every = 10
  c.mesh.data = 0
  common.apply_algo(c, a.algo)
  return c
