"""End to end: the training pipeline, resume, restart checks, divergence, corrupt
checkpoints, evaluation without training, provenance, TensorBoard, and the CLI."""
import json
import os
import re
import struct
import subprocess
import sys

import jax
import numpy as np
import pytest

from experiments.configs import quickstart
from qgnn_jax import checkpoint as ckpt
from qgnn_jax import experiment, export, recipe, results, run_config, run_log
from qgnn_jax import workdir as workdir_lib
from qgnn_jax import train as train_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(**kw):
  c = quickstart.get_config()
  c.pretrain_fp_epochs = 0.0
  c.method = "fp"
  c.num_steps = 4
  c.batch_size = 32
  c.eval_batch_size = 400
  c.log_every = 1
  c.checkpoint_every = 2
  c.eval_every_epochs = 0.0
  c.progress = False
  for k, v in kw.items():
    setattr(c, k, v)
  return c


def _read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def _tensorboard_scalars(logdir):
  """{tag: [(step, value)]} from tensorboardX event files (TFRecord framing, Event protos)."""
  from tensorboardX.proto import event_pb2
  out = {}
  for name in sorted(os.listdir(logdir)):
    with open(os.path.join(logdir, name), "rb") as f:
      raw = f.read()
    pos = 0
    while pos + 12 <= len(raw):
      (n,) = struct.unpack("<Q", raw[pos:pos + 8])
      event = event_pb2.Event.FromString(raw[pos + 12:pos + 12 + n])
      pos += 12 + n + 4
      for v in event.summary.value:
        out.setdefault(v.tag, []).append((event.step, v.simple_value))
  return out


def _host_state(workdir, step=None):
  return ckpt.restore_from(str(workdir), step=step)


