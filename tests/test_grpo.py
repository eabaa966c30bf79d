"""GRPO-family estimators, losses and aggregation against values computed by hand from verl's formulas."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from next_jax.models import policy
from next_jax.rl import grpo


def close(a, b, tol=1e-5):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)


# ----------------------------------------------------------------------------------------- advantages


def test_grpo_advantage_uses_unbiased_std_per_contiguous_group():
  r = jnp.array([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
  a = 0.5 / (math.sqrt(1 / 3) + 1e-6)  # mean .5, unbiased std √(4·.25/3)
  close(grpo.grpo_advantages(r, 4), [a, -a, -a, a, 0, 0, 0, 0])


def test_grpo_advantage_of_a_group_of_one_is_zero():
  close(grpo.grpo_advantages(jnp.array([1.0, 0.0, 1.0]), 1), [0, 0, 0])


def test_groups_are_contiguous_not_interleaved():
  r = jnp.array([1.0, 0.0, 1.0, 1.0])  # groups (1,0) and (1,1)
  a = 0.5 / (math.sqrt(0.5) + 1e-6)
  close(grpo.grpo_advantages(r, 2), [a, -a, 0, 0])


def test_drgrpo_advantage_is_reward_minus_group_mean():
  close(grpo.drgrpo_advantages(jnp.array([1.0, 0.0, 0.0, 0.5]), 4), [0.625, -0.375, -0.375, 0.125])


def test_rloo_advantage_uses_leave_one_out_baseline():
  close(grpo.rloo_advantages(jnp.array([1.0, 0.0, 0.5]), 3), [1 - 0.25, 0 - 0.75, 0.5 - 0.5])
  close(grpo.rloo_advantages(jnp.array([1.0, 0.0]), 1), [0, 0])


def test_reinforce_pp_whitens_discounted_returns_over_the_batch():
  mask = jnp.array([[1, 1, 1, 0], [1, 1, 0, 0]], bool)
  tok_r = grpo.outcome_token_rewards(jnp.array([1.0, 0.0]), mask)
  close(tok_r, [[0, 0, 1, 0], [0, 0, 0, 0]])
  # γ = 1: returns [[1,1,1],[0,0]]; mean .6, unbiased var (3·.16 + 2·.36)/4 = .3
  s = 1 / math.sqrt(0.3 + 1e-8)
  close(grpo.reinforce_pp_advantages(tok_r, mask, 1.0),
        [[0.4 * s, 0.4 * s, 0.4 * s, 0], [-0.6 * s, -0.6 * s, 0, 0]])
  # γ = .5: returns [[.25, .5, 1], [0, 0]]
  g = np.array([0.25, 0.5, 1.0, 0.0, 0.0])
  w = (g - g.mean()) / math.sqrt(g.var(ddof=1) + 1e-8)
  close(grpo.reinforce_pp_advantages(tok_r, mask, 0.5), [[w[0], w[1], w[2], 0], [w[3], w[4], 0, 0]])


def test_reinforce_pp_kl_in_reward_subtracts_per_token_kl():
  mask = jnp.ones((2, 2), bool)
  kl = jnp.array([[0.1, 0.2], [0.0, 0.3]])
  got = grpo.compute_advantages("reinforce_pp", jnp.array([1.0, 0.0]), mask, 1, token_kl=kl, kl_in_reward=0.5)
  tok_r = np.array([[-0.05, 1 - 0.1], [0.0, -0.15]])
  returns = np.array([[tok_r[0].sum(), tok_r[0, 1]], [tok_r[1].sum(), tok_r[1, 1]]])
  close(got, (returns - returns.mean()) / math.sqrt(returns.var(ddof=1) + 1e-8))


def test_outcome_advantages_broadcast_over_response_tokens_only():
  mask = jnp.array([[0, 1, 1], [1, 1, 0]], bool)
  got = grpo.compute_advantages("drgrpo", jnp.array([1.0, 0.0]), mask, 2)
  close(got, [[0, 0.5, 0.5], [-0.5, -0.5, 0]])
  with pytest.raises(ValueError, match="estimator"):
    grpo.compute_advantages("ppo", jnp.array([1.0, 0.0]), mask, 2)


def test_overlong_penalty_is_linear_inside_the_cache_window():
  got = grpo.overlong_penalty(jnp.array([10, 12, 14, 16, 17]), max_len=16, cache_len=4)
  close(got, [0, 0, -0.5, -1.0, -1.0])


# ---------------------------------------------------------------------------------------------- losses


def test_kl_estimators_match_hand_values_and_clamps():
  lp, ref = jnp.array([-1.0]), jnp.array([-1.5])
  close(grpo.kl_estimate(lp, ref, "k1"), [0.5])
  close(grpo.kl_estimate(lp, ref, "abs"), [0.5])
  close(grpo.kl_estimate(lp, ref, "k2"), [0.125])
  close(grpo.kl_estimate(lp, ref, "low_var_kl"), [math.exp(-0.5) + 0.5 - 1])
  close(grpo.kl_estimate(jnp.array([-40.0]), jnp.array([0.0]), "k3"), [10.0])  # e^20 − 21 clamped


def test_ppo_loss_clip_higher_and_dual_clip():
  adv = jnp.array([1.0, -1.0, -1.0, 1.0, 1.0])
  log_ratio = jnp.array([0.5, 2.0, math.log(0.5), math.log(0.5), math.log(1.25)])
  loss, clipped, lower, _ = grpo.ppo_token_loss(log_ratio, jnp.zeros(5), adv, 0.2, 0.28, 3.0)
  # ρ=1.6487,A=1 → max(−1.6487, −1.28); ρ=7.389,A=−1 → min(7.389, 3); ρ=.5,A=−1 → max(.5,.8);
  # ρ=.5,A=1 → max(−.5, −.8); ρ=1.25,A=1 → within 1+0.28, unclipped
  close(loss, [-1.28, 3.0, 0.8, -0.5, -1.25])
  np.testing.assert_array_equal(clipped, [True, False, True, False, False])
  np.testing.assert_array_equal(lower, [False, True, False, False, False])
  loss_nodual, *_ = grpo.ppo_token_loss(log_ratio, jnp.zeros(5), adv, 0.2, 0.28, None)
  close(loss_nodual[1], math.exp(2.0))


def _verl_agg(loss, mask, mode, norm=None):
  """verl 0.9.1 agg_loss, written out in numpy (tests/test_verl.py runs verl's own)."""
  loss, mask = np.asarray(loss), np.asarray(mask, np.float32)
  if mode == "token-mean":
    return (loss * mask).sum() / mask.sum()
  seq_sum = (loss * mask).sum(-1)
  if mode == "token-sum":
    return seq_sum.sum()
  if mode == "seq-mean-token-sum":
    return seq_sum.mean()
  if mode == "seq-mean-token-mean":
    return (seq_sum / mask.sum(-1)).mean()
  return seq_sum.mean() / (norm or mask.shape[-1])  # Dr.GRPO: mean of sequence sums / response budget


@pytest.mark.parametrize("mode", grpo.AGG_MODES)
def test_aggregation_modes_equal_verl(mode):
  loss = jnp.array([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0], [-1.0, 0.5, 2.0, 0.0]])
  mask = jnp.array([[1, 1, 0, 0], [1, 1, 1, 1], [0, 1, 1, 0]], bool)
  s, d = grpo.aggregate(loss, mask, mode)
  close(s / d, _verl_agg(loss, mask, mode))


