"""LSQ (Esser et al., ICLR 2020) and LSQ+ (Bhalgat et al., CVPR-W 2020) as a registry entry.

One learnable step s per tensor, a float32 Flax param (kept float32 in the forward also
under bf16 compute). Its gradient is LSQ's, scaled by 1 / sqrt(numel Q_P) with numel the
operand's *global* element count (`state["numel"]`, set by the site: x.size times the
devices of the pmap axis), so N devices train as one.

The grid follows `spec.grid` (`qat.QuantRule.a_grid` for activations; weights are always
signed):
  * "signed":   [-Q_N, Q_P] = [-2^(b-1), 2^(b-1) - 1], s0 = 2 mean|x| / sqrt(Q_P) (LSQ);
  * "unsigned": [0, 2^b - 1], s0 the same formula with the unsigned Q_P: LSQ's grid after
    ReLU, for inputs that are non-negative by construction (a GELU output's tail down to
    -0.17 is clipped to 0);
  * "offset":   LSQ+: the unsigned grid shifted by a learnable offset beta,
    x_hat = beta + s round(clip((x - beta) / s, 0, 2^b - 1)), for GELU/Swish-like inputs;
    beta0 = min x, s0 minimising the MSE on the first batch (`quantizers.lsq_plus_init`);
    beta's gradient (1 where clipped) takes the same gradient scale.
Granularity and symmetry settings do not apply.
"""
from __future__ import annotations

import jax.numpy as jnp

from qgnn_jax.quant import integer, quantizers
from qgnn_jax.quant.registry import OperandSpec, Quantizer


class LSQ(Quantizer):
  name = "lsq"
  learnable = ("step", "offset")  # "offset" only on a grid="offset" operand (param_names)

  def param_names(self, spec: OperandSpec):
    return ("step", "offset") if spec.grid == "offset" else ("step",)

  def init_params(self, x, spec: OperandSpec):
    if spec.grid == "offset":
      s, beta = quantizers.lsq_plus_init(x, spec.bits)
      return {"step": s.astype(jnp.float32), "offset": beta.astype(jnp.float32)}
    signed = spec.grid == "signed"
    return {"step": quantizers.lsq_init_step(x, spec.bits, signed).astype(jnp.float32)}

  def quantize(self, x, spec: OperandSpec, state):
    return quantizers.lsq_quantize(x, state["step"], spec.bits, signed=spec.grid == "signed",
                                   offset=state.get("offset"), numel=state.get("numel"))

  def integer(self, x, spec: OperandSpec, state):
    lo, hi = quantizers.lsq_range(state["step"], spec.bits, signed=spec.grid == "signed",
                                  offset=state.get("offset"))
    return integer.quantize_int(x, spec.bits, lo, hi, symmetric=False)
