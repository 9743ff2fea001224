"""From a run's config to what it trains: its data, the model, its quantization, its loss
and its optimiser, and the sizes of what it exports.

The one place where an ml_collections run config (`run_config.defaults`) is turned into
library objects; `experiment.py` (the run), `official.py`, `workdir.py` and
`experiments/bench.py` call it. Each function takes the run's parsed method
(`method.parse_method`, parsed once by the run); left out, it is parsed from
`config.method`.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Optional, Tuple

import jax
import numpy as np
import optax

from qgnn_jax import data as data_lib
from qgnn_jax import export, qat, run_config
from qgnn_jax import method as method_lib
from qgnn_jax import train as train_lib
from qgnn_jax.models import FEATURE_TAPS, LAYER_GROUPS, create_model


# The method's grammar lives in qgnn_jax.method (parsed once per run); here for old callers.
Method, parse_method = method_lib.Method, method_lib.parse_method


# The ops of each LAYER_GROUPS group whose input comes straight out of a GELU (bounded
# below at about -0.17): Grapher and FFN fc2, the stem's convs after the first, the
# classifier. Every other quantized op of the ViGs (fc1, the graph conv, the pyramid's
# Downsample, the head's fc) reads the residual stream or a BN output: any sign. None
# is non-negative by construction. (Belongs beside LAYER_GROUPS in qgnn_jax.models.)
GELU_INPUTS: Dict[str, str] = {
    "body": r"(grapher|ffn)\d+/fc2",
    "stem_rest": LAYER_GROUPS["stem_rest"],
    "head": r"head/classifier",
}


def _method(config, method: Optional[Method]) -> Method:
  return parse_method(config.method) if method is None else method


def quant_rules(config, method: Optional[Method] = None
                ) -> Tuple[qat.QuantRule, ...]:
  """The model's quantization rules for a run config (none for 'fp').

  Where quantization goes (docs/METHOD.md, "Quantized layers"): the body (every Dense /
  1x1 conv of Grapher, graph conv and FFN, the pyramid's Downsample convs) is quantized;
  the stem's convs after the first follow
  `quantize_stem`, the head's hidden layer and classifier `quantize_head`; the first
  stem conv always stays full precision (no rule matches it). Ops whose input is a GELU
  output (`GELU_INPUTS`) get `a_grid=config.lsq_gelu_grid` (LSQ's activation grid there),
  every other op the signed grid; range quantizers ignore the grid.
  """
  m = _method(config, method)
  if not m.quantized:
    return ()
  settings = dict(
      w_quantizer=m.quantizer, a_quantizer=m.quantizer, w_bits=int(config.w_bits),
      a_bits=int(config.a_bits), lam=float(config.lam), ema_momentum=float(config.ema_momentum),
      w_symmetric=bool(config.w_symmetric), a_symmetric=bool(config.a_symmetric),
      w_granularity=str(config.w_granularity), a_granularity=str(config.a_granularity),
      range_grad=bool(config.range_grad))
  groups = ["body"] + ["stem_rest"] * bool(config.quantize_stem) + \
      ["head"] * bool(config.quantize_head)
  rules = []
  for g in groups:
    rules.append(qat.QuantRule(module_path=GELU_INPUTS[g], a_grid=str(config.lsq_gelu_grid),
                               **settings))
    rules.append(qat.QuantRule(module_path=LAYER_GROUPS[g], a_grid="signed", **settings))
  return tuple(rules)


def loss_config(config, method: Optional[Method] = None) -> train_lib.LossConfig:
  """The training objective of a run config: CE, plus the terms its method names."""
  m = _method(config, method)
  return train_lib.LossConfig(
      student_mode=m.mode,
      alpha=float(config.aqd_alpha) if m.aqd else 0.0, tau=float(config.aqd_tau),
      beta=float(config.sqd_beta) if m.sqd else 0.0, bypass_prob=float(config.sqd_p),
      temperature=float(config.sqd_temperature), label_smoothing=float(config.label_smoothing),
      feature_taps=FEATURE_TAPS, aqd_form=str(config.aqd_form), sqd_form=str(config.sqd_form),
      sqd_act_bits=run_config.parse_sqd_bits(config.sqd_bits, int(config.a_bits)),
      kd_weight=float(config.kd_weight) if m.kd else 0.0)


def build_model(config, num_classes: int, axis_name: Optional[str] = None,
                method: Optional[Method] = None) -> qat.QuantizedModel:
  """The config's model with its quantization rules. axis_name: BatchNorm's pmap axis (the
  run gives `train.AXIS`: the same model then also initialises and calibrates outside the
  pmap, where BatchNorm reads no axis)."""
  model = create_model(config.model, num_classes, axis_name=axis_name,
                       dtype=run_config.compute_dtype(config.dtype),
                       graph_impl=config.graph_impl, drop_path_rate=float(config.drop_path),
                       dropout=float(config.dropout))
  return qat.quantize_model(model, quant_rules(config, method))


def optimizer(config, total_steps: int, warmup_steps: int) -> optax.GradientTransformation:
  """The config's optimiser and schedule (`train.make_optimizer`) over total_steps."""
  return train_lib.make_optimizer(
      config.optimizer, config.lr, total_steps, warmup_steps, config.weight_decay,
      quant_lr=(config.quant_lr if config.quant_lr > 0 else None),
      grad_clip=(config.grad_clip or None))


# ----------------------------------------------------------------------------- data


def input_pipeline(config, num_devices: int) -> Dict[str, Any]:
  """Train / eval batch iterators for the config's dataset.

  Returns {"train": start_step -> iterator, "eval": () -> one-pass iterator,
  "info", "steps_per_epoch", "eval_split", "source" (what the images are read from)}.
  Small datasets are held in memory; `DatasetInfo.streamed` ones (imagenette,
  imagenet2012) stream from tfds. `config.batch_size` is the global batch: each of the P
  processes reads its B/P examples of every batch (`data_lib.shard_bounds`), split over its
  `num_devices` devices, and gets them on its devices (prefetched).
  """
  info = data_lib.get_info(config.dataset)
  shard, shards = data_lib.process_shard()
  data_lib.check_batching(1, config.batch_size, num_devices, shards)
  data_lib.check_batching(1, config.eval_batch_size, num_devices, shards)
  data_dir = config.data_dir or None
  if config.eval_on not in run_config.EVAL_ON:
    raise ValueError(f"eval_on={config.eval_on!r}; valid: "
                     f"{', '.join(repr(e) for e in run_config.EVAL_ON)}")
  if info.streamed:
    if config.val_holdout:
      raise ValueError(f"val_holdout is not supported for streamed dataset {config.dataset!r}")
    n = data_lib.num_examples(config.dataset, "train", data_dir)
    return {
        "train": lambda start: data_lib.prefetch(data_lib.stream_train_batches(
            config.dataset, config.batch_size, config.seed, start, num_devices, data_dir,
            shard_index=shard, shard_count=shards)),
        "eval": lambda: data_lib.prefetch(data_lib.stream_eval_batches(
            config.dataset, config.eval_batch_size, num_devices, data_dir,
            shard_index=shard, shard_count=shards)),
        "info": info, "steps_per_epoch": n // config.batch_size, "eval_split": info.eval_split,
        "source": f"tfds in {data_lib.tfds_data_dir(data_dir)}"}
  splits = data_lib.load_splits(config.dataset, data_dir, val_holdout=int(config.val_holdout))
  (x_train, y_train), (x_eval, y_eval), info = splits["train"], splits["eval"], splits["info"]
  eval_split = splits["eval_split"]
  if config.eval_on == "test" and eval_split != "test":
    # Train without the held-out images (as the validation runs do), report test.
    test = data_lib.load_splits(config.dataset, data_dir, val_holdout=0)
    (x_eval, y_eval), eval_split = test["eval"], test["eval_split"]
  elif config.eval_on == "validation" and eval_split != "validation":
    raise ValueError("eval_on='validation' needs val_holdout > 0")
  if len(x_train) < config.batch_size:
    raise ValueError(f"batch_size={config.batch_size} exceeds the {len(x_train)} training images")
  return {
      "train": lambda start: data_lib.train_batches(
          x_train, y_train, info, config.batch_size, config.seed, start_step=start,
          augment=bool(config.augment), num_devices=num_devices, shard_index=shard,
          shard_count=shards, device_put=True),
      "eval": lambda: data_lib.eval_batches(x_eval, y_eval, info, config.eval_batch_size,
                                            num_devices, shard_index=shard, shard_count=shards,
                                            device_put=True),
      "info": info, "steps_per_epoch": len(x_train) // config.batch_size,
      "eval_split": eval_split, "source": data_lib.data_source(config.dataset, data_dir)}


# ----------------------------------------------------------------------------- model size


def model_kwargs(config) -> Dict[str, Any]:
  """The `create_model` keywords of a run config that an inference model needs (an
  export's meta records them by name)."""
  return {"graph_impl": str(config.graph_impl), "dtype": str(config.dtype)}


def export_source(workdir: str, step: int, config) -> Dict[str, Any]:
  """The provenance an export of a run's checkpoint records (its meta "source")."""
  return {"workdir": os.path.abspath(workdir), "step": int(step),
          "config_sha256": run_config.config_sha256(config), "method": str(config.method),
          "dataset": str(config.dataset)}


def model_size_bytes(config, num_classes: int, variables: Any,
                     source: Optional[Dict[str, Any]] = None,
                     method: Optional[Method] = None) -> Dict[str, int]:
  """Parameter count and the real sizes of the run's export (`qgnn_jax.export`).

  model_bytes_quantized: the bytes of the file `experiments.export` writes for these
  variables (packed codes, scales and zero points, activation quantizer parameters, FP
  parameters, BN statistics, model and rules; `source` is its provenance record);
  model_bytes_fp32: the same format with every kernel float32 and no quantizer sites (for
  a full-precision run the two are the same file). params: the scalars of `params`.
  """
  rules = quant_rules(config, method)
  kw = dict(model_kwargs=model_kwargs(config), source=source)
  quantized = export.nbytes(export.build(config.model, num_classes, rules, variables, **kw))
  fp32 = quantized if not rules else export.nbytes(
      export.build(config.model, num_classes, rules, variables, fp32=True, **kw))
  n = sum(int(np.prod(np.shape(x))) for x in jax.tree_util.tree_leaves(variables["params"]))
  return {"params": n, "model_bytes_fp32": fp32, "model_bytes_quantized": quantized}
