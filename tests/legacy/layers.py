"""Quantizable Flax layers: thin wrappers that own weights and quantizer state.

A *quantizer site* is one layer whose weight and input activation are
fake-quantized with the quantizers of `qgnn_jax.quant`. What a site does is set
by a `QuantConfig` (fixed when the model is built) and a *mode* chosen at call
time:

  * ``"fp"``: every site is bypassed (full precision), no quantizer op is traced;
  * ``"quant"``: every enabled site quantizes;
  * ``"stochastic"``: each enabled site is bypassed with probability
    ``bypass_prob``, from the ``"quant"`` PRNG stream (SQD's teacher, SPEC §3.2).

Variable collections: ``params`` (kernels, biases, LSQ steps),
``quant_stats`` (EMA activation ranges of PQ/min-max and a ``site`` marker
holding the weight bit-width of every quantized kernel), ``batch_stats`` (BN).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from qgnn_jax import quant

QUANTIZERS = ("fp", "pauta", "minmax", "lsq")
MODES = ("fp", "quant", "stochastic")
GRANULARITIES = ("tensor", "channel")


@dataclasses.dataclass(frozen=True)
class QuantConfig:
  """Everything that describes how a model is quantized (hashable, static).

  Attributes:
    w_quantizer / a_quantizer: one of QUANTIZERS for weights / input activations.
    w_bits / a_bits: bit-widths in [2, 16].
    lam: PQ's λ (clip at μ ± λσ); 2.5 won the W2A2 validation sweep (docs/METHOD.md).
    w_granularity: "channel" (one range per output channel) or "tensor".
    a_granularity: "channel" (one EMA range per input channel, the last axis) or "tensor".
    w_symmetric / a_symmetric: symmetric grid [-a, a] or asymmetric [lo, hi].
      Granularity and symmetry apply to PQ and min-max; LSQ always learns one signed step
      per tensor for weights and for activations, as in the LSQ paper.
    ema_momentum: momentum of the activation-range EMA used at evaluation.
    quantize_stem: quantize the stem convs after the first (the first stays FP).
    quantize_head: quantize the head's hidden layer and classifier.
  """
  w_quantizer: str = "fp"
  a_quantizer: str = "fp"
  w_bits: int = 4
  a_bits: int = 4
  lam: float = 2.5
  w_granularity: str = "channel"
  a_granularity: str = "tensor"
  w_symmetric: bool = True
  a_symmetric: bool = False
  ema_momentum: float = 0.9
  quantize_stem: bool = False
  quantize_head: bool = False

  def __post_init__(self):
    for name in ("w_quantizer", "a_quantizer"):
      if getattr(self, name) not in QUANTIZERS:
        raise ValueError(f"{name}={getattr(self, name)!r}; valid: {QUANTIZERS}")
    for name in ("w_bits", "a_bits"):
      v = getattr(self, name)
      if not isinstance(v, int) or isinstance(v, bool) or not 2 <= v <= 16:
        raise ValueError(f"{name}={v!r}; valid: int in [2, 16]")
    for name in ("w_granularity", "a_granularity"):
      if getattr(self, name) not in GRANULARITIES:
        raise ValueError(f"{name}={getattr(self, name)!r}; valid: {GRANULARITIES}")
    if not self.lam > 0:
      raise ValueError(f"lam={self.lam!r}; valid: lam > 0")
    if not 0.0 <= self.ema_momentum < 1.0:
      raise ValueError(f"ema_momentum={self.ema_momentum!r}; valid: [0, 1)")

  @property
  def enabled(self) -> bool:
    return self.w_quantizer != "fp" or self.a_quantizer != "fp"

  @classmethod
  def from_method(cls, method: str, w_bits: int, a_bits: int, **kw) -> "QuantConfig":
    """Quantizers for a method name: "fp", "minmax", "lsq", or "pq[+aqd][+sqd]"."""
    base = method.split("+")[0]
    names = {"fp": "fp", "pq": "pauta", "pauta": "pauta", "minmax": "minmax", "lsq": "lsq"}
    if base not in names:
      raise ValueError(f"method={method!r}; valid: fp, minmax, lsq, pq[+aqd][+sqd]")
    q = names[base]
    return cls(w_quantizer=q, a_quantizer=q, w_bits=w_bits, a_bits=a_bits, **kw)


FP = QuantConfig()


def _check_mode(mode: str, bypass_prob: float) -> None:
  if mode not in MODES:
    raise ValueError(f"mode={mode!r}; valid: {MODES}")
  if not 0.0 <= bypass_prob <= 1.0:
    raise ValueError(f"bypass_prob={bypass_prob!r}; valid: [0, 1]")


def synced_range(x: jax.Array, quantizer: str, lam: float, symmetric: bool,
                 axis_name: Optional[str], per_channel: bool = False
                 ) -> Tuple[jax.Array, jax.Array]:
  """(lo, hi) of a batch of activations, synchronised over `axis_name`.

  Per tensor: float32 scalars. Per channel (`per_channel`): float32 (C,) arrays over the
  last axis, statistics over every other axis. Under pmap the statistics are those of the
  global batch (min/max all-reduced, moments averaged), so N devices give the same range as
  one device on the whole batch. No gradient.
  """
  x = jax.lax.stop_gradient(x).astype(jnp.float32)
  x = x.reshape(-1, x.shape[-1]) if per_channel else x.reshape(-1)
  mn = jnp.min(x, axis=0)
  mx = jnp.max(x, axis=0)
  if axis_name is not None:
    mn, mx = jax.lax.pmin(mn, axis_name), jax.lax.pmax(mx, axis_name)
  if quantizer == "minmax":
    if symmetric:
      a = jnp.maximum(-mn, mx)
      return -a, a
    return mn, mx
  mean = jnp.mean(x, axis=0)
  if axis_name is not None:
    mean = jax.lax.pmean(mean, axis_name)
  # Variance about the global mean (a second pass, a second all-reduce): E[x^2] - E[x]^2
  # would lose most digits when |mean| >> std. Shards are equal-sized under pmap, so the
  # mean of the per-device variances is the global one.
  var = jnp.mean(jnp.square(x - mean), axis=0)
  if axis_name is not None:
    var = jax.lax.pmean(var, axis_name)
  std = jnp.sqrt(var)
  if symmetric:
    a = jnp.minimum(jnp.abs(mean) + lam * std, jnp.maximum(-mn, mx))
    return -a, a
  return jnp.maximum(mean - lam * std, mn), jnp.minimum(mean + lam * std, mx)


class QuantSite(nn.Module):
  """Quantizes a weight and an input activation; owns their quantizer state.

  Call with the layer's kernel (any shape whose last axis is the output
  channel) and its input x; returns (kernel_hat, x_hat) with the input dtypes.
  Gradients: straight-through (clipped) for kernel and x; LSQ steps get LSQ's
  scaled gradient; PQ/min-max ranges get none.
  """
  cfg: QuantConfig
  axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, kernel: jax.Array, x: jax.Array, *, train: bool, mode: str,
               bypass_prob: float = 0.0, calibrate: bool = False):
    cfg = self.cfg
    if cfg.w_quantizer != "fp":
      self.variable("quant_stats", "site", lambda: jnp.array(cfg.w_bits, jnp.int32))
    if mode == "fp" and not self.is_initializing():
      return kernel, x  # no quantizer op traced, no EMA update
    kernel_q = self._quantize_weight(kernel, calibrate)
    x_q = self._quantize_act(x, train, calibrate)
    if mode == "fp":
      return kernel, x
    if mode == "stochastic":
      bypass = jax.random.bernoulli(self.make_rng("quant"), bypass_prob)
      kernel_q = jnp.where(bypass, kernel, kernel_q)
      x_q = jnp.where(bypass, x, x_q)
    return kernel_q, x_q

  def _lsq(self, name: str, v: jax.Array, bits: int, calibrate: bool) -> jax.Array:
    """LSQ on v with a learnable float32 step param `name` (re)set from v when calibrating."""
    init = lambda: quant.lsq_init_step(v, bits, True).astype(jnp.float32)
    step = self.param(name, lambda _: init())
    if calibrate and self.is_mutable_collection("params"):
      step = init()
      self.put_variable("params", name, step)
    return quant.lsq_quantize(v, step.astype(v.dtype), bits, signed=True)

  def _quantize_weight(self, w: jax.Array, calibrate: bool) -> jax.Array:
    cfg = self.cfg
    if cfg.w_quantizer == "fp":
      return w
    if cfg.w_quantizer == "lsq":
      return self._lsq("w_step", w, cfg.w_bits, calibrate)
    w2 = w.reshape(-1, w.shape[-1]) if w.ndim != 2 else w
    axis = -1 if cfg.w_granularity == "channel" else None
    fn = quant.pauta_range if cfg.w_quantizer == "pauta" else quant.minmax_range
    kw = {"lam": cfg.lam} if cfg.w_quantizer == "pauta" else {}
    lo, hi = fn(w2, channel_axis=axis, symmetric=cfg.w_symmetric, **kw)
    return quant.fake_quant(w2, lo, hi, cfg.w_bits, symmetric=cfg.w_symmetric).reshape(w.shape)

  def _quantize_act(self, x: jax.Array, train: bool, calibrate: bool) -> jax.Array:
    cfg = self.cfg
    if cfg.a_quantizer == "fp":
      return x
    if cfg.a_quantizer == "lsq":
      return self._lsq("a_step", x, cfg.a_bits, calibrate)
    per_channel = cfg.a_granularity == "channel"
    shape = (x.shape[-1],) if per_channel else ()
    lo_v = self.variable("quant_stats", "a_lo", lambda: jnp.zeros(shape, jnp.float32))
    hi_v = self.variable("quant_stats", "a_hi", lambda: jnp.zeros(shape, jnp.float32))
    n_v = self.variable("quant_stats", "a_count", lambda: jnp.zeros((), jnp.int32))
    range_of_batch = lambda: synced_range(x, cfg.a_quantizer, cfg.lam, cfg.a_symmetric,
                                          self.axis_name, per_channel)
    if train or calibrate:
      lo, hi = range_of_batch()
      if self.is_mutable_collection("quant_stats") and not self.is_initializing():
        m = jnp.where((n_v.value == 0) | calibrate, 0.0, cfg.ema_momentum)
        lo_v.value = m * lo_v.value + (1 - m) * lo
        hi_v.value = m * hi_v.value + (1 - m) * hi
        n_v.value = n_v.value + 1
    else:
      have_ema = n_v.value > 0
      lo_b, hi_b = range_of_batch()
      lo = jnp.where(have_ema, lo_v.value, lo_b)
      hi = jnp.where(have_ema, hi_v.value, hi_b)
    return quant.fake_quant(x, lo.astype(x.dtype), hi.astype(x.dtype), cfg.a_bits,
                            symmetric=cfg.a_symmetric)


class QuantDense(nn.Module):
  """Dense layer (= 1x1 conv) over the last axis, optionally grouped and quantized.

  x: (..., C_in) -> (..., features). With `groups` G the kernel is
  (G, C_in/G, features/G), a block-diagonal 1x1 conv as PyTorch's groups=G.
  `quantize=False` makes the layer full precision whatever the config.
  """
  features: int
  cfg: QuantConfig = FP
  quantize: bool = True
  groups: int = 1
  use_bias: bool = True
  axis_name: Optional[str] = None
  dtype: Any = jnp.float32
  kernel_init: Any = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False, mode: str = "quant",
               bypass_prob: float = 0.0, calibrate: bool = False) -> jax.Array:
    _check_mode(mode, bypass_prob)
    cin, g = x.shape[-1], self.groups
    if cin % g or self.features % g:
      raise ValueError(f"groups={g} must divide C_in={cin} and features={self.features}")
    if g == 1:
      shape = (cin, self.features)
    else:
      shape = (g, cin // g, self.features // g)
    kernel = self.param("kernel", self.kernel_init, shape, jnp.float32)
    if self.quantize and self.cfg.enabled:
      k2 = kernel if g == 1 else kernel.transpose(1, 0, 2).reshape(cin // g, self.features)
      k2, x = QuantSite(self.cfg, self.axis_name, name="quant")(
          k2, x, train=train, mode=mode, bypass_prob=bypass_prob, calibrate=calibrate)
      if g > 1:
        kernel = k2.reshape(cin // g, g, self.features // g).transpose(1, 0, 2)
      else:
        kernel = k2
    x = x.astype(self.dtype)
    kernel = kernel.astype(self.dtype)
    if g == 1:
      y = jnp.dot(x, kernel)
    else:
      xg = x.reshape(*x.shape[:-1], g, cin // g)
      y = jnp.einsum("...gi,gio->...go", xg, kernel).reshape(*x.shape[:-1], self.features)
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32).astype(self.dtype)
    return y


class QuantConv(nn.Module):
  """2-D convolution (NHWC, 'SAME'-style symmetric padding), optionally quantized."""
  features: int
  kernel_size: Tuple[int, int] = (3, 3)
  strides: Tuple[int, int] = (1, 1)
  cfg: QuantConfig = FP
  quantize: bool = True
  use_bias: bool = True
  axis_name: Optional[str] = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False, mode: str = "quant",
               bypass_prob: float = 0.0, calibrate: bool = False) -> jax.Array:
    _check_mode(mode, bypass_prob)
    kh, kw = self.kernel_size
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (kh, kw, x.shape[-1], self.features), jnp.float32)
    if self.quantize and self.cfg.enabled:
      kernel, x = QuantSite(self.cfg, self.axis_name, name="quant")(
          kernel, x, train=train, mode=mode, bypass_prob=bypass_prob, calibrate=calibrate)
    y = jax.lax.conv_general_dilated(
        x.astype(self.dtype), kernel.astype(self.dtype), self.strides,
        [(kh // 2, kh // 2), (kw // 2, kw // 2)],
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32).astype(self.dtype)
    return y
