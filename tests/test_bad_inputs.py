"""Bad inputs from users: every config field given a wrong value, unknown keys, impossible schedules, missing
or corrupt checkpoints, HF directories that disagree with their config, data files with missing columns,
pickles. Each gets one clear error naming the problem before any work starts, and an existing run on disk
is never touched."""

import ast
import errno
import json
import logging
import os
import pickle
import re
import shutil
import subprocess
import sys
import threading
import types
from pathlib import Path

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from next_jax.core.checkpoint import (
  Checkpointer,
  CheckpointWriteError,
  CorruptCheckpoint,
)
from next_jax.core.metrics import MetricWriter
from next_jax.models import hf, peft_io, policy, toy
from next_jax.rl import data
from next_jax.run import experiment, workdir

ROOT = Path(__file__).resolve().parents[1]
from next_jax.configs import toy_arith
from next_jax.core import config as common

BAD_VALUES = (None, "x", -1, 0, 10**12, [], True, float("nan"), -0.5)


def leaves(d, prefix=""):
  for k, v in d.items():
    yield from leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}"]


def with_value(c, field, value):
  """A hand-built (not type-checked) copy of c with one field set, as a program or notebook could pass."""
  out = ml_collections.ConfigDict(c.to_dict(), type_safe=False)
  *path, key = field.split(".")
  sec = out
  for p in path:
    sec = sec[p]
  sec[key] = value
  return out


def test_every_field_with_any_bad_value_fails_only_with_a_config_error():
  c = toy_arith.get_config("quick")
  fields, tried = list(leaves(c.to_dict())), 0
  for field in fields:
    for value in BAD_VALUES:
      tried += 1
      try:
        experiment.validate(with_value(c, field, value))
      except experiment.ConfigError as e:
        assert str(e).startswith("config."), e
  assert len(fields) > 80 and tried == len(fields) * len(BAD_VALUES)


@pytest.mark.parametrize("field, value", [("nxt.interval", 0), ("rl.num_mini_batches", 0), ("rl.lr", "1e-3"),
                                          ("nxt.k", None), ("model.lora_targets", None), ("eval.chunk", [])])
def test_values_that_used_to_crash_validate_name_their_field(field, value):
  with pytest.raises(experiment.ConfigError, match=field.replace(".", r"\.")):
    experiment.validate(with_value(toy_arith.get_config(), field, value))


def test_the_schema_is_locked_so_a_misspelt_key_is_an_error():
  c = common.base()
  with pytest.raises(AttributeError, match="learning_rate"):
    c.rl.learning_rate = 1e-3
  with pytest.raises(TypeError):
    c.rl.lr = "fast"  # ConfigDict keeps the field's type


@pytest.mark.parametrize("overrides, match", [
    ({"extrapolate_at": 15, "interval": 10}, "not a multiple"),
    ({"extrapolate_at": 20, "interval": 10, "k": 5}, "nxt.k"),
    ({"total_steps": 5}, "total_steps"),
    ({"cycles": 3}, "total_steps"),
])
def test_impossible_schedules_are_refused(overrides, match):
  c = toy_arith.get_config()
  for k, v in overrides.items():
    (c if k == "total_steps" else c.nxt)[k] = v
  with pytest.raises(experiment.ConfigError, match=match):
    experiment.validate(c)


# --------------------------------------------------------------------------- nothing existing is touched


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("bad") / "model"
  cfg = policy.ModelConfig(vocab_size=17, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                           num_kv_heads=2, rope_theta=10000.0)
  toy.make_random_model_dir(d, cfg, tokenizer=False)
  toy.build_char_tokenizer("0123456789+-*=", out_dir=d)
  return d


def snapshot(d: Path) -> dict:
  return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture
def old_run(tmp_path, model_dir):
  """A workdir that already holds a run (config.json, a checkpoint, metrics) and a config pointing at it."""
  c = toy_arith.get_config("quick")
  c.workdir, c.model.dir = str(tmp_path / "run"), str(model_dir)
  wd = workdir.prepare(c)
  ck = Checkpointer(wd / "ckpt")
  ck.save(1, {"x": jnp.arange(3.0)}, {"step": 1, "config": json.loads(c.to_json())})  # as experiment.run
  ck.close()
  (wd / "metrics.jsonl").write_text('{"step": 1}\n')
  return c, wd, snapshot(wd)


