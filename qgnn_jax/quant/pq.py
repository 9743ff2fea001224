"""Pauta quantization (PQ): the lambda-sigma clipping range, as functions and as a registry
entry (docs/METHOD.md, "Definitions"; "One lambda default" for lambda).

Weights: the range of the weight itself (`pauta_range`), per output channel by default.
Activations: the range of the current (global) batch, mu -+ lam sigma clipped to the
batch's min/max, kept as an EMA by the site for evaluation.
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from qgnn_jax.quant import grid, sync, uniform
from qgnn_jax.quant.grid import Array, ArrayLike
from qgnn_jax.quant.registry import OperandSpec
from qgnn_jax.quant.uniform import RangeQuantizer

# The Pauta criterion itself (the 3-sigma rule): the default of the bare functions
# pauta_range / pauta_quantize that are named after it. The library's lambda (QuantRule,
# OperandSpec, the run configs) is registry.DEFAULT_LAM. docs/METHOD.md, "One lambda default".
PAUTA_CRITERION_LAM = 3.0

__all__ = ["PAUTA_CRITERION_LAM", "pauta_range", "pauta_quantize", "PQ"]


def _count(shape: Sequence[int], axis: Optional[int]) -> int:
  return int(np.prod([d for i, d in enumerate(shape) if i != axis]))


def _pauta_range_impl(x, lam, axis, symmetric, stop_grad):
  """(lo, hi, (min, max)) in the compute dtype."""
  cdt = grid.compute_dtype(x.dtype)
  xs = (jax.lax.stop_gradient(x) if stop_grad else x).astype(cdt)
  total, mn, mx = grid.sum_min_max(xs, axis, stop_grad)
  mu = total / _count(x.shape, axis)
  red, keep = grid.reduce_axes(x.ndim, axis), axis is not None
  var = jnp.mean(jnp.square(xs - mu), axis=red, keepdims=keep)  # two-pass: accurate
  pos = var > 0  # safe sqrt: finite gradient at sigma == 0 when stop_grad=False
  sigma = jnp.where(pos, jnp.sqrt(jnp.where(pos, var, 1.0)), 0.0)
  lam = jnp.asarray(lam, cdt)
  if symmetric:
    a = jnp.minimum(jnp.abs(mu) + lam * sigma, jnp.maximum(-mn, mx))
    lo, hi = -a, a
  else:
    # clip(., mn, mx) == the definition's max(mu - lam sigma, mn) / min(mu + lam sigma, mx)
    # whenever mn <= mu <= mx, and also guarantees lo <= hi under rounding (a
    # constant tensor gets lo == hi exactly).
    lo, hi = jnp.clip(mu - lam * sigma, mn, mx), jnp.clip(mu + lam * sigma, mn, mx)
  return lo, hi, (mn, mx)


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5))
def _pauta_range_entry(x, lam, axis, symmetric, stop_grad, check):
  lo, hi, extrema = _pauta_range_impl(x, lam, axis, symmetric, stop_grad)
  return lo, hi, (grid.nonfinite_from_extrema(extrema) if check else None)


def pauta_range(x: ArrayLike, lam: float = PAUTA_CRITERION_LAM, channel_axis: Optional[int] = None,
                symmetric: bool = False, stop_grad: bool = True) -> Tuple[Array, Array]:
  """Clipping range of Pauta quantization (the lambda-sigma rule; docs/METHOD.md, "Definitions").

  mu, sigma (population std) are taken over all axes (per tensor) or over all
  axes but ``channel_axis`` (per channel). Then

    asymmetric: lo = max(mu - lam sigma, min x),  hi = min(mu + lam sigma, max x)
    symmetric:  a = min(|mu| + lam sigma, max |x|),  returns (-a, a).

  (Implemented as clip(mu -+ lam sigma, min x, max x), identical for finite
  data and guaranteeing lo <= hi; a constant tensor gives lo == hi.)

  Args:
    x: float array of any rank/dtype.
    lam: lambda > 0 (float or 0-d array; may be traced under jit).
    channel_axis: None, or an int in [-x.ndim, x.ndim - 1].
    symmetric: see above.
    stop_grad: if True (default) the statistics are constants for autodiff.

  Returns:
    (lo, hi) in the compute dtype (float32 for bf16/f16/f32 input, float64
    for f64): 0-d arrays per tensor, or arrays of rank x.ndim with size 1
    everywhere except ``channel_axis`` (broadcastable to x). Statistics are
    computed in float32 even for bf16 input. Empty x -> zeros (a degenerate
    range that :func:`fake_quant` leaves untouched).

  Gradient: zero w.r.t. x when ``stop_grad`` (default); otherwise the exact
  derivative of the formula above (finite also at sigma = 0).

  Raises:
    ValueError: lam <= 0, channel_axis out of range, non-float x, (eager
      only) NaN/Inf in x.
  """
  x = grid.as_float(x)
  grid.validate_lam(lam)
  axis = grid.validate_channel_axis(channel_axis, x.ndim)
  if x.size == 0:
    return grid.empty_range(x, axis)
  check = grid.all_concrete(x)
  lo, hi, bad = _pauta_range_entry(x, lam, axis, bool(symmetric), bool(stop_grad), check)
  if check:
    grid.raise_nonfinite(bad, ("x",))
  return lo, hi


def pauta_quantize(x: ArrayLike, bits: int, lam: float = PAUTA_CRITERION_LAM,
                   channel_axis: Optional[int] = None, symmetric: bool = False) -> Array:
  """Pauta quantization in one call: ``fake_quant(x, *pauta_range(x, lam, ...), bits)``
  (the paper's quantizer applied to a tensor; the registry entry `PQ` keeps the
  activation range as an EMA instead).

  Shapes/dtypes: x_hat has x's shape and dtype. Range statistics are
  stop-gradient constants; the gradient w.r.t. x is the clipped STE
  g * 1[lo <= x <= hi] (per channel if ``channel_axis`` is given). Constant
  tensors/channels are returned unchanged; empty x is returned as is.

  Raises ValueError for bad bits/lam/channel_axis and (eager) NaN/Inf.
  """
  bits = grid.validate_bits(bits)
  lo, hi = pauta_range(x, lam, channel_axis, symmetric)
  return uniform.fake_quant(x, lo, hi, bits, symmetric)


class PQ(RangeQuantizer):
  name = "pq"

  def weight_range(self, w, spec: OperandSpec):
    w2 = w.reshape(-1, w.shape[-1])
    if spec.range_grad:
      return self._range(w2, spec, None)
    return pauta_range(w2, lam=spec.lam, channel_axis=-1 if spec.per_channel else None,
                       symmetric=spec.symmetric)

  def batch_range(self, x, spec: OperandSpec, axis_name: Optional[str] = None):
    return self._range(x, spec, axis_name)

  def _range(self, x, spec: OperandSpec, axis_name: Optional[str]):
    """mu -+ lam sigma clipped to [min, max] of the (global) x; mu, sigma carry x's
    gradient when spec.range_grad (min / max never do)."""
    flat = sync.flat_stats_input(x, spec.per_channel)
    mn, mx = sync.synced_min_max(flat, axis_name)
    moments_of = sync.flat_stats_input(x, spec.per_channel, stop_grad=False) \
        if spec.range_grad else flat
    mean, std = sync.synced_mean_std(moments_of, axis_name)
    if spec.symmetric:
      a = jnp.minimum(jnp.abs(mean) + spec.lam * std, jnp.maximum(-mn, mx))
      return -a, a
    return jnp.maximum(mean - spec.lam * std, mn), jnp.minimum(mean + spec.lam * std, mx)
