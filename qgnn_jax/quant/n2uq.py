"""N2UQ: Nonuniform-to-Uniform Quantization with the generalised STE, as pure JAX functions.

Liu, Cheng, Huang, Xing, Shen, "Nonuniform-to-Uniform Quantization: Towards Accurate
Quantization via Generalized Straight-Through Estimation", CVPR 2022 (arXiv 2111.14826);
official code: github.com/liuzechun/Nonuniform-to-Uniform-Quantization (``LTQ`` in
``resnet/resnet.py``). The input thresholds are learnable and non-uniform; the output
levels are uniform, so inference is plain integer arithmetic.

Notation: b bits, N = 2^b - 1 thresholds (and N learnable widths), x a float input,
g the incoming cotangent. Parameters (all float32; shapes depend only on b):

  params = {"start": (),  "widths": (N,),  "step": ()}
           s = d_0       a_1 .. a_N        Delta (output step)

Parameterisation (paper, README "Forward pass" formula). Widths are clamped below,
a+_i = max(a_i, N2UQ_MIN_WIDTH), so the thresholds are ordered by construction:

  d_0 = s,   d_i = s + sum_{j<=i} a+_j          (i = 1..N; segment ends)
  T_i = d_{i-1} + a+_i / 2                       (i = 1..N; thresholds, segment midpoints)

Forward (paper: x^q = i for d_{i-1} + a_i/2 <= x < d_i + a_{i+1}/2, 0 below T_1,
2^b - 1 from T_N on):

  q(x)  = #{ i : T_i <= x }  in {0..N}            (the number of thresholds passed)
  z     = 0 (unsigned) or 2^(b-1) (signed)
  x_hat = Delta * (q(x) - z)

Backward, G-STE (paper, README "Backward pass" formula): the gradient is that of the
expectation of the stochastic quantizer, the piecewise-linear function through the
points (d_i, i):

  E(x) = (x - d_{i-1}) / a+_i + i - 1   for d_{i-1} <= x < d_i,  i = 1..N
         constant                        for x < d_0 or x >= d_N

and the surrogate of x_hat is Delta * (E(x) - z) for x, s and a (the output step gets
the forward value, as the official ``out * scale2``). With i = i(x) the segment of x,
I(x) = 1[d_0 <= x < d_N] and sums running over all elements of x:

  dL/dx     = g * Delta / a+_i * I(x)
  dL/ds     = -sum g * Delta / a+_i * I(x)
  dL/da_k   = -( sum_{x: i(x) > k} g * Delta / a+_{i(x)}
               + sum_{x: i(x) = k} g * Delta * (x - d_{k-1}) / a+_k^2 ) * 1[a_k > N2UQ_MIN_WIDTH]
  dL/dDelta = sum g * (q(x) - z)

(dL/da_k: a_k shifts every later segment, slope -Delta/a+_i there, and stretches its
own segment; the clamp passes no gradient where it is active, as ``torch.where(a > eps,
a, eps)`` does in the official code.) Outside [d_0, d_N) nothing gets a gradient but
Delta.

Init (``n2uq_init``): the official code starts from uniform rounding of [0, 2] (s = 0,
a_i = 2/N, output step 2/N). We keep that shape, uniform thresholds at the midpoints
of a uniform output grid (so the initial forward is uniform round-to-nearest), but
take the range from the sample x with the Pauta rule (docs/METHOD.md, "Definitions"; lambda = 3), all
stop-gradient:

  unsigned: hi = min(max x, mean x + 3 std x)   (max|x| if that is <= 0)
            Delta = hi / N,  s = 0,              a_i = Delta   -> d_0 = 0, d_N = hi
  signed:   A = min(max|x|, |mean x| + 3 std x)
            Delta = 2A / N,  s = -2^(b-1) Delta, a_i = Delta   -> levels -2^(b-1)..2^(b-1)-1
  Delta is floored at N2UQ_INIT_MIN_STEP (all-zero or empty sample).

Deviations from the official code, and why:
  * Official ``scale1`` (an input scale, x <- x * scale1) is omitted: in the forward it
    is redundant with s and a (scaling x is scaling every threshold), and the API keeps
    one parameter per role. Official ``scale2`` times the fixed interval 2/N is our
    learnable ``step`` Delta: same forward; its gradient is the official scale2
    gradient divided by 2/N (a constant factor, i.e. a learning-rate choice).
  * The width clamp is N2UQ_MIN_WIDTH = 1e-6 instead of 1e-3: the official 1e-3 is
    relative to its fixed [0, 2] range, ours is data-derived and may be much smaller.
  * Thresholds count as passed at equality (T_i <= x, as in the paper); the code uses
    x > T_i. Segments are [d_{i-1}, d_i) as in the paper. Both differ only on a
    measure-zero set.
  * The paper's E is 0 above d_N and the code's is the top level; both are constant,
    so the gradients agree (zero).
  * ``signed`` (codes shifted by 2^(b-1), zero exact) is ours: N2UQ quantizes
    activations with unsigned levels only (its weights use a different quantizer).
  * Per tensor only, and no LSQ-style gradient scaling: the official code lowers the
    learning rate of these parameters (lr / 10) instead.

Arithmetic is float32 (float64 for float64 x with x64); the output is cast to x.dtype.
Non-finite input: eager calls raise ValueError for NaN/Inf in x or params; under a
transformation nothing is checked, NaN in x propagates to the output and +-Inf maps to
the lowest/highest level (zero gradient).
"""

