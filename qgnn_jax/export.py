"""A trained quantized model as one file, read back and run on its integer codes.

    payload = export.build(model_name, num_classes, rules, variables)   # or from_workdir
    export.save(path, payload)                 # atomic (temp file + fsync + rename)
    exported = export.load(path)                # ExportError names the file and the fault
    logits = exported.apply(images)             # integer matmuls / convs where the grid allows
    logits = exported.apply(images, integer=False)   # dequantized weights (reference)

File format (version 1), written with msgpack through `flax.serialization` (msgpack is a
dependency of flax; no new package). The file is one msgpack map:

    {"format": "qgnn-jax-export", "version": 1, "sha256": hex digest of payload,
     "payload": bytes}

`payload` is itself a `flax.serialization.msgpack_serialize`d tree (arrays keep dtype and
shape):

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
                 axes), codes, scale, zero_point, offset.
      a:         the activation operand (absent when only weights are quantized):
                 quantizer, bits, per_channel, state (what the quantizer evaluates with:
                 EMA range lo/hi for PQ / min-max, step (and LSQ+ offset) for LSQ,
                 start/widths/step for N2UQ), scale, zero_point, offset.

Codes and their grid. An operand's value is `scale * (code - zero_point) + offset`, with
    code: a signed b-bit integer in [-2^(b-1), 2^(b-1) - 1]; weights' codes are stored in
      the kernel's channels-last order (`qat.site.to_channels_last`: output-channel axes
      moved last and flattened to C, row-major), packed LSB-first into bytes for b != 8
      (`quant.pack_bits`: 2-bit four per byte, 4-bit two, 3-bit straddling bytes), and as
      an int8 array for b == 8;
    scale: float32, (C,) per channel or () per tensor;
    zero_point: int32, the shape of scale, or () when the same for every channel
      (symmetric grids: 0): the integer nearest to the real zero point -lo/scale of
      the trained grid, as TFLite and PyTorch nudge theirs (a value within 1e-4 of an
      integer is float rounding of one, e.g. LSQ's 3.9999998, and is snapped to it);
    offset: float32, the shape of zero_point: -scale * (the real zero point - zero_point), the part
      of the trained grid's anchor that the integer zero point does not carry (0 for
      symmetric grids, LSQ and N2UQ; up to half a step for PQ / min-max activations,
      whose grid starts at the range's lo). Integer inference adds it exactly as one
      term per output channel (`offset * sum of the weights`), as integer engines fold
      zero-point terms into the bias; a kernel that dropped it would run the nudged grid.

BN: kept unfolded in this version (running mean / var and scale / bias in params and
batch_stats): folding a BN into the quantized layer before it would quantize a
different weight than the one trained.

Integer inference (`Exported.apply(integer=True)`) runs the same plain Flax model through
a qwix provider (`qat.model._Provider`'s `_site` hook) that, at each site, quantizes the
activation with the stored state (the quantizer's own forward, so the grid point is the
one fake quantization picks) and reads it back as the int8 operand code - zero_point =
(x_hat - offset) / scale, runs the original op on int8 operands with
`preferred_element_type=int32`, and rescales by scale_a * scale_w[channel] (+ the offset
term). Where the grid does not allow
it, the site falls back to dequantized weights with the fake-quantized activation (the
reason is in `Exported.plans`): activation scales per channel, a weight grid with a
non-integer zero point, operands that do not fit int8 (bits > 8), or a rule that
quantizes only one operand.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization, traverse_util

from qgnn_jax import qat, quant
from qgnn_jax.qat import sites as sites_lib
from qgnn_jax.qat import model as qat_model
from qgnn_jax.qat import site as site_lib
from qgnn_jax.qat.rules import QuantRule

FORMAT = "qgnn-jax-export"
VERSION = 1
QINT = "qint"  # the variable collection the integer path reads its site data from
ZERO_POINT_SNAP = 1e-4

__all__ = ["ExportError", "Exported", "build", "save", "load", "to_bytes", "from_bytes",
           "from_workdir", "export_workdir", "nbytes", "FORMAT", "VERSION"]


class ExportError(ValueError):
  """An export that cannot be written or read; the message names the file and the fault."""


# ----------------------------------------------------------------------------- sites


# SiteInfo / site_name / trace_sites live in qgnn_jax.qat.sites (re-exported here).
SiteInfo, site_name, trace_sites = sites_lib.SiteInfo, sites_lib.site_name, \
    sites_lib.trace_sites


# ----------------------------------------------------------------------------- integer forms


def _param_names(entry: quant.Quantizer, spec) -> Tuple[str, ...]:
  names = getattr(entry, "param_names", None)
  return tuple(names(spec)) if names is not None else tuple(entry.learnable)


@functools.partial(jax.jit, static_argnums=(0, 1, 3))
def _grid_ends(entry: quant.Quantizer, spec, state: Mapping[str, Any], channels: int):
  """(lowest, highest codes, scale, zero point) of an operand's grid, as `entry.integer`
  gives them (probed at -/+ 1e30 per channel). One compile per entry, spec and shape."""
  probe = jnp.stack([jnp.full((channels,), -1e30, jnp.float32),
                     jnp.full((channels,), 1e30, jnp.float32)])
  codes, scale, zp = entry.integer(probe, spec, dict(state))
  return jnp.min(codes), jnp.max(codes), scale, zp


def _code_shift(lowest) -> Any:
  """What `entry.integer` codes subtract to become signed b-bit codes: 2^(b-1) for a grid
  whose codes start at 0, 0 for one already signed."""
  return lambda bits: 2 ** (bits - 1) if int(lowest) >= 0 else 0


@functools.partial(jax.jit, static_argnums=(0, 1))
def _weight_codes(entry: quant.Quantizer, spec, w2, state):
  """entry.integer of a weight (channels last) with its range when the entry takes one."""
  state = {**state, "numel": w2.size}
  if entry.tracks_range:
    lo, hi = entry.weight_range(w2, spec)
    state.update(lo=lo, hi=hi)
  codes, scale, zp = entry.integer(w2, spec, state)
  return codes, scale, zp, _grid_ends(entry, spec, state, w2.shape[-1])[0]


def _grid(scale, zero_point, shift: int, channels: int, per_channel: bool, what: str):
  """(scale, integer zero point, offset) of the file (see the module docstring)."""
  scale = np.asarray(scale, np.float32)
  zp = np.asarray(zero_point, np.float64) - shift
  zp = np.broadcast_to(zp, np.broadcast_shapes(zp.shape, scale.shape))
  scale = np.broadcast_to(scale, zp.shape)
  if per_channel and scale.size != 1:
    scale, zp = scale.reshape(-1), zp.reshape(-1)
    if scale.shape != (channels,):
      raise ExportError(f"{what}: {scale.size} scales for {channels} channels")
  else:
    if np.unique(scale).size > 1 or np.unique(zp).size > 1:
      raise ExportError(f"{what}: a per-tensor grid with several scales")
    scale, zp = scale.reshape(-1)[:1].reshape(()), zp.reshape(-1)[:1].reshape(())
  zp_int = np.round(zp)
  frac = np.where(np.abs(zp - zp_int) <= ZERO_POINT_SNAP, 0.0, zp - zp_int)
  offset = (-scale.astype(np.float64) * frac).astype(np.float32)
  # One value for all channels (symmetric grids: 0) is stored once.
  uniform = lambda a: a.reshape(-1)[:1].reshape(()) if a.size and np.all(a == a.flat[0]) else a
  return scale.astype(np.float32), uniform(zp_int.astype(np.int32)), uniform(offset)


def _pack(codes: np.ndarray, bits: int) -> np.ndarray:
  if bits == 8:
    return codes.astype(np.int8)
  return np.asarray(quant.pack_bits(jnp.asarray(codes, jnp.int32), bits))


def _unpack(data: np.ndarray, bits: int, shape: Tuple[int, ...]) -> np.ndarray:
  if bits == 8:
    if data.dtype != np.int8 or data.shape != tuple(shape):
      raise ValueError(f"8-bit codes must be int8 {tuple(shape)}, got {data.dtype} {data.shape}")
    return data.astype(np.int32)
  return np.asarray(quant.unpack_bits(jnp.asarray(data), bits, tuple(shape), signed=True))


def _flat(tree: Any) -> Dict[str, np.ndarray]:
  if not tree:
    return {}
  return {"/".join(map(str, k)): np.asarray(v)
          for k, v in traverse_util.flatten_dict(_plain(tree)).items()}


def _plain(tree: Any) -> Any:
  """Nested dicts (FrozenDicts and restored dicts alike) with numpy leaves."""
  if isinstance(tree, Mapping):
    return {str(k): _plain(v) for k, v in tree.items()}
  return np.asarray(tree)


# ----------------------------------------------------------------------------- build


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
  from qgnn_jax import models  # pylint: disable=g-import-not-at-top
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
    model = _create(model_name, num_classes, model_kwargs)
  shape = tuple(input_shape or models.input_shape(model_name))
  params = _flat(variables.get("params", {}))
  stats = _flat(variables.get("quant_stats", {}))
  rules = tuple(rules)
  try:
    sites = trace_sites(model, rules, shape, _shape_tree(variables)) if rules and not fp32 else []
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
  return {k: jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype),
                                    _plain(variables[k]))
          for k in ("params", "batch_stats") if variables.get(k)}


def _site_payload(s: SiteInfo, params: Dict[str, np.ndarray],
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
    state = {n: jnp.asarray(site_params[f"w_{n}"]) for n in _param_names(w_entry, spec)
             if f"w_{n}" in site_params}
    missing = [n for n in _param_names(w_entry, spec) if n not in state]
    if missing:
      raise ExportError(f"site {s.key}: weight quantizer {w_entry.name!r} has no trained "
                        f"{['w_' + n for n in missing]}")
    codes, scale, zp, lowest = _weight_codes(w_entry, spec, w2, state)
    c = w2.shape[-1]
    shift = _code_shift(lowest)(spec.bits)
    scale, zp, offset = _grid(scale, zp, shift, c, spec.per_channel, f"site {s.key} weight")
    codes = np.asarray(codes) - shift
    out["w"] = {"quantizer": w_entry.name, "bits": spec.bits, "shape": list(s.w_shape),
                "channel_axes": list(s.w_axes), "codes": _pack(codes, spec.bits),
                "scale": scale, "zero_point": zp, "offset": offset}
  if a_entry is not None:
    spec = s.rule.act_spec
    state = {}
    for n in _param_names(a_entry, spec):
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
    lowest, _, scale, zp = _grid_ends(a_entry, spec, jstate, s.x_channels)
    shift = _code_shift(lowest)(spec.bits)
    scale, zp, offset = _grid(scale, zp, shift, s.x_channels, spec.per_channel,
                              f"site {s.key} activation")
    out["a"] = {"quantizer": a_entry.name, "bits": spec.bits, "per_channel": spec.per_channel,
                "state": state, "scale": scale, "zero_point": zp, "offset": offset}
  return out


# ----------------------------------------------------------------------------- bytes / files


def to_bytes(payload: Mapping[str, Any]) -> bytes:
  """The file's bytes: the msgpack container around the msgpack payload."""
  body = serialization.msgpack_serialize(dict(payload))
  return serialization.msgpack_serialize({
      "format": FORMAT, "version": VERSION, "sha256": hashlib.sha256(body).hexdigest(),
      "payload": body})


