"""Child of test_multiprocess: two JAX processes joined by `jax.distributed.initialize` on localhost (the
TPU-pod mechanism; CPU collectives via gloo), one CPU device each, on tests/tiny_rl's tiny setup.

1. RL steps, then an evaluation, data-parallel over both processes, recording which problems this process
   encoded and how many responses it verified; then `segment_rows`: the sampler's decode segments and
   batch compaction on the two-process mesh.
2. `experiment.validate` of configs two processes cannot run.
3. The run's writers in WORKDIR (shared, as orbax needs): `workdir.prepare`, one more RL step
   through `trainer.train` with a MetricWriter and a Checkpointer, `workdir.write_results`, then a
   restore of that checkpoint and a save/restore of the `experiment.place`d base parameters. Every file
   this process writes outside the orbax directories is recorded.

    python tests/multiprocess_child.py PROCESS_ID PORT OUT_JSON WORKDIR
"""

import json
import os
import sys
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax

STEPS = 2
EVAL = dict(chunk=4, samples=8, temperature=1.0)  # the RL step's sampler shapes: no new compilation
SEGMENTS = dict(max_new_tokens=12, num_samples=2, temperature=1.0, stop_ids=(1, 2, 3), pad_id=0,
                first_segment=2)
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
PATH_EVENTS = ("os.rename", "os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree")
ORBAX_DIRS = ("ckpt", "params")  # every process writes its shards there


def recording(setup, log: dict):
  """`setup` whose encode/reward also record what this process encoded and how many rows it verified."""
  import dataclasses  # noqa: PLC0415

  def encode(q):
    log["encoded"].append(list(q))
    return setup.encode(q)

  def reward(text, q):
    log["verified"] += 1
    return setup.reward(text, q)

  return dataclasses.replace(setup, encode=encode, reward=reward)


def host(tree):
  """Every leaf's global value as nested lists (host-local, replicated or split over processes)."""
  import numpy as np  # noqa: PLC0415
  from jax.experimental import multihost_utils  # noqa: PLC0415

  def value(x):
    if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
      return np.asarray(x if not isinstance(x, jax.Array) else x.addressable_data(0))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return [value(x).tolist() for x in jax.tree.leaves(tree)]


def segment_rows(mesh=None, **kw) -> dict:
  """8 prompts × 2 samples at T = 1, 12 new tokens decoded in segments of 2, 4, 8 and 12 response slots,
  stopping at ids 1-3: rows stop at different steps, and between segments the live rows are gathered into
  a smaller batch (a multiple of the mesh's batch size: here rows move between the processes' devices).
  `kw` overrides SEGMENTS. → {"tokens", "logprobs", "lengths", "compactions"}: global values, and the
  compaction programs this call compiled."""
  from tiny_rl import CFG, PROBLEMS, init_model  # noqa: PLC0415

  from next_jax.core import sharding  # noqa: PLC0415
  from next_jax.models import sampler  # noqa: PLC0415
  from next_jax.run import experiment  # noqa: PLC0415

  params, _ = init_model()
  problems = PROBLEMS[:8]
  mine = sharding.process_rows(mesh, len(problems))
  prompts = sampler.pad_prompts([problems[i] for i in mine], 0, 4)
  prompts, pmask = sharding.from_process_rows(prompts, mesh, len(problems))
  if mesh is not None:
    params = experiment.place(params, mesh)
  before = sampler._compact._cache_size()  # noqa: SLF001
  with sharding.use_mesh(mesh):
    out = sampler.generate(params, prompts, pmask, jax.random.key(7), cfg=CFG, **{**SEGMENTS, **kw})
  tokens, logprobs, lengths = host((out.tokens, out.logprobs, out.lengths))
  return {"tokens": tokens, "logprobs": logprobs, "lengths": lengths,
          "compactions": sampler._compact._cache_size() - before}  # noqa: SLF001


