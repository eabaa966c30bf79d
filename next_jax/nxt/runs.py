"""Runs trained elsewhere (verl, TRL, plain PEFT, full-parameter) read back as a NExt trajectory, and the
jump written out again for their stack.

Layouts; the RL step comes from the directory name (`global_step_N`, `checkpoint-N`, `step_N`):
    verl     RUN/global_step_N/actor/lora_adapter/{adapter_config.json, adapter_model.safetensors}
             RUN/global_step_N/actor/huggingface/   (merged weights, when verl saved an hf_model)
    TRL      OUT/checkpoint-N/{adapter_config.json, adapter_model.safetensors}  (transformers' Trainer)
    merged   any HF directory with config.json + safetensors weights (full-parameter runs, NExt's hf_model)
A path may name the adapter/model directory itself or a checkpoint directory above it (`SEARCH` lists the
sub-directories looked in). Pickles (adapter_model.bin, *.pt) are never loaded.

The trajectory is the layout `extrapolate` works on: snapshot 0 is the base W₀ (PEFT starts B at zero, so a
LoRA run starts exactly there) and snapshot i the checkpoint at step i·interval, so G, L and T are the same
deltas as in an in-process run. LoRA: {module: {"a": [K, L, r, n], "b": [K, L, m, r]}} (snapshot 0 all
zeros); merged: {module: {"kernel": [K, L, n, m]}} for all seven projections.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import re
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from next_jax.core import outdir
from next_jax.models import hf, peft_io
from next_jax.models.hf import CheckpointError
from next_jax.models.policy import (
  ALL_MODULES,
  LoraConfig,
  ModelConfig,
  Params,
  merge_lora,
)
from next_jax.nxt.extrapolate import normalised
from next_jax.nxt.rank1 import Triplet
from next_jax.nxt.trajectory import Trajectory
from next_jax.rl import trained

STEP_RE = re.compile(r"^(?:global_step|checkpoint|step)[_-]?(\d+)$")
SEARCH = (".", "lora_adapter", "actor/lora_adapter", "huggingface", "actor/huggingface", "hf_model")
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


@dataclasses.dataclass(frozen=True)
class CheckpointRun:
  """A checkpoint sequence: steps [K] (steps[0] = 0 is the base), paths [K−1] (the checkpoint directory of
  snapshots 1 … K−1), kind "lora" | "merged", its trajectory (None once released), lora_cfg (LoRA runs),
  left_out: the checkpoints an explicit --interval did not use."""

  base_dir: Path
  cfg: ModelConfig
  kind: str
  steps: np.ndarray
  paths: tuple[Path, ...]
  trajectory: Trajectory | None
  lora_cfg: LoraConfig | None = None
  left_out: tuple[Path, ...] = ()  # checkpoints off the --interval grid, not used

  @property
  def scale(self) -> float:
    return trained.scale(self.lora_cfg)

  @property
  def interval(self) -> int:
    return int(self.steps[1] - self.steps[0])


# ------------------------------------------------------------------------------------------ finding


def step_of(path: Path) -> int:
  """The RL step in the innermost path component named global_step_N, checkpoint-N or step_N."""
  for part in reversed(Path(path).parts):
    m = STEP_RE.match(part)
    if m:
      return int(m.group(1))
  raise CheckpointError(f"{path}: no step number in the path (expected a directory named global_step_N "
                        "(verl), checkpoint-N (TRL / transformers) or step_N)")


def resolve(path: Path) -> tuple[str, Path]:
  """("lora" | "merged", the directory holding the files) for a checkpoint path, looking in SEARCH."""
  for sub in SEARCH:
    d = Path(path) / sub
    if (d / "adapter_config.json").exists():
      if not (d / "adapter_model.safetensors").exists() and (d / "adapter_model.bin").exists():
        raise CheckpointError(f"{d}: only adapter_model.bin (a pickle) is present; pickles are never loaded. "
                              "Re-save it once with peft: `PeftModel.from_pretrained(base, d)"
                              ".save_pretrained(d, safe_serialization=True)`")
      return "lora", d
    if (d / "config.json").exists() and any((d / f).exists() for f in _WEIGHT_FILES):
      return "merged", d
  pickles = sorted(p.name for p in Path(path).rglob("*") if p.suffix in (".bin", ".pt", ".pth"))[:3]
  hint = f" (found only pickles {pickles}, which are never loaded)" if pickles else ""
  raise CheckpointError(f"{path}: no PEFT adapter (adapter_config.json + adapter_model.safetensors) or merged "
                        f"HF model (config.json + model.safetensors) in {', '.join(SEARCH)}{hint}")


def find(pattern: str) -> list[tuple[int, str, Path]]:
  """(step, kind, directory) of every checkpoint matched by a glob pattern, sorted by step."""
  paths = sorted(Path(p) for p in glob.glob(pattern) if Path(p).is_dir())
  if not paths:
    raise CheckpointError(f"--checkpoints {pattern!r} matches no directory")
  found, seen = [], {}
  for p in paths:
    step = step_of(p)
    if step in seen:
      raise CheckpointError(f"step {step} appears twice: {seen[step]} and {p}")
    seen[step] = p
    found.append((step, *resolve(p)))
  kinds = {k for _, k, _ in found}
  if len(kinds) > 1:
    lora = next(d for _, k, d in found if k == "lora")
    merged = next(d for _, k, d in found if k == "merged")
    raise CheckpointError(f"--checkpoints mixes PEFT adapters ({lora}) and merged models ({merged}); "
                          "give one kind")
  return sorted(found)


def select(found: list[tuple[int, str, Path]], interval: int | None, max_step: int | None):
  """(the checkpoints at interval·1, interval·2, … ≤ max_step, the paths of those left out).

  Without --interval every checkpoint must lie on the grid of the first step's interval (an uneven sequence
  is refused, listing the checkpoints off it); with one, those off its grid are left out and listed, never
  silently. Every multiple up to the last kept one must be present: G, L and T assume evenly spaced
  snapshots from W₀."""
  if interval is not None and interval < 1:
    raise CheckpointError(f"--interval {interval} must be a positive number of steps")
  found = [f for f in found if max_step is None or f[0] <= max_step]
  if not found:
    raise CheckpointError(f"--max_step {max_step} is below every checkpoint's step")
  every = interval or found[0][0]
  if every < 1:
    raise CheckpointError(f"checkpoint {found[0][2]} is at step {found[0][0]}; the first checkpoint sets the "
                          "interval and must be at a step ≥ 1 (step 0 is the base)")
  kept = [f for f in found if f[0] % every == 0]
  off = [f for f in found if f[0] % every != 0]
  if off and interval is None:
    raise CheckpointError(f"checkpoints at steps {[f[0] for f in found][:12]} are not evenly spaced: "
                          f"{', '.join(str(f[2]) for f in off[:5])} lie off the grid of every {every} steps "
                          "(set by the first checkpoint); pass --interval N to use only steps N, 2N, … "
                          "(the others are listed), or --max_step to stop before them")
  have = {f[0] for f in kept}
  last = max(have, default=0)
  missing = [s for s in range(every, last + 1, every) if s not in have]
  if missing or not kept:
    raise CheckpointError(f"checkpoints must lie every {every} steps from step 0 (--interval): missing "
                          f"step(s) {missing[:5] or [every]} among {sorted(f[0] for f in found)[:12]}")
  return kept, tuple(f[2] for f in off)


# ------------------------------------------------------------------------------------------ reading


def _lora_config(adapter_dir: Path, cfg: ModelConfig) -> LoraConfig:
  """The adapter's LoraConfig; refuses inits under which step 0 is not the base (B ≠ 0, or PiSSA-style
  inits that rewrite W₀), since snapshot 0 is taken to be the base itself."""
  lcfg = peft_io.load_peft_adapter(adapter_dir, cfg, config_only=True)[0]
  init = json.loads((adapter_dir / "adapter_config.json").read_text()).get("init_lora_weights", True)
  if init not in (True, "gaussian"):
    raise CheckpointError(f"{adapter_dir}/adapter_config.json: init_lora_weights={init!r}; only inits that "
                          "start at B = 0 on the unchanged base (true, 'gaussian') make step 0 the base W₀")
  return lcfg


def _check_same(first: Path, lcfg: LoraConfig, other: Path, ocfg: LoraConfig) -> None:
  for field in (f.name for f in dataclasses.fields(LoraConfig)):
    a, b = getattr(lcfg, field), getattr(ocfg, field)
    if a != b:
      raise CheckpointError(f"{other}/adapter_config.json: {field}={b!r} but {first} has {a!r}; every "
                            "checkpoint of one run must agree")


def read(base_dir: str | Path, pattern: str, interval: int | None = None,
         max_step: int | None = None) -> CheckpointRun:
  """Validate and load a checkpoint sequence on top of its base model (fp32). Everything that can be
  wrong (the base, a step number, a gap, mixed kinds or LoRA settings, a shape) raises `CheckpointError`
  naming the path; nothing is written."""
  base_dir = Path(base_dir)
  cfg = hf.load_config(base_dir, dtype="float32")
  hf.check_tensors(hf.read_weights(base_dir), cfg, str(base_dir))
  found, left_out = select(find(pattern), interval, max_step)
  kind = found[0][1]
  steps = np.array([0] + [s for s, _, _ in found])
  dirs = [d for _, _, d in found]
  if kind == "lora":
    lcfg = _lora_config(dirs[0], cfg)
    for d in dirs[1:]:
      _check_same(dirs[0], lcfg, d, _lora_config(d, cfg))
    traj = _stack_lora(cfg, lcfg, dirs)
  else:
    lcfg = None
    traj = _stack_kernels(cfg, [base_dir, *dirs])
  return CheckpointRun(base_dir, cfg, kind, steps, tuple(dirs),
                       Trajectory(traj, steps, trained.scale(lcfg), kind == "lora"), lcfg, left_out)


def _stack_lora(cfg: ModelConfig, lcfg: LoraConfig, dirs: list[Path]) -> dict:
  """{module: {"a": [K, L, r, n], "b": [K, L, m, r]}} with snapshot 0 = zeros (W₀)."""
  num, r = len(dirs) + 1, lcfg.rank
  traj = {}
  for m in lcfg.targets:
    n_in, n_out = cfg.module_shape(m)
    traj[m] = {"a": np.zeros((num, cfg.num_layers, r, n_in), np.float32),
               "b": np.zeros((num, cfg.num_layers, n_out, r), np.float32)}
  for i, d in enumerate(dirs, start=1):
    _, lora = peft_io.load_peft_adapter(d, cfg)
    for m, mod in lora.items():
      traj[m]["a"][i], traj[m]["b"][i] = np.asarray(mod["a"]), np.asarray(mod["b"])
  return {m: {k: jnp.asarray(v) for k, v in mod.items()} for m, mod in traj.items()}


def _stack_kernels(cfg: ModelConfig, dirs: list[Path]) -> dict:
  """{module: {"kernel": [K, L, n, m]}} of all seven projections, one model directory per snapshot."""
  traj = {m: {"kernel": np.zeros((len(dirs), cfg.num_layers, *cfg.module_shape(m)), np.float32)}
          for m in ALL_MODULES}
  for i, d in enumerate(dirs):
    tensors = hf.read_weights(d)
    hf.check_finite(tensors, str(d))
    params = hf.params_from_hf(tensors, cfg, str(d))
    for m in ALL_MODULES:
      traj[m]["kernel"][i] = params["layers"][m]["kernel"]
  return {m: {"kernel": jnp.asarray(mod["kernel"])} for m, mod in traj.items()}


def last_params(run: CheckpointRun) -> Params:
  """fp32 weights of the last checkpoint: base + s·B·A (LoRA) or the merged model as stored."""
  if run.kind == "merged":
    return hf.params_from_hf(hf.read_weights(run.paths[-1]), run.cfg, str(run.paths[-1]))
  _, base, _ = hf.load_model(run.base_dir, dtype="float32", tokenizer=False)
  return merge_lora(base, last_lora(run), run.lora_cfg)


def last_lora(run: CheckpointRun) -> Params:
  return run.trajectory.at(-1)


# ------------------------------------------------------------------------------------------ writing


def extend_adapter(lora: Params, lcfg: LoraConfig, jump: dict[str, Triplet], alpha: float):
  """A rank-(r+1) PEFT LoRA equal to W_t + α·σ̂·û·v̂ᵀ: the jump appended as one more rank.

  û, v̂ are normalised (as predict-extend uses them). With the scale kept (lora_alpha' = lora_alpha·(r+1)/r,
  or ·√((r+1)/r) under rslora, so s' = s): B' = [B, c·sgn(ασ̂)·û], A' = [A; c·v̂ᵀ], c = √(|ασ̂|/s), hence
  s·B'A' = s·BA + α·σ̂·û·v̂ᵀ. lora: {module: {"a": [L, r, n], "b": [L, m, r]}}; jump: {module: Triplet [L]}."""
  r = lcfg.rank
  grow = math.sqrt((r + 1) / r) if lcfg.rslora else (r + 1) / r
  new_cfg = dataclasses.replace(lcfg, rank=r + 1, alpha=lcfg.alpha * grow)
  out = {}
  for m, mod in lora.items():
    t = normalised(jump[m])
    s = alpha * t.sigma.astype(jnp.float32)  # [L]
    c = jnp.sqrt(jnp.abs(s) / lcfg.scale)[:, None]
    b_new = (c * jnp.sign(s)[:, None] * t.u)[:, :, None]  # [L, m, 1]
    a_new = (c * t.v)[:, None, :]  # [L, 1, n]
    out[m] = {"a": jnp.concatenate([mod["a"], a_new.astype(mod["a"].dtype)], axis=1),
              "b": jnp.concatenate([mod["b"], b_new.astype(mod["b"].dtype)], axis=2)}
  return new_cfg, out


def stored_dtype(model_dir: Path) -> str:
  """The dtype a model directory's weights are stored in ("bfloat16", "float32", …)."""
  return str(hf.read_weights(Path(model_dir))["model.embed_tokens.weight"].dtype)


def base_params(run: CheckpointRun) -> Params:
  """The base's weights in their stored dtype (a merge adds in fp32 and rounds once, as saving would)."""
  cfg = dataclasses.replace(run.cfg, dtype=stored_dtype(run.base_dir))
  return hf.params_from_hf(hf.read_weights(run.base_dir), cfg, str(run.base_dir))


def save_like(out_dir: Path, base_dir: Path, cfg: ModelConfig, params: Params, overwrite: bool = False) -> Path:
  """An HF directory for `params` that keeps everything else of `base_dir` (config.json,
  generation_config.json, tokenizer and chat template) and stores the weights in the base's dtype. A
  non-finite weight is refused; an existing out_dir is replaced only as outdir.atomic_dir allows."""
  base_dir = Path(base_dir)
  dtype = np.dtype(stored_dtype(base_dir))
  skip = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".index.json")

  def write(tmp: Path):
    for f in base_dir.iterdir():
      if f.is_file() and not f.name.endswith(skip):
        shutil.copy2(f, tmp / f.name)
    tensors = {k: np.asarray(v).astype(dtype, copy=False) for k, v in hf.params_to_hf(params, cfg).items()}
    hf.check_finite(tensors, f"the model for {out_dir}")
    hf.write_safetensors(tmp / "model.safetensors", tensors)

  return outdir.atomic_dir(Path(out_dir), write, inputs=[base_dir], overwrite=overwrite, flag="overwrite=True")
