"""Fake quantizers: uniform grids, Pauta quantization (PQ), min-max and LSQ.

All functions are pure JAX (no Flax, no global state) and work under ``jit``,
``grad``, ``vmap`` and ``pmap``/``shard_map``, for float16/bfloat16/float32
(and float64 with x64) inputs of any rank. Straight-through estimators are
explicit ``jax.custom_vjp`` rules.

Grids (SPEC §1). ``bits`` b is a Python int in [2, 16].

* Asymmetric grid over [lo, hi]: 2^b levels, step s = (hi - lo) / (2^b - 1),
  codes q in {0 .. 2^b - 1}, x_hat = lo + s * q.
* Symmetric grid over [-a, a]: codes q in {-(2^(b-1) - 1) .. 2^(b-1) - 1},
  s = a / (2^(b-1) - 1), x_hat = s * q (zero is exact).

Arithmetic precision. The quantizers compute in ``promote_types(x.dtype,
float32)`` (float32 for bf16/f16/f32 input) and cast the result back to
``x.dtype``; range statistics are likewise computed and returned in that
"compute dtype" (float32 for bf16 input).

Non-finite inputs. In eager mode (concrete arrays) every public function
raises ``ValueError`` when its floating inputs contain NaN or Inf. Under a
transformation (``jit``, ``vmap``, ``pmap``, ``grad`` tracing) the values are
not known, so nothing is checked and nothing is sanitised: NaN propagates to
the output (and to PQ/min-max ranges), +-Inf is clipped to the range by
``fake_quant``/``lsq_quantize`` but makes PQ ranges NaN and min-max ranges
infinite (hence NaN outputs). To check under jit, call :func:`check_finite`
inside the function and wrap it with ``jax.experimental.checkify.checkify``
(it emits a ``checkify.check``). The eager check is computed inside the same
compiled call as the quantizer (for PQ/min-max from the min/max it already
computes) and costs one host sync of a flag; traced calls emit no check code.
"""

from __future__ import annotations

import functools
from typing import Any, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

Array = jax.Array
ArrayLike = Union[jax.Array, np.ndarray, float, int]

MIN_BITS = 2
MAX_BITS = 16
# Smallest step lsq_init_step returns (for an all-zero tensor).
LSQ_MIN_STEP = 1e-8
# PQ's lambda. DEFAULT_LAM is the library's (QuantRule, OperandSpec, the run configs): the
# W2A2 validation winner for QAT. PAUTA_CRITERION_LAM is the Pauta criterion itself (the
# 3-sigma rule), the default of the bare functions pauta_range / pauta_quantize that are
# named after it. Post-training quantization searches lambda per site instead
# (qgnn_jax.qat.ptq). docs/METHOD.md, "One lambda default".
DEFAULT_LAM = 2.5
PAUTA_CRITERION_LAM = 3.0

__all__ = [
    "MIN_BITS", "MAX_BITS", "DEFAULT_LAM", "PAUTA_CRITERION_LAM", "validate_bits", "validate_lam", "validate_channel_axis",
    "check_finite", "fake_quant", "pauta_range", "pauta_quantize", "minmax_range",
    "minmax_quantize", "lsq_bounds", "lsq_range", "lsq_quantize", "lsq_init_step",
    "lsq_plus_init", "stochastic_round",
]


# ----------------------------------------------------------------------------
# Validation helpers
# ----------------------------------------------------------------------------

def _is_traced(x: Any) -> bool:
  return isinstance(x, jax.core.Tracer)


def validate_bits(bits: Any) -> int:
  """Returns ``bits`` as an int, or raises ValueError.

  Valid: a Python int (or NumPy integer; not bool, float or array) in
  [MIN_BITS, MAX_BITS] = [2, 16].
  """
  if isinstance(bits, (bool, np.bool_)) or not isinstance(bits, (int, np.integer)):
    raise ValueError(f"bits={bits!r} (type {type(bits).__name__}) must be a Python int "
                     f"in [{MIN_BITS}, {MAX_BITS}]")
  if not MIN_BITS <= int(bits) <= MAX_BITS:
    raise ValueError(f"bits={bits} is out of range; valid range is [{MIN_BITS}, {MAX_BITS}]")
  return int(bits)


