"""Child of test_multiprocess: RL steps of tests/test_trainer's tiny setup, data-parallel over the devices
of two JAX processes joined by `jax.distributed.initialize` on localhost (the TPU-pod mechanism; CPU
collectives via gloo), or in one plain process (PROCESS_ID = -1).

    python tests/multiprocess_child.py PROCESS_ID PORT OUT_JSON
"""

import json
import os
import sys

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

STEPS = 2


def main(pid: int, port: str, out: str) -> None:
  if pid >= 0:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    from next_jax import parallel  # noqa: PLC0415
    parallel.initialize_distributed(f"localhost:{port}", 2, pid)
  import dataclasses  # noqa: PLC0415

  import numpy as np  # noqa: PLC0415
  from jax.experimental import multihost_utils  # noqa: PLC0415

  from next_jax import parallel, policy  # noqa: PLC0415
  from tests.test_trainer import CFG, LCFG, fresh_state, make_setup, run  # noqa: PLC0415

  params, lora = policy.init_params(CFG, jax.random.key(0)), policy.init_lora(CFG, LCFG, jax.random.key(1))
  setup = make_setup()
  if pid >= 0:
    mesh = parallel.make_mesh()
    params, lora = jax.tree.map(lambda x: jax.device_put(x, parallel.replicated(mesh)), (params, lora))
    setup = dataclasses.replace(setup, mesh=mesh)
  state, rows = run(setup, params, fresh_state(lora), STEPS)
  trained = state.train.params
  if pid >= 0:
    trained = multihost_utils.process_allgather(trained, tiled=True)
  leaves = [np.asarray(x).astype(np.float64).ravel().tolist() for x in jax.tree.leaves(trained)]
  with open(out, "w") as f:
    json.dump({"processes": jax.process_count(), "devices": jax.device_count(), "params": leaves,
               "rewards": [r["reward_mean"] for r in rows]}, f)


if __name__ == "__main__":
  main(int(sys.argv[1]), sys.argv[2], sys.argv[3])
