"""Compare the compiled train steps of two checkouts (issue 12: old QuantDense ViG vs qat).

XLA cost analysis (flops, bytes accessed) and HLO instruction count of `make_train_step`
for vig_tiny_28, batch 128, 1 device, fp / pq / pq+aqd+sqd. Run once per checkout:

    PYTHONPATH=<old checkout> python experiments/results/bench/compare_programs.py old
    PYTHONPATH=. python experiments/results/bench/compare_programs.py new

(the old API, before commit 7bc9a90, took a QuantConfig; the new one rules). Results of
2026-12-03: identical for fp and pq; pq+aqd+sqd within 16 instructions (README note).
"""
import sys

import jax
import jax.numpy as jnp
import numpy as np
which = sys.argv[1]
from qgnn_jax import train as T
from qgnn_jax.models import create_model
rng = np.random.default_rng(0)
host = {"image": rng.standard_normal((128, 28, 28, 1), np.float32), "label": rng.integers(0, 10, 128).astype(np.int32)}
data = T.shard_batch(host, 1)
out = {}
for method in ["fp", "pq", "pq+aqd+sqd"]:
  q = method.split("+")[0]
  lc = dict(student_mode="fp" if q == "fp" else "quant", alpha=0.1 if "aqd" in method else 0.0, beta=3.0 if "sqd" in method else 0.0)
  if which == "old":
    from qgnn_jax.layers import QuantConfig
    cfg = QuantConfig.from_method(method, 4, 4)
    model = create_model("vig_tiny_28", 10, cfg, axis_name=T.AXIS); init_model = create_model("vig_tiny_28", 10, cfg)
    loss = T.LossConfig(**lc)
  else:
    from qgnn_jax import qat
    from qgnn_jax.models import FEATURE_TAPS, LAYER_GROUPS
    rules = () if q == "fp" else (qat.QuantRule(LAYER_GROUPS["body"], w_quantizer=q, a_quantizer=q),)
    model = qat.quantize_model(create_model("vig_tiny_28", 10, axis_name=T.AXIS), rules); init_model = model
    loss = T.LossConfig(feature_taps=FEATURE_TAPS, **lc)
  tx = T.make_optimizer("adamw", 1e-3, 1000, 10)
  st = jax.eval_shape(lambda: T.create_state(init_model, tx, jnp.zeros((2, 28, 28, 1)), jax.random.key(0)))
  rs = jax.tree.map(lambda s: jax.ShapeDtypeStruct((1,) + s.shape, s.dtype), st)
  step = T.make_train_step(model, tx, loss, 10)
  low = step.lower(rs, jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), data))
  comp = low.compile()
  txt = comp.as_text()
  ca = comp.cost_analysis(); ca = ca[0] if isinstance(ca, (list, tuple)) else ca
  out[method] = {"flops": ca.get("flops"), "bytes": ca.get("bytes accessed"), "hlo_instructions": sum(1 for l in txt.splitlines() if " = " in l)}
  print(which, method, out[method], flush=True)
