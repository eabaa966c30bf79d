"""The presets (big_vision style: one file per experiment family, `get_config(arg)` with a `key=value,…`
argument). A run names one by preset name or by file:

    next-jax-run --config=toy_arith                     # this package's toy_arith.py
    next-jax-run --config=smollm2:task=add,seed=1       # with its argument
    next-jax-run --config=/path/to/my_config.py:quick   # any config file

`resolve` maps a preset name to its file here, so ml_collections' config_flags (which loads files) reads
both forms."""

from __future__ import annotations

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
PRESETS = tuple(sorted(p.stem for p in HERE.glob("*.py") if not p.stem.startswith("_")))


def resolve(spec: str) -> str:
  """`name[:arg]` of a preset → `<this folder>/name.py[:arg]`; anything else (a file path) unchanged.
  A path that does not exist but ends in a preset's file name (e.g. the old `next_jax/configs/smollm2.py`) also
  resolves to the preset."""
  path, sep, arg = spec.partition(":")
  if path in PRESETS:
    return f"{HERE / path}.py{sep}{arg}"
  if not os.path.exists(path) and Path(path).suffix == ".py" and Path(path).stem in PRESETS \
      and Path(path).parent.name == "configs":
    return f"{HERE / Path(path).name}{sep}{arg}"
  if "/" not in path and not path.endswith(".py"):
    raise ValueError(f"no preset {path!r}: presets are {', '.join(PRESETS)}; or give a config file path")
  return spec


def resolve_argv(argv: list[str]) -> list[str]:
  """Command-line arguments with `--config=<preset>[:arg]` (or `--config <preset>`) resolved to the preset's
  file, for config_flags; an unknown preset exits with one line naming it."""
  out, it = [], iter(argv)
  for a in it:
    if a.startswith("--config="):
      a = "--config=" + _resolve_or_exit(a.split("=", 1)[1])
    elif a == "--config":
      out.append(a)
      a = _resolve_or_exit(next(it, ""))
    out.append(a)
  return out


def _resolve_or_exit(spec: str) -> str:
  try:
    return resolve(spec)
  except ValueError as e:
    sys.exit(f"config error: --config={spec}: {e}")