def nbytes(payload: Mapping[str, Any]) -> int:
  """The size in bytes of the file `save(path, payload)` writes."""
  return len(to_bytes(payload))


def save(path: str, payload: Mapping[str, Any]) -> int:
  """Writes the export atomically (temp file in the same folder, fsync, rename); returns
  its size in bytes."""
  data = to_bytes(payload)
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  tmp = f"{path}.tmp.{os.getpid()}"
  try:
    with open(tmp, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return len(data)


def from_bytes(data: bytes, where: str = "<bytes>") -> Dict[str, Any]:
  """The payload of an export's bytes, checked; ExportError naming `where` otherwise."""
  try:
    outer = serialization.msgpack_restore(data)
  except Exception as e:  # msgpack raises ValueError / ExtraData / TypeError / ...
    raise ExportError(f"{where}: not a readable qgnn-jax export (truncated or corrupt: "
                      f"{type(e).__name__}: {e})") from None
  if not isinstance(outer, dict) or outer.get("format") != FORMAT:
    raise ExportError(f"{where}: not a qgnn-jax export (no format={FORMAT!r} header)")
  if outer.get("version") != VERSION:
    raise ExportError(f"{where}: export format version {outer.get('version')!r}; this "
                      f"qgnn-jax reads version {VERSION} (re-export it with "
                      f"`python -m experiments.export`)")
  body = outer.get("payload")
  if not isinstance(body, bytes) or hashlib.sha256(body).hexdigest() != outer.get("sha256"):
    raise ExportError(f"{where}: corrupt export (the payload's sha256 does not match its "
                      f"header)")
  try:
    payload = serialization.msgpack_restore(body)
    payload["meta"] = json.loads(payload["meta"])
  except Exception as e:
    raise ExportError(f"{where}: corrupt export payload ({type(e).__name__}: {e})") from None
  for k in ("params", "batch_stats", "sites"):
    payload.setdefault(k, {})
  return payload


# ----------------------------------------------------------------------------- load


@dataclasses.dataclass(frozen=True)
class SitePlan:
  """How integer inference runs one site (static)."""
  integer: bool
  reason: str = ""            # why not, when not
  a_zero_raw: int = 0         # the activation codes' zero point as `integer` returns them
  a_offset: bool = False      # the activation grid has an offset term


class _IntProvider(qat_model._Provider):  # pylint: disable=protected-access
  """Runs each site from the export's data (collection `qint`): integer ops where its
  plan says so, else dequantized weights with the fake-quantized activation."""

  def __init__(self, rules, plans: Mapping[str, SitePlan], integer: bool):
    super().__init__(rules)
    self.plans = dict(plans)
    self.integer = integer

  def _site(self, module, rule, op_name, op, x, x_axes, w, w_axes, layout):
    del op_name
    idx = qat_model._next_site_index(module)  # pylint: disable=protected-access
    name = site_name(idx)
    key = "/".join(map(str, module.path)) + "/" + name
    plan = self.plans.get(key)
    if plan is None:
      raise ExportError(f"the model runs a quantized op at {key} that the export has no "
                        f"site for (model/rules mismatch)")
    scope = module.scope.push(name, reuse=True)
    get = lambda n: scope.get_variable(QINT, n)
    a_entry, spec = rule.act_entry, rule.act_spec
    a_state = {}
    if a_entry is not None:
      a_state = {n: get(f"a_{n}") for n in ("lo", "hi", *_param_names(a_entry, spec))
                 if scope.has_variable(QINT, f"a_{n}")}
    out_dtype = jnp.result_type(x.dtype, w.dtype)
    if not (self.integer and plan.integer):
      if a_entry is not None:
        x2, how = site_lib.to_channels_last(x, x_axes)
        x = site_lib.from_channels_last(a_entry.quantize(x2, spec, a_state), how)
      return op(x, w)  # w: the dequantized kernel (or the FP one)
    # The activation's grid point, as fake quantization computes it, read back as the int8
    # operand code - zero_point = (x_hat - offset) / scale (exact: x_hat is on the grid), so
    # both paths consume the same quantized activation bit for bit.
    x2, how = site_lib.to_channels_last(x, x_axes)
    x_hat = a_entry.quantize(x2.astype(jnp.float32), spec, a_state)
    centered = jnp.round((x_hat - get("a_offset")) / get("a_scale"))
    xq = site_lib.from_channels_last(centered.astype(jnp.int8), how)
    acc = op(xq, get("w_q"), preferred_element_type=jnp.int32)
    w_scale = get("w_scale")
    if w_scale.ndim:
      sizes = [w.shape[a] for a in w_axes]
      order = np.argsort(layout.w_out_axes)
      w_scale = jnp.transpose(w_scale.reshape(sizes), order)
      shape = [1] * acc.ndim
      for i in order:
        shape[layout.w_out_axes[i]] = sizes[i]
      w_scale = w_scale.reshape(shape)
    y = acc.astype(jnp.float32) * (get("a_scale") * w_scale)
    if plan.a_offset:
      small = [1 if a in layout.x_free_axes else d for a, d in enumerate(x.shape)]
      y = y + op(jnp.full(small, get("a_offset"), w.dtype), w)
    return y.astype(out_dtype)


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
    return qat_model.intercepted(self.model, _IntProvider(self.rules, self.plans, integer))

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


def _create(model_name: str, num_classes: int, model_kwargs: Mapping[str, Any]) -> nn.Module:
  from qgnn_jax import models  # pylint: disable=g-import-not-at-top
  kw = dict(model_kwargs)
  if "dtype" in kw:
    kw["dtype"] = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[kw["dtype"]]
  return models.create_model(model_name, num_classes, **kw)


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
    from qgnn_jax import models  # pylint: disable=g-import-not-at-top
    if meta.get("model") not in models.MODELS:
      raise ExportError(
          f"{path}: model {meta.get('model')!r} is not a registered model "
          f"({sorted(models.MODELS)[:3]}...): the export was built from a module; pass one of that "
          f"class: export.load(path, model={meta.get('model')}(...)) (a linen module, an "
          f"nnx.Module or the qat.QuantizedModel; its own variables are not used)")
  try:
    model = model or _create(meta["model"], meta["num_classes"], meta.get("model_kwargs", {}))
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
  from qgnn_jax import models  # pylint: disable=g-import-not-at-top
  if meta["model"] in models.INPUT_SHAPES and models.input_shape(meta["model"]) != shape:
    raise ExportError(f"{path}: model/rules mismatch: {meta['model']} takes "
                      f"{models.input_shape(meta['model'])} images, the file says {shape}")
  try:
    abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                                 jnp.zeros((1,) + shape, jnp.float32)))
    sites = trace_sites(model, rules, shape) if rules else []
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


