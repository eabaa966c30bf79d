"""Run by tests/test_sharding.py in a fresh interpreter with 8 forced host devices: a tiny model on one device
vs the same model sharded data=2 × fsdp=2 × tensor=2. Prints one JSON object of observations."""

import json
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

jax.config.update("jax_default_matmul_precision", "highest")

from next_jax.core import sharding  # noqa: E402
from next_jax.core.checkpoint import Checkpointer  # noqa: E402
from next_jax.models import policy, sampler  # noqa: E402
from next_jax.nxt import rank1  # noqa: E402
from next_jax.rl import grpo, trainer  # noqa: E402

CFG = policy.ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                         num_kv_heads=2, rope_theta=10_000.0, tie_embeddings=False, dtype="float32")
LCFG = policy.LoraConfig(rank=4, alpha=8.0)
MESH_SHAPE = dict(data=2, fsdp=2, tensor=2)


def inputs():
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda x: np.asarray(x), policy.init_params(CFG, jax.random.PRNGKey(0)))
  lora = policy.init_lora(CFG, LCFG, jax.random.PRNGKey(1))
  lora = {m: {"a": np.asarray(f["a"]), "b": rng.normal(0, 0.1, f["b"].shape).astype(np.float32)}
          for m, f in lora.items()}
  tokens = rng.integers(0, CFG.vocab_size, (8, 12)).astype(np.int32)
  mask = np.arange(12)[None] >= rng.integers(0, 6, (8, 1))  # left padding, 7..12 real tokens
  return params, lora, tokens, mask


def rl_batch(tokens, mask):
  rng = np.random.default_rng(1)
  loss_mask = mask[:, 1:] & (np.arange(11)[None] >= 6)
  return grpo.Batch(tokens=tokens, mask=mask, loss_mask=loss_mask,
                    advantages=(rng.normal(size=(8, 11)) * loss_mask).astype(np.float32),
                    sampler_logprobs=np.full((8, 11), -2.0, np.float32))


@jax.jit
def logits_fn(params, lora, tokens, mask):
  return policy.forward(params, tokens, CFG, mask=mask, lora=lora, lora_cfg=LCFG)[0]


def run(params, lora, tokens, mask, mesh):
  """Logits, two GRPO updates (LoRA and full), greedy + sampled tokens; placed on `mesh` when given."""
  tx = trainer.make_optimizer(trainer.OptimConfig(lr=1e-2, eps=1e-4))  # eps ≫ |grad noise|: stable steps
  put = (lambda t: sharding.shard(t, mesh)) if mesh is not None else (lambda t: jax.tree.map(jnp.asarray, t))
  batch = rl_batch(tokens, mask)
  batch = sharding.shard_batch(batch, mesh) if mesh is not None else batch
  params, lora = put(params), put(lora)
  toks = sharding.shard_batch(tokens, mesh) if mesh is not None else tokens
  msk = sharding.shard_batch(mask, mesh) if mesh is not None else mask
  out = {}
  with sharding.use_mesh(mesh):
    out["logits"] = np.asarray(logits_fn(params, lora, toks, msk))
    lc = grpo.LossConfig(micro_batch_size=4)  # two accumulated micro-batches of 4 rows
    lstate, _ = grpo.grpo_update(grpo.TrainState.create(lora, tx), params, batch, cfg=CFG, lora_cfg=LCFG,
                                 loss_cfg=lc)
    fstate, _ = grpo.grpo_update(grpo.TrainState.create(params, tx), params, batch, cfg=CFG, lora_cfg=None,
                                 loss_cfg=lc)
    gen = lambda temp: sampler.generate(  # noqa: E731
        params, toks[:4], msk[:4], jax.random.PRNGKey(3), cfg=CFG, lora=lora, lora_cfg=LCFG,
        max_new_tokens=6, num_samples=2, temperature=temp)
    out["greedy"], out["sampled"] = np.asarray(gen(0.0).tokens), np.asarray(gen(1.0).tokens)
  out["lora_after"] = jax.tree.map(np.asarray, lstate.params)
  out["full_after"] = jax.tree.map(np.asarray, fstate.params)
  out["states"] = (lstate, fstate)
  return out


