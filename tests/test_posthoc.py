"""Post-hoc NExt over runs no one here wrote: a LoRA trajectory trained by TRL's GRPOTrainer with peft, the
same adapters laid out as verl writes them, and merged checkpoints; checked against the official method's
dense path (peft merge, torch.linalg.svd of every delta) and loaded back by peft and transformers."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import re
import shutil
import threading
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import load_torch_model, torch_logits

from next_jax.cli import posthoc as cli
from next_jax.core import outdir
from next_jax.models import hf, peft_io, policy, toy
from next_jax.nxt import drift, extrapolate, runs
from next_jax.nxt.rank1 import Triplet, delta_pairs
from next_jax.rl import trained

K = 2  # NExt's k in snapshots; TRL saves every 2 steps for 12 steps → 6 checkpoints + the base
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _train_with_trl(base: Path, out: Path) -> None:
  """GRPO-LoRA with TRL 1.x + peft on the tiny base: 12 steps, an adapter saved every 2 (checkpoint-N/)."""
  import datasets  # noqa: PLC0415
  import peft  # noqa: PLC0415
  import torch  # noqa: PLC0415
  import transformers  # noqa: PLC0415
  import trl  # noqa: PLC0415

  torch.manual_seed(0)
  tok = transformers.AutoTokenizer.from_pretrained(str(base))
  model = transformers.AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
  args = trl.GRPOConfig(
      output_dir=str(out), per_device_train_batch_size=8, num_generations=4, max_steps=12,
      save_strategy="steps", save_steps=2, save_only_model=True, max_completion_length=8,
      learning_rate=2e-2, lr_scheduler_type="constant", warmup_steps=0, beta=0.0, temperature=1.0,
      use_cpu=True, bf16=False, report_to="none", logging_steps=100, disable_tqdm=True, seed=0,
      dataloader_num_workers=0, use_vllm=False)
  lora = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                         target_modules=HF_TARGETS)

  def vowels(completions, **_):
    return [sum(c in "aeiou " for c in x) / max(len(x), 1) for x in completions]

  words = ["cat", "dog", "sun", "tree", "moon", "fish", "rock", "bird"]
  data = datasets.Dataset.from_dict({"prompt": [f"Say {w}:" for w in words]})
  trl.GRPOTrainer(model=model, reward_funcs=vowels, args=args, train_dataset=data, processing_class=tok,
                  peft_config=lora).train()


def _as_verl(trl_out: Path, base: Path, out: Path) -> None:
  """The TRL adapters re-saved the way verl's FSDP checkpoint manager saves a LoRA actor:
  global_step_N/actor/lora_adapter/ (peft state dict via safetensors, `asdict(peft_config)` as JSON),
  actor/huggingface/ (config + tokenizer, no weights), the pickled FSDP shards beside them."""
  import peft  # noqa: PLC0415
  import torch  # noqa: PLC0415
  from safetensors.torch import save_file  # noqa: PLC0415

  for ckpt in sorted(trl_out.glob("checkpoint-*")):
    actor = out / f"global_step_{runs.step_of(ckpt)}" / "actor"
    (actor / "lora_adapter").mkdir(parents=True)
    tensors = peft.load_peft_weights(str(ckpt))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(actor / "lora_adapter/adapter_model.safetensors"))
    pcfg = dataclasses.asdict(peft.PeftConfig.from_pretrained(str(ckpt)))
    pcfg = {k: (v.value if hasattr(v, "value") else sorted(v) if isinstance(v, set) else v) for k, v in pcfg.items()}
    (actor / "lora_adapter/adapter_config.json").write_text(json.dumps(pcfg, indent=4))
    shutil.copytree(base, actor / "huggingface", ignore=shutil.ignore_patterns("*.safetensors"))
    torch.save({"decoy": torch.zeros(1)}, actor / "model_world_size_1_rank_0.pt")
  (out / "latest_checkpointed_iteration.txt").write_text("12")


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
  """{base, trl, verl}: a tiny Qwen2 base (biases, untied head), its TRL run, and the verl layout."""
  root = tmp_path_factory.mktemp("posthoc")
  cfg = policy.ModelConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                           num_kv_heads=1, rope_theta=10000.0, qkv_bias=True, tie_embeddings=False)
  base = toy.make_random_model_dir(root / "base", cfg)
  _train_with_trl(base, root / "trl")
  _as_verl(root / "trl", base, root / "verl")
  return {"base": base, "trl": root / "trl", "verl": root / "verl", "root": root}


@pytest.fixture(scope="module")
def trl_run(runs_dir):
  return runs.read(runs_dir["base"], str(runs_dir["trl"] / "checkpoint-*"))


def _peft_merged_f64(base: Path, adapter: Path | None) -> dict[str, np.ndarray]:
  """The official procedure's merge: peft's merge_and_unload of one checkpoint (float64 here, so the
  reference deltas carry no fp32 cancellation), {"<layer>.<proj>": W [out, in]}."""
  import peft  # noqa: PLC0415
  import torch  # noqa: PLC0415
  import transformers  # noqa: PLC0415

  model = transformers.AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float64)
  if adapter is not None:
    model = peft.PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
  sd = model.state_dict()
  return {f"{i}.{p}": sd[f"model.layers.{i}.{'self_attn' if p in HF_TARGETS[:4] else 'mlp'}.{p}.weight"].numpy()
          for i in range(model.config.num_hidden_layers) for p in HF_TARGETS}


def _dense_top_triplet(delta: np.ndarray):
  import torch  # noqa: PLC0415

  u, s, vh = torch.linalg.svd(torch.as_tensor(delta), full_matrices=False)
  return float(s[0]), u[:, 0].numpy(), vh[0].numpy()


def _check_against_dense(run, weights: list[dict], sigma_rtol: float, cos_tol: float) -> None:
  """Every G, L, T pair's (σ, u, v) against the dense SVD of the same delta of the merged weights."""
  pairs = sorted({p for ps in delta_pairs(len(run.steps), K).values() for p in ps})
  ours = run.trajectory.triplets(pairs, "none", devices="vmap")
  names = {m: hf.HF_MODULE[m].split(".")[1] for m in ours}
  checked = 0
  for pi, (i, j) in enumerate(pairs):
    for m, t in ours.items():
      for layer in range(run.cfg.num_layers):
        key = f"{layer}.{names[m]}"
        sigma, u, v = _dense_top_triplet(weights[i][key] - weights[j][key])
        np.testing.assert_allclose(float(t.sigma[pi, layer]), sigma, rtol=sigma_rtol)
        cu = abs(np.dot(np.asarray(t.u[pi, layer], np.float64), u)) / np.linalg.norm(t.u[pi, layer])
        cv = abs(np.dot(np.asarray(t.v[pi, layer], np.float64), v)) / np.linalg.norm(t.v[pi, layer])
        assert cu >= 1 - cos_tol and cv >= 1 - cos_tol, (i, j, key, cu, cv)
        checked += 1
  assert checked == len(pairs) * len(ours) * run.cfg.num_layers