def _wrong_shapes(model_dir, tmp):
  d = Path(shutil.copytree(model_dir, tmp / "wrong"))
  cfg = json.loads((d / "config.json").read_text())
  (d / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 48}))
  return d


CASES = ["missing_model_dir", "hf_wrong_shapes", "hf_pickle_only", "data_missing_column", "data_pickle",
         "resume_with_changed_config", "no_resume_flag", "prompt_len_too_small", "lora_rank_beyond_the_model",
         "resume_changed_lr_without_config_json", "resume_changed_rank_without_config_json",
         "resume_without_any_config", "generation_past_max_positions"]


@pytest.mark.parametrize("case", CASES)
def test_a_bad_input_raises_one_clear_error_and_leaves_the_old_run_untouched(case, old_run, model_dir,
                                                                              tmp_path):
  c, wd, before = old_run
  c.ckpt.overwrite = case != "no_resume_flag"
  if case == "missing_model_dir":
    c.model.dir, err, match = str(tmp_path / "nope"), hf.CheckpointError, "does not exist"
  elif case == "hf_wrong_shapes":
    c.model.dir, err, match = str(_wrong_shapes(model_dir, tmp_path)), hf.CheckpointError, "shape"
  elif case == "hf_pickle_only":
    d = Path(shutil.copytree(model_dir, tmp_path / "pkl"))
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    c.model.dir, err, match = str(d), hf.CheckpointError, r"never loaded; convert"
  elif case in ("data_missing_column", "data_pickle"):
    path = tmp_path / ("d.jsonl" if case == "data_missing_column" else "d.pkl")
    path.write_text('{"prompt": "1+1=", "answer": "2"}\n{"prompt": "2+2="}\n')
    c.task.name, c.task.path = "file", str(path)
    missing = case == "data_missing_column"
    err, match = experiment.ConfigError, "task.path: .*line 2: missing field" if missing else "never loaded"
  elif case == "resume_with_changed_config":
    err, match = experiment.ConfigError, rf"rl\.lr: {c.rl.lr} → 0\.5"  # the preset's lr, then the new one
    c.ckpt.overwrite, c.ckpt.resume, c.rl.lr = False, True, 0.5
  elif case == "prompt_len_too_small":  # the old run must survive ckpt.overwrite=True
    c.rollout.prompt_len, err = 2, experiment.ConfigError
    match = r"rollout\.prompt_len=2: is shorter than train problem \d+'s prompt \(\d+ tokens"
  elif case == "lora_rank_beyond_the_model":  # used to be killed by the OOM killer
    c.model.lora_rank, err = 10**6, experiment.ConfigError
    match = r"model\.lora_rank=1000000: exceeds min\(in, out\) = \d+ of the \w+ projection"
  elif case == "generation_past_max_positions":
    c.rollout.max_new_tokens, err = 40000, experiment.ConfigError
    match = r"rollout\.max_new_tokens=40000: prompt_len \+ max_new_tokens = 40008 exceeds the model's max_pos"
  elif case.startswith("resume_"):  # the checkpoint's own copy of the config decides, not config.json
    (wd / "config.json").unlink()
    c.ckpt.overwrite, c.ckpt.resume, err = False, True, experiment.ConfigError
    if case == "resume_changed_lr_without_config_json":
      c.rl.lr, match = 0.5, rf"rl\.lr: {c.rl.lr} → 0\.5.*from checkpoint .*ckpt/1"
    elif case == "resume_changed_rank_without_config_json":
      c.model.lora_rank, match = 3, rf"model\.lora_rank: {c.model.lora_rank} → 3.*from checkpoint"
    else:  # a checkpoint that records no config, and no config.json: nothing to check against
      shutil.rmtree(wd / "ckpt")
      ck = Checkpointer(wd / "ckpt")
      ck.save(1, {"x": jnp.arange(3.0)}, {"step": 1})
      ck.close()
      match = "neither config.json nor a checkpoint that records its config"
    before = snapshot(wd)
  else:
    err, match = experiment.ConfigError, "ckpt.resume"
  with pytest.raises(err, match=match):
    experiment.run(c)
  assert snapshot(wd) == before


