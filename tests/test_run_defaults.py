"""What the run configs set by default and nothing else checked: DropPath as the configs
configure it (cifar10_fp: drop_path 0.1) and the periodic evaluation (eval_every_epochs)."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from experiments.configs import quickstart
from qgnn_jax import experiment, recipe


def test_drop_path_from_the_config_drops_in_training_only():
  c = quickstart.get_config()
  c.method, c.drop_path = "fp", 0.1
  model = recipe.build_model(c, 10)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 8, 8, 1)), jnp.float32)
  v = model.init(jax.random.key(0), x)
  train = jax.jit(lambda k: model.apply(v, x, train=True, mode="fp", rngs={"dropout": k},
                                        mutable=["batch_stats", "quant_stats"])[0])
  a, b = train(jax.random.key(1)), train(jax.random.key(2))
  assert float(jnp.max(jnp.abs(a - b))) > 1e-4  # another draw, other blocks dropped
  ev = jax.jit(lambda: model.apply(v, x, train=False, mode="fp"))
  np.testing.assert_array_equal(ev(), ev())
  c.drop_path = 0.0
  plain = recipe.build_model(c, 10)
  train0 = jax.jit(lambda k: plain.apply(v, x, train=True, mode="fp", rngs={"dropout": k},
                                         mutable=["batch_stats", "quant_stats"])[0])
  np.testing.assert_array_equal(train0(jax.random.key(1)), train0(jax.random.key(2)))


def test_periodic_evaluation_as_eval_every_epochs_says(tmp_path):
  c = quickstart.get_config()
  c.pretrain_fp_epochs, c.method, c.num_steps, c.batch_size = 0.0, "fp", 4, 32
  c.eval_batch_size, c.checkpoint_every, c.progress, c.log_every = 400, 2, False, 1
  c.eval_every_epochs = 0.05  # 1,438 / 32 = 44 steps an epoch: every int(0.05 * 44) = 2 steps
  experiment.train_and_evaluate(c, str(tmp_path))
  with open(os.path.join(tmp_path, "metrics.jsonl")) as f:
    evals = [r for r in map(json.loads, f) if r["split"] == "test"]
  # Step 2 periodically; step 4 is the last, evaluated once, as the final evaluation.
  assert [(r["step"], bool(r.get("final"))) for r in evals] == [(2, False), (4, True)]
  assert all(r["count"] == 359 and 0 <= r["top1"] <= 1 for r in evals)
