"""Quantization rules: which ops of a model are quantized, and how.

A rule pairs a module-path regex with the settings today's methods need (weight and
activation quantizer by registry name, bits, granularity, symmetry, PQ's lambda, the
EMA momentum of activation ranges). The first rule whose regex fully matches the path
of the module that runs an op ("grapher0/fc1") wins; ops no rule matches, and ops of
a rule with no quantizer, stay full precision.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Optional, Sequence, Tuple

from qgnn_jax import quant
from qgnn_jax.quant.registry import (DEFAULT_LAM, GRANULARITIES, GRIDS, OperandSpec, Quantizer,
                                     QuantizerLike)

OPS = ("dot_general", "conv_general_dilated", "einsum")


@dataclasses.dataclass(frozen=True)
class QuantRule:
  """One rule (hashable, static).

  Attributes:
    module_path: regex, matched with `re.fullmatch` against the '/'-joined path of the
      module that calls the op ("" is the top module).
    w_quantizer / a_quantizer: registry name (`qgnn_jax.quant.QUANTIZERS`), a
      `Quantizer` instance, or None (that operand stays full precision).
    w_bits / a_bits: int in the quantizer's range (`quant.check_bits`: [2, 16], N2UQ
      [2, 8]; [2, 16] for an operand left in full precision).
    w_granularity / a_granularity: "channel" (weights: one range per output channel;
      activations: one per input channel of the op) or "tensor".
    w_symmetric / a_symmetric: grid [-a, a] or [lo, hi] (range quantizers; LSQ's grid
      follows a_grid, its weights' is signed).
    a_grid: what the activation input looks like, for LSQ's grid (range quantizers
      take theirs from the data): "signed" (any sign: [-Q_N, Q_P]), "unsigned"
      (non-negative by construction, e.g. after ReLU: [0, 2^b - 1], as the LSQ paper),
      "offset" (GELU/Swish-like: LSQ+'s learnable offset on the unsigned grid).
    range_grad: range quantizers (PQ, min-max) pass the clipped region's gradient to
      the range and through PQ's mu, sigma to the operand (False, the default:
      stop-gradient, the range is a constant; docs/METHOD.md, "Choices").
    lam: PQ's lambda (clip at mu +- lam sigma); default `quant.DEFAULT_LAM` (2.5, the
      W2A2 validation winner; docs/METHOD.md, "One lambda default").
    ema_momentum: of the activation-range EMA used at evaluation, in [0, 1).
    op_names: restrict the rule to these ops (subset of OPS); empty = all.
  """
  module_path: str = ".*"
  w_quantizer: QuantizerLike = None
  a_quantizer: QuantizerLike = None
  w_bits: int = 4
  a_bits: int = 4
  w_granularity: str = "channel"
  a_granularity: str = "tensor"
  w_symmetric: bool = True
  a_symmetric: bool = False
  a_grid: str = "signed"
  range_grad: bool = False
  lam: float = DEFAULT_LAM
  ema_momentum: float = 0.9
  op_names: Tuple[str, ...] = ()

  def __post_init__(self):
    try:
      re.compile(self.module_path)
    except re.error as e:
      raise ValueError(f"module_path={self.module_path!r} is not a regex: {e}") from None
    for name in ("w_quantizer", "a_quantizer"):
      quant.QUANTIZERS.resolve(getattr(self, name))  # raises on an unknown name
    for name in ("w_granularity", "a_granularity"):
      if getattr(self, name) not in GRANULARITIES:
        raise ValueError(f"{name}={getattr(self, name)!r}; valid: {GRANULARITIES}")
    if not 0.0 <= self.ema_momentum < 1.0:
      raise ValueError(f"ema_momentum={self.ema_momentum!r}; valid: [0, 1)")
    bad = set(self.op_names) - set(OPS)
    if bad:
      raise ValueError(f"op_names={self.op_names!r}; valid: a subset of {OPS}")
    object.__setattr__(self, "op_names", tuple(self.op_names))
    for op in ("w", "a"):
      quant.check_bits(getattr(self, f"{op}_quantizer"), getattr(self, f"{op}_bits"),
                       field=f"{op}_bits")
    if self.a_grid not in GRIDS:
      raise ValueError(f"a_grid={self.a_grid!r}; valid: {GRIDS}")
    for name in ("w_symmetric", "a_symmetric", "range_grad"):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f"{name}={getattr(self, name)!r}; valid: True or False")
    if not (isinstance(self.lam, (int, float)) and self.lam > 0):
      raise ValueError(f"lam={self.lam!r}; valid: lam > 0")

  @property
  def enabled(self) -> bool:
    return self.w_quantizer is not None or self.a_quantizer is not None

  @property
  def weight_entry(self) -> Optional[Quantizer]:
    return quant.QUANTIZERS.resolve(self.w_quantizer)

  @property
  def act_entry(self) -> Optional[Quantizer]:
    return quant.QUANTIZERS.resolve(self.a_quantizer)

  @property
  def weight_spec(self) -> OperandSpec:
    return OperandSpec(self.w_bits, self.w_symmetric, self.w_granularity == "channel",
                       self.lam, "weight", "signed", self.range_grad)

  @property
  def act_spec(self) -> OperandSpec:
    return OperandSpec(self.a_bits, self.a_symmetric, self.a_granularity == "channel",
                       self.lam, "act", self.a_grid, self.range_grad)

  def matches(self, module_path: str, op_name: str) -> bool:
    return (not self.op_names or op_name in self.op_names) and \
        re.fullmatch(self.module_path, module_path) is not None


def full_precision(module_path: str) -> QuantRule:
  """A rule that keeps the matching modules' ops in full precision."""
  return QuantRule(module_path=module_path)


def match(rules: Sequence[QuantRule], module_path: str, op_name: str) -> Optional[QuantRule]:
  """The first rule matching (module_path, op_name), or None."""
  for rule in rules:
    if rule.matches(module_path, op_name):
      return rule
  return None
