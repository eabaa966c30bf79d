"""A whole run from one ConfigDict (configs/*.py): validate → build → run the state machine → results.

`validate(config)` checks every field before any work starts and raises `ConfigError` naming the field.
`build(config)` loads the model directory (the HF path a real Qwen2.5 takes), the problems and the
verifier, and returns an `Experiment` (static setup + initial state). `run(config)` drives it with
checkpoints, metrics (JSONL + TensorBoard under workdir), periodic evaluation, and writes results.json.
Multi-host (mesh.distributed): every process runs the same `run`; each samples and verifies its share of
the prompts, all of them save and restore the orbax checkpoints, and only process 0 writes config.json,
metrics, TensorBoard and results.json.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path
from typing import Any

import jax
import numpy as np

from next_jax.core import config, sharding
from next_jax.core.checkpoint import Checkpointer
from next_jax.core.config import ConfigError  # noqa: F401  (re-exported: experiment.ConfigError)
from next_jax.core.config import check as _check
from next_jax.core.metrics import MetricWriter
from next_jax.models import hf, model_files, policy
from next_jax.nxt.extrapolate import NExtConfig
from next_jax.nxt.predictor import PredictorConfig
from next_jax.rl import data, grpo, rewards, tasks, trainer
from next_jax.run import driver, workdir
from next_jax.run import state_machine as sm

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------- validate


def lora_config(c) -> policy.LoraConfig | None:
  if c.model.trainable == "full":
    return None
  targets = tuple(t.strip() for t in c.model.lora_targets.split(",") if t.strip())
  try:
    return policy.LoraConfig(rank=c.model.lora_rank, alpha=c.model.lora_alpha, targets=targets,
                             rslora=c.model.rslora)
  except ValueError as e:
    raise ConfigError(f"config.model.lora_*: {e}") from e


def nxt_config(c) -> NExtConfig:
  n, p = c.nxt, c.nxt.predictor
  try:
    pcfg = PredictorConfig(**p.to_dict())  # the schema's nxt.predictor fields are the dataclass's
    return NExtConfig(method=n.method, extrapolate_at=n.extrapolate_at, interval=n.interval, k=n.k,
                      alpha=n.alpha if n.alpha == "auto" else float(n.alpha),
                      alpha_grid=tuple(float(a) for a in n.alpha_grid), total_steps=c.total_steps,
                      knobs=tuple(sorted(n.knobs.to_dict().items())),
                      cycles=n.cycles, sign=n.sign, continue_mode=n.continue_mode,
                      horizon=n.horizon or None, faithful=n.faithful, predictor=pcfg)
  except ValueError as e:
    raise ConfigError(f"config.{str(e).removeprefix('config.')}") from e


def loss_config(c) -> grpo.LossConfig:
  r = c.rl
  try:
    return grpo.LossConfig(clip_low=r.clip_low, clip_high=r.clip_high, clip_c=r.clip_c or None,
                           kl_coef=r.kl_coef, kl_estimator=r.kl_estimator, entropy_coef=r.entropy_coef,
                           agg_mode=r.agg_mode, num_mini_batches=r.num_mini_batches,
                           micro_batch_size=r.micro_batch_size or None, logprob_chunk=r.logprob_chunk,
                           loss_scale_factor=r.loss_scale_factor or None,
                           max_update_ratio=r.max_update_ratio)
  except ValueError as e:
    raise ConfigError(f"config.rl: {e}") from e


_POSITIVE = ("rl.num_mini_batches", "nxt.extrapolate_at", "nxt.interval", "nxt.k", "total_steps",
             "nxt.cycles", "nxt.predictor.epochs", "nxt.predictor.hidden", "model.lora_rank")


def _get(c, field: str):
  for part in field.split("."):
    c = c[part]
  return c


def _is(kind: type, v: Any) -> bool:
  if kind is float:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
  return isinstance(v, kind) and not (kind is int and isinstance(v, bool))


def schema_kinds(schema=None) -> dict[str, type]:
  """{"rl.lr": float, …}: the declared type of every field of the schema (next_jax.core.config.base())."""
  schema = schema if schema is not None else config.base()
  out = {}
  for key in schema.keys():
    if isinstance(schema[key], type(schema)):
      out.update({f"{key}.{k}": t for k, t in schema_kinds(schema[key]).items()})
    else:
      out[key] = schema.get_ref(key).get_type()
  return out


def _check_kinds(c) -> None:
  """Types first, against the schema (a hand-built ConfigDict too), so the value checks below never meet
  a None, a string or a list where a number goes."""
  names = {int: "an integer", float: "a finite number", str: "a string", bool: "True or False",
           tuple: "a tuple", object: "a value"}
  for f, kind in schema_kinds().items():
    try:
      v = _get(c, f)
    except (KeyError, AttributeError) as e:
      raise ConfigError(f"config.{f}: missing") from e
    _check(_is(kind, v), f, v, f"must be {names[kind]}")
  _check(c.nxt.alpha == "auto" or (_is(float, c.nxt.alpha) and c.nxt.alpha > 0), "nxt.alpha", c.nxt.alpha,
         "must be a positive number or 'auto' (the best of nxt.alpha_grid on validation)")
  for f in _POSITIVE:
    _check(_get(c, f) >= 1, f, _get(c, f), "must be ≥ 1")


def validate(c) -> None:
  """Every check that can fail before work starts; raises ConfigError naming the field."""
  _check_kinds(c)
  _check(bool(c.model.dir), "model.dir", c.model.dir, "set it to a local HF model directory")
  workdir.check_path(c.workdir)
  workdir.allowed_changes(c)
  _check(not (c.ckpt.resume and c.ckpt.overwrite), "ckpt.resume", c.ckpt.resume,
         "and ckpt.overwrite=True contradict each other (resume continues the run in workdir, overwrite "
         "deletes it): pass one")
  _check(c.model.trainable in ("lora", "full"), "model.trainable", c.model.trainable, "use 'lora' or 'full'")
  _check(not c.nxt.faithful or c.model.trainable == "lora", "nxt.faithful", c.nxt.faithful,
         "needs model.trainable='lora' (a full run's trajectory holds only the projection kernels, so its other "
         "trained leaves have no recorded deltas)")
  _check(c.model.dtype in ("", "float32", "bfloat16"), "model.dtype", c.model.dtype,
         "use '', 'float32' or 'bfloat16'")
  _check(c.model.kv_cache_dtype in ("", "float32", "bfloat16"), "model.kv_cache_dtype", c.model.kv_cache_dtype,
         "use '' (the model dtype), 'float32' or 'bfloat16'")
  lora_config(c)
  _check(tasks.known_task(c.task.name) or c.task.name == "file", "task.name", c.task.name,
         f"use one of {sorted(tasks.TASKS) + ['file']} or rg:<reasoning-gym dataset>")
  _check(not c.task.knobs or c.task.name != "file", "task.knobs", c.task.knobs.to_dict(),
         "a data file (task.name='file') has no knobs")
  if c.task.name == "file":
    _check(bool(c.task.path) and Path(c.task.path).is_file(), "task.path", c.task.path, "no such data file")
  ro = c.rollout
  for f in ("prompts_per_step", "group_size", "prompt_len", "max_new_tokens", "max_sampling_rounds"):
    _check(isinstance(ro[f], int) and ro[f] >= 1, f"rollout.{f}", ro[f], "must be an integer ≥ 1")
  _check(ro.sample_chunk >= 0 and ro.prompts_per_step % (ro.sample_chunk or 1) == 0, "rollout.sample_chunk",
         ro.sample_chunk, f"must be 0 (all at once) or divide prompts_per_step = {ro.prompts_per_step}")
  _check(c.rl.max_update_ratio >= 0, "rl.max_update_ratio", c.rl.max_update_ratio, "must be ≥ 0 (0: off)")
  _check(c.rl.loss_scale_factor >= 0, "rl.loss_scale_factor", c.rl.loss_scale_factor,
         "must be ≥ 0 (0: the response budget rollout.max_new_tokens)")
  _check(c.rl.logprob_chunk >= 0, "rl.logprob_chunk", c.rl.logprob_chunk,
         "must be ≥ 0 (0: all positions at once)")
  _check(ro.temperature >= 0, "rollout.temperature", ro.temperature, "must be ≥ 0")
  _check(0 < ro.top_p <= 1, "rollout.top_p", ro.top_p, "must be in (0, 1]")
  _check(c.rl.estimator in grpo.ESTIMATORS, "rl.estimator", c.rl.estimator,
         f"use one of {sorted(grpo.ESTIMATORS)} (grpo.register_estimator adds one)")
  _check(c.rl.kl_in_reward >= 0, "rl.kl_in_reward", c.rl.kl_in_reward, "must be ≥ 0 (0: off)")
  _check(not c.rl.kl_in_reward or grpo.ESTIMATORS[c.rl.estimator].token_kl, "rl.kl_in_reward",
         c.rl.kl_in_reward, f"rl.estimator={c.rl.estimator!r} reads no per-token KL, so this would be ignored; "
         f"those that do: {sorted(n for n, e in grpo.ESTIMATORS.items() if e.token_kl)} (or use rl.kl_coef, "
         "the KL loss)")
  _check(c.rl.lr > 0, "rl.lr", c.rl.lr, "must be > 0")
  n = ro.prompts_per_step * ro.group_size
  _check(n % c.rl.num_mini_batches == 0, "rl.num_mini_batches", c.rl.num_mini_batches,
         f"must divide prompts_per_step·group_size = {n}")
  mini = n // c.rl.num_mini_batches
  _check(not c.rl.micro_batch_size or mini % c.rl.micro_batch_size == 0, "rl.micro_batch_size",
         c.rl.micro_batch_size, f"must divide the mini-batch of {mini} rows")
  loss_config(c)
  nxt_config(c)
  _check(c.eval.chunk >= 1 and c.eval.samples >= 1, "eval.chunk", c.eval.chunk, "chunk and samples ≥ 1")
  _check(c.eval.limit >= 0, "eval.limit", c.eval.limit, "must be ≥ 0 (0: every problem)")
  _check(c.eval.max_new_tokens >= 0, "eval.max_new_tokens", c.eval.max_new_tokens,
         "must be ≥ 0 (0: rollout.max_new_tokens)")
  _check(set(c.eval.benchmarks) <= set(data.BENCHMARKS), "eval.benchmarks", c.eval.benchmarks,
         f"names one that is not in {sorted(data.BENCHMARKS)}")
  _check(c.mesh.data >= 0, "mesh.data", c.mesh.data, "must be ≥ 0 (0 = all devices)")
  _check(c.model.preset in ("",) + tuple(policy.QWEN25), "model.preset", c.model.preset,
         f"use '' or one of {sorted(policy.QWEN25)}")
  for f in ("fsdp", "tensor"):
    _check(isinstance(c.mesh[f], int) and c.mesh[f] >= 1, f"mesh.{f}", c.mesh[f], "must be an integer ≥ 1")
  if c.mesh.distributed and not jax.distributed.is_initialized():
    return  # devices are known only after jax.distributed.initialize (done by build)
  procs = jax.process_count()  # multi-host: each process samples prompts_per_step/procs prompts
  _check(ro.prompts_per_step % procs == 0, "rollout.prompts_per_step", ro.prompts_per_step,
         f"must be divisible by the {procs} processes (each samples prompts_per_step/{procs} prompts)")
  model = c.mesh.fsdp * c.mesh.tensor
  _check(model <= jax.device_count(), "mesh.fsdp", c.mesh.fsdp,
         f"fsdp·tensor = {model} > {jax.device_count()} devices")
  devices = c.mesh.data or jax.device_count() // model
  _check(devices * model <= jax.device_count(), "mesh.data", c.mesh.data,
         f"data·fsdp·tensor = {devices * model} > {jax.device_count()} devices")
  _check(procs == 1 or devices * model == jax.device_count(), "mesh.data", c.mesh.data,
         f"with {procs} processes the mesh must use all {jax.device_count()} devices "
         f"(data·fsdp·tensor = {devices * model}); set mesh.data=0")
  split = devices * c.mesh.fsdp  # the batch is split over data×fsdp
  _check(n % split == 0 and ro.prompts_per_step % split == 0, "mesh.data", c.mesh.data,
         f"data·fsdp = {split} must divide prompts_per_step ({ro.prompts_per_step})")
  _check(c.eval.chunk % split == 0, "eval.chunk", c.eval.chunk, f"must be a multiple of data·fsdp = {split}")
  _check(ro.sample_chunk % split == 0, "rollout.sample_chunk", ro.sample_chunk,
         f"must be a multiple of data·fsdp = {split} (each sampler call splits its prompts over them)")


# ---------------------------------------------------------------------------------------------- build


@dataclasses.dataclass
class Experiment:
  config: Any
  setup: trainer.RLSetup
  ncfg: NExtConfig
  base_params: policy.Params
  tokenizer: Any
  train: tuple
  test: tuple
  val: tuple
  state: sm.NExtState
  benchmarks: dict = dataclasses.field(default_factory=dict)  # {name: (its RLSetup, its problems)}


# a prompt of more than this many characters per rollout.prompt_len token cannot fit (real text averages ~4):
# refused as it is read, so one huge row is never tokenized
CHARS_PER_TOKEN = 32


def _load_file(path: str, field: str, fmt: str = "auto", prompt_len: int | None = None):
  limit = CHARS_PER_TOKEN * prompt_len if prompt_len else None
  try:
    return data.load_problems(path, fmt, max_prompt_chars=limit)
  except (ValueError, OSError) as e:
    why = f" ({CHARS_PER_TOKEN} × rollout.prompt_len={prompt_len}: it cannot fit)" if "characters" in str(e) else ""
    raise ConfigError(f"config.{field}: {e}{why}") from e  # e names the file and the row


def load_problems(c):
  """(train, test, val) problem tuples for the configured task."""
  if c.task.name == "file":
    probs = _load_file(c.task.path, "task.path", c.task.format, c.rollout.prompt_len)
    train, test = data.hash_split(probs)
    if c.task.test_path:
      test = _load_file(c.task.test_path, "task.test_path", prompt_len=c.rollout.prompt_len)
  else:
    knobs = c.task.knobs.to_dict()
    try:
      train = tasks.make_task(c.task.name, c.task.n_train, seed=c.seed, split="train", **knobs)
      test = tasks.make_task(c.task.name, c.task.n_test + c.task.n_val, seed=c.seed + 1, split="test", **knobs)
    except (ValueError, ImportError) as e:
      raise ConfigError(f"config.task: {e}") from e
  n_test = c.task.n_test or len(test) - c.task.n_val
  return tuple(train), tuple(test[:n_test]), tuple(test[n_test:n_test + c.task.n_val])


def run_mesh(c):
  """`sharding.make_mesh` of config.mesh, or None when the run uses one device."""
  size = (c.mesh.data or jax.device_count() // (c.mesh.fsdp * c.mesh.tensor)) * c.mesh.fsdp * c.mesh.tensor
  return sharding.make_mesh(c.mesh.data, c.mesh.fsdp, c.mesh.tensor) if size > 1 else None


def place(tree, mesh):
  """Replicated on a data mesh; split by the partition rules on a (data, fsdp, tensor) mesh.
  Multi-host, leaves start from host memory: JAX 0.10's `device_put` of a device array onto a sharding
  that spans hosts builds an array whose shards orbax cannot read."""
  if jax.process_count() > 1:
    tree = jax.tree.map(np.asarray, tree)
  if sharding.FSDP in mesh.axis_names:
    return sharding.shard(tree, mesh)
  return jax.device_put(tree, sharding.replicated(mesh))


def build(c, model_dir: str | None = None) -> Experiment:
  if c.mesh.distributed:  # must precede any JAX computation, including validate's device count
    sharding.initialize_distributed(c.mesh.coordinator_address, c.mesh.num_processes, c.mesh.process_id)
  validate(c)
  try:
    model_dir = model_files.resolve(model_dir or c.model.dir)  # a .gguf or packaged model: converted once
  except hf.CheckpointError as e:
    raise ConfigError(f"config.model.dir={c.model.dir!r}: {e}") from e
  lcfg, model_cfg = lora_config(c), hf.load_config(model_dir)
  if lcfg is not None:
    check_lora_rank(lcfg, model_cfg)
  total = c.rollout.prompt_len + c.rollout.max_new_tokens
  _check(total <= model_cfg.max_position_embeddings, "rollout.max_new_tokens", c.rollout.max_new_tokens,
         f"prompt_len + max_new_tokens = {total} exceeds the model's max_position_embeddings = "
         f"{model_cfg.max_position_embeddings} ({model_dir}/config.json)")
  cfg, params, tok = hf.load_model(model_dir, dtype=c.model.dtype or None)
  cfg = dataclasses.replace(cfg, remat=c.model.remat, kv_cache_dtype=c.model.kv_cache_dtype)
  mesh = run_mesh(c)
  if mesh is not None:
    params = place(params, mesh)
  train, test, val = load_problems(c)
  raw, instr = c.task.raw_prompt, c.task.instruction or None
  system = c.task.system or None
  fmt = lambda p: data.format_prompt(p, tok, system=system, instruction=instr, raw=raw)  # noqa: E731
  encode = lambda p: tok(fmt(p), add_special_tokens=False)["input_ids"]  # noqa: E731
  check_prompt_lengths(lambda ps: tok([fmt(p) for p in ps], add_special_tokens=False)["input_ids"],
                       {"train": train, "test": test, "val": val}, c.rollout.prompt_len)
  reward_fns = {name: rewards.get_reward(name) for name in {p.verifier for p in train + test + val}}
  setup = trainer.RLSetup(
      cfg=cfg, lora_cfg=lcfg, loss_cfg=loss_config(c),
      rollout=trainer.RolloutConfig(**{k: c.rollout[k] for k in c.rollout}),
      estimator=c.rl.estimator, encode=encode,
      decode=lambda ids: tok.decode(ids, skip_special_tokens=True),
      reward=lambda text, p: reward_fns[p.verifier](text, p.answer),
      next_problems=lambda cursor, n: data.batch_at(train, cursor, n, c.seed),
      pad_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
      stop_ids=tuple(i for i in {tok.eos_token_id, tok.pad_token_id} if i is not None), mesh=mesh,
      kl_in_reward=c.rl.kl_in_reward)
  benchmarks = benchmark_setups(c, setup, tok, model_cfg.max_position_embeddings)
  ncfg = nxt_config(c)
  trainable = policy.init_lora(cfg, lcfg, jax.random.PRNGKey(c.seed)) if lcfg else params
  trainable = place(trainable, mesh) if mesh is not None else trainable
  tx = trainer.make_optimizer(trainer.OptimConfig(
      lr=c.rl.lr, warmup_steps=c.rl.warmup_steps, schedule=c.rl.schedule,
      decay_steps=ncfg.total_steps * c.rl.num_mini_batches, weight_decay=c.rl.weight_decay, b1=c.rl.b1,
      b2=c.rl.b2, grad_clip=c.rl.grad_clip or None))
  state = sm.init(setup, ncfg, params, trainer.init_state(trainable, tx, c.seed))
  return Experiment(c, setup, ncfg, params, tok, train, test, val, state, benchmarks)


def benchmark_setups(c, setup: trainer.RLSetup, tok, max_positions: int) -> dict[str, tuple]:
  """config.eval.benchmarks → {name: (setup, problems)}: the run's setup posing the benchmark as the evaluate
  command does (chat template + problem + its instruction), its verifier, a prompt length that fits its
  longest prompt (rounded up to 64: one compiled program per benchmark) and eval.max_new_tokens new tokens
  (0: rollout.max_new_tokens); eval.limit problems drawn by data.subset (seed 0), as `--limit` draws them."""
  out = {}
  new_tokens = c.eval.max_new_tokens or c.rollout.max_new_tokens
  for name in c.eval.benchmarks:
    try:
      problems = tuple(data.subset(data.load_benchmark(name, c.eval.data_dir or None), c.eval.limit))
    except (OSError, ValueError) as e:
      raise ConfigError(f"config.eval.benchmarks={c.eval.benchmarks!r}: {e}") from e
    instruction = data.BENCHMARKS[name].instruction
    fmt = lambda p, i=instruction: data.format_prompt(p, tok, system=c.task.system or None, instruction=i)  # noqa: E731
    longest = max(len(ids) for ids in tok([fmt(p) for p in problems], add_special_tokens=False)["input_ids"])
    prompt_len = -(-longest // 64) * 64
    _check(prompt_len + new_tokens <= max_positions, "eval.max_new_tokens", c.eval.max_new_tokens,
           f"{name}'s prompts ({prompt_len} tokens) + {new_tokens} new tokens exceed the model's "
           f"max_position_embeddings = {max_positions}")
    verify = {p.verifier: rewards.get_reward(p.verifier) for p in problems}
    out[name] = (dataclasses.replace(
        setup, encode=lambda p, f=fmt: tok(f(p), add_special_tokens=False)["input_ids"],
        reward=lambda text, p, v=verify: v[p.verifier](text, p.answer),
        rollout=dataclasses.replace(setup.rollout, prompt_len=prompt_len, max_new_tokens=new_tokens)), problems)
  return out


def restore(run_dir: str | Path, step: int | None = None, model_dir: str | None = None):
  """A run's policy at `step` (default: its latest checkpoint), from what the run wrote: its config
  (run_dir/config.json, `config.from_dict`), the experiment built from it (model.dir, or `model_dir` when
  the model has moved), and the checkpointed state, verified → (experiment, state, step)."""
  run_dir = Path(run_dir)
  try:
    saved = json.loads((run_dir / "config.json").read_text())
  except (OSError, json.JSONDecodeError) as e:
    raise ConfigError(f"{run_dir}: not a run directory (config.json: {e})") from e
  c = config.from_dict(saved)
  c.eval.benchmarks = ()  # the run's own benchmark list is not what is asked here
  exp = build(c, model_dir)
  reader = Checkpointer(run_dir / "ckpt", read_only=True)
  try:
    step = reader.latest_step() if step is None else step
    if step is None:
      raise ConfigError(f"{run_dir}/ckpt: the run has no checkpoint yet")
    if step not in reader.all_steps():
      raise ConfigError(f"{run_dir}/ckpt: no checkpoint at step {step}; there are {sorted(reader.all_steps())}")
    state, _ = reader.restore(exp.state, step)
  finally:
    reader.close()
  return exp, state, step


def check_lora_rank(lcfg: policy.LoraConfig, cfg: policy.ModelConfig) -> None:
  """A LoRA rank above min(in, out) of a target adds nothing a full update lacks, and only costs memory."""
  name, (n_in, n_out) = min(((t, cfg.module_shape(t)) for t in lcfg.targets), key=lambda x: min(x[1]))
  _check(lcfg.rank <= min(n_in, n_out), "model.lora_rank", lcfg.rank,
         f"exceeds min(in, out) = {min(n_in, n_out)} of the {name} projection ({n_in} × {n_out})")


def check_prompt_lengths(encode_many, splits: dict[str, tuple], prompt_len: int) -> None:
  """Every prompt must fit rollout.prompt_len tokens (prompts are left-padded to it, never truncated).
  encode_many: problems → token lists, one batched tokenizer call per split."""
  for split, problems in splits.items():
    lengths = [len(ids) for ids in encode_many(problems)] if problems else []
    i = int(np.argmax(lengths)) if lengths else 0
    _check(not lengths or lengths[i] <= prompt_len, "rollout.prompt_len", prompt_len,
           f"is shorter than {split} problem {i}'s prompt ({lengths[i] if lengths else 0} tokens, the longest "
           f"of its split; id {problems[i].id if lengths else ''}); raise it")


def accuracy(exp: Experiment, state: sm.NExtState, problems, seed: int = 0) -> float:
  """avg@samples accuracy of the state's policy on `problems` (config.eval)."""
  base, trainable = state.base_params, state.rl.train.params
  out = trainer.evaluate(exp.setup, base, trainable, problems, chunk=exp.config.eval.chunk,
                         samples=exp.config.eval.samples, temperature=exp.config.eval.temperature, seed=seed)
  return out["accuracy"]