def _assert_trees_equal(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert jax.tree.structure(a) == jax.tree.structure(b) and len(la) == len(lb)
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  """One finished 4-step FP run (checkpoints at 2 and 4): (workdir, results)."""
  wd = tmp_path_factory.mktemp("finished")
  return wd, experiment.train_and_evaluate(_config(), str(wd))


def test_outputs_and_results_schema(finished):
  wd, res = finished
  for name in ("config.json", "metrics.jsonl", "results.json", "curves.png"):
    assert (wd / name).exists(), name
  assert (wd / "checkpoints").is_dir() and (wd / "curves.png").stat().st_size > 1000
  with open(wd / "results.json") as f:
    on_disk = json.load(f)
  assert on_disk == res and tuple(res) == results.RESULT_KEYS == experiment.RESULT_KEYS
  assert set(results.REQUIRED_KEYS) <= set(res)
  assert res["w_bits"] is None and res["a_bits"] is None and res["fp_top1"] is None
  assert 0.0 <= res["top1"] <= 1.0 and isinstance(res["top1"], float)
  assert res["train_steps"] == 4 and res["params"] > 0
  # Sizes: the export experiments.export writes (an FP run: one file, its params at fp32
  # plus BN statistics, keys and meta).
  assert res["model_bytes_quantized"] == res["model_bytes_fp32"] == \
      export.nbytes(workdir_lib.from_workdir(str(wd)))
  assert 4 * res["params"] < res["model_bytes_fp32"] < 4 * res["params"] * 1.2 + 20000
  # Provenance: what measured top1, and what made it.
  assert res["eval_split"] == "test" and res["eval_loss"] > 0
  assert res["jax_version"] == jax.__version__ and res["device_count"] == jax.device_count()
  assert res["process_count"] == 1 and res["device_kind"] == jax.devices()[0].device_kind
  assert res["git_commit"] is None or len(res["git_commit"].split("+")[0]) == 40
  assert res["config_sha256"] == run_config.config_sha256(_config())
  assert res["started_at"] <= res["finished_at"] and res["finished_at"].endswith("+00:00")
  lines = _read_jsonl(wd / "metrics.jsonl")
  assert [l["step"] for l in lines if l["split"] == "train"] == [1, 2, 3, 4]
  assert lines[-1]["split"] == "test" and lines[-1]["final"]
  # TensorBoard has the same numbers as metrics.jsonl.
  tb = _tensorboard_scalars(wd / run_log.TENSORBOARD_DIR)
  assert [s for s, _ in tb["train/loss"]] == [1, 2, 3, 4]
  np.testing.assert_allclose([v for _, v in tb["train/loss"]],
                             [l["loss"] for l in lines if l["split"] == "train"], rtol=1e-6)
  assert tb["test/top1"] == [(4, pytest.approx(res["top1"], rel=1e-6))]


def test_finished_workdir_is_reported_not_rerun(finished, capsys):
  wd, res = finished
  before = {n: os.path.getmtime(wd / n) for n in ("metrics.jsonl", "results.json")}
  # progress / log_every / stop_at_step may differ on a restart.
  again = experiment.train_and_evaluate(_config(progress=True, log_every=3), str(wd))
  assert again == res
  assert {n: os.path.getmtime(wd / n) for n in before} == before
  assert "already finished" in capsys.readouterr().err


def test_restart_with_another_config_is_refused_before_any_write(finished):
  wd, _ = finished
  files = {p: os.path.getmtime(p) for p in wd.rglob("*")}
  with pytest.raises(run_config.ConfigMismatchError) as e:
    experiment.train_and_evaluate(_config(lr=5e-3, seed=7, num_steps=6), str(wd))
  msg = str(e.value)
  for line in ("  lr: 0.002 -> 0.005", "  seed: 0 -> 7", "  num_steps: 4 -> 6"):
    assert line in msg.splitlines(), msg
  assert "--workdir" in msg and "--allow_config_change" in msg
  assert {p: os.path.getmtime(p) for p in wd.rglob("*")} == files  # nothing written
  with pytest.raises(run_config.ConfigMismatchError, match="method: 'fp' -> 'pq'"):
    experiment.train_and_evaluate(_config(method="pq"), str(wd))
  assert json.loads((wd / "config.json").read_text())["method"] == "fp"


def test_evaluate_a_checkpoint_without_training(finished):
  wd, res = finished
  out = workdir_lib.evaluate_checkpoint(str(wd))
  assert out["step"] == 4 and out["split"] == "test" and out["count"] == 359
  assert out["top1"] == res["top1"] and out["loss"] == pytest.approx(res["eval_loss"], rel=1e-9)
  assert json.loads((wd / results.EVAL_FILE).read_text()) == out
  early = workdir_lib.evaluate_checkpoint(str(wd), step=2, split="test")
  assert early["step"] == 2
  with pytest.raises(ckpt.CheckpointError, match=r"step 3 is not kept .*\[2, 4\]"):
    workdir_lib.evaluate_checkpoint(str(wd), step=3)
  with pytest.raises(run_config.ConfigError, match="val_holdout=0"):
    workdir_lib.evaluate_checkpoint(str(wd), split="validation")


def test_resume_equals_uninterrupted(finished, tmp_path):
  full, part = finished[0], tmp_path / "part"
  assert experiment.train_and_evaluate(_config(stop_at_step=2), str(part)) == {}
  assert not (part / "results.json").exists()
  # As if killed after logging step 3, before its checkpoint: the line goes on resume.
  with open(part / "metrics.jsonl", "a") as f:
    f.write(json.dumps({"step": 3, "split": "train", "loss": 9.0}) + "\n" + '{"step": 4, "sp')
  resumed = experiment.train_and_evaluate(_config(), str(part))
  assert resumed["train_steps"] == 4 and resumed["top1"] == finished[1]["top1"]
  _assert_trees_equal(_host_state(full), _host_state(part))  # bit-identical
  train = lambda d: [(l["step"], l["loss"]) for l in _read_jsonl(d / "metrics.jsonl")
                     if l["split"] == "train"]
  assert train(full) == train(part)
  assert resumed["started_at"] <= resumed["finished_at"]


def test_divergence_never_reaches_disk(tmp_path, monkeypatch):
  """The state turns NaN after step 3: the save at step 4 refuses, naming step 2."""
  make = train_lib.make_train_step

  def poisoned(*args, **kw):
    step = make(*args, **kw)

    def run(state, batch):
      state, metrics = step(state, batch)
      if int(state.step[0]) >= 3:
        state = state.replace(params=jax.tree.map(lambda x: x * np.nan, state.params))
      return state, metrics
    return run
  monkeypatch.setattr(train_lib, "make_train_step", poisoned)
  wd = tmp_path / "nan"
  with pytest.raises(ckpt.NonFiniteStateError, match=r"step 4 .*latest finite checkpoint is "
                                                     r"step 2 in .*checkpoints"):
    experiment.train_and_evaluate(_config(log_every=100, num_steps=6), str(wd))
  manager = ckpt.make_manager(str(wd / "checkpoints"))
  assert manager.all_steps() == [2]
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(_host_state(wd))
             if np.issubdtype(np.asarray(x).dtype, np.floating))


