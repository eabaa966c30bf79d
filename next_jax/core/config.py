"""The config schema: every field of a run, its default and its type, in one ConfigDict (`base()`), and
the big_vision-style `arg` parser.

Sections: model, task, rollout, rl, nxt (the jump schedule and its predictor), eval, log, ckpt, mesh.
Presets (next_jax/configs/: toy_arith, qwen25_paper, smollm2) start from `base()` and change what differs;
`arg` strings select variants: "algo=rloo,seed=1,quick". `experiment.validate` checks a config's types
against this schema (so a hand-built ConfigDict is checked too), and the library's dataclasses
(RolloutConfig, OptimConfig, LossConfig, NExtConfig, PredictorConfig, LoraConfig) read their defaults from
it through `defaults(section)`, never restating one (tests/test_config.py). `ConfigError` is what every check of a config raises (its message
starts with the field: `check`).
"""

import functools
from typing import Any

import ml_collections


class ConfigError(ValueError):
  """A config value that cannot run; the message starts with the field name."""


def check(ok: bool, field: str, value: Any, why: str) -> None:
  """Raise ConfigError("config.FIELD=VALUE: WHY") unless ok."""
  if not ok:
    raise ConfigError(f"config.{field}={value!r}: {why}")


ALGOS = {
    # estimator, agg_mode, clip_high, dynamic_sampling — the named algorithms of the GRPO family
    "grpo": dict(estimator="grpo", agg_mode="token-mean", clip_high=0.2, dynamic_sampling=False),
    "drgrpo": dict(estimator="drgrpo", agg_mode="seq-mean-token-sum-norm", clip_high=0.2,
                   dynamic_sampling=False),
    "dapo": dict(estimator="grpo", agg_mode="token-mean", clip_high=0.28, dynamic_sampling=True),
    "rloo": dict(estimator="rloo", agg_mode="token-mean", clip_high=0.2, dynamic_sampling=False),
    "reinforce_pp": dict(estimator="reinforce_pp", agg_mode="token-mean", clip_high=0.2,
                         dynamic_sampling=False),
}


def parse_arg(arg, **defaults):
  """"a=1,b=x,flag" → ConfigDict(a=1, b="x", flag=True) over `defaults` (types follow the defaults)."""
  out = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, _, value = item.partition("=")
    if key not in defaults:
      raise ValueError(f"config arg {key!r} is not one of {sorted(defaults)}")
    kind = type(defaults[key])
    if kind is bool:
      out[key] = value.lower() in ("", "1", "true", "yes")
    else:
      out[key] = kind(value)
  return out


@functools.cache
def defaults(section: str) -> ml_collections.FrozenConfigDict:
  """The defaults of `section` of the schema ("rollout", "rl", "nxt", "nxt.predictor", "model"). The library
  dataclasses (trainer.RolloutConfig, OptimConfig, grpo.LossConfig, NExtConfig, PredictorConfig, LoraConfig)
  take their defaults from here, so every default is written once, in `base()`."""
  c = base()
  for part in filter(None, section.split(".")):  # "": the top-level fields (seed, total_steps, …)
    c = c[part]
  return ml_collections.FrozenConfigDict(c)


