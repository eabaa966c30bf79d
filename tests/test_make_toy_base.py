"""next_jax/run/toy_base.py on a tiny build (30 steps): the HF directory it writes, its character-level
tokenizer through AutoTokenizer, caching, determinism from the seed, and loading through hf.load_model."""

from __future__ import annotations

import json

import pytest

from next_jax.models import hf, toy
from next_jax.models.policy import count_params
from next_jax.rl import data, tasks
from next_jax.run import toy_base as mtb

TINY = dict(seed=0, steps=30, n_train=512, n_test=64, show_progress=False)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  """(parent dir, the tiny build's directory)."""
  parent = tmp_path_factory.mktemp("toy_base")
  return parent, mtb.build_toy_base(parent / "a", **TINY)


def test_directory_structure(built):
  parent, out = built
  for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", mtb.META_FILE):
    assert (out / name).is_file(), name
  assert not [p.name for p in parent.iterdir() if p.name.startswith(".")]  # no staging directory left behind
  config = json.loads((out / "config.json").read_text())
  assert config["model_type"] == "qwen2" and config["hidden_size"] == 64 and config["num_hidden_layers"] == 2
  meta = json.loads((out / mtb.META_FILE).read_text())
  assert meta["settings"]["steps"] == 30 and meta["settings"]["seed"] == 0
  assert meta["settings"] == mtb.ToyBaseSettings(seed=0, steps=30, n_train=512, n_test=64).to_json()
  res = meta["results"]  # the accuracies are recomputed from the directory in test_loads_through_hf_load_model
  assert res["n_test"] == 64 and res["final_loss"] < res["loss_curve"][0][1]
  # the stages' times (each rounded to 0.01 s) add up to the total
  stages = res["setup_seconds"] + res["train_seconds"] + res["eval_seconds"]
  assert abs(res["wall_seconds"] - stages) <= 0.02, res


def test_auto_tokenizer_one_token_per_char(built):
  import transformers  # noqa: PLC0415

  _, out = built
  tok = transformers.AutoTokenizer.from_pretrained(str(out), local_files_only=True)
  assert type(tok).__name__ == "Qwen2Tokenizer"
  assert len(tok) == len(mtb.ALPHABET) + 3 == json.loads((out / "config.json").read_text())["vocab_size"]
  assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
  assert tok.convert_ids_to_tokens([tok.eos_token_id, tok.pad_token_id]) == ["<|im_end|>", "<|endoftext|>"]
  problems = tasks.make_task("arith", 50, 3, split="test")
  for text in [data.format_prompt(p, raw=True) for p in problems] + [p.answer for p in problems]:
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids == [tok.convert_tokens_to_ids(c) for c in text] and len(ids) == len(text)
    assert tok.decode(ids) == text
  answer = tok(problems[0].answer + "<|im_end|>", add_special_tokens=False)["input_ids"]
  assert answer[-1] == tok.eos_token_id and tok.decode(answer, skip_special_tokens=True) == problems[0].answer


def test_cached_call_does_not_rebuild(built, monkeypatch):
  _, out = built
  stamp = (out / mtb.META_FILE).stat().st_mtime_ns
  monkeypatch.setattr(mtb, "_build", lambda *a, **k: pytest.fail("a cached build was retrained"))
  assert mtb.build_toy_base(out, **TINY) == out
  assert (out / mtb.META_FILE).stat().st_mtime_ns == stamp
  assert not mtb._cached(out, mtb.ToyBaseSettings(seed=1, steps=30, n_train=512, n_test=64).to_json())


def test_same_seed_same_bytes(built):
  parent, out = built
  other = mtb.build_toy_base(parent / "b", **TINY)
  assert (other / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
  assert (other / "tokenizer.json").read_bytes() == (out / "tokenizer.json").read_bytes()


def test_loads_through_hf_load_model(built):
  _, out = built
  cfg, params, tok = hf.load_model(out)
  meta = json.loads((out / mtb.META_FILE).read_text())
  assert cfg.qkv_bias and cfg.rope_theta == 10_000.0 and cfg.vocab_size == len(tok)
  assert count_params(params) == meta["results"]["param_count"]
  test_set = tasks.make_task("arith", 64, 0, split="test")  # test_seed 0, whatever the build seed
  acc, examples = mtb.evaluate(cfg, params, tok, test_set, temperature=0.0)
  assert acc == meta["results"]["greedy_accuracy"] and examples == meta["results"]["examples"]["greedy"]
  acc, examples = mtb.evaluate(cfg, params, tok, test_set, temperature=1.0, seed=0)
  assert acc == meta["results"]["sampled_accuracy"] and examples == meta["results"]["examples"]["sampled"]


def test_char_tokenizer_rejects_multibyte_and_maps_space():
  tok = toy.build_char_tokenizer("12 +")
  assert tok("1 + 2", add_special_tokens=False)["input_ids"] == [0, 2, 3, 2, 1]
  assert tok.decode(tok("1 + 2", add_special_tokens=False)["input_ids"]) == "1 + 2"
  with pytest.raises(ValueError, match="single-byte"):
    toy.build_char_tokenizer("12×")
  assert (tok.pad_token_id, tok.eos_token_id, len(tok)) == (4, 6, 7)  # specials follow the 4 characters
