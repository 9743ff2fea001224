"""Min-max quantization, as functions and as a registry entry: the range is the data's
[min, max] (the baseline "that overlooks outliers"; docs/METHOD.md, "Definitions")."""
from __future__ import annotations

import functools
from typing import Optional, Tuple

import jax
import jax.numpy as jnp

from qgnn_jax.quant import grid, sync, uniform
from qgnn_jax.quant.grid import Array, ArrayLike
from qgnn_jax.quant.registry import OperandSpec
from qgnn_jax.quant.uniform import RangeQuantizer

__all__ = ["minmax_range", "minmax_quantize", "MinMax"]


def _minmax_range_impl(x, axis, symmetric, stop_grad):
  cdt = grid.compute_dtype(x.dtype)
  xs = (jax.lax.stop_gradient(x) if stop_grad else x).astype(cdt)
  total, mn, mx = grid.sum_min_max(xs, axis, stop_grad)
  if symmetric:
    a = jnp.maximum(-mn, mx)
    return -a, a, (mn, mx)
  return mn, mx, (mn, mx)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _minmax_range_entry(x, axis, symmetric, stop_grad, check):
  lo, hi, extrema = _minmax_range_impl(x, axis, symmetric, stop_grad)
  return lo, hi, (grid.nonfinite_from_extrema(extrema) if check else None)


def minmax_range(x: ArrayLike, channel_axis: Optional[int] = None,
                 symmetric: bool = False, stop_grad: bool = True) -> Tuple[Array, Array]:
  """Min-max range: (min x, max x), or (-max|x|, max|x|) when symmetric.

  Same shapes, dtypes (compute dtype: float32 for bf16 input), gradient
  convention (stop-gradient by default), empty-input behaviour and errors as
  `pq.pauta_range`.
  """
  x = grid.as_float(x)
  axis = grid.validate_channel_axis(channel_axis, x.ndim)
  if x.size == 0:
    return grid.empty_range(x, axis)
  check = grid.all_concrete(x)
  lo, hi, bad = _minmax_range_entry(x, axis, bool(symmetric), bool(stop_grad), check)
  if check:
    grid.raise_nonfinite(bad, ("x",))
  return lo, hi


def minmax_quantize(x: ArrayLike, bits: int, channel_axis: Optional[int] = None,
                    symmetric: bool = False) -> Array:
  """Min-max quantization: ``fake_quant(x, *minmax_range(x, ...), bits)``.

  x_hat has x's shape and dtype; gradient w.r.t. x is the clipped STE (which
  is 1 everywhere since nothing is clipped); range gets no gradient.
  Raises ValueError for bad bits/channel_axis and (eager) NaN/Inf.
  """
  bits = grid.validate_bits(bits)
  lo, hi = minmax_range(x, channel_axis, symmetric)
  return uniform.fake_quant(x, lo, hi, bits, symmetric)


class MinMax(RangeQuantizer):
  name = "minmax"

  def weight_range(self, w, spec: OperandSpec):
    return minmax_range(w.reshape(-1, w.shape[-1]), channel_axis=-1 if spec.per_channel else None,
                        symmetric=spec.symmetric)

  def batch_range(self, x, spec: OperandSpec, axis_name: Optional[str] = None):
    mn, mx = sync.synced_min_max(sync.flat_stats_input(x, spec.per_channel), axis_name)
    if spec.symmetric:
      a = jnp.maximum(-mn, mx)
      return -a, a
    return mn, mx
