"""Tests for qgnn_jax.layers: QuantConfig, QuantSite/QuantDense/QuantConv and the call-time modes.

Variables are built on the host from `jax.eval_shape(init)` (no RNG kernels to
compile) and every computation runs under jit, to keep the tests fast on CPU.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import host_variables
from qgnn_jax import quant
from qgnn_jax.layers import FP, QuantConfig, QuantConv, QuantDense, QuantSite, synced_range
from qgnn_jax.models.vig import ViG

PQ44 = QuantConfig.from_method("pq", 4, 4)


def _randn(seed, shape, scale=1.0):
  return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


def _drop(tree, collection):
  return {k: v for k, v in tree.items() if k != collection}


# ----------------------------------------------------------------------------
# QuantConfig
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs", [
    dict(w_quantizer="pq"), dict(a_quantizer="int8"), dict(w_bits=1), dict(a_bits=17),
    dict(w_bits=4.0), dict(a_bits=True), dict(w_granularity="row"), dict(a_granularity=None),
    dict(lam=0.0), dict(lam=-1.0), dict(ema_momentum=1.0), dict(ema_momentum=-0.1),
])
def test_quant_config_rejects_bad_values(kwargs):
  with pytest.raises(ValueError):
    QuantConfig(**kwargs)


def test_quant_config_from_method():
  assert not FP.enabled
  for method, q in [("fp", "fp"), ("pq", "pauta"), ("pq+aqd+sqd", "pauta"), ("minmax", "minmax"),
                    ("lsq", "lsq"), ("pauta", "pauta")]:
    cfg = QuantConfig.from_method(method, 3, 5)
    assert (cfg.w_quantizer, cfg.a_quantizer, cfg.w_bits, cfg.a_bits) == (q, q, 3, 5)
    assert cfg.enabled == (q != "fp")
  assert QuantConfig.from_method("pq", 4, 4, lam=2.0).lam == 2.0
  with pytest.raises(ValueError):
    QuantConfig.from_method("dorefa", 4, 4)
  with pytest.raises(ValueError):
    QuantConfig.from_method("pq", 1, 4)
  hash(PQ44)  # static argument of jit / a linen field


def test_layers_reject_bad_mode():
  x = _randn(0, (2, 4))
  layer = QuantDense(3, cfg=PQ44)
  variables = host_variables(layer, x)
  with pytest.raises(ValueError, match="mode"):
    layer.apply(variables, x, mode="int8")
  with pytest.raises(ValueError, match="bypass_prob"):
    layer.apply(variables, x, mode="stochastic", bypass_prob=1.5)
  with pytest.raises(ValueError, match="groups"):
    QuantDense(6, groups=4).init(jax.random.PRNGKey(0), _randn(0, (2, 8)))


# ----------------------------------------------------------------------------
# Modes on a small model (ViG: 5 quantized sites in one Grapher + FFN).
# ----------------------------------------------------------------------------
def _small_vig(cfg):
  return ViG(num_classes=3, dim=16, depth=1, k=3, stem_strides=(2,), stem_channels=(16,),
             head_hidden=8, cfg=cfg)


@pytest.fixture(scope="module")
def small_vig():
  x = _randn(1, (2, 8, 8, 1))
  q_model, fp_model = _small_vig(PQ44), _small_vig(FP)
  variables = host_variables(q_model, x)

  # Variables are jit arguments: a closed-over concrete kernel trips the quantizers' eager
  # NaN check under jit (ConcretizationTypeError; reported, qgnn_jax/quant).
  @functools.partial(jax.jit, static_argnames=("quantized", "mode", "p"))
  def run_(variables, x, key, quantized=True, mode="quant", p=0.0):
    if quantized:
      return q_model.apply(variables, x, mode=mode, bypass_prob=p, rngs={"quant": key})
    return fp_model.apply(_drop(variables, "quant_stats"), x)

  return x, variables, functools.partial(run_, variables)


def test_mode_fp_equals_unquantized_model(small_vig):
  x, variables, run = small_vig
  assert "quant_stats" in variables and "quant_stats" not in jax.eval_shape(
      functools.partial(_small_vig(FP).init), jax.random.PRNGKey(0), x)
  key = jax.random.PRNGKey(0)
  ref = run(x, key, quantized=False)
  np.testing.assert_allclose(run(x, key, mode="fp"), ref, rtol=1e-6, atol=1e-6)
  q = run(x, key, mode="quant")
  assert np.all(np.isfinite(q))
  assert np.max(np.abs(q - ref)) > 1e-3, "mode='quant' must differ from full precision"


def test_mode_stochastic(small_vig):
  x, _, run = small_vig
  k0 = jax.random.PRNGKey(0)
  fp, q = run(x, k0, mode="fp"), run(x, k0, mode="quant")
  # Same key -> same output; some key gives a different bypass pattern.
  a = run(x, k0, mode="stochastic", p=0.5)
  np.testing.assert_array_equal(run(x, k0, mode="stochastic", p=0.5), a)
  others = [run(x, jax.random.PRNGKey(s), mode="stochastic", p=0.5) for s in range(1, 9)]
  assert any(np.max(np.abs(o - a)) > 1e-6 for o in others)
  # Each output is one of the 2^5 site patterns: at p=0.5 neither always FP nor always quant.
  assert any(np.max(np.abs(o - fp)) > 1e-6 for o in others)
  assert any(np.max(np.abs(o - q)) > 1e-6 for o in others)


@pytest.mark.parametrize("quantizer", ["pauta", "lsq"])
def test_stochastic_mode_extremes_at_a_layer(quantizer):
  cfg = QuantConfig.from_method(quantizer, 3, 3)
  x = _randn(9, (6, 8), 2.0)
  layer = QuantDense(5, cfg=cfg)
  variables = host_variables(layer, x)

  @functools.partial(jax.jit, static_argnames=("mode", "p"))
  def run(variables, x, key, mode, p=0.0):
    return layer.apply(variables, x, mode=mode, bypass_prob=p, rngs={"quant": key})

  k0, k1 = jax.random.PRNGKey(0), jax.random.PRNGKey(1)
  fp, q = run(variables, x, k0, "fp"), run(variables, x, k0, "quant")
  assert np.max(np.abs(fp - q)) > 1e-3
  # p = 0 -> quantized, p = 1 -> full precision (up to XLA's fusion of the select: ~1 ulp).
  np.testing.assert_allclose(run(variables, x, k1, "stochastic", 0.0), q, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(run(variables, x, k1, "stochastic", 1.0), fp, rtol=1e-5, atol=1e-6)


def test_stochastic_mode_needs_quant_rng(small_vig):
  x, variables, _ = small_vig
  with pytest.raises(Exception, match="quant"):
    jax.jit(lambda v, x: _small_vig(PQ44).apply(v, x, mode="stochastic", bypass_prob=0.5))(
        variables, x)


def _as_matrix(kernel):
  """(fan_in, C_out) view of a kernel, as QuantDense/QuantConv quantize it (grouped
  (G, Cin/G, Cout/G) -> (Cin/G, Cout); conv (kh, kw, Cin, Cout) -> (kh*kw*Cin, Cout))."""
  kernel = np.asarray(kernel)
  if kernel.ndim == 3:
    return np.transpose(kernel, (1, 0, 2)).reshape(kernel.shape[1], -1)
  return kernel.reshape(-1, kernel.shape[-1])


@functools.partial(jax.jit, static_argnums=0)
def _quantize_weight(cfg, w):
  return QuantSite(cfg).apply({}, w, method=lambda m, w: m._quantize_weight(w, False))


def _seen_kernel(cfg, kernel):
  """The kernel seen through the weight quantizer, as a (fan_in, C_out) matrix."""
  return np.asarray(_quantize_weight(cfg, _as_matrix(kernel)))


def test_w4a4_pq_weights_take_at_most_16_values_per_channel(small_vig):
  x, variables, _ = small_vig
  sites = 0
  flat = jax.tree_util.tree_flatten_with_path(variables["params"])[0]
  qstats = jax.tree_util.tree_flatten_with_path(variables["quant_stats"])[0]
  quantized_layers = {tuple(str(p.key) for p in path[:-2]) for path, _ in qstats}
  for path, kernel in flat:
    names = tuple(str(p.key) for p in path)
    if names[-1] != "kernel" or names[:-1] not in quantized_layers:
      continue
    sites += 1
    w = _seen_kernel(PQ44, kernel)
    for col in range(w.shape[1]):
      assert len(np.unique(w[:, col])) <= 2 ** 4, names
    assert np.max(np.abs(w - np.asarray(_as_matrix(kernel)))) > 1e-4, names
  assert sites == 5  # grapher fc1, gconv (grouped), fc2; ffn fc1, fc2


@pytest.mark.parametrize("granularity", ["channel", "tensor"])
def test_quant_dense_uses_quantized_weight_and_input(granularity):
  cfg = QuantConfig.from_method("pq", 4, 4, w_granularity=granularity)
  x = _randn(2, (5, 12))
  layer = QuantDense(8, cfg=cfg, groups=4)
  variables = host_variables(layer, x)

  @jax.jit
  def run(variables, x):
    y = layer.apply(variables, x, mode="quant")
    k = variables["params"]["kernel"]
    k2 = jnp.transpose(k, (1, 0, 2)).reshape(3, 8)
    k_hat, x_hat = QuantSite(cfg).apply({"quant_stats": variables["quant_stats"]["quant"]},
                                        k2, x, train=False, mode="quant")
    return y, k_hat, x_hat

  y, k_hat, x_hat = map(np.asarray, run(variables, x))
  assert len(np.unique(x_hat)) <= 16  # A4, per tensor
  if granularity == "tensor":
    assert len(np.unique(k_hat)) <= 16
  for col in range(8):
    assert len(np.unique(k_hat[:, col])) <= 16
  # Grouped 1x1 conv with the quantized operands, by hand.
  kg = k_hat.reshape(3, 4, 2).transpose(1, 0, 2)
  want = np.einsum("bgi,gio->bgo", x_hat.reshape(5, 4, 3), kg).reshape(5, 8)
  want = want + np.asarray(variables["params"]["bias"])
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)


def test_quant_conv_weights_per_output_channel():
  x = _randn(3, (2, 6, 6, 4))
  layer = QuantConv(5, (3, 3), (2, 2), cfg=PQ44)
  variables = host_variables(layer, x)
  y = jax.jit(lambda v, x: layer.apply(v, x, mode="quant"))(variables, x)
  assert y.shape == (2, 3, 3, 5)
  w = _seen_kernel(PQ44, variables["params"]["kernel"])
  assert w.shape == (36, 5)
  for col in range(5):
    assert len(np.unique(w[:, col])) <= 16


# ----------------------------------------------------------------------------
# Quantizer state: LSQ steps, EMA activation ranges.
# ----------------------------------------------------------------------------
def test_lsq_calibrate_sets_steps():
  cfg = QuantConfig.from_method("lsq", 4, 4)
  x = _randn(4, (16, 8), scale=5.0)
  layer = QuantDense(6, cfg=cfg)
  variables = host_variables(layer, x)
  assert float(variables["params"]["quant"]["w_step"]) == 1.0

  @functools.partial(jax.jit, static_argnames=("calibrate",))
  def run(variables, x, calibrate):
    return layer.apply(variables, x, mode="quant", calibrate=calibrate, mutable=["params"])

  _, new = run(variables, x, calibrate=False)
  assert float(new["params"]["quant"]["w_step"]) == 1.0  # only calibrate resets steps
  y, new = run(variables, x, calibrate=True)
  kernel = variables["params"]["kernel"]
  w_step, a_step = new["params"]["quant"]["w_step"], new["params"]["quant"]["a_step"]
  np.testing.assert_allclose(w_step, quant.lsq_init_step(kernel, 4, True), rtol=1e-6)
  np.testing.assert_allclose(a_step, quant.lsq_init_step(x, 4, True), rtol=1e-6)
  want = (quant.lsq_quantize(x, a_step, 4) @ quant.lsq_quantize(kernel, w_step, 4)
          + variables["params"]["bias"])
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
  # Steps are trainable parameters: they get a gradient.
  g = jax.jit(jax.grad(lambda p, x: jnp.sum(layer.apply({**variables, "params": p}, x,
                                                        mode="quant") ** 2)))(new["params"], x)
  assert float(jnp.abs(g["quant"]["w_step"])) > 0 and float(jnp.abs(g["quant"]["a_step"])) > 0


@pytest.mark.parametrize("quantizer", ["minmax", "pauta"])
def test_ema_ranges_update_in_train_and_are_used_in_eval(quantizer):
  cfg = QuantConfig(w_quantizer=quantizer, a_quantizer=quantizer, w_bits=4, a_bits=4,
                    ema_momentum=0.9)
  x1, x2, x3 = _randn(5, (32, 8)), _randn(6, (32, 8), 2.0), _randn(7, (32, 8), 4.0)
  layer = QuantDense(6, cfg=cfg)
  variables = host_variables(layer, x1)
  rng_fn = quant.minmax_range if quantizer == "minmax" else functools.partial(quant.pauta_range,
                                                                              lam=cfg.lam)

  @functools.partial(jax.jit, static_argnames=("train", "calibrate"))
  def run(variables, x, train, calibrate=False):
    return layer.apply(variables, x, train=train, calibrate=calibrate, mode="quant",
                       mutable=["quant_stats"])

  def stats(v):
    s = v["quant_stats"]["quant"]
    return float(s["a_lo"]), float(s["a_hi"]), int(s["a_count"])

  _, s1 = run(variables, x1, train=True)
  lo1, hi1 = map(float, rng_fn(x1))
  np.testing.assert_allclose(stats(s1), (lo1, hi1, 1), rtol=1e-5)
  v1 = {**variables, **s1}
  _, s2 = run(v1, x2, train=True)
  lo2, hi2 = map(float, rng_fn(x2))
  np.testing.assert_allclose(stats(s2), (0.9 * lo1 + 0.1 * lo2, 0.9 * hi1 + 0.1 * hi2, 2),
                             rtol=1e-5)
  # Eval uses the EMA range and leaves it alone.
  v2 = {**variables, **s2}
  y, s3 = run(v2, x3, train=False)
  assert stats(s3) == stats(s2)
  lo, hi, _ = stats(s2)
  k_hat = _seen_kernel(cfg, variables["params"]["kernel"])
  want = np.asarray(quant.fake_quant(x3, lo, hi, 4)) @ k_hat + variables["params"]["bias"]
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
  batch_range = np.asarray(quant.fake_quant(x3, *rng_fn(x3), 4)) @ k_hat
  assert np.max(np.abs(y - batch_range - variables["params"]["bias"])) > 1e-3
  # Calibration restarts the EMA from the calibration batch.
  _, s4 = run(v2, x3, train=False, calibrate=True)
  lo3, hi3 = map(float, rng_fn(x3))
  np.testing.assert_allclose(stats(s4)[:2], (lo3, hi3), rtol=1e-5)


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("quantizer", ["minmax", "pauta"])
def test_synced_range_under_pmap_equals_global_batch(quantizer, per_channel):
  n = jax.local_device_count()
  if n < 2:
    pytest.skip("needs 2 devices (tests/conftest.py sets XLA_FLAGS)")
  x = _randn(8, (2, 64, 8)) + np.array([0.0, 3.0], np.float32)[:, None, None]
  f = jax.pmap(lambda x: synced_range(x, quantizer, 3.0, False, "d", per_channel),
               axis_name="d")
  lo, hi = f(x[:2])
  want = synced_range(jnp.asarray(x[:2]).reshape(-1, 8), quantizer, 3.0, False, None,
                      per_channel)
  assert lo.shape == (2,) + ((8,) if per_channel else ())
  np.testing.assert_allclose(lo, np.stack([want[0]] * 2), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(hi, np.stack([want[1]] * 2), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("quantizer", ["minmax", "pauta"])
def test_synced_range_equals_the_quantizer_library(quantizer, symmetric):
  """One device: the activation range is quant's pauta_range / minmax_range, per tensor and
  per channel (with a channel at mean 1000, std 0.5, where E[x^2] - E[x]^2 in float32 would
  get the std wrong by tens of percent)."""
  x = _randn(3, (4, 25, 6)) * np.float32([1, 2, 0.5, 1, 1, 3]) + np.float32([0, 0, 1e3, -2, 0, 1])
  fn = quant.pauta_range if quantizer == "pauta" else quant.minmax_range
  kw = {"lam": 2.5} if quantizer == "pauta" else {}
  for per_channel in (False, True):
    lo, hi = synced_range(x, quantizer, 2.5, symmetric, None, per_channel)
    want = fn(x.reshape(-1, 6), channel_axis=-1 if per_channel else None, symmetric=symmetric,
              **kw)
    np.testing.assert_allclose(lo, np.reshape(want[0], lo.shape), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(hi, np.reshape(want[1], hi.shape), rtol=1e-5, atol=1e-5)


def test_per_channel_activation_ranges():
  """a_granularity='channel': one EMA pair per input channel; each channel on its own grid."""
  cfg = QuantConfig.from_method("pauta", 4, 2, a_granularity="channel")
  x = _randn(4, (64, 3)) * np.float32([0.1, 1.0, 10.0])
  layer = QuantDense(5, cfg=cfg, use_bias=False)
  variables = host_variables(layer, x)
  _, new = jax.jit(lambda v, x: layer.apply(v, x, train=True, mode="quant",
                                            mutable=["quant_stats"]))(variables, x)
  stats = new["quant_stats"]["quant"]
  assert stats["a_lo"].shape == stats["a_hi"].shape == (3,)
  lo, hi = quant.pauta_range(x, lam=cfg.lam, channel_axis=-1)
  np.testing.assert_allclose(stats["a_lo"], np.ravel(lo), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(stats["a_hi"], np.ravel(hi), rtol=1e-5, atol=1e-6)
  # The site's own quantized input (evaluation, from the EMA): <= 2^2 levels per channel,
  # each over that channel's range (a per-tensor grid would flatten channel 0 to one level).
  site = QuantSite(cfg)
  kernel = jnp.ones((3, 5), jnp.float32)
  _, xq = site.apply({"quant_stats": stats}, kernel, x, train=False, mode="quant")
  for c in range(3):
    levels = np.unique(np.asarray(xq[:, c]))
    assert 2 <= len(levels) <= 4, (c, levels)
    assert levels.min() >= float(stats["a_lo"][c]) - 1e-5
    assert levels.max() <= float(stats["a_hi"][c]) + 1e-5


@pytest.mark.parametrize("quantizer", ["pauta", "lsq"])
def test_quantized_layer_under_jit_with_closed_over_variables(quantizer):
  """The common pattern jax.jit(lambda x: model.apply(variables, x)) must work."""
  cfg = QuantConfig.from_method(quantizer, 4, 4)
  x = _randn(10, (4, 8))
  layer = QuantDense(3, cfg=cfg)
  variables = jax.tree_util.tree_map(jnp.asarray, host_variables(layer, x))
  y = jax.jit(lambda x: layer.apply(variables, x, mode="quant"))(x)
  z = jax.jit(lambda v, x: layer.apply(v, x, mode="quant"))(variables, x)
  np.testing.assert_allclose(y, z, rtol=1e-6, atol=1e-6)