def validate_lam(lam: Any) -> None:
  """Raises ValueError unless ``lam`` (the Pauta lambda) is finite and > 0.

  A traced ``lam`` (under jit) cannot be checked and is accepted.
  """
  if _is_traced(lam):
    return
  try:
    arr = np.asarray(lam, dtype=np.float64)
  except (TypeError, ValueError):
    raise ValueError(f"lam={lam!r} must be a positive number; valid range (0, inf)") from None
  if arr.size == 0 or not np.all(np.isfinite(arr)) or np.any(arr <= 0):
    raise ValueError(f"lam={lam!r} must be > 0 and finite; valid range (0, inf)")


def validate_channel_axis(channel_axis: Any, ndim: int) -> Optional[int]:
  """Normalises ``channel_axis`` to [0, ndim) or None; raises ValueError.

  Valid: None (per tensor) or an int in [-ndim, ndim - 1].
  """
  if channel_axis is None:
    return None
  if isinstance(channel_axis, (bool, np.bool_)) or not isinstance(channel_axis,
                                                                  (int, np.integer)):
    raise ValueError(f"channel_axis={channel_axis!r} must be None or an int in "
                     f"[{-ndim}, {ndim - 1}]")
  if not -ndim <= channel_axis < ndim:
    raise ValueError(f"channel_axis={channel_axis} is out of range for an input with "
                     f"ndim={ndim}; valid range is [{-ndim}, {ndim - 1}]"
                     + (" (a 0-d input has no channel axis)" if ndim == 0 else ""))
  return int(channel_axis) % ndim


def check_finite(x: ArrayLike, name: str = "x") -> None:
  """Checks that ``x`` has no NaN/Inf; usable eagerly and under checkify.

  * Concrete array (eager): raises ``ValueError`` naming ``name`` and the
    number of non-finite entries.
  * Traced array (inside jit/vmap/pmap): emits ``checkify.check``; the caller
    must wrap the traced function with ``checkify.checkify`` (e.g.
    ``err, out = checkify.checkify(jax.jit(f))(x); err.throw()``), otherwise
    JAX refuses to stage it.

  Integer and empty arrays always pass. Returns None; no gradient effect.
  """
  if _is_traced(x):
    if x.size and jnp.issubdtype(x.dtype, jnp.inexact):
      checkify.check(jnp.all(jnp.isfinite(x)), f"{name} contains NaN or Inf")
    return
  # Counted on the host (one copy, none for numpy input): a jitted count of a concrete x
  # would still be traced when an outer jit closes over x.
  x = np.asarray(x)
  if x.size == 0 or not jnp.issubdtype(x.dtype, jnp.inexact):
    return
  bad = int(np.count_nonzero(~np.isfinite(x)))
  if bad:
    raise ValueError(f"{name} contains {bad} non-finite value(s) (NaN or Inf) out of "
                     f"{x.size}; quantizers need finite inputs")


def _as_float(x: ArrayLike, name: str = "x") -> Any:
  """x unchanged if it is an array (jax, numpy or tracer), else jnp.asarray(x)."""
  if not (hasattr(x, "dtype") and hasattr(x, "shape")):
    x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"{name} must have a floating dtype (float16/bfloat16/float32/"
                     f"float64), got {x.dtype}")
  return x


def _compute_dtype(dtype: Any) -> Any:
  return jnp.promote_types(dtype, jnp.float32)


def _check_broadcast(x_shape: Sequence[int], **params: Sequence[int]) -> None:
  """Raises ValueError unless every param shape broadcasts to exactly x_shape."""
  desc = ", ".join(f"{k} shape {tuple(v)}" for k, v in params.items())
  try:
    out = jnp.broadcast_shapes(tuple(x_shape), *[tuple(v) for v in params.values()])
  except ValueError:
    out = None
  if out != tuple(x_shape):
    raise ValueError(f"{desc} are not broadcast-compatible with each other and with x "
                     f"shape {tuple(x_shape)}; valid: shapes that broadcast to "
                     f"{tuple(x_shape)} (() per tensor, or size 1 on every axis but the "
                     f"channel axis)")


def _param(v: ArrayLike, name: str) -> Any:
  """A range/step argument: Python scalars stay scalars (weakly typed in jit)."""
  if isinstance(v, (bool, np.bool_)):
    raise ValueError(f"{name}={v!r} must be a number or a float array, not bool")
  if isinstance(v, (int, float, np.integer, np.floating)):
    return v
  if not (hasattr(v, "dtype") and hasattr(v, "shape")):
    v = jnp.asarray(v)
  if not (jnp.issubdtype(v.dtype, jnp.inexact) or jnp.issubdtype(v.dtype, jnp.integer)):
    raise ValueError(f"{name} must be numeric, got dtype {v.dtype}")
  return v


