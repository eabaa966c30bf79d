"""PEFT LoRA adapter directories (adapter_config.json + adapter_model.safetensors) ↔ our LoRA params.

Loading is strict: every adapter_config.json field that changes what the stored factors mean is either
implemented or refused with an error naming it. Implemented: `rank_pattern` and `alpha_pattern` (per module
type or per layer, matched as peft matches them: the first key k with `re.match(rf"(.*\\.)?({k})$", name)`
for the module name "model.layers.{i}.self_attn.q_proj"). Our LoRA has one rank and one scale s, so a
pattern is folded in exactly: every (module, layer) is zero-padded to the largest rank R and its B scaled
by s_ml / s, which leaves each s_ml·B·A unchanged (the forward equals peft's; training from such an import
would move the folded factors, not peft's). Refused: DoRA, LoRA biases, fan_in_fan_out, modules_to_save,
layer replication, trainable tokens, target_parameters, layers_to_transform, bias ≠ "none", regex targets.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import jax
import ml_dtypes
import numpy as np

from next_jax.core import outdir
from next_jax.models.hf import (
  HF_MODULE,
  CheckpointError,
  check_finite,
  read_safetensors,
  write_safetensors,
)
from next_jax.models.policy import ALL_MODULES, LoraConfig, ModelConfig, Params

_PEFT_PREFIX = "base_model.model.model.layers."
# adapter_config.json fields that change what the stored factors mean: each must be empty / false / null,
# except bias ("none") and layers_to_transform (null: 0 means "layer 0 only").
_PEFT_EMPTY = ("use_dora", "lora_bias", "fan_in_fan_out", "modules_to_save", "use_qalora", "layer_replication",
               "trainable_token_indices", "target_parameters")
_PEFT_PLAIN = {**{f: (lambda v: not v) for f in _PEFT_EMPTY}, "bias": lambda v: v in (None, "none"),
               "layers_to_transform": lambda v: v is None}


def save_peft_adapter(out_dir: str | os.PathLike, cfg: ModelConfig, lora: Params, lora_cfg: LoraConfig,
                      base_model_name_or_path: str = "", overwrite: bool = False) -> Path:
  """PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors) for `PeftModel.from_pretrained`.
  An existing out_dir is replaced when next_jax wrote it (outdir.atomic_dir), or with overwrite=True."""
  tensors = {}
  for name, mod in lora.items():
    a, b = np.asarray(mod["a"]), np.asarray(mod["b"])
    for i in range(cfg.num_layers):
      pre = f"{_PEFT_PREFIX}{i}.{HF_MODULE[name]}"
      tensors[f"{pre}.lora_A.weight"], tensors[f"{pre}.lora_B.weight"] = a[i], b[i]
  check_finite(tensors, f"the adapter for {out_dir}")
  adapter_cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora_cfg.rank,
                 "lora_alpha": lora_cfg.alpha, "use_rslora": lora_cfg.rslora, "lora_dropout": 0.0,
                 "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
                 "target_modules": sorted(HF_MODULE[t].split(".")[1] for t in lora),
                 "base_model_name_or_path": base_model_name_or_path}

  def write(tmp: Path):
    (tmp / "adapter_config.json").write_text(json.dumps(adapter_cfg, indent=2))
    write_safetensors(tmp / "adapter_model.safetensors", tensors)

  return outdir.atomic_dir(Path(out_dir), write, overwrite=overwrite, flag="overwrite=True")


def _read_config(cfg_path: Path) -> dict:
  if not cfg_path.exists():
    raise CheckpointError(f"{cfg_path}: missing")
  try:
    acfg = json.loads(cfg_path.read_bytes().decode("utf-8"))
  except UnicodeDecodeError as e:
    raise CheckpointError(f"{cfg_path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{cfg_path}: invalid JSON ({e})") from e
  if not isinstance(acfg, dict):
    raise CheckpointError(f"{cfg_path}: expected a JSON object")
  for field, kind in (("r", "a whole number ≥ 1"), ("lora_alpha", "a positive number")):
    v = acfg.get(field)
    good = (isinstance(v, int) and v >= 1) if field == "r" else (isinstance(v, (int, float)) and 0 < v < math.inf)
    if isinstance(v, bool) or not good:
      got = "missing" if field not in acfg else f"{v!r}"
      raise CheckpointError(f"{cfg_path}: field {field!r} is {got}; expected {kind}")
  if acfg.get("peft_type", "LORA") != "LORA":
    raise CheckpointError(f"{cfg_path}: peft_type={acfg.get('peft_type')!r}; only LORA adapters load")
  for field, ok in _PEFT_PLAIN.items():
    if field in acfg and not ok(acfg[field]):
      raise CheckpointError(f"{cfg_path}: {field}={acfg[field]!r} is not supported (plain LoRA only: the "
                            "weights would mean something else than s·B·A on every target)")
  for field in ("rank_pattern", "alpha_pattern"):
    pat = acfg.get(field) or {}
    if not isinstance(pat, dict) or not all(isinstance(v, (int, float)) and v > 0 for v in pat.values()):
      raise CheckpointError(f"{cfg_path}: {field}={pat!r}; expected an object of module pattern → positive "
                            "number")
    try:
      [re.compile(k) for k in pat]
    except re.error as e:
      raise CheckpointError(f"{cfg_path}: {field} key is not a valid regular expression ({e})") from e
  return acfg


def _pattern(pattern: dict, name: str, default):
  """peft's get_pattern_key: the value of the first key k that matches the end of `name`."""
  return next((v for k, v in pattern.items() if re.match(rf"(.*\.)?({k})$", name)), default)


