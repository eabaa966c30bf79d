"""Configs (parsing, validation, presets) and the entry point end to end."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from figures import assert_png_of, lines, recorded_figures
from ml_collections import config_flags

from next_jax import configs
from next_jax.configs import qwen25_paper, toy_arith
from next_jax.core import config as common
from next_jax.core.checkpoint import Checkpointer
from next_jax.models import policy
from next_jax.run import experiment, workdir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_arg_selects_variants_with_types_from_the_defaults():
  c = toy_arith.get_config("algo=rloo,seed=3,quick")
  assert c.rl.estimator == "rloo" and c.seed == 3 and c.total_steps == 12
  assert toy_arith.get_config("algo=dapo").rollout.dynamic_sampling
  assert toy_arith.get_config("algo=drgrpo").rl.agg_mode == "seq-mean-token-sum-norm"
  with pytest.raises(ValueError, match="colour"):
    toy_arith.get_config("colour=red")


def test_toy_config_validates():
  experiment.validate(toy_arith.get_config())
  experiment.validate(toy_arith.get_config("quick,trainable=full"))


@pytest.mark.parametrize("field, value, match", [
    ("model.trainable", "half", "model.trainable"),
    ("rollout.top_p", 1.5, "rollout.top_p"),
    ("rl.estimator", "ppo", "rl.estimator"),
    ("rl.num_mini_batches", 7, "rl.num_mini_batches"),
    ("nxt.extrapolate_at", 155, "nxt.extrapolate_at"),
    ("nxt.k", 20, "nxt.k"),
    ("nxt.method", "magic", "nxt.method"),
    ("nxt.alpha_grid", (1.0, 0.0), "nxt.alpha_grid"),
    ("nxt.alpha", "fast", "nxt.alpha"),
    ("nxt.alpha", 0.0, "nxt.alpha"),
    ("nxt.alpha", True, "nxt.alpha"),
    ("rl.agg_mode", "mean", "agg_mode"),
    ("model.lora_targets", "q,attn", "lora"),
    ("task.name", "file", "task.path"),
    ("rollout.sample_chunk", 5, "rollout.sample_chunk"),  # does not divide the 64 prompts of a step
    ("rl.logprob_chunk", -1, "rl.logprob_chunk"),
])
def test_bad_values_raise_one_error_naming_the_field(field, value, match):
  c = toy_arith.get_config()
  section, key = field.split(".")
  c[section][key] = value
  with pytest.raises(experiment.ConfigError, match=match):
    experiment.validate(c)


@pytest.mark.parametrize("flag, alpha", [("auto", "auto"), ("2", 2.0), ("0.75", 0.75)])
def test_alpha_is_one_field_a_number_or_auto_on_the_command_line(flag, alpha, monkeypatch):
  argv = configs.resolve_argv(["run", "--config=toy_arith:quick", f"--config.nxt.alpha={flag}", "--config.total_steps=14"])
  monkeypatch.setattr(sys, "argv", argv)  # config_flags reads the overrides when the flag is defined
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", flag_values=fv)  # as next_jax.cli.run defines it
  fv(argv)
  experiment.validate(fv.config)
  ncfg = experiment.nxt_config(fv.config)
  assert ncfg.alpha == alpha and type(ncfg.alpha) is type(alpha) and ncfg.total_steps == 14


def test_unknown_override_key_is_rejected_by_the_entry_point():
  out = subprocess.run([sys.executable, "-m", "next_jax.cli.run", "--config=toy_arith",
                        "--config.rl.learning_rate=1e-3"], cwd=ROOT, capture_output=True, text=True)
  assert out.returncode != 0 and "learning_rate" in out.stderr


@pytest.mark.parametrize("size", qwen25_paper.SIZES)
def test_paper_presets_build_their_model_shapes_abstractly(size):
  c = qwen25_paper.get_config(f"size={size}")
  assert c.rollout.prompts_per_step == 128 and c.rollout.group_size == 8 and c.rl.num_mini_batches == 4
  assert c.model.lora_rank == 64 and c.model.lora_alpha == 32 and c.nxt.alpha == 1.5
  with pytest.raises(experiment.ConfigError, match="model.dir"):
    experiment.validate(c)  # no local checkpoint given
  cfg = policy.QWEN25[size]
  lcfg = experiment.lora_config(c)
  shapes = jax.eval_shape(lambda: policy.init_lora(cfg, lcfg, jax.random.key(0)))
  per_layer = sum(lcfg.rank * sum(cfg.module_shape(m)) for m in lcfg.targets)
  assert policy.count_params(shapes) == per_layer * cfg.num_layers


@pytest.fixture(scope="module")
def char_model_dir(toy_model_dir):
  return toy_model_dir


def test_entry_point_runs_quick_end_to_end(char_model_dir, tmp_path):
  wd = tmp_path / "run"
  args = [sys.executable, "-m", "next_jax.cli.run", "--config=toy_arith:quick",
          f"--config.model.dir={char_model_dir}", f"--config.workdir={wd}", "--config.log.progress=False",
          "--config.nxt.predictor.hidden=16", "--config.nxt.predictor.epochs=10"]
  out = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  res = json.loads((wd / "results.json").read_text())
  assert res["steps"] == 12 and res["method"] == "next" and len(res["jumps"]) == 1
  spread = res["jumps"][0]["sigma_spread"]  # σ̂ across the matrices, and the summary's warning when constant
  assert spread["predicted"]["matrices"] == spread["target"]["matrices"] > 1
  assert spread["predicted"]["min"] <= spread["predicted"]["median"] <= spread["predicted"]["max"]
  assert ("σ predictor collapsed" in out.stderr) == (spread["predicted"]["at_median"] == 1.0)
  quick = toy_arith.get_config("quick")
  n_eval = quick.task.n_test * quick.eval.samples  # responses, each right or wrong: accuracy = k / n_eval
  for acc in (res["backbone"], res["final"]):
    assert acc * n_eval == pytest.approx(round(acc * n_eval), abs=1e-9), acc
  rows = [json.loads(x) for x in (wd / "metrics.jsonl").read_text().splitlines()]
  assert max(r["step"] for r in rows) == 12 and any("alpha" in r for r in rows)
  # one final evaluation, reported alike in results.json, its evals and metrics.jsonl, and ICER from it
  assert [(r["step"], r["eval/accuracy"]) for r in rows if "eval/accuracy" in r] == [(12, res["final"])]
  assert res["evals"] == {"12": res["final"]}
  assert res["icer"] == experiment.icer(12, res["final"], res["backbone"])
  again = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert again.returncode != 0 and "ckpt.resume" in again.stderr  # never mixes two runs silently


def test_a_distributed_config_validates_without_starting_jax():
  """jax.distributed.initialize (in build) must come first: validate and workdir.check run no JAX work."""
  code = ("import jax._src.xla_bridge as xb; from next_jax.configs import toy_arith; "
          "from next_jax.run import experiment, workdir; c = toy_arith.get_config('quick'); c.mesh.distributed = True; "
          "c.workdir = '/nonexistent/run'; experiment.validate(c); workdir.check(c); "
          "print(xb.backends_are_initialized())")
  out = subprocess.run([sys.executable, "-c", code], check=False, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0 and out.stdout.split()[-1] == "False", out.stderr[-2000:]


def test_resume_accepts_per_host_fields_and_refuses_others(tmp_path):
  c = toy_arith.get_config("quick")
  c.workdir = str(tmp_path)
  ck = Checkpointer(tmp_path / "ckpt")
  ck.save(1, {"x": jnp.zeros(2)}, {"step": 1, "config": json.loads(c.to_json())})  # as experiment.run does
  ck.close()
  (tmp_path / "config.json").write_text(c.to_json())  # what process 0 wrote
  c.ckpt.resume, c.mesh.process_id, c.mesh.coordinator_address = True, 1, "10.0.0.1:1234"
  assert workdir.check(c)  # host 1 of a relaunch resumes
  c.mesh.num_processes = 4
  with pytest.raises(experiment.ConfigError, match="mesh.num_processes"):
    workdir.check(c)


def test_icer_is_steps_per_accuracy_point():
  assert experiment.icer(250, 0.242, 0.191) == pytest.approx(250 / 5.1)
  assert experiment.icer(250, 0.19, 0.191) == float("inf")


def test_common_algos_cover_the_grpo_family():
  assert set(common.ALGOS) == {"grpo", "drgrpo", "dapo", "rloo", "reinforce_pp"}


def test_demo_quick_prints_backbone_grpo_and_next(char_model_dir, tmp_path, capsys, first_char_reward):
  """(first_char_reward: the random model scores, so the plotted accuracies are not all 0.)"""
  from experiments import demo  # noqa: PLC0415

  wd = tmp_path / "demo"
  with recorded_figures() as figs:
    demo.main(["--quick", "--workdir", str(wd), "--model-dir", str(char_model_dir)])
  table = (wd / "summary.md").read_text()
  out = capsys.readouterr().out
  assert table in out and out.rstrip().splitlines()[-1].startswith("logs: ")  # ends with where things are
  rows = {line.split(" | ")[0].strip("| "): line.split(" | ")[1:] for line in table.splitlines()[2:]}
  assert set(rows) == {"Backbone", "GRPO-LoRA", "NExt"}
  assert rows["GRPO-LoRA"][0] == rows["NExt"][0] == "12"
  res = json.loads((wd / "next_12" / "results.json").read_text())
  assert len(res["jumps"]) == 1 and f"{100 * res['final']:.1f}" == rows["NExt"][1]
  # the plot: each run's accuracy from the backbone (step 0) to step 12, and the jump's step
  fig, dpi = figs["accuracy.png"]
  assert_png_of(wd / "accuracy.png", fig, dpi)
  (ax,) = fig.axes
  grpo = json.loads((wd / "none_12" / "results.json").read_text())
  drawn = lines(ax)
  assert set(drawn) == {"GRPO-LoRA", "NExt"}
  for name, r in (("GRPO-LoRA", grpo), ("NExt", res)):
    assert r["backbone"] > 0  # first_char_reward: not 0 = 0
    np.testing.assert_array_equal(drawn[name][0], [0, 12])
    np.testing.assert_array_equal(drawn[name][1], [r["backbone"], r["final"]])
  assert ax.get_lines()[-1].get_xdata()[0] == res["jumps"][0]["step"] == 8
