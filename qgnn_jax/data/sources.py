"""In-memory sources: a whole split as arrays, from digits, IDX files or tfds; held-out splits.

Sources, tried in this order for each dataset:

* ``digits``: the 8x8 digits bundled with scikit-learn (1,797 images; no files).
* ``fashion_mnist`` / ``mnist``: IDX files (gzipped or not) in ``data_dir``,
  ``$QGNN_DATA_DIR`` and, for Fashion-MNIST, ``/usr/share/datasets/fashion-mnist``
  (Debian's ``dataset-fashion-mnist`` package); then tensorflow-datasets.
* ``cifar10``, ``cifar100`` (and the two above): tensorflow-datasets, prepared
  beforehand in ``data_dir`` / ``$TFDS_DATA_DIR`` / ``~/tensorflow_datasets``.

Images are ``uint8 (N, H, W, C)``, labels ``int32 (N,)``. Every process of a
multi-process run loads the same arrays (they are small) and then reads only its
shard of each batch (:mod:`qgnn_jax.data.pipeline`).
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from qgnn_jax.data import idx as idx_lib
from qgnn_jax.data import tfds_source
from qgnn_jax.data.registry import DatasetInfo, DatasetNotFoundError, check_split, get_info

Array = np.ndarray


def load_digits(split: str) -> Tuple[Array, Array]:
  """scikit-learn's digits as uint8 ``(N, 8, 8, 1)`` (0..255) and int32 ``(N,)``.

  A fixed (seed-independent) 80/20 train/test split of the 1,797 images.
  """
  from sklearn.datasets import load_digits as sk_digits  # pylint: disable=g-import-not-at-top
  d = sk_digits()
  images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
  labels = d.target.astype(np.int32)
  perm = np.random.default_rng(0).permutation(len(labels))
  n_test = len(labels) // 5
  idx = perm[n_test:] if split == "train" else perm[:n_test]
  return images[idx], labels[idx]


def load_arrays(name: str, split: str,
                data_dir: Optional[str] = None) -> Tuple[Array, Array, DatasetInfo]:
  """Loads a whole split into memory.

  Args:
    name: one of ``digits``, ``mnist``, ``fashion_mnist``, ``cifar10``, ``cifar100``
      (``imagenette`` / ``imagenet2012`` are streamed: see
      :func:`qgnn_jax.data.stream_train_batches`).
    split: ``"train"`` or ``"test"`` (``digits``: a fixed 80/20 split of the 1,797
      images; ``"validation"`` only where tfds has it).
    data_dir: folder searched for IDX files and used as the tfds data dir
      (default: ``$QGNN_DATA_DIR`` for IDX, ``$TFDS_DATA_DIR`` for tfds).
  Returns:
    images uint8 ``(N, H, W, C)``, labels int32 ``(N,)``, :class:`DatasetInfo`.
  Raises:
    ValueError: unknown name / split, a streamed dataset, or a malformed file.
    DatasetNotFoundError: the data is not available locally (lists what was tried).
  """
  info = get_info(name)
  check_split(split)
  if info.streamed:
    raise ValueError(f"{name} is too large to load into memory; use "
                     f"stream_train_batches / stream_eval_batches('{name}', ...)")
  if name == "digits":
    if split == "validation":
      raise ValueError("digits has splits 'train' and 'test'; use load_splits(val_holdout=n) "
                       "for a validation set")
    images, labels = load_digits(split)
    return images, labels, info
  tried: List[str] = []
  if data_dir and not os.path.isdir(os.path.expanduser(data_dir)):
    # An explicit folder that is not there is a typo, not a reason to read another copy.
    raise DatasetNotFoundError(f"data_dir={data_dir!r}: no such directory")
  d = find_idx_dir(name, split, data_dir, tried)
  if d is not None:
    images, labels = idx_lib.load_idx(d, split)
    if images.shape[1:] != info.image_shape:
      raise ValueError(f"{d}: IDX images are {images.shape[1:]}, {name} expects "
                       f"{info.image_shape}")
    check_labels(labels, info, f"{d} ({split})")
    return images, labels, info
  images, labels = tfds_source.load_tfds(name, split, data_dir, tried)
  if images.shape[1:] != info.image_shape:
    raise ValueError(f"tfds {name} images are {images.shape[1:]}, expected {info.image_shape}")
  check_labels(labels, info, f"tfds {name} ({split})")
  return images, labels, info


def find_idx_dir(name: str, split: str, data_dir: Optional[str],
                 tried: Optional[List[str]] = None) -> Optional[str]:
  """The first folder of :func:`idx_lib.idx_candidates` holding `split`'s IDX files of
  `name` (None: none does, or `name` has no IDX files); `tried` gets a line per folder
  passed over."""
  if name not in idx_lib.DEFAULT_IDX_DIRS or split not in idx_lib.IDX_PREFIX:
    return None
  for d in idx_lib.idx_candidates(name, data_dir):
    if idx_lib.has_idx(d, split):
      return d
    if tried is not None:
      tried.append(f"IDX files {idx_lib.IDX_PREFIX[split]}-*-ubyte[.gz] in {d}: "
                   f"{'not found' if os.path.isdir(d) else 'no such directory'}")
  return None


def data_source(name: str, data_dir: Optional[str] = None) -> str:
  """What :func:`load_arrays` reads `name`'s training split from (results.json's
  provenance): 'scikit-learn digits', 'IDX files in <folder>' or 'tfds (data_dir ...)'."""
  if name == "digits":
    return "scikit-learn digits"
  d = find_idx_dir(name, "train", data_dir)
  if d is not None:
    return f"IDX files in {os.path.abspath(d)}"
  return f"tfds in {tfds_source.tfds_data_dir(data_dir)}"


def check_labels(labels: Array, info: DatasetInfo, where: str) -> None:
  """ValueError unless every label is in [0, info.num_classes): a label past the model's
  classes makes the loss NaN (one-hot of nothing) while training goes on."""
  bad = (labels < 0) | (labels >= info.num_classes)
  if bad.any():
    raise ValueError(f"{where}: {int(bad.sum()):,} of {len(labels):,} labels lie outside "
                     f"[0, {info.num_classes}) ({info.name} has {info.num_classes} classes; "
                     f"labels seen: {int(labels.min())}..{int(labels.max())})")


def holdout_indices(n: int, val_holdout: int) -> Tuple[Array, Array]:
  """Fixed (seed-independent) split of ``range(n)`` into train and held-out indices.

  The held-out set is the last ``val_holdout`` entries of ``default_rng(0).permutation(n)``;
  both index arrays are returned sorted (int64).
  """
  if not 0 <= val_holdout < n:
    raise ValueError(f"val_holdout={val_holdout} must be in [0, {n}) for {n} training images")
  perm = np.random.default_rng(0).permutation(n)
  return np.sort(perm[:n - val_holdout]), np.sort(perm[n - val_holdout:])


def load_splits(name: str, data_dir: Optional[str] = None, val_holdout: int = 0,
                seed: int = 0) -> Dict[str, Any]:
  """Train and evaluation arrays of an in-memory dataset.

  Args:
    name, data_dir: as in :func:`load_arrays`.
    val_holdout: 0 evaluates on the test split; ``n > 0`` holds out the last ``n``
      images of a fixed permutation of the training split (the same for every
      ``seed``) as a validation set and removes them from training.
    seed: unused by the split itself (kept fixed so FP and QAT runs with
      different seeds share the validation set); accepted for API symmetry.
  Returns:
    ``{"train": (x, y), "eval": (x, y), "eval_split": "test" | "validation",
    "info": DatasetInfo}`` with x uint8 ``(N, H, W, C)``, y int32 ``(N,)``.
  """
  del seed
  x, y, info = load_arrays(name, "train", data_dir)
  if val_holdout:
    tr, ho = holdout_indices(len(y), int(val_holdout))
    return {"train": (x[tr], y[tr]), "eval": (x[ho], y[ho]), "eval_split": "validation",
            "info": info}
  xe, ye, _ = load_arrays(name, "test", data_dir)
  return {"train": (x, y), "eval": (xe, ye), "eval_split": "test", "info": info}
