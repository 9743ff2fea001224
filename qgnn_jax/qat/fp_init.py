"""QAT from a full-precision model's trained variables, in one call (README, "Quantize your
own model"; docs/METHOD.md, "QAT from FP variables").

    state = qat.from_fp(qmodel, fp_variables, tx, images, jax.random.key(0))

carries every parameter and BN statistic of the FP model over (same module paths: the
quantized model is the same model), starts each quantizer site fresh (its initial
state, then calibrated on `images`: activation ranges, LSQ steps from the real weights),
and a fresh optimiser state.
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


def from_fp(model: Any, fp_variables: Mapping[str, Any], tx: Any, images: jax.Array,
            rng: jax.Array, calibrate: bool = True):
  """A `train.TrainState` for QAT of `model` starting from `fp_variables`.

  model: a `qat.QuantizedModel` (linen or NNX); fp_variables: the FP model's trained
  {"params", "batch_stats"} (e.g. `state.variables()` of its training); tx: the QAT
  optimiser; images: (B, H, W, C) a batch to initialise with and calibrate on (its first
  two images shape the init); rng: a PRNG key. calibrate: set activation ranges and
  learnable quantizer params from `images` (`train.calibrate`).
  """
  from qgnn_jax import train  # pylint: disable=g-import-not-at-top (train imports qat)
  state = train.create_state(model, tx, images[:2], rng)
  params = carry(state.params, fp_variables.get("params", {}), "params")
  batch_stats = carry(state.batch_stats, fp_variables.get("batch_stats", {}), "batch_stats")
  state = state.replace(params=params, batch_stats=batch_stats)
  if calibrate and getattr(model, "quantized", False):
    state = train.calibrate(model, state, images)
  return state.replace(opt_state=tx.init(state.params))
