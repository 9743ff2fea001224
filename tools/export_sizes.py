"""Export sizes (bytes) of the registered models at fp32, W4A4 and W2A2 (issue 14).

    python tools/export_sizes.py vig_tiny_28:10 vig_ti_224:1000 vig_ti_224:10

Arguments: model[:classes] (default 10 classes).

A size depends only on the model, rules and bits, not on the trained values (codes are
packed to a fixed length; zero points and offsets are per-tensor scalars for these
rules), so the variables here are synthetic: random weights, activation ranges [-1, 1].
The run recipe's rules (`recipe.quant_rules` of experiments/configs/common.py's defaults:
body quantized, stem and head full precision, weights symmetric per channel, activations
asymmetric per tensor) with PQ; `model_bytes_fp32` is the same format at fp32.
"""
import sys

import jax
import jax.numpy as jnp
import numpy as np

from experiments.configs import common
from qgnn_jax import export, models, qat, recipe


def synthetic_variables(model_name, rules, classes):
  model = models.create_model(model_name, classes)
  qm = qat.quantize_model(model, rules)
  x = jax.ShapeDtypeStruct((1,) + models.input_shape(model_name), jnp.float32)
  abstract = jax.eval_shape(lambda x: qm.init(jax.random.PRNGKey(0), x, train=False), x)
  rng = np.random.default_rng(0)

  def fill(path, a):
    name = str(getattr(path[-1], "key", path[-1]))
    if name == "a_count":
      return np.ones(a.shape, a.dtype)
    if name in ("a_lo", "a_hi"):
      return np.full(a.shape, -1.0 if name == "a_lo" else 1.0, a.dtype)
    if not np.issubdtype(a.dtype, np.floating):
      return np.zeros(a.shape, a.dtype)
    return np.abs(rng.normal(0, 0.1, a.shape)).astype(a.dtype) + 1e-3
  return jax.tree_util.tree_map_with_path(fill, abstract)


def main(names):
  print("| model | classes | params | fp32 (bytes) | W4A4 pq (bytes) | W2A2 pq (bytes) | fp32 / W4 | fp32 / W2 |")
  print("|---|---|---|---|---|---|---|---|")
  for arg in names:
    name, _, classes = arg.partition(":")
    classes = int(classes or 10)
    sizes = {}
    for bits in (4, 2):
      c = common.base_config()
      c.model, c.method, c.w_bits, c.a_bits = name, "pq", bits, bits
      rules = recipe.quant_rules(c)
      v = synthetic_variables(name, rules, classes)
      sizes[bits] = export.nbytes(export.build(name, classes, rules, v))
      sizes["fp32"] = export.nbytes(export.build(name, classes, rules, v, fp32=True))
      n = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(v["params"]))
    print(f"| {name} | {classes} | {n:,} | {sizes['fp32']:,} | {sizes[4]:,} | {sizes[2]:,} | "
          f"{sizes['fp32'] / sizes[4]:.2f}x | {sizes['fp32'] / sizes[2]:.2f}x |", flush=True)


if __name__ == "__main__":
  main(sys.argv[1:] or ["vig_tiny_28:10", "vig_ti_224:1000", "vig_ti_224:10"])
