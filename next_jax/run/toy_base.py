"""The toy base model the RL experiments start from: a character-level Qwen2 ("S": d 64, 2 layers) SFT'd on
`arith` with noisy answers, so that RL starts from a low but non-zero accuracy (TOY_NOTES).

Task: tasks.make_task("arith") with ArithSpec's defaults (TOY_NOTES: "a+b*c=", a, b ∈ 0–99, c ∈ 0–9, answers
zero-padded to 3 digits) and raw prompts (format_prompt(raw=True)): "12+34*5=" → "182" <|im_end|>. The
tokenizer is `toy.build_char_tokenizer`: one token per character, loaded by AutoTokenizer as Qwen2Tokenizer.

SFT, one fixed shape: rows = left-padded prompt ++ response (answer ++ eos, right-padded), int32[B, P + R];
    loss = Σ_t m_t · −log p(y_{t+1} | x_≤t) / Σ_t m_t,   m_t = 1 iff x_{t+1} is a response token,
where y is x with every answer digit replaced, with probability corrupt_p, by a uniform random digit (the
model reads the clean x unless corrupt_inputs; noisy targets alone learn ~2× faster per step here). The
blurred answer distribution keeps sampled accuracy well below greedy — TOY_NOTES found that a base SFT'd on
clean data does not improve under GRPO, while one SFT'd with p = 0.3 does. A calibrated model puts at most
1 − 0.9·p = 0.73 on each correct digit, so sampled accuracy ≲ 0.73³ ≈ 0.39 × the share of problems it knows.

Evaluation: n_test held-out problems (split "test") through sampler.generate + rewards.exact_reward, greedy
and at temperature 1, on the params and tokenizer read back from the saved directory by hf.load_model.

Output: an HF directory (config.json, model.safetensors, tokenizer files) and toy_base.json {settings,
results}, written atomically. The same settings give the same bytes; a directory whose toy_base.json holds
the same settings is reused (force=True rebuilds).

  python -m next_jax.cli.toy_base --out=artifacts/toy_base [--seed=0] [--steps=N] [--force]
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from next_jax.core.metrics import progress
from next_jax.models import hf, toy
from next_jax.models.policy import (
  ModelConfig,
  Params,
  count_params,
  forward,
  init_params,
  token_logprobs,
)
from next_jax.models.sampler import generate, pad_prompts
from next_jax.rl import data, rewards, tasks
from next_jax.rl.trainer import OptimConfig, make_optimizer

ALPHABET = "0123456789+-*="  # digits, the operators ArithSpec can draw, and the prompt's trailing "="
MODELS = {  # TOY_NOTES' sizes (Llama-style there; Qwen2 here: + q/k/v biases)
    "S": dict(hidden_size=64, intermediate_size=176, num_layers=2, num_heads=4, num_kv_heads=4),
    "M": dict(hidden_size=128, intermediate_size=336, num_layers=2, num_heads=4, num_kv_heads=4),
}
META_FILE = "toy_base.json"
EVAL_PROMPT_LEN = 16  # sampler bucket the prompts are left-padded to at evaluation
VERSION = 1  # bump when the build changes in a way the settings do not show


@dataclasses.dataclass(frozen=True)
class ToyBaseSettings:
  """Everything the weights depend on (toy_base.json["settings"]; a cached build must match it exactly)."""

  seed: int = 0
  steps: int = 3000
  batch_size: int = 128
  lr: float = 3e-3
  warmup_steps: int = 100
  min_lr_ratio: float = 0.1  # cosine decay from lr to min_lr_ratio·lr over `steps`
  weight_decay: float = 0.01
  corrupt_p: float = 0.3
  corrupt_inputs: bool = False  # the model also reads the corrupted digits (else: only targets are noisy)
  model: str = "S"
  n_train: int = 50_000
  n_test: int = 2048
  test_seed: int = 0  # the test problems do not depend on the build seed: builds are comparable

  def __post_init__(self):
    if self.model not in MODELS:
      raise ValueError(f"ToyBaseSettings.model={self.model!r}; choose from {sorted(MODELS)}")
    if not 0.0 <= self.corrupt_p <= 1.0:
      raise ValueError(f"ToyBaseSettings.corrupt_p={self.corrupt_p}: need 0 ≤ p ≤ 1")
    if min(self.steps, self.batch_size, self.n_train, self.n_test) < 1:
      raise ValueError(f"ToyBaseSettings: steps, batch_size, n_train and n_test must be ≥ 1 ({self})")

  def to_json(self) -> dict[str, Any]:
    """The settings as toy_base.json stores them (with the task spec and the build version)."""
    task = dataclasses.asdict(tasks.ArithSpec())
    return json.loads(json.dumps({**dataclasses.asdict(self), "task": "arith", "task_spec": task,
                                  "alphabet": ALPHABET, "model_dims": MODELS[self.model],
                                  "version": VERSION}))


# ------------------------------------------------------------------------------------------------ data


def char_encoder(tok, check: Sequence[str] = ()) -> Callable[[str], list[int]]:
  """text → token ids by a per-character table read off `tok` (one token per character, by construction of
  toy.build_char_tokenizer): 50k prompts in ~0.1 s instead of seconds. Asserts agreement with
  tok(text, add_special_tokens=False) on the texts in `check`."""
  table = {c: tok.encode(c, add_special_tokens=False)[0] for c in ALPHABET}
  enc = lambda text: [table[c] for c in text]  # noqa: E731
  for text in check:
    if enc(text) != tok(text, add_special_tokens=False)["input_ids"]:
      raise AssertionError(f"char table and tokenizer disagree on {text!r}")
  return enc


def make_sft_arrays(problems, tok) -> dict[str, np.ndarray]:
  """Rows = left-padded prompt [P] ++ response [R] = answer ++ eos, right-padded (P, R: the longest).

  Returns tokens int32[N, P+R], mask bool[N, P+R] (real tokens), response bool[N, P+R] (answer + eos)."""
  texts = [data.format_prompt(p, raw=True) for p in problems]
  enc = char_encoder(tok, check=texts[:256] + [p.answer for p in problems[:256]])
  prompts = [enc(t) for t in texts]
  answers = [enc(p.answer) + [tok.eos_token_id] for p in problems]
  p_len, r_len = max(map(len, prompts)), max(map(len, answers))
  tokens, mask = pad_prompts(prompts, tok.pad_token_id, p_len)
  resp = np.full((len(problems), r_len), tok.pad_token_id, np.int32)
  rmask = np.zeros((len(problems), r_len), bool)
  for i, a in enumerate(answers):
    resp[i, :len(a)], rmask[i, :len(a)] = a, True
  return {"tokens": np.concatenate([tokens, resp], 1), "mask": np.concatenate([mask, rmask], 1),
          "response": np.concatenate([np.zeros_like(mask), rmask], 1)}


def model_config(settings: ToyBaseSettings, vocab_size: int) -> ModelConfig:
  return ModelConfig(vocab_size=vocab_size, **MODELS[settings.model], rope_theta=10_000.0, qkv_bias=True,
                     tie_embeddings=False, max_position_embeddings=64, dtype="float32")


# ----------------------------------------------------------------------------------------------- train


@functools.lru_cache(maxsize=4)
def _optimizer(oc: OptimConfig):
  """One optimiser object per OptimConfig: the jitted step takes it as a static argument (compile once)."""
  return make_optimizer(oc)


def optim_config(s: ToyBaseSettings) -> OptimConfig:
  return OptimConfig(lr=s.lr, warmup_steps=s.warmup_steps, schedule="cosine", decay_steps=s.steps,
                     min_lr_ratio=s.min_lr_ratio, weight_decay=s.weight_decay, b1=0.9, b2=0.99, grad_clip=1.0)


def corrupt_digits(tokens, response, digit_ids, key, p):
  """Each response digit → a uniform random digit with probability p. tokens int32[B, T]; digit_ids [10]."""
  flip_key, digit_key = jax.random.split(key)
  flip = response & jnp.isin(tokens, digit_ids) & (jax.random.uniform(flip_key, tokens.shape) < p)
  random_digits = digit_ids[jax.random.randint(digit_key, tokens.shape, 0, digit_ids.shape[0])]
  return jnp.where(flip, random_digits, tokens)


def sft_loss(params, inputs, targets, mask, response, cfg: ModelConfig):
  """Mean −log p(target) over response targets: inputs[:, :-1] → targets[:, 1:], weights response[:, 1:]."""
  logits, _ = forward(params, inputs[:, :-1], cfg, mask=mask[:, :-1])
  weights = response[:, 1:].astype(jnp.float32)
  nll = -token_logprobs(logits, targets[:, 1:])
  return jnp.sum(nll * weights) / jnp.maximum(jnp.sum(weights), 1.0)


@functools.partial(jax.jit, static_argnames=("cfg", "tx"), donate_argnums=(0, 1))
def train_step(params, opt_state, batch, digit_ids, key, corrupt_p, corrupt_inputs, *, cfg, tx):
  """One AdamW step on a corrupted batch {tokens, mask, response} → (params, opt_state, loss)."""
  targets = corrupt_digits(batch["tokens"], batch["response"], digit_ids, key, corrupt_p)
  inputs = jnp.where(corrupt_inputs, targets, batch["tokens"])
  loss, grads = jax.value_and_grad(sft_loss)(params, inputs, targets, batch["mask"], batch["response"], cfg)
  updates, opt_state = tx.update(grads, opt_state, params)
  params = jax.tree.map(lambda p, u: p + u, params, updates)
  return params, opt_state, loss


def train(s: ToyBaseSettings, cfg: ModelConfig, arrays: dict[str, np.ndarray], digit_ids: np.ndarray,
          show_progress: bool = True) -> tuple[Params, list[list[float]]]:
  """SFT for s.steps steps over the train rows in data.batch_at order → (params, [[step, loss], …])."""
  key = jax.random.key(s.seed)
  params = jax.jit(init_params, static_argnums=0)(cfg, jax.random.fold_in(key, 0))  # one compile, not ~40
  tx = _optimizer(optim_config(s))
  opt_state = tx.init(params)
  data_key, digit_ids = jax.random.fold_in(key, 1), jnp.asarray(digit_ids, jnp.int32)
  n, cursor, curve = len(arrays["tokens"]), 0, []
  bar = progress(s.steps, desc="toy base SFT", disable=None if show_progress else True)
  for step in range(s.steps):
    rows, cursor = data.batch_at(range(n), cursor, s.batch_size, s.seed)
    batch = {k: v[np.asarray(rows)] for k, v in arrays.items()}
    key_t = jax.random.fold_in(data_key, step)
    params, opt_state, loss = train_step(params, opt_state, batch, digit_ids, key_t, s.corrupt_p,
                                         s.corrupt_inputs, cfg=cfg, tx=tx)
    if step % 100 == 0 or step == s.steps - 1:
      curve.append([step, float(loss)])
      bar.set_postfix(loss=f"{curve[-1][1]:.3f}")
    bar.update(1)
  bar.close()
  return params, curve


# -------------------------------------------------------------------------------------------- evaluate


def evaluate(cfg: ModelConfig, params: Params, tok, problems, *, temperature: float, seed: int = 0,
             chunk: int = 1024, max_new_tokens: int = 8) -> tuple[float, list[dict[str, str]]]:
  """Exact-match accuracy of one response per problem (temperature 0 = greedy) → (accuracy, examples).

  Problems go in equal chunks of min(chunk, len(problems)) (the last padded with repeats, ignored) so
  generate compiles once."""
  correct, examples, chunk = [], [], min(chunk, len(problems))
  for start in range(0, len(problems), chunk):
    part = list(problems[start:start + chunk])
    n_real = len(part)
    part += [part[-1]] * (chunk - n_real)
    texts = [data.format_prompt(p, raw=True) for p in part]
    prompts, pmask = pad_prompts(tok(texts, add_special_tokens=False)["input_ids"], tok.pad_token_id,
                                 EVAL_PROMPT_LEN)
    out = generate(params, prompts, pmask, jax.random.fold_in(jax.random.key(seed), start), cfg=cfg,
                   max_new_tokens=max_new_tokens, temperature=temperature, stop_ids=(tok.eos_token_id,),
                   pad_id=tok.pad_token_id)
    toks, mask = np.asarray(out.tokens), np.asarray(out.mask)
    outs = tok.batch_decode([toks[i][mask[i]].tolist() for i in range(n_real)], skip_special_tokens=True)
    correct += [rewards.exact_reward(t, p.answer) for t, p in zip(outs, part)]
    examples += [{"prompt": p.prompt, "answer": p.answer, "response": t} for t, p in zip(outs[:4], part)]
  return float(np.mean(correct)), examples[:4]


# ------------------------------------------------------------------------------------------------ build


def _cached(out_dir: Path, settings: dict[str, Any]) -> bool:
  """out_dir holds a complete build (weights, config, tokenizer) whose toy_base.json has these settings."""
  meta = out_dir / META_FILE
  if not all((out_dir / f).exists() for f in ("config.json", "model.safetensors", "tokenizer.json")):
    return False
  try:
    return json.loads(meta.read_text()).get("settings") == settings
  except (OSError, json.JSONDecodeError):
    return False


def _publish(staged: Path, out_dir: Path) -> None:
  """Swap the staged directory in; out_dir is never half-written (the old one is moved aside first)."""
  old = None
  if out_dir.exists():
    old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
    os.replace(out_dir, old)
  os.replace(staged, out_dir)
  if old is not None:
    shutil.rmtree(old, ignore_errors=True)


def _build(staged: Path, s: ToyBaseSettings, show_progress: bool) -> dict[str, Any]:
  """Train, save to `staged`, evaluate the saved directory → the results dict."""
  t0 = time.perf_counter()
  tok = toy.build_char_tokenizer(ALPHABET)
  train_set = tasks.make_task("arith", s.n_train, s.seed, split="train")
  test_set = tasks.make_task("arith", s.n_test, s.test_seed, split="test")
  cfg = model_config(s, len(tok))
  digit_ids = np.asarray(tok.convert_tokens_to_ids(list("0123456789")), np.int32)
  t1 = time.perf_counter()
  params, curve = train(s, cfg, make_sft_arrays(train_set, tok), digit_ids, show_progress)
  jax.block_until_ready(params)
  t2 = time.perf_counter()
  hf.save_model(staged, cfg, params, tokenizer=tok)
  cfg2, params2, tok2 = hf.load_model(staged)  # evaluate what was written, through the public loader
  greedy, greedy_examples = evaluate(cfg2, params2, tok2, test_set, temperature=0.0, seed=s.test_seed)
  sampled, sampled_examples = evaluate(cfg2, params2, tok2, test_set, temperature=1.0, seed=s.test_seed)
  t3 = time.perf_counter()
  return {"greedy_accuracy": greedy, "sampled_accuracy": sampled, "n_test": s.n_test,
          "param_count": count_params(params), "final_loss": curve[-1][1], "loss_curve": curve,
          "setup_seconds": round(t1 - t0, 2), "train_seconds": round(t2 - t1, 2),
          "eval_seconds": round(t3 - t2, 2), "wall_seconds": round(t3 - t0, 2),
          "vocab_size": len(tok), "eos_id": tok.eos_token_id, "pad_id": tok.pad_token_id,
          "examples": {"greedy": greedy_examples, "sampled": sampled_examples},
          "versions": {"jax": jax.__version__, "backend": jax.default_backend()}}


def build_toy_base(out_dir: str | os.PathLike, seed: int = 0, steps: int | None = None, *,
                   force: bool = False, show_progress: bool = True, **overrides: Any) -> Path:
  """Build (or reuse) the toy base HF directory at out_dir → its Path.

  seed, steps and overrides (any other ToyBaseSettings field: batch_size, lr, corrupt_p, model, n_train,
  n_test, …) fix the settings; an out_dir whose toy_base.json holds the same settings is returned as is
  unless force. The build happens in a temporary sibling directory that replaces out_dir only when done."""
  out_dir = Path(out_dir)
  fields = {"seed": seed, **({"steps": steps} if steps is not None else {}), **overrides}
  settings = ToyBaseSettings(**fields)
  meta_settings = settings.to_json()
  if not force and _cached(out_dir, meta_settings):
    return out_dir
  out_dir.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
  try:
    staged = tmp / "model"
    results = _build(staged, settings, show_progress)
    (staged / META_FILE).write_text(json.dumps({"settings": meta_settings, "results": results}, indent=2))
    _publish(staged, out_dir)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return out_dir
