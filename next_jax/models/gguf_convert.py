"""GGUF (llama.cpp's single-file format) → a normal Hugging Face directory, written once, atomically.

Everything downstream (our loader, transformers, PEFT export) then reads the same standard files:

    config.json             LlamaForCausalLM, from the `llama.*` metadata (+ bos/eos/pad ids)
    generation_config.json  bos/eos/pad ids, so transformers' `generate` stops where ours does
    model.safetensors       every tensor dequantized to fp32, in transformers' names and [out, in] layout
    tokenizer.json, tokenizer_config.json   byte-level BPE from `tokenizer.ggml.*`, with the chat template
    source.json             the GGUF file's name, size and sha256 (what the cache is keyed on)

Weights: F32/F16/BF16 are read as they are; Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 are dequantized by the `gguf`
package (llama.cpp's own numpy reference). llama.cpp's converter interleaves the two RoPE halves of every
q and k head ("permute"); we undo it exactly as transformers' GGUF loader does:

    W_hf = W_gguf.reshape(H, hd/2, 2, in).swapaxes(1, 2).reshape(H·hd, in)     (H = heads of that matrix)

Tokenizer: the vocabulary and merges as the file spells them (tokens outside the byte alphabet respelled
byte by byte), control tokens (type 3) special, user-defined tokens (type 4) added whole: what transformers
builds from the same file. Only `tokenizer.ggml.model = gpt2` (byte-level BPE) and pre-tokenizers that
keep GPT-2's split (e.g. `smollm`) are converted; anything else is refused rather than guessed.

Every error names the file and the metadata field or tensor, and leaves no directory behind.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from next_jax.core import outdir
from next_jax.models.hf import (
  CheckpointError,
  check_tensors,
  config_from_hf,
  write_safetensors,
)
from next_jax.models.toy import byte_to_unicode

CONVERTER_VERSION = 1
ARCHITECTURES = ("llama",)
WEIGHT_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")
PRE_TOKENIZERS = ("default", "gpt2", "smollm")  # byte-level BPE with GPT-2's split regex
_LAYER = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
          "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
          "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
          "ffn_down": "mlp.down_proj"}
_GLOBAL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_CONTROL, _USER_DEFINED = 3, 4


class GGUFError(CheckpointError):
  """A GGUF file that cannot be converted; the message names the file and the field or tensor."""


# ------------------------------------------------------------------------------------------- reading


def _reader(path: Path):
  try:
    import gguf  # noqa: PLC0415 - the `real` extra
  except ImportError as e:
    raise GGUFError(f"{path}: reading GGUF needs the `gguf` package (pip install -e '.[real]')") from e
  try:
    return gguf.GGUFReader(str(path))
  except Exception as e:  # noqa: BLE001 - numpy memmap/struct errors of a truncated or foreign file
    raise GGUFError(f"{path}: not a readable GGUF file, truncated or corrupt ({type(e).__name__}: {e})") from e


def metadata(reader, path: Path) -> dict[str, Any]:
  """{key: value} of every metadata field (strings decoded, arrays as lists)."""
  out = {}
  for key, field in reader.fields.items():
    try:
      out[key] = field.contents()
    except Exception as e:  # noqa: BLE001
      raise GGUFError(f"{path}: metadata field {key!r} cannot be read ({e})") from e
  return out


def _need(meta: dict, key: str, path: Path, kind: type | tuple = (int, float)):
  if key not in meta:
    raise GGUFError(f"{path}: metadata field {key!r} is missing")
  value = meta[key]
  if not isinstance(value, kind) or isinstance(value, bool):
    raise GGUFError(f"{path}: metadata field {key!r} = {value!r} has the wrong type")
  return value


def hf_config(meta: dict, path: Path) -> dict[str, Any]:
  """config.json of the LlamaForCausalLM the `llama.*` metadata describes."""
  arch = meta.get("general.architecture")
  if arch not in ARCHITECTURES:
    raise GGUFError(f"{path}: metadata field 'general.architecture' = {arch!r} is not supported "
                    f"(next_jax converts {ARCHITECTURES})")
  p = f"{arch}."
  for key in (f"{p}rope.scaling.type", f"{p}expert_count"):
    if meta.get(key) not in (None, "none", 0):
      raise GGUFError(f"{path}: metadata field {key!r} = {meta[key]!r} is not supported")
  heads = int(_need(meta, f"{p}attention.head_count", path, int))
  hidden = int(_need(meta, f"{p}embedding_length", path, int))
  head_dim = int(meta.get(f"{p}attention.key_length", hidden // heads))
  if int(meta.get(f"{p}rope.dimension_count", head_dim)) != head_dim:
    raise GGUFError(f"{path}: metadata field '{p}rope.dimension_count' = {meta[p + 'rope.dimension_count']} "
                    f"≠ head dim {head_dim}: partial RoPE is not supported")
  tokens = _need(meta, "tokenizer.ggml.tokens", path, list)
  ids = {k: meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "padding", "unknown")}
  for k, v in ids.items():
    if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < len(tokens)):
      raise GGUFError(f"{path}: metadata field 'tokenizer.ggml.{k}_token_id' = {v!r} is not a token id "
                      f"(the vocabulary has {len(tokens)} tokens)")
  return {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
          "vocab_size": int(meta.get(f"{p}vocab_size", len(tokens))), "hidden_size": hidden,
          "intermediate_size": int(_need(meta, f"{p}feed_forward_length", path, int)),
          "num_hidden_layers": int(_need(meta, f"{p}block_count", path, int)),
          "num_attention_heads": heads,
          "num_key_value_heads": int(meta.get(f"{p}attention.head_count_kv", heads)), "head_dim": head_dim,
          "hidden_act": "silu",
          "rms_norm_eps": float(_need(meta, f"{p}attention.layer_norm_rms_epsilon", path)),
          "rope_theta": float(meta.get(f"{p}rope.freq_base", 10000.0)),
          "max_position_embeddings": int(meta.get(f"{p}context_length", 2048)),
          "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": True,  # set from the tensors
          "bos_token_id": ids["bos"], "eos_token_id": ids["eos"], "pad_token_id": ids["padding"],
          "dtype": "float32"}


def unpermute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
  """Undo llama.cpp's q/k row permutation: [H, hd/2, 2, in] → [H, 2, hd/2, in] (rotate-half layout)."""
  return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_name(name: str, path: Path) -> tuple[str, str]:
  """GGUF tensor name → (HF name, GGUF module) or a GGUFError naming the tensor."""
  base, _, suffix = name.rpartition(".")
  parts = base.split(".")
  if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER:
    return f"model.layers.{parts[1]}.{_LAYER[parts[2]]}.{suffix}", parts[2]
  if base in _GLOBAL:
    return f"{_GLOBAL[base]}.{suffix}", base
  raise GGUFError(f"{path}: tensor {name!r} is not part of a llama model next_jax converts "
                  "(rope_freqs / biases / other architectures are not supported)")


