"""Multi-process data parallelism, for real: several `python -m experiments.run` processes on
this machine, joined by JAX's distributed runtime (gloo collectives on CPU, loopback only).

The digits quick-start model (experiments/configs/quickstart.py, FP, SGD) trains a few
steps as 1 process and as 2 processes (each with 1 or 2 forced CPU devices) on the same
global batch: the parameters and the logged metrics must agree. The reference process has
as many devices as the 2 processes together (the same per-device batches): with 2 devices
in all, every cross-device sum is a + b in any implementation, so the runs agree to the
bit. With 4 (2 processes x 2 devices against 1 x 4), gloo and XLA add the four partial
sums in different orders (~1e-7 relative), and this model's gradient is discontinuous
(a near-tie in the max-relative aggregation / k-NN top-k routes it elsewhere: measured, a
state change of 2.5e-7 moves the gradient norm by 7e-5 relative, the loss not at all), so
there the parameters agree to 1e-5 (SGD) and the metrics and BN statistics to 2e-3. A checkpoint written by
2 processes must resume in 1 and in 2, and a killed process must make the other exit
with a clear error instead of hanging. Every subprocess has a hard timeout.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from qgnn_jax import checkpoint as ckpt

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 4
# Per launch: a hang fails the test instead of blocking CI (a launch takes ~40 s here). Not
# a speed check. The hang this guards against (6 of 29 launches of the 2 x 2 test before
# the fix): per-leaf multi-device programs at a save deadlocking gloo (`train.unreplicate`).
TIMEOUT_S = 600
RUN_ARGS = [
    "--config", "experiments/configs/quickstart.py", "--config.pretrain_fp_epochs=0",
    "--config.method=fp", "--config.optimizer=sgd", "--config.warmup_epochs=0", "--config.batch_size=64", "--config.log_every=1",
    "--config.checkpoint_every=2", "--config.progress=false"]


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def jax_cache(tmp_path_factory):
  """A persistent compilation cache shared by every launch (the model's init compiles once)."""
  return str(tmp_path_factory.mktemp("jax_cache"))


def _env(devices: int, cache: str) -> dict:
  env = dict(os.environ)
  env.update({
      "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
      "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": cache,
      "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
      "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0", "PYTHONUNBUFFERED": "1"})
  return env


def _start(workdir, processes: int, devices: int, cache: str, extra=()):
  """Starts `processes` runs of experiments.run on one workdir; returns [(Popen, log path)]."""
  port = _free_port()
  procs = []
  for i in range(processes):
    cmd = [sys.executable, "-m", "experiments.run", *RUN_ARGS, *extra, f"--workdir={workdir}"]
    if processes > 1:
      cmd += [f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={processes}",
              f"--process_id={i}", "--heartbeat_timeout_s=10",
              "--distributed_init_timeout_s=120"]
    log = os.path.join(str(workdir) + f".p{i}.log")
    with open(log, "w") as f:
      procs.append((subprocess.Popen(cmd, cwd=REPO, env=_env(devices, cache), stdout=f,
                                     stderr=subprocess.STDOUT), log))
  return procs


def _tail(log: str, n: int = 3000) -> str:
  with open(log, errors="replace") as f:
    return f.read()[-n:]


def _wait(procs, timeout: float = TIMEOUT_S) -> None:
  """Waits for every process; kills them all and fails on a timeout or a non-zero exit."""
  deadline = time.monotonic() + timeout
  try:
    for p, log in procs:
      rc = p.wait(timeout=max(1.0, deadline - time.monotonic()))
      assert rc == 0, f"{p.args[-1] if p.args else ''} exited with {rc}:\n{_tail(log)}"
  except subprocess.TimeoutExpired:
    pytest.fail("a process hung:\n" + "\n".join(_tail(log) for _, log in procs))
  finally:
    for p, _ in procs:
      if p.poll() is None:
        p.kill()
        p.wait()


def _run(workdir, processes: int, devices: int, cache: str, extra=()):
  _wait(_start(workdir, processes, devices, cache, extra))
  return workdir


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _float_leaves(workdir, step=None):
  flat = ckpt.flatten_with_paths(ckpt.restore_from(str(workdir), step=step))
  return {k: np.asarray(v, np.float64) for k, v in flat.items()
          if np.asarray(v).dtype.kind == "f"}


def _max_diff(a, b, prefix=""):
  assert set(a) == set(b)
  return max(float(np.max(np.abs(a[k] - b[k]))) for k in a if "/".join(k).startswith(prefix))


def _assert_same_run(workdir, ref, steps=STEPS, exact=True):
  """Params within 1e-5 of the reference run (one process, same total device count).

  exact: the metrics and BN statistics to float32 rounding too (rtol 1e-5); otherwise
  to 2e-3 (the gradient's discontinuity, see the module docstring).
  """
  rtol = 1e-5 if exact else 2e-3
  a, b = _float_leaves(workdir), _float_leaves(ref)
  init = _float_leaves(ref, step=2)
  moved, diff = _max_diff(b, init, "params"), _max_diff(a, b, "params")
  print(f"max |param - reference| = {diff:.3g} (params moved {moved:.3g} in steps 3-4)")
  assert moved > 1e-3  # the parameters really moved
  assert diff <= 1e-5
  for k in a:  # relative to each BN statistic's scale (a mean of ~1e-8 is all noise)
    if k[0] == "batch_stats":
      assert np.max(np.abs(a[k] - b[k])) <= rtol * np.max(np.abs(b[k])) + 1e-6, k
  ma, mb = _metrics(workdir), _metrics(ref)
  assert [m["step"] for m in ma] == [m["step"] for m in mb] == list(range(1, steps + 1)) + [steps]
  for x, y in zip(ma, mb):
    assert x.keys() == y.keys() and x["split"] == y["split"]
    for k, v in x.items():
      if isinstance(v, float):
        np.testing.assert_allclose(v, y[k], rtol=rtol, atol=1e-6, err_msg=k)
  assert ma[-1]["final"] and ma[-1]["count"] == mb[-1]["count"] == 359


@pytest.fixture(scope="module")
def reference(tmp_path_factory, jax_cache):
  """reference(D): the run of one process with D devices (made once per module)."""
  runs = {}

  def get(devices: int):
    if devices not in runs:
      workdir = tmp_path_factory.mktemp(f"one_process_{devices}_devices") / "run"
      runs[devices] = _run(workdir, 1, devices, jax_cache, [f"--config.num_steps={STEPS}"])
    return runs[devices]
  return get


@pytest.mark.parametrize("devices", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_two_processes_equal_one(tmp_path, reference, jax_cache, devices):
  workdir = _run(tmp_path / "run", 2, devices, jax_cache, [f"--config.num_steps={STEPS}"])
  _assert_same_run(workdir, reference(2 * devices), exact=devices == 1)
  # Files from process 0 only: one metrics line per step (not two), one results.json.
  with open(os.path.join(workdir, "results.json")) as f:
    assert json.load(f)["train_steps"] == STEPS
  # The input iterator's state is in the checkpoint, once, as the global step.
  with open(os.path.join(workdir, "checkpoints", str(STEPS), "data", "metadata")) as f:
    assert json.load(f) == {"next_index": STEPS}


# lr 0.02: SGD at the quick start's 2e-3 moves the 4-bit model's params < 1e-3 in 2 steps.
QUANT_ARGS = ["--config.method=pq", "--config.w_bits=4", "--config.a_bits=4",
              "--config.lr=0.02"]


def test_quantized_two_processes_equal_one(tmp_path, jax_cache):
  """W4A4 PQ (QAT from the calibrated initial weights): 2 processes x 1 device equal 1
  process x 2 devices. The calibration sees the whole first global batch and the EMA
  activation ranges are reduced over every device of every process (min / max and means
  of 2 devices: exact), so the runs agree as the FP ones do; an unsynchronised range moves
  codes by whole grid steps (at 4 bits ~1/8 of the range), far above these tolerances."""
  args = [f"--config.num_steps={STEPS}", *QUANT_ARGS]
  ref = _run(tmp_path / "one", 1, 2, jax_cache, args)
  workdir = _run(tmp_path / "two", 2, 1, jax_cache, args)
  _assert_same_run(workdir, ref)
  a, b = _float_leaves(workdir), _float_leaves(ref)
  ranges = [k for k in a if k[0] == "quant_stats"]
  assert ranges  # the quantizers' state is in the checkpoint
  for k in ranges:
    np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg="/".join(k))
  with open(os.path.join(workdir, "results.json")) as f:
    res = json.load(f)
  assert (res["method"], res["w_bits"], res["a_bits"], res["process_count"]) == ("pq", 4, 4, 2)


@pytest.mark.slow
@pytest.mark.parametrize("processes,devices", [(1, 2), (2, 1)])
def test_two_process_checkpoint_resumes(tmp_path, reference, jax_cache, processes, devices):
  """Stopped at step 2 by 2 processes (1 device each), resumed to the end by 1 or 2."""
  workdir = tmp_path / "run"
  _run(workdir, 2, 1, jax_cache, [f"--config.num_steps={STEPS}", "--config.stop_at_step=2"])
  assert not os.path.exists(os.path.join(workdir, "results.json"))
  _run(workdir, processes, devices, jax_cache, [f"--config.num_steps={STEPS}"])
  _assert_same_run(workdir, reference(2))


@pytest.mark.parametrize("victim", [1, pytest.param(0, marks=pytest.mark.slow)])
def test_killed_process_stops_the_other(tmp_path, jax_cache, victim):
  """SIGKILL one process mid-training: the other exits non-zero with a clear message."""
  workdir = tmp_path / "run"
  procs = _start(workdir, 2, 1, jax_cache, ["--config.num_steps=100000",
                                            "--config.checkpoint_every=100000"])
  survivor, survivor_log = procs[1 - victim]
  try:
    metrics = os.path.join(workdir, "metrics.jsonl")
    deadline = time.monotonic() + TIMEOUT_S
    while not (os.path.exists(metrics) and os.path.getsize(metrics) > 0):
      assert time.monotonic() < deadline, "training never started:\n" + _tail(survivor_log)
      assert all(p.poll() is None for p, _ in procs), _tail(survivor_log)
      time.sleep(0.5)
    procs[victim][0].send_signal(signal.SIGKILL)
    t0 = time.monotonic()
    try:
      rc = survivor.wait(timeout=120)  # heartbeat_timeout_s=10: far less is expected
    except subprocess.TimeoutExpired:
      pytest.fail(f"process {1 - victim} hung after process {victim} was killed:\n"
                  + _tail(survivor_log))
    out = _tail(survivor_log, 20000)
    assert rc != 0, out
    assert (f"qgnn_jax: process {1 - victim} of 2 stops" in out
            or "another task died" in out), out
    print(f"process {1 - victim} exited {rc} {time.monotonic() - t0:.1f} s after the kill")
  finally:
    for p, _ in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
