"""NNX models through `qat.quantize_model` (docs/METHOD.md, "NNX models"): the same
rules, modes, site state and AQD taps as linen models; the train step under pmap, the
export and its integer path take them; nnx.bridge.ToLinen is refused with the way out."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from qgnn_jax import export, qat
from qgnn_jax import train as T

NUM_CLASSES = 10


class Block(nnx.Module):
  def __init__(self, cin, cout, strides, axis_name, rngs):
    self.conv = nnx.Conv(cin, cout, (3, 3), strides=strides, rngs=rngs)
    self.bn = nnx.BatchNorm(cout, axis_name=axis_name, rngs=rngs)

  def __call__(self, x, train):
    return nnx.relu(self.bn(self.conv(x), use_running_average=not train))


class CNN(nnx.Module):  # a user's NNX model: nothing of qgnn_jax inside
  def __init__(self, rngs, axis_name=None):
    self.stem = nnx.Conv(1, 8, (3, 3), rngs=rngs)
    self.block1 = Block(8, 16, 2, axis_name, rngs)
    self.block2 = Block(16, 16, 1, axis_name, rngs)
    self.head = nnx.Linear(16, NUM_CLASSES, rngs=rngs)

  def __call__(self, x, train: bool = False):
    x = nnx.relu(self.stem(x))
    x = self.block2(self.block1(x, train), train)
    return self.head(x.mean(axis=(1, 2)))


RULES = (qat.full_precision("stem|head"),
         qat.QuantRule(".*", w_quantizer="pq", a_quantizer="pq", w_bits=4, a_bits=4))


def _batch(n=8, seed=0):
  rng = np.random.default_rng(seed)
  return {"image": rng.standard_normal((n, 8, 8, 1)).astype(np.float32),
          "label": (np.arange(n) % NUM_CLASSES).astype(np.int32)}


def test_fp_mode_is_the_nnx_model_and_init_keeps_its_values():
  m = CNN(nnx.Rngs(0))
  qm = qat.quantize_model(m, RULES)
  x = jnp.asarray(_batch()["image"])
  v = qm.init(jax.random.key(1), x, train=False)
  np.testing.assert_array_equal(v["params"]["block1"]["conv"]["kernel"],
                                m.block1.conv.kernel.get_value())
  assert set(v["quant_stats"]) == {"block1", "block2"}
  assert set(v["quant_stats"]["block1"]["conv"]) == {"quant"}
  np.testing.assert_array_equal(qm.apply(v, x, train=False, mode="fp"), m(x))
  assert float(jnp.abs(qm.apply(v, x, train=False) - m(x)).max()) > 1e-3


def test_two_devices_equal_one_device_pq_aqd_sqd_w4a4(record_property):
  """One SGD step of W4A4 PQ + AQD + SQD on 2 forced CPU devices equals 1 device."""
  if jax.local_device_count() < 2:
    pytest.skip("needs 2 (forced) CPU devices")
  model = qat.quantize_model(CNN(nnx.Rngs(0), axis_name=T.AXIS), RULES)
  init_model = qat.quantize_model(CNN(nnx.Rngs(0)), RULES)
  tx = T.make_optimizer("sgd", 0.01, total_steps=10, weight_decay=0.0)
  batch = _batch(8, seed=3)
  state = T.create_state(init_model, tx, jnp.asarray(batch["image"][:2]), jax.random.key(0))
  state = T.calibrate(init_model, state, jnp.asarray(_batch(8, seed=1)["image"]))
  loss_cfg = T.LossConfig(student_mode="quant", alpha=0.1, feature_taps=r"block\d",
                          beta=3.0)
  step = T.make_train_step(model, tx, loss_cfg, NUM_CLASSES)
  outs = []
  for d in (1, 2):
    s, metrics = step(T.replicate(state, d), T.shard_batch(batch, d))
    outs.append(jax.device_get((T.unreplicate(s), T.unreplicate(metrics))))
  (s1, m1), (s2, m2) = outs
  assert m1["aqd"] > 0 and m1["sqd"] > 0  # the taps and the teacher ran
  diff = lambda a, b: max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
                          for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  errs = {"params": diff(s1.params, s2.params), "batch_stats": diff(s1.batch_stats,
                                                                    s2.batch_stats),
          "quant_stats": diff(s1.quant_stats, s2.quant_stats),
          "loss": abs(float(m1["loss"]) - float(m2["loss"]))}
  print("\nNNX W4A4 pq+aqd+sqd, 1 vs 2 devices, max abs diff:", errs)
  record_property("max_abs_diff", errs)
  assert errs["quant_stats"] <= 1e-6 and errs["batch_stats"] <= 1e-5, errs
  assert errs["params"] <= 1e-5 and errs["loss"] <= 1e-5, errs
  assert not jax.tree.all(jax.tree.map(lambda a, b: bool(np.all(a == b)),
                                       s1.params, state.params))  # it trained


def test_export_integer_path_equals_fake_quant(tmp_path):
  qm = qat.quantize_model(CNN(nnx.Rngs(0)), RULES)
  x = jnp.asarray(_batch(16, seed=2)["image"])
  tx = optax.sgd(0.0)
  state = T.calibrate(qm, T.create_state(qm, tx, x[:2], jax.random.key(0)), x)
  variables = state.variables()
  payload = export.build(qm, NUM_CLASSES, None, variables, input_shape=(8, 8, 1))
  path = str(tmp_path / "cnn.qgx")
  export.save(path, payload)
  with pytest.raises(export.ExportError, match=r"model=CNN\(\.\.\.\)"):
    export.load(path)
  e = export.load(path, model=CNN(nnx.Rngs(5)))
  ref = np.asarray(qm.apply(variables, x, train=False))
  out = np.asarray(e.apply(x))
  assert e.integer_sites == len(e.plans) == 2
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
  assert (out.argmax(-1) == ref.argmax(-1)).all()


def test_an_nnx_model_without_train_gets_train_and_eval_modes():
  class Net(nnx.Module):
    def __init__(self, rngs):
      self.fc = nnx.Linear(4, 4, rngs=rngs)
      self.bn = nnx.BatchNorm(4, rngs=rngs)

    def __call__(self, x):  # train / eval through use_running_average (model.train())
      return self.bn(self.fc(x))

  qm = qat.quantize_model(Net(nnx.Rngs(0)), [qat.QuantRule("fc", w_quantizer="pq")])
  x = jnp.asarray(np.random.default_rng(0).standard_normal((6, 4)), jnp.float32)
  v = qm.init(jax.random.key(0), x, train=False)
  _, upd = qm.apply(v, x, train=True, mutable=["batch_stats"])
  assert float(jnp.abs(upd["batch_stats"]["bn"]["mean"]).max()) > 0  # batch statistics
  y = qm.apply(v, x, train=False)
  fc = np.asarray(qm.apply(v, x, train=False, mode="fp"))
  assert y.shape == fc.shape == (6, 4)


def test_tolinen_is_refused_with_the_way_out():
  with pytest.raises(TypeError, match=r"pass the NNX model itself"):
    qat.quantize_model(nnx.bridge.ToLinen(CNN, args=()), RULES)

  class Outer(nn.Module):  # a linen model holding an NNX one through ToLinen
    @nn.compact
    def __call__(self, x):
      return nnx.bridge.ToLinen(CNN, name="inner")(x)

  x = jnp.zeros((2, 8, 8, 1))
  with pytest.raises(TypeError, match=r"nnx.bridge.ToLinen at 'inner'"):
    qat.quantize_model(Outer(), RULES).init(jax.random.key(0), x)


def test_rngs_held_by_the_model_are_refused():
  class Drop(nnx.Module):
    def __init__(self, rngs):
      self.fc = nnx.Linear(4, 4, rngs=rngs)
      self.drop = nnx.Dropout(0.5, rngs=rngs)

    def __call__(self, x):
      return self.drop(self.fc(x))

  with pytest.raises(TypeError, match="rng state"):
    qat.quantize_model(Drop(nnx.Rngs(0)), RULES)
