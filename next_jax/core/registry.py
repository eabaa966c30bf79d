"""One registration mechanism for every kind of plug-in: extrapolation methods (extrapolate.METHODS),
advantage estimators (grpo.ESTIMATORS), rewards (rewards.REWARDS), tasks (tasks.TASKS) and model-file
converters (model_files.CONVERTERS).

A `Registry` is a dict from name to entry with a kind for its messages:

    METHODS = Registry("extrapolation method")
    METHODS.register("half", Method(...))          # or, on a function:  @REWARDS.register("exact")
    METHODS.lookup("hlaf")   → ValueError: unknown extrapolation method 'hlaf'; known: ['alpharl', …]

An entry may declare config knobs of its own (`knobs`, name → default); `resolve_knobs(declared, given,
what)` merges the values a config gives over the defaults and refuses a name the entry does not declare, so
a plug-in with a knob is one function and one registration, and its knob is settable from the config
(`nxt.knobs` for methods, `task.knobs` for tasks).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class Registry(dict):
  """name → entry for one kind of plug-in (module docstring)."""

  def __init__(self, kind: str, entries: Mapping[str, Any] | None = None):
    super().__init__(entries or {})
    self.kind = kind

  def register(self, name: str, entry: Any = None) -> Any:
    """Add `entry` under `name` (a second registration of a name is refused); without an entry, a
    decorator that registers the function it decorates."""
    def add(e):
      if name in self:
        raise ValueError(f"{self.kind} {name!r} is already registered")
      self[name] = e
      return e
    return add if entry is None else add(entry)

  def lookup(self, name: str) -> Any:
    """The entry of `name`; an unknown name is a ValueError naming the kind and the known names."""
    if name not in self:
      raise ValueError(f"unknown {self.kind} {name!r}; known: {sorted(self)}")
    return self[name]

  def copy(self) -> Registry:
    """A copy of the same kind (tests register into a copy, then restore the original)."""
    return Registry(self.kind, self)


def resolve_knobs(declared: Mapping[str, Any], given: Mapping[str, Any], what: str) -> dict[str, Any]:
  """The declared knobs' defaults updated by `given`; a given name that is not declared is a ValueError
  naming it, `what` (e.g. "method 'half' (nxt.knobs)") and the declared names."""
  unknown = sorted(set(given) - set(declared))
  if unknown:
    raise ValueError(f"{what}: unknown knobs {unknown}; known: {sorted(declared)}")
  return {**declared, **given}


