"""Tests of qgnn_jax.quant (docs/METHOD.md, "Definitions"): grids, STE/LSQ gradients, PQ ranges,
transformations, dtypes, validation, degenerate input, integer form."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.experimental import checkify

from qgnn_jax import quant as q
from qgnn_jax.quant import grid

FAST = settings(max_examples=10, deadline=None, derandomize=True)
# Most tests use a few shapes (compilations are cached across tests).
SHAPES = [(), (7,), (16, 4), (3, 1, 5)]


def _ulp_tol(*arrays):
  m = max(float(np.max(np.abs(np.asarray(a, np.float32)))) if np.size(a) else 0.0
          for a in arrays)
  return 8 * np.finfo(np.float32).eps * max(m, 1.0)


@st.composite
def cases(draw, min_rank=0):
  shape = draw(st.sampled_from([sh for sh in SHAPES if len(sh) >= min_rank]))
  bits = draw(st.integers(2, 16))
  seed = draw(st.integers(0, 2 ** 16))
  axis = None
  if shape and draw(st.booleans()):
    axis = draw(st.integers(-len(shape), len(shape) - 1))
  rng = np.random.default_rng(seed)
  x = (rng.standard_normal(shape) * rng.uniform(0.1, 10)).astype(np.float32)
  if x.size > 2:
    x.reshape(-1)[0] *= 6  # an outlier so that PQ clips something
  return x, bits, axis


# ----------------------------------------------------------------------------
# Grid properties
# ----------------------------------------------------------------------------

@FAST
@given(cases(), st.sampled_from(["pauta", "minmax"]))
def test_asymmetric_outputs_on_grid_idempotent_error_bound(case, kind):
  x, bits, axis = case
  rng_fn = q.pauta_range if kind == "pauta" else q.minmax_range
  lo, hi = rng_fn(x, channel_axis=axis)
  xh = np.asarray(q.fake_quant(x, lo, hi, bits))
  lo, hi = np.asarray(lo), np.asarray(hi)
  assert xh.shape == x.shape and xh.dtype == np.float32
  valid = np.broadcast_to(hi > lo, x.shape)
  s = np.broadcast_to((hi - lo) / (2 ** bits - 1), x.shape)
  lo_b, hi_b = np.broadcast_to(lo, x.shape), np.broadcast_to(hi, x.shape)
  codes = (xh[valid] - lo_b[valid]) / s[valid]
  # fp32 error of (x_hat - lo) / s grows with the code magnitude (16 bits: 65535).
  assert np.all(np.abs(codes - np.round(codes)) <= 1e-6 * 2 ** bits + 1e-3)
  assert np.all(np.round(codes) >= 0) and np.all(np.round(codes) <= 2 ** bits - 1)
  np.testing.assert_array_equal(xh[~valid], x[~valid])
  # idempotence
  np.testing.assert_array_equal(np.asarray(q.fake_quant(xh, lo, hi, bits)), xh)
  # error bound inside [lo, hi]
  inside = valid & (x >= lo_b) & (x <= hi_b)
  err = np.abs(xh - x)[inside]
  assert np.all(err <= s[inside] / 2 + _ulp_tol(x, lo, hi))
  # outside: clipped to the nearest end
  below, above = valid & (x < lo_b), valid & (x > hi_b)
  np.testing.assert_allclose(xh[below], lo_b[below], atol=_ulp_tol(lo), rtol=0)
  np.testing.assert_allclose(xh[above], hi_b[above], atol=_ulp_tol(hi), rtol=0)


@FAST
@given(cases(), st.sampled_from(["pauta", "minmax"]))
def test_symmetric_outputs_on_grid_idempotent_error_bound(case, kind):
  x, bits, axis = case
  rng_fn = q.pauta_range if kind == "pauta" else q.minmax_range
  lo, hi = rng_fn(x, channel_axis=axis, symmetric=True)
  np.testing.assert_array_equal(np.asarray(lo), -np.asarray(hi))
  xh = np.asarray(q.fake_quant(x, lo, hi, bits, symmetric=True))
  a = np.broadcast_to(np.asarray(hi), x.shape)
  qp = 2 ** (bits - 1) - 1
  valid = a > 0
  s = a / qp
  codes = xh[valid] / s[valid]
  assert np.all(np.abs(codes - np.round(codes)) <= 1e-6 * 2 ** bits + 1e-3)
  assert np.all(np.abs(np.round(codes)) <= qp)
  np.testing.assert_array_equal(
      np.asarray(q.fake_quant(xh, lo, hi, bits, symmetric=True)), xh)
  inside = valid & (np.abs(x) <= a)
  assert np.all(np.abs(xh - x)[inside] <= s[inside] / 2 + _ulp_tol(x, a))
  # zero is exact on the symmetric grid
  assert float(q.fake_quant(np.float32(0.0), -1.0, 1.0, bits, symmetric=True)) == 0.0


def test_fake_quant_known_values():
  x = jnp.array([-1.0, 0.0, 0.1, 0.2, 0.45, 0.8, 0.9, 1.0, 2.0])
  # 2 bits on [0, 1]: levels 0, 1/3, 2/3, 1
  out = q.fake_quant(x, 0.0, 1.0, 2)
  np.testing.assert_allclose(out, [0, 0, 0, 1 / 3, 1 / 3, 2 / 3, 1, 1, 1], atol=1e-7)
  # symmetric 3 bits on [-1, 1]: codes -3..3, s = 1/3
  out = q.fake_quant(x, -1.0, 1.0, 3, symmetric=True)
  np.testing.assert_allclose(out, [-1, 0, 0, 1 / 3, 1 / 3, 2 / 3, 1, 1, 1], atol=1e-7)


# ----------------------------------------------------------------------------
# Gradients
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("symmetric", [False, True])
def test_fake_quant_ste_gradient_exact(symmetric):
  x = jnp.array([-3.0, -1.0, -0.999, -0.3, 0.0, 0.42, 0.999, 1.0, 1.001, 5.0])
  lo, hi = jnp.float32(-1.0), jnp.float32(1.0)
  w = jnp.arange(x.size, dtype=jnp.float32)
  gx, glo, ghi = jax.grad(lambda x, lo, hi, w: jnp.sum(w * q.fake_quant(x, lo, hi, 4, symmetric)),
                          argnums=(0, 1, 2))(x, lo, hi, w)
  expect = ((x >= -1.0) & (x <= 1.0)).astype(jnp.float32)
  # exactly 1 (times the cotangent w) inside, ends included, and 0 outside
  np.testing.assert_array_equal(gx, w * expect)
  assert float(glo) == 0.0 and float(ghi) == 0.0
  gx = jax.jit(jax.grad(lambda x: jnp.sum(q.fake_quant(x, lo, hi, 4, symmetric))))(x)
  np.testing.assert_array_equal(gx, expect)


@pytest.mark.parametrize("symmetric", [False, True])
def test_fake_quant_range_gradient_is_the_clipped_region(symmetric):
  # range_grad: x_hat = lo below lo and hi above hi, so d lo / d hi sum the cotangent there.
  x = jnp.array([-3.0, -1.5, -0.3, 0.0, 0.42, 0.999, 1.001, 5.0])
  w = jnp.arange(1, x.size + 1, dtype=jnp.float32)
  lo, hi = jnp.float32(-1.0), jnp.float32(1.0)
  f = lambda x, lo, hi: jnp.sum(w * q.fake_quant(x, lo, hi, 3, symmetric, range_grad=True))
  gx, glo, ghi = jax.grad(f, argnums=(0, 1, 2))(x, lo, hi)
  below, above = np.asarray(x) < -1.0, np.asarray(x) > 1.0
  np.testing.assert_array_equal(gx, np.where(below | above, 0.0, w))  # x: unchanged STE
  if symmetric:  # a = max(|lo|, |hi|) = hi (tie): d a = sum above - sum below, all to hi
    assert float(glo) == 0.0 and float(ghi) == float(w[above].sum() - w[below].sum())
  else:
    assert float(glo) == float(w[below].sum()) and float(ghi) == float(w[above].sum())
  # per channel: summed to the range's shape; a degenerate channel gets nothing
  x2 = jnp.asarray(np.random.default_rng(0).standard_normal((32, 3)), jnp.float32) * 2
  lo2, hi2 = jnp.array([[-1.0, -0.5, 0.3]]), jnp.array([[1.0, 0.5, 0.3]])
  glo2, ghi2 = jax.grad(lambda lo, hi: jnp.sum(q.fake_quant(x2, lo, hi, 4, range_grad=True)),
                        argnums=(0, 1))(lo2, hi2)
  np.testing.assert_array_equal(glo2, [[np.sum(x2[:, 0] < -1), np.sum(x2[:, 1] < -0.5), 0]])
  np.testing.assert_array_equal(ghi2, [[np.sum(x2[:, 0] > 1), np.sum(x2[:, 1] > 0.5), 0]])
  # the forward is the same with and without
  np.testing.assert_array_equal(q.fake_quant(x, lo, hi, 3, symmetric, range_grad=True),
                                q.fake_quant(x, lo, hi, 3, symmetric))


def test_pauta_range_without_stop_grad_reaches_x_through_fake_quant():
  # The option is real: with range_grad the mu / sigma path carries a gradient to x.
  x = jnp.asarray(np.random.default_rng(1).standard_normal(256), jnp.float32)
  f = lambda x, sg, rg: jnp.sum(q.fake_quant(x, *q.pauta_range(x, 1.5, stop_grad=sg), 2,
                                             range_grad=rg) ** 2)
  g_stop = jax.grad(f)(x, True, True)
  g_off = jax.grad(f)(x, False, False)  # fake_quant gives lo/hi nothing: no difference
  g_on = jax.grad(f)(x, False, True)
  np.testing.assert_array_equal(g_stop, g_off)
  assert float(jnp.max(jnp.abs(g_on - g_stop))) > 1e-3


def test_fake_quant_gradient_per_channel_and_pauta():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((64, 3)).astype(np.float32)
  x[5, 1] = 40.0
  lo, hi = q.pauta_range(x, channel_axis=1)
  g = jax.grad(lambda x: jnp.sum(q.pauta_quantize(x, 4, channel_axis=1)))(jnp.asarray(x))
  np.testing.assert_array_equal(g, ((x >= lo) & (x <= hi)).astype(np.float32))
  assert float(g[5, 1]) == 0.0
  # minmax clips nothing: gradient 1 everywhere
  g = jax.grad(lambda x: jnp.sum(q.minmax_quantize(x, 4, channel_axis=1)))(jnp.asarray(x))
  np.testing.assert_array_equal(g, np.ones_like(x))


def _lsq_reference(x, s, g, bits, signed):
  """The LSQ paper's formulas (Esser et al. 2020, eqs. 1-5) in NumPy float64."""
  qn, qp = (2 ** (bits - 1), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)
  v = x / s
  xh = np.round(np.clip(v, -qn, qp)) * s
  inside = (v >= -qn) & (v <= qp)
  dx = g * inside
  factor = np.where(v < -qn, -qn, np.where(v > qp, qp, np.round(v) - v))
  ds = g * factor / np.sqrt(x.size * qp)
  return xh, dx, ds