def max_diff(a, b):
  return max(float(np.abs(x - y).max()) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def spec_of(x):
  return [list(e) if isinstance(e, tuple) else e for e in x.sharding.spec]


def rank1_check(lora, mesh):
  """Factored triplets of a batch of LoRA products from factors sharded on the 3-axis mesh, via pmap."""
  p, q = lora["gate"]["b"], lora["gate"]["a"]  # [L, F, r], [L, r, D]
  single = rank1.batched_factored_triplets(jnp.asarray(p), jnp.asarray(q), 2.0, devices="vmap")
  placed = sharding.shard({"gate": {"b": p, "a": q}}, mesh)["gate"]
  sp, sq = placed["b"], placed["a"]
  multi = rank1.batched_factored_triplets(sp, sq, 2.0, devices="pmap")
  return {"rank1_sigma_diff": float(np.abs(np.asarray(multi.sigma) - np.asarray(single.sigma)).max()),
          "rank1_u_diff": float(np.abs(np.asarray(multi.u) - np.asarray(single.u)).max()),
          "rank1_sigma": float(np.asarray(single.sigma).max()),
          "rank1_input_spec": spec_of(sp)}


def checkpoint_check(state):
  """Orbax save of a sharded TrainState, restored into the same template: values and shardings kept."""
  with tempfile.TemporaryDirectory() as d:
    ckpt = Checkpointer(d)
    ckpt.save(1, state, {"step": 1})
    restored, _ = ckpt.restore(state)
    ckpt.close()
  host = lambda t: jax.tree.map(np.asarray, t)  # noqa: E731
  return {"ckpt_diff": max_diff(host(state.params), host(restored.params)),
          "ckpt_spec": spec_of(restored.params["layers"]["q"]["kernel"]),
          "ckpt_mu_spec": spec_of(restored.opt_state[1][0].mu["layers"]["q"]["kernel"])}


def main():
  t0 = time.time()
  params, lora, tokens, mask = inputs()
  mesh = sharding.make_mesh(**MESH_SHAPE)
  one = run(params, lora, tokens, mask, None)
  t1 = time.time()
  many = run(params, lora, tokens, mask, mesh)
  t2 = time.time()
  lstate, fstate = many["states"]
  m = mask.astype(bool)
  obs = {"device_count": jax.device_count(),
         "logits_max_abs": float(np.abs(one["logits"][m]).max()),
         "logits_diff": float(np.abs(one["logits"] - many["logits"])[m].max()),
         "lora_moved": max_diff(one["lora_after"], jax.tree.map(np.asarray, lora)),
         "lora_update_diff": max_diff(one["lora_after"], many["lora_after"]),
         "full_moved": max_diff(one["full_after"], params),
         "full_update_diff": max_diff(one["full_after"], many["full_after"]),
         "greedy_equal": bool((one["greedy"] == many["greedy"]).all()),
         "sampled_equal": bool((one["sampled"] == many["sampled"]).all()),
         "sampled_distinct_rows": len({tuple(r) for r in one["sampled"]}),
         "q_kernel_after_spec": spec_of(fstate.params["layers"]["q"]["kernel"]),
         "q_kernel_shard": list(fstate.params["layers"]["q"]["kernel"].addressable_shards[0].data.shape),
         "down_kernel_after_spec": spec_of(fstate.params["layers"]["down"]["kernel"]),
         "adam_mu_q_spec": spec_of(fstate.opt_state[1][0].mu["layers"]["q"]["kernel"]),
         "lora_q_b_after_spec": spec_of(lstate.params["q"]["b"]),
         **rank1_check(lora, mesh), **checkpoint_check(fstate)}
  obs["seconds"] = [t1 - t0, t2 - t1, time.time() - t2]
  print(json.dumps(obs))


if __name__ == "__main__":
  sys.exit(main())
