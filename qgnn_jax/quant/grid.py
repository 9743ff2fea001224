"""What every quantizer shares: bit-width and argument checks, the eager non-finite check,
the compute dtype, and the arithmetic of a uniform grid and of range statistics.

Public helpers (no underscore: `uniform`, `pq`, `minmax`, `lsq`, `n2uq` and `integer`
import them; user code may too). docs/METHOD.md, "Definitions", defines the grids:

* Asymmetric grid over [lo, hi]: 2^b levels, step s = (hi - lo) / (2^b - 1),
  codes q in {0 .. 2^b - 1}, x_hat = lo + s * q.
* Symmetric grid over [-a, a]: codes q in {-(2^(b-1) - 1) .. 2^(b-1) - 1},
  s = a / (2^(b-1) - 1), x_hat = s * q (zero is exact).

``bits`` b is a Python int in [MIN_BITS, MAX_BITS] = [2, 16]; a quantizer may allow less
(its registry entry's ``min_bits`` / ``max_bits``; `qgnn_jax.quant.check_bits`).

Arithmetic precision. The quantizers compute in ``compute_dtype(x.dtype)`` =
``promote_types(x.dtype, float32)`` (float32 for bf16/f16/f32 input) and cast the result
back to ``x.dtype``; range statistics are likewise computed and returned in that dtype.

Non-finite inputs. In eager mode (concrete arrays) every public quantizer function raises
``ValueError`` when its floating inputs contain NaN or Inf. Under a transformation
(``jit``, ``vmap``, ``pmap``, ``grad`` tracing) the values are not known, so nothing is
checked and nothing is sanitised: NaN propagates to the output (and to PQ/min-max ranges),
+-Inf is clipped to the range by ``fake_quant``/``lsq_quantize`` but makes PQ ranges NaN and
min-max ranges infinite (hence NaN outputs). To check under jit, call :func:`check_finite`
inside the function and wrap it with ``jax.experimental.checkify.checkify`` (it emits a
``checkify.check``). The eager check is computed inside the same compiled call as the
quantizer (:func:`nonfinite_flags`, or for PQ/min-max :func:`nonfinite_from_extrema` of the
min/max it already computes) and costs one host sync of a flag (:func:`raise_nonfinite`);
traced calls emit no check code.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

Array = jax.Array
ArrayLike = Union[jax.Array, np.ndarray, float, int]

MIN_BITS = 2
MAX_BITS = 16

__all__ = [
    "Array", "ArrayLike", "MIN_BITS", "MAX_BITS", "validate_bits", "validate_lam",
    "validate_channel_axis", "check_finite", "is_traced", "all_concrete", "as_float",
    "as_param", "check_broadcast", "compute_dtype", "levels", "nonfinite_flags",
    "raise_nonfinite", "sum_to_shape", "reduce_axes", "stats_shape", "sum_min_max",
    "nonfinite_from_extrema", "empty_range",
]


# ----------------------------------------------------------------------------
# Argument checks
# ----------------------------------------------------------------------------

def is_traced(x: Any) -> bool:
  """True for a JAX tracer (a value not known under jit / vmap / grad tracing)."""
  return isinstance(x, jax.core.Tracer)


def all_concrete(*vs: Any) -> bool:
  """True when no argument is traced: eager mode, where values can be checked."""
  return not any(is_traced(v) for v in vs)


def validate_bits(bits: Any, min_bits: int = MIN_BITS, max_bits: int = MAX_BITS,
                  quantizer: Optional[str] = None, field: str = "bits") -> int:
  """Returns ``bits`` as an int, or raises ValueError naming the value and the valid range.

  Valid: a Python int (or NumPy integer; not bool, float or array) in
  [min_bits, max_bits] (default [MIN_BITS, MAX_BITS] = [2, 16]). ``quantizer``, when
  given, names whose range it is ("for n2uq"); ``field`` names the value ("w_bits").
  """
  who = f" for {quantizer}" if quantizer else ""
  if isinstance(bits, (bool, np.bool_)) or not isinstance(bits, (int, np.integer)):
    raise ValueError(f"{field}={bits!r} (type {type(bits).__name__}) must be a Python int "
                     f"in [{min_bits}, {max_bits}]{who}")
  if not min_bits <= int(bits) <= max_bits:
    raise ValueError(f"{field}={bits} is out of range{who}; valid range is "
                     f"[{min_bits}, {max_bits}]")
  return int(bits)


def validate_lam(lam: Any) -> None:
  """Raises ValueError unless ``lam`` (the Pauta lambda) is finite and > 0.

  A traced ``lam`` (under jit) cannot be checked and is accepted.
  """
  if is_traced(lam):
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
  if is_traced(x):
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


def as_float(x: ArrayLike, name: str = "x") -> Any:
  """x unchanged if it is an array (jax, numpy or tracer), else jnp.asarray(x); raises
  ValueError unless its dtype is floating."""
  if not (hasattr(x, "dtype") and hasattr(x, "shape")):
    x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"{name} must have a floating dtype (float16/bfloat16/float32/"
                     f"float64), got {x.dtype}")
  return x


def as_param(v: ArrayLike, name: str) -> Any:
  """A range/step argument: Python scalars stay scalars (weakly typed in jit); anything
  else becomes a numeric array; bools and non-numeric dtypes raise ValueError."""
  if isinstance(v, (bool, np.bool_)):
    raise ValueError(f"{name}={v!r} must be a number or a float array, not bool")
  if isinstance(v, (int, float, np.integer, np.floating)):
    return v
  if not (hasattr(v, "dtype") and hasattr(v, "shape")):
    v = jnp.asarray(v)
  if not (jnp.issubdtype(v.dtype, jnp.inexact) or jnp.issubdtype(v.dtype, jnp.integer)):
    raise ValueError(f"{name} must be numeric, got dtype {v.dtype}")
  return v


def check_broadcast(x_shape: Sequence[int], **params: Sequence[int]) -> None:
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


def nonfinite_flags(*vs: Any) -> Tuple[Array, ...]:
  """Per input: True where it holds NaN/Inf (one cheap reduction each; computed inside the
  quantizer's jitted call in eager mode, read by :func:`raise_nonfinite`)."""
  return tuple(~jnp.all(jnp.isfinite(jnp.asarray(v))) for v in vs)


def raise_nonfinite(flags: Sequence[Any], names: Sequence[str]) -> None:
  """Raises ValueError naming the first input whose flag is set (eager mode)."""
  for flag, name in zip(flags, names):
    # Concrete inputs can still give traced flags, e.g. when flax checks a param
    # initialiser's shape with jax.eval_shape: then there is nothing to check.
    if is_traced(flag):
      continue
    if bool(flag):
      raise ValueError(f"{name} contains non-finite values (NaN or Inf); quantizers need "
                       f"finite inputs (eager-mode check; under jit use check_finite with "
                       f"checkify)")


# ----------------------------------------------------------------------------
# Grid and statistics arithmetic
# ----------------------------------------------------------------------------

def compute_dtype(dtype: Any) -> Any:
  """The dtype quantizers compute in: promote_types(dtype, float32)."""
  return jnp.promote_types(dtype, jnp.float32)


def levels(bits: int, symmetric: bool) -> float:
  """Largest code: 2^b - 1 (asymmetric) or 2^(b-1) - 1 (symmetric)."""
  return float(2 ** (bits - 1) - 1) if symmetric else float(2 ** bits - 1)


def sum_to_shape(a: Array, shape: Sequence[int]) -> Array:
  """Sums ``a`` over the axes along which ``shape`` was broadcast to a.shape (the
  cotangent of a broadcast parameter)."""
  shape = tuple(shape)
  lead = a.ndim - len(shape)
  if lead:
    a = jnp.sum(a, axis=tuple(range(lead)))
  axes = tuple(i for i, d in enumerate(shape) if d == 1 and a.shape[i] != 1)
  if axes:
    a = jnp.sum(a, axis=axes, keepdims=True)
  return a.reshape(shape)


def reduce_axes(ndim: int, axis: Optional[int]) -> Optional[Tuple[int, ...]]:
  """Axes a statistic reduces: all but ``axis`` (per channel), or None (per tensor)."""
  return None if axis is None else tuple(i for i in range(ndim) if i != axis)


def stats_shape(shape: Sequence[int], axis: Optional[int]) -> Tuple[int, ...]:
  """Shape of a statistic of an input of ``shape``: () per tensor, keepdims per channel."""
  if axis is None:
    return ()
  return tuple(d if i == axis else 1 for i, d in enumerate(shape))


def sum_min_max(xs: Array, axis: Optional[int], stop_grad: bool) -> Tuple[Array, Array, Array]:
  """(sum, min, max) of xs over all axes but ``axis`` (keepdims), or over all axes.

  Without gradients this is one variadic reduction (one pass over x); with
  stop_grad=False it is three differentiable jnp reductions.
  """
  red, keep = reduce_axes(xs.ndim, axis), axis is not None
  if not stop_grad:
    return (jnp.sum(xs, axis=red, keepdims=keep), jnp.min(xs, axis=red, keepdims=keep),
            jnp.max(xs, axis=red, keepdims=keep))
  dims = tuple(range(xs.ndim)) if red is None else red
  init = (jnp.zeros((), xs.dtype), jnp.full((), jnp.inf, xs.dtype),
          jnp.full((), -jnp.inf, xs.dtype))

  def combine(a, b):
    return a[0] + b[0], jnp.minimum(a[1], b[1]), jnp.maximum(a[2], b[2])

  out = jax.lax.reduce((xs, xs, xs), init, combine, dims)
  shape = stats_shape(xs.shape, axis)
  return tuple(o.reshape(shape) for o in out)


def nonfinite_from_extrema(extrema: Tuple[Array, Array]) -> Tuple[Array]:
  """(flag,): min and max are NaN-propagating, so NaN or +-Inf in x shows up in them."""
  mn, mx = extrema
  return (~jnp.all(jnp.isfinite(mn) & jnp.isfinite(mx)),)


def empty_range(x: Array, axis: Optional[int]) -> Tuple[Array, Array]:
  """(0, 0) in x's statistics shape: the range of an empty x (a degenerate range that
  fake_quant leaves untouched)."""
  z = jnp.zeros(stats_shape(x.shape, axis), compute_dtype(x.dtype))
  return z, z
