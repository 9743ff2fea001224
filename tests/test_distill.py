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


# ----------------------------------------------------------------------------- the forms


def _np_softmax(z):
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("name", distill.AQD_FORMS.names())
def test_every_aqd_form_is_zero_at_the_teacher_and_trains_only_the_student(name):
  loss = distill.AQD_FORMS.get(name).loss
  t = _feats(jax.random.key(10), SHAPES)
  assert float(loss(t, t, 1.0)) == pytest.approx(0.0, abs=1e-6)
  # A student that differs per node and per channel (a uniform rescale would leave the
  # normalised attention forms unchanged).
  s = [x * (1 + 0.5 * jax.random.uniform(jax.random.key(11), x.shape)) for x in t]
  assert float(loss(s, t, 1.0)) > 1e-4
  g_t = jax.grad(lambda t: loss(s, t, 1.0))(t)
  assert all(float(jnp.abs(g).max()) == 0.0 for g in g_t)
  g_s = jax.grad(lambda s: loss(s, t, 1.0))(s)
  assert all(float(jnp.abs(g).max()) > 0.0 for g in g_s)


def test_attention_transfer_matches_definition():
  s, t = _feats(jax.random.key(12), SHAPES), _feats(jax.random.key(13), SHAPES)
  want = []
  for si, ti in zip(map(np.asarray, s), map(np.asarray, t)):
    qs, qt = (si ** 2).sum(-1), (ti ** 2).sum(-1)
    qs /= np.linalg.norm(qs, axis=-1, keepdims=True)
    qt /= np.linalg.norm(qt, axis=-1, keepdims=True)
    want.append(((qs - qt) ** 2).sum(-1).mean())
  np.testing.assert_allclose(distill.attention_transfer(s, t), np.mean(want), rtol=1e-5)


def test_channel_attention_kl_matches_definition():
  s, t = _feats(jax.random.key(14), SHAPES), _feats(jax.random.key(15), SHAPES)
  tau = 0.5
  want = []
  for si, ti in zip(map(np.asarray, s), map(np.asarray, t)):
    a = lambda f: _np_softmax((f ** 2).mean(1) / (tau * (f ** 2).mean(1).mean(-1, keepdims=True)))
    at, as_ = a(ti), a(si)
    want.append((at * (np.log(at) - np.log(as_))).sum(-1).mean())
  np.testing.assert_allclose(distill.channel_attention_kl(s, t, tau), np.mean(want), rtol=1e-5)


def test_cosine_matches_definition_and_is_bounded():
  zs, zt = np.asarray(jax.random.normal(jax.random.key(16), (2, 6, 5)))
  temp = 2.0
  ps, pt = _np_softmax(zs / temp), _np_softmax(zt / temp)
  want = np.mean(1 - (ps * pt).sum(-1) / (np.linalg.norm(ps, axis=-1) *
                                          np.linalg.norm(pt, axis=-1)))
  got = distill.cosine(jnp.asarray(zs), jnp.asarray(zt), temp)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert 0 < float(got) <= 1
  assert abs(float(distill.cosine(jnp.asarray(zs), jnp.asarray(zs), temp))) < 1e-6
  g = jax.grad(lambda z: distill.cosine(jnp.asarray(zs), z, temp))(jnp.asarray(zt))
  assert float(jnp.abs(g).max()) == 0.0


def test_registries_name_the_field_and_the_valid_forms():
  assert distill.AQD_FORMS.names() == ("channel_mse", "attention_transfer", "channel_attention")
  assert distill.SQD_FORMS.names() == ("bypass_kl", "speq", "stochastic_channels")
  with pytest.raises(ValueError, match="aqd_form='nope'; valid: channel_mse, "):
    distill.AQD_FORMS.get("nope")
  with pytest.raises(ValueError, match="sqd_form='kl'; valid: bypass_kl, speq"):
    distill.SQD_FORMS.get("kl")
  from qgnn_jax import train as T  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match="sqd_form"):
    T.LossConfig("quant", beta=1.0, sqd_form="kl")
  with pytest.raises(ValueError, match="act_bits"):
    T.LossConfig("quant", beta=1.0, sqd_form="speq")  # speq needs its bit choices


# ----------------------------------------------------------------------------- in the train step
# A 3-site model (two token blocks and a head, each a Dense): SQD's teacher must differ from
# the student on every step (with 3 sites and p = 0.25, a per-site draw alone leaves all
# three quantized on 0.75^3 = 42 % of the steps).

import flax.linen as nn  # pylint: disable=g-import-not-at-top,wrong-import-position

