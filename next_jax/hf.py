"""Hugging Face directories ↔ next_jax params; PEFT adapters.

A local HF model directory (config.json, model.safetensors or a sharded index, tokenizer files) loads through
`load_model`, exactly as a real Qwen2.5 checkpoint would. Torch stores Linear weights [out, in]; ours are
[in, out] and stacked over layers. Safetensors are read with a small memory-mapped reader (dtype via
ml_dtypes, so bf16 needs no torch) and written the same way. No pickle is ever loaded.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np

from next_jax.policy import ALL_MODULES, LoraConfig, ModelConfig, Params, merge_lora

SUPPORTED = ("qwen2", "llama")
_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
              "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
              "BOOL": np.bool_}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}
_HF_MODULE = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
              "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
_HF_NORM = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"}
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class CheckpointError(ValueError):
  """A model/adapter directory that cannot be used as is; the message names the file or field."""


# ------------------------------------------------------------------------------------- safetensors


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Memory-mapped read of one .safetensors file → {name: read-only ndarray} (bf16 via ml_dtypes)."""
  path = Path(path)
  try:
    with open(path, "rb") as f:
      (n,) = struct.unpack("<Q", f.read(8))
      if n > os.fstat(f.fileno()).st_size - 8:  # else f.read(n) tries to allocate n bytes (MemoryError)
        raise CheckpointError(f"{path}: header length {n} exceeds the file size: truncated, or not a "
                              "safetensors file (e.g. a Git LFS pointer)")
      header = json.loads(f.read(n))
  except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
  if not isinstance(header, dict):
    raise CheckpointError(f"{path}: not a readable safetensors file (header is not a JSON object)")
  header.pop("__metadata__", None)
  if not header:
    return {}
  buf = np.memmap(path, dtype=np.uint8, mode="r")
  out = {}
  for name, info in header.items():
    if info["dtype"] not in _ST_DTYPES:
      raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
    start, end = info["data_offsets"]
    dt = np.dtype(_ST_DTYPES[info["dtype"]])
    if 8 + n + end > buf.size or (end - start) != dt.itemsize * int(np.prod(info["shape"])):
      raise CheckpointError(f"{path}: tensor {name} lies outside the file (truncated or corrupt)")
    out[name] = buf[8 + n + start: 8 + n + end].view(dt).reshape(info["shape"])
  return out


def write_safetensors(path: str | os.PathLike, tensors: dict[str, np.ndarray],
                      metadata: dict[str, str] | None = None) -> None:
  """Write {name: ndarray} as .safetensors (readable by the `safetensors` library and transformers)."""
  header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
  offset, arrays = 0, []
  for name in sorted(tensors):
    a = np.ascontiguousarray(np.asarray(tensors[name]))
    header[name] = {"dtype": _ST_NAMES[a.dtype], "shape": list(a.shape),
                    "data_offsets": [offset, offset + a.nbytes]}
    offset += a.nbytes
    arrays.append(a)
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(blob)) + blob)
    for a in arrays:
      f.write(a.tobytes())


def read_weights(model_dir: Path) -> dict[str, np.ndarray]:
  """model.safetensors, or the shards named by model.safetensors.index.json."""
  single, index = model_dir / "model.safetensors", model_dir / "model.safetensors.index.json"
  if single.exists():
    return read_safetensors(single)
  if index.exists():
    try:
      weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError) as e:
      raise CheckpointError(f"{index}: expected a JSON object with a 'weight_map' ({e})") from e
    tensors = {}
    for shard in sorted(set(weight_map.values())):
      if not (model_dir / shard).exists():
        raise CheckpointError(f"{index} names shard {shard}, which is missing from {model_dir}")
      tensors.update(read_safetensors(model_dir / shard))
    return tensors
  pickles = sorted(p.name for p in model_dir.glob("*.bin")) + sorted(p.name for p in model_dir.glob("*.pt"))
  hint = (f" Found {pickles}: pickled checkpoints are never loaded; convert them once with transformers "
          "(`AutoModelForCausalLM.from_pretrained(d).save_pretrained(d, safe_serialization=True)`).")
  raise CheckpointError(f"{model_dir}: no model.safetensors or model.safetensors.index.json."
                        + (hint if pickles else ""))


