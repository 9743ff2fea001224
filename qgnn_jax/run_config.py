"""A run's config: its defaults, its method, checked before anything runs, and compared with
the one a workdir was made by.

* :func:`defaults` is every field of a run config with its default value
  (`experiments/configs/*.py` start from it and override what they need).
* the `method` field ('pq+aqd+sqd') is read by `qgnn_jax.method.parse_method` into a
  `Method`, once per run; the run passes that value on (`recipe`, `experiment`).
* :func:`validate` checks every field of a run config for type and range, and that batch
  sizes divide over the devices, before any data is read or anything compiled. A bad
  field raises :class:`ConfigError` with one line naming the field, the value and what is
  valid; `experiments.run` prints it and exits with status 2, leaving no file behind.
* :func:`config_diff` lists the fields that change the run between a workdir's saved
  `config.json` and a new config: all fields but :data:`RESTART_SAFE_FIELDS` (how the run is
  watched and checkpointed, not what it computes).
* :func:`config_sha256` identifies the run-defining fields (results.json's `config_sha256`).
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import os
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import ml_collections

from qgnn_jax.method import Method, bits_range, parse_method, parse_sqd_bits  # noqa: F401

# Fields that may differ when a workdir is restarted: they change what is printed, logged
# or checkpointed (and where training stops this time), never the numbers a run computes.
RESTART_SAFE_FIELDS = frozenset({
    "progress", "log_every", "stop_at_step", "checkpoint_every", "keep_checkpoints",
    "eval_every_epochs", "restore_step"})

DTYPES = ("float32", "bfloat16")  # compute dtypes by name (`compute_dtype`)
OPTIMIZERS = ("adamw", "sgd")
EVAL_ON = ("auto", "test", "validation")
EVAL_SPLITS = ("test", "validation")


class ConfigError(ValueError):
  """A config field has a bad type or value; the message is one line naming it."""


class ConfigMismatchError(ValueError):
  """A workdir's saved config.json differs from the new config in run-defining fields."""


# ----------------------------------------------------------------------------- defaults


def defaults() -> ml_collections.ConfigDict:
  """Every field of a run config with its default: the quick start's run (FP on
  scikit-learn's 8x8 digits). `experiments/configs/*.py` start from it; the values are
  chosen in docs/METHOD.md ("Choices")."""
  c = ml_collections.ConfigDict()
  # Data
  c.dataset = "digits"
  c.data_dir = ""            # '' -> default search path / TFDS_DATA_DIR
  c.val_holdout = 0          # >0: hold out this many train images and evaluate on them
  c.eval_on = "auto"         # auto (test, or validation when val_holdout > 0) | test | validation
  c.augment = True
  # Model and quantization
  c.model = "vig_digits"
  c.method = "fp"            # fp | minmax | lsq | pq | pq+aqd | pq+sqd | pq+aqd+sqd (parse_method)
  c.w_bits = 4
  c.a_bits = 4
  c.lam = 2.5                # PQ's lambda: both ablations' W2A2 validation winner (docs/METHOD.md)
  c.w_symmetric = True       # weights: symmetric grid, codes +-(2^(b-1) - 1)
  c.a_symmetric = False      # activations: asymmetric grid, 2^b levels over [lo, hi]
  c.w_granularity = "channel"  # channel | tensor
  c.a_granularity = "tensor"   # channel | tensor
  c.ema_momentum = 0.9       # activation-range EMA
  # LSQ's activation grid where the input is a GELU output (recipe.GELU_INPUTS): signed |
  # unsigned (LSQ's after-ReLU grid, the tail below 0 clipped) | offset (LSQ+'s learnable
  # offset); elsewhere signed. Range quantizers ignore it. CPU W2A2 validation (issue 15,
  # docs/METHOD.md): signed 88.32 / unsigned 88.52 / offset 87.88 % (within the noise).
  c.lsq_gelu_grid = "unsigned"
  # Range quantizers: gradient to lo/hi and through PQ's mu, sigma (True), or stop-gradient
  # (the paper's recipe; docs/METHOD.md, "Choices"). CPU W2A2 validation with pq (issue 15): False
  # 88.06 / True 87.62 %.
  c.range_grad = False
  c.quantize_stem = False
  c.quantize_head = False
  c.graph_impl = "dense"     # dense | segment (jraph)
  c.dtype = "float32"        # compute dtype; params stay float32
  c.drop_path = 0.0
  c.dropout = 0.0
  # Self-distillation (used only when the method names aqd / sqd), by evidence (docs/
  # METHOD.md, "Defaults by evidence"): SQD's stochastic_channels at beta 0.1 is the
  # form and weight that helped with a full-precision stem and head (R1, W2A2, 3 seeds: +0.36
  # pt over pq); AQD's channel_mse at 0.3 helped with them quantized (R3: +0.30). tau, p,
  # T: the CPU ablation's W2A2 validation winners; the paper's starting point was 1, 1, 1,
  # 0.5, 1 ("Distillation weights").
  c.aqd_alpha = 0.3
  c.aqd_tau = 2.0
  c.sqd_beta = 0.1
  c.sqd_p = 0.25
  c.sqd_temperature = 2.0
  # The forms (qgnn_jax.distill.AQD_FORMS / SQD_FORMS; docs/METHOD.md, "Distillation
  # forms"), and speq's activation bit choices: "auto" = {b+2, 8, fp} besides the
  # student's b, or a list such as "4,8,fp".
  c.aqd_form = "channel_mse"
  c.sqd_form = "stochastic_channels"
  c.sqd_bits = "auto"
  # Classic KD from the frozen FP model of init_from (method '...+kd'): its weight; the
  # temperature is sqd_temperature.
  c.kd_weight = 1.0
  c.label_smoothing = 0.0
  # Optimisation
  c.optimizer = "adamw"      # adamw | sgd
  c.lr = 1e-3
  c.quant_lr = -1.0          # LSQ step lr; <= 0 -> same as lr
  c.weight_decay = 0.05
  c.warmup_epochs = 1.0
  c.grad_clip = 0.0
  c.num_epochs = 10.0
  c.num_steps = 0            # > 0 overrides num_epochs
  c.batch_size = 128
  c.eval_batch_size = 500
  c.seed = 0
  # Bookkeeping
  c.init_from = ""           # another run's workdir / checkpoint dir (QAT from FP)
  # Where the weights a run starts from came from, when not from a run of this project:
  # experiments.convert_official writes 'official <file> sha256:<hex> ...'.
  c.source = ""
  c.log_every = 50
  c.eval_every_epochs = 1.0  # 0 -> only at the end
  c.checkpoint_every = 500
  c.keep_checkpoints = 2
  c.stop_at_step = 0         # > 0: stop (resumably) at this step, as a crash would
  c.restore_step = 0         # > 0: resume from this kept step, not the newest
  c.progress = True
  # Two-phase pipelines (quick start): FP pretraining, then QAT initialised from it
  c.pretrain_fp_epochs = 0.0
  # Post-training quantization of init_from's model (no training; qgnn_jax/ptq_run.py):
  # calibrate on ptq_batches training batches, then search each site's activation range
  # ("mse": PQ's lambda / min-max's clip minimising the quantization error; "none")
  c.ptq = False
  c.ptq_batches = 8
  c.ptq_search = "mse"
  return c


