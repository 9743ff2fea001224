"""From a run's config to what it trains: the model, its quantization and its loss.

The one place where an ml_collections run config (experiments/configs) is turned into
library objects; `experiment.py` (the run) and `experiments/bench.py` call it.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np

from qgnn_jax import train as train_lib
from qgnn_jax.layers import QuantConfig
from qgnn_jax.models import create_model


# ----------------------------------------------------------------------------- config helpers


def parse_method(method: str) -> Dict[str, Any]:
  """'pq+aqd+sqd' -> {'quantizer': 'pq', 'aqd': True, 'sqd': True}. Validates the name."""
  parts = method.split("+")
  base, extras = parts[0], set(parts[1:])
  if base not in ("fp", "pq", "minmax", "lsq") or not extras <= {"aqd", "sqd"} or (
      base == "fp" and extras):
    raise ValueError(f"method={method!r}; valid: fp, minmax, lsq, pq, pq+aqd, pq+sqd, pq+aqd+sqd "
                     "(aqd/sqd may follow any quantizer)")
  return {"quantizer": base, "aqd": "aqd" in extras, "sqd": "sqd" in extras}


def quant_config(config) -> QuantConfig:
  m = parse_method(config.method)
  if m["quantizer"] == "fp":
    return QuantConfig()
  return QuantConfig.from_method(
      m["quantizer"], int(config.w_bits), int(config.a_bits), lam=float(config.lam),
      ema_momentum=float(config.ema_momentum), quantize_stem=bool(config.quantize_stem),
      quantize_head=bool(config.quantize_head),
      w_symmetric=bool(config.w_symmetric), a_symmetric=bool(config.a_symmetric),
      w_granularity=str(config.w_granularity), a_granularity=str(config.a_granularity))


def loss_config(config) -> train_lib.LossConfig:
  m = parse_method(config.method)
  return train_lib.LossConfig(
      student_mode="fp" if m["quantizer"] == "fp" else "quant",
      alpha=float(config.aqd_alpha) if m["aqd"] else 0.0, tau=float(config.aqd_tau),
      beta=float(config.sqd_beta) if m["sqd"] else 0.0, bypass_prob=float(config.sqd_p),
      temperature=float(config.sqd_temperature), label_smoothing=float(config.label_smoothing))


def build_model(config, num_classes: int, axis_name: Optional[str] = None):
  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}.get(config.dtype)
  if dtype is None:
    raise ValueError(f"dtype={config.dtype!r}; valid: 'float32', 'bfloat16'")
  return create_model(config.model, num_classes, quant_config(config), axis_name=axis_name,
                      dtype=dtype, graph_impl=config.graph_impl,
                      drop_path_rate=float(config.drop_path), dropout=float(config.dropout))


# ----------------------------------------------------------------------------- model size


def model_size_bytes(params: Any, quant_stats: Any) -> Dict[str, int]:
  """Parameter count and storage: fp32 everywhere vs. quantized kernels packed at w_bits.

  A kernel counts as quantized when its layer has a quantizer `site` marker in
  quant_stats (holding w_bits); it is stored as packed codes plus one float32
  scale per output channel. Everything else (BN, biases, stem/head kept FP,
  LSQ steps) stays float32.
  """
  flat_p = {tuple(str(getattr(k, "key", k)) for k in path): x
            for path, x in jax.tree_util.tree_flatten_with_path(params)[0]}
  sites = {}
  for path, x in jax.tree_util.tree_flatten_with_path(quant_stats or {})[0]:
    keys = tuple(str(getattr(k, "key", k)) for k in path)
    if keys[-2:] == ("quant", "site"):
      sites[keys[:-2] + ("kernel",)] = int(np.asarray(x))
  n = sum(int(np.prod(x.shape)) for x in flat_p.values())
  q_bytes = 0
  for path, x in flat_p.items():
    size = int(np.prod(x.shape))
    if path in sites:
      q_bytes += math.ceil(size * sites[path] / 8) + 4 * int(x.shape[-1])
    else:
      q_bytes += 4 * size
  return {"params": n, "model_bytes_fp32": 4 * n, "model_bytes_quantized": q_bytes}