def benchmark_accuracy(exp: Experiment, state: sm.NExtState) -> dict[str, float]:
  """{benchmark: avg@eval.samples} of the state's policy on each of exp.benchmarks (config.eval). On one
  device a benchmark smaller than eval.chunk goes in one chunk of its size; on a mesh in eval.chunk (which
  validate checked divides over the devices; the last chunk is padded)."""
  e = exp.config.eval
  chunk = lambda n: e.chunk if exp.setup.mesh is not None else min(e.chunk, n)  # noqa: E731
  return {name: trainer.evaluate(setup, state.base_params, state.rl.train.params, problems, chunk=chunk(len(problems)),
                                 samples=e.samples, temperature=e.temperature, seed=0)["accuracy"]
          for name, (setup, problems) in exp.benchmarks.items()}


def icer(steps: int, acc: float, backbone: float) -> float:
  """ICER = RL steps / (Avg − Avg_backbone) in accuracy points; inf when there is no gain."""
  gain = 100.0 * (acc - backbone)
  return steps / gain if gain > 0 else math.inf


# ------------------------------------------------------------------------------------------------ run


def run(c, model_dir: str | None = None) -> dict[str, Any]:
  """Train per the config; returns (and writes to workdir/results.json) backbone and final accuracy,
  the accuracy at each evaluation, ICER, jump diagnostics and timings.

  Order: validate, check the workdir (refused while another run holds its lock), load model and data, restore
  the checkpoint of a resumed run (every error so far leaves the disk untouched), then lock, create/wipe the
  workdir and train holding the lock (`_train`). Each checkpoint's metadata carries
  the partial results, the number of metric rows written and the config, so a run killed anywhere resumes
  both exactly as the uninterrupted run has them, and only with a config that run allows."""
  validate(c)
  if c.mesh.distributed and c.ckpt.resume:  # workdir.check reads checkpoint metadata through orbax (JAX)
    sharding.initialize_distributed(c.mesh.coordinator_address, c.mesh.num_processes, c.mesh.process_id)
  resuming = workdir.check(c)
  exp = build(c, model_dir)
  state, meta = exp.state, None
  if resuming:  # restored (and verified) before anything in the workdir is written
    reader = Checkpointer(Path(c.workdir) / "ckpt", read_only=True)
    if reader.latest_step() is not None:
      state, meta = reader.restore(exp.state)
    reader.close()
  with workdir.locked(c):  # one run per workdir: a second one (or a resume) started meanwhile is refused
    return _train(c, exp, state, meta, resuming)


