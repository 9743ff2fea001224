"""Datasets too large for memory (imagenette, imagenet2012), streamed from tfds with tf.data.

They are prepared as TFRecords by tensorflow-datasets, which grain does not read, so
this path stays on tf.data. Sharding by process follows the in-memory pipeline: each
process decodes only its positions ``[p B/P, (p + 1) B/P)`` of every global batch
(records are filtered before decoding), so the concatenated shards equal the
single-process stream.
"""
from __future__ import annotations

import math
from typing import Any, Iterator, List, Mapping, Optional

import numpy as np

from qgnn_jax.data import sharding
from qgnn_jax.data.registry import DatasetInfo, get_info
from qgnn_jax.data.tfds_source import import_tf, num_examples, tfds_dataset

Array = np.ndarray
Batch = Mapping[str, Any]


def _stream_info(name: str) -> DatasetInfo:
  info = get_info(name)
  if not info.streamed:
    raise ValueError(f"{name} is an in-memory dataset; use load_splits / train_batches")
  return info


def _to_device_batch(ex: Mapping[str, Array], num_devices: int) -> Batch:
  return {k: sharding.split_devices(np.asarray(v), num_devices) for k, v in ex.items()}


def _in_shard(tf, index, batch_size: int, start: int, stop: int):
  pos = index % batch_size
  return tf.logical_and(pos >= start, pos < stop)


