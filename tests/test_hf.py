"""next_jax.models.hf: HF directory round trips, PEFT adapters against the real `peft`, loader errors, tokenizer."""

import json
import re
import shutil

import jax
import ml_dtypes
import numpy as np
import peft
import pytest
import safetensors.numpy
import safetensors.torch
import torch
from conftest import MAIN, load_torch_model, torch_logits

from next_jax.core import outdir
from next_jax.models import hf, peft_io, policy, toy

EXPORT_ATOL = 1e-4
HEADER_TOO_LONG = r"model\.safetensors: header length \d+ exceeds the file size"
LORA_ALL = policy.LoraConfig(rank=4, alpha=8.0)  # == test_policy's cases: shares their compiled forwards
LORA_SUBSET = policy.LoraConfig(rank=2, alpha=5.0, targets=("q", "v", "down"))
LORA_RSLORA = policy.LoraConfig(rank=4, alpha=3.0, targets=("k", "o", "gate", "up"), rslora=True)


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _copy_dir(src, dst, config_edit=None):
  shutil.copytree(src, dst)
  if config_edit:
    cfg = json.loads((dst / "config.json").read_text())
    config_edit(cfg)
    (dst / "config.json").write_text(json.dumps(cfg))
  return dst


# ------------------------------------------------------------------------------------- round trips


def test_save_model_round_trip_is_bit_identical(main_model, tmp_path):
  cfg, params = main_model
  out = hf.save_model(tmp_path / "export", cfg, params)
  cfg2, params2, _ = hf.load_model(out, tokenizer=False)
  assert cfg2 == cfg
  _assert_trees_equal(params2, params)


def test_save_model_with_lora_writes_merged_params(main_model, random_lora, tmp_path):
  cfg, params = main_model
  lora = random_lora(cfg, LORA_ALL)
  out = hf.save_model(tmp_path / "merged", cfg, params, lora=lora, lora_cfg=LORA_ALL)
  _, loaded, _ = hf.load_model(out, tokenizer=False)
  _assert_trees_equal(loaded, policy.merge_lora(params, lora, LORA_ALL))


def test_save_model_replaces_a_dir_it_wrote_without_leftovers_and_refuses_a_users_dir(main_model, tmp_path):
  cfg, params = main_model
  out = hf.save_model(tmp_path / "out", cfg, params)
  (out / "stale.txt").write_text("old")
  hf.save_model(out, cfg, params)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary directory or lock left behind
  assert sorted(p.name for p in out.iterdir()) == [outdir.MARKER, "config.json", "model.safetensors"]
  (tmp_path / "mine").mkdir()
  (tmp_path / "mine" / "notes.txt").write_text("keep")
  with pytest.raises(outdir.OutputError, match=r"mine holds files next_jax did not write.*overwrite=True"):
    hf.save_model(tmp_path / "mine", cfg, params)
  assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_exported_model_keeps_the_source_token_ids_and_generation_config(hf_model, main_model, tmp_path):
  """transformers' generate stops on generation_config's eos: an export without it never stops (issue 17)."""
  import transformers  # noqa: PLC0415
  cfg, params = main_model
  src = _copy_dir(hf_model(MAIN).path, tmp_path / "src", lambda c: c.update(bos_token_id=1, eos_token_id=2))
  (src / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 5], "pad_token_id": 3,
                                                          "temperature": 0.7, "do_sample": True}))
  out = hf.save_model(tmp_path / "export", cfg, params, source_dir=src)
  written = json.loads((out / "config.json").read_text())
  assert (written["bos_token_id"], written["eos_token_id"], written["pad_token_id"]) == (1, [2, 5], 3)
  gen = transformers.GenerationConfig.from_pretrained(out)
  assert (gen.bos_token_id, gen.eos_token_id, gen.pad_token_id, gen.temperature) == (1, [2, 5], 3, 0.7)
  assert load_torch_model(out).generation_config.eos_token_id == [2, 5]


