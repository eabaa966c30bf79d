"""Per-device memory plan of a config on a mesh, without devices (next_jax.run.memory).

    next-jax-memory-plan --config=qwen25_paper:size=7B \
        --config.mesh.fsdp=8 --config.mesh.tensor=4
    next-jax-memory-plan --config=qwen25_paper:size=14B,trainable=full --sweep

The model comes from `config.model.preset` (a Qwen2.5 size: no checkpoint needed) or model.dir's
config.json. mesh.data=0 ("all devices") is planned as --chips // (fsdp·tensor), or 1 without --chips.
--sweep prints, for a list of meshes, each one's peak per device and whether it fits each accelerator;
--summary does so for every Qwen2.5 size, LoRA and full (the README table); --kv_cache prints, for every
Qwen2.5 size, the sampler's KV cache and sample-phase total per device with an fp32 and a bf16 cache.
"""

import dataclasses
import math
import sys

from absl import app, flags
from ml_collections import config_flags

from next_jax import configs


def _define_flags() -> None:
  config_flags.DEFINE_config_file("config", configs.resolve("qwen25_paper"),
                                  "a preset (next_jax/configs/) or a config file, [:arg]")
  flags.DEFINE_integer("chips", 0, "devices in the slice, for mesh.data=0")
  flags.DEFINE_bool("sweep", False, "plan every mesh of SWEEP_MESHES instead of config.mesh")
  flags.DEFINE_bool("summary", False, "peak per device of every Qwen2.5 preset, LoRA and full")
  flags.DEFINE_bool("kv_cache", False, "sampler memory of every Qwen2.5 preset, fp32 vs bf16 KV cache")


SWEEP_MESHES = ((1, 1, 1), (1, 8, 1), (1, 4, 4), (1, 16, 1), (1, 8, 4), (2, 8, 4), (1, 8, 8), (4, 8, 4),
                (1, 16, 8), (4, 8, 8))  # (data, fsdp, tensor)
ROWS = ("params", "trainable", "optimizer", "grads", "trajectory", "update_activations_remat",
        "update_activations_no_remat", "kv_cache", "sampler_activations", "train_remat", "train_no_remat",
        "sample")


def model_config(c):
  from next_jax.models import hf, model_files, policy  # noqa: PLC0415
  if c.model.get("preset", ""):
    cfg = policy.QWEN25[c.model.preset]
  else:  # what a run accepts: an HF directory, a .gguf or a packaged name (converted once, cached)
    cfg = hf.load_config(model_files.resolve(c.model.dir))
  return dataclasses.replace(cfg, dtype=c.model.dtype or cfg.dtype,
                             kv_cache_dtype=c.model.get("kv_cache_dtype", "") or cfg.kv_cache_dtype)


def workload(c):
  from next_jax.run import experiment, memory  # noqa: PLC0415
  rows = c.rollout.prompts_per_step * c.rollout.group_size
  ncfg = experiment.nxt_config(c)
  return memory.Workload(
      prompts=c.rollout.prompts_per_step, group_size=c.rollout.group_size, prompt_len=c.rollout.prompt_len,
      max_new_tokens=c.rollout.max_new_tokens,
      micro_batch=c.rl.micro_batch_size or rows // c.rl.num_mini_batches,
      snapshots=0 if ncfg.method == "none" else ncfg.num_snapshots, sample_chunk=c.rollout.sample_chunk,
      logprob_chunk=c.rl.logprob_chunk)