def base() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.total_steps = 250  # real RL steps of the whole run (every method, plain GRPO too)
  c.workdir = "runs/default"

  c.model = ml_collections.ConfigDict()
  c.model.dir = ""  # a local HF directory (config.json, *.safetensors, tokenizer files)
  c.model.dtype = ""  # "" = config.json's dtype; or float32 | bfloat16
  c.model.kv_cache_dtype = ""  # sampler KV cache: "" = model.dtype; bfloat16 halves it (accelerators; CPU: 7× slower)
  c.model.trainable = "lora"  # lora | full
  c.model.lora_rank = 8
  c.model.lora_alpha = 16.0
  c.model.lora_targets = "q,k,v,o,gate,up,down"
  c.model.rslora = False
  c.model.remat = False
  c.model.preset = ""  # a policy.QWEN25 size ("7B", …): its architecture for the memory plan

  c.task = ml_collections.ConfigDict()
  c.task.name = "arith"  # a tasks.TASKS name (arith, countdown, add, compare, extract, countdown3), rg:<dataset>, file
  c.task.path = ""  # data file for name=file (DAPO-Math-17k parquet/JSONL, GSM8K/MATH JSONL)
  c.task.format = "auto"
  c.task.test_path = ""  # optional held-out file; else a hash split of `path`
  c.task.n_train = 20000
  c.task.n_test = 2048
  c.task.n_val = 256  # validation prompts for nxt.alpha="auto"
  c.task.raw_prompt = True  # bare "12+34*5=" prompts (toy); False: chat template + instruction
  c.task.instruction = "Please reason step by step, and put your final answer within \\boxed{}."
  c.task.system = ""  # a system message for chat prompts ("" = the problem's own, else the template's default)
  # the task's own knobs, passed to tasks.make_task (e.g. add: operand_range; rg:<dataset>: its config fields);
  # a preset sets them with `c.task.knobs = ml_collections.ConfigDict({...})`, the command line overrides them
  c.task.knobs = ml_collections.ConfigDict()

  c.rollout = ml_collections.ConfigDict()
  c.rollout.prompts_per_step = 64
  c.rollout.group_size = 8
  c.rollout.prompt_len = 16
  c.rollout.max_new_tokens = 4
  c.rollout.temperature = 1.0
  c.rollout.top_p = 1.0
  c.rollout.top_k = 0
  c.rollout.dynamic_sampling = False
  c.rollout.max_sampling_rounds = 4
  c.rollout.overlong_cache = 0
  c.rollout.sample_chunk = 0  # prompts per sampler call (0: all): bounds the KV cache to sample_chunk·G rows

  c.rl = ml_collections.ConfigDict()
  c.rl.algo = "grpo"  # sets estimator/agg_mode/clip_high/dynamic_sampling via ALGOS unless overridden
  c.rl.estimator = "grpo"  # a name in grpo.ESTIMATORS: grpo | drgrpo | rloo | reinforce_pp (register_estimator)
  c.rl.lr = 1e-3
  c.rl.warmup_steps = 0
  c.rl.schedule = "constant"
  c.rl.weight_decay = 0.01
  c.rl.b1 = 0.9
  c.rl.b2 = 0.99
  c.rl.grad_clip = 1.0
  c.rl.clip_low = 0.2
  c.rl.clip_high = 0.2
  c.rl.clip_c = 3.0
  c.rl.kl_coef = 0.0
  c.rl.kl_estimator = "k3"  # verl kl_loss_type: k1 | abs | k2 | k3 (low_var_kl); "k3+" etc.: k2's gradient
  c.rl.kl_in_reward = 0.0
  c.rl.entropy_coef = 0.0
  c.rl.agg_mode = "token-mean"  # verl 0.9.1 loss_agg_mode: token-mean | token-sum | seq-mean-token-{mean,sum,sum-norm}
  c.rl.loss_scale_factor = 0  # seq-mean-token-sum-norm's divisor (0: the response budget rollout.max_new_tokens)
  c.rl.num_mini_batches = 1
  c.rl.micro_batch_size = 0  # 0 = whole mini-batch
  c.rl.logprob_chunk = 0  # response positions per lm_head block in the update (0: all): bounds the fp32 logits
  c.rl.max_update_ratio = 10.0  # skip an update larger than this × ‖θ‖ (a destroyed policy is finite); 0: off
  c.rl.max_faults = 5  # stop at the last good checkpoint after this many non-finite steps in a row (0: never)

  c.nxt = ml_collections.ConfigDict()
  c.nxt.method = "next"  # next | rl_extra | alpharl | relex | none
  c.nxt.extrapolate_at = 150
  c.nxt.interval = 10
  c.nxt.k = 5
  # the jump's step size: a number, or "auto" (the best of alpha_grid on task.n_val validation prompts)
  c.nxt.alpha = ml_collections.FieldReference(1.5, field_type=object)
  c.nxt.alpha_grid = tuple(0.5 * i for i in range(1, 9))  # α candidates of alpha="auto": 0.5 … 4.0
  # the method's own knobs (extrapolate.register(..., knobs={name: default})): --config.nxt.knobs.<name>=…
  c.nxt.knobs = ml_collections.ConfigDict()
  c.nxt.cycles = 1
  c.nxt.sign = "max_abs_u"
  c.nxt.continue_mode = "keep"
  c.nxt.faithful = False  # NExt also moves never-trained parameters by predicted deltas (LoRA runs; official)
  c.nxt.horizon = 0  # baselines' horizon in steps; 0 = k·interval
  c.nxt.predictor = ml_collections.ConfigDict()
  c.nxt.predictor.hidden = 256
  c.nxt.predictor.epochs = 1000
  c.nxt.predictor.lr = 2e-5
  c.nxt.predictor.weight_decay = 0.01
  c.nxt.predictor.final_lr_ratio = 0.1
  c.nxt.predictor.loss = "l1"
  c.nxt.predictor.use_global = True
  c.nxt.predictor.use_local = True
  c.nxt.predictor.reassociate = False  # same network, fewer FLOPs, different rounding (predictor.py)

  c.eval = ml_collections.ConfigDict()
  c.eval.every = 50  # RL steps between evaluations (0: only start and end)
  c.eval.chunk = 256  # prompts per sampler call (one compiled shape)
  c.eval.samples = 1  # avg@samples
  c.eval.temperature = 1.0  # the paper evaluates at temperature 1.0
  # next_jax.rl.data.BENCHMARKS names ("aime24", "amc23", …): evaluated in the run at every eval.every (each
  # benchmark's accuracy beside the task's) and the evaluate command's default list
  c.eval.benchmarks = ()
  c.eval.limit = 0  # a fixed seeded subset of this many problems per benchmark (0: all of them)
  c.eval.max_new_tokens = 0  # the benchmarks' response budget (0: rollout.max_new_tokens)
  c.eval.data_dir = ""  # the math-eval files ("": $NEXT_JAX_MATH_EVAL, else ../shared/data/math_eval)

  c.log = ml_collections.ConfigDict()
  c.log.tensorboard = True
  c.log.progress = True

  c.ckpt = ml_collections.ConfigDict()
  c.ckpt.every = 50
  c.ckpt.max_to_keep = 3
  c.ckpt.resume = False  # continue a run whose workdir already holds checkpoints
  c.ckpt.overwrite = False  # wipe a workdir that already holds a run
  c.ckpt.allow_changes = ""  # comma-separated fields a resume may change (e.g. "rl.lr"), logged in results.json

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = 1  # data-parallel devices (0 = all that fsdp·tensor leave)
  c.mesh.fsdp = 1  # fully-sharded params + batch (next_jax/core/sharding.py); see next-jax-memory-plan
  c.mesh.tensor = 1  # tensor parallelism: heads / MLP width / vocabulary split over devices
  # multi-host (TPU pod slice / several GPU hosts): jax.distributed.initialize before anything else.
  # On Cloud TPU leave the three fields empty and set distributed=True (JAX discovers the slice).
  c.mesh.distributed = False
  c.mesh.coordinator_address = ""  # "host:port" of process 0
  c.mesh.num_processes = 0
  c.mesh.process_id = -1
  c.lock()  # the schema: a misspelt or unknown key is an error, not a silently ignored new field
  return c


def from_dict(saved: dict, c: ml_collections.ConfigDict | None = None) -> ml_collections.ConfigDict:
  """A saved config (a run's workdir/config.json) back into the schema: every key must be a field of
  `base()` (a `knobs` section takes its own), lists become the schema's tuples; ConfigError names a key
  this version does not know."""
  c = base() if c is None else c
  for key, value in saved.items():
    if key == "knobs":
      c[key] = ml_collections.ConfigDict(value)
    elif key not in c:
      raise ConfigError(f"config.json: {key!r} is not a field of this version's config schema")
    elif isinstance(c[key], ml_collections.ConfigDict):
      from_dict(value, c[key])
    else:
      c[key] = tuple(value) if isinstance(c[key], tuple) else value
  return c


def apply_algo(c: ml_collections.ConfigDict, algo: str) -> ml_collections.ConfigDict:
  if algo not in ALGOS:
    raise ValueError(f"algo={algo!r}; choose from {sorted(ALGOS)}")
  c.rl.algo = algo
  preset = ALGOS[algo]
  c.rl.estimator, c.rl.agg_mode, c.rl.clip_high = preset["estimator"], preset["agg_mode"], preset["clip_high"]
  c.rollout.dynamic_sampling = preset["dynamic_sampling"]
  return c
