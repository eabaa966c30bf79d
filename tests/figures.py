"""Checks of the plots experiments save: record every matplotlib Figure as it is saved, then compare what it
draws with the rows it was drawn from, and the file on disk with the figure (a PNG of figsize × dpi pixels).
A file's size says nothing: an empty or wrong plot is as large as a right one."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import pytest


@contextlib.contextmanager
def recorded_figures():
  """{file name: (Figure, dpi)} of every `Figure.savefig` inside the block (the figures are still saved)."""
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib.figure import Figure

  saved, original = {}, Figure.savefig

  def savefig(self, fname, *args, **kwargs):
    saved[Path(fname).name] = (self, kwargs.get("dpi"))
    return original(self, fname, *args, **kwargs)

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(Figure, "savefig", savefig)
    yield saved


def assert_png_of(path, fig, dpi) -> None:
  """`path` decodes as a PNG of the figure's pixel size, with more than a background colour in it."""
  import matplotlib.image

  img = matplotlib.image.imread(path)
  width, height = fig.get_size_inches() * dpi
  assert img.shape[:2] == (round(height), round(width)), (img.shape, width, height)
  assert len(np.unique(img.reshape(-1, img.shape[-1]), axis=0)) > 2


def lines(ax) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """{label: (x, y)} of an axes' labelled lines (matplotlib's own "_child…" labels left out)."""
  return {ln.get_label(): (np.asarray(ln.get_xdata(), float), np.asarray(ln.get_ydata(), float))
          for ln in ax.get_lines() if not ln.get_label().startswith("_")}


def errorbars(ax) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """{label: (x, y)} of an axes' error-bar series (their data lines carry no label of their own)."""
  return {c.get_label(): tuple(np.asarray(v, float) for v in c.lines[0].get_data()) for c in ax.containers
          if type(c).__name__ == "ErrorbarContainer"}


def bar_heights(ax) -> dict[str, list[float]]:
  """{label: heights} of an axes' bar groups, in drawing order."""
  return {c.get_label(): [p.get_height() for p in c.patches] for c in ax.containers
          if type(c).__name__ == "BarContainer"}
