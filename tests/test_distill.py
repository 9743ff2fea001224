import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qgnn_jax import distill


def _feats(key, shapes):
  keys = jax.random.split(key, len(shapes))
  return [jax.random.normal(k, s) for k, s in zip(keys, shapes)]


SHAPES = [(3, 16, 8), (3, 4, 12)]


def test_aqd_zero_iff_equal():
  t = _feats(jax.random.key(0), SHAPES)
  assert float(distill.aqd_loss(t, t)) == 0.0
  s = [x + 0.1 * jax.random.normal(jax.random.key(1), x.shape) for x in t]
  assert float(distill.aqd_loss(s, t)) > 0.0


def test_channel_attention_rows_sum_to_one_and_favour_energy():
  t = jax.random.normal(jax.random.key(0), (4, 500, 6)) * jnp.arange(1, 7)
  a = distill.channel_attention(t, tau=1.0)
  np.testing.assert_allclose(a.sum(-1), 1.0, rtol=1e-6)
  assert np.all(np.argmax(np.asarray(a), -1) == 5)  # the highest-energy channel
  flat = distill.channel_attention(t, tau=100.0)
  assert float(flat.max()) < float(a.max())  # larger tau -> flatter


def test_aqd_matches_definition():
  s, t = _feats(jax.random.key(2), SHAPES), _feats(jax.random.key(3), SHAPES)
  tau, eps = 0.7, 1e-6
  want = []
  for si, ti in zip(map(np.asarray, s), map(np.asarray, t)):
    e = (ti ** 2).mean(1)
    z = e / (tau * e.mean(-1, keepdims=True))
    a = np.exp(z - z.max(-1, keepdims=True)); a /= a.sum(-1, keepdims=True)
    err = ((si - ti) ** 2).mean(1)
    want.append(((a * err).sum(-1) / ((ti ** 2).mean((1, 2)) + eps)).mean())
  np.testing.assert_allclose(distill.aqd_loss(s, t, tau, eps), np.mean(want), rtol=1e-5)


def test_no_gradient_to_teacher():
  s, t = _feats(jax.random.key(4), SHAPES), _feats(jax.random.key(5), SHAPES)
  g_t = jax.grad(lambda t: distill.aqd_loss(s, t))(t)
  assert all(float(jnp.abs(g).max()) == 0.0 for g in g_t)
  g_s = jax.grad(lambda s: distill.aqd_loss(s, t))(s)
  assert all(float(jnp.abs(g).max()) > 0.0 for g in g_s)
  zs, zt = jax.random.normal(jax.random.key(6), (2, 5, 7))
  assert float(jnp.abs(jax.grad(lambda z: distill.sqd_loss(zs, z, 2.0))(zt)).max()) == 0.0


def test_sqd_zero_for_equal_logits_and_kl_direction():
  z = jax.random.normal(jax.random.key(7), (4, 5))
  assert abs(float(distill.sqd_loss(z, z, 3.0))) < 1e-6
  zs, zt = jax.random.normal(jax.random.key(8), (2, 4, 5))
  temp = 2.0
  pt = jax.nn.softmax(zt / temp); ps = jax.nn.softmax(zs / temp)
  forward_kl = temp ** 2 * jnp.mean(jnp.sum(pt * (jnp.log(pt) - jnp.log(ps)), -1))  # KL(t || s)
  reverse_kl = temp ** 2 * jnp.mean(jnp.sum(ps * (jnp.log(ps) - jnp.log(pt)), -1))
  got = distill.sqd_loss(zs, zt, temp)
  np.testing.assert_allclose(got, forward_kl, rtol=1e-5)
  assert abs(float(got - reverse_kl)) > 1e-4
  assert float(got) > 0


@pytest.mark.parametrize("bad", [0.0, -1.0])
def test_bad_temperatures_raise(bad):
  z = jnp.zeros((2, 3))
  with pytest.raises(ValueError, match="temperature"):
    distill.sqd_loss(z, z, bad)
  with pytest.raises(ValueError, match="tau"):
    distill.aqd_loss([z[None]], [z[None]], bad)


def test_mismatched_inputs_raise():
  with pytest.raises(ValueError):
    distill.aqd_loss([jnp.zeros((1, 2, 3))], [jnp.zeros((1, 2, 4))])
  with pytest.raises(ValueError):
    distill.aqd_loss([], [])
  with pytest.raises(ValueError):
    distill.sqd_loss(jnp.zeros((2, 3)), jnp.zeros((2, 4)))