def test_lsq_hand_computed_signed():
  x = jnp.array([-3.0, -0.4, 0.2, 0.7, 2.6])
  s = jnp.float32(0.5)
  # 3 bits signed: Q_N = 4, Q_P = 3; v = x/s = [-6, -0.8, 0.4, 1.4, 5.2]
  out = q.lsq_quantize(x, s, 3)
  np.testing.assert_allclose(out, [-2.0, -0.5, 0.0, 0.5, 1.5], atol=1e-7)
  gx, gs = jax.grad(lambda x, s: jnp.sum(q.lsq_quantize(x, s, 3)), argnums=(0, 1))(x, s)
  np.testing.assert_array_equal(gx, [0.0, 1.0, 1.0, 1.0, 0.0])
  # ds = (-Q_N + (-1 + 0.8) + (0 - 0.4) + (1 - 1.4) + Q_P) / sqrt(5 * Q_P) = -2 / sqrt(15)
  np.testing.assert_allclose(gs, -2.0 / np.sqrt(15.0), rtol=1e-6)
  assert gs.shape == () and gs.dtype == jnp.float32


def test_lsq_hand_computed_unsigned_weighted():
  x = jnp.array([-1.0, 0.26, 1.1, 9.0])
  s = jnp.float32(0.4)
  w = jnp.array([2.0, -1.0, 0.5, 3.0])
  # 2 bits unsigned: Q_N = 0, Q_P = 3; v = [-2.5, 0.65, 2.75, 22.5]
  out = q.lsq_quantize(x, s, 2, signed=False)
  np.testing.assert_allclose(out, [0.0, 0.4, 1.2, 1.2], atol=1e-7)
  gx, gs = jax.grad(lambda x, s: jnp.sum(w * q.lsq_quantize(x, s, 2, signed=False)),
                    argnums=(0, 1))(x, s)
  np.testing.assert_array_equal(gx, [0.0, -1.0, 0.5, 0.0])
  expect = (2.0 * 0 + -1.0 * (1 - 0.65) + 0.5 * (3 - 2.75) + 3.0 * 3) / np.sqrt(4 * 3)
  np.testing.assert_allclose(gs, expect, rtol=1e-5)


