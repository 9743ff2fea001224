"""`jax.lax.conv_general_dilated` with a matmul weight gradient for NHWC convs on XLA:CPU.

XLA:CPU computes a convolution's weight gradient as one convolution whose window is the
whole output image; for ViG-Ti's 224-px stem (3x3, stride 2, B=32) those kernels ran at
~5 GFLOP/s, 1.26 s of an 8.3 s train step. Here the weight gradient of a plain NHWC/HWIO
conv is computed tap by tap (measured alone: 436 -> 238 ms for the stem's 24->48 conv,
421 -> 131 ms for its 48->96; the real step 1.04x faster at 224 px, unchanged at 32),
dW[i, j] = sum_{b,h,w} x_pad[b, i + s*h, j + s*w, :]^T dy[b, h, w, :], one dot_general per
kernel tap (kh*kw of them, each contracting B*Ho*Wo). The forward and the input gradient
are XLA's own. Values are the same op; gradients equal autodiff's to float rounding
(tests/test_conv.py).

Only on the CPU backend and only for the plain case (explicit padding, no dilation, no
groups, float operands, no preferred_element_type); everything else is
`jax.lax.conv_general_dilated` itself. `weight_grad="xla"` switches the path off per call.

Models call it by attribute lookup at call time (`qgnn_jax.models.blocks.conv3x3`), and
`qgnn_jax.qat` intercepts it under the name `qgnn_jax.conv.conv_general_dilated` exactly as
it intercepts `jax.lax.conv_general_dilated`, so quantization rules see the same conv.
"""
from __future__ import annotations

import functools
from typing import Sequence, Tuple

import jax
import jax.numpy as jnp
from jax import lax

WEIGHT_GRADS = ("auto", "matmul", "xla")
_NHWC = ("NHWC", "HWIO", "NHWC")
# The ops themselves, bound at import: interception (qwix patches `jax.lax` attributes while
# a quantized model runs) must never reach inside this op.
_lax_conv = lax.conv_general_dilated
_lax_dot_general = lax.dot_general


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         batch_group_count=1, precision=None, preferred_element_type=None,
                         *, weight_grad: str = "auto"):
  """`jax.lax.conv_general_dilated` (same arguments and values); see the module docstring.

  weight_grad: "auto" (matmul weight gradient on the CPU backend where it applies),
  "matmul" (wherever it applies), "xla" (always XLA's own).
  """
  if weight_grad not in WEIGHT_GRADS:
    raise ValueError(f"weight_grad must be one of {WEIGHT_GRADS}, got {weight_grad!r}")
  use_matmul = (weight_grad == "matmul"
                or (weight_grad == "auto" and jax.default_backend() == "cpu"))
  if use_matmul and _plain_nhwc(lhs, rhs, padding, lhs_dilation, rhs_dilation,
                                dimension_numbers, feature_group_count, batch_group_count,
                                preferred_element_type):
    pads = tuple((int(lo), int(hi)) for lo, hi in padding)
    return _conv_nhwc(lhs, rhs, tuple(int(s) for s in window_strides), pads, precision)
  return _lax_conv(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                   dimension_numbers, feature_group_count, batch_group_count, precision,
                   preferred_element_type)


def _plain_nhwc(lhs, rhs, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                feature_group_count, batch_group_count, preferred_element_type) -> bool:
  if lhs.ndim != 4 or rhs.ndim != 4 or isinstance(padding, str):
    return False
  if any(d != 1 for d in (lhs_dilation or ())) or any(d != 1 for d in (rhs_dilation or ())):
    return False
  if feature_group_count != 1 or batch_group_count != 1 or preferred_element_type is not None:
    return False
  if not (jnp.issubdtype(lhs.dtype, jnp.floating) and jnp.issubdtype(rhs.dtype, jnp.floating)):
    return False
  if dimension_numbers is None:
    return False
  return (lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
          == lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv_nhwc(x, w, strides, padding, precision):
  return _lax_conv(x, w, strides, padding, dimension_numbers=_NHWC, precision=precision)


def _conv_nhwc_fwd(x, w, strides, padding, precision):
  return _conv_nhwc(x, w, strides, padding, precision), (x, w)


def _conv_nhwc_bwd(strides, padding, precision, res, g):
  x, w = res
  _, input_vjp = jax.vjp(lambda v: _lax_conv(v, w, strides, padding, dimension_numbers=_NHWC,
                                              precision=precision), x)
  (dx,) = input_vjp(g)
  return dx, weight_grad_by_taps(x, g, w.shape, strides, padding, precision).astype(w.dtype)


_conv_nhwc.defvjp(_conv_nhwc_fwd, _conv_nhwc_bwd)


def weight_grad_by_taps(x: jax.Array, g: jax.Array, kernel_shape: Sequence[int],
                        strides: Tuple[int, int], padding: Tuple[Tuple[int, int], ...],
                        precision=None) -> jax.Array:
  """Weight gradient of an NHWC/HWIO conv as one matmul per kernel tap.

  x: (B, H, W, Cin) the conv's input; g: (B, Ho, Wo, Cout) the output cotangent;
  kernel_shape (kh, kw, Cin, Cout); strides (sh, sw); padding ((top, bottom), (left, right)).
  Returns (kh, kw, Cin, Cout) in the promoted dtype of x and g.
  """
  kh, kw, cin, _ = kernel_shape
  (pt, pb), (pl, pr) = padding
  sh, sw = strides
  b, ho, wo, _ = g.shape
  xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  contract = (((0, 1, 2), (0, 1, 2)), ((), ()))  # over B, Ho, Wo -> (Cin, Cout)
  taps = [[_lax_dot_general(
      lax.slice(xp, (0, i, j, 0), (b, i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1, cin),
                (1, sh, sw, 1)), g, contract, precision=precision)
           for j in range(kw)] for i in range(kh)]
  return jnp.stack([jnp.stack(row) for row in taps])
