"""Numerical faults: a non-finite update is skipped and counted, a streak of them stops the run at the last
good checkpoint, and a non-finite extrapolation is refused (no jump, weights untouched)."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_rl import CFG, fresh_state, low_token_reward, make_setup

from next_jax.configs import toy_arith
from next_jax.core.checkpoint import Checkpointer
from next_jax.models import hf, policy
from next_jax.nxt.extrapolate import NExtConfig
from next_jax.rl import trainer
from next_jax.run import driver, experiment
from next_jax.run import state_machine as sm

PLAIN = NExtConfig(method="none", extrapolate_at=2, interval=2, total_steps=5)  # RL only
LONG = dataclasses.replace(PLAIN, total_steps=8)
JUMP = NExtConfig(method="rl_extra", extrapolate_at=4, interval=2, k=1, total_steps=6)
PER_STEP = 4 * 8  # reward calls per RL step (prompts_per_step × group_size of make_setup)


def nan_reward_on(steps):
  """A reward that is NaN on the given (1-based) RL steps, judged by its call count."""
  calls = [0]

  def reward(text, problem):
    calls[0] += 1
    return float("nan") if (calls[0] - 1) // PER_STEP + 1 in steps else low_token_reward(text, problem)

  return reward


def leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_an_isolated_fault_is_skipped_counted_and_the_run_goes_on(model):
  params, lora = model
  setup = dataclasses.replace(make_setup(), reward=nan_reward_on({3}))
  seen, after_3 = {}, []

  def on_step(s, m):
    seen[int(s.rl.step)] = (m["nonfinite_updates"], leaves(s.rl.train.params))
    if int(s.rl.step) == 3:
      after_3.append(driver.fork(s.rl))  # train_step donates its input state

  state = sm.init(setup, PLAIN, params, fresh_state(lora))
  state = driver.run(setup, PLAIN, state, max_faults=2, progress_bar=False, on_step=on_step)
  assert int(state.rl.step) == PLAIN.total_steps and sm.PHASES[int(state.phase)] == "DONE"
  assert [seen[s][0] for s in sorted(seen)] == [0, 0, 1, 0, 0]
  for a, b in zip(seen[2][1], seen[3][1]):  # step 3's update was skipped: params as after step 2
    np.testing.assert_array_equal(a, b)
  # the run goes on: step 4 is the plain RL step (finite rewards from step 4 on) from the state step 3 left
  ref, _ = trainer.train_step(make_setup(), params, after_3[0])
  for a, b in zip(seen[4][1], leaves(ref.train.params), strict=True):
    np.testing.assert_array_equal(a, b)
  assert max(np.abs(a - b).max() for a, b in zip(seen[3][1], seen[4][1])) > 1e-3  # and it moved the weights


def test_a_streak_of_faults_restores_the_last_good_checkpoint_and_stops(model, tmp_path):
  params, lora = model
  setup = dataclasses.replace(make_setup(), reward=nan_reward_on({5, 6, 7}))
  ckpt = Checkpointer(tmp_path / "ckpt", max_to_keep=None)
  state = sm.init(setup, LONG, params, fresh_state(lora))
  at_4 = []
  with pytest.raises(driver.NumericalFault, match=r"3 consecutive RL steps \(up to step 7\).*RL step 4") as e:
    driver.run(setup, LONG, state, checkpointer=ckpt, checkpoint_every=2, max_faults=3, progress_bar=False,
               on_step=lambda s, m: at_4.extend(leaves(s)) if int(s.rl.step) == 4 else None)
  restored = e.value.state
  assert int(restored.rl.step) == 4
  for a, b in zip(at_4, leaves(restored), strict=True):
    np.testing.assert_array_equal(a, b)
  assert len(ckpt.all_steps()) == 2  # steps 2 and 4; none written during the streak


def _poisoned(ncfg, setup, params, lora):
  state = sm.init(setup, ncfg, params, fresh_state(lora))
  traj = jax.tree.map(lambda t: t.at[-1].set(jnp.nan), state.trajectory)
  return state.replace(trajectory=traj, count=jnp.asarray(ncfg.num_snapshots, jnp.int32),
                       phase=jnp.asarray(sm.EXTRAPOLATE, jnp.int32))


@pytest.mark.parametrize("method", ["rl_extra", "next"])
def test_a_non_finite_extrapolation_is_refused_and_leaves_the_weights_alone(model, method, monkeypatch):
  params, lora = model
  setup, ncfg = make_setup(), dataclasses.replace(JUMP, method=method)
  if method == "next":  # a diverged predictor (training one here would cost ~40 s of compilation)
    monkeypatch.setattr(sm.extrapolate, "next_predict", lambda traj, *a, **kw: (
        {m: jnp.full((CFG.num_layers, *CFG.module_shape(m)), jnp.nan) for m in traj.snapshots}, {}))
  state = _poisoned(ncfg, setup, params, lora)
  before = leaves((state.base_params, state.rl.train))
  after, info = sm.extrapolate_step(setup, ncfg, state)
  assert info["finite"] is False and info["alpha"] == 0.0
  for a, b in zip(before, leaves((after.base_params, after.rl.train)), strict=True):
    np.testing.assert_array_equal(a, b)
  assert sm.PHASES[int(after.phase)] == "CONTINUE"


# ------------------------------------------------------------------- a policy destroyed on purpose (issue 17)


def _killer_config(model_dir, workdir, lr):
  """lr warms up from 0 over 2 steps: step 1's update is zero (accepted, checkpointed: ckpt.every 1), and
  from step 2 on lr = lr/2, whose finite update replaces the weights (lr 1e4) or is ~1e30 (lr 1e30)."""
  c = toy_arith.get_config("quick")
  c.model.dir, c.workdir = str(model_dir), str(workdir)
  c.rl.lr, c.rl.warmup_steps, c.rl.max_faults, c.ckpt.every, c.log.progress = lr, 2, 3, 1, False
  return c


@pytest.mark.parametrize("lr", [1e4, 1e30])
def test_a_destroyed_policy_stops_at_the_last_good_checkpoint_and_resumes_only_as_advised(lr, toy_model_dir,
                                                                                        tmp_path):
  wd = tmp_path / "run"
  c = _killer_config(toy_model_dir, wd, lr)
  with pytest.raises(driver.NumericalFault, match=r"3 consecutive RL steps \(up to step 4\).*RL step 1, written "
                                                  r"before the faults began.*ckpt\.allow_changes=rl\.lr") as err:
    experiment.run(c)
  rows = [json.loads(x) for x in (wd / "metrics.jsonl").read_text().splitlines()]
  assert [(r["step"], r["oversized_updates"], r["nonfinite_updates"]) for r in rows if "oversized_updates" in r] \
      == [(1, 0, 0), (2, 1, 0), (3, 1, 0), (4, 1, 0)]
  assert min(r["update_ratio_max"] for r in rows if r["step"] > 1) > c.rl.max_update_ratio
  ck = Checkpointer(wd / "ckpt", read_only=True)
  assert {ck.read_meta(s)["step"] for s in ck.all_steps()} == {1}  # nothing written during the streak
  ck.close()
  good = err.value.state  # the restored state: the weights of step 1 (= the initial ones: lr was 0)
  cfg, base, _ = hf.load_model(toy_model_dir, dtype=c.model.dtype or None, tokenizer=False)
  init = policy.init_lora(cfg, experiment.lora_config(c), jax.random.PRNGKey(c.seed))  # as experiment.build
  assert int(good.rl.step) == 1
  for a, b in zip(leaves((good.base_params, good.rl.train.params)), leaves((base, init)), strict=True):
    np.testing.assert_array_equal(a, b)
  if lr == 1e30:
    return  # the resume path below is the same for both
  # the same config again replays the streak from its start: the fault count cannot be reset by a resume
  c.ckpt.resume = True
  with pytest.raises(driver.NumericalFault, match=r"3 consecutive RL steps \(up to step 4\)"):
    experiment.run(c)
  c.rl.lr = 1e-3  # the advice: a lower lr, allowed explicitly, is recorded
  with pytest.raises(experiment.ConfigError, match=r"rl\.lr: .* → 0\.001.*ckpt\.allow_changes"):
    experiment.run(c)
  c.ckpt.allow_changes = "rl.lr"
  results = experiment.run(c)
  assert results["resume_changes"] == [{"step": 1, "changes": [{"field": "rl.lr", "old": lr, "new": 1e-3}]}]
  assert results["oversized_steps"] == 0 and results["nonfinite_steps"] == 0 and results["steps"] == 12
  saved = json.loads((wd / "results.json").read_text())
  assert saved["resume_changes"] == results["resume_changes"]
  assert json.loads((wd / "config.json").read_text())["rl"]["lr"] == 1e-3
