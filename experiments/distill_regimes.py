"""The distillation regime study (issue 21): screen the forms, run the regimes, report.

    python -m experiments.distill_regimes \
        --config experiments/configs/fashion_mnist_distill_regimes.py \
        --workdir runs/regimes --out experiments/results/fashion_mnist [--parallel 2]

Every run is an `experiments.run` subprocess (`experiments.sweep_exec.execute`: skipped when
its results.json exists, refused when its config.json disagrees with the plan), so the
study resumes after a crash. The plan functions are pure; `main` runs and reports.
"""
from __future__ import annotations

import json
import os
import statistics
from typing import Dict, List, Optional, Sequence, Tuple

from absl import app, flags
from ml_collections import config_flags

from experiments import sweep_report
from experiments.sweep_exec import execute
from experiments.sweep_plan import Run, format_value

config_flags.DEFINE_config_file("config", None, "Regime study config (get_config()).")
flags.DEFINE_string("workdir", "runs/regimes", "Where the runs' workdirs go.")
flags.DEFINE_string("out", "experiments/results/fashion_mnist", "Where the CSV and plot go.")
flags.DEFINE_integer("parallel", 1, "Runs at a time.")
flags.DEFINE_string("phases", "screen,final,report", "Phases to run, in order.")
flags.DEFINE_string("regimes", "", "Final phase: only these regimes (default: all, in "
                    "the config's regime_order).")

CSV_FIELDS = ("regime", "method", "aqd_form", "sqd_form", "alpha", "beta", "kd_weight", "seed",
              "w_bits", "a_bits", "split", "top1", "step_s", "run")
BASELINE = {"aqd_form": "channel_mse", "aqd_alpha": 0.0, "sqd_form": "bypass_kl",
            "sqd_beta": 0.0}


def parse_points(spec: str) -> List[Tuple[str, float]]:
  """'channel_mse:0.3,speq:1' -> [('channel_mse', 0.3), ('speq', 1.0)]."""
  out = []
  for item in filter(None, spec.split(",")):
    form, _, weight = item.partition(":")
    out.append((form, float(weight)))
  return out


def regime_overrides(cfg, regime: str) -> Dict[str, str]:
  """The config overrides of a regime (init_from: the FP checkpoint, or none)."""
  if regime not in cfg.regimes:
    raise ValueError(f"regime {regime!r}; valid: {sorted(cfg.regimes)}")
  spec = dict(cfg.regimes[regime])
  from_fp = spec.pop("init_from_fp")
  ov = {k: format_value(v) for k, v in {**dict(cfg.fixed), **spec}.items()}
  ov["init_from"] = cfg.fp_workdir if from_fp else ""
  return ov


def make_run(cfg, regime: str, method: str, seed: int, split: str,
             aqd: Tuple[str, float] = None, sqd: Tuple[str, float] = None,
             kd: Optional[float] = None) -> Run:
  """One run; aqd / sqd: (form, weight) for the method's terms, kd: the classic-KD weight
  (each required exactly when the method names the term)."""
  parts = method.split("+")
  if (("aqd" in parts) != (aqd is not None) or ("sqd" in parts) != (sqd is not None)
      or ("kd" in parts) != (kd is not None)):
    raise ValueError(f"method {method!r} with aqd={aqd}, sqd={sqd}, kd={kd}: give a (form, "
                     f"weight) or weight for exactly the terms the method names")
  if kd is not None and not cfg.regimes[regime].get("init_from_fp"):
    raise ValueError(f"regime {regime!r} has no FP checkpoint: +kd needs one as its teacher")
  ov = {"method": method, "w_bits": str(cfg.bits), "a_bits": str(cfg.bits), "seed": str(seed),
        "eval_on": split, **regime_overrides(cfg, regime),
        **{k: format_value(v) for k, v in BASELINE.items()}}
  tag = ""
  if aqd:
    ov.update(aqd_form=aqd[0], aqd_alpha=format_value(aqd[1]))
    tag += f"_{aqd[0]}{format_value(aqd[1])}"
  if sqd:
    ov.update(sqd_form=sqd[0], sqd_beta=format_value(sqd[1]))
    tag += f"_{sqd[0]}{format_value(sqd[1])}"
  if kd is not None:
    ov["kd_weight"] = format_value(kd)
    tag += f"_kd{format_value(kd)}"
  name = f"{regime}_{method.replace('+', '_')}{tag}_s{seed}_{split[:4]}"
  return Run(name, tuple(sorted(ov.items())))


