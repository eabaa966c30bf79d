"""reasoning-gym (PyPI `reasoning-gym`, pinned 0.1.25 in setup.py's `rg` extra) as a task source.

Any of its procedural datasets is a task named `rg:<dataset>` (`rg:basic_arithmetic`, `rg:chain_sum`, …);
its config fields are the task's knobs (`config.task.knobs`, or `make_task(..., **knobs)`), except `seed`
and `size`, which the split rule sets.

    Problem.prompt    the dataset's question, verbatim (the instruction comes from config.task.instruction)
    Problem.answer    a locator, JSON {"dataset", "config": knobs + seed + size, "index"}: the verifier
                      uses the entry make_task drew, or regenerates it in another process (reasoning-gym
                      draws entry i from Random(seed + i)), so metadata never goes through a lossy JSON
                      round trip
    Problem.solution  the dataset's oracle answer

Reward: 1.0 iff `dataset.score_answer(answer, entry) == 1.0`, else 0.0, where `answer` is extracted from
the response by the task's `extract` knob (not a reasoning-gym field; it picks the verifier):
    extract="tag"     verifier "rg": reasoning_gym.utils.extract_answer(response, tag_name="answer"), the
                      library's own convention (the text inside the last <answer>…</answer>, stripped;
                      None without one). The default.
    extract="number"  verifier "rg_number": the tag when there is one, else rewards.last_number(response)
                      (a \\boxed{} / "answer is" number, else the last number): for numeric-answer tasks
                      posed to a model too small to keep the tag format (SmolLM2-135M almost never writes
                      the tag; experiments/results/real_rg/README.md).
The raw score gives partial credit to wrong answers (0.2 for a wrong number on basic_arithmetic, 0.01 for
an empty one on countdown), which would pay GRPO for formatted wrong answers; so training and accuracy
both use 1[score = 1]. `raw_score(response, answer)` returns the unthresholded score for analysis.

Model text is never evaluated. Some reasoning-gym scorers pass the answer to eval() or sympy's parse_expr
(countdown, puzzle24, n_queens, number_sorting, … in 0.1.25), which runs arbitrary Python. So every scorer
runs with eval blocked (`_score`: an audit hook makes compile/exec raise, and the reward is 0) unless the
answer passed the arithmetic gate first; make_task refuses a dataset whose scorer cannot score even its
own oracle answer that way. ARITHMETIC names the datasets whose answer is an arithmetic expression
(countdown, puzzle24): an answer made only of digits, + - * / ( ) and spaces, without "**", up to 200
characters, is scored by the library as it is (such text names nothing and is cheap to evaluate).

Split (the same rule as tasks.make_task): entries i = 0, 1, … of the dataset seeded by (task, seed,
split) are kept iff split_of(task, question) is the asked split and the question is new, so train and
test are disjoint by content whatever their seeds. `reasoning_gym` is imported on first use only
(≈ 1 s: it imports every task module), never on `make demo`'s path.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import re
import sys
import threading
from typing import Any

from next_jax.rl import rewards

PREFIX = "rg:"
VERIFIERS = {"tag": "rg", "number": "rg_number"}  # the `extract` knob → the verifier that scores it
RESERVED = ("seed", "size")  # config fields the split rule sets
VERSION = "0.1.25"
ARITHMETIC = ("countdown", "puzzle24")  # answers are arithmetic expressions its scorer evaluates
_ARITH = re.compile(r"[0-9+\-*/() ]{1,200}")


def _rg():
  """The reasoning_gym module, imported on first use (an ImportError says how to install it)."""
  try:
    import reasoning_gym  # noqa: PLC0415
  except ImportError as e:
    raise ImportError(f"rg: tasks need reasoning-gym: pip install 'reasoning-gym=={VERSION}' "
                      "(or pip install -e '.[rg]')") from e
  return reasoning_gym


def is_rg(name: str) -> bool:
  """Whether `name` names a reasoning-gym task (`rg:<dataset>`)."""
  return name.startswith(PREFIX)


def dataset_names() -> list[str]:
  """The reasoning-gym datasets this install knows, as task names (`rg:<dataset>`)."""
  _rg()
  from reasoning_gym.factory import DATASETS  # noqa: PLC0415
  return sorted(PREFIX + n for n in DATASETS)


def knob_names(name: str) -> list[str]:
  """The knobs of task `name`: its reasoning-gym config dataclass's fields, less seed and size."""
  _rg()
  from reasoning_gym.factory import DATASETS  # noqa: PLC0415
  dataset = name.removeprefix(PREFIX)
  if dataset not in DATASETS:
    raise ValueError(f"unknown reasoning-gym dataset {dataset!r} (task {name!r}); known: "
                     f"{sorted(DATASETS)[:12]} … ({len(DATASETS)} in all)")
  return [f.name for f in dataclasses.fields(DATASETS[dataset][1]) if f.name not in RESERVED]


