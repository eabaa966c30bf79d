"""NExt over a run trained elsewhere: point it at a verl / TRL / PEFT checkpoint sequence and ask whether
extrapolation would pay on it, then write the jump for that stack.

    next-jax-posthoc --base BASE_HF_DIR \\
        --checkpoints 'RUN/global_step_*/actor/lora_adapter' --out OUT            # verl, LoRA
    next-jax-posthoc --base BASE --checkpoints 'trl_out/checkpoint-*' --out OUT --k 2
    next-jax-posthoc --base BASE --checkpoints 'RUN/global_step_*/actor/huggingface' \\
        --out OUT --alphas 1.5,2.5 --backtest last                                 # merged / full-param

Reads every checkpoint (next_jax.nxt.runs: safetensors only, the step from the directory name, rank, α,
targets and shapes checked against each other and the base), then writes, atomically, OUT/:
    report.md, results.json   E₁ over steps, the R² linearity analysis, the drift measures, the offline
                              back-test of NExt, RL-Extra, AlphaRL and RELEX, and one verdict per method
    e1.png, r2.png, backtest.png
    jump/alpha_<α>/merged/    (α as written on the command line) the extrapolated model W_t + α·σ̂ûv̂ᵀ as an HF directory (base's dtype,
                              config, generation config and tokenizer), for every α of --alphas
    jump/alpha_<α>/adapter/   LoRA runs: a PEFT adapter of rank r+1 that is the same model exactly
Nothing is written when an input is wrong: the error names the path or the flag.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import shlex
import sys
import time
from pathlib import Path

import jax
import numpy as np
from absl import flags

from next_jax.cli import common
from next_jax.core import outdir
from next_jax.core.metrics import progress
from next_jax.models import peft_io
from next_jax.models.hf import CheckpointError
from next_jax.models.policy import merge_lora
from next_jax.nxt import drift, posthoc, runs
from next_jax.nxt import extrapolate as ex
from next_jax.nxt.predictor import PredictorConfig, group_order
from next_jax.nxt.rank1 import SIGN_MODES
from next_jax.rl import trained

OFFICIAL_ALPHAS = "0.5,1.0,1.5,2.0,2.5,3.0,3.5,4.0"


def _flag_values() -> flags.FlagValues:
  """The command's absl flags, on a FlagValues of their own: `main(argv)` parses afresh at every call."""
  fv = flags.FlagValues()
  on = {"flag_values": fv}
  flags.DEFINE_string("base", None, "the base model's HF directory (W₀)", **on)
  flags.DEFINE_string("checkpoints", None, "glob of checkpoint directories (quote it)", **on)
  flags.DEFINE_string("out", None, "output directory (written atomically)", **on)
  flags.DEFINE_integer("interval", None, "steps between snapshots (default: the first step)", **on)
  flags.DEFINE_integer("max_step", None, "ignore checkpoints after this step", **on)
  flags.DEFINE_integer("k", 5, "NExt's target k snapshots ahead (paper: 5)", **on)
  flags.DEFINE_list("alphas", OFFICIAL_ALPHAS, "jump scales α, comma-separated (default: the official grid "
                    "0.5 … 4.0)", **on)
  flags.DEFINE_enum("sign", "max_abs_u", SIGN_MODES, "SVD sign canonicalisation of every triplet: max_abs_u "
                    "(u's largest-|entry| made positive, so targets do not flip sign between snapshots) or none "
                    "(the SVD's own sign, as the official code keeps it: it does not canonicalise)", **on)
  flags.DEFINE_integer("epochs", 1000, "predictor epochs (paper: 1000)", **on)
  flags.DEFINE_enum("backtest", "all", ("all", "last", "none"), "back-test origins", **on)
  flags.DEFINE_string("write", "merged,adapter", "jump formats: merged, adapter (LoRA), or none", **on)
  flags.DEFINE_integer("seed", 0, "predictor seed", **on)
  flags.DEFINE_bool("overwrite", False, "replace an existing --out", **on)
  return fv


