"""The one home for splitting a batch over processes and devices.

A *global* batch of B examples at one step is split twice:

1. over processes: process ``p`` of ``P`` owns positions ``[p * B/P, (p + 1) * B/P)``
   (:func:`shard_bounds`), so concatenating the processes' shards in process order
   gives the global batch, the same one a single process would see;
2. over the process's ``D`` local devices: ``(B/P, ...) -> (D, B/(P D), ...)``
   (:func:`split_devices` / :func:`shard_batch`), the layout ``jax.pmap`` takes, and
   :func:`put_local` places that on the first D local devices.

``jax.pmap``'s global device order is process-major, so device ``d`` of process ``p``
holds global positions ``[(p D + d) * B/(P D), (p D + d + 1) * B/(P D))`` in every
topology with the same P * D.

JAX is imported lazily (only :func:`put_local` and :func:`process_shard` need it).
"""
from __future__ import annotations

from typing import Any, Dict, Tuple

import numpy as np

Array = np.ndarray


def check_batching(n: int, batch_size: int, num_devices: int, num_shards: int = 1) -> None:
  """ValueError unless a global batch of ``batch_size`` splits over shards and devices.

  Args:
    n: number of examples available (``>= 1``).
    batch_size: global batch B, ``>= 1``, divisible by ``num_shards * num_devices``.
    num_devices: local devices per process D, ``>= 1``.
    num_shards: processes P, ``>= 1``.
  """
  if num_devices < 1:
    raise ValueError(f"num_devices={num_devices} must be >= 1")
  if num_shards < 1:
    raise ValueError(f"num_shards={num_shards} (processes) must be >= 1")
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size} must be >= 1")
  if batch_size % (num_devices * num_shards):
    what = (f"num_devices={num_devices}" if num_shards == 1 else
            f"num_processes={num_shards} x num_devices={num_devices}")
    raise ValueError(f"batch_size={batch_size} is not divisible by {what}; "
                     f"use a multiple of {num_devices * num_shards}")
  if n < 1:
    raise ValueError("no images to batch")


def shard_bounds(batch_size: int, shard_index: int, shard_count: int) -> Tuple[int, int]:
  """``(start, stop)``: the positions of a global batch that process ``shard_index`` owns.

  Args:
    batch_size: global batch B, divisible by ``shard_count``.
    shard_index: this process, in ``[0, shard_count)``.
    shard_count: processes P, ``>= 1``.
  Returns:
    ``(shard_index * B/P, (shard_index + 1) * B/P)``.
  """
  if shard_count < 1:
    raise ValueError(f"shard_count={shard_count} must be >= 1")
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index={shard_index} must be in [0, {shard_count})")
  if batch_size % shard_count:
    raise ValueError(f"batch_size={batch_size} is not divisible by the {shard_count} processes; "
                     f"use a multiple of {shard_count}")
  per = batch_size // shard_count
  return shard_index * per, (shard_index + 1) * per


def split_devices(x: Array, num_devices: int) -> Array:
  """One array ``(B, ...) -> (D, B/D, ...)`` (a view); B must divide by D."""
  x = np.asarray(x)
  if num_devices < 1 or x.shape[0] % num_devices:
    raise ValueError(f"batch size {x.shape[0]} is not divisible by the {num_devices} devices; "
                     f"use a multiple of {num_devices}")
  return x.reshape((num_devices, x.shape[0] // num_devices) + x.shape[1:])


def shard_batch(batch: Dict[str, Any], num_devices: int) -> Dict[str, Any]:
  """Every leaf of a pytree ``(B, ...) -> (D, B/D, ...)``; B must divide by D.

  Works on numpy and jax arrays alike (``reshape`` only).
  """
  import jax  # pylint: disable=g-import-not-at-top
  b = jax.tree.leaves(batch)[0].shape[0]
  if num_devices < 1 or b % num_devices:
    raise ValueError(f"batch size {b} is not divisible by the {num_devices} devices; "
                     f"use a multiple of {num_devices}")
  return jax.tree.map(lambda x: x.reshape((num_devices, b // num_devices) + x.shape[1:]), batch)


def process_shard() -> Tuple[int, int]:
  """``(jax.process_index(), jax.process_count())``: which shard this process reads."""
  import jax  # pylint: disable=g-import-not-at-top
  return jax.process_index(), jax.process_count()


def local_sharding(num_devices: int, axis_name: str = "batch"):
  """NamedSharding over the first ``num_devices`` local devices, split along axis 0."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax.sharding import Mesh, NamedSharding, PartitionSpec  # pylint: disable=g-import-not-at-top
  devices = jax.local_devices()
  if not 1 <= num_devices <= len(devices):
    raise ValueError(f"leading device axis {num_devices} must be in [1, {len(devices)}] "
                     f"(the local device count)")
  return NamedSharding(Mesh(np.asarray(devices[:num_devices]), (axis_name,)),
                       PartitionSpec(axis_name))


def put_local(batch: Any, axis_name: str = "batch", cache: Dict[int, Any] = None) -> Any:
  """Puts every leaf ``(D, ...)`` on the first D local devices, sharded along axis 0.

  The layout ``jax.pmap`` uses for its inputs; in a multi-process run each process
  puts only its own shard on its own devices. ``cache`` (optional) keeps one
  sharding per D across calls.
  """
  import jax  # pylint: disable=g-import-not-at-top
  cache = {} if cache is None else cache

  def put(x):
    x = np.asarray(x)
    d = x.shape[0] if x.ndim else 0
    if d not in cache:
      try:
        cache[d] = local_sharding(d, axis_name)
      except ValueError as e:
        raise ValueError(f"batch leaf of shape {x.shape}: {e}") from None
    return jax.device_put(x, cache[d])

  return jax.tree.map(put, batch)
