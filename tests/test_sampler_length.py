"""next_jax.models.sampler at long lengths: decode segments whose attention window grows in buckets and compaction of
finished rows change no token. The reference is the same sampler with one segment over the whole cache and
no compaction (`first_segment=0, compact=False`: today's single `while_loop`); tests/test_sampler.py checks
that one against cache-free full forwards."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import MAIN

from next_jax.models import policy, sampler

PROMPTS = [[5, 17, 99, 3, 250, 42, 8, 61], [7, 7, 130, 2, 19], [201, 33]]  # left-padded to 8
MAX_NEW = 8  # first_segment=2 → windows 8 + (2, 4, 8): three segments
STOPS = tuple(range(1, 256, 5))  # ~1 token in 5: at T = 1 rows stop all along the budget
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(main_model):
  """run(first_segment, compact, seed, temperature, **kw) → numpy SampleOutput on PROMPTS, G = 4."""
  cfg, params = main_model
  tokens, mask = (jnp.asarray(x) for x in sampler.pad_prompts(PROMPTS, pad_id=0, length=8))

  def call(first_segment, compact, seed=0, temperature=1.0, **kw):
    kw = {"num_samples": 4, "stop_ids": STOPS, "top_p": 1.0, **kw}
    out = sampler.generate(params, tokens, mask, jax.random.key(seed), cfg=cfg, max_new_tokens=MAX_NEW,
                           temperature=temperature, first_segment=first_segment, compact=compact, **kw)
    return jax.tree.map(np.asarray, out)

  return call


def _assert_same_rows(got, want):
  np.testing.assert_array_equal(got.tokens, want.tokens)
  np.testing.assert_array_equal(got.mask, want.mask)
  np.testing.assert_array_equal(got.lengths, want.lengths)
  np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------- pieces


@pytest.mark.parametrize("make_key", [jax.random.key, jax.random.PRNGKey], ids=["typed", "raw"])
def test_row_gumbel_is_the_full_draw_at_those_rows(make_key):
  key, rows = make_key(7), jnp.array([5, 0, 3, 3], jnp.int32)
  got = jax.jit(sampler.row_gumbel, static_argnums=(2, 3))(key, rows, 6, 1000)
  want = jax.jit(lambda k: jax.random.gumbel(k, (6, 1000))[rows])(key)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("block", [1, 2, 3, 0])
def test_gumbel_argmax_in_row_blocks_draws_the_whole_batch_noise(block, monkeypatch):
  """Row blocks (XLA:CPU) give the tokens of one [R, V] draw; a block that does not divide R falls back."""
  monkeypatch.setattr(sampler, "CPU_NOISE_ROWS", block)
  key, rows = jax.random.key(3), jnp.array([5, 0, 3, 3], jnp.int32)
  logits = jax.random.normal(jax.random.key(4), (4, 1000)) * 3
  fresh = lambda: jax.jit(lambda k, r, x: sampler.gumbel_argmax(k, r, 6, x))  # noqa: E731  (a new trace)
  got = fresh()(key, rows, logits)
  want = jnp.argmax(sampler.row_gumbel(key, rows, 6, 1000) + logits, axis=-1)
  assert len(set(np.asarray(want).tolist())) > 1 and np.asarray(got).tolist() == np.asarray(want).tolist()
  loops = lambda: fresh().lower(key, rows, logits).as_text().count("stablehlo.while")  # noqa: E731
  blocked = loops()
  monkeypatch.setattr(sampler, "CPU_NOISE_ROWS", 0)
  assert (blocked > loops()) == (block in (1, 2))  # a row loop only when the block divides the rows


def test_segment_windows_double_up_to_the_budget():
  assert sampler.segment_windows(8, 12, 2) == (10, 12, 16, 20)
  assert sampler.segment_windows(16, 1024, 64) == (80, 144, 272, 528, 1040)
  assert sampler.segment_windows(8, 6, 64) == sampler.segment_windows(8, 6, 0) == (14,)


def test_batch_bucket_is_the_smallest_power_of_two_multiple_of_the_quantum():
  assert [sampler.batch_bucket(n) for n in (1, 2, 3, 5, 64)] == [1, 2, 4, 8, 64]
  assert [sampler.batch_bucket(n, 4) for n in (1, 4, 5, 9)] == [4, 4, 8, 16]


def test_a_decode_window_gives_the_logits_of_the_whole_cache(main_model):
  """Prefill 8 slots of a 40-slot cache, then one step: attending to the first 12 slots only (all that can
  be filled) gives the full cache's logits and writes the same cache."""
  cfg, params = main_model
  tokens, mask = (jnp.asarray(x) for x in sampler.pad_prompts(PROMPTS, pad_id=0, length=8))
  pos = policy.positions_from_mask(mask)
  cache = policy.init_cache(cfg, 3, 40)
  _, cache = policy.forward(params, tokens, cfg, mask=mask, positions=pos, cache=cache)
  step = dict(mask=jnp.ones((3, 1), bool), positions=pos[:, -1:] + 1, cache=cache)
  full, full_cache = policy.forward(params, tokens[:, -1:], cfg, **step)
  windowed, windowed_cache = policy.forward(params, tokens[:, -1:], cfg, window=12, **step)
  np.testing.assert_allclose(np.asarray(windowed), np.asarray(full), atol=1e-5, rtol=0)
  np.testing.assert_array_equal(np.asarray(windowed_cache.k), np.asarray(full_cache.k))


