"""The in-memory input pipeline on grain: sharded, deterministic, resumable batches.

One element of the grain dataset is one step's batch for this process, built
vectorised (gather, crop + flip, normalise, device split) from arrays in memory:

* which records: :class:`~qgnn_jax.data.sampler.StepSampler` (sharded by process,
  a pure function of ``(seed, step)``);
* augmentation: per example, from ``(seed, step, global position)``
  (:func:`~qgnn_jax.data.augment.example_keys`), so a global batch is the same
  whether one or several processes build it;
* grain runs the batch builder in ``num_threads`` worker threads and prefetches it in a
  background thread, which (``device_put=True``) also copies each batch to the local
  devices;
* the iterator is a ``grain.DatasetIterator``: ``get_state()`` is
  ``{"next_index": step}`` (the global step, the same on every process and for every
  process count), saved with each checkpoint and restored with ``set_state`` for an
  exact resume (:func:`iterator_state`, :func:`restore_iterator`).

Batches: ``image`` float32 ``(D, B/(P D), H, W, C)`` normalised with the dataset's
mean/std, ``label`` int32 ``(D, B/(P D))``; evaluation batches also carry a float32
``mask``. B is the global batch, P the process count, D the local device count.
"""
from __future__ import annotations

import math
import os
from typing import Any, Dict, Iterator, Mapping, Optional

import grain
import jax
import numpy as np

from qgnn_jax.data import sharding
from qgnn_jax.data.augment import augment_batch, example_keys, normalize
from qgnn_jax.data.registry import DatasetInfo
from qgnn_jax.data.sampler import StepSampler

Array = np.ndarray
Batch = Dict[str, Any]
MAX_STEPS = 2 ** 62  # the length of the (endless) training dataset


