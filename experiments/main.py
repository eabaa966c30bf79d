"""Run one experiment config.

    python -m experiments.main --config=configs/toy_arith.py
    python -m experiments.main --config=configs/toy_arith.py:algo=rloo,seed=1 --config.rl.lr=3e-3
    python -m experiments.main --config=configs/qwen25_paper.py:size=7B --config.model.dir=/data/Qwen2.5-7B-Instruct \
        --config.task.path=/data/dapo-math-17k.parquet

Every value is validated before any work starts; a bad value or an unknown key is one error naming it.
The toy config builds its base model (experiments/make_toy_base.py) when artifacts/toy_base is missing.
"""

import os

# OpenBLAS (behind numpy and JAX's CPU QR/SVD) busy-waits its threads: on a small or shared machine a
# 256×128 QR then takes seconds instead of milliseconds. One thread per process is far faster here.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


import json
import sys

from absl import app
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/toy_arith.py", "experiment config file[:arg]")


def main(argv):
  del argv
  from absl import logging as absl_logging  # noqa: PLC0415
  absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every save at INFO
  from next_jax import experiment, hf  # noqa: PLC0415 (after flag parsing: fast --help)
  from next_jax.metrics import is_primary  # noqa: PLC0415
  from next_jax.state_machine import NumericalFault  # noqa: PLC0415

  c = _CONFIG.value
  try:
    experiment.validate(c)
  except experiment.ConfigError as e:
    sys.exit(f"config error: {e}")
  if c.model.dir == "artifacts/toy_base":
    from experiments.make_toy_base import build_toy_base  # noqa: PLC0415
    build_toy_base(c.model.dir)
  try:
    results = experiment.run(c)
  except (experiment.ConfigError, hf.CheckpointError) as e:
    sys.exit(f"error: {e}")
  except NumericalFault as e:
    sys.exit(f"stopped: {e}")
  if is_primary():  # multi-host: one summary, from process 0
    print(json.dumps({k: results[k] for k in ("method", "backbone", "final", "steps", "icer", "workdir")},
                     indent=2, default=float))


if __name__ == "__main__":
  app.run(main)
