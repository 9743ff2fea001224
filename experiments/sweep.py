"""Ablation sweep: FP pretraining -> validation sweeps -> main table, then CSV / Markdown / PNG.

    python -m experiments.sweep --config experiments/configs/fashion_mnist_ablation.py \
        --workdir runs/ablation [--parallel N] [--out experiments/results/fashion_mnist]

Every run is a `python -m experiments.run` subprocess with its own workdir; a run
whose results.json exists is skipped, so the sweep resumes after a crash. With
--parallel N, N runs share the machine (on a GPU many; on 2 CPU cores 2, which overlaps one
run's single-threaded compile with the other's training). Each run's config.json must agree
with the plan before it is reused (check_matches_plan).
"""
from __future__ import annotations

import csv
import dataclasses
import importlib
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional, Sequence, Tuple

from absl import app, flags
from ml_collections import config_flags

from qgnn_jax import quant

config_flags.DEFINE_config_file("config", None, "Ablation config (get_config()).")
flags.DEFINE_string("workdir", "runs/ablation", "Where the runs' workdirs go.")
flags.DEFINE_string("out", "experiments/results/fashion_mnist", "Where tables and plots go.")
flags.DEFINE_integer("parallel", 1, "Runs at a time.")
flags.DEFINE_string("phases", "fp,sweep,main,report",
                    "Phases to run, in order; 'report' alone rebuilds the outputs from "
                    "the results.json files already there.")
flags.DEFINE_float("deadline_s", 0.0, "If > 0, start no new run after this many seconds.")
flags.DEFINE_bool("rerun_stale", False,
                  "Rerun a run whose saved settings differ from the plan (new sweep winners), "
                  "moving the old one to WORKDIR/stale/; without it the sweep refuses.")

CSV_FIELDS = ("run", "dataset", "model", "method", "w_bits", "a_bits", "seed", "top1", "fp_top1",
              "train_steps", "train_seconds", "params", "model_bytes_fp32",
              "model_bytes_quantized")


@dataclasses.dataclass(frozen=True)
class Run:
  """One experiments.run invocation: name (= workdir basename) and config overrides."""
  name: str
  overrides: Tuple[Tuple[str, str], ...]


def _fmt(v) -> str:
  return repr(v) if isinstance(v, float) else str(v)


def num_fp_seeds(cfg) -> int:
  """FP checkpoints to train: cfg.fp_seeds if > 0, else one per QAT seed.

  With fewer FP checkpoints than QAT seeds, QAT seed s starts from fp_s{s % fp_seeds}
  (the CPU protocol shares one FP model; seeds then vary the QAT data order and init).
  """
  fp_seeds = int(cfg.get("fp_seeds", 0))
  if fp_seeds < 0:
    raise ValueError(f"fp_seeds={fp_seeds}; valid: 0 (one per QAT seed) or a positive count")
  return fp_seeds if fp_seeds > 0 else max(parse_seeds(cfg.seeds).values())


def fp_runs(cfg) -> List[Run]:
  """The FP pretraining runs fp_s0, fp_s1, ... (evaluated on the test set)."""
  seeds = num_fp_seeds(cfg)
  return [Run(f"fp_s{s}", (("method", "fp"), ("seed", str(s)), ("num_epochs", _fmt(cfg.fp_epochs)),
                          ("lr", _fmt(cfg.fp_lr)), ("drop_path", _fmt(cfg.fp_drop_path)),
                          ("eval_on", "test")))
          for s in range(seeds)]


def parse_seeds(spec: str) -> Dict[int, int]:
  """'4:2,2:3' -> {4: 2, 2: 3}."""
  return {int(b): int(n) for b, n in (item.split(":") for item in spec.split(","))}


def parse_sweeps(spec: str) -> List[Tuple[str, str, int, List[str]]]:
  """'lam:pq:4:2,3;...' -> [(field, method, bits, [values])]."""
  out = []
  for item in filter(None, spec.split(";")):
    field, method, bits, values = item.split(":")
    out.append((field, method, int(bits), values.split(",")))
  return out


