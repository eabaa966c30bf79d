"""Two JAX CPU processes joined by `jax.distributed.initialize` on localhost (how a TPU pod slice starts)
run data-parallel RL steps; their result must match one process."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
CHILD = str(ROOT / "tests" / "multiprocess_child.py")
pytestmark = pytest.mark.slow


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def one_process_reference(steps: int) -> dict:
  """The same steps in this (pytest) process, on one device."""
  import jax  # noqa: PLC0415

  from next_jax import policy  # noqa: PLC0415
  from tests.test_trainer import CFG, LCFG, fresh_state, make_setup, run  # noqa: PLC0415

  params, lora = policy.init_params(CFG, jax.random.key(0)), policy.init_lora(CFG, LCFG, jax.random.key(1))
  state, rows = run(make_setup(), params, fresh_state(lora), steps)
  return {"params": [np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(state.train.params)],
          "rewards": [r["reward_mean"] for r in rows]}


def test_two_processes_data_parallel_match_one_process(tmp_path):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "OPENBLAS_NUM_THREADS": "1"}
  env.pop("XLA_FLAGS", None)  # one CPU device per process
  port = str(free_port())
  outs = [tmp_path / f"{i}.json" for i in (0, 1)]
  procs = [subprocess.Popen([sys.executable, CHILD, str(i), port, str(o)], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i, o in enumerate(outs)]
  one = one_process_reference(steps=2)
  logs = [p.communicate(timeout=600)[0] for p in procs]
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]
  p0, p1 = (json.loads(o.read_text()) for o in outs)
  assert (p0["processes"], p0["devices"]) == (2, 2)
  assert p0 == p1  # both hosts hold the same replicated result
  assert p0["rewards"] == one["rewards"]  # same prompts and samples
  diff = max(np.abs(np.asarray(a) - b).max() for a, b in zip(p0["params"], one["params"]))
  assert diff < 1e-4  # the cross-process gradient all-reduce sums in another order; Adam amplifies it
