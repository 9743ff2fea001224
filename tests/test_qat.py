"""Tests for qgnn_jax.qat: quantization of any linen model by rules.

* The SQD bypass pattern is a function of the key. (The equivalence with the previous,
  hand-wired implementation, QuantDense inside the ViG, was proven by tests retired with it
  in issue 25; the numbers are in docs/METHOD.md, "The hand-wired model, retired".)
* Any model: a linen model that is not ours (Dense, grouped Conv, DenseGeneral, Einsum)
  trains at W4A4 PQ under pmap on 2 devices exactly as on 1.
* Registry: a quantizer defined and registered inside a test trains a step.
* The private qwix helper we rely on (find_param) behaves as we use it.
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from qgnn_jax.qat import context as qat_context

from qgnn_jax import qat, quant, recipe
from qgnn_jax import train as train_lib
from qgnn_jax.models import LAYER_GROUPS
from qgnn_jax.models.vig import ViG

TINY = dict(num_classes=5, dim=16, depth=2, k=3, stem_strides=(2, 1, 1, 1, 1), head_hidden=16)


def _rel_err(a, b, floor: float = 1e-30) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), floor))


def _tree_rel_err(a, b) -> float:
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  return max(_rel_err(x, y) for x, y in zip(la, lb))


def _vig_rules(quantizer):
  if quantizer == "fp":
    return ()
  return (qat.QuantRule(module_path=LAYER_GROUPS["body"], w_quantizer=quantizer,
                        a_quantizer=quantizer, w_bits=4, a_bits=4),)


@functools.lru_cache(maxsize=None)
def _quantized_vig(quantizer):
  """(QuantizedModel of a tiny ViG, variables after one training step's EMA update, images)."""
  model = qat.quantize_model(ViG(**TINY), _vig_rules(quantizer))
  images = jnp.asarray(np.random.default_rng(0).standard_normal((6, 8, 8, 1)), jnp.float32)
  variables = model.init({"params": jax.random.key(1)}, images, train=False)
  # One training step's EMA update so that eval uses real EMA ranges.
  _, upd = model.apply(variables, images, train=True, mode="quant",
                       mutable=["batch_stats", "quant_stats"])
  return model, {**variables, **upd}, images


@pytest.mark.parametrize("quantizer", ["pq", "lsq"])
def test_same_stochastic_bypass_pattern_for_the_same_key(quantizer):
  new, variables, images = _quantized_vig(quantizer)
  outs = []
  for key in range(4):
    rngs = {"quant": jax.random.key(key)}
    z_new = new.apply(variables, images, train=False, mode="stochastic", bypass_prob=0.5,
                      rngs=rngs)
    z_again = new.apply(variables, images, train=False, mode="stochastic", bypass_prob=0.5,
                        rngs=rngs)
    assert _rel_err(z_new, z_again) == 0
    outs.append(np.asarray(z_new))
  # The keys draw different patterns (the test would pass vacuously otherwise).
  assert any(_rel_err(outs[0], o) > 1e-4 for o in outs[1:])


# ----------------------------------------------------------------------------- any model


class ForeignNet(nn.Module):
  """Not ours: Dense, grouped Conv, DenseGeneral and Einsum, flax layers only."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(8, (3, 3), name="conv")(x)
    x = nn.relu(nn.Conv(8, (1, 1), feature_group_count=4, name="gconv")(x))
    x = x.reshape(x.shape[0], -1, 8)
    x = nn.DenseGeneral((2, 6), name="proj")(x)                    # (B, N, 2, 6)
    x = nn.Einsum((2, 6, 5), "bnhd,hdo->bno", name="mix")(x)        # (B, N, 5)
    x = nn.gelu(x).mean(axis=1)
    return nn.Dense(3, name="out")(x)


FOREIGN_RULES = (qat.full_precision("out"),
                 qat.QuantRule(module_path=".*", w_quantizer="pq", a_quantizer="pq",
                               w_bits=4, a_bits=4))


def test_any_model_every_linear_op_gets_a_site(monkeypatch):
  qm = qat.quantize_model(ForeignNet(), FOREIGN_RULES)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 6, 6, 2)), jnp.float32)
  v = qm.init(jax.random.key(0), x)
  sites = {k for k, s in v["quant_stats"].items() if "quant" in s}
  assert sites == {"conv", "gconv", "proj", "mix"}  # "out" matched the FP rule first
  # The weights the model's ops consumed (the sites' handlers call these for the original
  # ops; recorded by shape) are on the grid: <= 15 values per output channel (symmetric
  # 4-bit); a conv's channel axis is O of its HWIO kernel, DenseGeneral's its features,
  # the einsum's the axes that reach its output (h, o). The FP "out" has all its values.
  used = {}
  for name in ("dot_general", "conv_general_dilated"):
    op = getattr(jax.lax, name)
    monkeypatch.setattr(jax.lax, name, lambda lhs, rhs, *a, _op=op, **k: (
        used.setdefault(np.shape(rhs), np.asarray(rhs)), _op(lhs, rhs, *a, **k))[1])
  einsum = jnp.einsum
  monkeypatch.setattr(jnp, "einsum", lambda spec, *ops, **k: (
      used.setdefault(np.shape(ops[-1]), np.asarray(ops[-1])), einsum(spec, *ops, **k))[1])
  qm.apply(v, x, mode="quant")
  monkeypatch.undo()
  got = {}
  for name, out_axes in [("conv", (3,)), ("gconv", (3,)), ("proj", (1, 2)), ("mix", (0, 2)),
                         ("out", (1,))]:
    w2, _ = qat.site.to_channels_last(used[v["params"][name]["kernel"].shape], out_axes)
    w2 = w2.reshape(-1, w2.shape[-1])
    got[name] = max(len(np.unique(w2[:, c])) for c in range(w2.shape[1]))
  assert all(got[n] <= 15 for n in sites) and got["out"] == 5, got
  # The model's outputs change when quantized, and fp mode is exactly the original.
  z_fp = qm.apply(v, x, mode="fp")
  z_q = qm.apply(v, x, mode="quant")
  plain = ForeignNet().apply({"params": v["params"]}, x)
  assert _rel_err(z_fp, plain) == 0 and _rel_err(z_q, plain) > 1e-3


def test_fp_mode_traces_no_quantizer_op():
  qm = qat.quantize_model(ForeignNet(), FOREIGN_RULES)
  x = jnp.ones((2, 6, 6, 2), jnp.float32)
  v = qm.init(jax.random.key(0), x)
  fp = str(jax.make_jaxpr(lambda v: qm.apply(v, x, mode="fp"))(v))
  q = str(jax.make_jaxpr(lambda v: qm.apply(v, x, mode="quant"))(v))
  assert "round" not in fp and "round" in q


def _foreign_train(n_devices, steps=3):
  qm = qat.quantize_model(ForeignNet(), FOREIGN_RULES)
  rng = np.random.default_rng(0)
  images = rng.standard_normal((8, 6, 6, 2)).astype(np.float32)
  labels = rng.integers(0, 3, 8).astype(np.int32)
  tx = train_lib.make_optimizer("sgd", 0.05, 100)
  state = train_lib.create_state(qm, tx, jnp.asarray(images[:2]), jax.random.key(0))
  state = train_lib.calibrate(qm, state, jnp.asarray(images))
  step = train_lib.make_train_step(qm, tx, train_lib.LossConfig(student_mode="quant"), 3)
  rstate = train_lib.replicate(state, n_devices)
  batch = train_lib.shard_batch({"image": images, "label": labels}, n_devices)
  for _ in range(steps):
    rstate, metrics = step(rstate, batch)
  return train_lib.unreplicate(rstate), metrics


def test_any_model_trains_under_pmap_as_on_one_device():
  assert jax.local_device_count() >= 2, "conftest forces 2 CPU devices"
  one, m1 = _foreign_train(1)
  two, m2 = _foreign_train(2)
  err = _tree_rel_err(two.params, one.params)
  print(f"\nForeignNet W4A4 PQ, 3 SGD steps: max rel |params(2 dev) - params(1 dev)| = {err:.1e}")
  assert err <= 1e-5
  assert _tree_rel_err(two.quant_stats, one.quant_stats) <= 1e-5
  assert abs(float(m1["loss"][0]) - float(m2["loss"][0])) <= 1e-5
  start = train_lib.create_state(qat.quantize_model(ForeignNet(), FOREIGN_RULES),
                                 train_lib.make_optimizer("sgd", 0.05, 100),
                                 jnp.ones((2, 6, 6, 2)), jax.random.key(0))
  assert _tree_rel_err(one.params, start.params) > 1e-4  # it did train


# ----------------------------------------------------------------------------- rules


def test_first_matching_rule_wins_and_unmatched_ops_stay_fp():
  rules = (qat.full_precision("grapher0/fc1"),
           qat.QuantRule(module_path="grapher0/.*", w_quantizer="lsq", a_quantizer="lsq"),
           qat.QuantRule(module_path="ffn.*", w_quantizer="pq", a_quantizer=None))
  v = qat.quantize_model(ViG(**TINY), rules).init(jax.random.key(0), jnp.ones((2, 8, 8, 1)))
  p, s = v["params"], v["quant_stats"]
  assert "quant" not in p["grapher0"]["fc1"] and "fc1" not in s["grapher0"]
  assert set(p["grapher0"]["fc2"]["quant"]) == {"w_step", "a_step"}
  assert set(s["ffn0"]["fc1"]["quant"]) == {"site"}  # weights only: no activation EMA
  assert "grapher1" not in s and "head" not in s and "stem" not in s


@pytest.mark.parametrize("kwargs,needle", [
    (dict(module_path="("), "not a regex"),
    (dict(w_quantizer="dorefa"), "unknown quantizer 'dorefa'"),
    (dict(w_quantizer="pq", w_bits=1), "bits"),
    (dict(a_quantizer="n2uq", a_bits=12), r"a_bits=12 is out of range for n2uq; valid range "
                                          r"is \[2, 8\]"),
    (dict(a_quantizer="pq", a_granularity="row"), "a_granularity"),
    (dict(w_quantizer="pq", lam=0.0), "lam"),
    (dict(ema_momentum=1.0), "ema_momentum"),
    (dict(op_names=("matmul",)), "op_names"),
])
def test_rule_validation_names_the_bad_value(kwargs, needle):
  with pytest.raises(ValueError, match=needle):
    qat.QuantRule(**kwargs)


def test_quantize_model_rejects_reserved_call_arguments_and_bad_settings():
  class TakesMode(nn.Module):
    @nn.compact
    def __call__(self, x, mode="a"):
      return nn.Dense(2)(x)

  with pytest.raises(ValueError, match="reserve"):
    qat.quantize_model(TakesMode(), FOREIGN_RULES)
  with pytest.raises(TypeError, match="linen Module"):
    qat.quantize_model(lambda x: x, FOREIGN_RULES)
  qm = qat.quantize_model(ForeignNet(), FOREIGN_RULES)
  v = qm.init(jax.random.key(0), jnp.ones((1, 6, 6, 2)))
  with pytest.raises(ValueError, match="mode='int8'"):
    qm.apply(v, jnp.ones((1, 6, 6, 2)), mode="int8")
  with pytest.raises(ValueError, match="bypass_prob"):
    qm.apply(v, jnp.ones((1, 6, 6, 2)), mode="stochastic", bypass_prob=1.5)


# ----------------------------------------------------------------------------- registry


class SignQuantizer(quant.Quantizer):
  """A toy entry: x_hat = s * sign(x) with a learnable scale s, plain STE for x."""
  name = "toysign"
  learnable = ("scale",)

  def init_params(self, x, spec):
    return {"scale": jnp.mean(jnp.abs(jax.lax.stop_gradient(x))).astype(jnp.float32)}

  def quantize(self, x, spec, state):
    s = state["scale"].astype(x.dtype)
    return x + jax.lax.stop_gradient(jnp.sign(x) - x) * s + (s - jax.lax.stop_gradient(s)) \
        * jnp.sign(jax.lax.stop_gradient(x))

  def integer(self, x, spec, state):
    return (jnp.sign(x).astype(jnp.int32), state["scale"], jnp.zeros((), jnp.int32))


def test_a_quantizer_registered_in_a_test_trains_a_step():
  quant.register(SignQuantizer())
  try:
    method = recipe.parse_method("toysign+sqd")
    assert method.quantizer == "toysign" and method.sqd
    rules = (qat.QuantRule(module_path=LAYER_GROUPS["body"], w_quantizer="toysign",
                           a_quantizer="pq"),)
    qm = qat.quantize_model(ViG(**TINY), rules)
    images = jnp.asarray(np.random.default_rng(0).standard_normal((4, 8, 8, 1)), jnp.float32)
    tx = train_lib.make_optimizer("adamw", 1e-2, 10, quant_lr=1e-1)
    state = train_lib.create_state(qm, tx, images[:2], jax.random.key(0))
    scale0 = state.params["grapher0"]["fc1"]["quant"]["w_scale"]
    step = train_lib.make_train_step(qm, tx, train_lib.LossConfig(
        student_mode="quant", beta=1.0), 5)
    rstate, metrics = step(train_lib.replicate(state, 1), train_lib.shard_batch(
        {"image": np.asarray(images), "label": np.arange(4, dtype=np.int32)}, 1))
    new = train_lib.unreplicate(rstate)
    assert np.isfinite(float(metrics["loss"][0]))
    assert float(new.params["grapher0"]["fc1"]["quant"]["w_scale"]) != float(scale0)
  finally:
    quant.unregister("toysign")
  with pytest.raises(ValueError, match="unknown quantizer 'toysign'"):
    quant.get_quantizer("toysign")


def test_registry_rejects_duplicates_and_reserved_names():
  with pytest.raises(ValueError, match="already registered"):
    quant.register(quant.QUANTIZERS.get("pq").__class__())

  class Fp(quant.Quantizer):
    name = "fp"
  with pytest.raises(ValueError, match="reserved"):
    quant.QUANTIZERS.register(Fp())


# ----------------------------------------------------------------------------- qwix helper


def test_qwix_find_param_identifies_weights_as_we_use_it():
  """qat.context.find_param (ours since issue 22, with qwix's rules) must find a module's
  param through dtype promotion, eagerly and under jit, and not mistake an activation for
  one."""
  seen = []

  class Probe(nn.Module):
    @nn.compact
    def __call__(self, x):
      k = self.param("kernel", nn.initializers.ones, (3, 4))
      x2, k2 = nn.dtypes.promote_dtype(x, k, dtype=jnp.float32)
      seen.append((qat_context.find_param(self, k2), qat_context.find_param(self, x2)))
      return x2 @ k2

  m = Probe()
  v = m.init(jax.random.key(0), jnp.ones((2, 3)))
  m.apply(v, jnp.ones((2, 3)))
  jax.jit(m.apply)(v, jnp.ones((2, 3)))
  assert seen == [("kernel", None)] * 3


def test_second_op_of_a_module_gets_its_own_site():
  """Per-module op counting (qat.context.next_site_index, keyed on the module's scope):
  a module running two matmuls with its kernel gets sites `quant` and `quant1`, afresh
  on every apply."""

  class Twice(nn.Module):
    @nn.compact
    def __call__(self, x):
      k = self.param("kernel", nn.initializers.lecun_normal(), (4, 4))
      dims = (((x.ndim - 1,), (0,)), ((), ()))
      return jax.lax.dot_general(jax.lax.dot_general(x, k, dims), k, dims)

  rule = qat.QuantRule(".*", w_quantizer="pq", a_quantizer="pq", w_bits=4, a_bits=4)
  qm = qat.quantize_model(Twice(), [rule])
  x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 4)), jnp.float32)
  v = qm.init(jax.random.key(0), x)
  assert set(v["quant_stats"]) == {"quant", "quant1"}
  _, upd = qm.apply(v, x, mutable=["quant_stats"])
  _, upd = qm.apply({**v, **upd}, x, mutable=["quant_stats"])
  assert int(upd["quant_stats"]["quant"]["a_count"]) == 2
  assert int(upd["quant_stats"]["quant1"]["a_count"]) == 2


def test_matmul_inside_a_nested_jit_is_refused_not_half_quantized():
  class MatMul(nn.Module):
    @nn.compact
    def __call__(self, x):
      return x @ self.param("kernel", nn.initializers.lecun_normal(), (4, 4))

  rule = qat.QuantRule(".*", w_quantizer="pq", a_quantizer="pq")
  x = jnp.ones((3, 4), jnp.float32)
  with pytest.raises(ValueError, match="nested jit"):
    jax.jit(lambda x: qat.quantize_model(MatMul(), [rule]).init(jax.random.key(0), x))(x)
  # With a full-precision rule for that module, it runs.
  qm = qat.quantize_model(MatMul(), [qat.full_precision(""), rule])
  assert qm.apply(qm.init(jax.random.key(0), x), x).shape == (3, 4)
