"""The package's layers are its folders (docs/design.md, "Module map"): a module imports only from its own
folder or the ones below, lazy imports inside functions included, and nothing in next_jax imports
experiments/ or tests/. A new folder or top-level module must be placed in LAYERS."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "next_jax"
LAYERS = (("core",), ("models",), ("rl",), ("nxt",), ("run",), ("cli", "configs"))  # lowest first
FOLDERS = {f for layer in LAYERS for f in layer}


def _layer(module: str) -> int:
  """The layer of a module named relative to the package ("rl.trainer" → 2; "rl" → 2)."""
  return next(i for i, folders in enumerate(LAYERS) if module.split(".")[0] in folders)


def _modules() -> dict[str, Path]:
  out = {}
  for p in PACKAGE.rglob("*.py"):
    parts = p.relative_to(PACKAGE).with_suffix("").parts
    if parts != ("__init__",):
      out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
  return out


def _imports(path: Path) -> set[str]:
  """next_jax modules (relative to the package) and top-level experiments/tests imported anywhere in a file."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    names = []
    if isinstance(node, ast.ImportFrom) and node.module:
      package = node.module == "next_jax" or node.module.removeprefix("next_jax.") in FOLDERS
      names = [f"{node.module}.{a.name}" if package else node.module for a in node.names]
    elif isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    for n in names:
      if n.startswith("next_jax."):
        found.add(n.removeprefix("next_jax."))
      elif n.split(".")[0] in ("experiments", "tests"):
        found.add(n)
  return found


def test_every_module_is_in_a_layer_folder():
  unplaced = sorted(m for m in _modules() if m.split(".")[0] not in FOLDERS)
  assert not unplaced, f"put these modules in a layer folder (tests/test_layers.py LAYERS): {unplaced}"


def test_no_module_imports_a_higher_layer_or_the_experiments():
  bad = []
  for module, path in _modules().items():
    for dep in _imports(path):
      if dep.split(".")[0] in ("experiments", "tests"):
        bad.append(f"{module} imports {dep}")
      elif _layer(dep) > _layer(module):
        bad.append(f"{module} (layer {_layer(module)}) imports {dep} (layer {_layer(dep)})")
  assert not bad, bad


def test_the_check_sees_an_upward_import(tmp_path):
  """The checker itself: a lower-layer file importing a higher layer is found (lazily, inside a function)."""
  f = tmp_path / "m.py"
  f.write_text("def f():\n  from next_jax.run import experiment\n  import experiments.demo\n")
  deps = _imports(f)
  assert deps == {"run.experiment", "experiments.demo"} and _layer("run.experiment") > _layer("models.policy")