def test_exported_model_takes_token_ids_from_the_tokenizer_without_a_source(main_model, tmp_path):
  cfg, params = main_model
  tok = toy.build_char_tokenizer("0123456789+-*=", out_dir=tmp_path / "tok")
  out = hf.save_model(tmp_path / "export", cfg, params, tokenizer=tok)
  ids = {k: tok_id for k in hf.TOKEN_IDS if (tok_id := getattr(tok, k)) is not None}
  assert ids.get("eos_token_id") is not None
  assert json.loads((out / "generation_config.json").read_text()) == ids
  written = json.loads((out / "config.json").read_text())
  assert {k: written[k] for k in ids} == ids


@pytest.mark.parametrize("name", [MAIN, "qwen_mha_tied", "llama"])
def test_transformers_loads_exported_model(name, hf_model, fwd, padded_batch, tmp_path):
  """Our config.json + safetensors (both re-written by us) load in transformers with identical logits."""
  cfg, params, _ = hf.load_model(hf_model(name).path, tokenizer=False)
  out = hf.save_model(tmp_path / "export", cfg, params)
  tokens, mask = padded_batch
  ours, _ = fwd(params, tokens, cfg, mask=mask)
  theirs = torch_logits(load_torch_model(out), tokens, mask)
  np.testing.assert_allclose(theirs[mask], np.asarray(ours)[mask], atol=EXPORT_ATOL, rtol=0)


def test_transformers_loads_exported_lora_merged_model(main_model, fwd, padded_batch, random_lora, tmp_path):
  cfg, params = main_model
  lora = random_lora(cfg, LORA_ALL)
  out = hf.save_model(tmp_path / "merged", cfg, params, lora=lora, lora_cfg=LORA_ALL)
  tokens, mask = padded_batch
  ours, _ = fwd(params, tokens, cfg, mask=mask, lora=lora, lora_cfg=LORA_ALL)
  theirs = torch_logits(load_torch_model(out), tokens, mask)
  np.testing.assert_allclose(theirs[mask], np.asarray(ours)[mask], atol=EXPORT_ATOL, rtol=0)


def test_config_to_hf_round_trips_through_config_from_hf(hf_model):
  cfg = hf.load_config(hf_model("llama").path)
  assert hf.config_from_hf(hf.config_to_hf(cfg)) == cfg


def test_write_safetensors_is_readable_by_the_safetensors_library(tmp_path):
  tensors = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "i": np.array([1, -2, 3], np.int32),
             "h": np.array([[0.5, -1.25]], np.float16)}
  bf16 = np.array([1.5, -3.0], ml_dtypes.bfloat16)
  hf.write_safetensors(tmp_path / "x.safetensors", {**tensors, "b": bf16})
  theirs = safetensors.numpy.load_file(str(tmp_path / "x.safetensors"))  # no bf16 in numpy: checked via torch
  for k, v in tensors.items():
    assert theirs[k].dtype == v.dtype
    np.testing.assert_array_equal(theirs[k], v)
  theirs_bf16 = safetensors.torch.load_file(str(tmp_path / "x.safetensors"))["b"]
  assert theirs_bf16.dtype == torch.bfloat16 and theirs_bf16.float().tolist() == [1.5, -3.0]


def test_read_safetensors_reads_what_write_safetensors_wrote(tmp_path):
  tensors = {"a": np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32),
             "b": np.array([1.5, -3.0, 0.0078125], ml_dtypes.bfloat16), "empty": np.zeros((0, 2), np.float32)}
  hf.write_safetensors(tmp_path / "x.safetensors", tensors)
  back = hf.read_safetensors(tmp_path / "x.safetensors")
  assert sorted(back) == sorted(tensors)
  for k, v in tensors.items():
    assert back[k].dtype == v.dtype and back[k].shape == v.shape
    np.testing.assert_array_equal(back[k], v)


