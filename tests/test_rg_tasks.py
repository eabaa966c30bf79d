"""next_jax/rl/rg_tasks.py: reasoning-gym datasets as tasks `rg:<dataset>`: reward = 1[score_answer = 1] on the
extracted answer, knobs from the config reach the dataset, train and test disjoint by content."""

import json
import subprocess
import sys

import pytest

rg = pytest.importorskip("reasoning_gym")

import ml_collections

from next_jax.core import config
from next_jax.rl import data, rewards, rg_tasks, tasks
from next_jax.run import experiment

EASY = {  # the knobs each checked task is built with
    "rg:basic_arithmetic": dict(min_terms=2, max_terms=2, max_digits=1, operators=("+", "-"),
                                allow_parentheses=False, allow_negation=False),
    "rg:chain_sum": dict(min_terms=2, max_terms=3, max_digits=2),
    "rg:leg_counting": dict(min_animals=1, max_animals=2, max_instances=3),
    "rg:countdown": dict(min_numbers=3, max_numbers=3, max_value=20, min_target=10, max_target=50),
}
WRONG = {  # a wrong answer per task, and what reasoning-gym's raw score gives it (partial credit)
    "rg:basic_arithmetic": lambda p: str(int(p.solution) + 1),
    "rg:chain_sum": lambda p: str(int(p.solution) - 1),
    "rg:leg_counting": lambda p: str(int(p.solution) + 2),
    "rg:countdown": lambda p: "1 + 1",
}


def _library_score(problem, answer):
  """The score reasoning-gym itself gives `answer`, from a dataset built independently of rg_tasks."""
  spec = json.loads(problem.answer)
  ds = rg.create_dataset(spec["dataset"], **spec["config"])
  return ds.score_answer(answer, ds[spec["index"]])


@pytest.mark.parametrize("name", sorted(EASY))
def test_right_answers_score_one_and_wrong_answers_zero(name):
  for p in tasks.make_task(name, 4, seed=0, split="test", **EASY[name]):
    assert _library_score(p, p.solution) == 1.0
    assert rewards.REWARDS["rg"](f"Sure. <answer>{p.solution}</answer>", p.answer) == 1.0
    wrong = WRONG[name](p)
    assert _library_score(p, wrong) < 1.0
    assert rewards.REWARDS["rg"](f"<answer>{wrong}</answer>", p.answer) == 0.0
    assert rewards.REWARDS["rg"](p.solution, p.answer) == 0.0  # the tag convention: no tag, no answer
    assert rewards.REWARDS["rg"]("", p.answer) == 0.0


def test_a_locator_regenerates_the_entry_the_problem_was_made_from():
  made = tasks.make_task("rg:leg_counting", 5, seed=3, split="train", **EASY["rg:leg_counting"])
  rg_tasks._ENTRIES.clear()  # as in another process: regenerated from the locator alone
  for p in made:
    _, entry = rg_tasks.entry_of(p.answer)
    assert entry["question"] == p.prompt and str(entry["answer"]) == p.solution


def test_partial_credit_is_not_reward():
  (p,) = tasks.make_task("rg:countdown", 1, seed=0, split="train", **EASY["rg:countdown"])
  assert rg_tasks.raw_score("<answer>1 + 1</answer>", p.answer) == pytest.approx(0.05)
  assert rg_tasks.raw_score("no answer", p.answer) == pytest.approx(0.01)
  assert rewards.REWARDS["rg"]("<answer>1 + 1</answer>", p.answer) == 0.0


def test_number_extraction_reads_the_tag_first_then_the_last_number():
  (p,) = tasks.make_task("rg:basic_arithmetic", 1, seed=0, split="train", extract="number",
                         **EASY["rg:basic_arithmetic"])
  assert p.verifier == "rg_number"
  right, wrong = p.solution, str(int(p.solution) + 1)
  score = rewards.REWARDS["rg_number"]
  assert score(f"So it is {wrong}, no, {right}", p.answer) == 1.0
  assert score(f"{right} <answer>{wrong}</answer>", p.answer) == 0.0
  assert score(f"The answer is {right}. Then 7", p.answer) == 1.0
  assert score(f"{right[0]} + 0 = +{right}.", p.answer) == 1.0
  assert score("no number", p.answer) == 0.0


def test_train_and_test_are_disjoint_by_content():
  knobs = EASY["rg:chain_sum"]
  train = tasks.make_task("rg:chain_sum", 300, seed=0, split="train", **knobs)
  tests = [tasks.make_task("rg:chain_sum", 60, seed=s, split="test", **knobs) for s in (0, 1)]
  assert len({p.prompt for p in train}) == 300
  for test in tests:
    assert not {p.prompt for p in train} & {p.prompt for p in test}
    assert all(data.split_of("rg:chain_sum", p.prompt) == "test" for p in test)
  assert tasks.make_task("rg:chain_sum", 60, seed=1, split="test", **knobs) == tests[1]  # deterministic


