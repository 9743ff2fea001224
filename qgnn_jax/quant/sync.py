"""Batch statistics of activations, synchronised over a pmap axis (for range quantizers).

Under pmap every device sees its shard of the batch; the range a quantizer takes must
be that of the global batch so that N devices train as one. x arrives as (N, C):
statistics run over axis 0 per channel, or over every element per tensor. Results are
float32, with no gradient unless the input view was taken with stop_grad=False.
"""
from __future__ import annotations

from typing import Optional, Tuple

import jax
import jax.numpy as jnp

Array = jax.Array


def flat_stats_input(x: Array, per_channel: bool, stop_grad: bool = True) -> Array:
  """float32 view, gradient-free unless stop_grad=False: (N, C) per channel, (N * C,)
  per tensor."""
  x = (jax.lax.stop_gradient(x) if stop_grad else x).astype(jnp.float32)
  return x.reshape(-1, x.shape[-1]) if per_channel else x.reshape(-1)


def synced_min_max(x: Array, axis_name: Optional[str]) -> Tuple[Array, Array]:
  """(min, max) over axis 0 of a `flat_stats_input`, all-reduced over `axis_name`."""
  mn, mx = jnp.min(x, axis=0), jnp.max(x, axis=0)
  if axis_name is not None:
    mn, mx = jax.lax.pmin(mn, axis_name), jax.lax.pmax(mx, axis_name)
  return mn, mx


def synced_mean_std(x: Array, axis_name: Optional[str]) -> Tuple[Array, Array]:
  """(mean, population std) over axis 0 of a `flat_stats_input`, of the global batch.

  The variance is taken about the global mean (a second pass, a second all-reduce):
  E[x^2] - E[x]^2 would lose most digits when |mean| >> std. Shards are equal-sized
  under pmap, so the mean of the per-device variances is the global one.
  """
  mean = jnp.mean(x, axis=0)
  if axis_name is not None:
    mean = jax.lax.pmean(mean, axis_name)
  var = jnp.mean(jnp.square(x - mean), axis=0)
  if axis_name is not None:
    var = jax.lax.pmean(var, axis_name)
  pos = var > 0  # safe sqrt: a finite gradient at sigma == 0 for a differentiable x
  return mean, jnp.where(pos, jnp.sqrt(jnp.where(pos, var, 1.0)), 0.0)
