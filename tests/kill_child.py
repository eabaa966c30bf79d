"""Child process of test_kill_resume: one toy run (next_jax/configs/toy_arith.py:quick on a tiny model) that resumes
whatever its workdir holds, optionally SIGKILLing itself at a chosen point.

    python tests/kill_child.py WORKDIR MODEL_DIR KILL
    KILL: none | finalize:N (inside the N-th checkpoint write, after its files are written and before the
          rename that commits it) | save:N:MS (MS ms into the N-th checkpoint write, from a timer thread) |
          extrapolate (inside extrapolate_step, after the predictor ran and before the jump is applied)
"""

import os
import signal
import sys
import threading

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT]

from next_jax.configs import toy_arith
from next_jax.core import checkpoint
from next_jax.run import experiment
from next_jax.run import state_machine as sm


def die():
  os.kill(os.getpid(), signal.SIGKILL)


def config(workdir: str, model_dir: str):
  c = toy_arith.get_config("quick")
  c.workdir, c.model.dir = workdir, model_dir
  c.log.progress, c.log.tensorboard = False, False
  c.nxt.predictor.hidden, c.nxt.predictor.epochs = 16, 10
  c.task.n_test, c.eval.chunk, c.eval.every = 32, 32, 4
  c.ckpt.every, c.ckpt.max_to_keep, c.ckpt.resume = 2, 2, True
  return c


def install(kill: str) -> None:
  """Arrange the self-kill described by KILL (see the module docstring)."""
  kind, *arg = kill.split(":")
  if kind == "extrapolate":
    deltas = sm.extrapolate.method_deltas
    sm.extrapolate.method_deltas = lambda *a, **k: (deltas(*a, **k), die())[0]
  elif kind in ("finalize", "save"):
    from orbax.checkpoint._src.path import atomicity  # noqa: PLC0415
    saves, save = [0], checkpoint.Checkpointer.save

    def counted(self, *a, **k):
      saves[0] += 1
      if saves[0] == int(arg[0]) and kind == "save":
        threading.Timer(int(arg[1]) / 1000, die).start()
      return save(self, *a, **k)

    checkpoint.Checkpointer.save = counted
    if kind == "finalize":
      finalize = atomicity.AtomicRenameTemporaryPath.finalize

      async def killing(self, *a, **k):
        if saves[0] == int(arg[0]):
          die()
        return await finalize(self, *a, **k)

      atomicity.AtomicRenameTemporaryPath.finalize = killing
  elif kind != "none":
    raise SystemExit(f"unknown KILL {kill!r}")


if __name__ == "__main__":
  wd, model, kill = sys.argv[1:4]
  install(kill)
  experiment.run(config(wd, model))