def _concrete(*vs: Any) -> bool:
  """True when no argument is traced: eager mode, where values can be checked."""
  return not any(_is_traced(v) for v in vs)


def _nonfinite_counts(*vs: Any) -> Tuple[Array, ...]:
  """Per input: True where it holds NaN/Inf (one cheap reduction each)."""
  return tuple(~jnp.all(jnp.isfinite(jnp.asarray(v))) for v in vs)


def _raise_nonfinite(flags: Sequence[Any], names: Sequence[str]) -> None:
  for flag, name in zip(flags, names):
    # Concrete inputs can still give traced flags, e.g. when flax checks a param
    # initialiser's shape with jax.eval_shape: then there is nothing to check.
    if _is_traced(flag):
      continue
    if bool(flag):
      raise ValueError(f"{name} contains non-finite values (NaN or Inf); quantizers need "
                       f"finite inputs (eager-mode check; under jit use check_finite with "
                       f"checkify)")


def _levels(bits: int, symmetric: bool) -> float:
  """Largest code: 2^b - 1 (asymmetric) or 2^(b-1) - 1 (symmetric)."""
  return float(2 ** (bits - 1) - 1) if symmetric else float(2 ** bits - 1)


# ----------------------------------------------------------------------------
# fake_quant: uniform grid with the clipped straight-through estimator
# ----------------------------------------------------------------------------
#
# Layout of every quantizer below: a custom_vjp core on arrays in the compute
# dtype; a jitted entry point (one dispatch and one compilation per shape in
# eager mode, inlined when the caller is traced) that also returns the
# non-finite counts when `check` (static) is set, i.e. in eager mode; and the
# public wrapper that validates the Python-level arguments. The grid size
# `levels` is a traced scalar, so changing `bits` does not recompile.

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
    da = _sum_to_shape(jnp.where(valid & (xc > a), gc, 0.0)
                       - jnp.where(valid & (xc < -a), gc, 0.0),
                       jnp.broadcast_shapes(lo.shape, hi.shape))
    to_hi = jnp.abs(hi) >= jnp.abs(lo)
    dhi = jnp.where(to_hi, jnp.sign(hi) * da, 0.0)
    dlo = jnp.where(to_hi, 0.0, jnp.sign(lo) * da)
  else:
    valid = hi > lo
    shape = jnp.broadcast_shapes(lo.shape, hi.shape)
    dlo = _sum_to_shape(jnp.where(valid & (xc < lo), gc, 0.0), shape)
    dhi = _sum_to_shape(jnp.where(valid & (xc > hi), gc, 0.0), shape)
  return _sum_to_shape(dlo, lo.shape), _sum_to_shape(dhi, hi.shape)


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
  cdt = _compute_dtype(x.dtype)
  out = _fake_quant(x, jnp.asarray(lo, cdt), jnp.asarray(hi, cdt), jnp.asarray(levels, cdt),
                    symmetric, range_grad)
  return out, (_nonfinite_counts(x, lo, hi) if check else None)


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
  bits = validate_bits(bits)
  x = _as_float(x)
  lo, hi = _param(lo, "lo"), _param(hi, "hi")
  _check_broadcast(x.shape, lo=np.shape(lo), hi=np.shape(hi))
  if x.size == 0:
    return jnp.asarray(x)
  check = _concrete(x, lo, hi)
  out, bad = _fake_quant_entry(x, lo, hi, _levels(bits, bool(symmetric)), bool(symmetric),
                               check, bool(range_grad))
  if check:
    _raise_nonfinite(bad, ("x", "lo", "hi"))
  return out


# ----------------------------------------------------------------------------
# Pauta (3-sigma) and min-max ranges
# ----------------------------------------------------------------------------

def _reduce_axes(ndim: int, axis: Optional[int]) -> Optional[Tuple[int, ...]]:
  return None if axis is None else tuple(i for i in range(ndim) if i != axis)


def _stats_shape(shape: Sequence[int], axis: Optional[int]) -> Tuple[int, ...]:
  if axis is None:
    return ()
  return tuple(d if i == axis else 1 for i, d in enumerate(shape))