# ------------------------------------------------------------------------------------ reading runs


def test_trl_run_reads_as_a_lora_trajectory_that_moved(trl_run):
  assert trl_run.kind == "lora" and list(trl_run.steps) == [0, 2, 4, 6, 8, 10, 12]
  assert (trl_run.lora_cfg.rank, trl_run.lora_cfg.alpha, trl_run.scale) == (4, 8.0, 2.0)
  assert set(trl_run.lora_cfg.targets) == set(policy.ALL_MODULES)
  b = np.asarray(trl_run.trajectory.snapshots["q"]["b"])
  assert np.all(b[0] == 0) and np.all(np.abs(b[1:]).max(axis=(1, 2, 3)) > 1e-3)  # GRPO moved every snapshot


def test_trl_triplets_equal_the_official_dense_svd(runs_dir, trl_run):
  weights = [_peft_merged_f64(runs_dir["base"], None)]
  weights += [_peft_merged_f64(runs_dir["base"], p) for p in trl_run.paths]
  _check_against_dense(trl_run, weights, sigma_rtol=1e-5, cos_tol=1e-6)


@pytest.mark.parametrize("pattern", ["global_step_*/actor/lora_adapter", "global_step_*"])
def test_verl_layout_reads_the_same_trajectory(runs_dir, trl_run, pattern):
  run = runs.read(runs_dir["base"], str(runs_dir["verl"] / pattern))
  assert list(run.steps) == list(trl_run.steps) and run.lora_cfg == trl_run.lora_cfg
  assert all(p.name == "lora_adapter" for p in run.paths)
  jax.tree.map(np.testing.assert_array_equal, run.trajectory.snapshots, trl_run.trajectory.snapshots)