from __future__ import annotations

import functools
from typing import Any, Dict, Tuple

import jax
import jax.numpy as jnp

from qgnn_jax.quant import grid
from qgnn_jax.quant.grid import Array, ArrayLike
from qgnn_jax.quant.registry import OperandSpec, Quantizer

N2UQ_MIN_BITS = 2
N2UQ_MAX_BITS = 8
# Widths are clamped to at least this (threshold order, finite slopes Delta / a).
N2UQ_MIN_WIDTH = 1e-6
# n2uq_init never returns a smaller step / width (all-zero or empty samples).
N2UQ_INIT_MIN_STEP = 1e-5
# Pauta lambda of the initial range.
N2UQ_INIT_LAM = 3.0
PARAM_KEYS = ("start", "widths", "step")

__all__ = ["N2UQ", "N2UQ_MIN_BITS", "N2UQ_MAX_BITS", "N2UQ_MIN_WIDTH", "n2uq_init",
           "n2uq_quantize", "n2uq_int"]


# ----------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------

def _validate_bits(bits: Any) -> int:
  return grid.validate_bits(bits, N2UQ_MIN_BITS, N2UQ_MAX_BITS, quantizer="n2uq")


def _param_shapes(bits: int) -> Dict[str, Tuple[int, ...]]:
  return {"start": (), "widths": (2 ** bits - 1,), "step": ()}


def _validate_params(params: Any, bits: int) -> Tuple[Any, Any, Any]:
  """(start, widths, step) as float32 arrays, or ValueError naming what is wrong."""
  shapes = _param_shapes(bits)
  if not hasattr(params, "keys"):
    raise ValueError(f"params must be a dict with keys {list(PARAM_KEYS)}, got "
                     f"{type(params).__name__}")
  keys = set(params.keys())
  if keys != set(PARAM_KEYS):
    missing, extra = sorted(set(PARAM_KEYS) - keys), sorted(map(str, keys - set(PARAM_KEYS)))
    raise ValueError(f"params keys {sorted(map(str, keys))} are wrong (missing {missing}, "
                     f"unexpected {extra}); valid keys: {list(PARAM_KEYS)}")
  out = []
  for k in PARAM_KEYS:
    v = params[k]
    if not (hasattr(v, "dtype") and hasattr(v, "shape")):
      v = jnp.asarray(v)
    if tuple(v.shape) != shapes[k]:
      raise ValueError(f"params[{k!r}] has shape {tuple(v.shape)}; for bits={bits} it must "
                       f"have shape {shapes[k]} (widths: 2^bits - 1 entries)")
    if not jnp.issubdtype(v.dtype, jnp.floating):
      raise ValueError(f"params[{k!r}] must have a floating dtype (float32), got {v.dtype}")
    out.append(v)
  return tuple(out)


# ----------------------------------------------------------------------------
# Core: forward code and custom_vjp (G-STE)
# ----------------------------------------------------------------------------

def _geometry(start, widths):
  """(a+, d, T): clamped widths (N,), segment ends d_0..d_N (N+1,), thresholds (N,)."""
  a_pos = jnp.maximum(widths, N2UQ_MIN_WIDTH)
  d = start + jnp.concatenate([jnp.zeros((1,), a_pos.dtype), jnp.cumsum(a_pos)])
  # Non-decreasing by monotone rounding: d_{i-1} <= T_i <= d_i <= T_{i+1}.
  return a_pos, d, d[:-1] + a_pos / 2


def _codes(xc, start, widths):
  """q(x) = #{i : T_i <= x} (int32, x.shape)."""
  _, _, t = _geometry(start, widths)
  return jnp.searchsorted(t, xc, side="right").astype(jnp.int32)


def _zero(n: int, signed: bool) -> int:
  return (n + 1) // 2 if signed else 0


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _n2uq(x, start, widths, step, signed):
  xc = x.astype(start.dtype)
  q = _codes(xc, start, widths)
  out = step * (q - _zero(widths.shape[0], signed)).astype(xc.dtype)
  return jnp.where(jnp.isnan(xc), xc, out).astype(x.dtype)


