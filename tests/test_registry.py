"""Adding an extrapolation method is one function and one `extrapolate.register` line: the state machine,
the post-hoc back-test and the reports pick it up with no other change, and a knob it declares is set from
config.nxt.knobs. Likewise an advantage estimator is one function and one `grpo.register_estimator` line,
and a task with a knob is one spec dataclass, one sampler and one `tasks.TASKS.register` line (its knob set
from config.task.knobs). Every registry is a `next_jax.core.registry.Registry`."""

import dataclasses

import jax
import ml_collections
import numpy as np
import pytest
from tiny_rl import LCFG, fresh_state, make_setup, run

from experiments import report
from next_jax.configs import toy_arith
from next_jax.nxt import extrapolate as ex
from next_jax.nxt import posthoc
from next_jax.nxt.predictor import PredictorConfig
from next_jax.nxt.trajectory import Trajectory
from next_jax.rl import grpo, tasks
from next_jax.run import driver, experiment
from next_jax.run import state_machine as sm


def half_step(traj: Trajectory, t_target: float) -> dict:
  """A made-up fifth method: half of the last interval's increment, Δ = ½(W_t − W_{t−1})."""
  return {m: 0.5 * d for m, d in traj.deltas(traj.num - 1, traj.num - 2).items()}


@pytest.fixture
def fifth(monkeypatch):
  monkeypatch.setattr(ex, "METHODS", ex.METHODS.copy())  # the registration is undone after the test
  ex.register("half", "Half-step", lambda traj, n, key: (half_step(traj, ex.target_step(traj, n)), {}))
  return "half"


def test_a_registered_method_jumps_through_the_state_machine(model, fifth):
  params, lora = model
  setup = make_setup()
  ncfg = ex.NExtConfig(method=fifth, extrapolate_at=4, interval=2, k=1, total_steps=6)
  state = sm.init(setup, ncfg, params, fresh_state(lora))
  state = driver.advance(setup, ncfg, state, None)
  assert int(state.phase) == sm.EXTRAPOLATE and int(state.rl.step) == 4
  snaps = jax.tree.map(np.asarray, state.trajectory)
  jumped, info = driver.jump(setup, ncfg, driver.fork(state))
  assert info["method"] == fifth and info["alpha"] == 1.0  # registered without alpha: W + Δ
  w = lambda i: LCFG.scale * np.einsum("lri,lor->lio", snaps["q"]["a"][i], snaps["q"]["b"][i])  # noqa: E731
  moved = np.asarray(jumped.base_params["layers"]["q"]["kernel"]) - np.asarray(params["layers"]["q"]["kernel"])
  np.testing.assert_allclose(moved, 0.5 * (w(2) - w(1)), rtol=0, atol=1e-7)
  assert np.abs(moved).max() > 1e-4


def test_a_registered_method_is_back_tested_and_reported(fifth):
  rng = np.random.default_rng(0)
  snaps = {"q": {"a": rng.normal(size=(6, 1, 2, 5)).astype(np.float32),
                 "b": rng.normal(size=(6, 1, 4, 2)).astype(np.float32)}}
  traj = Trajectory(snaps, 10 * np.arange(6), 0.5)
  rows = posthoc.backtest(traj, 1, [2, 3], PredictorConfig(hidden=8, epochs=2), jax.random.key(0),
                          methods=tuple(ex.METHODS))
  mine = [r for r in rows if r["method"] == fifth]
  assert [r["origin"] for r in mine] == [20, 30]
  want = ex.delta_agreement(half_step(traj.window(3), 0.0), traj.deltas(4, 3))
  assert mine[1]["cos_global"] == pytest.approx(want["cos_global"], rel=1e-6)
  assert "Half-step" in report.main_order() and "Half-step" in report.method_labels()


