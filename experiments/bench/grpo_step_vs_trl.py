"""One GRPO RL step (sample G completions per prompt → reward → advantages → one AdamW step on a LoRA):
next_jax `trainer.train_step` vs TRL's `GRPOTrainer` (PyTorch + transformers `generate`), on one random Qwen2
or, with --model, a real checkpoint (SmolLM2-135M-Instruct: `--model smollm2-135m-instruct`).

One HF directory (`toy.make_random_model_dir`: byte-level BPE tokenizer, fp32; or the --model directory) is
loaded by both stacks, ours through `hf.load_model`, theirs through `AutoModelForCausalLM.from_pretrained`.
Same workload:

  P text prompts (random presets: "Question: what is a+b*c?"; --model: next_jax/configs/smollm2.py's chat prompts,
  the chat template already applied, so TRL sees them as plain text) × G completions, temperature 1, top-p 1,
  top-k off,
  exactly max_new_tokens new tokens per row (ours: stop_ids=(); TRL: min_new_tokens = max_completion_length,
  so eos is never sampled); reward = fraction of digit characters of the decoded completion (one Python
  function for both); GRPO group-normalised advantages; PPO-clip loss, ε = 0.2, aggregated token-mean (ours:
  LossConfig() = verl "token-mean"; TRL: loss_type="dapo" = Σ token losses / #tokens of the generation
  batch, the same thing here because one step = one generation = one optimiser step); no KL, no reference
  model (TRL beta=0); LoRA r=8 α=16 dropout 0 on q,k,v,o,gate,up,down; AdamW lr 1e-5, wd 0.01, constant,
  grad clip 1.0, one optimiser step per RL step (TRL: per_device_train_batch_size = P·G,
  gradient_accumulation_steps = steps_per_generation = num_iterations = 1); no gradient checkpointing, no
  eval, no saving, metrics logged every step.

Work that differs: ours recomputes the old log-probs with one extra no-grad forward inside the update (TRL
skips it when num_iterations = 1 and uses the detached new log-probs); ours prefills each prompt once and
tiles its KV cache G× (TRL prefills all P·G rows); ours pads prompts to a fixed prompt_len (TRL to the batch
maximum); ours has a dual clip (c = 3) that TRL lacks (inactive on-policy).

Timing: a step is wall clock from the start of sampling to the step's metrics on the host. Ours: around
`train_step`, whose own split is sample = generate + decode + reward and update = the jitted update. Our
first step (trace + XLA compile) runs before TRL starts and is reported apart, its compile time taken from
JAX's compile events, which also count any recompile during the timed steps. TRL: a TrainerCallback from
on_step_begin to on_log (so TRL's per-step logging is in), sample = `_generate_and_score_completions`
(tokenise, generate, decode, reward, advantages), update = the rest (forward + backward, clip, AdamW, log);
its first `--warmup` steps are dropped. By default the stacks alternate step by step in one process: each of
our steps runs inside TRL's on_log callback, outside TRL's timing window.

TRL runs once per `--torch-threads` value (default: all cores, then 1), each with its own interleaved steps
of ours; JAX always uses all cores. The 1-thread run is there because on a shared, oversubscribed machine
torch's OpenMP (a barrier per op) with all cores can be several times slower than with one thread, which
would flatter us. Reported per run: median and IQR of step seconds, samples/s = P·G / median, the medians of
the sample / update splits, TRL / ours as a ratio of medians and as the median of the ratios of adjacent
(TRL, ours) step pairs, which is robust to load drifting during a run, and the 1-minute load average.
Writes the table to experiments/results/bench_grpo_step.md.

  python -m experiments.bench.grpo_step_vs_trl [--preset toy|small] [--steps 8] [--torch-threads 2,1]
  python -m experiments.bench.grpo_step_vs_trl --model smollm2-135m-instruct --prompts 8 --group 8 \
      --prompt-len 64 --new-tokens 32 --rank 16 --alpha 32 --steps 3 --torch-threads 2 \
      --out experiments/results/bench_grpo_step_smollm2.md
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import os
import platform
import shlex
import sys
import tempfile
import time
import warnings
from pathlib import Path

import jax
import numpy as np

from experiments.bench import real_model
from next_jax.models import hf, toy
from next_jax.models.policy import (
  ALL_MODULES,
  LoraConfig,
  ModelConfig,
  count_params,
  init_lora,
)
from next_jax.rl import grpo, trainer

PRESETS = {
    "toy": dict(vocab_size=512, hidden_size=128, intermediate_size=352, num_layers=4, num_heads=4,
                num_kv_heads=2),
    "small": dict(vocab_size=512, hidden_size=256, intermediate_size=704, num_layers=4, num_heads=8,
                  num_kv_heads=2),
}
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RESULTS = Path(__file__).resolve().parents[1] / "results" / "bench_grpo_step.md"


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--preset", choices=sorted(PRESETS), default="toy")
  p.add_argument("--model", default="", help="a real checkpoint instead of the random preset: HF dir, .gguf "
                 "or packaged name (smollm2-135m-instruct)")
  for name in PRESETS["toy"]:
    p.add_argument(f"--{name.replace('_', '-')}", type=int, default=None, help="override the preset")
  p.add_argument("--prompts", type=int, default=8, help="P prompts per step")
  p.add_argument("--group", type=int, default=8, help="G completions per prompt")
  p.add_argument("--prompt-len", type=int, default=16, help="ours: fixed left-padded prompt length")
  p.add_argument("--new-tokens", type=int, default=32, help="completion length (no early stop)")
  p.add_argument("--steps", type=int, default=8, help="K timed steps per side (per TRL run)")
  p.add_argument("--warmup", type=int, default=1, help="untimed first steps per side")
  p.add_argument("--rank", type=int, default=8)
  p.add_argument("--alpha", type=float, default=16.0)
  p.add_argument("--lr", type=float, default=1e-5)
  p.add_argument("--order", choices=("interleaved", "sequential"), default="interleaved",
                 help="alternate the two stacks step by step, or run ours then TRL")
  p.add_argument("--torch-threads", default=f"{os.cpu_count()},1",
                 help="comma-separated torch.set_num_threads values: one TRL run each (default: all cores, "
                 "then 1)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default=str(RESULTS), help="Markdown results file ('' = don't write)")
  return p.parse_args(argv)


def model_config(args) -> ModelConfig:
  fields = {k: (v if getattr(args, k) is None else getattr(args, k)) for k, v in PRESETS[args.preset].items()}
  return ModelConfig(**fields, dtype="float32")


def make_prompts(tok, n: int, max_len: int, seed: int) -> list[str]:
  """n distinct short arithmetic questions, each ≤ max_len tokens (ValueError if even the shortest is
  longer)."""
  if len(tok(text="Question: what is 0+0*0?")["input_ids"]) > max_len:
    raise ValueError(f"--prompt-len {max_len}: shorter than any question prompt")
  rng = np.random.default_rng(seed)
  out: dict[str, None] = {}
  for _ in range(100 * n):  # bounded: at some max_len fewer than n distinct questions fit
    a, b, c = rng.integers(0, 100, 3)
    q = f"Question: what is {a}+{b}*{c}?"
    if q not in out and len(tok(text=q)["input_ids"]) <= max_len:
      out[q] = None
      if len(out) == n:
        return list(out)
  raise ValueError(f"--prompt-len {max_len}: only {len(out)} distinct questions of ≤ {max_len} tokens found in "
                   f"{100 * n} draws, {n} needed; raise --prompt-len or lower the batch")


def digit_fraction(text: str) -> float:
  """The toy verifier of both stacks: the fraction of characters that are digits."""
  return sum(ch.isdigit() for ch in text) / max(len(text), 1)


def stats(x) -> tuple[float, float]:
  """(median, IQR = q75 − q25)."""
  q25, q50, q75 = np.percentile(np.asarray(x, float), [25, 50, 75])
  return float(q50), float(q75 - q25)


# ---------------------------------------------------------------------------------------- JAX compiles


class CompileLog:
  """Sums JAX's trace / lower / XLA-compile event durations; `take()` → (events, seconds) since last take."""

  EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
            "/jax/core/compile/backend_compile_duration")

  def __init__(self):
    self.n, self.secs = collections.Counter(), collections.Counter()
    jax.monitoring.register_event_duration_secs_listener(self._on_event)

  def _on_event(self, event: str, duration: float, **_):
    if event in self.EVENTS:
      self.n[event] += 1
      self.secs[event] += duration

  def take(self) -> tuple[int, float]:
    out = (self.n["/jax/core/compile/backend_compile_duration"], sum(self.secs.values()))
    self.n.clear()
    self.secs.clear()
    return out