def mesh_sizes(c, chips: int) -> dict[str, int]:
  f, t = c.mesh.get("fsdp", 1), c.mesh.get("tensor", 1)
  return {"data": c.mesh.data or max(chips // (f * t), 1), "fsdp": f, "tensor": t}


def describe(c, cfg, lcfg, w, sizes) -> str:
  n = sizes["data"] * sizes["fsdp"] * sizes["tensor"]
  kind = f"LoRA r={lcfg.rank}" if lcfg else "full-parameter"
  return (f"model {c.model.get('preset', '') or c.model.dir} ({cfg.dtype}, {kind}); "
          f"mesh data={sizes['data']} fsdp={sizes['fsdp']} tensor={sizes['tensor']} ({n} devices)\n"
          f"workload: {w.prompts} prompts × "
          f"G={w.group_size}, {w.prompt_len}+{w.max_new_tokens} tokens, micro-batch {w.micro_batch}, "
          f"trajectory K={w.snapshots}; {w.prompts_per_call} prompts per sampler call, "
          f"{w.head_positions} logit positions at once")


def _fit_marks(peak) -> str:
  from next_jax.run import memory  # noqa: PLC0415
  return " ".join(f"{name} {'yes' if ok else 'no'}" for name, ok in memory.fits(peak).items())


def plan_table(p: dict) -> str:
  lines = ["| component | GB / device |", "|---|---:|"]
  lines += [f"| {k} | {p[k] / 1e9:.2f} |" for k in ROWS]
  for key in ("remat", "no_remat"):
    lines.append(f"| **peak ({key.replace('_', ' ')})** | **{p[f'peak_{key}'] / 1e9:.2f}** "
                 f"({_fit_marks(p[f'peak_{key}'])}) |")
  return "\n".join(lines)


def sweep_table(cfg, lcfg, tx, w) -> str:
  from next_jax.run import memory  # noqa: PLC0415
  lines = ["| data×fsdp×tensor | devices | peak GB/dev (remat) | "
           + " | ".join(f"{k} {v / 1e9:.0f} GB" for k, v in memory.ACCELERATORS.items()) + " |",
           "|---|---:|---:|:-:|:-:|:-:|"]
  for d, f, t in SWEEP_MESHES:
    p = memory.plan(cfg, lcfg, tx, w, {"data": d, "fsdp": f, "tensor": t})
    ok = memory.fits(p["peak_remat"])
    lines.append(f"| {d}×{f}×{t} | {d * f * t} | {p['peak_remat'] / 1e9:.1f} | "
                 + " | ".join("yes" if ok[k] else "no" for k in memory.ACCELERATORS) + " |")
  return "\n".join(lines)


SUMMARY_MESHES = ((1, 8, 1), (1, 4, 4), (1, 8, 4), (2, 8, 4), (4, 8, 4), (4, 8, 8))


def summary_table(c, tx) -> str:
  """Every Qwen2.5 preset × {LoRA, full} of this config: peak GB/device (remat) on SUMMARY_MESHES and the
  smallest of SWEEP_MESHES that fits each accelerator."""
  from next_jax.models import policy  # noqa: PLC0415
  from next_jax.run import experiment, memory  # noqa: PLC0415
  names = ["×".join(map(str, m)) for m in SUMMARY_MESHES]
  lines = ["| preset | " + " | ".join(names) + " | " + " | ".join(memory.ACCELERATORS) + " |",
           "|---|" + "---:|" * len(names) + ":-:|" * len(memory.ACCELERATORS)]
  for size in policy.QWEN25:
    for trainable in ("lora", "full"):
      c.model.preset, c.model.trainable = size, trainable
      cfg, lcfg, w = model_config(c), experiment.lora_config(c), workload(c)
      peak = {m: memory.plan(cfg, lcfg, tx, w, dict(zip(("data", "fsdp", "tensor"), m)))["peak_remat"]
              for m in dict.fromkeys(SUMMARY_MESHES + SWEEP_MESHES)}
      best = [next(("×".join(map(str, m)) for m in sorted(SWEEP_MESHES, key=math.prod)
                    if peak[m] <= cap), "none") for cap in memory.ACCELERATORS.values()]
      lines.append(f"| {size} {trainable} | " + " | ".join(f"{peak[m] / 1e9:.1f}" for m in SUMMARY_MESHES)
                   + " | " + " | ".join(best) + " |")
  return "\n".join(lines)


def kv_table(c, tx, sizes) -> str:
  """Every Qwen2.5 preset at this config's workload and mesh: KV cache and sample total GB/device with the
  cache in float32 and in bfloat16 (the presets' own dtype)."""
  from next_jax.models import policy  # noqa: PLC0415
  from next_jax.run import experiment, memory  # noqa: PLC0415
  lines = ["| preset | KV cache fp32 | KV cache bf16 | sample fp32 cache | sample bf16 cache |",
           "|---|---:|---:|---:|---:|"]
  for size, cfg in policy.QWEN25.items():
    p = {d: memory.plan(dataclasses.replace(cfg, kv_cache_dtype=d), experiment.lora_config(c), tx, workload(c),
                        sizes) for d in ("float32", "bfloat16")}
    lines.append(f"| {size} | " + " | ".join(f"{p[d][k] / 1e9:.1f}" for k in ("kv_cache", "sample")
                                             for d in ("float32", "bfloat16")) + " |")
  return "\n".join(lines)


def main(argv):
  del argv
  from next_jax.rl import trainer  # noqa: PLC0415
  from next_jax.run import experiment, memory  # noqa: PLC0415
  FLAGS = flags.FLAGS
  c = FLAGS.config
  try:
    lcfg, cfg, w = experiment.lora_config(c), model_config(c), workload(c)
  except (experiment.ConfigError, FileNotFoundError, ValueError) as e:
    sys.exit(f"config error: {e}")
  tx = trainer.make_optimizer(trainer.OptimConfig(lr=c.rl.lr, grad_clip=c.rl.grad_clip or None))
  sizes = mesh_sizes(c, FLAGS.chips)
  if FLAGS.summary:
    print(summary_table(c, tx))
    return
  if FLAGS.kv_cache:
    print(describe(c, cfg, lcfg, w, sizes) + "\n" + kv_table(c, tx, sizes))
    return
  print(describe(c, cfg, lcfg, w, sizes))
  if FLAGS.sweep:
    print(sweep_table(cfg, lcfg, tx, w))
  else:
    print(plan_table(memory.plan(cfg, lcfg, tx, w, sizes)))


def cli() -> None:
  """The console script `next-jax-memory-plan`."""
  _define_flags()
  app.run(main, flags_parser=lambda argv: flags.FLAGS(configs.resolve_argv(argv)))


if __name__ == "__main__":
  cli()