def regime_of(run: Run) -> str:
  """'R2_pq_aqd_..._s0_test' -> 'R2'."""
  return run.name.split("_", 1)[0]


def kd_weights(cfg) -> List[float]:
  """cfg.kd_weights '0.3,1' -> [0.3, 1.0] (classic KD's screened weights)."""
  return [float(w) for w in filter(None, cfg.kd_weights.split(","))]


def screen_runs(cfg) -> List[Run]:
  """pq, each AQD point (pq+aqd), each SQD point (pq+sqd) and each classic-KD weight (pq+kd):
  screen regime, seed 0, validation."""
  r = cfg.screen_regime
  return ([make_run(cfg, r, "pq", 0, "validation")] +
          [make_run(cfg, r, "pq+aqd", 0, "validation", aqd=p) for p in parse_points(cfg.aqd_points)] +
          [make_run(cfg, r, "pq+sqd", 0, "validation", sqd=p) for p in parse_points(cfg.sqd_points)] +
          [make_run(cfg, r, "pq+kd", 0, "validation", kd=w) for w in kd_weights(cfg)])


def pick(cfg, results: Sequence[Optional[dict]]) -> Dict[str, Tuple[str, float]]:
  """The best (form, weight) of each term by validation top-1 (ties: the first listed);
  "kd": ("kl", weight) for classic KD."""
  runs = screen_runs(cfg)
  best: Dict[str, Tuple[float, Tuple[str, float]]] = {}
  for run, res in zip(runs, results):
    if res is None:
      continue
    ov = dict(run.overrides)
    for term, weight_field in (("aqd", "aqd_alpha"), ("sqd", "sqd_beta"), ("kd", "kd_weight")):
      if term in ov["method"].split("+"):
        point = (ov.get(f"{term}_form", "kl"), float(ov[weight_field]))
        if term not in best or res["top1"] > best[term][0]:
          best[term] = (res["top1"], point)
  return {t: p for t, (_, p) in best.items()}


def final_runs(cfg, winners: Dict[str, Tuple[str, float]], regimes: Sequence[str]) -> List[Run]:
  """Every regime x method x seed on the test set (seed-major within a regime); pq+kd (the
  baseline AQD / SQD claim to replace) after them in the regimes of cfg.kd_regimes."""
  if missing := [t for t in ("aqd", "sqd") if t not in winners]:
    raise ValueError(f"no screen result for {missing}: run the screen phase first")
  kd_regimes = set(filter(None, cfg.kd_regimes.split(",")))
  if kd_regimes and "kd" not in winners:
    raise ValueError("no screen result for ['kd']: run the screen phase first")
  runs = []
  for regime in regimes:
    methods = cfg.methods.split(",") + (["pq+kd"] if regime in kd_regimes else [])
    for seed in range(int(cfg.seeds)):
      for method in methods:
        parts = method.split("+")
        runs.append(make_run(cfg, regime, method, seed, "test",
                             aqd=winners["aqd"] if "aqd" in parts else None,
                             sqd=winners["sqd"] if "sqd" in parts else None,
                             kd=winners["kd"][1] if "kd" in parts else None))
  return runs


def csv_row(run: Run, res: dict) -> dict:
  ov = dict(run.overrides)
  parts = ov["method"].split("+")
  steps = max(int(res.get("train_steps", 0)), 1)
  return {"regime": regime_of(run), "method": ov["method"],
          "aqd_form": ov["aqd_form"] if "aqd" in parts else "",
          "sqd_form": ov["sqd_form"] if "sqd" in parts else "",
          "alpha": ov["aqd_alpha"] if "aqd" in parts else "",
          "beta": ov["sqd_beta"] if "sqd" in parts else "",
          "kd_weight": ov["kd_weight"] if "kd" in parts else "",
          "seed": ov["seed"], "w_bits": ov["w_bits"], "a_bits": ov["a_bits"],
          "split": ov["eval_on"], "top1": f"{100 * res['top1']:.2f}",
          "step_s": f"{float(res.get('train_seconds', 0.0)) / steps:.3f}", "run": run.name}


