"""The NExt run as a state machine: COLLECT → EXTRAPOLATE → CONTINUE (→ COLLECT again when cycles > 1).

    COLLECT      train_step × extrapolate_at steps; snapshot the trained matrices every `interval` steps
                 (snapshot 0 = the cycle's start), K = extrapolate_at/interval + 1 snapshots
    EXTRAPOLATE  extrapolate_step: rank-1 triplets → predictor → ΔŴ → choose α → jump
    CONTINUE     train_step until total_steps

The trajectory lives in the state as stacked arrays (LoRA factors, or kernels for full-parameter runs) and
is checkpointed with it, so a run killed in any phase resumes to the same numbers. After a jump, RL
continues per `continue_mode`:
    "keep"   the jump is added to the base weights (LoRA) / trainable weights (full); adapter and optimiser
             state are kept. For LoRA this moves the KL reference (base without LoRA) by the jump too.
    "merge"  LoRA is merged into the base together with the jump, B is zeroed (A kept) and the optimiser
             state is reset; full runs reset the optimiser state.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from next_jax import drift, extrapolate, sharding, trainer
from next_jax.metrics import MetricWriter, Timer, progress
from next_jax.policy import ALL_MODULES, Params, merge_lora
from next_jax.predictor import PredictorConfig

log = logging.getLogger(__name__)

COLLECT, EXTRAPOLATE, CONTINUE, DONE = 0, 1, 2, 3
PHASES = ("COLLECT", "EXTRAPOLATE", "CONTINUE", "DONE")
ALPHA_GRID = tuple(0.5 * i for i in range(1, 9))  # 0.5 … 4.0


@dataclasses.dataclass(frozen=True)
class NExtConfig:
  """The jump schedule (paper: 150 steps, snapshot every 10, k = 5, α = 1.5, then 100 steps)."""

  method: str = "next"  # next | rl_extra | alpharl | relex | none (plain RL)
  extrapolate_at: int = 150  # COLLECT steps per cycle
  interval: int = 10
  k: int = 5  # target T_i = W_{i+k} − W_i, in snapshots
  alpha: float | str = 1.5  # or "auto": best of alpha_grid on the validation set
  alpha_grid: tuple[float, ...] = ALPHA_GRID
  total_steps: int = 250  # real RL steps of the whole run
  cycles: int = 1
  sign: str = "max_abs_u"
  continue_mode: str = "keep"  # keep | merge
  faithful: bool = False  # NExt also moves never-trained parameters by their predicted deltas (official code)
  horizon: int | None = None  # baselines extrapolate this many steps ahead (None: k·interval)
  predictor: PredictorConfig = PredictorConfig()

  def __post_init__(self):
    if self.method not in extrapolate.METHODS + ("none",):
      raise ValueError(f"nxt.method={self.method!r}; choose from {extrapolate.METHODS + ('none',)}")
    if self.extrapolate_at % self.interval:
      raise ValueError(f"nxt.extrapolate_at={self.extrapolate_at} is not a multiple of "
                       f"nxt.interval={self.interval}")
    if self.method == "next" and self.extrapolate_at // self.interval < self.k + 1:
      raise ValueError(f"nxt.k={self.k} needs ≥ k+1 snapshot intervals before the jump; extrapolate_at/"
                       f"interval = {self.extrapolate_at // self.interval}")
    if self.method != "none" and self.cycles * self.extrapolate_at > self.total_steps:
      raise ValueError(f"nxt.cycles·extrapolate_at = {self.cycles * self.extrapolate_at} > "
                       f"nxt.total_steps = {self.total_steps}")
    if self.faithful and self.method != "next":
      raise ValueError(f"nxt.faithful=True applies to method 'next' only, not {self.method!r}")
    if self.continue_mode not in ("keep", "merge"):
      raise ValueError(f"nxt.continue_mode={self.continue_mode!r}; choose 'keep' or 'merge'")
    if isinstance(self.alpha, str) and self.alpha != "auto":
      raise ValueError(f"nxt.alpha={self.alpha!r}; a number or 'auto'")

  @property
  def num_snapshots(self) -> int:
    return self.extrapolate_at // self.interval + 1


class NExtState(flax.struct.PyTreeNode):
  """rl: the RL state (trainable, optimiser, rng, step, cursor); base_params: the frozen weights LoRA sits
  on (moved by jumps in LoRA runs) or the full run's reference copy; trajectory: [K, ...] snapshots;
  phase/cycle/count: int32 scalars; cycle_start: the RL step at which the cycle's snapshot 0 was taken."""

  rl: trainer.RLState
  base_params: Params
  trajectory: Params
  phase: jax.Array
  cycle: jax.Array
  count: jax.Array
  cycle_start: jax.Array


