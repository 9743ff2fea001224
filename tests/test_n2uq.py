"""Tests of qgnn_jax.quant.n2uq: N2UQ forward, G-STE gradients against a numpy reference,
learnable thresholds, init, transformations, dtypes, integer form, validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qgnn_jax.quant import fake_quant
from qgnn_jax.quant.n2uq import N2UQ_MIN_WIDTH, n2uq_init, n2uq_int, n2uq_quantize


# ----------------------------------------------------------------------------
# numpy reference (float64, element by element, written from the paper's equations)
# ----------------------------------------------------------------------------

def _ref_geometry(p):
  a = np.maximum(np.asarray(p["widths"], np.float64), N2UQ_MIN_WIDTH)
  s = float(p["start"])
  d = s + np.concatenate([[0.0], np.cumsum(a)])          # d_0 .. d_N
  t = d[:-1] + a / 2                                       # T_1 .. T_N
  return a, d, t


def _ref_zero(bits, signed):
  return 2 ** (bits - 1) if signed else 0


def ref_codes(x, p):
  _, _, t = _ref_geometry(p)
  return np.array([int(np.sum(t <= xi)) for xi in np.ravel(x)]).reshape(np.shape(x))


def ref_grads(x, w, p, bits, signed):
  """Gradients of sum(w * x_hat) by the G-STE: derivative of step * E(x), with E the
  piecewise-linear function through (d_i, i); step gets the forward code."""
  a, d, _ = _ref_geometry(p)
  n, step, z = len(a), float(p["step"]), _ref_zero(bits, signed)
  q = ref_codes(x, p).ravel()
  dx = np.zeros(np.size(x))
  ds, da, dstep = 0.0, np.zeros(n), 0.0
  for e, (xi, gi) in enumerate(zip(np.ravel(x).astype(np.float64), np.ravel(w))):
    dstep += gi * (q[e] - z)
    for i in range(1, n + 1):                     # segment i: d_{i-1} <= x < d_i
      if d[i - 1] <= xi < d[i]:
        slope = step / a[i - 1]                   # dE/dx * step
        dx[e] = gi * slope
        ds += -gi * slope                         # dE/ds = -1/a_i
        for k in range(1, i):                     # earlier widths shift the segment
          da[k - 1] += -gi * slope
        da[i - 1] += -gi * step * (xi - d[i - 1]) / a[i - 1] ** 2
        break
  da = np.where(np.asarray(p["widths"]) > N2UQ_MIN_WIDTH, da, 0.0)
  return dx.reshape(np.shape(x)), {"start": ds, "widths": da, "step": dstep}


def ref_surrogate(x, start, widths, step, bits, signed):
  """step * (E(x) - z) in float64, for finite differences of the G-STE."""
  p = {"start": start, "widths": widths, "step": step}
  a, d, _ = _ref_geometry(p)
  out = []
  for xi in np.ravel(x):
    e = 0.0 if xi < d[0] else float(len(a))
    for i in range(1, len(a) + 1):
      if d[i - 1] <= xi < d[i]:
        e = (xi - d[i - 1]) / a[i - 1] + i - 1
    out.append(step * (e - _ref_zero(bits, signed)))
  return np.array(out)


def _params(start, widths, step):
  return {"start": jnp.asarray(start, jnp.float32),
          "widths": jnp.asarray(widths, jnp.float32),
          "step": jnp.asarray(step, jnp.float32)}


def _random_params(rng, bits, with_clamped=False):
  n = 2 ** bits - 1
  widths = rng.lognormal(-1.5, 0.6, n).astype(np.float32)
  if with_clamped:
    widths[n // 2] = -0.3                       # clamped to N2UQ_MIN_WIDTH: no gradient
  return _params(rng.normal(-0.5, 0.3), widths, rng.uniform(0.2, 1.5))


def _grads(x, p, w, bits, signed):
  f = lambda x, p: jnp.sum(jnp.asarray(w) * n2uq_quantize(x, p, bits, signed))
  return jax.grad(f, argnums=(0, 1))(jnp.asarray(x), p)


# ----------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------

# bits=2: d = (-0.5, 0, 1, 1.25), T = (-0.25, 0.5, 1.125); every value is dyadic
# (exact in float32), so equality at thresholds and segment ends is tested exactly.
P2 = dict(start=-0.5, widths=[0.5, 1.0, 0.25], step=0.75)
X2 = np.array([-2.0, -0.5, -0.3, -0.25, 0.0, 0.2, 0.5, 0.9, 1.0, 1.1, 1.125, 1.2, 1.25,
               3.0], np.float32)


@pytest.mark.parametrize("signed", [False, True])
def test_forward_hand_picked(signed):
  p = _params(**P2)
  out = np.asarray(n2uq_quantize(X2, p, 2, signed))
  want_q = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3])  # #thresholds <= x
  np.testing.assert_array_equal(ref_codes(X2, p), want_q)
  z = 2 if signed else 0
  np.testing.assert_array_equal(out, np.float32(0.75) * (want_q - z).astype(np.float32))


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("signed", [False, True])
def test_forward_on_uniform_levels_and_codes_count_thresholds(bits, signed):
  rng = np.random.default_rng(bits + 10 * signed)
  p = _random_params(rng, bits)
  _, d, t = _ref_geometry(p)
  x = rng.uniform(d[0] - 1.0, d[-1] + 1.0, (64, 5)).astype(np.float32)
  out = np.asarray(n2uq_quantize(x, p, bits, signed))
  assert out.shape == x.shape and out.dtype == np.float32
  step = np.float32(p["step"])
  # exactly on the uniform output grid step * k
  k = out / step
  np.testing.assert_array_equal(out, step * np.round(k).astype(np.float32))
  z = _ref_zero(bits, signed)
  assert np.round(k).min() >= -z and np.round(k).max() <= 2 ** bits - 1 - z
  # code = number of thresholds <= x (away from float32-rounding distance of a threshold)
  far = np.min(np.abs(x[..., None] - t), axis=-1) > 1e-5
  q = ref_codes(x, p)
  np.testing.assert_array_equal(out[far], step * (q[far] - z).astype(np.float32))
  assert far.mean() > 0.99
  # monotone in x
  xs = np.sort(x.ravel())
  assert np.all(np.diff(np.asarray(n2uq_quantize(xs, p, bits, signed))) >= 0)


def test_forward_any_rank():
  p = _params(**P2)
  for shape in [(), (3,), (2, 3, 4), (1, 2, 1, 3, 2)]:
    x = np.random.default_rng(0).uniform(-1, 2, shape).astype(np.float32)
    out = n2uq_quantize(x, p, 2)
    assert out.shape == shape
    np.testing.assert_array_equal(np.asarray(out),
                                  np.float32(0.75) * ref_codes(x, p).astype(np.float32))
  empty = n2uq_quantize(np.zeros((0, 3), np.float32), p, 2)
  assert empty.shape == (0, 3)


# ----------------------------------------------------------------------------
# G-STE gradients
# ----------------------------------------------------------------------------

def _assert_grads(x, p, bits, signed, seed):
  w = np.random.default_rng(seed).normal(size=np.shape(x)).astype(np.float32)
  gx, gp = _grads(x, p, w, bits, signed)
  rx, rp = ref_grads(x, w, p, bits, signed)
  assert gx.dtype == jnp.float32 and set(gp) == {"start", "widths", "step"}
  assert all(gp[k].dtype == jnp.float32 and gp[k].shape == p[k].shape for k in gp)
  np.testing.assert_allclose(np.asarray(gx), rx, rtol=1e-5, atol=1e-5)
  for k in rp:
    np.testing.assert_allclose(np.asarray(gp[k]), rp[k], rtol=1e-4, atol=1e-4, err_msg=k)
  return gx, gp, rx, rp


@pytest.mark.parametrize("signed", [False, True])
def test_gste_hand_picked(signed):
  p = _params(**P2)
  gx, gp, rx, rp = _assert_grads(X2, p, 2, signed, seed=1)
  # below d_0 and at/above d_N: no gradient for x; inside: step / a_i
  gx = np.asarray(gx)
  assert gx[0] == 0 and gx[12] == 0 and gx[13] == 0
  w = np.random.default_rng(1).normal(size=X2.shape).astype(np.float32)
  np.testing.assert_allclose(gx[1:4] / w[1:4], 0.75 / 0.5, rtol=1e-6)   # segment 1
  np.testing.assert_allclose(gx[4:8] / w[4:8], 0.75 / 1.0, rtol=1e-6)   # segment 2
  np.testing.assert_allclose(gx[10:12] / w[10:12], 0.75 / 0.25, rtol=1e-6)  # segment 3
  assert np.any(np.asarray(gp["widths"]) != 0) and float(gp["start"]) != 0


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("signed", [False, True])
def test_gste_random_matches_reference(bits, signed):
  rng = np.random.default_rng(100 + bits)
  p = _random_params(rng, bits, with_clamped=bits > 2)
  _, d, _ = _ref_geometry(p)
  x = rng.uniform(d[0] - 0.5, d[-1] + 0.5, (40,)).astype(np.float32)
  x[:3] = [d[0] - 3.0, d[-1] + 3.0, d[0]]        # below, above, first segment end
  _, gp, _, _ = _assert_grads(x, p, bits, signed, seed=bits)
  if bits > 2:
    assert float(gp["widths"][(2 ** bits - 1) // 2]) == 0.0   # clamped width


def test_gste_is_derivative_of_piecewise_linear_surrogate():
  """Finite differences of step * E(x) (numpy, float64) equal the JAX G-STE."""
  bits, signed = 3, False
  rng = np.random.default_rng(7)
  p = _random_params(rng, bits)
  _, d, _ = _ref_geometry(p)
  x = rng.uniform(d[0] - 0.3, d[-1] + 0.3, (30,))
  far = np.min(np.abs(x[:, None] - d), axis=-1) > 1e-3
  x = x[far].astype(np.float32)
  w = rng.normal(size=x.shape)
  gx, gp = _grads(x, p, w.astype(np.float32), bits, signed)
  s0, a0, st0 = float(p["start"]), np.asarray(p["widths"], np.float64), float(p["step"])
  x64 = x.astype(np.float64)
  f = lambda s, a: float(np.sum(w * ref_surrogate(x64, s, a, st0, bits, signed)))
  h = 1e-6
  np.testing.assert_allclose(float(gp["start"]), (f(s0 + h, a0) - f(s0 - h, a0)) / (2 * h),
                             rtol=1e-4, atol=1e-4)
  for k in range(len(a0)):
    e = np.zeros_like(a0)
    e[k] = h
    fd = (f(s0, a0 + e) - f(s0, a0 - e)) / (2 * h)
    np.testing.assert_allclose(float(gp["widths"][k]), fd, rtol=1e-4, atol=1e-4)
  for j in range(len(x)):
    e = np.zeros_like(x64)
    e[j] = h
    fd = float(np.sum(w * (ref_surrogate(x64 + e, s0, a0, st0, bits, signed)
                           - ref_surrogate(x64 - e, s0, a0, st0, bits, signed)))) / (2 * h)
    np.testing.assert_allclose(float(gx[j]), fd, rtol=1e-4, atol=1e-4)


def test_no_nan_or_inf_for_degenerate_params_and_extreme_x():
  p = _params(0.0, [0.0, -1.0, 1e-12], 0.0)
  x = np.array([-1e30, -1.0, 0.0, 1e-7, 1.0, 1e30], np.float32)
  out = n2uq_quantize(x, p, 2)
  gx, gp = _grads(x, p, np.ones_like(x), 2, False)
  for a in [out, gx, *gp.values()]:
    assert np.all(np.isfinite(np.asarray(a)))
  p = _params(0.0, [0.0, -1.0, 1e-12], 1.0)
  gx, gp = _grads(x, p, np.ones_like(x), 2, False)
  assert all(np.all(np.isfinite(np.asarray(a))) for a in [gx, *gp.values()])
  np.testing.assert_array_equal(np.asarray(gp["widths"]), 0.0)   # all clamped


# ----------------------------------------------------------------------------
# Learnable thresholds
# ----------------------------------------------------------------------------

def test_sgd_learns_thresholds():
  """A few SGD steps on MSE to a non-uniform quantizer's output move every parameter
  and lower the loss."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.exponential(1.0, 4096).astype(np.float32))
  true_t = np.array([0.1, 0.3, 0.6, 1.0, 1.6, 2.5, 4.0], np.float32)   # non-uniform
  y = 0.5 * jnp.sum(x[:, None] >= true_t, axis=-1).astype(jnp.float32)
  p0 = n2uq_init(x, 3)

  def loss(p):
    return jnp.mean(jnp.square(n2uq_quantize(x, p, 3) - y))

  @jax.jit
  def sgd(p):
    lval, g = jax.value_and_grad(loss)(p)
    return jax.tree.map(lambda a, b: a - 0.05 * b, p, g), lval

  p, l0 = p0, float(loss(p0))
  for _ in range(100):
    p, _ = sgd(p)
  l1 = float(loss(p))
  assert l1 < 0.5 * l0, (l0, l1)
  assert float(jnp.abs(p["start"] - p0["start"])) > 1e-3
  assert float(jnp.abs(p["step"] - p0["step"])) > 1e-3
  assert np.all(np.abs(np.asarray(p["widths"] - p0["widths"])) > 1e-4)
  assert all(p[k].dtype == jnp.float32 for k in p)
  # the learned thresholds moved towards the target's (the last two see few samples)
  thr = lambda p: np.asarray(_ref_geometry(p)[2])[:5]
  assert np.abs(thr(p) - true_t[:5]).mean() < 0.5 * np.abs(thr(p0) - true_t[:5]).mean()


