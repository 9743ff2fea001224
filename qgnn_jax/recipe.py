"""From a run's config to what it trains: the model, its quantization and its loss.

The one place where an ml_collections run config (experiments/configs) is turned into
library objects; `experiment.py` (the run) and `experiments/bench.py` call it.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from qgnn_jax import qat, quant
from qgnn_jax import train as train_lib
from qgnn_jax.models import FEATURE_TAPS, LAYER_GROUPS, create_model


# ----------------------------------------------------------------------------- config helpers


@dataclasses.dataclass(frozen=True)
class Method:
  """A parsed method string: 'fp', '<quantizer>' or '<quantizer>+aqd+sqd' (any order of
  the distillation terms aqd, sqd and kd). quantizer: a registry name
  (`qgnn_jax.quant.QUANTIZERS`), or None for full precision. kd: classic knowledge
  distillation from the frozen FP model QAT starts from (config.init_from)."""
  quantizer: Optional[str]
  aqd: bool = False
  sqd: bool = False
  kd: bool = False

  @property
  def quantized(self) -> bool:
    return self.quantizer is not None

  def __str__(self) -> str:
    parts = [self.quantizer or "fp"] + ["aqd"] * self.aqd + ["sqd"] * self.sqd + \
        ["kd"] * self.kd
    return "+".join(parts)


def parse_method(method: str) -> Method:
  """'pq+aqd+sqd' -> Method('pq', aqd=True, sqd=True). Validates every part."""
  parts = str(method).split("+")
  base, extras = parts[0], parts[1:]
  valid = ("fp",) + quant.QUANTIZERS.names()
  if base not in valid or not set(extras) <= {"aqd", "sqd", "kd"} \
      or len(set(extras)) != len(extras) or (base == "fp" and extras):
    raise ValueError(f"method={method!r}; valid: one of {valid}, then optionally +aqd, +sqd "
                     f"and/or +kd after a quantizer (e.g. pq+aqd+sqd)")
  return Method(None if base == "fp" else base, "aqd" in extras, "sqd" in extras,
                "kd" in extras)


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


def quant_rules(config) -> Tuple[qat.QuantRule, ...]:
  """The model's quantization rules for a run config (none for 'fp').

  SPEC §2: the body (every Dense / 1x1 conv of Grapher, graph conv and FFN, the pyramid's
  Downsample convs) is quantized; the stem's convs after the first follow
  `quantize_stem`, the head's hidden layer and classifier `quantize_head`; the first
  stem conv always stays full precision (no rule matches it). Ops whose input is a GELU
  output (`GELU_INPUTS`) get `a_grid=config.lsq_gelu_grid` (LSQ's activation grid there),
  every other op the signed grid; range quantizers ignore the grid.
  """
  m = parse_method(config.method)
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


def parse_sqd_bits(text: str, a_bits: int) -> Tuple[Optional[int], ...]:
  """speq's activation bit choices besides the student's a_bits (None = full precision).

  "auto" -> {a_bits + 2 (at most 16), 8, fp} without a_bits (SPEQ's {b, b+2, 8, fp});
  "4,8,fp" -> (4, 8, None). Ints in [2, 16].
  """
  text = str(text).strip()
  if text == "auto":
    bits = (min(a_bits + 2, 16), 8, None)
  else:
    bits = []
    for item in filter(None, (t.strip() for t in text.split(","))):
      if item == "fp":
        bits.append(None)
      elif item.isdigit() and 2 <= int(item) <= 16:
        bits.append(int(item))
      else:
        raise ValueError(f"sqd_bits={text!r}; valid: 'auto' or a comma list of bit widths in "
                         f"[2, 16] and 'fp' (e.g. '4,8,fp')")
    if not bits:
      raise ValueError(f"sqd_bits={text!r}; valid: 'auto' or a non-empty comma list")
  return tuple(dict.fromkeys(b for b in bits if b != a_bits))


def loss_config(config) -> train_lib.LossConfig:
  m = parse_method(config.method)
  return train_lib.LossConfig(
      student_mode="quant" if m.quantized else "fp",
      alpha=float(config.aqd_alpha) if m.aqd else 0.0, tau=float(config.aqd_tau),
      beta=float(config.sqd_beta) if m.sqd else 0.0, bypass_prob=float(config.sqd_p),
      temperature=float(config.sqd_temperature), label_smoothing=float(config.label_smoothing),
      feature_taps=FEATURE_TAPS, aqd_form=str(config.aqd_form), sqd_form=str(config.sqd_form),
      sqd_act_bits=parse_sqd_bits(config.sqd_bits, int(config.a_bits)),
      kd_weight=float(config.kd_weight) if m.kd else 0.0)


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


def model_size_bytes(config, num_classes: int, variables: Any,
                     source: Optional[Dict[str, Any]] = None) -> Dict[str, int]:
  """Parameter count and the real sizes of the run's export (`qgnn_jax.export`).

  model_bytes_quantized: the bytes of the file `experiments.export` writes for these
  variables (packed codes, scales and zero points, activation quantizer parameters, FP
  parameters, BN statistics, model and rules; `source` is its provenance record);
  model_bytes_fp32: the same format with every kernel float32 and no quantizer sites (for
  a full-precision run the two are the same file). params: the scalars of `params`.
  """
  from qgnn_jax import export  # pylint: disable=g-import-not-at-top
  rules = quant_rules(config)
  kw = dict(model_kwargs=export.model_kwargs(config), source=source)
  quantized = export.nbytes(export.build(config.model, num_classes, rules, variables, **kw))
  fp32 = quantized if not rules else export.nbytes(
      export.build(config.model, num_classes, rules, variables, fp32=True, **kw))
  n = sum(int(np.prod(np.shape(x))) for x in jax.tree_util.tree_leaves(variables["params"]))
  return {"params": n, "model_bytes_fp32": fp32, "model_bytes_quantized": quantized}