def qat_run(cfg, workdir: str, method: str, bits: int, seed: int, eval_on: str,
            extra: Sequence[Tuple[str, str]] = (), tag: str = "") -> Run:
  name = f"{method.replace('+', '_')}_w{bits}a{bits}_s{seed}{tag}"
  ov = [("method", method), ("w_bits", str(bits)), ("a_bits", str(bits)), ("seed", str(seed)),
        ("num_epochs", _fmt(cfg.qat_epochs)), ("lr", _fmt(cfg.qat_lr)),
        ("warmup_epochs", _fmt(cfg.qat_warmup_epochs)), ("eval_on", eval_on),
        ("init_from", os.path.join(workdir, f"fp_s{seed % num_fp_seeds(cfg)}"))]
  return Run(name, tuple(ov) + tuple(extra))


def run_defaults(cfg) -> Dict[str, object]:
  """The run config every sweep point starts from: cfg.base_config's get_config() + cfg.run."""
  module = importlib.import_module(cfg.base_config.replace(os.sep, ".").removesuffix(".py"))
  base = module.get_config()
  base.update(cfg.run)
  return dict(base.items())


def _canonical(v: object) -> object:
  """A config value or its command-line text, in a form where equal settings compare equal."""
  if isinstance(v, bool) or str(v).strip().lower() in ("true", "false"):
    return str(v).strip().lower() == "true"
  try:
    return float(v)  # "5e-4" == "0.0005" == 5e-4
  except (TypeError, ValueError):
    return str(v)


def same_value(text: object, default: object) -> bool:
  """Whether a sweep value (as written in the config string) is the run's default."""
  return _canonical(text) == _canonical(default)


def sweep_runs(cfg, workdir: str) -> List[Tuple[str, str, Run]]:
  """(field, value, run) for every sweep point; seed 0, evaluated on validation.

  A point at the run's default value is one shared run per (method, bits), named
  `..._default`, whatever field it belongs to: it is trained once.
  """
  base = run_defaults(cfg)
  centre = {k: _fmt(v) for k, v in cfg.get("sweep_centre", {}).items()}
  out = []
  for field, method, bits, values in parse_sweeps(cfg.sweeps):
    if field not in base:
      raise ValueError(f"sweep field {field!r} is not a run config field; valid: "
                       f"{sorted(base)}")
    # What the point trains with anyway: run config, the sweeps' centre, qat_run's settings.
    defaults = {**base, **centre,
                **dict(qat_run(cfg, workdir, method, bits, 0, "validation").overrides)}
    for v in values:
      if same_value(v, defaults[field]):
        run = qat_run(cfg, workdir, method, bits, 0, "validation", tuple(centre.items()),
                      tag="_default")
      else:
        extra = tuple(item for item in centre.items() if item[0] != field) + ((field, v),)
        run = qat_run(cfg, workdir, method, bits, 0, "validation", extra, tag=f"_{field}{v}")
      out.append((field, v, run))
  return out


def main_cells(cfg) -> List[Tuple[int, int]]:
  """(bits, seed) blocks of the main table in run order.

  cfg.main_order ('2:0,2:1,4:0,...') if set, and it must list every cell once; otherwise
  seed-major over cfg.bits (every method at every bit-width gets seed 0 before any gets
  seed 1), then W3A3 seed-major last. Either way a sweep cut short by its deadline still
  has whole rows.
  """
  seeds = parse_seeds(cfg.seeds)
  bits = [int(b) for b in cfg.bits.split(",")]
  if 3 in bits:
    raise ValueError(f"bits={cfg.bits!r}: W3A3 is set by seeds '3:n' and w3_methods, not bits")
  if missing := [b for b in bits if b not in seeds]:
    raise ValueError(f"bits {missing} have no seed count in seeds={cfg.seeds!r}")
  cells = [(b, s) for s in range(max(seeds[b] for b in bits)) for b in bits if s < seeds[b]]
  if 3 in seeds:
    cells += [(3, s) for s in range(seeds[3])]
  if cfg.get("main_order"):
    try:
      order = [tuple(int(v) for v in item.split(":")) for item in cfg.main_order.split(",")]
    except ValueError:
      order = None
    if order is None or sorted(order) != sorted(cells):
      raise ValueError(f"main_order={cfg.main_order!r} must list each (bits:seed) cell once: "
                       f"{sorted(cells)}")
    cells = order
  return cells


