"""An operand's integer grid as the export file stores it: codes, scale, zero point, offset.

An operand's value is `scale * (code - zero_point) + offset` (docs/METHOD.md, "The export
file"):

    code: a signed b-bit integer in [-2^(b-1), 2^(b-1) - 1]; weights' codes are stored in
      the kernel's channels-last order (`qat.site.to_channels_last`), packed LSB-first into
      bytes for b != 8 (`quant.pack_bits`), and as an int8 array for b == 8;
    scale: float32, (C,) per channel or () per tensor;
    zero_point: int32, the shape of scale, or () when the same for every channel (symmetric
      grids: 0): the integer nearest to the trained grid's real zero point -lo/scale (a value
      within ZERO_POINT_SNAP of an integer is float rounding of one and is snapped to it);
    offset: float32, the shape of zero_point: -scale * (the real zero point - zero_point),
      the part of the grid's anchor the integer zero point does not carry (0 for symmetric
      grids, LSQ and N2UQ; up to half a step for PQ / min-max activations).

The codes come from each quantizer's own `integer` (the registry's contract), probed for
the ends of its grid; these helpers turn them into the file's signed codes and grid.
"""
from __future__ import annotations

import functools
from typing import Any, Mapping, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from qgnn_jax import quant
from qgnn_jax.export.container import ExportError

ZERO_POINT_SNAP = 1e-4


@functools.partial(jax.jit, static_argnums=(0, 1, 3))
def grid_ends(entry: quant.Quantizer, spec, state: Mapping[str, Any], channels: int):
  """(lowest, highest codes, scale, zero point) of an operand's grid, as `entry.integer`
  gives them (probed at -/+ 1e30 per channel). One compile per entry, spec and shape."""
  probe = jnp.stack([jnp.full((channels,), -1e30, jnp.float32),
                     jnp.full((channels,), 1e30, jnp.float32)])
  codes, scale, zp = entry.integer(probe, spec, dict(state))
  return jnp.min(codes), jnp.max(codes), scale, zp


def code_shift(lowest) -> Any:
  """What `entry.integer` codes subtract to become signed b-bit codes: 2^(b-1) for a grid
  whose codes start at 0, 0 for one already signed."""
  return lambda bits: 2 ** (bits - 1) if int(lowest) >= 0 else 0


@functools.partial(jax.jit, static_argnums=(0, 1))
def weight_codes(entry: quant.Quantizer, spec, w2, state):
  """entry.integer of a weight (channels last) with its range when the entry takes one."""
  state = {**state, "numel": w2.size}
  if entry.tracks_range:
    lo, hi = entry.weight_range(w2, spec)
    state.update(lo=lo, hi=hi)
  codes, scale, zp = entry.integer(w2, spec, state)
  return codes, scale, zp, grid_ends(entry, spec, state, w2.shape[-1])[0]


def file_grid(scale, zero_point, shift: int, channels: int, per_channel: bool, what: str):
  """(scale, integer zero point, offset) of the file (see the module docstring) from a
  quantizer's scale and zero point, its codes shifted by `shift`; ExportError naming `what`
  when the scales do not fit the granularity."""
  scale = np.asarray(scale, np.float32)
  zp = np.asarray(zero_point, np.float64) - shift
  zp = np.broadcast_to(zp, np.broadcast_shapes(zp.shape, scale.shape))
  scale = np.broadcast_to(scale, zp.shape)
  if per_channel and scale.size != 1:
    scale, zp = scale.reshape(-1), zp.reshape(-1)
    if scale.shape != (channels,):
      raise ExportError(f"{what}: {scale.size} scales for {channels} channels")
  else:
    if np.unique(scale).size > 1 or np.unique(zp).size > 1:
      raise ExportError(f"{what}: a per-tensor grid with several scales")
    scale, zp = scale.reshape(-1)[:1].reshape(()), zp.reshape(-1)[:1].reshape(())
  zp_int = np.round(zp)
  frac = np.where(np.abs(zp - zp_int) <= ZERO_POINT_SNAP, 0.0, zp - zp_int)
  offset = (-scale.astype(np.float64) * frac).astype(np.float32)
  # One value for all channels (symmetric grids: 0) is stored once.
  uniform = lambda a: a.reshape(-1)[:1].reshape(()) if a.size and np.all(a == a.flat[0]) else a
  return scale.astype(np.float32), uniform(zp_int.astype(np.int32)), uniform(offset)


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
  """Signed b-bit codes (any shape, int) as the file stores them: an int8 array for b == 8,
  else uint8 bytes, LSB-first (`quant.pack_bits`)."""
  if bits == 8:
    return codes.astype(np.int8)
  return np.asarray(quant.pack_bits(jnp.asarray(codes, jnp.int32), bits))


def unpack(data: np.ndarray, bits: int, shape: Tuple[int, ...]) -> np.ndarray:
  """`pack`'s inverse: int32 signed codes of `shape`; ValueError on a wrong size or dtype."""
  if bits == 8:
    if data.dtype != np.int8 or data.shape != tuple(shape):
      raise ValueError(f"8-bit codes must be int8 {tuple(shape)}, got {data.dtype} {data.shape}")
    return data.astype(np.int32)
  return np.asarray(quant.unpack_bits(jnp.asarray(data), bits, tuple(shape), signed=True))