def scaled_step(traj: Trajectory, ncfg) -> dict:
  """A method with a knob: Δ = β·(W_t − W_{t−1}), β = nxt.knobs.beta (default 0.5)."""
  beta = ex.method_knobs(ncfg)["beta"]
  return {m: beta * d for m, d in traj.deltas(traj.num - 1, traj.num - 2).items()}


def test_a_method_with_a_knob_is_one_registration_and_its_knob_a_config_field(model, monkeypatch):
  monkeypatch.setattr(ex, "METHODS", ex.METHODS.copy())
  ex.register("scaled", "Scaled step", lambda traj, n, key: (scaled_step(traj, n), {}), knobs={"beta": 0.5})
  c = toy_arith.get_config("quick")
  c.nxt.method, c.nxt.knobs = "scaled", ml_collections.ConfigDict({"beta": 0.25})
  experiment.validate(c)
  ncfg = dataclasses.replace(experiment.nxt_config(c), extrapolate_at=4, interval=2, k=1, total_steps=6)
  assert ex.method_knobs(ncfg) == {"beta": 0.25}
  assert ex.method_knobs(dataclasses.replace(ncfg, knobs=())) == {"beta": 0.5}  # the declared default
  params, lora = model
  setup = make_setup()
  state = driver.advance(setup, ncfg, sm.init(setup, ncfg, params, fresh_state(lora)), None)
  snaps = jax.tree.map(np.asarray, state.trajectory)
  jumped, _ = driver.jump(setup, ncfg, driver.fork(state))
  w = lambda i: LCFG.scale * np.einsum("lri,lor->lio", snaps["q"]["a"][i], snaps["q"]["b"][i])  # noqa: E731
  moved = np.asarray(jumped.base_params["layers"]["q"]["kernel"]) - np.asarray(params["layers"]["q"]["kernel"])
  np.testing.assert_allclose(moved, 0.25 * (w(2) - w(1)), rtol=0, atol=1e-7)
  c.nxt.knobs = ml_collections.ConfigDict({"betta": 0.25})
  with pytest.raises(experiment.ConfigError, match=r"method 'scaled' \(nxt\.knobs\): unknown knobs \['betta'\]; known: \['beta'\]"):
    experiment.validate(c)


@dataclasses.dataclass(frozen=True)
class MulSpec:
  """Knob of the made-up task `mul`: both factors uniform in 0..max_factor."""

  max_factor: int = 9


def _sample_mul(rng, spec: MulSpec):
  a, b = (int(rng.integers(0, spec.max_factor + 1)) for _ in range(2))
  prompt = f"{a}*{b}="
  return prompt, {"prompt": prompt, "answer": str(a * b), "solution": str(a * b)}


def test_a_task_with_a_knob_is_one_registration_and_its_knob_a_config_field(monkeypatch):
  monkeypatch.setattr(tasks, "TASKS", tasks.TASKS.copy())
  tasks.TASKS.register("mul", (MulSpec, _sample_mul, "exact"))
  c = toy_arith.get_config("quick")
  c.task.name, c.task.knobs = "mul", ml_collections.ConfigDict({"max_factor": 3})
  c.task.n_train, c.task.n_test, c.task.n_val = 8, 4, 0
  experiment.validate(c)
  train = tasks.make_task(c.task.name, c.task.n_train, seed=c.seed, split="train", **c.task.knobs.to_dict())
  factors = [int(x) for p in train for x in p.prompt.rstrip("=").split("*")]
  assert max(factors) <= 3 and all(p.answer == str(eval(p.prompt[:-1])) for p in train)  # noqa: S307
  with pytest.raises(ValueError, match=r"task 'mul': unknown knobs \['max_factr'\]; known: \['max_factor'\]"):
    tasks.make_task("mul", 4, seed=0, split="train", max_factr=3)


