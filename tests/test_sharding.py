"""next_jax.core.sharding: meshes; data parallelism over 4 forced CPU devices (in a subprocess, since the device
count is fixed when jax initialises); partition rules; abstract shardings of the paper presets; a tiny model
sharded data=2 × fsdp=2 × tensor=2 on 8 forced CPU devices (in a subprocess: tests/sharding_child.py) giving
the same logits, GRPO updates, sampled tokens and rank-1 triplets as one device; pmap padding helpers."""

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
from jax.sharding import AbstractMesh, NamedSharding
from jax.sharding import PartitionSpec as P

from next_jax.core import sharding
from next_jax.models import policy
from next_jax.rl import trainer
from next_jax.run import experiment, memory

ROOT = Path(__file__).resolve().parents[1]
SIZES = {"data": 2, "fsdp": 4, "tensor": 8}


# ----------------------------------------------------------------- data parallel: 4 devices


# Run in a fresh interpreter with 4 host devices. Prints one JSON object of observations.
_CHILD = r"""
import json, sys
import jax, numpy as np
jax.config.update("jax_default_matmul_precision", "highest")
from next_jax.models import hf, policy
from next_jax.core import sharding

out = {"device_count": jax.device_count()}
mesh = sharding.make_mesh()
cfg, params, _ = hf.load_model(sys.argv[1], tokenizer=False, sharding=sharding.replicated(mesh))
_, params1, _ = hf.load_model(sys.argv[1], tokenizer=False)  # default device only
out["params_replicated_on"] = sorted({len(x.sharding.device_set) for x in jax.tree.leaves(params)})
out["params_fully_replicated"] = all(x.sharding.is_fully_replicated for x in jax.tree.leaves(params))
out["single_params_on"] = sorted({len(x.sharding.device_set) for x in jax.tree.leaves(params1)})

rng = np.random.default_rng(0)
tokens = rng.integers(0, cfg.vocab_size, (8, 10)).astype(np.int32)
mask = np.arange(10)[None] >= rng.integers(0, 8, (8, 1))  # left padding, 3..10 real tokens per row

@jax.jit
def logits_fn(params, tokens, mask):
  return policy.forward(params, tokens, cfg, mask=mask)[0]

single = np.asarray(logits_fn(params1, tokens, mask))
batch = sharding.shard_batch({"tokens": tokens, "mask": mask}, mesh)
out["shard_rows"] = sorted(s.data.shape[0] for s in batch["tokens"].addressable_shards)
out["shard_devices"] = len(batch["tokens"].sharding.device_set)
sharded = logits_fn(params, batch["tokens"], batch["mask"])
out["logits_devices"] = len(sharded.sharding.device_set)
m = mask.astype(bool)
out["logits_max_abs_diff"] = float(np.abs(np.asarray(sharded) - single)[m].max())
out["logits_max_abs"] = float(np.abs(single)[m].max())

try:
  sharding.shard_batch({"x": np.zeros((6, 2))}, mesh)
except ValueError as e:
  out["indivisible_error"] = str(e)
try:
  sharding.make_mesh(8)
except ValueError as e:
  out["too_many_error"] = str(e)
out["mesh2_devices"] = [d.id for d in sharding.make_mesh(2).devices]
out["torch_imported"] = "torch" in sys.modules
out["transformers_imported"] = "transformers" in sys.modules
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def four_devices(hf_model):
  """Observations from one 4-device child process, shared by the tests below (it costs ~6 s)."""
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, "-c", _CHILD, str(hf_model(MAIN).path)], env=env, check=False,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_child_sees_four_devices(four_devices):
  assert four_devices["device_count"] == 4


@pytest.mark.slow
def test_load_model_with_replicated_sharding_places_params_on_every_device(four_devices):
  assert four_devices["params_replicated_on"] == [4] and four_devices["params_fully_replicated"]
  assert four_devices["single_params_on"] == [1]


@pytest.mark.slow
def test_shard_batch_splits_rows_evenly_over_the_data_axis(four_devices):
  assert four_devices["shard_devices"] == 4
  assert four_devices["shard_rows"] == [2, 2, 2, 2]


@pytest.mark.slow
def test_data_parallel_forward_equals_single_device(four_devices):
  assert four_devices["logits_devices"] == 4  # the computation really ran sharded
  assert four_devices["logits_max_abs"] > 1.0
  assert four_devices["logits_max_abs_diff"] <= 1e-5


@pytest.mark.slow
def test_shard_batch_rejects_indivisible_batch(four_devices):
  assert four_devices["indivisible_error"] == "batch axis 6 is not divisible by mesh data=4"


@pytest.mark.slow
def test_make_mesh_limits_and_selects_devices(four_devices):
  assert four_devices["too_many_error"] == ("mesh data×fsdp×tensor = 8×1×1 = 8 needs ≥1 and ≤ 4 available "
                                           "devices")
  assert four_devices["mesh2_devices"] == [0, 1]


@pytest.mark.slow
def test_loading_and_running_the_model_never_imports_torch_or_transformers(four_devices):
  assert not four_devices["torch_imported"]
  assert not four_devices["transformers_imported"]


# ------------------------------------------------------------------------- 8 devices vs one


@pytest.fixture(scope="module")
def eight_devices():
  """Observations from one 8-device child process (~40 s of CPU: it compiles every program twice)."""
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu",
         "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
  proc = subprocess.run([sys.executable, str(ROOT / "tests" / "sharding_child.py")], env=env, check=False,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_sharded_logits_equal_single_device(eight_devices):
  assert eight_devices["device_count"] == 8
  assert eight_devices["logits_max_abs"] > 1.0
  assert eight_devices["logits_diff"] <= 1e-5


@pytest.mark.slow
def test_sharded_grpo_updates_equal_single_device(eight_devices):
  for kind in ("lora", "full"):
    assert eight_devices[f"{kind}_moved"] > 1e-3  # the update really changed the weights
    assert eight_devices[f"{kind}_update_diff"] <= 1e-5


@pytest.mark.slow
def test_sharded_sampler_gives_the_same_tokens(eight_devices):
  assert eight_devices["greedy_equal"] and eight_devices["sampled_equal"]
  assert eight_devices["sampled_distinct_rows"] > 1  # sampling was not degenerate


@pytest.mark.slow
def test_update_keeps_params_and_adam_moments_sharded(eight_devices):
  assert eight_devices["q_kernel_after_spec"] == [None, "fsdp", "tensor"]
  assert eight_devices["q_kernel_shard"] == [2, 32, 32]  # [L, D/fsdp, H·hd/tensor]
  assert eight_devices["down_kernel_after_spec"] == [None, "tensor", "fsdp"]
  assert eight_devices["adam_mu_q_spec"] == [None, "fsdp", "tensor"]
  assert eight_devices["lora_q_b_after_spec"] == [None, "tensor"]


@pytest.mark.slow
def test_orbax_restores_sharded_state_with_its_shardings(eight_devices):
  assert eight_devices["ckpt_diff"] == 0.0
  assert eight_devices["ckpt_spec"] == [None, "fsdp", "tensor"]
  assert eight_devices["ckpt_mu_spec"] == [None, "fsdp", "tensor"]


@pytest.mark.slow
def test_rank1_under_pmap_accepts_sharded_lora_factors(eight_devices):
  assert eight_devices["rank1_input_spec"] == [None, "tensor", None]
  assert eight_devices["rank1_sigma"] > 0.1
  assert eight_devices["rank1_sigma_diff"] <= 1e-5 and eight_devices["rank1_u_diff"] <= 1e-5


# ------------------------------------------------------------------------------------ rules


def test_fit_dims_aligns_to_trailing_dims_and_drops_non_dividing_axes():
  assert sharding.fit_dims((28, 3584, 512), ("fsdp", "tensor"), SIZES) == P(None, "fsdp", "tensor")
  assert sharding.fit_dims((28, 3584, 4), ("fsdp", "tensor"), SIZES) == P(None, "fsdp", None)
  assert sharding.fit_dims((6, 16), (("data", "fsdp"), None), SIZES) == P("data", None)
  assert sharding.fit_dims((16, 3), (("data", "fsdp"), None), SIZES) == P(("data", "fsdp"), None)
  assert sharding.fit_dims((8,), (("data", "fsdp"),), {"data": 2, "fsdp": 8}) == P("fsdp")  # largest split
  assert sharding.fit_dims((), ("fsdp",), SIZES) == P()
  assert sharding.fit_dims((8, 8), ("fsdp", "tensor"), {"data": 8}) == P(None, None)  # 1-D data mesh


def test_rules_cover_params_lora_and_optimizer_paths():
  rule = sharding.rule_dims
  assert rule("layers/q/kernel") == ("fsdp", "tensor") and rule("layers/down/kernel") == ("tensor", "fsdp")
  assert rule("layers/k/bias") == ("tensor",) and rule("layers/attn_norm") == () and rule("final_norm") == ()
  assert rule("embed") == ("tensor", "fsdp") and rule("lm_head") == ("fsdp", "tensor")
  assert rule("q/a") == (None, "fsdp") and rule("q/b") == ("tensor", None)
  assert rule("o/a") == (None, "tensor") and rule("o/b") == ("fsdp", None)
  assert rule("1/0/mu/up/b") == ("tensor", None) and rule("1/0/count") == ()


def _abstract_state(cfg, lcfg):
  return memory.abstract_state(cfg, lcfg, trainer.make_optimizer(trainer.OptimConfig(lr=1e-3)), snapshots=16)


def _is_sharding(x):
  return isinstance(x, NamedSharding)


@pytest.mark.parametrize("size", sorted(policy.QWEN25))
@pytest.mark.parametrize("trainable", ["lora", "full"])
def test_every_paper_preset_gets_valid_abstract_shardings(size, trainable):
  """Params, trainable, Adam state and the K=16 trajectory on an abstract 2×4×8 mesh (no devices)."""
  cfg = policy.QWEN25[size]
  lcfg = policy.LoraConfig(rank=64, alpha=32.0) if trainable == "lora" else None
  mesh = AbstractMesh((2, 4, 8), sharding.AXES)
  state = _abstract_state(cfg, lcfg)
  split = 0
  for tree in state.values():
    shards = jax.tree.leaves(sharding.named_shardings(tree, mesh), is_leaf=_is_sharding)
    for x, s in zip(jax.tree.leaves(tree), shards, strict=True):
      shard_shape = s.shard_shape(x.shape)  # raises if a spec does not fit its array
      assert np.prod(shard_shape) * 32 >= np.prod(x.shape)  # at most fsdp·tensor = 32-way, never data
      split += np.prod(shard_shape) < np.prod(x.shape)
  assert split >= 7 * 3  # every projection of params, trainable and trajectory really split
  kernel = sharding.named_shardings(state["params"], mesh)["layers"]["gate"]["kernel"]
  assert kernel.shard_shape((cfg.num_layers, cfg.hidden_size, cfg.intermediate_size)) == (
      cfg.num_layers, cfg.hidden_size // 4, cfg.intermediate_size // 8)


def test_7b_param_bytes_per_device_match_hand_count():
  """Qwen2.5-7B bf16 on fsdp=4 × tensor=8: every matrix splits 32 ways; norms and biases as hand-counted."""
  cfg = policy.QWEN25["7B"]
  params = jax.eval_shape(lambda: policy.init_params(cfg, jax.random.key(0)))
  total = policy.count_params(params)
  assert total == 7_615_616_512  # the published Qwen2.5-7B-Instruct parameter count
  L, d, v = 28, 3584, 152064
  norms = 2 * L * d + d  # replicated
  biases = L * (3584 + 512 + 512)  # q, k, v biases over tensor only
  matrices = total - norms - biases
  expected = 2 * (matrices // 32 + biases // 8 + norms)
  assert sharding.tree_shard_bytes(params, SIZES) == expected
  assert v * d % 32 == 0


def test_constrain_is_a_no_op_without_a_mesh():
  x = jnp.ones((4, 3, 2))
  assert sharding.constrain_activation(x) is x


# ------------------------------------------------------------------------ mesh (in-process)


def test_make_mesh_checks_device_count():
  with pytest.raises(ValueError, match=r"mesh data×fsdp×tensor = 1×2×1 = 2 needs"):
    sharding.make_mesh(data=1, fsdp=2, devices=jax.devices()[:1])
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  assert mesh.axis_names == (sharding.DATA,) and dict(mesh.shape) == {"data": 1}  # fsdp = tensor = 1: 1-D


def test_make_mesh_names_the_data_axis():
  mesh = sharding.make_mesh()
  assert mesh.axis_names == (sharding.DATA,) and mesh.shape[sharding.DATA] == jax.device_count()


def test_batch_axes_are_data_and_fsdp_where_present():
  assert sharding.batch_axes(SIZES) == ("data", "fsdp")
  assert sharding.batch_axes({"data": 4}) == ("data",)
  assert sharding.batch_axes({"tensor": 2}) == ()


# ----------------------------------------------------------------------------- pmap padding


def test_pad_to_multiple_appends_zero_rows():
  x = jnp.arange(1, 7, dtype=jnp.float32).reshape(3, 2)
  padded, n = sharding.pad_to_multiple(x, 4)
  assert n == 3
  np.testing.assert_array_equal(padded, [[1, 2], [3, 4], [5, 6], [0, 0]])


def test_pad_to_multiple_pads_the_requested_axis():
  x = jnp.ones((2, 5), jnp.int32)
  padded, n = sharding.pad_to_multiple(x, 4, axis=1)
  assert n == 5 and padded.shape == (2, 8)
  np.testing.assert_array_equal(padded[:, 5:], 0)
  np.testing.assert_array_equal(padded[:, :5], 1)


def test_pad_to_multiple_leaves_exact_multiples_alone():
  x = jnp.ones((8, 3))
  padded, n = sharding.pad_to_multiple(x, 4)
  assert padded is x and n == 8


# ------------------------------------------------------------------------ config validation


def _toy_config():
  from next_jax.configs import toy_arith
  return toy_arith.get_config()


@pytest.mark.parametrize("field, value, match", [
    ("fsdp", 0, "config.mesh.fsdp=0: must be an integer ≥ 1"),
    ("tensor", -1, "config.mesh.tensor=-1: must be an integer ≥ 1"),
    ("fsdp", 64, r"config.mesh.fsdp=64: fsdp·tensor = 64 > \d+ devices"),
])
def test_validate_names_the_bad_mesh_field(field, value, match):
  c = _toy_config()
  c.mesh[field] = value
  with pytest.raises(experiment.ConfigError, match=match):
    experiment.validate(c)


def test_validate_rejects_an_unknown_model_preset():
  c = _toy_config()
  c.model.preset = "70B"
  with pytest.raises(experiment.ConfigError, match="config.model.preset='70B'"):
    experiment.validate(c)