# ----------------------------------------------------------------------------
# Init
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("signed", [False, True])
def test_init_is_uniform_round_to_nearest(bits, signed):
  rng = np.random.default_rng(bits)
  x = rng.normal(0.5, 1.0, (32, 16)).astype(np.float32)
  if not signed:
    x = np.maximum(x, 0)
  p = n2uq_init(x, bits, signed)
  n = 2 ** bits - 1
  assert set(p) == {"start", "widths", "step"}
  assert p["start"].shape == () and p["widths"].shape == (n,) and p["step"].shape == ()
  assert all(v.dtype == jnp.float32 for v in p.values())
  step = float(p["step"])
  np.testing.assert_allclose(np.asarray(p["widths"]), step, rtol=1e-6)
  mu, sd = x.mean(), x.std()
  if signed:
    a = min(np.abs(x).max(), abs(mu) + 3 * sd)
    np.testing.assert_allclose(step, 2 * a / n, rtol=1e-5)
    np.testing.assert_allclose(float(p["start"]), -(2 ** (bits - 1)) * step, rtol=1e-6)
    lo, hi = -(2 ** (bits - 1)) * step, (2 ** (bits - 1) - 1) * step
  else:
    np.testing.assert_allclose(step, min(x.max(), mu + 3 * sd) / n, rtol=1e-5)
    assert float(p["start"]) == 0.0
    lo, hi = 0.0, n * step
  # initial forward == uniform round-to-nearest on the same grid (away from ties)
  out = np.asarray(n2uq_quantize(x, p, bits, signed))
  ref = np.asarray(fake_quant(x, lo, hi, bits))
  frac = (np.clip(x, lo, hi) - lo) / step % 1.0
  away = np.abs(frac - 0.5) > 1e-3
  np.testing.assert_allclose(out[away], ref[away], atol=1e-5 * max(1, abs(hi)))