def test_merged_checkpoints_give_dense_deltas_equal_to_the_dense_svd(runs_dir, trl_run, tmp_path):
  import peft  # noqa: PLC0415
  import torch  # noqa: PLC0415
  import transformers  # noqa: PLC0415

  for p in trl_run.paths[:4]:  # verl's hf_model: actor/huggingface with the merged weights
    model = transformers.AutoModelForCausalLM.from_pretrained(str(runs_dir["base"]), dtype=torch.float32)
    merged = peft.PeftModel.from_pretrained(model, str(p)).merge_and_unload()
    merged.save_pretrained(str(tmp_path / f"global_step_{runs.step_of(p)}" / "actor" / "huggingface"))
  run = runs.read(runs_dir["base"], str(tmp_path / "global_step_*"))
  assert run.kind == "merged" and set(run.trajectory.snapshots) == set(policy.ALL_MODULES)
  stored = [hf.read_weights(d) for d in (runs_dir["base"], *run.paths)]  # the fp32 values as stored
  weights = [{f"{i}.{p}": np.asarray(w[f"model.layers.{i}.{'self_attn' if p in HF_TARGETS[:4] else 'mlp'}.{p}.weight"],
                                      np.float64) for i in range(run.cfg.num_layers) for p in HF_TARGETS}
             for w in stored]
  _check_against_dense(run, weights, sigma_rtol=1e-5, cos_tol=1e-6)


# ------------------------------------------------------------------------------------ the report + jump


@pytest.fixture(scope="module")
def report_run(runs_dir):
  out = runs_dir["root"] / "report"
  res = cli.main(["--base", str(runs_dir["base"]), "--checkpoints", str(runs_dir["trl"] / "checkpoint-*"),
                  "--out", str(out), "--k", str(K), "--epochs", "30", "--alphas", "1.5,3.0"])
  return out, res


def test_report_has_every_section_and_plot(report_run):
  out, res = report_run
  text = (out / "report.md").read_text()
  for heading in ("E₁ of the global delta", "Linearity", "Drift measures", "Back-test", "The jump"):
    assert f"## {heading}" in text
  assert {p.name for p in out.glob("*.png")} == {"e1.png", "r2.png", "backtest.png"}
  saved = json.loads((out / "results.json").read_text())
  assert set(saved["verdicts"]) == set(extrapolate.METHODS)
  assert [r["origin"] for r in saved["backtest"]] == [s for s in (6, 8) for _ in extrapolate.METHODS]
  assert "u (sign none)" in saved["r2"] and "u (sign max_abs_u)" in saved["r2"]
  assert "E₁ = σ₁/Σσᵢ (floor 0.250)" in text  # rank 4: E₁ ≥ 1/4
  assert "`--sign max_abs_u`" in text and "the official code does not canonicalise" in text
  assert sorted(p.name for p in (out / "jump").iterdir()) == ["alpha_1.5", "alpha_3.0"]  # as written


def test_report_gives_the_spread_of_the_predicted_sigma(report_run):
  """σ̂ of the jump across the 14 matrices (7 modules × 2 layers), recomputed from the predicted triplets,
  beside the last training target's; the report's table says the same."""
  out, res = report_run
  saved = json.loads((out / "results.json").read_text())["sigma_spread"]
  sig = np.concatenate([np.asarray(t.sigma).ravel() for t in res["jump"].values()])
  assert saved["predicted"]["matrices"] == sig.size == 14
  assert saved["predicted"]["median"] == pytest.approx(float(np.median(sig)), rel=1e-6)
  assert (saved["predicted"]["min"], saved["predicted"]["max"]) == pytest.approx((sig.min(), sig.max()), rel=1e-6)
  assert saved["target"]["max"] > saved["target"]["min"] > 0  # real targets vary by matrix
  text = (out / "report.md").read_text()
  assert f"| predicted σ̂ (the jump) | {saved['predicted']['min']:.4g} |" in text
  assert ("**Warning:** NExt's σ predictor collapsed" in text) == (saved["predicted"]["at_median"] == 1.0)


def test_alphas_are_a_comma_list_as_written():
  assert cli.parse_alphas(cli.parse_args(["--base=b", "--checkpoints=c", "--out=o", "--alphas=1.0,1.5"]).alphas) \
      == {"1.0": 1.0, "1.5": 1.5}
  with pytest.raises(hf.CheckpointError, match="given twice"):
    cli.parse_alphas(["1", "1.0"])
  with pytest.raises(SystemExit, match=r"unexpected argument '3.0' .*--alphas=1.5,3.0"):
    cli.parse_args(["--base=b", "--checkpoints=c", "--out=o", "--alphas", "1.5", "3.0"])  # the old space form


