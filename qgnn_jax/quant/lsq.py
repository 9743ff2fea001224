"""LSQ (Esser et al., ICLR 2020) and LSQ+ (Bhalgat et al., CVPR-W 2020): the maths as
functions, and the registry entry.

One learnable step s per tensor, a float32 Flax param (kept float32 in the forward also
under bf16 compute). Its gradient is LSQ's, scaled by 1 / sqrt(numel Q_P) with numel the
operand's *global* element count (`state["numel"]`, set by the site: x.size times the
devices of the pmap axis), so N devices train as one.

The grid follows `spec.grid` (`qat.QuantRule.a_grid` for activations; weights are always
signed):
  * "signed":   [-Q_N, Q_P] = [-2^(b-1), 2^(b-1) - 1], s0 = 2 mean|x| / sqrt(Q_P) (LSQ);
  * "unsigned": [0, 2^b - 1], s0 the same formula with the unsigned Q_P: LSQ's grid after
    ReLU, for inputs that are non-negative by construction (a GELU output's tail down to
    -0.17 is clipped to 0);
  * "offset":   LSQ+: the unsigned grid shifted by a learnable offset beta,
    x_hat = beta + s round(clip((x - beta) / s, 0, 2^b - 1)), for GELU/Swish-like inputs;
    beta0 = min x, s0 minimising the MSE on the first batch (`lsq_plus_init`);
    beta's gradient (1 where clipped) takes the same gradient scale.
Granularity and symmetry settings do not apply.
"""
from __future__ import annotations

import functools
from typing import Optional, Tuple

import jax
import jax.numpy as jnp

from qgnn_jax.quant import grid, integer
from qgnn_jax.quant.grid import Array, ArrayLike
from qgnn_jax.quant.registry import OperandSpec, Quantizer

# Smallest step lsq_init_step returns (for an all-zero tensor).
LSQ_MIN_STEP = 1e-8
# Candidate top ends of LSQ+'s MSE initialisation: hi = beta + f (max x - beta).
LSQ_PLUS_FRACTIONS = tuple((i + 1) / 64 for i in range(64))

__all__ = ["LSQ_MIN_STEP", "lsq_bounds", "lsq_range", "lsq_quantize", "lsq_init_step",
           "lsq_plus_init", "LSQ"]


def lsq_bounds(bits: int, signed: bool = True) -> Tuple[int, int]:
  """(Q_N, Q_P) of LSQ: (2^(b-1), 2^(b-1) - 1) signed, (0, 2^b - 1) unsigned."""
  bits = grid.validate_bits(bits)
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
  step = jnp.asarray(grid.as_param(step, "step"))
  if offset is None:
    return -qn * step, qp * step
  offset = jnp.asarray(grid.as_param(offset, "offset"))
  return offset - qn * step, offset + qp * step


def _lsq_scaled(x, step, offset):
  cdt = grid.compute_dtype(jnp.promote_types(x.dtype, step.dtype))
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
  ds = grid.sum_to_shape(gs * factor * grad_scale, step.shape)
  # LSQ+: x_hat = beta + s * code, so d x_hat / d beta = 1 where clipped, 0 inside (STE).
  doff = grid.sum_to_shape(jnp.where(below | above, gs, 0.0) * grad_scale, offset.shape)
  return (dx, ds.astype(step.dtype), doff.astype(offset.dtype), jnp.zeros_like(qn),
          jnp.zeros_like(qp), jnp.zeros_like(numel))


_lsq.defvjp(_lsq_fwd, _lsq_bwd)


@functools.partial(jax.jit, static_argnums=(6,))
def _lsq_entry(x, step, offset, qn, qp, numel, check):
  cdt = grid.compute_dtype(jnp.promote_types(x.dtype, step.dtype))
  out = _lsq(x, step, offset, jnp.asarray(qn, cdt), jnp.asarray(qp, cdt),
             jnp.asarray(numel, cdt))
  return out, (grid.nonfinite_flags(x, step, offset) + (jnp.min(step),) if check else None)


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
  bits = grid.validate_bits(bits)
  x = grid.as_float(x)
  step = grid.as_param(step, "step")
  if not (hasattr(step, "dtype") and jnp.issubdtype(step.dtype, jnp.floating)):
    step = jnp.asarray(step, grid.compute_dtype(x.dtype))
  if offset is None:
    offset = jnp.zeros((), grid.compute_dtype(x.dtype))
  else:
    offset = grid.as_param(offset, "offset")
    if not (hasattr(offset, "dtype") and jnp.issubdtype(offset.dtype, jnp.floating)):
      offset = jnp.asarray(offset, step.dtype)
  grid.check_broadcast(x.shape, step=step.shape, offset=offset.shape)
  if x.size == 0:
    return jnp.asarray(x)
  if numel is None:
    numel = x.size
  elif not grid.is_traced(numel) and not float(numel) >= 1:
    raise ValueError(f"numel={numel!r}; valid: >= 1 (the element count of the gradient scale)")
  qn, qp = lsq_bounds(bits, signed)
  check = grid.all_concrete(x, step, offset)
  out, bad = _lsq_entry(x, step, offset, float(qn), float(qp), numel, check)
  if check:
    grid.raise_nonfinite(bad[:3], ("x", "step", "offset"))
    if step.size and not grid.is_traced(bad[3]) and not float(bad[3]) > 0:
      raise ValueError(f"step must be > 0 (valid range (0, inf)); got min {float(bad[3])}")
  return out