@pytest.mark.parametrize("bits,signed", [(2, True), (4, True), (3, False), (8, True)])
def test_lsq_per_channel_matches_paper_formulas(bits, signed):
  rng = np.random.default_rng(bits)
  x = rng.standard_normal((6, 3)) * 2
  s = np.array([[0.3, 0.05, 0.9]])
  g = rng.standard_normal((6, 3))
  xh, dx, ds = _lsq_reference(x, s, g, bits, signed)
  f = lambda x, s: jnp.sum(jnp.asarray(g, jnp.float32) * q.lsq_quantize(x, s, bits, signed))
  out = q.lsq_quantize(jnp.float32(x), jnp.float32(s), bits, signed)
  gx, gs = jax.grad(f, argnums=(0, 1))(jnp.float32(x), jnp.float32(s))
  np.testing.assert_allclose(out, xh, atol=1e-6)
  np.testing.assert_allclose(gx, dx, atol=1e-6)
  assert gs.shape == (1, 3)
  np.testing.assert_allclose(gs, ds.sum(axis=0, keepdims=True), rtol=1e-5, atol=1e-6)
  # a 1-d step (3,) broadcasts over the leading axis too
  gs1 = jax.grad(f, argnums=1)(jnp.float32(x), jnp.float32(s[0]))
  np.testing.assert_allclose(gs1, ds.sum(axis=0), rtol=1e-5, atol=1e-6)


def test_lsq_plus_offset_forward_and_gradients():
  # LSQ+: x_hat = beta + s round(clip((x - beta) / s, 0, Q_P)); 2 bits: Q_P = 3.
  x = jnp.array([-0.5, -0.1, 0.12, 0.4, 2.0])
  s, beta = jnp.float32(0.2), jnp.float32(-0.15)
  w = jnp.array([1.0, 2.0, -1.0, 0.5, 3.0])
  out = q.lsq_quantize(x, s, 2, signed=False, offset=beta)
  v = (np.asarray(x, np.float64) + 0.15) / 0.2  # [-1.75, 0.25, 1.35, 2.75, 10.75]
  np.testing.assert_allclose(out, -0.15 + 0.2 * np.round(np.clip(v, 0, 3)), atol=1e-6)
  gx, gs, gb = jax.grad(lambda x, s, b: jnp.sum(w * q.lsq_quantize(x, s, 2, False, offset=b)),
                        argnums=(0, 1, 2))(x, s, beta)
  clipped = (v < 0) | (v > 3)
  np.testing.assert_array_equal(gx, np.where(clipped, 0.0, w))
  factor = np.where(v < 0, 0.0, np.where(v > 3, 3.0, np.round(v) - v))
  scale = 1 / np.sqrt(5 * 3)
  np.testing.assert_allclose(gs, np.sum(np.asarray(w) * factor) * scale, rtol=1e-5)
  np.testing.assert_allclose(gb, np.sum(np.asarray(w) * clipped) * scale, rtol=1e-6)
  # lsq_range with the offset is the same grid (fake_quant / integer form)
  np.testing.assert_allclose(q.fake_quant(x, *q.lsq_range(s, 2, False, offset=beta), 2), out,
                             atol=1e-6)
  # offset None == offset 0 (plain LSQ), bit for bit
  np.testing.assert_array_equal(q.lsq_quantize(x, s, 3), q.lsq_quantize(x, s, 3, offset=0.0))


def test_lsq_gradient_scale_takes_numel():
  # numel: the global element count under pmap (the site passes x.size * devices).
  x = jnp.asarray(np.random.default_rng(2).standard_normal(12), jnp.float32)
  g = lambda n: jax.grad(lambda s: jnp.sum(q.lsq_quantize(x, s, 3, numel=n) ** 2))(
      jnp.float32(0.3))
  np.testing.assert_array_equal(g(None), g(12))
  np.testing.assert_allclose(g(48), g(12) / 2, rtol=1e-6)
  with pytest.raises(ValueError, match="numel"):
    q.lsq_quantize(x, 0.3, 3, numel=0)


def test_lsq_plus_init_minimises_mse_from_the_minimum():
  x = jax.nn.gelu(jnp.asarray(np.random.default_rng(3).standard_normal(20000), jnp.float32),
                  approximate=False)
  for bits in (2, 4):
    s, beta = q.lsq_plus_init(x, bits)
    assert s.dtype == beta.dtype == jnp.float32 and s.shape == beta.shape == ()
    assert float(beta) == float(jnp.min(x))
    mse = lambda s: float(jnp.mean((q.lsq_quantize(x, s, bits, False, offset=beta) - x) ** 2))
    # better than LSQ's own init on the same grid, and than its neighbours (a minimum)
    assert mse(s) < mse(q.lsq_init_step(x - beta, bits, signed=False))
    assert mse(s) <= min(mse(s * 1.1), mse(s / 1.1))
  s, beta = q.lsq_plus_init(jnp.zeros((0,)), 2)
  assert float(s) == 1.0 and float(beta) == 0.0