def parse_args(argv: list[str]) -> flags.FlagValues:
  """absl flags (`--k=2` or `--k 2`, lists comma-separated, `--overwrite`); --help prints them. A bad or
  missing flag exits with one line naming it."""
  return common.parse(_flag_values(), argv, "next-jax-posthoc", __doc__, required=("base", "checkpoints", "out"),
                      stray="a flag takes one value; lists are comma-separated: --alphas=1.5,3.0")


def parse_alphas(values: list[str]) -> dict[str, float]:
  """--alphas as given (["1.0", "1.5"] from "1.0,1.5") → {text as written: α}, in order. The text names
  the output folder (alpha_1.0). Refuses non-numbers, α ≤ 0 or non-finite, and one α written twice."""
  texts = [t.strip() for v in values for t in v.split(",") if t.strip()]
  given = ",".join(values)
  try:
    alphas = {t: float(t) for t in texts}
  except ValueError as e:
    raise CheckpointError(f"--alphas {given!r}: not a list of numbers") from e
  if not alphas or any(not np.isfinite(a) or a <= 0 for a in alphas.values()):
    raise CheckpointError(f"--alphas {given!r}: every α must be a positive number")
  if len(set(alphas.values())) < len(texts):
    raise CheckpointError(f"--alphas {given!r}: an α is given twice")
  return alphas


def check_args(args) -> tuple[dict[str, float], set[str], Path]:
  """Flag errors as one CheckpointError naming the flag, before anything is read or written."""
  alphas = parse_alphas(args.alphas)
  write = {w for w in args.write.split(",") if w.strip()} - {"none"}
  if write - {"merged", "adapter"}:
    raise CheckpointError(f"--write {args.write!r}: choose from merged, adapter, none")
  if args.k < 1 or args.epochs < 1:
    raise CheckpointError(f"--k {args.k} and --epochs {args.epochs} must be ≥ 1")
  if args.interval is not None and args.interval < 1:
    raise CheckpointError(f"--interval {args.interval}: must be a positive number of steps")
  out = outdir.check_out(args.out, **out_rules(args, write, len(alphas)))
  return alphas, write, out


def out_rules(args, write: set[str], n_alphas: int) -> dict:
  """outdir.check_out's rules for --out: never the base or a checkpoint (or a directory above them), a
  directory next_jax did not write only with --overwrite, and room for the merged models."""
  inputs = [Path(args.base), *(Path(p) for p in glob.glob(args.checkpoints))]
  weights = sum(f.stat().st_size for f in Path(args.base).glob("*.safetensors")) if "merged" in write else 0
  return {"inputs": inputs, "overwrite": args.overwrite, "replace_ours": args.overwrite, "flag": "--overwrite",
          "name": "--out", "need_bytes": n_alphas * weights}


# ------------------------------------------------------------------------------------------ analysis