@pytest.mark.parametrize("case", ["workdir_is_a_file", "workdir_under_a_file", "resume_and_overwrite"])
def test_workdir_and_resume_flags_that_cannot_work_are_refused_by_validate(case, tmp_path):
  c = toy_arith.get_config("quick")
  (tmp_path / "f").write_text("a file")
  if case == "workdir_is_a_file":
    c.workdir, match = str(tmp_path / "f"), r"config\.workdir=.*/f': is a file"
  elif case == "workdir_under_a_file":
    c.workdir, match = str(tmp_path / "f" / "run"), r"config\.workdir=.*: lies under .*/f, which is a file"
  else:
    c.ckpt.resume, c.ckpt.overwrite, match = True, True, r"ckpt\.resume=True: and ckpt\.overwrite=True contradict"
  with pytest.raises(experiment.ConfigError, match=match):
    experiment.validate(c)


FLAG_CASES = [
    (["--config.rl.nope=1"], "--config.rl.nope=1: unknown config key 'nope'"),
    (["--config.nope=1"], "--config.nope=1: unknown config key 'nope'"),
    (["--config=nope"], "--config=nope: no preset 'nope': presets are qwen25_paper, smollm2, toy_arith"),
    (["--config=nope.py"], "--config=nope.py: [Errno 2] No such file or directory"),
    (["--config=toy_arith:algo=nope"], "algo='nope'; choose from"),
    (["--config=toy_arith:bogus=1"], "config arg 'bogus' is not one of"),
    (["--config=toy_arith:seed=x"], "--config=toy_arith:seed=x: invalid literal for int()"),
    (["--config.rl.lr=abc"], "--config.rl.lr=abc: could not convert string to float"),
]


@pytest.mark.parametrize("argv, message", FLAG_CASES, ids=[a[0] for a, _ in FLAG_CASES])
def test_entry_point_flag_errors_are_one_line_naming_the_flag(argv, message):
  out = subprocess.run([sys.executable, "-m", "next_jax.cli.run", *argv], cwd=ROOT, capture_output=True, text=True,
                       timeout=120, env={**os.environ, "OPENBLAS_NUM_THREADS": "1"})
  assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr[-2000:]
  assert out.stderr.strip().splitlines() == [f"config error: {out.stderr.split('config error: ')[-1].strip()}"]
  assert message in out.stderr, out.stderr


def test_entry_point_reports_a_corrupt_checkpoint_as_one_message(old_run):
  """The checkpoint in old_run holds another state's structure: resuming it is one error, no traceback."""
  c, wd, before = old_run
  argv = ["--config=toy_arith:quick", f"--config.workdir={c.workdir}", f"--config.model.dir={c.model.dir}",
          "--config.ckpt.resume=True"]
  out = subprocess.run([sys.executable, "-m", "next_jax.cli.run", *argv], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env={**os.environ, "OPENBLAS_NUM_THREADS": "1"})
  assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr[-3000:]
  assert "error: " in out.stderr and "ckpt/1: cannot restore the run state" in out.stderr
  assert "no other checkpoint in this directory is intact" in out.stderr
  assert snapshot(wd) == before


# --------------------------------------------------------------------------------------- checkpoints


@pytest.fixture
def saved(tmp_path):
  state = {"w": jnp.arange(1000.0), "step": jnp.int32(7), "b": jnp.ones((3, 4), jnp.bfloat16)}
  ck = Checkpointer(tmp_path / "ckpt")
  ck.save(1, state, {"step": 1})
  ck.save(2, state, {"step": 2})
  ck.close()
  return tmp_path / "ckpt", state


def _data_files(step_dir):
  return sorted((p for p in step_dir.rglob("*") if p.is_file() and p.parent.name == "d"),
                key=lambda p: -p.stat().st_size)


