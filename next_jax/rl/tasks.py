"""Synthetic verifiable tasks (CPU scale) and the task registry: `make_task(name, n, seed, split, **knobs)`.

    arith      "12+34*5=" → "182" (TOY_NOTES' a+b*c family; knobs: operand ranges, operator template)
    countdown  numbers + target → an expression reaching the target (answer: JSON spec for the verifier)
    add, compare, extract, countdown3   posed in words for chat models (next_jax/rl/chat_tasks.py)
    rg:<name>  any reasoning-gym dataset (next_jax/rl/rg_tasks.py; its config fields are the knobs)
Train and test never overlap: a problem's split is a hash of its content (task, operands), independent of
the seed (`data.split_of`), so any train seed and any test seed are disjoint; within a split problems
are unique. Problems from files, benchmarks, data order and prompts: next_jax/rl/data.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from next_jax.core.registry import Registry
from next_jax.rl import chat_tasks, rewards, rg_tasks
from next_jax.rl.data import Problem, split_of

SPLITS = ("train", "test")
TEST_FRACTION = 0.1  # share of each synthetic task's problem space that belongs to the test split


@dataclasses.dataclass(frozen=True)
class ArithSpec:
  """Knobs of `arith`: operand i uniform in ranges[i]; ops[i] joins operands i and i+1 ('?' = uniform
  from op_choices). Default = TOY_NOTES: a, b ∈ 0–99, c ∈ 0–9, "a+b*c=", answers zero-padded to 3 digits.
  Precedence is the usual one (* before + −); pad zero-pads |answer| (0: no padding)."""

  ranges: tuple[tuple[int, int], ...] = ((0, 99), (0, 99), (0, 9))
  ops: str = "+*"
  op_choices: str = "+-*"
  pad: int = 3

  def __post_init__(self):
    object.__setattr__(self, "ranges", tuple(tuple(int(v) for v in r) for r in self.ranges))
    if len(self.ranges) < 2 or any(len(r) != 2 or r[0] < 0 or r[0] > r[1] for r in self.ranges):
      raise ValueError(f"ArithSpec.ranges={self.ranges!r}: need ≥ 2 (lo, hi) pairs with 0 ≤ lo ≤ hi")
    if len(self.ops) != len(self.ranges) - 1 or set(self.ops) - set("+-*?"):
      raise ValueError(f"ArithSpec.ops={self.ops!r}: need {len(self.ranges) - 1} chars from '+-*?'")
    if not self.op_choices or set(self.op_choices) - set("+-*"):
      raise ValueError(f"ArithSpec.op_choices={self.op_choices!r}: need chars from '+-*'")


@dataclasses.dataclass(frozen=True)
class CountdownSpec:
  """Knobs of `countdown`: `count` numbers uniform in number_range; a random subset of min_use..count of
  them combined by a random expression with ops (integer, non-negative intermediates, exact division) gives
  the target, kept if in target_range. use_all: the verifier demands every number exactly once."""

  count: int = 4
  number_range: tuple[int, int] = (1, 25)
  target_range: tuple[int, int] = (1, 200)
  min_use: int = 2
  ops: str = "+-*/"
  use_all: bool = False

  def __post_init__(self):
    if not 2 <= self.count <= 8:
      raise ValueError(f"CountdownSpec.count={self.count}: need 2..8")
    if not 2 <= self.min_use <= self.count:
      raise ValueError(f"CountdownSpec.min_use={self.min_use}: need 2..count={self.count}")
    if self.use_all and self.min_use != self.count:
      raise ValueError(f"CountdownSpec.use_all needs min_use == count, got min_use={self.min_use}")
    lo, hi = self.number_range
    if not 0 <= lo <= hi < 10 ** rewards.MAX_LITERAL_DIGITS:
      raise ValueError(f"CountdownSpec.number_range={self.number_range!r}: need 0 ≤ lo ≤ hi < 10^6")
    if self.target_range[0] > self.target_range[1]:
      raise ValueError(f"CountdownSpec.target_range={self.target_range!r}: need lo ≤ hi")
    if not self.ops or set(self.ops) - set("+-*/"):
      raise ValueError(f"CountdownSpec.ops={self.ops!r}: need chars from '+-*/'")

# ------------------------------------------------------------------------------------- synthetic tasks


def arith_value(operands: Sequence[int], ops: str) -> int:
  """Value with the usual precedence: the sum of ± products of *-joined runs (no eval)."""
  total, sign, prod = 0, 1, operands[0]
  for op, x in zip(ops, operands[1:]):
    if op == "*":
      prod *= x
    else:
      total += sign * prod
      sign, prod = (1 if op == "+" else -1), x
  return total + sign * prod


def _sample_arith(rng: np.random.Generator, spec: ArithSpec) -> tuple[str, dict[str, str]]:
  nums = [int(rng.integers(lo, hi + 1)) for lo, hi in spec.ranges]
  ops = "".join(spec.op_choices[int(rng.integers(len(spec.op_choices)))] if o == "?" else o for o in spec.ops)
  prompt = "".join(f"{a}{o}" for a, o in zip(nums, ops)) + f"{nums[-1]}="
  value = arith_value(nums, ops)
  answer = ("-" if value < 0 else "") + str(abs(value)).zfill(spec.pad)
  return prompt, {"prompt": prompt, "answer": answer, "solution": answer}


def _combine(a: tuple[int, str], b: tuple[int, str], op: str) -> tuple[int, str] | None:
  """(value, expr) of a op b with integer, non-negative results, or None."""
  (x, ex), (y, ey) = a, b
  if op == "+":
    v = x + y
  elif op == "-":
    v = x - y
  elif op == "*":
    v = x * y
  else:
    v = x // y if y and x % y == 0 else -1
  return (v, f"({ex}{op}{ey})") if v >= 0 else None


def _sample_countdown(rng: np.random.Generator, spec: CountdownSpec) -> tuple[str, dict[str, str]] | None:
  lo, hi = spec.number_range
  numbers = [int(rng.integers(lo, hi + 1)) for _ in range(spec.count)]
  k = int(rng.integers(spec.min_use, spec.count + 1))
  items = [(x, str(x)) for x in (numbers[i] for i in rng.permutation(spec.count)[:k])]
  while len(items) > 1:
    i, j = (int(v) for v in rng.permutation(len(items))[:2])
    made = _combine(items[i], items[j], spec.ops[int(rng.integers(len(spec.ops)))])
    if made is None:
      return None
    items = [it for t, it in enumerate(items) if t not in (i, j)] + [made]
  target, expr = items[0]
  if not spec.target_range[0] <= target <= spec.target_range[1]:
    return None
  expr = expr[1:-1] if expr.startswith("(") else expr
  key = f"{sorted(numbers)}>{target}"
  how = "exactly once" if spec.use_all else "at most once"
  prompt = (f"Using the numbers {numbers}, write an arithmetic expression that equals {target}. "
            f"You may use + - * / and parentheses; each number may be used {how}.")
  answer = json.dumps({"target": target, "numbers": numbers, "use_all": spec.use_all})
  return key, {"prompt": prompt, "answer": answer, "solution": expr}


# name → (spec dataclass: the task's knobs (config.task.knobs) and their defaults, sample(rng, spec), verifier)
TASKS = Registry("task", {
    "arith": (ArithSpec, _sample_arith, "exact"),
    "countdown": (CountdownSpec, _sample_countdown, "countdown"),
    **chat_tasks.TASKS,  # posed in words, for pretrained chat models: add, compare, extract, countdown3
})


def known_task(name: str) -> bool:
  """Whether make_task builds `name`: a TASKS entry or a reasoning-gym task `rg:<dataset>`."""
  return name in TASKS or rg_tasks.is_rg(name)


def make_task(name: str, n: int, seed: int, split: str = "train", test_fraction: float = TEST_FRACTION,
              max_draws: int | None = None, **knobs: Any) -> tuple[Problem, ...]:
  """n unique problems of task `name` from `split`, a pure function of (name, n, seed, split, knobs).

  Draws from np.random.default_rng((seed, split index)) and keeps a draw iff its content hashes into
  `split` (split_of) and is new; raises if max_draws (default 50·n/share + 1000) draws do not suffice (the
  problem space is too small for n). `rg:<dataset>` names a reasoning-gym dataset (next_jax/rl/rg_tasks.py:
  its entries in order instead of our draws, the same split rule, its config fields as the knobs)."""
  if not known_task(name):
    raise ValueError(f"unknown task {name!r}; known: {sorted(TASKS)} or rg:<reasoning-gym dataset>")
  if split not in SPLITS:
    raise ValueError(f"split={split!r}; expected one of {SPLITS}")
  if not 0.0 < test_fraction < 1.0:
    raise ValueError(f"test_fraction={test_fraction}: need 0 < test_fraction < 1")
  if rg_tasks.is_rg(name):
    return rg_tasks.make_task(name, n, seed, split, test_fraction, max_draws, **knobs)
  spec_cls, sample, verifier = TASKS[name]
  fields = {f.name for f in dataclasses.fields(spec_cls)}
  if set(knobs) - fields:
    raise ValueError(f"task {name!r}: unknown knobs {sorted(set(knobs) - fields)}; known: {sorted(fields)}")
  spec = spec_cls(**knobs)
  share = test_fraction if split == "test" else 1.0 - test_fraction
  max_draws = max_draws or int(50 * n / share) + 1000
  rng = np.random.default_rng((seed, SPLITS.index(split)))
  seen: dict[str, Problem] = {}
  for _ in range(max_draws):
    if len(seen) == n:
      break
    drawn = sample(rng, spec)
    if drawn is None:
      continue
    key, row = drawn
    if key in seen or split_of(name, key, test_fraction) != split:
      continue
    pid = f"{name}:{hashlib.sha256(f'{name}|{key}'.encode()).hexdigest()[:12]}"
    seen[key] = Problem(task=name, verifier=verifier, id=pid, **row)
  if len(seen) < n:
    raise ValueError(f"task {name!r} split {split!r}: only {len(seen)} unique problems of the {n} asked for "
                     f"after {max_draws} draws; widen the knobs ({spec}) or ask for fewer")
  return tuple(seen.values())
