"""From a run's config to what it trains: the model, its quantization and its loss.

The one place where an ml_collections run config (experiments/configs) is turned into
library objects; `experiment.py` (the run) and `experiments/bench.py` call it.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from qgnn_jax import qat, quant
from qgnn_jax import train as train_lib
from qgnn_jax.models import FEATURE_TAPS, LAYER_GROUPS, create_model
from qgnn_jax.qat import site as qat_site


# ----------------------------------------------------------------------------- config helpers


@dataclasses.dataclass(frozen=True)
class Method:
  """A parsed method string: 'fp', '<quantizer>' or '<quantizer>+aqd+sqd' (any order of
  the distillation terms). quantizer: a registry name (`qgnn_jax.quant.QUANTIZERS`), or
  None for full precision."""
  quantizer: Optional[str]
  aqd: bool = False
  sqd: bool = False

  @property
  def quantized(self) -> bool:
    return self.quantizer is not None

  def __str__(self) -> str:
    parts = [self.quantizer or "fp"] + ["aqd"] * self.aqd + ["sqd"] * self.sqd
    return "+".join(parts)


def parse_method(method: str) -> Method:
  """'pq+aqd+sqd' -> Method('pq', aqd=True, sqd=True). Validates every part."""
  parts = str(method).split("+")
  base, extras = parts[0], parts[1:]
  valid = ("fp",) + quant.QUANTIZERS.names()
  if base not in valid or not set(extras) <= {"aqd", "sqd"} or len(set(extras)) != len(extras) \
      or (base == "fp" and extras):
    raise ValueError(f"method={method!r}; valid: one of {valid}, then optionally +aqd and/or "
                     f"+sqd after a quantizer (e.g. pq+aqd+sqd)")
  return Method(None if base == "fp" else base, "aqd" in extras, "sqd" in extras)


def quant_rules(config) -> Tuple[qat.QuantRule, ...]:
  """The model's quantization rules for a run config (none for 'fp').

  SPEC §2: the body (every Dense / 1x1 conv of Grapher, graph conv and FFN, the pyramid's
  Downsample convs) is quantized; the stem's convs after the first follow
  `quantize_stem`, the head's hidden layer and classifier `quantize_head`; the first
  stem conv always stays full precision (no rule matches it).
  """
  m = parse_method(config.method)
  if not m.quantized:
    return ()
  settings = dict(
      w_quantizer=m.quantizer, a_quantizer=m.quantizer, w_bits=int(config.w_bits),
      a_bits=int(config.a_bits), lam=float(config.lam), ema_momentum=float(config.ema_momentum),
      w_symmetric=bool(config.w_symmetric), a_symmetric=bool(config.a_symmetric),
      w_granularity=str(config.w_granularity), a_granularity=str(config.a_granularity))
  groups = ["body"] + ["stem_rest"] * bool(config.quantize_stem) + \
      ["head"] * bool(config.quantize_head)
  return tuple(qat.QuantRule(module_path=LAYER_GROUPS[g], **settings) for g in groups)


def loss_config(config) -> train_lib.LossConfig:
  m = parse_method(config.method)
  return train_lib.LossConfig(
      student_mode="quant" if m.quantized else "fp",
      alpha=float(config.aqd_alpha) if m.aqd else 0.0, tau=float(config.aqd_tau),
      beta=float(config.sqd_beta) if m.sqd else 0.0, bypass_prob=float(config.sqd_p),
      temperature=float(config.sqd_temperature), label_smoothing=float(config.label_smoothing),
      feature_taps=FEATURE_TAPS)


def build_model(config, num_classes: int, axis_name: Optional[str] = None
                ) -> qat.QuantizedModel:
  """The config's model with its quantization rules. axis_name: BatchNorm's pmap axis."""
  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}.get(config.dtype)
  if dtype is None:
    raise ValueError(f"dtype={config.dtype!r}; valid: 'float32', 'bfloat16'")
  model = create_model(config.model, num_classes, axis_name=axis_name, dtype=dtype,
                       graph_impl=config.graph_impl, drop_path_rate=float(config.drop_path),
                       dropout=float(config.dropout))
  return qat.quantize_model(model, quant_rules(config))


# ----------------------------------------------------------------------------- model size


def model_size_bytes(params: Any, quant_stats: Any) -> Dict[str, int]:
  """Parameter count and storage: fp32 everywhere vs. quantized kernels packed at w_bits.

  A kernel counts as quantized when its layer has a quantizer site with a `site` marker
  in quant_stats (holding w_bits); it is stored as packed codes plus one float32
  scale per output channel. Everything else (BN, biases, stem/head kept FP,
  LSQ steps) stays float32.
  """
  flat_p = {tuple(str(getattr(k, "key", k)) for k in path): x
            for path, x in jax.tree_util.tree_flatten_with_path(params)[0]}
  sites = {}
  for path, x in jax.tree_util.tree_flatten_with_path(quant_stats or {})[0]:
    keys = tuple(str(getattr(k, "key", k)) for k in path)
    if len(keys) >= 2 and keys[-1] == "site" and qat_site.is_site_name(keys[-2]):
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
