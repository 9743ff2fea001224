"""Min-max quantization as a registry entry: the range is the data's [min, max]
(the baseline "that overlooks outliers", SPEC §1.2)."""
from __future__ import annotations

from typing import Optional

import jax.numpy as jnp

from qgnn_jax.quant import quantizers, sync
from qgnn_jax.quant.pq import RangeQuantizer
from qgnn_jax.quant.registry import OperandSpec


class MinMax(RangeQuantizer):
  name = "minmax"

  def weight_range(self, w, spec: OperandSpec):
    return quantizers.minmax_range(w.reshape(-1, w.shape[-1]),
                                   channel_axis=-1 if spec.per_channel else None,
                                   symmetric=spec.symmetric)

  def batch_range(self, x, spec: OperandSpec, axis_name: Optional[str] = None):
    mn, mx = sync.synced_min_max(sync.flat_stats_input(x, spec.per_channel), axis_name)
    if spec.symmetric:
      a = jnp.maximum(-mn, mx)
      return -a, a
    return mn, mx
