"""AQD forms: feature distillation from the full-precision teacher pass (docs/METHOD.md, "AQD").

Every form is a pure loss of equal-length lists of (B, N, C) block outputs of the quantized
student and of the same network run in full precision (the teacher). The teacher side is
wrapped in `stop_gradient` inside each loss, so a caller cannot train the teacher; every
form is 0 when the student's features equal the teacher's. Shapes may differ between
layers (e.g. a pyramid model); each layer gives one term and the terms are averaged.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp


def _check(student_feats: Sequence[jax.Array], teacher_feats: Sequence[jax.Array]) -> None:
  if len(student_feats) != len(teacher_feats) or not student_feats:
    raise ValueError(f"need equal, non-empty feature lists; got {len(student_feats)} student "
                     f"and {len(teacher_feats)} teacher layers")
  for s, t in zip(student_feats, teacher_feats):
    if s.shape != t.shape or s.ndim != 3:
      raise ValueError(f"student {s.shape} and teacher {t.shape} must both be (B, N, C)")


def _check_tau(tau: float) -> None:
  if not tau > 0:
    raise ValueError(f"tau={tau!r}; valid: tau > 0")


def channel_attention(feats: jax.Array, tau: float = 1.0) -> jax.Array:
  """Channel attention of a feature map: softmax over channels of per-channel energy.

  a = softmax_c(e / (tau * mean_c e)), e_c = mean_n F[b, n, c]^2.
  feats: (B, N, C) -> (B, C) float32, each row sums to 1. Differentiable (callers
  stop the gradient on the teacher side).
  """
  _check_tau(tau)
  f = feats.astype(jnp.float32)
  e = jnp.mean(jnp.square(f), axis=1)                                   # (B, C)
  scale = tau * jnp.maximum(jnp.mean(e, axis=-1, keepdims=True), 1e-12)
  return jax.nn.softmax(e / scale, axis=-1)


def channel_mse(student_feats: Sequence[jax.Array], teacher_feats: Sequence[jax.Array],
                tau: float = 1.0, eps: float = 1e-6) -> jax.Array:
  """AQD's original form: feature MSE weighted by the teacher's channel attention.

  L = mean_layers mean_b sum_c a_t[b,c] * mean_n (S - T)^2[b,n,c] / (mean_{n,c} T[b]^2 + eps),
  a_t = channel_attention(T, tau). Returns a float32 scalar, differentiable w.r.t. the
  student features only.
  """
  _check(student_feats, teacher_feats)
  _check_tau(tau)
  losses = []
  for s, t in zip(student_feats, teacher_feats):
    t = jax.lax.stop_gradient(t).astype(jnp.float32)
    a = channel_attention(t, tau)                                       # (B, C)
    err = jnp.mean(jnp.square(s.astype(jnp.float32) - t), axis=1)       # (B, C)
    norm = jnp.mean(jnp.square(t), axis=(1, 2)) + eps                   # (B,)
    losses.append(jnp.mean(jnp.sum(a * err, axis=-1) / norm))
  return jnp.mean(jnp.stack(losses))


def node_attention(feats: jax.Array, eps: float = 1e-12) -> jax.Array:
  """Attention-transfer map of a feature map: Q = sum_c F^2 per node, L2-normalised.

  feats: (B, N, C) -> (B, N) float32 with ||row||_2 = 1 (Zagoruyko & Komodakis, ICLR 2017,
  with p = 2 over the channels; for a ViG the "spatial" positions are the graph's nodes).
  """
  q = jnp.sum(jnp.square(feats.astype(jnp.float32)), axis=-1)          # (B, N)
  return q / jnp.maximum(jnp.linalg.norm(q, axis=-1, keepdims=True), eps)


def attention_transfer(student_feats: Sequence[jax.Array], teacher_feats: Sequence[jax.Array],
                       tau: float = 1.0) -> jax.Array:
  """Attention transfer: L = mean_layers mean_b || Q_s[b] - Q_t[b] ||_2^2.

  Q = node_attention(F). Each term lies in [0, 4] whatever the layer's width and node
  count. tau is unused (the forms share one signature). Float32 scalar; differentiable
  w.r.t. the student features only.
  """
  del tau
  _check(student_feats, teacher_feats)
  losses = []
  for s, t in zip(student_feats, teacher_feats):
    qt = node_attention(jax.lax.stop_gradient(t))
    qs = node_attention(s)
    losses.append(jnp.mean(jnp.sum(jnp.square(qs - qt), axis=-1)))
  return jnp.mean(jnp.stack(losses))


def channel_attention_kl(student_feats: Sequence[jax.Array],
                         teacher_feats: Sequence[jax.Array], tau: float = 1.0) -> jax.Array:
  """The student's channel-attention distribution matched to the FP teacher's by KL.

  L = mean_layers mean_b KL(a_t[b] || a_s[b]), a = channel_attention(F, tau): the
  student mimics the channel-wise attention pattern of the full-precision activations.
  Float32 scalar; differentiable w.r.t. the student features only.
  """
  _check(student_feats, teacher_feats)
  losses = []
  for s, t in zip(student_feats, teacher_feats):
    at = channel_attention(jax.lax.stop_gradient(t), tau)
    log_as = jnp.log(jnp.maximum(channel_attention(s, tau), 1e-30))
    log_at = jnp.log(jnp.maximum(at, 1e-30))
    losses.append(jnp.mean(jnp.sum(at * (log_at - log_as), axis=-1)))
  return jnp.mean(jnp.stack(losses))