# ------------------------------------------------------------------------------------------ config


def _config_json(model_dir: Path) -> dict[str, Any]:
  path = model_dir / "config.json"
  if not model_dir.is_dir():
    raise CheckpointError(f"{model_dir}: model directory does not exist")
  if not path.exists():
    raise CheckpointError(f"{path}: missing (every HF model directory has a config.json)")
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{path}: invalid JSON ({e})") from e


def config_from_hf(hf: dict[str, Any], source: str = "config.json", dtype: str | None = None) -> ModelConfig:
  """ModelConfig from an HF config dict (transformers 4.x `rope_theta` or 5.x `rope_parameters`)."""
  mtype = hf.get("model_type")
  if mtype not in SUPPORTED:
    raise CheckpointError(f"{source}: model_type={mtype!r} (architectures={hf.get('architectures')}) is "
                          f"not supported; next_jax implements {SUPPORTED}")
  rope = hf.get("rope_parameters") or {}
  scaling = hf.get("rope_scaling") or {}
  rope_type = rope.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
  if rope_type != "default":
    raise CheckpointError(f"{source}: rope_type={rope_type!r} is not supported (only 'default' RoPE)")
  if hf.get("use_sliding_window"):
    raise CheckpointError(f"{source}: use_sliding_window=true is not supported")
  if mtype == "llama" and (hf.get("attention_bias") or hf.get("mlp_bias")):
    raise CheckpointError(f"{source}: llama attention_bias/mlp_bias=true is not supported")
  if hf.get("hidden_act", "silu") != "silu":
    raise CheckpointError(f"{source}: hidden_act={hf['hidden_act']!r} is not supported (SwiGLU uses 'silu')")
  try:
    heads = hf["num_attention_heads"]
    torch_dtype = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    return ModelConfig(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"], num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)), qkv_bias=(mtype == "qwen2"),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_position_embeddings=int(hf.get("max_position_embeddings", 32768)),
        dtype=dtype or ("bfloat16" if torch_dtype == "bfloat16" else "float32"))
  except KeyError as e:
    raise CheckpointError(f"{source}: required field {e.args[0]!r} is missing") from e


def config_to_hf(cfg: ModelConfig, **extra) -> dict[str, Any]:
  """An HF Qwen2/Llama config.json dict for `cfg` (transformers reads both rope spellings)."""
  mtype = "qwen2" if cfg.qkv_bias else "llama"
  return {"architectures": ["Qwen2ForCausalLM" if cfg.qkv_bias else "LlamaForCausalLM"],
          "model_type": mtype, "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
          "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
          "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
          "head_dim": cfg.head_dim, "hidden_act": "silu", "rms_norm_eps": cfg.rms_norm_eps,
          "rope_theta": cfg.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
          "tie_word_embeddings": cfg.tie_embeddings, "max_position_embeddings": cfg.max_position_embeddings,
          "use_sliding_window": False, "attention_bias": False, "dtype": cfg.dtype, **extra}


# ------------------------------------------------------------------------------------- name mapping


def _expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  """HF tensor name → torch-layout shape, for every tensor the checkpoint must hold."""
  d = cfg.hidden_size
  shapes = {"model.embed_tokens.weight": (cfg.vocab_size, d), "model.norm.weight": (d,)}
  if not cfg.tie_embeddings:
    shapes["lm_head.weight"] = (cfg.vocab_size, d)
  for i in range(cfg.num_layers):
    pre = f"model.layers.{i}."
    for ours, theirs in _HF_NORM.items():
      shapes[f"{pre}{theirs}.weight"] = (d,)
    for name, theirs in _HF_MODULE.items():
      n_in, n_out = cfg.module_shape(name)
      shapes[f"{pre}{theirs}.weight"] = (n_out, n_in)
      if cfg.qkv_bias and name in ("q", "k", "v"):
        shapes[f"{pre}{theirs}.bias"] = (n_out,)
  return shapes


