"""Run one experiment config.

    python -m next_jax.cli.run --config=toy_arith
    python -m next_jax.cli.run --config=toy_arith:algo=rloo,seed=1 --config.rl.lr=3e-3
    python -m next_jax.cli.run --config=qwen25_paper:size=7B --config.model.dir=/data/Qwen2.5-7B-Instruct \
        --config.task.path=/data/dapo-math-17k.parquet

Installed as `next-jax-run`. --config takes a preset name (next_jax/configs/) or any config file.
Every value is validated before any work starts; a bad value or an unknown key is one error naming it.
The toy config builds its base model (next_jax/run/toy_base.py) when artifacts/toy_base is missing.
"""

import json
import re
import sys

from absl import app, flags
from ml_collections import config_flags

from next_jax import configs


def _flag_error(e: BaseException) -> str:
  """One line for a flag or config-file error: the innermost cause (a missing file, a bad `:arg` that the
  config's get_config refused, an unknown key, a bad value) and the command-line flag it came from."""
  while (e.__cause__ or e.__context__) is not None:
    e = e.__cause__ or e.__context__
  if isinstance(e, (KeyError, AttributeError)):
    key = str(e.args[0] if e.args else e).strip("\"'")
    msg, tokens = f"unknown config key {key!r}", [key]
  else:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    msg = lines[-1] if isinstance(e, OSError) and lines else " ".join(lines)  # OSError: the file and why
    tokens = re.findall(r"'([^']+)'", msg)
  flag = next((a for a in sys.argv[1:] for t in tokens if a.startswith("--config") and
               (a.endswith(f"={t}") or a.endswith(t) or f".{t}=" in a or f":{t}=" in a or f",{t}=" in a)), None)
  return f"config error: {flag + ': ' if flag else ''}{msg}"


def _parse_flags(argv):
  try:
    return flags.FLAGS(configs.resolve_argv(argv))
  except Exception as e:  # noqa: BLE001  (absl wraps every parse error; the message is the user's)
    sys.exit(_flag_error(e))


try:  # ml_collections applies --config.x.y=… overrides here, at definition time
  _CONFIG = config_flags.DEFINE_config_file("config", configs.resolve("toy_arith"),
                                            f"a preset ({', '.join(configs.PRESETS)}) or a config file, [:arg]")
except Exception as e:  # noqa: BLE001
  sys.exit(_flag_error(e))


def main(argv):
  del argv
  from absl import logging as absl_logging  # noqa: PLC0415
  absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every save at INFO
  from next_jax.core.checkpoint import CheckpointWriteError, CorruptCheckpoint  # noqa: PLC0415
  from next_jax.core.metrics import is_primary  # noqa: PLC0415
  from next_jax.models import hf  # noqa: PLC0415 (after flag parsing: fast --help)
  from next_jax.nxt import extrapolate  # noqa: PLC0415 (after flag parsing: fast --help)
  from next_jax.run import experiment  # noqa: PLC0415 (after flag parsing: fast --help)
  from next_jax.run.driver import NumericalFault  # noqa: PLC0415

  try:
    c = _CONFIG.value
    c.to_json  # noqa: B018  (ml_collections defers a config file's IOError to the first attribute access)
  except Exception as e:  # noqa: BLE001  (absl wraps every parse error; the message is the user's)
    sys.exit(_flag_error(e))
  try:
    experiment.validate(c)
  except experiment.ConfigError as e:
    sys.exit(f"config error: {e}")
  if c.model.dir == "artifacts/toy_base":
    from next_jax.run.toy_base import build_toy_base
    build_toy_base(c.model.dir)
  try:
    results = experiment.run(c)
  except (experiment.ConfigError, hf.CheckpointError, CorruptCheckpoint, CheckpointWriteError) as e:
    sys.exit(f"error: {e}")
  except NumericalFault as e:
    sys.exit(f"stopped: {e}")
  if is_primary():  # multi-host: one summary, from process 0
    keys = ("method", "backbone", "final", "steps", "icer", "nonfinite_steps", "oversized_steps", "workdir")
    print(json.dumps({k: results.get(k) for k in keys}, indent=2, default=float))
    skipped = results.get("nonfinite_steps", 0) + results.get("oversized_steps", 0)
    if skipped:
      print(f"warning: {skipped} RL step(s) had updates skipped as non-finite or oversized (results.json: "
            "nonfinite_steps, oversized_steps)", file=sys.stderr)
    for jump in results.get("jumps", []):
      if "sigma_spread" in jump and (warning := extrapolate.sigma_collapse_warning(jump["sigma_spread"])):
        print(f"warning: jump at step {jump['step']}: {warning}", file=sys.stderr)


def cli() -> None:
  """The console script `next-jax-run`."""
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  cli()