def test_init_degenerate_and_traced():
  for x in [np.zeros((5,), np.float32), np.zeros((0,), np.float32),
            -np.ones((4,), np.float32)]:
    p = n2uq_init(x, 3)
    assert all(np.all(np.isfinite(np.asarray(v))) for v in p.values())
    assert float(p["step"]) > 0 and np.all(np.asarray(p["widths"]) > N2UQ_MIN_WIDTH)
  x = np.random.default_rng(0).normal(size=(8,)).astype(np.float32)
  pj = jax.jit(lambda x: n2uq_init(x, 3, True))(x)
  pe = n2uq_init(x, 3, True)
  for k in pe:
    np.testing.assert_allclose(np.asarray(pj[k]), np.asarray(pe[k]), rtol=1e-6)
  # no gradient flows through the init
  g = jax.grad(lambda x: n2uq_init(x, 3)["step"])(x)
  np.testing.assert_array_equal(np.asarray(g), 0.0)


# ----------------------------------------------------------------------------
# Transformations, dtypes, integer form
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("signed", [False, True])
def test_jit_equals_eager_and_vmap(signed):
  rng = np.random.default_rng(3)
  p = _random_params(rng, 4)
  x = rng.uniform(-1.5, 2.5, (6, 7)).astype(np.float32)
  w = rng.normal(size=x.shape).astype(np.float32)
  eager = n2uq_quantize(x, p, 4, signed)
  jitted = jax.jit(lambda x, p: n2uq_quantize(x, p, 4, signed))(x, p)
  np.testing.assert_array_equal(np.asarray(eager), np.asarray(jitted))
  ge = _grads(x, p, w, 4, signed)
  f = lambda x, p: jnp.sum(w * n2uq_quantize(x, p, 4, signed))
  gj = jax.jit(jax.grad(f, argnums=(0, 1)))(x, p)
  for a, b in zip(jax.tree.leaves(ge), jax.tree.leaves(gj)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
  vm = jax.vmap(lambda r: n2uq_quantize(r, p, 4, signed))(x)
  np.testing.assert_array_equal(np.asarray(vm), np.asarray(eager))
  # vmap over parameter sets (e.g. one per channel)
  ps = jax.tree.map(lambda v: jnp.stack([v, v * 1.5]), p)
  vp = jax.vmap(lambda pp: n2uq_quantize(x, pp, 4, signed))(ps)
  scaled = jax.tree.map(lambda v: v * 1.5, p)
  np.testing.assert_array_equal(np.asarray(vp[1]), np.asarray(n2uq_quantize(x, scaled, 4,
                                                                            signed)))


def test_bfloat16_input():
  rng = np.random.default_rng(4)
  p = _random_params(rng, 3)
  x = jnp.asarray(rng.uniform(-1.5, 2.5, (5, 9)), jnp.bfloat16)
  out = n2uq_quantize(x, p, 3)
  assert out.dtype == jnp.bfloat16 and out.shape == x.shape
  ref = n2uq_quantize(x.astype(jnp.float32), p, 3).astype(jnp.bfloat16)
  np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(ref, np.float32))
  w = jnp.asarray(rng.normal(size=x.shape), jnp.bfloat16)
  gx, gp = jax.grad(lambda x, p: jnp.sum((w * n2uq_quantize(x, p, 3)).astype(jnp.float32)),
                    argnums=(0, 1))(x, p)
  assert gx.dtype == jnp.bfloat16 and all(v.dtype == jnp.float32 for v in gp.values())
  rx, rp = ref_grads(np.asarray(x, np.float32), np.asarray(w, np.float32), p, 3, False)
  np.testing.assert_allclose(np.asarray(gx, np.float32), rx, rtol=2e-2, atol=2e-2)
  for k in rp:
    np.testing.assert_allclose(np.asarray(gp[k]), rp[k], rtol=1e-3, atol=1e-3)
  # bf16 params are used in float32 and keep their own dtype in the gradient
  pb = jax.tree.map(lambda v: v.astype(jnp.bfloat16), p)
  g = jax.grad(lambda p: jnp.sum(n2uq_quantize(x, p, 3).astype(jnp.float32)))(pb)
  assert all(v.dtype == jnp.bfloat16 for v in g.values())