# ------------------------------------------------------------------------------------------- PEFT


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
@pytest.mark.parametrize("lcfg", [LORA_ALL, LORA_SUBSET, LORA_RSLORA], ids=["all", "subset", "rslora"])
def test_peft_loads_our_adapter_with_our_logits(lcfg, hf_model, main_model, fwd, padded_batch, random_lora,
                                                tmp_path):
  cfg, params = main_model
  lora = random_lora(cfg, lcfg, seed=5)
  adapter = peft_io.save_peft_adapter(tmp_path / "adapter", cfg, lora, lcfg)
  tokens, mask = padded_batch
  ours, _ = fwd(params, tokens, cfg, mask=mask, lora=lora, lora_cfg=lcfg)
  base = load_torch_model(hf_model(MAIN).path)
  peft_model = peft.PeftModel.from_pretrained(base, str(adapter)).eval()
  theirs = torch_logits(peft_model, tokens, mask)
  base_logits, _ = fwd(params, tokens, cfg, mask=mask)
  assert np.abs(theirs - np.asarray(base_logits))[mask].max() > 0.1  # PEFT really applied the adapter
  np.testing.assert_allclose(theirs[mask], np.asarray(ours)[mask], atol=EXPORT_ATOL, rtol=0)


def test_peft_adapter_config_names_hf_modules(main_model, random_lora, tmp_path):
  cfg, _ = main_model
  adapter = peft_io.save_peft_adapter(tmp_path / "adapter", cfg, random_lora(cfg, LORA_SUBSET), LORA_SUBSET)
  acfg = json.loads((adapter / "adapter_config.json").read_text())
  assert acfg["target_modules"] == ["down_proj", "q_proj", "v_proj"]
  assert (acfg["peft_type"], acfg["r"], acfg["lora_alpha"], acfg["use_rslora"]) == ("LORA", 2, 5.0, False)


@pytest.mark.parametrize("lcfg", [LORA_SUBSET, LORA_RSLORA], ids=["subset", "rslora"])
def test_load_peft_adapter_round_trips_exactly(lcfg, main_model, random_lora, tmp_path):
  cfg, _ = main_model
  lora = random_lora(cfg, lcfg, seed=7)
  adapter = peft_io.save_peft_adapter(tmp_path / "adapter", cfg, lora, lcfg)
  lcfg2, lora2 = peft_io.load_peft_adapter(adapter, cfg)
  assert lcfg2 == lcfg
  _assert_trees_equal(lora2, lora)