@pytest.mark.parametrize("mode", grpo.AGG_MODES)
def test_aggregation_sums_over_micro_batches_to_full_batch_value(mode):
  rng = np.random.RandomState(0)
  loss, mask = rng.randn(8, 5), rng.rand(8, 5) > 0.3
  mask[3] = False  # an empty (padding) row never counts as a sequence
  full_s, full_d = grpo.aggregate(loss, mask, mode, loss_scale_factor=7)
  parts = sum(grpo.agg_numerator(loss[i:i + 2], mask[i:i + 2], mode) for i in range(0, 8, 2))
  close(parts / full_d, full_s / full_d)
  keep = mask.any(-1)
  close(full_s / full_d, _verl_agg(loss[keep], mask[keep], mode, norm=7))


# ---------------------------------------------------------------------------------------------- update


@pytest.fixture(scope="module")
def tiny():
  cfg = policy.ModelConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_layers=1, num_heads=4,
                           num_kv_heads=2)
  params = policy.init_params(cfg, jax.random.key(0))
  lcfg = policy.LoraConfig(rank=4, alpha=8)
  lora = policy.init_lora(cfg, lcfg, jax.random.key(1))
  lora = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.key(2), x.shape), lora)  # B ≠ 0
  rng = np.random.RandomState(0)
  n, t = 8, 10
  tokens = rng.randint(0, 61, (n, t)).astype(np.int32)
  mask = np.ones((n, t), bool)
  mask[:4, :2] = False
  loss_mask = np.zeros((n, t - 1), bool)
  loss_mask[:, 4:] = rng.rand(n, t - 5) > 0.2
  adv = np.repeat(rng.randn(n, 1), t - 1, 1).astype(np.float32) * loss_mask
  batch = grpo.Batch(tokens=tokens, mask=mask, loss_mask=loss_mask, advantages=adv,
                     sampler_logprobs=np.zeros((n, t - 1), np.float32))
  return cfg, params, lcfg, lora, batch