def _sum_min_max(xs, axis, stop_grad):
  """(sum, min, max) of xs over all axes but ``axis`` (keepdims), or over all axes.

  Without gradients this is one variadic reduction (one pass over x); with
  stop_grad=False it is three differentiable jnp reductions.
  """
  red, keep = _reduce_axes(xs.ndim, axis), axis is not None
  if not stop_grad:
    return (jnp.sum(xs, axis=red, keepdims=keep), jnp.min(xs, axis=red, keepdims=keep),
            jnp.max(xs, axis=red, keepdims=keep))
  dims = tuple(range(xs.ndim)) if red is None else red
  init = (jnp.zeros((), xs.dtype), jnp.full((), jnp.inf, xs.dtype),
          jnp.full((), -jnp.inf, xs.dtype))

  def combine(a, b):
    return a[0] + b[0], jnp.minimum(a[1], b[1]), jnp.maximum(a[2], b[2])

  out = jax.lax.reduce((xs, xs, xs), init, combine, dims)
  shape = _stats_shape(xs.shape, axis)
  return tuple(o.reshape(shape) for o in out)


def _count(shape: Sequence[int], axis: Optional[int]) -> int:
  return int(np.prod([d for i, d in enumerate(shape) if i != axis]))


def _pauta_range_impl(x, lam, axis, symmetric, stop_grad):
  """(lo, hi, (min, max)) in the compute dtype."""
  cdt = _compute_dtype(x.dtype)
  xs = (jax.lax.stop_gradient(x) if stop_grad else x).astype(cdt)
  total, mn, mx = _sum_min_max(xs, axis, stop_grad)
  mu = total / _count(x.shape, axis)
  red, keep = _reduce_axes(x.ndim, axis), axis is not None
  var = jnp.mean(jnp.square(xs - mu), axis=red, keepdims=keep)  # two-pass: accurate
  pos = var > 0  # safe sqrt: finite gradient at sigma == 0 when stop_grad=False
  sigma = jnp.where(pos, jnp.sqrt(jnp.where(pos, var, 1.0)), 0.0)
  lam = jnp.asarray(lam, cdt)
  if symmetric:
    a = jnp.minimum(jnp.abs(mu) + lam * sigma, jnp.maximum(-mn, mx))
    lo, hi = -a, a
  else:
    # clip(., mn, mx) == the SPEC's max(mu - lam sigma, mn) / min(mu + lam sigma, mx)
    # whenever mn <= mu <= mx, and also guarantees lo <= hi under rounding (a
    # constant tensor gets lo == hi exactly).
    lo, hi = jnp.clip(mu - lam * sigma, mn, mx), jnp.clip(mu + lam * sigma, mn, mx)
  return lo, hi, (mn, mx)


def _minmax_range_impl(x, axis, symmetric, stop_grad):
  cdt = _compute_dtype(x.dtype)
  xs = (jax.lax.stop_gradient(x) if stop_grad else x).astype(cdt)
  total, mn, mx = _sum_min_max(xs, axis, stop_grad)
  if symmetric:
    a = jnp.maximum(-mn, mx)
    return -a, a, (mn, mx)
  return mn, mx, (mn, mx)


def _nonfinite_from_extrema(extrema):
  """min and max are NaN-propagating, so NaN or +-Inf in x shows up in them."""
  mn, mx = extrema
  return (~jnp.all(jnp.isfinite(mn) & jnp.isfinite(mx)),)


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5))
def _pauta_range_entry(x, lam, axis, symmetric, stop_grad, check):
  lo, hi, extrema = _pauta_range_impl(x, lam, axis, symmetric, stop_grad)
  return lo, hi, (_nonfinite_from_extrema(extrema) if check else None)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _minmax_range_entry(x, axis, symmetric, stop_grad, check):
  lo, hi, extrema = _minmax_range_impl(x, axis, symmetric, stop_grad)
  return lo, hi, (_nonfinite_from_extrema(extrema) if check else None)


@functools.partial(jax.jit, static_argnums=(3, 4, 5))
def _pauta_quantize_entry(x, lam, levels, axis, symmetric, check):
  lo, hi, extrema = _pauta_range_impl(x, lam, axis, symmetric, True)
  out = _fake_quant(x, lo, hi, jnp.asarray(levels, lo.dtype), symmetric, False)
  return out, (_nonfinite_from_extrema(extrema) if check else None)


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _minmax_quantize_entry(x, levels, axis, symmetric, check):
  lo, hi, extrema = _minmax_range_impl(x, axis, symmetric, True)
  out = _fake_quant(x, lo, hi, jnp.asarray(levels, lo.dtype), symmetric, False)
  return out, (_nonfinite_from_extrema(extrema) if check else None)