# ------------------------------------------------------------------------------------------ snapshots


def trained_matrices(trainable: Params, lora: bool) -> Params:
  """What the trajectory records: LoRA factors as they are, or the 7 projection kernels of a full run."""
  if lora:
    return trainable
  return {m: {"kernel": trainable["layers"][m]["kernel"]} for m in ALL_MODULES}


@jax.jit
def _write(traj, mats, idx):
  return jax.tree.map(lambda t, x: jax.lax.dynamic_update_index_in_dim(t, x.astype(t.dtype), idx, 0),
                      traj, mats)


def snapshot(state: NExtState, lora: bool) -> NExtState:
  traj = _write(state.trajectory, trained_matrices(state.rl.train.params, lora), state.count)
  return state.replace(trajectory=traj, count=state.count + 1)


def init(setup: trainer.RLSetup, ncfg: NExtConfig, base_params: Params, rl: trainer.RLState) -> NExtState:
  """A state in COLLECT with snapshot 0 taken (phase CONTINUE from the start for method "none")."""
  lora = setup.lora_cfg is not None
  mats = trained_matrices(rl.train.params, lora)
  shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct((ncfg.num_snapshots, *x.shape), x.dtype), mats)
  mesh = setup.mesh if setup.mesh is not None and sharding.FSDP in setup.mesh.axis_names else None
  if mesh is None:
    traj = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)
  else:  # born sharded: a full run's K snapshots never sit on one device
    traj = jax.tree.map(lambda x, s: jnp.zeros(x.shape, x.dtype, device=s), shapes,
                        sharding.named_shardings(shapes, mesh))
  z = jnp.zeros((), jnp.int32)
  phase = CONTINUE if ncfg.method == "none" else COLLECT
  state = NExtState(rl=rl, base_params=base_params, trajectory=traj, phase=jnp.asarray(phase, jnp.int32),
                    cycle=z, count=z, cycle_start=z)
  return snapshot(state, lora)