def _load_site(path: str, s: SiteInfo, site: Mapping[str, Any]):
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
      codes = _unpack(np.asarray(w["codes"]), spec.bits, w2_shape)
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
      lowest, highest, _, _ = _grid_ends(a_entry, spec, state, s.x_channels)
      zero_raw = int(np.asarray(a["zero_point"])) + _code_shift(lowest)(spec.bits)
      lo_c, hi_c = int(lowest) - zero_raw, int(highest) - zero_raw
      if lo_c < -128 or hi_c > 127:
        reasons.append(f"activation codes minus zero point span [{lo_c}, {hi_c}], not int8")
      plan_kw = {"a_zero_raw": zero_raw, "a_offset": bool(np.any(data["a_offset"] != 0))}
  else:
    reasons.append("the rule quantizes only the weight")
  plan = SitePlan(not reasons, "; ".join(reasons), **plan_kw)
  return kernel, data, plan


# ----------------------------------------------------------------------------- from a run


def from_workdir(workdir: str, step: Optional[int] = None, fp32: bool = False
                 ) -> Dict[str, Any]:
  """The payload of a run's checkpoint (its config.json says model and rules)."""
  from qgnn_jax import checkpoint as ckpt  # pylint: disable=g-import-not-at-top
  from qgnn_jax import experiment, recipe  # pylint: disable=g-import-not-at-top
  config = experiment.load_run_config(workdir)
  raw = ckpt.restore_from(workdir, step=step)
  info_classes = _num_classes(config, raw)
  source = source_of(workdir, int(np.asarray(raw["step"])), config)
  return build(config.model, info_classes, recipe.quant_rules(config),
               {k: raw.get(k, {}) for k in ("params", "batch_stats", "quant_stats")},
               model_kwargs=model_kwargs(config), fp32=fp32, source=source)