from qgnn_jax import qat  # pylint: disable=g-import-not-at-top,wrong-import-position
from qgnn_jax import train as T  # pylint: disable=g-import-not-at-top,wrong-import-position
from qgnn_jax.models.blocks import Stem  # pylint: disable=g-import-not-at-top,wrong-import-position

TAPS = r"block\d"
CLASSES = 4


class _Block(nn.Module):
  axis_name: str = None

  @nn.compact
  def __call__(self, x, train):
    x = nn.Dense(12)(x)
    x = nn.BatchNorm(use_running_average=not train, axis_name=self.axis_name)(x)
    return nn.gelu(x)


class _Tokens(nn.Module):
  """(B, 8, 8, 1) images as 8 tokens of 8 features -> two blocks -> mean -> head."""
  axis_name: str = None

  @nn.compact
  def __call__(self, x, train=False):
    x = x.reshape(x.shape[0], 8, 8)
    x = _Block(self.axis_name, name="block0")(x, train)
    x = _Block(self.axis_name, name="block1")(x, train)
    return nn.Dense(CLASSES, name="head")(x.mean(1))


def _tiny_setup(bits=2, module=_Tokens, sites=".*"):
  """(model, tx, state, batch) of `module` with PQ at the modules matching `sites`."""
  rules = (qat.QuantRule(sites, w_quantizer="pq", a_quantizer="pq", w_bits=bits, a_bits=bits),)
  model = qat.quantize_model(module(axis_name=T.AXIS), rules)
  init_model = qat.quantize_model(module(), rules)
  tx = T.make_optimizer("sgd", 1e-3, total_steps=1000)
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(8, 8, 8, 1)), jnp.float32)
  state = T.create_state(init_model, tx, images, jax.random.key(0))
  state = T.calibrate(init_model, state, images)
  batch = {"image": images, "label": jnp.asarray(rng.integers(0, CLASSES, 8), jnp.int32)}
  return model, tx, state, batch


def _loss_cfg(aqd_form="channel_mse", sqd_form="bypass_kl", alpha=1.0, beta=1.0, p=0.25,
              taps=TAPS):
  return T.LossConfig("quant", alpha=alpha, beta=beta, bypass_prob=p, feature_taps=taps,
                      aqd_form=aqd_form, sqd_form=sqd_form, sqd_act_bits=(4, 8, None))


@pytest.mark.parametrize("sqd_form", distill.SQD_FORMS.names())
def test_sqd_teacher_is_never_the_student(sqd_form):
  model, tx, state, batch = _tiny_setup()
  assert len(qat.site_paths(state.variables())) == 3
  # p = 0 leaves only the guaranteed difference (bypass_kl, stochastic_channels).
  step = T.make_train_step(model, tx, _loss_cfg(sqd_form=sqd_form, alpha=0.0, p=0.0), CLASSES)
  s = T.replicate(state, 1)
  sqd = []
  for _ in range(100):
    s, metrics = step(s, T.shard_batch(batch, 1))
    sqd.append(float(metrics["sqd"][0]))
  assert min(sqd) > 0.0, f"SQD loss 0 on {sum(v == 0 for v in sqd)} of 100 steps"


@pytest.mark.parametrize("sqd_form", distill.SQD_FORMS.names())
def test_teacher_draw_differs_between_steps(sqd_form):
  """The draw is per step (a fixed teacher would be a second, worse student)."""
  model, tx, state, batch = _tiny_setup()
  step = T.make_train_step(model, tx, _loss_cfg(sqd_form=sqd_form, alpha=0.0, p=0.25), CLASSES)
  s = T.replicate(state, 1)
  values = set()
  for _ in range(8):
    s, metrics = step(s, T.shard_batch(batch, 1))
    values.add(round(float(metrics["sqd"][0]), 7))
  assert len(values) > 2


FORM_PAIRS = list(zip(distill.AQD_FORMS.names(), distill.SQD_FORMS.names()))