def analyse(run: runs.CheckpointRun, args) -> dict:
  """Every number of the report (no files written)."""
  traj, times = run.trajectory, {}
  steps = traj.steps
  t0 = time.perf_counter()
  e1, trip = posthoc.e1_series(traj)
  h = posthoc.r2_horizon(len(steps))
  r2 = posthoc.r2_analysis(traj, h, trip, args.sign) if len(steps) - 1 - h >= 2 else {}
  spectra = np.concatenate([np.asarray(t.spectrum[-1]).reshape(-1, t.spectrum.shape[-1]) for t in trip.values()])
  drift_med, _ = drift.trajectory_drift(traj, min(args.k, (len(steps) - 1) // 2), spectra)
  times["analysis"] = time.perf_counter() - t0
  # every back-test origin and the jump train on ≤ K−1−k snapshots: padded to that, they compile once
  pcfg = PredictorConfig(epochs=args.epochs, pad_snapshots=len(steps) - 1 - args.k)
  key = jax.random.PRNGKey(args.seed)
  t0 = time.perf_counter()
  origins = posthoc.backtest_origins(len(steps), args.k, args.backtest)
  rows = posthoc.backtest(traj, args.k, origins, pcfg, key, args.sign)
  times["backtest"] = time.perf_counter() - t0
  t0 = time.perf_counter()
  _, info = ex.next_triplets(traj, args.k, pcfg, jax.random.fold_in(key, len(steps) - 1), args.sign)
  times["next_fit"] = time.perf_counter() - t0
  times.update({f"next_{k}": v for k, v in info["seconds"].items()})  # next_triplets, next_predictor
  return {"e1": e1, "r2": r2, "r2_horizon": h, "drift": drift_med, "backtest": rows,
          "summary": posthoc.summarise(rows) if rows else {}, "origins": [int(steps[t]) for t in origins],
          "jump": {m: jax.tree.map(lambda x: x[0], t) for m, t in info["predicted"].items()},
          "predictor_loss": {g: float(c[-1]) for g, c in info["loss_curves"].items()},
          "sigma_spread": info["sigma_spread"], "times": times}


def write_jumps(out: Path, run: runs.CheckpointRun, jump, alphas, write, last_lora=None) -> list[dict]:
  """jump/alpha_<α>/{merged,adapter} for each α; returns what was written. last_lora: the last snapshot's
  factors (LoRA runs; `main` drops the rest of the trajectory before writing)."""
  if not write:
    return []
  base = runs.last_params(run) if run.kind == "merged" else runs.base_params(run)
  written = []
  bar = progress(len(alphas), desc="writing jumps")
  for text, a in alphas.items():
    d = out / "jump" / f"alpha_{text}"
    row = {"alpha": a, "folder": f"jump/alpha_{text}"}
    if run.kind == "lora":
      lcfg, lora = runs.extend_adapter(last_lora, run.lora_cfg, jump, a)
      if "adapter" in write:
        peft_io.save_peft_adapter(d / "adapter", run.cfg, lora, lcfg, base_model_name_or_path=str(run.base_dir))
        row["adapter"] = f"{row['folder']}/adapter (rank {lcfg.rank}, lora_alpha {lcfg.alpha:g})"
      params = merge_lora(base, lora, lcfg) if "merged" in write else None
    else:
      params = trained.add_to_kernels(base, {m: ex.triplet_delta(t) for m, t in jump.items()}, a)
    if params is not None and "merged" in write:
      runs.save_like(d / "merged", run.base_dir, run.cfg, params)
      row["merged"] = f"{row['folder']}/merged"
    written.append(row)
    bar.update(1)
  bar.close()
  return written


# ------------------------------------------------------------------------------------------ report


def _f(x: float) -> str:
  return f"{x:.3f}" if np.isfinite(x) else str(x)


def plots(out: Path, run: runs.CheckpointRun, res: dict) -> None:
  import matplotlib  # noqa: PLC0415
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  x = run.steps[1:]
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
  for ax, key, title in zip(axes, ("E1", "E1_sq"), ("E₁ = σ₁/Σσᵢ", "σ₁²/Σσᵢ²")):
    for m, v in res["e1"][key].items():
      ax.plot(x, np.median(v, axis=1), marker=".", label=m)
    ax.set(xlabel="RL step", ylabel="median over layers", title=f"{title} of G_i = W_i − W₀")
  axes[0].legend(fontsize="small", ncol=2)
  fig.tight_layout()
  fig.savefig(out / "e1.png", dpi=110)
  plt.close(fig)
  if res["r2"]:
    r2_plot(plt, out / "r2.png", res["r2"])
  if res["backtest"]:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for method in res["summary"]:
      rows = [r for r in res["backtest"] if r["method"] == method]
      for ax, key in zip(axes, ("cos_global", "relerr_global")):
        ax.plot([r["origin"] for r in rows], [r[key] for r in rows], marker="o", label=ex.label(method))
    for ax in axes:  # origins are RL steps: integer ticks, one per origin
      ax.set_xticks(res["origins"])
    axes[1].axhline(1.0, color="grey", ls=":", label="not jumping")
    axes[0].set(xlabel="origin step", ylabel="cosine with the real future", title="back-test: direction")
    axes[1].set(xlabel="origin step", ylabel="‖Δ̂ − Δ‖/‖Δ‖", title="back-test: relative error (α = 1)")
    axes[1].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(out / "backtest.png", dpi=110)
    plt.close(fig)


R2_BINS = ((-np.inf, -1.0, "R² < −1", "#b2182b"), (-1.0, 0.0, "−1 ≤ R² < 0", "#ef8a62"),
           (0.0, 0.5, "0 ≤ R² < 0.5", "#67a9cf"), (0.5, np.inf, "R² ≥ 0.5", "#2166ac"))


def r2_plot(plt, path: Path, r2: dict[str, np.ndarray]) -> None:
  """One horizontal bar per fitted quantity, split into the share of matrices in each R² band: every row
  stays visible however many matrices have a very negative R² (a CDF piles them on one clip line)."""
  fig, ax = plt.subplots(figsize=(7, 0.45 * len(r2) + 1.4))
  labels = list(r2)
  left = np.zeros(len(labels))
  for lo, hi, name, colour in R2_BINS:
    share = np.array([np.mean((r2[k] >= lo) & (r2[k] < hi)) for k in labels])
    ax.barh(labels, share, left=left, color=colour, label=name)
    for y, (x0, w) in enumerate(zip(left, share)):
      if w >= 0.06:
        ax.text(x0 + w / 2, y, f"{w:.0%}", ha="center", va="center", fontsize="x-small", color="white")
    left += share
  ax.invert_yaxis()
  ax.set(xlim=(0, 1), xlabel="share of matrices", title="linear fit on the first snapshots, R² on the last")
  fig.legend(*ax.get_legend_handles_labels(), fontsize="x-small", ncol=4, loc="lower center")
  fig.tight_layout(rect=(0, 0.07, 1, 1))
  fig.savefig(path, dpi=110)
  plt.close(fig)


def report(run: runs.CheckpointRun, res: dict, args, written: list[dict], argv: list[str]) -> str:
  k, steps = args.k, run.steps
  cfg = run.cfg
  what = (f"LoRA r = {run.lora_cfg.rank}, lora_alpha = {run.lora_cfg.alpha:g} (s = {run.scale:g}), targets "
          f"{', '.join(run.lora_cfg.targets)}" if run.kind == "lora" else "merged full models (dense deltas)")
  lines = [f"# NExt post-hoc report: `{args.checkpoints}`", "",
           f"Command: `python -m next_jax.cli.posthoc {shlex.join(argv)}`", "",
           f"- base: `{run.base_dir}` ({cfg.num_layers} layers, hidden {cfg.hidden_size}, vocab {cfg.vocab_size})",
           f"- checkpoints: {len(run.paths)}, {what}",
           f"- snapshots: step 0 (the base) and {', '.join(map(str, steps[1:]))} (every {run.interval} steps); "
           f"k = {k} snapshots = {k * run.interval} steps",
           f"- SVD signs: `--sign {args.sign}`" + (
               " (the SVD's own sign, as the official code keeps it)" if args.sign == "none" else
               " (u's largest-|entry| made positive for G, L and T alike); the official code does not "
               "canonicalise signs (`--sign none` reproduces it)"), ""]
  floor = e1_floor(run)
  lines += ["## E₁ of the global delta G_i = W_i − W₀", "",
            f"Median over every trained matrix; E₁ = 1 means the drift so far is exactly rank 1, and E₁ ≥ "
            f"{floor} always (1/rank of the delta, reached when every singular value is equal): read a median "
            "against that floor, not against 0.", "",
            f"| step | E₁ = σ₁/Σσᵢ (floor {floor}) | σ₁²/Σσᵢ² | " + " | ".join(res["e1"]["E1"]) + " |",
            "|---|---|---|" + "---|" * len(res["e1"]["E1"])]
  for i, s in enumerate(steps[1:]):
    allv = lambda key, i=i: np.median(np.concatenate([v[i] for v in res["e1"][key].values()]))  # noqa: E731
    per = " | ".join(_f(float(np.median(v[i]))) for v in res["e1"]["E1"].values())
    lines.append(f"| {s} | {_f(allv('E1'))} | {_f(allv('E1_sq'))} | {per} |")
  lines += ["", "![E1](e1.png)", ""]
  h = res["r2_horizon"]
  lines += [f"## Linearity: a line fitted on snapshots 1–{len(steps) - 1 - h} predicts the last {h}", ""]
  if res["r2"]:
    lines += ["R² = 1 − SSE/SST per matrix (the paper reports R² < 0 for more than half of the matrices). "
              "u and v depend on the SVD's arbitrary sign; σ and ΔW do not.", "",
              "| fitted quantity | median R² | share R² < 0 |", "|---|---|---|"]
    lines += [f"| {label} | {_f(float(np.median(v)))} | {np.mean(v < 0):.0%} |" for label, v in res["r2"].items()]
    lines += ["", "![R2](r2.png)", ""]
  else:
    lines += [f"Too few snapshots ({len(steps) - 1}) to fit a line on ≥ 2 and predict {h}.", ""]
  lines += ["## Drift measures (next_jax.nxt.drift; medians over matrices)", "", "| measure | value |", "|---|---|"]
  lines += [f"| {key} | {_f(v)} |" for key, v in res["drift"].items()]
  lines += ["", "increment_cos ≈ 1 and growth_exp ≈ 1 mean a straight drift (extrapolation can pay); ≈ 0 and "
            "≈ 0.5 a random walk.", ""]
  lines += [f"## Back-test: each method predicts W_(t+{k}) − W_t from snapshots 0..t", ""]
  if res["summary"]:
    lines += [f"Origins t = {', '.join(map(str, res['origins']))}. Medians over origins of the whole-model cosine, "
              "relative error ‖Δ̂ − Δ‖/‖Δ‖ at α = 1 (not jumping scores exactly 1) and the best scale α*.", "",
              "| method | cos | rel. err | α* | verdict |", "|---|---|---|---|---|"]
    for m, s in res["summary"].items():
      lines.append(f"| {ex.label(m)} | {_f(s['cos'])} | {_f(s['relerr'])} | {_f(s['alpha_star'])} | "
                   f"{posthoc.verdict(s)} |")
    mods = list(next(iter(res["summary"].values()))["modules"])
    lines += ["", "Per module type (cos / rel. err):", "", "| method | " + " | ".join(mods) + " |",
              "|---|" + "---|" * len(mods)]
    for m, s in res["summary"].items():
      cells = " | ".join(f"{s['modules'][x]['cos']:.2f} / {s['modules'][x]['relerr']:.2f}" for x in mods)
      lines.append(f"| {ex.label(m)} | {cells} |")
    lines += ["", "![back-test](backtest.png)", ""]
  else:
    lines += [f"Skipped: {'--backtest none' if args.backtest == 'none' else ''} needs ≥ {2 * k + 2} snapshots "
              f"with W₀ (has {len(steps)}).", ""]
  lines += [f"## The jump: NExt at step {steps[-1]}, predicting {k * run.interval} steps ahead", "",
            "Predictor loss after training, per shape group (the official code's keys: u \"m;1\", v "
            "\"1;n\", σ \"1;1\"): " + ", ".join(
                f"{g}: {v:.4g}" for g, v in sorted(res["predictor_loss"].items(), key=lambda kv: group_order(kv[0]))),
            ""] + sigma_lines(res["sigma_spread"])
  if written:
    lines += ["| α | merged HF model | PEFT adapter |", "|---|---|---|"]
    lines += [f"| {w['alpha']:g} | `{w.get('merged', '–')}` | `{w.get('adapter', '–')}` |" for w in written]
  t = res["times"]
  lines += ["", f"Time: read {t['read']:.1f} s, analysis {t['analysis']:.1f} s, back-test {t['backtest']:.1f} s, "
            f"NExt fit {t['next_fit']:.1f} s (triplets {t['next_triplets']:.1f} s, predictor "
            f"{t['next_predictor']:.1f} s), writing {t.get('write', 0.0):.1f} s.", ""]
  return "\n".join(lines)


def e1_floor(run: runs.CheckpointRun) -> str:
  """The smallest E₁ = σ₁/Σσᵢ can be, 1/rank of the delta: 1/r for a rank-r LoRA G_i (all σᵢ equal)."""
  if run.kind == "lora":
    return f"{1 / run.lora_cfg.rank:.3f}"
  return "1/min(m, n)"


def sigma_lines(spread: dict) -> list[str]:
  """The predicted σ̂ across matrices beside the last training target's σ, and a warning when σ̂ is one
  number for every matrix (`extrapolate.sigma_spread`)."""
  row = lambda name, d: (f"| {name} | {d['min']:.4g} | {d['median']:.4g} | {d['max']:.4g} | "  # noqa: E731
                         f"{d['at_median']:.0%} |")
  lines = [f"σ across the {spread['predicted']['matrices']} trained matrices:", "",
           "| σ | min | median | max | share = median (rel. 1e-6) |", "|---|---|---|---|---|",
           row("predicted σ̂ (the jump)", spread["predicted"]), row("last training target", spread["target"]), ""]
  if warning := ex.sigma_collapse_warning(spread):
    lines += [f"**Warning:** {warning}.", ""]
  return lines


def _jsonable(res: dict, written) -> dict:
  return {"e1": {k: {m: np.asarray(v).tolist() for m, v in d.items()} for k, d in res["e1"].items()},
          "r2": {k: np.asarray(v).tolist() for k, v in res["r2"].items()}, "r2_horizon": res["r2_horizon"],
          "drift": res["drift"], "backtest": res["backtest"], "summary": res["summary"],
          "verdicts": {m: posthoc.verdict(s) for m, s in res["summary"].items()},
          "predictor_loss": res["predictor_loss"], "sigma_spread": res["sigma_spread"], "jump": written,
          "times": res["times"]}


def main(argv=None) -> dict:
  argv = sys.argv[1:] if argv is None else list(argv)
  args = parse_args(argv)
  try:
    alphas, write, out = check_args(args)
    out.parent.mkdir(parents=True, exist_ok=True)
    with outdir.lock(outdir.lock_path(out), f"--out {out}"):  # one post-hoc run per OUT
      outdir.recover(out)  # what a run killed while replacing OUT left; then OUT is checked again
      outdir.check_out(out, **out_rules(args, write, len(alphas)))
      return run_posthoc(args, argv, alphas, write, out)
  except CheckpointError as e:
    sys.exit(f"next-jax-posthoc: {e}")


def check_jump(jump: dict) -> None:
  """Refuse to write a jump with NaN/Inf in it (a diverged predictor), naming the modules."""
  bad = [m for m, t in jump.items() if not all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(t))]
  if bad:
    raise CheckpointError(f"the predicted jump of {', '.join(bad)} is not finite (the predictor diverged); "
                          "nothing was written")


def run_posthoc(args, argv, alphas, write, out: Path) -> dict:
  """Read, analyse and write OUT (main holds OUT's lock); errors are CheckpointErrors naming the input."""
  t0 = time.perf_counter()
  run = runs.read(args.base, args.checkpoints, args.interval, args.max_step)
  if len(run.steps) < args.k + 2:
    raise CheckpointError(f"--k {args.k}: NExt needs ≥ k+1 = {args.k + 1} checkpoints after the base, "
                          f"{len(run.steps) - 1} given")
  for p in run.left_out:
    print(f"posthoc: left out {p}: its step is off the --interval {run.interval} grid", file=sys.stderr)
  read_s = time.perf_counter() - t0
  res = analyse(run, args)
  res["times"]["read"] = read_s
  check_jump(res["jump"])
  last = runs.last_lora(run) if run.kind == "lora" else None
  run = dataclasses.replace(run, trajectory=None)  # free it (5 GB at 1.5B) before the base is loaded to write

  def write_all(tmp: Path):
    t1 = time.perf_counter()
    written = write_jumps(tmp, run, res["jump"], alphas, write, last)
    res["times"]["write"] = time.perf_counter() - t1
    plots(tmp, run, res)
    (tmp / "report.md").write_text(report(run, res, args, written, argv))
    (tmp / "results.json").write_text(json.dumps(_jsonable(res, written), indent=1))
    res["written"] = written

  outdir.atomic_dir(out, write_all, **out_rules(args, write, len(alphas)))
  if warning := ex.sigma_collapse_warning(res["sigma_spread"]):
    print(f"warning: {warning}", file=sys.stderr)
  print(f"wrote {out}/report.md")
  return res


def cli() -> None:
  """The console script `next-jax-posthoc`."""
  main()


if __name__ == "__main__":
  cli()
