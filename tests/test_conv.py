"""qgnn_jax.conv: lax's conv values, autodiff's gradients, the fallbacks, and interception."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qgnn_jax import conv


def _conv_and_grads(weight_grad, x, w, strides, padding, dtype=jnp.float32):
  def f(x, w):
    y = conv.conv_general_dilated(x.astype(dtype), w.astype(dtype), strides, padding,
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                  weight_grad=weight_grad)
    return jnp.sum(jnp.sin(y.astype(jnp.float32))), y
  (_, y), g = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(x, w)
  return y, g


@pytest.mark.parametrize("shape,cout,strides,padding", [
    ((2, 9, 9, 3), 5, (2, 2), ((1, 1), (1, 1))),   # odd size, stride 2 (the stem)
    ((2, 8, 6, 4), 3, (1, 1), ((1, 1), (1, 1))),   # stride 1, non-square
    ((1, 7, 7, 2), 4, (2, 1), ((0, 2), (1, 0))),   # asymmetric stride and padding
])
def test_matmul_weight_grad_equals_xla(shape, cout, strides, padding):
  k = jax.random.split(jax.random.key(0), 2)
  x = jax.random.normal(k[0], shape)
  w = jax.random.normal(k[1], (3, 3, shape[-1], cout)) * 0.3
  y_ref, (dx_ref, dw_ref) = _conv_and_grads("xla", x, w, strides, padding)
  y, (dx, dw) = _conv_and_grads("matmul", x, w, strides, padding)
  np.testing.assert_array_equal(y, y_ref)  # the forward is lax's op itself
  np.testing.assert_allclose(dx, dx_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dw, dw_ref, rtol=1e-5, atol=1e-5)
  assert dw.dtype == w.dtype and dx.dtype == x.dtype


def test_bfloat16_and_jit_under_pmap():
  x = jax.random.normal(jax.random.key(1), (1, 2, 8, 8, 3))
  w = jax.random.normal(jax.random.key(2), (3, 3, 3, 4)) * 0.3
  args = ((2, 2), ((1, 1), (1, 1)))
  grads = {}
  for wg in ("xla", "matmul"):
    f = jax.pmap(lambda x, w: _conv_and_grads(wg, x, w, *args, dtype=jnp.bfloat16)[1],
                 in_axes=(0, None))
    grads[wg] = f(x, w)
  for a, b in zip(grads["xla"], grads["matmul"]):
    assert a.dtype == b.dtype
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                               rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("kwargs", [
    dict(padding="SAME"), dict(rhs_dilation=(2, 2)), dict(feature_group_count=3),
    dict(preferred_element_type=jnp.float32),
    dict(dimension_numbers=("NCHW", "OIHW", "NCHW")),
])
def test_other_convs_are_lax_itself(kwargs, monkeypatch):
  """Where the matmul path does not apply the call is lax's, argument for argument."""
  seen = []
  monkeypatch.setattr(conv, "_conv_nhwc", lambda *a: seen.append(a))
  x = jnp.ones((1, 6, 6, 3))
  w = jnp.ones((3, 3, 1 if "feature_group_count" in kwargs else 3, 6))
  kw = dict(padding=((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
  kw.update(kwargs)
  if kw["dimension_numbers"][0] == "NCHW":
    x, w = jnp.ones((1, 3, 6, 6)), jnp.ones((6, 3, 3, 3))
  padding = kw.pop("padding")
  y = conv.conv_general_dilated(x, w, (1, 1), padding, weight_grad="matmul", **kw)
  ref = jax.lax.conv_general_dilated(x, w, (1, 1), padding, **kw)
  assert not seen
  np.testing.assert_array_equal(y, ref)


def test_integer_operands_fall_back():
  x = jnp.ones((1, 4, 4, 2), jnp.int8)
  w = jnp.ones((3, 3, 2, 2), jnp.int8)
  y = conv.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                preferred_element_type=jnp.int32, weight_grad="matmul")
  assert y.dtype == jnp.int32 and int(y[0, 1, 1, 0]) == 18


def test_bad_weight_grad_is_named():
  with pytest.raises(ValueError, match="weight_grad must be one of"):
    conv.conv_general_dilated(jnp.ones((1, 4, 4, 1)), jnp.ones((3, 3, 1, 1)), (1, 1),
                              ((1, 1), (1, 1)), weight_grad="fast")


def test_quantized_model_intercepts_the_models_conv():
  """A rule on the ViG stem's second conv quantizes it (its op is this module's, not lax's):
  the site exists, the output moves off FP, and fp mode is the plain model exactly."""
  from qgnn_jax import qat
  from qgnn_jax.models.blocks import Stem
  model = Stem((4, 8), (2, 1))
  rules = (qat.QuantRule(module_path="conv1", w_quantizer="minmax", a_quantizer="minmax",
                         w_bits=2, a_bits=2),)
  qm = qat.quantize_model(model, rules)
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  v = qm.init(jax.random.key(1), x)
  assert {k for k, s in v["quant_stats"].items() if "quant" in s} == {"conv1"}
  plain = model.apply({"params": v["params"], "batch_stats": v["batch_stats"]}, x)
  z_fp = qm.apply(v, x, mode="fp")
  z_q = qm.apply(v, x, mode="quant")
  np.testing.assert_array_equal(z_fp, plain)
  assert float(jnp.max(jnp.abs(z_q - plain))) > 1e-3
