"""Ablation sweep: FP pretraining -> validation sweeps -> main table, then CSV / Markdown / PNG.

    python -m experiments.sweep --config experiments/configs/fashion_mnist_ablation.py \
        --workdir runs/ablation [--parallel N] [--out experiments/results/fashion_mnist]

Every run is a `python -m experiments.run` subprocess with its own workdir; a run
whose results.json exists is skipped, so the sweep resumes after a crash. With
--parallel N, N runs share the machine (on a GPU many; on 2 CPU cores 2, which overlaps one
run's single-threaded compile with the other's training). Each run's config.json must agree
with the plan before it is reused (check_matches_plan).

Modules: `experiments.sweep_plan` (which runs: pure), `experiments.sweep_exec` (running
them), `experiments.sweep_report` (tables, claims, plot); this one is the command line.
"""
from __future__ import annotations

import os
import time

from absl import app, flags
from ml_collections import config_flags

from experiments import sweep_report
from experiments.sweep_exec import execute
from experiments.sweep_plan import fp_runs, main_runs, parse_sweeps, sweep_runs

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


def main(argv):
  del argv
  if flags.FLAGS.config is None:
    raise app.UsageError("--config is required: an ablation config file, e.g. "
                         "--config experiments/configs/fashion_mnist_ablation_cpu.py")
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
  winners, rows = sweep_report.pick_winners([(f, v, r) for (f, v, _), r in zip(points, res)])
  sweep_report.write_sweep_report(out, rows, winners)
  print("winners:", winners, flush=True)
  if unswept := {f for f, _, _, _ in parse_sweeps(cfg.sweeps)} - set(winners):
    print(f"no sweep results for {sorted(unswept)}: main runs use the code defaults there",
          flush=True)
  main_res = run(main_runs(cfg, workdir, winners), "main")
  if "report" in phases:
    print(sweep_report.write_main_report(out, cfg, main_res, fp_res))


if __name__ == "__main__":
  app.run(main)
