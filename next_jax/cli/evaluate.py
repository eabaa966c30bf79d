"""Evaluate a model on named math benchmarks (data.BENCHMARKS): avg@k, pass@k, mean response length,
the share truncated at the token limit, a table like the paper's, and one JSONL row per sample.

    next-jax-evaluate --model=smollm2-135m-instruct --benchmarks=gsm8k,math500 --samples=4 \
        --max_new_tokens=512 --limit=64 --out=evals/smollm2
    next-jax-evaluate --config=qwen25_paper:size=7B --model=/data/Qwen2.5-7B-Instruct \
        --out=evals/qwen25_7b                        # the config's eval.benchmarks / samples / tokens
    next-jax-evaluate --model=/data/Qwen2.5-1.5B-Instruct --adapter=runs/x/adapter ...
    next-jax-evaluate --run=runs/default --step=150 --benchmarks=gsm8k --out=evals/run150

--model: an HF directory, a .gguf file or a packaged name (model_files.resolve); --adapter: a PEFT LoRA
directory applied on top; --run: a run's workdir, evaluated as its checkpoint at --step (default: the latest)
holds it (base weights moved by jumps, LoRA or full weights; `experiment.restore`), its model from the run's
model.dir unless --model names where it is now. Prompt: the tokenizer's chat template over [system?, user:
problem + "\\n" + instruction], instruction = the benchmark's (default "Please reason step by step, and put
your final answer within \\boxed{}."); --instruction replaces it. --limit n: a fixed subset of n problems per
benchmark, drawn with --subset_seed and kept in file order. Settings not given come from --config's eval
section (eval.benchmarks, eval.samples, eval.temperature, eval.limit, eval.data_dir, eval.max_new_tokens, else
rollout.max_new_tokens), rollout.top_p and model.dir, else the defaults below.

Metrics per benchmark, over P problems with k samples each, reward r ∈ {0, 1}:
    avg@k = mean over all P·k samples of r          pass@k = mean over problems of 1[max_j r_j = 1]
    length = mean response tokens (the stop token included)
    truncated = share of samples that reached max_new_tokens without a stop token
Avg (the table's last column) = the unweighted mean over benchmarks, as the paper averages.

Output (--out, a directory next_jax owns, outdir.check_out): settings.json, <benchmark>.jsonl (rows:
benchmark, id, sample, response, extracted, answer, reward, length, truncated), summary.json, table.md.
Resumable by rows: a rerun with the same settings keeps the rows of every finished chunk and samples the
rest (chunk i draws with fold_in(key(seed, benchmark), first problem of the chunk), so a resumed run gives
the rows an uninterrupted one would); other settings are refused, naming the field, unless --overwrite.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from next_jax.core import outdir
from next_jax.rl import data, rewards

PROMPT_NOTE = "chat template + problem + '\\n' + instruction"


@dataclasses.dataclass(frozen=True)
class EvalSettings:
  """Everything that decides the rows; a resume must match it field by field (data_dir excepted)."""

  model: str
  benchmarks: tuple[str, ...]
  adapter: str = ""
  run: str = ""  # a run's workdir: its checkpoint at `step` (0: the latest) is the policy
  step: int = 0
  samples: int = 8
  temperature: float = 1.0
  top_p: float = 1.0
  max_new_tokens: int = 4096
  instruction: str | None = None  # None: each benchmark's own
  system: str = ""
  limit: int = 0  # 0: every problem
  subset_seed: int = 0
  seed: int = 0
  chunk: int = 8  # problems per sampler call
  dtype: str = ""

  def check(self) -> None:
    """One ValueError naming the first bad field."""
    if not self.model and not self.run:
      raise ValueError("--model: give an HF directory, a .gguf file or a packaged name (or --run)")
    if self.run and self.adapter:
      raise ValueError(f"--adapter={self.adapter!r}: a run's checkpoint (--run) holds its own adapter")
    if not self.benchmarks:
      raise ValueError("benchmarks: name at least one of " + ", ".join(sorted(data.BENCHMARKS)))
    unknown = [b for b in self.benchmarks if b not in data.BENCHMARKS]
    if unknown:
      raise ValueError(f"benchmarks: unknown {unknown}; known: {sorted(data.BENCHMARKS)}")
    for name in ("samples", "max_new_tokens", "chunk"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name}={getattr(self, name)}: must be ≥ 1")
    if self.limit < 0 or self.temperature < 0 or not 0 < self.top_p <= 1:
      raise ValueError(f"limit={self.limit}, temperature={self.temperature}, top_p={self.top_p}: need "
                       "limit ≥ 0, temperature ≥ 0, 0 < top_p ≤ 1")


# ------------------------------------------------------------------------------------------- metrics


def summarize(rows: Sequence[dict], samples: int) -> dict[str, float]:
  """avg@k, pass@k, mean length, truncated share over rows grouped k per problem (module docstring)."""
  r = np.asarray([row["reward"] for row in rows], np.float64).reshape(-1, samples)
  return {"problems": int(r.shape[0]), "samples": samples, f"avg@{samples}": float(r.mean()),
          f"pass@{samples}": float((r > 0.5).any(axis=1).mean()),
          "length": float(np.mean([row["length"] for row in rows])),
          "truncated": float(np.mean([row["truncated"] for row in rows]))}


def label(settings: EvalSettings) -> str:
  """The table's name for the policy: the model's, or the run's with its step."""
  if settings.run:
    return f"{Path(settings.run).name}@{settings.step or 'latest'}"
  return Path(settings.model).name


