"""Issue 24: faults and bad inputs, each answered by one line that names the fault and the
fix (exit 2 for usage and config, 1 for data and I/O), nothing lost or half-written."""
import glob
import gzip
import json
import os
import re
import socket
import struct
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest


import helpers
from qgnn_jax import checkpoint as ckpt
from qgnn_jax import experiment, workdir_lock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


_config = helpers.tiny_fp_config  # the tiny FP run every run test shares


def _cli(module, *args, timeout=600, **kw):
  """`python -m module args` from the repository root: (returncode, stdout, stderr lines)."""
  out = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True,
                       text=True, timeout=timeout, **kw)
  return out.returncode, out.stdout, [l for l in out.stderr.splitlines() if l.strip()]


# ----------------------------------------------------------------------------- checksums


def _tree(seed):
  rng = np.random.default_rng(seed)
  return {"w": rng.normal(size=(64, 64)).astype(np.float32),
          "b": rng.normal(size=(64,)).astype(np.float32), "step": np.asarray(seed, np.int32)}


def _largest_data_file(step_dir):
  files = [f for f in glob.glob(os.path.join(str(step_dir), "**"), recursive=True)
           if os.path.isfile(f) and "/d/" in f]
  return max(files, key=os.path.getsize)


def _flip(path, offset, nbytes=1, bit=None):
  with open(path, "r+b") as f:
    f.seek(offset)
    old = f.read(nbytes)
    f.seek(offset)
    f.write(bytes(b ^ (1 << bit if bit is not None else 0xFF) for b in old))


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("flip", ["one_bit", "16_bytes"])
def test_flipped_bytes_in_the_newest_checkpoint_fall_back(tmp_path, caplog, flip):
  manager = ckpt.make_manager(str(tmp_path / "ck"))
  for step in (1, 2):
    ckpt.save(manager, step, _tree(step), wait_for_it=False)
  ckpt.wait(manager)  # the checksums of step 2 are written once orbax has finalised it
  assert all(os.path.exists(tmp_path / "ck" / s / ckpt.CHECKSUMS) for s in ("1", "2"))
  path = _largest_data_file(tmp_path / "ck" / "2")
  size = os.path.getsize(path)
  if flip == "one_bit":
    _flip(path, size // 2, 1, bit=3)
  else:
    _flip(path, size // 3, 16)
  target = jax.eval_shape(lambda: jax.tree.map(jnp.asarray, _tree(0)))
  got = ckpt.restore(ckpt.make_manager(str(tmp_path / "ck")), target)
  assert got.step == 1 and np.array_equal(got.state["w"], _tree(1)["w"])
  (step, why), = got.skipped
  assert step == 2 and "SHA-256" in why and os.path.relpath(path, tmp_path / "ck" / "2") in why
  warning = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
  assert len(warning) == 1 and "\n" not in warning[0] and "falling back" in warning[0]
  # restore_from (init_from) verifies too: an explicit corrupt step is an error, not data.
  with pytest.raises(ckpt.CorruptCheckpointError, match="SHA-256"):
    ckpt.restore_from(str(tmp_path / "ck"), step=2)


def test_a_truncated_file_and_a_missing_file_are_named(tmp_path):
  manager = ckpt.make_manager(str(tmp_path / "ck"))
  ckpt.save(manager, 1, _tree(1))
  step_dir = str(tmp_path / "ck" / "1")
  assert ckpt.verify_checksums(step_dir) is True
  path = _largest_data_file(step_dir)
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) - 1)
  with pytest.raises(ckpt.CorruptCheckpointError, match=r"bytes, \d+ at save \(truncated"):
    ckpt.verify_checksums(step_dir)
  os.remove(path)
  with pytest.raises(ckpt.CorruptCheckpointError, match="is missing"):
    ckpt.verify_checksums(step_dir)
  os.remove(os.path.join(step_dir, ckpt.CHECKSUMS))  # older checkpoints: read unverified
  assert ckpt.verify_checksums(step_dir) is None


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_an_unverified_corrupt_step_gives_a_readable_reason(tmp_path, caplog):
  """A step without checksums (older code) that TensorStore cannot read: the warning names the
  file and the reason, not a cut-off dump of TensorStore's JSON spec."""
  manager = ckpt.make_manager(str(tmp_path / "ck"))
  for step in (1, 2):
    ckpt.save(manager, step, _tree(step))
  os.remove(tmp_path / "ck" / "2" / ckpt.CHECKSUMS)
  for f in glob.glob(str(tmp_path / "ck" / "2" / "**" / "d" / "*"), recursive=True):
    with open(f, "wb") as fh:
      fh.write(b"garbage")
  target = jax.eval_shape(lambda: jax.tree.map(jnp.asarray, _tree(0)))
  assert ckpt.restore(ckpt.make_manager(str(tmp_path / "ck")), target).step == 1
  warning, = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
  assert "tensorstore_spec" not in warning and "..." not in warning and "{" not in warning
  assert str(tmp_path / "ck" / "2" / "state" / "d") in warning and "size 7" in warning