# Grid fields are read by both range quantizers: a winner found with pq also sets min-max's
# grid, so that claim (1) compares range estimators on one grid. LSQ has its own signed grid.
GRID_FIELDS = frozenset({"w_symmetric", "a_symmetric", "w_granularity", "a_granularity"})
# The registry entries whose grid comes from a data range (the grid fields apply to them).
RANGE_QUANTIZERS = frozenset(n for n in quant.QUANTIZERS.names()
                             if quant.QUANTIZERS.get(n).tracks_range)


def winner_applies(swept: Sequence[Tuple[str, str]], field: str, method: str) -> bool:
  """Whether a sweep winner for `field` is a setting of `method`; swept: (field, method) pairs.

  A field swept with method M (e.g. aqd_alpha with pq+aqd) belongs to every method that has
  all of M's parts (pq+aqd, pq+aqd+sqd), not to the others: a minmax run is not redone
  because AQD's alpha changed. Grid fields (GRID_FIELDS) count the range quantizers (min-max, pq) as one part.
  """
  parts = set(method.split("+"))
  if field in GRID_FIELDS and parts & RANGE_QUANTIZERS:
    parts |= RANGE_QUANTIZERS
  return any(f == field and set(m.split("+")) <= parts for f, m in swept)


def main_runs(cfg, workdir: str, winners: Dict[str, str]) -> List[Run]:
  """The main table's runs, in main_cells order, each with the sweep winners it uses."""
  swept = [(f, m) for f, m, _, _ in parse_sweeps(cfg.sweeps)]
  runs = []
  for bits, s in main_cells(cfg):
    methods = cfg.w3_methods.split(",") if bits == 3 else cfg.methods.split(",")
    for method in methods:
      extra = tuple((k, v) for k, v in winners.items() if winner_applies(swept, k, method))
      runs.append(qat_run(cfg, workdir, method, bits, s, "test", extra))
  return runs


def run_settings(cfg, run: Run) -> Dict[str, object]:
  """Every config override a run is started with: cfg.run, then the run's own overrides."""
  return {**dict(cfg.run.items()), **dict(run.overrides)}


def check_matches_plan(settings: Dict[str, object], wd: str) -> None:
  """Refuses to reuse (or resume) a run whose saved config.json disagrees with the plan.

  Run names do not encode the sweep winners, so after new sweep results a run of the same
  name can mean other settings: reusing it silently would mix settings in one table. Nor
  may a fine-tune outlive its FP checkpoint: if the init_from run finished after this run
  started (it was retrained), the run is refused too. Raises ValueError saying why.
  """
  path = os.path.join(wd, "config.json")
  if not os.path.exists(path):
    return
  init = settings.get("init_from")
  if init:
    fp_res = os.path.join(str(init), "results.json")
    if os.path.exists(fp_res) and os.path.getmtime(fp_res) > os.path.getmtime(path):
      raise ValueError(f"{wd} was fine-tuned from an earlier {init} (retrained since)")
  with open(path) as f:
    saved = json.load(f)
  for k, v in settings.items():
    if k not in saved:
      continue
    if k == "init_from":
      same = os.path.abspath(v) == os.path.abspath(str(saved[k]))
    else:
      same = same_value(v, saved[k])
    if not same:
      raise ValueError(f"{wd} was run with {k}={saved[k]!r} but the plan asks {k}={v}")


def set_aside(workdir: str, name: str) -> str:
  """Moves run `name` to workdir/stale/ (never overwriting an earlier one); returns where."""
  dest = os.path.join(workdir, "stale", name)
  n = 1
  while os.path.exists(dest):
    dest, n = os.path.join(workdir, "stale", f"{name}.{n}"), n + 1
  os.makedirs(os.path.dirname(dest), exist_ok=True)
  os.rename(os.path.join(workdir, name), dest)
  return dest


