"""LEGACY (issue 12 equivalence test only): the hand-wired QuantDense blocks.

Vision GNN building blocks (Han et al., NeurIPS 2022), NHWC, quantizable.

Every block takes the call-time quantization arguments of
`qgnn_jax.layers` as keywords (train, mode, bypass_prob, calibrate) and
passes them to its quantizable layers. BatchNorm, the k-NN search and the max
aggregation stay in float.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from qgnn_jax import graph
from qgnn_jax.models.blocks import DropPath, batch_norm, gelu  # unchanged by the redesign
from tests.legacy.layers import FP, QuantConfig, QuantConv, QuantDense


class Stem(nn.Module):
  """Strided 3x3 conv + BN (+ GELU between) stack: (B, H, W, C_in) -> (B, h, w, C).

  The first conv is always full precision; the others follow cfg.quantize_stem.
  """
  channels: Sequence[int]
  strides: Sequence[int]
  cfg: QuantConfig = FP
  axis_name: Optional[str] = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train=False, mode="quant", bypass_prob=0.0, calibrate=False):
    q = dict(train=train, mode=mode, bypass_prob=bypass_prob, calibrate=calibrate)
    n = len(self.channels)
    for i, (c, s) in enumerate(zip(self.channels, self.strides)):
      x = QuantConv(c, (3, 3), (s, s), cfg=self.cfg, quantize=(i > 0 and self.cfg.quantize_stem),
                    axis_name=self.axis_name, dtype=self.dtype, name=f"conv{i}")(x, **q)
      x = batch_norm(train, self.axis_name, self.dtype, name=f"bn{i}")(x)
      if i < n - 1:
        x = gelu(x)
    return x


class Grapher(nn.Module):
  """Grapher block: fc1+BN -> max-relative graph conv (+BN+GELU) -> fc2+BN -> drop-path -> +x.

  x: (B, H, W, C) -> (B, H, W, C). The graph conv is W [x_i ; max_j (x_j - x_i)]
  with channels interleaved and a 4-group 1x1 conv, as the official MRConv2d.
  With r > 1 the candidate neighbours are the r x r average-pooled nodes
  (pyramid ViG); `relative_pos` (N, M) is added to the k-NN distances.
  """
  k: int
  dilation: int = 1
  cfg: QuantConfig = FP
  r: int = 1
  relative_pos: Optional[np.ndarray] = None
  drop_path: float = 0.0
  graph_impl: str = "dense"
  groups: int = 4
  axis_name: Optional[str] = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train=False, mode="quant", bypass_prob=0.0, calibrate=False):
    q = dict(train=train, mode=mode, bypass_prob=bypass_prob, calibrate=calibrate)
    b, h, w, c = x.shape
    dense = lambda f, g=1, name=None: QuantDense(f, cfg=self.cfg, groups=g, axis_name=self.axis_name,
                                                 dtype=self.dtype, name=name)
    bn = lambda name: batch_norm(train, self.axis_name, self.dtype, name=name)
    shortcut = x
    x = bn("fc1_bn")(dense(c, name="fc1")(x, **q))
    keys = None
    if self.r > 1:
      keys = nn.avg_pool(x, (self.r, self.r), (self.r, self.r)).reshape(b, -1, c)
    nodes = x.reshape(b, h * w, c)
    rel = None if self.relative_pos is None else jnp.asarray(self.relative_pos)
    neighbors = graph.knn_graph(nodes, self.k, self.dilation, keys=keys, relative_pos=rel)
    agg = graph.max_relative(nodes, neighbors, keys, impl=self.graph_impl)
    x = jnp.stack([nodes, agg.astype(nodes.dtype)], axis=-1).reshape(b, h, w, 2 * c)
    x = gelu(bn("gconv_bn")(dense(2 * c, self.groups, name="gconv")(x, **q)))
    x = bn("fc2_bn")(dense(c, name="fc2")(x, **q))
    return DropPath(self.drop_path)(x, train) + shortcut


class FFN(nn.Module):
  """FFN block: C -> hidden + BN -> GELU -> hidden -> C + BN -> drop-path -> +x."""
  hidden: int
  cfg: QuantConfig = FP
  drop_path: float = 0.0
  axis_name: Optional[str] = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train=False, mode="quant", bypass_prob=0.0, calibrate=False):
    q = dict(train=train, mode=mode, bypass_prob=bypass_prob, calibrate=calibrate)
    c = x.shape[-1]
    dense = lambda f, name: QuantDense(f, cfg=self.cfg, axis_name=self.axis_name,
                                       dtype=self.dtype, name=name)
    y = batch_norm(train, self.axis_name, self.dtype, "fc1_bn")(dense(self.hidden, "fc1")(x, **q))
    y = gelu(y)
    y = batch_norm(train, self.axis_name, self.dtype, "fc2_bn")(dense(c, "fc2")(y, **q))
    return DropPath(self.drop_path)(y, train) + x


class Head(nn.Module):
  """Global mean over nodes -> C->hidden + BN + GELU + dropout -> classes. (B,H,W,C)->(B,classes)."""
  num_classes: int
  hidden: int = 1024
  dropout: float = 0.0
  cfg: QuantConfig = FP
  axis_name: Optional[str] = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train=False, mode="quant", bypass_prob=0.0, calibrate=False):
    q = dict(train=train, mode=mode, bypass_prob=bypass_prob, calibrate=calibrate)
    x = jnp.mean(x, axis=(1, 2))
    x = QuantDense(self.hidden, cfg=self.cfg, quantize=self.cfg.quantize_head,
                   axis_name=self.axis_name, dtype=self.dtype, name="fc")(x, **q)
    x = gelu(batch_norm(train, self.axis_name, self.dtype, "bn")(x))
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    x = QuantDense(self.num_classes, cfg=self.cfg, quantize=self.cfg.quantize_head,
                   axis_name=self.axis_name, dtype=self.dtype, name="classifier")(x, **q)
    return x.astype(jnp.float32)