# ----------------------------------------------------------------------------- the lock


_HOLDER = """
import sys, time
from qgnn_jax import workdir_lock
with workdir_lock.hold(sys.argv[1]):
  print("held", flush=True)
  time.sleep(120)
"""


def test_a_second_run_on_a_workdir_in_use_is_refused(tmp_path):
  wd = tmp_path / "wd"
  wd.mkdir()
  holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(wd)], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(workdir_lock.WorkdirLockedError) as e:
      experiment.train_and_evaluate(_config(), str(wd))
    msg = str(e.value)
    assert f"pid {holder.pid} on host {socket.gethostname()}" in msg and "\n" not in msg
    assert sorted(os.listdir(wd)) == [workdir_lock.LOCK_FILE]  # the second run wrote nothing
    code, _, err = _cli("experiments.run", f"--workdir={wd}", "--config.pretrain_fp_epochs=0")
    assert code == 1 and len(err) == 1 and f"pid {holder.pid}" in err[0], err
  finally:
    holder.kill()
    holder.wait()
  # kill -9 dropped its flock: the next run takes the lock over (the record names the dead
  # run) and the workdir holds no lock after the run.
  assert json.loads((wd / workdir_lock.LOCK_FILE).read_text())["pid"] == holder.pid
  fd, previous = workdir_lock.acquire(str(wd))
  assert previous["pid"] == holder.pid and not workdir_lock.pid_alive(holder.pid)
  workdir_lock.release(fd, str(wd))
  assert not (wd / workdir_lock.LOCK_FILE).exists()


def test_failed_data_leaves_no_workdir(tmp_path):
  d = tmp_path / "fm"
  d.mkdir()
  for split, n in (("train", 64), ("t10k", 16)):
    (d / f"{split}-images-idx3-ubyte.gz").write_bytes(gzip.compress(
        struct.pack(">BBBBIII", 0, 0, 8, 3, n, 28, 28) + bytes(n * 28 * 28))[:-20])
    (d / f"{split}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(
        struct.pack(">BBBBI", 0, 0, 8, 1, n) + bytes(n)))
  wd = tmp_path / "runs" / "fm"
  with pytest.raises(experiment.DataError, match="truncated gzip"):
    experiment.train_and_evaluate(_config(dataset="fashion_mnist", model="vig_tiny_28",
                                          data_dir=str(d)), str(wd))
  assert not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------- the command line


@pytest.mark.parametrize("args,expected", [
    (["--config.bach_size=64"], "config.bach_size: unknown field (did you mean 'batch_size'?)"),
    (["--config.foo=1"], "config.foo: unknown field; valid fields: "),
    (["--config.batch_size=abc"], "--config.batch_size=abc: invalid literal for int()"),
    (["--nosuchflag"], "Unknown command line flag 'nosuchflag'"),
    (["--config=/nonexistent/cfg.py"], "config file /nonexistent/cfg.py not found"),
    ("syntax", "line 2: syntax error"),
    ("no_get_config", "defines no get_config()"),
])
def test_bad_flags_and_config_files_exit_2_in_one_line(tmp_path, args, expected):
  if args == "syntax":
    (tmp_path / "c.py").write_text("def get_config():\n  return dict(a=\n")
    args = [f"--config={tmp_path / 'c.py'}"]
  elif args == "no_get_config":
    (tmp_path / "c.py").write_text("x = 1\n")
    args = [f"--config={tmp_path / 'c.py'}"]
  code, out, err = _cli("experiments.run", f"--workdir={tmp_path / 'wd'}", *args)
  assert code == 2 and len(err) == 1 and err[0].startswith("error: "), err
  assert expected in err[0] and "Traceback" not in err[0], err
  assert not (tmp_path / "wd").exists() and out == ""