def _empty_range(x, axis):
  z = jnp.zeros(_stats_shape(x.shape, axis), _compute_dtype(x.dtype))
  return z, z


def pauta_range(x: ArrayLike, lam: float = PAUTA_CRITERION_LAM, channel_axis: Optional[int] = None,
                symmetric: bool = False, stop_grad: bool = True) -> Tuple[Array, Array]:
  """Clipping range of Pauta quantization (the lambda-sigma rule, SPEC §1.1).

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
  x = _as_float(x)
  validate_lam(lam)
  axis = validate_channel_axis(channel_axis, x.ndim)
  if x.size == 0:
    return _empty_range(x, axis)
  check = _concrete(x)
  lo, hi, bad = _pauta_range_entry(x, lam, axis, bool(symmetric), bool(stop_grad), check)
  if check:
    _raise_nonfinite(bad, ("x",))
  return lo, hi


def pauta_quantize(x: ArrayLike, bits: int, lam: float = PAUTA_CRITERION_LAM,
                   channel_axis: Optional[int] = None, symmetric: bool = False) -> Array:
  """Pauta quantization: ``fake_quant(x, *pauta_range(x, lam, ...), bits)``.

  Shapes/dtypes: x_hat has x's shape and dtype. Range statistics are
  stop-gradient constants; the gradient w.r.t. x is the clipped STE
  g * 1[lo <= x <= hi] (per channel if ``channel_axis`` is given). Constant
  tensors/channels are returned unchanged; empty x is returned as is.

  Raises ValueError for bad bits/lam/channel_axis and (eager) NaN/Inf.
  """
  bits = validate_bits(bits)
  x = _as_float(x)
  validate_lam(lam)
  axis = validate_channel_axis(channel_axis, x.ndim)
  if x.size == 0:
    return jnp.asarray(x)
  check = _concrete(x)
  out, bad = _pauta_quantize_entry(x, lam, _levels(bits, bool(symmetric)), axis,
                                   bool(symmetric), check)
  if check:
    _raise_nonfinite(bad, ("x",))
  return out


def minmax_range(x: ArrayLike, channel_axis: Optional[int] = None,
                 symmetric: bool = False, stop_grad: bool = True) -> Tuple[Array, Array]:
  """Min-max range: (min x, max x), or (-max|x|, max|x|) when symmetric.

  Same shapes, dtypes (compute dtype: float32 for bf16 input), gradient
  convention (stop-gradient by default), empty-input behaviour and errors as
  :func:`pauta_range`.
  """
  x = _as_float(x)
  axis = validate_channel_axis(channel_axis, x.ndim)
  if x.size == 0:
    return _empty_range(x, axis)
  check = _concrete(x)
  lo, hi, bad = _minmax_range_entry(x, axis, bool(symmetric), bool(stop_grad), check)
  if check:
    _raise_nonfinite(bad, ("x",))
  return lo, hi


def minmax_quantize(x: ArrayLike, bits: int, channel_axis: Optional[int] = None,
                    symmetric: bool = False) -> Array:
  """Min-max quantization: ``fake_quant(x, *minmax_range(x, ...), bits)``.

  x_hat has x's shape and dtype; gradient w.r.t. x is the clipped STE (which
  is 1 everywhere since nothing is clipped); range gets no gradient.
  Raises ValueError for bad bits/channel_axis and (eager) NaN/Inf.
  """
  bits = validate_bits(bits)
  x = _as_float(x)
  axis = validate_channel_axis(channel_axis, x.ndim)
  if x.size == 0:
    return jnp.asarray(x)
  check = _concrete(x)
  out, bad = _minmax_quantize_entry(x, _levels(bits, bool(symmetric)), axis, bool(symmetric),
                                    check)
  if check:
    _raise_nonfinite(bad, ("x",))
  return out


# ----------------------------------------------------------------------------
# LSQ: learned step size quantization (Esser et al., ICLR 2020)
# ----------------------------------------------------------------------------

def lsq_bounds(bits: int, signed: bool = True) -> Tuple[int, int]:
  """(Q_N, Q_P) of LSQ: (2^(b-1), 2^(b-1) - 1) signed, (0, 2^b - 1) unsigned."""
  bits = validate_bits(bits)
  if signed:
    return 2 ** (bits - 1), 2 ** (bits - 1) - 1
  return 0, 2 ** bits - 1


def lsq_range(step: ArrayLike, bits: int, signed: bool = True,
              offset: Optional[ArrayLike] = None) -> Tuple[Array, Array]:
  """(lo, hi) = (beta - Q_N s, beta + Q_P s): the LSQ grid as an asymmetric [lo, hi] grid.

  ``fake_quant(x, *lsq_range(s, b), b)`` equals ``lsq_quantize(x, s, b)`` in the
  forward pass (up to float rounding) and ``quantize_int`` with this range
  gives LSQ's integer codes (shifted by Q_N), scale s and zero point Q_N.
  ``offset`` beta (LSQ+; None = 0) shifts the grid. Shapes and dtype: those of
  ``step`` (broadcast with ``offset``).
  """
  qn, qp = lsq_bounds(bits, signed)
  step = jnp.asarray(_param(step, "step"))
  if offset is None:
    return -qn * step, qp * step
  offset = jnp.asarray(_param(offset, "offset"))
  return offset - qn * step, offset + qp * step


def _sum_to_shape(a: Array, shape: Sequence[int]) -> Array:
  """Sums ``a`` over the axes along which ``shape`` was broadcast to a.shape."""
  shape = tuple(shape)
  lead = a.ndim - len(shape)
  if lead:
    a = jnp.sum(a, axis=tuple(range(lead)))
  axes = tuple(i for i, d in enumerate(shape) if d == 1 and a.shape[i] != 1)
  if axes:
    a = jnp.sum(a, axis=axes, keepdims=True)
  return a.reshape(shape)


def _lsq_scaled(x, step, offset):
  cdt = _compute_dtype(jnp.promote_types(x.dtype, step.dtype))
  s = jnp.maximum(step.astype(cdt), jnp.finfo(cdt).tiny)
  return s, (x.astype(cdt) - offset.astype(cdt)) / s


@jax.custom_vjp
def _lsq(x, step, offset, qn, qp, numel):
  s, v = _lsq_scaled(x, step, offset)
  return (jnp.round(jnp.clip(v, -qn, qp)) * s + offset.astype(s.dtype)).astype(x.dtype)


def _lsq_fwd(x, step, offset, qn, qp, numel):
  return _lsq(x, step, offset, qn, qp, numel), (x, step, offset, qn, qp, numel)


def _lsq_bwd(res, g):
  x, step, offset, qn, qp, numel = res
  s, v = _lsq_scaled(x, step, offset)
  below, above = v < -qn, v > qp
  dx = jnp.where(below | above, jnp.zeros_like(g), g)
  factor = jnp.where(below, -qn, jnp.where(above, qp, jnp.round(v) - v))
  grad_scale = jax.lax.rsqrt(numel * qp)
  gs = g.astype(s.dtype)
  ds = _sum_to_shape(gs * factor * grad_scale, step.shape)
  # LSQ+: x_hat = beta + s * code, so d x_hat / d beta = 1 where clipped, 0 inside (STE).
  doff = _sum_to_shape(jnp.where(below | above, gs, 0.0) * grad_scale, offset.shape)
  return (dx, ds.astype(step.dtype), doff.astype(offset.dtype), jnp.zeros_like(qn),
          jnp.zeros_like(qp), jnp.zeros_like(numel))


_lsq.defvjp(_lsq_fwd, _lsq_bwd)


@functools.partial(jax.jit, static_argnums=(6,))
def _lsq_entry(x, step, offset, qn, qp, numel, check):
  cdt = _compute_dtype(jnp.promote_types(x.dtype, step.dtype))
  out = _lsq(x, step, offset, jnp.asarray(qn, cdt), jnp.asarray(qp, cdt),
             jnp.asarray(numel, cdt))
  return out, (_nonfinite_counts(x, step, offset) + (jnp.min(step),) if check else None)


def lsq_quantize(x: ArrayLike, step: ArrayLike, bits: int, signed: bool = True,
                 offset: Optional[ArrayLike] = None, numel: Optional[int] = None) -> Array:
  """LSQ fake quantization: x_hat = round(clip((x - beta) / s, -Q_N, Q_P)) * s + beta.

  Q_N = 2^(b-1), Q_P = 2^(b-1) - 1 if ``signed`` else Q_N = 0, Q_P = 2^b - 1.
  beta = ``offset`` (LSQ+, Bhalgat et al. 2020; None = 0: plain LSQ).

  Args:
    x: float array, any shape.
    step: s > 0, a 0-d array (per tensor) or an array broadcastable to
      x.shape (per channel, keepdims-shaped); normally a learnable param.
      Keep it float32 under bf16 compute: the arithmetic runs in
      promote(x.dtype, step.dtype), so small updates of s reach the forward.
    bits: Python int in [2, 16].
    signed: grid [-Q_N, Q_P] (True) or [0, Q_P] (False).
    offset: None, or beta broadcastable to x.shape like ``step`` (learnable).
    numel: the element count of the gradient scale (default ``x.size``). Under
      pmap pass the global count (x.size times the devices on the axis), so
      that N devices train as one.

  Returns:
    x_hat with x's shape and dtype (computed in float32, or float64 for f64).

  Gradient (custom_vjp, the LSQ paper's eqs. 3-5; LSQ+ for beta), with
  v = (x - beta) / s:
    dx = g * 1[-Q_N <= v <= Q_P];
    ds = sum over the broadcast axes of
         g * (round(v) - v  if -Q_N <= v <= Q_P;  -Q_N if v < -Q_N;  Q_P if v > Q_P)
         * grad_scale,   grad_scale = 1 / sqrt(numel * Q_P);
    d beta = sum g * 1[v < -Q_N or v > Q_P] * grad_scale;
    each reduced to its parameter's shape and dtype. Residual: x, step, beta.

  A non-positive step raises ValueError in eager mode; under jit it is
  clamped to the smallest positive normal float (no NaN; keep the step
  positive, e.g. by parametrising it or clipping after the update).

  Raises:
    ValueError: bad bits, non-float x, step/offset not broadcastable to
      x.shape, numel < 1, (eager) step <= 0 or NaN/Inf in x, step or offset.
  """
  bits = validate_bits(bits)
  x = _as_float(x)
  step = _param(step, "step")
  if not (hasattr(step, "dtype") and jnp.issubdtype(step.dtype, jnp.floating)):
    step = jnp.asarray(step, _compute_dtype(x.dtype))
  if offset is None:
    offset = jnp.zeros((), _compute_dtype(x.dtype))
  else:
    offset = _param(offset, "offset")
    if not (hasattr(offset, "dtype") and jnp.issubdtype(offset.dtype, jnp.floating)):
      offset = jnp.asarray(offset, step.dtype)
  _check_broadcast(x.shape, step=step.shape, offset=offset.shape)
  if x.size == 0:
    return jnp.asarray(x)
  if numel is None:
    numel = x.size
  elif not _is_traced(numel) and not float(numel) >= 1:
    raise ValueError(f"numel={numel!r}; valid: >= 1 (the element count of the gradient scale)")
  qn, qp = lsq_bounds(bits, signed)
  check = _concrete(x, step, offset)
  out, bad = _lsq_entry(x, step, offset, float(qn), float(qp), numel, check)
  if check:
    _raise_nonfinite(bad[:3], ("x", "step", "offset"))
    if step.size and not _is_traced(bad[3]) and not float(bad[3]) > 0:
      raise ValueError(f"step must be > 0 (valid range (0, inf)); got min {float(bad[3])}")
  return out


@functools.partial(jax.jit, static_argnums=(2, 3))
def _lsq_init_entry(x, qp, axis, check):
  cdt = _compute_dtype(x.dtype)
  xs = jnp.abs(jax.lax.stop_gradient(x).astype(cdt))
  m = jnp.mean(xs, axis=_reduce_axes(x.ndim, axis), keepdims=axis is not None)
  s = jnp.maximum(2.0 * m * jax.lax.rsqrt(jnp.asarray(qp, cdt)), LSQ_MIN_STEP).astype(cdt)
  return s, (_nonfinite_counts(x) if check else None)


def lsq_init_step(x: ArrayLike, bits: int, signed: bool = True,
                  channel_axis: Optional[int] = None) -> Array:
  """LSQ's step initialisation s0 = 2 mean|x| / sqrt(Q_P).

  Returns a float32 (float64 for f64 x) array: 0-d per tensor, or keepdims
  shape (size 1 except on ``channel_axis``) per channel. Floored at
  LSQ_MIN_STEP = 1e-8 so an all-zero x still gets a positive step; an empty x
  gives 1.0. No gradient flows to x (stop_gradient).
  Raises ValueError for bad bits/channel_axis and (eager) NaN/Inf.
  """
  bits = validate_bits(bits)
  x = _as_float(x)
  axis = validate_channel_axis(channel_axis, x.ndim)
  _, qp = lsq_bounds(bits, signed)
  if x.size == 0:
    return jnp.ones(_stats_shape(x.shape, axis), _compute_dtype(x.dtype))
  check = _concrete(x)
  s, bad = _lsq_init_entry(x, float(qp), axis, check)
  if check:
    _raise_nonfinite(bad, ("x",))
  return s


# Candidate top ends of LSQ+'s MSE initialisation: hi = beta + f (max x - beta).
_LSQ_PLUS_FRACTIONS = tuple((i + 1) / 64 for i in range(64))


@functools.partial(jax.jit, static_argnums=(2,))
def _lsq_plus_init_entry(x, qp, check):
  cdt = _compute_dtype(x.dtype)
  xs = jax.lax.stop_gradient(x).astype(cdt).reshape(-1)
  beta, mx = jnp.min(xs), jnp.max(xs)
  span = jnp.maximum(mx - beta, LSQ_MIN_STEP * qp)
  steps = jnp.asarray(_LSQ_PLUS_FRACTIONS, cdt) * span / qp

  def mse(s):
    q = jnp.round(jnp.clip((xs - beta) / s, 0.0, qp)) * s + beta
    return jnp.mean(jnp.square(q - xs))

  errs = jax.lax.map(mse, steps)
  s = jnp.maximum(steps[jnp.argmin(errs)], LSQ_MIN_STEP)
  return s, beta, (_nonfinite_counts(x) if check else None)


def lsq_plus_init(x: ArrayLike, bits: int) -> Tuple[Array, Array]:
  """LSQ+'s initialisation of (step, offset) for an unsigned grid [0, Q_P], per tensor.

  beta0 = min x (for a GELU output the bottom of its range, about -0.17; LSQ+
  initialises the offset from the data's minimum), and s0 minimises the
  quantization MSE of x over 64 candidates s = f (max x - beta0) / Q_P,
  f = 1/64 .. 1 (LSQ+ initialises activations by MSE minimisation: plain min-max
  is ruined by outliers at 2 bits). Returns 0-d float32 arrays (float64 for f64 x),
  no gradient; s0 >= LSQ_MIN_STEP. Empty x gives (1.0, 0.0).
  Raises ValueError for bad bits and (eager) NaN/Inf.
  """
  bits = validate_bits(bits)
  x = _as_float(x)
  _, qp = lsq_bounds(bits, False)
  cdt = _compute_dtype(x.dtype)
  if x.size == 0:
    return jnp.ones((), cdt), jnp.zeros((), cdt)
  check = _concrete(x)
  s, beta, bad = _lsq_plus_init_entry(x, float(qp), check)
  if check:
    _raise_nonfinite(bad, ("x",))
  return s, beta


# ----------------------------------------------------------------------------
# Stochastic rounding
# ----------------------------------------------------------------------------

@jax.custom_vjp
def _stochastic_round(x, key):
  xc = x.astype(_compute_dtype(x.dtype))
  f = jnp.floor(xc)
  u = jax.random.uniform(key, x.shape, xc.dtype)
  return (f + (u < xc - f).astype(xc.dtype)).astype(x.dtype)


def _sr_fwd(x, key):
  return _stochastic_round(x, key), None


def _sr_bwd(_, g):
  return g, None


_stochastic_round.defvjp(_sr_fwd, _sr_bwd)


@functools.partial(jax.jit, static_argnums=(2,))
def _stochastic_round_entry(x, key, check):
  return _stochastic_round(x, key), (_nonfinite_counts(x) if check else None)


def stochastic_round(x: ArrayLike, key: Array) -> Array:
  """Unbiased stochastic rounding to integers: E[stochastic_round(x)] = x.

  Each element becomes floor(x) + 1 with probability x - floor(x), else
  floor(x) (one uniform draw per element from ``key``; integers stay exact).
  Combine with a scale for stochastic grid rounding: s * stochastic_round(x / s).

  Args:
    x: float array, any shape/dtype.
    key: a JAX PRNG key (raw uint32[2] or typed key).

  Returns: array with x's shape and dtype.
  Gradient: straight-through, dx = g (custom_vjp); no gradient for key.
  Raises ValueError for non-float x and (eager) NaN/Inf.
  """
  x = _as_float(x)
  if x.size == 0:
    return jnp.asarray(x)
  check = _concrete(x)
  out, bad = _stochastic_round_entry(x, key, check)
  if check:
    _raise_nonfinite(bad, ("x",))
  return out
