"""Integer form of the quantizers: codes, scale, zero point and bit packing.

``quantize_int`` returns the integer codes of exactly the grid that
:func:`qgnn_jax.quant.fake_quant` rounds to, with ``scale``/``zero_point`` such
that ``dequantize(codes, scale, zero_point) = scale * (codes - zero_point)``
reproduces ``fake_quant``'s output up to float rounding (a few ulp of
max(|lo|, |hi|)). ``pack_bits``/``unpack_bits`` store b-bit codes densely
(LSB-first bit stream, so 3-bit codes straddle byte boundaries) for export and
for reporting a model's real size.

Any uniform quantizer maps to a range: PQ -> ``pauta_range``, min-max ->
``minmax_range``, LSQ -> ``lsq_range(step, bits, signed)`` (N2UQ's codes: ``n2uq_int``).
"""

from __future__ import annotations

import functools
import math
from typing import Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from qgnn_jax.quant import grid
from qgnn_jax.quant.grid import Array, ArrayLike

__all__ = ["quantize_int", "dequantize", "pack_bits", "unpack_bits", "packed_nbytes"]


def quantize_int(x: ArrayLike, bits: int, lo: ArrayLike, hi: ArrayLike,
                 symmetric: bool = False) -> Tuple[Array, Array, Array]:
  """Integer codes of ``x`` on the same grid as ``fake_quant(x, lo, hi, bits, symmetric)``.

  Args:
    x: float array, any shape.
    bits: Python int in [2, 16].
    lo, hi: range broadcastable to x.shape (0-d per tensor, keepdims per
      channel), as for ``fake_quant``.
    symmetric: asymmetric grid on [lo, hi] or symmetric grid on [-a, a],
      a = max(|lo|, |hi|).

  Returns:
    codes: int32, x.shape. Asymmetric: in [0, 2^b - 1]; symmetric: in
      [-(2^(b-1) - 1), 2^(b-1) - 1].
    scale: compute dtype (float32 for bf16/f32 x), shape broadcast(lo, hi).
    zero_point: same dtype/shape as scale. Asymmetric: -lo / scale (a real
      number: the asymmetric grid is anchored at lo, not at 0; docs/METHOD.md,
      "Definitions"); symmetric: 0.
    A degenerate range (hi <= lo, or a == 0) gives codes 0, scale 1 and
    zero_point -lo (asymmetric), so a constant tensor with lo == hi == c
    dequantizes to exactly c.

  Not differentiable (integer output). Empty x gives empty codes.
  Raises ValueError for bad bits, mismatched shapes, (eager) NaN/Inf.
  """
  bits = grid.validate_bits(bits)
  x = grid.as_float(x)
  lo, hi = grid.as_param(lo, "lo"), grid.as_param(hi, "hi")
  grid.check_broadcast(x.shape, lo=jnp.shape(lo), hi=jnp.shape(hi))
  check = grid.all_concrete(x, lo, hi)
  codes, scale, zero_point, bad = _quantize_int_entry(
      x, lo, hi, grid.levels(bits, bool(symmetric)), bool(symmetric), check)
  if check:
    grid.raise_nonfinite(bad, ("x", "lo", "hi"))
  return codes, scale, zero_point


@functools.partial(jax.jit, static_argnums=(4, 5))
def _quantize_int_entry(x, lo, hi, levels, symmetric, check):
  cdt = grid.compute_dtype(x.dtype)
  bad = grid.nonfinite_flags(x, lo, hi) if check else None
  xc, lo, hi = x.astype(cdt), jnp.asarray(lo, cdt), jnp.asarray(hi, cdt)
  lo, hi = jnp.broadcast_arrays(lo, hi)
  if symmetric:
    qp = levels
    a = jnp.maximum(jnp.abs(lo), jnp.abs(hi))
    valid = a > 0
    scale = jnp.where(valid, a / qp, 1.0)
    codes = jnp.where(valid, jnp.round(jnp.clip(xc, -a, a) / scale), 0.0)
    zero_point = jnp.zeros_like(scale)
  else:
    n = levels
    valid = hi > lo
    scale = jnp.where(valid, (hi - lo) / n, 1.0)
    codes = jnp.where(valid, jnp.round((jnp.clip(xc, lo, hi) - lo) / scale), 0.0)
    zero_point = -lo / scale
  return codes.astype(jnp.int32), scale, zero_point, bad


def dequantize(codes: ArrayLike, scale: ArrayLike, zero_point: ArrayLike) -> Array:
  """x_hat = scale * (codes - zero_point).

  codes: integer array (any shape); scale, zero_point broadcastable to it.
  Returns an array of ``promote_types(scale.dtype, float32)``, shape of the
  broadcast. Differentiable w.r.t. scale and zero_point (plain arithmetic).
  """
  scale = jnp.asarray(scale)
  cdt = grid.compute_dtype(scale.dtype)
  return scale.astype(cdt) * (jnp.asarray(codes).astype(cdt) - jnp.asarray(zero_point, cdt))


def packed_nbytes(n: int, bits: int) -> int:
  """Bytes ``pack_bits`` uses for ``n`` codes of ``bits`` bits: ceil(n*bits/8)."""
  return math.ceil(int(n) * grid.validate_bits(bits) / 8)