def check_tensors(tensors: dict[str, np.ndarray], cfg: ModelConfig, where: str) -> None:
  expected = _expected_shapes(cfg)
  missing = [k for k in expected if k not in tensors]
  if missing:
    more = f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""
    raise CheckpointError(f"{where}: missing tensors {missing[:5]}{more}")
  for name, shape in expected.items():
    if tuple(tensors[name].shape) != shape:
      raise CheckpointError(f"{where}: tensor {name} has shape {tuple(tensors[name].shape)} but config.json "
                            f"implies {shape}")
    if tensors[name].dtype.kind != "f" and tensors[name].dtype != ml_dtypes.bfloat16:
      raise CheckpointError(f"{where}: tensor {name} has non-float dtype {tensors[name].dtype}")
  known = set(expected) | ({"lm_head.weight"} if cfg.tie_embeddings else set())
  unknown = [k for k in tensors if k not in known and not k.endswith(_IGNORED_SUFFIXES)]
  if unknown:
    raise CheckpointError(f"{where}: unexpected tensors {unknown[:5]} — not a {cfg.dtype} "
                          f"{'Qwen2' if cfg.qkv_bias else 'Llama'} checkpoint this config describes?")


def params_from_hf(tensors: dict[str, np.ndarray], cfg: ModelConfig, where: str = "checkpoint") -> Params:
  """HF state dict (numpy, torch layout) → our params as host numpy arrays in cfg.dtype."""
  check_tensors(tensors, cfg, where)
  dt = np.dtype(cfg.jnp_dtype)
  cast = lambda a: np.asarray(a).astype(dt)  # noqa: E731
  layer = lambda i, n: tensors[f"model.layers.{i}.{n}"]  # noqa: E731
  rng = range(cfg.num_layers)
  layers: Params = {ours: cast(np.stack([layer(i, f"{hf}.weight") for i in rng]))
                    for ours, hf in _HF_NORM.items()}
  for name, hf in _HF_MODULE.items():
    layers[name] = {"kernel": cast(np.stack([layer(i, f"{hf}.weight").T for i in rng]))}
    if cfg.qkv_bias and name in ("q", "k", "v"):
      layers[name]["bias"] = cast(np.stack([layer(i, f"{hf}.bias") for i in rng]))
  params = {"embed": cast(tensors["model.embed_tokens.weight"]), "layers": layers,
            "final_norm": cast(tensors["model.norm.weight"])}
  if not cfg.tie_embeddings:
    params["lm_head"] = cast(tensors["lm_head.weight"].T)
  return params


def params_to_hf(params: Params, cfg: ModelConfig) -> dict[str, np.ndarray]:
  """Our params → HF state dict (numpy, torch layout [out, in])."""
  p = jax.tree.map(np.asarray, params)
  out = {"model.embed_tokens.weight": p["embed"], "model.norm.weight": p["final_norm"]}
  if not cfg.tie_embeddings:
    out["lm_head.weight"] = p["lm_head"].T
  for i in range(cfg.num_layers):
    pre = f"model.layers.{i}."
    for ours, hf in _HF_NORM.items():
      out[f"{pre}{hf}.weight"] = p["layers"][ours][i]
    for name, hf in _HF_MODULE.items():
      out[f"{pre}{hf}.weight"] = p["layers"][name]["kernel"][i].T
      if "bias" in p["layers"][name]:
        out[f"{pre}{hf}.bias"] = p["layers"][name]["bias"][i]
  return out


# --------------------------------------------------------------------------------------- public API


def _place(tree, sharding):
  """device_put every leaf with `sharding` (one Sharding, or a pytree of them matching `tree`)."""
  if sharding is None:
    return jax.tree.map(jax.numpy.asarray, tree)
  if isinstance(sharding, jax.sharding.Sharding):
    return jax.tree.map(lambda a: jax.device_put(a, sharding), tree)
  return jax.tree.map(jax.device_put, tree, sharding)


def load_config(model_dir: str | os.PathLike, dtype: str | None = None) -> ModelConfig:
  model_dir = Path(model_dir)
  return config_from_hf(_config_json(model_dir), str(model_dir / "config.json"), dtype)