@pytest.mark.parametrize("argv, match", [([], "--base is required"), (["--k=two"], "--k"),
                                         (["--sign=flip"], "--sign"), (["--max-step=3"], "max-step")])
def test_a_bad_or_missing_flag_is_one_line_naming_it(argv, match):
  full = ["--base=b", "--checkpoints=c", "--out=o"] if argv else []
  with pytest.raises(SystemExit, match=match):
    cli.parse_args([*full, *argv])


def test_backtest_rl_extra_row_equals_a_numpy_recomputation(runs_dir, trl_run, report_run):
  """RL-Extra at origin t: Δ̂ = (β − 1)(W_t − W₀), β = (t + k·interval)/t, against W_{t+k} − W_t, from
  peft-merged float64 weights."""
  _, res = report_run
  w = [_peft_merged_f64(runs_dir["base"], None)] + [_peft_merged_f64(runs_dir["base"], p) for p in trl_run.paths]
  for row in (r for r in res["backtest"] if r["method"] == "rl_extra"):
    t = row["origin"] // trl_run.interval
    beta = (row["origin"] + K * trl_run.interval) / row["origin"]
    pred = np.concatenate([((beta - 1) * (w[t][x] - w[0][x])).ravel() for x in w[0]])
    real = np.concatenate([(w[t + K][x] - w[t][x]).ravel() for x in w[0]])
    cos = pred @ real / np.linalg.norm(pred) / np.linalg.norm(real)
    np.testing.assert_allclose(row["cos_global"], cos, atol=1e-5)
    np.testing.assert_allclose(row["relerr_global"], np.linalg.norm(pred - real) / np.linalg.norm(real), rtol=1e-4)
    np.testing.assert_allclose(row["alpha_star"], pred @ real / (pred @ pred), rtol=1e-4)


@pytest.mark.parametrize("alpha", ["1.5", "3.0"])
def test_jump_adapter_and_merged_model_load_with_our_logits(runs_dir, trl_run, report_run, fwd, alpha):
  """W_t + α·σ̂ûv̂ᵀ three ways: peft's rank-(r+1) adapter on the base, transformers on the merged dir, and
  our forward on weights built directly from the predicted triplets (not through extend_adapter)."""
  import peft  # noqa: PLC0415

  out, res = report_run
  d, alpha = out / "jump" / f"alpha_{alpha}", float(alpha)
  acfg = json.loads((d / "adapter/adapter_config.json").read_text())
  assert acfg["r"] == 5 and acfg["lora_alpha"] / acfg["r"] == pytest.approx(trl_run.scale, rel=1e-12)
  cfg, base, _ = hf.load_model(runs_dir["base"], tokenizer=False)
  want = policy.merge_lora(base, runs.last_lora(trl_run), trl_run.lora_cfg)
  want = trained.add_to_kernels(want, {m: extrapolate.triplet_delta(t) for m, t in res["jump"].items()}, alpha)
  tokens = np.random.default_rng(0).integers(3, 300, size=(2, 9)).astype(np.int32)
  ours = np.asarray(fwd(want, tokens, cfg)[0])
  with_adapter = peft.PeftModel.from_pretrained(load_torch_model(runs_dir["base"]), str(d / "adapter")).eval()
  np.testing.assert_allclose(torch_logits(with_adapter, tokens), ours, atol=2e-4)
  np.testing.assert_allclose(torch_logits(load_torch_model(d / "merged"), tokens), ours, atol=2e-4)
  assert (d / "merged/tokenizer.json").read_bytes() == (runs_dir["base"] / "tokenizer.json").read_bytes()
  config = lambda p: json.loads((p / "config.json").read_text())  # noqa: E731
  assert config(d / "merged") == config(runs_dir["base"])