def stream_train_batches(name: str, batch_size: int, seed: int, start_step: int = 0,
                         num_devices: int = 1, data_dir: Optional[str] = None,
                         split: str = "train", shuffle_buffer: int = 10_000,
                         flip: Optional[bool] = None, shard_index: int = 0,
                         shard_count: int = 1) -> Iterator[Batch]:
  """Infinite training stream of a large tfds dataset (imagenette, imagenet2012).

  Images are decoded, random-resized-cropped (area 8-100 %, aspect 3/4-4/3) to
  ``info.image_shape`` and flipped; randomness and order derive from
  ``(seed, epoch, position)`` with stateless ops and a seeded shuffle buffer,
  and ``start_step=K`` skips the first K batches of the same stream, so a resumed
  run sees the same batches (the skip re-reads, but does not decode, the records).
  Each epoch is cut to ``N // B`` whole global batches.

  Args:
    batch_size: global batch B, divisible by ``shard_count * num_devices``.
    shard_index, shard_count: this process and the process count.
  Yields:
    ``{"image": float32 (D, B/(P D), 224, 224, 3), "label": int32 (D, B/(P D))}``.
  """
  info = _stream_info(name)
  tried: List[str] = []
  n = num_examples(name, split, data_dir)
  sharding.check_batching(n, batch_size, num_devices, shard_count)
  start, stop = sharding.shard_bounds(batch_size, shard_index, shard_count)
  if batch_size > n:
    raise ValueError(f"batch_size={batch_size} exceeds the {n} images of {name}/{split}")
  tf, tfds = import_tf()
  flip = info.flip if flip is None else bool(flip)
  h, w, _ = info.image_shape
  mean = tf.constant(info.mean, tf.float32) * 255.0
  std = tf.constant(info.std, tf.float32) * 255.0
  steps_per_epoch = n // batch_size

  def preprocess(epoch, index, ex):
    key = tf.stack([tf.cast(seed, tf.int64) * 1_000_003 + epoch, index])
    image = tf.io.decode_image(ex["image"], channels=3, expand_animations=False)
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image), bounding_boxes=tf.zeros((1, 0, 4), tf.float32), seed=key,
        min_object_covered=0.0, aspect_ratio_range=(3 / 4, 4 / 3), area_range=(0.08, 1.0),
        max_attempts=10, use_image_if_no_bounding_boxes=True)
    image = tf.slice(image, begin, size)
    image = tf.image.resize(tf.cast(image, tf.float32), (h, w), method="bilinear")
    if flip:
      image = tf.image.stateless_random_flip_left_right(image, seed=key + 1)
    image = (image - mean) / std
    return {"image": image, "label": tf.cast(ex["label"], tf.int32)}

  def epoch_ds(epoch: int, offset: int):
    """Batches ``offset, offset + 1, ...`` of epoch ``epoch``; skipped records are not decoded."""
    ds = tfds_dataset(name, split, data_dir, tried,
                      decoders={"image": tfds.decode.SkipDecoding()})
    ds = ds.shuffle(min(shuffle_buffer, n), seed=seed * 1_000_003 + epoch,
                    reshuffle_each_iteration=False)
    ds = ds.take(steps_per_epoch * batch_size).enumerate().skip(offset * batch_size)
    ds = ds.filter(lambda i, ex: _in_shard(tf, i, batch_size, start, stop))
    ds = ds.map(lambda i, ex: preprocess(epoch, i, ex),
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.batch(stop - start, drop_remainder=True).prefetch(2)

  def gen() -> Iterator[Batch]:
    step = start_step
    while True:
      epoch, offset = divmod(step, steps_per_epoch)
      for ex in tfds.as_numpy(epoch_ds(epoch, offset)):
        yield _to_device_batch(ex, num_devices)
        step += 1

  return gen()


def stream_eval_batches(name: str, batch_size: int, num_devices: int = 1,
                        data_dir: Optional[str] = None, split: Optional[str] = None,
                        shard_index: int = 0, shard_count: int = 1) -> Iterator[Batch]:
  """One pass over a large tfds split: resize (shorter side 256/224) + center crop.

  Every process yields ``ceil(N / B)`` batches (its positions of each global batch,
  zero-padded with mask 0), so the collectives of an evaluation pair up.

  Args:
    batch_size: global batch B, divisible by ``shard_count * num_devices``.
    split: default ``info.eval_split`` ("validation").
  Yields:
    ``{"image": float32 (D, B/(P D), 224, 224, 3), "label": int32 (D, B/(P D)),
    "mask": float32 (D, B/(P D))}``.
  """
  info = _stream_info(name)
  split = split or info.eval_split
  sharding.check_batching(1, batch_size, num_devices, shard_count)
  start, stop = sharding.shard_bounds(batch_size, shard_index, shard_count)
  per = stop - start
  tf, tfds = import_tf()
  h, w, _ = info.image_shape
  mean = tf.constant(info.mean, tf.float32) * 255.0
  std = tf.constant(info.std, tf.float32) * 255.0

  def preprocess(ex):
    image = tf.io.decode_image(ex["image"], channels=3, expand_animations=False)
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = (256.0 / 224.0) * max(h, w) / tf.reduce_min(shape)
    new = tf.cast(tf.math.ceil(shape * scale), tf.int32)
    image = tf.image.resize(tf.cast(image, tf.float32), new, method="bilinear")
    top, left = (new[0] - h) // 2, (new[1] - w) // 2
    image = image[top:top + h, left:left + w]
    image = tf.ensure_shape((image - mean) / std, (h, w, 3))
    return {"image": image, "label": tf.cast(ex["label"], tf.int32),
            "mask": tf.constant(1.0, tf.float32)}

  ds = tfds_dataset(name, split, data_dir, [], decoders={"image": tfds.decode.SkipDecoding()})
  num_batches = math.ceil(num_examples(name, split, data_dir) / batch_size)
  if shard_count > 1:
    ds = ds.enumerate().filter(lambda i, ex: _in_shard(tf, i, batch_size, start, stop))
    ds = ds.map(lambda i, ex: ex)
  ds = ds.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(per).prefetch(2)
  empty = {"image": np.zeros((per, h, w, 3), np.float32), "label": np.zeros((per,), np.int32),
           "mask": np.zeros((per,), np.float32)}

  def gen() -> Iterator[Batch]:
    count = 0
    for ex in tfds.as_numpy(ds):
      k = len(ex["label"])
      if k < per:
        ex = {key: np.concatenate([v, np.zeros((per - k,) + v.shape[1:], v.dtype)])
              for key, v in ex.items()}
      yield _to_device_batch(ex, num_devices)
      count += 1
    for _ in range(num_batches - count):  # this shard ran out before the last global batch
      yield _to_device_batch(empty, num_devices)

  return gen()
