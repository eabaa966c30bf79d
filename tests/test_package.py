"""next_jax/__init__.py: the process environment set once, before numpy, JAX or transformers load."""

from __future__ import annotations

import os
import subprocess
import sys

NO_TORCH = "import sys; sys.modules['torch'] = None\n"  # find_spec('torch') → None: transformers sees no torch


def _stderr(code: str, env: dict) -> str:
  return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                        check=True).stderr


def test_importing_next_jax_silences_transformers_torch_advice_and_pins_openblas():
  env = {k: v for k, v in os.environ.items()
         if k not in ("OPENBLAS_NUM_THREADS", "TRANSFORMERS_NO_ADVISORY_WARNINGS")}
  assert "PyTorch was not found" in _stderr(NO_TORCH + "import transformers", env)  # what make demo printed
  code = NO_TORCH + "import next_jax, os, transformers; print(os.environ['OPENBLAS_NUM_THREADS'], file=sys.stderr)"
  err = _stderr(code, env)
  assert "PyTorch was not found" not in err and err.strip().endswith("1")
  assert _stderr(code, {**env, "OPENBLAS_NUM_THREADS": "4"}).strip().endswith("4")  # the user's value wins
