"""Vision GNN building blocks (Han et al., NeurIPS 2022), NHWC, plain Flax.

No quantization code: the linear layers are `nn.Dense`, `nn.Conv` (its op
`qgnn_jax.conv.conv_general_dilated`) and `GroupedDense` (an einsum), which
`qgnn_jax.qat.quantize_model` quantizes from outside by rules.
Every block takes `train` (BN batch statistics, dropout, drop-path).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qgnn_jax import conv, graph
from qgnn_jax.models.batchnorm import BatchNorm


# A variable collection that replaces the k-NN search: `model.apply({..., NEIGHBORS:
# {"grapher3": {"indices": idx}}}, x)` makes block 3 aggregate over `idx` (B, N, k) int32
# (indices into its M candidate nodes, row-major over the grid) instead of its own k-NN
# lists. Used to compare with another implementation's graphs (qgnn_jax.official).
NEIGHBORS = "neighbors"


def batch_norm(train: bool, axis_name: Optional[str], dtype: Any, name: Optional[str] = None,
               act: Optional[str] = None) -> BatchNorm:
  """BatchNorm with PyTorch's defaults (momentum 0.1 == 0.9 here, eps 1e-5), then `act`.

  act="gelu" fuses the GELU that follows (a backward that saves only BN's input: batchnorm.py).
  """
  return BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                   axis_name=axis_name, dtype=dtype, act=act, name=name)


class GroupedDense(nn.Module):
  """Grouped dense layer (= PyTorch's 1x1 conv with groups=G) over the last axis.

  x: (..., C_in) -> (..., features). Kernel (G, C_in/G, features/G), bias (features,):
  channel group g of the input maps to output group g (block-diagonal weight).
  """
  features: int
  groups: int
  dtype: Any = jnp.float32
  kernel_init: Any = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cin, g = x.shape[-1], self.groups
    if cin % g or self.features % g:
      raise ValueError(f"groups={g} must divide C_in={cin} and features={self.features}")
    kernel = self.param("kernel", self.kernel_init, (g, cin // g, self.features // g),
                        jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    xg = x.reshape(*x.shape[:-1], g, cin // g)
    y = jnp.einsum("...gi,gio->...go", xg, kernel).reshape(*x.shape[:-1], self.features)
    return y + bias


def dense(features: int, dtype: Any, name: str) -> nn.Dense:
  """nn.Dense with float32 params and compute in `dtype` (the layer of every block)."""
  return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32, name=name)


def conv3x3(features: int, stride: int, dtype: Any, name: str) -> nn.Conv:
  """3x3 conv, padding 1 (as PyTorch's Conv2d(3, stride, 1)), float32 params.

  The op is `qgnn_jax.conv.conv_general_dilated` (lax's, with a matmul weight gradient on
  XLA:CPU), looked up when called so that `qgnn_jax.qat`'s interception of it applies.
  """
  return nn.Conv(features, (3, 3), (stride, stride), padding=((1, 1), (1, 1)), dtype=dtype,
                 param_dtype=jnp.float32, conv_general_dilated=_conv_op, name=name)


def _conv_op(*args, **kwargs):
  return conv.conv_general_dilated(*args, **kwargs)


class DropPath(nn.Module):
  """Stochastic depth: drops whole residual branches per sample ('dropout' rng)."""
  rate: float

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    if not train or self.rate == 0.0:
      return x
    keep = jax.random.bernoulli(self.make_rng("dropout"), 1.0 - self.rate,
                                (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(keep, x / (1.0 - self.rate), 0.0).astype(x.dtype)


def knn_schedule(k: int, depth: int, num_nodes: int) -> tuple[list[int], list[int]]:
  """Neighbours and dilation per block: k grows linearly k -> 2k; d = min(i//4+1, N//max_k)."""
  ks = [int(v) for v in np.linspace(k, 2 * k, depth)]
  max_dilation = max(1, num_nodes // max(ks))
  ds = [min(i // 4 + 1, max_dilation) for i in range(depth)]
  return ks, ds


class Stem(nn.Module):
  """Strided 3x3 conv + BN (+ GELU between) stack: (B, H, W, C_in) -> (B, h, w, C)."""
  channels: Sequence[int]
  strides: Sequence[int]
  axis_name: Optional[str] = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train=False):
    n = len(self.channels)
    for i, (c, s) in enumerate(zip(self.channels, self.strides)):
      x = conv3x3(c, s, self.dtype, f"conv{i}")(x)
      act = "gelu" if i < n - 1 else None
      x = batch_norm(train, self.axis_name, self.dtype, f"bn{i}", act)(x)
    return x


class Grapher(nn.Module):
  """Grapher block: fc1+BN -> max-relative graph conv (+BN+GELU) -> fc2+BN -> drop-path -> +x.

  x: (B, H, W, C) -> (B, H, W, C). The graph conv is W [x_i ; max_j (x_j - x_i)]
  with channels interleaved and a 4-group 1x1 conv, as the official MRConv2d.
  With r > 1 the candidate neighbours are the r x r average-pooled nodes
  (pyramid ViG); `relative_pos` (N, M) is added to the k-NN distances. A variable
  `indices` (B, N, k) in collection `NEIGHBORS` replaces the k-NN search (injected graphs).
  """
  k: int
  dilation: int = 1
  r: int = 1
  relative_pos: Optional[np.ndarray] = None
  drop_path: float = 0.0
  graph_impl: str = "dense"
  groups: int = 4
  axis_name: Optional[str] = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train=False):
    b, h, w, c = x.shape
    bn = lambda name: batch_norm(train, self.axis_name, self.dtype, name=name)
    shortcut = x
    x = bn("fc1_bn")(dense(c, self.dtype, "fc1")(x))
    keys = None
    if self.r > 1:
      keys = nn.avg_pool(x, (self.r, self.r), (self.r, self.r)).reshape(b, -1, c)
    nodes = x.reshape(b, h * w, c)
    if self.has_variable(NEIGHBORS, "indices"):  # given, not searched (see NEIGHBORS)
      neighbors = self.get_variable(NEIGHBORS, "indices")
    else:
      rel = None if self.relative_pos is None else jnp.asarray(self.relative_pos)
      neighbors = graph.knn_graph(nodes, self.k, self.dilation, keys=keys, relative_pos=rel)
    agg = graph.max_relative(nodes, neighbors, keys, impl=self.graph_impl)
    x = jnp.stack([nodes, agg.astype(nodes.dtype)], axis=-1).reshape(b, h, w, 2 * c)
    x = GroupedDense(2 * c, self.groups, self.dtype, name="gconv")(x)
    x = batch_norm(train, self.axis_name, self.dtype, "gconv_bn", "gelu")(x)
    x = bn("fc2_bn")(dense(c, self.dtype, "fc2")(x))
    return DropPath(self.drop_path)(x, train) + shortcut


class FFN(nn.Module):
  """FFN block: C -> hidden + BN -> GELU -> hidden -> C + BN -> drop-path -> +x."""
  hidden: int
  drop_path: float = 0.0
  axis_name: Optional[str] = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train=False):
    c = x.shape[-1]
    bn = lambda name, act=None: batch_norm(train, self.axis_name, self.dtype, name, act)
    y = bn("fc1_bn", "gelu")(dense(self.hidden, self.dtype, "fc1")(x))
    y = bn("fc2_bn")(dense(c, self.dtype, "fc2")(y))
    return DropPath(self.drop_path)(y, train) + x


class Head(nn.Module):
  """Global mean over nodes -> C->hidden + BN + GELU + dropout -> classes. (B,H,W,C)->(B,classes)."""
  num_classes: int
  hidden: int = 1024
  dropout: float = 0.0
  axis_name: Optional[str] = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train=False):
    x = jnp.mean(x, axis=(1, 2))
    x = dense(self.hidden, self.dtype, "fc")(x)
    x = batch_norm(train, self.axis_name, self.dtype, "bn", "gelu")(x)
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    x = dense(self.num_classes, self.dtype, "classifier")(x)
    return x.astype(jnp.float32)
