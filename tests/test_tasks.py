"""Synthetic tasks (determinism, disjoint splits, correct answers), cursor/epoch order, file loaders in every
format, and prompt formatting."""

from __future__ import annotations

import ast
import json
import operator
from collections import Counter
from fractions import Fraction

import numpy as np
import pytest

from next_jax.models import toy
from next_jax.rl import data, rewards, tasks
from next_jax.rl.data import (
  Problem,
  batch_at,
  epoch_order,
  format_prompt,
  load_problems,
)
from next_jax.rl.tasks import make_task

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: Fraction}


def _ast_value(text: str) -> Fraction:
  """Independent evaluator of generated (trusted) arithmetic: Python's parser does the precedence."""
  def walk(node):
    if isinstance(node, ast.BinOp):
      a, b = walk(node.left), walk(node.right)
      return Fraction(a) / Fraction(b) if isinstance(node.op, ast.Div) else _OPS[type(node.op)](a, b)
    assert isinstance(node, ast.Constant) and isinstance(node.value, int)
    return Fraction(node.value)
  return walk(ast.parse(text, mode="eval").body)


# ------------------------------------------------------------------------------------------------ arith


def test_arith_default_is_the_toy_task():
  probs = make_task("arith", 500, seed=0)
  assert len(probs) == len({p.prompt for p in probs}) == 500
  for p in probs:
    a, rest = p.prompt[:-1].split("+")
    b, c = rest.split("*")
    assert p.prompt.endswith("=") and 0 <= int(a) <= 99 and 0 <= int(b) <= 99 and 0 <= int(c) <= 9
    assert p.answer == str(int(a) + int(b) * int(c)).zfill(3)
    assert (p.task, p.verifier) == ("arith", "exact")
    assert rewards.exact_reward(p.answer, p.answer) == 1.0
    assert rewards.exact_reward(str(int(p.answer)), p.answer) == 1.0  # unpadded is also right


def test_arith_knobs_and_answers():
  probs = make_task("arith", 300, seed=3, ranges=((10, 99), (0, 9), (0, 999), (1, 5)), ops="?*?",
                    op_choices="+-", pad=0)
  seen_ops = set()
  for p in probs:
    expr = p.prompt[:-1]
    assert int(p.answer) == _ast_value(expr)
    nums = [int(x) for x in expr.replace("*", " ").replace("+", " ").replace("-", " ").split()]
    assert 10 <= nums[0] <= 99 and nums[1] <= 9 and nums[2] <= 999 and 1 <= nums[3] <= 5
    ops = [ch for ch in expr if ch in "+-*"]
    assert ops[1] == "*" and ops[0] in "+-" and ops[2] in "+-"
    seen_ops.update(ops)
  assert seen_ops == {"+", "-", "*"}
  assert any(p.answer.startswith("-") for p in probs)  # negatives happen with '-'


def test_arith_value_matches_python_precedence():
  rng = np.random.default_rng(0)
  for _ in range(200):
    nums = [int(x) for x in rng.integers(0, 50, size=5)]
    ops = "".join(rng.choice(list("+-*"), size=4))
    text = "".join(f"{a}{o}" for a, o in zip(nums, ops)) + str(nums[-1])
    assert tasks.arith_value(nums, ops) == _ast_value(text)


def test_synthetic_tasks_are_deterministic():
  for name in tasks.TASKS:
    assert make_task(name, 200, seed=7) == make_task(name, 200, seed=7)
    assert make_task(name, 50, seed=7, split="test") == make_task(name, 50, seed=7, split="test")
    assert make_task(name, 200, seed=7) != make_task(name, 200, seed=8)


@pytest.mark.parametrize("name", sorted(tasks.TASKS))
def test_train_and_test_never_overlap(name):
  train = {p.prompt for s in (0, 1) for p in make_task(name, 1000, seed=s)}
  test = {p.prompt for s in (0, 1) for p in make_task(name, 150, seed=s, split="test")}
  assert not train & test
  if name == "arith":  # the split is a function of the content alone
    assert all(data.split_of(name, p.prompt) == "test" for p in make_task(name, 150, seed=0, split="test"))