def load_tokenizer(model_dir: str | os.PathLike):
  """transformers.AutoTokenizer from local files only (chat template kept)."""
  import transformers  # noqa: PLC0415 - heavy import, only where a tokenizer is needed

  # transformers 5 builds an empty 1-token tokenizer from config.json alone instead of failing.
  files = ("tokenizer.json", "vocab.json", "tokenizer.model")
  if not any((Path(model_dir) / f).exists() for f in files):
    raise CheckpointError(f"{model_dir}: cannot load a tokenizer (none of {files} present)")
  try:
    return transformers.AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
  except (OSError, ValueError, TypeError) as e:
    raise CheckpointError(f"{model_dir}: cannot load a tokenizer ({type(e).__name__}: {e})") from e


def load_model(model_dir: str | os.PathLike, *, dtype: str | None = None, sharding=None,
               tokenizer: bool = True):
  """Local HF directory → (ModelConfig, params, tokenizer or None).

  dtype: override config.json's dtype ("float32" | "bfloat16"); sharding: a `jax.sharding.Sharding` (or a
  pytree of them) every parameter is placed with, e.g. replicated over a data-parallel mesh.
  """
  model_dir = Path(model_dir)
  cfg = load_config(model_dir, dtype)
  params = params_from_hf(read_weights(model_dir), cfg, str(model_dir))
  return cfg, _place(params, sharding), (load_tokenizer(model_dir) if tokenizer else None)


def atomic_dir(out_dir: Path, write) -> Path:
  """Run write(tmp_dir), then move tmp_dir to out_dir: no half-written export is ever left behind."""
  out_dir = Path(out_dir)
  out_dir.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
  try:
    write(tmp)
    if out_dir.exists():
      shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return out_dir


def save_model(out_dir: str | os.PathLike, cfg: ModelConfig, params: Params, tokenizer=None,
               lora: Params | None = None, lora_cfg: LoraConfig | None = None) -> Path:
  """Write an HF directory (config.json, model.safetensors, tokenizer files) that
  `transformers.AutoModelForCausalLM.from_pretrained` loads; LoRA, if given, is merged first."""
  if lora is not None:
    params = merge_lora(params, lora, lora_cfg)

  def write(tmp: Path):
    (tmp / "config.json").write_text(json.dumps(config_to_hf(cfg), indent=2))
    write_safetensors(tmp / "model.safetensors", params_to_hf(params, cfg))
    if tokenizer is not None:
      tokenizer.save_pretrained(str(tmp))

  return atomic_dir(Path(out_dir), write)


# ------------------------------------------------------------------------------------------- PEFT

_PEFT_PREFIX = "base_model.model.model.layers."
# adapter_config.json fields that change what the stored factors mean: each must be empty / false / null,
# except bias ("none") and layers_to_transform (null: 0 means "layer 0 only").
_PEFT_EMPTY = ("use_dora", "lora_bias", "fan_in_fan_out", "rank_pattern", "alpha_pattern", "modules_to_save",
               "use_qalora", "layer_replication", "trainable_token_indices", "target_parameters")
_PEFT_PLAIN = {**{f: (lambda v: not v) for f in _PEFT_EMPTY}, "bias": lambda v: v in (None, "none"),
               "layers_to_transform": lambda v: v is None}


def save_peft_adapter(out_dir: str | os.PathLike, cfg: ModelConfig, lora: Params, lora_cfg: LoraConfig,
                      base_model_name_or_path: str = "") -> Path:
  """PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors) for `PeftModel.from_pretrained`."""
  tensors = {}
  for name, mod in lora.items():
    a, b = np.asarray(mod["a"]), np.asarray(mod["b"])
    for i in range(cfg.num_layers):
      pre = f"{_PEFT_PREFIX}{i}.{_HF_MODULE[name]}"
      tensors[f"{pre}.lora_A.weight"], tensors[f"{pre}.lora_B.weight"] = a[i], b[i]
  adapter_cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora_cfg.rank,
                 "lora_alpha": lora_cfg.alpha, "use_rslora": lora_cfg.rslora, "lora_dropout": 0.0,
                 "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
                 "target_modules": sorted(_HF_MODULE[t].split(".")[1] for t in lora),
                 "base_model_name_or_path": base_model_name_or_path}

  def write(tmp: Path):
    (tmp / "adapter_config.json").write_text(json.dumps(adapter_cfg, indent=2))
    write_safetensors(tmp / "adapter_model.safetensors", tensors)

  return atomic_dir(Path(out_dir), write)