def source_of(workdir: str, step: int, config) -> Dict[str, Any]:
  """The provenance an export of a run's checkpoint records (meta "source")."""
  from qgnn_jax import run_config  # pylint: disable=g-import-not-at-top
  return {"workdir": os.path.abspath(workdir), "step": int(step),
          "config_sha256": run_config.config_sha256(config), "method": str(config.method),
          "dataset": str(config.dataset)}


def model_kwargs(config) -> Dict[str, Any]:
  """The `create_model` keywords of a run config that an inference model needs."""
  return {"graph_impl": str(config.graph_impl), "dtype": str(config.dtype)}


def _num_classes(config, raw) -> int:
  from qgnn_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  del raw
  return int(data_lib.get_info(config.dataset).num_classes)


def export_workdir(workdir: str, out: str, step: Optional[int] = None) -> Dict[str, Any]:
  """Writes `out` from the run's checkpoint; returns {"path", "bytes", "bytes_fp32",
  "sites", "step"}."""
  payload = from_workdir(workdir, step)
  size = save(out, payload)
  fp32 = nbytes(from_workdir(workdir, step, fp32=True))
  meta = json.loads(payload["meta"])
  return {"path": out, "bytes": size, "bytes_fp32": fp32, "sites": len(payload["sites"]),
          "step": meta["source"]["step"]}