def cells_of(rows: Sequence[dict]) -> Dict[Tuple[str, str], List[float]]:
  """{(regime, method): [test top-1 % of each seed]} from `csv_row` rows."""
  cells: Dict[Tuple[str, str], List[float]] = {}
  for r in rows:
    if r["split"] == "test":
      cells.setdefault((r["regime"], r["method"]), []).append(float(r["top1"]))
  return cells


def verdicts(rows: Sequence[dict]) -> List[dict]:
  """Per regime and distillation method on the test set: mean gain over pq and whether it
  helps (issue 21's rule: mean gain >= +0.3 pt, larger than both cells' std, >= 3 seeds)."""
  cells = cells_of(rows)
  out = []
  for (regime, method), xs in sorted(cells.items()):
    base = cells.get((regime, "pq"))
    if method == "pq" or not base:
      continue
    m, s = sweep_report.mean_std(xs)
    bm, bs = sweep_report.mean_std(base)
    gain, helps, _ = sweep_report.claim_holds(xs, base, min_gain=0.3, min_seeds=3)
    v = {"regime": regime, "method": method, "n": len(xs), "top1": m, "std": s,
         "pq": bm, "pq_std": bs, "pq_n": len(base), "gain": gain, "helps": helps}
    kd = cells.get((regime, "pq+kd"))
    if kd and method != "pq+kd":  # against the classic KD it claims to replace, same rule
      v["kd_gain"], v["beats_kd"], _ = sweep_report.claim_holds(xs, kd, min_gain=0.3,
                                                                min_seeds=3)
      v["kd_n"] = len(kd)
    out.append(v)
  return out


def verdict_word(v: dict) -> str:
  """'yes', 'no', or 'not yet (< 3 seeds)' for a `verdicts` row."""
  if v["helps"]:
    return "yes"
  return "no" if min(v["n"], v["pq_n"]) >= 3 else "not yet (< 3 seeds)"


def summary_markdown(rows: Sequence[dict]) -> str:
  """The test-set table: per regime and method, top-1 mean +- std (seeds), the gain over
  pq and the verdict by issue 21's rule."""
  cells = cells_of(rows)
  verdict = {(v["regime"], v["method"]): v for v in verdicts(rows)}
  lines = ["| regime | method | test top-1 (%) | seeds | gain over pq | helps? | vs pq+kd |",
           "|---|---|---|---|---|---|---|"]
  for (regime, method), xs in sorted(cells.items()):
    m, s = sweep_report.mean_std(xs)
    v = verdict.get((regime, method))
    gain = "–" if v is None else f"{v['gain']:+.2f}"
    helps = "–" if v is None else verdict_word(v)
    vs_kd = "–"
    if v is not None and "kd_gain" in v:
      word = ("better" if v["beats_kd"] else
              "not better" if min(v["n"], v["kd_n"]) >= 3 else "not yet")
      vs_kd = f"{v['kd_gain']:+.2f} ({word})"
    lines.append(f"| {regime} | {method} | {m:.2f} ± {s:.2f} | {len(xs)} | {gain} | {helps} "
                 f"| {vs_kd} |")
  return "\n".join(lines) + "\n"