def test_corrupt_latest_checkpoint_falls_back(finished, tmp_path, caplog):
  import shutil
  wd = tmp_path / "corrupt"
  shutil.copytree(finished[0], wd)
  (wd / "results.json").unlink()
  for f in (wd / "checkpoints" / "4" / "state").rglob("*"):
    if f.is_file():
      f.write_bytes(b"garbage")
  res = experiment.train_and_evaluate(_config(), str(wd))
  assert "step 4" in caplog.text and "falling back to the previous kept step" in caplog.text
  assert len(max(caplog.text.splitlines(), key=len)) < 1000  # no TensorStore dump
  assert (wd / "discarded_checkpoints" / "4").is_dir()
  assert res["top1"] == finished[1]["top1"]
  _assert_trees_equal(_host_state(finished[0]), _host_state(wd))
  # An explicit --config.restore_step: that step, the newer one set aside, same result.
  (wd / "results.json").unlink()
  res = experiment.train_and_evaluate(_config(restore_step=2), str(wd))
  assert (wd / "discarded_checkpoints" / "4.1").is_dir() and res["top1"] == finished[1]["top1"]
  assert [l["step"] for l in _read_jsonl(wd / "metrics.jsonl") if l["split"] == "train"] == [
      1, 2, 3, 4]


def _truncated_idx_dir(tmp_path):
  import gzip
  d = tmp_path / "fm"
  d.mkdir()
  for split, n in (("train", 64), ("t10k", 16)):
    images = struct.pack(">BBBBIII", 0, 0, 8, 3, n, 28, 28) + bytes(n * 28 * 28)
    labels = struct.pack(">BBBBI", 0, 0, 8, 1, n) + bytes(n)
    for name, raw in ((f"{split}-images-idx3-ubyte.gz", images),
                      (f"{split}-labels-idx1-ubyte.gz", labels)):
      (d / name).write_bytes(gzip.compress(raw))
  path = d / "train-images-idx3-ubyte.gz"
  path.write_bytes(path.read_bytes()[:-20])  # cut off, as by an interrupted copy
  return d