def _plain(v: Any) -> Any:
  """Knob values as JSON keeps them: tuples → lists (ConfigDict and JSON hand back lists)."""
  return [_plain(x) for x in v] if isinstance(v, (list, tuple)) else v


@functools.lru_cache(maxsize=64)
def _dataset(dataset: str, config_json: str):
  """The reasoning-gym dataset built from its name and JSON config (cached: verifiers rebuild it)."""
  return _rg().create_dataset(dataset, **json.loads(config_json))


def build(name: str, seed: int, size: int, **knobs: Any):
  """(dataset, config JSON) for task `name`; a bad knob is a ValueError naming it and the known ones."""
  known = knob_names(name)
  unknown = sorted(set(knobs) - set(known))
  if unknown:
    raise ValueError(f"task {name!r}: unknown knobs {unknown}; known: {known}")
  config = json.dumps({**{k: _plain(v) for k, v in sorted(knobs.items())}, "seed": seed, "size": size})
  try:
    return _dataset(name.removeprefix(PREFIX), config), config
  except (AssertionError, TypeError, ValueError) as e:
    raise ValueError(f"task {name!r}: knobs {knobs} rejected by reasoning-gym: {e}") from None


def _rg_seed(name: str, seed: int, split: str) -> int:
  """The dataset seed of (task, our seed, split): 31 bits of sha256, so the streams do not overlap."""
  return int.from_bytes(hashlib.sha256(f"{name}|{seed}|{split}".encode()).digest()[:4], "big") >> 1


def make_task(name: str, n: int, seed: int, split: str, test_fraction: float, max_draws: int | None,
              extract: str = "tag", **knobs: Any) -> tuple:
  """n unique problems of `rg:<dataset>` from `split` (see the module docstring); tasks.make_task's contract.
  extract: how the verifier reads the answer ("tag" | "number"); knobs: the dataset's config fields."""
  from next_jax.rl import data  # noqa: PLC0415  (tasks imports this module)
  if extract not in VERIFIERS:
    raise ValueError(f"task {name!r}: extract={extract!r}; use one of {sorted(VERIFIERS)}")
  share = test_fraction if split == "test" else 1.0 - test_fraction
  max_draws = max_draws or int(50 * n / share) + 1000
  ds, config = build(name, _rg_seed(name, seed, split), max_draws, **knobs)
  dataset, seen = name.removeprefix(PREFIX), {}
  for i in range(max_draws):
    if len(seen) == n:
      break
    entry = ds[i]
    key = entry["question"]
    if key in seen or data.split_of(name, key, test_fraction) != split:
      continue
    locator = json.dumps({"dataset": dataset, "config": json.loads(config), "index": i})
    pid = f"{name}:{hashlib.sha256(f'{name}|{key}'.encode()).hexdigest()[:12]}"
    seen[key] = data.Problem(prompt=key, answer=locator, task=name, verifier=VERIFIERS[extract], id=pid,
                              solution=str(entry["answer"]))
    _ENTRIES[locator] = entry
  first = next(iter(seen.values()), None)
  if first is not None and _oracle_blocked(first.answer, first.solution):
    raise ValueError(f"task {name!r}: reasoning-gym's score_answer evaluates the answer text (eval or "
                     "sympy parsing), so it cannot score even the oracle answer with eval blocked; next_jax "
                     "never runs model text through eval (next_jax/rl/rg_tasks.py)")
  if len(seen) < n:
    raise ValueError(f"task {name!r} split {split!r}: only {len(seen)} unique problems of the {n} asked for "
                     f"after {max_draws} draws; widen the knobs ({knobs}) or ask for fewer")
  return tuple(seen.values())


