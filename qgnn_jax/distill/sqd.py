"""SQD losses: the quantized student's logits against a stochastic teacher's (docs/METHOD.md, "SQD").

The teacher is the same network and parameters run in mode "stochastic"
(`qgnn_jax.qat.TeacherDraw` says how it differs from the student); these are the losses
between the two outputs. Pure functions of (B, K) logits; the teacher side is under
`stop_gradient`; each is 0 when the logits are equal.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _check(student_logits: jax.Array, teacher_logits: jax.Array, temperature: float) -> None:
  if not temperature > 0:
    raise ValueError(f"temperature={temperature!r}; valid: > 0")
  if student_logits.shape != teacher_logits.shape:
    raise ValueError(f"logit shapes differ: {student_logits.shape} vs {teacher_logits.shape}")


def kl(student_logits: jax.Array, teacher_logits: jax.Array,
       temperature: float = 1.0) -> jax.Array:
  """L = T^2 * mean_b KL(softmax(z_t / T) || softmax(z_s / T)) (Hinton et al.'s KD loss).

  logits: (B, K) -> float32 scalar; differentiable w.r.t. the student only.
  """
  _check(student_logits, teacher_logits, temperature)
  t = jax.lax.stop_gradient(teacher_logits).astype(jnp.float32) / temperature
  s = student_logits.astype(jnp.float32) / temperature
  log_pt = jax.nn.log_softmax(t, axis=-1)
  log_ps = jax.nn.log_softmax(s, axis=-1)
  return temperature ** 2 * jnp.mean(jnp.sum(jnp.exp(log_pt) * (log_pt - log_ps), axis=-1))


def cosine(student_logits: jax.Array, teacher_logits: jax.Array,
           temperature: float = 1.0) -> jax.Array:
  """L = mean_b (1 - cos(softmax(z_s / T), softmax(z_t / T))), in [0, 1].

  SPEQ's loss (Boo et al., AAAI 2021), which they found better than KL for a teacher that
  shares the student's weights. logits: (B, K) -> float32 scalar; differentiable w.r.t.
  the student only.
  """
  _check(student_logits, teacher_logits, temperature)
  pt = jax.nn.softmax(jax.lax.stop_gradient(teacher_logits).astype(jnp.float32) / temperature, -1)
  ps = jax.nn.softmax(student_logits.astype(jnp.float32) / temperature, -1)
  cos = jnp.sum(ps * pt, -1) / (jnp.linalg.norm(ps, axis=-1) * jnp.linalg.norm(pt, axis=-1))
  return jnp.mean(1.0 - cos)