RUN_ARGS = ["--config.pretrain_fp_epochs=0", "--config.method=fp", "--config.num_steps=6",
            "--config.batch_size=32", "--config.eval_batch_size=400",
            "--config.checkpoint_every=2", "--config.progress=False"]


def _read_only(path, *cmd):
  """`cmd` with `path` bind-mounted read-only in a private mount namespace (unshare -m)."""
  return ["unshare", "-m", "sh", "-c", f"mount --bind '{path}' '{path}' && mount -o "
          f"remount,ro,bind '{path}' '{path}' && exec \"$@\"", "sh", *cmd]


def _can_mount(tmp_path):
  try:
    return subprocess.run(_read_only(tmp_path, "true"), capture_output=True).returncode == 0
  except OSError:
    return False


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
  """A 6-step digits run stopped by Ctrl-C (SIGINT) at step 3, then (read-only, where this
  host can mount) an attempt to resume it, then resumed to the end: {step: (code, stdout,
  stderr lines)} and the workdir."""
  wd = tmp_path_factory.mktemp("interrupted")
  out = {"interrupt": _cli_cmd([sys.executable, os.path.join(ROOT, "tests", "fault_run.py"),
                                "mid_step:3:INT", *RUN_ARGS, f"--workdir={wd}"])}
  if _can_mount(wd):
    out["read_only"] = _cli_cmd(_read_only(wd, sys.executable, "-m", "experiments.run",
                                           *RUN_ARGS, f"--workdir={wd}"))
  out["resume"] = _cli("experiments.run", *RUN_ARGS, f"--workdir={wd}")
  return wd, out


def _cli_cmd(cmd, timeout=600):
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
  return out.returncode, out.stdout, [l for l in out.stderr.splitlines() if l.strip()]


def test_ctrl_c_says_where_the_same_command_resumes(interrupted):
  wd, out = interrupted
  code, _, err = out["interrupt"]
  assert code == 130 and err == [f"error: {wd}: interrupted at step 3; the same command "
                                 f"resumes from step 2"], err
  code, _, err = out["resume"]
  assert code == 0 and f"{wd}: resumed from step 2 of 6" in err, err
  res = json.loads((wd / "results.json").read_text())
  assert res["train_steps"] == 6 and res["data_source"] == "scikit-learn digits"
  kept = [n for n in os.listdir(wd / "checkpoints") if n.isdigit()]
  assert "6" in kept and all(ckpt.verify_checksums(str(wd / "checkpoints" / n)) for n in kept)


def test_resume_on_a_read_only_file_system_is_one_line_before_anything(interrupted):
  wd, out = interrupted
  if "read_only" not in out:
    pytest.skip("this host cannot bind-mount read-only (needs root and unshare -m)")
  code, _, err = out["read_only"]
  assert code == 1 and len(err) == 1, err
  assert err[0] == (f"error: {wd / workdir_lock.LOCK_FILE}: Read-only file system; write to "
                    f"another place (e.g. another --workdir / --out)"), err


def test_a_new_workdir_on_a_read_only_file_system_is_one_line(tmp_path):
  if not _can_mount(tmp_path):
    pytest.skip("this host cannot bind-mount read-only (needs root and unshare -m)")
  code, out, err = _cli_cmd(_read_only(tmp_path, sys.executable, "-m", "experiments.run",
                                       *RUN_ARGS, f"--workdir={tmp_path / 'new'}"))
  assert code == 1 and out == "" and err == [
      f"error: {tmp_path / 'new'}: Read-only file system; write to another place (e.g. another "
      f"--workdir / --out)"], err