def execute(runs: Sequence[Run], cfg, workdir: str, parallel: int, run_missing: bool = True,
            deadline: float = 0.0, rerun_stale: bool = False) -> List[Optional[dict]]:
  """Runs what is missing (parallel subprocesses); returns each run's results (or None).

  run_missing=False only collects existing results; no run starts after the
  wall-clock time `deadline` (if > 0). A run whose saved settings differ from the plan
  is refused (ValueError), or with rerun_stale moved to workdir/stale/ and run again.
  """
  unique: Dict[str, Run] = {}
  for r in runs:  # a shared run is trained once; a name must always mean one setting
    if unique.setdefault(r.name, r).overrides != r.overrides:
      raise ValueError(f"run {r.name!r} is planned with two settings: "
                       f"{unique[r.name].overrides} and {r.overrides}")
  stale, rerun = set(), {}
  for r in unique.values():  # all checked before anything starts
    try:
      check_matches_plan(run_settings(cfg, r), os.path.join(workdir, r.name))
    except ValueError as e:
      if run_missing and rerun_stale:
        rerun[r.name] = str(e)  # set aside when (and only if) it is about to start again
        continue
      if run_missing:
        raise ValueError(f"{e}; delete that run, use another --workdir or pass "
                         f"--rerun_stale") from None
      print(f"skipped (settings differ from the plan): {e}", flush=True)
      stale.add(r.name)

  def one(run: Run) -> Optional[dict]:
    wd = os.path.join(workdir, run.name)
    res = os.path.join(wd, "results.json")
    if run.name in stale:
      return None
    if run.name in rerun or not os.path.exists(res):
      if not run_missing or (deadline and time.time() > deadline):
        return None
      if run.name in rerun:
        print(f"rerunning {run.name} ({rerun[run.name]}); the old run is now "
              f"{set_aside(workdir, run.name)}", flush=True)
      os.makedirs(wd, exist_ok=True)
      overrides = [f"--config.{k}={v}" for k, v in run_settings(cfg, run).items()]
      cmd = [sys.executable, "-m", "experiments.run", f"--config={cfg.base_config}",
             f"--workdir={wd}", *overrides]
      t0 = time.time()
      with open(os.path.join(wd, "log.txt"), "a") as log:
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)
      print(f"[{time.strftime('%H:%M:%S')}] {run.name}: rc={rc} ({time.time() - t0:.0f} s)",
            flush=True)
      if not os.path.exists(res):
        return None
      if rc != 0:  # seen on a GPU: an abort at interpreter exit, after every output was saved
        print(f"{run.name}: exit status {rc} after its results.json was written; kept",
              flush=True)
    try:
      with open(res) as f:
        return {"run": run.name, **json.load(f)}
    except json.JSONDecodeError as e:  # e.g. cut off mid-write by an older experiments.run
      print(f"{run.name}: unreadable {res} ({e}); counted as missing", flush=True)
      return None
  with ThreadPoolExecutor(max(1, parallel)) as pool:
    done = dict(zip(unique, pool.map(one, unique.values())))
  return [done[r.name] for r in runs]


# ----------------------------------------------------------------------------- reports


def mean_std(xs: Sequence[float]) -> Tuple[float, float]:
  return (statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0)


def pick_winners(points: Sequence[Tuple[str, str, Optional[dict]]]) -> Tuple[Dict[str, str], list]:
  """Best value per field by mean validation top-1 (over its sweeps). Returns (winners, rows)."""
  by_field: Dict[str, Dict[str, List[float]]] = {}
  rows = []
  for field, value, res in points:
    if res is None:
      continue
    by_field.setdefault(field, {}).setdefault(value, []).append(res["top1"])
    rows.append({"field": field, "value": value, "method": res["method"], "bits": res["w_bits"],
                 "val_top1": res["top1"], "run": res["run"]})
  winners = {f: max(vals, key=lambda v: statistics.mean(vals[v])) for f, vals in by_field.items()}
  return winners, rows


