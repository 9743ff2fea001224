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
  * mode "stochastic": as "quant", but the whole site is bypassed with probability
    ``bypass_prob`` (a Bernoulli draw from the ``quant`` rng stream, SQD's teacher).
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
from typing import Iterator, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from qgnn_jax.qat.rules import QuantRule
from qgnn_jax.quant.registry import OperandSpec, Quantizer

MODES = ("fp", "quant", "stochastic")
SITE_PREFIX = "quant"


@dataclasses.dataclass(frozen=True)
class CallSettings:
  """What quantization does in one call of a quantized model (chosen per call)."""
  mode: str = "quant"
  bypass_prob: float = 0.0
  calibrate: bool = False
  axis_name: Optional[str] = None

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
                  initializing: bool) -> jax.Array:
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
  return from_channels_last(entry.quantize(x2, spec, state), how)


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
  x_hat = x if a_entry is None else _quantize_act(
      scope, a_entry, rule.act_spec, rule, x, x_channel_axes, settings, initializing)
  if settings.mode == "fp":
    return x, w
  if settings.mode == "stochastic":
    bypass = jax.random.bernoulli(scope.make_rng("quant"), settings.bypass_prob)
    w_hat = jnp.where(bypass, w, w_hat)
    x_hat = jnp.where(bypass, x, x_hat)
  return x_hat, w_hat