# ---------------------------------------------------------------------------------------------- ours


class Ours:
  """next_jax: RLSetup on the tokenizer's hooks; `step()` runs one train_step and times it."""

  def __init__(self, args, cfg, params, tok, prompts, compiles: CompileLog):
    self.params, self.compiles = params, compiles
    lcfg = LoraConfig(rank=args.rank, alpha=args.alpha, targets=ALL_MODULES)
    self.setup = trainer.RLSetup(
        cfg=cfg, lora_cfg=lcfg, loss_cfg=grpo.LossConfig(),
        rollout=trainer.RolloutConfig(prompts_per_step=args.prompts, group_size=args.group,
                                      prompt_len=args.prompt_len, max_new_tokens=args.new_tokens),
        estimator="grpo", encode=lambda q: tok(text=q)["input_ids"],
        decode=lambda ids: tok.decode(ids, skip_special_tokens=True),
        reward=lambda text, _problem: digit_fraction(text),
        next_problems=lambda c, n: ([prompts[(c + i) % len(prompts)] for i in range(n)], c + n),
        pad_id=tok.pad_token_id, stop_ids=())
    tx = trainer.make_optimizer(trainer.OptimConfig(lr=args.lr, b2=0.999))  # TRL's AdamW betas
    self.state = trainer.init_state(init_lora(cfg, lcfg, jax.random.key(args.seed + 1)), tx, args.seed)
    self.rows: list[dict] = []

  def step(self) -> dict:
    self.compiles.take()
    t0 = time.perf_counter()
    self.state, m = trainer.train_step(self.setup, self.params, self.state)
    jax.block_until_ready(self.state)
    dt = time.perf_counter() - t0
    n_compiles, compile_s = self.compiles.take()
    row = {"step": dt, "sample": m["time/sample"], "update": m["time/update"], "compiles": n_compiles,
           "compile_s": compile_s, "reward": m["reward_mean"], "len": m["response_len"]}
    self.rows.append(row)
    return row


