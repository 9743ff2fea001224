"""Quantizer sites through the public API: `qat.quantize_model(plain_model, rules)`.

Ported from the tests of the old hand-wired quantized layers (tests/legacy/layers.py until
issue 25, the former tests/test_layers.py): rules and their validation, the call-time modes, the weight
and input each op really uses (Dense, Conv, grouped dense), quantizer state (LSQ
steps, EMA activation ranges) and the registry entries' synchronised batch ranges.

The weight an op really uses is read back through the op itself: a weight-only rule
and an identity input (`_seen_*`). Variables are built on the host from
`jax.eval_shape(init)` (tests/helpers.py; no RNG kernels to compile) and converted to
jax arrays; computations run under jit to keep the tests fast on CPU.
"""
import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs import common
from helpers import host_variables
from qgnn_jax import qat, quant, recipe
from qgnn_jax import train as train_lib
from qgnn_jax.models import LAYER_GROUPS
from qgnn_jax.models.blocks import GroupedDense, conv3x3
from qgnn_jax.models.vig import ViG

BODY_PQ44 = qat.QuantRule(module_path=LAYER_GROUPS["body"], w_quantizer="pq", a_quantizer="pq",
                          w_bits=4, a_bits=4)


def _randn(seed, shape, scale=1.0):
  return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


def _rule(quantizer="pq", w_bits=4, a_bits=4, **kw):
  """One rule for every op of a stand-alone layer (its module path is '')."""
  return qat.QuantRule(module_path=".*", w_quantizer=quantizer, a_quantizer=quantizer,
                       w_bits=w_bits, a_bits=a_bits, **kw)


def _variables(model, *args, **kw):
  """host_variables as jax arrays (numpy params are not seen as params: see
  test_numpy_variables_are_quantized)."""
  return jax.tree.map(jnp.asarray, host_variables(model, *args, **kw))


def _drop(tree, collection):
  return {k: v for k, v in tree.items() if k != collection}


def _library_weight(rule, w2):
  """w2 (fan_in, C) through the quantizer library with the rule's weight settings."""
  axis = -1 if rule.w_granularity == "channel" else None
  if rule.w_quantizer == "pq":
    lo, hi = quant.pauta_range(w2, lam=rule.lam, channel_axis=axis, symmetric=rule.w_symmetric)
  else:
    assert rule.w_quantizer == "minmax", rule
    lo, hi = quant.minmax_range(w2, channel_axis=axis, symmetric=rule.w_symmetric)
  return np.asarray(quant.fake_quant(w2, lo, hi, rule.w_bits, symmetric=rule.w_symmetric))


def _library_act(x, lo, hi, bits):
  return np.asarray(quant.fake_quant(x, lo, hi, bits))


def _seen(layer, params, probe, rule):
  """The output of `layer` quantized by `rule` with its activation left in full precision."""
  qm = qat.quantize_model(layer, (dataclasses.replace(rule, module_path=".*", a_quantizer=None),))
  v = _variables(qm, probe)
  v["params"] = jax.tree.map(jnp.asarray, params)
  return np.asarray(jax.jit(lambda v, x: qm.apply(v, x, mode="quant"))(v, probe))


def _seen_dense_kernel(kernel, rule):
  """The (I, O) kernel a quantized nn.Dense multiplies with: its output for eye(I)."""
  i, o = kernel.shape
  return _seen(nn.Dense(o, use_bias=False), {"kernel": kernel}, np.eye(i, dtype=np.float32), rule)


def _seen_grouped_kernel(kernel, rule):
  """The (G, I, O) kernel a quantized GroupedDense uses; checks that it stays block-diagonal."""
  g, i, o = kernel.shape
  y = _seen(GroupedDense(g * o, g), {"kernel": kernel, "bias": np.zeros(g * o, np.float32)},
            np.eye(g * i, dtype=np.float32), rule)
  blocks = np.stack([y[a * i:(a + 1) * i, a * o:(a + 1) * o] for a in range(g)])
  mask = np.kron(np.eye(g), np.ones((i, o))).astype(bool)
  assert np.all(y[~mask] == 0), "a grouped kernel must stay block-diagonal"
  return blocks


def _seen_conv_kernel(kernel, rule):
  """The (kh, kw, I, O) kernel a quantized nn.Conv uses: a VALID conv over one-hot patches."""
  kh, kw, i, o = kernel.shape
  probe = np.eye(kh * kw * i, dtype=np.float32).reshape(-1, kh, kw, i)
  y = _seen(nn.Conv(o, (kh, kw), padding="VALID", use_bias=False), {"kernel": kernel}, probe,
            rule)
  return y.reshape(kh, kw, i, o)


