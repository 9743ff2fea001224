"""The export's fallbacks besides per-channel activation scales (tests/test_export.py): a site
whose grid does not allow int8 operands runs on dequantized weights, `plans` names why, and
the loaded model still computes what fake quantization does."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qgnn_jax import export, qat
from test_export import TOY_SHAPE, _Toy, _fake_quant, _roundtrip


def _calibrated(rule):
  """(quantized toy model, variables calibrated on a batch, the batch): random weights."""
  qm = qat.quantize_model(_Toy(), (rule,))
  x = jax.random.normal(jax.random.PRNGKey(1), (16,) + TOY_SHAPE)
  abstract = jax.eval_shape(lambda x: qm.init(jax.random.PRNGKey(0), x, train=False), x)
  rng = np.random.default_rng(0)
  v = jax.tree_util.tree_map(
      lambda a: jnp.asarray(rng.normal(0, 0.3, a.shape).astype(a.dtype)
                            if jnp.issubdtype(a.dtype, jnp.floating) else np.zeros(a.shape, a.dtype)),
      abstract)
  v["batch_stats"] = jax.tree_util.tree_map(lambda a: jnp.abs(a) + 0.5, v["batch_stats"])
  upd = jax.jit(lambda v, x: qm.apply(v, x, train=False, calibrate=True,
                                       mutable=["params", "quant_stats"])[1])(v, x)
  return qm, {**v, **upd}, x


@pytest.mark.parametrize("rule_kw,reason", [
    (dict(w_quantizer="minmax", a_quantizer="pq", w_bits=4, a_bits=4, w_symmetric=False),
     "weight grid has a non-integer zero point"),
    (dict(w_quantizer="pq", a_quantizer="pq", w_bits=10, a_bits=10),
     "weight codes minus zero point do not fit int8"),
    (dict(a_quantizer="pq", a_bits=4), "the rule quantizes only the activation"),
    (dict(w_quantizer="pq", w_bits=4), "the rule quantizes only the weight"),
])
def test_each_fallback_is_named_and_equals_fake_quant(tmp_path, rule_kw, reason):
  rule = qat.QuantRule(module_path="conv|gdense|conv2", **rule_kw)
  qm, v, x = _calibrated(rule)
  path, _ = _roundtrip(tmp_path, _Toy(), (rule,), v, input_shape=TOY_SHAPE)
  e = export.load(path, model=_Toy())
  assert e.plans and all(not p.integer and reason in p.reason for p in e.plans.values()), e.plans
  ref = _fake_quant(qm, v, x)
  np.testing.assert_allclose(e.apply(x), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
