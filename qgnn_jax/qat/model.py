"""`quantize_model(model, rules)`: fake quantization for any unmodified Flax model (linen,
or NNX: run as a linen module by `qgnn_jax.qat.nnx_bridge`).

Built on qwix's public interception (PyPI `qwix`, `>=0.1.8` in setup.cfg): a
`qwix.QuantizationProvider` whose `get_intercept_map()` replaces `jax.lax.dot_general`,
`jax.lax.conv_general_dilated` (and `qgnn_jax.conv.conv_general_dilated`, the same op with
a faster CPU weight gradient) and `jax.numpy.einsum` while the model runs, and
`qwix.quantize_model`, which makes a subclass of the model's class with its `__call__`
wrapped (so parameter paths and everything else stay those of the original model).
`nn.Dense`, `nn.DenseGeneral`, `nn.Conv` (grouped too) and `nn.Einsum` reach these ops.
At each op a rule matches, the operand that is a param of the calling module (found with
`qgnn_jax.qat.context.find_param`) is the weight, the other the activation; both go through
`qgnn_jax.qat.site.quantize_operands`. An op with no param operand (e.g. attention's
q @ k) stays full precision.

Why qwix and not `nn.intercept_methods`: method interception sees a module's inputs and
outputs, not the kernel it creates inside its own `__call__`, so weights cannot be
quantized without rewriting the layers (docs/METHOD.md, "Quantization as a model
transform").
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, Dict, NamedTuple, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import qwix
from absl import logging
from flax import nnx

from qgnn_jax import conv as qgnn_conv
from qgnn_jax.qat import context
from qgnn_jax.qat import nnx_bridge
from qgnn_jax.qat import rules as rules_lib
from qgnn_jax.qat import site as site_lib
from qgnn_jax.qat.rules import QuantRule
from qgnn_jax.qat.site import CallSettings, TeacherDraw

RESERVED_KWARGS = ("mode", "bypass_prob", "calibrate", "axis_name", "teacher")
# Inside a handler the interception is off (qwix's interception is not recursive), so
# the handlers call jax.lax.dot_general & co. for the original ops.


def _current_module() -> nn.Module:
  """The linen module (or `context.Site` of an NNX module) running the intercepted op."""
  return context.current_module()


def _module_path(module: nn.Module) -> str:
  return context.module_path(module)


def _is_weight(module: nn.Module, x: Any, op_name: str) -> bool:
  """True when x is a param of `module` (`context.find_param`), traced where it runs.

  Raises for an op traced inside a nested jit (jnp.dot, jnp.matmul and `@` are jitted
  functions): its quantizer state would be created in the wrong trace and the jit cache
  would replay the first call's program for the module's later ops.
  """
  name = context.find_param(module, x)
  if name is None:
    return False
  value = module.scope.get_variable("params", name)
  if isinstance(x, jax.core.Tracer) and getattr(x, "_trace", None) is not \
      getattr(value, "_trace", None):
    raise ValueError(
        f"qgnn_jax.qat: module {_module_path(module)!r} runs {op_name} on its param {name!r} "
        f"inside a nested jit (jnp.dot, jnp.matmul and `@` are jitted): quantize it through "
        f"nn.Dense / nn.DenseGeneral / nn.Conv / nn.Einsum, jax.lax.dot_general or jnp.einsum, "
        f"or give that module a full-precision rule (qat.full_precision)")
  return True


def _next_site_index(module: nn.Module) -> int:
  """0, 1, 2, ... for the ops a module's scope runs during one apply."""
  return context.next_site_index(module)


class OpLayout(NamedTuple):
  """Where an intercepted op's operand axes land in its output.

  w_out_axes: output axis of each of the weight's output-channel axes (in the order of
    the weight's channel axes as `site.quantize_operands` takes them).
  x_free_axes: the activation's axes that the op maps one-to-one to output axes (batch,
    tokens; a conv's batch axis, not its spatial ones), and out_free_axes their output axes:
    a term constant along them can be computed on size-1 slices and broadcast.
  """
  w_out_axes: Tuple[int, ...]
  x_free_axes: Tuple[int, ...]
  out_free_axes: Tuple[int, ...]


