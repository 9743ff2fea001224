"""A quantizer site: one intercepted op's weight and input activation, and their state.

Each op that a rule matches becomes a site: a child scope of the module that runs the
op, named ``quant`` (its first op) or ``quant<n>`` (its n-th). The site owns

  params:       ``w_<p>`` / ``a_<p>`` for each learnable parameter p of the weight /
                activation quantizer (`Quantizer.param_names`; LSQ: ``w_step``,
                ``a_step``, and ``a_offset`` on an LSQ+ grid);
  quant_stats:  ``a_lo``, ``a_hi``, ``a_count`` (EMA of the activation range, range
                quantizers only), and ``site``, the weight bit-width (a marker the
                model-size count reads).

What it does depends on the call (`CallSettings`):
  * mode "fp": nothing is traced (no quantizer op, no state touched) unless initialising;
  * mode "quant": weight and activation are fake-quantized;
  * mode "stochastic": SQD's teacher, as "quant" but perturbed by the call's `TeacherDraw`
    (draws from the ``quant`` rng stream): "bypass" runs the whole site in full precision
    with probability ``prob``; "channels" keeps each output channel of the weight and each
    input channel of the activation in full precision with probability ``prob``;
    "precision" quantizes the activation at bits drawn from ``act_bits`` (None: full
    precision). One site per call, ``forced``, always differs from the student (a bypass,
    one full-precision weight channel and input channel, activation bits other than the
    student's), so the teacher is never the student.
Activation ranges: when ``quant_stats`` is mutable (training, or calibrating) the range
is that of the current batch (all-reduced over ``axis_name``), and the EMA is updated
(reset to it when calibrating or at the first update); otherwise the EMA is used (the
batch range until the EMA holds a value). ``calibrate`` also re-initialises learnable
parameters from the batch when ``params`` is mutable.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from qgnn_jax.qat.rules import QuantRule
from qgnn_jax.quant.grid import validate_bits
from qgnn_jax.quant.registry import OperandSpec, Quantizer

MODES = ("fp", "quant", "stochastic")
SITE_PREFIX = "quant"
TEACHER_DRAWS = ("bypass", "channels", "precision")


@dataclasses.dataclass(frozen=True)
class TeacherDraw:
  """How mode "stochastic" makes SQD's teacher from the student (see the module docstring).

  kind: one of TEACHER_DRAWS. prob: per-site ("bypass") or per-channel ("channels")
  probability of full precision, in [0, 1]. act_bits: "precision"'s activation bit
  choices besides each site's own (ints in [2, 16], None = full precision); needs range
  quantizers (pq, minmax: their range does not depend on the bit width).
  sites: every site path of the model ('/'-joined scope paths, `site_paths`); forced:
  int32 scalar, the index in `sites` of the site that must differ (may be traced).
  `QuantizedModel.apply` fills sites and forced from the variables and the ``quant`` rng.
  """
  kind: str = "bypass"
  prob: float = 0.25
  act_bits: Tuple[Optional[int], ...] = ()
  sites: Tuple[str, ...] = ()
  forced: Any = None

  def __post_init__(self):
    if self.kind not in TEACHER_DRAWS:
      raise ValueError(f"teacher kind={self.kind!r}; valid: {TEACHER_DRAWS}")
    if not 0.0 <= self.prob <= 1.0:
      raise ValueError(f"teacher prob={self.prob!r}; valid: [0, 1]")
    for b in self.act_bits:
      if b is not None:
        validate_bits(b)
    if self.kind == "precision" and not self.act_bits:
      raise ValueError("teacher kind 'precision' needs act_bits: the activation bit widths "
                       "to draw from besides the student's (None = full precision)")


def site_paths(variables: Mapping[str, Any]) -> Tuple[str, ...]:
  """The '/'-joined scope path of every quantizer site holding a variable, sorted.

  Every site that quantizes something holds one (a weight quantizer's ``site`` marker, an
  activation range, or a learnable parameter).
  """
  found = set()

  def visit(tree, path):
    for k, v in tree.items():
      if is_site_name(str(k)):
        found.add("/".join(path + (str(k),)))
      elif isinstance(v, Mapping):
        visit(v, path + (str(k),))
  for collection in variables.values():
    if isinstance(collection, Mapping):
      visit(collection, ())
  return tuple(sorted(found))


@dataclasses.dataclass(frozen=True)
class CallSettings:
  """What quantization does in one call of a quantized model (chosen per call)."""
  mode: str = "quant"
  bypass_prob: float = 0.0
  calibrate: bool = False
  axis_name: Optional[str] = None
  teacher: Optional[TeacherDraw] = None  # mode "stochastic" (QuantizedModel.apply sets it)

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f"mode={self.mode!r}; valid: {MODES}")
    if not 0.0 <= self.bypass_prob <= 1.0:
      raise ValueError(f"bypass_prob={self.bypass_prob!r}; valid: [0, 1]")


_SETTINGS: contextvars.ContextVar[CallSettings] = contextvars.ContextVar(
    "qgnn_jax_quant_call", default=CallSettings())


def current_settings() -> CallSettings:
  return _SETTINGS.get()


@contextlib.contextmanager
def call_settings(settings: CallSettings) -> Iterator[CallSettings]:
  """Scopes the settings that quantized models use while they are traced or run."""
  token = _SETTINGS.set(settings)
  try:
    yield settings
  finally:
    _SETTINGS.reset(token)


def is_site_name(name: str) -> bool:
  """True for the scope names sites take: 'quant', 'quant1', 'quant2', ..."""
  rest = name[len(SITE_PREFIX):]
  return name.startswith(SITE_PREFIX) and (rest == "" or rest.isdigit())


def to_channels_last(x: jax.Array, channel_axes: Sequence[int]) -> Tuple[jax.Array, tuple]:
  """x with `channel_axes` moved last and flattened into one: (..., C). Returns the
  array and what `from_channels_last` needs to undo it."""
  channel_axes = tuple(a % x.ndim for a in channel_axes)
  other = tuple(a for a in range(x.ndim) if a not in channel_axes)
  perm = other + channel_axes
  moved = x if perm == tuple(range(x.ndim)) else jnp.transpose(x, perm)
  c = math.prod(x.shape[a] for a in channel_axes)
  return moved.reshape(moved.shape[:len(other)] + (c,)), (perm, moved.shape)


def from_channels_last(y: jax.Array, how: tuple) -> jax.Array:
  perm, moved_shape = how
  y = y.reshape(moved_shape)
  if perm == tuple(range(len(perm))):
    return y
  inverse = [0] * len(perm)
  for i, p in enumerate(perm):
    inverse[p] = i
  return jnp.transpose(y, inverse)


def _learnable(scope, entry: Quantizer, role: str, sample: jax.Array, spec: OperandSpec,
               calibrate: bool) -> dict:
  """The entry's learnable params as `<role>_<name>` in the site's params."""
  names = entry.param_names(spec)
  if not names:
    return {}
  init = lambda: entry.init_params(sample, spec)
  fresh = None
  out = {}
  for name in names:
    full = f"{role}_{name}"
    value = scope.param(full, lambda _, n=name: (fresh or init())[n])
    if calibrate and scope.is_mutable_collection("params"):
      fresh = fresh or init()
      value = fresh[name]
      scope.put_variable("params", full, value)
    out[name] = value
  return out


def _quantize_weight(scope, entry: Quantizer, spec: OperandSpec, w: jax.Array,
                     channel_axes: Sequence[int], calibrate: bool) -> jax.Array:
  w2, how = to_channels_last(w, channel_axes)
  # Weights are replicated over the pmap axis: their element count is the global one.
  state = {**_learnable(scope, entry, "w", w2, spec, calibrate), "numel": w2.size}
  if entry.tracks_range:
    lo, hi = entry.weight_range(w2, spec)
    state = {**state, "lo": lo, "hi": hi}
  return from_channels_last(entry.quantize(w2, spec, state), how)


def _quantize_act(scope, entry: Quantizer, spec: OperandSpec, rule: QuantRule, x: jax.Array,
                  channel_axes: Sequence[int], settings: CallSettings,
                  initializing: bool) -> Tuple[jax.Array, Callable[[int], jax.Array]]:
  """(x_hat, at_bits): the fake-quantized activation, and at_bits(b), the same activation
  on a b-bit grid of the same range (for the "precision" teacher; range quantizers)."""
  x2, how = to_channels_last(x, channel_axes)
  # Each device holds 1/D of the batch: the global element count (LSQ's gradient scale).
  devices = 1 if settings.axis_name is None else jax.lax.axis_size(settings.axis_name)
  state = {**_learnable(scope, entry, "a", x2, spec, settings.calibrate),
           "numel": x2.size * devices}
  if entry.tracks_range:
    shape = (x2.shape[-1],) if spec.per_channel else ()
    lo_v = scope.variable("quant_stats", "a_lo", lambda: jnp.zeros(shape, jnp.float32))
    hi_v = scope.variable("quant_stats", "a_hi", lambda: jnp.zeros(shape, jnp.float32))
    n_v = scope.variable("quant_stats", "a_count", lambda: jnp.zeros((), jnp.int32))
    batch_range = lambda: entry.batch_range(x2, spec, settings.axis_name)
    if scope.is_mutable_collection("quant_stats") or settings.calibrate:
      lo, hi = batch_range()
      if scope.is_mutable_collection("quant_stats") and not initializing:
        m = jnp.where((n_v.value == 0) | settings.calibrate, 0.0, rule.ema_momentum)
        lo_v.value = m * lo_v.value + (1 - m) * lo
        hi_v.value = m * hi_v.value + (1 - m) * hi
        n_v.value = n_v.value + 1
    else:
      have_ema = n_v.value > 0
      lo_b, hi_b = batch_range()
      lo = jnp.where(have_ema, lo_v.value, lo_b)
      hi = jnp.where(have_ema, hi_v.value, hi_b)
    state = {**state, "lo": lo, "hi": hi}

  def at_bits(bits: int) -> jax.Array:
    if not entry.tracks_range:
      raise ValueError(f"the 'precision' SQD teacher (speq) redraws activation bit widths on "
                       f"the student's range; quantizer {entry.name!r} learns a step per bit "
                       f"width instead; valid: a range quantizer (pq, minmax)")
    return from_channels_last(entry.quantize(x2, dataclasses.replace(spec, bits=bits), state),
                              how)
  return from_channels_last(entry.quantize(x2, spec, state), how), at_bits


def _channel_mask(key: jax.Array, shape: Sequence[int], channel_axes: Sequence[int],
                  prob: float, force_one: jax.Array) -> jax.Array:
  """Bool mask, broadcastable to `shape`, over its channel axes: each channel True with
  probability `prob`; if force_one, one uniformly drawn channel is True as well."""
  channel_axes = tuple(a % len(shape) for a in channel_axes)
  mshape = tuple(d if a in channel_axes else 1 for a, d in enumerate(shape))
  k_draw, k_one = jax.random.split(key)
  mask = jax.random.bernoulli(k_draw, prob, mshape)
  n = math.prod(mshape)
  one = jax.nn.one_hot(jax.random.randint(k_one, (), 0, n), n, dtype=jnp.bool_).reshape(mshape)
  return mask | (one & force_one)


def _teacher(scope, rule: QuantRule, teacher: TeacherDraw, x: jax.Array, x_hat: jax.Array,
             x_channel_axes: Sequence[int], at_bits: Callable[[int], jax.Array], w: jax.Array,
             w_hat: jax.Array, w_channel_axes: Sequence[int]) -> Tuple[jax.Array, jax.Array]:
  """The site's operands in mode "stochastic" (see the module docstring)."""
  path = "/".join(map(str, scope.path))
  if path not in teacher.sites:
    raise ValueError(f"site {path!r} is not among the teacher's sites {teacher.sites[:4]}...: "
                     f"call the model through QuantizedModel.apply (it lists the sites)")
  forced = jnp.asarray(teacher.forced) == teacher.sites.index(path)
  key = scope.make_rng("quant")
  if teacher.kind == "bypass":
    bypass = jax.random.bernoulli(key, teacher.prob) | forced
    return jnp.where(bypass, x, x_hat), jnp.where(bypass, w, w_hat)
  if teacher.kind == "channels":
    kw, kx = jax.random.split(key)
    # The forced site keeps one weight channel and one input channel in full precision (a
    # full-precision input channel reaches every output, so a later quantizer's rounding
    # rarely absorbs it: with one weight channel alone, 6 of 100 steps of a 3-site W2A2
    # model gave logits equal to the student's).
    w_fp = _channel_mask(kw, w.shape, w_channel_axes, teacher.prob, forced)
    x_fp = _channel_mask(kx, x.shape, x_channel_axes, teacher.prob, forced)
    return jnp.where(x_fp, x, x_hat), jnp.where(w_fp, w, w_hat)
  # "precision": option 0 is the student's own activation bits; the forced site draws
  # from the others only.
  own = rule.a_bits if rule.act_entry is not None else None
  others = tuple(dict.fromkeys(b for b in teacher.act_bits if b != own))
  if not others:
    raise ValueError(f"teacher act_bits={teacher.act_bits} offers no bit width other than "
                     f"the site's own ({own}) at {path!r}")
  k_any, k_forced = jax.random.split(key)
  which = jnp.where(forced, jax.random.randint(k_forced, (), 1, len(others) + 1),
                    jax.random.randint(k_any, (), 0, len(others) + 1))
  cases = [x_hat] + [x if b is None else at_bits(b) for b in others]
  return jax.lax.select_n(which, *cases), w_hat