# ----------------------------------------------------------------------------------------------- TRL


def build_trl(args, model_dir: Path, tok, prompts, out_dir: str, rows: list[dict], on_step=None):
  """A GRPOTrainer on the same model/tokenizer/workload with a timing callback that appends
  {step, sample, update, reward, len} of each TRL step to `rows`; `on_step(i)` runs after step i (untimed)."""
  import datasets  # noqa: PLC0415
  import peft  # noqa: PLC0415
  import torch  # noqa: PLC0415
  import transformers  # noqa: PLC0415
  import trl  # noqa: PLC0415

  n = args.prompts * args.group
  cfg = trl.GRPOConfig(
      output_dir=out_dir, per_device_train_batch_size=n, gradient_accumulation_steps=1,
      steps_per_generation=1, num_generations=args.group, num_iterations=1,
      max_steps=args.warmup + args.steps, max_completion_length=args.new_tokens,
      generation_kwargs={"min_new_tokens": args.new_tokens}, temperature=1.0, top_p=1.0, top_k=0,
      beta=0.0, loss_type="dapo", scale_rewards="group", epsilon=0.2,
      learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.01,
      adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0,
      use_vllm=False, bf16=False, fp16=False, gradient_checkpointing=False, use_cpu=True,
      eval_strategy="no", save_strategy="no", logging_steps=1, report_to="none", log_completions=False,
      disable_tqdm=True, seed=args.seed, data_seed=args.seed, dataloader_num_workers=0)
  model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
  lora = peft.LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0, bias="none",
                         target_modules=HF_TARGETS, task_type="CAUSAL_LM")

  def reward(completions, **_):
    return [digit_fraction(c) for c in completions]

  class Timing(transformers.TrainerCallback):
    t0 = None

    def on_step_begin(self, *_a, **_k):
      Timing.t0 = time.perf_counter()
      rows.append({"sample": 0.0})

    def on_log(self, _args, state, _control, logs=None, **_k):
      if Timing.t0 is None or "loss" not in (logs or {}):  # the end-of-train summary log
        return
      row = rows[-1]
      row["step"] = time.perf_counter() - Timing.t0
      row["update"] = row["step"] - row["sample"]
      row["reward"], row["len"] = logs.get("reward"), logs.get("completions/mean_length")
      Timing.t0 = None
      if on_step is not None:
        on_step(len(rows) - 1)

  data = datasets.Dataset.from_dict({"prompt": prompts})
  t = trl.GRPOTrainer(model=model, reward_funcs=reward, args=cfg, train_dataset=data, processing_class=tok,
                      peft_config=lora, callbacks=[Timing()])
  t.remove_callback(transformers.PrinterCallback)  # its per-step print of the log dict
  inner = t._generate_and_score_completions

  def timed_generate(*a, **k):
    t0 = time.perf_counter()
    out = inner(*a, **k)
    rows[-1]["sample"] += time.perf_counter() - t0
    return out

  t._generate_and_score_completions = timed_generate
  return t


