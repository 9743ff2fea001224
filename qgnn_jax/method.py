"""A run's method, parsed once: 'fp', '<quantizer>' or '<quantizer>+aqd+sqd+kd'.

`parse_method(config.method)` is the one reading of the string (`run_config.validate`
checks a config with it; `experiment.setup` parses it once and hands the `Method` on to
`recipe`). `parse_sqd_bits` reads SQD's `sqd_bits` field; `bits_range` is the bit widths
any quantizer takes (`qgnn_jax.quant`'s MIN_BITS, MAX_BITS). No jax at import: the
quantizer registry is read when a string is parsed.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

DISTILL_TERMS = ("aqd", "sqd", "kd")  # what a method may add after its quantizer


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

  @property
  def mode(self) -> str:
    """The mode the model trains and is evaluated in: "quant" (fake quantization) for a
    quantized method, "fp" for full precision (`qat.QuantizedModel.apply`'s `mode`)."""
    return "quant" if self.quantized else "fp"

  def __str__(self) -> str:
    parts = [self.quantizer or "fp"] + ["aqd"] * self.aqd + ["sqd"] * self.sqd + \
        ["kd"] * self.kd
    return "+".join(parts)


def parse_method(method: str) -> Method:
  """'pq+aqd+sqd' -> Method('pq', aqd=True, sqd=True). Validates every part; ValueError
  naming the string and the valid ones otherwise."""
  from qgnn_jax import quant  # pylint: disable=g-import-not-at-top  (jax: not at import)
  parts = str(method).split("+")
  base, extras = parts[0], parts[1:]
  valid = ("fp",) + quant.QUANTIZERS.names()
  if base not in valid or not set(extras) <= set(DISTILL_TERMS) \
      or len(set(extras)) != len(extras) or (base == "fp" and extras):
    raise ValueError(f"method={method!r}; valid: one of {valid}, then optionally +aqd, +sqd "
                     f"and/or +kd after a quantizer (e.g. pq+aqd+sqd)")
  return Method(None if base == "fp" else base, "aqd" in extras, "sqd" in extras,
                "kd" in extras)


def bits_range() -> Tuple[int, int]:
  """[lowest, highest] bit width any quantizer takes (`qgnn_jax.quant`'s MIN_BITS, MAX_BITS)."""
  from qgnn_jax import quant  # pylint: disable=g-import-not-at-top
  return int(quant.MIN_BITS), int(quant.MAX_BITS)


def parse_sqd_bits(text: str, a_bits: int) -> Tuple[Optional[int], ...]:
  """speq's activation bit choices besides the student's a_bits (None = full precision).

  "auto" -> {a_bits + 2 (at most the highest bit width), 8, fp} without a_bits (SPEQ's
  {b, b+2, 8, fp}); "4,8,fp" -> (4, 8, None). Ints in `bits_range()` ([2, 16]).
  """
  lo, hi = bits_range()
  text = str(text).strip()
  if text == "auto":
    bits = (min(a_bits + 2, hi), 8, None)
  else:
    bits = []
    for item in filter(None, (t.strip() for t in text.split(","))):
      if item == "fp":
        bits.append(None)
      elif item.isdigit() and lo <= int(item) <= hi:
        bits.append(int(item))
      else:
        raise ValueError(f"sqd_bits={text!r}; valid: 'auto' or a comma list of bit widths in "
                         f"[{lo}, {hi}] and 'fp' (e.g. '4,8,fp')")
    if not bits:
      raise ValueError(f"sqd_bits={text!r}; valid: 'auto' or a non-empty comma list")
  return tuple(dict.fromkeys(b for b in bits if b != a_bits))