def test_bad_task_arguments():
  with pytest.raises(ValueError, match="unknown task 'nope'"):
    make_task("nope", 1, 0)
  with pytest.raises(ValueError, match="split='val'"):
    make_task("arith", 1, 0, split="val")
  with pytest.raises(ValueError, match="unknown knobs \\['digits'\\]"):
    make_task("arith", 1, 0, digits=3)
  with pytest.raises(ValueError, match="ArithSpec.ops='\\+'"):
    make_task("arith", 1, 0, ops="+")
  with pytest.raises(ValueError, match="only .* unique problems"):
    make_task("arith", 50, 0, ranges=((0, 2), (0, 2)), ops="+")  # 9 problems exist
  with pytest.raises(ValueError, match="CountdownSpec.min_use"):
    make_task("countdown", 1, 0, count=3, min_use=4)


# -------------------------------------------------------------------------------------------- countdown


def test_countdown_problems_are_solvable_and_verified():
  probs = make_task("countdown", 300, seed=0)
  for p in probs:
    spec = json.loads(p.answer)
    assert len(spec["numbers"]) == 4 and all(1 <= x <= 25 for x in spec["numbers"])
    assert 1 <= spec["target"] <= 200 and str(spec["target"]) in p.prompt
    assert _ast_value(p.solution) == spec["target"]  # the reference solution reaches the target …
    used = Counter(int(t) for t in p.solution.replace("(", " ").replace(")", " ").replace("+", " ")
                   .replace("-", " ").replace("*", " ").replace("/", " ").split())
    assert not used - Counter(spec["numbers"])  # … with the given numbers only
    assert rewards.countdown_reward(f"\\boxed{{{p.solution}}}", p.answer) == 1.0
    assert rewards.countdown_reward(f"{p.solution}+1", p.answer) == 0.0
    assert p.verifier == "countdown"


def test_countdown_use_all():
  for p in make_task("countdown", 50, seed=1, count=3, min_use=3, use_all=True, number_range=(1, 9)):
    spec = json.loads(p.answer)
    assert spec["use_all"] and "exactly once" in p.prompt
    assert sorted(rewards.eval_expression(p.solution)[1]) == sorted(spec["numbers"])
    assert rewards.countdown_reward(p.solution, p.answer) == 1.0


# ----------------------------------------------------------------------------------------- data order


def test_epoch_order_is_a_deterministic_permutation():
  a = epoch_order(50, 3, 0)
  assert sorted(a.tolist()) == list(range(50))
  assert np.array_equal(a, epoch_order(50, 3, 0)) and not np.array_equal(a, epoch_order(50, 3, 1))
  assert not np.array_equal(a, epoch_order(50, 4, 0))
  with pytest.raises(ValueError):
    a[0] = 1  # cached arrays are read-only
  with pytest.raises(ValueError, match="need n ≥ 1"):
    epoch_order(0, 0, 0)