def test_load_peft_adapter_rejects_wrong_rank_tensor(main_model, random_lora, tmp_path):
  cfg, _ = main_model
  adapter = peft_io.save_peft_adapter(tmp_path / "adapter", cfg, random_lora(cfg, LORA_SUBSET), LORA_SUBSET)
  acfg = json.loads((adapter / "adapter_config.json").read_text())
  (adapter / "adapter_config.json").write_text(json.dumps({**acfg, "r": 3}))
  msg = "layers.0.self_attn.q_proj.lora_A.weight is shape (2, 64); expected (3, 64)"
  with pytest.raises(hf.CheckpointError, match=re.escape(msg)):
    peft_io.load_peft_adapter(adapter, cfg)


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
@pytest.mark.parametrize("rslora", [False, True], ids=["plain", "rslora"])
def test_rank_and_alpha_patterns_load_with_peft_logits(rslora, hf_model, main_model, fwd, padded_batch, tmp_path):
  """peft's rank_pattern / alpha_pattern, per module type and per layer (a regex key), folded into one rank
  and scale: our forward equals peft's (with the patterns ignored, q alone would be 0.34 off, issue 17)."""
  cfg, params = main_model
  torch.manual_seed(0)
  base = load_torch_model(hf_model(MAIN).path)
  pcfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=rslora,
                         rank_pattern={"q_proj": 2, "layers.1.mlp.down_proj": 6},
                         alpha_pattern={"q_proj": 32, r"layers\.0\..*v_proj": 3}, init_lora_weights=False)
  model = peft.get_peft_model(base, pcfg).eval()
  model.save_pretrained(tmp_path / "adapter")
  tokens, mask = padded_batch
  theirs = torch_logits(model, tokens, mask)
  lcfg, lora = peft_io.load_peft_adapter(tmp_path / "adapter", cfg)
  assert (lcfg.rank, lcfg.targets, lcfg.rslora) == (6, ("q", "v", "down"), rslora)
  np.testing.assert_allclose(lcfg.scale, 8 / (2.0 if rslora else 4.0))  # the plain r and lora_alpha's scale
  ours, _ = fwd(params, tokens, cfg, mask=mask, lora=lora, lora_cfg=lcfg)
  np.testing.assert_allclose(theirs[mask], np.asarray(ours)[mask], atol=EXPORT_ATOL, rtol=0)
  plain = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
  (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({**plain, "alpha_pattern": {}}))
  lcfg2, lora2 = peft_io.load_peft_adapter(tmp_path / "adapter", cfg)  # the ranks still fit, the scales not
  wrong, _ = fwd(params, tokens, cfg, mask=mask, lora=lora2, lora_cfg=lcfg2)
  assert np.abs(np.asarray(wrong) - theirs)[mask].max() > 0.1
  (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({**plain, "rank_pattern": {}}))
  with pytest.raises(hf.CheckpointError, match=r"q_proj\.lora_A\.weight is shape \(2, 64\); expected \(4, 64\)"):
    peft_io.load_peft_adapter(tmp_path / "adapter", cfg)


@pytest.mark.parametrize("field, value", [("rank_pattern", {"q_proj": 0}), ("alpha_pattern", {"q_proj": "x"}),
                                          ("alpha_pattern", {"(": 2}), ("rank_pattern", ["q_proj"])])
def test_bad_patterns_are_refused_naming_the_field(field, value, main_model, random_lora, tmp_path):
  cfg, _ = main_model
  adapter = peft_io.save_peft_adapter(tmp_path / "adapter", cfg, random_lora(cfg, LORA_SUBSET), LORA_SUBSET)
  acfg = json.loads((adapter / "adapter_config.json").read_text())
  (adapter / "adapter_config.json").write_text(json.dumps({**acfg, field: value}))
  with pytest.raises(hf.CheckpointError, match=f"adapter_config.json: {field}"):
    peft_io.load_peft_adapter(adapter, cfg)


# ------------------------------------------------------------------------------------------- errors


def test_missing_model_dir_is_reported(tmp_path):
  with pytest.raises(hf.CheckpointError, match="nope: model directory does not exist"):
    hf.load_model(tmp_path / "nope", tokenizer=False)


def test_missing_config_json_is_reported(hf_model, tmp_path):
  d = _copy_dir(hf_model(MAIN).path, tmp_path / "m")
  (d / "config.json").unlink()
  with pytest.raises(hf.CheckpointError, match=r"config\.json: missing"):
    hf.load_model(d, tokenizer=False)


def test_unsupported_model_type_is_reported(hf_model, tmp_path):
  d = _copy_dir(hf_model(MAIN).path, tmp_path / "m", lambda c: c.update(model_type="gpt2"))
  with pytest.raises(hf.CheckpointError, match=r"config\.json: model_type='gpt2'.* not supported"):
    hf.load_model(d, tokenizer=False)


def test_missing_config_field_is_reported(hf_model, tmp_path):
  d = _copy_dir(hf_model(MAIN).path, tmp_path / "m", lambda c: c.pop("hidden_size"))
  with pytest.raises(hf.CheckpointError, match=r"config\.json: required field 'hidden_size' is missing"):
    hf.load_model(d, tokenizer=False)


@pytest.mark.parametrize("edit", [dict(num_attention_heads=8), dict(num_attention_heads=8, head_dim=16),
                                  dict(num_key_value_heads=4)], ids=["heads", "heads_and_head_dim", "kv_heads"])
