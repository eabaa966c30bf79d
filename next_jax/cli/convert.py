"""Convert a model file (GGUF) or a packaged model into a Hugging Face directory, once, and print its path.

    python -m next_jax.cli.convert smollm2-135m-instruct          # the model `make real` installs
    python -m next_jax.cli.convert /models/foo.Q4_1.gguf --out /models/foo-hf

Without --out the directory goes to the cache ($NEXT_JAX_CACHE, default ~/.cache/next_jax); a second run
finds it there (keyed on the file's sha256) and converts nothing.
"""

from __future__ import annotations

import argparse
import sys
import time

from next_jax.models import hf, model_files


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("model", help=f"a .gguf file or one of {sorted(model_files.PACKAGED)}")
  ap.add_argument("--out", default=None, help="the HF directory to write (default: in the cache)")
  ap.add_argument("--overwrite", action="store_true",
                  help="replace an existing --out that next_jax did not write (its files are deleted)")
  args = ap.parse_args(argv)
  t0 = time.perf_counter()
  try:
    out = model_files.resolve(args.model, out_dir=args.out, overwrite=args.overwrite)
    cfg = hf.load_config(out)
  except hf.CheckpointError as e:
    sys.exit(f"error: {e}")
  print(f"{out}  ({cfg.num_layers} layers, d {cfg.hidden_size}, vocab {cfg.vocab_size}; "
        f"{time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
  main()