def _config(**knobs):
  c = config.base()
  c.task.name, c.task.n_train, c.task.n_test, c.task.n_val = "rg:chain_sum", 20, 10, 0
  c.task.knobs = ml_collections.ConfigDict(knobs)
  return c


def test_knobs_from_the_config_reach_the_dataset():
  train, test, _ = experiment.load_problems(_config(min_terms=3, max_terms=3, min_digits=1, max_digits=1))
  for p in train + test:
    spec = json.loads(p.answer)
    assert spec["config"]["min_terms"] == spec["config"]["max_terms"] == 3
    numbers = [int(x) for x in p.prompt.replace("-", " ").replace("+", " ").split() if x.isdigit()]
    assert len(numbers) == 3 and all(x < 10 for x in numbers)


def test_bad_knobs_and_names_are_config_errors():
  with pytest.raises(experiment.ConfigError, match="unknown knobs \\['max_digit'\\]"):
    experiment.load_problems(_config(max_digit=2))
  with pytest.raises(experiment.ConfigError, match="rejected by reasoning-gym"):
    experiment.load_problems(_config(min_terms=3, max_terms=2))
  with pytest.raises(experiment.ConfigError, match="extract='xml'"):
    experiment.load_problems(_config(extract="xml"))
  with pytest.raises(ValueError, match="unknown reasoning-gym dataset 'nope'"):
    tasks.make_task("rg:nope", 2, seed=0)


def test_reasoning_gym_is_imported_only_when_used():
  code = ("import sys; from next_jax.rl import tasks; "
          "tasks.make_task('add', 3, seed=0); assert 'reasoning_gym' not in sys.modules; "
          "tasks.make_task('rg:chain_sum', 3, seed=0); assert 'reasoning_gym' in sys.modules")
  subprocess.run([sys.executable, "-c", code], check=True)


def test_smollm2_preset_poses_rg_tasks_with_their_easy_knobs():
  from next_jax.configs import smollm2
  c = smollm2.get_config("task=rg:chain_sum")
  experiment.validate(c)
  assert c.task.knobs.to_dict() == {**smollm2.RG_EASY["chain_sum"], "extract": "number"}
  assert c.task.instruction == "Answer with just the number."
  other = smollm2.get_config("task=rg:countdown")  # not in RG_EASY: library defaults, the tag convention
  assert other.task.knobs.to_dict() == {"extract": "tag"} and "<answer>" in other.task.instruction
  c.task.n_train, c.task.n_test, c.task.n_val = 5, 5, 0
  c.task.knobs.max_digits = 1  # what --config.task.knobs.max_digits=1 does
  train, _, _ = experiment.load_problems(c)
  assert all(json.loads(p.answer)["config"]["max_digits"] == 1 for p in train)


def test_rg_select_summary_counts_pass_at_1_and_pass_at_k():
  from experiments import rg_select  # noqa: PLC0415
  row = {"task": "rg:x", "n": 4, "max_new_tokens": 16, "instruction": "I", "system": "S", "start": 0,
         "samples": 8, "problems": 4, "seconds": 32.0, "counts": {"rg_number": [0, 2, 8, 0]},
         "guesses": {"rg_number": [[0.0, 1.0], [0.0], [], [0.0, 0.0]]}}
  (s,) = rg_select.summarize([row])
  assert s["pass@1"] == 10 / 32 and s["pass@8"] == 0.5 and s["complete"]
  assert s["guess_any"] == 0.25 and s["guess_best_pos"] == 0.25 and s["s_per_row"] == 1.0
  assert "| rg:x | I | rg_number | 16 | 4 | 31.2 ±" in rg_select.table([row])


def test_model_text_never_reaches_a_scorer_that_evaluates_it(monkeypatch):
  """reasoning-gym's countdown scorer runs sympy's parse_expr on the answer (arbitrary Python): the payload
  runs when the library is called directly, never through our verifiers; a dataset whose scorer cannot
  score even its oracle answer without eval is refused by name."""
  monkeypatch.delenv("NEXT_JAX_PWNED", raising=False)
  (p,) = tasks.make_task("rg:countdown", 1, seed=0, split="train", **EASY["rg:countdown"])
  payload = "__import__('os').environ.__setitem__('NEXT_JAX_PWNED', '1')"
  for verifier in rg_tasks.EXTRACTORS:
    assert rewards.REWARDS[verifier](f"<answer>{payload}</answer>", p.answer) == 0.0
  assert "NEXT_JAX_PWNED" not in __import__("os").environ
  assert rewards.REWARDS["rg"](f"<answer>{p.solution}</answer>", p.answer) == 1.0  # the arithmetic gate
  _library_score(p, payload)  # the library itself evaluates it: the check above can fail
  assert __import__("os").environ.get("NEXT_JAX_PWNED") == "1"
  with pytest.raises(ValueError, match="rg:number_sorting.*evaluates the answer text"):
    tasks.make_task("rg:number_sorting", 2, seed=0, split="train")
