"""A run config checked before anything runs, and compared with the one a workdir was made by.

* :func:`validate` checks every field of a run config (`experiments/configs/common.py`
  lists them) for type and range, and that batch sizes divide over the devices, before any
  data is read or anything compiled. A bad field raises :class:`ConfigError` with one line
  naming the field, the value and what is valid; `experiments.run` prints it and exits
  with status 2, leaving no file behind.
* :func:`config_diff` lists the fields that change the run between a workdir's saved
  `config.json` and a new config: all fields but :data:`RESTART_SAFE_FIELDS` (how the run is
  watched and checkpointed, not what it computes).
* :func:`config_sha256` identifies the run-defining fields (results.json's `config_sha256`).
"""
from __future__ import annotations

import difflib
import hashlib
import json
import math
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

# Fields that may differ when a workdir is restarted: they change what is printed, logged
# or checkpointed (and where training stops this time), never the numbers a run computes.
RESTART_SAFE_FIELDS = frozenset({
    "progress", "log_every", "stop_at_step", "checkpoint_every", "keep_checkpoints",
    "eval_every_epochs", "restore_step"})

GRAPH_IMPLS = ("dense", "segment")
DTYPES = ("float32", "bfloat16")
GRANULARITIES = ("channel", "tensor")
LSQ_GRIDS = ("signed", "unsigned", "offset")  # qgnn_jax.quant.GRIDS (not imported: no jax here)
OPTIMIZERS = ("adamw", "sgd")
EVAL_ON = ("auto", "test", "validation")
BITS_RANGE = (2, 16)


class ConfigError(ValueError):
  """A config field has a bad type or value; the message is one line naming it."""


class ConfigMismatchError(ValueError):
  """A workdir's saved config.json differs from the new config in run-defining fields."""


# ----------------------------------------------------------------------------- checks


def _bad(field: str, value: Any, valid: str) -> ConfigError:
  return ConfigError(f"config.{field}={value!r}: {valid}")


def _is_int(v: Any) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
  return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def _int(lo: Optional[int] = None, hi: Optional[int] = None) -> Callable[[str, Any], None]:
  def check(field, v):
    if not _is_int(v):
      raise _bad(field, v, "must be an int" + _range_text(lo, hi, "[", "]"))
    if (lo is not None and v < lo) or (hi is not None and v > hi):
      raise _bad(field, v, "valid: an int" + _range_text(lo, hi, "[", "]"))
  return check


def _range_text(lo, hi, left, right) -> str:
  if lo is not None and hi is not None:
    return f" in {left}{lo}, {hi}{right}"
  if lo is not None:
    return f" {'>=' if left == '[' else '>'} {lo}"
  if hi is not None:
    return f" {'<=' if right == ']' else '<'} {hi}"
  return ""


def _real(lo: Optional[float] = None, hi: Optional[float] = None, lo_open: bool = False,
          hi_open: bool = False) -> Callable[[str, Any], None]:
  left, right = "(" if lo_open else "[", ")" if hi_open else "]"

  def check(field, v):
    ok = _is_real(v)
    if ok and lo is not None:
      ok = v > lo if lo_open else v >= lo
    if ok and hi is not None:
      ok = v < hi if hi_open else v <= hi
    if not ok:
      raise _bad(field, v, "valid: a finite number" + _range_text(lo, hi, left, right))
  return check


def _bool(field, v):
  if not isinstance(v, bool):
    raise _bad(field, v, "valid: True or False")


def _str(field, v):
  if not isinstance(v, str):
    raise _bad(field, v, "valid: a string")


def _one_of(choices: Tuple[str, ...]) -> Callable[[str, Any], None]:
  def check(field, v):
    if v not in choices:
      raise _bad(field, v, f"valid: one of {', '.join(repr(c) for c in choices)}")
  return check


def _dataset(field, v):
  from qgnn_jax.data import DATASETS  # pylint: disable=g-import-not-at-top
  if not isinstance(v, str) or v.split("/")[0] not in DATASETS:
    raise _bad(field, v, f"valid: one of {', '.join(DATASETS)} (a tfds config suffix such "
                         f"as 'imagenette/320px-v2' is accepted)")


def _model(field, v):
  from qgnn_jax.models import MODELS  # pylint: disable=g-import-not-at-top
  if v not in MODELS:
    raise _bad(field, v, f"valid: one of {', '.join(sorted(MODELS))}")


def _method(field, v):
  from qgnn_jax.recipe import parse_method  # pylint: disable=g-import-not-at-top
  try:
    parse_method(v)
  except ValueError as e:
    raise ConfigError(f"config.{field}={v!r}: {str(e).split('; ', 1)[-1]}") from None


def _distill_form(field, v):
  from qgnn_jax import distill  # pylint: disable=g-import-not-at-top
  registry = distill.AQD_FORMS if field == "aqd_form" else distill.SQD_FORMS
  if v not in registry:
    raise _bad(field, v, f"valid: one of {', '.join(registry.names())}")


