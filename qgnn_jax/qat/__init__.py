"""QGNN-IC for any Flax model, linen or NNX: quantization applied from outside, by rules
(README, "Quantize your own model"; docs/METHOD.md, "Quantization as a model transform").

    qmodel = quantize_model(model, [QuantRule(".*", w_quantizer="pq", a_quantizer="pq")])
    describe(qmodel, x)                      # the sites: path, op, quantizers, bits
    variables = qmodel.init(key, x, train=False)
    logits = qmodel.apply(variables, x, train=False, mode="quant")

`rules.py` (QuantRule, first match wins), `site.py` (one op's quantizer state and
modes), `model.py` (the qwix provider and `QuantizedModel`), `context.py` (which module
runs an op, which operand is its weight), `nnx_bridge.py` (NNX models as linen modules),
`sites.py` (`describe`, the sites of a model and of trained variables), `fp_init.py` (the FP
variables carried into a quantized model's: `carry`; `train.from_fp` builds a QAT state),
`ptq.py` (post-training quantization).
"""
from qgnn_jax.qat.model import (RESERVED_KWARGS, QuantizedModel, is_quantizer_param,
                                quantize_model)
from qgnn_jax.qat.sites import SiteInfo, describe, trace_sites
from qgnn_jax.qat import fp_init
from qgnn_jax.qat.ptq import calibrate, search_ranges
from qgnn_jax.qat.ptq import quantize as post_training_quantize
from qgnn_jax.qat.rules import OPS, QuantRule, full_precision, match
from qgnn_jax.qat.site import (MODES, TEACHER_DRAWS, CallSettings, TeacherDraw, call_settings,
                               current_settings, site_paths)

__all__ = ["quantize_model", "QuantizedModel", "QuantRule", "full_precision", "match",
           "is_quantizer_param", "CallSettings", "call_settings", "current_settings",
           "MODES", "OPS", "RESERVED_KWARGS", "describe", "trace_sites", "SiteInfo", "fp_init",
           "calibrate", "search_ranges", "post_training_quantize", "TeacherDraw", "TEACHER_DRAWS", "site_paths"]