# ----------------------------------------------------------------------------- dtypes


def compute_dtype(name: str) -> Any:
  """The jax dtype of a config's `dtype` name (one of DTYPES); ValueError otherwise."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  dtypes = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
  if name not in dtypes:
    raise ValueError(f"dtype={name!r}; valid: {', '.join(repr(d) for d in DTYPES)}")
  return dtypes[name]


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


def _one_of(choices) -> Callable[[str, Any], None]:
  """choices: a tuple of valid values, or a function returning it (a registry read when
  the check runs, not when this module is imported)."""
  def check(field, v):
    valid = choices() if callable(choices) else choices
    if v not in valid:
      raise _bad(field, v, f"valid: one of {', '.join(repr(c) for c in valid)}")
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
  try:
    parse_sqd_bits(v, 2)
  except ValueError as e:
    raise ConfigError(f"config.{field}={v!r}: {str(e).split('; ', 1)[-1]}") from None


def _bits(field, v):
  _int(*bits_range())(field, v)


def _quantizer_bits(method: str, fields: Mapping[str, Any]) -> None:
  """w_bits and a_bits within the bit range of the method's quantizer (its registry entry's:
  `quant.check_bits`, e.g. N2UQ's [2, 8])."""
  m = parse_method(method)
  if not m.quantized:
    return
  from qgnn_jax import quant  # pylint: disable=g-import-not-at-top
  for field in ("w_bits", "a_bits"):
    try:
      quant.check_bits(m.quantizer, fields[field], field)
    except ValueError:
      lo, hi = quant.bit_range(m.quantizer)
      raise _bad(field, fields[field], f"valid: an int in [{lo}, {hi}] for method "
                                       f"{method!r} ({m.quantizer}'s bit range)") from None


def _granularities():
  from qgnn_jax.quant import GRANULARITIES  # pylint: disable=g-import-not-at-top
  return GRANULARITIES


def _grids():
  from qgnn_jax.quant import GRIDS  # pylint: disable=g-import-not-at-top
  return GRIDS


def _graph_impls():
  from qgnn_jax.graph import GRAPH_IMPLS  # pylint: disable=g-import-not-at-top
  return GRAPH_IMPLS


PTQ_SEARCHES = ("mse", "none")  # per-site range search after calibration, or none

# Every run config field and its check (the defaults: `defaults()`).
FIELD_CHECKS: Mapping[str, Callable[[str, Any], None]] = {
    # data
    "dataset": _dataset, "data_dir": _str, "val_holdout": _int(0), "eval_on": _one_of(EVAL_ON),
    "augment": _bool,
    # model and quantization
    "model": _model, "method": _method, "w_bits": _bits, "a_bits": _bits,
    "lam": _real(0, lo_open=True), "w_symmetric": _bool, "a_symmetric": _bool,
    "w_granularity": _one_of(_granularities), "a_granularity": _one_of(_granularities),
    "ema_momentum": _real(0, 1, hi_open=True), "lsq_gelu_grid": _one_of(_grids),
    "range_grad": _bool, "quantize_stem": _bool, "quantize_head": _bool,
    "graph_impl": _one_of(_graph_impls), "dtype": _one_of(DTYPES),
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
                      f"qgnn_jax.run_config.defaults())")
  for field, check in FIELD_CHECKS.items():
    check(field, fields[field])
  _quantizer_bits(fields["method"], fields)
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
  if parse_method(fields["method"]).kd and not fields["init_from"] \
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


CONFIG_FILE = "config.json"  # a workdir's saved config (its fields, and CHANGES_KEY)


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


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
  """A workdir's config.json as a run ConfigDict: fields it predates take the values the run
  was made with where those are known (`LEGACY_VALUES`: an old LSQ run's signed GELU grid),
  else today's defaults. Raises FileNotFoundError when there is none."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: is {workdir} a run's workdir?")
  with open(path, encoding="utf-8") as f:
    saved = json.load(f)
  config = defaults()
  config.update(ml_collections.ConfigDict(with_legacy_values(saved)))
  return config
