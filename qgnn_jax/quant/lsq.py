"""LSQ (Esser et al., ICLR 2020) as a registry entry: one learnable step per tensor.

The step is a float32 Flax param initialised from the first sample as
s0 = 2 mean|x| / sqrt(Q_P); its gradient is LSQ's, scaled by 1 / sqrt(numel Q_P).
The grid is signed, [-Q_N, Q_P], for weights and activations (SPEC §1.2); granularity
and symmetry settings do not apply.
"""
from __future__ import annotations

import jax.numpy as jnp

from qgnn_jax.quant import integer, quantizers
from qgnn_jax.quant.registry import OperandSpec, Quantizer


class LSQ(Quantizer):
  name = "lsq"
  learnable = ("step",)

  def init_params(self, x, spec: OperandSpec):
    return {"step": quantizers.lsq_init_step(x, spec.bits, True).astype(jnp.float32)}

  def quantize(self, x, spec: OperandSpec, state):
    return quantizers.lsq_quantize(x, state["step"].astype(x.dtype), spec.bits, signed=True)

  def integer(self, x, spec: OperandSpec, state):
    lo, hi = quantizers.lsq_range(state["step"], spec.bits, signed=True)
    return integer.quantize_int(x, spec.bits, lo, hi, symmetric=False)
