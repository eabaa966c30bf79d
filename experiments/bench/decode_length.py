"""Decode cost against response length (issue 29): our segmented sampler, the same sampler as one segment over
the whole cache (the pre-issue-29 structure: `first_segment=0, compact=False`) and transformers `generate`,
on the real SmolLM2-135M-Instruct and its chat prompts, side by side in one run.

Per --new-tokens N: B prompts, greedy (or --temperature 1: plain sampling, top-k and top-p off on both
sides), no stop ids (every row decodes exactly N tokens). A warm-up call of each of our sides (it
compiles), then --reps timed calls alternating the --sides (order rotated every rep). Reported: median
milliseconds per decode step (wall / N) and per generated token, the ratios, and whether the greedy
tokens of the sides agree (sampled tokens cannot: the two stacks draw different noise).

Early stop (--early-stop N): a forced-stop harness on real outputs. From the segmented side's greedy rows
without stop ids, the stop set is every token among the first ⌈N/10⌉ of rows 0 … B−2 that never occurs in
row B−1's N tokens: each of those rows then stops within the first 10 % of the budget (at its first such
token), row B−1 runs the whole budget. The same batch is timed with and without the stop set on the
segmented sampler (which compacts the one live row into a batch of 1). The one-segment sampler needs no
run: its loop computes every row until the last one stops, so with the stop set it costs the full length.

  OPENBLAS_NUM_THREADS=1 taskset -c 0 python -m experiments.bench.decode_length --batch 8 \
      --new-tokens 64 256 1024 --reps 3 --early-stop 1024 --out experiments/results/bench_decode_length.md
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

import jax
import numpy as np

from experiments.bench import real_model
from next_jax.models import sampler

RESULTS = Path(__file__).resolve().parents[1] / "results" / "bench_decode_length.md"
SIDES = ("segmented", "one segment", "transformers")


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--model", default=real_model.DEFAULT, help="HF dir, .gguf or packaged name")
  p.add_argument("--batch", type=int, default=8, help="prompts per call")
  p.add_argument("--new-tokens", type=int, nargs="+", default=[64, 256, 1024])
  p.add_argument("--reps", type=int, default=3, help="timed calls per side and length")
  p.add_argument("--temperature", type=float, default=0.0, help="0: greedy; > 0: plain sampling")
  p.add_argument("--sides", nargs="+", default=list(SIDES), choices=SIDES, help="which samplers race")
  p.add_argument("--early-stop", type=int, default=0, metavar="N",
                 help="budget of the early-stop rows (0: skip)")
  p.add_argument("--torch-threads", type=int, default=1)
  p.add_argument("--out", default=str(RESULTS), help="Markdown results file ('' = don't write)")
  return p.parse_args(argv)


def ours(params, cfg, tokens, mask, n_new, stop_ids=(), pad_id=0, temperature=0.0, first_segment=None,
         compact=True):
  """() → int32[B, N] tokens (numpy, blocking) of `sampler.generate` (first_segment None: its default)."""
  tokens, mask = jax.numpy.asarray(tokens), jax.numpy.asarray(mask)

  def run():
    out = sampler.generate(params, tokens, mask, jax.random.key(0), cfg=cfg, max_new_tokens=n_new,
                           temperature=temperature, stop_ids=stop_ids, pad_id=pad_id, compact=compact,
                           **({} if first_segment is None else dict(first_segment=first_segment)))
    return np.asarray(jax.block_until_ready(out.tokens))

  return run


def theirs(model, tokens, mask, n_new, pad_id, temperature=0.0):
  """() → int64[B, N] tokens of transformers `generate`, exactly n_new per row (greedy, or sampled at
  `temperature` with top-k and top-p turned off, as ours)."""
  import torch  # noqa: PLC0415

  ids, att = torch.from_numpy(tokens.astype(np.int64)), torch.from_numpy(mask.astype(np.int64))

  def run():
    with torch.inference_mode():
      out = model.generate(input_ids=ids, attention_mask=att, max_new_tokens=n_new, min_new_tokens=n_new,
                           use_cache=True, eos_token_id=None, pad_token_id=pad_id,
                           **(dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
                              if temperature else dict(do_sample=False)))
    return out[:, tokens.shape[1]:].numpy()

  return run


def race(fns: dict, reps: int, warm=None) -> dict:
  """A warm-up call of each side in `warm` (default all; timed: our first call compiles), then `reps`
  rotations → {side: [seconds]}, {side: first-call seconds}, {side: output}."""
  first, outs, times = {}, {}, {k: [] for k in fns}
  for k in fns if warm is None else warm:
    t0 = time.perf_counter()
    outs[k] = fns[k]()
    first[k] = time.perf_counter() - t0
  names = list(fns)
  for r in range(reps):
    for k in names[r % len(names):] + names[:r % len(names)]:
      t0 = time.perf_counter()
      outs[k] = fns[k]()
      times[k].append(time.perf_counter() - t0)
  return dict(times=times, first=first, outs=outs)


def stop_harness(rows: np.ndarray, budget: int) -> tuple[int, ...]:
  """Stop ids from greedy rows [B, N]: tokens of the first ⌈N/10⌉ of rows 0 … B−2 absent from row B−1."""
  early = set(rows[:-1, :-(-budget // 10)].ravel().tolist())
  return tuple(sorted(early - set(rows[-1].tolist())))


def lengths(rows: np.ndarray, stops) -> list[int]:
  hit = np.isin(rows, stops)
  return [int(np.argmax(r)) + 1 if r.any() else rows.shape[1] for r in hit]


def main(argv=None) -> str:
  args = parse_args(argv)
  if args.early_stop and args.temperature:
    raise SystemExit("--early-stop builds its stop ids from greedy rows: run it with --temperature 0")
  import torch  # noqa: PLC0415
  import transformers  # noqa: PLC0415

  torch.set_num_threads(args.torch_threads)
  model_dir, cfg, params, tok = real_model.load(args.model)
  model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
  ids = [tok(text=q)["input_ids"] for q in real_model.chat_prompts(tok, args.batch)]
  tokens, mask = sampler.pad_prompts(ids, tok.pad_token_id, -(-max(map(len, ids)) // 8) * 8)
  pad, lines = tok.pad_token_id, []
  print(f"{model_dir.name}: {args.batch} prompts of {tokens.shape[1]} tokens; load {os.getloadavg()}",
        flush=True)
  others, t = [k for k in args.sides if k != "segmented"], args.temperature
  for n in args.new_tokens:
    make = {"segmented": (ours, params, cfg, tokens, mask, n, (), pad, t),
            "one segment": (ours, params, cfg, tokens, mask, n, (), pad, t, 0, False),
            "transformers": (theirs, model, tokens, mask, n, pad, t)}
    fns = {k: make[k][0](*make[k][1:]) for k in ["segmented"] + others}
    warm = [k for k in fns if k != "transformers"]  # our first call compiles; torch's is timed as a rep
    res = race(fns, args.reps, warm=warm)
    ms = {k: 1e3 * float(np.median(v)) / n for k, v in res["times"].items()}
    same = [f"{float((res['outs'][k] == res['outs']['segmented']).mean()):.3f}" if not t else "—"
            for k in others]
    lines.append(f"| {n} | " + " | ".join(f"{ms[k]:.1f}" for k in fns) + " | "
                 + " | ".join(f"{ms[k] / ms['segmented']:.2f}×" for k in others) + " | "
                 + " / ".join(same) + " | " + " / ".join(f"{res['first'][k]:.0f}" for k in warm) + " s |")
    print(lines[-1], f"load {os.getloadavg()}", flush=True)
    last = (res["outs"]["segmented"], float(np.median(res["times"]["segmented"])))
  text = ("| new tokens | " + " | ".join(f"{k} ms/step" for k in fns) + " | "
          + " | ".join(f"{k} / segmented" for k in others) + f" | same tokens ({' / '.join(others)}) | "
          f"first call ({' / '.join(warm)}) |\n|" + "---:|" * (len(fns) + len(others) + 3) + "\n"
          + "\n".join(lines) + "\n")
  if args.early_stop:
    reuse = last if args.early_stop == args.new_tokens[-1] else None  # the full-length run just timed
    text += "\n" + early_stop(params, cfg, tokens, mask, pad, args.early_stop, args.reps, reuse)
  cmd = shlex.join(["python", "-m", "experiments.bench.decode_length"] + (argv or sys.argv[1:]))
  head = (f"- command: `{cmd}`\n"
          f"- {model_dir.name}, fp32, {args.batch} chat prompts of {tokens.shape[1]} tokens, "
          f"{'greedy' if not t else f'T = {t:g}'}; torch "
          f"{args.torch_threads} thread(s); load average at the end {os.getloadavg()}\n\n")
  print("\n" + head + text)
  if args.out:
    Path(args.out).write_text(head + text)
  return head + text


def early_stop(params, cfg, tokens, mask, pad, n, reps, full=None) -> str:
  """The forced-stop harness (module docstring) → a Markdown table: wall seconds with and without stops.
  full: (greedy rows [B, n], median seconds) of the segmented side without stops, when already measured."""
  if full is None:
    run = ours(params, cfg, tokens, mask, n, pad_id=pad)
    res = race({"full": run}, reps)
    full = (res["outs"]["full"], float(np.median(res["times"]["full"])))
  stops = stop_harness(full[0], n)
  lens = lengths(full[0], stops)
  res = race({"stops": ours(params, cfg, tokens, mask, n, stop_ids=stops, pad_id=pad)}, reps)
  s = {"full": full[1], "stops": float(np.median(res["times"]["stops"]))}
  row = f"| segmented | {s['full']:.1f} | {s['stops']:.1f} | {s['stops'] / s['full']:.0%} |"
  print(row, f"load {os.getloadavg()}", flush=True)
  early = sum(x <= -(-n // 10) for x in lens)
  return (f"Early stop: budget {n}, {len(stops)} stop ids; row lengths {lens} ({early} of {len(lens)} rows "
          f"within the first 10 %).\n\n| sampler | full length s | with stops s | stops / full |\n"
          f"|---|---:|---:|---:|\n{row}\n")


if __name__ == "__main__":
  main()
