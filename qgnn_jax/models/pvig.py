"""Pyramid Vision GNN (Pyramid ViG-Ti/S/M/B; Han et al., NeurIPS 2022), plain Flax.

Architecture (as the official `vig_pytorch/pyramid_vig.py`):

  stem: 3x3/2 conv (C0/2) + BN + GELU -> 3x3/2 conv (C0) + BN + GELU -> 3x3/1 conv + BN
  + learned positional embedding (1, H/4, W/4, C0)
  4 stages, stage s > 0 opens with a Downsample (3x3/2 conv + BN) C_{s-1} -> C_s;
  every block is Grapher + FFN(4C). The Grapher's candidate neighbours are the
  r x r average-pooled nodes, r = (4, 2, 1, 1) per stage, and a relative
  position term is added to the k-NN distances (see `relative_pos_bias`).
  k is constant (9) over all blocks and the dilation of block i is
  min(i // 4 + 1, M_last // k), M_last = nodes of the last stage (49 at 224 px).
  head: global mean -> 1x1 conv C3 -> 1024 + BN + GELU + dropout -> 1x1 conv -> classes.

Parameter count, 1000 classes (`qgnn_jax.models.count_params`):

  | model       | ours (params) | official trainable | official all nn.Parameters |
  |-------------|---------------|--------------------|----------------------------|
  | pvig_ti_224 | 10,714,376    | 10,714,376 (10.7M, paper) | 12,486,314          |
  | pvig_s_224  | 27,251,912    | 27,251,912         | 29,023,850                 |
  | pvig_m_224  | 49,525,832    | 49,525,832         | 51,681,930                 |
  | pvig_b_224  | 92,980,328    | 92,980,328         | 95,213,258                 |

The official code stores every Grapher's relative-position table as an
`nn.Parameter(requires_grad=False)` (1,771,938 numbers in pvig_ti); here it is a
constant computed from the grid (never trained, never checkpointed), so
`params` holds exactly the official trainable parameters, and adding
`relative_pos_entries(model, image_size)` gives the official
`sum(p.numel() for p in model.parameters())`. BN running statistics
are in `batch_stats`, not counted (as PyTorch's buffers).
"""
from __future__ import annotations

import functools
import math
from typing import Any, Dict, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qgnn_jax.models.blocks import FFN, Grapher, Head, Stem, batch_norm, conv3x3


