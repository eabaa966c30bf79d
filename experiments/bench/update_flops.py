"""Update efficiency: achieved FLOP/s of one jitted GRPO update (`grpo.grpo_update`, LoRA on all seven
projections) on a real model, against the f32 matmul peak of the same cores.

    python -m experiments.bench.update_flops [--model smollm2-135m-instruct] [--rows 64] [--seq 48 128]
        [--tail 8] [--rank 16] [--reps 5] [--profile]

Peer: a jitted [n, n] @ [n, n] f32 matmul (n = --peak-n, 2n³ FLOPs), timed in the same process right before
and after the updates; the peak is the better of the two medians. The update runs on random tokens (its
cost does not depend on their values) with the loss on the last `--tail` targets (`logprob_tail`, as the
trainer sets it), one mini-batch, on-policy, token-mean. Its FLOPs are counted from the shapes
(`update_flops`): what our code computes, so the full T×T attention is counted (no causal skipping).
Writes experiments/results/bench_update_flops.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.bench.common import first_and_median, matmul_peak
from next_jax.models import hf, model_files, policy
from next_jax.models.policy import ALL_MODULES, LoraConfig, ModelConfig
from next_jax.rl import grpo

RESULTS = Path(__file__).resolve().parents[1] / "results" / "bench_update_flops.md"


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default="smollm2-135m-instruct", help="HF dir, .gguf or packaged name")
  p.add_argument("--rows", type=int, default=64, help="sequences per update (prompts × G)")
  p.add_argument("--seq", type=int, nargs="+", default=[48, 128], help="prompt + response tokens; one row each")
  p.add_argument("--tail", type=int, default=8, help="response targets that carry loss (logprob_tail)")
  p.add_argument("--rank", type=int, default=16)
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--peak-n", type=int, default=2048)
  p.add_argument("--profile", action="store_true", help="also trace one update per row: top XLA ops")
  p.add_argument("--out", default=str(RESULTS), help="Markdown results file ('' = don't write)")
  return p.parse_args(argv)


def update_flops(cfg: ModelConfig, lcfg: LoraConfig, rows: int, seq: int, tail: int) -> dict[str, float]:
  """FLOPs of one LoRA update on [rows, seq] tokens (T = seq − 1 positions, `tail` of them get logits).

  Per token and layer: dense m = 2·D·(H + 2·KVH)·hd + 2·H·hd·D + 6·D·F; LoRA l = 2·r·Σ(in + out) over the
  targets. Per row and layer: attention a = 4·T²·H·hd (scores and probs·V). Per row: head h = 2·D·V·tail.
    forward  = rows · (T·L·(m + l) + L·a + h)
    backward = rows · (T·L·(m + 2l) + 2·L·a + h)   (frozen weights: input gradients only; LoRA: both)
  """
  d, f, hd, L = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim, cfg.num_layers
  h, kvh, t = cfg.num_heads, cfg.num_kv_heads, seq - 1
  m = 2 * d * (h + 2 * kvh) * hd + 2 * h * hd * d + 6 * d * f
  dims = {"q": (d, h * hd), "k": (d, kvh * hd), "v": (d, kvh * hd), "o": (h * hd, d), "gate": (d, f),
          "up": (d, f), "down": (f, d)}
  lora = 2 * lcfg.rank * sum(sum(dims[k]) for k in lcfg.targets)
  attn, head = 4 * t * t * h * hd, 2 * d * cfg.vocab_size * tail
  fwd = rows * (t * L * (m + lora) + L * attn + head)
  bwd = rows * (t * L * (m + 2 * lora) + 2 * L * attn + head)
  return {"forward": float(fwd), "backward": float(bwd), "total": float(fwd + bwd)}


def update_fn(cfg, params, lcfg, rows: int, seq: int, tail: int, seed: int = 0):
  """() → metrics of one grpo_update on a fresh LoRA state (the state is donated, so one per call)."""
  rng = np.random.default_rng(seed)
  tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (rows, seq)), jnp.int32)
  loss_mask = np.zeros((rows, seq - 1), bool)
  loss_mask[:, -tail:] = True
  adv = np.repeat(rng.standard_normal((rows, 1)), seq - 1, 1).astype(np.float32) * loss_mask
  batch = grpo.Batch(tokens=tokens, mask=jnp.ones((rows, seq), bool), loss_mask=jnp.asarray(loss_mask),
                     advantages=jnp.asarray(adv), sampler_logprobs=jnp.zeros((rows, seq - 1), jnp.float32))
  lora = policy.init_lora(cfg, lcfg, jax.random.key(seed))
  tx = optax.adamw(1e-5)
  loss_cfg = grpo.LossConfig(logprob_tail=tail)

  def run():
    state = grpo.TrainState.create(lora, tx)
    return grpo.grpo_update(state, params, batch, cfg=cfg, lora_cfg=lcfg, loss_cfg=loss_cfg)[1]

  return run


def main(argv=None) -> list[dict]:
  args = parse_args(argv)
  model_dir = model_files.resolve(args.model)
  cfg, params, _ = hf.load_model(model_dir, dtype="float32", tokenizer=False)
  lcfg = LoraConfig(rank=args.rank, alpha=2.0 * args.rank, targets=ALL_MODULES)
  load0 = os.getloadavg()
  peak_before = matmul_peak(args.peak_n, args.reps)
  print(f"matmul peak {peak_before / 1e9:.1f} GFLOP/s", flush=True)
  rows = []
  for seq in args.seq:
    run = update_fn(cfg, params, lcfg, args.rows, seq, args.tail)
    first, med = first_and_median(run, args.reps)
    flops = update_flops(cfg, lcfg, args.rows, seq, args.tail)
    rows.append({"seq": seq, "first": first, "median": med, **flops})
    print(f"seq {seq}: {med:.3f} s, {flops['total'] / med / 1e9:.1f} GFLOP/s", flush=True)
    if args.profile:
      from experiments.bench.sampler_vs_transformers import profile  # noqa: PLC0415
      profile(run, f"update seq {seq}")
  peak = max(peak_before, matmul_peak(args.peak_n, args.reps))
  text = report(args, cfg, model_dir, peak, rows, load0)
  print("\n" + text)
  if args.out:
    Path(args.out).write_text(text)
    print(f"wrote {args.out}")
  return rows


def report(args, cfg, model_dir, peak: float, rows: list[dict], load0) -> str:
  cmd = "python -m experiments.bench.update_flops " + shlex.join(sys.argv[1:])
  lines = ["| rows × tokens | loss targets | GFLOP (fwd + bwd) | first call (s) | median (s) | GFLOP/s "
           "| of matmul peak |", "|---|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    rate = r["total"] / r["median"]
    lines.append(f"| {args.rows} × {r['seq']} | {args.tail} | {r['forward'] / 1e9:.1f} + "
                 f"{r['backward'] / 1e9:.1f} | {r['first']:.2f} | {r['median']:.3f} | {rate / 1e9:.1f} "
                 f"| **{rate / peak:.0%}** |")
  load = lambda xs: ", ".join(f"{x:.1f}" for x in xs)  # noqa: E731
  return (f"# Update efficiency: achieved FLOP/s of grpo_update vs the f32 matmul peak\n\n"
          f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}\n"
          f"- command: `{cmd.strip()}`\n- machine: nproc={os.cpu_count()}, jax {jax.__version__} "
          f"({jax.devices()[0].platform}), load average {load(load0)} before, {load(os.getloadavg())} after\n"
          f"- model: {model_dir.name} ({cfg.num_layers} layers, D {cfg.hidden_size}, F "
          f"{cfg.intermediate_size}, V {cfg.vocab_size}), fp32; LoRA r {args.rank} on all seven projections\n"
          f"- peak: jitted f32 {args.peak_n}² matmul, {peak / 1e9:.1f} GFLOP/s (median of {args.reps}, the "
          f"better of before / after)\n- FLOPs counted from the shapes (`update_flops`); median of "
          f"{args.reps} updates after the first (compile)\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
  main()