def _max_values_per_channel(w, channel_axes):
  """Most distinct values of w over any one channel (the entries at fixed channel_axes)."""
  other = tuple(a for a in range(w.ndim) if a not in channel_axes)
  flat = np.transpose(w, other + tuple(channel_axes)).reshape(
      int(np.prod([w.shape[a] for a in other])), -1)
  return max(len(np.unique(flat[:, c])) for c in range(flat.shape[1]))


class DenseNet(nn.Module):
  """nn.Dense behind the `train` argument that train.create_state / calibrate pass."""
  features: int

  @nn.compact
  def __call__(self, x, train: bool = False):
    return nn.Dense(self.features, name="fc")(x)


# ----------------------------------------------------------------------------
# Rules and methods (were: the old layers' config and its constructor from a method).
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,needle", [
    (dict(w_quantizer="int8"), "unknown quantizer 'int8'"),
    (dict(a_quantizer="pauta"), "unknown quantizer 'pauta'"),  # the old name of pq
    (dict(w_quantizer="pq", w_bits=1), "w_bits=1"),
    (dict(a_quantizer="pq", a_bits=17), "a_bits=17"),
    (dict(w_bits=1), "w_bits=1"),
    (dict(w_symmetric="no"), "w_symmetric='no'"),
    (dict(lam=0.0), "lam=0.0"),
    (dict(w_quantizer="pq", w_bits=4.0), "bits=4.0"),
    (dict(a_quantizer="pq", a_bits=True), "bits=True"),
    (dict(w_quantizer="pq", w_granularity="row"), "w_granularity='row'"),
    (dict(a_quantizer="pq", a_granularity=None), "a_granularity=None"),
    (dict(w_quantizer="pq", lam=0.0), "lam=0.0"),
    (dict(a_quantizer="pq", lam=-1.0), "lam=-1.0"),
    (dict(ema_momentum=1.0), "ema_momentum=1.0"),
    (dict(ema_momentum=-0.1), "ema_momentum=-0.1"),
    (dict(module_path="grapher("), "module_path='grapher\\('"),
    (dict(op_names=("matmul",)), "op_names"),
    (dict(a_quantizer="lsq", a_grid="relu"), "a_grid='relu'"),
    (dict(a_quantizer="pq", range_grad=1), "range_grad=1"),
])
def test_quant_rule_rejects_bad_values(kwargs, needle):
  with pytest.raises(ValueError, match=needle):
    qat.QuantRule(**kwargs)


def test_parse_method_and_quant_rules():
  for method, (q, aqd, sqd) in [("fp", (None, False, False)), ("pq", ("pq", False, False)),
                                ("pq+aqd+sqd", ("pq", True, True)),
                                ("lsq+sqd+aqd", ("lsq", True, True)),
                                ("minmax+sqd", ("minmax", False, True)),
                                ("lsq", ("lsq", False, False))]:
    m = recipe.parse_method(method)
    assert (m.quantizer, m.aqd, m.sqd, m.quantized) == (q, aqd, sqd, q is not None)
    assert recipe.parse_method(str(m)) == m
  for name in quant.QUANTIZERS.names():  # every registered quantizer is a method
    assert recipe.parse_method(name).quantizer == name
  for bad in ["dorefa", "pauta", "fp+aqd", "pq+aqd+aqd", "pq+xd", "fp+kd", "", "aqd"]:
    with pytest.raises(ValueError, match="method="):
      recipe.parse_method(bad)

  config = common.base_config()
  config.method, config.w_bits, config.a_bits, config.lam = "pq+aqd", 3, 5, 2.0
  gelu, body = recipe.quant_rules(config)
  assert gelu == dataclasses.replace(body, module_path=recipe.GELU_INPUTS["body"],
                                     a_grid=config.lsq_gelu_grid)
  assert body.a_grid == "signed"
  assert (body.module_path, body.w_quantizer, body.a_quantizer, body.w_bits, body.a_bits,
          body.lam) == (LAYER_GROUPS["body"], "pq", "pq", 3, 5, 2.0)
  hash(recipe.quant_rules(config))  # static argument of jit, part of a QuantizedModel's hash
  config.quantize_stem, config.quantize_head = True, True
  assert [r.module_path for r in recipe.quant_rules(config)] == [
      p for g in ("body", "stem_rest", "head") for p in (recipe.GELU_INPUTS[g], LAYER_GROUPS[g])]
  config.method = "fp"
  assert recipe.quant_rules(config) == ()
  config.method, config.w_bits = "pq", 1
  with pytest.raises(ValueError, match="bits=1"):
    recipe.quant_rules(config)


