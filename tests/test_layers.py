"""The package's layers (docs/design.md, "Module map"): a module imports only from its own layer or the ones
below, lazy imports inside functions included, and nothing in next_jax imports experiments/ or tests/.
A new module must be placed in a layer here."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "next_jax"
LAYERS = (  # lowest first
    ("core", {"config", "registry", "sharding", "metrics", "checkpoint"}),
    ("models and files", {"policy", "hf", "outdir", "peft_io", "gguf_convert", "model_files", "toy", "sampler"}),
    ("RL", {"trained", "grpo", "trainer", "rewards", "chat_tasks", "tasks", "rg_tasks"}),
    ("NExt", {"rank1", "trajectory", "drift", "predictor", "extrapolate", "runs", "plots"}),
    ("orchestration", {"state_machine", "driver", "experiment", "workdir", "memory", "posthoc", "toy_base"}),
    ("entry points", {"cli", "configs"}),
)


def _layer(module: str) -> int:
  top = module.split(".")[0]
  return next(i for i, (_, names) in enumerate(LAYERS) if top in names)


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
      names = [f"{node.module}.{a.name}" if node.module == "next_jax" else node.module for a in node.names]
    elif isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    for n in names:
      if n.startswith("next_jax."):
        found.add(n.removeprefix("next_jax."))
      elif n.split(".")[0] in ("experiments", "tests"):
        found.add(n)
  return found


def test_every_module_has_a_layer():
  unplaced = sorted(m for m in _modules() if not any(m.split(".")[0] in names for _, names in LAYERS))
  assert not unplaced, f"place these modules in a layer in tests/test_layers.py: {unplaced}"


def test_no_module_imports_a_higher_layer_or_the_experiments():
  bad = []
  for module, path in _modules().items():
    for dep in _imports(path):
      if dep.split(".")[0] in ("experiments", "tests"):
        bad.append(f"{module} imports {dep}")
      elif _layer(dep) > _layer(module):
        bad.append(f"{module} ({LAYERS[_layer(module)][0]}) imports {dep} ({LAYERS[_layer(dep)][0]})")
  assert not bad, bad


def test_the_check_sees_an_upward_import(tmp_path):
  """The checker itself: a lower-layer file importing a higher layer is found (lazily, inside a function)."""
  f = tmp_path / "m.py"
  f.write_text("def f():\n  from next_jax import experiment\n  import experiments.demo\n")
  deps = _imports(f)
  assert deps == {"experiment", "experiments.demo"} and _layer("experiment") > _layer("policy")