def load_peft_adapter(adapter_dir: str | os.PathLike, cfg: ModelConfig,
                      config_only: bool = False) -> tuple[LoraConfig, Params | None]:
  """PEFT LoRA adapter directory → (LoraConfig, lora params in cfg.dtype; None with config_only)."""
  adapter_dir = Path(adapter_dir)
  cfg_path = adapter_dir / "adapter_config.json"
  if not cfg_path.exists():
    raise CheckpointError(f"{cfg_path}: missing")
  try:
    acfg = json.loads(cfg_path.read_text())
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{cfg_path}: invalid JSON ({e})") from e
  if not isinstance(acfg, dict):
    raise CheckpointError(f"{cfg_path}: expected a JSON object")
  if acfg.get("peft_type", "LORA") != "LORA":
    raise CheckpointError(f"{cfg_path}: peft_type={acfg.get('peft_type')!r}; only LORA adapters load")
  for field, ok in _PEFT_PLAIN.items():
    if field in acfg and not ok(acfg[field]):
      raise CheckpointError(f"{cfg_path}: {field}={acfg[field]!r} is not supported (plain LoRA only: the "
                            "weights would mean something else than s·B·A on every target)")
  by_hf = {v.split(".")[1]: k for k, v in _HF_MODULE.items()}
  targets = acfg.get("target_modules") or []
  if isinstance(targets, str):
    raise CheckpointError(f"{cfg_path}: target_modules={targets!r} is a pattern; only a list of module "
                          f"names among {sorted(by_hf)} is supported")
  unknown = [t for t in targets if t not in by_hf]
  if unknown:
    raise CheckpointError(f"{cfg_path}: target_modules {unknown} are not among {sorted(by_hf)}")
  lcfg = LoraConfig(rank=int(acfg["r"]), alpha=float(acfg["lora_alpha"]),
                    targets=tuple(t for t in ALL_MODULES if _HF_MODULE[t].split(".")[1] in targets),
                    rslora=bool(acfg.get("use_rslora", False)))
  if config_only:
    return lcfg, None
  pickled = (adapter_dir / "adapter_model.bin").exists()
  if pickled and not (adapter_dir / "adapter_model.safetensors").exists():
    raise CheckpointError(f"{adapter_dir}: only adapter_model.bin (a pickle) is present; pickles are never "
                          "loaded. Convert it once with peft: `PeftModel.from_pretrained(base, d)"
                          ".save_pretrained(d, safe_serialization=True)`")
  tensors = read_safetensors(adapter_dir / "adapter_model.safetensors")
  dt = np.dtype(cfg.jnp_dtype)
  lora = {}
  for name in lcfg.targets:
    n_in, n_out = cfg.module_shape(name)
    mats = {"a": [], "b": []}
    for i in range(cfg.num_layers):
      pre = f"{_PEFT_PREFIX}{i}.{_HF_MODULE[name]}"
      for key, want in (("a", (lcfg.rank, n_in)), ("b", (n_out, lcfg.rank))):
        t = tensors.get(f"{pre}.lora_{key.upper()}.weight")
        if t is None or tuple(t.shape) != want:
          got = "missing" if t is None else f"shape {tuple(t.shape)}"
          raise CheckpointError(f"{adapter_dir}/adapter_model.safetensors: {pre}.lora_{key.upper()}.weight "
                                f"is {got}; expected {want}")
        mats[key].append(t)
    lora[name] = {k: jax.numpy.asarray(np.stack(v).astype(dt)) for k, v in mats.items()}
  used = {f"{_PEFT_PREFIX}{i}.{_HF_MODULE[n]}.lora_{x}.weight" for n in lcfg.targets
          for i in range(cfg.num_layers) for x in "AB"}
  extra = sorted(set(tensors) - used)
  if extra:
    raise CheckpointError(f"{adapter_dir}/adapter_model.safetensors: tensors {extra[:3]} are not LoRA factors of "
                          f"the {len(lcfg.targets)} target modules (modules_to_save, trained tokens or biases?)")
  return lcfg, lora