def _n2uq_fwd(x, start, widths, step, signed):
  return _n2uq(x, start, widths, step, signed), (x, start, widths, step)


def _n2uq_bwd(signed, res, g):
  x, start, widths, step = res
  n = widths.shape[0]
  xc = x.astype(start.dtype)
  gf = g.astype(start.dtype)
  a_pos, d, _ = _geometry(start, widths)
  seg = jnp.searchsorted(d, xc, side="right")  # 0 below d_0, i in 1..N inside, N+1 above
  inside = (seg >= 1) & (seg <= n)
  idx = jnp.clip(seg - 1, 0, n - 1)            # 0-based segment index
  a_i, d_prev = a_pos[idx], d[idx]
  gx = jnp.where(inside, gf * step / a_i, 0.0)               # g * Delta / a+_i * I(x)
  gxu = gx * jnp.where(inside, (xc - d_prev) / a_i, 0.0)      # ... * (x - d_{i-1}) / a+_i
  seg_g = jax.ops.segment_sum(gx.ravel(), idx.ravel(), num_segments=n)
  seg_gu = jax.ops.segment_sum(gxu.ravel(), idx.ravel(), num_segments=n)
  later = jnp.cumsum(seg_g[::-1])[::-1] - seg_g               # sum over segments i > k
  dwidths = jnp.where(widths > N2UQ_MIN_WIDTH, -(later + seg_gu), 0.0)
  dstart = -jnp.sum(gx)
  q = _codes(xc, start, widths)
  dstep = jnp.sum(gf * (q - _zero(n, signed)).astype(gf.dtype))
  return (gx.astype(x.dtype), dstart.astype(start.dtype), dwidths.astype(widths.dtype),
          dstep.astype(step.dtype))


_n2uq.defvjp(_n2uq_fwd, _n2uq_bwd)


# ----------------------------------------------------------------------------
# Jitted entry points (one dispatch in eager mode, inlined when traced)
# ----------------------------------------------------------------------------

def _cast_params(x, start, widths, step):
  cdt = grid.compute_dtype(x.dtype)
  return start.astype(cdt), widths.astype(cdt), step.astype(cdt)


@functools.partial(jax.jit, static_argnums=(4, 5))
def _quantize_entry(x, start, widths, step, signed, check):
  out = _n2uq(x, *_cast_params(x, start, widths, step), signed)
  return out, (grid.nonfinite_flags(x, start, widths, step) if check else None)


@functools.partial(jax.jit, static_argnums=(4, 5))
def _int_entry(x, start, widths, step, signed, check):
  x, start, widths, step = jax.lax.stop_gradient((x, start, widths, step))
  s, w, st = _cast_params(x, start, widths, step)
  codes = _codes(x.astype(s.dtype), s, w)
  zp = jnp.asarray(_zero(widths.shape[0], signed), jnp.int32)
  return ((codes, st.astype(jnp.float32), zp),
          (grid.nonfinite_flags(x, start, widths, step) if check else None))


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _init_entry(x, bits, signed, check):
  cdt = grid.compute_dtype(x.dtype)
  xs = jax.lax.stop_gradient(x).astype(cdt)
  n = 2 ** bits - 1
  mu = jnp.mean(xs)
  sigma = jnp.sqrt(jnp.mean(jnp.square(xs - mu)))
  mx, amax = jnp.max(xs), jnp.max(jnp.abs(xs))
  if signed:
    a = jnp.minimum(amax, jnp.abs(mu) + N2UQ_INIT_LAM * sigma)
    step = 2.0 * a / n
  else:
    hi = jnp.minimum(mx, mu + N2UQ_INIT_LAM * sigma)
    hi = jnp.where(hi > 0, hi, amax)
    step = hi / n
  step = jnp.maximum(step, N2UQ_INIT_MIN_STEP)
  start = -_zero(n, signed) * step
  params = {"start": start.astype(jnp.float32),
            "widths": jnp.full((n,), step, jnp.float32),
            "step": step.astype(jnp.float32)}
  return params, (grid.nonfinite_flags(x) if check else None)


# ----------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------

