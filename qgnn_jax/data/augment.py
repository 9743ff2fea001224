"""Normalisation and the crop + flip augmentation, with per-example stateless randomness.

The random crop offsets and flips of one example are a pure function of
``(seed, step, global position in the batch)`` (:func:`example_keys`), not of which
process or device computes them: the same global batch augments identically whether
one process builds it or several build shards of it.
"""
from __future__ import annotations

import numpy as np

from qgnn_jax.data.registry import DatasetInfo

Array = np.ndarray

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _splitmix64(z: Array) -> Array:
  """SplitMix64's output function on a uint64 array (wraps modulo 2**64)."""
  z = z + _GOLDEN
  z = (z ^ (z >> np.uint64(30))) * _M1
  z = (z ^ (z >> np.uint64(27))) * _M2
  return z ^ (z >> np.uint64(31))


def example_keys(seed: int, step: int, positions: Array) -> Array:
  """uint64 ``(K,)`` random words, one per example: a hash of ``(seed, step, position)``.

  Args:
    seed, step: non-negative ints.
    positions: int ``(K,)``, each example's position in the *global* batch of ``step``.
  """
  if seed < 0 or step < 0:
    raise ValueError(f"seed={seed} and step={step} must be >= 0")
  pos = np.asarray(positions, np.int64)
  if pos.size and pos.min() < 0:
    raise ValueError(f"positions must be >= 0; got min {pos.min()}")
  k = _splitmix64(np.asarray([seed], np.uint64))
  k = _splitmix64(k ^ np.asarray([step], np.uint64))
  return _splitmix64(k ^ pos.astype(np.uint64))


def normalize(images: Array, info: DatasetInfo) -> Array:
  """uint8 ``(..., H, W, C)`` -> float32 ``(x / 255 - mean) / std`` per channel."""
  shape = images.shape
  c = shape[-1]
  std = np.asarray(info.std, np.float32)
  if std.shape != (c,):
    raise ValueError(f"{info.name} has {std.size} channel statistics, images have {c} channels")
  # Broadcasting over a length-C axis is slow in numpy: tile the stats over a row (W * C).
  reps = shape[-2] if len(shape) >= 2 else 1
  scale = np.tile(1.0 / (255.0 * std), reps)
  shift = np.tile(-np.asarray(info.mean, np.float32) / std, reps)
  out = images.reshape(-1, reps * c).astype(np.float32)
  out *= scale
  out += shift
  return out.reshape(shape)


def augment_batch(images: Array, keys: Array, padding: int, flip: bool) -> Array:
  """Random crop (zero padding ``padding`` px per side) and optional horizontal flip.

  Args:
    images: uint8 ``(B, H, W, C)``.
    keys: uint64 ``(B,)`` per-example random words (:func:`example_keys`): bits 0-15
      give the row offset, bits 16-31 the column offset (each ``mod 2 * padding + 1``),
      bit 32 the flip.
    padding: zero padding per side, ``>= 0``.
    flip: whether to flip the images whose flip bit is set.
  Returns:
    uint8 ``(B, H, W, C)``: one vectorised gather, no Python loop over examples.
  """
  if padding < 0:
    raise ValueError(f"padding={padding} must be >= 0")
  b, h, w, c = images.shape
  keys = np.asarray(keys, np.uint64)
  if keys.shape != (b,):
    raise ValueError(f"keys have shape {keys.shape}; expected ({b},), one per image")
  if padding:
    images = np.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  hp, wp = h + 2 * padding, w + 2 * padding
  span = np.uint64(2 * padding + 1)
  oy = ((keys & np.uint64(0xFFFF)) % span).astype(np.int64)
  ox = (((keys >> np.uint64(16)) & np.uint64(0xFFFF)) % span).astype(np.int64)
  cols = np.arange(w)
  if flip:
    flipped = ((keys >> np.uint64(32)) & np.uint64(1)).astype(bool)
    cols = np.where(flipped[:, None], cols[::-1], cols)
  cols = ox[:, None] + cols  # (B, W)
  rows = np.arange(b)[:, None] * hp + oy[:, None] + np.arange(h)  # (B, H) rows of (B * Hp)
  pixel = rows[:, :, None] * wp + cols[:, None, :]  # (B, H, W) into (B * Hp * Wp)
  return np.take(images.reshape(-1, c), pixel.ravel(), axis=0).reshape(b, h, w, c)
