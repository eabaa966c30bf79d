"""next_jax.cli.evaluate: a tiny chat model through the evaluate command on a few rows of two real benchmark
files; the JSONL rows and the table checked against a recomputation; resume; refusals."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest

from next_jax.cli import evaluate
from next_jax.models import policy, toy
from next_jax.rl import data, rewards

BENCHES = ("gsm8k", "amc23")


@pytest.fixture(scope="module")
def data_dir():
  try:
    return data.math_eval_dir()
  except FileNotFoundError as e:
    pytest.skip(f"the math-eval data directory is absent: {e}")


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory):
  """conftest's tiny chat Llama with an untied head: the tied one only repeats the prompt's last token
  ("\n"), so every response would be equal and the resume check would check nothing."""
  d = tmp_path_factory.mktemp("evalmodel") / "model"
  cfg = policy.ModelConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                           num_kv_heads=1, rope_theta=10000.0, qkv_bias=False, tie_embeddings=False)
  return toy.make_random_model_dir(d, cfg)


@pytest.fixture
def parity_reward(monkeypatch):
  """A verifier that depends on the response and the answer (the random model never solves a problem, so
  math would give all zeros and check nothing): 1 iff they have an odd number of characters together."""
  fn = lambda response, answer: float((len(response) + len(answer)) % 2)  # noqa: E731
  monkeypatch.setattr(rewards, "get_reward", lambda name: fn)
  return fn


def _settings(model, **kw):
  base = dict(model=str(model), benchmarks=BENCHES, samples=2, temperature=1.0, max_new_tokens=6, limit=3,
              subset_seed=1, chunk=2)
  return evaluate.EvalSettings(**{**base, **kw})


def _rows(path):
  return [json.loads(line) for line in path.read_text().splitlines()]


def test_rows_and_table_match_a_recomputation(chat_model_dir, data_dir, parity_reward, tmp_path):
  s = _settings(chat_model_dir)
  summaries = evaluate.run(s, tmp_path / "out", progress=False)
  table = (tmp_path / "out" / "table.md").read_text()
  for name in BENCHES:
    chosen = data.subset(data.load_benchmark(name), 3, 1)
    rows = _rows(tmp_path / "out" / f"{name}.jsonl")
    assert [(r["id"], r["sample"]) for r in rows] == [(p.id, j) for p in chosen for j in range(2)]
    for r, p in zip(rows, [p for p in chosen for _ in range(2)]):
      assert r["benchmark"] == name and r["answer"] == p.answer
      assert r["reward"] == parity_reward(r["response"], p.answer)
      assert r["extracted"] == rewards.extract_answer(r["response"])
      assert 1 <= r["length"] <= 6 and r["truncated"] == (r["length"] == 6)
    rew = np.asarray([r["reward"] for r in rows]).reshape(3, 2)
    want = {"avg@2": rew.mean(), "pass@2": rew.max(axis=1).mean(),
            "length": np.mean([r["length"] for r in rows]), "truncated": np.mean([r["truncated"] for r in rows])}
    assert {k: summaries[name][k] for k in want} == pytest.approx(want)
  avg = np.mean([summaries[n]["avg@2"] for n in BENCHES]) * 100
  assert table.splitlines()[0] == f"| {chat_model_dir.name} | gsm8k | amc23 | Avg |"
  assert table.splitlines()[2].endswith(f" | {avg:.1f} |")
  assert 0 < avg < 100  # the recomputation checked something
  assert len({r["response"] for n in BENCHES for r in _rows(tmp_path / "out" / f"{n}.jsonl")}) > 6
  summary = json.loads((tmp_path / "out" / "summary.json").read_text())
  assert summary["benchmarks"] == summaries


def test_a_killed_run_resumes_to_the_same_rows(chat_model_dir, data_dir, parity_reward, tmp_path):
  s = _settings(chat_model_dir, benchmarks=("amc23",))
  evaluate.run(s, tmp_path / "out", progress=False)
  path = tmp_path / "out" / "amc23.jsonl"
  whole = path.read_text()
  lines = whole.splitlines(keepends=True)
  path.write_text("".join(lines[:3]) + lines[3][:10])  # a kill mid-write: one chunk and a half, a torn line
  evaluate.run(s, tmp_path / "out", progress=False)
  assert path.read_text() == whole


def test_a_run_scores_its_benchmarks_as_the_command_does_and_its_checkpoint_is_a_model(chat_model_dir, data_dir,
                                                                                        parity_reward, tmp_path):
  """The trainer's periodic evaluation on config.eval.benchmarks equals the evaluate command on the same
  problems, budget and greedy decoding: at step 0 with the run's model, at the end with --run (the run's
  last checkpoint: LoRA and base weights moved by the jump)."""
  from next_jax.configs import smollm2  # noqa: PLC0415
  from next_jax.run import experiment  # noqa: PLC0415
  c = smollm2.get_config("quick")
  c.model.dir, c.workdir, c.ckpt.every, c.rl.lr = str(chat_model_dir), str(tmp_path / "run"), 5, 0.05
  c.nxt.method = "rl_extra"  # a jump that moves the base weights, without compiling NExt's predictors
  c.log.progress = c.log.tensorboard = False
  c.eval.benchmarks, c.eval.limit, c.eval.max_new_tokens, c.eval.samples, c.eval.temperature = \
      ("gsm8k",), 3, 6, 1, 0.0
  res = experiment.run(c)
  assert list(res["benchmarks"]) == ["0", "5"] and res["jumps"]
  s = evaluate.EvalSettings(model=str(chat_model_dir), benchmarks=("gsm8k",), samples=1,
                            temperature=0.0, max_new_tokens=6, limit=3, chunk=3, system=c.task.system)
  at0 = evaluate.run(s, tmp_path / "ev0", progress=False)
  at5 = evaluate.run(dataclasses.replace(s, model="", run=c.workdir), tmp_path / "ev5", progress=False)
  for step, got in (("0", at0), ("5", at5)):
    assert res["benchmarks"][step] == {"gsm8k": got["gsm8k"]["avg@1"]}
  rows = [_rows(tmp_path / d / "gsm8k.jsonl") for d in ("ev0", "ev5")]
  assert [r["response"] for r in rows[0]] != [r["response"] for r in rows[1]]  # the run moved the policy
  with pytest.raises(experiment.ConfigError, match="no checkpoint at step 7"):
    evaluate.load_policy("", run=c.workdir, step=7)


def test_other_settings_in_out_are_refused_naming_the_field(chat_model_dir, data_dir, tmp_path):
  out = tmp_path / "out"
  evaluate.prepare_out(out, _settings(chat_model_dir))
  with pytest.raises(evaluate.outdir.OutputError, match="samples: 2 there, 4 now.*--overwrite"):
    evaluate.prepare_out(out, _settings(chat_model_dir, samples=4))
  (tmp_path / "user").mkdir()
  (tmp_path / "user" / "notes.txt").write_text("mine")
  with pytest.raises(evaluate.outdir.OutputError, match="did not write"):
    evaluate.prepare_out(tmp_path / "user", _settings(chat_model_dir))


def test_the_command_runs_from_any_directory(chat_model_dir, data_dir, tmp_path):
  cmd = [sys.executable, "-m", "next_jax.cli.evaluate", f"--model={chat_model_dir}", "--benchmarks=gsm8k",
         "--samples=1", "--max_new_tokens=2", "--limit=2", "--chunk=2", "--out=ev", "--noprogress"]
  done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, check=False, timeout=120)
  assert done.returncode == 0, done.stderr[-2000:]
  assert "| avg@1 (%) |" in done.stdout and len(_rows(tmp_path / "ev" / "gsm8k.jsonl")) == 2
  bad = subprocess.run(cmd[:4] + ["--benchmarks=aime26", "--out=ev2"], cwd=tmp_path, capture_output=True,
                       text=True, check=False, timeout=120)
  assert bad.returncode != 0 and "unknown ['aime26']" in bad.stderr


@pytest.mark.parametrize("size,names", [("1.5B", ("amc23", "minerva")),
                                        ("14B", ("aime24", "aime25", "amc23", "minerva", "olympiadbench"))])
def test_paper_preset_evaluates_on_the_papers_benchmarks(size, names):
  from next_jax.configs import qwen25_paper  # noqa: PLC0415

  c = qwen25_paper.get_config(f"size={size}")
  assert tuple(c.eval.benchmarks) == names and set(names) <= set(data.BENCHMARKS)
  assert (c.eval.samples, c.eval.temperature, c.rollout.max_new_tokens) == (8, 1.0, 4096)


def test_an_unknown_benchmark_in_a_config_is_one_error():
  from next_jax.configs import toy_arith  # noqa: PLC0415
  from next_jax.run import experiment  # noqa: PLC0415

  c = toy_arith.get_config()
  c.eval.benchmarks = ("aime24", "aime26")
  with pytest.raises(experiment.ConfigError, match="eval.benchmarks"):
    experiment.validate(c)
