"""The NExt run as a state machine: COLLECT → EXTRAPOLATE → CONTINUE (→ COLLECT again when cycles > 1).

    COLLECT      train_step × extrapolate_at steps; snapshot the trained matrices every `interval` steps
                 (snapshot 0 = the cycle's start), K = extrapolate_at/interval + 1 snapshots
    EXTRAPOLATE  extrapolate_step: the method's Δ from the trajectory → choose α → jump
    CONTINUE     train_step until total_steps
Every transition is made by `next_phase`. `next_jax.run.driver` runs the machine (and branches it).

The trajectory lives in the state as stacked arrays (LoRA factors, or kernels for full-parameter runs) and
is checkpointed with it, so a run killed in any phase resumes to the same numbers; `trajectory(state)`
gives it with its meaning (a `Trajectory`: RL steps, scale, layout). After a jump, RL continues per
`continue_mode`:
    "keep"   the jump is added to the base weights (LoRA) / trainable weights (full); adapter and optimiser
             state are kept. For LoRA this moves the KL reference (base without LoRA) by the jump too.
    "merge"  LoRA is merged into the base together with the jump, B is zeroed (A kept) and the optimiser
             state is reset; full runs reset the optimiser state.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from next_jax.core import sharding
from next_jax.core.metrics import Timer
from next_jax.models.policy import Params
from next_jax.nxt import drift, extrapolate
from next_jax.nxt.extrapolate import NExtConfig
from next_jax.nxt.trajectory import Trajectory, untrained_leaves
from next_jax.rl import trained, trainer

log = logging.getLogger(__name__)

COLLECT, EXTRAPOLATE, CONTINUE, DONE = 0, 1, 2, 3
PHASES = ("COLLECT", "EXTRAPOLATE", "CONTINUE", "DONE")


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


@jax.jit
def _write(traj, mats, idx):
  return jax.tree.map(lambda t, x: jax.lax.dynamic_update_index_in_dim(t, x.astype(t.dtype), idx, 0),
                      traj, mats)


def snapshot(setup: trainer.RLSetup, state: NExtState) -> NExtState:
  traj = _write(state.trajectory, trained.matrices(state.rl.train.params, setup.lora_cfg), state.count)
  return state.replace(trajectory=traj, count=state.count + 1)


def init(setup: trainer.RLSetup, ncfg: NExtConfig, base_params: Params, rl: trainer.RLState) -> NExtState:
  """A state in COLLECT with snapshot 0 taken (phase CONTINUE from the start for method "none")."""
  mats = trained.matrices(rl.train.params, setup.lora_cfg)
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
  return snapshot(setup, state)


def trajectory(setup: trainer.RLSetup, ncfg: NExtConfig, state: NExtState) -> Trajectory:
  """The state's trajectory with its meaning: snapshot i taken at RL step cycle_start + i·interval."""
  steps = int(state.cycle_start) + ncfg.interval * np.arange(ncfg.num_snapshots)
  return Trajectory(state.trajectory, steps, trained.scale(setup.lora_cfg), setup.lora_cfg is not None,
                    untrained_leaves(state.base_params, trained.paths(setup.lora_cfg)))


