"""End-to-end pipeline demo on a tiny random Qwen2: HF directory → load → chat prompts → sample → PEFT export.

Builds (once; cached under artifacts/demo_model/) a random Qwen2 HF directory with `toy.make_random_model_dir`
and loads it through `hf.load_model`, the same path a real Qwen2.5 directory takes. Then: chat-template two
prompts, sample G responses per prompt (temperature 1, top-p 0.95, stop at <|im_end|>) and greedy ones,
print the decoded text and tokens/s, and export a random LoRA as a PEFT adapter (artifacts/demo_adapter/).
The weights are random, so the text is noise: the demo shows the plumbing, not a model.

  python -m experiments.pipeline_demo [--model-dir DIR] [--samples 4] [--max-new-tokens 48] [--rebuild]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from next_jax.models import hf, peft_io, sampler, toy
from next_jax.models.policy import LoraConfig, ModelConfig, count_params, init_lora

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
# Qwen2 shape (GQA, qkv bias, untied head) at toy scale; vocab = the toy BPE tokenizer's 512 tokens.
DEMO_CONFIG = ModelConfig(vocab_size=512, hidden_size=256, intermediate_size=704, num_layers=4, num_heads=8,
                          num_kv_heads=2, dtype="float32")
CHATS = (
    [{"role": "system", "content": "You are a careful math assistant."},
     {"role": "user", "content": "Question: what is 3+4*5? Put the answer in \\boxed{}."}],
    [{"role": "user", "content": "Question: what is 14+22*7? Let me think."}],
)


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model-dir", type=Path, default=ARTIFACTS / "demo_model")
  p.add_argument("--adapter-dir", type=Path, default=ARTIFACTS / "demo_adapter")
  p.add_argument("--samples", type=int, default=4, help="G responses per prompt")
  p.add_argument("--max-new-tokens", type=int, default=48)
  p.add_argument("--rebuild", action="store_true", help="rebuild the cached random model directory")
  return p.parse_args(argv)


def ensure_model_dir(model_dir: Path, rebuild: bool) -> Path:
  """Reuse model_dir if it holds DEMO_CONFIG's weights and a tokenizer; otherwise (re)build it."""
  files = ("config.json", "model.safetensors", "tokenizer.json")
  if not rebuild and all((model_dir / f).exists() for f in files):
    if hf.load_config(model_dir) == DEMO_CONFIG:
      print(f"reusing {model_dir}")
      return model_dir
  t0 = time.perf_counter()
  toy.make_random_model_dir(model_dir, DEMO_CONFIG, seed=0)
  print(f"built random Qwen2 directory {model_dir} in {time.perf_counter() - t0:.1f} s")
  return model_dir


def encode_chats(tokenizer, chats) -> tuple[np.ndarray, np.ndarray, list[str]]:
  """Chat template → left-padded (int32[P, T] tokens, bool[P, T] mask) at a bucketed length, and the texts."""
  texts = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in chats]
  ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
  tokens, mask = sampler.pad_prompts(ids, pad_id=tokenizer.pad_token_id)
  return tokens, mask, texts


def timed_generate(label: str, params, tokens, mask, rng, **kw) -> sampler.SampleOutput:
  """Run generate twice (the first call compiles a new shape); print both times and real tokens/s."""
  t0 = time.perf_counter()
  jax.block_until_ready(sampler.generate(params, tokens, mask, rng, **kw))
  first = time.perf_counter() - t0
  t0 = time.perf_counter()
  out = jax.block_until_ready(sampler.generate(params, tokens, mask, rng, **kw))
  dt = time.perf_counter() - t0
  n_tok = int(out.mask.sum())
  print(f"\n[{label}] {out.tokens.shape[0]} rows × ≤{out.tokens.shape[1]} tokens: first call {first:.2f} s "
        f"(XLA compile if new), then {dt * 1e3:.0f} ms for {n_tok} tokens = {n_tok / dt:,.0f} tokens/s")
  return out