def trajectory_bytes(state: NExtState) -> dict[str, int]:
  """Bytes of one snapshot vs one merged full model (what the official code writes per snapshot)."""
  per = sum(x.nbytes // x.shape[0] for x in jax.tree.leaves(state.trajectory))
  full = sum(x.nbytes for x in jax.tree.leaves(state.base_params))
  return {"snapshot_bytes": int(per), "merged_model_bytes": int(full)}


# ---------------------------------------------------------------------------------------- transitions


def train_step(setup: trainer.RLSetup, ncfg: NExtConfig, state: NExtState, timer: Timer | None = None):
  """One RL step; in COLLECT, snapshot every `interval` steps and move to EXTRAPOLATE at the jump point;
  stop (DONE) at total_steps unless a jump is due there (extrapolate_step then ends the run). The next
  cycle's COLLECT is entered by extrapolate_step itself, never from CONTINUE."""
  rl, metrics = trainer.train_step(setup, state.base_params, state.rl, timer)
  state = state.replace(rl=rl)
  lora = setup.lora_cfg is not None
  step, in_cycle = int(rl.step), int(rl.step) - int(state.cycle_start)
  if int(state.phase) == COLLECT and in_cycle % ncfg.interval == 0:
    state = snapshot(state, lora)
    if in_cycle == ncfg.extrapolate_at:
      state = state.replace(phase=jnp.asarray(EXTRAPOLATE, jnp.int32))
  if step >= ncfg.total_steps and int(state.phase) != EXTRAPOLATE:  # cycles·extrapolate_at == total_steps
    state = state.replace(phase=jnp.asarray(DONE, jnp.int32))
  metrics["phase"] = int(state.phase)
  return state, metrics


def jump_key(state: NExtState) -> jax.Array:
  """The predictor's key at this jump: fold_in(fold_in(rng, step), 0x5EED)."""
  return jax.random.fold_in(jax.random.fold_in(state.rl.rng, int(state.rl.step)), 0x5EED)


def method_deltas(ncfg: NExtConfig, traj: Params, steps: np.ndarray, scale: float, key: jax.Array,
                  untrained: dict | None = None):
  """Δ per module for the configured method, from a full trajectory (steps: RL step of each snapshot).
  untrained: {path: shape} of never-trained base parameters, used by NExt when ncfg.faithful."""
  steps = jnp.asarray(steps, jnp.float32)
  horizon = ncfg.horizon if ncfg.horizon is not None else ncfg.k * ncfg.interval
  t_target = float(steps[-1]) + horizon
  if ncfg.method == "next":
    return extrapolate.next_predict(traj, ncfg.k, scale, ncfg.predictor, key, ncfg.sign,
                                    untrained=untrained if ncfg.faithful else None)
  fn = {"rl_extra": extrapolate.rl_extra, "alpharl": extrapolate.alpharl, "relex": extrapolate.relex}
  return fn[ncfg.method](traj, steps, t_target, scale), {}


def apply_jump(setup: trainer.RLSetup, ncfg: NExtConfig, state: NExtState, deltas: Params,
               alpha: float, untrained: dict | None = None) -> NExtState:
  """W ← W + α·Δ on every trained matrix (and on never-trained base leaves given in `untrained`
  {path: Δ}, faithful mode), then set up RL's continuation per `continue_mode`."""
  lora_cfg = setup.lora_cfg
  train = state.rl.train
  if lora_cfg is not None:
    base = merge_lora(state.base_params, train.params, lora_cfg) if ncfg.continue_mode == "merge" \
        else state.base_params
    base = add_to_kernels(base, deltas, alpha)
    if untrained:
      base = _add_to_paths(base, untrained, alpha)
    params = train.params
    if ncfg.continue_mode == "merge":
      params = jax.tree.map(jnp.copy, {m: {"a": p["a"], "b": jnp.zeros_like(p["b"])}
                                       for m, p in train.params.items()})
    new_train = train.replace(params=params) if ncfg.continue_mode == "keep" else \
        type(train).create(params, train.tx).replace(step=train.step)
    return state.replace(base_params=base, rl=state.rl.replace(train=new_train))
  params = add_to_kernels(train.params, deltas, alpha)
  new_train = train.replace(params=params) if ncfg.continue_mode == "keep" else \
      type(train).create(params, train.tx).replace(step=train.step)
  return state.replace(rl=state.rl.replace(train=new_train))


def trained_paths(setup: trainer.RLSetup) -> set[str]:
  """Paths of the base leaves the trajectory covers: the LoRA targets' kernels, or all seven (full)."""
  mods = setup.lora_cfg.targets if setup.lora_cfg is not None else ALL_MODULES
  return {f"layers/{m}/kernel" for m in mods}


def _add_to_paths(params: Params, deltas: dict[str, jax.Array], alpha: float) -> Params:
  """params[path] += α·Δ for {"a/b/c": Δ}."""
  def add(path, x):
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    return (x.astype(jnp.float32) + alpha * deltas[name]).astype(x.dtype) if name in deltas else x
  return jax.tree_util.tree_map_with_path(add, params)


def add_to_kernels(params: Params, deltas: Params, alpha: float) -> Params:
  """W ← W + α·Δ on each module's stacked kernel ({module: Δ [L, n, m]}), computed in fp32."""
  layers = dict(params["layers"])
  for m, d in deltas.items():
    k = layers[m]["kernel"]
    layers[m] = {**layers[m], "kernel": (k.astype(jnp.float32) + alpha * d).astype(k.dtype)}
  return {**params, "layers": layers}


def drift_diagnostics(ncfg: NExtConfig, traj: Params, steps: np.ndarray, scale: float,
                      extra: dict | None = None) -> dict[str, float]:
  """{"drift/<measure>": median over trained matrices} of the observed trajectory (next_jax.drift), with
  E₁ of the last global delta (reusing NExt's triplets when `extra` holds them)."""
  last = (extra or {}).get("triplets", {}).get("last_global")
  if last is None:
    last = extrapolate.pair_triplets(traj, [(len(steps) - 1, 0)], scale, "none")
  spectra = jnp.concatenate([t.spectrum[-1].reshape(-1, t.spectrum.shape[-1]) for t in last.values()])
  horizon = min(ncfg.k, (len(steps) - 1) // 2)
  med, _ = drift.trajectory_drift(traj, steps, scale, horizon, spectra)
  return {f"drift/{k}": v for k, v in med.items()}


def extrapolate_step(setup: trainer.RLSetup, ncfg: NExtConfig, state: NExtState,
                     score: Callable[[NExtState], float] | None = None, deltas: Params | None = None):
  """EXTRAPOLATE: compute the method's Δ from the trajectory (or take precomputed `deltas`, e.g. to
  sweep α), choose α (fixed, or the best of alpha_grid by `score` on held-out prompts), jump, and move to
  CONTINUE (or the next cycle's COLLECT). Logs the trajectory's drift measures and, for NExt, the
  predictor's loss curves and E₁.

  Deterministic: the predictor's key is fold_in(rng, step). Returns (state, info)."""
  t0 = time.perf_counter()
  lora_cfg = setup.lora_cfg
  scale = lora_cfg.scale if lora_cfg is not None else 1.0
  steps = int(state.cycle_start) + ncfg.interval * np.arange(ncfg.num_snapshots)
  extra = {}
  if deltas is None:
    untrained = (extrapolate.untrained_leaves(state.base_params, trained_paths(setup))
                 if ncfg.faithful else None)
    deltas, extra = method_deltas(ncfg, state.trajectory, steps, scale, jump_key(state), untrained)
  deltas = jax.block_until_ready(deltas)
  info = {"time/extrapolate": time.perf_counter() - t0, "method": ncfg.method}
  side = extra.get("untrained_deltas") or None  # faithful mode: never-trained leaves move too
  finite = all(bool(jnp.isfinite(d).all()) for d in list(deltas.values()) + list((side or {}).values()))
  info["finite"] = finite
  if "loss_curves" in extra:
    info["predictor_loss"] = {int(d): np.asarray(c).tolist() for d, c in extra["loss_curves"].items()}
  info.update(drift_diagnostics(ncfg, state.trajectory, steps, scale, extra))
  if not finite:  # refuse a non-finite prediction: no jump (0·NaN is NaN, so Δ itself is zeroed)
    log.warning("step %d: %s prediction is not finite; no jump", int(state.rl.step), ncfg.method)
    alpha, curve, deltas, side = 0.0, {}, jax.tree.map(jnp.zeros_like, deltas), None
  elif ncfg.alpha == "auto":
    if score is None:
      raise ValueError("nxt.alpha='auto' needs a validation score function")
    curve = {a: score(apply_jump(setup, ncfg, state, deltas, a, side))
             for a in (0.0,) + tuple(ncfg.alpha_grid)}
    alpha = max(ncfg.alpha_grid, key=lambda a: curve[a])
  else:
    alpha, curve = float(ncfg.alpha) if ncfg.method == "next" else 1.0, {}
  state = apply_jump(setup, ncfg, state, deltas, alpha, side)
  info.update({"alpha": alpha, "alpha_curve": curve, "time/jump_total": time.perf_counter() - t0})
  cycle = int(state.cycle) + 1
  more = cycle < ncfg.cycles
  after = COLLECT if more else CONTINUE if int(state.rl.step) < ncfg.total_steps else DONE
  state = state.replace(phase=jnp.asarray(after, jnp.int32),
                        cycle=jnp.asarray(cycle, jnp.int32), count=jnp.zeros((), jnp.int32),
                        cycle_start=state.rl.step)
  if more:
    state = snapshot(state, lora_cfg is not None)
  return state, info


# ------------------------------------------------------------------------------------------------ run


class NumericalFault(RuntimeError):
  """Too many consecutive non-finite updates; `state` is the last good checkpoint's state (or None)."""

  def __init__(self, msg: str, state: NExtState | None = None):
    super().__init__(msg)
    self.state = state


FIX_HINT = ("lower rl.lr (resume with --config.ckpt.resume=True --config.ckpt.allow_changes=rl.lr "
            "--config.rl.lr=<lower>) or check the rewards")


def _faulty(m: dict) -> bool:
  """A step any of whose updates was skipped (grpo_update: non-finite, or oversized)."""
  return bool(m.get("nonfinite_updates", 0) or m.get("oversized_updates", 0))


def _give_up(checkpointer, state: NExtState, faults: int) -> NumericalFault:
  """Restore the last checkpoint (none is written while faults persist) and explain what happened."""
  step = int(state.rl.step)
  msg = (f"{faults} consecutive RL steps (up to step {step}) had a non-finite loss or gradient, or an update "
         f"larger than rl.max_update_ratio × the weights; their updates were skipped. Stopping (limit: "
         f"rl.max_faults = {faults}).")
  if checkpointer is None or checkpointer.latest_step() is None:
    return NumericalFault(msg + f" No checkpoint to restore; {FIX_HINT}.")
  good, meta = checkpointer.restore(state)
  return NumericalFault(msg + f" Restored the last good checkpoint {checkpointer.directory}/"
                        f"{checkpointer.latest_step()} (RL step {meta['step']}, written before the faults "
                        f"began); {FIX_HINT}.", good)


def run(setup: trainer.RLSetup, ncfg: NExtConfig, state: NExtState, *, writer: MetricWriter | None = None,
        checkpointer=None, checkpoint_every: int = 0, score: Callable[[NExtState], float] | None = None,
        desc: str = "nxt", on_jump: Callable[[NExtState, dict], None] | None = None,
        on_step: Callable[[NExtState, dict], None] | None = None, progress_bar: bool = True,
        max_faults: int = 0, meta: Callable[[], dict] | None = None) -> NExtState:
  """Drive the state machine to DONE, checkpointing every `checkpoint_every` steps and at every phase
  transition (entering EXTRAPOLATE, after the jump, at the end). Resumes from whatever phase `state` is in.
  on_step(state, metrics) runs after each RL step (before its checkpoint), on_jump(state, info) after a jump;
  meta() adds JSON to every checkpoint's metadata.

  A step whose update was skipped (non-finite or oversized, `_faulty`) is logged; while such steps follow
  each other no checkpoint at all is written (no periodic, phase-transition or jump save), so the last
  checkpoint always predates the streak and a resume replays it from its start. After `max_faults` such
  steps in a row (0: never) that checkpoint is restored and NumericalFault is raised."""
  def save(tag: str):  # numbered by save index: the jump and the step before it share an RL step
    if checkpointer is not None:
      checkpointer.save((checkpointer.latest_step() or 0) + 1, state,
                        {"step": int(state.rl.step), "phase": PHASES[int(state.phase)], "tag": tag,
                         **(meta() if meta is not None else {})})

  bar = progress(ncfg.total_steps, initial=int(state.rl.step), desc=desc, disable=None if progress_bar else True)
  timer, faults = Timer(), 0
  while int(state.phase) != DONE:
    if int(state.phase) == EXTRAPOLATE:
      state, info = extrapolate_step(setup, ncfg, state, score)
      if writer is not None:
        writer.write(int(state.rl.step), {k: v for k, v in info.items() if isinstance(v, (int, float))})
      if on_jump is not None:
        on_jump(state, info)
      if not faults:
        save("jump")
      continue
    before = int(state.phase)
    state, m = train_step(setup, ncfg, state, timer)
    if writer is not None:
      writer.write(int(state.rl.step), m)
    if on_step is not None:
      on_step(state, m)
    bar.set_postfix(phase=PHASES[int(state.phase)], reward=f"{m['reward_mean']:.3f}")
    bar.update(1)
    step = int(state.rl.step)
    faults = faults + 1 if _faulty(m) else 0
    if faults:
      log.warning("step %d: %d non-finite and %d oversized update(s) skipped (%d faulty step(s) in a row)",
                  step, int(m.get("nonfinite_updates", 0)), int(m.get("oversized_updates", 0)), faults)
      if max_faults and faults >= max_faults:
        bar.close()
        raise _give_up(checkpointer, state, faults)
    elif int(state.phase) != before or (checkpoint_every and step % checkpoint_every == 0):
      save(PHASES[int(state.phase)])
  bar.close()
  return state
