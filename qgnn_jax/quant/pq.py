"""Pauta quantization (PQ, SPEC §1.1) as a registry entry: the lambda-sigma clipping range.

Weights: the range of the weight itself (`pauta_range`), per output channel by default.
Activations: the range of the current (global) batch, mu -+ lam sigma clipped to the
batch's min/max, kept as an EMA by the site for evaluation.
"""
from __future__ import annotations

from typing import Optional

import jax.numpy as jnp

from qgnn_jax.quant import integer, quantizers, sync
from qgnn_jax.quant.registry import OperandSpec, Quantizer


class RangeQuantizer(Quantizer):
  """A uniform grid over a range taken from the data (shared by PQ and min-max)."""
  tracks_range = True

  def quantize(self, x, spec: OperandSpec, state):
    # The range stays float32 (fake_quant computes in float32 for bf16 x too).
    return quantizers.fake_quant(x, state["lo"], state["hi"], spec.bits,
                                 symmetric=spec.symmetric, range_grad=spec.range_grad)

  def integer(self, x, spec: OperandSpec, state):
    return integer.quantize_int(x, spec.bits, state["lo"], state["hi"], symmetric=spec.symmetric)


class PQ(RangeQuantizer):
  name = "pq"

  def weight_range(self, w, spec: OperandSpec):
    w2 = w.reshape(-1, w.shape[-1])
    if spec.range_grad:
      return self._range(w2, spec, None)
    return quantizers.pauta_range(w2, lam=spec.lam, channel_axis=-1 if spec.per_channel else None,
                                  symmetric=spec.symmetric)

  def batch_range(self, x, spec: OperandSpec, axis_name: Optional[str] = None):
    return self._range(x, spec, axis_name)

  def _range(self, x, spec: OperandSpec, axis_name: Optional[str]):
    """mu -+ lam sigma clipped to [min, max] of the (global) x; mu, sigma carry x's
    gradient when spec.range_grad (min / max never do)."""
    flat = sync.flat_stats_input(x, spec.per_channel)
    mn, mx = sync.synced_min_max(flat, axis_name)
    moments_of = sync.flat_stats_input(x, spec.per_channel, stop_grad=False) \
        if spec.range_grad else flat
    mean, std = sync.synced_mean_std(moments_of, axis_name)
    if spec.symmetric:
      a = jnp.minimum(jnp.abs(mean) + spec.lam * std, jnp.maximum(-mn, mx))
      return -a, a
    return jnp.maximum(mean - spec.lam * std, mn), jnp.minimum(mean + spec.lam * std, mx)
