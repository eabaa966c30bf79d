"""Build the toy base model (next_jax.run.toy_base) into an HF directory, or reuse a matching build.

    python -m next_jax.cli.toy_base --out=artifacts/toy_base [--seed=0] [--steps=N] [--force]

`make demo` and the toy preset build it when it is missing; this command rebuilds it with other settings.
"""

from __future__ import annotations

import json
import sys

from absl import flags

from next_jax.cli import common
from next_jax.run import toy_base


def _flag_values() -> flags.FlagValues:
  """The command's absl flags (defaults: toy_base.ToyBaseSettings), on a FlagValues of their own."""
  d, fv = toy_base.ToyBaseSettings(), flags.FlagValues()
  flags.DEFINE_string("out", "artifacts/toy_base", "output HF directory", flag_values=fv)
  flags.DEFINE_integer("seed", d.seed, "seed", flag_values=fv)
  flags.DEFINE_integer("steps", d.steps, "SFT steps", flag_values=fv)
  flags.DEFINE_integer("batch_size", d.batch_size, "rows per SFT step", flag_values=fv)
  flags.DEFINE_float("lr", d.lr, "peak learning rate", flag_values=fv)
  flags.DEFINE_float("corrupt_p", d.corrupt_p, "probability of a noisy answer digit", flag_values=fv)
  flags.DEFINE_enum("model", d.model, sorted(toy_base.MODELS), "model size", flag_values=fv)
  flags.DEFINE_bool("force", False, "rebuild even if --out holds a matching build", flag_values=fv)
  return fv


def main(argv: list[str]) -> None:
  a = common.parse(_flag_values(), argv, "toy_base", __doc__, stray="flags only: --out=DIR")
  out = toy_base.build_toy_base(a.out, a.seed, a.steps, force=a.force, batch_size=a.batch_size, lr=a.lr,
                                corrupt_p=a.corrupt_p, model=a.model)
  r = json.loads((out / toy_base.META_FILE).read_text())["results"]
  print(f"{out}: greedy {r['greedy_accuracy']:.3f}, sampled {r['sampled_accuracy']:.3f} on {r['n_test']} "
        f"test problems; {r['param_count']:,} params; train {r['train_seconds']:.0f} s, "
        f"total {r['wall_seconds']:.0f} s")


if __name__ == "__main__":
  main(sys.argv[1:])