def test_batch_at_covers_each_problem_once_per_epoch():
  ds = make_task("arith", 37, seed=0)
  cursor, seen = 0, []
  for _ in range(3 * 37 // 5 + 1):
    batch, cursor = batch_at(ds, cursor, 5, seed=11)
    assert len(batch) == 5
    seen.extend(p.id for p in batch)
  assert cursor == len(seen)
  for e in range(3):  # every epoch is a permutation of the dataset
    assert sorted(seen[37 * e:37 * (e + 1)]) == sorted(p.id for p in ds)
  assert seen[:37] != seen[37:74]  # epochs are reshuffled


def test_batch_at_resume_is_identical():
  ds = make_task("arith", 23, seed=1)
  straight = batch_at(ds, 0, 60, seed=2)[0]
  cursor, resumed = 0, []
  for size in (7, 1, 16, 9, 27):  # any batch sizes, any resume points: same stream
    batch, cursor = batch_at(ds, cursor, size, seed=2)
    resumed.extend(batch)
  assert resumed == straight and cursor == 60
  assert batch_at(ds, 40, 3, seed=2) == (straight[40:43], 43)
  with pytest.raises(ValueError, match="empty dataset"):
    batch_at((), 0, 1, 0)


# ---------------------------------------------------------------------------------------------- loaders


def _write_jsonl(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
  return path


VERL_ROWS = [
    {"data_source": "math_dapo", "prompt": [{"role": "user", "content": "Solve 1+1.\n\nRemember Answer:"}],
     "ability": "MATH", "reward_model": {"ground_truth": "2", "style": "rule-lighteval/MATH_v2"},
     "extra_info": {"index": "a1b2"}},
    {"data_source": "math_dapo", "prompt": [{"role": "system", "content": "Be careful."},
                                            {"role": "user", "content": "What is 3*3?"}],
     "reward_model": {"ground_truth": 9}},
    {"data_source": "math_dapo", "prompt": [{"role": "user", "content": "Solve 1+1.\n\nRemember Answer:"}],
     "reward_model": {"ground_truth": "2"}, "extra_info": {"index": "dup"}},  # DAPO repeats problems
]


def test_load_verl_jsonl(tmp_path):
  probs = load_problems(_write_jsonl(tmp_path / "dapo.jsonl", VERL_ROWS))
  assert len(probs) == 2  # the duplicate is dropped
  assert probs[0] == Problem(prompt="Solve 1+1.\n\nRemember Answer:", answer="2", task="math_dapo",
                             verifier="math", id="a1b2")
  assert (probs[1].prompt, probs[1].answer, probs[1].system, probs[1].id) == \
      ("What is 3*3?", "9", "Be careful.", "dapo:2")
  assert len(load_problems(tmp_path / "dapo.jsonl", dedupe=False)) == 3
  assert len(load_problems(tmp_path / "dapo.jsonl", limit=1)) == 1


def test_load_verl_parquet(tmp_path):
  pa = pytest.importorskip("pyarrow", reason="pyarrow not installed: parquet loading is optional")
  import pyarrow.parquet as pq

  path = tmp_path / "dapo.parquet"
  pq.write_table(pa.Table.from_pylist([dict(r, reward_model={"ground_truth": str(r["reward_model"]
                                                                                ["ground_truth"])})
                                       for r in VERL_ROWS]), path)
  probs = load_problems(path)
  assert [(p.prompt, p.answer) for p in probs] == [("Solve 1+1.\n\nRemember Answer:", "2"),
                                                   ("What is 3*3?", "9")]
  assert probs[1].system == "Be careful." and probs[0].id == "a1b2"


def test_load_flat_gsm8k_math_json(tmp_path):
  flat = load_problems(_write_jsonl(tmp_path / "flat.jsonl", [
      {"prompt": "1+2?", "answer": "3"}, {"prompt": "half?", "solution": "It is \\boxed{\\frac12}."},
      {"prompt": "p", "solution": "7"}]))
  assert [(p.prompt, p.answer) for p in flat] == [("1+2?", "3"), ("half?", "\\frac12"), ("p", "7")]
  assert {p.task for p in flat} == {"flat"}
  gsm = load_problems(_write_jsonl(tmp_path / "gsm8k.jsonl", [
      {"question": "Sum?", "answer": "2+2 = <<2+2=4>>4\n#### 4"},
      {"question": "Big?", "answer": "lots\n#### 1,250"}]))
  assert [(p.prompt, p.answer, p.task, p.verifier) for p in gsm] == [("Sum?", "4", "gsm8k", "math"),
                                                                     ("Big?", "1250", "gsm8k", "math")]
  assert gsm[0].solution == "2+2 = <<2+2=4>>4" and gsm[0].id == "gsm8k:1"
  math = load_problems(_write_jsonl(tmp_path / "math.jsonl", [
      {"problem": "P1", "solution": "so $\\boxed{\\frac{1}{2}}$ and \\boxed{\\{1,2\\}}", "level": "Level 5"},
      {"problem": "P2", "solution": "no box here", "answer": "5"}]))
  assert [(p.prompt, p.answer) for p in math] == [("P1", "\\{1,2\\}"), ("P2", "5")]
  arr = tmp_path / "rows.json"
  arr.write_text(json.dumps([{"problem": "P", "answer": "1"}]))
  assert load_problems(arr)[0].answer == "1"
  assert load_problems(tmp_path / "flat.jsonl", format="flat", verifier="exact")[0].verifier == "exact"


def test_loader_errors_name_file_line_and_field(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.jsonl"):
    load_problems(tmp_path / "nope.jsonl")
  p = _write_jsonl(tmp_path / "g.jsonl", [{"question": "a", "answer": "#### 1"}, {"question": "b",
                                                                                  "answer": "no marker"}])
  with pytest.raises(ValueError, match="g.jsonl: line 2: field 'answer' has no '#### <number>'"):
    load_problems(p)
  p = _write_jsonl(tmp_path / "m.jsonl", [{"problem": "a", "solution": "x"}])
  with pytest.raises(ValueError, match="m.jsonl: line 1: no 'answer' field and no \\\\boxed"):
    load_problems(p)
  p = _write_jsonl(tmp_path / "v.jsonl", [VERL_ROWS[0], {"prompt": "x", "reward_model": {}}])
  with pytest.raises(ValueError, match="v.jsonl: line 2: missing field 'ground_truth' \\(format 'verl'"):
    load_problems(p)
  p = _write_jsonl(tmp_path / "u.jsonl", [{"text": "hi"}])
  with pytest.raises(ValueError, match="u.jsonl: line 1: cannot tell the format from the fields \\['text"):
    load_problems(p)
  with pytest.raises(ValueError, match="u.jsonl: line 1: missing field 'question'"):
    load_problems(p, format="gsm8k")
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"prompt": "a", "answer": "1"}\n\n{not json\n')
  with pytest.raises(ValueError, match="bad.jsonl: line 3: invalid JSON"):
    load_problems(bad)
  with pytest.raises(ValueError, match="format='csv'"):
    load_problems(bad, format="csv")
  with pytest.raises(ValueError, match="verifier='nope'"):
    load_problems(bad, verifier="nope")


def test_hash_split_is_stable_and_disjoint(tmp_path):
  probs = tuple(Problem(prompt=f"q{i}", answer=str(i), task="flat", verifier="math", id=str(i))
                for i in range(400))
  train, test = data.hash_split(probs)
  assert len(train) + len(test) == 400 and not {p.id for p in train} & {p.id for p in test}
  assert 15 < len(test) < 70
  assert data.hash_split(probs[::-1])[1] == test[::-1]


# ------------------------------------------------------------------------------------------- formatting


@pytest.fixture(scope="module")
def chat_tokenizer():
  return toy.build_tokenizer()


def test_format_prompt_chat_template(chat_tokenizer):
  p = make_task("arith", 1, seed=0)[0]
  text = format_prompt(p, chat_tokenizer)
  assert text == (f"<|im_start|>user\n{p.prompt}\n{data.DEFAULT_INSTRUCTION}<|im_end|>\n"
                  "<|im_start|>assistant\n")
  text = format_prompt(p, chat_tokenizer, system="Be brief.", instruction=None)
  assert text == f"<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n{p.prompt}<|im_end|>\n" \
      "<|im_start|>assistant\n"
  withsys = Problem(prompt="Q", answer="1", task="t", verifier="math", id="0", system="S")
  assert format_prompt(withsys, chat_tokenizer, instruction="").startswith("<|im_start|>system\nS<|im_end|>")
  ids = chat_tokenizer(text)["input_ids"]
  assert chat_tokenizer.decode(ids) == text  # round-trips through the byte-level BPE


def test_format_prompt_plain_and_raw(chat_tokenizer):
  p = make_task("arith", 1, seed=0)[0]
  assert format_prompt(p, raw=True) == p.prompt and format_prompt(p, chat_tokenizer, raw=True) == p.prompt
  assert format_prompt(p, None, instruction=None) == f"Question: {p.prompt}\nAnswer:"
  instr = data.DEFAULT_INSTRUCTION
  assert format_prompt(p, None, system="Sys") == f"Sys\n\nQuestion: {p.prompt}\n{instr}\nAnswer:"
  chat_tokenizer_without = type("Tok", (), {"chat_template": None})()
  assert format_prompt(p, chat_tokenizer_without, instruction=None) == f"Question: {p.prompt}\nAnswer:"
  assert data.format_prompts([p, p], raw=True) == [p.prompt, p.prompt]


def test_chat_tasks_answers_follow_from_their_prompts():
  import re

  from next_jax.rl import chat_tasks, rewards
  for p in make_task("add", 50, seed=0):
    a, b = map(int, re.fullmatch(r"What is (\d+) \+ (\d+)\?", p.prompt).groups())
    assert int(p.answer) == a + b
  for p in make_task("compare", 50, seed=0):
    a, b = map(int, re.fullmatch(r"Which number is larger: (\d+) or (\d+)\?", p.prompt).groups())
    assert a != b and int(p.answer) == max(a, b)
  for p in make_task("extract", 50, seed=0):
    nums, nth = re.fullmatch(r"Here is a list of numbers: ([\d, ]+)\. What is the (\w+) number in the list\?",
                             p.prompt).groups()
    assert int(p.answer) == [int(x) for x in nums.split(", ")][chat_tasks.ORDINALS.index(nth)]
  for name in chat_tasks.TASKS:
    for p in make_task(name, 50, seed=1):  # the reference solution earns the reward; a wrong one does not
      fn = rewards.get_reward(p.verifier)
      assert fn(p.solution, p.answer) == 1.0
      assert fn("12345", p.answer) == 0.0


# ------------------------------------------------------------------------------ real benchmark files

BENCHMARK_ROWS = {"aime24": 30, "aime25": 30, "amc23": 40, "math500": 500, "minerva": 272,
                  "olympiadbench": 675, "gsm8k": 1319}


def _math_eval_or_skip():
  try:
    return data.math_eval_dir()
  except FileNotFoundError as e:
    pytest.skip(f"the math-eval data directory is absent: {e}")


@pytest.mark.parametrize("name", sorted(BENCHMARK_ROWS))
def test_every_benchmark_file_loads_as_it_is(name):
  _math_eval_or_skip()
  problems = data.load_benchmark(name)
  assert len(problems) == BENCHMARK_ROWS[name]
  assert {p.task for p in problems} == {name} and {p.verifier for p in problems} == {"math"}
  assert len({p.id for p in problems}) == len(problems) and all(p.prompt and p.answer for p in problems)


def test_question_answer_rows_without_hashes_are_final_answers(tmp_path):
  f = tmp_path / "qa.jsonl"
  f.write_text('{"question": "2+2?", "answer": 4.0}\n{"question": "Area?", "answer": "$6 \\\\mathrm{~m}^2$"}\n')
  a, b = load_problems(f)
  assert (a.prompt, a.answer, b.answer) == ("2+2?", "4.0", "$6 \\mathrm{~m}^2$")
  g = tmp_path / "g.jsonl"
  g.write_text('{"question": "q", "answer": "because #### 1,024"}\n')
  assert load_problems(g)[0].answer == "1024"  # still gsm8k when the answer carries '####'


def test_a_missing_data_dir_says_where_to_point_it(tmp_path, monkeypatch):
  monkeypatch.setenv(data.MATH_EVAL_ENV, str(tmp_path / "nowhere"))
  with pytest.raises(FileNotFoundError, match="NEXT_JAX_MATH_EVAL.*aime24.jsonl"):
    data.load_benchmark("aime24")
  with pytest.raises(ValueError, match="unknown benchmark 'aime26'"):
    data.load_benchmark("aime26", data_dir=tmp_path)


def test_a_registered_benchmark_is_loaded_by_name(tmp_path, monkeypatch):
  monkeypatch.setattr(data, "BENCHMARKS", dict(data.BENCHMARKS))
  (tmp_path / "mine.jsonl").write_text('{"problem": "1+1?", "answer": "2"}\n')
  data.register_benchmark("mine", "mine.jsonl", verifier="exact", instruction="Just the number.")
  (p,) = data.load_benchmark("mine", data_dir=tmp_path)
  assert (p.task, p.verifier, p.answer) == ("mine", "exact", "2")
