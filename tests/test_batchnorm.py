"""qgnn_jax.models.batchnorm: flax's BatchNorm numbers, the fused GELU backward, the variance."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qgnn_jax.models import batchnorm
from qgnn_jax.models.batchnorm import BatchNorm


def _x(seed, shape, offset=0.0, dtype=jnp.float32):
  return (jax.random.normal(jax.random.key(seed), shape) * 1.7 + offset).astype(dtype)


def _run(module, variables, x, w):
  """Loss, grads w.r.t. (params, x) and the updated batch_stats of one training call."""
  def loss(params, x):
    y, upd = module.apply({**variables, "params": params}, x, mutable=["batch_stats"])
    return jnp.sum(w * y.astype(jnp.float32)), (y, upd)
  (l, (y, upd)), g = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
      variables["params"], x)
  return y, g, upd


@pytest.mark.parametrize("act", [None, "gelu"])
def test_fast_variance_equals_flax_batchnorm(act):
  """fast_variance=True, unfused: flax nn.BatchNorm (+ GELU) with the same variables: values
  and statistics bit for bit, gradients to rounding (autodiff sums the two moments'
  contributions to x in another order)."""
  x, w = _x(0, (4, 3, 5, 6), 0.3), _x(1, (4, 3, 5, 6))
  ours = BatchNorm(act=act, fast_variance=True, fused_backward=False)
  v = {"params": {"scale": _x(2, (6,)) + 1, "bias": _x(3, (6,))},
       "batch_stats": {"mean": _x(4, (6,)), "var": jnp.exp(_x(5, (6,)))}}
  assert jax.tree.structure(ours.init(jax.random.key(0), x)) == jax.tree.structure(v)
  act_fn = batchnorm.gelu if act else (lambda y: y)
  y1, g1, u1 = _run(ours, v, x, w)

  class Ref(nn.Module):
    @nn.compact
    def __call__(self, x):
      return act_fn(nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5,
                                 name="bn")(x))
  vr = {"params": {"bn": v["params"]}, "batch_stats": {"bn": v["batch_stats"]}}
  y2, g2, u2 = _run(Ref(), vr, x, w)
  np.testing.assert_array_equal(y1, y2)
  np.testing.assert_allclose(g1[1], g2[1], rtol=1e-6, atol=1e-6)
  for k in ("scale", "bias"):
    np.testing.assert_allclose(g1[0][k], g2[0]["bn"][k], rtol=1e-6, atol=1e-6)
  for k in ("mean", "var"):
    np.testing.assert_array_equal(u1["batch_stats"][k], u2["batch_stats"]["bn"][k])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_fused_gelu_backward_equals_autodiff(dtype):
  """The hand-written VJP of BN + GELU: same values, gradients (x, scale, bias, through the
  batch moments) equal to autodiff of the unfused layer up to float rounding."""
  x, w = _x(6, (8, 4, 4, 5), 0.5, dtype), _x(7, (8, 4, 4, 5))
  fused = BatchNorm(act="gelu", dtype=dtype)
  plain = BatchNorm(act="gelu", dtype=dtype, fused_backward=False)
  v = fused.init(jax.random.key(0), x)
  v = {**v, "params": {"scale": _x(8, (5,)) + 1, "bias": _x(9, (5,))}}
  y1, g1, u1 = jax.jit(functools.partial(_run, fused))(v, x, w)
  y2, g2, u2 = jax.jit(functools.partial(_run, plain))(v, x, w)
  assert y1.dtype == dtype and g1[1].dtype == dtype
  np.testing.assert_array_equal(y1, y2)
  jax.tree.map(np.testing.assert_array_equal, u1, u2)
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol * np.abs(b).max())


def test_fused_backward_under_pmap_equals_one_device():
  """Batch moments pmean-ed over 2 devices: the fused layer's gradients equal one device's
  on the whole batch (the moments' gradient crosses devices by autodiff of the pmean)."""
  assert jax.local_device_count() >= 2
  x, w = _x(10, (8, 3, 3, 4), 1.0), _x(11, (8, 3, 3, 4))
  one = BatchNorm(act="gelu")
  two = BatchNorm(act="gelu", axis_name="d")
  v = one.init(jax.random.key(0), x)
  _, g1, u1 = _run(one, v, x, w)

  def shard(a):
    return a.reshape(2, a.shape[0] // 2, *a.shape[1:])
  rep = jax.tree.map(lambda a: jnp.stack([a, a]), v)
  _, g2, u2 = jax.pmap(functools.partial(_run, two), axis_name="d")(rep, shard(x), shard(w))
  np.testing.assert_allclose(g2[1].reshape(x.shape), g1[1], rtol=1e-5, atol=1e-6)
  for k in ("scale", "bias"):  # per-device partial sums: add them up
    np.testing.assert_allclose(g2[0][k].sum(0), g1[0][k], rtol=1e-5, atol=1e-5)
  for k in ("mean", "var"):
    np.testing.assert_allclose(u2["batch_stats"][k][0], u1["batch_stats"][k], rtol=1e-6)


def test_two_pass_variance_keeps_precision_when_the_mean_is_large():
  """|mean| >> std: E[x^2]-E[x]^2 loses the variance to cancellation, two-pass does not."""
  x = _x(12, (4096, 3), 3000.0) * 1e-2 + 3000.0  # mean ~3000, std ~0.017
  want = np.var(np.asarray(x, np.float64), axis=0)
  _, fast = batchnorm.batch_moments(x, fast_variance=True)
  _, exact = batchnorm.batch_moments(x, fast_variance=False)
  assert np.max(np.abs(exact - want) / want) < 1e-3
  assert np.max(np.abs(fast - want) / want) > 0.1


def test_bad_activation_is_named():
  with pytest.raises(ValueError, match="relu"):
    BatchNorm(act="relu").init(jax.random.key(0), jnp.ones((2, 3)))


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-6), (jnp.bfloat16, 1e-2)])
def test_gelu_is_the_exact_gelu(dtype, tol):
  """torch's erf formula equals jax.nn.gelu(approximate=False) (erfc form), values and slope,
  over [-10, 10] (where erf/erfc saturate) and not the tanh approximation (4.7e-4 off)."""
  x = jnp.linspace(-10.0, 10.0, 20001).astype(dtype)
  ref = jax.nn.gelu(x.astype(jnp.float32), approximate=False)
  y = batchnorm.gelu(x)
  assert y.dtype == dtype
  np.testing.assert_allclose(np.asarray(y, np.float32), ref, atol=tol, rtol=tol)
  slope = jax.vmap(jax.grad(lambda v: batchnorm.gelu(v.astype(dtype)).astype(jnp.float32)))(
      x.astype(jnp.float32))
  ref_slope = jax.vmap(jax.grad(lambda v: jax.nn.gelu(v, approximate=False)))(
      x.astype(jnp.float32))
  np.testing.assert_allclose(slope, ref_slope, atol=10 * tol, rtol=10 * tol)
  if dtype == jnp.float32:
    assert float(jnp.max(jnp.abs(y - jax.nn.gelu(x, approximate=True)))) > 1e-4
