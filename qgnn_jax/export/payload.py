"""What an export file holds: its payload, built from a model's trained variables.

`build` returns the payload tree (`container.to_bytes` writes it):

    meta:        JSON text: model name, num_classes, model kwargs, input shape, method,
                 the rules (QuantRule fields, quantizers by registry name), fp32 flag,
                 source (workdir, step, config), format notes.
    params:      {"<module path>/<name>": float32 array}: every parameter that is not a
                 quantized kernel (biases, BN scale/bias, pos-embed, full-precision layers).
    batch_stats: {"<module path>/<name>": float32 array}: BN running mean / var, kept
                 as they are (see "BN" below).
    sites:       {"<module path>/quant<n>": site}, one per quantized op, a site being
      op:        "dot_general" | "conv_general_dilated" | "einsum"; param: the kernel's
                 name in its module ("kernel"); x_channels: the activation's channel count.
      w:         the weight (absent when the rule quantizes only activations):
                 quantizer, bits, shape (the kernel's), channel_axes (its output-channel
                 axes), codes, scale, zero_point, offset (`export.grid`).
      a:         the activation operand (absent when only weights are quantized):
                 quantizer, bits, per_channel, state (what the quantizer evaluates with:
                 EMA range lo/hi for PQ / min-max, step (and LSQ+ offset) for LSQ,
                 start/widths/step for N2UQ), scale, zero_point, offset.

BN: kept unfolded in this version (running mean / var and scale / bias in params and
batch_stats): folding a BN into the quantized layer before it would quantize a
different weight than the one trained.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Dict, Mapping, Optional, Sequence

import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from qgnn_jax import models, qat, quant, run_config
from qgnn_jax.export.container import FORMAT, VERSION, ExportError
from qgnn_jax.export.grid import code_shift, file_grid, grid_ends, pack, weight_codes
from qgnn_jax.integer_inference import state_names
from qgnn_jax.qat import site as site_lib
from qgnn_jax.qat import sites as sites_lib
from qgnn_jax.qat.rules import QuantRule


def create_model(model_name: str, num_classes: int, model_kwargs: Mapping[str, Any]
                 ) -> nn.Module:
  """The registered model an export names, with its recorded keywords (dtype by name)."""
  kw = dict(model_kwargs)
  if "dtype" in kw:
    kw["dtype"] = run_config.compute_dtype(kw["dtype"])
  return models.create_model(model_name, num_classes, **kw)


def _flat(tree: Any) -> Dict[str, np.ndarray]:
  """{"a/b/c": numpy array} of a nested variable collection."""
  if not tree:
    return {}
  return {"/".join(map(str, k)): np.asarray(v)
          for k, v in traverse_util.flatten_dict(_plain(tree)).items()}


def _plain(tree: Any) -> Any:
  """Nested dicts (FrozenDicts and restored dicts alike) with numpy leaves."""
  if isinstance(tree, Mapping):
    return {str(k): _plain(v) for k, v in tree.items()}
  return np.asarray(tree)




def _rule_dict(rule: QuantRule) -> Dict[str, Any]:
  out = {}
  for f in dataclasses.fields(rule):
    v = getattr(rule, f.name)
    if isinstance(v, quant.Quantizer):
      v = v.name
    out[f.name] = list(v) if isinstance(v, tuple) else v
  return out


def build(model_name, num_classes: int, rules: Optional[Sequence[QuantRule]], variables: Mapping,
          *, model_kwargs: Optional[Mapping[str, Any]] = None, fp32: bool = False,
          source: Optional[Mapping[str, Any]] = None,
          input_shape: Optional[Sequence[int]] = None) -> Dict[str, Any]:
  """The payload tree of an export (see the module docstring).

  Args:
    model_name: a registered model (`qgnn_jax.models.MODELS`), or the model itself: a
      linen module, an nnx.Module, or the `qat.QuantizedModel` it was trained as (then
      rules=None takes its rules), with `input_shape` (H, W, C) given; `load` then needs
      it back (`load(path, model=...)`).
    rules: the quantization rules it was trained with (() for a full-precision model).
      Checked against the trained variables: the sites they make and their weight bits
      must be those recorded at training (`qat.sites.check_trained`).
    variables: its trained variables: params, batch_stats, quant_stats (numpy or jax).
    model_kwargs: `create_model` keywords that shape the model (graph_impl, dtype name).
    fp32: the same model at full precision (every kernel float32, no sites): the
      reference size `model_bytes_fp32`.
    source: provenance (workdir, step, config) recorded in meta.
  Raises ExportError: a quantized site without its trained state (e.g. an activation
  range that was never measured), or rules that are not the ones the variables were
  trained with (naming the site and the bits).
  """
  model_kwargs = dict(model_kwargs or {})
  if isinstance(model_name, qat.QuantizedModel):
    if rules is None:
      rules = model_name.rules
    elif tuple(rules) != model_name.rules:
      raise ExportError(f"build: rules= differ from the rules of the given {model_name!r}; "
                        f"pass rules=None to use the model's")
  if rules is None:
    raise ExportError("build: rules=None needs a qat.QuantizedModel (pass its rules, or () "
                      "for a full-precision model)")
  if isinstance(model_name, (nn.Module, nnx.Module, qat.QuantizedModel)):
    name = type(model_name.original if isinstance(model_name, qat.QuantizedModel)
                else model_name).__name__
    model, model_name = sites_lib.as_linen(model_name), name
    if input_shape is None:
      raise ExportError(f"build: a {model_name} module needs input_shape=(H, W, C)")
  else:
    model = create_model(model_name, num_classes, model_kwargs)
  shape = tuple(input_shape or models.input_shape(model_name))
  params = _flat(variables.get("params", {}))
  stats = _flat(variables.get("quant_stats", {}))
  rules = tuple(rules)
  try:
    sites = (sites_lib.trace_sites(model, rules, shape, _shape_tree(variables))
             if rules and not fp32 else [])
    if sites:
      sites_lib.check_trained(sites, variables, where=f"build({model_name})")
  except ValueError as e:
    raise ExportError(str(e)) from None
  site_data, quantized_kernels = {}, set()
  for s in sites:
    site_data[s.key] = _site_payload(s, params, stats)
    if "w" in site_data[s.key]:
      quantized_kernels.add(f"{s.module}/{s.param}")
  fp_params = {k: v.astype(np.float32) if np.issubdtype(v.dtype, np.floating) else v
               for k, v in params.items()
               if k not in quantized_kernels
               and not any(site_lib.is_site_name(p) for p in k.split("/")[:-1])}
  meta = {"format": FORMAT, "version": VERSION, "model": model_name,
          "num_classes": int(num_classes), "model_kwargs": model_kwargs,
          "input_shape": list(shape), "fp32": bool(fp32 or not rules),
          "rules": [] if fp32 else [_rule_dict(r) for r in rules],
          "bn": "kept", "source": dict(source or {})}
  return {"meta": json.dumps(meta, sort_keys=True), "params": fp_params,
          "batch_stats": _flat(variables.get("batch_stats", {})), "sites": site_data}


def _shape_tree(variables: Mapping) -> Dict[str, Any]:
  shape_dtype = lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype)
  return {k: jax.tree_util.tree_map(shape_dtype, _plain(variables[k]))
          for k in ("params", "batch_stats") if variables.get(k)}


def _site_payload(s: sites_lib.SiteInfo, params: Dict[str, np.ndarray],
                  stats: Dict[str, np.ndarray]) -> Dict[str, Any]:
  out: Dict[str, Any] = {"op": s.op, "param": s.param, "x_channels": s.x_channels}
  site_params = {k[len(s.key) + 1:]: v for k, v in params.items() if k.startswith(s.key + "/")}
  site_stats = {k[len(s.key) + 1:]: v for k, v in stats.items() if k.startswith(s.key + "/")}
  w_entry, a_entry = s.rule.weight_entry, s.rule.act_entry
  if w_entry is not None:
    spec = s.rule.weight_spec
    kernel = params.get(f"{s.module}/{s.param}")
    if kernel is None:
      raise ExportError(f"site {s.key}: no kernel {s.module}/{s.param} in params")
    w2, _ = site_lib.to_channels_last(jnp.asarray(kernel, jnp.float32), s.w_axes)
    state = {n: jnp.asarray(site_params[f"w_{n}"]) for n in state_names(w_entry, spec)
             if f"w_{n}" in site_params}
    missing = [n for n in state_names(w_entry, spec) if n not in state]
    if missing:
      raise ExportError(f"site {s.key}: weight quantizer {w_entry.name!r} has no trained "
                        f"{['w_' + n for n in missing]}")
    codes, scale, zp, lowest = weight_codes(w_entry, spec, w2, state)
    c = w2.shape[-1]
    shift = code_shift(lowest)(spec.bits)
    scale, zp, offset = file_grid(scale, zp, shift, c, spec.per_channel, f"site {s.key} weight")
    codes = np.asarray(codes) - shift
    out["w"] = {"quantizer": w_entry.name, "bits": spec.bits, "shape": list(s.w_shape),
                "channel_axes": list(s.w_axes), "codes": pack(codes, spec.bits),
                "scale": scale, "zero_point": zp, "offset": offset}
  if a_entry is not None:
    spec = s.rule.act_spec
    state = {}
    for n in state_names(a_entry, spec):
      if f"a_{n}" not in site_params:
        raise ExportError(f"site {s.key}: activation quantizer {a_entry.name!r} has no "
                          f"trained a_{n}")
      state[n] = np.asarray(site_params[f"a_{n}"], np.float32)
    if a_entry.tracks_range:
      if int(site_stats.get("a_count", 0)) == 0:
        raise ExportError(f"site {s.key}: its activation range was never measured "
                          f"(a_count = 0): train or calibrate the model before exporting")
      state.update(lo=np.asarray(site_stats["a_lo"], np.float32),
                   hi=np.asarray(site_stats["a_hi"], np.float32))
    jstate = {k: jnp.asarray(v) for k, v in state.items()}
    lowest, _, scale, zp = grid_ends(a_entry, spec, jstate, s.x_channels)
    shift = code_shift(lowest)(spec.bits)
    scale, zp, offset = file_grid(scale, zp, shift, s.x_channels, spec.per_channel,
                              f"site {s.key} activation")
    out["a"] = {"quantizer": a_entry.name, "bits": spec.bits, "per_channel": spec.per_channel,
                "state": state, "scale": scale, "zero_point": zp, "offset": offset}
  return out
