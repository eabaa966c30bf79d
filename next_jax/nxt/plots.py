"""Plots of a NExt run's diagnostics (matplotlib), as the Colab quickstart shows them.

    reward / accuracy over RL steps, with each jump marked        plot_training
    E₁ = σ₁/Σσᵢ of G_i = W_i − W₀ per trained matrix, per snapshot  e1_over_snapshots + plot_e1
    the predictor's training loss per shape group                 plot_predictor_loss
    all three side by side                                        diagnostics_figure

The plot functions take an Axes and plain numbers (metric rows as `driver.run`'s on_step sees them,
or as metrics.jsonl stores them), so they work on a finished run's files as well as on a live run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from next_jax.nxt import rank1
from next_jax.nxt.predictor import group_order
from next_jax.nxt.trajectory import Trajectory

MODULE_COLOURS = {"q": "C0", "k": "C1", "v": "C2", "o": "C3", "gate": "C4", "up": "C5", "down": "C6"}


def e1_over_snapshots(traj: Trajectory, sign: str = "max_abs_u") -> dict[str, np.ndarray]:
  """E₁ = σ₁/Σσᵢ (rank1.energy_ratios) of the global deltas G_i = W_i − W₀, i = 1 … K−1, per matrix
  → {"<module>/<layer>": float[K−1]} (e.g. of `state_machine.trajectory(setup, ncfg, state)`).
  E₁ = 1: the drift so far is exactly rank 1; E₁ = 1/rank: it is spread evenly over its spectrum."""
  if traj.num < 2:
    raise ValueError(f"trajectory has {traj.num} snapshot(s); E₁ needs ≥ 2")
  triplets = traj.global_triplets(sign)
  out = {}
  for name, t in triplets.items():
    e1 = np.asarray(rank1.energy_ratios(t.spectrum)[0])  # [K−1, L]
    out.update({f"{name}/{layer}": e1[:, layer] for layer in range(e1.shape[1])})
  return out


def plot_training(ax, rows: Sequence[Mapping[str, Any]], jump_steps: Sequence[int] = (),
                  evals: Mapping[int, float] | None = None) -> None:
  """Batch reward_mean and accuracy per RL step (rows: {"step", "reward_mean", "accuracy"}), test accuracy
  at the evaluated steps (evals: {step: accuracy}) as markers, and a vertical line at each jump."""
  steps = [r["step"] for r in rows]
  for key, style in (("reward_mean", "-"), ("accuracy", "--")):
    if rows and key in rows[0]:
      ax.plot(steps, [r[key] for r in rows], style, lw=1.2, label=f"batch {key}")
  if evals:
    xs = sorted(evals)
    ax.plot(xs, [evals[s] for s in xs], "o", color="k", label="test accuracy")
  for i, s in enumerate(jump_steps):
    ax.axvline(s, color="grey", ls=":", label="jump" if i == 0 else None)
  ax.set_xlabel("RL step")
  ax.set_ylabel("reward / accuracy")
  ax.set_title("training")
  ax.legend(fontsize="small")


def plot_e1(ax, snapshot_steps: Sequence[int], e1: Mapping[str, np.ndarray]) -> None:
  """One line per matrix ("<module>/<layer>") over the snapshots' RL steps, coloured by module."""
  seen = set()
  for name, values in e1.items():
    module = name.split("/")[0]
    ax.plot(snapshot_steps, values, marker=".", lw=1, alpha=0.8, color=MODULE_COLOURS.get(module),
            label=module if module not in seen else None)
    seen.add(module)
  ax.set_ylim(0, 1.02)
  ax.set_xlabel("RL step of snapshot i")
  ax.set_ylabel("E₁ = σ₁/Σσ of W_i − W₀")
  ax.set_title("rank-1 share of the drift")
  ax.legend(fontsize="small", ncol=2)


def plot_predictor_loss(ax, curves: Mapping[Any, Sequence[float]]) -> None:
  """The predictor's training loss per epoch, one line per shape group (curves: {"m;1" | "1;n" | "1;1":
  [loss, …]}, `predictor.group_key`)."""
  for key, curve in sorted(curves.items(), key=lambda kv: group_order(str(kv[0]))):
    ax.plot(np.arange(1, len(curve) + 1), curve, label=f"group {key}")
  ax.set_yscale("log")
  ax.set_xlabel("epoch")
  ax.set_ylabel("predictor loss")
  ax.set_title("predictor training")
  ax.legend(fontsize="small")


def diagnostics_figure(rows: Sequence[Mapping[str, Any]], jump_steps: Sequence[int] = (),
                       evals: Mapping[int, float] | None = None, snapshot_steps: Sequence[int] = (),
                       e1: Mapping[str, np.ndarray] | None = None,
                       loss_curves: Mapping[Any, Sequence[float]] | None = None):
  """A figure with the training panel, then the E₁ and predictor-loss panels when their data is given."""
  import matplotlib.pyplot as plt  # noqa: PLC0415 - only the plotting path needs it

  panels = [lambda ax: plot_training(ax, rows, jump_steps, evals)]
  if e1:
    panels.append(lambda ax: plot_e1(ax, snapshot_steps, e1))
  if loss_curves:
    panels.append(lambda ax: plot_predictor_loss(ax, loss_curves))
  fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8), squeeze=False)
  for draw, ax in zip(panels, axes[0]):
    draw(ax)
  fig.tight_layout()
  return fig