def test_head_counts_that_disagree_with_the_projections_are_reported(edit, hf_model, tmp_path):
  """heads·head_dim and kv_heads·head_dim are the q/k/v/o widths: a config.json that changes them is caught
  by the shapes. (One that keeps every width, e.g. heads 4 → 8 with kv heads 2 → 4 and head_dim 16 → 8,
  cannot be told from the tensors; transformers loads it too.)"""
  d = _copy_dir(hf_model(MAIN).path, tmp_path / "m", lambda c: c.update(**edit))
  with pytest.raises(hf.CheckpointError, match=r"self_attn\.[qkvo]_proj\.weight.*shape"):
    hf.load_model(d, tokenizer=False)


def test_unsupported_rope_scaling_is_reported(hf_model, tmp_path):
  d = _copy_dir(hf_model(MAIN).path, tmp_path / "m", lambda c: c["rope_parameters"].update(
      rope_type="yarn", factor=4.0))
  with pytest.raises(hf.CheckpointError, match=r"config\.json: rope_type='yarn'"):
    hf.load_model(d, tokenizer=False)


def test_tensor_shape_disagreeing_with_config_is_reported(hf_model, tmp_path):
  d = _copy_dir(hf_model(MAIN).path, tmp_path / "m", lambda c: c.update(intermediate_size=96))
  with pytest.raises(hf.CheckpointError, match=re.escape(
      "tensor model.layers.0.mlp.gate_proj.weight has shape (128, 64) but config.json implies (96, 64)")):
    hf.load_model(d, tokenizer=False)


def test_missing_tensor_is_reported(hf_model, tmp_path):
  d = _copy_dir(hf_model(MAIN).path, tmp_path / "m")
  tensors = hf.read_safetensors(d / "model.safetensors")
  del tensors["model.layers.1.self_attn.v_proj.bias"]
  hf.write_safetensors(d / "model.safetensors", {k: np.array(v) for k, v in tensors.items()})
  msg = "missing tensors ['model.layers.1.self_attn.v_proj.bias']"
  with pytest.raises(hf.CheckpointError, match=re.escape(msg)):
    hf.load_model(d, tokenizer=False)