class SiteProvider(qwix.QuantizationProvider):
  """Intercepts the linear ops of a linen model and quantizes them by rules.

  The public base of every provider that runs a site its own way: a subclass overrides
  `run_site` (e.g. `qgnn_jax.integer_inference.IntegerProvider`: the op on integer codes),
  and names a site with `context.next_site_index` / `sites.site_name`.
  """

  def __init__(self, rules: Sequence[QuantRule]):
    # qwix's own rules (QuantizationRule) have no fields for our quantizers: it is given
    # none, and ours are matched here (docs/METHOD.md, "Quantization as a model transform").
    super().__init__([])
    self.rules = tuple(rules)
    self._warned = set()
    self.seen: Dict[Tuple[str, str], Optional[int]] = {}  # (path, op) -> rule index

  def _record(self, path: str, op_name: str) -> None:
    """Which rule (index, or None) the op at `path` takes (read by `check_rules_used`)."""
    if (path, op_name) not in self.seen:
      rule = rules_lib.match(self.rules, path, op_name)
      self.seen[(path, op_name)] = None if rule is None else self.rules.index(rule)

  def get_intercept_map(self):
    return {**super().get_intercept_map(),
            "jax.lax.dot_general": self._dot_general,
            "jax.lax.conv_general_dilated": self._conv_general_dilated,
            # The same op with a faster CPU weight gradient (the ViG's convs call it).
            "qgnn_jax.conv.conv_general_dilated": self._qgnn_conv_general_dilated,
            "jax.numpy.einsum": self._einsum}

  def _rule(self, op_name: str) -> Tuple[Optional[QuantRule], Optional[nn.Module]]:
    module = _current_module()
    if module is None:
      return None, None
    self._record(_module_path(module), op_name)
    rule = rules_lib.match(self.rules, _module_path(module), op_name)
    if rule is None or not rule.enabled:
      return None, module
    if site_lib.current_settings().mode == "fp" and not module.is_initializing():
      return None, module  # fp: no quantizer op traced, no state touched
    return rule, module

  def run_site(self, module: nn.Module, rule: QuantRule, op_name: str, op, x, x_axes, w,
               w_axes, layout: "OpLayout"):
    """The hook: what one intercepted op at a site computes (the signature of `_site`,
    below, which it calls; override either)."""
    return self._site(module, rule, op_name, op, x, x_axes, w, w_axes, layout)

  def _site(self, module: nn.Module, rule: QuantRule, op_name: str, op, x, x_axes, w, w_axes,
            layout: "OpLayout"):
    """One intercepted op at a site: op(x_hat, w_hat) with both operands fake-quantized.

    op(x, w, **overrides): the original op, activation first, weight second (overrides:
    e.g. preferred_element_type). x_axes / w_axes: the activation's input-channel axes and
    the weight's output-channel axes (`site.quantize_operands`); layout: where the op puts
    them in its output (subclasses computing the op another way, e.g. on integer codes in
    `qgnn_jax.integer_inference`, use it).
    """
    del op_name, layout
    x_hat, w_hat = site_lib.quantize_operands(module, _next_site_index(module), rule,
                                              x, x_axes, w, w_axes)
    return op(x_hat, w_hat)

  def _no_weight(self, module: nn.Module, op_name: str) -> None:
    key = (_module_path(module), op_name)
    if key not in self._warned:
      self._warned.add(key)
      logging.warning("qgnn_jax.qat: %s in %r matches a rule but neither operand is a param "
                      "of that module; it stays full precision", op_name, key[0])

  def _dot_general(self, lhs, rhs, dimension_numbers, precision=None,
                   preferred_element_type=None, **kwargs):
    op = functools.partial(jax.lax.dot_general, dimension_numbers=dimension_numbers,
                           precision=precision, preferred_element_type=preferred_element_type,
                           **kwargs)
    rule, module = self._rule("dot_general")
    if rule is None:
      return op(lhs, rhs)
    (lc, rc), (lb, rb) = dimension_numbers
    if _is_weight(module, rhs, "dot_general"):
      x, w, xc, wc, w_is_rhs = lhs, rhs, tuple(lc) + tuple(lb), tuple(rc), True
    elif _is_weight(module, lhs, "dot_general"):
      x, w, xc, wc, w_is_rhs = rhs, lhs, tuple(rc) + tuple(rb), tuple(lc), False
    else:
      self._no_weight(module, "dot_general")
      return op(lhs, rhs)
    w_out = tuple(a for a in range(w.ndim) if a not in wc)  # batch + free: output channels
    # Output dims of dot_general: batch, lhs free, rhs free (each in axis order).
    nb = len(lb)
    lfree = [a for a in range(lhs.ndim) if a not in tuple(lc) + tuple(lb)]
    rfree = [a for a in range(rhs.ndim) if a not in tuple(rc) + tuple(rb)]
    wb, wfree, xfree = (rb, rfree, lfree) if w_is_rhs else (lb, lfree, rfree)
    wfree_at = nb + (len(lfree) if w_is_rhs else 0)
    xfree_at = nb + (0 if w_is_rhs else len(lfree))
    out_of = {a: i for i, a in enumerate(wb)}
    out_of.update({a: wfree_at + j for j, a in enumerate(wfree)})
    layout = OpLayout(w_out_axes=tuple(out_of[a] for a in w_out),
                      x_free_axes=tuple(xfree),
                      out_free_axes=tuple(xfree_at + j for j in range(len(xfree))))
    call = op if w_is_rhs else (lambda a, b, **kw: op(b, a, **kw))
    return self.run_site(module, rule, "dot_general", call, x, xc, w, w_out, layout)

  def _qgnn_conv_general_dilated(self, *args, **kwargs):
    return self._conv_general_dilated(*args, conv_op=qgnn_conv.conv_general_dilated, **kwargs)

  def _conv_general_dilated(self, lhs, rhs, window_strides, padding, lhs_dilation=None,
                            rhs_dilation=None, dimension_numbers=None, *args,
                            conv_op=None, **kwargs):
    conv_op = conv_op or jax.lax.conv_general_dilated
    op = lambda a, b, **kw: conv_op(
        a, b, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
        *args, **{**kwargs, **kw})
    rule, module = self._rule("conv_general_dilated")
    if rule is None:
      return op(lhs, rhs)
    if not _is_weight(module, rhs, "conv_general_dilated"):
      self._no_weight(module, "conv_general_dilated")
      return op(lhs, rhs)
    dn = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    # lhs_spec = (batch, feature, spatial...), rhs_spec = (out feature, in feature, ...):
    # the weight's channel axis is its output-feature axis, also for grouped convs (each
    # output channel belongs to one group); the activation's is its feature axis.
    layout = OpLayout(w_out_axes=(dn.out_spec[1],), x_free_axes=(dn.lhs_spec[0],),
                      out_free_axes=(dn.out_spec[0],))
    return self.run_site(module, rule, "conv_general_dilated", op, lhs, (dn.lhs_spec[1],),
                         rhs, (dn.rhs_spec[0],), layout)

  def _einsum(self, subscripts, *operands, **kwargs):
    rule, module = self._rule("einsum")
    if rule is None or not isinstance(subscripts, str) or len(operands) != 2 \
        or "->" not in subscripts:
      return jnp.einsum(subscripts, *operands, **kwargs)
    inputs, _, output = subscripts.replace(" ", "").partition("->")
    specs = inputs.split(",")
    found = [_is_weight(module, o, "einsum") for o in operands]
    if not any(found) or not output:
      self._no_weight(module, "einsum")
      return jnp.einsum(subscripts, *operands, **kwargs)
    wi = found.index(True)
    xi = 1 - wi
    w_letters, x_letters = _letters(specs[wi], operands[wi].ndim), \
        _letters(specs[xi], operands[xi].ndim)
    # Weight: per output channel = its axes that survive into the output. Activation:
    # per input channel = its axes shared with the weight (contracted or batch).
    wc = tuple(i for i, c in enumerate(w_letters) if c in output)
    xc = tuple(i for i, c in enumerate(x_letters) if c in w_letters and c != ".")
    # Output positions ('...' expanded to the broadcast of the operands' ellipses).
    ell = max([0] + [operands[i].ndim - len(specs[i].replace("...", ""))
                     for i in (0, 1) if "..." in specs[i]])
    out_letters = _letters(output, len(output.replace("...", "")) + ell)
    x_free, out_free = [], []
    for i, c in enumerate(x_letters):
      if c != "." and c not in w_letters and c in output:
        x_free.append(i)
        out_free.append(out_letters.index(c))
    if "." in x_letters and "." not in w_letters and "." in out_letters:
      # x's '...' axes are the output's (the weight has none): free, in order.
      x_free += [i for i, c in enumerate(x_letters) if c == "."]
      out_free += [i for i, c in enumerate(out_letters) if c == "."]
    layout = OpLayout(w_out_axes=tuple(out_letters.index(w_letters[i]) for i in wc),
                      x_free_axes=tuple(x_free), out_free_axes=tuple(out_free))

    def call(x_op, w_op, **kw):
      ops = [None, None]
      ops[wi], ops[xi] = w_op, x_op
      return jnp.einsum(subscripts, *ops, **{**kwargs, **kw})
    return self.run_site(module, rule, "einsum", call, operands[xi], xc, operands[wi], wc, layout)