def _flip_byte(step_dir):
  """Flip one bit in the middle of the step's largest array data file."""
  f = _data_files(step_dir)[0]
  data = bytearray(f.read_bytes())
  data[len(data) // 2] ^= 0x10
  f.write_bytes(bytes(data))


def test_a_flipped_bit_in_a_checkpoint_is_detected_and_named(saved):
  d, state = saved
  _flip_byte(d / "2")
  with pytest.raises(CorruptCheckpoint, match=r"/2: array data does not match .*'w'.*resume from step 1"):
    Checkpointer(d).restore(state)
  restored, meta = Checkpointer(d).restore(state, step=1)  # the previous checkpoint is intact
  assert meta == {"step": 1}
  np.testing.assert_array_equal(restored["w"], state["w"])


@pytest.mark.parametrize("damage", ["truncate_data", "delete_meta", "delete_state", "garbage_meta"])
def test_damaged_checkpoint_files_give_one_clear_error(saved, damage):
  d, state = saved
  step = d / "2"
  if damage == "truncate_data":
    for f in _data_files(step):
      f.write_bytes(f.read_bytes()[:10])
  elif damage == "delete_meta":
    shutil.rmtree(step / "meta")
  elif damage == "delete_state":
    shutil.rmtree(step / "state")
  else:
    next((step / "meta").glob("metadata")).write_text("{not json")
  with pytest.raises(CorruptCheckpoint, match=r"/2: cannot restore the run state"):
    Checkpointer(d).restore(state)


def test_a_checkpoint_whose_metadata_is_not_an_object_is_refused(saved):
  d, state = saved
  (d / "2" / "meta" / "metadata").write_text("[1, 2]")
  with pytest.raises(CorruptCheckpoint, match=r"/2: its metadata is a JSON list, not an object"):
    Checkpointer(d).restore(state)
  reader = Checkpointer(d, read_only=True)
  with pytest.raises(CorruptCheckpoint, match=r"/2: its metadata is a JSON list"):
    reader.read_meta()
  reader.close()


def test_a_checkpoint_without_its_fingerprint_is_refused_so_a_flipped_byte_cannot_pass(saved):
  d, state = saved
  meta = json.loads((d / "2" / "meta" / "metadata").read_text())
  del meta["fingerprint"]
  (d / "2" / "meta" / "metadata").write_text(json.dumps(meta))
  _flip_byte(d / "2")
  with pytest.raises(CorruptCheckpoint, match=r"/2: its metadata has no fingerprint list.*step 1 is intact"):
    Checkpointer(d).restore(state)


def test_the_resume_hint_names_a_step_only_after_checking_it_is_intact(saved):
  d, state = saved
  for step in ("1", "2"):
    _flip_byte(d / step)
  with pytest.raises(CorruptCheckpoint, match=r"/2: array data does not match.*no other checkpoint in this "
                                              r"directory is intact$"):
    Checkpointer(d).restore(state)


def test_opening_a_checkpoint_directory_prunes_what_a_kill_left_beyond_max_to_keep(tmp_path):
  """Killed after a save's commit and before orbax pruned, a run kept max_to_keep + 1 checkpoints."""
  ck = Checkpointer(tmp_path / "ckpt", max_to_keep=None)  # stands in for the killed pruning
  for step in range(1, 5):
    ck.save(step, {"w": jnp.arange(3.0) + step}, {"step": step})
  ck.close()
  reader = Checkpointer(tmp_path / "ckpt", max_to_keep=3, read_only=True)  # reading changes nothing
  assert reader.all_steps() == [1, 2, 3, 4]
  reader.close()
  ck = Checkpointer(tmp_path / "ckpt", max_to_keep=3)
  assert ck.all_steps() == [2, 3, 4]
  state, meta = ck.restore({"w": jnp.zeros(3)})
  assert meta["step"] == 4
  ck.close()


def test_restoring_into_another_structure_is_refused(saved):
  d, state = saved
  with pytest.raises(CorruptCheckpoint, match="another structure"):
    Checkpointer(d).restore({"w": state["w"]})


def test_a_torn_metrics_line_from_a_kill_is_dropped(tmp_path):
  w = MetricWriter(tmp_path, tensorboard=False)
  for s in range(3):
    w.write(s, {"x": s})
  with open(w.path, "a") as f:
    f.write('{"step": 3, "x"')  # killed mid-write
  assert [r["step"] for r in w.read()] == [0, 1, 2]
  w.truncate_rows(2)
  assert [r["step"] for r in w.read()] == [0, 1]


# --------------------------------------------------------------------------------------------- pickle


def test_no_module_imports_or_calls_a_pickle_loader():
  banned = {"pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
  calls = {"load", "loads", "read_pickle"}
  found = []
  for path in sorted([*(ROOT / "next_jax").glob("*.py"), *(ROOT / "experiments").rglob("*.py")]):
    for node in ast.walk(ast.parse(path.read_text())):
      names = [a.name.split(".")[0] for a in node.names] if isinstance(node, ast.Import) else \
          [node.module.split(".")[0]] if isinstance(node, ast.ImportFrom) and node.module else []
      found += [f"{path.name}: import {n}" for n in names if n in banned]
      if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in calls:
        base = ast.unparse(node.func.value)
        if base in ("torch", "np", "numpy", "pd", "pandas", "jnp") or "allow_pickle" in ast.unparse(node):
          found.append(f"{path.name}: {ast.unparse(node.func)}")
  assert found == []


def test_loading_a_model_a_checkpoint_and_data_never_unpickles(model_dir, saved, tmp_path, monkeypatch):
  from transformers import AutoTokenizer  # noqa: F401, PLC0415  (its first import probes pickle: not a load)

  def refuse(*a, **k):
    raise AssertionError("a pickle was loaded")

  for name in ("load", "loads", "Unpickler"):
    monkeypatch.setattr(pickle, name, refuse)
  path = tmp_path / "d.jsonl"
  path.write_text('{"prompt": "1+1=", "answer": "2"}\n')
  hf.load_model(model_dir)
  d, state = saved
  Checkpointer(d).restore(state)
  assert len(data.load_problems(path)) == 1


def test_a_pickled_peft_adapter_is_refused_with_a_conversion_hint(tmp_path):
  (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                            "target_modules": ["q_proj"]}))
  (tmp_path / "adapter_model.bin").write_bytes(b"\x80\x04not really")
  cfg = policy.ModelConfig(vocab_size=17, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                           num_kv_heads=2)
  with pytest.raises(hf.CheckpointError, match="adapter_model.bin .*never loaded.*safe_serialization=True"):
    peft_io.load_peft_adapter(tmp_path, cfg)


