"""Post-training quantization (docs/METHOD.md, "Post-training quantization"): calibration
on N batches, the per-site range search, and a `--config.ptq=true` run that evaluate and
export take."""
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs import quickstart
from qgnn_jax import experiment, export, qat
from qgnn_jax import workdir as workdir_lib
from qgnn_jax.qat import ptq  # noqa: F401  (ptq.LAMS etc.)


class CNN(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.relu(nn.Conv(16, (3, 3), name="conv1")(x))
    x = nn.gelu(nn.Conv(32, (3, 3), strides=2, name="conv2")(x))
    x = nn.relu(nn.Dense(64, name="fc")(x.mean(axis=(1, 2))))
    return nn.Dense(10, name="head")(x)


def _batches(n=3):
  return [jnp.asarray(np.random.default_rng(i).standard_normal((32, 12, 12, 3)), jnp.float32)
          for i in range(n)]


@pytest.mark.parametrize("quantizer", ["pq", "minmax"])
def test_search_never_loses_to_the_fixed_range_and_helps_at_8_bits(quantizer):
  xs = _batches()
  fp = CNN().init(jax.random.key(0), xs[0])
  ref = CNN().apply(fp, xs[0])
  errs = {}
  for search in (False, True):
    qm = qat.quantize_model(CNN(), [qat.QuantRule(".*", w_quantizer=quantizer, a_quantizer=quantizer,
                                                  w_bits=8, a_bits=8)])
    v = qm.init(jax.random.key(1), xs[0])
    v = {**v, "params": qat.fp_init.carry(v["params"], fp["params"], "params")}
    v, choices = qat.post_training_quantize(qm, v, xs, search=search)
    errs[search] = float(jnp.mean(jnp.square(qm.apply(v, xs[0]) - ref)))
    if search:
      assert len(choices) == 4 and {c.kind for c in choices} == \
          {"lam" if quantizer == "pq" else "shrink"}
      fixed = 2.5 if quantizer == "pq" else 1.0
      for c in choices:  # the winner's error is the least, the fixed one's among them
        assert min(c.errors) == c.errors[c.values.index(c.value)] <= \
            c.errors[c.values.index(fixed)]
        assert int(v["quant_stats"][c.key.split("/")[0]]["quant"]["a_count"]) == len(xs)
  assert errs[True] <= errs[False] * 1.01, errs
  if quantizer == "pq":  # lambda = 2.5 clips 8-bit activations far too much
    assert errs[True] < errs[False] / 10, errs


def test_calibrate_needs_a_batch():
  qm = qat.quantize_model(CNN(), [qat.QuantRule(".*", w_quantizer="pq", a_quantizer="pq")])
  v = qm.init(jax.random.key(0), _batches(1)[0])
  with pytest.raises(ValueError, match="at least one batch"):
    qat.calibrate(qm, v, [])


def _config(**kw):
  c = quickstart.get_config()
  c.pretrain_fp_epochs, c.method, c.num_steps, c.batch_size = 0.0, "fp", 4, 32
  c.eval_batch_size, c.log_every, c.checkpoint_every = 400, 1, 2
  c.eval_every_epochs, c.progress = 0.0, False
  for k, v in kw.items():
    setattr(c, k, v)
  return c


def test_ptq_run_writes_a_workdir_that_evaluate_and_export_take(tmp_path):
  fp_dir = str(tmp_path / "fp")
  fp = experiment.train_and_evaluate(_config(), fp_dir)
  wd = str(tmp_path / "ptq")
  res = experiment.train_and_evaluate(
      _config(method="pq", w_bits=8, a_bits=8, init_from=fp_dir, ptq=True, ptq_batches=2), wd)
  assert res["train_steps"] == 0 and res["fp_top1"] == fp["top1"]
  assert os.path.exists(os.path.join(wd, "ptq.json"))
  again = workdir_lib.evaluate_checkpoint(wd)
  assert again["top1"] == res["top1"]
  out = workdir_lib.export_workdir(wd, str(tmp_path / "ptq.qgx"))
  assert out["bytes"] == res["model_bytes_quantized"]
  with pytest.raises(ValueError, match="init_from"):
    experiment.train_and_evaluate(_config(method="pq", ptq=True), str(tmp_path / "x"))
