"""Quantizers of qgnn_jax (SPEC §1): pure JAX functions, no Flax, and their registry.

Fake quantization (float in, float out, straight-through gradients):
  fake_quant, pauta_range, pauta_quantize, minmax_range, minmax_quantize,
  lsq_quantize, lsq_init_step, lsq_plus_init, lsq_bounds, lsq_range, stochastic_round.
Integer form: quantize_int, dequantize, pack_bits, unpack_bits, packed_nbytes.
Validation: validate_bits, validate_lam, validate_channel_axis, check_finite.
Registry (`registry.py`): QUANTIZERS maps a method name to its entry (`Quantizer`);
`register` adds one at run time.
"""

from qgnn_jax.quant import lsq, minmax, n2uq, pq
from qgnn_jax.quant.integer import (dequantize, pack_bits, packed_nbytes, quantize_int,
                                    unpack_bits)
from qgnn_jax.quant.quantizers import (DEFAULT_LAM, LSQ_MIN_STEP, MAX_BITS, MIN_BITS,
                                       PAUTA_CRITERION_LAM, check_finite,
                                       fake_quant, lsq_bounds, lsq_init_step, lsq_plus_init,
                                       lsq_quantize,
                                       lsq_range, minmax_quantize, minmax_range,
                                       pauta_quantize, pauta_range, stochastic_round,
                                       validate_bits, validate_channel_axis, validate_lam)
from qgnn_jax.quant.registry import GRIDS, OperandSpec, Quantizer, Registry

QUANTIZERS = Registry([
    pq.PQ(),
    minmax.MinMax(),
    lsq.LSQ(),
    n2uq.N2UQ(),
])
register = QUANTIZERS.register
unregister = QUANTIZERS.unregister
get_quantizer = QUANTIZERS.get

__all__ = [
    "MIN_BITS", "MAX_BITS", "LSQ_MIN_STEP", "DEFAULT_LAM", "PAUTA_CRITERION_LAM",
    "fake_quant", "pauta_range", "pauta_quantize", "minmax_range", "minmax_quantize",
    "lsq_bounds", "lsq_range", "lsq_quantize", "lsq_init_step", "lsq_plus_init",
    "stochastic_round",
    "quantize_int", "dequantize", "pack_bits", "unpack_bits", "packed_nbytes",
    "validate_bits", "validate_lam", "validate_channel_axis", "check_finite",
    "GRIDS", "OperandSpec", "Quantizer", "Registry", "QUANTIZERS", "register", "unregister",
    "get_quantizer",
]
