"""NExt's trajectory predictor (MatrixPredict), one per shape group, trained with Optax.

Rows: every u vector (length m), v vector (length n) and σ of every trained matrix is a row. Rows are
grouped as the official code groups them, by the shape of the tensor they come from (`group_key`): u is a
column (m, 1) → group "m;1", v a row (1, n) → "1;n", σ → "1;1"; so a u and a v of the same length are in
different groups. Each group has its own predictor; within a group the rows are a batch of independent
samples. For row x the predictor maps (x of rank1(G_i), x of rank1(L_i)) → x of rank1(T_i).

MatrixPredict(dim), hidden width H = 256, PyTorch default Linear init (W, b ~ U(±1/√fan_in)):
    E_G, E_L : Linear(dim,H) → Linear(H,dim) → ReLU → Linear(dim,H) → Linear(H,dim)
    D        : Linear(2dim,H) → Linear(H,2dim) → ReLU → Linear(2dim,H) → Linear(H,dim)
    π(g, l)  = D([E_G(g), E_L(l)])
Loss (official): Σ_entries |π(g,l) − t| / #training snapshots (L2 optional). AdamW(lr 2e-5, wd 0.01,
β 0.9/0.999), cosine decay to 0.1·lr over 1000 full-batch epochs, the epoch loop in `lax.scan`.
Ablations drop a branch: use_global/use_local=False feed zeros in place of that encoder's output.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import optax

from next_jax.core import config
from next_jax.nxt.rank1 import Triplet

_NXT_PREDICTOR = config.defaults("nxt.predictor")  # every default below is the schema's (config.base)


@dataclasses.dataclass(frozen=True)
class PredictorConfig:
  hidden: int = _NXT_PREDICTOR.hidden
  epochs: int = _NXT_PREDICTOR.epochs
  lr: float = _NXT_PREDICTOR.lr
  weight_decay: float = _NXT_PREDICTOR.weight_decay
  final_lr_ratio: float = _NXT_PREDICTOR.final_lr_ratio  # cosine decays lr to this fraction of lr over `epochs`
  loss: str = _NXT_PREDICTOR.loss  # "l1" (official) | "l2"
  use_global: bool = _NXT_PREDICTOR.use_global  # ablation "w/o global delta" when False
  use_local: bool = _NXT_PREDICTOR.use_local  # ablation "w/o local delta" when False
  # > S: pad the S training snapshots to this many, with weight 0, so trajectories of different lengths
  # share one compiled program (the post-hoc back-test); same loss and gradients up to summation order,
  # which Adam amplifies slowly (measured: 8e-5 relative on the loss after 1000 epochs at the paper's lr)
  pad_snapshots: int = 0
  # Linear(a,H) → Linear(H,b) with no nonlinearity between is x·(W₀W₁) + (b₀W₁ + b₁): the same function,
  # computed through the a×b product wherever that needs fewer FLOPs, a·b·(H + N) < N·H·(a + b) for N rows
  # (`_pair`). Different summation order, so Adam drifts apart slowly (measured on the toy's dim-64 group
  # after 1000 epochs at the paper's lr: loss 8e-5 relative, predictions 4e-3 absolute on a 0.1 scale).
  reassociate: bool = _NXT_PREDICTOR.reassociate

  def __post_init__(self):
    if self.loss not in ("l1", "l2"):
      raise ValueError(f"PredictorConfig.loss={self.loss!r}; choose 'l1' or 'l2'")
    if not (self.use_global or self.use_local):
      raise ValueError("PredictorConfig: use_global and use_local cannot both be False")


# ------------------------------------------------------------------------------------------- network


def _linear(key, n_in: int, n_out: int):
  """torch.nn.Linear default init: kaiming_uniform(a=√5) ⇒ W ~ U(±1/√n_in); b ~ U(±1/√n_in)."""
  kw, kb = jax.random.split(key)
  bound = 1.0 / math.sqrt(n_in)
  return {"w": jax.random.uniform(kw, (n_in, n_out), jnp.float32, -bound, bound),
          "b": jax.random.uniform(kb, (n_out,), jnp.float32, -bound, bound)}


def _block(key, widths):
  """Four Linears with widths [w0 → w1 → w2 → w3 → w4]."""
  keys = jax.random.split(key, 4)
  return [_linear(k, widths[i], widths[i + 1]) for i, k in enumerate(keys)]


def init_matrix_predict(key: jax.Array, dim: int, hidden: int = 256):
  kg, kl, kd = jax.random.split(key, 3)
  return {"enc_g": _block(kg, [dim, hidden, dim, hidden, dim]),
          "enc_l": _block(kl, [dim, hidden, dim, hidden, dim]),
          "dec": _block(kd, [2 * dim, hidden, 2 * dim, hidden, dim])}


def _pair(p0, p1, x, reassociate: bool):
  """Linear(a,H) then Linear(H,b): (x·W₀ + b₀)·W₁ + b₁, or x·(W₀W₁) + (b₀W₁ + b₁) when reassociating
  and a·b·(H + N) < N·H·(a + b) (forward + backward FLOPs of each order, N = rows of x)."""
  (a, hid), b, n = p0["w"].shape, p1["w"].shape[1], math.prod(x.shape[:-1])
  if reassociate and a * b * (hid + n) < n * hid * (a + b):
    return x @ (p0["w"] @ p1["w"]) + (p0["b"] @ p1["w"] + p1["b"])
  return (x @ p0["w"] + p0["b"]) @ p1["w"] + p1["b"]


def _run_block(layers, x, reassociate: bool = False):
  """Linear → Linear → ReLU → Linear → Linear (the official layer order: one ReLU per sub-network)."""
  return _pair(layers[2], layers[3], jax.nn.relu(_pair(layers[0], layers[1], x, reassociate)), reassociate)


def apply_matrix_predict(params, g: jax.Array, l: jax.Array, use_global: bool = True,
                         use_local: bool = True, reassociate: bool = False) -> jax.Array:
  """π(g, l) = D([E_G(g), E_L(l)]). g, l: [..., dim] → [..., dim]."""
  eg = _run_block(params["enc_g"], g, reassociate) if use_global else jnp.zeros_like(g)
  el = _run_block(params["enc_l"], l, reassociate) if use_local else jnp.zeros_like(l)
  return _run_block(params["dec"], jnp.concatenate([eg, el], axis=-1), reassociate)


# ------------------------------------------------------------------------------------------ training


def predictor_loss(params, g, l, t, cfg: PredictorConfig, w=None):
  """Σ_entries |π(g,l) − t| (or squared) / S. g, l, t: [S, R, dim] (S training snapshots, R rows);
  with snapshot weights w [S] (0 = padding): Σ_s w_s Σ_entries|…| / Σ_s w_s."""
  err = apply_matrix_predict(params, g, l, cfg.use_global, cfg.use_local, cfg.reassociate) - t
  per = jnp.abs(err) if cfg.loss == "l1" else err * err
  if w is None:
    return per.sum() / g.shape[0]
  return (per.sum((1, 2)) * w).sum() / w.sum()


def make_optimizer(cfg: PredictorConfig) -> optax.GradientTransformation:
  sched = optax.cosine_decay_schedule(cfg.lr, cfg.epochs, alpha=cfg.final_lr_ratio)
  return optax.adamw(sched, b1=0.9, b2=0.999, eps=1e-8, weight_decay=cfg.weight_decay)


def epoch_step(tx: optax.GradientTransformation, g, l, t, cfg: PredictorConfig, w=None):
  """One full-batch AdamW epoch as a scan body: ((params, opt_state), _) → ((params', opt_state'), loss
  before the step). Also what experiments/bench/extrapolate_overhead counts the FLOPs of."""
  grad_fn = jax.value_and_grad(predictor_loss)

  def epoch(carry, _):
    p, s = carry
    loss, grads = grad_fn(p, g, l, t, cfg, w)
    updates, s = tx.update(grads, s, p)
    return (optax.apply_updates(p, updates), s), loss

  return epoch


@functools.partial(jax.jit, static_argnames=("cfg",))
def train_predictor(key: jax.Array, g: jax.Array, l: jax.Array, t: jax.Array, cfg: PredictorConfig,
                    w: jax.Array | None = None):
  """Full-batch training of one MatrixPredict: cfg.epochs optimiser steps in one `lax.scan`.

  g, l, t: fp32[S, R, dim], w: optional snapshot weights [S] → (params, losses fp32[epochs]: the loss
  *before* each step)."""
  params = init_matrix_predict(key, g.shape[-1], cfg.hidden)
  tx = make_optimizer(cfg)
  (params, _), losses = jax.lax.scan(epoch_step(tx, g, l, t, cfg, w), (params, tx.init(params)), None,
                                     length=cfg.epochs)
  return params, losses


# ------------------------------------------------------------------------------------ rows ↔ matrices


def group_key(field: str, length: int) -> str:
  """The official code's predictor key: the shape of the tensor a row comes from, "rows;cols".
  σ → "1;1"; u, a column (m, 1) → "m;1"; v, a row (1, n) → "1;n"; a raw 1-D delta of length d (faithful
  mode: biases, norms) is unsqueezed to (d, 1) → "d;1", the u group of its length."""
  if field == "sigma":
    return "1;1"
  return f"1;{length}" if field == "v" else f"{length};1"


def group_order(key: str) -> tuple[int, str]:
  """Sort key of the groups (and so of their predictor seeds): by vector length, then u before v."""
  return max(int(x) for x in key.split(";")), key


def to_rows(triplets: dict[str, Triplet]) -> tuple[dict[str, jax.Array], list[tuple[str, str, str, int]]]:
  """{module: Triplet with leading [S, L]} → ({group key: [S, R, dim]}, layout).

  layout: (module, field ∈ {sigma,u,v}, group key, offset into that group's R axis), in a deterministic
  order, so `from_rows` can split predictions back."""
  groups: dict[str, list[jax.Array]] = {}
  layout = []
  for name in sorted(triplets):
    t = triplets[name]
    for field, x in (("sigma", t.sigma[..., None]), ("u", t.u), ("v", t.v)):
      key = group_key(field, x.shape[-1])
      offset = sum(a.shape[1] for a in groups.get(key, []))
      groups.setdefault(key, []).append(x)
      layout.append((name, field, key, offset))
  return {k: jnp.concatenate(xs, axis=1) for k, xs in groups.items()}, layout


def from_rows(rows: dict[str, jax.Array], layout, num_layers: dict[str, int]) -> dict[str, Triplet]:
  """Inverse of `to_rows` for predictions: {group key: [S, R, dim]} → {module: Triplet [S, L, ...]}."""
  fields: dict[str, dict[str, jax.Array]] = {}
  for name, field, key, offset in layout:
    x = rows[key][:, offset:offset + num_layers[name]]
    fields.setdefault(name, {})[field] = x[..., 0] if field == "sigma" else x
  return {n: Triplet(sigma=f["sigma"], u=f["u"], v=f["v"], spectrum=f["sigma"][..., None])
          for n, f in fields.items()}


def fit_and_predict(key: jax.Array, train_g: dict[str, Triplet], train_l: dict[str, Triplet],
                    train_t: dict[str, Triplet], last_g: dict[str, Triplet], last_l: dict[str, Triplet],
                    cfg: PredictorConfig, extra_rows: dict[str, jax.Array] | None = None):
  """Train one predictor per shape group on (G_i, L_i) → T_i and predict from the last (G, L).

  extra_rows {group key: [R', dim]}: rows whose G = L = T are the same at every snapshot (faithful mode:
  the zero deltas of untrained parameters), appended to their group for training and prediction. Group i
  in `group_order` trains from fold_in(key, i).
  Returns ({module: predicted Triplet [1, L, ...]}, {group key: loss curve [epochs]}, {group key: extra
  predictions [R', dim]})."""
  g_rows, layout = to_rows(train_g)
  l_rows, _ = to_rows(train_l)
  t_rows, _ = to_rows(train_t)
  lg_rows, _ = to_rows(last_g)
  ll_rows, _ = to_rows(last_l)
  extra_rows = extra_rows or {}
  num = next(iter(g_rows.values())).shape[0]
  preds, curves, extra_preds = {}, {}, {}
  for i, gk in enumerate(sorted(set(g_rows) | set(extra_rows), key=group_order)):
    dim = (g_rows[gk] if gk in g_rows else extra_rows[gk]).shape[-1]
    e = extra_rows.get(gk, jnp.zeros((0, dim), jnp.float32))
    cat = lambda rows, s, k=gk, d=dim, e=e: jnp.concatenate(  # noqa: E731
        [rows.get(k, jnp.zeros((s, 0, d), jnp.float32)), jnp.broadcast_to(e, (s, *e.shape))], axis=1)
    g, l, t = cat(g_rows, num), cat(l_rows, num), cat(t_rows, num)
    w = None
    if cfg.pad_snapshots:
      size = max(cfg.pad_snapshots, num)
      pad = lambda x, size=size: jnp.pad(x, ((0, size - num), (0, 0), (0, 0)))  # noqa: E731
      g, l, t, w = pad(g), pad(l), pad(t), (jnp.arange(size) < num).astype(jnp.float32)
    params, losses = train_predictor(jax.random.fold_in(key, i), g, l, t, cfg, w)
    out = apply_matrix_predict(params, cat(lg_rows, 1), cat(ll_rows, 1), cfg.use_global, cfg.use_local,
                               cfg.reassociate)
    n_own = g.shape[1] - e.shape[0]
    preds[gk], extra_preds[gk], curves[gk] = out[:, :n_own], out[0, n_own:], losses
  num_layers = {name: train_g[name].sigma.shape[1] for name in train_g}
  return from_rows(preds, layout, num_layers), curves, extra_preds
