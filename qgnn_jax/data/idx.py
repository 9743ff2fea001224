"""IDX files (the MNIST / Fashion-MNIST format), gzipped or not: reading and finding them.

Grain has no reader for this format; it stays ours. Debian's ``dataset-fashion-mnist``
package installs the Fashion-MNIST files under ``/usr/share/datasets/fashion-mnist``,
which is searched by default.
"""
from __future__ import annotations

import gzip
import os
import types
import zlib
from typing import List, Mapping, Optional, Tuple

import numpy as np

Array = np.ndarray

DEFAULT_IDX_DIRS: Mapping[str, Tuple[str, ...]] = types.MappingProxyType({
    "fashion_mnist": ("/usr/share/datasets/fashion-mnist",),
    "mnist": ("/usr/share/datasets/mnist",),
})
IDX_PREFIX: Mapping[str, str] = types.MappingProxyType({"train": "train", "test": "t10k"})
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def _read_bytes(path: str) -> bytes:
  """The file's bytes, gunzipped if its name ends in ``.gz``; ValueError naming a bad gzip."""
  if not path.endswith(".gz"):
    with open(path, "rb") as f:
      return f.read()
  try:
    with gzip.open(path, "rb") as f:
      return f.read()
  except EOFError as e:  # the stream stops before gzip's end-of-stream marker
    raise ValueError(f"{path}: truncated gzip file ({os.path.getsize(path)} bytes; {e}); "
                     f"download or copy it again") from e
  except (gzip.BadGzipFile, zlib.error) as e:
    raise ValueError(f"{path}: not a valid gzip file ({e})") from e


def read_idx(path: str) -> Array:
  """Reads one IDX file (the MNIST format), gzipped if its name ends in ``.gz``.

  Returns:
    the array with the file's shape and dtype (uint8 for MNIST images ``(N, 28, 28)``
    and labels ``(N,)``).
  Raises:
    ValueError: naming ``path``: not a valid IDX file (bad magic, truncated) or a
      truncated / corrupt gzip stream.
  """
  raw = _read_bytes(path)
  if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
    raise ValueError(f"{path}: not an IDX file (magic bytes {raw[:4]!r}; expected "
                     f"00 00 <dtype code in {sorted(_IDX_DTYPES)}> <ndim>)")
  dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
  header = 4 + 4 * ndim
  if len(raw) < header:
    raise ValueError(f"{path}: IDX header of a {ndim}-d array needs {header} bytes; the file has "
                     f"{len(raw)}")
  shape = tuple(int(d) for d in np.frombuffer(raw[4:header], dtype=">u4"))
  count = int(np.prod(shape)) if shape else 1
  if len(shape) != ndim or len(raw) != header + count * dtype.itemsize:
    raise ValueError(f"{path}: IDX header says shape {shape} of {dtype} "
                     f"({header + count * dtype.itemsize} bytes) but the file has {len(raw)} bytes")
  return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def idx_file(directory: str, split: str, kind: str) -> Optional[str]:
  """Path of the ``kind`` ('images' / 'labels') IDX file of ``split`` in ``directory``, or None."""
  stem = "images-idx3-ubyte" if kind == "images" else "labels-idx1-ubyte"
  prefix = IDX_PREFIX[split]
  for name in (f"{prefix}-{stem}", f"{prefix}-{stem.replace('-idx', '.idx')}"):
    for suffix in ("", ".gz"):
      path = os.path.join(directory, name + suffix)
      if os.path.isfile(path):
        return path
  return None


def has_idx(directory: str, split: str) -> bool:
  """Whether ``directory`` holds both IDX files of ``split`` ('train' or 'test')."""
  return (split in IDX_PREFIX and idx_file(directory, split, "images") is not None
          and idx_file(directory, split, "labels") is not None)


def load_idx(directory: str, split: str) -> Tuple[Array, Array]:
  """Reads ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`` from ``directory``.

  Args:
    directory: folder with the IDX files (MNIST / Fashion-MNIST naming).
    split: ``"train"`` or ``"test"`` (files ``train-*`` / ``t10k-*``).
  Returns:
    images uint8 ``(N, H, W, 1)``, labels int32 ``(N,)``.
  Raises:
    FileNotFoundError: the files are not there; ValueError: malformed or inconsistent.
  """
  if split not in IDX_PREFIX:
    raise ValueError(f"IDX files have splits {list(IDX_PREFIX)}; got {split!r}")
  paths = {k: idx_file(directory, split, k) for k in ("images", "labels")}
  missing = [k for k, p in paths.items() if p is None]
  if missing:
    raise FileNotFoundError(f"no {split} {' / '.join(missing)} IDX file in {directory} "
                            f"(expected {IDX_PREFIX[split]}-images-idx3-ubyte[.gz] and "
                            f"{IDX_PREFIX[split]}-labels-idx1-ubyte[.gz])")
  images, labels = read_idx(paths["images"]), read_idx(paths["labels"])
  if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
    raise ValueError(f"{directory}: IDX images {images.shape} and labels {labels.shape} do not "
                     f"form a (N, H, W) / (N,) pair")
  return as_pixels(images, paths["images"])[..., None], as_labels(labels, paths["labels"])


def as_pixels(images: Array, path: str) -> Array:
  """IDX images as the pipeline's uint8 pixels.

  uint8 as they are. Floating-point images (IDX types 0x0D / 0x0E) are read as floats: every
  pixel must be finite and in [0, 1] (the scale of the datasets' mean / std), and becomes
  round(255 x) (8 bits, as the integer datasets). Any other type (int8 / int16 / int32) is
  refused: its scale is unknown, and a cast would wrap or clip silently.
  Raises ValueError naming `path`, the count of bad pixels and the valid range.
  """
  if images.dtype == np.uint8:
    return images
  if not np.issubdtype(images.dtype, np.floating):
    raise ValueError(f"{path}: IDX images of type {images.dtype} are not supported (uint8 "
                     f"pixels 0-255, or float32 / float64 in [0, 1])")
  bad = ~np.isfinite(images)
  if bad.any():
    raise ValueError(f"{path}: {int(bad.sum()):,} of {images.size:,} pixels are NaN or "
                     f"infinite (float IDX images must be finite, in [0, 1])")
  out = (images < 0) | (images > 1)
  if out.any():
    raise ValueError(f"{path}: {int(out.sum()):,} of {images.size:,} pixels lie outside [0, 1] "
                     f"(range [{images.min():g}, {images.max():g}]); float IDX images must be "
                     f"in [0, 1] (uint8 images take 0-255)")
  return np.round(images.astype(np.float64) * 255.0).astype(np.uint8)


def as_labels(labels: Array, path: str) -> Array:
  """IDX labels as int32; an integer type is required (ValueError naming `path` otherwise)."""
  if not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"{path}: IDX labels of type {labels.dtype} are not supported (an "
                     f"integer type)")
  return labels.astype(np.int32)


def idx_candidates(name: str, data_dir: Optional[str]) -> List[str]:
  """Directories searched for IDX files of ``name``, in order.

  ``data_dir`` and ``$QGNN_DATA_DIR`` (each as ``root/name``, ``root/name-with-dashes`` and
  ``root``), then :data:`DEFAULT_IDX_DIRS`.
  """
  roots = [d for d in (data_dir, os.environ.get("QGNN_DATA_DIR")) if d]
  out: List[str] = []
  for root in roots:
    root = os.path.expanduser(root)
    out += [os.path.join(root, name), os.path.join(root, name.replace("_", "-")), root]
  out += list(DEFAULT_IDX_DIRS.get(name, ()))
  return list(dict.fromkeys(out))
