"""One config schema: next_jax/config.base() holds every default and type; the library's dataclasses read
their defaults from it (config.defaults) instead of restating them, and validation takes its types from it."""

import ast
import dataclasses
import inspect
import re

import ml_collections
import pytest

from next_jax.core import config
from next_jax.models import policy
from next_jax.nxt.extrapolate import NExtConfig
from next_jax.nxt.predictor import PredictorConfig
from next_jax.rl import grpo, trainer
from next_jax.run import experiment

# dataclass → (schema section, {dataclass field: schema field} where the names differ). The schema writes
# "off" as 0 where the dataclass writes None (clip_c, loss_scale_factor, micro_batch_size, horizon, grad_clip).
DATACLASSES = [
    (trainer.RolloutConfig, "rollout", {}),
    (trainer.OptimConfig, "rl", {}),
    (grpo.LossConfig, "rl", {}),
    (NExtConfig, "nxt", {}),
    (PredictorConfig, "nxt.predictor", {}),
    (policy.LoraConfig, "model", {"rank": "lora_rank", "alpha": "lora_alpha"}),
]


def _section(c, path):
  for part in path.split("."):
    c = c[part]
  return c


@pytest.mark.parametrize("cls, section, renamed", DATACLASSES, ids=[m[0].__name__ for m in DATACLASSES])
def test_library_defaults_are_read_from_the_schema_not_restated(cls, section, renamed):
  """Every dataclass field the schema also holds takes its default from `config.defaults(section)` in the
  source (no literal), and so has the schema's value."""
  sec = _section(config.base(), section)
  tree = ast.parse(inspect.getsource(cls))
  fields = {st.target.id: st.value for st in tree.body[0].body if isinstance(st, ast.AnnAssign) and st.value}
  compared = 0
  for f in dataclasses.fields(cls):
    name = renamed.get(f.name, f.name)
    if name not in sec or isinstance(sec[name], ml_collections.ConfigDict) or isinstance(f.default, tuple) \
        or f.default is dataclasses.MISSING:
      continue  # a library-only knob, a nested section, lora targets ("q,k,…" in the schema), or required
    source = ast.unparse(fields[f.name])
    assert re.fullmatch(rf"_[A-Z_]+\.{name}( or None)?", source), f"{cls.__name__}.{f.name} = {source}"
    assert (f.default if f.default is not None else 0) == sec[name]
    compared += 1
  assert compared >= 3


def test_the_batch_shape_and_learning_rate_have_no_library_default():
  required = lambda cls: {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING}  # noqa: E731
  assert {"prompts_per_step", "prompt_len", "max_new_tokens"} <= required(trainer.RolloutConfig)
  assert "lr" in required(trainer.OptimConfig)


def test_validation_takes_every_type_from_the_schema():
  kinds = experiment.schema_kinds()
  assert kinds["rl.lr"] is float and kinds["nxt.k"] is int and kinds["log.tensorboard"] is bool
  assert kinds["model.dir"] is str and len(kinds) == sum(1 for _ in _leaves(config.base().to_dict()))


def _leaves(d):
  for v in d.values():
    yield from _leaves(v) if isinstance(v, dict) else [v]


@pytest.mark.parametrize("field, value, why", [("log.tensorboard", "yes", "True or False"),
                                               ("mesh.process_id", 1.5, "an integer"),
                                               ("nxt.predictor.lr", float("inf"), "a finite number")])
def test_a_hand_built_config_is_checked_against_the_schema_types(field, value, why):
  c = ml_collections.ConfigDict(config.base().to_dict(), type_safe=False)  # no types of its own
  *path, key = field.split(".")
  _section(c, ".".join(path))[key] = value
  with pytest.raises(experiment.ConfigError, match=re.escape(f"config.{field}=") + f".*must be {why}"):
    experiment.validate(c)


def test_a_config_missing_a_field_names_it():
  c = ml_collections.ConfigDict(config.base().to_dict(), type_safe=False)
  del c.rl["max_faults"]
  with pytest.raises(experiment.ConfigError, match=r"config\.rl\.max_faults: missing"):
    experiment.validate(c)