def read_tensors(reader, config: dict, path: Path) -> dict[str, np.ndarray]:
  """Every tensor as fp32 in transformers' names and [out, in] layout, q/k rows un-permuted."""
  from gguf import quants  # noqa: PLC0415

  out = {}
  for t in reader.tensors:
    hf, module = _hf_name(t.name, path)
    kind = t.tensor_type.name
    if kind not in WEIGHT_TYPES:
      raise GGUFError(f"{path}: tensor {t.name!r} has type {kind}, which next_jax does not convert "
                      f"(supported: {', '.join(WEIGHT_TYPES)}); re-quantize the file to one of those")
    want = tuple(int(n) for n in reversed(t.shape))  # GGUF lists dims fastest-first
    try:
      w = np.asarray(quants.dequantize(t.data, t.tensor_type), np.float32).reshape(want)
    except Exception as e:  # noqa: BLE001 - a short data section
      raise GGUFError(f"{path}: tensor {t.name!r} ({kind}, shape {want}) cannot be read: truncated? ({e})") from e
    if module == "attn_q":
      w = unpermute_rope(w, config["num_attention_heads"])
    elif module == "attn_k":
      w = unpermute_rope(w, config["num_key_value_heads"])
    bad = int(w.size - np.count_nonzero(np.isfinite(w)))
    if bad:
      raise GGUFError(f"{path}: tensor {t.name!r} has {bad} non-finite value(s) (NaN/Inf) of {w.size}; a "
                      "model with them cannot be converted")
    out[hf] = np.ascontiguousarray(w)
  config["tie_word_embeddings"] = "lm_head.weight" not in out
  return out


# ----------------------------------------------------------------------------------------- tokenizer