def trajectory_bytes(state: NExtState) -> dict[str, int]:
  """Bytes of one snapshot vs one merged full model (what the official code writes per snapshot)."""
  per = sum(x.nbytes // x.shape[0] for x in jax.tree.leaves(state.trajectory))
  full = sum(x.nbytes for x in jax.tree.leaves(state.base_params))
  return {"snapshot_bytes": int(per), "merged_model_bytes": int(full)}


# ---------------------------------------------------------------------------------------- transitions


def next_phase(ncfg: NExtConfig, phase: int, step: int, in_cycle: int, jumps: int, jumped: bool) -> int:
  """Every transition of the machine, after an RL step (jumped=False) or a jump (jumped=True):
      COLLECT → EXTRAPOLATE      the step that completes the cycle's window (in_cycle = extrapolate_at)
      COLLECT | CONTINUE → DONE  step = total_steps, unless a jump is due there (it is made, then DONE)
      EXTRAPOLATE → COLLECT      jumps < cycles (the next cycle starts at this step)
                  → CONTINUE     the last jump, before total_steps
                  → DONE         the last jump, at total_steps
  step: the RL step reached; in_cycle: steps since the cycle's start; jumps: jumps made so far."""
  if jumped:
    return COLLECT if jumps < ncfg.cycles else CONTINUE if step < ncfg.total_steps else DONE
  if phase == COLLECT and in_cycle == ncfg.extrapolate_at:
    return EXTRAPOLATE
  return DONE if step >= ncfg.total_steps else phase


def train_step(setup: trainer.RLSetup, ncfg: NExtConfig, state: NExtState, timer: Timer | None = None):
  """One RL step (COLLECT or CONTINUE); in COLLECT a snapshot every `interval` steps. → (state, metrics)."""
  rl, metrics = trainer.train_step(setup, state.base_params, state.rl, timer)
  state = state.replace(rl=rl)
  step, in_cycle = int(rl.step), int(rl.step) - int(state.cycle_start)
  if int(state.phase) == COLLECT and in_cycle % ncfg.interval == 0:
    state = snapshot(setup, state)
  phase = next_phase(ncfg, int(state.phase), step, in_cycle, int(state.cycle), jumped=False)
  state = state.replace(phase=jnp.asarray(phase, jnp.int32))
  metrics["phase"] = phase
  return state, metrics


def jump_key(state: NExtState) -> jax.Array:
  """The predictor's key at this jump: fold_in(fold_in(rng, step), 0x5EED)."""
  return jax.random.fold_in(jax.random.fold_in(state.rl.rng, int(state.rl.step)), 0x5EED)


def apply_jump(setup: trainer.RLSetup, ncfg: NExtConfig, state: NExtState, deltas: Params,
               alpha: float, untrained: dict | None = None) -> NExtState:
  """W ← W + α·Δ (`trained.jump`; never-trained base leaves too with `untrained` {path: Δ}, faithful
  mode); continue_mode "merge" also resets the optimiser state."""
  train = state.rl.train
  merge = ncfg.continue_mode == "merge"
  base, params = trained.jump(state.base_params, train.params, setup.lora_cfg, deltas, alpha, merge, untrained)
  new_train = type(train).create(params, train.tx).replace(step=train.step) if merge else \
      train.replace(params=params)
  return state.replace(base_params=base, rl=state.rl.replace(train=new_train))


def drift_diagnostics(ncfg: NExtConfig, traj: Trajectory) -> dict[str, float]:
  """{"drift/<measure>": median over trained matrices} of the observed trajectory (next_jax.nxt.drift), with
  E₁ of the last global delta W_{K−1} − W₀."""
  last = traj.triplets([(traj.num - 1, 0)], "none")
  spectra = jnp.concatenate([t.spectrum[-1].reshape(-1, t.spectrum.shape[-1]) for t in last.values()])
  horizon = min(ncfg.k, (traj.num - 1) // 2)
  med, _ = drift.trajectory_drift(traj, horizon, spectra)
  return {f"drift/{k}": v for k, v in med.items()}


def extrapolate_step(setup: trainer.RLSetup, ncfg: NExtConfig, state: NExtState,
                     score: Callable[[NExtState], float] | None = None, deltas: Params | None = None):
  """EXTRAPOLATE: compute the method's Δ from the trajectory (or take precomputed `deltas`, e.g. to
  sweep α), choose α (fixed, or the best of alpha_grid by `score` on held-out prompts), jump, and move on
  (`next_phase`). Logs the trajectory's drift measures and, for NExt, the predictor's loss curves and E₁.

  Deterministic: the predictor's key is fold_in(rng, step). Returns (state, info)."""
  t0 = time.perf_counter()
  traj = trajectory(setup, ncfg, state)
  extra = {}
  if deltas is None:
    deltas, extra = extrapolate.method_deltas(ncfg, traj, jump_key(state))
  deltas = jax.block_until_ready(deltas)
  info = {"time/extrapolate": time.perf_counter() - t0, "method": ncfg.method}
  side = extra.get("untrained_deltas") or None  # faithful mode: never-trained leaves move too
  finite = all(bool(jnp.isfinite(d).all()) for d in list(deltas.values()) + list((side or {}).values()))
  info["finite"] = finite
  if "loss_curves" in extra:
    info["predictor_loss"] = {k: np.asarray(c).tolist() for k, c in extra["loss_curves"].items()}
  if "sigma_spread" in extra:
    info["sigma_spread"] = extra["sigma_spread"]
  info.update(drift_diagnostics(ncfg, traj))
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
    alpha, curve = float(ncfg.alpha) if extrapolate.METHODS[ncfg.method].alpha else 1.0, {}
  state = apply_jump(setup, ncfg, state, deltas, alpha, side)
  info.update({"alpha": alpha, "alpha_curve": curve, "time/jump_total": time.perf_counter() - t0})
  jumps = int(state.cycle) + 1
  phase = next_phase(ncfg, EXTRAPOLATE, int(state.rl.step), 0, jumps, jumped=True)
  state = state.replace(phase=jnp.asarray(phase, jnp.int32), cycle=jnp.asarray(jumps, jnp.int32),
                        count=jnp.zeros((), jnp.int32), cycle_start=state.rl.step)
  if phase == COLLECT:
    state = snapshot(setup, state)
  return state, info