# The old private name (qat/sites.py and qat/ptq.py subclass it under it).
_Provider = SiteProvider


def _letters(spec: str, ndim: int) -> str:
  """One character per axis of an einsum operand spec ('...' expanded to '.')."""
  if "..." in spec:
    head, _, tail = spec.partition("...")
    return head + "." * (ndim - len(head) - len(tail)) + tail
  return spec


class QuantizedModel:
  """A linen or NNX model with fake quantization at the ops its rules match.

  `init` and `apply` take the original model's arguments, plus, for `apply`, the
  per-call keywords `mode` ("fp" | "quant" | "stochastic"), `bypass_prob` or `teacher`
  (mode "stochastic": a `TeacherDraw`; bypass_prob=p is TeacherDraw("bypass", p); needs
  rngs={"quant": key}), `calibrate` and `axis_name` (the pmap axis over which
  activation ranges are synchronised). Variables: the original model's, plus each site's quantizer state
  (`qgnn_jax.qat.site`). `module` is the quantized linen module itself, to nest in a
  larger model (then set the call settings with `qgnn_jax.qat.call_settings`).
  """

  def __init__(self, model: Any, rules: Sequence[QuantRule]):
    if isinstance(model, QuantizedModel):
      raise TypeError(f"quantize_model: {model!r} is already quantized; pass its .original")
    if isinstance(model, nnx.bridge.ToLinen):
      raise TypeError("quantize_model: an nnx.bridge.ToLinen wrapper hides its NNX modules' "
                      "ops from the rules; pass the NNX model itself "
                      "(qat.quantize_model(nnx_model, rules)), which is run as a linen module")
    if not isinstance(model, (nn.Module, nnx.Module)):
      raise TypeError(f"quantize_model needs a flax.linen Module or an nnx.Module, got "
                      f"{type(model).__name__}")
    rules = tuple(rules)
    for r in rules:
      if not isinstance(r, QuantRule):
        raise TypeError(f"rules must be QuantRule instances, got {r!r}")
    params = inspect.signature(type(model).__call__).parameters
    clash = [k for k in RESERVED_KWARGS if k in params]
    if clash:
      raise ValueError(f"{type(model).__name__}.__call__ takes {clash}, which quantized "
                       f"models reserve for the call settings {RESERVED_KWARGS}")
    self.original = model
    self.rules = rules
    # NNX models run as linen modules (`nnx_bridge`); `linen` is the model as one.
    self.linen = nnx_bridge.as_linen(model) if isinstance(model, nnx.Module) else model
    self.takes_train = isinstance(model, nnx.Module) or "train" in params or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    self.provider = SiteProvider(rules) if rules else None
    self.module = intercepted(self.linen, self.provider) if rules else self.linen

  @property
  def quantized(self) -> bool:
    return any(r.enabled for r in self.rules)

  def init(self, rngs, *args, **kwargs) -> Dict[str, Any]:
    """Variables of the model and of every site (mode "quant" traces them all).

    Raises ValueError when a rule matches no op (`check_rules_used`). An NNX model's
    params and batch statistics are its current values (`qat.nnx_bridge`).
    """
    if self.provider is not None:
      self.provider.seen = {}
    with site_lib.call_settings(CallSettings(mode="quant")):
      variables = self.module.init(rngs, *args, **self._kwargs(kwargs))
    if self.provider is not None:
      check_rules_used(self.rules, self.provider.seen)
    return variables

  def _kwargs(self, kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """The model's keywords: `train` only for models that take it (docs/METHOD.md)."""
    if "train" in kwargs and not self.takes_train:
      kwargs = {k: v for k, v in kwargs.items() if k != "train"}
    return kwargs

  def apply(self, variables, *args, mode: str = "quant", bypass_prob: float = 0.0,
            calibrate: bool = False, axis_name: Optional[str] = None,
            teacher: Optional[TeacherDraw] = None, **kwargs):
    # Weights are found by identity with the module's params (find_param), which numpy
    # arrays (e.g. after device_get) defeat: make every leaf a jax array (a no-op for
    # jax arrays and tracers).
    variables = jax.tree.map(jnp.asarray, variables)
    settings = CallSettings(mode, bypass_prob, calibrate, axis_name)
    if mode == "stochastic":
      settings = dataclasses.replace(settings, teacher=_draw_forced_site(
          variables, teacher or TeacherDraw("bypass", bypass_prob), kwargs.get("rngs")))
    with site_lib.call_settings(settings):
      return self.module.apply(variables, *args, **self._kwargs(kwargs))

  def __hash__(self):
    return hash((self.linen, self.rules))

  def __eq__(self, other):
    return isinstance(other, QuantizedModel) and self.linen == other.linen and \
        self.rules == other.rules

  def __repr__(self):
    return f"QuantizedModel({type(self.original).__name__}, {len(self.rules)} rules)"


def _draw_forced_site(variables, teacher: TeacherDraw, rngs) -> TeacherDraw:
  """`teacher` with every site of `variables` and the one that must differ this call,
  drawn uniformly from the ``quant`` rng (the same key on every device: one draw a step)."""
  sites = site_lib.site_paths(variables)
  if not sites:
    raise ValueError('mode "stochastic" (SQD\'s teacher) needs a quantized model: the '
                     'variables hold no quantizer site')
  key = rngs.get("quant") if isinstance(rngs, dict) else None
  if key is None:
    raise ValueError('mode "stochastic" draws its teacher from the "quant" rng: pass '
                     'rngs={"quant": key}')
  forced = jax.random.randint(jax.random.fold_in(key, len(sites)), (), 0, len(sites))
  return dataclasses.replace(teacher, sites=sites, forced=forced)


def quantize_model(model: Any, rules: Sequence[QuantRule]) -> QuantizedModel:
  """`model` (an unmodified linen module, or an nnx.Module) with fake quantization at the
  ops `rules` match."""
  return QuantizedModel(model, rules)


def intercepted(model: nn.Module, provider: qwix.QuantizationProvider) -> nn.Module:
  """Linen `model` with `provider`'s handlers replacing the ops while it runs (qwix's
  public `quantize_model`, on a copy that tracks the running module: `context.tracked`)."""
  return qwix.quantize_model(context.tracked(model), provider)


def check_rules_used(rules: Sequence[QuantRule],
                     seen: Dict[Tuple[str, str], Optional[int]]) -> None:
  """Raises ValueError naming each rule whose pattern matches no op of the model, with
  the model's intercepted ops (a rule shadowed by an earlier one is allowed: e.g. a
  full-precision exception before a catch-all).

  seen: (module path, op name) -> index of the rule it took (None: no rule), as a
  `SiteProvider` records them while a model is traced.
  """
  unused = [(i, r) for i, r in enumerate(rules)
            if not any(r.matches(p, op) for p, op in seen)]
  if unused:
    ops = sorted(f"{p or '<top>'} ({op})" for p, op in seen)
    names = "; ".join(f"rules[{i}] = QuantRule(module_path={r.module_path!r}"
                      f"{f', op_names={r.op_names!r}' if r.op_names else ''})"
                      for i, r in unused)
    raise ValueError(
        f"qat: {names} matches no op of the model; module_path is matched with re.fullmatch against these op paths: "
        f"{ops if ops else 'none (the model runs no dot_general / conv / einsum)'}")


def is_quantizer_param(path: Sequence[Any]) -> bool:
  """True for a params leaf that belongs to a quantizer site (e.g. an LSQ step).

  path: a `jax.tree_util` key path or a sequence of names.
  """
  names = [str(getattr(k, "key", k)) for k in path]
  return any(site_lib.is_site_name(n) for n in names[:-1])