def test_bad_mode_bypass_prob_and_groups_raise():
  x = _randn(0, (2, 4))
  qm = qat.quantize_model(nn.Dense(3), (_rule(),))
  variables = _variables(qm, x)
  with pytest.raises(ValueError, match="mode='int8'"):
    qm.apply(variables, x, mode="int8")
  with pytest.raises(ValueError, match="bypass_prob=1.5"):
    qm.apply(variables, x, mode="stochastic", bypass_prob=1.5, rngs={"quant": jax.random.key(0)})
  with pytest.raises(ValueError, match="groups=4"):
    jax.eval_shape(qat.quantize_model(GroupedDense(6, groups=4), (_rule(),)).init,
                   jax.random.PRNGKey(0), _randn(0, (2, 8)))


# ----------------------------------------------------------------------------
# Modes on a small model (ViG: 5 quantized ops in one Grapher + FFN).
# ----------------------------------------------------------------------------
def _small_vig():
  return ViG(num_classes=3, dim=16, depth=1, k=3, stem_strides=(2,), stem_channels=(16,),
             head_hidden=8)


SMALL_SITES = {("grapher0", "fc1"), ("grapher0", "gconv"), ("grapher0", "fc2"),
               ("ffn0", "fc1"), ("ffn0", "fc2")}


@pytest.fixture(scope="module")
def small_vig():
  x = _randn(1, (2, 8, 8, 1))
  q_model, fp_model = qat.quantize_model(_small_vig(), (BODY_PQ44,)), _small_vig()
  variables = _variables(q_model, x)

  @functools.partial(jax.jit, static_argnames=("quantized", "mode", "p"))
  def run_(variables, x, key, quantized=True, mode="quant", p=0.0):
    if quantized:
      return q_model.apply(variables, x, mode=mode, bypass_prob=p, rngs={"quant": key})
    return fp_model.apply(_drop(variables, "quant_stats"), x)

  return x, q_model, variables, functools.partial(run_, variables)


def test_mode_fp_equals_unquantized_model(small_vig):
  x, q_model, variables, run = small_vig
  assert "quant_stats" in variables and "quant_stats" not in jax.eval_shape(
      _small_vig().init, jax.random.PRNGKey(0), x)
  key = jax.random.PRNGKey(0)
  ref = run(x, key, quantized=False)
  np.testing.assert_allclose(run(x, key, mode="fp"), ref, rtol=1e-6, atol=1e-6)
  q = run(x, key, mode="quant")
  assert np.all(np.isfinite(q))
  assert np.max(np.abs(q - ref)) > 1e-3, "mode='quant' must differ from full precision"
  # fp traces no quantizer op: the same program as the plain model; quant adds rounding.
  fp_jaxpr = jax.make_jaxpr(lambda v: q_model.apply(v, x, mode="fp"))(variables).jaxpr
  plain = jax.make_jaxpr(lambda v: _small_vig().apply(_drop(v, "quant_stats"), x))(
      variables).jaxpr
  q_jaxpr = jax.make_jaxpr(lambda v: q_model.apply(v, x, mode="quant"))(variables).jaxpr
  assert len(fp_jaxpr.eqns) == len(plain.eqns)
  assert "round" not in str(fp_jaxpr) and "round" in str(q_jaxpr)
  # ... and touches no quantizer state, even where quant_stats is mutable (training).
  _, new = jax.jit(lambda v: q_model.apply(v, x, train=True, mode="fp",
                                           mutable=["batch_stats", "quant_stats"]))(variables)
  for a, b in zip(jax.tree.leaves(new["quant_stats"]), jax.tree.leaves(variables["quant_stats"])):
    np.testing.assert_array_equal(a, b)


def test_mode_stochastic(small_vig):
  x, _, _, run = small_vig
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