def build_tokenizer(meta: dict, path: Path):
  """A transformers fast tokenizer for the file's byte-level BPE (+ chat template, special tokens)."""
  import tokenizers  # noqa: PLC0415
  import transformers  # noqa: PLC0415

  model, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre", "default")
  if model != "gpt2":
    raise GGUFError(f"{path}: metadata field 'tokenizer.ggml.model' = {model!r}; only 'gpt2' (byte-level BPE) "
                    "tokenizers are converted")
  if pre not in PRE_TOKENIZERS:
    raise GGUFError(f"{path}: metadata field 'tokenizer.ggml.pre' = {pre!r}; only {PRE_TOKENIZERS} (GPT-2's "
                    "split) are converted")
  tokens = _need(meta, "tokenizer.ggml.tokens", path, list)
  merges = [tuple(m.split(" ")) if isinstance(m, str) else () for m in _need(meta, "tokenizer.ggml.merges", path, list)]
  bad = next((i for i, m in enumerate(merges) if len(m) != 2 or not all(m)), None)
  if bad is not None:
    raise GGUFError(f"{path}: metadata field 'tokenizer.ggml.merges' entry {bad} = "
                    f"{meta['tokenizer.ggml.merges'][bad]!r} is not two tokens separated by one space")
  types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
  spell = byte_to_unicode()
  alphabet = set(spell.values())
  vocab = {t if set(t) <= alphabet else "".join(spell[b] for b in t.encode()): i for i, t in enumerate(tokens)}
  backend = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=merges, dropout=None,
                                                       continuing_subword_prefix="", end_of_word_suffix="",
                                                       fuse_unk=False))
  backend.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  backend.decoder = tokenizers.decoders.ByteLevel()
  special = {name: tokens[meta[f"tokenizer.ggml.{key}_token_id"]]
             for name, key in (("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"),
                               ("pad_token", "padding")) if f"tokenizer.ggml.{key}_token_id" in meta}
  tok = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, clean_up_tokenization_spaces=False,
                                             **special)
  control = [tokenizers.AddedToken(t, normalized=False, special=True)
             for t, k in zip(tokens, types) if k == _CONTROL and set(t) <= alphabet]
  if control:
    tok.add_special_tokens({"additional_special_tokens": control}, replace_extra_special_tokens=False)
  user = [tokenizers.AddedToken(t, normalized=False, special=False)
          for t, k in zip(tokens, types) if k == _USER_DEFINED and t in vocab]
  if user:
    tok.add_tokens(user)
  if "tokenizer.chat_template" in meta:
    tok.chat_template = meta["tokenizer.chat_template"]
  tok.add_bos_token = bool(meta.get("tokenizer.ggml.add_bos_token", False))
  return tok


# ------------------------------------------------------------------------------------------- convert


def file_sha256(path: Path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 22), b""):
      h.update(block)
  return h.hexdigest()


def _source(path: Path) -> dict[str, Any]:
  return {"gguf": path.name, "bytes": path.stat().st_size, "sha256": file_sha256(path),
          "converter_version": CONVERTER_VERSION}


def is_converted(out_dir: Path, source: dict[str, Any]) -> bool:
  try:
    return json.loads((out_dir / "source.json").read_text()) == source
  except (OSError, json.JSONDecodeError):
    return False


def default_cache() -> Path:
  """$NEXT_JAX_CACHE, else ~/.cache/next_jax: where converted models live."""
  return Path(os.environ.get("NEXT_JAX_CACHE") or Path.home() / ".cache" / "next_jax")


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike | None = None,
                 overwrite: bool = False) -> Path:
  """GGUF → HF directory (module docstring); returns the directory. A directory already converted from
  the same bytes (source.json: size + sha256) is reused; otherwise it is written to a temporary sibling
  and swapped into place (outdir.atomic_dir), so a failure or a kill leaves no half-written model. out_dir
  defaults to <default_cache()>/<stem>-<sha256[:12]>; an existing out_dir that next_jax did not write is
  refused (before any work) unless overwrite. The entry's lock is held while converting: a second process
  converting the same entry waits, then reuses the result."""
  path = Path(gguf_path)
  if not path.is_file():
    raise GGUFError(f"{path}: no such GGUF file")
  source = _source(path)
  cached = out_dir is None
  out = default_cache() / f"{path.stem}-{source['sha256'][:12]}" if cached else Path(out_dir)
  if is_converted(out, source):
    return out
  check = {"inputs": [path], "overwrite": overwrite or cached, "flag": "--overwrite", "name": "--out"}
  outdir.check_out(out, **check)
  out.parent.mkdir(parents=True, exist_ok=True)
  with outdir.lock(outdir.lock_path(out), str(out), wait=True):
    outdir.recover(out)  # what a conversion killed while replacing the entry left
    if is_converted(out, source):
      return out
    return _convert(path, out, source, check)


def _convert(path: Path, out: Path, source: dict[str, Any], check: dict[str, Any]) -> Path:
  """Read, check and write (atomically) one conversion; convert_gguf decides whether it is needed."""
  reader = _reader(path)
  outdir.check_writable(out, str(out), need_bytes=4 * sum(int(t.n_elements) for t in reader.tensors))
  meta = metadata(reader, path)
  config = hf_config(meta, path)
  tensors = read_tensors(reader, config, path)  # also sets tie_word_embeddings
  try:  # every tensor the config implies, of the right shape, before anything is written
    check_tensors(tensors, config_from_hf(config, str(path)), str(path))
  except CheckpointError as e:
    raise GGUFError(str(e)) from e
  n_tok = len(meta["tokenizer.ggml.tokens"])
  if n_tok > config["vocab_size"]:  # check_tensors made the embedding vocab_size rows
    raise GGUFError(f"{path}: the tokenizer has {n_tok} tokens but the embedding has {config['vocab_size']} "
                    "rows: ids past it have no embedding")
  tok = build_tokenizer(meta, path)
  generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config[k] is not None}

  def write(tmp: Path):
    write_safetensors(tmp / "model.safetensors", tensors)
    tok.save_pretrained(str(tmp))
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2))
    (tmp / "source.json").write_text(json.dumps(source, indent=2))

  return outdir.atomic_dir(out, write, **check)
