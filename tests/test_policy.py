"""next_jax.models.policy: parity with transformers' PyTorch Qwen2/Llama, KV cache, LoRA, paper-scale shapes."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import HF_SPECS, MAIN, torch_logits

from next_jax.models import hf, policy

PARITY_ATOL = 1e-4  # fp32, std-0.2 weights: logits are O(1)-O(6), observed max error ~1e-5
# Two fp32 evaluation orders of one function (x·W + s·(x·Aᵀ)·Bᵀ vs x·(W + s·(B·A)ᵀ), or a row with and
# without padding columns) differ by up to ~1.7e-5 on these chaotic std-0.2 weights (logits up to ~7; torch
# vs us: ~1.4e-5). That is the fp32 noise floor of this model, far below the effect of any real bug (a LoRA
# adapter moves logits by > 0.1).
FP32_NOISE = {"atol": 3e-5, "rtol": 0}


# ------------------------------------------------------------------------------ parity with torch


@pytest.mark.parametrize("name", sorted(HF_SPECS))
def test_forward_matches_torch_without_padding(name, hf_model, fwd, padded_batch):
  model = hf_model(name)
  cfg, params, _ = hf.load_model(model.path, tokenizer=False)
  tokens, mask = padded_batch
  ours, _ = fwd(params, tokens, cfg, mask=np.ones_like(mask))  # same compiled program as the padded test
  theirs = torch_logits(model.torch_model, tokens)
  np.testing.assert_allclose(np.asarray(ours), theirs, atol=PARITY_ATOL, rtol=0)


@pytest.mark.parametrize("name", sorted(HF_SPECS))
def test_forward_matches_torch_with_left_padding(name, hf_model, fwd, padded_batch):
  model = hf_model(name)
  cfg, params, _ = hf.load_model(model.path, tokenizer=False)
  tokens, mask = padded_batch
  ours, _ = fwd(params, tokens, cfg, mask=mask)
  theirs = torch_logits(model.torch_model, tokens, mask)
  np.testing.assert_allclose(np.asarray(ours)[mask], theirs[mask], atol=PARITY_ATOL, rtol=0)


def test_left_padding_leaves_real_positions_unchanged(main_model, fwd, padded_batch):
  """Row 2 left-padded by 8 gives the logits of its 4 real tokens run alone (pads are invisible)."""
  cfg, params = main_model
  tokens, mask = padded_batch
  padded, _ = fwd(params, tokens, cfg, mask=mask)
  alone, _ = fwd(params, tokens[2:3, 8:], cfg)
  np.testing.assert_allclose(np.asarray(padded)[2, 8:], np.asarray(alone)[0], **FP32_NOISE)


def test_bf16_load_gives_bfloat16_params(hf_model):
  cfg, params, _ = hf.load_model(hf_model(MAIN).path, dtype="bfloat16", tokenizer=False)
  assert cfg.dtype == "bfloat16"
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}


def test_bf16_logits_close_to_fp32(hf_model, main_model, fwd, padded_batch):
  """bf16 keeps ~3 significant digits: the mean error is ~2% of the mean |logit| here; a wrong transpose,
  norm or mask in the bf16 path gives errors of the order of the logits themselves."""
  tokens, mask = padded_batch
  cfg32, p32 = main_model
  cfg16, p16, _ = hf.load_model(hf_model(MAIN).path, dtype="bfloat16", tokenizer=False)
  l32 = np.asarray(fwd(p32, tokens, cfg32, mask=mask)[0])[mask]
  l16 = np.asarray(fwd(p16, tokens, cfg16, mask=mask)[0])[mask]
  assert l16.dtype == np.float32  # logits are accumulated in fp32 whatever the param dtype
  err = np.abs(l16 - l32).mean()
  assert 0 < err < 0.05 * np.abs(l32).mean()
  assert (l16.argmax(-1) == l32.argmax(-1)).mean() >= 0.9


def test_remat_forward_equals_plain_forward(main_model, fwd, padded_batch):
  cfg, params = main_model
  tokens, mask = padded_batch
  plain, _ = fwd(params, tokens, cfg, mask=mask)
  remat, _ = fwd(params, tokens, dataclasses.replace(cfg, remat=True), mask=mask)
  np.testing.assert_allclose(np.asarray(remat), np.asarray(plain), atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------- small pieces


def test_positions_from_mask_count_from_first_real_token():
  mask = jnp.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]], bool)
  np.testing.assert_array_equal(policy.positions_from_mask(mask), [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4],
                                                                   [0, 0, 0, 0, 0]])


def test_rms_norm_matches_formula():
  x = jnp.array([[1.0, -2.0, 3.0, 0.5]])
  w = jnp.array([1.0, 2.0, 0.5, -1.0])
  expected = np.asarray(w) * np.asarray(x) / np.sqrt(np.mean(np.asarray(x) ** 2) + 0.1)
  np.testing.assert_allclose(policy.rms_norm(x, w, 0.1), expected, rtol=1e-6)


def test_rope_rotates_pairs_by_position_times_frequency():
  """hd=4: pairs (x0, x2) and (x1, x3) rotate by pos·θ^0 and pos·θ^(−1/2) (HF rotate_half layout)."""
  x = jnp.array([1.0, 2.0, 3.0, 4.0]).reshape(1, 1, 1, 4)
  pos, theta = 3, 100.0
  out = np.asarray(policy.rope(x, jnp.array([[pos]]), theta)).ravel()
  a0, a1 = pos * 1.0, pos * theta ** -0.5
  expected = [1 * math.cos(a0) - 3 * math.sin(a0), 2 * math.cos(a1) - 4 * math.sin(a1),
              3 * math.cos(a0) + 1 * math.sin(a0), 4 * math.cos(a1) + 2 * math.sin(a1)]
  np.testing.assert_allclose(out, expected, rtol=1e-5)


def test_token_logprobs_are_log_softmax_at_targets():
  logits = jnp.array([[[0.0, 1.0, 2.0], [3.0, 0.0, -1.0]]])
  out = policy.token_logprobs(logits, jnp.array([[2, 1]]))
  expected = [2.0 - np.log(1 + np.e + np.e ** 2), 0.0 - np.log(np.e ** 3 + 1 + np.e ** -1)]
  np.testing.assert_allclose(out[0], expected, rtol=1e-6)


def test_forward_with_cache_requires_positions(main_model):
  cfg, params = main_model
  with pytest.raises(ValueError, match="positions"):
    policy.forward(params, jnp.zeros((1, 2), jnp.int32), cfg, cache=policy.init_cache(cfg, 1, 4))


def test_model_config_rejects_indivisible_kv_heads():
  with pytest.raises(ValueError, match="num_kv_heads=3"):
    policy.ModelConfig(256, 64, 128, 2, num_heads=4, num_kv_heads=3)


# ------------------------------------------------------------------------------------------ KV cache


def test_kv_cache_prefill_then_decode_matches_full_forward(main_model, fwd, padded_batch):
  """Prefill 5 left-padded columns, then feed the remaining 7 one at a time: every step's logits equal the
  full (cache-free) forward at that position."""
  cfg, params = main_model
  tokens, mask = padded_batch  # row 2's first real token is column 8: its prefill is all padding
  full, _ = fwd(params, tokens, cfg, mask=mask)
  positions = policy.positions_from_mask(jnp.asarray(mask))
  p = 5
  cache = policy.init_cache(cfg, tokens.shape[0], tokens.shape[1])
  logits, cache = fwd(params, tokens[:, :p], cfg, mask=mask[:, :p], positions=positions[:, :p], cache=cache)
  steps = [logits]
  for t in range(p, tokens.shape[1]):
    col = slice(t, t + 1)
    logits, cache = fwd(params, tokens[:, col], cfg, mask=mask[:, col], positions=positions[:, col],
                        cache=cache)
    steps.append(logits)
  assert int(cache.index) == tokens.shape[1]
  cached = np.concatenate([np.asarray(s) for s in steps], axis=1)
  np.testing.assert_allclose(cached[mask], np.asarray(full)[mask], atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------- LoRA

LORA_CASES = {
    "all": policy.LoraConfig(rank=4, alpha=8.0),
    "subset": policy.LoraConfig(rank=2, alpha=5.0, targets=("q", "v", "down")),
    "rslora": policy.LoraConfig(rank=4, alpha=3.0, targets=("k", "o", "gate", "up"), rslora=True),
}


@pytest.mark.parametrize("case", sorted(LORA_CASES))
def test_lora_forward_equals_merged_forward(case, main_model, fwd, padded_batch, random_lora):
  cfg, params = main_model
  lcfg = LORA_CASES[case]
  lora = random_lora(cfg, lcfg)
  tokens, mask = padded_batch
  with_lora, _ = fwd(params, tokens, cfg, mask=mask, lora=lora, lora_cfg=lcfg)
  merged, _ = fwd(policy.merge_lora(params, lora, lcfg), tokens, cfg, mask=mask)
  base, _ = fwd(params, tokens, cfg, mask=mask)
  assert np.abs(np.asarray(with_lora) - np.asarray(base))[mask].max() > 0.1  # the adapter matters
  np.testing.assert_allclose(np.asarray(with_lora)[mask], np.asarray(merged)[mask], **FP32_NOISE)


# One compile for every init_lora test (eager jax.random compiles a kernel per shape: ~2 s).
_init_lora = jax.jit(policy.init_lora, static_argnums=(0, 1))


def test_lora_with_zero_b_equals_base(main_model, fwd, padded_batch):
  cfg, params = main_model
  lcfg = LORA_CASES["all"]
  lora = _init_lora(cfg, lcfg, jax.random.key(0))
  tokens, mask = padded_batch
  with_lora, _ = fwd(params, tokens, cfg, mask=mask, lora=lora, lora_cfg=lcfg)
  base, _ = fwd(params, tokens, cfg, mask=mask)
  np.testing.assert_allclose(np.asarray(with_lora), np.asarray(base), atol=1e-6, rtol=0)


def test_merge_lora_adds_scaled_b_times_a_transposed(main_model, random_lora):
  """Our kernels are [in, out]: merged = W + s·(B·A)ᵀ, checked on one layer with numpy."""
  cfg, params = main_model
  lcfg = policy.LoraConfig(rank=3, alpha=9.0, targets=("o",))
  lora = random_lora(cfg, lcfg)
  merged = policy.merge_lora(params, lora, lcfg)
  a, b = np.asarray(lora["o"]["a"][1]), np.asarray(lora["o"]["b"][1])
  expected = np.asarray(params["layers"]["o"]["kernel"][1]) + 3.0 * (b @ a).T
  np.testing.assert_allclose(merged["layers"]["o"]["kernel"][1], expected, atol=1e-6, rtol=0)
  np.testing.assert_array_equal(merged["layers"]["q"]["kernel"], params["layers"]["q"]["kernel"])


def test_init_lora_a_is_uniform_within_fan_in_bound(main_model):
  """PEFT's Kaiming-uniform(a=√5) on A [r, in] is U(±1/√in): max |A| reaches the bound, mean |A| = bound/2.
  gate (in 64, out 128) and down (in 128, out 64) tell fan-in from fan-out."""
  cfg, _ = main_model
  lcfg = LORA_CASES["all"]
  lora = _init_lora(cfg, lcfg, jax.random.key(3))
  for name in policy.ALL_MODULES:
    n_in, _ = cfg.module_shape(name)
    a = np.abs(np.asarray(lora[name]["a"]))
    bound = 1.0 / math.sqrt(n_in)
    assert a.shape == (cfg.num_layers, lcfg.rank, n_in)
    assert 0.95 * bound < a.max() <= bound, name
    assert abs(a.mean() - bound / 2) < 0.05 * bound, name


def test_init_lora_b_is_zero(main_model):
  cfg, _ = main_model
  lcfg = LORA_CASES["all"]
  lora = _init_lora(cfg, lcfg, jax.random.key(3))
  for name in policy.ALL_MODULES:
    _, n_out = cfg.module_shape(name)
    b = np.asarray(lora[name]["b"])
    assert b.shape == (cfg.num_layers, n_out, lcfg.rank)
    assert not b.any(), name


def test_init_lora_layers_get_different_a(main_model):
  cfg, _ = main_model
  a = np.asarray(_init_lora(cfg, LORA_CASES["all"], jax.random.key(3))["q"]["a"])
  assert not np.allclose(a[0], a[1])


def test_lora_scale_is_alpha_over_rank_or_sqrt_rank_for_rslora():
  assert policy.LoraConfig(rank=16, alpha=32.0).scale == 2.0
  assert policy.LoraConfig(rank=16, alpha=32.0, rslora=True).scale == 8.0


def test_lora_config_rejects_unknown_target():
  with pytest.raises(ValueError, match="q_proj"):
    policy.LoraConfig(targets=("q_proj",))


# ------------------------------------------------------------------------------------ paper shapes

# Exact totals of the released Qwen2.5-*-Instruct safetensors (the Hub shows 1.54B/3.09B/7.62B/14.8B).
# The model cards print 1.54B/3.09B/7.61B/14.7B total and 1.31B/2.77B/6.53B/13.1B non-embedding: rounded or
# truncated, and the 14B non-embedding figure is 0.9% off its own total minus embeddings (14.77 − 1.56 =
# 13.21), so the card figures are checked to 1%.
QWEN25_TOTALS = {"1.5B": 1_543_714_304, "3B": 3_085_938_688, "7B": 7_615_616_512, "14B": 14_770_033_664}
QWEN25_CARDS = {"1.5B": (1.54e9, 1.31e9), "3B": (3.09e9, 2.77e9), "7B": (7.61e9, 6.53e9),
                "14B": (14.7e9, 13.1e9)}


def _abstract_params(size):
  return jax.eval_shape(lambda: policy.init_params(policy.QWEN25[size], jax.random.key(0)))


def _formula_count(cfg: policy.ModelConfig) -> int:
  d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
  q, kv = cfg.num_heads * hd, cfg.num_kv_heads * hd
  attn = d * q + q + 2 * (d * kv + kv) + q * d  # q, k, v with bias; o without
  layer = attn + 3 * d * f + 2 * d
  return cfg.num_layers * layer + cfg.vocab_size * d * (1 if cfg.tie_embeddings else 2) + d


@pytest.mark.parametrize("size", sorted(QWEN25_TOTALS))
def test_qwen25_param_count_matches_release(size):
  cfg = policy.QWEN25[size]
  n = policy.count_params(_abstract_params(size))
  assert n == _formula_count(cfg) == QWEN25_TOTALS[size]


@pytest.mark.parametrize("size", sorted(QWEN25_TOTALS))
def test_qwen25_param_count_matches_model_card(size):
  cfg = policy.QWEN25[size]
  total = policy.count_params(_abstract_params(size))
  non_embedding = total - cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_embeddings else 2)
  card_total, card_non_embedding = QWEN25_CARDS[size]
  assert abs(total / card_total - 1) < 0.01
  assert abs(non_embedding / card_non_embedding - 1) < 0.01


def test_qwen25_abstract_params_are_bf16_with_stacked_layers():
  shapes = _abstract_params("7B")
  assert shapes["layers"]["q"]["kernel"].shape == (28, 3584, 3584)
  assert shapes["layers"]["k"]["kernel"].shape == (28, 3584, 512)
  assert shapes["layers"]["down"]["kernel"].shape == (28, 18944, 3584)
  assert shapes["lm_head"].shape == (3584, 152064)
  assert "lm_head" not in _abstract_params("1.5B")
  assert {x.dtype for x in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.bfloat16)}


def test_qwen25_7b_lora_r64_all_modules_count():
  """r·(in + out) per module and layer: 161,480,704 (what PEFT reports for Qwen2.5-7B, r=64, all linear)."""
  cfg = policy.QWEN25["7B"]
  lcfg = policy.LoraConfig(rank=64, alpha=128.0)
  n = policy.count_params(jax.eval_shape(lambda: policy.init_lora(cfg, lcfg, jax.random.key(0))))
  formula = 64 * cfg.num_layers * sum(sum(cfg.module_shape(m)) for m in policy.ALL_MODULES)
  assert n == formula == 161_480_704
