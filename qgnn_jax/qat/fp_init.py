"""The FP model's trained variables carried into a quantized model's (docs/METHOD.md, "QAT
from FP variables").

`carry` copies every parameter and BN statistic outside the quantizer sites (same module
paths: the quantized model is the same model) and keeps the sites' own leaves; a pure
function of two variable trees. `train.from_fp` builds a whole QAT train state with it.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Tuple

import jax
import jax.numpy as jnp
from flax import traverse_util

from qgnn_jax.qat import site as site_lib


def _flat(tree: Any) -> Dict[Tuple[str, ...], Any]:
  if not tree:
    return {}
  plain = jax.tree_util.tree_map(lambda x: x, dict(tree))
  return {tuple(str(k) for k in path): v
          for path, v in traverse_util.flatten_dict(_unfreeze(plain)).items()}


def _unfreeze(tree):
  if isinstance(tree, Mapping):
    return {k: _unfreeze(v) for k, v in tree.items()}
  return tree


def carry(target: Any, source: Any, collection: str) -> Any:
  """`target` (a collection of the quantized model's variables) with every leaf outside
  the quantizer sites taken from `source` (the FP model's); site leaves keep target's.

  Raises ValueError naming the paths that are missing on either side or differ in shape
  (then `source` is not this model's: another architecture or config).
  """
  t, s = _flat(target), _flat(source)
  own = {k for k in t if not any(site_lib.is_site_name(p) for p in k[:-1])}
  missing = sorted("/".join(k) for k in own - set(s))
  extra = sorted("/".join(k) for k in set(s) - own)
  shapes = sorted(f"{'/'.join(k)} {tuple(jnp.shape(s[k]))} vs {tuple(jnp.shape(t[k]))}"
                  for k in own & set(s) if jnp.shape(s[k]) != jnp.shape(t[k]))
  if missing or extra or shapes:
    raise ValueError(
        f"from_fp: the FP {collection} do not fit the model: missing {missing[:4]}, "
        f"unexpected {extra[:4]}, shapes differ {shapes[:4]} (is it the same model and "
        f"config?)")
  out = dict(t)
  for k in own:
    out[k] = jnp.asarray(s[k], t[k].dtype)
  return traverse_util.unflatten_dict(out)