# --------------------------------------------------------------------------------------------- report


def versions() -> str:
  import peft  # noqa: PLC0415
  import torch  # noqa: PLC0415
  import transformers  # noqa: PLC0415
  import trl  # noqa: PLC0415

  return (f"python {platform.python_version()}, jax {jax.__version__} ({jax.devices()[0].platform}), "
          f"torch {torch.__version__}, transformers "
          f"{transformers.__version__}, trl {trl.__version__}, peft {peft.__version__}")


def machine() -> str:
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
    cpu = names[0] if names else cpu
  except OSError:
    pass
  return f"nproc={os.cpu_count()}, {cpu}, {platform.system()} {platform.release()}"


def table(args, runs: list[dict]) -> str:
  """One pair of rows per TRL run: ours (the steps interleaved with that run) and TRL."""
  n = args.prompts * args.group
  med = lambda rows, k: stats([r[k] for r in rows])[0]  # noqa: E731
  lines = [("| torch threads | stack | median step (s) | IQR (s) | samples/s | sample (s) | update (s) "
            "| TRL / ours (medians) | paired |"), "|---|---|---|---|---|---|---|---|---|"]
  for run in runs:
    (mo, io), (mt, it) = stats([r["step"] for r in run["ours"]]), stats([r["step"] for r in run["trl"]])
    paired = np.median([t["step"] / o["step"] for t, o in zip(run["trl"], run["ours"])])
    ours_ratio = f"**{mt / mo:.1f}×** | {paired:.1f}×"
    for name, rows, m, iqr, ratio in (("next_jax", run["ours"], mo, io, ours_ratio),
                                      ("TRL GRPOTrainer", run["trl"], mt, it, "1.0× | 1.0×")):
      lines.append(f"| {run['threads']} | {name} | {m:.3f} | {iqr:.3f} | {n / m:,.1f} | "
                   f"{med(rows, 'sample'):.3f} | {med(rows, 'update'):.3f} | {ratio} |")
  return "\n".join(lines) + "\n"


def report(args, cfg: ModelConfig, n_params: int, n_lora: int, ours_first: dict, runs: list[dict]) -> str:
  cmd = "python -m experiments.bench.grpo_step_vs_trl " + shlex.join(sys.argv[1:])
  ours = [r for run in runs for r in run["ours"]]
  trl = [r for run in runs for r in run["trl"]]
  fmt = lambda xs, d=3: ", ".join(f"{x:.{d}f}" for x in xs)  # noqa: E731
  mean = lambda rows, k: np.mean([r[k] for r in rows])  # noqa: E731
  steps = lambda rows, d=3: fmt([r["step"] for r in rows], d)  # noqa: E731
  per_run = "".join(f"- torch threads {run['threads']} (load average {run['load']}): TRL first step(s) "
                    f"(dropped) {steps(run['trl_first'], 2)} s; TRL steps {steps(run['trl'])}; ours steps "
                    f"{steps(run['ours'])}\n" for run in runs)
  return (
      f"# GRPO step benchmark: next_jax vs TRL GRPOTrainer\n\n"
      f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}\n"
      f"- command: `{cmd.strip()}`\n- machine: {machine()}, load average before the run "
      f"{args.load_before}\n- versions: {versions()}\n"
      f"- model: {'`' + args.preset + '`' if args.model else 'random Qwen2 `' + args.preset + '` preset'} "
      f"{dataclasses.asdict(cfg)}, {n_params:,} params, fp32; "
      f"LoRA r={args.rank} α={args.alpha:g} on all 7 projections ({n_lora:,} trainable)\n"
      f"- workload per step: {args.prompts} prompts × G={args.group} = {args.prompts * args.group} "
      f"completions of exactly {args.new_tokens} tokens (T=1), reward = digit fraction, GRPO advantages, "
      f"token-mean PPO-clip loss, one AdamW step (lr {args.lr:g}); per TRL run {args.steps} timed steps per "
      f"side after {args.warmup} warm-up, order: {args.order}; JAX uses all cores in every run\n\n"
      f"{table(args, runs)}\n"
      f"- next_jax first step: {ours_first['step']:.2f} s, of which JAX trace + lower + compile "
      f"{ours_first['compile_s']:.2f} s ({ours_first['compiles']} XLA compiles); XLA compiles during the "
      f"{len(ours)} timed steps: {sum(r['compiles'] for r in ours)}\n{per_run}"
      f"- sanity: mean reward ours {mean(ours, 'reward'):.3f} / TRL {mean(trl, 'reward'):.3f}; mean "
      f"completion length ours {mean(ours, 'len'):.1f} / TRL {mean(trl, 'len'):.1f} tokens\n"
      f"- sample = generate + decode + reward (+ TRL: advantages); update = the rest: forward/backward + "
      f"AdamW (ours: also the old-log-prob forward; TRL: also its per-step logging)\n"
      f"- on a shared, loaded machine torch with all cores (OpenMP barrier per op) slows down by up to ~50× "
      f"per step while ours does not: compare compute with the 1-thread run, or with the paired ratio on "
      f"a quiet machine\n")


