"""Isotropic Vision GNN (ViG-Ti/S/B and small-input variants), plain Flax."""
from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qgnn_jax.models.blocks import FFN, Grapher, Head, Stem, knn_schedule


class ViG(nn.Module):
  """Isotropic ViG: stem -> +pos-embed -> depth x (Grapher, FFN) -> head.

  Call: images (B, H, W, C_in) float -> logits (B, num_classes) float32.
  `train` (keyword): BN batch statistics, dropout, drop-path ("dropout" rng stream).
  The block outputs that AQD distils are the outputs of the modules `grapher<i>` and
  `ffn<i>` (B, H, W, C), taken with Flax's `capture_intermediates`
  (`qgnn_jax.models.FEATURE_TAPS`).
  """
  num_classes: int
  dim: int = 192
  depth: int = 12
  k: int = 9
  stem_strides: Sequence[int] = (2, 2, 2, 2, 1)
  stem_channels: Optional[Sequence[int]] = None  # default: C/8, C/4, C/2, C, C
  head_hidden: int = 1024
  drop_path_rate: float = 0.0
  dropout: float = 0.0
  graph_impl: str = "dense"
  axis_name: Optional[str] = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
    if images.ndim != 4:
      raise ValueError(f"images must be NHWC (B, H, W, C), got shape {images.shape}")
    c = self.dim
    stem_channels = self.stem_channels or (c // 8, c // 4, c // 2, c, c)
    x = Stem(tuple(stem_channels), tuple(self.stem_strides), self.axis_name,
             self.dtype, name="stem")(images.astype(self.dtype), train=train)
    _, h, w, _ = x.shape
    pos = self.param("pos_embed", nn.initializers.zeros, (1, h, w, c), jnp.float32)
    x = x + pos.astype(self.dtype)
    ks, ds = knn_schedule(self.k, self.depth, h * w)
    dpr = np.linspace(0.0, self.drop_path_rate, self.depth)
    for i in range(self.depth):
      x = Grapher(ks[i], ds[i], drop_path=float(dpr[i]), graph_impl=self.graph_impl,
                  axis_name=self.axis_name, dtype=self.dtype, name=f"grapher{i}")(x, train=train)
      x = FFN(4 * c, float(dpr[i]), self.axis_name, self.dtype, name=f"ffn{i}")(x, train=train)
    return Head(self.num_classes, self.head_hidden, self.dropout, self.axis_name,
                self.dtype, name="head")(x, train=train)
