"""The unit every task, data file and benchmark yields, and what is done with it: `Problem`, its split,
a deterministic cursor-based data order, loaders for math data files, named benchmarks, prompt formatting.

    Problem(prompt, answer, task, verifier, id)    answer: the ground truth for rewards.REWARDS[verifier]

Splits: a problem's split is a hash of its content (`split_of`), independent of any seed.

Data order: the dataset is a tuple of Problems; the training state holds one integer cursor (problems
consumed so far). Epoch e visits the problems in `epoch_order(n, seed, e)`; `batch_at(ds, cursor, B, seed)`
returns the next B problems (crossing epoch boundaries) and cursor + B, so a resumed run sees the same data.

Files (`load_problems(path, format="auto")`; .jsonl, .json array, .parquet with pyarrow installed):
    verl     {"prompt": [{"role": "user", "content": …}], "reward_model": {"ground_truth": …},
              "data_source": …, "extra_info": {"index": …}}
             (DAPO-Math-17k; its released parquet repeats each problem many times: duplicates are dropped)
    flat     {"prompt": str, "answer" | "solution": str}
    gsm8k    {"question", "answer": "… #### 42"}
    math     {"problem" | "question", "answer": the final answer (string or number)}, or
             {"problem", "solution" (last \\boxed{} is the answer)}: MATH, and the evaluation sets in
             ../shared/data/math_eval (AIME, AMC23 with JSON-float answers 27.0, Minerva, OlympiadBench and
             GSM8K test as {"problem", "answer": "18"}); a "question" + "answer" row is gsm8k only when its
             answer holds "####"

Benchmarks (`load_benchmark(name, data_dir=None)`): BENCHMARKS maps a name (aime24, aime25, amc23, math500,
minerva, olympiadbench, gsm8k) to its file under the math-eval data directory, its verifier and its prompt
instruction; `register_benchmark` adds one. The directory is `data_dir`, else $NEXT_JAX_MATH_EVAL, else
../shared/data/math_eval beside the checkout (`math_eval_dir`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from next_jax.rl import rewards

SPLITS = ("train", "test")
TEST_FRACTION = 0.1  # share of each synthetic task's problem space that belongs to the test split
DEFAULT_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
FORMATS = ("auto", "verl", "flat", "gsm8k", "math")


@dataclasses.dataclass(frozen=True)
class Problem:
  """One verifiable problem. `answer` is the ground truth passed to `rewards.REWARDS[verifier]`."""

  prompt: str
  answer: str
  task: str
  verifier: str
  id: str
  system: str = ""  # a system message that came with the problem (verl files), used by format_prompt
  solution: str = ""  # a reference solution when known (synthetic tasks, GSM8K/MATH rationales)


def _hash01(text: str) -> float:
  """A uniform number in [0, 1) fixed by the text: sha256's first 8 bytes / 2^64."""
  return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2.0 ** 64


def split_of(task: str, key: str, test_fraction: float = TEST_FRACTION) -> str:
  """'test' iff hash01(task|key) < test_fraction: a function of the content alone (not of any seed)."""
  return "test" if _hash01(f"{task}|{key}") < test_fraction else "train"


# ------------------------------------------------------------------------------------------ data order


@functools.lru_cache(maxsize=8)
def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
  """Read-only permutation of range(n) for one epoch: default_rng((seed, epoch)).permutation(n)."""
  if n < 1 or seed < 0 or epoch < 0:
    raise ValueError(f"epoch_order(n={n}, seed={seed}, epoch={epoch}): need n ≥ 1, seed ≥ 0, epoch ≥ 0")
  order = np.random.default_rng((seed, epoch)).permutation(n)
  order.setflags(write=False)
  return order


def batch_at(dataset: Sequence[Problem], cursor: int, batch_size: int,
             seed: int) -> tuple[list[Problem], int]:
  """(the batch_size problems at positions cursor … cursor+B−1 of the endless epoch sequence, cursor+B).

  Position c is dataset[epoch_order(n, seed, c // n)[c % n]]: every epoch visits each problem once."""
  n = len(dataset)
  if n == 0:
    raise ValueError("batch_at: empty dataset")
  if cursor < 0 or batch_size < 1:
    raise ValueError(f"batch_at: cursor={cursor} must be ≥ 0 and batch_size={batch_size} ≥ 1")
  out, c = [], cursor
  while len(out) < batch_size:
    epoch, offset = divmod(c, n)
    take = min(batch_size - len(out), n - offset)
    out.extend(dataset[int(i)] for i in epoch_order(n, seed, epoch)[offset:offset + take])
    c += take
  return out, c