# ----------------------------------------------------------------------------- evaluation


def predict(fn, variables: Any, images: np.ndarray, info, batch_size: int = 1000
            ) -> np.ndarray:
  """Logits (N, classes) float32 of uint8 NHWC `images` (normalised with `info`), in
  batches of `batch_size` (the last padded to full size: one compile)."""
  from qgnn_jax.data import augment  # pylint: disable=g-import-not-at-top
  out = []
  for i in range(0, len(images), batch_size):
    x = images[i:i + batch_size]
    k = len(x)
    if k < batch_size:
      x = np.concatenate([x, np.zeros((batch_size - k,) + x.shape[1:], x.dtype)])
    out.append(np.asarray(fn(variables, jnp.asarray(augment.normalize(x, info))))[:k])
  return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def checkpoint_fn(workdir: str, step: Optional[int] = None,
                  exported: Optional["Exported"] = None):
  """(jitted (variables, images) -> logits, variables) of a run's checkpoint, evaluated as
  the run evaluates it: fake quantization (mode "quant") for QAT, plain for FP.

  exported: take the model and rules from this export (the reference for its integer
  path: the same rules whatever today's config defaults say), else from config.json.
  """
  from qgnn_jax import checkpoint as ckpt  # pylint: disable=g-import-not-at-top
  from qgnn_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  from qgnn_jax import experiment, recipe  # pylint: disable=g-import-not-at-top
  if exported is not None:
    model = qat.quantize_model(exported.model, exported.rules)
  else:
    config = experiment.load_run_config(workdir)
    model = recipe.build_model(config, int(data_lib.get_info(config.dataset).num_classes))
  raw = ckpt.restore_from(workdir, step=step)
  variables = {k: jax.tree_util.tree_map(jnp.asarray, raw[k])
               for k in ("params", "batch_stats", "quant_stats") if raw.get(k)}
  mode = "quant" if model.quantized else "fp"
  return jax.jit(lambda v, x: model.apply(v, x, train=False, mode=mode)), variables