@pytest.mark.parametrize("bits", [2, 3, 8])
@pytest.mark.parametrize("signed", [False, True])
def test_int_round_trip(bits, signed):
  rng = np.random.default_rng(bits)
  p = _random_params(rng, bits)
  _, d, _ = _ref_geometry(p)
  x = rng.uniform(d[0] - 1, d[-1] + 1, (3, 50)).astype(np.float32)
  codes, scale, zp = n2uq_int(x, p, bits, signed)
  assert codes.dtype == jnp.int32 and codes.shape == x.shape
  assert scale.dtype == jnp.float32 and scale.shape == ()
  assert zp.dtype == jnp.int32 and int(zp) == (2 ** (bits - 1) if signed else 0)
  assert int(codes.min()) >= 0 and int(codes.max()) <= 2 ** bits - 1
  _, _, t = _ref_geometry(p)
  far = np.min(np.abs(x[..., None] - t), axis=-1) > 1e-5
  np.testing.assert_array_equal(np.asarray(codes)[far], ref_codes(x, p)[far])
  deq = np.asarray(scale) * (np.asarray(codes) - np.asarray(zp)).astype(np.float32)
  np.testing.assert_allclose(deq, np.asarray(n2uq_quantize(x, p, bits, signed)), rtol=0,
                             atol=1e-6 * float(scale) * 2 ** bits)
  cj = jax.jit(lambda x: n2uq_int(x, p, bits, signed))(x)
  np.testing.assert_array_equal(np.asarray(cj[0]), np.asarray(codes))