# ------------------------------------------------------------------------------------------ exactness


def test_segments_and_compaction_keep_the_greedy_rows(run):
  want = run(0, False, temperature=0.0)
  got = run(2, True, temperature=0.0)
  assert len(set(want.lengths.tolist())) > 1  # rows stop at different steps: compaction has work to do
  _assert_same_rows(got, want)


def test_segments_and_compaction_keep_every_sampled_row_at_every_stop_position(run):
  """Six seeds at T = 1, 12 rows each: every row equals the one-segment row although the batch is
  compacted under it (12 → 8, 4, 2 or 1 rows); across the seeds rows stop at every position 1 … MAX_NEW."""
  lengths = set()
  for seed in range(6):
    got, want = run(2, True, seed=seed), run(0, False, seed=seed)
    _assert_same_rows(got, want)
    lengths |= set(got.lengths.tolist())
  assert lengths == set(range(1, MAX_NEW + 1))
  assert sampler._compact._cache_size() > 0


def test_segments_keep_top_p_rows_without_compaction(run):
  kw = dict(seed=3, temperature=0.7, top_p=0.8)
  _assert_same_rows(run(2, False, **kw), run(0, False, **kw))


def test_prompt_chunks_with_segments_equal_chunks_without(run):
  _assert_same_rows(run(4, False, seed=4, prompt_chunk=1), run(0, False, seed=4, prompt_chunk=1))


# ---------------------------------------------------------------------------------------- KV cache dtype


def test_kv_cache_dtype_is_the_sampler_cache_dtype(main_model):
  """The sampler's cache (traced, not compiled) takes cfg.kv_cache_dtype; "" keeps the model dtype."""
  cfg, params = main_model
  bf16 = policy.ModelConfig(**{**cfg.__dict__, "kv_cache_dtype": "bfloat16"})
  tokens, mask = (jnp.asarray(x) for x in sampler.pad_prompts(PROMPTS, pad_id=0, length=8))
  kw = dict(lora=None, lora_cfg=None, max_new_tokens=4, num_samples=2, top_k=0, stop_ids=(), pad_id=0)
  shapes = {c.kv_cache_dtype: jax.eval_shape(lambda: sampler._prefill(  # noqa: SLF001
      params, tokens, mask, jax.random.key(0), 1.0, 1.0, cfg=c, **kw)).cache.k for c in (cfg, bf16)}
  assert shapes[""].dtype == jnp.float32 and shapes["bfloat16"].dtype == jnp.bfloat16
  assert shapes["bfloat16"].shape == (cfg.num_layers, 6, cfg.num_kv_heads, 12, cfg.head_dim)
  with pytest.raises(ValueError, match="kv_cache_dtype='int8'"):
    policy.ModelConfig(**{**cfg.__dict__, "kv_cache_dtype": "int8"})


# ---------------------------------------------------------------------------------------------- mesh

_CHILD = """
import json, sys
import jax, jax.numpy as jnp, numpy as np
from next_jax.models import hf, sampler
from next_jax.core import sharding
jax.config.update("jax_default_matmul_precision", "highest")
cfg, params, _ = hf.load_model(sys.argv[1], tokenizer=False)
tokens, mask = (jnp.asarray(x) for x in sampler.pad_prompts(json.loads(sys.argv[2]), pad_id=0, length=8))
mesh = sharding.make_mesh(data=2, fsdp=2, tensor=1)
with sharding.use_mesh(mesh):
  out = sampler.generate(sharding.shard(params, mesh), tokens, mask, jax.random.key(0), cfg=cfg,
                         **json.loads(sys.argv[3]))
print(json.dumps({"tokens": np.asarray(out.tokens).tolist(), "logprobs": np.asarray(out.logprobs).tolist(),
                  "compacted": sampler._compact._cache_size()}))
"""


def test_mesh_path_with_segments_and_compaction_gives_the_one_device_rows(run, hf_model):
  """4 forced CPU devices, the 12 sampled rows over data=2 × fsdp=2 (compacted batches stay multiples of 4;
  the 3 prompts stay replicated), in a subprocess (the device count is fixed when jax starts): the
  one-device, one-segment rows."""
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu",
         "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
  kw = {"max_new_tokens": MAX_NEW, "num_samples": 4, "stop_ids": STOPS, "temperature": 1.0,
        "first_segment": 2}
  proc = subprocess.run([sys.executable, "-c", _CHILD, str(hf_model(MAIN).path), json.dumps(PROMPTS),
                         json.dumps(kw)], env=env, check=False, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-4000:]
  got, want = json.loads(proc.stdout.strip().splitlines()[-1]), run(0, False, seed=0)
  np.testing.assert_array_equal(got["tokens"], want.tokens)
  np.testing.assert_allclose(got["logprobs"], want.logprobs, atol=1e-5, rtol=0)
  assert got["compacted"] > 0 and len(set(want.lengths.tolist())) > 3