def hash_split(problems: Sequence[Problem], test_fraction: float = TEST_FRACTION
               ) -> tuple[tuple[Problem, ...], tuple[Problem, ...]]:
  """(train, test) of a loaded file by a hash of each prompt (split_of): stable across runs and orderings."""
  where = [split_of(p.task, p.prompt, test_fraction) for p in problems]
  return (tuple(p for p, s in zip(problems, where) if s == "train"),
          tuple(p for p, s in zip(problems, where) if s == "test"))


# --------------------------------------------------------------------------------------------- loaders


def _read_rows(path: Path) -> Iterator[tuple[str, dict]]:
  """(location, row) pairs; location names the line ("line 3") or row ("row 3") for error messages."""
  suffix = path.suffix.lower()
  if suffix in (".pkl", ".pickle", ".pt", ".pth", ".bin", ".npy", ".npz", ".joblib"):
    raise ValueError(f"{path}: pickled/binary data files are never loaded (loading a pickle runs code); "
                     "convert it once to JSONL or parquet, e.g. `pandas.read_pickle(p).to_json(out, "
                     "orient='records', lines=True)`")
  if suffix == ".parquet":
    try:
      import pyarrow.parquet as pq  # noqa: PLC0415
    except ImportError as e:
      raise ImportError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from e
    try:
      batches = pq.ParquetFile(path).iter_batches(batch_size=4096)
    except Exception as e:  # noqa: BLE001 - pyarrow raises ArrowInvalid, OSError, … for a foreign file
      raise ValueError(f"{path}: not a readable parquet file ({type(e).__name__}: {e})") from None
    i = 0
    for batch in batches:
      for row in batch.to_pylist():
        i += 1
        yield f"row {i}", row
    return
  if suffix == ".json":
    raw = path.read_bytes()
    try:
      data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
      line = raw[:e.start].count(b"\n") + 1
      raise ValueError(f"{path}: line {line}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
    except ValueError as e:  # e.g. an integer of more than 4300 digits
      raise ValueError(f"{path}: unreadable JSON value ({e})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
      data = data["data"]
    if not isinstance(data, list):
      raise ValueError(f"{path}: expected a JSON array of rows (or JSON lines in a .jsonl file)")
    for i, row in enumerate(data, 1):
      yield f"row {i}", row
    return
  with path.open("rb") as f:
    for i, data in enumerate(f, 1):
      try:
        line = data.decode("utf-8")
      except UnicodeDecodeError as e:
        raise ValueError(f"{path}: line {i}: not UTF-8 text (byte {e.start} of the line: {e.reason})") from None
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}: line {i}: invalid JSON: {e.msg}") from None
      except ValueError as e:  # e.g. an integer of more than 4300 digits
        raise ValueError(f"{path}: line {i}: unreadable JSON value ({e})") from None
      yield f"line {i}", row


def _detect_format(row: dict) -> str:
  if "reward_model" in row:
    return "verl"
  if "question" in row and "answer" in row and "####" in str(row["answer"]):
    return "gsm8k"
  if "problem" in row or ("question" in row and "answer" in row):
    return "math"
  if "prompt" in row and ("answer" in row or "solution" in row):
    return "flat"
  raise ValueError(f"cannot tell the format from the fields {sorted(row)}; pass format= one of {FORMATS[1:]}")


def _field(row: dict, name: str) -> Any:
  if name not in row:
    raise KeyError(name)
  if row[name] is None:
    raise ValueError(f"field {name!r} is null")
  return row[name]


def check_answer(answer: str) -> None:
  """A ground truth must be a non-empty string that is not NaN or ±inf (which a verifier would match)."""
  if not answer:
    raise ValueError("the ground truth is empty")
  try:
    value = float(answer)
  except (ValueError, OverflowError):
    return
  if not math.isfinite(value):
    raise ValueError(f"the ground truth is {answer!r}, not a finite number")


def _text(value: Any, name: str) -> str:
  if isinstance(value, bool) or not isinstance(value, (str, int, float)):
    raise ValueError(f"field {name!r} must be a string or number, got {type(value).__name__}")
  return str(value).strip()


def _row_verl(row: dict) -> dict[str, str]:
  prompt, system = _field(row, "prompt"), ""
  if isinstance(prompt, (list, tuple)):
    users = [m.get("content", "") for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
    systems = [m.get("content", "") for m in prompt if isinstance(m, dict) and m.get("role") == "system"]
    if not users:
      raise ValueError("field 'prompt' has no message with role 'user'")
    prompt, system = users[-1], (systems[0] if systems else "")
  rm = _field(row, "reward_model")
  if not isinstance(rm, dict):
    raise ValueError(f"field 'reward_model' must be a mapping, got {type(rm).__name__}")
  out = {"prompt": _text(prompt, "prompt"), "answer": _text(_field(rm, "ground_truth"), "ground_truth"),
         "system": _text(system, "system"), "task": str(row.get("data_source") or "verl")}
  index = (row.get("extra_info") or {}).get("index") if isinstance(row.get("extra_info"), dict) else None
  if index is not None:
    out["id"] = str(index)
  return out


def _row_flat(row: dict) -> dict[str, str]:
  prompt = _text(_field(row, "prompt"), "prompt")
  if row.get("answer") is not None or "solution" not in row:
    return {"prompt": prompt, "answer": _text(_field(row, "answer"), "answer"), "task": "flat"}
  solution = _text(_field(row, "solution"), "solution")
  return {"prompt": prompt, "answer": rewards.last_boxed(solution) or solution, "solution": solution,
          "task": "flat"}


def _row_gsm8k(row: dict) -> dict[str, str]:
  prompt = _text(_field(row, "question"), "question")
  text = _text(_field(row, "answer"), "answer")
  if "####" not in text:
    raise ValueError("field 'answer' has no '#### <number>' line")
  rationale, final = text.rsplit("####", 1)
  final = final.strip().replace(",", "")
  if not final:
    raise ValueError("field 'answer' has nothing after '####'")
  return {"prompt": prompt, "answer": final, "solution": rationale.strip(), "task": "gsm8k"}


def _row_math(row: dict) -> dict[str, str]:
  name = "problem" if "problem" in row or "question" not in row else "question"
  prompt = _text(_field(row, name), name)
  solution = _text(row["solution"], "solution") if row.get("solution") is not None else ""
  if row.get("answer") is not None:
    answer = _text(row["answer"], "answer")
  else:
    answer = rewards.last_boxed(_text(_field(row, "solution"), "solution"))
    if answer is None:
      raise ValueError("no 'answer' field and no \\boxed{} in field 'solution'")
  return {"prompt": prompt, "answer": answer, "solution": solution, "task": "math"}


_ROW_READERS = {"verl": _row_verl, "flat": _row_flat, "gsm8k": _row_gsm8k, "math": _row_math}


def load_problems(path: str | os.PathLike, format: str = "auto", limit: int | None = None,
                  dedupe: bool = True, verifier: str = "math",
                  max_prompt_chars: int | None = None, task: str | None = None) -> tuple[Problem, ...]:
  """Problems from a local .jsonl / .json / .parquet file in one of FORMATS (module docstring).

  format="auto" decides from the first row's fields. dedupe drops rows whose (prompt, answer) was seen
  (DAPO-Math-17k's released parquet repeats each problem many times). ids: the row's extra_info.index, else
  "<file stem>:<row number>". Errors name the file, the line/row and the missing or bad field. A ground
  truth that is empty, NaN or ±inf is refused (check_answer); so is a prompt longer than max_prompt_chars
  characters (a bound that keeps one huge row from being tokenized at all). task: every row's Problem.task
  (default: the format's, or a verl row's data_source)."""
  path = Path(path)
  if format not in FORMATS:
    raise ValueError(f"format={format!r}; expected one of {FORMATS}")
  if verifier not in rewards.REWARDS:
    raise ValueError(f"verifier={verifier!r}; known: {sorted(rewards.REWARDS)}")
  if not path.is_file():
    raise FileNotFoundError(f"no such data file: {path}")
  out, seen, fmt = [], set(), None if format == "auto" else format
  for where, row in _read_rows(path):
    if not isinstance(row, dict):
      raise ValueError(f"{path}: {where}: expected an object with fields, got {type(row).__name__}")
    try:
      fmt = fmt or _detect_format(row)
      fields = _ROW_READERS[fmt](row)
      check_answer(fields["answer"])
      if max_prompt_chars is not None and len(fields["prompt"]) > max_prompt_chars:
        raise ValueError(f"the prompt has {len(fields['prompt']):,} characters, more than the limit of "
                         f"{max_prompt_chars:,}")
    except KeyError as e:
      raise ValueError(f"{path}: {where}: missing field {e.args[0]!r} (format {fmt!r}; row has "
                       f"{sorted(row)})") from None
    except ValueError as e:
      raise ValueError(f"{path}: {where}: {e}") from None
    if dedupe and (fields["prompt"], fields["answer"]) in seen:
      continue
    seen.add((fields["prompt"], fields["answer"]))
    fields.setdefault("id", f"{path.stem}:{where.split()[-1]}")
    if task is not None:
      fields["task"] = task
    out.append(Problem(verifier=verifier, **fields))
    if limit is not None and len(out) >= limit:
      break
  if not out:
    raise ValueError(f"{path}: no rows")
  return tuple(out)


# ------------------------------------------------------------------------------------------ benchmarks


MATH_EVAL_ENV = "NEXT_JAX_MATH_EVAL"  # environment variable naming the math-eval data directory
_SHARED_MATH_EVAL = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "math_eval"


@dataclasses.dataclass(frozen=True)
class Benchmark:
  """A named evaluation set: `file` under the math-eval data directory (or an absolute path), the
  verifier that scores it and the instruction appended to each problem (format_prompt)."""

  name: str
  file: str
  verifier: str = "math"
  instruction: str = DEFAULT_INSTRUCTION


BENCHMARKS: dict[str, Benchmark] = {}


def register_benchmark(name: str, file: str, verifier: str = "math",
                       instruction: str = DEFAULT_INSTRUCTION) -> None:
  """Add (or replace) the benchmark `name`; a config then names it in eval.benchmarks."""
  BENCHMARKS[name] = Benchmark(name, file, verifier, instruction)


for _name in ("aime24", "aime25", "amc23", "math500", "minerva", "olympiadbench", "gsm8k"):
  register_benchmark(_name, f"{_name}.jsonl")


def math_eval_dir(data_dir: str | os.PathLike | None = None) -> Path:
  """The math-eval data directory: data_dir, else $NEXT_JAX_MATH_EVAL, else ../shared/data/math_eval
  beside the checkout. Raises FileNotFoundError saying how to point at one when it does not exist."""
  where = ("the data_dir setting (eval.data_dir)" if data_dir else
           f"${MATH_EVAL_ENV}" if os.environ.get(MATH_EVAL_ENV) else f"the default {_SHARED_MATH_EVAL.resolve()}")
  path = Path(data_dir or os.environ.get(MATH_EVAL_ENV) or _SHARED_MATH_EVAL).expanduser().resolve()
  if not path.is_dir():
    raise FileNotFoundError(f"math-eval data directory {path} (from {where}) does not exist; point "
                            f"--config.eval.data_dir or ${MATH_EVAL_ENV} at a directory holding "
                            f"{', '.join(sorted(b.file for b in BENCHMARKS.values()))}")
  return path


def benchmark_path(name: str, data_dir: str | os.PathLike | None = None) -> Path:
  """The file of benchmark `name` (BENCHMARKS) under math_eval_dir(data_dir)."""
  if name not in BENCHMARKS:
    raise ValueError(f"unknown benchmark {name!r}; known: {sorted(BENCHMARKS)} (or register_benchmark)")
  bench = BENCHMARKS[name]
  if Path(bench.file).is_absolute():
    return Path(bench.file)
  return math_eval_dir(data_dir) / bench.file


def subset(problems: Sequence[Problem], limit: int, seed: int = 0) -> list[Problem]:
  """A fixed subset of `limit` problems (0: all), drawn without replacement by default_rng(seed), kept in
  file order (the evaluate command's --limit, the trainer's eval.limit)."""
  if not limit or limit >= len(problems):
    return list(problems)
  keep = np.sort(np.random.default_rng(seed).choice(len(problems), size=limit, replace=False))
  return [problems[i] for i in keep]


def load_benchmark(name: str, data_dir: str | os.PathLike | None = None,
                   limit: int | None = None) -> tuple[Problem, ...]:
  """The rows of benchmark `name` as Problems (task = name, the benchmark's verifier, ids "<file
  stem>:<line>"), every row kept (no dedupe: a benchmark's size is its row count)."""
  bench = BENCHMARKS.get(name)
  path = benchmark_path(name, data_dir)
  if not path.is_file():
    raise FileNotFoundError(f"benchmark {name!r}: no file {path}; point --config.eval.data_dir or "
                            f"${MATH_EVAL_ENV} at a directory holding {bench.file}")
  return load_problems(path, limit=limit, dedupe=False, verifier=bench.verifier, task=name)


# ------------------------------------------------------------------------------------------ formatting


def format_prompt(problem: Problem, tokenizer: Any = None, system: str | None = None,
                  instruction: str | None = DEFAULT_INSTRUCTION, raw: bool = False) -> str:
  """The text the policy continues.

  raw=True: the bare problem.prompt ("12+34*5=", for the character-level toy models). Otherwise
  content = prompt + "\\n" + instruction (instruction=None/"" to omit: DAPO prompts carry their own) and,
  when the tokenizer has a chat template, apply_chat_template([system?, user: content],
  add_generation_prompt=True, tokenize=False); without one, "[system\\n\\n]Question: content\\nAnswer:".
  system defaults to problem.system.
  """
  if raw:
    return problem.prompt
  content = f"{problem.prompt}\n{instruction}" if instruction else problem.prompt
  system = problem.system if system is None else system
  if tokenizer is not None and getattr(tokenizer, "chat_template", None):
    messages = ([{"role": "system", "content": system}] if system else []) + \
        [{"role": "user", "content": content}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
  return (f"{system}\n\n" if system else "") + f"Question: {content}\nAnswer:"


def format_prompts(problems: Sequence[Problem], tokenizer: Any = None, **kwargs: Any) -> list[str]:
  """format_prompt over a batch (same keyword arguments)."""
  return [format_prompt(p, tokenizer, **kwargs) for p in problems]
