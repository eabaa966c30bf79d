"""Shared fixtures: tiny random HF checkpoints written by transformers itself, jitted forwards reused across
tests (so each shape compiles once per session), the RL loop's tiny model (`model`, from tiny_rl) and the
toy / chat model directories. Plain helpers that subprocess children also import live in tiny_rl.py
(the tiny RL setup) and figures.py (checks of saved plots).

torch/transformers are imported lazily inside the fixtures that need them, so test modules that never ask
for a torch reference do not pay for the import.
"""


from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # OpenBLAS threads thrash on 2 shared cores

import dataclasses
import functools
import gc
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from next_jax.models import hf, policy

# Parity with torch's fp32 matmuls: never let XLA pick a lower-precision algorithm.
jax.config.update("jax_default_matmul_precision", "highest")

# Tiny architectures (hidden 64, 2 layers, vocab 256). Each one varies what a loader bug could get wrong:
# GQA vs MHA, tied vs untied head, RoPE theta, RMSNorm eps (1e-2 is large against mean(x²) ≈ 0.04 of the
# std-0.2 embeddings, so a dropped eps shows), and for Llama: no biases and head_dim ≠ hidden / heads.
_BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             max_position_embeddings=256)
HF_SPECS: dict[str, tuple[str, dict[str, Any]]] = {
    "qwen_gqa_untied": ("qwen2", dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                                      rope_theta=10_000.0)),
    "qwen_gqa_tied": ("qwen2", dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                    rope_theta=100.0)),
    "qwen_mha_untied": ("qwen2", dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False,
                                      rope_theta=1_000_000.0)),
    "qwen_mha_tied": ("qwen2", dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True,
                                    rope_theta=10_000.0, rms_norm_eps=1e-2)),
    "llama": ("llama", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                            tie_word_embeddings=False, rope_theta=500.0, rms_norm_eps=1e-5,
                            attention_bias=False, mlp_bias=False)),
}
MAIN = "qwen_gqa_untied"  # the model every non-parity test (cache, LoRA, sampler) runs on
WEIGHT_STD = 0.2


@dataclasses.dataclass(frozen=True)
class HFModel:
  """A transformers-written fp32 HF directory and the torch model it was saved from (eval mode)."""

  name: str
  path: Path
  torch_model: Any


def reinit_torch_(model, seed: int, std: float = WEIGHT_STD) -> None:
  """Every parameter ~ N(0, std²), norm weights ~ 1 + N(0, std²): default inits (zero biases, unit norms,
  std-0.02 weights) would hide transposes, dropped biases and norm mix-ups behind near-uniform logits."""
  import torch  # noqa: PLC0415

  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():  # tied embeddings appear once
      noise = torch.randn(p.shape, generator=gen, dtype=torch.float32) * std
      p.copy_(noise + 1.0 if "norm" in name else noise)


