"""The run config's loss reaches the train step (recipe.loss_config): CE + alpha AQD +
beta SQD, with tau, p, T and label smoothing taken from the config, each term only when the
method names it."""
import jax
import numpy as np
import pytest

from experiments.configs import quickstart
from qgnn_jax import recipe
from qgnn_jax import train as T


def _config(**kw):
  c = quickstart.get_config()
  c.aqd_alpha, c.aqd_tau, c.sqd_beta, c.sqd_p = 0.3, 1.7, 2.5, 0.35
  c.sqd_temperature, c.label_smoothing = 3.5, 0.15
  for k, v in kw.items():
    setattr(c, k, v)
  return c


@pytest.mark.parametrize("method,alpha,beta", [("pq+aqd+sqd", 0.3, 2.5), ("pq+sqd", 0.0, 2.5),
                                               ("pq+aqd", 0.3, 0.0), ("pq", 0.0, 0.0),
                                               ("fp", 0.0, 0.0)])
def test_loss_config_takes_the_configs_weights_and_temperatures(method, alpha, beta):
  lc = recipe.loss_config(_config(method=method))
  assert lc.student_mode == ("fp" if method == "fp" else "quant")
  assert (lc.alpha, lc.beta) == (alpha, beta)
  assert (lc.tau, lc.bypass_prob, lc.temperature, lc.label_smoothing) == (1.7, 0.35, 3.5, 0.15)


def test_the_train_steps_loss_is_ce_plus_the_weighted_distillation_terms():
  config = _config(method="pq+aqd+sqd", w_bits=4, a_bits=4)
  lc = recipe.loss_config(config)
  model = recipe.build_model(config, 10, axis_name=T.AXIS)
  init_model = recipe.build_model(config, 10)
  rng = np.random.default_rng(0)
  images = jax.numpy.asarray(rng.normal(size=(8, 8, 8, 1)), jax.numpy.float32)
  batch = {"image": images, "label": jax.numpy.asarray(rng.integers(0, 10, 8), jax.numpy.int32)}
  tx = T.make_optimizer("adamw", 1e-3, 10)
  state = T.calibrate(init_model, T.create_state(init_model, tx, images[:2], jax.random.key(0)),
                      images)
  step = T.make_train_step(model, tx, lc, 10)
  _, m = step(T.replicate(state, 1), T.shard_batch(batch, 1))
  m = {k: float(v[0]) for k, v in jax.device_get(m).items()}
  assert m["aqd"] > 0 and m["sqd"] > 0 and m["ce"] > 0
  assert m["loss"] == pytest.approx(m["ce"] + 0.3 * m["aqd"] + 2.5 * m["sqd"], rel=1e-6)
