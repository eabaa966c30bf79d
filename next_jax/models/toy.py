"""Tiny local stand-ins for a real checkpoint: a byte-level BPE tokenizer with a Qwen-style chat template,
a character-level Qwen2 tokenizer for the toy tasks, and random Qwen2 HF directories. Nothing is downloaded;
everything loads through `hf.load_model`, the path a real Qwen2.5 directory takes.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import jax
import jax.numpy as jnp

from next_jax.models import hf
from next_jax.models.policy import ModelConfig, init_params

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
DEFAULT_CORPUS = tuple(
    f"Question: what is {a}+{b}*{c}? Let me think. {b}*{c}={b * c}, {a}+{b * c}={a + b * c}. "
    f"The answer is \\boxed{{{a + b * c}}}."
    for a in range(0, 100, 7) for b in range(0, 100, 11) for c in range(10))


def build_tokenizer(corpus: Iterable[str] = DEFAULT_CORPUS, vocab_size: int = 512,
                    out_dir: str | os.PathLike | None = None):
  """Train a byte-level BPE on `corpus` → a transformers fast tokenizer (saved to out_dir if given).

  eos = <|im_end|>, pad = <|endoftext|>; the chat template is Qwen's ChatML shape."""
  import tokenizers  # noqa: PLC0415
  import transformers  # noqa: PLC0415

  bpe = tokenizers.ByteLevelBPETokenizer()
  bpe.train_from_iterator(list(corpus), vocab_size=vocab_size, min_frequency=1,
                          special_tokens=list(SPECIAL_TOKENS))
  tok = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|im_end|>",
                                             pad_token="<|endoftext|>")
  tok.chat_template = CHAT_TEMPLATE
  if out_dir is not None:
    tok.save_pretrained(str(out_dir))
  return tok


def byte_to_unicode() -> dict[int, str]:
  """GPT-2 / Qwen byte-level alphabet: printable Latin-1 bytes map to themselves, the other 68 bytes to
  chr(256 + k) in byte order (space → 'Ġ', newline → 'Ċ')."""
  keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
  extra = iter(range(256, 512))
  return {b: chr(b) if b in keep else chr(next(extra)) for b in range(256)}


def build_char_tokenizer(alphabet: Iterable[str], out_dir: str | os.PathLike | None = None):
  """A character-level `transformers.Qwen2Tokenizer` (byte-level BPE, no merges) → saved to out_dir if given.

  vocab: the alphabet's characters in order (ids 0 … n−1, duplicates dropped), then SPECIAL_TOKENS
  <|endoftext|> (n, pad), <|im_start|> (n+1), <|im_end|> (n+2, eos). Every character must be one byte
  (its vocab entry is the byte-level symbol: ' ' → 'Ġ'), so each character is exactly one token. Saved
  files load through `AutoTokenizer` as a real Qwen2.5's do (tokenizer_class Qwen2Tokenizer, same
  pre-tokenizer and decoder). Characters outside the alphabet are silently dropped by the encoder (no unk
  token, no byte fallback). No chat template: toy prompts are raw (format_prompt(raw=True)).
  """
  import transformers  # noqa: PLC0415

  chars = list(dict.fromkeys(alphabet))
  bad = [c for c in chars if len(c) != 1 or len(c.encode("utf-8")) != 1]
  if bad or not chars:
    raise ValueError(f"build_char_tokenizer: alphabet needs single-byte characters, got {bad or 'none'}")
  symbol = byte_to_unicode()
  vocab = {symbol[ord(c)]: i for i, c in enumerate(chars)}
  vocab.update({t: len(chars) + i for i, t in enumerate(SPECIAL_TOKENS)})
  tok = transformers.Qwen2Tokenizer(vocab=vocab, merges=[], unk_token=None, eos_token="<|im_end|>",
                                    pad_token="<|endoftext|>", extra_special_tokens=["<|im_start|>"])
  got = {c: tok.encode(c, add_special_tokens=False) for c in chars}
  wrong = {c: ids for i, (c, ids) in enumerate(got.items()) if ids != [i]}
  if wrong or len(tok) != len(vocab):
    raise ValueError(f"build_char_tokenizer: characters not one token each: {wrong} (size {len(tok)})")
  if out_dir is not None:
    tok.save_pretrained(str(out_dir))
  return tok


def make_random_model_dir(out_dir: str | os.PathLike, cfg: ModelConfig, seed: int = 0,
                          weight_scale: float = 1.0, tokenizer: bool = True) -> Path:
  """A random Qwen2/Llama HF directory (config.json, model.safetensors, tokenizer files).

  With a tokenizer, cfg.vocab_size must be ≥ the tokenizer's size (extra rows are never produced by it).
  weight_scale multiplies every Linear kernel (norms stay 1): > 1 makes logits far from uniform.
  """
  params = init_params(cfg, jax.random.key(seed))
  params["layers"] = {k: ({**v, "kernel": v["kernel"] * weight_scale} if isinstance(v, dict) else v)
                      for k, v in params["layers"].items()}
  tok = None
  if tokenizer:
    tok = build_tokenizer()
    if len(tok) > cfg.vocab_size:
      raise ValueError(f"vocab_size={cfg.vocab_size} < tokenizer size {len(tok)}")
  out = hf.save_model(out_dir, cfg, jax.tree.map(jnp.asarray, params), tokenizer=tok)
  return out
