"""Isotropic Vision GNN (ViG-Ti/S/B and small-input variants), quantizable."""
from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tests.legacy.layers import FP, QuantConfig
from qgnn_jax.models.blocks import knn_schedule
from tests.legacy.blocks import FFN, Grapher, Head, Stem


class ViG(nn.Module):
  """Isotropic ViG: stem -> +pos-embed -> depth x (Grapher, FFN) -> head.

  Call: images (B, H, W, C_in) float -> logits (B, num_classes) float32, and
  with return_features=True also the list of the 2*depth block outputs, each
  (B, N, C) (after every Grapher and every FFN: what AQD distils).

  Keyword arguments at call time: train (BN batch stats, dropout, drop-path,
  EMA updates), mode ("fp" | "quant" | "stochastic"), bypass_prob (stochastic
  mode), calibrate (reset PQ/min-max EMAs and LSQ steps from this batch).
  RNG streams: "dropout" (train), "quant" (mode="stochastic").
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
  cfg: QuantConfig = FP
  graph_impl: str = "dense"
  axis_name: Optional[str] = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool = False, mode: str = "quant",
               bypass_prob: float = 0.0, calibrate: bool = False,
               return_features: bool = False):
    if images.ndim != 4:
      raise ValueError(f"images must be NHWC (B, H, W, C), got shape {images.shape}")
    q = dict(train=train, mode=mode, bypass_prob=bypass_prob, calibrate=calibrate)
    c = self.dim
    stem_channels = self.stem_channels or (c // 8, c // 4, c // 2, c, c)
    x = Stem(tuple(stem_channels), tuple(self.stem_strides), self.cfg, self.axis_name,
             self.dtype, name="stem")(images.astype(self.dtype), **q)
    b, h, w, _ = x.shape
    pos = self.param("pos_embed", nn.initializers.zeros, (1, h, w, c), jnp.float32)
    x = x + pos.astype(self.dtype)
    ks, ds = knn_schedule(self.k, self.depth, h * w)
    dpr = np.linspace(0.0, self.drop_path_rate, self.depth)
    feats = []
    for i in range(self.depth):
      x = Grapher(ks[i], ds[i], self.cfg, drop_path=float(dpr[i]), graph_impl=self.graph_impl,
                  axis_name=self.axis_name, dtype=self.dtype, name=f"grapher{i}")(x, **q)
      feats.append(x.reshape(b, h * w, c))
      x = FFN(4 * c, self.cfg, float(dpr[i]), self.axis_name, self.dtype, name=f"ffn{i}")(x, **q)
      feats.append(x.reshape(b, h * w, c))
    logits = Head(self.num_classes, self.head_hidden, self.dropout, self.cfg, self.axis_name,
                  self.dtype, name="head")(x, **q)
    return (logits, feats) if return_features else logits