def summarize_sweeps(rows: Sequence[dict], winners: Dict[str, str]) -> str:
  """Markdown: one line per swept field, validation top-1 (%) per value, winner in bold."""
  by_field: Dict[Tuple[str, str, int], Dict[str, List[float]]] = {}
  for r in rows:
    by_field.setdefault((r["field"], r["method"], r["bits"]), {}).setdefault(
        r["value"], []).append(100 * r["val_top1"])
  lines = ["| field | method | bits | validation top-1 (%) per value | winner |",
           "|---|---|---|---|---|"]
  for (field, method, bits), vals in by_field.items():
    cells = ", ".join((f"**{v}: {statistics.mean(x):.2f}**" if v == winners.get(field)
                       else f"{v}: {statistics.mean(x):.2f}") for v, x in vals.items())
    lines.append(f"| {field} | {method} | W{bits}A{bits} | {cells} | {winners.get(field, '-')} |")
  return "\n".join(lines)


def write_csv(path: str, rows: Sequence[dict], fields: Sequence[str]) -> None:
  with open(path, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(fields), extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)


def top1_cells(results: Sequence[dict]) -> Dict[Tuple[str, int], List[float]]:
  """(method, bits) -> test top-1 (%) of each seed."""
  cells: Dict[Tuple[str, int], List[float]] = {}
  for r in results:
    cells.setdefault((r["method"], r["w_bits"]), []).append(100 * r["top1"])
  return cells


def summarize(results: Sequence[dict], fp_results: Sequence[dict],
              overhead: Optional[Dict[str, float]] = None) -> str:
  """Markdown mean ± std top-1 (%) per method x bits, plus FP and the overhead column."""
  cells = top1_cells(results)
  bits = sorted({b for _, b in cells}, reverse=True)
  methods = list(dict.fromkeys(r["method"] for r in results))
  head = "| method | " + " | ".join(f"W{b}A{b}" for b in bits) + " | step time vs pq |"
  lines = [head, "|---|" + "---|" * (len(bits) + 1)]
  if fp_results:
    m, s = mean_std([100 * r["top1"] for r in fp_results])
    ov = overhead.get("fp") if overhead else None
    lines.append(f"| fp (32-bit) | {m:.2f} ± {s:.2f} (n={len(fp_results)}) |"
                 + " - |" * (len(bits) - 1) + (f" {ov:.2f}x |" if ov else " - |"))
  for method in methods:
    row = [f"| {method} "]
    for b in bits:
      xs = cells.get((method, b))
      row.append(f" {mean_std(xs)[0]:.2f} ± {mean_std(xs)[1]:.2f} (n={len(xs)}) " if xs else " - ")
    ov = overhead.get(method) if overhead else None
    row.append(f" {ov:.2f}x " if ov else " - ")
    lines.append("|".join(row) + "|")
  return "\n".join(lines)


# (label, method a, method b): the paper's claims as "a beats b" comparisons.
CLAIMS = (
    ("(1) PQ's range beats min-max", "pq", "minmax"),
    ("(2) AQD improves PQ", "pq+aqd", "pq"),
    ("(3) SQD improves PQ", "pq+sqd", "pq"),
    ("(4) PQ+AQD+SQD beats LSQ", "pq+aqd+sqd", "lsq"),
    ("(4') PQ+AQD+SQD beats min-max", "pq+aqd+sqd", "minmax"),
)