def test_every_registry_names_its_kind_for_an_unknown_name():
  from next_jax.core import registry  # noqa: PLC0415
  from next_jax.models import model_files  # noqa: PLC0415
  from next_jax.rl import rewards  # noqa: PLC0415
  for reg, kind in ((ex.METHODS, "extrapolation method"), (grpo.ESTIMATORS, "advantage estimator"),
                    (rewards.REWARDS, "reward"), (tasks.TASKS, "task"), (model_files.CONVERTERS, "model-file format")):
    assert isinstance(reg, registry.Registry)
    with pytest.raises(ValueError, match=f"unknown {kind} 'nope'; known: "):
      reg.lookup("nope")
  with pytest.raises(ValueError, match="reward 'math' is already registered"):
    rewards.REWARDS.copy().register("math", rewards.exact_reward)


def test_the_config_accepts_exactly_the_registered_names(fifth):
  assert ex.NExtConfig(method=fifth).method == fifth
  with pytest.raises(ValueError, match="choose from"):
    ex.NExtConfig(method="halve")
  assert dataclasses.replace(ex.NExtConfig(), method="none").method == "none"


# ------------------------------------------------------------------------------------ advantage estimators


SEEN = []  # token_kl's shape (or None) at each call of min_baseline


def min_baseline(rewards, mask, group_size, *, token_kl, kl_in_reward, **_):
  """A made-up estimator: A_i = r_i − min_g r (outcome), minus kl_in_reward·KL on each token."""
  r = rewards.reshape(-1, group_size)
  adv = (r - r.min(axis=1, keepdims=True)).reshape(-1)[:, None] * mask
  SEEN.append(None if token_kl is None else token_kl.shape)
  return adv if token_kl is None else adv - kl_in_reward * token_kl * mask


@pytest.fixture
def new_estimator(monkeypatch):
  monkeypatch.setattr(grpo, "ESTIMATORS", grpo.ESTIMATORS.copy())  # undone after the test
  grpo.register_estimator("min_baseline", min_baseline, token_kl=True)
  SEEN.clear()
  return "min_baseline"


def test_a_registered_estimator_is_accepted_by_the_config_and_computes_its_formula(new_estimator):
  c = toy_arith.get_config("quick")
  c.rl.estimator = new_estimator
  experiment.validate(c)
  c.rl.kl_in_reward = 0.1  # read by a token_kl=True estimator, refused for one that would ignore it
  experiment.validate(c)
  c.rl.estimator = "rloo"
  with pytest.raises(experiment.ConfigError, match=r"rl\.kl_in_reward=0\.1: rl\.estimator='rloo' reads no"):
    experiment.validate(c)
  c.rl.estimator, c.rl.kl_in_reward = "min_baseline_typo", 0.0
  with pytest.raises(experiment.ConfigError, match=r"rl\.estimator.*min_baseline"):
    experiment.validate(c)
  mask = np.array([[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 1, 1]], np.float32)
  kl = np.full((4, 3), 0.5, np.float32)
  got = grpo.compute_advantages(new_estimator, np.array([1.0, 0.0, 0.25, 1.0]), mask, 2, token_kl=kl,
                                kl_in_reward=0.1)
  np.testing.assert_allclose(got, np.array([[1, 1, 0], [0, 0, 0], [0, 0, 0], [0, 0.75, 0.75]]) - 0.05 * mask)


def test_the_trainer_gives_a_token_kl_estimator_its_kl(model, new_estimator):
  params, lora = model
  trained = {}
  for name, kl in ((new_estimator, 0.1), (new_estimator, 0.0), ("grpo", 0.0)):
    setup = dataclasses.replace(make_setup(), estimator=name, kl_in_reward=kl)
    state, _ = run(setup, params, fresh_state(lora), 1)
    trained[name, kl] = np.asarray(state.train.params["q"]["b"])
  assert SEEN == [(32, 4), None]  # 4 prompts × 8 samples, the 4 response targets; no KL pass at 0
  assert np.abs(trained[new_estimator, 0.0] - trained["grpo", 0.0]).max() > 1e-4  # its advantages were used
  assert grpo.ESTIMATORS["reinforce_pp"].token_kl and not grpo.ESTIMATORS["grpo"].token_kl
