"""Quantizers of qgnn_jax: pure JAX functions, no Flax, and their registry
(docs/METHOD.md, "Definitions", "Choices" and "Quantizers").

One module per quantizer, with its maths as functions and its registry entry:
  uniform.py  fake_quant (the uniform grid, clipped STE) and RangeQuantizer;
  pq.py       pauta_range, pauta_quantize, PQ;
  minmax.py   minmax_range, minmax_quantize, MinMax;
  lsq.py      lsq_quantize, lsq_init_step, lsq_plus_init, lsq_bounds, lsq_range, LSQ;
  n2uq.py     n2uq_init, n2uq_quantize, n2uq_int, N2UQ.
Shared: grid.py (bit-width and argument checks, the compute dtype, grid and statistics
arithmetic: public helpers), sync.py (batch statistics over a pmap axis), integer.py
(quantize_int, dequantize, pack_bits, unpack_bits, packed_nbytes).
Registry (registry.py): QUANTIZERS maps a method name to its entry (`Quantizer`, with its
valid bit range `min_bits` / `max_bits`); `register` adds one at run time; `check_bits`
is the one bit-width check. The choice lists: GRIDS, GRANULARITIES.
"""

from qgnn_jax.quant import lsq, minmax, n2uq, pq
from qgnn_jax.quant.grid import (MAX_BITS, MIN_BITS, check_finite, validate_bits,
                                 validate_channel_axis, validate_lam)
from qgnn_jax.quant.integer import (dequantize, pack_bits, packed_nbytes, quantize_int,
                                    unpack_bits)
from qgnn_jax.quant.lsq import (LSQ_MIN_STEP, lsq_bounds, lsq_init_step, lsq_plus_init,
                                lsq_quantize, lsq_range)
from qgnn_jax.quant.minmax import minmax_quantize, minmax_range
from qgnn_jax.quant.n2uq import n2uq_init, n2uq_int, n2uq_quantize
from qgnn_jax.quant.pq import PAUTA_CRITERION_LAM, pauta_quantize, pauta_range
from qgnn_jax.quant.registry import (DEFAULT_LAM, GRANULARITIES, GRIDS, OperandSpec, Quantizer,
                                     Registry)
from qgnn_jax.quant.uniform import fake_quant

QUANTIZERS = Registry([
    pq.PQ(),
    minmax.MinMax(),
    lsq.LSQ(),
    n2uq.N2UQ(),
])
register = QUANTIZERS.register
unregister = QUANTIZERS.unregister
get_quantizer = QUANTIZERS.get
check_bits = QUANTIZERS.check_bits
bit_range = QUANTIZERS.bit_range

__all__ = [
    "MIN_BITS", "MAX_BITS", "LSQ_MIN_STEP", "DEFAULT_LAM", "PAUTA_CRITERION_LAM",
    "GRANULARITIES", "GRIDS",
    "fake_quant", "pauta_range", "pauta_quantize", "minmax_range", "minmax_quantize",
    "lsq_bounds", "lsq_range", "lsq_quantize", "lsq_init_step", "lsq_plus_init",
    "n2uq_init", "n2uq_quantize", "n2uq_int",
    "quantize_int", "dequantize", "pack_bits", "unpack_bits", "packed_nbytes",
    "validate_bits", "validate_lam", "validate_channel_axis", "check_finite",
    "OperandSpec", "Quantizer", "Registry", "QUANTIZERS", "register", "unregister",
    "get_quantizer", "check_bits", "bit_range",
]