def test_export_to_a_read_only_place_and_evaluate_export_of_a_directory(interrupted, tmp_path):
  wd, _ = interrupted
  if _can_mount(tmp_path):
    code, _, err = _cli_cmd(_read_only(tmp_path, sys.executable, "-m", "experiments.export",
                                       f"--workdir={wd}", f"--out={tmp_path / 'm.qgx'}"))
    assert code == 1 and len(err) == 1 and "Read-only file system" in err[0], err
    assert str(tmp_path) in err[0] and not os.listdir(tmp_path)
  code, _, err = _cli("experiments.evaluate", f"--export={wd}")
  assert code == 2 and err == [
      f"error: --export={wd} is a run's workdir, not an export file; this is a run: use "
      f"--workdir={wd}, or export it with python -m experiments.export --workdir={wd} "
      f"--out=FILE"], err
  code, _, err = _cli("experiments.evaluate", f"--export={tmp_path}")
  assert code == 2 and len(err) == 1 and "is a directory" in err[0], err


def test_a_full_disk_is_one_line_and_the_same_command_then_resumes(tmp_path):
  """The disk fills at a checkpoint: one line naming the folder and the bytes, the kept
  checkpoints intact (checksums), and once there is space the same command resumes."""
  if not _can_mount(tmp_path):
    pytest.skip("this host cannot mount a small tmpfs (needs root and unshare -m)")
  disk = tmp_path / "disk"
  disk.mkdir()
  # 6 MB: vig_digits' checkpoints take ~3.7 MB each (state + Adam moments), so the second of
  # the 4 saves finds the disk full.
  script = (f"mount -t tmpfs -o size=6m tmpfs '{disk}' || exit 99\n"
            f"\"$@\" 2> '{tmp_path}/1.err'; echo $? > '{tmp_path}/1.rc'\n"
            f"mount -o remount,size=64m '{disk}'\n"
            f"\"$@\" 2> '{tmp_path}/2.err'; echo $? > '{tmp_path}/2.rc'\n")
  cmd = [sys.executable, "-m", "experiments.run", *RUN_ARGS, "--config.num_steps=8",
         "--config.keep_checkpoints=5", f"--workdir={disk / 'wd'}"]
  out = subprocess.run(["unshare", "-m", "sh", "-c", script, "sh", *cmd], cwd=ROOT,
                       capture_output=True, text=True, timeout=1200)
  assert out.returncode == 0, out.stderr
  rc1, rc2 = (int((tmp_path / f"{i}.rc").read_text()) for i in (1, 2))
  err1, err2 = ([l for l in (tmp_path / f"{i}.err").read_text().splitlines() if l.strip()]
                for i in (1, 2))
  assert rc1 == 1 and len(err1) == 1, err1
  m = re.fullmatch(rf"error: {re.escape(str(disk / 'wd' / 'checkpoints'))}: no space left on "
                   r"the device for a checkpoint \(one takes about ([\d,]+) bytes, ([\d,]+) "
                   r"are free\); the kept checkpoints \(steps \[([\d, ]+)\]\) are intact, and "
                   r"the same command resumes from step (\d+) once space is freed", err1[0])
  assert m, err1
  assert int(m.group(1).replace(",", "")) > int(m.group(2).replace(",", ""))
  assert rc2 == 0 and f"{disk / 'wd'}: resumed from step {m.group(4)} of 8" in err2, err2


@pytest.mark.parametrize("verbose", [False, True])
def test_orbax_cleaning_an_interrupted_save_is_quiet_unless_verbose(tmp_path, caplog, verbose):
  """A save killed mid-write leaves `<step>.orbax-checkpoint-tmp`; saving that step again,
  orbax says "Removing existing directory since it is not finalized": no news to the user."""
  import logging as py_logging
  from absl import logging
  from experiments import cli
  manager = ckpt.make_manager(str(tmp_path / "ck"))
  ckpt.save(manager, 2, _tree(2))
  os.makedirs(tmp_path / "ck" / "4.orbax-checkpoint-tmp" / "state")
  absl_logger, hook = logging.get_absl_logger(), sys.unraisablehook
  filters, level = list(absl_logger.filters), py_logging.getLogger().level
  verbosity = logging.get_verbosity()
  try:
    cli.set_console(verbose)
    ckpt.save(manager, 4, _tree(4))
  finally:  # the console settings are process-wide: put them back for the other tests
    absl_logger.filters[:] = filters
    sys.unraisablehook = hook
    py_logging.getLogger().setLevel(level)
    logging.set_verbosity(verbosity)
  said = "Removing existing directory since it is not finalized" in caplog.text
  assert said == verbose and manager.all_steps() == [2, 4]


# ----------------------------------------------------------------------------- data


