"""Self-distillation losses of QGNN-IC (SPEC §3): AQD and SQD, pure functions.

The teacher arguments are constants: both losses apply `stop_gradient` to
them, so a caller cannot accidentally train the teacher pass.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, List, Sequence

import jax
import jax.numpy as jnp
from flax import traverse_util


def channel_attention(teacher: jax.Array, tau: float = 1.0) -> jax.Array:
  """AQD's channel attention of a teacher feature map.

  a = softmax_c(e / (tau * mean_c e)), e_c = mean_n T[b, n, c]^2.
  teacher: (B, N, C) -> (B, C) float32, each row sums to 1. No gradient.
  """
  if tau <= 0:
    raise ValueError(f"tau={tau!r}; valid: tau > 0")
  t = jax.lax.stop_gradient(teacher).astype(jnp.float32)
  e = jnp.mean(jnp.square(t), axis=1)                                   # (B, C)
  scale = tau * jnp.maximum(jnp.mean(e, axis=-1, keepdims=True), 1e-12)
  return jax.nn.softmax(e / scale, axis=-1)


def aqd_loss(student_feats: Sequence[jax.Array], teacher_feats: Sequence[jax.Array],
             tau: float = 1.0, eps: float = 1e-6) -> jax.Array:
  """Attention quantization distillation (SPEC §3.1).

  L = mean_layers mean_b sum_c a[b,c] * mean_n (S - T)^2[b,n,c] / (mean_{n,c} T[b]^2 + eps)

  Args:
    student_feats / teacher_feats: equal-length sequences of (B, N, C) block
      outputs (shapes may differ between layers, e.g. in a pyramid model).
    tau: attention temperature (> 0); larger -> flatter attention.
  Returns:
    scalar float32; differentiable w.r.t. the student features only.
  """
  if len(student_feats) != len(teacher_feats) or not student_feats:
    raise ValueError(f"need equal, non-empty feature lists; got {len(student_feats)} student "
                     f"and {len(teacher_feats)} teacher layers")
  losses = []
  for s, t in zip(student_feats, teacher_feats):
    if s.shape != t.shape or s.ndim != 3:
      raise ValueError(f"student {s.shape} and teacher {t.shape} must both be (B, N, C)")
    t = jax.lax.stop_gradient(t).astype(jnp.float32)
    a = channel_attention(t, tau)                                       # (B, C)
    err = jnp.mean(jnp.square(s.astype(jnp.float32) - t), axis=1)       # (B, C)
    norm = jnp.mean(jnp.square(t), axis=(1, 2)) + eps                   # (B,)
    losses.append(jnp.mean(jnp.sum(a * err, axis=-1) / norm))
  return jnp.mean(jnp.stack(losses))


def sqd_loss(student_logits: jax.Array, teacher_logits: jax.Array,
             temperature: float = 1.0) -> jax.Array:
  """Stochastic quantization distillation (SPEC §3.2).

  L = T^2 * mean_b KL(softmax(z_t / T) || softmax(z_s / T)).
  logits: (B, K) -> scalar float32; differentiable w.r.t. the student only.
  """
  if temperature <= 0:
    raise ValueError(f"temperature={temperature!r}; valid: > 0")
  if student_logits.shape != teacher_logits.shape:
    raise ValueError(f"logit shapes differ: {student_logits.shape} vs {teacher_logits.shape}")
  t = jax.lax.stop_gradient(teacher_logits).astype(jnp.float32) / temperature
  s = student_logits.astype(jnp.float32) / temperature
  log_pt = jax.nn.log_softmax(t, axis=-1)
  log_ps = jax.nn.log_softmax(s, axis=-1)
  kl = jnp.sum(jnp.exp(log_pt) * (log_pt - log_ps), axis=-1)
  return temperature ** 2 * jnp.mean(kl)


@dataclasses.dataclass(frozen=True)
class FeatureTaps:
  """The block outputs AQD distils: the outputs of the modules whose '/'-joined path
  fully matches `pattern` (e.g. ViG's r"(grapher|ffn)\\d+"), for any linen model.

  Pass `capture` as `capture_intermediates=` to `apply` (with "intermediates" mutable)
  and `collect` the returned collection.
  """
  pattern: str

  def __post_init__(self):
    try:
      re.compile(self.pattern)
    except re.error as e:
      raise ValueError(f"feature taps pattern {self.pattern!r} is not a regex: {e}") from None

  def capture(self, module: Any, method_name: str) -> bool:
    return method_name == "__call__" and \
        re.fullmatch(self.pattern, "/".join(map(str, module.path))) is not None

  def collect(self, intermediates: Any) -> List[jax.Array]:
    """The captured outputs, each reshaped (B, N, C) (all axes between the first and the
    last are nodes), in module-path order. Raises if nothing matched."""
    flat = traverse_util.flatten_dict(dict(intermediates), sep="/")
    feats = []
    for path in sorted(flat):
      module_path, _, method = path.rpartition("/")
      if method == "__call__" and re.fullmatch(self.pattern, module_path):
        for out in flat[path]:
          feats.append(out.reshape(out.shape[0], -1, out.shape[-1]))
    if not feats:
      raise ValueError(f"no module output matched the feature taps {self.pattern!r}; "
                       f"captured: {sorted(flat)[:8]}")
    return feats