def test_bfloat16_compute_keeps_float32_steps_and_ranges():
  # Under bf16 compute the float32 step / range is what the forward rounds with (cast to
  # bf16 first, a step of 0.3 would be 0.30078 and small updates of it would be lost).
  xb = jnp.bfloat16(np.random.default_rng(4).standard_normal((256,)) * 3)
  xf = xb.astype(jnp.float32)
  from qgnn_jax.quant import lsq, pq  # pylint: disable=g-import-not-at-top
  spec = q.OperandSpec(4)
  s = jnp.float32(0.3)
  out = lsq.LSQ().quantize(xb, spec, {"step": s})
  assert out.dtype == jnp.bfloat16
  np.testing.assert_array_equal(out, q.lsq_quantize(xf, s, 4).astype(jnp.bfloat16))
  assert bool(jnp.any(out != q.lsq_quantize(xb, jnp.bfloat16(s), 4)))
  lo, hi = jnp.float32(-2.3), jnp.float32(2.3)
  out = pq.PQ().quantize(xb, spec, {"lo": lo, "hi": hi})
  assert out.dtype == jnp.bfloat16
  np.testing.assert_array_equal(out, q.fake_quant(xf, lo, hi, 4).astype(jnp.bfloat16))
  assert bool(jnp.any(out != q.fake_quant(xb, jnp.bfloat16(lo), jnp.bfloat16(hi), 4)))


def test_lsq_init_step_and_range():
  x = jnp.array([[1.0, -2.0], [3.0, 0.0]])
  np.testing.assert_allclose(q.lsq_init_step(x, 4), 2 * 1.5 / np.sqrt(7), rtol=1e-6)
  np.testing.assert_allclose(q.lsq_init_step(x, 3, signed=False), 2 * 1.5 / np.sqrt(7),
                             rtol=1e-6)
  per_ch = q.lsq_init_step(x, 2, channel_axis=1)
  np.testing.assert_allclose(per_ch, [[2 * 2.0, 2 * 1.0]], rtol=1e-6)
  z = q.lsq_init_step(jnp.zeros((4, 4)), 8)
  assert float(z) > 0
  np.testing.assert_array_equal(q.lsq_quantize(jnp.zeros((4, 4)), z, 8), 0.0)
  assert q.lsq_bounds(4) == (8, 7) and q.lsq_bounds(4, signed=False) == (0, 15)
  rng = np.random.default_rng(3)
  x = jnp.float32(rng.standard_normal(200))
  s = q.lsq_init_step(x, 4)
  np.testing.assert_allclose(q.fake_quant(x, *q.lsq_range(s, 4), 4), q.lsq_quantize(x, s, 4),
                             atol=1e-6)


def test_quantizers_with_concrete_args_inside_an_outer_jit_trace():
  """Closed-over concrete arrays inside jit give traced check flags: no crash, same values."""
  x = jnp.float32(np.random.default_rng(5).standard_normal((8, 3)))
  s = q.lsq_init_step(x, 4)
  calls = {
      "lsq": lambda: q.lsq_quantize(x, s, 4),
      "lsq_init": lambda: q.lsq_init_step(x, 4),
      "pauta": lambda: q.pauta_quantize(x, 4),
      "minmax": lambda: q.minmax_quantize(x, 4),
      "fake_quant": lambda: q.fake_quant(x, -1.0, 1.0, 3),
      "pack": lambda: q.unpack_bits(q.pack_bits(jnp.arange(-4, 4), 3), 3, 8, signed=True),
  }
  for name, f in calls.items():
    np.testing.assert_allclose(jax.jit(f)(), f(), rtol=1e-6, atol=1e-6, err_msg=name)
  # check_finite on a concrete x is an eager check even inside jit (no checkify needed).
  jax.jit(lambda: q.check_finite(x, "x") or x)()
  bad = x.at[0, 0].set(jnp.nan)
  with pytest.raises(ValueError, match="bad contains 1 non-finite"):
    jax.jit(lambda: q.check_finite(bad, "bad") or bad)()

# ----------------------------------------------------------------------------
# Pauta ranges
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("symmetric", [False, True])
def test_pauta_excludes_planted_outlier_minmax_includes_it(symmetric):
  rng = np.random.default_rng(1)
  x = rng.standard_normal(2000).astype(np.float32)
  x[123] = 50.0
  lo_p, hi_p = q.pauta_range(x, symmetric=symmetric)
  lo_m, hi_m = q.minmax_range(x, symmetric=symmetric)
  assert float(hi_p) < 10.0 < 50.0 == float(hi_m)
  mu, sd = x.astype(np.float64).mean(), x.astype(np.float64).std()
  if symmetric:
    np.testing.assert_allclose(hi_p, abs(mu) + 3 * sd, rtol=1e-5)
    assert float(lo_m) == -50.0
  else:
    np.testing.assert_allclose([lo_p, hi_p], [max(mu - 3 * sd, x.min()), mu + 3 * sd],
                               rtol=1e-5)
    assert float(lo_m) == x.min()
  xp = q.pauta_quantize(x, 4, symmetric=symmetric)
  xm = q.minmax_quantize(x, 4, symmetric=symmetric)
  assert float(xp[123]) == pytest.approx(float(hi_p), rel=1e-6)  # clipped
  assert float(xm[123]) == pytest.approx(50.0, rel=1e-6)
  inl = np.arange(x.size) != 123  # ...and PQ quantizes the inliers much better
  assert np.mean((xp - x)[inl] ** 2) < 0.2 * np.mean((xm - x)[inl] ** 2)
  # lam controls the width
  assert float(q.pauta_range(x, lam=2.0)[1]) < float(q.pauta_range(x, lam=4.0)[1])


@pytest.mark.parametrize("fn,symmetric,axis", [("pauta", False, 1), ("pauta", True, -1),
                                                ("minmax", False, 0)])
