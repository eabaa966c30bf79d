"""Synthetic verifiable tasks posed in words, for pretrained chat models (SmolLM2 and up).

Each task is a frozen spec (its knobs) and a sampler `(rng, spec) → (key, row)`; `tasks.TASKS` registers
them beside the toy tasks, so `make_task`, the split-by-content rule and the data order apply unchanged.
The instruction ("Answer with just the number.") comes from `config.task.instruction`, not from here.

    add        "What is 23 + 58?"                                    → "81"
    compare    "Which number is larger: 417 or 392?"                 → "417"
    extract    "Here is a list of numbers: 4, 91, 27, 8, 63. What is the third number in the list?" → "27"
    countdown3 three numbers, each used exactly once, reach a target → an expression (countdown verifier)
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np

ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth")


def _check_range(name: str, r: tuple[int, int]) -> None:
  if len(r) != 2 or not 0 <= r[0] < r[1]:
    raise ValueError(f"{name}={r!r}: need (lo, hi) with 0 ≤ lo < hi")


@dataclasses.dataclass(frozen=True)
class AddSpec:
  """a + b with a, b uniform in operand_range."""

  operand_range: tuple[int, int] = (0, 99)

  def __post_init__(self):
    _check_range("AddSpec.operand_range", self.operand_range)


@dataclasses.dataclass(frozen=True)
class CompareSpec:
  """The larger of two distinct numbers uniform in number_range."""

  number_range: tuple[int, int] = (10, 999)

  def __post_init__(self):
    _check_range("CompareSpec.number_range", self.number_range)


@dataclasses.dataclass(frozen=True)
class ExtractSpec:
  """The i-th of `count` numbers uniform in number_range (i uniform in 1..count)."""

  count: int = 5
  number_range: tuple[int, int] = (0, 99)

  def __post_init__(self):
    if not 2 <= self.count <= len(ORDINALS):
      raise ValueError(f"ExtractSpec.count={self.count}: need 2..{len(ORDINALS)}")
    _check_range("ExtractSpec.number_range", self.number_range)


@dataclasses.dataclass(frozen=True)
class Countdown3Spec:
  """Three numbers uniform in number_range, all used exactly once with + - * (no division), target ≥ 0."""

  number_range: tuple[int, int] = (1, 20)

  def __post_init__(self):
    _check_range("Countdown3Spec.number_range", self.number_range)


def _ints(rng: np.random.Generator, r: tuple[int, int], n: int) -> list[int]:
  return [int(x) for x in rng.integers(r[0], r[1] + 1, size=n)]


def sample_add(rng, spec: AddSpec):
  a, b = _ints(rng, spec.operand_range, 2)
  prompt = f"What is {a} + {b}?"
  return prompt, {"prompt": prompt, "answer": str(a + b), "solution": str(a + b)}


def sample_compare(rng, spec: CompareSpec):
  a, b = _ints(rng, spec.number_range, 2)
  if a == b:
    return None
  prompt = f"Which number is larger: {a} or {b}?"
  return prompt, {"prompt": prompt, "answer": str(max(a, b)), "solution": str(max(a, b))}


def sample_extract(rng, spec: ExtractSpec):
  nums = _ints(rng, spec.number_range, spec.count)
  i = int(rng.integers(spec.count))
  prompt = (f"Here is a list of numbers: {', '.join(map(str, nums))}. "
            f"What is the {ORDINALS[i]} number in the list?")
  return prompt, {"prompt": prompt, "answer": str(nums[i]), "solution": str(nums[i])}


def sample_countdown3(rng, spec: Countdown3Spec):
  nums = _ints(rng, spec.number_range, 3)
  x, y, z = (nums[i] for i in rng.permutation(3))
  op1, op2 = (str(o) for o in rng.choice(list("+-*"), size=2))
  inner = {"+": x + y, "-": x - y, "*": x * y}[op1]
  target = {"+": inner + z, "-": inner - z, "*": inner * z}[op2]
  if inner < 0 or target < 0:
    return None
  expr = f"({x}{op1}{y}){op2}{z}"
  prompt = (f"Using the numbers {nums}, each exactly once, write an arithmetic expression that equals "
            f"{target}. You may use + - * and parentheses.")
  answer = json.dumps({"target": target, "numbers": nums, "use_all": True})
  return f"{sorted(nums)}>{target}", {"prompt": prompt, "answer": answer, "solution": expr}


# name → (spec class, sampler, verifier): merged into tasks.TASKS
TASKS = {
    "add": (AddSpec, sample_add, "last_number"),
    "compare": (CompareSpec, sample_compare, "last_number"),
    "extract": (ExtractSpec, sample_extract, "last_number"),
    "countdown3": (Countdown3Spec, sample_countdown3, "countdown"),
}