def _sgd_step(tiny, **loss_kw):
  cfg, params, lcfg, lora, batch = tiny
  state = grpo.TrainState.create(jax.tree.map(jnp.array, lora), optax.sgd(1.0))
  new, metrics = grpo.grpo_update(state, params, batch, cfg=cfg, lora_cfg=lcfg,
                                  loss_cfg=grpo.LossConfig(**loss_kw))
  grads = jax.tree.map(lambda a, b: a - b, lora, new.params)  # SGD with lr 1: Δ = −grad
  return grads, metrics


def test_micro_batch_accumulation_equals_full_batch_gradient(tiny):
  mode = "seq-mean-token-mean"  # the mode whose per-row normalisation makes accumulation non-trivial
  full, m_full = _sgd_step(tiny, agg_mode=mode, kl_coef=0.05)
  micro, m_micro = _sgd_step(tiny, agg_mode=mode, kl_coef=0.05, micro_batch_size=2)
  for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(micro)):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4)
  assert float(jnp.abs(jax.tree.leaves(full)[0]).max()) > 1e-4  # the gradient is not trivially zero
  close(m_full["pg_loss"], m_micro["pg_loss"])


def _assert_same_update(a, b):
  """Two (gradient, metrics) results of `_sgd_step`: the same update and the same loss metrics."""
  for x, y in zip(jax.tree.leaves(a[0]), jax.tree.leaves(b[0])):
    np.testing.assert_allclose(x, y, atol=1e-6, rtol=1e-5)
  for k in ("pg_loss", "entropy", "kl_ref", "ppo_kl", "grad_norm"):
    close(a[1][k], b[1][k], tol=1e-6)


def test_logprob_tail_gives_the_same_update_without_the_prompts_logits(tiny):
  """loss_mask is zero before target 4, so logits for the last 5 targets are all the update needs."""
  _, _, _, _, batch = tiny
  assert not batch.loss_mask[:, :4].any()
  kw = dict(agg_mode="token-mean", kl_coef=0.05, entropy_coef=0.01, num_mini_batches=2)
  full, m_full = _sgd_step(tiny, **kw)
  _assert_same_update((full, m_full), _sgd_step(tiny, logprob_tail=5, **kw))
  cut, _ = _sgd_step(tiny, logprob_tail=3, **kw)  # too short a tail drops loss targets: a different update
  assert max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(cut))) > 1e-4


def test_logprob_chunks_give_the_same_update(tiny):
  """3-position blocks of the 5-target tail (the last block zero-padded): same update and metrics."""
  kw = dict(agg_mode="token-mean", kl_coef=0.05, entropy_coef=0.01, num_mini_batches=2, logprob_tail=5)
  _assert_same_update(_sgd_step(tiny, **kw), _sgd_step(tiny, logprob_chunk=3, **kw))


@pytest.mark.parametrize("tie", [False, True])
def test_chunked_head_values_and_gradients_equal_the_whole_head(tie):
  """head_logprobs with blocks of 4 over T = 13 vs all at once: log-probs, entropies, and the gradient of a
  mixed objective w.r.t. the hidden states and the head (the full-parameter path; tied: the embedding)."""
  cfg = policy.ModelConfig(vocab_size=97, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                           num_kv_heads=1, tie_embeddings=tie)
  params = policy.init_params(cfg, jax.random.key(0))
  hidden = jax.random.normal(jax.random.key(1), (3, 13, 16))
  targets = jax.random.randint(jax.random.key(2), (3, 13), 0, 97)
  weights = jax.random.normal(jax.random.key(3), (2, 3, 13))

  def objective(h, p, chunk):
    logp, entropy = policy.head_logprobs(p, h, targets, cfg, chunk)
    return (weights[0] * logp + weights[1] * entropy).sum(), (logp, entropy)

  grad = jax.grad(objective, argnums=(0, 1), has_aux=True)
  (gh0, gp0), (lp0, e0) = grad(hidden, params, 0)
  (gh1, gp1), (lp1, e1) = grad(hidden, params, 4)
  np.testing.assert_allclose(lp1, lp0, atol=1e-5)
  np.testing.assert_allclose(e1, e0, atol=1e-5)
  np.testing.assert_allclose(lp0, policy.token_logprobs(policy.logits_from_hidden(params, hidden, cfg), targets),
                             atol=1e-5)
  np.testing.assert_allclose(gh1, gh0, atol=1e-5)
  head = "embed" if tie else "lm_head"
  assert float(jnp.abs(gp0[head]).max()) > 1e-3
  np.testing.assert_allclose(gp1[head], gp0[head], atol=1e-5)