def test_per_channel_equals_per_tensor_channel_by_channel(fn, symmetric, axis):
  rng = np.random.default_rng(7)
  x = (rng.standard_normal((4, 5, 6)) * rng.uniform(0.1, 5, (1, 1, 6)) + 0.5).astype(np.float32)
  x[0, 0, :] = 30.0
  rfn = q.pauta_range if fn == "pauta" else q.minmax_range
  qfn = q.pauta_quantize if fn == "pauta" else q.minmax_quantize
  lo, hi = rfn(x, channel_axis=axis, symmetric=symmetric)
  expect_shape = [1, 1, 1]
  expect_shape[axis] = x.shape[axis]
  assert lo.shape == hi.shape == tuple(expect_shape)
  xq = np.asarray(qfn(x, 4, channel_axis=axis, symmetric=symmetric))
  lo, hi = np.asarray(lo), np.asarray(hi)
  for c in range(x.shape[axis]):
    xc = np.take(x, c, axis=axis)
    lo_c, hi_c = rfn(xc, symmetric=symmetric)
    assert lo_c.shape == ()
    np.testing.assert_allclose(np.take(lo, c, axis=axis).reshape(()), lo_c, rtol=1e-6)
    np.testing.assert_allclose(np.take(hi, c, axis=axis).reshape(()), hi_c, rtol=1e-6)
    s = (float(hi_c) - float(lo_c)) / 15
    np.testing.assert_allclose(np.take(xq, c, axis=axis), qfn(xc, 4, symmetric=symmetric),
                               atol=1e-5 * max(s, 1.0))


def test_pauta_stop_grad_option():
  x = jnp.array([0.0, 1.0, 2.0, 3.0, 100.0])
  f = lambda x, sg: jnp.sum(jnp.stack(q.pauta_range(x, lam=1.0, stop_grad=sg)))
  np.testing.assert_array_equal(jax.grad(f)(x, True), 0.0)
  g = jax.grad(f)(x, False)
  assert np.all(np.isfinite(g)) and np.any(g != 0)
  # finite even for a constant tensor (sigma == 0)
  g = jax.grad(f)(jnp.ones(5), False)
  assert np.all(np.isfinite(g))


# ----------------------------------------------------------------------------
# Transformations and dtypes
# ----------------------------------------------------------------------------

def _fns():
  return {
      "fake_quant": lambda x: q.fake_quant(x, -1.0, 1.5, 3),
      "pauta": lambda x: q.pauta_quantize(x, 4),
      "pauta_ch_sym": lambda x: q.pauta_quantize(x, 3, channel_axis=-1, symmetric=True),
      "minmax": lambda x: q.minmax_quantize(x, 2, channel_axis=0),
      "lsq": lambda x: q.lsq_quantize(x, jnp.float32(0.3), 4),
  }


def assert_within_ulp(actual, desired, ulps=4):
  """|actual - desired| <= ulps float32 ulps of the tensor's magnitude (max |desired|).

  XLA fuses lo + s*q into an FMA under jit (eager rounds twice) and may reorder
  the reductions of the range statistics, so bit-identity is not guaranteed;
  the difference is a few ulp at the scale of the tensor, never a grid step.
  """
  actual, desired = np.asarray(actual, np.float32), np.asarray(desired, np.float32)
  assert actual.shape == desired.shape
  scale = max(float(np.max(np.abs(desired))), np.finfo(np.float32).tiny)
  diff = float(np.max(np.abs(actual - desired)))
  assert diff <= ulps * np.spacing(np.float32(scale)), (diff, scale)


@pytest.mark.parametrize("name", list(_fns()))
def test_jit_vmap_pmap_identical(name):
  f = _fns()[name]
  rng = np.random.default_rng(11)
  xs = jnp.float32(rng.standard_normal((2, 16, 4)) * 1.3)
  eager = np.stack([np.asarray(f(x)) for x in xs])
  assert_within_ulp(np.stack([np.asarray(jax.jit(f)(x)) for x in xs]), eager)
  assert_within_ulp(np.asarray(jax.vmap(f)(xs)), eager)
  if name in ("fake_quant", "lsq"):  # gradients: eager per example vs jit(vmap(grad))
    gf = jax.grad(lambda x: jnp.sum(f(x) ** 2))
    g_eager = np.stack([np.asarray(gf(x)) for x in xs])
    assert_within_ulp(np.asarray(jax.jit(jax.vmap(gf))(xs)), g_eager)
  if jax.local_device_count() < 2:
    pytest.skip("needs 2 devices (XLA_FLAGS=--xla_force_host_platform_device_count=2)")
  assert_within_ulp(np.asarray(jax.pmap(f)(xs)), eager)


def test_pmap_lsq_step_gradient_and_integer_ops():
  if jax.local_device_count() < 2:
    pytest.skip("needs 2 devices")
  rng = np.random.default_rng(12)
  xs = jnp.float32(rng.standard_normal((2, 32)))
  steps = jnp.float32([0.2, 0.35])
  g = lambda x, s: jax.grad(lambda s: jnp.sum(q.lsq_quantize(x, s, 3) ** 2))(s)
  eager = np.stack([np.asarray(g(x, s)) for x, s in zip(xs, steps)])
  assert_within_ulp(np.asarray(jax.pmap(g)(xs, steps)), eager)
  codes = jnp.int32(rng.integers(0, 8, (2, 40)))
  packed = jax.pmap(lambda c: q.pack_bits(c, 3))(codes)
  assert packed.shape == (2, 15)
  np.testing.assert_array_equal(jax.pmap(lambda p: q.unpack_bits(p, 3, 40))(packed), codes)


@pytest.mark.parametrize("name", list(_fns()))
def test_bfloat16_in_bfloat16_out(name):
  f = _fns()[name]
  rng = np.random.default_rng(13)
  x32 = jnp.float32(rng.standard_normal((16, 4)))
  xb = x32.astype(jnp.bfloat16)
  out = f(xb)
  assert out.dtype == jnp.bfloat16
  g = jax.jit(jax.grad(lambda x: jnp.sum(f(x).astype(jnp.float32))))(xb)
  assert g.dtype == jnp.bfloat16
  # same result as the f32 path on the bf16-representable input, up to bf16 rounding
  np.testing.assert_allclose(np.float32(out), np.float32(f(xb.astype(jnp.float32))),
                             atol=2 ** -7 * 4, rtol=2 ** -7)
  assert np.all(np.isfinite(np.float32(out)))