def build_torch_model(kind: str, seed: int = 0, **overrides):
  import torch  # noqa: PLC0415
  import transformers  # noqa: PLC0415

  config_cls, model_cls = {"qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
                           "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM)}[kind]
  torch.manual_seed(seed)
  model = model_cls(config_cls(**{**_BASE, **overrides}))
  reinit_torch_(model, seed)
  return model.eval()


def load_torch_model(path):
  """A fresh torch model from an HF directory (transformers' own loader), fp32, eval mode."""
  import torch  # noqa: PLC0415
  import transformers  # noqa: PLC0415

  return transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def torch_logits(model, tokens, mask=None) -> np.ndarray:
  """fp32 logits of a torch causal LM; with a (left-padding) mask, position_ids = max(cumsum(mask)−1, 0)."""
  import torch  # noqa: PLC0415

  ids = torch.as_tensor(np.asarray(tokens), dtype=torch.long)
  kwargs = {}
  if mask is not None:
    m = torch.as_tensor(np.asarray(mask), dtype=torch.long)
    kwargs = {"attention_mask": m, "position_ids": torch.clamp(m.cumsum(-1) - 1, min=0)}
  with torch.no_grad():
    return model(input_ids=ids, **kwargs).logits.float().numpy()


# `make test` runs two workers that take whole files in collection order; the slowest files (≥ 1 min each,
# measured) go first, so the two workers end together instead of one finishing a long file alone.
SLOW_FIRST = ("test_real_experiments", "test_smollm2_preset", "test_state_machine", "test_kill_resume",
              "test_experiment", "test_posthoc", "test_reproduce", "test_grpo", "test_real_model", "test_trainer",
              "test_extrapolate", "test_notebook", "test_predictor_fit", "test_multiprocess", "test_sharding",
              "test_snr_study")


def pytest_collection_modifyitems(session, config, items):
  rank = {name: i for i, name in enumerate(SLOW_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))  # stable: each file keeps its order


@pytest.fixture(scope="module", autouse=True)
def _release_compiled_programs():
  """Drop JAX's compiled programs after every test module. XLA:CPU maps each executable's code into its own
  memory regions; one process that keeps the whole suite's programs passes the kernel's limit of 65,530
  maps (vm.max_map_count) and LLVM then fails with "Cannot allocate memory" or crashes. Shared jitted
  fixtures recompile in the next module that uses them."""
  yield
  jax.clear_caches()
  gc.collect()


@pytest.fixture(scope="session")
def hf_model(tmp_path_factory):
  """hf_model(name) → HFModel for a name in HF_SPECS; each is built and saved once per session."""

  @functools.cache
  def get(name: str) -> HFModel:
    kind, overrides = HF_SPECS[name]
    model = build_torch_model(kind, seed=sorted(HF_SPECS).index(name), **overrides)
    path = tmp_path_factory.mktemp(name)
    model.save_pretrained(str(path))  # safetensors
    return HFModel(name, path, model)

  return get


@pytest.fixture(scope="session")
def main_model(hf_model):
  """(cfg, params) of the main tiny Qwen2 (GQA, untied), loaded through `hf.load_model` in fp32."""
  cfg, params, _ = hf.load_model(hf_model(MAIN).path, tokenizer=False)
  return cfg, params


@pytest.fixture(scope="session")
def fwd():
  """Jitted `policy.forward` → (logits, cache); shared so each (cfg, shapes) compiles once per session."""

  @functools.partial(jax.jit, static_argnames=("cfg", "lora_cfg"))
  def f(params, tokens, cfg, mask=None, positions=None, lora=None, lora_cfg=None, cache=None):
    return policy.forward(params, tokens, cfg, mask=mask, positions=positions, lora=lora, lora_cfg=lora_cfg,
                          cache=cache)

  return f


@pytest.fixture(scope="session")
def padded_batch():
  """tokens int32[3, 12] (vocab 256) and a left-padding mask: rows have 12, 9 and 4 real tokens."""
  rng = np.random.default_rng(1234)
  tokens = rng.integers(0, 256, size=(3, 12)).astype(np.int32)
  lengths = np.array([12, 9, 4])
  mask = np.arange(12)[None, :] >= (12 - lengths)[:, None]
  tokens = np.where(mask, tokens, 0).astype(np.int32)
  return tokens, mask


def make_random_lora(cfg: policy.ModelConfig, lcfg: policy.LoraConfig, seed: int = 0, b_std: float = 0.1):
  """A LoRA with `init_lora`'s A distribution (U(±1/√in)) and B ~ N(0, b_std²) instead of zeros, so the
  adapter changes the model. numpy-drawn: eager jax.random would compile a kernel per shape."""
  rng = np.random.default_rng(seed)
  out = {}
  for name in lcfg.targets:
    n_in, n_out = cfg.module_shape(name)
    bound = 1.0 / np.sqrt(n_in)
    a = rng.uniform(-bound, bound, (cfg.num_layers, lcfg.rank, n_in))
    b = rng.normal(0, b_std, (cfg.num_layers, n_out, lcfg.rank))
    out[name] = {"a": jnp.asarray(a, cfg.jnp_dtype), "b": jnp.asarray(b, cfg.jnp_dtype)}
  return out


@pytest.fixture(scope="session")
def random_lora():
  """make_random_lora(cfg, lcfg, seed=0, b_std=0.1): a LoRA whose B is non-zero."""
  return make_random_lora


@pytest.fixture(scope="module")
def model():
  """(base params, LoRA) of tiny_rl's one-layer model (tiny_rl.init_model): the RL loop's test model."""
  import tiny_rl

  return tiny_rl.init_model()


@pytest.fixture(scope="session")
def toy_model_dir(tmp_path_factory):
  """A tiny random Qwen2 with the arithmetic task's character tokenizer (toy configs run on it in seconds)."""
  from next_jax.models import toy  # noqa: PLC0415

  d = tmp_path_factory.mktemp("charmodel") / "model"
  cfg = policy.ModelConfig(vocab_size=17, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                           num_kv_heads=2, rope_theta=10000.0)
  toy.make_random_model_dir(d, cfg, tokenizer=False)
  toy.build_char_tokenizer("0123456789+-*=", out_dir=d)
  return d


@pytest.fixture(scope="module")
def first_char_reward():
  """For the module: every verifier `experiment.build` looks up scores 1 when the response starts with the
  answer's first character, else 0. With exact match the random toy model never scores, so its advantages,
  its LoRA's motion, every Δ, drift measure and agreement of a quick experiment are exactly 0, and checks
  on them hold whatever the code computes; this reward gives it ~5% accuracy and real gradients."""
  from next_jax.rl import rewards

  def first_char(response: str, answer: str) -> float:
    return float(response[:1] == str(answer)[:1])

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(rewards, "get_reward", lambda name: first_char)
    yield first_char


@pytest.fixture(scope="module")
def frozen_heap():
  """A full gc pass over the suite's heap (JAX, torch) is one C call no signal interrupts, and it can take
  over a second; freezing the objects that exist now keeps collections during timed calls small (the
  reward verifiers' deadline tests use it)."""
  gc.collect()
  gc.freeze()
  yield
  gc.unfreeze()


@pytest.fixture(scope="session")
def chat_model_dir(tmp_path_factory):
  """A tiny random Llama with the byte-level BPE chat tokenizer: stands in for SmolLM2 in quick runs."""
  from next_jax.models import toy  # noqa: PLC0415

  d = tmp_path_factory.mktemp("chatmodel") / "model"
  cfg = policy.ModelConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                           num_kv_heads=1, rope_theta=10000.0, qkv_bias=False, tie_embeddings=True)
  toy.make_random_model_dir(d, cfg)
  return d
