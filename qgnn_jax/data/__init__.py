"""Input pipelines (docs/METHOD.md, "Data"): named datasets, offline sources, sharded
resumable batching.

Modules, one concern each:

* :mod:`~qgnn_jax.data.registry`: the named datasets (:class:`DatasetInfo`, :func:`get_info`).
* :mod:`~qgnn_jax.data.idx`: the IDX reader (MNIST / Fashion-MNIST files, gzipped or not).
* :mod:`~qgnn_jax.data.tfds_source`: tensorflow-datasets lookup; never downloads, and a
  missing dataset raises :class:`DatasetNotFoundError` saying what was tried and how to get it.
* :mod:`~qgnn_jax.data.sources`: a whole split in memory (digits, IDX, tfds), held-out splits.
* :mod:`~qgnn_jax.data.augment`: normalisation, crop + flip with per-example stateless keys.
* :mod:`~qgnn_jax.data.sampler`: the index sampler, sharded by process, a function of (seed, step).
* :mod:`~qgnn_jax.data.pipeline`: the in-memory pipeline on grain (worker threads, prefetch,
  device placement, checkpointable iterator state).
* :mod:`~qgnn_jax.data.streamed`: imagenette / imagenet2012 streamed from tfds with tf.data.
* :mod:`~qgnn_jax.data.sharding`: the one home for splitting a batch over processes and devices.
* :mod:`~qgnn_jax.data.prefetch`: a thread prefetcher for plain iterators (the streams).

Batches have a leading device axis: ``image`` float32 ``(D, B/(P D), H, W, C)``,
``label`` int32 ``(D, B/(P D))`` (evaluation batches also a float32 ``mask``), for a
global batch B, P processes and D local devices. The batch at step ``s`` is a pure
function of ``(seed, s)``: a run resumed at step K sees exactly the batches an
uninterrupted run would, and the P processes' shards concatenate to the batch one
process would see.

TensorFlow is imported lazily, only on the tensorflow-datasets path.
"""
from qgnn_jax.data.augment import augment_batch, example_keys, normalize
from qgnn_jax.data.idx import DEFAULT_IDX_DIRS, has_idx, load_idx, read_idx
from qgnn_jax.data.pipeline import (eval_batches, eval_dataset, iterate, iterator_state,
                                    restore_iterator, train_batches, train_dataset)
from qgnn_jax.data.prefetch import prefetch
from qgnn_jax.data.registry import DATASETS, SPLITS, DatasetInfo, DatasetNotFoundError, get_info
from qgnn_jax.data.sampler import StepSampler
from qgnn_jax.data.sharding import (check_batching, process_shard, put_local, shard_batch,
                                    shard_bounds, split_devices)
from qgnn_jax.data.sources import data_source, holdout_indices, load_arrays, load_splits
from qgnn_jax.data.streamed import stream_eval_batches, stream_train_batches
from qgnn_jax.data.tfds_source import num_examples, tfds_data_dir

__all__ = [
    "DATASETS", "DEFAULT_IDX_DIRS", "SPLITS", "DatasetInfo", "DatasetNotFoundError", "StepSampler",
    "augment_batch", "check_batching", "data_source", "eval_batches", "eval_dataset", "example_keys",
    "get_info", "has_idx", "holdout_indices", "iterate", "iterator_state", "load_arrays",
    "load_idx", "load_splits", "normalize", "num_examples", "prefetch", "process_shard",
    "put_local", "read_idx", "restore_iterator", "shard_batch", "shard_bounds", "split_devices",
    "stream_eval_batches", "stream_train_batches", "tfds_data_dir", "train_batches",
    "train_dataset",
]
