"""Decode throughput: our jitted KV-cache sampler vs transformers' PyTorch `generate`, on a random Qwen2
preset or the real SmolLM2-135M-Instruct (`--preset smollm2`).

One HF directory (random presets: `toy.make_random_model_dir`; smollm2: the converted GGUF, with the chat
prompts next_jax/configs/smollm2.py trains on) is loaded by both stacks: ours through `hf.load_model`, theirs
through `AutoModelForCausalLM.from_pretrained` (fp32, eval, all cores). Both decode the same left-padded
prompt batch for exactly N new tokens (one row set per --new-tokens value) with the KV cache on and no
stop ids:

  greedy : B prompts, 1 sample each, argmax                      → B·N generated tokens per call
  sample : B prompts × G samples (temperature 1, top-p 1 / 0.95) → B·G·N generated tokens per call
           ours prefills B rows and tiles the cache G×; theirs uses num_return_sequences=G (prefills B·G)

The first call of each (trace + compile for us) is timed separately; then R repetitions alternate the two
sides (order flipped every rep), each blocked until done. Reported: median and IQR of generated tokens/s,
the ratio ours/transformers of the medians, and for greedy the fraction of identical tokens.
--early-stop N adds, per preset, one greedy call of up to N new tokens with the model's EOS (smollm2: and the
newline token) as stop ids on both sides: each side's wall time and generated tokens show that decoding
ends when every row has stopped.
Writes the table to experiments/results/bench_sampler.md (--out).

  python -m experiments.bench.sampler_vs_transformers [--preset toy [toy-rl small smollm2]] [--batch 16]
      [--new-tokens 64 [128]] [--samples 8] [--top-p 1.0 0.95] [--reps 7] [--early-stop N] [--profile]
  python -m experiments.bench.sampler_vs_transformers --preset smollm2 --batch 64 --samples 1 \
      --new-tokens 32 128 --top-p 1.0 --reps 2 --early-stop 128 --out experiments/results/bench_sampler_smollm2.md
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from experiments.bench import real_model
from next_jax.models import hf, sampler, toy
from next_jax.models.policy import ModelConfig, count_params

# toy-rl: make_toy_base's "S" (char vocab of 17); toy: the demo / BPE-tokenizer toy (GQA, 512 tokens);
# small: ~8× toy's compute per token.
PRESETS = {
    "toy-rl": dict(vocab_size=17, hidden_size=64, intermediate_size=176, num_layers=2, num_heads=4,
                   num_kv_heads=4),
    "toy": dict(vocab_size=512, hidden_size=256, intermediate_size=704, num_layers=4, num_heads=8,
                num_kv_heads=2),
    "small": dict(vocab_size=4096, hidden_size=512, intermediate_size=1408, num_layers=8, num_heads=8,
                  num_kv_heads=2),
}
REAL = ("smollm2",)  # presets that are a real checkpoint (real_model.load), not a random architecture
RESULTS = Path(__file__).resolve().parents[1] / "results" / "bench_sampler.md"
# Other processes' mean CPU (cores) above which a row is flagged: with torch using every core, a fraction of a
# core taken by someone else can slow transformers' generate 10× or more (threads wait on each other).
CONTENDED = 0.25


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--preset", choices=list(PRESETS) + list(REAL), nargs="+", default=["toy"],
                 help="one table row set each")
  p.add_argument("--model", default=real_model.DEFAULT, help="smollm2 preset: HF dir, .gguf or packaged name")
  for name in PRESETS["toy"]:
    p.add_argument(f"--{name.replace('_', '-')}", type=int, default=None, help="override the preset")
  p.add_argument("--batch", type=int, default=16, help="prompts per call")
  p.add_argument("--prompt-len", type=int, default=32, help="padded prompt length (bucket)")
  p.add_argument("--new-tokens", type=int, nargs="*", default=[64],
                 help="tokens per row; one row set each (none: only --early-stop)")
  p.add_argument("--samples", type=int, default=8, help="G for the sampling rows (0 = skip them)")
  p.add_argument("--top-p", type=float, nargs="*", default=[1.0, 0.95],
                 help="one sampling row per value (temperature 1): 1.0 = RL rollouts, 0.95 = nucleus")
  p.add_argument("--reps", type=int, default=7, help="timed repetitions per side")
  p.add_argument("--weight-scale", type=float, default=1.0, help="toy.make_random_model_dir weight_scale")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default=str(RESULTS), help="Markdown results file ('' = don't write)")
  p.add_argument("--early-stop", type=int, default=0, metavar="N",
                 help="also one greedy call of up to N new tokens per side that stops at EOS (smollm2: or a "
                 "newline); 0 = off")
  p.add_argument("--profile", action="store_true", help="also trace one call of ours per row: top XLA ops")
  return p.parse_args(argv)


def model_config(args, preset: str) -> ModelConfig:
  """The preset's architecture with any size flags applied on top (fp32, Qwen2: qkv bias, untied head)."""
  fields = {k: (v if getattr(args, k) is None else getattr(args, k)) for k, v in PRESETS[preset].items()}
  return ModelConfig(**fields, dtype="float32")