def show(tokenizer, out: sampler.SampleOutput, group: int, prompts: list[str]) -> None:
  """Decoded responses, grouped by prompt: length, summed log-prob, text (special tokens kept visible)."""
  tokens, mask = np.asarray(out.tokens), np.asarray(out.mask)
  logp = np.asarray((out.logprobs * out.mask).sum(axis=1))
  for i, row in enumerate(tokens):
    if i % group == 0:
      print(f"  prompt {i // group}: {prompts[i // group]!r}")
    text = tokenizer.decode(row[mask[i]].tolist(), skip_special_tokens=False)
    print(f"    #{i % group} len {int(mask[i].sum()):2d}  Σlogπ {logp[i]:8.2f}  {text!r}")


def export_adapter(cfg: ModelConfig, adapter_dir: Path, base: Path) -> None:
  """A random LoRA (B ≠ 0, so ΔW ≠ 0) → PEFT adapter directory, read back to check the round trip."""
  lcfg = LoraConfig(rank=8, alpha=16.0)
  lora = init_lora(cfg, lcfg, jax.random.key(1))
  lora = {m: {**f, "b": 0.01 * jax.random.normal(jax.random.key(2), f["b"].shape)} for m, f in lora.items()}
  peft_io.save_peft_adapter(adapter_dir, cfg, lora, lcfg, base_model_name_or_path=str(base))
  lcfg2, lora2 = peft_io.load_peft_adapter(adapter_dir, cfg)
  same = lcfg2 == lcfg and all(bool(jnp.array_equal(lora[m][k], lora2[m][k])) for m in lora for k in "ab")
  files = ", ".join(f"{p.name} ({p.stat().st_size / 1e3:.0f} kB)" for p in sorted(adapter_dir.iterdir()))
  print(f"\nexported a random rank-{lcfg.rank} LoRA on {list(lcfg.targets)} as a PEFT adapter:\n"
        f"  {adapter_dir}\n"
        f"  {files}; reloaded identically: {same}")


def main(argv=None) -> None:
  args = parse_args(argv)
  t_start = time.perf_counter()
  print("random weights: the text is noise; this demo shows the pipeline "
        "(HF dir → hf.load_model → chat template → sampler → PEFT export)\n")
  model_dir = ensure_model_dir(args.model_dir, args.rebuild)
  cfg, params, tokenizer = hf.load_model(model_dir)
  print(f"config: {cfg}\nparameters: {count_params(params):,}; tokenizer: {len(tokenizer)} tokens, "
        f"eos {tokenizer.eos_token!r}, pad {tokenizer.pad_token!r}; backend: {jax.devices()[0].platform}")

  tokens, mask, texts = encode_chats(tokenizer, CHATS)
  print(f"prompts: {len(texts)} chats → left-padded {tokens.shape[0]}×{tokens.shape[1]} "
        f"(real lengths {mask.sum(1).tolist()})")
  tokens, mask = jnp.asarray(tokens), jnp.asarray(mask)
  kw = dict(cfg=cfg, max_new_tokens=args.max_new_tokens, stop_ids=(tokenizer.eos_token_id,),
            pad_id=tokenizer.pad_token_id)
  rng = jax.random.key(0)
  g = args.samples
  out = timed_generate(f"sample G={g}, temperature 1.0, top-p 0.95", params, tokens, mask, rng,
                       num_samples=g, temperature=1.0, top_p=0.95, **kw)
  show(tokenizer, out, g, texts)
  # temperature is a traced value: greedy reuses the program compiled above (its G rows per prompt agree).
  out = timed_generate(f"greedy, same compiled program (G={g} identical rows per prompt)", params, tokens,
                       mask, rng, num_samples=g, temperature=0.0, top_p=1.0, **kw)
  first = jax.tree.map(lambda x: x[::g], out)
  show(tokenizer, first, 1, texts)
  same = bool((out.tokens == jnp.repeat(first.tokens, g, axis=0)).all())
  print(f"  greedy rows identical within each group: {same}")

  export_adapter(cfg, args.adapter_dir, model_dir)
  print(f"\nrandom weights: the text is noise; this demo shows the pipeline. "
        f"Total {time.perf_counter() - t_start:.1f} s.")


if __name__ == "__main__":
  main()