def record_writes(root: str, written: list) -> None:
  """Append to `written` every path under root (the orbax directories excepted) that this process opens
  for writing, creates, renames or deletes (Python audit events)."""
  root = os.path.realpath(root)

  def rel(path):
    if isinstance(path, bytes):
      path = os.fsdecode(path)
    if not isinstance(path, (str, os.PathLike)):
      return None
    path = os.path.realpath(os.fspath(path))
    if not path.startswith(root + os.sep):
      return None
    r = os.path.relpath(path, root)
    return None if r.split(os.sep)[0] in ORBAX_DIRS else r

  def hook(event, args):
    if event == "open":
      path, mode, flags = args
      writing = (isinstance(flags, int) and flags & WRITE_FLAGS) or (isinstance(mode, str) and
                                                                     any(m in mode for m in "wax+"))
      r = rel(path) if writing else None
    elif event in PATH_EVENTS:
      r = rel(args[0])
    else:
      return
    if r is not None:
      written.append(f"{event}:{r}")

  sys.addaudithook(hook)


def main(pid: int, port: str, out: str, workdir: str) -> None:
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  from next_jax.core import sharding  # noqa: PLC0415
  sharding.initialize_distributed(f"localhost:{port}", 2, pid)
  import dataclasses  # noqa: PLC0415

  import numpy as np  # noqa: PLC0415
  from tiny_rl import PROBLEMS, fresh_state, init_model, make_setup, run  # noqa: PLC0415

  from next_jax.core.checkpoint import Checkpointer  # noqa: PLC0415
  from next_jax.core.metrics import MetricWriter  # noqa: PLC0415
  from next_jax.rl import trainer  # noqa: PLC0415
  from next_jax.run import experiment  # noqa: PLC0415
  from next_jax.run.workdir import prepare, write_results  # noqa: PLC0415

  t0 = time.perf_counter()
  params, lora = init_model()
  log, eval_log = {"encoded": [], "verified": 0}, {"encoded": [], "verified": 0}
  mesh = sharding.make_mesh()
  params, lora = experiment.place((params, lora), mesh)
  setup = dataclasses.replace(recording(make_setup(), log), mesh=mesh)
  state, rows = run(setup, params, fresh_state(lora), STEPS)
  leaves = [np.asarray(x, np.float64).ravel().tolist() for x in host(state.train.params)]
  evaluation = trainer.evaluate(dataclasses.replace(recording(make_setup(), eval_log), mesh=mesh), params,
                                state.train.params, PROBLEMS[:6], **EVAL)
  sampled = {"encoded": list(log["encoded"]), "verified": log["verified"]}  # before part 2's extra step
  segments = segment_rows(mesh)
  t1 = time.perf_counter()

  written = []
  record_writes(workdir, written)
  from next_jax.configs import toy_arith
  c = toy_arith.get_config("quick")
  c.workdir = workdir
  errors = {}
  for field, value in (("rollout.prompts_per_step", 3), ("mesh.data", 1)):  # 3 prompts / 2 hosts; 1 device
    bad = toy_arith.get_config("quick")
    bad.mesh.data = 0
    section, key = field.split(".")
    bad[section][key] = value
    try:
      experiment.validate(bad)
    except experiment.ConfigError as e:
      errors[field] = str(e)
  wd = prepare(c)
  ckpt = Checkpointer(wd / "ckpt")
  state, m = trainer.train_step(setup, params, state)  # one more step, its metrics and checkpoint on disk
  writer = MetricWriter(wd)
  writer.write(int(state.step), m)
  writer.close()
  ckpt.save(int(state.step), state, {"step": int(state.step)})
  write_results(wd, {"steps": STEPS + 1})
  restored, meta = Checkpointer(wd / "ckpt").restore(fresh_state(lora, seed=123))
  Checkpointer(wd / "params").save(0, params)
  params_back, _ = Checkpointer(wd / "params").restore(params)
  with open(out, "w") as f:
    json.dump({"processes": jax.process_count(), "devices": jax.device_count(), "params": leaves,
               "rewards": [r["reward_mean"] for r in rows], **sampled, "eval": evaluation,
               "eval_encoded": eval_log["encoded"], "segments": segments, "errors": errors,
               "restored_step": meta["step"],
               "restored_equal": host(restored) == host(state),
               "params_equal": host(params_back) == host(params),
               "written": sorted(set(written)), "seconds": [t1 - t0, time.perf_counter() - t1]}, f)


if __name__ == "__main__":
  main(int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4])
