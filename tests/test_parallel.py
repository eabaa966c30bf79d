"""next_jax.parallel: data parallelism over a forced 4-device CPU mesh (in a subprocess, since the device
count is fixed when jax initialises), and padding helpers."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import MAIN
from next_jax import parallel

# Run in a fresh interpreter with 4 host devices. Prints one JSON object of observations.
_CHILD = r"""
import json, sys
import jax, numpy as np
jax.config.update("jax_default_matmul_precision", "highest")
from next_jax import hf, parallel, policy

out = {"device_count": jax.device_count()}
mesh = parallel.make_mesh()
cfg, params, _ = hf.load_model(sys.argv[1], tokenizer=False, sharding=parallel.replicated(mesh))
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
batch = parallel.shard_batch({"tokens": tokens, "mask": mask}, mesh)
out["shard_rows"] = sorted(s.data.shape[0] for s in batch["tokens"].addressable_shards)
out["shard_devices"] = len(batch["tokens"].sharding.device_set)
sharded = logits_fn(params, batch["tokens"], batch["mask"])
out["logits_devices"] = len(sharded.sharding.device_set)
m = mask.astype(bool)
out["logits_max_abs_diff"] = float(np.abs(np.asarray(sharded) - single)[m].max())
out["logits_max_abs"] = float(np.abs(single)[m].max())

try:
  parallel.shard_batch({"x": np.zeros((6, 2))}, mesh)
except ValueError as e:
  out["indivisible_error"] = str(e)
try:
  parallel.make_mesh(8)
except ValueError as e:
  out["too_many_error"] = str(e)
out["mesh2_devices"] = [d.id for d in parallel.make_mesh(2).devices]
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
  assert four_devices["too_many_error"] == "mesh data=8 > 4 available devices"
  assert four_devices["mesh2_devices"] == [0, 1]


@pytest.mark.slow
def test_loading_and_running_the_model_never_imports_torch_or_transformers(four_devices):
  assert not four_devices["torch_imported"]
  assert not four_devices["transformers_imported"]


# ------------------------------------------------------------------------------------ in-process


def test_make_mesh_names_the_data_axis():
  mesh = parallel.make_mesh()
  assert mesh.axis_names == (parallel.DATA,) and mesh.shape[parallel.DATA] == jax.device_count()


def test_pad_to_multiple_appends_zero_rows():
  x = jnp.arange(1, 7, dtype=jnp.float32).reshape(3, 2)
  padded, n = parallel.pad_to_multiple(x, 4)
  assert n == 3
  np.testing.assert_array_equal(padded, [[1, 2], [3, 4], [5, 6], [0, 0]])


def test_pad_to_multiple_pads_the_requested_axis():
  x = jnp.ones((2, 5), jnp.int32)
  padded, n = parallel.pad_to_multiple(x, 4, axis=1)
  assert n == 5 and padded.shape == (2, 8)
  np.testing.assert_array_equal(padded[:, 5:], 0)
  np.testing.assert_array_equal(padded[:, :5], 1)


def test_pad_to_multiple_leaves_exact_multiples_alone():
  x = jnp.ones((8, 3))
  padded, n = parallel.pad_to_multiple(x, 4)
  assert padded is x and n == 8