def n2uq_init(x: ArrayLike, bits: int, signed: bool = False) -> Dict[str, Array]:
  """N2UQ's learnable parameters, initialised from a sample ``x`` (no gradient).

  Args:
    x: float array, any shape/rank/dtype (a sample of the operand).
    bits: Python int in [2, 8].
    signed: unsigned output levels {0..2^b-1} * step, or signed
      {-2^(b-1)..2^(b-1)-1} * step.

  Returns:
    ``{"start": (), "widths": (2^b - 1,), "step": ()}``, all float32: uniform
    thresholds at the midpoints of a uniform output grid over the sample's Pauta
    range (see the module docstring), so the initial forward rounds to nearest:
    unsigned over [0, min(max x, mean + 3 std)], signed over about
    [-A, A], A = min(max|x|, |mean| + 3 std). step >= 1e-5; an empty x gives
    step 1e-5.

  Raises:
    ValueError: bad bits, non-float x, (eager) NaN/Inf in x.
  """
  bits = _validate_bits(bits)
  x = grid.as_float(x)
  if x.size == 0:
    x = jnp.zeros((1,), x.dtype)
  check = grid.all_concrete(x)
  params, bad = _init_entry(x, bits, bool(signed), check)
  if check:
    grid.raise_nonfinite(bad, ("x",))
  return params


def n2uq_quantize(x: ArrayLike, params: Dict[str, ArrayLike], bits: int,
                  signed: bool = False) -> Array:
  """N2UQ fake quantization: learnable non-uniform thresholds, uniform output levels.

  x_hat = step * (q(x) - z), q(x) = #{i : T_i <= x} in {0..2^b-1}, z = 0 or 2^(b-1)
  (signed), with thresholds T_i = start + sum_{j<i} a+_j + a+_i / 2 and
  a+ = max(widths, 1e-6) (ordered by construction).

  Args:
    x: float array, any shape/rank (bf16/f16/f32/f64).
    params: ``{"start": (), "widths": (2^b - 1,), "step": ()}`` float arrays (from
      :func:`n2uq_init`); used in float32.
    bits: Python int in [2, 8].
    signed: code range shifted by 2^(b-1) (zero exact).

  Returns:
    x_hat with x's shape and dtype (computed in float32, cast back). Empty x is
    returned as is.

  Gradient (custom_vjp, the paper's G-STE; see the module docstring): x, start and
  widths get the derivative of step * E(x), E the piecewise-linear function through
  (d_i, i); step gets sum g * (q - z). All of x, start, widths and step are
  differentiable; param gradients are float32 sums over every element of x.
  Residuals: x and the params.

  Raises:
    ValueError: bad bits; params with wrong keys, shapes or non-float dtypes;
      non-float x; (eager only) NaN/Inf in x or params.
  """
  bits = _validate_bits(bits)
  x = grid.as_float(x)
  start, widths, step = _validate_params(params, bits)
  if x.size == 0:
    return jnp.asarray(x)
  check = grid.all_concrete(x, start, widths, step)
  out, bad = _quantize_entry(x, start, widths, step, bool(signed), check)
  if check:
    grid.raise_nonfinite(bad, ("x", "params['start']", "params['widths']", "params['step']"))
  return out


def n2uq_int(x: ArrayLike, params: Dict[str, ArrayLike], bits: int,
             signed: bool = False) -> Tuple[Array, Array, Array]:
  """Integer form of :func:`n2uq_quantize`: ``scale * (codes - zero_point) == x_hat``.

  Returns:
    codes: int32, x.shape, in [0, 2^b - 1] (q(x), the number of thresholds passed;
      unsigned even when ``signed``, so they pack into b bits).
    scale: float32 0-d, the output step.
    zero_point: int32 0-d, 0 (unsigned) or 2^(b-1) (signed).
  Not differentiable (stop-gradient). Same arguments and errors as n2uq_quantize.
  """
  bits = _validate_bits(bits)
  x = grid.as_float(x)
  start, widths, step = _validate_params(params, bits)
  check = grid.all_concrete(x, start, widths, step)
  (codes, scale, zp), bad = _int_entry(x, start, widths, step, bool(signed), check)
  if check and x.size:
    grid.raise_nonfinite(bad, ("x", "params['start']", "params['widths']", "params['step']"))
  return codes, scale, zp


class N2UQ(Quantizer):
  """N2UQ as a registry entry: learnable thresholds (start, widths) and output step, one
  set per tensor, initialised from the first sample. The grid is signed for weights and
  activations alike: the ops ViG quantizes take BN or GELU outputs, both with negatives
  (the paper's unsigned grid follows a ReLU-like activation)."""
  name = "n2uq"
  learnable = PARAM_KEYS
  min_bits, max_bits = N2UQ_MIN_BITS, N2UQ_MAX_BITS  # 2^b - 1 learnable widths per tensor

  def init_params(self, x, spec: OperandSpec):
    return n2uq_init(x, spec.bits, signed=True)

  def quantize(self, x, spec: OperandSpec, state):
    return n2uq_quantize(x, {k: state[k] for k in PARAM_KEYS}, spec.bits, signed=True)

  def integer(self, x, spec: OperandSpec, state):
    return n2uq_int(x, {k: state[k] for k in PARAM_KEYS}, spec.bits, signed=True)