def _sqd_bits(field, v):
  from qgnn_jax.recipe import parse_sqd_bits  # pylint: disable=g-import-not-at-top
  try:
    parse_sqd_bits(v, 2)
  except ValueError as e:
    raise ConfigError(f"config.{field}={v!r}: {str(e).split('; ', 1)[-1]}") from None


PTQ_SEARCHES = ("mse", "none")  # per-site range search after calibration, or none

# Every run config field and its check (the defaults are in experiments/configs/common.py).
FIELD_CHECKS: Mapping[str, Callable[[str, Any], None]] = {
    # data
    "dataset": _dataset, "data_dir": _str, "val_holdout": _int(0), "eval_on": _one_of(EVAL_ON),
    "augment": _bool,
    # model and quantization
    "model": _model, "method": _method, "w_bits": _int(*BITS_RANGE), "a_bits": _int(*BITS_RANGE),
    "lam": _real(0, lo_open=True), "w_symmetric": _bool, "a_symmetric": _bool,
    "w_granularity": _one_of(GRANULARITIES), "a_granularity": _one_of(GRANULARITIES),
    "ema_momentum": _real(0, 1, hi_open=True), "lsq_gelu_grid": _one_of(LSQ_GRIDS),
    "range_grad": _bool, "quantize_stem": _bool, "quantize_head": _bool,
    "graph_impl": _one_of(GRAPH_IMPLS), "dtype": _one_of(DTYPES),
    "drop_path": _real(0, 1, hi_open=True), "dropout": _real(0, 1, hi_open=True),
    # self-distillation
    "aqd_alpha": _real(0), "aqd_tau": _real(0, lo_open=True), "sqd_beta": _real(0),
    "sqd_p": _real(0, 1), "sqd_temperature": _real(0, lo_open=True),
    "aqd_form": _distill_form, "sqd_form": _distill_form, "sqd_bits": _sqd_bits,
    "kd_weight": _real(0),
    "label_smoothing": _real(0, 1, hi_open=True),
    # optimisation
    "optimizer": _one_of(OPTIMIZERS), "lr": _real(0, lo_open=True), "quant_lr": _real(),
    "weight_decay": _real(0), "warmup_epochs": _real(0), "grad_clip": _real(0),
    "num_epochs": _real(0), "num_steps": _int(0), "batch_size": _int(1),
    "eval_batch_size": _int(1), "seed": _int(0),
    # bookkeeping
    "init_from": _str, "source": _str, "log_every": _int(1), "eval_every_epochs": _real(0),
    "checkpoint_every": _int(1), "keep_checkpoints": _int(1), "stop_at_step": _int(0),
    "restore_step": _int(0), "progress": _bool,
    # two-phase pipelines
    "pretrain_fp_epochs": _real(0),
    # post-training quantization (qgnn_jax/ptq_run.py)
    "ptq": _bool, "ptq_batches": _int(1), "ptq_search": _one_of(PTQ_SEARCHES),
}


def unknown_field_error(field: str) -> ConfigError:
  """The error for a field no run config has (a config file's or a --config.<field> flag's),
  with the closest valid field."""
  close = difflib.get_close_matches(field.split(".")[0], FIELD_CHECKS, n=1)
  hint = f" (did you mean {close[0]!r}?)" if close else ""
  return ConfigError(f"config.{field}: unknown field{hint}; valid fields: "
                     f"{', '.join(sorted(FIELD_CHECKS))}")


def validate(config: Any, num_devices: int = 1, num_processes: int = 1,
             check_init_from: bool = True) -> None:
  """Checks every field of a run config; raises ConfigError (one line) on the first bad one.

  Args:
    config: an ml_collections.ConfigDict (or mapping) of run fields.
    num_devices: local devices per process D; batch sizes must divide by P * D.
    num_processes: processes P.
    check_init_from: whether a non-empty init_from must hold a checkpoint (False for the
      QAT phase of a pipeline whose FP phase has not run yet).
  """
  fields = dict(config.items()) if hasattr(config, "items") else dict(config)
  unknown = sorted(set(fields) - set(FIELD_CHECKS))
  if unknown:
    raise unknown_field_error(unknown[0])
  missing = sorted(set(FIELD_CHECKS) - set(fields))
  if missing:
    raise ConfigError(f"config.{missing[0]}: missing (every config starts from "
                      f"experiments/configs/common.py's base_config())")
  for field, check in FIELD_CHECKS.items():
    check(field, fields[field])
  per = num_devices * num_processes
  for field in ("batch_size", "eval_batch_size"):
    if fields[field] % per:
      what = (f"{num_devices} devices" if num_processes == 1 else
              f"{num_processes} processes x {num_devices} devices")
      raise _bad(field, fields[field], f"must be divisible by the {what}; use a multiple "
                                       f"of {per}")
  if fields["num_steps"] == 0 and fields["num_epochs"] <= 0:
    raise _bad("num_epochs", fields["num_epochs"], "valid: > 0 (or set num_steps > 0)")
  if fields["eval_on"] == "validation" and fields["val_holdout"] == 0:
    raise _bad("eval_on", "validation", "needs val_holdout > 0 (images held out of train)")
  _check_image_size(fields["model"], fields["dataset"])
  if "kd" in str(fields["method"]).split("+") and not fields["init_from"] \
      and not fields["pretrain_fp_epochs"]:
    raise _bad("method", fields["method"], "+kd distils from the FP model QAT starts from: "
                                           "set config.init_from (or pretrain_fp_epochs)")
  if check_init_from and fields["init_from"]:
    from qgnn_jax import checkpoint as ckpt  # pylint: disable=g-import-not-at-top
    try:
      ckpt.resolve_checkpoint_dir(fields["init_from"])
    except ckpt.CheckpointError as e:
      raise ConfigError(f"config.init_from={fields['init_from']!r}: {e}") from None