@functools.partial(jax.jit, static_argnums=(2, 3))
def _lsq_init_entry(x, qp, axis, check):
  cdt = grid.compute_dtype(x.dtype)
  xs = jnp.abs(jax.lax.stop_gradient(x).astype(cdt))
  m = jnp.mean(xs, axis=grid.reduce_axes(x.ndim, axis), keepdims=axis is not None)
  s = jnp.maximum(2.0 * m * jax.lax.rsqrt(jnp.asarray(qp, cdt)), LSQ_MIN_STEP).astype(cdt)
  return s, (grid.nonfinite_flags(x) if check else None)


def lsq_init_step(x: ArrayLike, bits: int, signed: bool = True,
                  channel_axis: Optional[int] = None) -> Array:
  """LSQ's step initialisation s0 = 2 mean|x| / sqrt(Q_P).

  Returns a float32 (float64 for f64 x) array: 0-d per tensor, or keepdims
  shape (size 1 except on ``channel_axis``) per channel. Floored at
  LSQ_MIN_STEP = 1e-8 so an all-zero x still gets a positive step; an empty x
  gives 1.0. No gradient flows to x (stop_gradient).
  Raises ValueError for bad bits/channel_axis and (eager) NaN/Inf.
  """
  bits = grid.validate_bits(bits)
  x = grid.as_float(x)
  axis = grid.validate_channel_axis(channel_axis, x.ndim)
  _, qp = lsq_bounds(bits, signed)
  if x.size == 0:
    return jnp.ones(grid.stats_shape(x.shape, axis), grid.compute_dtype(x.dtype))
  check = grid.all_concrete(x)
  s, bad = _lsq_init_entry(x, float(qp), axis, check)
  if check:
    grid.raise_nonfinite(bad, ("x",))
  return s


@functools.partial(jax.jit, static_argnums=(2,))
def _lsq_plus_init_entry(x, qp, check):
  cdt = grid.compute_dtype(x.dtype)
  xs = jax.lax.stop_gradient(x).astype(cdt).reshape(-1)
  beta, mx = jnp.min(xs), jnp.max(xs)
  span = jnp.maximum(mx - beta, LSQ_MIN_STEP * qp)
  steps = jnp.asarray(LSQ_PLUS_FRACTIONS, cdt) * span / qp

  def mse(s):
    q = jnp.round(jnp.clip((xs - beta) / s, 0.0, qp)) * s + beta
    return jnp.mean(jnp.square(q - xs))

  errs = jax.lax.map(mse, steps)
  s = jnp.maximum(steps[jnp.argmin(errs)], LSQ_MIN_STEP)
  return s, beta, (grid.nonfinite_flags(x) if check else None)


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
  bits = grid.validate_bits(bits)
  x = grid.as_float(x)
  _, qp = lsq_bounds(bits, False)
  cdt = grid.compute_dtype(x.dtype)
  if x.size == 0:
    return jnp.ones((), cdt), jnp.zeros((), cdt)
  check = grid.all_concrete(x)
  s, beta, bad = _lsq_plus_init_entry(x, float(qp), check)
  if check:
    grid.raise_nonfinite(bad, ("x",))
  return s, beta


class LSQ(Quantizer):
  name = "lsq"
  learnable = ("step", "offset")  # "offset" only on a grid="offset" operand (param_names)

  def param_names(self, spec: OperandSpec):
    return ("step", "offset") if spec.grid == "offset" else ("step",)

  def init_params(self, x, spec: OperandSpec):
    if spec.grid == "offset":
      s, beta = lsq_plus_init(x, spec.bits)
      return {"step": s.astype(jnp.float32), "offset": beta.astype(jnp.float32)}
    signed = spec.grid == "signed"
    return {"step": lsq_init_step(x, spec.bits, signed).astype(jnp.float32)}

  def quantize(self, x, spec: OperandSpec, state):
    return lsq_quantize(x, state["step"], spec.bits, signed=spec.grid == "signed",
                        offset=state.get("offset"), numel=state.get("numel"))

  def integer(self, x, spec: OperandSpec, state):
    lo, hi = lsq_range(state["step"], spec.bits, signed=spec.grid == "signed",
                       offset=state.get("offset"))
    return integer.quantize_int(x, spec.bits, lo, hi, symmetric=False)