def test_extend_adapter_is_exact_for_any_sign_and_rslora():
  rng = np.random.default_rng(0)
  for rslora in (False, True):
    lcfg = policy.LoraConfig(rank=3, alpha=6.0, targets=("q",), rslora=rslora)
    lora = {"q": {"a": rng.normal(size=(2, 3, 5)), "b": rng.normal(size=(2, 4, 3))}}
    jump = {"q": Triplet(sigma=np.array([0.7, -1.3]), u=rng.normal(size=(2, 4)), v=rng.normal(size=(2, 5)),
                         spectrum=np.zeros((2, 1)))}
    new_cfg, new = runs.extend_adapter(jax.tree.map(np.asarray, lora), lcfg, jump, alpha=2.5)
    assert new_cfg.rank == 4 and new_cfg.scale == pytest.approx(lcfg.scale, rel=1e-12)
    got = new_cfg.scale * np.einsum("lmr,lrn->lmn", new["q"]["b"], new["q"]["a"])
    t = extrapolate.normalised(jump["q"])
    want = lcfg.scale * np.einsum("lmr,lrn->lmn", lora["q"]["b"], lora["q"]["a"]) \
        + 2.5 * np.asarray(t.sigma)[:, None, None] * np.einsum("lm,ln->lmn", t.u, t.v)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_line_r2_on_flattened_deltas_equals_the_element_wise_gram_statistic(trl_run):
  d = np.stack([np.asarray(trl_run.trajectory.delta("up", i, 0)) for i in range(1, 7)])
  ours = drift.line_r2(trl_run.steps[1:], d.reshape(6, 2, -1), horizon=2)
  gram = drift.linear_fit_scores(trl_run.trajectory.gram("up"), trl_run.steps, 2)[0]
  np.testing.assert_allclose(ours, np.asarray(gram), rtol=1e-4)


# ------------------------------------------------------------------------------------ bad input


def _fails(argv, tmp_path, match):
  out = tmp_path / "out"
  with pytest.raises(SystemExit, match=match):
    cli.main([*argv, "--out", str(out), "--epochs", "2"])
  assert not out.exists() and not list(tmp_path.glob(".out.*"))


def _copy_ckpts(src: Path, dst: Path, n: int = 4) -> list[Path]:
  dirs = sorted(src.glob("checkpoint-*"), key=runs.step_of)[:n]
  return [Path(shutil.copytree(d, dst / d.name)) for d in dirs]


def test_bad_inputs_stop_before_writing(runs_dir, tmp_path, hf_model):
  base, trl = str(runs_dir["base"]), str(runs_dir["trl"] / "checkpoint-*")
  _fails(["--base", base, "--checkpoints", str(tmp_path / "nothing-*")], tmp_path, "matches no directory")
  for bad in ("0,1.5", "-1", "abc", "nan"):
    _fails(["--base", base, "--checkpoints", trl, "--alphas", bad], tmp_path, "--alphas")
  other_base = str(hf_model("qwen_gqa_untied").path)  # hidden 64, not the run's 32
  _fails(["--base", other_base, "--checkpoints", trl], tmp_path, r"checkpoint-2/adapter_model.safetensors.*expected")
  _fails(["--base", base, "--checkpoints", trl, "--k", "6"], tmp_path, "--k 6")
  nostep = tmp_path / "runs" / "final"
  shutil.copytree(runs_dir["trl"] / "checkpoint-2", nostep)
  _fails(["--base", base, "--checkpoints", str(nostep)], tmp_path, "no step number")


def test_inconsistent_runs_are_refused(runs_dir, tmp_path):
  base = str(runs_dir["base"])
  dirs = _copy_ckpts(runs_dir["trl"], tmp_path / "gap")
  shutil.rmtree(dirs[1])  # steps 2, 6, 8: step 4 missing
  _fails(["--base", base, "--checkpoints", str(tmp_path / "gap/checkpoint-*")], tmp_path, r"missing step\(s\) \[4\]")
  dirs = _copy_ckpts(runs_dir["trl"], tmp_path / "rank")
  cfg = hf.load_config(base)
  rank2 = {"q": {"a": np.zeros((2, 2, 32), np.float32), "b": np.zeros((2, 32, 2), np.float32)}}
  peft_io.save_peft_adapter(dirs[2], cfg, rank2, policy.LoraConfig(rank=2, alpha=8.0, targets=("q",)),
                            overwrite=True)
  _fails(["--base", base, "--checkpoints", str(tmp_path / "rank/checkpoint-*")], tmp_path, "rank=2 but")
  dirs = _copy_ckpts(runs_dir["trl"], tmp_path / "dora")
  acfg = json.loads((dirs[0] / "adapter_config.json").read_text())
  (dirs[0] / "adapter_config.json").write_text(json.dumps({**acfg, "use_dora": True}))
  _fails(["--base", base, "--checkpoints", str(tmp_path / "dora/checkpoint-*")], tmp_path, "use_dora=True")
  dirs = _copy_ckpts(runs_dir["trl"], tmp_path / "pickle")
  (dirs[0] / "adapter_model.safetensors").rename(dirs[0] / "adapter_model.bin")
  _fails(["--base", base, "--checkpoints", str(tmp_path / "pickle/checkpoint-*")], tmp_path, "pickle")


