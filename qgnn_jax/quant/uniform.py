"""The uniform grid: ``fake_quant`` (rounding to a b-bit grid over [lo, hi] with the clipped
straight-through estimator), and `RangeQuantizer`, the registry entry shape of the methods
that take that range from the data (PQ in `pq.py`, min-max in `minmax.py`).

The grids and the conventions on dtypes and non-finite input are in `grid.py`; the
integer form of the same grid (codes, scale, zero point) in `integer.py`.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from qgnn_jax.quant import grid, integer
from qgnn_jax.quant.grid import Array, ArrayLike
from qgnn_jax.quant.registry import OperandSpec, Quantizer

__all__ = ["fake_quant", "RangeQuantizer"]


# ----------------------------------------------------------------------------
# fake_quant: uniform grid with the clipped straight-through estimator
# ----------------------------------------------------------------------------
#
# Layout of every quantizer (here and in pq.py, minmax.py, lsq.py, n2uq.py): a custom_vjp
# core on arrays in the compute dtype; a jitted entry point (one dispatch and one
# compilation per shape in eager mode, inlined when the caller is traced) that also returns
# the non-finite flags when `check` (static) is set, i.e. in eager mode; and the public
# wrapper that validates the Python-level arguments. The grid size `levels` is a traced
# scalar, so changing `bits` does not recompile.

def _fake_quant_fwd_impl(x, lo, hi, levels, symmetric, need_mask):
  """Forward on x (any float dtype) with lo/hi/levels in the compute dtype."""
  xc = x.astype(lo.dtype)
  if symmetric:
    a = jnp.maximum(jnp.abs(lo), jnp.abs(hi))
    valid = a > 0
    s = jnp.where(valid, a / levels, 1.0)
    out = jnp.where(valid, s * jnp.round(jnp.clip(xc, -a, a) / s), xc)
    lo_c, hi_c = -a, a
  else:
    valid = hi > lo
    s = jnp.where(valid, (hi - lo) / levels, 1.0)
    out = jnp.where(valid, lo + s * jnp.round((jnp.clip(xc, lo, hi) - lo) / s), xc)
    lo_c, hi_c = lo, hi
  mask = ((xc >= lo_c) & (xc <= hi_c)) | ~valid if need_mask else None
  return out.astype(x.dtype), mask


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _fake_quant(x, lo, hi, levels, symmetric, range_grad):
  return _fake_quant_fwd_impl(x, lo, hi, levels, symmetric, need_mask=False)[0]


def _fake_quant_fwd(x, lo, hi, levels, symmetric, range_grad):
  out, mask = _fake_quant_fwd_impl(x, lo, hi, levels, symmetric, need_mask=True)
  if not range_grad:
    # Residual: one bool per element plus the (small) range arrays.
    return out, (jnp.broadcast_to(mask, x.shape), lo, hi, levels)
  return out, (jnp.broadcast_to(mask, x.shape), lo, hi, levels, x)


def _range_cotangents(x, lo, hi, symmetric, g):
  """(d lo, d hi) of the clipped region: x_hat = lo below lo, hi above hi (STE inside)."""
  xc = x.astype(lo.dtype)
  gc = g.astype(lo.dtype)
  if symmetric:
    a = jnp.maximum(jnp.abs(lo), jnp.abs(hi))
    valid = a > 0
    # d x_hat / d a = +1 above a, -1 below -a; a = max(|lo|, |hi|) passes it to the larger.
    da = grid.sum_to_shape(jnp.where(valid & (xc > a), gc, 0.0)
                       - jnp.where(valid & (xc < -a), gc, 0.0),
                       jnp.broadcast_shapes(lo.shape, hi.shape))
    to_hi = jnp.abs(hi) >= jnp.abs(lo)
    dhi = jnp.where(to_hi, jnp.sign(hi) * da, 0.0)
    dlo = jnp.where(to_hi, 0.0, jnp.sign(lo) * da)
  else:
    valid = hi > lo
    shape = jnp.broadcast_shapes(lo.shape, hi.shape)
    dlo = grid.sum_to_shape(jnp.where(valid & (xc < lo), gc, 0.0), shape)
    dhi = grid.sum_to_shape(jnp.where(valid & (xc > hi), gc, 0.0), shape)
  return grid.sum_to_shape(dlo, lo.shape), grid.sum_to_shape(dhi, hi.shape)


def _fake_quant_bwd(symmetric, range_grad, res, g):
  mask, lo, hi, levels = res[:4]
  dx = jnp.where(mask, g, jnp.zeros_like(g))
  if not range_grad:
    return dx, jnp.zeros_like(lo), jnp.zeros_like(hi), jnp.zeros_like(levels)
  dlo, dhi = _range_cotangents(res[4], lo, hi, symmetric, g)
  return dx, dlo.astype(lo.dtype), dhi.astype(hi.dtype), jnp.zeros_like(levels)


_fake_quant.defvjp(_fake_quant_fwd, _fake_quant_bwd)


@functools.partial(jax.jit, static_argnums=(4, 5, 6))
def _fake_quant_entry(x, lo, hi, levels, symmetric, check, range_grad=False):
  cdt = grid.compute_dtype(x.dtype)
  out = _fake_quant(x, jnp.asarray(lo, cdt), jnp.asarray(hi, cdt), jnp.asarray(levels, cdt),
                    symmetric, range_grad)
  return out, (grid.nonfinite_flags(x, lo, hi) if check else None)


def fake_quant(x: ArrayLike, lo: ArrayLike, hi: ArrayLike, bits: int,
               symmetric: bool = False, range_grad: bool = False) -> Array:
  """Rounds ``x`` to a uniform b-bit grid over [lo, hi] ("fake" quantization).

  Args:
    x: float array, any shape/rank (bf16/f16/f32/f64).
    lo, hi: range, broadcastable to ``x.shape`` without enlarging it: 0-d for a
      per-tensor range, or keepdims-shaped (size 1 except on the channel axis)
      for per-channel ranges, e.g. the output of :func:`pauta_range`.
    bits: Python int in [2, 16].
    symmetric: False -> asymmetric grid, 2^b levels on [lo, hi],
      s = (hi - lo) / (2^b - 1), x_hat = lo + s * round((clip(x, lo, hi) - lo) / s).
      True -> symmetric grid on [-a, a] with a = max(|lo|, |hi|) (callers
      pass lo = -a, hi = a): s = a / (2^(b-1) - 1), codes in
      +-(2^(b-1) - 1), x_hat = s * round(clip(x, -a, a) / s).
    range_grad: whether lo/hi receive a gradient (see below). Off by default:
      the range is then a constant for autodiff whatever it was computed from.

  Returns:
    x_hat with ``x.shape`` and ``x.dtype``. Computed in float32 (float64 for
    f64 input) and cast back. Where the range is degenerate (hi <= lo, or
    a == 0 for the symmetric grid; e.g. a constant tensor) x is returned
    unchanged, without NaN. An empty x is returned as is. The end points are
    reproduced up to float rounding (lo + s (2^b - 1) may differ from hi by
    an ulp).

  Gradient (custom_vjp, clipped straight-through estimator):
    dx = g * 1[lo <= x <= hi] (1 everywhere a range is degenerate);
    d lo = d hi = 0 unless ``range_grad``; then the clipped region's gradient
    (x_hat = lo below lo, hi above hi; rounding inside is straight-through):
    d lo = sum g * 1[x < lo], d hi = sum g * 1[x > hi], summed to lo's / hi's
    shape; symmetric: d a = sum g * (1[x > a] - 1[x < -a]), passed to the
    larger of |lo|, |hi| (to hi on a tie, times its sign). Nothing for a
    degenerate range. Residual: a bool mask (and x when ``range_grad``).

  Raises:
    ValueError: bad ``bits``, non-float x, lo/hi shapes that do not broadcast
      to x.shape, or (eager mode only) NaN/Inf in x, lo or hi.
  """
  bits = grid.validate_bits(bits)
  x = grid.as_float(x)
  lo, hi = grid.as_param(lo, "lo"), grid.as_param(hi, "hi")
  grid.check_broadcast(x.shape, lo=np.shape(lo), hi=np.shape(hi))
  if x.size == 0:
    return jnp.asarray(x)
  check = grid.all_concrete(x, lo, hi)
  out, bad = _fake_quant_entry(x, lo, hi, grid.levels(bits, bool(symmetric)), bool(symmetric),
                               check, bool(range_grad))
  if check:
    grid.raise_nonfinite(bad, ("x", "lo", "hi"))
  return out


class RangeQuantizer(Quantizer):
  """A uniform grid over a range taken from the data (shared by PQ and min-max): the
  subclass gives `weight_range` and `batch_range`; the site keeps the batch range's EMA."""
  tracks_range = True

  def quantize(self, x, spec: OperandSpec, state):
    # The range stays float32 (fake_quant computes in float32 for bf16 x too).
    return fake_quant(x, state["lo"], state["hi"], spec.bits, symmetric=spec.symmetric,
                      range_grad=spec.range_grad)

  def integer(self, x, spec: OperandSpec, state):
    return integer.quantize_int(x, spec.bits, state["lo"], state["hi"], symmetric=spec.symmetric)
