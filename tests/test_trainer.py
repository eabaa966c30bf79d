"""The RL loop: learning signal, dynamic sampling, bitwise resume, data parallelism, optimiser, metrics."""

import dataclasses
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_rl import (
  PROBLEMS,
  SETUP_FLAGS,
  fresh_state,
  low_token_reward,
  make_setup,
  run,
)

from next_jax.core.checkpoint import Checkpointer
from next_jax.core.metrics import MetricWriter
from next_jax.rl import grpo, trainer


def test_grpo_raises_a_learnable_reward(model):
  params, lora = model
  _, rows = run(make_setup(), params, fresh_state(lora), 15)
  rewards = [r["reward_mean"] for r in rows]
  assert np.mean(rewards[-5:]) > np.mean(rewards[:3]) + 0.2, rewards
  # the sampler's log-probs of its own tokens agree with the training graph's (fp32, same weights)
  assert max(r["sampler_logp_max_abs_diff"] for r in rows) < 1e-4


def test_resume_from_checkpoint_is_bitwise_identical(model, tmp_path):
  params, lora = model
  setup = make_setup()
  full, rows_full = run(setup, params, fresh_state(lora), 4)
  ckpt = Checkpointer(tmp_path / "ckpt")
  half, rows_a = run(setup, params, fresh_state(lora), 2)
  ckpt.save(2, half, {"step": 2})
  restored, meta = Checkpointer(tmp_path / "ckpt").restore(fresh_state(lora, seed=123))
  assert meta == {"step": 2} and int(restored.step) == 2 and int(restored.cursor) == 8
  resumed, rows_b = run(setup, params, restored, 2)
  assert rows_a + rows_b == rows_full
  for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_dynamic_sampling_fills_the_batch_with_groups_that_have_reward_spread(model):
  params, lora = model
  SETUP_FLAGS["constant_even"] = True
  try:
    setup = make_setup(dynamic_sampling=True, max_sampling_rounds=6)
    arrays, cursor, m = trainer.collect(setup, params, fresh_state(lora))
    spread = arrays["rewards"].reshape(4, 8).std(axis=1)
    assert arrays["live"].all() and (spread > 0).all()
    assert m["sampling_rounds"] >= 2 and cursor == 4 * m["sampling_rounds"]
    assert 0.3 < m["zero_spread_frac"] < 0.7  # half the prompts start with an even id
    setup1 = make_setup(dynamic_sampling=True, max_sampling_rounds=1)
    arrays1, _, m1 = trainer.collect(setup1, params, fresh_state(lora))
    assert m1["masked_groups"] == int((~arrays1["live"]).sum()) // 8 > 0
    adv = grpo.compute_advantages("grpo", jnp.asarray(arrays1["rewards"]),
                                  jnp.asarray(arrays1["rmask"] & arrays1["live"][:, None]), 8)
    batch = trainer.make_batch(setup1, arrays1, adv)
    assert not np.asarray(batch.loss_mask)[~arrays1["live"]].any()
  finally:
    SETUP_FLAGS["constant_even"] = False


def test_evaluate_ignores_padding_of_the_last_chunk(model):
  """5 problems × 2 samples in chunks of 4 problems: the second chunk is problem 4 and 3 repeats of it, whose
  6 responses are verified (rows go in order) but must not count. accuracy = share of the 10 real responses
  with reward > ½, reward_mean = their mean reward."""
  params, lora = model
  verified = []

  def reward(text, problem):
    verified.append((tuple(problem), low_token_reward(text, problem)))
    return verified[-1][1]

  setup = dataclasses.replace(make_setup(), reward=reward)
  out = trainer.evaluate(setup, params, lora, PROBLEMS[:5], chunk=4, samples=2, temperature=1.0)
  problems = [p for p, _ in verified]
  assert problems == [tuple(p) for p in PROBLEMS[:5] for _ in range(2)] + [tuple(PROBLEMS[4])] * 6
  real, pad = np.array([r for _, r in verified[:10]]), np.array([r for _, r in verified[10:]])
  assert out["n"] == 10
  assert out["reward_mean"] == pytest.approx(real.mean(), abs=1e-6)
  assert out["accuracy"] == pytest.approx((real > 0.5).mean(), abs=1e-12)
  assert np.concatenate([real, pad]).mean() != pytest.approx(real.mean(), abs=1e-3)  # padding would show


def test_evaluate_reports_pass_at_samples_per_problem(model):
  """Sample 0 of every problem right, sample 1 wrong (rows are verified in order): pass@1 ½, pass@2 1."""
  import itertools
  params, lora = model
  calls = itertools.count()
  setup = dataclasses.replace(make_setup(), reward=lambda text, p: float(next(calls) % 2 == 0))
  out = trainer.evaluate(setup, params, lora, PROBLEMS[:5], chunk=4, samples=2, temperature=1.0)
  assert (out["n"], out["accuracy"], out["pass@2"]) == (10, 0.5, 1.0)


def test_optimizer_warmup_then_cosine_schedule():
  oc = trainer.OptimConfig(lr=1.0, warmup_steps=2, schedule="cosine", decay_steps=6, min_lr_ratio=0.1,
                           weight_decay=0.0, grad_clip=None, b1=0.0, b2=0.0, eps=0.0)
  tx = trainer.make_optimizer(oc)
  p = jnp.zeros(())
  s = tx.init(p)
  steps = []
  for _ in range(7):  # Adam with b1=b2=0 and eps=0 moves by exactly lr·sign(g)
    u, s = tx.update(jnp.ones(()), s, p)
    steps.append(-float(u))
  cos = [0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * k / 4)) for k in range(5)]
  np.testing.assert_allclose(steps, [0.0, 0.5] + cos, atol=1e-6)


