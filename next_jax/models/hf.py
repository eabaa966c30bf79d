"""Hugging Face directories ↔ next_jax params (PEFT adapters: next_jax.models.peft_io).

A local HF model directory (config.json, model.safetensors or a sharded index, tokenizer files) loads through
`load_model`, exactly as a real Qwen2.5 checkpoint would. Torch stores Linear weights [out, in]; ours are
[in, out] and stacked over layers. Safetensors are read with a small memory-mapped reader (dtype via
ml_dtypes, so bf16 needs no torch) and written the same way. No pickle is ever loaded.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np

from next_jax.core import outdir
from next_jax.core.outdir import CheckpointError
from next_jax.models.policy import LoraConfig, ModelConfig, Params, merge_lora

SUPPORTED = ("qwen2", "llama")
_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
              "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
              "BOOL": np.bool_}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}
HF_MODULE = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
              "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
_HF_NORM = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"}
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


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
  if model_dir.is_file() and model_dir.suffix.lower() == ".gguf":
    raise CheckpointError(f"{model_dir}: is a GGUF file, not a Hugging Face model directory; convert it once "
                          f"with `next-jax-convert --model={model_dir}` and pass the directory it "
                          "prints")
  if model_dir.is_file():
    raise CheckpointError(f"{model_dir}: is a file, not a Hugging Face model directory (config.json, "
                          "model.safetensors, tokenizer files)")
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


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  """HF tensor name → torch-layout shape, for every tensor the checkpoint must hold."""
  d = cfg.hidden_size
  shapes = {"model.embed_tokens.weight": (cfg.vocab_size, d), "model.norm.weight": (d,)}
  if not cfg.tie_embeddings:
    shapes["lm_head.weight"] = (cfg.vocab_size, d)
  for i in range(cfg.num_layers):
    pre = f"model.layers.{i}."
    for ours, theirs in _HF_NORM.items():
      shapes[f"{pre}{theirs}.weight"] = (d,)
    for name, theirs in HF_MODULE.items():
      n_in, n_out = cfg.module_shape(name)
      shapes[f"{pre}{theirs}.weight"] = (n_out, n_in)
      if cfg.qkv_bias and name in ("q", "k", "v"):
        shapes[f"{pre}{theirs}.bias"] = (n_out,)
  return shapes


def check_tensors(tensors: dict[str, np.ndarray], cfg: ModelConfig, where: str) -> None:
  expected = expected_shapes(cfg)
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


def check_finite(tensors: dict[str, np.ndarray], where: str) -> None:
  """Refuse a checkpoint with NaN or Inf anywhere, naming the tensor and how many values are bad."""
  for name in sorted(tensors):
    a = np.asarray(tensors[name])
    if a.dtype.kind == "f" or a.dtype == ml_dtypes.bfloat16:
      bad = int(a.size - np.count_nonzero(np.isfinite(a.astype(np.float32, copy=False))))
      if bad:
        raise CheckpointError(f"{where}: tensor {name} has {bad} non-finite value(s) (NaN/Inf) of {a.size}; "
                              "a diverged or corrupt checkpoint cannot be read as weights")


def params_from_hf(tensors: dict[str, np.ndarray], cfg: ModelConfig, where: str = "checkpoint") -> Params:
  """HF state dict (numpy, torch layout) → our params as host numpy arrays in cfg.dtype."""
  check_tensors(tensors, cfg, where)
  dt = np.dtype(cfg.jnp_dtype)
  cast = lambda a: np.asarray(a).astype(dt)  # noqa: E731
  layer = lambda i, n: tensors[f"model.layers.{i}.{n}"]  # noqa: E731
  rng = range(cfg.num_layers)
  layers: Params = {ours: cast(np.stack([layer(i, f"{hf}.weight") for i in rng]))
                    for ours, hf in _HF_NORM.items()}
  for name, hf in HF_MODULE.items():
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
    for name, hf in HF_MODULE.items():
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
  tok = load_tokenizer(model_dir) if tokenizer else None
  if tok is not None and len(tok) > cfg.vocab_size:  # ids past the embedding would be clamped, not refused
    raise CheckpointError(f"{model_dir}: the tokenizer has {len(tok)} tokens but config.json's vocab_size is "
                          f"{cfg.vocab_size}: ids ≥ {cfg.vocab_size} have no embedding row")
  return cfg, _place(params, sharding), tok


TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def token_ids(tokenizer=None, source_dir: Path | None = None) -> dict[str, Any]:
  """bos/eos/pad ids for config.json and generation_config.json: the source checkpoint's (its
  generation_config.json, then its config.json), else the tokenizer's; absent ids are left out."""
  ids: dict[str, Any] = {}
  if source_dir is not None:
    for name in ("config.json", "generation_config.json"):  # the generation config wins, as in transformers
      f = Path(source_dir) / name
      if f.exists():
        ids.update({k: v for k, v in json.loads(f.read_text()).items() if k in TOKEN_IDS and v is not None})
  if tokenizer is not None:
    for k in TOKEN_IDS:
      if ids.get(k) is None and getattr(tokenizer, k, None) is not None:
        ids[k] = getattr(tokenizer, k)
  return ids


def save_model(out_dir: str | os.PathLike, cfg: ModelConfig, params: Params, tokenizer=None,
               lora: Params | None = None, lora_cfg: LoraConfig | None = None,
               source_dir: str | os.PathLike | None = None, overwrite: bool = False) -> Path:
  """Write an HF directory (config.json, generation_config.json, model.safetensors, tokenizer files) that
  `transformers.AutoModelForCausalLM.from_pretrained` loads and `generate` stops on; LoRA, if given, is
  merged first. The bos/eos/pad ids come from `source_dir` (the checkpoint the params were loaded from,
  whose generation_config.json is kept whole) or else the tokenizer (`token_ids`). An existing out_dir is
  replaced when next_jax wrote it (outdir.atomic_dir), or with overwrite=True."""

  if lora is not None:
    params = merge_lora(params, lora, lora_cfg)
  ids = token_ids(tokenizer, Path(source_dir) if source_dir is not None else None)
  generation = {}
  if source_dir is not None and (Path(source_dir) / "generation_config.json").exists():
    generation = json.loads((Path(source_dir) / "generation_config.json").read_text())

  def write(tmp: Path):
    (tmp / "config.json").write_text(json.dumps(config_to_hf(cfg, **ids), indent=2))
    if ids or generation:
      (tmp / "generation_config.json").write_text(json.dumps({**generation, **ids}, indent=2))
    write_safetensors(tmp / "model.safetensors", params_to_hf(params, cfg))
    if tokenizer is not None:
      tokenizer.save_pretrained(str(tmp))

  return outdir.atomic_dir(Path(out_dir), write, overwrite=overwrite, flag="overwrite=True")