# ----------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [1, 9, 16, 0, -2, 2.0, True, "4", None])
def test_bad_bits(bits):
  p = _params(**P2)
  for fn in [lambda: n2uq_quantize(X2, p, bits), lambda: n2uq_int(X2, p, bits),
             lambda: n2uq_init(X2, bits)]:
    with pytest.raises(ValueError, match=r"\[2, 8\]"):
      fn()


def test_bad_params():
  p = _params(**P2)
  cases = [
      ({"start": p["start"], "widths": p["widths"]}, r"missing \['step'\]"),
      ({**p, "offset": p["step"]}, r"unexpected \['offset'\]"),
      ({**p, "widths": jnp.ones((4,))}, r"params\['widths'\] has shape \(4,\).*\(3,\)"),
      ({**p, "start": jnp.zeros((1,))}, r"params\['start'\] has shape \(1,\).*\(\)"),
      ({**p, "step": jnp.ones((3,))}, r"params\['step'\]"),
      ({**p, "widths": jnp.ones((3,), jnp.int32)}, r"floating dtype"),
      ([1, 2, 3], r"must be a dict"),
  ]
  for bad, msg in cases:
    with pytest.raises(ValueError, match=msg):
      n2uq_quantize(X2, bad, 2)
    with pytest.raises(ValueError, match=msg):
      n2uq_int(X2, bad, 2)
  # params for other bits
  with pytest.raises(ValueError, match=r"bits=3"):
    n2uq_quantize(X2, p, 3)


def test_nonfinite_raises_eagerly():
  p = _params(**P2)
  with pytest.raises(ValueError, match="x contains non-finite"):
    n2uq_quantize(np.array([0.0, np.nan], np.float32), p, 2)
  with pytest.raises(ValueError, match="widths"):
    n2uq_quantize(X2, {**p, "widths": jnp.array([0.5, np.inf, 0.1])}, 2)
  with pytest.raises(ValueError, match="non-finite"):
    n2uq_init(np.array([1.0, np.inf], np.float32), 2)
  with pytest.raises(ValueError, match="floating"):
    n2uq_quantize(np.arange(3), p, 2)
  # under jit nothing is checked; NaN propagates
  out = jax.jit(lambda x: n2uq_quantize(x, p, 2))(jnp.array([0.0, jnp.nan]))
  assert np.isnan(np.asarray(out)[1]) and np.asarray(out)[0] == 0.75
