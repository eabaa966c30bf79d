"""Our GRPO-family formulas against the installed verl release's own functions (verl.trainer.ppo.core_algos).

verl is installed by `make test` without its GPU training stack (Makefile: VERL); these tests import it and
fail, not skip, when it is missing. Values and gradients are compared on random inputs with padding rows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import verl
from verl.trainer.ppo import core_algos

from next_jax.rl import grpo

N, T, G = 8, 7, 4


def test_the_verl_release_is_the_one_the_readme_names():
  assert verl.__version__.startswith("0.9."), verl.__version__


@pytest.fixture(scope="module")
def data():
  rng = np.random.default_rng(0)
  mask = rng.random((N, T)) > 0.3
  mask[:, 0] = True
  mask[5] = False  # an empty (padding) row
  return {"loss": rng.standard_normal((N, T)), "mask": mask, "logp": -rng.random((N, T)) * 3,
          "ref": -rng.random((N, T)) * 3, "old": -rng.random((N, T)) * 3, "adv": rng.standard_normal((N, T)),
          "rewards": rng.integers(0, 2, N).astype(np.float64) + 0.1 * rng.standard_normal(N)}


def _t(x):
  return torch.tensor(np.asarray(x, np.float64))


@pytest.mark.parametrize("mode", grpo.AGG_MODES)
@pytest.mark.parametrize("scale", [None, 5])
def test_agg_loss_equals_verl(data, mode, scale):
  s, d = grpo.aggregate(jnp.asarray(data["loss"], jnp.float32), jnp.asarray(data["mask"]), mode, scale)
  ref = core_algos.agg_loss(_t(data["loss"]), _t(data["mask"]), mode, loss_scale_factor=scale)
  np.testing.assert_allclose(float(s / d), ref.item(), rtol=1e-5)


@pytest.mark.parametrize("kind", grpo.KL_ESTIMATORS)
def test_kl_penalty_values_and_gradients_equal_verl(data, kind):
  logp = _t(data["logp"]).requires_grad_(True)
  ref = core_algos.kl_penalty(logp, _t(data["ref"]), kind)
  ref.sum().backward()
  ours = grpo.kl_estimate(jnp.asarray(data["logp"], jnp.float32), jnp.asarray(data["ref"], jnp.float32), kind)
  grad = jax.grad(lambda lp: grpo.kl_estimate(lp, jnp.asarray(data["ref"], jnp.float32), kind).sum())(
      jnp.asarray(data["logp"], jnp.float32))
  np.testing.assert_allclose(np.asarray(ours), ref.detach().numpy(), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(grad), logp.grad.numpy(), rtol=1e-5, atol=1e-6)


def test_straight_through_kl_differs_from_its_base_only_in_the_gradient(data):
  lp, ref = jnp.asarray(data["logp"], jnp.float32), jnp.asarray(data["ref"], jnp.float32)
  np.testing.assert_array_equal(grpo.kl_estimate(lp, ref, "k3+"), grpo.kl_estimate(lp, ref, "k3"))
  g3 = jax.grad(lambda x: grpo.kl_estimate(x, ref, "k3").sum())(lp)
  g3p = jax.grad(lambda x: grpo.kl_estimate(x, ref, "k3+").sum())(lp)
  np.testing.assert_allclose(g3p, lp - ref, rtol=1e-6)  # k2's gradient
  assert float(jnp.abs(g3 - g3p).max()) > 0.1


class _ActorCfg(dict):
  """The fields of verl's ActorConfig that compute_policy_loss_vanilla reads."""

  __getattr__ = dict.__getitem__


@pytest.mark.parametrize("mode", grpo.AGG_MODES)
def test_vanilla_ppo_loss_and_gradient_equal_verl(data, mode):
  cfg = _ActorCfg(clip_ratio=0.2, clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0,
                  global_batch_info={"loss_scale_factor": T} if mode == "seq-mean-token-sum-norm" else {})
  logp = _t(data["logp"]).requires_grad_(True)
  ref, _ = core_algos.compute_policy_loss_vanilla(_t(data["old"]), logp, _t(data["adv"]), _t(data["mask"]),
                                                 mode, cfg)
  ref.backward()
  mask = jnp.asarray(data["mask"])

  def ours(lp):
    loss, *_ = grpo.ppo_token_loss(lp, jnp.asarray(data["old"], jnp.float32), jnp.asarray(data["adv"], jnp.float32),
                                   0.2, 0.28, 3.0)
    s, d = grpo.aggregate(loss, mask, mode, T)
    return s / d

  value, grad = jax.value_and_grad(ours)(jnp.asarray(data["logp"], jnp.float32))
  np.testing.assert_allclose(float(value), ref.item(), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(grad), logp.grad.numpy(), rtol=1e-4, atol=1e-7)


def _index():
  return np.repeat(np.arange(N // G), G)


@pytest.mark.parametrize("estimator", ["grpo", "drgrpo", "rloo"])
def test_outcome_advantages_equal_verl(data, estimator):
  mask = data["mask"].copy()
  mask[5] = True  # every row has a response here
  scores = np.zeros((N, T))
  scores[np.arange(N), T - 1 - np.argmax(mask[:, ::-1], 1)] = data["rewards"]
  fn = {"grpo": core_algos.compute_grpo_outcome_advantage, "rloo": core_algos.compute_rloo_outcome_advantage,
        "drgrpo": lambda *a: core_algos.compute_grpo_outcome_advantage(*a, norm_adv_by_std_in_grpo=False)}
  ref, _ = fn[estimator](_t(scores), _t(mask), _index())
  ours = grpo.compute_advantages(estimator, jnp.asarray(data["rewards"], jnp.float32), jnp.asarray(mask), G)
  np.testing.assert_allclose(np.asarray(ours), ref.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_reinforce_pp_advantages_equal_verl_with_masked_tokens_inside_a_response(data, gamma):
  rng = np.random.default_rng(1)
  mask = data["mask"].copy()
  token_rewards = rng.standard_normal((N, T)) * mask
  algo = _ActorCfg(gamma=gamma)
  ref, _ = core_algos.compute_reinforce_plus_plus_outcome_advantage(_t(token_rewards), _t(mask), config=algo)
  ours = grpo.reinforce_pp_advantages(jnp.asarray(token_rewards, jnp.float32), jnp.asarray(mask), gamma)
  np.testing.assert_allclose(np.asarray(ours), ref.numpy(), rtol=1e-4, atol=1e-5)