def quantize_operands(module: nn.Module, site_index: int, rule: QuantRule,
                      x: jax.Array, x_channel_axes: Sequence[int],
                      w: jax.Array, w_channel_axes: Sequence[int]
                      ) -> Tuple[jax.Array, jax.Array]:
  """(x_hat, w_hat) of one op run by `module`; see the module docstring.

  x: the op's activation operand; x_channel_axes: its input-channel axes (the axes the
  op contracts with the weight, and shared batch axes). w: the weight (a param of
  `module`); w_channel_axes: its output-channel axes (all but the contracted ones).
  Gradients: straight-through for x and w (the entries' custom_vjp), learnable
  quantizer params get their entry's gradient.
  """
  settings = current_settings()
  name = SITE_PREFIX if site_index == 0 else f"{SITE_PREFIX}{site_index}"
  scope = module.scope.push(name, reuse=True)
  initializing = module.is_initializing()
  w_entry, a_entry = rule.weight_entry, rule.act_entry
  if w_entry is not None:
    scope.variable("quant_stats", "site", lambda: jnp.array(rule.w_bits, jnp.int32))
  # (The provider does not call a site in mode "fp" outside initialisation.)
  w_hat = w if w_entry is None else _quantize_weight(
      scope, w_entry, rule.weight_spec, w, w_channel_axes, settings.calibrate)
  if a_entry is None:
    x_hat, at_bits = x, (lambda bits: x)
  else:
    x_hat, at_bits = _quantize_act(scope, a_entry, rule.act_spec, rule, x, x_channel_axes,
                                   settings, initializing)
  if settings.mode == "fp":
    return x, w
  if settings.mode == "stochastic" and not initializing:
    if settings.teacher is None:
      raise ValueError('mode "stochastic" needs a TeacherDraw in the call settings; call the '
                       'model through QuantizedModel.apply(..., mode="stochastic")')
    return _teacher(scope, rule, settings.teacher, x, x_hat, x_channel_axes, at_bits, w,
                    w_hat, w_channel_axes)
  return x_hat, w_hat
