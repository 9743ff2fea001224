"""The ablation sweep's execution: each planned run as an `experiments.run` subprocess.

A run whose results.json exists is reused (after its config.json is checked against the
plan), so a sweep resumes after a crash; `--parallel N` runs N at a time.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional, Sequence

from experiments.sweep_plan import Run, run_settings, same_value


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
