"""Every config field validated before data loading and compile (qgnn_jax.run_config), the
restart diff, and the CLI's exit status 2 with nothing left behind."""
import os
import subprocess
import sys

import pytest

from experiments.configs import common, quickstart
from qgnn_jax import experiment, recipe, run_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (field, bad value, what the one-line message must say): the table of bad inputs.
BAD_FIELDS = [
    ("batch_size", 0, "config.batch_size=0: valid: an int >= 1"),
    ("batch_size", 63, "config.batch_size=63: must be divisible by the 2 devices"),
    ("eval_batch_size", 401, "config.eval_batch_size=401: must be divisible by the 2 devices"),
    ("lr", -1.0, "config.lr=-1.0: valid: a finite number > 0"),
    ("lr", 0.0, "config.lr=0.0: valid: a finite number > 0"),
    ("lr", float("nan"), "config.lr=nan: valid: a finite number > 0"),
    ("w_bits", 1, "config.w_bits=1: valid: an int in [2, 16]"),
    ("a_bits", 17, "config.a_bits=17: valid: an int in [2, 16]"),
    ("lam", 0.0, "config.lam=0.0: valid: a finite number > 0"),
    ("aqd_alpha", -0.1, "config.aqd_alpha=-0.1: valid: a finite number >= 0"),
    ("aqd_tau", 0.0, "config.aqd_tau=0.0: valid: a finite number > 0"),
    ("sqd_p", 1.5, "config.sqd_p=1.5: valid: a finite number in [0, 1]"),
    ("drop_path", 1.0, "config.drop_path=1.0: valid: a finite number in [0, 1)"),
    ("ema_momentum", 1.0, "config.ema_momentum=1.0: valid: a finite number in [0, 1)"),
    ("label_smoothing", -0.1, "config.label_smoothing=-0.1: valid: a finite number in [0, 1)"),
    ("dataset", "cifar11", "config.dataset='cifar11': valid: one of digits, mnist"),
    ("model", "vig_huge", "config.model='vig_huge': valid: one of pvig_b_224"),
    ("method", "pq+foo", "config.method='pq+foo': valid: one of ('fp', 'pq'"),
    ("method", "fp+aqd", "config.method='fp+aqd': valid:"),
    ("method", "nq", "config.method='nq': valid:"),  # an unknown quantizer
    ("graph_impl", "sparse", "config.graph_impl='sparse': valid: one of 'dense', 'segment'"),
    ("dtype", "float16", "config.dtype='float16': valid: one of 'float32', 'bfloat16'"),
    ("w_granularity", "row", "config.w_granularity='row': valid: one of 'tensor', 'channel'"),
    ("optimizer", "adam", "config.optimizer='adam': valid: one of 'adamw', 'sgd'"),
    ("eval_on", "train", "config.eval_on='train': valid: one of 'auto', 'test', 'validation'"),
    ("eval_on", "validation", "config.eval_on='validation': needs val_holdout > 0"),
    ("num_steps", -1, "config.num_steps=-1: valid: an int >= 0"),
    ("num_epochs", 0.0, "config.num_epochs=0.0: valid: > 0 (or set num_steps > 0)"),
    ("log_every", 0, "config.log_every=0: valid: an int >= 1"),
    ("checkpoint_every", 0, "config.checkpoint_every=0: valid: an int >= 1"),
    ("keep_checkpoints", 0, "config.keep_checkpoints=0: valid: an int >= 1"),
    ("seed", -1, "config.seed=-1: valid: an int >= 0"),
    ("val_holdout", -5, "config.val_holdout=-5: valid: an int >= 0"),
    ("augment", "yes", "config.augment='yes': valid: True or False"),
    ("lsq_gelu_grid", "relu", "config.lsq_gelu_grid='relu': valid: one of 'signed', "),
    ("range_grad", 1, "config.range_grad=1: valid: True or False"),
    ("init_from", "/no/such/run", "config.init_from='/no/such/run': no checkpoint found"),
]


def _fields(**kw):
  c = dict(quickstart.get_config().items())
  c.update(kw)
  return c


def test_bits_are_checked_against_the_methods_quantizer():
  # Every quantizer takes [2, 16]; N2UQ only [2, 8] (its registry entry's bit range).
  run_config.validate(_fields(method="pq", a_bits=16))
  with pytest.raises(run_config.ConfigError, match=r"config.a_bits=16: valid: an int in "
                                                   r"\[2, 8\] for method 'n2uq'"):
    run_config.validate(_fields(method="n2uq", a_bits=16))


@pytest.mark.parametrize("field,value,message", BAD_FIELDS)
def test_each_bad_field_is_one_line_naming_it(field, value, message):
  with pytest.raises(run_config.ConfigError) as e:
    run_config.validate(_fields(**{field: value}), num_devices=2)
  assert str(e.value).startswith(message), str(e.value)
  assert "\n" not in str(e.value)


