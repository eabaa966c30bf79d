"""next_jax.models.sampler: KV-cache sampling against cache-free full forwards, stop masking, group tiling, logits
processing. Every `generate` call below shares one of four static signatures (MAX_NEW is under one decode
segment, so each is a prefill and one decode program). Long responses: tests/test_sampler_length.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from next_jax.models import policy, sampler

PROMPTS = [[5, 17, 99, 3, 250, 42, 8, 61], [7, 7, 130, 2, 19], [201, 33]]  # left-padded to 8
MAX_NEW = 6
LORA = policy.LoraConfig(rank=4, alpha=8.0)


@pytest.fixture(scope="module")
def prompts():
  tokens, mask = sampler.pad_prompts(PROMPTS, pad_id=0, length=8)
  return jnp.asarray(tokens), jnp.asarray(mask)


@pytest.fixture(scope="module")
def gen(main_model, prompts):
  """generate(seed, temperature, top_p, **kwargs) on the main model and PROMPTS, max_new_tokens=MAX_NEW →
  numpy outputs."""
  cfg, params = main_model
  tokens, mask = prompts

  def run(seed=0, temperature=1.0, top_p=1.0, **kwargs):
    # temperature/top_p always passed: an omitted traced argument is baked in as a constant (a new program).
    out = sampler.generate(params, tokens, mask, jax.random.key(seed), cfg=cfg, max_new_tokens=MAX_NEW,
                           temperature=temperature, top_p=top_p, **kwargs)
    return jax.tree.map(np.asarray, out)

  return run


def _reference_greedy(fwd, params, cfg, tokens, mask, n, lora=None, lora_cfg=None):
  """Greedy decoding with the cache-free full forward: at step i, argmax of the logits at the last real
  position of [prompt, tokens so far]. The buffer has a fixed length (future slots masked, invisible under
  the causal mask), so this compiles once. Returns (tokens int[B, n], model logprobs of them fp32[B, n],
  logits of the first step fp32[B, V])."""
  b, t = tokens.shape
  buf = np.concatenate([np.asarray(tokens), np.zeros((b, n), np.int32)], axis=1)
  buf_mask = np.concatenate([np.asarray(mask), np.zeros((b, n), bool)], axis=1)
  logps, first = np.zeros((b, n), np.float32), None
  for i in range(n):
    logits, _ = fwd(params, buf, cfg, mask=buf_mask, lora=lora, lora_cfg=lora_cfg)
    step = np.asarray(logits[:, t - 1 + i])
    first = step if first is None else first
    buf[:, t + i], buf_mask[:, t + i] = step.argmax(-1), True
    logps[:, i] = np.asarray(jax.nn.log_softmax(step))[np.arange(b), buf[:, t + i]]
  return buf[:, t:], logps, first


@pytest.fixture(scope="module")
def greedy(gen):
  return gen(temperature=0.0)


@pytest.fixture(scope="module")
def reference_greedy(main_model, fwd, prompts):
  cfg, params = main_model
  return _reference_greedy(fwd, params, cfg, *prompts, MAX_NEW)


# --------------------------------------------------------------------------------------------- greedy


def test_greedy_equals_stepwise_argmax_of_full_forward(greedy, reference_greedy):
  np.testing.assert_array_equal(greedy.tokens, reference_greedy[0])
  assert greedy.mask.all() and (greedy.lengths == MAX_NEW).all()


def test_greedy_logprobs_are_model_logprobs_of_the_argmax(greedy, reference_greedy):
  np.testing.assert_allclose(greedy.logprobs, reference_greedy[1], atol=1e-4, rtol=0)


def test_greedy_with_lora_equals_stepwise_argmax_of_lora_forward(gen, main_model, fwd, prompts, random_lora,
                                                                 greedy):
  cfg, params = main_model
  lora = random_lora(cfg, LORA)
  out = gen(temperature=0.0, lora=lora, lora_cfg=LORA)
  expected, _, _ = _reference_greedy(fwd, params, cfg, *prompts, MAX_NEW, lora=lora, lora_cfg=LORA)
  assert (expected != greedy.tokens).any()  # the adapter changes the greedy continuation
  np.testing.assert_array_equal(out.tokens, expected)


def test_num_samples_tiles_each_prompt_into_a_contiguous_group(gen, greedy):
  """Greedy with G=3: rows [3p, 3p+3) are three copies of prompt p's greedy row (one prefill, tiled)."""
  out = gen(temperature=0.0, num_samples=3)
  np.testing.assert_array_equal(out.tokens, np.repeat(greedy.tokens, 3, axis=0))
  np.testing.assert_allclose(out.logprobs, np.repeat(greedy.logprobs, 3, axis=0), atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------ sampling


def test_sampled_logprobs_equal_full_forward_token_logprobs(gen, main_model, fwd, prompts):
  """temperature 1, no top-k/top-p: the sampler's log π(token) equals the recomputed full-forward
  `token_logprobs` of [prompt, response], with row r scored against prompt r // G."""
  cfg, params = main_model
  tokens, mask = prompts
  g, t = 3, tokens.shape[1]  # the G=3 program of the tiling test
  out = gen(seed=1, temperature=1.0, top_p=1.0, num_samples=g)
  expected = np.zeros_like(out.logprobs)
  for j in range(g):  # sample j of every group, scored against the prompts (the [3, 14] reference program)
    seq = np.concatenate([np.asarray(tokens), out.tokens[j::g]], axis=1)
    seq_mask = np.concatenate([np.asarray(mask), out.mask[j::g]], axis=1)
    logits, _ = fwd(params, seq, cfg, mask=seq_mask)
    expected[j::g] = policy.token_logprobs(logits[:, t - 1:-1], jnp.asarray(out.tokens[j::g]))
  assert out.mask.all()
  assert (out.tokens[0::g] != out.tokens[1::g]).any()  # the group members are different samples
  np.testing.assert_allclose(out.logprobs[out.mask], expected[out.mask], atol=1e-4, rtol=0)


def test_same_rng_gives_same_samples(gen):
  a, b = gen(seed=3, temperature=1.0), gen(seed=3, temperature=1.0)
  np.testing.assert_array_equal(a.tokens, b.tokens)
  np.testing.assert_array_equal(a.logprobs, b.logprobs)


def test_different_rng_gives_different_samples(gen):
  assert (gen(seed=3, temperature=1.0).tokens != gen(seed=4, temperature=1.0).tokens).any()


def test_first_token_distribution_is_per_prompt(reference_greedy, gen):
  """171 draws of G=3 first tokens per prompt at temperature 0.5, top-p 0.7: every token of group p lies in
  prompt p's nucleus (computed here in numpy), in proportions matching its renormalised probabilities within
  4.5 standard errors. The three nuclei are disjoint, so a row sampled from the wrong prompt is caught."""
  g, draws, temperature, top_p = 3, 171, 0.5, 0.7
  first = np.stack([gen(seed=100 + s, temperature=temperature, top_p=top_p, num_samples=g).tokens[:, 0]
                    for s in range(draws)])  # [draws, B·G]
  last = reference_greedy[2] / temperature  # full-forward logits at each prompt's last token
  nuclei = []
  for p, row in enumerate(last):
    probs = np.exp(row - row.max())
    probs /= probs.sum()
    order = np.argsort(-probs)
    size = int(np.searchsorted(np.cumsum(probs[order]), top_p)) + 1  # smallest prefix with mass ≥ top_p
    ids = order[:size]
    nuclei.append(set(ids.tolist()))
    group = first[:, p * g:(p + 1) * g].ravel()
    assert set(group.tolist()) <= nuclei[p]
    expected = probs[ids] / probs[ids].sum()
    freq = np.array([(group == i).mean() for i in ids])
    n = group.size
    assert (np.abs(freq - expected) <= 4.5 * np.sqrt(expected * (1 - expected) / n)).all(), (freq, expected)
  assert not (nuclei[0] & nuclei[1] or nuclei[0] & nuclei[2] or nuclei[1] & nuclei[2])
  assert all(len(nucleus) >= 2 for nucleus in nuclei)  # really sampled, not argmax


# ---------------------------------------------------------------------------------------------- stops


def test_stop_token_ends_row_with_padding_after_it(gen, greedy):
  """Stop ids = the 3rd greedy token of row 0 and the 5th of row 1, so each row stops at its first emitted
  stop id (row 0 by step 2, row 1 by step 4): tokens up to and including the stop are the greedy ones
  (mask 1), then pad_id (mask 0, logprob 0), and lengths count the stop token."""
  stops = (int(greedy.tokens[0, 2]), int(greedy.tokens[1, 4]))
  pad = int(min(set(range(256)) - set(greedy.tokens.ravel().tolist())))  # a pad id greedy never emits
  out = gen(temperature=0.0, stop_ids=stops, pad_id=pad)
  hit = np.isin(greedy.tokens, stops)
  ends = [int(np.argmax(row)) + 1 if row.any() else MAX_NEW for row in hit]
  assert ends[0] <= 3 and ends[1] <= 5
  for r, end in enumerate(ends):
    np.testing.assert_array_equal(out.tokens[r, :end], greedy.tokens[r, :end])
    assert (out.tokens[r, end:] == pad).all()
    np.testing.assert_array_equal(out.mask[r], np.arange(MAX_NEW) < end)
    assert (out.logprobs[r, end:] == 0).all()
  np.testing.assert_array_equal(out.lengths, ends)


def test_prompt_chunks_give_the_greedy_rows_and_group_layout_of_one_call(gen, greedy):
  """prompt_chunk=1, G=2: the 3 prompts go one at a time through prefill + decode; greedy rows equal the
  one-call rows, grouped as before; with stop ids each chunk stops on its own rows."""
  out = gen(temperature=0.0, num_samples=2, prompt_chunk=1)
  np.testing.assert_array_equal(out.tokens, np.repeat(greedy.tokens, 2, axis=0))
  np.testing.assert_allclose(out.logprobs, np.repeat(greedy.logprobs, 2, axis=0), atol=1e-5, rtol=0)
  sampled = gen(seed=5, temperature=1.0, num_samples=2, prompt_chunk=1)
  assert sampled.tokens.shape == (6, MAX_NEW) and (sampled.tokens[0::2] != sampled.tokens[1::2]).any()
  with pytest.raises(ValueError, match="prompt_chunk=2 does not divide the 3 prompts"):
    gen(temperature=0.0, prompt_chunk=2)


def test_temperature_and_top_p_are_traced_not_recompiled(gen):
  gen(temperature=0.5, top_p=0.9)  # compiled (or reused from an earlier test)
  before = sampler.compiled_programs()
  for temperature, top_p in ((0.0, 1.0), (0.7, 0.95), (1.3, 0.5)):
    gen(temperature=temperature, top_p=top_p)
  assert sampler.compiled_programs() == before


# ------------------------------------------------------------------------------------ process_logits

LOGITS = jnp.array([1.0, 3.0, 2.0, 0.0])  # softmax ≈ [.0871, .6439, .2369, .0321]; by probability: 1, 2, 0, 3
NEG = -1e30  # dropped tokens get the most negative finite float (or -inf)


def _kept(processed) -> list[int]:
  return sorted(np.flatnonzero(np.asarray(processed) > NEG).tolist())


def test_process_logits_divides_by_temperature():
  out = sampler.process_logits(LOGITS, jnp.float32(2.0), 0, jnp.float32(1.0))
  np.testing.assert_allclose(out, LOGITS / 2.0, rtol=1e-6)


@pytest.mark.parametrize("k, kept", [(1, [1]), (2, [1, 2]), (3, [0, 1, 2])])
def test_process_logits_top_k_keeps_exactly_k(k, kept):
  out = sampler.process_logits(LOGITS, jnp.float32(1.0), k, jnp.float32(1.0))
  assert _kept(out) == kept
  np.testing.assert_array_equal(np.asarray(out)[kept], np.asarray(LOGITS)[kept])


@pytest.mark.parametrize("p, kept", [(0.5, [1]), (0.64, [1]), (0.65, [1, 2]), (0.88, [1, 2]),
                                     (0.89, [0, 1, 2]), (0.96, [0, 1, 2]), (0.97, [0, 1, 2, 3]),
                                     (1.0, [0, 1, 2, 3])])
def test_process_logits_top_p_keeps_minimal_nucleus(p, kept):
  """Smallest set of most likely tokens with mass ≥ p; cumulative masses: .6439, .8808, .9679, 1."""
  out = sampler.process_logits(LOGITS, jnp.float32(1.0), 0, jnp.float32(p))
  assert _kept(out) == kept


def test_process_logits_applies_top_p_to_the_top_k_distribution():
  """After top-3 the mass of token 2 ends at .910 (not .881), so p=0.9 needs only {1, 2}."""
  out = sampler.process_logits(LOGITS, jnp.float32(1.0), 3, jnp.float32(0.9))
  assert _kept(out) == [1, 2]


def test_process_logits_works_on_batches():
  batch = jnp.stack([LOGITS, jnp.array([5.0, 0.0, 1.0, 4.0])])
  out = sampler.process_logits(batch, jnp.float32(1.0), 2, jnp.float32(1.0))
  assert (_kept(out[0]), _kept(out[1])) == ([1, 2], [0, 3])


def _nucleus_numpy(logits: np.ndarray, p: float) -> set[int]:
  """Sort the whole vocabulary (float64): the smallest most-likely prefix whose mass reaches p."""
  probs = np.exp(logits - logits.max())
  probs /= probs.sum()
  order = np.argsort(-probs, kind="stable")
  before = np.cumsum(probs[order]) - probs[order]
  return set(order[(before < p) | (np.arange(len(order)) == 0)].tolist())


@pytest.mark.parametrize("scale", [4.0, 0.05])
@pytest.mark.parametrize("p", [0.5, 0.9])
def test_top_p_equals_a_float64_sort_on_peaked_and_flat_rows(scale, p):
  """4096-token rows, peaked (scale 4: a nucleus of a few tokens) and flat (scale 0.05: hundreds of
  tokens), plus a row of exact ties: the bisection keeps the same set as a float64 sort of the whole
  vocabulary."""
  logits = np.random.RandomState(int(scale * 100 + p * 10)).randn(4, 4096).astype(np.float32) * scale
  logits[3] = np.round(logits[3])  # many exact ties at every value
  out = np.asarray(sampler.process_logits(jnp.asarray(logits), jnp.float32(1.0), 0, jnp.float32(p)))
  sizes = []
  for row, got in zip(logits, out):
    want = _nucleus_numpy(row.astype(np.float64), p)
    want |= set(np.flatnonzero(row >= min(row[list(want)])).tolist())  # ties with the last kept token stay
    assert set(np.flatnonzero(got > NEG).tolist()) == want
    sizes.append(len(want))
  assert (max(sizes) < 100) if scale > 1 else (min(sizes) > 500)


# ------------------------------------------------------------------------------------------ padding


def test_pad_prompts_left_pads_to_bucket():
  tokens, mask = sampler.pad_prompts([[1, 2, 3], [4]], pad_id=9, buckets=(2, 4, 8))
  np.testing.assert_array_equal(tokens, [[9, 1, 2, 3], [9, 9, 9, 4]])
  np.testing.assert_array_equal(mask, [[False, True, True, True], [False, False, False, True]])


def test_bucket_length_picks_smallest_bucket_that_fits():
  assert [sampler.bucket_length(n, (16, 32)) for n in (1, 16, 17, 32)] == [16, 16, 32, 32]
  with pytest.raises(ValueError, match="exceeds the largest bucket 32"):
    sampler.bucket_length(33, (16, 32))


def test_pad_prompts_rejects_empty_prompt():
  with pytest.raises(ValueError, match="at least one token"):
    sampler.pad_prompts([[1], []], pad_id=0)
