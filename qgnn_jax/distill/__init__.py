"""Self-distillation of QGNN-IC: AQD and SQD, their forms by name (docs/METHOD.md, "AQD", "SQD").

    form = distill.AQD_FORMS.get("attention_transfer")
    loss = form.loss(student_feats, teacher_feats, tau)

`aqd.py` (feature losses against the FP teacher), `sqd.py` (logit losses against the
stochastic teacher), `registry.py` (the forms by name), `taps.py` (which block outputs AQD
reads). The train step (`qgnn_jax.train`) runs the teacher passes.
"""
from qgnn_jax.distill.aqd import (attention_transfer, channel_attention, channel_attention_kl,
                                  channel_mse, node_attention)
from qgnn_jax.distill.registry import AQD_FORMS, SQD_FORMS, AqdForm, FormRegistry, SqdForm
from qgnn_jax.distill.sqd import cosine, kl
from qgnn_jax.distill.taps import FeatureTaps

# The original forms under their earlier names (kept: user code and tests call them).
aqd_loss = channel_mse
sqd_loss = kl

__all__ = ["AQD_FORMS", "SQD_FORMS", "AqdForm", "SqdForm", "FormRegistry", "FeatureTaps",
           "channel_mse", "attention_transfer", "channel_attention_kl", "channel_attention",
           "node_attention", "kl", "cosine", "aqd_loss", "sqd_loss"]