def test_metric_writer_truncates_rows_after_a_resumed_step(tmp_path):
  w = MetricWriter(tmp_path, tensorboard=False)
  for s in range(1, 5):
    w.write(s, {"reward": s / 10, "vec": np.ones(3)})
  w.truncate_after(2)
  assert [r["step"] for r in w.read()] == [1, 2] and w.read()[1]["reward"] == 0.2


def test_a_disabled_metric_writer_touches_no_file_but_counts_rows(tmp_path):
  w = MetricWriter(tmp_path / "log", enabled=False)  # what processes ≠ 0 of a multi-host run get
  row = w.write(1, {"reward": 0.5})
  w.write(2, {"reward": 0.7})
  assert row == {"step": 1, "reward": 0.5} and w.num_rows() == 2 and not (tmp_path / "log").exists()
  w.truncate_rows(1)
  assert w.num_rows() == 1 and not (tmp_path / "log").exists()


@pytest.mark.slow
def test_data_parallel_step_matches_one_device():
  code = textwrap.dedent("""
      import os, sys, json
      sys.path.insert(0, os.path.join(os.getcwd(), "tests"))  # not "tests.": verl installs a package by that name
      import jax, numpy as np
      from tiny_rl import make_setup, fresh_state, init_model, run
      from next_jax.core import sharding
      import dataclasses
      assert jax.device_count() == 4
      params, lora = init_model()
      setup = make_setup()
      mesh = sharding.make_mesh(4)
      rep = jax.tree.map(lambda x: jax.device_put(x, sharding.replicated(mesh)), (params, lora))
      s1, rows1 = run(setup, params, fresh_state(lora), 2)
      s4, rows4 = run(dataclasses.replace(setup, mesh=mesh), rep[0], fresh_state(rep[1]), 2)
      diff = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                 for a, b in zip(jax.tree.leaves(s1.train.params), jax.tree.leaves(s4.train.params)))
      print(json.dumps({"diff": diff, "r1": [r["reward_mean"] for r in rows1],
                        "r4": [r["reward_mean"] for r in rows4]}))
  """)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run([sys.executable, "-c", code], check=False, env=env, cwd=root, capture_output=True, text=True,
                       timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  import json
  res = json.loads(out.stdout.strip().splitlines()[-1])
  assert res["r1"] == res["r4"]  # same samples (sampling is replicated-deterministic)
  assert res["diff"] < 1e-4  # Adam (lr 3e-2) amplifies all-reduce summation-order differences


@pytest.mark.parametrize("configured, expected", [(None, 4), (9, 9)])
def test_drgrpo_divides_by_the_response_budget_not_the_prompt_plus_response(model, monkeypatch, configured,
                                                                            expected):
  """verl's seq-mean-token-sum-norm divides by loss_scale_factor, default the response length (its loss mask
  is [B, response_length]); our batch is prompt ++ response (4 + 4 − 1 = 7 targets), so the trainer must pass
  max_new_tokens = 4 unless the config sets it."""
  params, lora = model
  seen, update = [], grpo.grpo_update
  monkeypatch.setattr(trainer.grpo, "grpo_update", lambda *a, loss_cfg, **kw: (
      seen.append(loss_cfg), update(*a, loss_cfg=loss_cfg, **kw))[1])
  setup = make_setup()
  setup = dataclasses.replace(setup, loss_cfg=grpo.LossConfig(agg_mode="seq-mean-token-sum-norm",
                                                              loss_scale_factor=configured))
  trainer.train_step(setup, params, fresh_state(lora))
  assert [c.loss_scale_factor for c in seen] == [expected]


def _tensorboard_points(log_dir):
  """(tag, step, value) of every scalar in the event files (TFRecord framing: len, crc, data, crc)."""
  import struct

  from tensorboardX.proto import event_pb2
  points = []
  for f in sorted((log_dir / "tb").glob("events.out.tfevents.*")):
    data, i = f.read_bytes(), 0
    while i < len(data):
      (n,) = struct.unpack("<Q", data[i:i + 8])
      event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
      points += [(v.tag, event.step, v.simple_value) for v in event.summary.value]
      i += 12 + n + 4
  return sorted(points)


def test_tensorboard_is_rebuilt_from_metrics_jsonl_on_resume(tmp_path):
  """A killed run's event files keep points past its checkpoint; the resumed run writes them again. Rebuilt
  from metrics.jsonl at truncation, TensorBoard has each (tag, step) once, with the resumed run's values."""
  killed = MetricWriter(tmp_path, tensorboard=True)
  for s in range(5):
    killed.write(s, {"x": float(s)})
  killed._tb.flush()  # on disk when the process died (never closed)
  resumed = MetricWriter(tmp_path, tensorboard=True)
  resumed.truncate_rows(3)  # the checkpoint recorded 3 rows
  for s in (3, 4):
    resumed.write(s, {"x": 10.0 + s})
  resumed.close()
  assert _tensorboard_points(tmp_path) == [("x", 0, 0.0), ("x", 1, 1.0), ("x", 2, 2.0), ("x", 3, 13.0),
                                           ("x", 4, 14.0)]
