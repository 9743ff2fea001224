"""tensorflow-datasets lookup: never downloads, and says exactly what was tried and how to get data.

TensorFlow is imported lazily, only when a candidate tfds folder exists, and is hidden
from GPUs so it never competes with JAX for accelerator memory.
"""
from __future__ import annotations

import os
from typing import List, Optional, Sequence, Tuple

import numpy as np

from qgnn_jax.data.registry import DatasetNotFoundError

Array = np.ndarray


def import_tf():
  """Imports TensorFlow (hidden from GPUs) and tensorflow-datasets; returns ``(tf, tfds)``."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:  # already initialised: visibility can no longer change
    pass
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return tf, tfds


def tfds_data_dir(data_dir: Optional[str] = None) -> str:
  """The tfds data directory in effect: ``data_dir``, ``$TFDS_DATA_DIR`` or the default."""
  d = data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
  return d if "://" in d else os.path.abspath(os.path.expanduser(d))


def obtain_hint(name: str, tfds_dir: str) -> str:
  """How to get ``name`` onto this machine (one sentence per way)."""
  hints = []
  if name == "fashion_mnist":
    hints.append("`apt-get install -y dataset-fashion-mnist` (installs the IDX files under "
                 "/usr/share/datasets/fashion-mnist)")
  if name in ("fashion_mnist", "mnist"):
    hints.append("copy the four IDX files ({train,t10k}-{images-idx3,labels-idx1}-ubyte.gz) into "
                 "--config.data_dir or $QGNN_DATA_DIR")
  if name == "imagenet2012":
    hints.append("download ILSVRC2012_img_{train,val}.tar manually into "
                 f"{tfds_dir}/downloads/manual/ and run `tfds build imagenet2012 "
                 f"--data_dir={tfds_dir}`")
  else:
    hints.append(f"on a machine with internet: `tfds build {name} --data_dir={tfds_dir}` "
                 "(or python -c \"import tensorflow_datasets as tfds; "
                 f"tfds.builder('{name}', data_dir='{tfds_dir}').download_and_prepare()\") "
                 "and copy that directory here")
  return "; or ".join(hints)


def not_found(name: str, tried: Sequence[str], tfds_dir: str) -> DatasetNotFoundError:
  """The error for a dataset that is not here: every place ``tried`` and the ways to get it."""
  lines = "\n".join(f"  - {t}" for t in tried)
  return DatasetNotFoundError(
      f"dataset {name!r} is not available locally (nothing is downloaded). Tried:\n{lines}\n"
      f"To obtain it: {obtain_hint(name, tfds_dir)}.")


def _tfds_present(name: str, tfds_dir: str) -> bool:
  """Cheap check (no TensorFlow) that a tfds folder for ``name`` may exist."""
  if "://" in tfds_dir:  # remote file system: let tfds decide
    return True
  return os.path.isdir(os.path.join(tfds_dir, name.split("/")[0].split(":")[0]))


def tfds_builder(name: str, data_dir: Optional[str], tried: List[str]):
  """``(builder, tfds_dir)``: a prepared tfds builder for ``name``, or DatasetNotFoundError.

  Appends what it tried to ``tried``; never downloads.
  """
  tfds_dir = tfds_data_dir(data_dir)
  where = f"tensorflow-datasets {name!r} in {tfds_dir}"
  if not _tfds_present(name, tfds_dir):
    tried.append(f"{where}: no folder {os.path.join(tfds_dir, name)}")
    raise not_found(name, tried, tfds_dir)
  try:
    _, tfds = import_tf()
  except ImportError as e:
    tried.append(f"{where}: tensorflow-datasets / tensorflow not importable ({e})")
    raise not_found(name, tried, tfds_dir) from e
  try:
    builder = tfds.builder(name, data_dir=tfds_dir, try_gcs=False)
  except Exception as e:  # pylint: disable=broad-except
    tried.append(f"{where}: {type(e).__name__}: {e}")
    raise not_found(name, tried, tfds_dir) from e
  return builder, tfds_dir


def tfds_dataset(name: str, split: str, data_dir: Optional[str], tried: List[str],
                 decoders=None, shuffle_files: bool = False):
  """``builder.as_dataset(split)`` (a tf.data.Dataset of dicts) or DatasetNotFoundError."""
  builder, tfds_dir = tfds_builder(name, data_dir, tried)
  try:
    return builder.as_dataset(split=split, decoders=decoders, shuffle_files=shuffle_files)
  except (AssertionError, FileNotFoundError, ValueError, KeyError) as e:
    tried.append(f"tensorflow-datasets {name!r} split {split!r} in {tfds_dir}: {e}")
    raise not_found(name, tried, tfds_dir) from e


def load_tfds(name: str, split: str, data_dir: Optional[str],
              tried: List[str]) -> Tuple[Array, Array]:
  """A whole tfds split in memory: images uint8 ``(N, H, W, C)``, labels int32 ``(N,)``."""
  ds = tfds_dataset(name, split, data_dir, tried)
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  xs, ys = [], []
  for ex in tfds.as_numpy(ds.map(lambda e: (e["image"], e["label"])).batch(4096)):
    xs.append(ex[0])
    ys.append(ex[1])
  if not xs:
    raise not_found(name, tried + [f"tensorflow-datasets {name!r} split {split!r}: empty"],
                    tfds_data_dir(data_dir))
  return np.concatenate(xs).astype(np.uint8), np.concatenate(ys).astype(np.int32)


def num_examples(name: str, split: str, data_dir: Optional[str] = None) -> int:
  """Number of examples of a tfds split (prepared locally; DatasetNotFoundError otherwise)."""
  ds = tfds_dataset(name, split, data_dir, [])
  n = int(ds.cardinality())
  if n < 0:  # unknown cardinality: count
    n = sum(1 for _ in ds)
  return n