@pytest.mark.parametrize("quantizer", ["pq", "lsq"])
def test_stochastic_mode_extremes_at_a_layer(quantizer):
  x = _randn(9, (6, 8), 2.0)
  qm = qat.quantize_model(nn.Dense(5), (_rule(quantizer, 3, 3),))
  variables = _variables(qm, x)

  @functools.partial(jax.jit, static_argnames=("mode", "p"))
  def run(variables, x, key, mode, p=0.0):
    return qm.apply(variables, x, mode=mode, bypass_prob=p, rngs={"quant": key})

  k0, k1 = jax.random.PRNGKey(0), jax.random.PRNGKey(1)
  fp, q = run(variables, x, k0, "fp"), run(variables, x, k0, "quant")
  assert np.max(np.abs(fp - q)) > 1e-3
  # p = 1 -> full precision (up to XLA's fusion of the select: ~1 ulp); p = 0 too here:
  # the one site is the one the teacher must bypass (it is never the student).
  np.testing.assert_allclose(run(variables, x, k1, "stochastic", 1.0), fp, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(run(variables, x, k1, "stochastic", 0.0), fp, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("quantizer", ["pq", "lsq"])
def test_stochastic_p0_bypasses_exactly_one_of_two_sites(quantizer):
  """p = 0: exactly the forced site runs in full precision, the other stays quantized."""
  x = _randn(9, (6, 8), 2.0)
  model = nn.Sequential([nn.Dense(7), nn.Dense(5)])
  qm = qat.quantize_model(model, (_rule(quantizer, 3, 3),))
  variables = _variables(qm, x)
  assert len(qat.site_paths(variables)) == 2
  q = qm.apply(variables, x, mode="quant")
  # The outputs with exactly one of the two layers in full precision, by hand.
  only = []
  for i in range(2):
    rule_fp = (qat.full_precision(f"layers_{i}"), _rule(quantizer, 3, 3))
    only.append(qat.quantize_model(model, rule_fp).apply(variables, x, mode="quant"))
  seen = set()
  for k in range(12):
    t = np.asarray(qm.apply(variables, x, mode="stochastic", bypass_prob=0.0,
                            rngs={"quant": jax.random.key(k)}))
    match = [i for i in range(2) if np.allclose(t, only[i], rtol=1e-5, atol=1e-6)]
    assert len(match) == 1 and not np.allclose(t, q, rtol=1e-5, atol=1e-6)
    seen.add(match[0])
  assert seen == {0, 1}  # the forced site is drawn, not fixed


def test_stochastic_mode_needs_quant_rng(small_vig):
  x, q_model, variables, _ = small_vig
  with pytest.raises(Exception, match='"quant"'):
    jax.jit(lambda v, x: q_model.apply(v, x, mode="stochastic", bypass_prob=0.5))(variables, x)


# ----------------------------------------------------------------------------
# The weight and input each op uses.
# ----------------------------------------------------------------------------
def test_w4a4_pq_weights_take_at_most_16_values_per_channel(small_vig):
  _, _, variables, _ = small_vig
  qstats = jax.tree_util.tree_flatten_with_path(variables["quant_stats"])[0]
  sites = {tuple(str(p.key) for p in path[:-2]) for path, _ in qstats if path[-1].key == "site"}
  assert sites == SMALL_SITES  # grapher fc1, gconv (grouped), fc2; ffn fc1, fc2
  for names in sorted(sites):
    kernel = np.asarray(functools.reduce(lambda t, k: t[k], names, variables["params"])["kernel"])
    if names[-1] == "gconv":  # (G, I, O): one range per (g, o)
      w = _seen_grouped_kernel(kernel, BODY_PQ44)
      assert _max_values_per_channel(w, (0, 2)) <= 2 ** 4, names
      w2 = np.transpose(kernel, (1, 0, 2)).reshape(kernel.shape[1], -1)  # (I, G*O)
      np.testing.assert_allclose(np.transpose(w, (1, 0, 2)).reshape(w2.shape),
                                 _library_weight(BODY_PQ44, w2), rtol=1e-6, atol=1e-7)
    else:  # (I, O): one range per output channel
      w = _seen_dense_kernel(kernel, BODY_PQ44)
      assert _max_values_per_channel(w, (1,)) <= 2 ** 4, names
      np.testing.assert_allclose(w, _library_weight(BODY_PQ44, kernel), rtol=1e-6, atol=1e-7)
    assert np.max(np.abs(w - kernel)) > 1e-4, names
    # Per (output) channel, not per tensor: the whole kernel takes more than 16 values.
    assert len(np.unique(w)) > 2 ** 4, names


@pytest.mark.parametrize("granularity", ["channel", "tensor"])
def test_grouped_dense_uses_quantized_weight_and_input(granularity):
  rule = _rule("pq", w_granularity=granularity)
  x = _randn(2, (5, 12))
  qm = qat.quantize_model(GroupedDense(8, groups=4), (rule,))
  variables = _variables(qm, x)
  kernel = np.asarray(variables["params"]["kernel"])  # (G, I, O) = (4, 3, 2)
  y = np.asarray(jax.jit(lambda v, x: qm.apply(v, x, mode="quant"))(variables, x))

  def by_hand(rule):
    """The grouped op on the library's quantized weight (channels (g, o)) and input (per
    tensor, the batch range: no EMA yet)."""
    w2 = np.transpose(kernel, (1, 0, 2)).reshape(3, 8)
    k_hat = _library_weight(rule, w2).reshape(3, 4, 2).transpose(1, 0, 2)
    x_hat = _library_act(x, *quant.pauta_range(x, lam=rule.lam), 4)
    y = np.einsum("bgi,gio->bgo", x_hat.reshape(5, 4, 3), k_hat).reshape(5, 8)
    return y + np.asarray(variables["params"]["bias"]), k_hat, x_hat

  want, k_hat, x_hat = by_hand(rule)
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(_seen_grouped_kernel(kernel, rule), k_hat, rtol=1e-6, atol=1e-7)
  assert len(np.unique(x_hat)) <= 16  # A4, per tensor
  assert _max_values_per_channel(k_hat, (0, 2)) <= 16
  if granularity == "tensor":
    assert len(np.unique(k_hat)) <= 16
  other = dataclasses.replace(rule, w_granularity="tensor" if granularity == "channel" else
                              "channel")
  assert np.max(np.abs(y - by_hand(other)[0])) > 1e-4, "granularity must matter"


def test_conv_weights_per_output_channel():
  rule = _rule("pq")
  x = _randn(3, (2, 6, 6, 4))
  qm = qat.quantize_model(conv3x3(5, 2, jnp.float32, "conv"), (rule,))
  variables = _variables(qm, x)
  y = np.asarray(jax.jit(lambda v, x: qm.apply(v, x, mode="quant"))(variables, x))
  assert y.shape == (2, 3, 3, 5)
  kernel = np.asarray(variables["params"]["kernel"])  # HWIO (3, 3, 4, 5)
  w = _seen_conv_kernel(kernel, rule)
  assert _max_values_per_channel(w, (3,)) <= 16
  assert len(np.unique(w)) > 16 and np.max(np.abs(w - kernel)) > 1e-4
  np.testing.assert_allclose(w.reshape(36, 5), _library_weight(rule, kernel.reshape(36, 5)),
                             rtol=1e-6, atol=1e-7)
  # The strided, padded conv runs on that kernel and the quantized input.
  x_hat = _library_act(x, *quant.pauta_range(x, lam=rule.lam), 4)
  want = jax.lax.conv_general_dilated(x_hat, w, (2, 2), ((1, 1), (1, 1)),
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))
  np.testing.assert_allclose(y, np.asarray(want) + np.asarray(variables["params"]["bias"]),
                             rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------
# Quantizer state: LSQ steps, EMA activation ranges.
# ----------------------------------------------------------------------------
def test_lsq_calibrate_sets_steps():
  x = _randn(4, (16, 8), scale=5.0)
  qm = qat.quantize_model(DenseNet(6), (_rule("lsq"),))
  variables = _variables(qm, x)
  assert float(variables["params"]["fc"]["quant"]["w_step"]) == 1.0
  # Without calibrate, a mutable apply leaves the steps alone.
  _, new = jax.jit(lambda v, x: qm.apply(v, x, mode="quant", mutable=["params"]))(variables, x)
  assert float(new["params"]["fc"]["quant"]["w_step"]) == 1.0
  state = train_lib.TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                               batch_stats={}, quant_stats=variables["quant_stats"],
                               opt_state=(), rng=jax.random.key_data(jax.random.key(0)))
  state = jax.jit(lambda s, x: train_lib.calibrate(qm, s, x))(state, x)
  kernel, bias = variables["params"]["fc"]["kernel"], variables["params"]["fc"]["bias"]
  w_step = state.params["fc"]["quant"]["w_step"]
  a_step = state.params["fc"]["quant"]["a_step"]
  np.testing.assert_allclose(w_step, quant.lsq_init_step(kernel, 4, True), rtol=1e-6)
  np.testing.assert_allclose(a_step, quant.lsq_init_step(x, 4, True), rtol=1e-6)
  np.testing.assert_allclose(state.params["fc"]["kernel"], kernel)  # weights untouched
  y = jax.jit(lambda v, x: qm.apply(v, x, mode="quant"))(state.variables(), x)
  want = quant.lsq_quantize(x, a_step, 4) @ quant.lsq_quantize(kernel, w_step, 4) + bias
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
  # Steps are trainable parameters: they get a gradient.
  g = jax.jit(jax.grad(lambda p, x: jnp.sum(qm.apply({**state.variables(), "params": p}, x,
                                                     mode="quant") ** 2)))(state.params, x)
  assert float(jnp.abs(g["fc"]["quant"]["w_step"])) > 0
  assert float(jnp.abs(g["fc"]["quant"]["a_step"])) > 0


def test_lsq_grids_follow_the_rules_and_the_gelu_inputs():
  # recipe: LSQ's grid at the GELU-fed ops is config.lsq_gelu_grid, signed elsewhere; the
  # offset grid adds an a_offset param there, initialised as LSQ+ (min x, MSE step).
  config = common.base_config()
  config.method, config.lsq_gelu_grid = "lsq", "offset"
  rules = recipe.quant_rules(config)
  pick = lambda path: next(r for r in rules if r.matches(path, "dot_general"))
  for path, grid in [("grapher0/fc2", "offset"), ("ffn3/fc2", "offset"),
                     ("grapher0/fc1", "signed"), ("grapher0/gconv", "signed"),
                     ("ffn0/fc1", "signed")]:
    assert pick(path).a_grid == grid and pick(path).act_spec.grid == grid, path
    assert pick(path).weight_spec.grid == "signed"
  x = jax.nn.gelu(_randn(8, (64, 8), 2.0), approximate=False)
  for grid, names in [("signed", {"w_step", "a_step"}), ("unsigned", {"w_step", "a_step"}),
                      ("offset", {"w_step", "a_step", "a_offset"})]:
    qm = qat.quantize_model(nn.Dense(4), (_rule("lsq", 2, 2, a_grid=grid),))
    v = qm.init(jax.random.key(0), x)
    assert set(v["params"]["quant"]) == names
    y = qm.apply(v, x, mode="quant")
    s, p = v["params"]["quant"], v["params"]
    a_hat = quant.lsq_quantize(x, s["a_step"], 2, signed=grid == "signed",
                               offset=s.get("a_offset"))
    want = a_hat @ quant.lsq_quantize(p["kernel"], s["w_step"], 2) + p["bias"]
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    if grid == "offset":
      step, beta = quant.lsq_plus_init(x, 2)
      np.testing.assert_allclose([s["a_step"], s["a_offset"]], [step, beta], rtol=1e-6)
    else:
      np.testing.assert_allclose(s["a_step"], quant.lsq_init_step(x, 2, grid == "signed"),
                                 rtol=1e-6)


@pytest.mark.parametrize("quantizer", ["pq", "minmax"])
def test_range_grad_gives_the_range_and_the_input_a_gradient(quantizer):
  # range_grad=False (default): the range is a constant (the clipped STE only);
  # True: lo / hi get the clipped region's gradient and, for PQ, pass it on to x through
  # the batch's mu, sigma (min-max's range is min / max: held constant).
  x = _randn(9, (64, 32), 2.0)
  x[3, 2] = 25.0
  grads = {}
  for rg in (False, True):
    # lam 1.5: the weights' mu + lam sigma lies inside their extremes (not clipped to max)
    qm = qat.quantize_model(nn.Dense(4), (_rule(quantizer, 2, 2, range_grad=rg, lam=1.5),))
    v = _variables(qm, x)
    f = lambda p, x: jnp.sum(qm.apply({**v, "params": p}, x, mode="quant",
                                      mutable=["quant_stats"])[0] ** 2)
    grads[rg] = jax.jit(jax.grad(f, argnums=(0, 1)))(v["params"], jnp.asarray(x))
  (gp0, gx0), (gp1, gx1) = grads[False], grads[True]
  dk = float(jnp.max(jnp.abs(gp1["kernel"] - gp0["kernel"])))
  dx = float(jnp.max(jnp.abs(gx1 - gx0)))
  if quantizer == "pq":
    assert dk > 1e-4 and dx > 1e-4, (dk, dx)  # weight range and activation range both
  else:
    assert dk == 0.0 and dx == 0.0


@pytest.mark.parametrize("quantizer", ["minmax", "pq"])
def test_ema_ranges_update_in_train_and_are_used_in_eval(quantizer):
  rule = _rule(quantizer, ema_momentum=0.9)
  x1, x2, x3 = _randn(5, (32, 8)), _randn(6, (32, 8), 2.0), _randn(7, (32, 8), 4.0)
  qm = qat.quantize_model(nn.Dense(6), (rule,))
  variables = _variables(qm, x1)
  rng_fn = quant.minmax_range if quantizer == "minmax" else functools.partial(quant.pauta_range,
                                                                              lam=rule.lam)

  # Training = quant_stats mutable; evaluation = not mutable.
  train = jax.jit(lambda v, x, calibrate=False: qm.apply(
      v, x, mode="quant", calibrate=calibrate, mutable=["quant_stats"]), static_argnums=2)
  evaluate = jax.jit(lambda v, x, calibrate=False: qm.apply(v, x, mode="quant",
                                                            calibrate=calibrate),
                     static_argnums=2)

  def stats(v):
    s = v["quant_stats"]["quant"]
    return float(s["a_lo"]), float(s["a_hi"]), int(s["a_count"])

  _, s1 = train(variables, x1)
  lo1, hi1 = map(float, rng_fn(x1))
  np.testing.assert_allclose(stats(s1), (lo1, hi1, 1), rtol=1e-5)
  _, s2 = train({**variables, **s1}, x2)
  lo2, hi2 = map(float, rng_fn(x2))
  np.testing.assert_allclose(stats(s2), (0.9 * lo1 + 0.1 * lo2, 0.9 * hi1 + 0.1 * hi2, 2),
                             rtol=1e-5)
  assert int(s2["quant_stats"]["quant"]["site"]) == 4  # the weight bit-width marker
  # Eval uses the EMA range (not x3's own).
  v2 = {**variables, **s2}
  y = np.asarray(evaluate(v2, x3))
  lo, hi, _ = stats(s2)
  kernel, bias = np.asarray(variables["params"]["kernel"]), np.asarray(variables["params"]["bias"])
  k_hat = _seen_dense_kernel(kernel, rule)
  np.testing.assert_allclose(k_hat, _library_weight(rule, kernel), rtol=1e-6, atol=1e-7)
  want = _library_act(x3, lo, hi, 4) @ k_hat + bias
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
  batch_range = _library_act(x3, *rng_fn(x3), 4) @ k_hat + bias
  assert np.max(np.abs(y - batch_range)) > 1e-3
  # Calibration: evaluates with the batch's range, and restarts the EMA from it when mutable.
  np.testing.assert_allclose(evaluate(v2, x3, True), batch_range, rtol=1e-5, atol=1e-5)
  _, s4 = train(v2, x3, True)
  lo3, hi3 = map(float, rng_fn(x3))
  np.testing.assert_allclose(stats(s4)[:2], (lo3, hi3), rtol=1e-5)


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("quantizer", ["minmax", "pq"])
def test_synced_range_under_pmap_equals_global_batch(quantizer, per_channel):
  assert jax.local_device_count() >= 2, "tests/conftest.py forces 2 CPU devices"
  entry = quant.QUANTIZERS.get(quantizer)
  spec = quant.OperandSpec(bits=4, symmetric=False, per_channel=per_channel, lam=3.0)
  x = _randn(8, (2, 64, 8)) + np.array([0.0, 3.0], np.float32)[:, None, None]
  lo, hi = jax.pmap(lambda x: entry.batch_range(x, spec, "d"), axis_name="d")(x)
  want = entry.batch_range(jnp.asarray(x).reshape(-1, 8), spec, None)
  assert lo.shape == (2,) + ((8,) if per_channel else ())
  np.testing.assert_allclose(lo, np.stack([want[0]] * 2), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(hi, np.stack([want[1]] * 2), rtol=1e-5, atol=1e-5)
  # Not each device's own shard (the shards differ by a shift of 3).
  own = entry.batch_range(jnp.asarray(x[0]), spec, None)
  assert np.max(np.abs(np.asarray(own[1]) - np.asarray(want[1]))) > 0.1


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("quantizer", ["minmax", "pq"])
def test_synced_range_equals_the_quantizer_library(quantizer, symmetric):
  """One device: the activation range is quant's pauta_range / minmax_range, per tensor and
  per channel (with a channel at mean 1000, std 0.5, where E[x^2] - E[x]^2 in float32 would
  get the std wrong by tens of percent)."""
  x = _randn(3, (4, 25, 6)) * np.float32([1, 2, 0.5, 1, 1, 3]) + np.float32([0, 0, 1e3, -2, 0, 1])
  fn = quant.pauta_range if quantizer == "pq" else quant.minmax_range
  kw = {"lam": 2.5} if quantizer == "pq" else {}
  entry = quant.QUANTIZERS.get(quantizer)
  for per_channel in (False, True):
    spec = quant.OperandSpec(4, symmetric, per_channel, 2.5)
    lo, hi = entry.batch_range(jnp.asarray(x), spec, None)
    assert lo.shape == hi.shape == ((6,) if per_channel else ())
    want = fn(x.reshape(-1, 6), channel_axis=-1 if per_channel else None, symmetric=symmetric,
              **kw)
    np.testing.assert_allclose(lo, np.reshape(want[0], lo.shape), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(hi, np.reshape(want[1], hi.shape), rtol=1e-5, atol=1e-5)


def test_per_channel_activation_ranges():
  """a_granularity='channel': one EMA pair per input channel; each channel on its own grid."""
  rule = qat.QuantRule(module_path=".*", w_quantizer=None, a_quantizer="pq", a_bits=2,
                       a_granularity="channel")
  x = _randn(4, (64, 3)) * np.float32([0.1, 1.0, 10.0])
  qm = qat.quantize_model(nn.Dense(3, use_bias=False), (rule,))
  variables = _variables(qm, x)
  variables["params"]["kernel"] = jnp.eye(3)  # the op's output is its quantized input
  _, new = jax.jit(lambda v, x: qm.apply(v, x, mode="quant", mutable=["quant_stats"]))(
      variables, x)
  stats = new["quant_stats"]["quant"]
  assert stats["a_lo"].shape == stats["a_hi"].shape == (3,)
  lo, hi = quant.pauta_range(x, lam=rule.lam, channel_axis=-1)
  np.testing.assert_allclose(stats["a_lo"], np.ravel(lo), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(stats["a_hi"], np.ravel(hi), rtol=1e-5, atol=1e-6)
  # The quantized input (evaluation, from the EMA): <= 2^2 levels per channel, each over
  # that channel's range (a per-tensor grid would flatten channel 0 to one level).
  xq = np.asarray(jax.jit(lambda v, x: qm.apply(v, x, mode="quant"))({**variables, **new}, x))
  for c in range(3):
    levels = np.unique(xq[:, c])
    assert 2 <= len(levels) <= 4, (c, levels)
    assert levels.min() >= float(stats["a_lo"][c]) - 1e-5
    assert levels.max() <= float(stats["a_hi"][c]) + 1e-5
  np.testing.assert_allclose(xq, _library_act(x, lo, hi, 2), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("quantizer", ["pq", "lsq"])
def test_quantized_layer_under_jit_with_closed_over_variables(quantizer):
  """The common pattern jax.jit(lambda x: model.apply(variables, x)) must work."""
  x = _randn(10, (4, 8))
  qm = qat.quantize_model(nn.Dense(3), (_rule(quantizer),))
  variables = _variables(qm, x)
  y = jax.jit(lambda x: qm.apply(variables, x, mode="quant"))(x)
  z = jax.jit(lambda v, x: qm.apply(v, x, mode="quant"))(variables, x)
  np.testing.assert_allclose(y, z, rtol=1e-6, atol=1e-6)
  fp = jax.jit(lambda v, x: qm.apply(v, x, mode="fp"))(variables, x)
  assert np.max(np.abs(np.asarray(y) - np.asarray(fp))) > 1e-3  # it did quantize


def test_numpy_variables_are_quantized():
  """numpy leaves (host_variables, jax.device_get, np.load) are quantized too: qwix's
  find_param only recognises jax arrays, so QuantizedModel.apply converts them."""
  x = _randn(10, (4, 8))
  qm = qat.quantize_model(nn.Dense(3), (_rule("pq"),))
  host = host_variables(qm, x)  # numpy leaves
  y = qm.apply(host, x, mode="quant")
  np.testing.assert_allclose(y, qm.apply(jax.tree.map(jnp.asarray, host), x, mode="quant"),
                             rtol=1e-6, atol=1e-6)