def test_truncated_idx_file_is_named_in_one_line(tmp_path):
  d = _truncated_idx_dir(tmp_path)
  with pytest.raises(experiment.DataError, match=r"config.dataset='fashion_mnist': the data "
                                                 r"could not be loaded: .*train-images-idx3-"
                                                 r"ubyte\.gz: truncated gzip file"):
    experiment.train_and_evaluate(_config(dataset="fashion_mnist", model="vig_tiny_28",
                                          data_dir=str(d)), str(tmp_path / "wd"))
  out = subprocess.run([sys.executable, "-m", "experiments.run", f"--workdir={tmp_path / 'cli'}",
                        "--config.pretrain_fp_epochs=0", "--config.dataset=fashion_mnist",
                        "--config.model=vig_tiny_28", f"--config.data_dir={d}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
  errors = [l for l in out.stderr.splitlines() if l.strip()]
  assert out.returncode == 1 and len(errors) == 1, out.stderr[-3000:]
  assert errors[0].startswith("error: config.dataset='fashion_mnist'") and \
      "train-images-idx3-ubyte.gz: truncated gzip" in errors[0]


def test_qat_init_from_fp_and_quantized_size(tmp_path):
  fp_dir = tmp_path / "fp"
  fp = experiment.train_and_evaluate(_config(), str(fp_dir))
  res = experiment.train_and_evaluate(
      _config(method="pq+aqd+sqd", init_from=str(fp_dir), num_steps=2), str(tmp_path / "qat"))
  assert res["fp_top1"] == fp["top1"] and res["w_bits"] == 4 and res["a_bits"] == 4
  assert res["model_bytes_quantized"] < res["model_bytes_fp32"] / 2
  # ... the byte counts of the files experiments.export writes for this checkpoint.
  out = workdir_lib.export_workdir(str(tmp_path / "qat"), str(tmp_path / "qat.qgx"))
  assert (out["bytes"], out["bytes_fp32"]) == \
      (res["model_bytes_quantized"], res["model_bytes_fp32"])
  assert os.path.getsize(tmp_path / "qat.qgx") == res["model_bytes_quantized"]
  lines = _read_jsonl(tmp_path / "qat" / "metrics.jsonl")
  assert {"aqd", "sqd", "ce"} <= set(lines[0])


def test_bad_method_and_missing_init(tmp_path):
  with pytest.raises(ValueError, match="method"):
    recipe.parse_method("pq+foo")
  with pytest.raises(run_config.ConfigError, match="config.init_from=.*no checkpoint found"):
    experiment.train_and_evaluate(_config(method="pq", init_from=str(tmp_path / "nope")),
                                  str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


def test_quant_rules_carry_every_grid_choice():
  c = quickstart.get_config()
  c.method, c.w_bits, c.a_bits, c.lam = "pq+sqd", 2, 3, 2.5
  # Two rules per quantized layer group: its GELU-fed ops (LSQ's GELU grid), then the rest.
  gelu_fed, rest = recipe.quant_rules(c)
  assert (gelu_fed.a_grid, rest.a_grid) == (c.lsq_gelu_grid, "signed")
  for q in (gelu_fed, rest):
    assert (q.w_quantizer, q.a_quantizer, q.w_bits, q.a_bits, q.lam) == ("pq", "pq", 2, 3, 2.5)
    assert (q.w_symmetric, q.a_symmetric, q.w_granularity, q.a_granularity) == (
        True, False, "channel", "tensor")
  c.w_symmetric, c.a_symmetric, c.w_granularity, c.a_granularity = False, True, "tensor", "channel"
  for q in recipe.quant_rules(c):
    assert (q.w_symmetric, q.a_symmetric, q.w_granularity, q.a_granularity) == (
        False, True, "tensor", "channel")
  c.a_granularity = "row"
  with pytest.raises(ValueError, match="a_granularity='row'"):
    recipe.quant_rules(c)


INFO_LINE = re.compile(r"^I\d{4} |^INFO:|\] INFO ", re.M)  # absl / python logging INFO


@pytest.mark.slow
def test_cli_quickstart_end_to_end(tmp_path):
  """The quick start (scaled down): both phases, the summary table, a readable console
  (progress with steps/s and time left, no library INFO lines); experiments.evaluate on
  the QAT phase, whose --verbose brings the INFO lines back."""
  cmd = [sys.executable, "-m", "experiments.run", f"--workdir={tmp_path}",
         "--config.pretrain_fp_epochs=0.1", "--config.num_epochs=0.1"]
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800)
  assert out.returncode == 0, out.stderr[-3000:]
  for phase in ("fp", "qat"):
    with open(tmp_path / phase / "results.json") as f:
      res = json.load(f)
    assert tuple(res) == results.RESULT_KEYS
  assert f"| qat | {quickstart.get_config().method} | 4/4 |" in out.stdout
  assert re.search(r"\d+/\d+ \[\d+:\d+<\d+:\d+, +[\d.]+(step/s|s/step)", out.stderr), \
      out.stderr[-2000:]
  assert not INFO_LINE.search(out.stderr), INFO_LINE.findall(out.stderr)[:5]
  ev = [sys.executable, "-m", "experiments.evaluate", f"--workdir={tmp_path / 'qat'}"]
  quiet = subprocess.run(ev, cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert quiet.returncode == 0, quiet.stderr[-3000:]
  assert re.search(r"step \d+: test top-1 [\d.]+% \(359 images\), loss", quiet.stdout)
  assert json.loads((tmp_path / "qat" / "eval.json").read_text())["top1"] == res["top1"]
  assert not INFO_LINE.search(quiet.stderr)
  loud = subprocess.run(ev + ["--verbose"], cwd=ROOT, capture_output=True, text=True,
                        timeout=900)
  assert loud.returncode == 0 and INFO_LINE.search(loud.stderr), loud.stderr[-2000:]
