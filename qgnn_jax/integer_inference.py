"""A quantized model's sites run on integer codes: the provider behind `Exported.apply`.

`IntegerProvider` runs the same plain Flax model as training does, through qwix
(`qat.model.SiteProvider`'s `run_site` hook). At each site it reads that site's data from
the variable collection `qint` (what `qgnn_jax.export.load` prepared from the file):

* the activation is quantized with its stored state (the quantizer's own forward, so the
  grid point is the one fake quantization picks) and read back as the int8 operand
  code - zero_point = (x_hat - offset) / scale;
* the original op runs on int8 operands with `preferred_element_type=int32`;
* the int32 result is rescaled by scale_a * scale_w[channel], plus the activation grid's
  offset term (`offset * sum of the weights`, one term per output channel) when it has one.

Where the site's `SitePlan` says the grid does not allow it (activation scales per channel,
a weight grid with a non-integer zero point, operands that do not fit int8, a rule that
quantizes one operand only), or with `integer=False`, the site runs the dequantized kernel
with the fake-quantized activation instead. The file format and the grids: docs/METHOD.md,
"The export file", and `qgnn_jax.export`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Tuple

import jax.numpy as jnp
import numpy as np

from qgnn_jax import quant
from qgnn_jax.qat import context
from qgnn_jax.qat import model as qat_model
from qgnn_jax.qat import site as site_lib
from qgnn_jax.qat import sites as sites_lib

QINT = "qint"  # the variable collection the integer path reads its site data from


@dataclasses.dataclass(frozen=True)
class SitePlan:
  """How integer inference runs one site (static).

  integer: on int8 codes (else dequantized); reason: why not, when not; a_zero_raw: the
  activation codes' zero point as the quantizer's `integer` returns them; a_offset: the
  activation grid has an offset term.
  """
  integer: bool
  reason: str = ""
  a_zero_raw: int = 0
  a_offset: bool = False


def state_names(entry: quant.Quantizer, spec) -> Tuple[str, ...]:
  """The names of the learnable state a quantizer entry evaluates with for `spec` (its
  `param_names(spec)` when it has one, else its `learnable`)."""
  names = getattr(entry, "param_names", None)
  return tuple(names(spec)) if names is not None else tuple(entry.learnable)


class IntegerProvider(qat_model.SiteProvider):
  """Runs each site from the export's data (collection `qint`): integer ops where its
  plan says so (and `integer`), else dequantized weights with the fake-quantized
  activation. plans: {"<module path>/quant<n>": SitePlan}."""

  def __init__(self, rules, plans: Mapping[str, SitePlan], integer: bool):
    super().__init__(rules)
    self.plans = dict(plans)
    self.integer = integer

  def run_site(self, module, rule, op_name, op, x, x_axes, w, w_axes, layout) -> Any:
    del op_name
    name = sites_lib.site_name(context.next_site_index(module))
    key = "/".join(map(str, module.path)) + "/" + name
    plan = self.plans.get(key)
    if plan is None:
      raise ValueError(f"the model runs a quantized op at {key} that the export has no "
                       f"site for (model/rules mismatch)")
    scope = module.scope.push(name, reuse=True)
    get = lambda n: scope.get_variable(QINT, n)
    a_entry, spec = rule.act_entry, rule.act_spec
    a_state = {}
    if a_entry is not None:
      a_state = {n: get(f"a_{n}") for n in ("lo", "hi", *state_names(a_entry, spec))
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