_ENTRIES: dict[str, dict] = {}  # locator → the entry make_task drew it from, in this process


def entry_of(locator: str) -> tuple[Any, dict]:
  """(dataset, entry) that a Problem.answer locator names: the entry make_task saw when this process made
  the problem (exact even for a generator that keeps state between items), else regenerated."""
  spec = json.loads(locator)
  ds = _dataset(spec["dataset"], json.dumps(spec["config"]))
  if locator not in _ENTRIES:
    _ENTRIES[locator] = ds[int(spec["index"])]
  return ds, _ENTRIES[locator]


def extract_tag(response: str) -> str | None:
  """reasoning_gym.utils.extract_answer(response, tag_name="answer"): the last <answer>…</answer>, stripped."""
  _rg()
  from reasoning_gym.utils import extract_answer  # noqa: PLC0415
  return extract_answer(response[-rewards.MAX_TAIL_CHARS:], tag_name="answer")


def extract_number(response: str) -> str | None:
  """The tagged answer when there is one, else rewards.last_number(response) written as an answer is: no
  sentence-ending point, no plus sign ("= 16." → "16", "+4" → "4"; reasoning-gym compares many answers
  as strings)."""
  tagged = extract_tag(response)
  if tagged is not None:
    return tagged
  number = rewards.last_number(response)
  return number.rstrip(".").lstrip("+") or None if number is not None else None


EXTRACTORS = {"rg": extract_tag, "rg_number": extract_number}


def raw_score(response: str, locator: str, verifier: str = "rg") -> float:
  """dataset.score_answer(extracted answer, entry) as reasoning-gym returns it (partial credit kept)."""
  return _score(locator, EXTRACTORS[verifier](response))


class _EvalBlocked(RuntimeError):
  pass


_GUARD = threading.local()


def _audit(event: str, args) -> None:
  """compile/exec while `_score` blocks eval raises, but for a lazily imported module's body."""
  if getattr(_GUARD, "on", False) and event in ("compile", "exec"):
    frame = sys._getframe(1)
    while frame is not None:
      if frame.f_code.co_filename.startswith("<frozen importlib"):
        return
      frame = frame.f_back
    raise _EvalBlocked(f"reasoning-gym scorer tried to {event} text; next_jax never evaluates model text")


sys.addaudithook(_audit)


def _score(locator: str, answer: str | None) -> float:
  """dataset.score_answer(answer, entry) with eval blocked (module docstring); an arithmetic-gated answer
  of an ARITHMETIC dataset is scored unguarded."""
  ds, entry = entry_of(locator)  # our own locator: a failure here is a bug, not model text
  gated = (answer is not None and json.loads(locator)["dataset"] in ARITHMETIC
           and _ARITH.fullmatch(answer) is not None and "**" not in answer)
  _GUARD.on = not gated
  try:
    return float(ds.score_answer(answer, entry))
  finally:
    _GUARD.on = False


def _oracle_blocked(locator: str, solution: str) -> bool:
  """Whether the dataset's oracle answer fails only because its scorer's eval was blocked."""
  try:
    return _score(locator, solution) < 1.0 and _score_unguarded(locator, solution) == 1.0
  except _EvalBlocked:
    return True


def _score_unguarded(locator: str, answer: str) -> float:
  """The library's score of our own oracle answer (never model text)."""
  ds, entry = entry_of(locator)
  return float(ds.score_answer(answer, entry))


def _reward(verifier: str):
  def reward(response: str, ground_truth: str) -> float:
    entry_of(ground_truth)  # outside the try: a bad locator is our bug, not model text
    try:
      return float(_score(ground_truth, EXTRACTORS[verifier](response)) == 1.0)
    except Exception:  # noqa: BLE001  (a blocked eval, or a scorer failing on model text)
      return 0.0
  reward.__name__ = f"{verifier}_reward"
  reward.__doc__ = (f"1.0 iff reasoning-gym scores the answer {EXTRACTORS[verifier].__name__} reads exactly "
                    "1.0 (full credit), else 0.0. Never raises on model text: a scorer that fails on it scores 0.")
  return reward


for _name in EXTRACTORS:
  rewards.REWARDS.register(_name, _reward(_name))