def plot(rows: Sequence[dict], path: str) -> None:
  """Per regime, each method's gain over pq (test top-1 points): bar = mean gain, error bar =
  the method cell's std, dots = its seeds (each against pq's mean); the rule's +0.3 line."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  cells = cells_of(rows)
  regimes = sorted({k[0] for k in cells if (k[0], "pq") in cells})
  methods = [m for m in ("pq+aqd", "pq+sqd", "pq+aqd+sqd", "pq+kd")
             if any((r, m) in cells for r in regimes)]
  fig, ax = plt.subplots(figsize=(7.5, 3.8))
  width = 0.8 / max(len(methods), 1)
  for i, m in enumerate(methods):
    xs = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(regimes))]
    base = [statistics.mean(cells[(r, "pq")]) for r in regimes]
    vals = [[x - b for x in cells.get((r, m), [])] for r, b in zip(regimes, base)]
    means = [statistics.mean(v) if v else float("nan") for v in vals]
    stds = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in vals]
    ax.bar(xs, means, width, yerr=stds, capsize=3, label=m,
           hatch="//" if m == "pq+kd" else None)
    for x, v in zip(xs, vals):
      ax.plot([x] * len(v), v, "k.", ms=3)
  ax.axhline(0.0, color="k", lw=0.8)
  ax.axhline(0.3, color="gray", ls="--", lw=0.8, label="rule: +0.3")
  ax.set_xticks(range(len(regimes)),
                [f"{r}\npq {statistics.mean(cells[(r, 'pq')]):.2f} %" for r in regimes])
  ax.set_ylabel("test top-1 gain over pq (points)")
  ax.set_title("Fashion-MNIST W2A2, vig_tiny_28: gain of each term over pq (mean, std, seeds)",
               fontsize=10)
  ax.legend(fontsize=8, ncol=3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv):
  del argv
  cfg = flags.FLAGS.config
  if cfg is None:
    raise app.UsageError("--config is required, e.g. "
                         "experiments/configs/fashion_mnist_distill_regimes.py")
  workdir, out, parallel = flags.FLAGS.workdir, flags.FLAGS.out, flags.FLAGS.parallel
  phases = flags.FLAGS.phases.split(",")
  os.makedirs(workdir, exist_ok=True)
  os.makedirs(out, exist_ok=True)
  if not os.path.exists(os.path.join(cfg.fp_workdir, "results.json")):
    raise app.UsageError(f"the FP checkpoint {cfg.fp_workdir} has no results.json yet")
  screen = screen_runs(cfg)
  screen_res = execute(screen, cfg, workdir, parallel, "screen" in phases)
  winners = pick(cfg, screen_res)
  print("screen winners:", winners, flush=True)
  with open(os.path.join(out, "distill_regimes_winners.json"), "w") as f:
    json.dump({t: {"form": p[0], "weight": p[1]} for t, p in winners.items()}, f, indent=2)
  # Runs only the regimes asked for, but reports every regime's finished runs.
  chosen = (flags.FLAGS.regimes or cfg.regime_order).split(",")
  regimes = list(dict.fromkeys(cfg.regime_order.split(",") + chosen))
  final = final_runs(cfg, winners, regimes) if {"aqd", "sqd"} <= set(winners) else []
  run_now = [r for r in final if regime_of(r) in chosen]
  others = [r for r in final if regime_of(r) not in chosen]
  final = run_now + others
  final_res = (execute(run_now, cfg, workdir, parallel, "final" in phases)
               + execute(others, cfg, workdir, parallel, False))
  rows = [csv_row(r, res) for r, res in zip(screen + final, screen_res + final_res) if res]
  sweep_report.write_csv(os.path.join(out, "distill_regimes.csv"), rows, CSV_FIELDS)
  if any(r["split"] == "test" for r in rows):
    plot(rows, os.path.join(out, "distill_regimes.png"))
    with open(os.path.join(out, "distill_regimes.md"), "w") as f:
      f.write(summary_markdown(rows))
  for v in verdicts(rows):
    print(f"{v['regime']} {v['method']}: {v['top1']:.2f} +- {v['std']:.2f} (n={v['n']}) vs pq "
          f"{v['pq']:.2f} +- {v['pq_std']:.2f}: gain {v['gain']:+.2f} -> "
          f"helps: {verdict_word(v)}" + (f"; vs pq+kd {v['kd_gain']:+.2f}" if "kd_gain" in v
                                          else ""), flush=True)


if __name__ == "__main__":
  app.run(main)
