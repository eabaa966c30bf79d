"""The Colab quickstart, executed top to bottom with nbclient on the CPU in its QUICK setting."""

import os
import re
from pathlib import Path

import numpy as np
import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "colab_tpu_quickstart.ipynb"


def code_cells(nb):
  return [c for c in nb.cells if c.cell_type == "code"]


def test_notebook_is_committed_without_outputs_and_has_a_parameters_cell():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  assert all(not c.outputs and c.execution_count is None for c in code_cells(nb))
  tagged = [c for c in code_cells(nb) if "parameters" in c.metadata.get("tags", [])]
  assert len(tagged) == 1 and "QUICK" in tagged[0].source
  assert "REPO_URL" in code_cells(nb)[0].source


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
  """The notebook after a QUICK run in a tmp dir: the kernel imports this checkout's next_jax."""
  tmp = tmp_path_factory.mktemp("notebook")
  env = {"NEXT_JAX_NOTEBOOK_QUICK": "1", "NEXT_JAX_NOTEBOOK_WORKDIR": str(tmp / "work"),
         "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
         "OPENBLAS_NUM_THREADS": "1", "MPLBACKEND": "module://matplotlib_inline.backend_inline"}
  old = {k: os.environ.get(k) for k in env}
  os.environ.update(env)  # the kernel subprocess inherits this environment
  try:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp)}}).execute()
  finally:
    for k, v in old.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
  return nb, tmp


def stdout(nb) -> str:
  return "".join(o.text for c in code_cells(nb) for o in c.outputs
                 if o.output_type == "stream" and o.name == "stdout")


def test_notebook_runs_without_errors_on_this_checkout(executed):
  nb, _ = executed
  assert not [o for c in code_cells(nb) for o in c.outputs if o.output_type == "error"]
  text = stdout(nb)
  assert f"next_jax from {ROOT}" in text
  assert "backend: cpu" in text


def test_notebook_prints_the_accuracy_table_with_numbers(executed):
  text = stdout(executed[0])
  for row in ("backbone", "before the jump", r"after the jump \(α = 1.5\)", "final"):
    assert re.search(rf"\| {row}\s*\|\s*\d+ \|\s*\d+\.\d \|", text), row
  assert re.search(r"ICER .*: (inf|\d+\.\d)", text)
  assert "median E₁ = " in text


def test_notebook_plots_the_diagnostics(executed):
  nb, tmp = executed
  images = [o for c in code_cells(nb) for o in c.outputs if "image/png" in o.get("data", {})]
  assert len(images) == 1
  # plots.diagnostics_figure draws 5 × 3.8 in per panel, saved at 110 dpi: three panels (training, E₁, the
  # predictor's loss) are 1650 × 418 pixels; a run whose jump lost its E₁ or loss curves has fewer
  import matplotlib.image
  img = matplotlib.image.imread(tmp / "work" / "diagnostics.png")
  assert img.shape[:2] == (418, 1650) and len(np.unique(img.reshape(-1, img.shape[-1]), axis=0)) > 2
  assert (tmp / "work" / "run" / "metrics.jsonl").exists()


def test_notebook_shows_the_real_qwen25_config_and_command(executed):
  text = stdout(executed[0])
  assert "Qwen2.5-1.5B: 28 layers, hidden 1536, 1.54B parameters" in text
  assert "73.9M trainable parameters" in text  # LoRA r 64 on all seven projections of 28 layers
  assert ("python -m next_jax.cli.run --config=qwen25_paper:size=1.5B \\\n"
          "    --config.model.dir=/content/Qwen2.5-1.5B-Instruct "
          "--config.task.path=/content/dapo_math_17k.parquet") in text
  assert "skipped: put the checkpoint in /content/Qwen2.5-1.5B-Instruct" in text
