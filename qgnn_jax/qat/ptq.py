"""Post-training quantization: calibrate a trained model's quantizer sites on N batches and
search each site's activation range (docs/METHOD.md, "Post-training quantization").

    variables = qat.calibrate(qmodel, fp_variables, batches)            # ranges: N batches
    variables, choices = qat.post_training_quantize(qmodel, fp_variables, batches)  # + search

`calibrate`: the first batch re-initialises every site (learnable params from the data,
the activation range reset to the batch's), each further batch updates the activation
ranges' EMA (the rule's `ema_momentum`), as training would without a gradient step.

`search_ranges`: for each site whose activation quantizer keeps a range (PQ, min-max),
the candidate ranges of every calibration batch, and the mean squared quantization error
of the site's input under each, on the full-precision forward of the model (each site
sees the FP activations). The candidates:

  * PQ: mu -+ lam sigma clipped to the batch's [min, max] (PQ's own `batch_range`) for
    each lam in `LAMS`;
  * min-max (and any other range quantizer): the batch's range scaled by each factor in
    `SHRINKS` (1 = min-max itself; an MSE search over clipping).

The candidate with the least error summed over the batches wins, and the site's EMA range
becomes that candidate's range averaged over the batches (a_count = the batch count).
Weights keep the rule's grid (PQ: its `lam`; docs/METHOD.md says why).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from qgnn_jax.qat import model as qat_model
from qgnn_jax.qat import site as site_lib
from qgnn_jax.qat.site import CallSettings
from qgnn_jax.qat.sites import site_name, takes_train

# Candidate lambdas of PQ's activation range (the range is clipped to [min, max], so a
# large lambda is min-max) and shrink factors of min-max's.
LAMS: Tuple[float, ...] = (1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 8.0, 12.0, 16.0, 32.0)
SHRINKS: Tuple[float, ...] = (1.0, 0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3)
PTQ = "ptq"  # the collection the search pass writes


def candidates(entry, spec) -> Tuple[str, Tuple[float, ...]]:
  """("lam", LAMS) for PQ, ("shrink", SHRINKS) for the other range quantizers."""
  del spec
  return ("lam", LAMS) if entry.name == "pq" else ("shrink", SHRINKS)


def _ranges(entry, spec, x2: jax.Array) -> Tuple[jax.Array, jax.Array]:
  """(K, ...) lo and hi of the candidate ranges of x2 (channels last)."""
  kind, values = candidates(entry, spec)
  if kind == "lam":
    pairs = [entry.batch_range(x2, dataclasses.replace(spec, lam=float(v))) for v in values]
  else:
    lo, hi = entry.batch_range(x2, spec)
    pairs = [(lo * v, hi * v) for v in values]
  return jnp.stack([p[0] for p in pairs]), jnp.stack([p[1] for p in pairs])


class _Search(qat_model._Provider):  # pylint: disable=protected-access
  """Runs the model in full precision; at each range-quantized site writes the candidate
  ranges of its input and their quantization errors (collection `ptq`)."""

  def _site(self, module, rule, op_name, op, x, x_axes, w, w_axes, layout):
    del op_name, layout, w_axes
    name = site_name(qat_model._next_site_index(module))  # pylint: disable=protected-access
    entry, spec = rule.act_entry, rule.act_spec
    if entry is not None and entry.tracks_range:
      x2, _ = site_lib.to_channels_last(x.astype(jnp.float32), x_axes)
      lo, hi = _ranges(entry, spec, x2)
      err = jnp.stack([jnp.mean(jnp.square(
          entry.quantize(x2, spec, {"lo": lo[k], "hi": hi[k], "numel": x2.size}) - x2))
          for k in range(lo.shape[0])])
      scope = module.scope.push(name, reuse=True)
      for n, v in (("err", err), ("lo", lo), ("hi", hi)):
        scope.put_variable(PTQ, n, v)
    return op(x, w)


def _kw(model) -> Dict[str, Any]:
  return {"train": False} if model.takes_train else {}


@functools.lru_cache(maxsize=8)
def _calibrate_fn(model):
  def step(variables, x, first):
    with site_lib.call_settings(CallSettings(mode="quant", calibrate=first)):
      _, new = model.module.apply(variables, x, mutable=["params", "quant_stats"] if first
                                  else ["quant_stats"], **_kw(model))
    return new
  return jax.jit(step, static_argnums=2)


def calibrate(model, variables: Mapping[str, Any], batches: Iterable[jax.Array]
              ) -> Dict[str, Any]:
  """Variables with every site calibrated on `batches` (module docstring).

  model: a `qat.QuantizedModel`; variables: its variables (e.g. `train.from_fp(...)`'s, or
  the FP model's params / batch_stats with fresh site state from `model.init`);
  batches: (B, H, W, C) float arrays (at least one).
  """
  variables = dict(variables)
  fn = _calibrate_fn(model)
  n = 0
  for x in batches:
    new = fn(variables, jnp.asarray(x), n == 0)
    variables.update(new)
    n += 1
  if n == 0:
    raise ValueError("calibrate: batches is empty; give at least one batch")
  return variables


@functools.lru_cache(maxsize=8)
def _search_fn(model):
  module = qat_model.intercepted(model.linen, _Search(model.rules))

  def run(variables, x):
    with site_lib.call_settings(CallSettings(mode="quant")):
      _, out = module.apply({k: v for k, v in variables.items() if k != "quant_stats"}, x,
                            mutable=[PTQ], **_kw(model))
    return out.get(PTQ, {})
  return jax.jit(run)


@dataclasses.dataclass(frozen=True)
class SiteChoice:
  """One site's search: its key, the kind and value chosen, and the errors (mean squared
  quantization error of its input) of every candidate."""
  key: str
  kind: str
  value: float
  errors: Tuple[float, ...]
  values: Tuple[float, ...]


def search_ranges(model, variables: Mapping[str, Any], batches: Iterable[jax.Array]
                  ) -> Tuple[Dict[str, Any], List[SiteChoice]]:
  """Variables with each range site's activation range searched on `batches` (module
  docstring), and the choices made."""
  fn = _search_fn(model)
  sums, n = None, 0
  for x in batches:
    out = jax.device_get(fn(variables, jnp.asarray(x)))
    sums = out if sums is None else jax.tree.map(np.add, sums, out)
    n += 1
  if n == 0:
    raise ValueError("search_ranges: batches is empty; give at least one batch")
  flat = traverse_util.flatten_dict(sums or {}, sep="/")
  stats = traverse_util.flatten_dict(dict(variables.get("quant_stats", {})), sep="/")
  choices = []
  for key in sorted({k.rpartition("/")[0] for k in flat}):
    err = np.asarray(flat[f"{key}/err"]) / n
    best = int(np.argmin(err))
    lo = np.asarray(flat[f"{key}/lo"])[best] / n
    hi = np.asarray(flat[f"{key}/hi"])[best] / n
    if f"{key}/a_lo" not in stats:
      raise ValueError(f"search_ranges: site {key} has no activation range in quant_stats "
                       f"(initialise the model's variables with model.init first)")
    stats[f"{key}/a_lo"] = jnp.asarray(lo, jnp.float32).reshape(np.shape(stats[f"{key}/a_lo"]))
    stats[f"{key}/a_hi"] = jnp.asarray(hi, jnp.float32).reshape(np.shape(stats[f"{key}/a_hi"]))
    stats[f"{key}/a_count"] = jnp.asarray(max(int(np.asarray(stats[f"{key}/a_count"])), n),
                                          jnp.int32)
    kind, values = ("lam", LAMS) if _is_pq(model, key) else ("shrink", SHRINKS)
    choices.append(SiteChoice(key, kind, float(values[best]), tuple(map(float, err)),
                              tuple(map(float, values))))
  out = dict(variables)
  out["quant_stats"] = traverse_util.unflatten_dict(stats, sep="/")
  return out, choices


def _is_pq(model, key: str) -> bool:
  from qgnn_jax.qat import rules as rules_lib  # pylint: disable=g-import-not-at-top
  module_path = key.rpartition("/")[0]
  for op in rules_lib.OPS:
    rule = rules_lib.match(model.rules, module_path, op)
    if rule is not None and rule.act_entry is not None:
      return rule.act_entry.name == "pq"
  return False


def quantize(model, variables: Mapping[str, Any], batches: Sequence[jax.Array],
        search: bool = True) -> Tuple[Dict[str, Any], List[SiteChoice]]:
  """`calibrate` on `batches`, then (search=True) `search_ranges` on the same batches.

  Returns (variables, choices). batches: a sequence (it is read twice).
  """
  batches = list(batches)
  variables = calibrate(model, variables, batches)
  if not search:
    return variables, []
  return search_ranges(model, variables, batches)


def summary(choices: Sequence[SiteChoice]) -> Dict[str, Any]:
  """{"sites", "lam": {value: count}, "shrink": {value: count}} of a search."""
  out: Dict[str, Any] = {"sites": len(choices)}
  for c in choices:
    d = out.setdefault(c.kind, {})
    d[f"{c.value:g}"] = d.get(f"{c.value:g}", 0) + 1
  return out
