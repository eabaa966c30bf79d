"""Two JAX CPU processes joined by `jax.distributed.initialize` on localhost (how a TPU pod slice starts),
one CPU device each: each samples and verifies only its half of the prompts, the RL steps and the
evaluation match one process, only process 0 writes config, metrics and results, and both save and
restore the checkpoints."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from multiprocess_child import EVAL, STEPS, recording, segment_rows

ROOT = Path(__file__).resolve().parents[1]
CHILD = str(ROOT / "tests" / "multiprocess_child.py")
pytestmark = pytest.mark.slow


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def one_process_reference(steps: int) -> dict:
  """The same steps and evaluation in this (pytest) process, on one device."""
  import jax  # noqa: PLC0415
  from tiny_rl import PROBLEMS, fresh_state, init_model, make_setup, run  # noqa: PLC0415

  from next_jax.rl import trainer  # noqa: PLC0415

  params, lora = init_model()
  log = {"encoded": [], "verified": 0}
  state, rows = run(recording(make_setup(), log), params, fresh_state(lora), steps)
  evaluation = trainer.evaluate(make_setup(), params, state.train.params, PROBLEMS[:6], **EVAL)
  return {"params": [np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(state.train.params)],
          "rewards": [r["reward_mean"] for r in rows], "eval": evaluation, **log}


def halves(problems: list, size: int) -> tuple[list, list]:
  """(first halves, second halves) of consecutive batches of `size`: what processes 0 and 1 encode."""
  batches = [problems[i:i + size] for i in range(0, len(problems), size)]
  return [q for b in batches for q in b[:size // 2]], [q for b in batches for q in b[size // 2:]]


def test_two_processes_split_the_prompts_match_one_process_and_only_process_0_writes(tmp_path):
  from tiny_rl import PROBLEMS  # noqa: PLC0415

  env = {**os.environ, "JAX_PLATFORMS": "cpu", "OPENBLAS_NUM_THREADS": "1"}
  env.pop("XLA_FLAGS", None)  # one CPU device per process
  port, shared = str(free_port()), tmp_path / "run"
  outs = [tmp_path / f"{i}.json" for i in (0, 1)]
  procs = [subprocess.Popen([sys.executable, CHILD, str(i), port, str(o), str(shared)],
                            cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
           for i, o in enumerate(outs)]
  one = one_process_reference(steps=STEPS)
  logs = [p.communicate(timeout=900)[0] for p in procs]
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]
  p0, p1 = (json.loads(o.read_text()) for o in outs)
  assert (p0["processes"], p0["devices"]) == (2, 2)

  # each process encoded and verified only its half of every step's prompts (4 per step, G = 8)
  assert len(one["encoded"]) == STEPS * 4 and one["verified"] == STEPS * 4 * 8
  assert (p0["encoded"], p1["encoded"]) == halves(one["encoded"], 4)
  assert p0["verified"] == p1["verified"] == STEPS * 2 * 8
  # … and the steps are one process's: the same samples and rewards, parameters up to all-reduce order
  assert p0["params"] == p1["params"] and p0["rewards"] == p1["rewards"] == one["rewards"]
  diff = max(np.abs(np.asarray(a) - b).max() for a, b in zip(p0["params"], one["params"]))
  assert diff < 1e-4  # the cross-process gradient all-reduce sums in another order; Adam amplifies it
  # evaluation too: chunks of 4 (the last padded with repeats), each process encodes half of each chunk
  padded = [list(q) for q in PROBLEMS[:6] + PROBLEMS[5:6] * 2]
  assert (p0["eval_encoded"], p1["eval_encoded"]) == halves(padded, 4)
  assert p0["eval"] == p1["eval"] == one["eval"] and one["eval"]["n"] == 6 * 8

  # the sampler's segments and compaction over the two processes: one process's rows, and those equal one
  # segment over the whole cache without compaction (log-probs: the attention sums over fewer slots)
  single, whole = segment_rows(), segment_rows(first_segment=0, compact=False)
  lengths = single["lengths"]
  assert min(lengths) <= 4 and max(lengths) > 8 and p0["segments"]["compactions"] >= 1  # compaction ran
  for got in (p0["segments"], p1["segments"], single):
    assert got["tokens"] == whole["tokens"] and got["lengths"] == lengths
    np.testing.assert_allclose(got["logprobs"], whole["logprobs"], atol=1e-5, rtol=0)

  # configs that cannot split over the two processes are refused, naming the field
  assert p0["errors"]["rollout.prompts_per_step"].startswith("config.rollout.prompts_per_step=3: must be "
                                                             "divisible by the 2 processes")
  assert p0["errors"]["mesh.data"].startswith("config.mesh.data=1: with 2 processes the mesh must use all")

  # the run's writers: only process 0 wrote outside the orbax directories; both saved and restored
  assert p1["written"] == []
  for name in ("config.json.tmp", "metrics.jsonl", "results.tmp"):
    assert f"open:{name}" in p0["written"], p0["written"]
  assert any(w.startswith("open:tb" + os.sep) for w in p0["written"]), p0["written"]
  rows = [json.loads(line) for line in (shared / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == [STEPS + 1]  # one row, not one per process
  assert json.loads((shared / "results.json").read_text()) == {"steps": STEPS + 1}
  for p in (p0, p1):
    assert p["restored_step"] == STEPS + 1 and p["restored_equal"] and p["params_equal"]