# ------------------------------------------------------------------------------------------------ main


def show(tag: str, r: dict) -> None:
  print(f"  {tag}: {r['step']:.3f} s (sample {r['sample']:.3f}, update {r['update']:.3f})"
        + (f", compiles {r['compiles']}" if "compiles" in r else ""), flush=True)


def main(argv=None) -> list[dict]:
  args = parse_args(argv)
  args.load_before = " ".join(f"{x:.1f}" for x in os.getloadavg())
  warnings.filterwarnings("ignore")
  import torch  # noqa: PLC0415
  import transformers  # noqa: PLC0415

  threads = list(dict.fromkeys(int(x) for x in args.torch_threads.split(",")))
  torch.set_num_threads(threads[0])
  transformers.logging.set_verbosity_error()
  compiles = CompileLog()
  cfg = model_config(args)
  runs: list[dict] = []
  with tempfile.TemporaryDirectory() as tmp:
    if args.model:
      model_dir, cfg, params, tok = real_model.load(args.model)
      prompts = real_model.chat_prompts(tok, 8 * args.prompts, args.seed)
      longest = max(len(tok(text=q)["input_ids"]) for q in prompts)
      if longest > args.prompt_len:
        raise SystemExit(f"--prompt-len {args.prompt_len}: the chat prompts need {longest} tokens")
      args.preset = model_dir.name
    else:
      model_dir = toy.make_random_model_dir(Path(tmp) / "model", cfg, seed=args.seed)
      cfg, params, tok = hf.load_model(model_dir)
      prompts = make_prompts(tok, 8 * args.prompts, args.prompt_len, args.seed)
    ours = Ours(args, cfg, params, tok, prompts, compiles)
    n_params, n_lora = count_params(params), count_params(ours.state.train.params)
    print(f"model: {args.preset} {cfg}\n{n_params:,} params, {n_lora:,} LoRA; {machine()}; {versions()}",
          flush=True)

    print("next_jax: first step (trace + compile) ...", flush=True)
    ours_first = ours.step()
    for _ in range(args.warmup - 1):
      ours.step()
    print(f"  {ours_first['step']:.2f} s ({ours_first['compile_s']:.2f} s compiling)", flush=True)

    for n_threads in threads:
      torch.set_num_threads(n_threads)
      ours.rows = []
      if args.order == "sequential":
        for k in range(args.steps):
          show(f"ours step {k + 1}", ours.step())
      print(f"TRL (torch threads {n_threads}): {args.warmup} + {args.steps} steps, {args.order} ...",
            flush=True)
      trl_rows: list[dict] = []

      def after_trl_step(i, trl_rows=trl_rows):  # show TRL step i (0-based), then one of ours (interleaved)
        show(f"TRL step {i + 1}", trl_rows[i])
        if args.order == "interleaved" and i >= args.warmup:
          show(f"ours step {i + 1 - args.warmup}", ours.step())

      load0 = os.getloadavg()[0]
      t = build_trl(args, model_dir, tok, prompts, str(Path(tmp) / f"trl{n_threads}"), trl_rows,
                    after_trl_step)
      t.train()
      del t
      runs.append({"threads": n_threads, "load": f"{load0:.1f} → {os.getloadavg()[0]:.1f}", "ours": ours.rows,
                   "trl_first": trl_rows[:args.warmup], "trl": trl_rows[args.warmup:]})

  text = report(args, cfg, n_params, n_lora, ours_first, runs)
  print("\n" + text)
  if args.out:
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(f"wrote {args.out}")
  return runs


if __name__ == "__main__":
  main()
