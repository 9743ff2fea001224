"""The index sampler: which records each process reads at each training step.

Epoch ``e`` visits the N records in the order ``default_rng((seed, e)).permutation(N)``;
step ``s`` reads global batch ``s % S`` of epoch ``s // S`` (``S = N // B`` steps per
epoch; the remainder of each epoch is dropped), and process ``p`` of ``P`` reads its
positions ``[p B/P, (p + 1) B/P)`` of that batch (:func:`qgnn_jax.data.sharding.shard_bounds`).
The order is a pure function of ``(seed, step)``: concatenating the P shards of a
step gives exactly the batch one process reads, and a run resumed at step K reads
what an uninterrupted run would.

grain's own ``IndexSampler`` shards *records* (process p only ever sees its 1/P of the
images, in an order that differs from one process's), so it cannot give one order
for every process count; :class:`StepSampler` implements grain's ``Sampler`` protocol
instead (``sampler[i]`` is a ``grain.RecordMetadata``), and the batch pipeline uses its
vectorised :meth:`StepSampler.batch_indices`.
"""
from __future__ import annotations

import threading
from typing import Dict

import numpy as np

from qgnn_jax.data import sharding

Array = np.ndarray


class StepSampler:
  """Index sampler over ``num_records`` records, sharded by process.

  Args:
    num_records: N, ``>= batch_size``.
    batch_size: the global batch B, divisible by ``shard_count``.
    seed: non-negative int; the epoch permutations derive from it.
    shard_index, shard_count: this process p and the process count P.
  """

  def __init__(self, num_records: int, batch_size: int, seed: int, shard_index: int = 0,
               shard_count: int = 1):
    if batch_size < 1 or batch_size > num_records:
      raise ValueError(f"batch_size={batch_size} must be in [1, {num_records}] (the number of "
                       f"training images)")
    if seed < 0:
      raise ValueError(f"seed={seed} must be >= 0")
    self.num_records, self.batch_size, self.seed = int(num_records), int(batch_size), int(seed)
    self.shard_index, self.shard_count = int(shard_index), int(shard_count)
    self.start, self.stop = sharding.shard_bounds(batch_size, shard_index, shard_count)
    self.steps_per_epoch = self.num_records // self.batch_size
    self._perms: Dict[int, Array] = {}
    self._lock = threading.Lock()

  @property
  def shard_size(self) -> int:
    """B / P: examples this process reads per step."""
    return self.stop - self.start

  def __repr__(self) -> str:
    return (f"StepSampler(num_records={self.num_records}, batch_size={self.batch_size}, "
            f"seed={self.seed}, shard_index={self.shard_index}, shard_count={self.shard_count})")

  def epoch_permutation(self, epoch: int) -> Array:
    """int64 ``(N,)``: the record order of ``epoch`` (cached; safe across threads)."""
    with self._lock:
      perm = self._perms.get(epoch)
      if perm is None:
        perm = np.random.default_rng((self.seed, epoch)).permutation(self.num_records)
        if len(self._perms) >= 2:  # worker threads straddle at most an epoch boundary
          self._perms.pop(min(self._perms))
        self._perms[epoch] = perm
      return perm

  def positions(self) -> Array:
    """int64 ``(B/P,)``: this shard's positions in every global batch."""
    return np.arange(self.start, self.stop, dtype=np.int64)

  def batch_indices(self, step: int) -> Array:
    """int64 ``(B/P,)``: the records this process reads at ``step`` (``>= 0``)."""
    if step < 0:
      raise ValueError(f"step={step} must be >= 0")
    epoch, i = divmod(int(step), self.steps_per_epoch)
    base = i * self.batch_size
    return self.epoch_permutation(epoch)[base + self.start:base + self.stop]

  def __getitem__(self, index: int):
    """grain's Sampler protocol: the ``index``-th record this process reads.

    ``index = step * B/P + j`` for the j-th example of this shard at ``step``.
    """
    import grain  # pylint: disable=g-import-not-at-top
    if index < 0:
      raise IndexError(f"index={index} must be >= 0")
    step, j = divmod(int(index), self.shard_size)
    key = int(self.batch_indices(step)[j])
    return grain.RecordMetadata(index=int(index), record_key=key, rng=None)