# ----------------------------------------------------------------------------
# Relative position bias (numpy, computed once at trace time).
# ----------------------------------------------------------------------------
def _sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
  """(M,) positions -> (M, dim) [sin | cos] embedding with MAE's frequencies."""
  if dim % 2:
    raise ValueError(f"sin-cos embedding needs an even dim, got {dim}")
  omega = 1.0 / 10000.0 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
  angles = np.outer(pos.reshape(-1).astype(np.float64), omega)
  return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_pos_embed_2d(dim: int, height: int, width: int) -> np.ndarray:
  """2-D sin-cos embedding of an height x width grid, row-major nodes -> (H*W, dim).

  The first dim/2 channels encode the column, the last dim/2 the row (the
  official code's `meshgrid(grid_w, grid_h)` order).
  """
  if dim % 4:
    raise ValueError(f"2-D sin-cos embedding needs dim % 4 == 0, got {dim}")
  cols, rows = np.meshgrid(np.arange(width, dtype=np.float32),
                           np.arange(height, dtype=np.float32))
  return np.concatenate([_sincos_1d(dim // 2, cols), _sincos_1d(dim // 2, rows)], axis=1)


def relative_pos_2d(dim: int, height: int, width: int) -> np.ndarray:
  """Similarity of node positions: 2 <e_i, e_j> / dim, (N, N) with N = H*W."""
  e = sincos_pos_embed_2d(dim, height, width)
  return 2.0 * (e @ e.T) / e.shape[1]


def _cubic_weights(t: np.ndarray, a: float = -0.75) -> np.ndarray:
  """Keys' cubic convolution weights of the 4 taps at offsets -1, 0, 1, 2."""
  def near(x):  # |x| <= 1
    return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0

  def far(x):  # 1 < |x| < 2
    return ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a

  return np.stack([far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)], axis=-1)


def bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
  """(n_out, n_in) matrix of 1-D bicubic resampling as PyTorch's
  `F.interpolate(mode="bicubic", align_corners=False)` with a target size:
  a = -0.75, half-pixel centres, taps clamped at the border, no antialiasing."""
  scale = n_in / n_out
  src = (np.arange(n_out, dtype=np.float64) + 0.5) * scale - 0.5
  base = np.floor(src)
  w = _cubic_weights(src - base)  # (n_out, 4)
  idx = np.clip(base[:, None].astype(np.int64) + np.arange(-1, 3)[None, :], 0, n_in - 1)
  mat = np.zeros((n_out, n_in), np.float64)
  np.add.at(mat, (np.repeat(np.arange(n_out), 4), idx.reshape(-1)), w.reshape(-1))
  return mat


def bicubic_resize(x: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
  """Bicubic resize of a 2-D array as torch's F.interpolate(bicubic, align_corners=False)."""
  return bicubic_matrix(x.shape[0], out_h) @ x @ bicubic_matrix(x.shape[1], out_w).T


@functools.lru_cache(maxsize=32)
def relative_pos_bias(dim: int, height: int, width: int, r: int) -> np.ndarray:
  """The distance term of a pyramid Grapher, (N, M) float32, N = H*W, M = (H//r)*(W//r).

  As the official code: the (N, N) position similarity is bicubically resized
  to (N, M) and negated, so that adding it to the k-NN distances favours
  spatially close candidates. Read-only (cached).
  """
  n = height * width
  m = (height // r) * (width // r)
  rel = relative_pos_2d(dim, height, width).astype(np.float32).astype(np.float64)
  if m != n:
    rel = bicubic_resize(rel, n, m)
  out = (-rel).astype(np.float32)
  out.setflags(write=False)
  return out


# ----------------------------------------------------------------------------
# Model.
# ----------------------------------------------------------------------------
class Downsample(nn.Module):
  """3x3 stride-2 conv + BN between stages: (B, H, W, C_in) -> (B, H/2, W/2, C)."""
  features: int
  axis_name: Optional[str] = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train=False):
    x = conv3x3(self.features, 2, self.dtype, "conv")(x)
    return batch_norm(train, self.axis_name, self.dtype, name="bn")(x)


def pyramid_schedule(blocks: Sequence[int], k: int, last_keys: int) -> Tuple[list, list]:
  """k and dilation per block, as the official pyramid ViG: k constant,
  d_i = min(i // 4 + 1, last_keys // k) (last_keys = 49 at 224 px)."""
  n = int(sum(blocks))
  max_dilation = max(1, last_keys // k)
  return [k] * n, [min(i // 4 + 1, max_dilation) for i in range(n)]


class PyramidViG(nn.Module):
  """Pyramid ViG: stem -> +pos-embed -> 4 stages of (Grapher, FFN) blocks -> head.

  Call: images (B, H, W, C_in) float -> logits (B, num_classes) float32; `train` as
  `ViG`. The block outputs AQD distils are those of the modules `grapher<i>` and
  `ffn<i>`, block i's being (B, H_s, W_s, C_s) for its stage s (H_s = H/4/2^s).
  Quantization rules (`qgnn_jax.recipe`) treat the Downsample convs as body layers.
  """
  num_classes: int
  channels: Sequence[int] = (48, 96, 240, 384)
  blocks: Sequence[int] = (2, 2, 6, 2)
  reduce_ratios: Sequence[int] = (4, 2, 1, 1)
  k: int = 9
  head_hidden: int = 1024
  drop_path_rate: float = 0.0
  dropout: float = 0.0
  relative_pos: bool = True
  graph_impl: str = "dense"
  axis_name: Optional[str] = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
    if images.ndim != 4:
      raise ValueError(f"images must be NHWC (B, H, W, C), got shape {images.shape}")
    if not len(self.channels) == len(self.blocks) == len(self.reduce_ratios):
      raise ValueError(f"channels {self.channels}, blocks {self.blocks} and reduce_ratios "
                       f"{self.reduce_ratios} must have the same length")
    c0 = self.channels[0]
    x = Stem((c0 // 2, c0, c0), (2, 2, 1), self.axis_name, self.dtype,
             name="stem")(images.astype(self.dtype), train=train)
    _, h, w, _ = x.shape
    pos = self.param("pos_embed", nn.initializers.zeros, (1, h, w, c0), jnp.float32)
    x = x + pos.astype(self.dtype)

    # Grid of every stage, to fix the dilation schedule before building blocks.
    grids = [(h, w)]
    for _ in range(1, len(self.blocks)):
      hh, ww = grids[-1]
      grids.append(((hh + 1) // 2, (ww + 1) // 2))  # 3x3/2 conv with padding 1
    hl, wl = grids[-1]
    rl = self.reduce_ratios[-1]
    ks, ds = pyramid_schedule(self.blocks, self.k, (hl // rl) * (wl // rl))
    dpr = np.linspace(0.0, self.drop_path_rate, int(sum(self.blocks)))

    idx = 0
    for s, (c, nb, r) in enumerate(zip(self.channels, self.blocks, self.reduce_ratios)):
      if s > 0:
        x = Downsample(c, self.axis_name, self.dtype, name=f"downsample{s}")(x, train=train)
      _, hs, ws, _ = x.shape
      assert (hs, ws) == grids[s], ((hs, ws), grids[s])
      m = (hs // r) * (ws // r)
      if m < 1:
        raise ValueError(f"stage {s}: a {hs}x{ws} grid cannot be pooled by r={r}")
      rel = relative_pos_bias(c, hs, ws, r) if self.relative_pos else None
      for _ in range(nb):
        if ks[idx] * ds[idx] > m:
          raise ValueError(f"block {idx} (stage {s}): k*d = {ks[idx]}*{ds[idx]} exceeds the "
                           f"{m} candidate nodes of a {hs}x{ws} grid pooled by {r}; use larger "
                           f"images or a smaller k")
        x = Grapher(ks[idx], ds[idx], r=r, relative_pos=rel, drop_path=float(dpr[idx]),
                    graph_impl=self.graph_impl, axis_name=self.axis_name, dtype=self.dtype,
                    name=f"grapher{idx}")(x, train=train)
        x = FFN(4 * c, float(dpr[idx]), self.axis_name, self.dtype,
                name=f"ffn{idx}")(x, train=train)
        idx += 1
    return Head(self.num_classes, self.head_hidden, self.dropout, self.axis_name,
                self.dtype, name="head")(x, train=train)


def relative_pos_entries(model: PyramidViG, image_size: Tuple[int, int]) -> int:
  """Numbers in the relative-position tables of `model` at an input size: what
  the official code holds as frozen nn.Parameters (1,771,938 for pvig_ti at 224)."""
  if not model.relative_pos:
    return 0
  h, w = math.ceil(image_size[0] / 4), math.ceil(image_size[1] / 4)
  total = 0
  for s, (nb, r) in enumerate(zip(model.blocks, model.reduce_ratios)):
    if s > 0:
      h, w = (h + 1) // 2, (w + 1) // 2
    total += nb * (h * w) * ((h // r) * (w // r))
  return total


_PYRAMID_ARCHS: Dict[str, Dict[str, Tuple[int, ...]]] = {
    "pvig_ti_224": dict(channels=(48, 96, 240, 384), blocks=(2, 2, 6, 2)),
    "pvig_s_224": dict(channels=(80, 160, 400, 640), blocks=(2, 2, 6, 2)),
    "pvig_m_224": dict(channels=(96, 192, 384, 768), blocks=(2, 2, 16, 2)),
    "pvig_b_224": dict(channels=(128, 256, 512, 1024), blocks=(2, 2, 18, 2)),
}

PYRAMID_MODELS = {name: functools.partial(PyramidViG, **arch)
                  for name, arch in _PYRAMID_ARCHS.items()}