def test_entry_point_names_an_unknown_key_in_a_config_file(tmp_path):
  cfg = tmp_path / "typo.py"
  cfg.write_text("from next_jax.core import config as common\n\n"
                 "def get_config():\n  c = common.base()\n  c.rl.learnig_rate = 1e-3\n  return c\n")
  env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
  out = subprocess.run([sys.executable, "-m", "next_jax.cli.run", f"--config={cfg}"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120, env=env)
  assert out.returncode != 0 and "learnig_rate" in out.stderr


# ------------------------------------------------------------------------------------ data files (task.path)


def _file_config(path: Path, prompt_len: int = 64):
  c = toy_arith.get_config("quick")
  c.task.name, c.task.path, c.rollout.prompt_len = "file", str(path), prompt_len
  return c


def test_a_huge_prompt_is_refused_by_its_length_naming_file_row_and_limit(tmp_path, monkeypatch):
  path = tmp_path / "big.jsonl"
  path.write_text('{"prompt": "1+1=", "answer": "2"}\n' + json.dumps({"prompt": "x" * 2_000_000, "answer": "3"}))
  monkeypatch.setattr(experiment, "check_prompt_lengths", lambda *a: pytest.fail("a huge prompt was tokenized"))
  with pytest.raises(experiment.ConfigError, match=r"config\.task\.path: .*big\.jsonl: line 2: the prompt has "
                     r"2,000,000 characters, more than the limit of 2,048 \(32 × rollout\.prompt_len=64"):
    experiment.load_problems(_file_config(path))


@pytest.mark.parametrize("case", ["not_utf8", "null_answer", "null_ground_truth", "huge_int", "nan", "inf", "empty",
                                  "not_parquet"])
def test_a_bad_data_row_is_refused_naming_file_and_row(case, tmp_path):
  ok = '{"prompt": "1+1=", "answer": "2"}\n'
  row = {"null_answer": '{"prompt": "2+2=", "answer": null}', "huge_int": '{"prompt": "2+2=", "answer": 1' + "0" * 5000 + "}",
         "nan": '{"prompt": "2+2=", "answer": NaN}', "inf": '{"prompt": "2+2=", "answer": 1e400}',
         "empty": '{"prompt": "2+2=", "answer": ""}',
         "null_ground_truth": json.dumps({"prompt": "2+2=", "reward_model": {"ground_truth": None}})}.get(case)
  path = tmp_path / ("d.parquet" if case == "not_parquet" else "d.jsonl")
  if case == "not_utf8":
    path.write_bytes(ok.encode() + b'{"prompt": "caf\xe9", "answer": "1"}\n')
  elif case == "null_ground_truth":
    path.write_text(json.dumps({"prompt": "1+1=", "reward_model": {"ground_truth": "2"}}) + "\n" + row + "\n")
  else:
    path.write_text("not parquet at all\n" if case == "not_parquet" else ok + row + "\n")
  match = {"not_utf8": "line 2: not UTF-8 text", "null_answer": "line 2: field 'answer' is null",
           "null_ground_truth": "line 2: field 'ground_truth' is null", "huge_int": "line 2: unreadable JSON value",
           "nan": "line 2: the ground truth is 'nan', not a finite number",
           "inf": "line 2: the ground truth is 'inf', not a finite number", "empty": "line 2: the ground truth is empty",
           "not_parquet": "not a readable parquet file"}[case]
  with pytest.raises(ValueError, match=re.escape(f"{path}: ") + match):
    data.load_problems(path)


# --------------------------------------------------------------------------- one run per workdir, full disks


def _refused_in_another_thread(fn) -> str:
  """fn() run in a new thread (its own open file descriptions: to flock, another process) → its error."""
  box = {}

  def target():
    try:
      fn()
    except Exception as e:  # noqa: BLE001
      box["error"] = e

  t = threading.Thread(target=target)
  t.start()
  t.join()
  return f"{type(box.get('error')).__name__}: {box.get('error')}"


def test_a_second_run_or_resume_of_a_workdir_in_use_is_refused_naming_it_and_the_pid(old_run, monkeypatch):
  c, wd, before = old_run
  c.ckpt.resume = True
  monkeypatch.setattr(experiment, "build", lambda *a: pytest.fail("built a run for a workdir in use"))
  with workdir.locked(c):
    err = _refused_in_another_thread(lambda: experiment.run(c))
  assert re.search(rf"ConfigError: config\.workdir='.*run' is in use by another process \(pid {os.getpid()}", err)
  assert snapshot(wd) == before  # the lock file goes with its holder


def test_a_run_holds_its_workdir_lock_to_the_end_and_a_killed_runs_lock_does_not_block(old_run, monkeypatch):
  c, wd, _ = old_run
  (wd / workdir.LOCK).write_text("999999\n")  # what a SIGKILLed run leaves: the file, no flock
  c.ckpt.overwrite = True
  monkeypatch.setattr(experiment, "build", lambda *a: types.SimpleNamespace(state=None))

  def train(*_a):
    return {"refused": _refused_in_another_thread(lambda: workdir.check(c))}

  monkeypatch.setattr(experiment, "_train", train)
  out = experiment.run(c)
  assert "is in use by another process" in out["refused"] and not (wd / workdir.LOCK).exists()


def test_a_full_disk_during_a_checkpoint_is_one_message_naming_it_and_how_to_resume(tmp_path, monkeypatch, caplog):
  from orbax.checkpoint._src.handlers import json_checkpoint_handler as jch

  ck = Checkpointer(tmp_path / "ckpt")
  ck.save(1, {"x": jnp.arange(3.0)}, {"step": 1})

  async def full(self, x, directory):
    raise OSError(errno.ENOSPC, "No space left on device", str(directory / "metadata"))

  monkeypatch.setattr(jch.JsonCheckpointHandler, "_save_fn", full)
  with pytest.raises(CheckpointWriteError, match=rf"checkpoint 2: no space left on the device writing "
                     rf"{re.escape(str(tmp_path))}/ckpt/2; the last intact checkpoint is step 1 .*ckpt\.resume=True"):
    ck.save(2, {"x": jnp.arange(3.0)}, {"step": 2})
  ck.close()
  assert not [r for r in caplog.records if r.levelno >= logging.ERROR]  # orbax's per-thread tracebacks held back


def test_waiting_for_orbax_threads_tolerates_one_that_has_not_started():
  """A failed save joins the writer threads orbax started; one listed before it runs cannot be joined yet
  (RuntimeError): the wait retries it until it runs, or gives up at the deadline instead of raising."""
  import threading
  import time

  from next_jax.core import checkpoint

  later = threading.Thread(target=lambda: None)
  t0 = time.monotonic()
  checkpoint._join(later, t0 + 0.05)  # never started: gives up at the deadline  # noqa: SLF001
  assert 0.05 <= time.monotonic() - t0 < 1
  threading.Timer(0.02, later.start).start()
  checkpoint._join(later, time.monotonic() + 5)  # started while waiting: joined  # noqa: SLF001
  assert not later.is_alive() and later.ident is not None
