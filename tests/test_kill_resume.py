"""Kill and resume: the toy config runs in a child process that is SIGKILLed at several points (inside a
checkpoint write before its commit, at a random moment of a checkpoint write, inside extrapolate_step, at
a random moment of RL), resumed each time, and must end with the metrics, results and parameters of an
uninterrupted run, bit for bit."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest

from next_jax.models import policy, toy

ROOT = Path(__file__).resolve().parents[1]
SEED = int(os.environ.get("KILL_SEED", random.randrange(10**6)))  # rerun a failure with KILL_SEED=<seed>
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  base = tmp_path_factory.mktemp("kill")
  model = base / "model"
  cfg = policy.ModelConfig(vocab_size=17, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                           num_kv_heads=2, rope_theta=10000.0)
  toy.make_random_model_dir(model, cfg, tokenizer=False)
  toy.build_char_tokenizer("0123456789+-*=", out_dir=model)
  cache = {"JAX_COMPILATION_CACHE_DIR": str(base / "jax_cache"), "OPENBLAS_NUM_THREADS": "1",
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
  return base, model, {**os.environ, **cache}


def start(env, wd, kill):
  base, model, environ = env
  return subprocess.Popen([sys.executable, str(ROOT / "tests" / "kill_child.py"), str(wd), str(model), kill],
                          cwd=ROOT, env=environ, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc, timeout=300):
  out, _ = proc.communicate(timeout=timeout)
  return proc.returncode, out


def rows(wd):
  drop = lambda k: k.startswith("time/") or k == "tokens_per_s"  # noqa: E731  (wall-clock, not results)
  return [{k: v for k, v in json.loads(x).items() if not drop(k)}
          for x in (wd / "metrics.jsonl").read_text().splitlines()]


def results(wd):
  res = json.loads((wd / "results.json").read_text())
  for j in res["jumps"]:
    for k in [k for k in j if k.startswith("time/")]:
      del j[k]
  return {k: v for k, v in res.items() if k != "workdir"}


def final_arrays(wd):
  ckpt = wd / "ckpt"
  last = max(int(p.name) for p in ckpt.iterdir() if p.name.isdigit())
  tree = ocp.PyTreeCheckpointer().restore(ckpt / str(last) / "state")
  import jax  # noqa: PLC0415
  return jax.tree_util.tree_flatten_with_path(tree)[0]


def kill_when_rows(proc, wd, n, delay):
  """SIGKILL the child `delay` s after metrics.jsonl holds ≥ n rows."""
  while proc.poll() is None:
    path = wd / "metrics.jsonl"
    if path.exists() and len(path.read_text().splitlines()) >= n:
      time.sleep(delay)
      proc.send_signal(signal.SIGKILL)
      return
    time.sleep(0.01)


def test_killed_anywhere_and_resumed_equals_the_uninterrupted_run(env):
  base, *_ = env
  rng = random.Random(SEED)
  ref_wd, wd = base / "ref", base / "killed"
  ref = start(env, ref_wd, "none")
  code, out = finish(start(env, wd, "finalize:2"))  # inside the 2nd save (RL step 4), before its commit
  assert code == -signal.SIGKILL, out[-2000:]
  leftovers = [p.name for p in (wd / "ckpt").iterdir()]
  assert any("tmp" in name for name in leftovers) and "2" not in leftovers, leftovers  # uncommitted only
  ms = rng.randrange(0, 80)
  code, out = finish(start(env, wd, f"save:1:{ms}"))  # at a random moment of the next save
  assert code == -signal.SIGKILL, (SEED, out[-2000:])
  code, out = finish(start(env, wd, "extrapolate"))
  assert code == -signal.SIGKILL, (SEED, out[-2000:])
  assert code == -signal.SIGKILL and "alpha" not in (wd / "metrics.jsonl").read_text()
  proc = start(env, wd, "none")
  n_rows = rng.randrange(len(rows(wd)) + 2, len(rows(wd)) + 5)  # a random RL step after the jump
  kill_when_rows(proc, wd, n_rows, rng.uniform(0, 0.2))
  code, out = finish(proc)
  assert code == -signal.SIGKILL, (SEED, out[-2000:])
  code, out = finish(start(env, wd, "none"))
  assert code == 0, out[-3000:]
  code, out = finish(ref)
  assert code == 0, out[-3000:]
  assert rows(wd) == rows(ref_wd), SEED
  assert results(wd) == results(ref_wd), SEED
  got, want = final_arrays(wd), final_arrays(ref_wd)
  assert [p for p, _ in got] == [p for p, _ in want] and len(got) > 10
  for (path, a), (_, b) in zip(got, want):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=f"{path} (KILL_SEED={SEED})")