def test_bfloat16_ranges_are_float32_and_other_ops():
  xb = jnp.bfloat16(np.random.default_rng(0).standard_normal((8, 3)))
  lo, hi = q.pauta_range(xb, channel_axis=1)
  assert lo.dtype == hi.dtype == jnp.float32
  assert q.minmax_range(xb)[0].dtype == jnp.float32
  assert q.lsq_init_step(xb, 4).dtype == jnp.float32
  assert q.fake_quant(xb, lo.astype(jnp.bfloat16), hi.astype(jnp.bfloat16), 4).dtype == \
      jnp.bfloat16
  assert q.lsq_quantize(xb, jnp.bfloat16(0.25), 4).dtype == jnp.bfloat16
  assert stochastic_round(xb, jax.random.PRNGKey(0)).dtype == jnp.bfloat16
  codes, scale, zp = q.quantize_int(xb, 4, lo, hi)
  assert codes.dtype == jnp.int32 and scale.dtype == jnp.float32


# ----------------------------------------------------------------------------
# Validation and errors
# ----------------------------------------------------------------------------

X = np.ones((3, 4), np.float32)


@pytest.mark.parametrize("bits", [1, 17, 0, -4, 4.0, True, "4", None, np.array(4)])
def test_bad_bits(bits):
  for call in (lambda: q.fake_quant(X, 0.0, 1.0, bits),
               lambda: q.pauta_quantize(X, bits),
               lambda: q.minmax_quantize(X, bits),
               lambda: q.lsq_quantize(X, 0.1, bits),
               lambda: q.lsq_init_step(X, bits),
               lambda: q.quantize_int(X, bits, 0.0, 1.0),
               lambda: q.pack_bits(np.zeros(4, np.int32), bits),
               lambda: q.unpack_bits(np.zeros(4, np.uint8), bits, 4)):
    with pytest.raises(ValueError, match=r"bits=.*\[2, 16\]"):
      call()


def test_check_bits_is_each_quantizers_range():
  assert q.check_bits("pq", 16) == 16 and q.check_bits("n2uq", np.int64(8)) == 8
  assert q.bit_range("n2uq") == (2, 8) and q.bit_range("lsq") == q.bit_range(None) == (2, 16)
  with pytest.raises(ValueError, match=r"a_bits=9 is out of range for n2uq; valid range is "
                                       r"\[2, 8\]"):
    q.check_bits("n2uq", 9, field="a_bits")
  with pytest.raises(ValueError, match=r"bits=17 is out of range; valid range is \[2, 16\]"):
    q.check_bits(None, 17)
  with pytest.raises(ValueError, match="unknown quantizer 'dorefa'"):
    q.check_bits("dorefa", 4)

  class Wide(q.Quantizer):
    name, max_bits = "wide", 20

  with pytest.raises(ValueError, match=r"bit range \[2, 20\]"):
    q.QUANTIZERS.register(Wide())