def test_update_gradient_equals_autodiff_of_the_written_out_objective(tiny):
  cfg, params, lcfg, lora, batch = tiny
  grads, metrics = _sgd_step(tiny, agg_mode="token-mean")

  def objective(lo):  # on-policy first step: ρ = 1 in value, ∇ρ = ∇log π
    logp, _ = grpo.sequence_logprobs(params, batch.tokens, batch.mask, cfg, lora=lo, lora_cfg=lcfg)
    ratio = jnp.exp(logp - jax.lax.stop_gradient(logp))
    m = batch.loss_mask
    return (-batch.advantages * ratio * m).sum() / m.sum()

  want = jax.grad(objective)(lora)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4)
  close(metrics["clipfrac"], 0.0)
  close(metrics["ppo_kl"], 0.0, tol=1e-6)


def test_mini_batches_take_several_optimiser_steps_and_then_clip(tiny):
  cfg, params, lcfg, lora, batch = tiny
  state = grpo.TrainState.create(jax.tree.map(jnp.array, lora), optax.sgd(5.0))
  new, metrics = grpo.grpo_update(state, params, batch, cfg=cfg, lora_cfg=lcfg,
                                  loss_cfg=grpo.LossConfig(num_mini_batches=4))
  assert int(new.step) == 4
  assert float(metrics["ppo_kl"]) != 0.0  # later mini-batches are off-policy w.r.t. the old logprobs


def test_reference_is_the_base_policy_without_lora(tiny):
  cfg, params, lcfg, lora, batch = tiny
  zero_b = jax.tree.map(jnp.array, lora)  # copies: the update donates its state
  for mod in zero_b.values():
    mod["b"] = jnp.zeros_like(mod["b"])
  state = grpo.TrainState.create(zero_b, optax.sgd(0.0))
  _, m0 = grpo.grpo_update(state, params, batch, cfg=cfg, lora_cfg=lcfg, loss_cfg=grpo.LossConfig(kl_coef=1.0))
  state = grpo.TrainState.create(jax.tree.map(jnp.array, lora), optax.sgd(0.0))
  _, m1 = grpo.grpo_update(state, params, batch, cfg=cfg, lora_cfg=lcfg, loss_cfg=grpo.LossConfig(kl_coef=1.0))
  close(m0["kl_ref"], 0.0, tol=1e-7)
  assert float(m1["kl_ref"]) > 1e-4


def _nan_rows(batch, rows):
  adv = np.array(batch.advantages)
  adv[rows, 5] = np.nan
  return batch.replace(advantages=adv)


def test_nonfinite_loss_skips_the_update_and_keeps_the_state_bit_identical(tiny):
  cfg, params, lcfg, lora, batch = tiny
  tx = optax.adam(1e-2)
  state = grpo.TrainState.create(jax.tree.map(jnp.array, lora), tx)
  before = jax.tree.map(np.array, (state.params, state.opt_state, state.step))
  new, metrics = grpo.grpo_update(state, params, _nan_rows(batch, [0]), cfg=cfg, lora_cfg=lcfg,
                                  loss_cfg=grpo.LossConfig())
  assert float(metrics["nonfinite_updates"]) == 1.0
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves((new.params, new.opt_state, new.step))):
    np.testing.assert_array_equal(a, np.asarray(b))


def test_only_the_faulty_mini_batch_is_skipped(tiny):
  cfg, params, lcfg, lora, batch = tiny
  state = grpo.TrainState.create(jax.tree.map(jnp.array, lora), optax.sgd(1.0))
  new, metrics = grpo.grpo_update(state, params, _nan_rows(batch, [5]), cfg=cfg, lora_cfg=lcfg,
                                  loss_cfg=grpo.LossConfig(num_mini_batches=4))  # rows 4-5: mini-batch 2
  assert float(metrics["nonfinite_updates"]) == 1.0 and int(new.step) == 3
  # Reference: mini-batch 2 with zero advantages instead (a zero gradient: its SGD step changes nothing),
  # so the three healthy mini-batches must have moved the weights exactly as they do here.
  adv = np.array(batch.advantages)
  adv[4:6] = 0.0
  ref_state = grpo.TrainState.create(jax.tree.map(jnp.array, lora), optax.sgd(1.0))
  ref, ref_metrics = grpo.grpo_update(ref_state, params, batch.replace(advantages=adv), cfg=cfg, lora_cfg=lcfg,
                                      loss_cfg=grpo.LossConfig(num_mini_batches=4))
  assert float(ref_metrics["nonfinite_updates"]) == 0.0
  for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(ref.params), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-7)
  assert max(float(jnp.abs(b - a).max()) for a, b in zip(jax.tree.leaves(lora), jax.tree.leaves(ref.params))) > 1e-4


def test_finite_update_reports_zero_faults(tiny):
  _, metrics = _sgd_step(tiny)
  assert float(metrics["nonfinite_updates"]) == 0.0