def _check_image_size(model: str, dataset: str) -> None:
  """ConfigError unless the dataset's images have the (H, W, C) the model's stem, position
  embedding and k-NN graph were sized for (a 28x28 model on 8x8 digits would leave a 2x2
  grid: fewer nodes than neighbours)."""
  from qgnn_jax.data import get_info  # pylint: disable=g-import-not-at-top
  from qgnn_jax.models import INPUT_SHAPES  # pylint: disable=g-import-not-at-top
  want, have = INPUT_SHAPES.get(model), get_info(dataset).image_shape
  if want is None or tuple(want) == tuple(have):
    return
  fits = sorted(m for m, shape in INPUT_SHAPES.items() if tuple(shape) == tuple(have))
  size = lambda s: "x".join(map(str, s))
  raise _bad("model", model,
             f"takes {size(want)} images (its stem, position embedding and k-NN graph are sized "
             f"for them), dataset {dataset!r} has {size(have)}; models for {size(have)}: "
             f"{', '.join(fits) or 'none'}")


# ----------------------------------------------------------------------------- restart


# A key of config.json beside the fields: the changes `--allow_config_change` let through,
# [{"step": N, "field": F, "old": A, "new": B}, ...] in the order they were made.
CHANGES_KEY = "config_changes"


def run_fields(config: Any) -> Dict[str, Any]:
  """The fields that define the run's numbers: all but RESTART_SAFE_FIELDS (and config.json's
  change history)."""
  fields = dict(config.items()) if hasattr(config, "items") else dict(config)
  return {k: v for k, v in fields.items() if k not in RESTART_SAFE_FIELDS and k != CHANGES_KEY}


def changes(saved: Optional[Mapping[str, Any]]) -> List[Dict[str, Any]]:
  """The change history a saved config.json holds ([] for none)."""
  return list((saved or {}).get(CHANGES_KEY, []))


def config_sha256(config: Any) -> str:
  """SHA-256 (hex) of the run-defining fields as sorted JSON."""
  text = json.dumps(run_fields(config), sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()


_ABSENT = "(absent)"
# Fields added after runs were made: a saved config without one was run with this value
# (what the code did before the field existed), so its absence is no difference.
LEGACY_VALUES: Mapping[str, Any] = {"lsq_gelu_grid": "signed", "range_grad": False,
                                     "source": "", "aqd_form": "channel_mse",
                                     "sqd_form": "bypass_kl", "sqd_bits": "auto",
                                     "kd_weight": 1.0, "ptq": False, "ptq_batches": 8,
                                     "ptq_search": "mse"}


def with_legacy_values(saved: Mapping[str, Any]) -> Dict[str, Any]:
  """A saved config.json's fields (without its change history), plus LEGACY_VALUES for those
  it predates (what the run was made with). Use before filling other missing fields with
  today's defaults."""
  return {**{k: v for k, v in LEGACY_VALUES.items() if k not in saved},
          **{k: v for k, v in saved.items() if k != CHANGES_KEY}}


def config_diff(saved: Mapping[str, Any], new: Any) -> List[Tuple[str, Any, Any]]:
  """(field, old, new) for each run-defining field that differs, sorted by field.

  A field only one side has counts as a difference (old or new is '(absent)'), unless it
  is in LEGACY_VALUES and the other side has that value.
  """
  old, cur = run_fields(saved), run_fields(new)
  out = []
  for k in sorted(set(old) | set(cur)):
    a, b = old.get(k, LEGACY_VALUES.get(k, _ABSENT)), cur.get(k, LEGACY_VALUES.get(k, _ABSENT))
    if a != b:
      out.append((k, a, b))
  return out


def check_restart(saved: Mapping[str, Any], new: Any, workdir: str,
                  allow_change: bool = False) -> List[Tuple[str, Any, Any]]:
  """Refuses a restart whose config changes the run, unless allow_change.

  Returns the differences (empty when none). Raises ConfigMismatchError listing them as
  `field: old -> new` and the two ways on.
  """
  diff = config_diff(saved, new)
  if diff and not allow_change:
    lines = "\n".join(f"  {k}: {a!r} -> {b!r}" for k, a, b in diff)
    raise ConfigMismatchError(
        f"{workdir} was made by another config; these fields change the run:\n{lines}\n"
        f"Use a new --workdir, or pass --allow_config_change to continue this run with the "
        f"new values (its checkpoints were made with the old ones).")
  return diff
