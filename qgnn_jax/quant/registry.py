"""The quantizer registry: one protocol, one entry per quantization method.

A quantizer site (`qgnn_jax.qat`) never knows which method it runs: it asks the entry
named by its rule for

  * ``init_params(x, spec)``: the learnable parameters (float32, in Flax ``params``),
    initialised from a sample of the operand (LSQ's step; ``{}`` for range methods);
  * ``weight_range(w, spec)`` / ``batch_range(x, spec, axis_name)``: the clipping range
    of a weight tensor, or of the current batch of activations synchronised over a pmap
    axis (``tracks_range`` entries only: the site keeps an EMA of the batch range in
    ``quant_stats`` and evaluates with it);
  * ``quantize(x, spec, state)``: the fake-quant forward with its straight-through
    gradient (``state`` = learnable params, plus ``lo``/``hi`` (float32) for range
    methods, plus ``numel``: the operand's global element count, x.size times the
    devices of the pmap axis for activations, for gradient scales such as LSQ's);
  * ``integer(x, spec, state)``: the integer codes with their scale and zero point,
    ``scale * (codes - zero_point) == quantize(x, spec, state)`` in the forward pass;
  * ``learnable``: the names of its learnable parameters (the optimiser gives them
    their own learning rate and no weight decay); ``param_names(spec)`` those one
    operand uses (default: all of ``learnable``; LSQ's offset only on an LSQ+ grid).

Operands reach an entry as arrays ``(..., C)`` with their channels on the last axis
(C = a weight's output channels, an activation's input channels of the op); per channel
(``spec.per_channel``) statistics and parameters are per last-axis entry, per tensor over
every element.
Adding a quantizer is one module with a `Quantizer` subclass plus one line in
`qgnn_jax/quant/__init__.py`; `register` adds one at run time (tests, user code).
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar, Dict, Iterable, Optional, Tuple, Union

import jax

from qgnn_jax.quant.grid import MAX_BITS, MIN_BITS, validate_bits, validate_lam

Array = jax.Array
State = Dict[str, Array]
QuantizerLike = Union[str, "Quantizer", None]
# PQ's lambda, the library's default (QuantRule, OperandSpec, the run configs): the W2A2
# validation winner for QAT. The bare functions pauta_range / pauta_quantize default to the
# Pauta criterion itself (pq.PAUTA_CRITERION_LAM = 3.0); post-training quantization searches
# lambda per site (qgnn_jax.qat.ptq). docs/METHOD.md, "One lambda default".
DEFAULT_LAM = 2.5
# Weights one range (or parameter set) per output channel, activations per input channel
# of the op ("channel"), or one per tensor ("tensor").
GRANULARITIES = ("tensor", "channel")
# What an activation input looks like, for quantizers whose grid depends on it (LSQ):
# "signed" any sign; "unsigned" non-negative by construction (after ReLU); "offset"
# GELU/Swish-like (bounded below near 0), LSQ+'s learnable offset. Range quantizers
# (PQ, min-max) take their range from the data and ignore it.
GRIDS = ("signed", "unsigned", "offset")


@dataclasses.dataclass(frozen=True)
class OperandSpec:
  """How one operand (a weight or an input activation) of one op is quantized (static).

  bits: int in [MIN_BITS, MAX_BITS] = [2, 16] (the quantizer that takes the spec may allow
    fewer: its entry's min_bits / max_bits, `Registry.check_bits`).
  symmetric: grid [-a, a] (zero exact) or [lo, hi].
  per_channel: one range (or parameter set) per channel column of the (N, C) operand,
    else one per tensor. lam: PQ's lambda (clip at mu +- lam sigma); other methods
    ignore it. role: "weight" or "act" (for messages and for methods that treat them
    differently). grid: one of GRIDS (LSQ's grid; see GRIDS). range_grad: range
    quantizers pass the clipped region's gradient to lo/hi and on through the
    statistics mu, sigma of the range (False: stop-gradient, the default;
    docs/METHOD.md, "Choices").
  """
  bits: int = 4
  symmetric: bool = False
  per_channel: bool = False
  lam: float = DEFAULT_LAM
  role: str = "act"
  grid: str = "signed"
  range_grad: bool = False

  def __post_init__(self):
    validate_bits(self.bits)
    validate_lam(self.lam)
    if self.role not in ("weight", "act"):
      raise ValueError(f"role={self.role!r}; valid: 'weight', 'act'")
    if self.grid not in GRIDS:
      raise ValueError(f"grid={self.grid!r}; valid: {GRIDS}")
    if not isinstance(self.range_grad, bool):
      raise ValueError(f"range_grad={self.range_grad!r}; valid: True or False")


class Quantizer:
  """Base class of a registry entry (stateless; instances are hashable and static).

  Subclasses set `name`, `learnable` and `tracks_range` (and `min_bits` / `max_bits`
  when they take fewer bit widths than [MIN_BITS, MAX_BITS]), and implement `quantize`
  and `integer`, plus `weight_range`/`batch_range` when `tracks_range` or
  `init_params` when `learnable` is non-empty.
  """
  name: ClassVar[str] = ""
  learnable: ClassVar[Tuple[str, ...]] = ()
  tracks_range: ClassVar[bool] = False
  min_bits: ClassVar[int] = MIN_BITS
  max_bits: ClassVar[int] = MAX_BITS

  def check_bits(self, bits, field: str = "bits") -> int:
    """``bits`` as an int, or ValueError naming the value and this entry's valid range."""
    return validate_bits(bits, self.min_bits, self.max_bits, self.name, field)

  def param_names(self, spec: OperandSpec) -> Tuple[str, ...]:
    """The learnable parameters an operand with this spec uses (a subset of learnable)."""
    del spec
    return self.learnable

  def init_params(self, x: Array, spec: OperandSpec) -> State:
    """Learnable parameters (float32; at least `param_names(spec)`) from a sample x
    (..., C); no gradient."""
    del x, spec
    return {}

  def weight_range(self, w: Array, spec: OperandSpec) -> Tuple[Array, Array]:
    """(lo, hi) of a weight (..., C): broadcastable to it (e.g. (1, C) per channel, ()
    per tensor); no gradient."""
    raise NotImplementedError(f"quantizer {self.name!r} takes no range from its input")

  def batch_range(self, x: Array, spec: OperandSpec,
                  axis_name: Optional[str] = None) -> Tuple[Array, Array]:
    """(lo, hi) float32 of a batch x (..., C): (C,) per channel, () per tensor, of the
    global batch when `axis_name` names a pmap axis; no gradient."""
    raise NotImplementedError(f"quantizer {self.name!r} takes no range from its input")

  def quantize(self, x: Array, spec: OperandSpec, state: State) -> Array:
    """Fake-quantized x (any shape), same dtype; straight-through gradient (custom_vjp)."""
    raise NotImplementedError

  def integer(self, x: Array, spec: OperandSpec, state: State) -> Tuple[Array, Array, Array]:
    """(codes int32 x.shape, scale, zero_point) with scale * (codes - zp) == quantize."""
    raise NotImplementedError

  def __hash__(self):
    return hash((type(self), self.name))

  def __eq__(self, other):
    return type(self) is type(other) and self.name == other.name

  def __repr__(self):
    return f"{type(self).__name__}({self.name!r})"


class Registry:
  """Name -> Quantizer. `get` errors list the valid names."""

  def __init__(self, entries: Iterable[Quantizer] = ()):
    self._entries: Dict[str, Quantizer] = {}
    for q in entries:
      self.register(q)

  def register(self, quantizer: Quantizer) -> Quantizer:
    """Adds an entry; its name must be new. Returns it."""
    if not isinstance(quantizer, Quantizer) or not quantizer.name:
      raise TypeError(f"need a Quantizer subclass instance with a name, got {quantizer!r}")
    if not MIN_BITS <= quantizer.min_bits <= quantizer.max_bits <= MAX_BITS:
      raise ValueError(f"quantizer {quantizer.name!r}: bit range [{quantizer.min_bits}, "
                       f"{quantizer.max_bits}] is not within [{MIN_BITS}, {MAX_BITS}]")
    if quantizer.name in self._entries:
      raise ValueError(f"a quantizer named {quantizer.name!r} is already registered")
    if quantizer.name == "fp" or "+" in quantizer.name:
      raise ValueError(f"quantizer name {quantizer.name!r} is reserved ('fp', no '+')")
    self._entries[quantizer.name] = quantizer
    return quantizer

  def unregister(self, name: str) -> None:
    self.get(name)
    del self._entries[name]

  def get(self, name: str) -> Quantizer:
    if name not in self._entries:
      raise ValueError(f"unknown quantizer {name!r}; valid: {self.names()}")
    return self._entries[name]

  def names(self) -> Tuple[str, ...]:
    return tuple(self._entries)

  def __contains__(self, name: object) -> bool:
    return name in self._entries

  def resolve(self, quantizer: QuantizerLike) -> Optional[Quantizer]:
    """A name, an instance or None (full precision) -> the entry or None."""
    if quantizer is None or isinstance(quantizer, Quantizer):
      return quantizer
    return self.get(quantizer)

  def check_bits(self, quantizer: QuantizerLike, bits, field: str = "bits") -> int:
    """The one bit-width check: ``bits`` as an int if the quantizer (a registry name or an
    entry) takes it, else ValueError naming the field, the value, the quantizer and its
    valid range (e.g. "a_bits=16 is out of range for n2uq; valid range is [2, 8]").
    None (full precision) checks against the general [MIN_BITS, MAX_BITS]."""
    entry = self.resolve(quantizer)
    if entry is None:
      return validate_bits(bits, field=field)
    return entry.check_bits(bits, field)

  def bit_range(self, quantizer: QuantizerLike) -> Tuple[int, int]:
    """(min_bits, max_bits) of a quantizer; [MIN_BITS, MAX_BITS] for None."""
    entry = self.resolve(quantizer)
    return (MIN_BITS, MAX_BITS) if entry is None else (entry.min_bits, entry.max_bits)