@pytest.mark.parametrize("aqd_form,sqd_form", FORM_PAIRS)
def test_forms_two_devices_equal_one_device(aqd_form, sqd_form):
  if jax.local_device_count() < 2:
    pytest.skip("needs 2 (forced) CPU devices")
  model, tx, state, batch = _tiny_setup(bits=8)
  step = T.make_train_step(model, tx, _loss_cfg(aqd_form, sqd_form), CLASSES)
  outs = []
  for d in (1, 2):
    s, m = step(T.replicate(state, d), T.shard_batch(batch, d))
    outs.append(jax.device_get((T.unreplicate(s), T.unreplicate(m))))
  (s1, m1), (s2, m2) = outs
  # One teacher draw per step on every device (the same "quant" key): the SQD terms agree
  # to float32 summation order (a different draw changes them by O(1)).
  # Error model: each term is a mean over <= 8 * 8 * 12 products of float32 values of
  # O(1) built in a different summation order on 2 devices; with an 8-bit grid a
  # last-bit change of a synced range moves a code by one step (2^-8 of the range), which
  # bounds the loss change by ~1e-3 relative.
  for k in ("ce", "aqd", "sqd", "loss"):
    np.testing.assert_allclose(m1[k], m2[k], rtol=2e-3, atol=1e-6, err_msg=k)
  for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params)):
    np.testing.assert_allclose(a, b, rtol=2e-3, atol=1e-6)


@pytest.mark.parametrize("aqd_form,sqd_form", FORM_PAIRS)
def test_teacher_passes_leave_the_students_statistics(aqd_form, sqd_form):
  """The teachers' BatchNorm and range updates are dropped: after a step, batch_stats and
  quant_stats equal a step without distillation (whose student pass is the same)."""
  model, tx, state, batch = _tiny_setup()
  out = []
  for cfg in (_loss_cfg(aqd_form, sqd_form, alpha=0.0, beta=0.0), _loss_cfg(aqd_form, sqd_form)):
    s, _ = T.make_train_step(model, tx, cfg, CLASSES)(T.replicate(state, 1),
                                                      T.shard_batch(batch, 1))
    out.append(jax.device_get(T.unreplicate(s)))
  for a, b in zip(jax.tree.leaves((out[0].batch_stats, out[0].quant_stats)),
                  jax.tree.leaves((out[1].batch_stats, out[1].quant_stats))):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def _dots(cfg):
  model, _, state, batch = _tiny_setup()
  fn = lambda p: T.loss_and_metrics(p, state, batch, jax.random.key(1), jax.random.key(2),
                                    model, cfg, CLASSES, state.variables())[0]
  return str(jax.make_jaxpr(fn, axis_env=[(T.AXIS, 1)])(state.params)).count("dot_general")


@pytest.mark.parametrize("aqd_form,sqd_form", FORM_PAIRS)
def test_teacher_passes_absent_when_weights_are_zero(aqd_form, sqd_form):
  one = _dots(_loss_cfg(aqd_form, sqd_form, alpha=0.0, beta=0.0))
  assert one > 0
  assert _dots(_loss_cfg(aqd_form, sqd_form, alpha=1.0, beta=0.0)) == 2 * one
  assert _dots(_loss_cfg(aqd_form, sqd_form, alpha=0.0, beta=1.0)) == 2 * one


def test_speq_draws_the_students_bits_too_and_refuses_learned_steps():
  """speq's teacher: other sites may keep the student's bits; with an LSQ site (a step
  learned per bit width) it is refused with the reason."""
  rules = (qat.QuantRule(".*", w_quantizer="lsq", a_quantizer="lsq", w_bits=2, a_bits=2),)
  qm = qat.quantize_model(_Tokens(), rules)
  x = jnp.ones((2, 8, 8, 1))
  v = qm.init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="range quantizer"):
    qm.apply(v, x, mode="stochastic", teacher=qat.TeacherDraw("precision", 0.0, (4,)),
             rngs={"quant": jax.random.key(0)})


def test_kd_from_a_frozen_fp_model_is_the_kl_to_its_eval_logits():
  model, tx, state, batch = _tiny_setup()
  # A teacher that differs from the student's own weights: the state's params, perturbed.
  teacher = jax.tree.map(lambda x: x * 1.1, state.variables())
  cfg = T.LossConfig("quant", kd_weight=0.5, temperature=2.0)
  fn = lambda p, tv: T.loss_and_metrics(p, state, batch, jax.random.key(1), jax.random.key(2),
                                        model, cfg, CLASSES, tv)
  (loss, (metrics, _)) = jax.vmap(fn, in_axes=(None, None), axis_name=T.AXIS, axis_size=1)(
      state.params, teacher)
  plain = qat.quantize_model(_Tokens(), model.rules)
  z_s, _ = plain.apply(state.variables(), batch["image"], train=True, mode="quant",
                       mutable=["batch_stats", "quant_stats"])
  z_t = plain.apply(teacher, batch["image"], train=False, mode="fp")
  np.testing.assert_allclose(metrics["kd"][0], distill.kl(z_s, z_t, 2.0), rtol=1e-4)
  np.testing.assert_allclose(loss[0], metrics["ce"][0] + 0.5 * metrics["kd"][0], rtol=1e-6)
  # Only the student is differentiated; the pass is absent when its weight is 0.
  g_t = jax.grad(lambda tv: jax.vmap(fn, in_axes=(None, None), axis_name=T.AXIS,
                                     axis_size=1)(state.params, tv)[0][0])(teacher)
  assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(g_t))
  assert _dots(T.LossConfig("quant", kd_weight=1.0)) == 2 * _dots(T.LossConfig("quant"))
  with pytest.raises(ValueError, match="teacher_variables"):
    T.make_train_step(model, tx, cfg, CLASSES)
  # Through the pmap-ed step: the same KD term (the teacher replicated on 1 device).
  step = T.make_train_step(model, tx, cfg, CLASSES, teacher_variables=teacher, num_devices=1)
  _, m = step(T.replicate(state, 1), T.shard_batch(batch, 1))
  np.testing.assert_allclose(m["kd"][0], metrics["kd"][0], rtol=1e-5)