def module_ranks_and_scales(acfg: dict, targets: tuple[str, ...], num_layers: int):
  """{module: ([rank per layer], [scale per layer])} under rank_pattern / alpha_pattern (PEFT semantics:
  s = α/r, or α/√r with use_rslora)."""
  r0, a0, rs = int(acfg["r"]), float(acfg["lora_alpha"]), bool(acfg.get("use_rslora", False))
  if r0 < 1:
    raise CheckpointError(f"adapter_config.json: r={r0} must be ≥ 1")
  out = {}
  for m in targets:
    names = [f"model.layers.{i}.{HF_MODULE[m]}" for i in range(num_layers)]
    ranks = [int(_pattern(acfg.get("rank_pattern") or {}, n, r0)) for n in names]
    alphas = [float(_pattern(acfg.get("alpha_pattern") or {}, n, a0)) for n in names]
    out[m] = (ranks, [a / (math.sqrt(r) if rs else r) for a, r in zip(alphas, ranks)])
  return out


def load_peft_adapter(adapter_dir: str | os.PathLike, cfg: ModelConfig,
                      config_only: bool = False) -> tuple[LoraConfig, Params | None]:
  """PEFT LoRA adapter directory → (LoraConfig, lora params in cfg.dtype; None with config_only).

  With rank/alpha patterns the LoraConfig has rank R = the largest rank and the scale of the plain r and
  lora_alpha; each (module, layer) is folded in as the module docstring says."""
  adapter_dir = Path(adapter_dir)
  cfg_path = adapter_dir / "adapter_config.json"
  acfg = _read_config(cfg_path)
  by_hf = {v.split(".")[1]: k for k, v in HF_MODULE.items()}
  targets = acfg.get("target_modules") or []
  if isinstance(targets, str):
    raise CheckpointError(f"{cfg_path}: target_modules={targets!r} is a pattern; only a list of module "
                          f"names among {sorted(by_hf)} is supported")
  unknown = [t for t in targets if t not in by_hf]
  if unknown:
    raise CheckpointError(f"{cfg_path}: target_modules {unknown} are not among {sorted(by_hf)}")
  targets = tuple(t for t in ALL_MODULES if HF_MODULE[t].split(".")[1] in targets)
  per = module_ranks_and_scales(acfg, targets, cfg.num_layers)
  r0, a0, rslora = int(acfg["r"]), float(acfg["lora_alpha"]), bool(acfg.get("use_rslora", False))
  rank = max([r0] + [max(r) for r, _ in per.values()])
  root = math.sqrt if rslora else float
  lcfg = LoraConfig(rank=rank, alpha=a0 if rank == r0 else a0 / root(r0) * root(rank), targets=targets,
                    rslora=rslora)
  if config_only:
    return lcfg, None
  return lcfg, _load_factors(adapter_dir, cfg, lcfg, per)


def _load_factors(adapter_dir: Path, cfg: ModelConfig, lcfg: LoraConfig, per: dict) -> Params:
  pickled = (adapter_dir / "adapter_model.bin").exists()
  if pickled and not (adapter_dir / "adapter_model.safetensors").exists():
    raise CheckpointError(f"{adapter_dir}: only adapter_model.bin (a pickle) is present; pickles are never "
                          "loaded. Convert it once with peft: `PeftModel.from_pretrained(base, d)"
                          ".save_pretrained(d, safe_serialization=True)`")
  tensors = read_safetensors(adapter_dir / "adapter_model.safetensors")
  dt, lora, used = np.dtype(cfg.jnp_dtype), {}, set()
  for name in lcfg.targets:
    n_in, n_out = cfg.module_shape(name)
    a = np.zeros((cfg.num_layers, lcfg.rank, n_in), np.float32)
    b = np.zeros((cfg.num_layers, n_out, lcfg.rank), np.float32)
    for i, (r, s) in enumerate(zip(*per[name])):
      pre = f"{_PEFT_PREFIX}{i}.{HF_MODULE[name]}"
      for key, want in (("A", (r, n_in)), ("B", (n_out, r))):
        t = tensors.get(f"{pre}.lora_{key}.weight")
        if t is None or tuple(t.shape) != want:
          got = "missing" if t is None else f"shape {tuple(t.shape)}"
          raise CheckpointError(f"{adapter_dir}/adapter_model.safetensors: {pre}.lora_{key}.weight "
                                f"is {got}; expected {want}")
        if t.dtype.kind != "f" and t.dtype != ml_dtypes.bfloat16:
          raise CheckpointError(f"{adapter_dir}/adapter_model.safetensors: {pre}.lora_{key}.weight has dtype "
                                f"{t.dtype}; LoRA factors are floating point")
        used.add(f"{pre}.lora_{key}.weight")
      a[i, :r] = tensors[f"{pre}.lora_A.weight"]
      b[i, :, :r] = tensors[f"{pre}.lora_B.weight"]
      if abs(s / lcfg.scale - 1.0) > 1e-12:  # a pattern gave this (module, layer) another scale
        b[i] *= s / lcfg.scale
    lora[name] = {"a": jax.numpy.asarray(a.astype(dt)), "b": jax.numpy.asarray(b.astype(dt))}
  check_finite({k: tensors[k] for k in used}, f"{adapter_dir}/adapter_model.safetensors")
  extra = sorted(set(tensors) - used)
  if extra:
    raise CheckpointError(f"{adapter_dir}/adapter_model.safetensors: tensors {extra[:3]} are not LoRA factors of "
                          f"the {len(lcfg.targets)} target modules (modules_to_save, trained tokens or biases?)")
  return lora