def test_out_is_atomic_when_writing_fails(runs_dir, tmp_path, monkeypatch):
  def boom(*_a, **_k):
    raise RuntimeError("disk full")

  monkeypatch.setattr(runs, "save_like", boom)
  out = tmp_path / "out"
  with pytest.raises(RuntimeError, match="disk full"):
    cli.main(["--base", str(runs_dir["base"]), "--checkpoints", str(runs_dir["trl"] / "checkpoint-*"),
              "--out", str(out), "--k", str(K), "--epochs", "2", "--alphas", "1.5", "--backtest", "none"])
  assert not out.exists() and not list(tmp_path.iterdir())


# ------------------------------------------------------------------------- the user's files, poisoned inputs


def test_out_never_replaces_the_inputs_the_working_directory_or_a_users_directory(runs_dir, tmp_path, monkeypatch):
  base, pattern = str(runs_dir["base"]), str(runs_dir["trl"] / "checkpoint-*")
  ckpt = runs_dir["trl"] / "checkpoint-2"
  before = sorted(p.name for p in ckpt.iterdir())
  for out in (ckpt, runs_dir["trl"], runs_dir["base"]):
    with pytest.raises(SystemExit, match="would replace the input"):
      cli.main(["--base", base, "--checkpoints", pattern, "--out", str(out), "--overwrite"])
  assert sorted(p.name for p in ckpt.iterdir()) == before
  monkeypatch.chdir(tmp_path)
  with pytest.raises(SystemExit, match=r"--out \. is the working directory"):
    cli.main(["--base", base, "--checkpoints", pattern, "--out", ".", "--overwrite"])
  (tmp_path / "mine").mkdir()
  (tmp_path / "mine" / "notes.txt").write_text("keep")
  with pytest.raises(SystemExit, match=r"--out mine holds files next_jax did not write.*--overwrite"):
    cli.main(["--base", base, "--checkpoints", pattern, "--out", "mine"])
  assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_an_unwritable_or_locked_out_is_refused_before_reading_anything(runs_dir, tmp_path, monkeypatch):
  argv = ["--base", str(runs_dir["base"]), "--checkpoints", str(runs_dir["trl"] / "checkpoint-*"),
          "--out", str(tmp_path / "out")]
  monkeypatch.setattr(runs, "read", lambda *a: pytest.fail("read before --out was checked"))
  box = {}

  def second():
    try:
      cli.main(argv)
    except SystemExit as e:
      box["msg"] = str(e)

  with outdir.lock(outdir.lock_path(tmp_path / "out"), "another run"):
    t = threading.Thread(target=second)  # its own open file description, as another process has
    t.start()
    t.join()
  assert re.search(rf"--out .*out is in use by another process \(pid {os.getpid()}", box["msg"]), box

  def read_only(*_a, **_k):
    raise OSError(errno.EROFS, "Read-only file system")

  monkeypatch.setattr(outdir.tempfile, "mkstemp", read_only)
  with pytest.raises(SystemExit, match=r"out: cannot write in .*Read-only file system"):
    cli.main(argv)


def _poisoned(runs_dir, tmp_path, edit) -> str:
  """Four TRL checkpoints with checkpoint-4's adapter_model.safetensors edited; → the glob."""
  dirs = _copy_ckpts(runs_dir["trl"], tmp_path / "run")
  edit(dirs[1] / "adapter_model.safetensors")
  return str(tmp_path / "run" / "checkpoint-*")


def test_a_nan_or_inf_factor_is_refused_naming_checkpoint_tensor_and_count(runs_dir, tmp_path):
  def nan(path):
    tensors = {k: np.array(v) for k, v in hf.read_safetensors(path).items()}
    name = "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"
    tensors[name].flat[[3, 7]] = [np.nan, np.inf]
    hf.write_safetensors(path, tensors)

  pattern = _poisoned(runs_dir, tmp_path, nan)
  _fails(["--base", str(runs_dir["base"]), "--checkpoints", pattern], tmp_path,
         r"checkpoint-4/adapter_model.safetensors: tensor .*layers.1.mlp.up_proj.lora_B.weight has 2 non-finite")