def test_every_shipped_config_and_the_base_are_valid():
  from experiments.configs import (cifar10_fp, cifar10_qat, fashion_mnist_fp,
                                   imagenet_vig_ti_qat)
  for module in (common, quickstart, cifar10_fp, cifar10_qat, fashion_mnist_fp,
                 imagenet_vig_ti_qat):
    c = module.base_config() if module is common else module.get_config()
    run_config.validate(c, num_devices=1)
  assert set(common.base_config()) == set(run_config.FIELD_CHECKS)


def test_unknown_and_missing_fields():
  with pytest.raises(run_config.ConfigError, match="config.bach_size: unknown field "
                                                   r"\(did you mean 'batch_size'\?\)"):
    run_config.validate({**_fields(), "bach_size": 32})
  c = _fields()
  del c["lr"]
  with pytest.raises(run_config.ConfigError, match="config.lr: missing"):
    run_config.validate(c)
  with pytest.raises(run_config.ConfigError, match="config.num_steps=2.5: must be an int"):
    run_config.validate(_fields(num_steps=2.5))
  with pytest.raises(run_config.ConfigError, match="config.w_bits=True: must be an int"):
    run_config.validate(_fields(w_bits=True))
  # Two processes of 2 devices: batches divide by 4.
  with pytest.raises(run_config.ConfigError, match="2 processes x 2 devices; use a multiple "
                                                   "of 4"):
    run_config.validate(_fields(batch_size=66), num_devices=2, num_processes=2)


def test_config_diff_ignores_only_the_restart_safe_fields():
  old = _fields()
  new = _fields(progress=False, log_every=3, stop_at_step=9, checkpoint_every=7,
                keep_checkpoints=5, eval_every_epochs=2.0, restore_step=4)
  assert run_config.config_diff(old, new) == []
  assert run_config.config_sha256(old) == run_config.config_sha256(new)
  new = _fields(lr=1.0, seed=3)
  assert run_config.config_diff(old, new) == [("lr", 2e-3, 1.0), ("seed", 0, 3)]
  assert run_config.config_sha256(old) != run_config.config_sha256(new)
  saved = dict(old)
  del saved["dropout"]  # a config.json written before a field existed
  assert run_config.config_diff(saved, old) == [("dropout", "(absent)", 0.0)]
  # Fields added by issue 15: absent means the run was made with the old behaviour.
  saved = {k: v for k, v in old.items() if k not in ("lsq_gelu_grid", "range_grad")}
  assert run_config.config_diff(saved, _fields(lsq_gelu_grid="signed", range_grad=False)) == []
  assert run_config.config_diff(saved, _fields(lsq_gelu_grid="offset")) == [
      ("lsq_gelu_grid", "signed", "offset")]
  with pytest.raises(run_config.ConfigMismatchError, match="  lr: 0.002 -> 1.0"):
    run_config.check_restart(old, _fields(lr=1.0), "wd")
  assert run_config.check_restart(old, _fields(lr=1.0), "wd", allow_change=True) == [
      ("lr", 2e-3, 1.0)]


def test_train_and_evaluate_validates_before_anything(tmp_path, monkeypatch):
  def no_data(*a, **k):
    raise AssertionError("data loaded before the config was checked")
  monkeypatch.setattr(recipe, "input_pipeline", no_data)
  c = quickstart.get_config()
  c.w_bits, c.method = 1, "fp"
  with pytest.raises(run_config.ConfigError, match="config.w_bits=1"):
    experiment.train_and_evaluate(c, str(tmp_path / "wd"))
  c = quickstart.get_config()  # a pipeline: its QAT phase is checked before FP starts
  c.sqd_temperature = 0.0
  with pytest.raises(run_config.ConfigError, match="config.sqd_temperature=0.0"):
    experiment.run_pipeline(c, str(tmp_path / "wd"))
  assert not (tmp_path / "wd").exists()


@pytest.mark.parametrize("override", ["--config.batch_size=0", "--config.graph_impl=sparse"])
def test_cli_bad_field_exits_2_with_one_line_and_no_workdir(tmp_path, override):
  wd = tmp_path / "wd"
  out = subprocess.run([sys.executable, "-m", "experiments.run", f"--workdir={wd}",
                        "--config.pretrain_fp_epochs=0", override],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert out.returncode == 2, out.stderr[-2000:]
  errors = [l for l in out.stderr.splitlines() if l.strip()]
  assert len(errors) == 1 and errors[0].startswith("error: config."), out.stderr[-2000:]
  assert override.split("=")[0][2:] in errors[0] and not wd.exists()


def test_load_run_config_reads_old_workdirs_with_their_legacy_values(tmp_path):
  """A config.json written before lsq_gelu_grid / range_grad existed loads with the values
  its run was made with (signed grid, no range gradient), not today's defaults."""
  import json
  from experiments.configs.common import base_config
  from qgnn_jax import experiment
  old = base_config().to_dict()
  for field in run_config.LEGACY_VALUES:
    old.pop(field)
  (tmp_path / "config.json").write_text(json.dumps(old))
  loaded = experiment.load_run_config(str(tmp_path))
  for field, value in run_config.LEGACY_VALUES.items():
    assert loaded[field] == value, field
  assert base_config().lsq_gelu_grid != run_config.LEGACY_VALUES["lsq_gelu_grid"]
