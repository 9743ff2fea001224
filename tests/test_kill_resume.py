"""A kill anywhere loses nothing completed: real `python -m experiments.run` subprocesses
SIGKILLed mid-step, during an asynchronous checkpoint save and during evaluation, each
restarted; the run that finally completes is bit-identical to an uninterrupted one,
metrics.jsonl holds each step once, and a finished workdir is reported without rerunning.

The kill points are the run's fault points (`qgnn_jax.experiment.OnEvent`), killed at by
tests/fault_run.py's callback (point:step: the process sends itself SIGKILL there).
Subprocesses share a JAX compilation cache so that
only the first one compiles.
"""
import collections
import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from qgnn_jax import checkpoint as ckpt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ("--config.pretrain_fp_epochs=0", "--config.method=fp", "--config.num_steps=8",
        "--config.batch_size=32", "--config.eval_batch_size=100", "--config.log_every=1",
        "--config.checkpoint_every=2", "--config.keep_checkpoints=2",
        "--config.progress=False")


@pytest.fixture(scope="module")
def cache_env(tmp_path_factory):
  env = dict(os.environ)
  env.update(JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("jax_cache")),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  return env


def _run(workdir, env, kill_at=None):
  run = [os.path.join(ROOT, "tests", "fault_run.py"), kill_at] if kill_at else \
      ["-m", "experiments.run"]
  return subprocess.run([sys.executable, *run, f"--workdir={workdir}", *ARGS],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _each_step_once(records):
  counts = collections.Counter((r["step"], r["split"]) for r in records)
  return all(n == 1 for n in counts.values())


# In the default suite (and so in CI): the only check of the kill -9 promise. Six small
# subprocess runs of vig_digits, the first of which compiles.
def test_sigkill_anywhere_then_resume_is_bit_identical(tmp_path, cache_env):
  ref, wd = tmp_path / "uninterrupted", tmp_path / "killed"
  out = _run(ref, cache_env)
  assert out.returncode == 0, out.stderr[-3000:]
  # Killed after dispatching step 3 (step 2's async save may still be in flight), right
  # after step 4's async save started, and in the final evaluation (after step 8's save).
  for kill_at in ("mid_step:3", "save:4", "eval:8"):
    out = _run(wd, cache_env, kill_at)
    assert out.returncode == -signal.SIGKILL, (kill_at, out.returncode, out.stderr[-3000:])
    assert not (wd / "results.json").exists()
  out = _run(wd, cache_env)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "resumed from step 8 of 8" in out.stderr
  # Bit-identical: the final state, every training loss, the result.
  a, b = ckpt.restore_from(str(ref), step=8), ckpt.restore_from(str(wd), step=8)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  train = lambda recs: [(r["step"], r["loss"], r["top1"]) for r in recs if r["split"] == "train"]
  assert train(_metrics(wd)) == train(_metrics(ref))
  assert _each_step_once(_metrics(wd)) and sum(1 for r in _metrics(wd) if r.get("final")) == 1
  res_ref, res = (json.loads((d / "results.json").read_text()) for d in (ref, wd))
  assert (res["top1"], res["eval_loss"]) == (res_ref["top1"], res_ref["eval_loss"])
  # A finished workdir: reported, nothing rerun or rewritten.
  stamp = {n: os.path.getmtime(wd / n) for n in ("metrics.jsonl", "results.json")}
  out = _run(wd, cache_env)
  assert out.returncode == 0 and "already finished" in out.stderr, out.stderr[-3000:]
  assert {n: os.path.getmtime(wd / n) for n in stamp} == stamp
