"""The one driver: the primitives every experiment branches a run with, and `run` built from them.

    fork(state)                          an independent copy (train_step donates its input state)
    advance(setup, ncfg, state, until)   RL steps up to step `until`, stopping early where a jump is due
                                         (phase EXTRAPOLATE) or the run ends (DONE)
    jump(setup, ncfg, state)             the configured method's jump (state_machine.extrapolate_step)
    skip_jump(state)                     the same state in CONTINUE: plain RL on from the jump point
    run(setup, ncfg, state, ...)         to DONE, with metrics, a checkpoint at every phase transition, and
                                         the fault guard
`experiments.reproduce`, `snr_study`, `predictor_fit`, the benchmarks and `next_jax.run.experiment` are loops
over these calls; the phase transitions themselves are `state_machine.next_phase`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import jax
import jax.numpy as jnp

from next_jax.core.metrics import MetricWriter, Timer, progress
from next_jax.nxt.extrapolate import NExtConfig
from next_jax.rl import trainer
from next_jax.run import state_machine as sm
from next_jax.run.state_machine import CONTINUE, DONE, EXTRAPOLATE, PHASES, NExtState

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------ primitives


def fork(state: NExtState) -> NExtState:
  """An independent copy: train_step donates its input, and every branch starts from the same state."""
  return jax.tree.map(jnp.copy, state)


def advance(setup: trainer.RLSetup, ncfg: NExtConfig, state: NExtState, until: int | None,
            on_step: Callable[[NExtState, dict], None] | None = None, timer: Timer | None = None) -> NExtState:
  """train_step until RL step `until` (None: no limit), or until the phase becomes EXTRAPOLATE or DONE,
  whichever comes first; on_step(state, metrics) after each step. The input state is donated."""
  while (until is None or int(state.rl.step) < until) and int(state.phase) not in (EXTRAPOLATE, DONE):
    state, metrics = sm.train_step(setup, ncfg, state, timer)
    if on_step is not None:
      on_step(state, metrics)
  return state


def jump(setup: trainer.RLSetup, ncfg: NExtConfig, state: NExtState,
         score: Callable[[NExtState], float] | None = None, deltas=None) -> tuple[NExtState, dict]:
  """The jump of `ncfg.method` (or of precomputed `deltas`) from a state in EXTRAPOLATE → (state, info)."""
  return sm.extrapolate_step(setup, ncfg, state, score, deltas)


def skip_jump(state: NExtState) -> NExtState:
  """The state moved to CONTINUE without jumping: plain RL from the jump point (the no-jump baseline)."""
  return state.replace(phase=jnp.asarray(CONTINUE, jnp.int32))


# ----------------------------------------------------------------------------------------------- run


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
  """Drive the state machine to DONE: `advance` and `jump` in turn, checkpointing every `checkpoint_every`
  steps and at every phase transition (entering EXTRAPOLATE, after the jump, at the end). Resumes from
  whatever phase `state` is in. on_step(state, metrics) runs after each RL step (before its checkpoint),
  on_jump(state, info) after a jump; meta() adds JSON to every checkpoint's metadata.

  A step whose update was skipped (non-finite or oversized, `_faulty`) is logged; while such steps follow
  each other no checkpoint at all is written (no periodic, phase-transition or jump save), so the last
  checkpoint always predates the streak and a resume replays it from its start. After `max_faults` such
  steps in a row (0: never) that checkpoint is restored and NumericalFault is raised."""
  def save(s: NExtState, tag: str):  # numbered by save index: the jump and the step before it share an RL step
    if checkpointer is not None:
      checkpointer.save((checkpointer.latest_step() or 0) + 1, s,
                        {"step": int(s.rl.step), "phase": PHASES[int(s.phase)], "tag": tag,
                         **(meta() if meta is not None else {})})

  bar = progress(ncfg.total_steps, initial=int(state.rl.step), desc=desc, disable=None if progress_bar else True)
  timer, faults, before = Timer(), 0, int(state.phase)

  def after_step(s: NExtState, m: dict):
    nonlocal faults, before
    if writer is not None:
      writer.write(int(s.rl.step), m)
    if on_step is not None:
      on_step(s, m)
    bar.set_postfix(phase=PHASES[int(s.phase)], reward=f"{m['reward_mean']:.3f}")
    bar.update(1)
    step, changed, before = int(s.rl.step), int(s.phase) != before, int(s.phase)
    faults = faults + 1 if _faulty(m) else 0
    if faults:
      log.warning("step %d: %d non-finite and %d oversized update(s) skipped (%d faulty step(s) in a row)",
                  step, int(m.get("nonfinite_updates", 0)), int(m.get("oversized_updates", 0)), faults)
      if max_faults and faults >= max_faults:
        bar.close()
        raise _give_up(checkpointer, s, faults)
    elif changed or (checkpoint_every and step % checkpoint_every == 0):
      save(s, PHASES[int(s.phase)])

  while int(state.phase) != DONE:
    if int(state.phase) == EXTRAPOLATE:
      state, info = jump(setup, ncfg, state, score)
      if writer is not None:
        writer.write(int(state.rl.step), {k: v for k, v in info.items() if isinstance(v, (int, float))})
      if on_jump is not None:
        on_jump(state, info)
      if not faults:
        save(state, "jump")
      before = int(state.phase)
      continue
    state = advance(setup, ncfg, state, None, after_step, timer)
  bar.close()
  return state