@pytest.mark.parametrize("lam", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_lam(lam):
  with pytest.raises(ValueError, match=r"lam=.*\(0, inf\)"):
    q.pauta_range(X, lam=lam)
  with pytest.raises(ValueError, match=r"lam="):
    q.pauta_quantize(X, 4, lam=lam)


@pytest.mark.parametrize("axis,ndim", [(2, 2), (-3, 2), (0, 0), (5, 3), (1.0, 2), (True, 2)])
def test_bad_channel_axis(axis, ndim):
  x = np.ones((2,) * ndim, np.float32)
  for call in (lambda: q.pauta_range(x, channel_axis=axis),
               lambda: q.pauta_quantize(x, 4, channel_axis=axis),
               lambda: q.minmax_range(x, channel_axis=axis),
               lambda: q.minmax_quantize(x, 4, channel_axis=axis),
               lambda: q.lsq_init_step(x, 4, channel_axis=axis)):
    with pytest.raises(ValueError, match=r"channel_axis=.*\[-?\d+, -?\d+\]"):
      call()


def test_negative_channel_axis_allowed():
  x = np.random.default_rng(0).standard_normal((3, 4, 5)).astype(np.float32)
  for a, b in ((-1, 2), (-3, 0)):
    np.testing.assert_array_equal(q.pauta_range(x, channel_axis=a)[1],
                                  q.pauta_range(x, channel_axis=b)[1])


@pytest.mark.parametrize("lo_shape,hi_shape", [((3,), (3,)), ((1, 4), (2, 1)),
                                                ((2, 1), ()), ((1, 1, 4), (1, 4))])
def test_mismatched_lo_hi_shapes(lo_shape, hi_shape):
  lo, hi = np.zeros(lo_shape, np.float32), np.ones(hi_shape, np.float32)
  with pytest.raises(ValueError, match=r"lo shape .* hi shape .* x shape \(3, 4\)"):
    q.fake_quant(X, lo, hi, 4)
  with pytest.raises(ValueError, match=r"not broadcast-compatible"):
    q.quantize_int(X, 4, lo, hi)
  with pytest.raises(ValueError, match=r"step shape"):
    q.lsq_quantize(X, np.ones(lo_shape, np.float32) if lo_shape != (1, 4) else
                   np.ones((1, 4, 1)), 4)


def test_other_bad_arguments():
  with pytest.raises(ValueError, match=r"step must be > 0"):
    q.lsq_quantize(X, 0.0, 4)
  with pytest.raises(ValueError, match=r"step must be > 0"):
    q.lsq_quantize(X, np.array([[0.1, -0.1, 0.1, 0.1]]), 4)
  with pytest.raises(ValueError, match=r"floating dtype"):
    q.fake_quant(np.arange(4), 0.0, 1.0, 4)
  with pytest.raises(ValueError, match=r"floating dtype"):
    q.pauta_range(np.arange(4))
  with pytest.raises(ValueError, match=r"do not fit in bits=3.*\[-4, 7\]"):
    q.pack_bits(np.array([0, 8]), 3)
  with pytest.raises(ValueError, match=r"integer dtype"):
    q.pack_bits(np.array([0.0, 1.0]), 3)
  with pytest.raises(ValueError, match=r"need 2"):
    q.unpack_bits(np.zeros(1, np.uint8), 3, 5)
  with pytest.raises(ValueError, match=r"uint8"):
    q.unpack_bits(np.zeros(4, np.int32), 4, 2)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_eager_raises(bad):
  x = np.ones((16, 4), np.float32)
  x[3, 1] = bad
  calls = [lambda: q.fake_quant(x, 0.0, 1.0, 4),
           lambda: q.pauta_range(x), lambda: q.pauta_quantize(x, 4),
           lambda: q.minmax_range(x), lambda: q.minmax_quantize(x, 4, channel_axis=0),
           lambda: q.lsq_quantize(x, jnp.float32(0.1), 4), lambda: q.lsq_init_step(x, 4),
           lambda: stochastic_round(x, jax.random.PRNGKey(0)),
           lambda: q.quantize_int(x, 4, 0.0, 1.0), lambda: q.check_finite(x, "acts"),
           lambda: q.fake_quant(np.ones(3, np.float32), 0.0, bad, 4),
           lambda: q.lsq_quantize(np.ones(3, np.float32), bad, 4)]
  for call in calls:
    with pytest.raises(ValueError, match=r"non-finite"):
      call()


def test_non_finite_under_jit_documented_behaviour_and_checkify():
  x = jnp.array([0.3, jnp.nan, jnp.inf, -jnp.inf])
  out = jax.jit(lambda x: q.fake_quant(x, -1.0, 1.0, 4))(x)  # no check under jit
  # NaN propagates, +-Inf is clipped to the range ends (up to rounding of lo + s q)
  assert np.isnan(out[1])
  np.testing.assert_allclose(out[2:], [1.0, -1.0], rtol=1e-6)
  assert np.all(np.isnan(np.asarray(jax.jit(q.pauta_quantize, static_argnums=1)(x, 4))[1:2]))

  def checked(x):
    q.check_finite(x, "acts")
    return q.pauta_quantize(x, 4)

  f = checkify.checkify(jax.jit(checked))
  err, _ = f(x)
  with pytest.raises(Exception, match="acts contains NaN or Inf"):
    err.throw()
  err, out = f(jnp.ones(4))
  err.throw()  # no error on finite input
  np.testing.assert_array_equal(out, 1.0)


# ----------------------------------------------------------------------------
# Degenerate input
# ----------------------------------------------------------------------------

def test_constant_tensor_unchanged():
  for dtype, axis in ((jnp.float32, None), (jnp.bfloat16, None), (jnp.float32, 1)):
    x = jnp.full((16, 4), 0.7, dtype)
    for fn in (q.pauta_quantize, q.minmax_quantize):
      out = fn(x, 4, channel_axis=axis)
      assert out.dtype == dtype
      np.testing.assert_array_equal(np.float32(out), np.float32(x))
    lo, hi = q.pauta_range(x, channel_axis=axis)
    np.testing.assert_array_equal(lo, hi)
    # symmetric: the constant is the grid's end point, within 1 ulp
    out = q.pauta_quantize(x, 4, channel_axis=axis, symmetric=True)
    np.testing.assert_allclose(np.float32(out), np.float32(x), rtol=2 * jnp.finfo(dtype).eps)
  x = jnp.full((16, 4), -1.5)
  g = jax.jit(jax.grad(lambda x: jnp.sum(q.pauta_quantize(x, 4, channel_axis=1))))(x)
  np.testing.assert_array_equal(g, 1.0)  # degenerate range: identity, gradient 1
  # a constant channel next to a normal one
  y = np.random.default_rng(0).standard_normal((16, 4)).astype(np.float32)
  y[:, 0] = -2.5
  out = q.pauta_quantize(y, 3, channel_axis=1)
  np.testing.assert_array_equal(out[:, 0], -2.5)
  assert len(np.unique(np.asarray(out[:, 1]))) <= 8
  # degenerate explicit ranges, no NaN
  np.testing.assert_array_equal(q.fake_quant(y, 1.0, 1.0, 4), y)
  np.testing.assert_array_equal(q.fake_quant(y, 2.0, -2.0, 4), y)
  np.testing.assert_array_equal(q.fake_quant(y, 0.0, 0.0, 4, symmetric=True), y)
  assert np.all(np.isfinite(q.fake_quant(jnp.zeros(7), *q.pauta_range(jnp.zeros(7)), 8)))


@pytest.mark.parametrize("shape", [(0,), (3, 0), (0, 4, 2)])
def test_empty_tensor(shape):
  x = jnp.zeros(shape, jnp.bfloat16)
  for out in (q.fake_quant(x, 0.0, 1.0, 4), q.pauta_quantize(x, 4),
              q.minmax_quantize(x, 4, symmetric=True), q.lsq_quantize(x, 0.1, 4),
              stochastic_round(x, jax.random.PRNGKey(0)),
              q.pauta_quantize(x, 4, channel_axis=-1)):
    assert out.shape == shape and out.dtype == jnp.bfloat16
  lo, hi = q.pauta_range(x, channel_axis=0)
  assert lo.shape == (shape[0],) + (1,) * (len(shape) - 1) and np.all(np.asarray(lo) == 0)
  assert q.minmax_range(x)[0].shape == ()
  assert float(q.lsq_init_step(x, 4)) > 0
  codes, _, _ = q.quantize_int(x, 4, 0.0, 1.0)
  assert codes.shape == shape
  packed = q.pack_bits(codes, 3)
  assert packed.shape == (0,) and q.unpack_bits(packed, 3, shape).shape == shape


# ----------------------------------------------------------------------------
# Integer form
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("bits,symmetric", [(3, False), (16, False), (4, True), (8, True)])
def test_quantize_int_matches_fake_quant(bits, symmetric):
  rng = np.random.default_rng(bits)
  x = jnp.float32(rng.standard_normal((16, 4)) * [[0.1, 1.0, 8.0, 2.0]] + 0.3)
  lo, hi = q.pauta_range(x, channel_axis=1, symmetric=symmetric)
  codes, scale, zp = q.quantize_int(x, bits, lo, hi, symmetric)
  assert codes.dtype == jnp.int32 and scale.shape == zp.shape == (1, 4)
  if symmetric:
    assert int(codes.min()) >= -(2 ** (bits - 1) - 1) and int(codes.max()) <= 2 ** (bits - 1) - 1
    np.testing.assert_array_equal(zp, 0.0)
  else:
    assert int(codes.min()) >= 0 and int(codes.max()) <= 2 ** bits - 1
  deq = q.dequantize(codes, scale, zp)
  np.testing.assert_allclose(deq, q.fake_quant(x, lo, hi, bits, symmetric),
                             atol=_ulp_tol(lo, hi), rtol=0)
  if bits <= 8:
    packed = q.pack_bits(codes, bits)
    assert packed.size == q.packed_nbytes(codes.size, bits) == -(-codes.size * bits // 8)
    back = q.unpack_bits(packed, bits, codes.shape, signed=symmetric)
    np.testing.assert_array_equal(back, codes)


def test_quantize_int_constant_and_lsq():
  x = jnp.full((4,), 1.25)
  codes, scale, zp = q.quantize_int(x, 4, *q.pauta_range(x))
  np.testing.assert_array_equal(q.dequantize(codes, scale, zp), x)
  s = jnp.float32(0.25)
  y = jnp.float32([-3.0, -0.3, 0.1, 0.6, 5.0])
  codes, scale, zp = q.quantize_int(y, 3, *q.lsq_range(s, 3))
  np.testing.assert_array_equal(codes, [0, 3, 4, 6, 7])  # LSQ codes -4..3 shifted by Q_N
  np.testing.assert_allclose(scale, 0.25)  # (assert_allclose returns None: two statements)
  np.testing.assert_allclose(zp, 4.0)
  np.testing.assert_allclose(q.dequantize(codes, scale, zp), q.lsq_quantize(y, s, 3),
                             atol=1e-6)


@FAST
@given(st.sampled_from([2, 3, 4, 8]), st.sampled_from([0, 37]), st.integers(0, 2 ** 16),
       st.booleans())
def test_pack_unpack_round_trip(bits, n, seed, signed):
  rng = np.random.default_rng(seed)
  if signed:
    codes = rng.integers(-(2 ** (bits - 1)), 2 ** (bits - 1), n)
  else:
    codes = rng.integers(0, 2 ** bits, n)
  codes = jnp.int32(codes)
  packed = q.pack_bits(codes, bits)
  assert packed.dtype == jnp.uint8 and packed.shape == (-(-n * bits // 8),)
  np.testing.assert_array_equal(q.unpack_bits(packed, bits, n, signed=signed), codes)


def test_pack_bits_layout():
  # 3-bit codes 1, 2, 3 -> LSB-first stream 100 010 110 -> bytes 0b11010001, 0b0
  np.testing.assert_array_equal(q.pack_bits(jnp.int32([1, 2, 3]), 3), [0b11010001, 0])
  np.testing.assert_array_equal(q.pack_bits(jnp.int32([1, 2, 3, 0]), 2), [0b00111001])
  np.testing.assert_array_equal(q.pack_bits(jnp.int32([0xA, 0x5]), 4), [0x5A])
  np.testing.assert_array_equal(q.pack_bits(jnp.int32([7, 255]), 8), [7, 255])
  codes = jnp.arange(16, dtype=jnp.int32).reshape(4, 4)
  jit_pack = jax.jit(q.pack_bits, static_argnums=1)
  np.testing.assert_array_equal(jit_pack(codes, 4), q.pack_bits(codes, 4))
  np.testing.assert_array_equal(q.unpack_bits(jit_pack(codes, 4), 4, (4, 4)), codes)


# ----------------------------------------------------------------------------
# Stochastic rounding (no quantizer of the library uses it: it lives here, on the
# library's public grid helpers, with the test of its maths)
# ----------------------------------------------------------------------------

@jax.custom_vjp
def _stochastic_round(x, key):
  xc = x.astype(grid.compute_dtype(x.dtype))
  f = jnp.floor(xc)
  u = jax.random.uniform(key, x.shape, xc.dtype)
  return (f + (u < xc - f).astype(xc.dtype)).astype(x.dtype)


_stochastic_round.defvjp(lambda x, key: (_stochastic_round(x, key), None),
                         lambda _, g: (g, None))


@functools.partial(jax.jit, static_argnums=(2,))
def _stochastic_round_entry(x, key, check):
  return _stochastic_round(x, key), (grid.nonfinite_flags(x) if check else None)


def stochastic_round(x, key):
  """Unbiased stochastic rounding to integers, E[stochastic_round(x)] = x: each element
  becomes floor(x) + 1 with probability x - floor(x), else floor(x); x's shape and dtype;
  straight-through gradient; ValueError for non-float x and (eager) NaN/Inf."""
  x = grid.as_float(x)
  if x.size == 0:
    return jnp.asarray(x)
  check = grid.all_concrete(x)
  out, bad = _stochastic_round_entry(x, key, check)
  if check:
    grid.raise_nonfinite(bad, ("x",))
  return out


def test_stochastic_round_unbiased():
  x = jnp.float32([0.3, -1.7, 2.5, 4.0, -0.01])
  n = 20000
  keys = jax.random.split(jax.random.PRNGKey(0), n)
  samples = np.asarray(jax.jit(jax.vmap(stochastic_round, in_axes=(None, 0)))(x, keys))
  assert np.all(samples == np.round(samples))
  assert np.all((samples == np.floor(x)) | (samples == np.ceil(x)))
  frac = np.asarray(x - jnp.floor(x))
  tol = 5 * np.sqrt(frac * (1 - frac) / n) + 1e-6
  assert np.all(np.abs(samples.mean(0) - np.asarray(x)) <= tol)
  np.testing.assert_array_equal(samples[:, 3], 4.0)  # integers stay exact
  # typed keys work too; straight-through gradient
  g = jax.grad(lambda x: jnp.sum(stochastic_round(x, jax.random.key(2)) * 3.0))(x)
  np.testing.assert_array_equal(g, 3.0)