def table(summaries: dict[str, dict], samples: int, label: str = "model") -> str:
  """The paper's layout: one column per benchmark + Avg; rows avg@k, pass@k (in %), length, truncated."""
  names = list(summaries)
  head = f"| {label} | " + " | ".join(names) + " | Avg |"
  lines = [head, "|---|" + "---:|" * (len(names) + 1)]
  for key, scale, fmt in ((f"avg@{samples}", 100, "{:.1f}"), (f"pass@{samples}", 100, "{:.1f}"),
                          ("length", 1, "{:.0f}"), ("truncated", 100, "{:.1f}")):
    vals = [summaries[n][key] * scale for n in names]
    unit = " (%)" if scale == 100 else " (tokens)"
    lines.append(f"| {key}{unit} | " + " | ".join(fmt.format(v) for v in vals) +
                 f" | {fmt.format(float(np.mean(vals)))} |")
  return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------- rows


def read_rows(path: Path, samples: int, chunk: int, problems: int) -> list[dict]:
  """The rows of every finished chunk in a benchmark's JSONL of `problems` problems (a torn last line or a
  partial chunk, left by a kill, is dropped)."""
  rows = []
  if path.is_file():
    for line in path.read_text(encoding="utf-8").splitlines():
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError:
        break
  if len(rows) >= problems * samples:
    return rows[:problems * samples]
  return rows[:len(rows) // (samples * chunk) * samples * chunk]


def _write_text(path: Path, text: str) -> None:
  """Replace `path` atomically (tmp file + rename)."""
  tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
  tmp.write_text(text, encoding="utf-8")
  os.replace(tmp, path)


def prepare_out(out: str | os.PathLike, settings: EvalSettings, overwrite: bool = False) -> Path:
  """Check OUT (outdir.check_out), start it or resume it: an OUT we wrote with the same settings is
  resumed; other settings are refused naming the field unless overwrite (then it starts over)."""
  out = Path(out)
  outdir.check_out(out, name="--out", flag="--overwrite", overwrite=overwrite)
  mine = dataclasses.asdict(settings)
  old_file = out / "settings.json"
  if out.is_dir() and any(out.iterdir()):
    old = json.loads(old_file.read_text()) if old_file.is_file() else {}
    old["benchmarks"] = tuple(old.get("benchmarks", ()))
    changed = [k for k in mine if old.get(k) != mine[k]]
    if changed and not overwrite:
      k = changed[0]
      raise outdir.OutputError(f"--out {out} holds an evaluation with other settings ({k}: {old.get(k)!r} "
                               f"there, {mine[k]!r} now); choose a new --out, or pass --overwrite")
    if changed:
      shutil.rmtree(out)
  out.mkdir(parents=True, exist_ok=True)
  outdir._mark(out, complete=False)
  _write_text(old_file, json.dumps(mine, indent=2) + "\n")
  return out


# ------------------------------------------------------------------------------------------ sampling


@dataclasses.dataclass(frozen=True)
class Policy:
  """A loaded model: config, params, optional LoRA, tokenizer, and the ids the sampler needs."""

  cfg: Any
  params: Any
  tokenizer: Any
  lora: Any = None
  lora_cfg: Any = None

  @property
  def pad_id(self) -> int:
    tok = self.tokenizer
    return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

  @property
  def stop_ids(self) -> tuple[int, ...]:
    tok = self.tokenizer
    return tuple(sorted(i for i in {tok.eos_token_id, tok.pad_token_id} if i is not None))


def load_policy(model: str, adapter: str = "", dtype: str = "", run: str = "", step: int = 0) -> Policy:
  """model_files.resolve(model) → hf.load_model; a PEFT adapter directory on top when given. With `run`,
  the run's checkpoint at `step` (0: the latest) instead, its model from `model` when given."""
  from next_jax.models import hf, model_files, peft_io  # noqa: PLC0415

  if run:
    from next_jax.rl import trained  # noqa: PLC0415
    from next_jax.run import experiment  # noqa: PLC0415
    exp, state, _ = experiment.restore(run, step or None, model or None)
    params, kw = trained.policy_args(state.base_params, state.rl.train.params, exp.setup.lora_cfg)
    return Policy(exp.setup.cfg, params, exp.tokenizer, kw.get("lora"), kw.get("lora_cfg"))
  cfg, params, tok = hf.load_model(model_files.resolve(model), dtype=dtype or None)
  if not adapter:
    return Policy(cfg, params, tok)
  lora_cfg, lora = peft_io.load_peft_adapter(adapter, cfg)
  return Policy(cfg, params, tok, lora, lora_cfg)


def sample_rows(policy: Policy, problems: Sequence[data.Problem], settings: EvalSettings, key,
                instruction: str) -> list[dict]:
  """settings.samples responses to each problem (one sampler call; the list is padded to settings.chunk
  with repeats, so every call has one shape), scored by each problem's verifier → rows, k per problem."""
  import jax  # noqa: PLC0415

  from next_jax.models import sampler  # noqa: PLC0415

  tok, k = policy.tokenizer, settings.samples
  part = list(problems) + [problems[-1]] * (settings.chunk - len(problems))
  texts = [data.format_prompt(p, tok, system=settings.system or None, instruction=instruction) for p in part]
  ids = tok(texts, add_special_tokens=False)["input_ids"]
  tokens, mask = sampler.pad_prompts(ids, policy.pad_id)
  lora_kw = {"lora": policy.lora, "lora_cfg": policy.lora_cfg} if policy.lora is not None else {}
  out = sampler.generate(policy.params, tokens, mask, key, cfg=policy.cfg, **lora_kw,
                         max_new_tokens=settings.max_new_tokens, num_samples=k,
                         temperature=settings.temperature, top_p=settings.top_p, stop_ids=policy.stop_ids,
                         pad_id=policy.pad_id)
  out_tokens, out_mask = np.asarray(jax.device_get(out.tokens)), np.asarray(jax.device_get(out.mask))
  rows = []
  for i in range(len(problems) * k):
    p, resp = problems[i // k], out_tokens[i][out_mask[i]].tolist()
    text = tok.decode(resp, skip_special_tokens=True)
    stopped = bool(resp) and resp[-1] in policy.stop_ids
    rows.append({"benchmark": p.task, "id": p.id, "sample": i % k, "response": text,
                 "extracted": rewards.extract_answer(text), "answer": p.answer,
                 "reward": float(rewards.get_reward(p.verifier)(text, p.answer)), "length": len(resp),
                 "truncated": not stopped and len(resp) >= settings.max_new_tokens})
  return rows


def evaluate_benchmark(policy: Policy, name: str, settings: EvalSettings, out: Path, data_dir=None,
                       bar=None) -> dict[str, float]:
  """Rows of benchmark `name` appended to out/<name>.jsonl chunk by chunk (resuming after the finished
  chunks), then its summary."""
  import jax  # noqa: PLC0415

  problems = data.subset(data.load_benchmark(name, data_dir), settings.limit, settings.subset_seed)
  instruction = data.BENCHMARKS[name].instruction if settings.instruction is None else settings.instruction
  path, k, c = out / f"{name}.jsonl", settings.samples, settings.chunk
  rows = read_rows(path, k, c, len(problems))
  _write_text(path, "".join(json.dumps(r) + "\n" for r in rows))  # drop a torn tail before appending
  bench_key = jax.random.fold_in(jax.random.PRNGKey(settings.seed), zlib.crc32(name.encode()) & 0x7FFFFFFF)
  if bar is not None:
    bar.update(len(rows) // k)
  with path.open("a", encoding="utf-8") as f:
    for start in range(len(rows) // k, len(problems), c):
      new = sample_rows(policy, problems[start:start + c], settings, jax.random.fold_in(bench_key, start),
                        instruction)
      f.write("".join(json.dumps(r) + "\n" for r in new))
      f.flush()
      rows += new
      if bar is not None:
        bar.update(len(new) // k)
  return summarize(rows, k)


def run(settings: EvalSettings, out: str | os.PathLike, data_dir=None, overwrite: bool = False,
        progress: bool = True) -> dict[str, dict]:
  """Evaluate on every benchmark of `settings` into OUT (module docstring) → {benchmark: summary}."""
  from next_jax.core import metrics  # noqa: PLC0415

  settings.check()
  sizes = {n: len(data.subset(data.load_benchmark(n, data_dir), settings.limit, settings.subset_seed))
           for n in settings.benchmarks}  # every file read (and every name checked) before any work
  out = prepare_out(out, settings, overwrite)
  with outdir.lock(outdir.lock_path(out), str(out)):
    policy = load_policy(settings.model, settings.adapter, settings.dtype, settings.run, settings.step)
    bar = metrics.progress(total=sum(sizes.values()), desc="evaluate (problems)",
                           disable=None if progress else True)
    summaries = {n: evaluate_benchmark(policy, n, settings, out, data_dir, bar) for n in settings.benchmarks}
    bar.close()
    _write_text(out / "summary.json", json.dumps(
        {"settings": dataclasses.asdict(settings), "prompt": PROMPT_NOTE, "benchmarks": summaries},
        indent=2) + "\n")
    _write_text(out / "table.md", table(summaries, settings.samples, label(settings)))
    outdir._mark(out, complete=True)
  return summaries


# ------------------------------------------------------------------------------------------ command


def _define_flags():
  from absl import flags  # noqa: PLC0415
  from ml_collections import config_flags  # noqa: PLC0415

  config_flags.DEFINE_config_file("config", None, "optional experiment config file[:arg]: eval.* defaults")
  flags.DEFINE_string("model", None, "HF directory, .gguf file or packaged name (smollm2-135m-instruct)")
  flags.DEFINE_string("adapter", "", "a PEFT LoRA adapter directory applied on the model")
  flags.DEFINE_string("run", "", "a run's workdir: evaluate its checkpoint (--step) instead of --model")
  flags.DEFINE_integer("step", 0, "the --run checkpoint's step (0: the latest)")
  flags.DEFINE_list("benchmarks", None, f"names from {sorted(data.BENCHMARKS)}")
  flags.DEFINE_integer("samples", None, "samples per problem k (avg@k, pass@k); default 8")
  flags.DEFINE_float("temperature", None, "sampling temperature; default 1.0")
  flags.DEFINE_float("top_p", None, "nucleus top-p; default 1.0")
  flags.DEFINE_integer("max_new_tokens", None, "new tokens per response; default 4096")
  flags.DEFINE_string("instruction", None, "replaces each benchmark's instruction ('' for none)")
  flags.DEFINE_string("system", "", "a system message")
  flags.DEFINE_integer("limit", None, "a fixed seeded subset of this many problems per benchmark (0: all)")
  flags.DEFINE_integer("subset_seed", 0, "seed of the --limit subset")
  flags.DEFINE_integer("seed", 0, "sampling seed")
  flags.DEFINE_integer("chunk", 8, "problems per sampler call")
  flags.DEFINE_string("dtype", "", "float32 | bfloat16 ('' = config.json's)")
  flags.DEFINE_string("data_dir", None, f"the math-eval files (default ${data.MATH_EVAL_ENV}, else "
                      "../shared/data/math_eval)")
  flags.DEFINE_string("out", None, "output directory (next_jax-owned; resumed when the settings match)")
  flags.DEFINE_bool("overwrite", False, "replace an --out that holds other settings or someone else's files")
  flags.DEFINE_bool("progress", True, "show the progress bar")


def settings_from_flags(FLAGS) -> tuple[EvalSettings, str | None]:
  """EvalSettings from the flags, falling back to --config's eval / rollout / model fields, then defaults."""
  c = FLAGS.config

  def pick(flag, fields, default):
    """The flag; else the first set config field of `fields` (0 counts as unset for token budgets)."""
    value = getattr(FLAGS, flag)
    if value is not None:
      return value
    for field in ((fields,) if isinstance(fields, str) else fields) if c is not None else ():
      node = c
      for part in field.split("."):
        node = node[part]
      if node not in ("", (), None) and not (field.endswith("max_new_tokens") and node == 0):
        return node
    return default

  s = EvalSettings(model=pick("model", "model.dir", ""), adapter=FLAGS.adapter, run=FLAGS.run, step=FLAGS.step,
                   benchmarks=tuple(pick("benchmarks", "eval.benchmarks", ())),
                   samples=pick("samples", "eval.samples", 8),
                   temperature=pick("temperature", "eval.temperature", 1.0),
                   top_p=pick("top_p", "rollout.top_p", 1.0),
                   max_new_tokens=pick("max_new_tokens", ("eval.max_new_tokens", "rollout.max_new_tokens"), 4096),
                   instruction=FLAGS.instruction, system=FLAGS.system, limit=pick("limit", "eval.limit", 0),
                   subset_seed=FLAGS.subset_seed, seed=FLAGS.seed, chunk=FLAGS.chunk, dtype=FLAGS.dtype)
  return s, pick("data_dir", "eval.data_dir", None)


def main(argv) -> None:
  del argv
  from absl import flags  # noqa: PLC0415

  from next_jax.models.hf import CheckpointError  # noqa: PLC0415

  FLAGS = flags.FLAGS
  try:
    settings, data_dir = settings_from_flags(FLAGS)
    if not FLAGS.out:
      raise ValueError("--out: give an output directory")
    summaries = run(settings, FLAGS.out, data_dir, FLAGS.overwrite, FLAGS.progress)
  except (ValueError, FileNotFoundError, CheckpointError) as e:
    sys.exit(f"error: {e}")
  print(table(summaries, settings.samples, label(settings)), end="")
  print(f"rows and summary: {FLAGS.out}")


def cli() -> None:
  """The console script `next-jax-evaluate`."""
  from absl import app

  _define_flags()
  app.run(main)


if __name__ == "__main__":
  cli()