def summarize_claims(results: Sequence[dict], fp_results: Sequence[dict]) -> str:
  """Markdown: each claim's mean gain (points) per bit-width and whether it holds.

  "holds" = the gain exceeds the larger of the two cells' standard deviations (the issue's
  "more than one standard deviation"); "gain < 1 std" = positive but within noise; "no" =
  not positive. Cells with < 2 seeds say so. Also the gap of pq+aqd+sqd to FP.
  """
  cells = top1_cells(results)
  bits = sorted({b for _, b in cells}, reverse=True)
  lines = ["| claim | " + " | ".join(f"W{b}A{b}" for b in bits) + " |",
           "|---|" + "---|" * len(bits)]

  def verdict(a: List[float], b: List[float]) -> str:
    (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
    gain, noise = ma - mb, max(sa, sb)
    if min(len(a), len(b)) < 2:
      word = "n < 2"
    elif gain > noise:
      word = "holds"
    elif gain > 0:
      word = "gain < 1 std"
    else:
      word = "no"
    return f"{gain:+.2f} ({word})"

  for label, a, b in CLAIMS:
    row = [verdict(cells[a, k], cells[b, k]) if (a, k) in cells and (b, k) in cells else "-"
           for k in bits]
    lines.append(f"| {label} | " + " | ".join(row) + " |")
  if fp_results:
    fp = [100 * r["top1"] for r in fp_results]
    row = [f"{mean_std(cells['pq+aqd+sqd', k])[0] - mean_std(fp)[0]:+.2f}"
           if ("pq+aqd+sqd", k) in cells else "-" for k in bits]
    lines.append("| pq+aqd+sqd minus FP (target > -0.5 at W4A4) | " + " | ".join(row) + " |")
  return "\n".join(lines)


def plot(results: Sequence[dict], fp_results: Sequence[dict], path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6.5, 4.5))
  cells = top1_cells(results)
  for method in dict.fromkeys(r["method"] for r in results):
    bits = sorted(b for m, b in cells if m == method)
    ms = [mean_std(cells[method, b]) for b in bits]
    ax.errorbar(bits, [m for m, _ in ms], yerr=[s for _, s in ms], marker="o", capsize=3,
                label=method)
  if fp_results:
    ax.axhline(statistics.mean(100 * r["top1"] for r in fp_results), color="k", ls="--",
               label="fp32")
  ax.set_xlabel("bits (W = A)")
  ax.set_ylabel("test top-1 (%)")
  ax.set_xticks(sorted({r["w_bits"] for r in results}))
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  ax.set_title("Fashion-MNIST, QAT from FP")
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def load_overhead(path: str) -> Optional[Dict[str, float]]:
  """method -> median train-step time / pq's, from an experiments.bench --json file."""
  if not path or not os.path.exists(path):
    return None
  with open(path) as f:
    rows = json.load(f)["results"]
  t = {r["method"]: r["train_step_ms_median"] for r in rows}
  return {m: v / t["pq"] for m, v in t.items()} if "pq" in t else None


def main(argv):
  del argv
  cfg, workdir, out = flags.FLAGS.config, flags.FLAGS.workdir, flags.FLAGS.out
  phases = flags.FLAGS.phases.split(",")
  parallel = flags.FLAGS.parallel
  os.makedirs(workdir, exist_ok=True)
  os.makedirs(out, exist_ok=True)
  deadline = time.time() + flags.FLAGS.deadline_s if flags.FLAGS.deadline_s > 0 else 0.0
  run = lambda runs, phase: execute(runs, cfg, workdir, parallel, phase in phases, deadline,
                                   flags.FLAGS.rerun_stale)
  fp_res = run(fp_runs(cfg), "fp")
  points = sweep_runs(cfg, workdir)
  res = run([r for _, _, r in points], "sweep")
  winners, rows = pick_winners([(f, v, r) for (f, v, _), r in zip(points, res)])
  if rows:
    write_csv(os.path.join(out, "sweeps.csv"), rows,
              ("field", "value", "method", "bits", "val_top1", "run"))
    with open(os.path.join(out, "winners.json"), "w") as f:
      json.dump(winners, f, indent=2)
    with open(os.path.join(out, "sweeps.md"), "w") as f:
      f.write(summarize_sweeps(rows, winners) + "\n")
  print("winners:", winners, flush=True)
  if unswept := {f for f, _, _, _ in parse_sweeps(cfg.sweeps)} - set(winners):
    print(f"no sweep results for {sorted(unswept)}: main runs use the code defaults there",
          flush=True)
  main_res = run(main_runs(cfg, workdir, winners), "main")
  if "report" in phases:
    done = [r for r in main_res if r]
    fp_done = [r for r in fp_res if r]
    write_csv(os.path.join(out, "ablation.csv"), fp_done + done, CSV_FIELDS)
    table = summarize(done, fp_done, load_overhead(cfg.bench_json))
    if done:
      table += ("\n\nGain in test top-1 points, mean over seeds:\n\n"
                + summarize_claims(done, fp_done))
    with open(os.path.join(out, "summary.md"), "w") as f:
      f.write(table + "\n")
    if done:
      plot(done, fp_done, os.path.join(out, "accuracy_vs_bits.png"))
    print(table)


if __name__ == "__main__":
  app.run(main)
