"""A/B of XLA:CPU compiler flags on compile time and step time, interleaved, fresh processes.

    python tools/bench/ab_xla_flags.py --model vig_ti_224 --batch 32 \
        --methods fp --rounds 2 --json experiments/results/bench/ab_xla_flags_vig_ti_224.json

Every round runs `python -m experiments.bench` once per variant, in turn (a burst of load
hits them alike), each a new process with the compilation cache off and the variant's
`XLA_FLAGS`, and reads its JSON: train-step compile seconds (`compile_s`, split into `lower_s` and `xla_compile_s`), eval compile,
train and eval images/s. Reports per variant the medians over rounds and the ratio to
`default`, with the 1-minute load average around every run. Numerics are not checked here:
a flag that wins must pass the test suite before it becomes a default.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

VARIANTS = {
    "default": "",
    # LLVM without its custom set of expensive passes (XLA's fusions are small loops).
    "no_expensive_llvm": "--xla_llvm_disable_expensive_passes=true",
    # XLA:CPU's own compile-time preset.
    "fast_compile": "--xla_cpu_opt_preset=CPU_OPT_PRESET_FAST_COMPILE",
    # oneDNN thunks for matmul / conv fusions (runtime, not compile time).
    "onednn": "--xla_cpu_use_onednn=true",
}

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")


def load() -> float:
  with open("/proc/loadavg") as f:
    return float(f.read().split()[0])


def run_bench(flags: str, args) -> dict:
  """One `experiments.bench` process with XLA_FLAGS=flags; returns its first result row."""
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "bench.json")
    env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + flags).strip())
    cmd = [sys.executable, "-m", "experiments.bench", "--model", args.model, "--batch",
           str(args.batch), "--methods", args.methods, "--steps", str(args.steps), "--warmup",
           "1", "--compilation_cache", "off", "--nograph_share", "--noprogress", "--json", out]
    t0, l0 = time.time(), load()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    if proc.returncode:
      raise RuntimeError(f"bench failed with XLA_FLAGS={flags!r}:\n{proc.stderr[-3000:]}")
    with open(out) as f:
      row = json.load(f)["results"][0]
  return dict(compile_s=row["compile_s"], lower_s=row["lower_s"],
              xla_compile_s=row["xla_compile_s"], eval_compile_s=row["eval_compile_s"],
              train_img_s=row["train_img_s"], eval_img_s=row["eval_img_s"],
              wall_s=round(time.time() - t0, 1), load_before=l0, load_after=load())


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--model", default="vig_ti_224")
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--methods", default="fp", help="one method (bench's --methods)")
  ap.add_argument("--steps", type=int, default=3)
  ap.add_argument("--rounds", type=int, default=2)
  ap.add_argument("--variants", default=",".join(VARIANTS))
  ap.add_argument("--json", required=True)
  args = ap.parse_args()
  names = args.variants.split(",")
  unknown = [n for n in names if n not in VARIANTS]
  if unknown:
    ap.error(f"unknown variants {unknown}; valid: {sorted(VARIANTS)}")
  runs = {n: [] for n in names}
  for r in range(args.rounds):
    for n in names:
      runs[n].append(run_bench(VARIANTS[n], args))
      print(f"round {r} {n}: {runs[n][-1]}", flush=True)
  med = lambda n, k: statistics.median(x[k] for x in runs[n])
  keys = ("compile_s", "lower_s", "xla_compile_s", "eval_compile_s", "train_img_s",
          "eval_img_s")
  summary = {n: {k: round(med(n, k), 3) for k in keys} for n in names}
  for n in names:
    for k in keys:
      summary[n][k + "_ratio"] = round(summary[n][k] / summary[names[0]][k], 3)
  result = dict(model=args.model, batch=args.batch, methods=args.methods, steps=args.steps,
                rounds=args.rounds, flags={n: VARIANTS[n] for n in names}, summary=summary,
                runs=runs)
  with open(args.json, "w") as f:
    json.dump(result, f, indent=1)
  print(json.dumps(summary, indent=1))


if __name__ == "__main__":
  main()