def test_kd_method_needs_init_from():
  from experiments.configs.common import base_config  # pylint: disable=g-import-not-at-top
  from qgnn_jax import recipe, run_config  # pylint: disable=g-import-not-at-top
  assert recipe.parse_method("pq+aqd+kd") == recipe.Method("pq", aqd=True, kd=True)
  c = base_config()
  c.method = "pq+kd"
  with pytest.raises(run_config.ConfigError, match="init_from"):
    run_config.validate(c)
  assert recipe.loss_config(c).kd_weight == 1.0


@pytest.mark.parametrize("aqd_form,sqd_form", FORM_PAIRS)
def test_teacher_passes_add_no_backward(aqd_form, sqd_form):
  """Each teacher pass adds one forward to the differentiated step and nothing to its
  backward: the teachers' inputs are constants, so autodiff keeps no residuals for them."""
  model, _, state, batch = _tiny_setup()

  def grad_dots(cfg):
    fn = lambda p: T.loss_and_metrics(p, state, batch, jax.random.key(1), jax.random.key(2),
                                      model, cfg, CLASSES, state.variables())[0]
    return str(jax.make_jaxpr(jax.grad(fn), axis_env=[(T.AXIS, 1)])(state.params)).count(
        "dot_general")
  forward = _dots(_loss_cfg(aqd_form, sqd_form, alpha=0.0, beta=0.0))
  student = grad_dots(_loss_cfg(aqd_form, sqd_form, alpha=0.0, beta=0.0))
  assert student > 2 * forward  # forward + the backward's products
  assert grad_dots(_loss_cfg(aqd_form, sqd_form)) == student + 2 * forward
  assert grad_dots(T.LossConfig("quant", kd_weight=1.0)) == student + forward


class _StemTokens(nn.Module):
  """The ViG's full-precision stem (convs + the custom-VJP BatchNorm / GELU), then _Tokens'
  quantized blocks and head: (B, 8, 8, 1) -> (B, CLASSES)."""
  axis_name: str = None

  @nn.compact
  def __call__(self, x, train=False):
    x = Stem((4, 8, 1), (1, 1, 1), self.axis_name, name="stem")(x, train=train)
    return _Tokens(self.axis_name, name="tokens")(x, train)


def test_teachers_reuse_the_students_full_precision_stem():
  """Before the first quantized site the teachers compute what the student computes (same
  variables, same batch statistics): XLA's common-subexpression elimination merges those
  layers, so AQD + SQD add no stem convolution to the compiled step (docs/METHOD.md,
  "What a teacher pass costs"). The control compiles the same step with CSE off: the
  teachers' stems are then there, so the count can tell."""
  model, tx, state, batch = _tiny_setup(module=_StemTokens, sites=r"tokens/.*")
  batch = T.shard_batch(batch, 1)

  def convolutions(cfg, options=None):
    step = T.make_train_step(model, tx, cfg, CLASSES)
    lowered = getattr(step, "func", step).lower(T.replicate(state, 1), batch)
    return lowered.compile(options).as_text().count("convolution(")
  both = _loss_cfg("channel_mse", "stochastic_channels", taps=r"tokens/block\d")
  student = convolutions(_loss_cfg(alpha=0.0, beta=0.0))
  assert student > 0
  assert convolutions(both) == student
  # Each teacher's stem holds 3 convolutions when nothing merges it.
  assert convolutions(both, {"xla_disable_hlo_passes": "cse"}) >= student + 2 * 3
