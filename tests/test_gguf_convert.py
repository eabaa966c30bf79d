"""GGUF → HF directory: a tiny llama GGUF written here (every supported weight type, q/k rows permuted as
llama.cpp writes them) converts to a directory whose logits and tokenizer equal transformers' own GGUF
loader's; bad files give one error naming the file and the field, and leave nothing behind."""

import concurrent.futures
import json
import shutil
import threading
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

gguf = pytest.importorskip("gguf")  # the `real` extra; `make test` installs it

from next_jax.cli import convert as convert_model
from next_jax.models import gguf_convert, hf, model_files, policy, toy

Q = gguf.GGMLQuantizationType
CYCLE = (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1)
D, F, H, KVH, HD, LAYERS = 64, 96, 4, 2, 16, 2


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
  """llama.cpp's convert_hf_to_gguf permutation of q/k rows (the rotate-half halves interleaved)."""
  return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path: Path, arch: str = "llama", odd_tensor: tuple | None = None, drop: str = "",
                    bos: int | None = None, bad_merge: bool = False, nan: str = "", rows: int | None = None) -> Path:
  """A random 2-layer llama in GGUF: weights cycle through CYCLE; tokenizer = the toy byte-level BPE.
  Poisons: bos (the bos id), bad_merge (merge 0 without its space), nan (a tensor with one NaN), rows (an
  embedding with fewer rows than the tokenizer has tokens, and vocab_size saying so)."""
  tok = toy.build_tokenizer()
  spec = json.loads(tok.backend_tokenizer.to_str())
  vocab = sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1])
  tokens = [t for t, _ in vocab]
  merges = [" ".join(m) if isinstance(m, list) else m for m in spec["model"]["merges"]]
  if bad_merge:
    merges[0] = merges[0].replace(" ", "")
  specials = set(toy.SPECIAL_TOKENS)
  w = gguf.GGUFWriter(str(path), arch)
  w.add_block_count(LAYERS)
  w.add_context_length(256)
  w.add_embedding_length(D)
  w.add_feed_forward_length(F)
  w.add_head_count(H)
  w.add_head_count_kv(KVH)
  w.add_rope_freq_base(10000.0)
  w.add_layer_norm_rms_eps(1e-5)
  w.add_tokenizer_model("gpt2")
  w.add_tokenizer_pre("smollm")
  w.add_token_list(tokens)
  w.add_token_merges(merges)
  w.add_token_types([3 if t in specials else 1 for t in tokens])
  w.add_bos_token_id(tokens.index("<|im_start|>") if bos is None else bos)
  if rows is not None:
    w.add_vocab_size(rows)
  w.add_eos_token_id(tokens.index("<|im_end|>"))
  w.add_pad_token_id(tokens.index("<|endoftext|>"))
  w.add_chat_template(toy.CHAT_TEMPLATE)
  rng = np.random.default_rng(0)
  mats = {"token_embd.weight": (rows or len(tokens), D)}
  for i in range(LAYERS):
    for n, shape in (("attn_q", (H * HD, D)), ("attn_k", (KVH * HD, D)), ("attn_v", (KVH * HD, D)),
                     ("attn_output", (D, H * HD)), ("ffn_gate", (F, D)), ("ffn_up", (F, D)),
                     ("ffn_down", (D, F))):
      mats[f"blk.{i}.{n}.weight"] = shape
  if odd_tensor is not None:
    name, kind, raw = odd_tensor
    w.add_tensor(name, raw, raw_dtype=kind)
    mats.pop(name, None)
  mats.pop(drop, None)
  for j, (name, shape) in enumerate(mats.items()):
    x = (0.3 * rng.standard_normal(shape)).astype(np.float32)
    if ".attn_q." in name or ".attn_k." in name:
      x = permute(x, H if ".attn_q." in name else KVH)
    if name == nan:
      x.flat[5] = np.nan
    kind = CYCLE[j % len(CYCLE)] if name != nan else Q.F32
    w.add_tensor(name, gguf.quants.quantize(x, kind), raw_dtype=kind)
  norms = ["output_norm.weight"] + [f"blk.{i}.{n}.weight" for i in range(LAYERS) for n in ("attn_norm", "ffn_norm")]
  for name in norms:
    w.add_tensor(name, (1.0 + 0.1 * rng.standard_normal(D)).astype(np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  d = tmp_path_factory.mktemp("gguf")
  src = write_tiny_gguf(d / "tiny.gguf")
  return src, gguf_convert.convert_gguf(src, d / "hf")


def _left_padded(tok, texts):
  ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
  return hf_pad(ids, tok.pad_token_id)


def hf_pad(ids, pad):
  t = max(map(len, ids))
  toks, mask = np.full((len(ids), t), pad, np.int64), np.zeros((len(ids), t), bool)
  for i, x in enumerate(ids):
    toks[i, t - len(x):], mask[i, t - len(x):] = x, True
  return toks, mask


def test_tiny_gguf_logits_equal_transformers_gguf_loader(tiny):
  torch = pytest.importorskip("torch")
  import transformers
  src, out = tiny
  cfg, params, tok = hf.load_model(out)
  assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.qkv_bias) == (LAYERS, D, H, KVH, False)
  ref = transformers.AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32)
  toks, mask = _left_padded(tok, ["what is 3+4*5?", "the answer is \\boxed{23}.", "7"])
  ours, _ = policy.forward(params, jnp.asarray(toks, jnp.int32), cfg, mask=jnp.asarray(mask))
  pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
  with torch.no_grad():
    theirs = ref(input_ids=torch.tensor(toks), attention_mask=torch.tensor(mask.astype(np.int64)),
                 position_ids=torch.tensor(pos)).logits.numpy()
  err = np.abs(np.asarray(ours) - theirs)[mask].max()
  assert err < 1e-4, err
  # the q/k un-permutation matters: without it the logits are far off
  k = params["layers"]["q"]["kernel"]
  wrong = {**params, "layers": {**params["layers"], "q": {"kernel": jnp.asarray(
      np.stack([permute(np.asarray(k[i]).T, H).T for i in range(LAYERS)]))}}}
  bad, _ = policy.forward(wrong, jnp.asarray(toks, jnp.int32), cfg, mask=jnp.asarray(mask))
  assert np.abs(np.asarray(bad) - theirs)[mask].max() > 100 * err