def _idx(code, arr):
  """The bytes of an IDX file: 00 00 <type code> <ndim>, big-endian dims, big-endian data."""
  dtype = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}[code]
  return (struct.pack(">BBBB", 0, 0, code, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
          + np.asarray(arr, dtype).tobytes())


def _idx_dir(path, images, labels, image_code=0x0D, label_code=0x08):
  path.mkdir(parents=True, exist_ok=True)
  for split in ("train", "t10k"):
    (path / f"{split}-images-idx3-ubyte").write_bytes(_idx(image_code, images))
    (path / f"{split}-labels-idx1-ubyte").write_bytes(_idx(label_code, labels))
  return path


def test_float_idx_images_are_read_as_floats_and_non_finite_ones_refused(tmp_path):
  from qgnn_jax import data
  rng = np.random.default_rng(0)
  images = rng.uniform(0, 1, (20, 28, 28)).astype(np.float32)
  labels = np.arange(20) % 10
  d = _idx_dir(tmp_path / "ok", images, labels)
  x, y, _ = data.load_arrays("fashion_mnist", "train", str(d))
  assert x.dtype == np.uint8 and x.shape == (20, 28, 28, 1) and np.array_equal(y, labels)
  np.testing.assert_array_equal(x[..., 0], np.round(images.astype(np.float64) * 255))
  assert data.data_source("fashion_mnist", str(d)) == f"IDX files in {d}"
  images[0, :3, 0] = [np.nan, np.inf, np.nan]
  d = _idx_dir(tmp_path / "nan", images, labels)
  with pytest.raises(ValueError, match=r"train-images-idx3-ubyte: 3 of 15,680 pixels are NaN or "
                                       r"infinite"):
    data.load_arrays("fashion_mnist", "train", str(d))
  d = _idx_dir(tmp_path / "255", np.full((20, 28, 28), 200.0), labels, image_code=0x0E)
  with pytest.raises(ValueError, match=r"15,680 of 15,680 pixels lie outside \[0, 1\]"):
    data.load_arrays("fashion_mnist", "train", str(d))
  d = _idx_dir(tmp_path / "i16", np.zeros((20, 28, 28)), labels, image_code=0x0B)
  with pytest.raises(ValueError, match=r"IDX images of type int16 are not supported"):
    data.load_arrays("fashion_mnist", "train", str(d))
  d = _idx_dir(tmp_path / "flabels", np.zeros((20, 28, 28)), labels, image_code=0x08,
               label_code=0x0D)
  with pytest.raises(ValueError, match=r"IDX labels of type float32 are not supported"):
    data.load_arrays("fashion_mnist", "train", str(d))


def test_labels_past_the_classes_are_refused_at_load(tmp_path):
  from qgnn_jax import data
  labels = np.arange(20) % 12  # 10 classes: labels 10 and 11 (one each) do not exist
  d = _idx_dir(tmp_path / "fm", np.zeros((20, 28, 28), np.uint8), labels, image_code=0x08)
  with pytest.raises(ValueError, match=r"2 of 20 labels lie outside \[0, 10\) \(fashion_mnist has "
                                       r"10 classes; labels seen: 0\.\.11\)"):
    data.load_arrays("fashion_mnist", "train", str(d))


def test_an_explicit_data_dir_that_does_not_exist_is_an_error(tmp_path):
  from qgnn_jax import data
  with pytest.raises(data.DatasetNotFoundError, match="data_dir='/nonexistent': no such directory"):
    data.load_arrays("fashion_mnist", "train", "/nonexistent")
  with pytest.raises(experiment.DataError, match="no such directory"):
    experiment.train_and_evaluate(_config(dataset="fashion_mnist", model="vig_tiny_28",
                                          data_dir="/nonexistent"), str(tmp_path / "wd"))
  assert not (tmp_path / "wd").exists()


# ----------------------------------------------------------------------------- strict JSON


def test_json_files_are_strict_with_nan_as_null_and_a_flag(tmp_path):
  from qgnn_jax import results, run_log
  results.write_json_atomic(str(tmp_path / "r.json"), {"top1": 0.5, "eval_loss": float("nan"),
                                                       "x": [1.0, float("inf")]})
  text = (tmp_path / "r.json").read_text()
  assert "NaN" not in text and "Infinity" not in text
  got = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict token {c}"))
  assert got == {"top1": 0.5, "eval_loss": None, "x": [1.0, None],
                 "non_finite": ["eval_loss", "x/1"]}
  w = run_log.MetricsWriter(str(tmp_path))
  w.write({"step": 1, "split": "test", "loss": float("nan"), "top1": 0.1})
  w.write({"step": 1, "split": "train", "loss": 2.0, "top1": 0.1})
  w.close()
  line = (tmp_path / run_log.METRICS_FILE).read_text().splitlines()[0]
  assert json.loads(line, parse_constant=lambda c: pytest.fail(c)) == {
      "step": 1, "split": "test", "loss": None, "top1": 0.1, "non_finite": ["loss"]}
  assert run_log.plot_curves(str(tmp_path / run_log.METRICS_FILE), str(tmp_path / "c.png"))


def test_conftest_appends_the_device_count_to_a_users_xla_flags():
  """A user's own XLA_FLAGS no longer skips every 2-device test."""
  out = subprocess.run([sys.executable, "-c", "import conftest, jax; "
                        "print(jax.local_device_count(), end='')"],
                       cwd=os.path.join(ROOT, "tests"), capture_output=True, text=True,
                       env={**os.environ, "XLA_FLAGS": "--xla_cpu_enable_fast_math=false"},
                       timeout=300)
  assert out.returncode == 0 and out.stdout == "2", out.stderr[-2000:]


def test_a_process_whose_peers_never_join_says_so_in_time(tmp_path):
  """Only process 0 of 2 started: progress lines while it waits, then one line naming the
  process that never joined and exit 1 (JAX alone: silence, then SIGABRT and a C++ trace)."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  t0 = time.monotonic()
  code, out, err = _cli("experiments.run", f"--workdir={tmp_path / 'wd'}",
                        f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                        "--process_id=0", "--distributed_init_timeout_s=5", timeout=120)
  assert code == 1 and time.monotonic() - t0 < 60, err
  waiting = [l for l in err if "waiting for every process to join" in l]
  assert len(waiting) >= 2 and len(err) == len(waiting) + 1, err
  assert err[-1] == (f"error: process 0 of 2: process 1 of 2 never joined the coordinator "
                     f"127.0.0.1:{port} within --distributed_init_timeout_s=5 s; start every "
                     f"process with the same --coordinator_address and --num_processes (and its "
                     f"own --process_id)"), err
  assert not (tmp_path / "wd").exists()


def test_a_model_for_other_images_is_refused_at_the_config_check(tmp_path):
  code, out, err = _cli("experiments.run", f"--workdir={tmp_path / 'wd'}",
                        "--config.model=vig_tiny_28")  # the quick start's data: 8x8 digits
  assert code == 2 and err == [
      "error: config.model='vig_tiny_28': takes 28x28x1 images (its stem, position embedding "
      "and k-NN graph are sized for them), dataset 'digits' has 8x8x1; models for 8x8x1: "
      "vig_digits"], err
  assert not (tmp_path / "wd").exists()


def test_allow_config_change_says_what_changed_and_keeps_the_history(tmp_path, capsys):
  from qgnn_jax import run_config
  wd = str(tmp_path / "wd")
  assert experiment.train_and_evaluate(_config(stop_at_step=2), wd) == {}
  res = experiment.train_and_evaluate(_config(lr=5e-3, seed=3), wd, allow_config_change=True)
  err = capsys.readouterr().err
  assert (f"{wd}: continuing from step 2 with a changed config: lr: 0.002 -> 0.005; "
          f"seed: 0 -> 3") in err, err
  want = [{"step": 2, "field": "lr", "old": 0.002, "new": 0.005},
          {"step": 2, "field": "seed", "old": 0, "new": 3}]
  saved = json.loads((tmp_path / "wd" / "config.json").read_text())
  assert saved["lr"] == 0.005 and saved[run_config.CHANGES_KEY] == want
  assert res["config_changes"] == want and res["train_steps"] == 4
  # The history is no config field: the workdir still evaluates, and the same config
  # finds it finished.
  assert experiment.load_run_config(wd).lr == 0.005
  again = experiment.train_and_evaluate(_config(lr=5e-3, seed=3), wd)
  assert again == res
