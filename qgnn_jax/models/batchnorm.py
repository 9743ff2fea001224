"""BatchNorm over NHWC / (B, C) features, optionally fused with the GELU that follows it.

Variables are flax `nn.BatchNorm`'s (params `scale`, `bias`; batch_stats `mean`, `var`,
PyTorch's momentum 0.1 == 0.9 here, eps 1e-5), so checkpoints and the official ViG's
weights load unchanged, and the forward is the same arithmetic in the same order.

What differs is what training saves for the backward. With `act="gelu"` the normalisation
and the GELU are one function with a hand-written VJP (`normalize_gelu`) whose residuals
are its inputs only: x and the (C,) batch moments, scale and bias. The backward recomputes
the normalised value and GELU's derivative from them, where autodiff of BN + GELU keeps
several (B, ..., C) float32 intermediates alive from the forward to the backward. The
gradient of the batch moments w.r.t. x (and their pmean under pmap) is ordinary autodiff
around that function.

The variance is two-pass, E[(x - E[x])^2], by default (`fast_variance=False`); flax's
default E[x^2] - E[x]^2 loses precision when |mean| >> std. See docs/METHOD.md for the
measurement behind both defaults.
"""
from __future__ import annotations

import functools
from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_SQRT_HALF = float(np.sqrt(0.5))
_INV_SQRT_2PI = float(1.0 / np.sqrt(2.0 * np.pi))
ACTIVATIONS = (None, "gelu")


def gelu(x: jax.Array) -> jax.Array:
  """Exact GELU in torch.nn.GELU's formula, x/2 (1 + erf(x/sqrt 2)) (the official ViG's).

  jax.nn.gelu(approximate=False) computes the same function as x/2 erfc(-x/sqrt 2); XLA:CPU
  lowers erfc to several unfused kernels (2x the time of erf on 4.8M floats, and the ViG
  evaluates GELU on ~40 % of its activations). The two agree to 5e-7 (tests).
  """
  return 0.5 * x * (1.0 + lax.erf(x * jnp.asarray(_SQRT_HALF, x.dtype)))


def gelu_slope(z: jax.Array) -> jax.Array:
  """GELU'(z) = Phi(z) + z phi(z), Phi in the forward's erf form. z: any shape, float."""
  return 0.5 * (1.0 + lax.erf(z * _SQRT_HALF)) + z * (_INV_SQRT_2PI * jnp.exp(-0.5 * z * z))


def batch_moments(x: jax.Array, axis_name: Optional[str] = None,
                  fast_variance: bool = False) -> Tuple[jax.Array, jax.Array]:
  """Per-channel mean and (biased) variance over all axes but the last, in float32.

  x: (..., C) any float dtype -> mean, var: (C,) float32. Under pmap with `axis_name` the
  moments are averaged over the devices (the global batch's moments for equal shards).
  fast_variance: E[x^2] - E[x]^2 in one pass and one pmean (flax's default), else the
  two-pass E[(x - mean)^2]. Differentiable.
  """
  x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  axes = tuple(range(x.ndim - 1))
  pmean = (lambda v: v) if axis_name is None else functools.partial(lax.pmean,
                                                                     axis_name=axis_name)
  if fast_variance:
    mean, mean_sq = pmean(jnp.stack([x.mean(axes), jnp.square(x).mean(axes)]))
    return mean, jnp.maximum(0.0, mean_sq - jnp.square(mean))
  mean = pmean(x.mean(axes))
  return mean, pmean(jnp.square(x - mean).mean(axes))


def normalize(x, mean, var, scale, bias, epsilon: float) -> jax.Array:
  """(x - mean) * (rsqrt(var + eps) * scale) + bias, float32 (flax's order of operations).

  x: (..., C); mean, var, scale, bias: (C,). Returns (..., C) float32 (or wider).
  """
  mul = lax.rsqrt(var + epsilon) * scale
  return (x - mean) * mul + bias


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def normalize_gelu(x, mean, var, scale, bias, epsilon: float, out_dtype: Any):
  """gelu(normalize(x, ...)) cast to `out_dtype`, with a backward that saves only its inputs.

  Args: x (..., C) any float; mean, var, scale, bias (C,) float32; epsilon, out_dtype static.
  Returns (..., C) out_dtype. Differentiable w.r.t. x, mean, var, scale and bias; equal to
  autodiff of the unfused expression up to float rounding (tests/test_models.py).
  """
  return gelu(normalize(x, mean, var, scale, bias, epsilon)).astype(out_dtype)


def _normalize_gelu_fwd(x, mean, var, scale, bias, epsilon, out_dtype):
  y = normalize_gelu(x, mean, var, scale, bias, epsilon, out_dtype)
  return y, (x, mean, var, scale, bias)


def _normalize_gelu_bwd(epsilon, out_dtype, res, g):
  del out_dtype
  x, mean, var, scale, bias = res
  axes = tuple(range(x.ndim - 1))
  r = lax.rsqrt(var + epsilon)
  mul = r * scale
  xc = x - mean
  z = xc * mul + bias
  dz = g.astype(z.dtype) * gelu_slope(z)
  d_bias = jnp.sum(dz, axes)
  dz_xc = jnp.sum(dz * xc, axes)
  d_scale = dz_xc * r
  d_x = (dz * mul).astype(x.dtype)
  d_mean = -mul * d_bias
  d_var = -0.5 * scale * r * r * r * dz_xc
  return d_x, d_mean.astype(mean.dtype), d_var.astype(var.dtype), d_scale, d_bias


normalize_gelu.defvjp(_normalize_gelu_fwd, _normalize_gelu_bwd)


class BatchNorm(nn.Module):
  """BatchNorm over the last axis, then `act` (None or "gelu"). x: (..., C) -> (..., C) dtype.

  use_running_average: evaluation (running statistics) instead of batch moments.
  fused_backward: with act="gelu", `normalize_gelu`'s hand-written VJP (False: autodiff of
    the same expression; kept for A/B tests and checks).
  """
  use_running_average: bool = False
  momentum: float = 0.9
  epsilon: float = 1e-5
  axis_name: Optional[str] = None
  dtype: Any = jnp.float32
  act: Optional[str] = None
  fast_variance: bool = False
  fused_backward: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.act not in ACTIVATIONS:
      raise ValueError(f"act must be one of {ACTIVATIONS}, got {self.act!r}")
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (c,), jnp.float32)
    ra_var = self.variable("batch_stats", "var", jnp.ones, (c,), jnp.float32)
    if self.use_running_average:
      mean, var = ra_mean.value, ra_var.value
    else:
      axis_name = None if self.is_initializing() else self.axis_name
      mean, var = batch_moments(x, axis_name, self.fast_variance)
      if not self.is_initializing():
        m = self.momentum
        ra_mean.value = m * ra_mean.value + (1.0 - m) * mean
        ra_var.value = m * ra_var.value + (1.0 - m) * var
    if self.act == "gelu" and self.fused_backward and not self.use_running_average:
      return normalize_gelu(x, mean, var, scale, bias, self.epsilon, self.dtype)
    y = normalize(x, mean, var, scale, bias, self.epsilon)
    if self.act == "gelu":
      return gelu(y).astype(self.dtype)
    return y.astype(self.dtype)