def test_a_factor_stored_as_integers_is_refused(runs_dir, tmp_path):
  def flip(path):
    data = path.read_bytes()
    path.write_bytes(data.replace(b'"F32"', b'"I32"', 1))  # one header byte: the bits read as int32

  pattern = _poisoned(runs_dir, tmp_path, flip)
  _fails(["--base", str(runs_dir["base"]), "--checkpoints", pattern], tmp_path,
         r"checkpoint-4/adapter_model.safetensors: .* has dtype int32; LoRA factors are floating point")


def test_checkpoints_off_the_grid_are_refused_or_listed_never_dropped_silently(tmp_path):
  found = [(s, "lora", tmp_path / f"checkpoint-{s}") for s in (3, 4, 6, 8)]
  with pytest.raises(hf.CheckpointError, match=r"not evenly spaced: .*checkpoint-4, .*checkpoint-8 lie off"):
    runs.select(found, None, None)
  kept, left_out = runs.select(found, 3, None)
  assert [s for s, _, _ in kept] == [3, 6] and left_out == (tmp_path / "checkpoint-4", tmp_path / "checkpoint-8")
  with pytest.raises(hf.CheckpointError, match="--interval 0 must be a positive"):
    runs.select(found, 0, None)


def test_interval_zero_and_a_gguf_base_are_refused_with_what_to_do(runs_dir, tmp_path):
  trl = str(runs_dir["trl"] / "checkpoint-*")
  _fails(["--base", str(runs_dir["base"]), "--checkpoints", trl, "--interval", "0"], tmp_path,
         "--interval 0: must be a positive")
  gguf_file = tmp_path / "model.Q4_1.gguf"
  gguf_file.write_bytes(b"GGUF" + b"\0" * 64)
  _fails(["--base", str(gguf_file), "--checkpoints", trl], tmp_path,
         r"model.Q4_1.gguf: is a GGUF file, not a Hugging Face model directory; convert it once with "
         r"`next-jax-convert --model=")


@pytest.mark.parametrize("case", ["not_utf8", "no_r", "r_text", "r_zero"])
def test_a_bad_adapter_config_is_one_line_naming_file_and_field(case, tmp_path):
  cfg = policy.ModelConfig(vocab_size=64, hidden_size=8, intermediate_size=16, num_layers=1, num_heads=2,
                           num_kv_heads=1)
  acfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}
  path = tmp_path / "adapter_config.json"
  if case == "not_utf8":
    path.write_bytes(json.dumps(acfg).encode().replace(b"LORA", b"LOR\xff"))
    match = r"adapter_config.json: not UTF-8 text \(byte \d+"
  else:
    acfg = {k: v for k, v in acfg.items() if k != "r"} if case == "no_r" else {**acfg, "r": {"r_text": "four",
                                                                                             "r_zero": 0}[case]}
    path.write_text(json.dumps(acfg))
    got = {"no_r": "missing", "r_text": "'four'", "r_zero": "0"}[case]
    match = rf"{re.escape(str(path))}: field 'r' is {got}; expected a whole number ≥ 1"
  with pytest.raises(hf.CheckpointError, match=match):
    peft_io.load_peft_adapter(tmp_path, cfg, config_only=True)


def test_the_installed_command_runs_outside_the_checkout(runs_dir, tmp_path):
  """`next-jax-posthoc` (setup.py's console script) from a directory that is not the checkout (no back-test:
  the other tests cover it; this one is about the command)."""
  import subprocess  # noqa: PLC0415
  import sys  # noqa: PLC0415
  exe = Path(sys.executable).with_name("next-jax-posthoc")
  out = subprocess.run([str(exe), "--base", str(runs_dir["base"]), "--checkpoints",
                        str(runs_dir["trl"] / "checkpoint-*"), "--out", "out", "--k", str(K), "--epochs", "5",
                        "--alphas", "1.5", "--backtest", "none"], cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False)
  assert out.returncode == 0, out.stderr[-2000:]
  assert (tmp_path / "out" / "report.md").is_file() and (tmp_path / "out" / "jump" / "alpha_1.5").is_dir()