def pack_bits(codes: ArrayLike, bits: int) -> Array:
  """Packs b-bit integer codes into a dense uint8 byte stream.

  Codes are flattened (row-major) and written LSB-first, bit k of code i at
  stream position i*b + k; byte j holds stream bits 8j..8j+7 (LSB first).
  So 8-bit codes are one byte each, 4-bit two per byte, 2-bit four per byte,
  and 3-bit codes cross byte boundaries. Works for any bits in [2, 16]
  (the method uses 2, 3, 4 and 8). Negative codes (symmetric grids) are stored in
  b-bit two's complement; read them back with ``unpack_bits(..., signed=True)``.

  Args:
    codes: integer array, any shape, values in [-2^(b-1), 2^b - 1].
    bits: Python int in [2, 16].

  Returns: uint8 array of shape (ceil(codes.size * b / 8),). Jit-able (bits
  static). Not differentiable.

  Raises ValueError for bad bits, non-integer codes, and (eager) codes outside
  the b-bit range.
  """
  bits = grid.validate_bits(bits)
  codes = codes if grid.is_traced(codes) else jnp.asarray(codes)
  if not jnp.issubdtype(codes.dtype, jnp.integer):
    raise ValueError(f"codes must have an integer dtype, got {codes.dtype}")
  check = not grid.is_traced(codes) and codes.size > 0
  if not grid.is_traced(codes):  # eager: numpy, no compile per shape (export of a whole model)
    flat = np.asarray(codes).reshape(-1).astype(np.int64)
    if check and (flat.min() < -(2 ** (bits - 1)) or flat.max() > 2 ** bits - 1):
      raise ValueError(f"codes in [{flat.min()}, {flat.max()}] do not fit in bits={bits}; valid "
                       f"range is [{-(2 ** (bits - 1))}, {2 ** bits - 1}]")
    stream = ((flat[:, None] >> np.arange(bits)) & 1).astype(np.uint8).reshape(-1)
    return jnp.asarray(np.packbits(stream, bitorder="little"))
  packed, span = _pack_entry(codes, bits, check)
  if check and not grid.is_traced(span):
    cmin, cmax = int(span[0]), int(span[1])
    if cmin < -(2 ** (bits - 1)) or cmax > 2 ** bits - 1:
      raise ValueError(f"codes in [{cmin}, {cmax}] do not fit in bits={bits}; valid range "
                       f"is [{-(2 ** (bits - 1))}, {2 ** bits - 1}]")
  return packed


@functools.partial(jax.jit, static_argnums=(1, 2))
def _pack_entry(codes, bits, check):
  span = (jnp.min(codes), jnp.max(codes)) if check else None
  flat = (codes.reshape(-1).astype(jnp.int32)) & (2 ** bits - 1)
  stream = ((flat[:, None] >> jnp.arange(bits, dtype=jnp.int32)) & 1).reshape(-1)
  pad = (-stream.shape[0]) % 8
  stream = jnp.pad(stream, (0, pad)).reshape(-1, 8)
  return jnp.sum(stream << jnp.arange(8, dtype=jnp.int32), axis=1).astype(jnp.uint8), span


def unpack_bits(packed: ArrayLike, bits: int, n: Union[int, Sequence[int]],
                signed: bool = False) -> Array:
  """Inverse of :func:`pack_bits`.

  Args:
    packed: uint8 array (flattened if not 1-D) of at least ceil(N*b/8) bytes.
    bits: Python int in [2, 16], as used for packing.
    n: number of codes N, or a shape tuple (N = its product; the result is
      reshaped to it). Static.
    signed: sign-extend b-bit two's complement codes (symmetric grids).

  Returns: int32 codes of shape (n,) or ``n``. Not differentiable.
  Raises ValueError for bad bits, negative n, non-uint8 or too short packed.
  """
  bits = grid.validate_bits(bits)
  shape = (int(n),) if isinstance(n, (int,)) or hasattr(n, "__index__") else tuple(
      int(d) for d in n)
  if any(d < 0 for d in shape):
    raise ValueError(f"n={n!r} must be a non-negative int or shape")
  count = math.prod(shape)
  packed = packed if grid.is_traced(packed) else jnp.asarray(packed)
  if packed.dtype != jnp.uint8:
    raise ValueError(f"packed must be uint8, got {packed.dtype}")
  need = packed_nbytes(count, bits)
  if packed.size < need:
    raise ValueError(f"packed has {packed.size} bytes but {count} codes of {bits} bits "
                     f"need {need}")
  if not grid.is_traced(packed):  # eager: numpy, no compile per shape
    stream = np.unpackbits(np.asarray(packed).reshape(-1)[:need], bitorder="little")
    codes = (stream[:count * bits].reshape(count, bits).astype(np.int64)
             << np.arange(bits)).sum(axis=1)
    if signed:
      codes = np.where(codes >= 2 ** (bits - 1), codes - 2 ** bits, codes)
    return jnp.asarray(codes.astype(np.int32).reshape(shape))
  return _unpack_impl(packed, bits, shape, bool(signed))


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _unpack_impl(packed, bits, shape, signed):
  count = math.prod(shape)
  need = -(-count * bits // 8)
  stream = ((packed.reshape(-1)[:need, None].astype(jnp.int32)
             >> jnp.arange(8, dtype=jnp.int32)) & 1).reshape(-1)[:count * bits]
  codes = jnp.sum(stream.reshape(count, bits) << jnp.arange(bits, dtype=jnp.int32), axis=1)
  if signed:
    codes = jnp.where(codes >= 2 ** (bits - 1), codes - 2 ** bits, codes)
  return codes.astype(jnp.int32).reshape(shape)