def _train(c, exp: Experiment, state: sm.NExtState, meta: dict | None, resuming: bool) -> dict[str, Any]:
  """`run` after the checks: prepare the workdir, train, evaluate, write results.json."""
  wd = workdir.prepare(c)
  ckpt = Checkpointer(wd / "ckpt", max_to_keep=c.ckpt.max_to_keep)
  writer = MetricWriter(wd, tensorboard=c.log.tensorboard)
  results = {"evals": {}, "jumps": [], "nonfinite_steps": 0, "oversized_steps": 0}
  if meta is not None:
    if "metric_rows" in meta:
      writer.truncate_rows(meta["metric_rows"])
      results = {"nonfinite_steps": 0, "oversized_steps": 0, **meta["results"]}
    else:  # a checkpoint written before results travelled with it
      writer.truncate_after(meta["step"])
  else:
    writer.truncate_rows(0)  # rows of a run killed before its first checkpoint
  if resuming and (changes := workdir.resume_changes(c)):  # explicit, and logged with the step they took effect
    results.setdefault("resume_changes", []).append({"step": int(state.rl.step), "changes": changes})
    log.warning("resuming at step %d with changed %s", int(state.rl.step),
                ", ".join(f"{x['field']} {x['old']!r} → {x['new']!r}" for x in changes))
  if "backbone" not in results:
    results["backbone"] = accuracy(exp, exp.state, exp.test)
  if exp.benchmarks and "benchmarks" not in results:  # {step: {benchmark: accuracy}}, the backbone's at 0
    results["benchmarks"] = {"0": benchmark_accuracy(exp, exp.state)}

  def record(step: int, s) -> None:
    results["evals"][str(step)] = accuracy(exp, s, exp.test)
    writer.write(step, {"eval/accuracy": results["evals"][str(step)]})
    if exp.benchmarks:
      results["benchmarks"][str(step)] = benchmark_accuracy(exp, s)
      writer.write(step, {f"eval/{name}": acc for name, acc in results["benchmarks"][str(step)].items()})
  val_score = (lambda s: accuracy(exp, s, exp.val, seed=1)) if exp.ncfg.alpha == "auto" else None

  def on_jump(s, info):
    results["jumps"].append({"step": int(s.rl.step), **{k: v for k, v in info.items() if k != "predictor_loss"}})
    results["jumps"][-1]["predictor_loss_first_last"] = {
        d: (c_[0], c_[-1]) for d, c_ in info.get("predictor_loss", {}).items()}

  def on_step(s, m):
    step = int(s.rl.step)
    results["nonfinite_steps"] += int(m.get("nonfinite_updates", 0) > 0)
    results["oversized_steps"] += int(m.get("oversized_updates", 0) > 0)
    if c.eval.every and step % c.eval.every == 0 and step < exp.ncfg.total_steps:
      record(step, s)

  state = driver.run(exp.setup, exp.ncfg, state, writer=writer, checkpointer=ckpt, checkpoint_every=c.ckpt.every,
                 score=val_score, on_jump=on_jump, on_step=on_step, progress_bar=c.log.progress,
                 max_faults=c.rl.max_faults,
                 meta=lambda: {"results": results, "metric_rows": writer.num_rows(),
                               "config": json.loads(c.to_json())})
  steps = exp.ncfg.total_steps
  record(steps, state)
  final = results["evals"][str(steps)]
  results.update({"final": final, "steps": steps, "icer": icer(steps, final, results["backbone"]),
                  "method": exp.ncfg.method, "workdir": str(wd), **sm.trajectory_bytes(state)})
  writer.close()
  workdir.write_results(wd, results)
  return results