def test_truncated_safetensors_is_reported(hf_model, tmp_path):
  d = _copy_dir(hf_model(MAIN).path, tmp_path / "m")
  data = (d / "model.safetensors").read_bytes()
  (d / "model.safetensors").write_bytes(data[:len(data) // 2])
  with pytest.raises(hf.CheckpointError, match=r"model\.safetensors: tensor \S+ lies outside the file"):
    hf.load_model(d, tokenizer=False)


def test_truncated_safetensors_header_is_reported(hf_model, tmp_path):
  d = _copy_dir(hf_model(MAIN).path, tmp_path / "m")
  (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:100])
  with pytest.raises(hf.CheckpointError, match=HEADER_TOO_LONG):
    hf.load_model(d, tokenizer=False)


def test_git_lfs_pointer_instead_of_safetensors_is_reported(hf_model, tmp_path):
  """A clone without git-lfs leaves ~130-byte text pointers: the bytes 'version ' read as a 2.3e18-byte
  header length, which must not reach f.read (MemoryError)."""
  d = _copy_dir(hf_model(MAIN).path, tmp_path / "m")
  (d / "model.safetensors").write_text("version https://git-lfs.github.com/spec/v1\n"
                                       "oid sha256:" + "0" * 64 + "\nsize 262144\n")
  with pytest.raises(hf.CheckpointError, match=HEADER_TOO_LONG):
    hf.load_model(d, tokenizer=False)


def test_non_object_safetensors_header_is_reported(tmp_path):
  blob = b"[1, 2, 3]"
  (tmp_path / "x.safetensors").write_bytes(len(blob).to_bytes(8, "little") + blob)
  with pytest.raises(hf.CheckpointError, match=r"x\.safetensors: not a readable safetensors file"):
    hf.read_safetensors(tmp_path / "x.safetensors")


def test_pickle_only_checkpoint_is_refused_with_conversion_hint(hf_model, tmp_path):
  d = _copy_dir(hf_model(MAIN).path, tmp_path / "m")
  (d / "model.safetensors").unlink()
  torch.save(hf_model(MAIN).torch_model.state_dict(), d / "pytorch_model.bin")
  msg = (r"Found \['pytorch_model\.bin'\]: pickled checkpoints are never loaded; convert .*"
         r"save_pretrained\(d, safe_serialization=True\)")
  with pytest.raises(hf.CheckpointError, match=msg):
    hf.load_model(d, tokenizer=False)


def test_sharded_checkpoint_loads_like_single_file(hf_model, main_model, tmp_path):
  d = _copy_dir(hf_model(MAIN).path, tmp_path / "m")
  tensors = hf.read_safetensors(d / "model.safetensors")
  (d / "model.safetensors").unlink()
  shards = {"model-00001-of-00002.safetensors": [k for k in tensors if ".layers.1." not in k],
            "model-00002-of-00002.safetensors": [k for k in tensors if ".layers.1." in k]}
  for shard, names in shards.items():
    hf.write_safetensors(d / shard, {k: np.array(tensors[k]) for k in names})
  index = {"metadata": {"total_size": 0}, "weight_map": {k: s for s, names in shards.items() for k in names}}
  (d / "model.safetensors.index.json").write_text(json.dumps(index))
  _, params, _ = hf.load_model(d, tokenizer=False)
  _assert_trees_equal(params, main_model[1])


def test_index_naming_a_missing_shard_is_reported(hf_model, tmp_path):
  d = _copy_dir(hf_model(MAIN).path, tmp_path / "m")
  tensors = hf.read_safetensors(d / "model.safetensors")
  (d / "model.safetensors").rename(d / "model-00001-of-00002.safetensors")
  weight_map = {k: "model-00001-of-00002.safetensors" for k in tensors}
  weight_map["model.norm.weight"] = "model-00002-of-00002.safetensors"
  (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
  msg = r"index\.json names shard model-00002-of-00002\.safetensors, which is missing"
  with pytest.raises(hf.CheckpointError, match=msg):
    hf.load_model(d, tokenizer=False)


# --------------------------------------------------------------------------------------------- bf16


@pytest.fixture(scope="module")
def torch_bf16_dir(hf_model, tmp_path_factory):
  """The main model converted by torch to bf16 and saved by transformers; its bf16 state dict."""
  model = load_torch_model(hf_model(MAIN).path).to(torch.bfloat16)
  path = tmp_path_factory.mktemp("bf16")
  model.save_pretrained(str(path))
  return path, {k: v.float().numpy() for k, v in model.state_dict().items()}


def test_torch_bf16_safetensors_read_as_ml_dtypes_bfloat16(torch_bf16_dir):
  path, _ = torch_bf16_dir
  tensors = hf.read_safetensors(path / "model.safetensors")
  assert {t.dtype for t in tensors.values()} == {np.dtype(ml_dtypes.bfloat16)}


def test_torch_bf16_checkpoint_loads_with_torch_values(torch_bf16_dir):
  path, state = torch_bf16_dir
  cfg, params, _ = hf.load_model(path, tokenizer=False)
  assert cfg.dtype == "bfloat16"
  ours = hf.params_to_hf(params, cfg)
  assert sorted(ours) == sorted(state)
  for name, value in ours.items():
    assert value.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(value.astype(np.float32), state[name], err_msg=name)


def test_bf16_checkpoint_upcast_to_fp32_is_exact(torch_bf16_dir):
  path, state = torch_bf16_dir
  cfg, params, _ = hf.load_model(path, dtype="float32", tokenizer=False)
  assert cfg.dtype == "float32"
  embed = np.asarray(params["embed"])
  assert embed.dtype == np.float32
  np.testing.assert_array_equal(embed, state["model.embed_tokens.weight"])


# ---------------------------------------------------------------------------------- toy + tokenizer

TOY_CFG = policy.ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                             num_kv_heads=2)


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
  out = tmp_path_factory.mktemp("toy") / "model"
  return toy.make_random_model_dir(out, TOY_CFG, seed=3, weight_scale=2.0)


def test_toy_dir_loads_with_chatml_tokenizer(toy_dir):
  cfg, _, tok = hf.load_model(toy_dir)
  assert cfg == TOY_CFG
  assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
  assert tok.pad_token == "<|endoftext|>"
  assert len(tok) <= cfg.vocab_size
  text = tok.apply_chat_template([{"role": "user", "content": "what is 2+3*4?"}], tokenize=False,
                                 add_generation_prompt=True)
  assert text == "<|im_start|>user\nwhat is 2+3*4?<|im_end|>\n<|im_start|>assistant\n"


def test_toy_tokenizer_round_trips_text_with_special_tokens_as_single_ids(toy_dir):
  tok = hf.load_tokenizer(toy_dir)
  text = "<|im_start|>user\nThe answer is \\boxed{42}.<|im_end|>"
  ids = tok.encode(text)
  assert tok.decode(ids) == text
  assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>") and ids[-1] == tok.eos_token_id
  assert max(ids) < TOY_CFG.vocab_size


def test_toy_dir_holds_init_params_with_scaled_kernels(toy_dir):
  _, params, _ = hf.load_model(toy_dir, tokenizer=False)
  ref = policy.init_params(TOY_CFG, jax.random.key(3))
  np.testing.assert_array_equal(params["layers"]["q"]["kernel"], 2 * np.asarray(ref["layers"]["q"]["kernel"]))
  np.testing.assert_array_equal(params["layers"]["q"]["bias"], ref["layers"]["q"]["bias"])
  np.testing.assert_array_equal(params["embed"], ref["embed"])
  np.testing.assert_array_equal(params["layers"]["mlp_norm"], np.ones((2, 64), np.float32))


def test_model_dir_without_tokenizer_files_is_reported(hf_model):
  """transformers 5 would silently return a 1-token tokenizer built from config.json alone."""
  with pytest.raises(hf.CheckpointError, match=r"cannot load a tokenizer \(none of \('tokenizer\.json'"):
    hf.load_tokenizer(hf_model(MAIN).path)


def test_qwen2_tokenizers_follow_auto_tokenizer_not_the_raw_tokenizer_json(tmp_path):
  """transformers 5 builds Qwen2 tokenizers with its own digit-isolating pre-tokenizer, not the ByteLevel one
  a tokenizer.json may hold, so raw `tokenizers` and AutoTokenizer disagree on digits (" 4": "Ġ4" vs "Ġ", "4").
  We load through AutoTokenizer (hf.load_tokenizer), as the real checkpoints' users do."""
  import tokenizers  # noqa: PLC0415
  import transformers  # noqa: PLC0415
  toy.build_char_tokenizer("0123456789+-*= ", out_dir=tmp_path)
  tj = json.loads((tmp_path / "tokenizer.json").read_text())
  merged = max([*tj["model"]["vocab"].values(), *(t["id"] for t in tj["added_tokens"])]) + 1
  tj["model"]["vocab"]["Ġ4"], tj["model"]["merges"] = merged, [*tj["model"]["merges"], ["Ġ", "4"]]
  tj["pre_tokenizer"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
  (tmp_path / "tokenizer.json").write_text(json.dumps(tj))
  raw = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json")).encode(" 4", add_special_tokens=False)
  auto = transformers.AutoTokenizer.from_pretrained(tmp_path)(" 4", add_special_tokens=False)["input_ids"]
  ours = hf.load_tokenizer(tmp_path)(" 4", add_special_tokens=False)["input_ids"]
  assert raw.ids == [merged] and auto == ours == [14, 4]  # "Ġ" (the space), "4"
