"""The ablation sweep's reports: winners, tables (Markdown / CSV), claims and the plot.

Pure functions of the runs' results dicts (results.json plus "run"), except the writers.
The claims compared and the plot's title come from the ablation config
(`claims`, `fp_gap_method`, `plot_title`).
"""
from __future__ import annotations

import csv
import json
import os
import statistics
from typing import Dict, List, Optional, Sequence, Tuple

from qgnn_jax.results import CSV_FIELDS


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


def claim_holds(a: Sequence[float], b: Sequence[float], min_gain: float = 0.0,
                min_seeds: int = 2) -> Tuple[float, bool, bool]:
  """(mean gain of a over b, holds, enough seeds): the one rule for "a beats b".

  Holds = both cells have >= min_seeds values, and the gain is >= min_gain and larger than
  both cells' standard deviations. Issue 21's rule for a distillation term is min_gain=0.3,
  min_seeds=3 (docs/METHOD.md, "Distillation forms").
  """
  (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
  gain = ma - mb
  enough = min(len(a), len(b)) >= min_seeds
  return gain, enough and gain >= min_gain and gain > max(sa, sb), enough


def summarize_claims(results: Sequence[dict], fp_results: Sequence[dict],
                     claims: Sequence[Sequence[str]], fp_gap_method: str = "",
                     fp_gap_label: str = "", min_gain: float = 0.0) -> str:
  """Markdown: each claim's mean gain (points) per bit-width and whether it holds.

  Args:
    claims: (label, method a, method b) triples: "a beats b" (the config's `claims`).
    fp_gap_method: a method whose gap to FP gets a last row ('' for none), labelled
      fp_gap_label (default '<method> minus FP').
  "holds" = `claim_holds` with min_gain (the gain exceeds both cells' standard deviations,
  and min_gain); "gain < 1 std" (or "< min_gain") = positive but not enough; "no" = not
  positive. Cells with < 2 seeds say so.
  """
  cells = top1_cells(results)
  bits = sorted({b for _, b in cells}, reverse=True)
  lines = ["| claim | " + " | ".join(f"W{b}A{b}" for b in bits) + " |",
           "|---|" + "---|" * len(bits)]

  def verdict(a: List[float], b: List[float]) -> str:
    gain, holds, enough = claim_holds(a, b, min_gain)
    if not enough:
      word = "n < 2"
    elif holds:
      word = "holds"
    elif gain > 0:
      word = f"gain < {min_gain:g} pt or < 1 std" if min_gain > 0 else "gain < 1 std"
    else:
      word = "no"
    return f"{gain:+.2f} ({word})"

  for label, a, b in claims:
    row = [verdict(cells[a, k], cells[b, k]) if (a, k) in cells and (b, k) in cells else "-"
           for k in bits]
    lines.append(f"| {label} | " + " | ".join(row) + " |")
  if fp_results and fp_gap_method:
    fp = [100 * r["top1"] for r in fp_results]
    row = [f"{mean_std(cells[fp_gap_method, k])[0] - mean_std(fp)[0]:+.2f}"
           if (fp_gap_method, k) in cells else "-" for k in bits]
    label = fp_gap_label or f"{fp_gap_method} minus FP"
    lines.append(f"| {label} | " + " | ".join(row) + " |")
  return "\n".join(lines)


def plot(results: Sequence[dict], fp_results: Sequence[dict], path: str, title: str = "") -> None:
  """Test top-1 (mean ± std over seeds) against bits per method, FP as a dashed line."""
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
  if title:
    ax.set_title(title)
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


def write_sweep_report(out: str, rows: Sequence[dict], winners: Dict[str, str]) -> None:
  """sweeps.csv, winners.json and sweeps.md in `out` (nothing when no sweep has results)."""
  if not rows:
    return
  write_csv(os.path.join(out, "sweeps.csv"), rows,
            ("field", "value", "method", "bits", "val_top1", "run"))
  with open(os.path.join(out, "winners.json"), "w") as f:
    json.dump(winners, f, indent=2)
  with open(os.path.join(out, "sweeps.md"), "w") as f:
    f.write(summarize_sweeps(rows, winners) + "\n")


def write_main_report(out: str, cfg, main_results: Sequence[Optional[dict]],
                      fp_results: Sequence[Optional[dict]]) -> str:
  """ablation.csv (qgnn_jax.results.CSV_FIELDS), summary.md (table and claims) and
  accuracy_vs_bits.png in `out`; returns the summary's Markdown.

  cfg: the ablation config (claims, fp_gap_method, fp_gap_label, plot_title, bench_json).
  """
  done = [r for r in main_results if r]
  fp_done = [r for r in fp_results if r]
  write_csv(os.path.join(out, "ablation.csv"), fp_done + done, CSV_FIELDS)
  table = summarize(done, fp_done, load_overhead(cfg.bench_json))
  if done:
    table += ("\n\nGain in test top-1 points, mean over seeds:\n\n"
              + summarize_claims(done, fp_done, cfg.claims, cfg.get("fp_gap_method", ""),
                                 cfg.get("fp_gap_label", ""), cfg.get("claim_min_gain", 0.0)))
  with open(os.path.join(out, "summary.md"), "w") as f:
    f.write(table + "\n")
  if done:
    plot(done, fp_done, os.path.join(out, "accuracy_vs_bits.png"), cfg.get("plot_title", ""))
  return table
