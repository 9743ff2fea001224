"""End to end: the training pipeline, resume, init_from, and the experiments.run CLI."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from experiments.configs import quickstart
from qgnn_jax import checkpoint as ckpt
from qgnn_jax import experiment, recipe

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


def test_outputs_and_results_schema(tmp_path):
  res = experiment.train_and_evaluate(_config(), str(tmp_path))
  for name in ("config.json", "metrics.jsonl", "results.json"):
    assert (tmp_path / name).exists(), name
  assert (tmp_path / "checkpoints").is_dir()
  with open(tmp_path / "results.json") as f:
    on_disk = json.load(f)
  assert on_disk == res and tuple(sorted(res)) == tuple(sorted(experiment.RESULT_KEYS))
  assert res["w_bits"] is None and res["a_bits"] is None and res["fp_top1"] is None
  assert 0.0 <= res["top1"] <= 1.0 and isinstance(res["top1"], float)
  assert res["train_steps"] == 4 and res["params"] > 0
  assert res["model_bytes_quantized"] == res["model_bytes_fp32"] == 4 * res["params"]
  lines = _read_jsonl(tmp_path / "metrics.jsonl")
  assert [l["step"] for l in lines if l["split"] == "train"] == [1, 2, 3, 4]
  assert lines[-1]["split"] == "test" and lines[-1]["final"]


def test_resume_equals_uninterrupted(tmp_path):
  full, part = tmp_path / "full", tmp_path / "part"
  experiment.train_and_evaluate(_config(), str(full))
  assert experiment.train_and_evaluate(_config(stop_at_step=2), str(part)) == {}
  assert not (part / "results.json").exists()
  resumed = experiment.train_and_evaluate(_config(), str(part))
  assert resumed["train_steps"] == 4
  a, b = ckpt.restore_from(str(full)), ckpt.restore_from(str(part))
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-6)
  train = lambda d: [(l["step"], round(l["loss"], 5)) for l in _read_jsonl(d / "metrics.jsonl")
                     if l["split"] == "train"]
  assert train(full) == train(part)


def test_qat_init_from_fp_and_quantized_size(tmp_path):
  fp_dir = tmp_path / "fp"
  fp = experiment.train_and_evaluate(_config(), str(fp_dir))
  res = experiment.train_and_evaluate(
      _config(method="pq+aqd+sqd", init_from=str(fp_dir), num_steps=2), str(tmp_path / "qat"))
  assert res["fp_top1"] == fp["top1"] and res["w_bits"] == 4 and res["a_bits"] == 4
  assert res["model_bytes_quantized"] < res["model_bytes_fp32"] / 2
  lines = _read_jsonl(tmp_path / "qat" / "metrics.jsonl")
  assert {"aqd", "sqd", "ce"} <= set(lines[0])


def test_bad_method_and_missing_init(tmp_path):
  with pytest.raises(ValueError, match="method"):
    recipe.parse_method("pq+foo")
  with pytest.raises((ckpt.CheckpointError, FileNotFoundError)):
    experiment.train_and_evaluate(_config(method="pq", init_from=str(tmp_path / "nope")),
                                  str(tmp_path / "run"))


def test_quant_config_carries_every_grid_choice():
  c = quickstart.get_config()
  c.method, c.w_bits, c.a_bits, c.lam = "pq+sqd", 2, 3, 2.5
  q = recipe.quant_config(c)
  assert (q.w_quantizer, q.a_quantizer, q.w_bits, q.a_bits, q.lam) == ("pauta", "pauta", 2, 3, 2.5)
  assert (q.w_symmetric, q.a_symmetric, q.w_granularity, q.a_granularity) == (
      True, False, "channel", "tensor")
  c.w_symmetric, c.a_symmetric, c.w_granularity, c.a_granularity = False, True, "tensor", "channel"
  q = recipe.quant_config(c)
  assert (q.w_symmetric, q.a_symmetric, q.w_granularity, q.a_granularity) == (
      False, True, "tensor", "channel")
  c.a_granularity = "row"
  with pytest.raises(ValueError, match="a_granularity='row'"):
    recipe.quant_config(c)


def test_cli_quickstart_end_to_end(tmp_path):
  cmd = [sys.executable, "-m", "experiments.run", f"--workdir={tmp_path}",
         "--config.pretrain_fp_epochs=0.1", "--config.num_epochs=0.1", "--config.progress=False"]
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  for phase in ("fp", "qat"):
    with open(tmp_path / phase / "results.json") as f:
      res = json.load(f)
    assert set(res) == set(experiment.RESULT_KEYS)
  assert "| qat | pq+aqd+sqd | 4/4 |" in out.stdout