def make_prompts(batch: int, length: int, vocab: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Random left-padded prompts: row i has length − (i mod length/4) real tokens (ids in [3, vocab))."""
  rng = np.random.default_rng(seed)
  lens = [length - (i % max(length // 4, 1)) for i in range(batch)]
  return sampler.pad_prompts([rng.integers(3, vocab, n).tolist() for n in lens], pad_id=0, length=length)


# ------------------------------------------------------------------------------------------ the two sides


def ours_fn(params, cfg, tokens, mask, n_new, samples, temperature, top_p, stop_ids=(), pad_id=0):
  """() → int32[B·G, N] numpy, blocking. No stop ids (default): every row generates exactly n_new tokens."""
  tokens, mask = jax.numpy.asarray(tokens), jax.numpy.asarray(mask)
  keys = iter(jax.random.split(jax.random.key(0), 10_000))

  def run():
    out = sampler.generate(params, tokens, mask, next(keys), cfg=cfg, max_new_tokens=n_new,
                           num_samples=samples, temperature=temperature, top_p=top_p, stop_ids=stop_ids,
                           pad_id=pad_id)
    return np.asarray(jax.block_until_ready(out.tokens))

  return run


def theirs_fn(model, tokens, mask, n_new, samples, greedy, top_p, eos_id=None, pad_id=0):
  """() → int64[B·G, ≤ N] numpy. eos_id None: min_new_tokens=N, exactly n_new tokens per row."""
  import torch  # noqa: PLC0415

  ids, att = torch.from_numpy(tokens.astype(np.int64)), torch.from_numpy(mask.astype(np.int64))
  kw = dict(max_new_tokens=n_new, use_cache=True, eos_token_id=eos_id, pad_token_id=pad_id)
  if eos_id is None:
    kw["min_new_tokens"] = n_new
  if greedy:
    kw.update(do_sample=False)
  else:
    kw.update(do_sample=True, temperature=1.0, top_p=top_p, top_k=0, num_return_sequences=samples)

  def run():
    with torch.inference_mode():
      out = model.generate(input_ids=ids, attention_mask=att, **kw)
    return out[:, tokens.shape[1]:].numpy()

  return run


# ---------------------------------------------------------------------------------------------- timing


def timed(fn):
  t0 = time.perf_counter()
  out = fn()
  return time.perf_counter() - t0, out


def _busy_seconds() -> tuple[float, float]:
  """(CPU seconds all processes have spent busy, CPU seconds this process has used) so far."""
  fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
  busy = sum(fields) - fields[3] - (fields[4] if len(fields) > 4 else 0)  # minus idle and iowait
  own = time.process_time()
  return busy / os.sysconf("SC_CLK_TCK"), own


def others_load(fn):
  """Run fn → (seconds, output, cores used by *other* processes meanwhile: Δbusy_all − Δbusy_own over Δt)."""
  try:
    b0, o0 = _busy_seconds()
  except (OSError, ValueError, IndexError):  # no /proc/stat: report nan
    return (*timed(fn), float("nan"))
  dt, out = timed(fn)
  b1, o1 = _busy_seconds()
  return dt, out, max((b1 - b0) - (o1 - o0), 0.0) / dt


def race(ours, theirs, reps: int, n_tokens: int) -> dict:
  """First call of each, then `reps` alternating timed calls → tokens/s samples, first-call times, outputs,
  and the mean number of cores other processes kept busy during the timed calls (0 = a quiet machine)."""
  first_ours, out_ours = timed(ours)
  first_theirs, out_theirs = timed(theirs)
  t_ours, t_theirs, others = [], [], []
  for r in range(reps):
    pair = [(ours, t_ours), (theirs, t_theirs)]
    for fn, acc in (pair if r % 2 == 0 else pair[::-1]):
      dt, _, load = others_load(fn)
      acc.append(dt)
      others.append(load)
  tps = lambda ts: n_tokens / np.asarray(ts)  # noqa: E731
  return dict(first_ours=first_ours, first_theirs=first_theirs, tps_ours=tps(t_ours),
              tps_theirs=tps(t_theirs), out_ours=out_ours, out_theirs=out_theirs,
              others=float(np.mean(others)))


def stats(x: np.ndarray) -> tuple[float, float]:
  """(median, IQR = q75 − q25)."""
  q25, q50, q75 = np.percentile(x, [25, 50, 75])
  return float(q50), float(q75 - q25)


def agreement(a: np.ndarray, b: np.ndarray) -> dict:
  """Identical-token fraction, identical-row fraction, and the mean first-divergence step (N if none)."""
  same = a == b
  first = np.where(same.all(1), a.shape[1], np.argmin(same, axis=1))
  return dict(tokens=float(same.mean()), rows=float(same.all(1).mean()), first_div=float(first.mean()))


# XLA:CPU op-name prefix → what it is in a decode step (names from the optimized HLO of `generate`).
OP_KINDS = (("ynn_fusion", "matmuls (YNNPACK)"), ("dot", "matmuls (XLA)"),
            ("dynamic-slice", "layer slices of stacked weights (copies)"),
            ("transpose", "KV-cache layer slice → attention layout (copies)"), ("sort", "top-p sort"),
            ("reduce-window", "top-p cumsum"))


def profile(run, label: str, top: int = 8) -> None:
  """Trace one call (jax.profiler → perfetto JSON); print leaf XLA ops grouped by OP_KINDS, then the top ops.
  Shares are of the traced wall time; the remainder is loop control, thread-pool waits and dispatch."""
  import collections  # noqa: PLC0415
  import gzip  # noqa: PLC0415
  import json  # noqa: PLC0415

  with tempfile.TemporaryDirectory() as tmp:
    with jax.profiler.trace(tmp, create_perfetto_trace=True):
      wall, _ = timed(run)
    events = json.load(gzip.open(next(Path(tmp).rglob("*.trace.json.gz"))))
  events = events["traceEvents"] if isinstance(events, dict) else events
  containers = ("$", "ThunkExecutor", "SlinkyThreadPool", "while", "cond", "call", "Pjit", "CommonPjRt")
  total, calls, kinds = collections.Counter(), collections.Counter(), collections.Counter()
  for e in events:
    name = e.get("name", "")
    if e.get("ph") == "X" and not name.startswith(containers):
      ms = e.get("dur", 0) / 1e3
      total[name] += ms
      calls[name] += 1
      kinds[next((kind for prefix, kind in OP_KINDS if name.startswith(prefix)), "other ops")] += ms
  wall *= 1e3
  print(f"profile {label}: {wall:.0f} ms traced wall; leaf ops {sum(total.values()):.0f} ms")
  for kind, ms in kinds.most_common():
    print(f"  {ms:8.1f} ms  {100 * ms / wall:5.1f}%  {kind}")
  print("  top ops: " + ", ".join(f"{n} {ms:.0f} ms/{calls[n]}×" for n, ms in total.most_common(top)))


# --------------------------------------------------------------------------------------------- report


def cpu_name() -> str:
  try:
    lines = Path("/proc/cpuinfo").read_text().splitlines()
    return next(ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name"))
  except (OSError, StopIteration):
    return platform.machine()


def machine_info() -> str:
  import torch  # noqa: PLC0415
  import transformers  # noqa: PLC0415

  load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
  return (f"nproc={os.cpu_count()}, cpu={cpu_name()}, load avg {load}, "
          f"python {platform.python_version()}, jax {jax.__version__} ({jax.devices()[0].platform}), "
          f"torch {torch.__version__} (threads={torch.get_num_threads()}), "
          f"transformers {transformers.__version__}")


def table(rows: list[dict]) -> str:
  head = ("| model | mode | rows × new tokens | ours tok/s (IQR) | transformers tok/s (IQR) "
          "| ours / transformers | greedy tokens identical | others' CPU (cores) |\n" + "|---" * 8 + "|\n")
  lines = []
  for r in rows:
    (mo, io), (mt, it) = stats(r["tps_ours"]), stats(r["tps_theirs"])
    agree = r.get("agree")
    agree_s = (f"{agree['tokens']:.1%} (rows {agree['rows']:.0%}, first diff @ {agree['first_div']:.1f})"
               if agree else "n/a (sampled)")
    lines.append(f"| {r['preset']} | {r['mode']} | {r['shape']} | {mo:,.0f} ({io:,.0f}) "
                 f"| {mt:,.0f} ({it:,.0f}) | **{mo / mt:.2f}×** | {agree_s} | {r['others']:.2f}"
                 f"{' ⚠ contended: rerun' if r['others'] > CONTENDED else ''} |")
  return head + "\n".join(lines) + "\n"


def compile_note(r: dict) -> str:
  """First-call times; our compile ≈ first call − median steady call (none when the jit cache hit)."""
  comp = max(r["first_ours"] - r["shape_tokens"] / stats(r["tps_ours"])[0], 0.0)  # ≥ 0 under timing noise
  what = f"≈ {comp:.2f} s trace + XLA compile" if r["compiled"] else "no compile: jit cache hit (traced args)"
  steady = r["shape_tokens"] / stats(r["tps_theirs"])[0]
  return (f"ours first call {r['first_ours']:.2f} s ({what}); transformers first call "
          f"{r['first_theirs']:.2f} s (steady {steady:.2f} s)")


def early_table(rows: list[dict]) -> str:
  """The --early-stop calls: wall time, generated tokens (stop included) and the longest row, per side."""
  lines = ["| model | rows × max new tokens | ours: s / tokens / longest row | transformers: s / tokens / "
           "longest row |", "|---|---|---|---|"]
  for r in rows:
    cells = [f"{r[k]['seconds']:.2f} s / {r[k]['tokens']:,} / {r[k]['longest']}" for k in ("ours", "theirs")]
    lines.append(f"| {r['preset']} | {r['shape']} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def report(args, models: dict[str, str], rows: list[dict], early: list[dict]) -> str:
  cmd = "python -m experiments.bench.sampler_vs_transformers " + shlex.join(sys.argv[1:])
  model_lines = "\n".join(f"- model `{k}`: {v}" for k, v in models.items())
  compile_lines = "\n".join(f"- {r['preset']} / {r['mode']} / {r['shape']}: {compile_note(r)}" for r in rows)
  early_text = ("\nEarly stop (greedy; stop ids: EOS, and for smollm2 also the newline token, on both sides; "
                f"decoding should end when the last row stops):\n\n{early_table(early)}" if early else "")
  new = ", ".join(map(str, args.new_tokens))
  return (f"# Sampler benchmark: next_jax vs transformers generate\n\n"
          f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}\n"
          f"- command: `{cmd.strip()}`\n- machine: {machine_info()}\n{model_lines}\n"
          f"- prompts: batch {args.batch} (left-padded; random presets: {args.prompt_len} random tokens; "
          f"smollm2: chat prompts of next_jax/configs/smollm2.py), {new} new tokens per row, KV cache, no stop ids; "
          f"{args.reps} alternating timed reps per side; fp32\n\n"
          f"{table(rows)}\nFirst calls (compile):\n{compile_lines}\n{early_text}")


# ------------------------------------------------------------------------------------------------ main


def load_both(preset: str, args):
  """→ (cfg, our params, transformers model in eval mode, prompt tokens, mask, stop ids of the early-stop
  call, pad id, description).
  Random presets: a fresh random HF directory and random prompts; smollm2: the real checkpoint and chat
  prompts, left-padded to the longest rounded up to a multiple of 8 (40 tokens, as next_jax/configs/smollm2.py)."""
  import torch  # noqa: PLC0415
  import transformers  # noqa: PLC0415

  load = lambda d: transformers.AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()  # noqa: E731
  if preset in REAL:
    model_dir, cfg, params, tok = real_model.load(args.model)
    ids = [tok(text=q)["input_ids"] for q in real_model.chat_prompts(tok, args.batch, args.seed)]
    tokens, mask = sampler.pad_prompts(ids, tok.pad_token_id, -(-max(map(len, ids)) // 8) * 8)  # as the preset
    newline = tok(text="\n")["input_ids"]  # the answers are one line: EOS or a newline ends them
    return (cfg, params, load(model_dir), tokens, mask, (tok.eos_token_id, *newline[-1:]), tok.pad_token_id,
            f"{model_dir.name}, {count_params(params):,} params")
  with tempfile.TemporaryDirectory() as tmp:
    model_dir = toy.make_random_model_dir(Path(tmp) / "model", model_config(args, preset), seed=args.seed,
                                          weight_scale=args.weight_scale, tokenizer=False)
    cfg, params, _ = hf.load_model(model_dir, tokenizer=False)
    model = load(model_dir)
  tokens, mask = make_prompts(args.batch, args.prompt_len, cfg.vocab_size, args.seed)
  return (cfg, params, model, tokens, mask, (1,), 0,
          f"{dataclasses.asdict(cfg)}, {count_params(params):,} params")


def early_stop(preset, params, cfg, model, tokens, mask, stops, pad, n_new) -> dict:
  """One greedy call per side (after a warm-up call) with `stops` as the stop ids."""
  ours = ours_fn(params, cfg, tokens, mask, n_new, 1, 0.0, 1.0, stop_ids=stops, pad_id=pad)
  theirs = theirs_fn(model, tokens, mask, n_new, 1, True, 1.0, eos_id=list(stops), pad_id=pad)
  out = {"preset": preset, "shape": f"{tokens.shape[0]} × {n_new}"}
  for name, fn in (("ours", ours), ("theirs", theirs)):
    fn()
    dt, toks = timed(fn)
    hit = np.isin(toks, stops)
    lengths = [int(np.argmax(row)) + 1 if row.any() else len(row) for row in hit]
    out[name] = {"seconds": dt, "tokens": int(sum(lengths)), "longest": max(lengths)}
  return out


def bench_preset(preset: str, args) -> tuple[str, list[dict], dict | None]:
  """Per --new-tokens value: a greedy row, then one sampling row per --top-p → (model description, rows,
  the early-stop row or None)."""
  cfg, params, model, tokens, mask, stops, pad, desc = load_both(preset, args)
  print(f"model {preset}: {desc}", flush=True)
  b, g = tokens.shape[0], args.samples
  modes = [("greedy", 1, 0.0, 1.0)] + [(f"sample G={g}, T=1, top-p {p:g}", g, 1.0, p)
                                       for p in (args.top_p if g else [])]
  rows = []
  for n in args.new_tokens:
    for mode, k, temp, top_p in modes:
      print(f"  {mode}: {b}·{k} rows × {n} new tokens ...", flush=True)
      ours = ours_fn(params, cfg, tokens, mask, n, k, temp, top_p, pad_id=pad)
      programs = sampler.compiled_programs()  # tells a compile from a cache hit
      res = race(ours, theirs_fn(model, tokens, mask, n, k, temp == 0.0, top_p, pad_id=pad), args.reps, b * k * n)
      rows.append(dict(res, preset=preset, mode=mode, shape=f"{b}·{k} × {n}" if k > 1 else f"{b} × {n}",
                       shape_tokens=b * k * n, compiled=sampler.compiled_programs() > programs))
      if temp == 0.0:
        rows[-1]["agree"] = agreement(res["out_ours"], res["out_theirs"])
      if args.profile:
        profile(ours, f"{preset} {mode}")
  early = early_stop(preset, params, cfg, model, tokens, mask, stops, pad, args.early_stop) \
      if args.early_stop else None
  return desc, rows, early


def main(argv=None) -> list[dict]:
  args = parse_args(argv)
  import torch  # noqa: PLC0415

  torch.set_num_threads(os.cpu_count())
  print(machine_info(), flush=True)
  models, rows, early = {}, [], []
  for preset in args.preset:
    models[preset], preset_rows, early_row = bench_preset(preset, args)
    rows += preset_rows
    early += [early_row] if early_row else []
  text = report(args, models, rows, early)
  print("\n" + text)
  if args.out:
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(f"wrote {args.out}")
  return rows


if __name__ == "__main__":
  main()