def evaluate_export(path: str, dataset: Optional[str] = None, data_dir: Optional[str] = None,
                    compare: bool = False, limit: int = 0, batch_size: int = 1000
                    ) -> Dict[str, Any]:
  """Top-1 of an export on its dataset's test split, on the integer path.

  compare: also evaluates the dequantized path and the fake-quant eval of the checkpoint the
  export came from (meta source: workdir and step) and counts the images whose predicted
  class differs, with the largest logit difference. limit: the first N test images (0 all).
  """
  from qgnn_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  exported = load(path)
  source = exported.meta.get("source", {})
  dataset = dataset or source.get("dataset")
  if not dataset:
    raise ExportError(f"{path}: records no dataset; pass one (--dataset)")
  x, y, info = data_lib.load_arrays(dataset, "test", data_dir)
  if limit:
    x, y = x[:limit], y[:limit]
  batch_size = min(batch_size, len(x))
  logits = {"integer": predict(exported.apply_fn(True), exported.variables, x, info, batch_size)}
  if compare:
    logits["dequantized"] = predict(exported.apply_fn(False), exported.variables, x, info,
                                    batch_size)
    if not source.get("workdir"):
      raise ExportError(f"{path}: records no source workdir to compare with")
    fn, variables = checkpoint_fn(source["workdir"], source.get("step"), exported)
    logits["checkpoint"] = predict(fn, variables, x, info, batch_size)
  out = {"export": path, "bytes": os.path.getsize(path), "model": exported.meta["model"],
         "method": source.get("method"), "dataset": dataset, "split": "test", "count": len(y),
         "sites": len(exported.plans), "integer_sites": exported.integer_sites,
         "fallback": {k: p.reason for k, p in exported.plans.items() if not p.integer}}
  for name, lg in logits.items():
    out[f"top1_{name}"] = float(np.mean(np.argmax(lg, -1) == y))
  if compare:
    ref = logits["checkpoint"]
    for name in ("integer", "dequantized"):
      out[f"{name}_vs_checkpoint"] = {
          "differing_predictions": int(np.sum(np.argmax(logits[name], -1) != np.argmax(ref, -1))),
          "max_abs_logit_diff": float(np.max(np.abs(logits[name] - ref))),
          "max_abs_logit": float(np.max(np.abs(ref)))}
  return out