def default_threads() -> int:
  """Worker threads of the batch builder: a quarter of the CPUs, at most 4.

  0 on a small machine: the batches are then built in the prefetch thread, which is
  faster there than handing them between threads (2-core CPU, fashion_mnist, batch 128:
  76k img/s with 0 worker threads, 69k with 2).
  """
  return max(0, min(4, (os.cpu_count() or 1) // 4))


def _check_arrays(images: Array, labels: Array) -> Array:
  if len(labels) != len(images):
    raise ValueError(f"{len(images)} images but {len(labels)} labels")
  return np.asarray(labels, np.int32)


def train_dataset(images: Array, labels: Array, info: DatasetInfo, batch_size: int, seed: int,
                  augment: bool = True, num_devices: int = 1, flip: Optional[bool] = None,
                  shard_index: int = 0, shard_count: int = 1) -> grain.MapDataset:
  """The endless training stream as a grain MapDataset: element ``s`` is step ``s``'s batch.

  Args:
    images: uint8 ``(N, H, W, C)``; labels: int ``(N,)``.
    info: normalisation statistics and augmentation defaults.
    batch_size: global batch B, ``1 <= B <= N``, divisible by ``shard_count * num_devices``.
    seed: non-negative int: the epoch orders and the augmentation derive from it.
    augment: random crop (``info.crop_padding``) and flip.
    num_devices: leading device axis D of this process's batches.
    flip: horizontal flips; None uses ``info.flip`` (off for digits / mnist).
    shard_index, shard_count: this process and the process count (:func:`sharding.process_shard`).
  Returns:
    elements ``{"image": float32 (D, B/(P D), H, W, C), "label": int32 (D, B/(P D))}``.
  """
  n = len(images)
  sharding.check_batching(n, batch_size, num_devices, shard_count)
  labels = _check_arrays(images, labels)
  if batch_size > n:
    raise ValueError(f"batch_size={batch_size} exceeds the {n} training images")
  sampler = StepSampler(n, batch_size, seed, shard_index, shard_count)
  positions = sampler.positions()
  flip = info.flip if flip is None else bool(flip)

  def make(step: int) -> Batch:
    idx = sampler.batch_indices(step)
    x = images[idx]
    if augment:
      x = augment_batch(x, example_keys(seed, step, positions), info.crop_padding, flip)
    return {"image": sharding.split_devices(normalize(x, info), num_devices),
            "label": sharding.split_devices(labels[idx], num_devices)}

  return grain.MapDataset.range(MAX_STEPS).map(make)


def eval_dataset(images: Array, labels: Array, info: DatasetInfo, batch_size: int,
                 num_devices: int = 1, shard_index: int = 0,
                 shard_count: int = 1) -> grain.MapDataset:
  """One ordered pass as a grain MapDataset of ``ceil(N / B)`` batches, the last zero-padded.

  Global batch ``b`` holds examples ``[b B, (b + 1) B)``; this process builds its
  positions of it (``shard_bounds``), so every process yields the same number of
  batches and the masks of all processes sum to N over the pass.

  Returns:
    elements ``{"image": float32 (D, B/(P D), H, W, C), "label": int32 (D, B/(P D)),
    "mask": float32 (D, B/(P D))}`` with mask 1 for real examples, 0 for padding.
  """
  n = len(images)
  sharding.check_batching(n, batch_size, num_devices, shard_count)
  labels = _check_arrays(images, labels)
  start, stop = sharding.shard_bounds(batch_size, shard_index, shard_count)
  per = stop - start

  def make(b: int) -> Batch:
    lo = min(n, b * batch_size + start)
    hi = min(n, b * batch_size + stop)
    x, y, k = images[lo:hi], labels[lo:hi], hi - lo
    mask = np.zeros((per,), np.float32)
    mask[:k] = 1.0
    if k < per:
      x = np.concatenate([x, np.zeros((per - k,) + images.shape[1:], images.dtype)])
      y = np.concatenate([y, np.zeros((per - k,), np.int32)])
    return {"image": sharding.split_devices(normalize(x, info), num_devices),
            "label": sharding.split_devices(y, num_devices),
            "mask": sharding.split_devices(mask, num_devices)}

  return grain.MapDataset.range(math.ceil(n / batch_size)).map(make)


def iterate(dataset: grain.MapDataset, start: int = 0, num_threads: Optional[int] = None,
            prefetch: int = 2, device_put: bool = False, num_devices: int = 1,
            axis_name: str = "batch") -> grain.DatasetIterator:
  """A grain iterator over ``dataset`` from element ``start``.

  Args:
    dataset: from :func:`train_dataset` / :func:`eval_dataset`.
    start: first element (the step a resumed run starts at), ``>= 0``.
    num_threads: worker threads building batches (default :func:`default_threads`); 0
      builds them in the prefetch thread.
    prefetch: batches kept ready, ``>= 1``.
    device_put: copy every batch to the first ``num_devices`` local devices (``jax.pmap``'s
      layout, :func:`sharding.local_sharding`) from a background thread.
    num_devices: the leading axis D of the batches.
  """
  num_threads = default_threads() if num_threads is None else int(num_threads)
  if num_threads < 0 or prefetch < 1 or start < 0:
    raise ValueError(f"num_threads={num_threads} must be >= 0, prefetch={prefetch} >= 1 and "
                     f"start={start} >= 0")
  ds = dataset.to_iter_dataset(grain.ReadOptions(
      num_threads=num_threads, prefetch_buffer_size=max(prefetch, num_threads) if num_threads
      else 0))
  if device_put:  # one background thread builds (if num_threads == 0) and copies
    target = sharding.local_sharding(num_devices, axis_name)
    ds = ds.map(lambda batch: jax.device_put(batch, target))
  ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=prefetch)
  it = ds.__iter__()
  if start:
    it.set_state({"next_index": int(start)})
  return it


def train_batches(images: Array, labels: Array, info: DatasetInfo, batch_size: int, seed: int,
                  start_step: int = 0, augment: bool = True, num_devices: int = 1,
                  flip: Optional[bool] = None, *, shard_index: int = 0, shard_count: int = 1,
                  num_threads: Optional[int] = None, prefetch: int = 2,
                  device_put: bool = False) -> grain.DatasetIterator:
  """Endless, resumable training batches from ``start_step``: :func:`train_dataset` + :func:`iterate`.

  Batch ``s`` depends only on ``(seed, s)`` (and, for a process, on its shard).

  Yields:
    ``{"image": float32 (D, B/(P D), H, W, C), "label": int32 (D, B/(P D))}`` (numpy, or
    jax arrays on the local devices with ``device_put``).
  """
  if seed < 0 or start_step < 0:
    raise ValueError(f"seed={seed} and start_step={start_step} must be >= 0")
  ds = train_dataset(images, labels, info, batch_size, seed, augment, num_devices, flip,
                     shard_index, shard_count)
  return iterate(ds, start_step, num_threads, prefetch, device_put, num_devices)


def eval_batches(images: Array, labels: Array, info: DatasetInfo, batch_size: int,
                 num_devices: int = 1, *, shard_index: int = 0, shard_count: int = 1,
                 num_threads: Optional[int] = None, prefetch: int = 2,
                 device_put: bool = False) -> Iterator[Batch]:
  """One ordered pass over a split (:func:`eval_dataset` + :func:`iterate`)."""
  ds = eval_dataset(images, labels, info, batch_size, num_devices, shard_index, shard_count)
  return iterate(ds, 0, num_threads, prefetch, device_put, num_devices)


def iterator_state(iterator: Any, step: int) -> Dict[str, int]:
  """The state to checkpoint after ``step`` steps were consumed: ``{"next_index": step}``.

  A grain iterator's own ``get_state()`` (checked to agree with ``step``); a plain
  iterator (the tfds streams, whose order is also a function of the step) gets the
  same form.
  """
  if hasattr(iterator, "get_state"):
    state = dict(iterator.get_state())
    if state.get("next_index") != step:
      raise RuntimeError(f"the data iterator's state {state} does not match step {step}: "
                         f"batches were consumed outside the training loop")
    return state
  return {"next_index": int(step)}


def restore_iterator(iterator: Any, state: Optional[Mapping[str, Any]], step: int) -> None:
  """Sets a checkpointed data state on ``iterator`` (exact resume at ``step``).

  Raises:
    ValueError: the state is not at ``step`` (the checkpoint's model and data disagree).
  """
  if state is None:
    return
  if state.get("next_index") != step:
    raise ValueError(f"the checkpoint's data iterator state {dict(state)} is not at its step "
                     f"{step}; the checkpoint is inconsistent")
  if hasattr(iterator, "set_state"):
    iterator.set_state(dict(state))