def test_tiny_gguf_tokenizer_equals_transformers(tiny):
  pytest.importorskip("torch")  # transformers' GGUF tokenizer path imports torch
  import transformers
  src, out = tiny
  ours = hf.load_tokenizer(out)
  ref = transformers.AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
  msgs = [{"role": "user", "content": "what is 12+3*4? é ü 😀"}]
  assert ours.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False) == \
      ref.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
  for text in ["<|im_start|>user\nhi<|im_end|>", "  12 + 34\n\n x", "déjà vu 😀"]:
    assert ours(text, add_special_tokens=False)["input_ids"] == ref(text, add_special_tokens=False)["input_ids"]
  assert (ours.eos_token, ours.pad_token, ours.bos_token) == ("<|im_end|>", "<|endoftext|>", "<|im_start|>")


def test_converted_dir_has_generation_config_and_source(tiny):
  src, out = tiny
  gen = json.loads((out / "generation_config.json").read_text())
  cfg = json.loads((out / "config.json").read_text())
  tok = hf.load_tokenizer(out)
  assert gen["eos_token_id"] == cfg["eos_token_id"] == tok.eos_token_id
  assert json.loads((out / "source.json").read_text())["sha256"] == gguf_convert.file_sha256(src)


def test_conversion_is_cached_and_redone_when_the_file_changes(tiny, tmp_path):
  src, out = tiny
  stamp = (out / "model.safetensors").stat().st_mtime_ns
  assert gguf_convert.convert_gguf(src, out) == out
  assert (out / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not rewritten
  other = write_tiny_gguf(tmp_path / "tiny.gguf", odd_tensor=None)
  other.write_bytes(other.read_bytes()[:-4] + b"\0\0\0\1")  # same size, different last norm value
  again = gguf_convert.convert_gguf(other, tmp_path / "hf")
  assert json.loads((again / "source.json").read_text())["sha256"] != json.loads(
      (out / "source.json").read_text())["sha256"]


def test_concurrent_conversions_of_one_file_convert_it_once(tiny, tmp_path):
  """Four threads convert the same GGUF into the same directory at once (test workers, two runs starting
  together): the flock on the source makes one convert and the others reuse its result, with no error."""
  src, _ = tiny
  out, barrier = tmp_path / "hf", threading.Barrier(4)

  def convert(_):
    barrier.wait()
    return gguf_convert.convert_gguf(src, out), (out / "model.safetensors").stat().st_mtime_ns

  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    results = list(pool.map(convert, range(4)))
  assert {r[0] for r in results} == {out} and len({r[1] for r in results}) == 1
  assert [p.name for p in tmp_path.iterdir()] == ["hf"]


def test_model_files_resolves_a_gguf_path_into_the_cache(tiny, tmp_path, monkeypatch):
  src, _ = tiny
  monkeypatch.setenv("NEXT_JAX_CACHE", str(tmp_path / "cache"))
  out = model_files.resolve(str(src))
  assert out.parent == tmp_path / "cache" and (out / "config.json").is_file()
  assert model_files.resolve(out) == out  # an HF directory is used as it is


def _assert_nothing_written(parent: Path, name: str):
  assert not (parent / name).exists()
  assert not [p for p in parent.iterdir() if p.name.startswith(f".{name}.")]


@pytest.mark.parametrize("case", ["architecture", "truncated", "quant_type", "missing_tensor", "not_gguf"])
def test_bad_gguf_names_file_and_field_and_writes_nothing(case, tmp_path):
  src = tmp_path / "bad.gguf"
  if case == "architecture":
    write_tiny_gguf(src, arch="gptneox")
    match = r"bad\.gguf: metadata field 'general.architecture' = 'gptneox' is not supported"
  elif case == "truncated":
    data = write_tiny_gguf(src).read_bytes()
    src.write_bytes(data[: len(data) // 2])
    match = r"bad\.gguf: .*(truncated|cannot be read)"
  elif case == "quant_type":
    raw = np.random.default_rng(0).integers(0, 255, size=(8, 144), dtype=np.uint8)  # one Q4_K row block
    write_tiny_gguf(src, odd_tensor=("blk.0.ffn_up.weight", Q.Q4_K, raw))
    match = r"bad\.gguf: tensor 'blk.0.ffn_up.weight' has type Q4_K, which next_jax does not convert"
  elif case == "missing_tensor":
    write_tiny_gguf(src, drop="blk.1.ffn_down.weight")
    match = r"bad\.gguf: missing tensors \['model.layers.1.mlp.down_proj.weight'\]"
  else:
    src.write_bytes(b"PK\3\4 not a gguf at all" * 10)
    match = r"bad\.gguf: not a readable GGUF file"
  with pytest.raises(gguf_convert.GGUFError, match=match):
    gguf_convert.convert_gguf(src, tmp_path / "out")
  _assert_nothing_written(tmp_path, "out")


@pytest.mark.parametrize("case", ["bos_out_of_range", "merge_without_space", "nan_weight", "tokens_past_embedding"])
def test_a_poisoned_gguf_is_one_clear_error_and_writes_nothing(case, tmp_path):
  src = tmp_path / "bad.gguf"
  if case == "bos_out_of_range":
    write_tiny_gguf(src, bos=10**6)
    match = r"bad\.gguf: metadata field 'tokenizer.ggml.bos_token_id' = 1000000 is not a token id"
  elif case == "merge_without_space":
    write_tiny_gguf(src, bad_merge=True)
    match = r"bad\.gguf: metadata field 'tokenizer.ggml.merges' entry 0 = .* is not two tokens"
  elif case == "nan_weight":
    write_tiny_gguf(src, nan="blk.1.ffn_gate.weight")
    match = r"bad\.gguf: tensor 'blk.1.ffn_gate.weight' has 1 non-finite value"
  else:
    write_tiny_gguf(src, rows=200)
    match = r"bad\.gguf: the tokenizer has \d+ tokens but the embedding has 200 rows"
  with pytest.raises(gguf_convert.GGUFError, match=match):
    gguf_convert.convert_gguf(src, tmp_path / "out")
  _assert_nothing_written(tmp_path, "out")


def test_the_loader_refuses_a_tokenizer_larger_than_vocab_size(tiny, tmp_path):
  _, out = tiny
  small = Path(shutil.copytree(out, tmp_path / "small"))
  cfg = json.loads((small / "config.json").read_text())
  (small / "config.json").write_text(json.dumps({**cfg, "vocab_size": 200}))
  tensors = {k: np.array(v) for k, v in hf.read_safetensors(small / "model.safetensors").items()}  # not mmapped
  tensors["model.embed_tokens.weight"] = np.array(tensors["model.embed_tokens.weight"][:200])
  hf.write_safetensors(small / "model.safetensors", tensors)
  with pytest.raises(hf.CheckpointError, match=r"small: the tokenizer has \d+ tokens but config.json's vocab_size "
                     r"is 200"):
    hf.load_model(small)


def test_convert_model_never_replaces_a_users_directory_or_the_working_directory(tiny, tmp_path, monkeypatch):
  src, _ = tiny
  user = tmp_path / "user"
  (user / "sub").mkdir(parents=True)
  (user / "sub" / "keep.txt").write_text("mine")
  monkeypatch.setattr(gguf_convert, "_reader", lambda *_: pytest.fail("converted before --out was checked"))
  with pytest.raises(SystemExit, match=r"--out .*user holds files next_jax did not write.*--overwrite"):
    convert_model.main([f"--model={src}", "--out", str(user)])
  assert (user / "sub" / "keep.txt").read_text() == "mine"
  monkeypatch.chdir(user)
  with pytest.raises(SystemExit, match=r"--out \. is the working directory"):
    convert_model.main([f"--model={src}", "--out", ".", "--overwrite"])
  assert (user / "sub" / "keep.txt").read_text() == "mine" and not [p for p in tmp_path.iterdir() if p.name != "user"]


def test_the_installed_command_runs_outside_the_checkout(tiny, tmp_path):
  """`next-jax-convert` (setup.py's console script) from a directory that is not the checkout."""
  import subprocess  # noqa: PLC0415
  import sys  # noqa: PLC0415
  src, _ = tiny
  exe = Path(sys.executable).with_name("next-jax-convert")
  out = subprocess.run([str(exe), f"--model={src}", "--out", "converted"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=300, check=False)
  assert out.returncode == 0, out.stderr[-2000:]
  again = subprocess.run([str(exe), str(src)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
  assert again.returncode != 0 and f"--model={src}" in again.stderr  # a bare path is named as the flag
  assert hf.load_config(tmp_path / "converted").num_layers == hf.load_config(tiny[1]).num_layers
