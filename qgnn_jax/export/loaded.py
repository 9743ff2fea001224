"""An export read back, checked against its model and rules, and ready to run.

`load(path)` reads the file (`container.from_bytes`: header, version, digest), rebuilds the
model and rules its meta names, and checks every site, parameter and shape against them
(`ExportError` naming the file and the fault otherwise). The `Exported` it returns runs
the model through `integer_inference.IntegerProvider`: on integer codes where each site's
`SitePlan` allows it, else on dequantized weights (`Exported.plans` says why).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, Mapping, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from qgnn_jax import models, qat
from qgnn_jax.export.container import ExportError, from_bytes
from qgnn_jax.export.grid import code_shift, grid_ends, unpack
from qgnn_jax.export.payload import create_model
from qgnn_jax.integer_inference import QINT, IntegerProvider, SitePlan
from qgnn_jax.qat import model as qat_model
from qgnn_jax.qat import site as site_lib
from qgnn_jax.qat import sites as sites_lib
from qgnn_jax.qat.rules import QuantRule


@dataclasses.dataclass
class Exported:
  """A loaded export.

  model: the plain linen module; rules; meta (the file's meta dict); variables: what
  `apply` runs with (params with dequantized kernels, batch_stats, and the integer data of
  every site in collection `qint`); plans: how each site runs (`SitePlan`).
  """
  path: str
  meta: Dict[str, Any]
  model: nn.Module
  rules: Tuple[QuantRule, ...]
  variables: Dict[str, Any]
  plans: Dict[str, SitePlan]
  _fns: Dict[bool, Any] = dataclasses.field(default_factory=dict, repr=False, compare=False)

  def module(self, integer: bool = True) -> nn.Module:
    """The model to apply: quantized sites from the export (`integer`: on codes)."""
    if not self.rules:
      return self.model
    return qat_model.intercepted(self.model, IntegerProvider(self.rules, self.plans, integer))

  def apply_fn(self, integer: bool = True):
    """A jitted (variables, images) -> logits, made once per `integer` (jax compiles it
    once per input shape and dtype)."""
    if integer not in self._fns:
      module = self.module(integer)
      kw = {"train": False} if sites_lib.takes_train(self.model) else {}
      self._fns[integer] = jax.jit(lambda v, x: module.apply(v, x, **kw))
    return self._fns[integer]

  def apply(self, images, integer: bool = True):
    """Logits (B, classes) of NHWC float images (normalised as for training)."""
    return self.apply_fn(integer)(self.variables, images)

  @property
  def integer_sites(self) -> int:
    return sum(p.integer for p in self.plans.values())


def load(path: str, model: Optional[nn.Module] = None) -> Exported:
  """Reads an export written by `save` and prepares it to run.

  model: the model, for an export built from a module rather than a registered model
  name (the file names its class; it must match): a linen module, an nnx.Module or a
  qat.QuantizedModel of that class (its variables are the file's, not the module's).

  Raises:
    FileNotFoundError: no such file.
    ExportError: a truncated or corrupt file, another format version, an unknown model,
      rules that do not validate, or contents that do not fit the model and rules (a
      missing or extra site, parameter or shape), each naming the file and the fault.
  """
  with open(path, "rb") as f:
    data = f.read()
  payload = from_bytes(data, path)
  meta = payload["meta"]
  if model is not None:
    given = model.original if isinstance(model, qat.QuantizedModel) else model
    if type(given).__name__ != meta.get("model"):
      raise ExportError(f"{path}: model/rules mismatch: the file holds a {meta.get('model')}, "
                        f"given a {type(given).__name__}")
    model = sites_lib.as_linen(model)
  else:
    if meta.get("model") not in models.MODELS:
      raise ExportError(
          f"{path}: model {meta.get('model')!r} is not a registered model "
          f"({sorted(models.MODELS)[:3]}...): the export was built from a module; pass one of that "
          f"class: export.load(path, model={meta.get('model')}(...)) (a linen module, an "
          f"nnx.Module or the qat.QuantizedModel; its own variables are not used)")
  try:
    model = model or create_model(meta["model"], meta["num_classes"], meta.get("model_kwargs", {}))
    rules = tuple(QuantRule(**{k: tuple(v) if isinstance(v, list) else v
                               for k, v in r.items()}) for r in meta.get("rules", []))
  except (KeyError, ValueError, TypeError) as e:
    raise ExportError(f"{path}: model {meta.get('model')!r} / rules cannot be built: "
                      f"{type(e).__name__}: {e}") from None
  return _prepare(path, payload, model, rules)


def _prepare(path: str, payload: Dict[str, Any], model: nn.Module,
             rules: Tuple[QuantRule, ...]) -> Exported:
  meta = payload["meta"]
  shape = tuple(meta["input_shape"])
  if meta["model"] in models.INPUT_SHAPES and models.input_shape(meta["model"]) != shape:
    raise ExportError(f"{path}: model/rules mismatch: {meta['model']} takes "
                      f"{models.input_shape(meta['model'])} images, the file says {shape}")
  try:
    abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                                 jnp.zeros((1,) + shape, jnp.float32)))
    sites = sites_lib.trace_sites(model, rules, shape) if rules else []
  except (ValueError, TypeError) as e:
    raise ExportError(f"{path}: model/rules mismatch: {meta['model']} does not run on the "
                      f"file's {shape} inputs: {type(e).__name__}: {e}") from None
  want = {c: {k: v for k, v in traverse_util.flatten_dict(_unfreeze(abstract[c]), sep="/").items()}
          for c in ("params", "batch_stats") if c in abstract}
  found = {s.key: s for s in sites}
  stored = payload["sites"]
  if set(found) != set(stored):
    extra, missing = sorted(set(stored) - set(found)), sorted(set(found) - set(stored))
    raise ExportError(f"{path}: model/rules mismatch: {meta['model']} with these rules has "
                      f"sites {missing[:4]} that the file lacks and the file has "
                      f"{extra[:4]} that the model does not")
  params = dict(payload["params"])
  qint: Dict[str, Dict[str, Any]] = {}
  plans: Dict[str, SitePlan] = {}
  for key, s in found.items():
    site = stored[key]
    kernel, data, plan = _load_site(path, s, site)
    if kernel is not None:
      params[f"{s.module}/{s.param}"] = kernel
    qint[key] = data
    plans[key] = plan
  for c in ("params", "batch_stats"):
    have = params if c == "params" else payload["batch_stats"]
    need = want.get(c, {})
    missing, extra = sorted(set(need) - set(have)), sorted(set(have) - set(need))
    if missing or extra:
      raise ExportError(f"{path}: model/rules mismatch: {c} missing {missing[:4]}, "
                        f"unexpected {extra[:4]} for {meta['model']}")
    for k, v in need.items():
      if tuple(np.shape(have[k])) != tuple(v.shape):
        raise ExportError(f"{path}: model/rules mismatch: {c} {k} has shape "
                          f"{tuple(np.shape(have[k]))}, {meta['model']} needs {tuple(v.shape)}")
  variables = {"params": traverse_util.unflatten_dict(
      {tuple(k.split("/")): jnp.asarray(v) for k, v in params.items()})}
  if payload["batch_stats"]:
    variables["batch_stats"] = traverse_util.unflatten_dict(
        {tuple(k.split("/")): jnp.asarray(v) for k, v in payload["batch_stats"].items()})
  if qint:
    variables[QINT] = traverse_util.unflatten_dict(
        {tuple(k.split("/")) + (n,): jnp.asarray(v) for k, d in qint.items()
         for n, v in d.items()})
  return Exported(path, meta, model, rules, variables, plans)


def _unfreeze(tree):
  return {k: _unfreeze(v) if isinstance(v, Mapping) else v for k, v in tree.items()}


def _load_site(path: str, s: sites_lib.SiteInfo, site: Mapping[str, Any]):
  """(dequantized kernel or None, the site's `qint` arrays, its SitePlan)."""
  where = f"{path}: site {s.key}"
  data: Dict[str, Any] = {}
  kernel = None
  reasons = []
  w_entry, a_entry = s.rule.weight_entry, s.rule.act_entry
  if (w_entry is None) != ("w" not in site) or (a_entry is None) != ("a" not in site):
    raise ExportError(f"{where}: model/rules mismatch: the rule quantizes "
                      f"{'weight' if w_entry else ''} {'activation' if a_entry else ''}, the "
                      f"file has {sorted(k for k in ('w', 'a') if k in site)}")
  if w_entry is not None:
    w = site["w"]
    spec = s.rule.weight_spec
    if (w["quantizer"], int(w["bits"])) != (w_entry.name, spec.bits) or \
        tuple(w["shape"]) != s.w_shape or tuple(w["channel_axes"]) != s.w_axes:
      raise ExportError(f"{where}: model/rules mismatch: weight {w['quantizer']} "
                        f"{w['bits']}-bit {tuple(w['shape'])} axes {tuple(w['channel_axes'])}, "
                        f"the model and rules give {w_entry.name} {spec.bits}-bit "
                        f"{s.w_shape} axes {s.w_axes}")
    _, how = site_lib.to_channels_last(jnp.zeros(s.w_shape, jnp.int8), s.w_axes)
    moved = how[1]
    c = math.prod(s.w_shape[a] for a in s.w_axes)
    w2_shape = tuple(moved[:-len(s.w_axes)]) + (c,)
    try:
      codes = unpack(np.asarray(w["codes"]), spec.bits, w2_shape)
    except ValueError as e:
      raise ExportError(f"{where}: weight codes: {e}") from None
    scale = np.asarray(w["scale"], np.float32)
    zp = np.asarray(w["zero_point"], np.int32)
    offset = np.asarray(w["offset"], np.float32)
    deq = scale * (codes - zp).astype(np.float32) + offset
    kernel = np.asarray(site_lib.from_channels_last(jnp.asarray(deq), how))
    centered = codes - zp
    if np.any(offset != 0):
      reasons.append("weight grid has a non-integer zero point")
    if centered.size and (centered.min() < -128 or centered.max() > 127):
      reasons.append("weight codes minus zero point do not fit int8")
    else:
      data["w_q"] = site_lib.from_channels_last(jnp.asarray(centered.astype(np.int8)), how)
    data["w_scale"] = scale
  else:
    reasons.append("the rule quantizes only the activation")
  plan_kw = {}
  if a_entry is not None:
    a = site["a"]
    spec = s.rule.act_spec
    if (a["quantizer"], int(a["bits"])) != (a_entry.name, spec.bits):
      raise ExportError(f"{where}: model/rules mismatch: activation {a['quantizer']} "
                        f"{a['bits']}-bit, the rules give {a_entry.name} {spec.bits}-bit")
    state = {k: jnp.asarray(v) for k, v in a["state"].items()}
    for k, v in state.items():
      data[f"a_{k}"] = v
    data["a_scale"] = np.asarray(a["scale"], np.float32)
    data["a_offset"] = np.asarray(a["offset"], np.float32)
    if spec.per_channel and np.asarray(a["scale"]).ndim:
      reasons.append("activation scales per channel")
    else:
      lowest, highest, _, _ = grid_ends(a_entry, spec, state, s.x_channels)
      zero_raw = int(np.asarray(a["zero_point"])) + code_shift(lowest)(spec.bits)
      lo_c, hi_c = int(lowest) - zero_raw, int(highest) - zero_raw
      if lo_c < -128 or hi_c > 127:
        reasons.append(f"activation codes minus zero point span [{lo_c}, {hi_c}], not int8")
      plan_kw = {"a_zero_raw": zero_raw, "a_offset": bool(np.any(data["a_offset"] != 0))}
  else:
    reasons.append("the rule quantizes only the weight")
  plan = SitePlan(not reasons, "; ".join(reasons), **plan_kw)
  return kernel, data, plan
