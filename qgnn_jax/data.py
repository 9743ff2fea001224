"""Input pipelines (SPEC §5): named datasets, offline sources, batching.

Sources, tried in this order for each dataset:

* ``digits``: the 8x8 digits bundled with scikit-learn (1,797 images; no files).
* ``fashion_mnist`` / ``mnist``: IDX files (gzipped or not) in ``data_dir``,
  ``$QGNN_DATA_DIR`` and, for Fashion-MNIST, ``/usr/share/datasets/fashion-mnist``
  (Debian's ``dataset-fashion-mnist`` package); then tensorflow-datasets.
* ``cifar10``, ``cifar100`` (and the two above): tensorflow-datasets, prepared
  beforehand in ``data_dir`` / ``$TFDS_DATA_DIR`` / ``~/tensorflow_datasets``.
  Nothing is ever downloaded (``download=False``): a dataset that is not there
  raises :class:`DatasetNotFoundError`, listing every place tried and how to
  obtain the data, without importing TensorFlow when no candidate directory
  exists.
* ``imagenette``, ``imagenet2012``: too large for memory; streamed from
  tensorflow-datasets with :func:`stream_train_batches` /
  :func:`stream_eval_batches` (224-px random-resized-crop + flip for training,
  resize + center crop for evaluation).

Small datasets live in memory as ``uint8 (N, H, W, C)`` images and ``int32 (N,)``
labels. :func:`train_batches` yields an infinite, deterministic stream: the
batch at step ``s`` is a pure function of ``(seed, s)``, so a run resumed at
step ``K`` (``start_step=K``) sees exactly the batches an uninterrupted run
would. Batches have a leading device axis: ``image`` float32
``(D, B/D, H, W, C)`` normalised with the dataset's mean/std, ``label`` int32
``(D, B/D)``; evaluation batches also carry a float32 ``mask``.

TensorFlow is imported lazily, only on the tensorflow-datasets path, and is
hidden from GPUs so it never competes with JAX for accelerator memory.
"""
from __future__ import annotations

import dataclasses
import gzip
import os
import queue
import threading
import types
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np

Array = np.ndarray
Batch = Dict[str, Any]

DEFAULT_IDX_DIRS: Mapping[str, Tuple[str, ...]] = types.MappingProxyType({
    "fashion_mnist": ("/usr/share/datasets/fashion-mnist",),
    "mnist": ("/usr/share/datasets/mnist",),
})
SPLITS = ("train", "test", "validation")


class DatasetNotFoundError(FileNotFoundError):
  """A named dataset is not available locally; the message says what was tried."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """Static description of a dataset.

  Attributes:
    name: dataset name as accepted by :func:`load_arrays` (e.g. ``"cifar10"``).
    num_classes: number of labels; labels are ints in ``[0, num_classes)``.
    image_shape: ``(H, W, C)`` of the images the model sees (after any resize).
    mean: per-channel mean of the pixel values scaled to [0, 1], length C.
    std: per-channel standard deviation (same scale), length C.
    flip: whether horizontal flips are a valid augmentation (not for digits).
    crop_padding: zero padding (pixels per side) of the random-crop augmentation.
    streamed: True for datasets that are streamed from tfds, not held in memory.
    eval_split: the tfds split used as the held-out evaluation set.
  """
  name: str
  num_classes: int
  image_shape: Tuple[int, int, int]
  mean: Tuple[float, ...]
  std: Tuple[float, ...]
  flip: bool = True
  crop_padding: int = 4
  streamed: bool = False
  eval_split: str = "test"


_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)

DATASETS: Mapping[str, DatasetInfo] = types.MappingProxyType({
    "digits": DatasetInfo("digits", 10, (8, 8, 1), (0.3053,), (0.3759,), flip=False,
                          crop_padding=1),
    "mnist": DatasetInfo("mnist", 10, (28, 28, 1), (0.1307,), (0.3081,), flip=False,
                         crop_padding=2),
    "fashion_mnist": DatasetInfo("fashion_mnist", 10, (28, 28, 1), (0.2860,), (0.3530,),
                                 flip=True, crop_padding=2),
    "cifar10": DatasetInfo("cifar10", 10, (32, 32, 3), (0.4914, 0.4822, 0.4465),
                           (0.2470, 0.2435, 0.2616)),
    "cifar100": DatasetInfo("cifar100", 100, (32, 32, 3), (0.5071, 0.4865, 0.4409),
                            (0.2673, 0.2564, 0.2762)),
    "imagenette": DatasetInfo("imagenette", 10, (224, 224, 3), _IMAGENET_MEAN, _IMAGENET_STD,
                              crop_padding=0, streamed=True, eval_split="validation"),
    "imagenet2012": DatasetInfo("imagenet2012", 1000, (224, 224, 3), _IMAGENET_MEAN,
                                _IMAGENET_STD, crop_padding=0, streamed=True,
                                eval_split="validation"),
})


def get_info(name: str) -> DatasetInfo:
  """The :class:`DatasetInfo` of ``name``; ValueError naming the valid names otherwise.

  A tfds config suffix is accepted (``"imagenette/320px-v2"`` -> imagenette's info).
  """
  try:
    return DATASETS[name.split("/")[0]]
  except KeyError:
    raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}") from None


def _check_split(split: str) -> None:
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")


# ----------------------------------------------------------------------------- IDX files

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
_IDX_PREFIX = {"train": "train", "test": "t10k"}


def read_idx(path: str) -> Array:
  """Reads one IDX file (the MNIST format), gzipped if its name ends in ``.gz``.

  Returns:
    the array with the file's shape and dtype (uint8 for MNIST images ``(N, 28, 28)``
    and labels ``(N,)``).
  Raises:
    ValueError: the file is not a valid IDX file (bad magic or truncated).
  """
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rb") as f:
    raw = f.read()
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


def _idx_file(directory: str, split: str, kind: str) -> Optional[str]:
  """Path of the images / labels IDX file of ``split`` in ``directory`` or None."""
  stem = "images-idx3-ubyte" if kind == "images" else "labels-idx1-ubyte"
  prefix = _IDX_PREFIX[split]
  for name in (f"{prefix}-{stem}", f"{prefix}-{stem.replace('-idx', '.idx')}"):
    for suffix in ("", ".gz"):
      path = os.path.join(directory, name + suffix)
      if os.path.isfile(path):
        return path
  return None


def has_idx(directory: str, split: str) -> bool:
  """Whether ``directory`` holds both IDX files of ``split`` ('train' or 'test')."""
  return (split in _IDX_PREFIX and _idx_file(directory, split, "images") is not None
          and _idx_file(directory, split, "labels") is not None)


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
  if split not in _IDX_PREFIX:
    raise ValueError(f"IDX files have splits {list(_IDX_PREFIX)}; got {split!r}")
  paths = {k: _idx_file(directory, split, k) for k in ("images", "labels")}
  missing = [k for k, p in paths.items() if p is None]
  if missing:
    raise FileNotFoundError(f"no {split} {' / '.join(missing)} IDX file in {directory} "
                            f"(expected {_IDX_PREFIX[split]}-images-idx3-ubyte[.gz] and "
                            f"{_IDX_PREFIX[split]}-labels-idx1-ubyte[.gz])")
  images, labels = read_idx(paths["images"]), read_idx(paths["labels"])
  if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
    raise ValueError(f"{directory}: IDX images {images.shape} and labels {labels.shape} do not "
                     f"form a (N, H, W) / (N,) pair")
  return images.astype(np.uint8)[..., None], labels.astype(np.int32)


def _idx_candidates(name: str, data_dir: Optional[str]) -> List[str]:
  """Directories searched for IDX files of ``name``, in order."""
  roots = [d for d in (data_dir, os.environ.get("QGNN_DATA_DIR")) if d]
  out: List[str] = []
  for root in roots:
    root = os.path.expanduser(root)
    out += [os.path.join(root, name), os.path.join(root, name.replace("_", "-")), root]
  out += list(DEFAULT_IDX_DIRS.get(name, ()))
  return list(dict.fromkeys(out))


# ----------------------------------------------------------------------------- tfds


def _import_tf():
  """Imports TensorFlow (hidden from GPUs) and tensorflow-datasets."""
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


def _obtain_hint(name: str, tfds_dir: str) -> str:
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


def _not_found(name: str, tried: Sequence[str], tfds_dir: str) -> DatasetNotFoundError:
  lines = "\n".join(f"  - {t}" for t in tried)
  return DatasetNotFoundError(
      f"dataset {name!r} is not available locally (nothing is downloaded). Tried:\n{lines}\n"
      f"To obtain it: {_obtain_hint(name, tfds_dir)}.")


def _tfds_present(name: str, tfds_dir: str) -> bool:
  """Cheap check (no TensorFlow) that a tfds folder for ``name`` may exist."""
  if "://" in tfds_dir:  # remote file system: let tfds decide
    return True
  return os.path.isdir(os.path.join(tfds_dir, name.split("/")[0].split(":")[0]))


def _tfds_builder(name: str, data_dir: Optional[str], tried: List[str]):
  """A prepared tfds builder for ``name`` or DatasetNotFoundError (never downloads)."""
  tfds_dir = tfds_data_dir(data_dir)
  where = f"tensorflow-datasets {name!r} in {tfds_dir}"
  if not _tfds_present(name, tfds_dir):
    tried.append(f"{where}: no folder {os.path.join(tfds_dir, name)}")
    raise _not_found(name, tried, tfds_dir)
  try:
    _, tfds = _import_tf()
  except ImportError as e:
    tried.append(f"{where}: tensorflow-datasets / tensorflow not importable ({e})")
    raise _not_found(name, tried, tfds_dir) from e
  try:
    builder = tfds.builder(name, data_dir=tfds_dir, try_gcs=False)
  except Exception as e:  # pylint: disable=broad-except
    tried.append(f"{where}: {type(e).__name__}: {e}")
    raise _not_found(name, tried, tfds_dir) from e
  return builder, tfds_dir


def _tfds_dataset(name: str, split: str, data_dir: Optional[str], tried: List[str],
                  decoders=None, shuffle_files: bool = False):
  """``builder.as_dataset(split)`` (a tf.data.Dataset of dicts) or DatasetNotFoundError."""
  builder, tfds_dir = _tfds_builder(name, data_dir, tried)
  try:
    return builder.as_dataset(split=split, decoders=decoders, shuffle_files=shuffle_files)
  except (AssertionError, FileNotFoundError, ValueError, KeyError) as e:
    tried.append(f"tensorflow-datasets {name!r} split {split!r} in {tfds_dir}: {e}")
    raise _not_found(name, tried, tfds_dir) from e


def _load_tfds(name: str, split: str, data_dir: Optional[str],
               tried: List[str]) -> Tuple[Array, Array]:
  ds = _tfds_dataset(name, split, data_dir, tried)
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  xs, ys = [], []
  for ex in tfds.as_numpy(ds.map(lambda e: (e["image"], e["label"])).batch(4096)):
    xs.append(ex[0])
    ys.append(ex[1])
  if not xs:
    raise _not_found(name, tried + [f"tensorflow-datasets {name!r} split {split!r}: empty"],
                     tfds_data_dir(data_dir))
  return np.concatenate(xs).astype(np.uint8), np.concatenate(ys).astype(np.int32)


# ----------------------------------------------------------------------------- in-memory loading


def _load_digits(split: str) -> Tuple[Array, Array]:
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  d = load_digits()
  images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
  labels = d.target.astype(np.int32)
  # Fixed (seed-independent) 80/20 train/test split.
  perm = np.random.default_rng(0).permutation(len(labels))
  n_test = len(labels) // 5
  idx = perm[n_test:] if split == "train" else perm[:n_test]
  return images[idx], labels[idx]


def load_arrays(name: str, split: str,
                data_dir: Optional[str] = None) -> Tuple[Array, Array, DatasetInfo]:
  """Loads a whole split into memory.

  Args:
    name: one of ``digits``, ``mnist``, ``fashion_mnist``, ``cifar10``, ``cifar100``
      (``imagenette`` / ``imagenet2012`` are streamed: see :func:`stream_train_batches`).
    split: ``"train"`` or ``"test"`` (``digits``: a fixed 80/20 split of the 1,797
      images; ``"validation"`` only where tfds has it).
    data_dir: folder searched for IDX files and used as the tfds data dir
      (default: ``$QGNN_DATA_DIR`` for IDX, ``$TFDS_DATA_DIR`` for tfds).
  Returns:
    images uint8 ``(N, H, W, C)``, labels int32 ``(N,)``, :class:`DatasetInfo`.
  Raises:
    ValueError: unknown name / split, or a streamed dataset.
    DatasetNotFoundError: the data is not available locally (lists what was tried).
  """
  info = get_info(name)
  _check_split(split)
  if info.streamed:
    raise ValueError(f"{name} is too large to load into memory; use "
                     f"stream_train_batches / stream_eval_batches('{name}', ...)")
  if name == "digits":
    if split == "validation":
      raise ValueError("digits has splits 'train' and 'test'; use load_splits(val_holdout=n) "
                       "for a validation set")
    images, labels = _load_digits(split)
    return images, labels, info
  tried: List[str] = []
  if name in DEFAULT_IDX_DIRS and split in _IDX_PREFIX:
    for d in _idx_candidates(name, data_dir):
      if has_idx(d, split):
        images, labels = load_idx(d, split)
        if images.shape[1:] != info.image_shape:
          raise ValueError(f"{d}: IDX images are {images.shape[1:]}, {name} expects "
                           f"{info.image_shape}")
        return images, labels, info
      tried.append(f"IDX files {_IDX_PREFIX[split]}-*-ubyte[.gz] in {d}: "
                   f"{'not found' if os.path.isdir(d) else 'no such directory'}")
  images, labels = _load_tfds(name, split, data_dir, tried)
  if images.shape[1:] != info.image_shape:
    raise ValueError(f"tfds {name} images are {images.shape[1:]}, expected {info.image_shape}")
  return images, labels, info


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


# ----------------------------------------------------------------------------- batching


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


def augment_batch(images: Array, rng: np.random.Generator, padding: int, flip: bool) -> Array:
  """Random crop (zero padding ``padding`` px per side) and optional horizontal flip.

  Args:
    images: uint8 ``(B, H, W, C)``.
    rng: source of the per-example offsets (y then x, each in ``[0, 2 * padding]``)
      and flips (``rng.random(B) < 0.5``).
    padding: zero padding per side, ``>= 0``.
    flip: whether to flip half of the images horizontally.
  Returns:
    uint8 ``(B, H, W, C)``: one vectorised gather, no Python loop over examples.
  """
  if padding < 0:
    raise ValueError(f"padding={padding} must be >= 0")
  b, h, w, c = images.shape
  if padding:
    images = np.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  hp, wp = h + 2 * padding, w + 2 * padding
  oy = rng.integers(0, 2 * padding + 1, size=b)
  ox = rng.integers(0, 2 * padding + 1, size=b)
  cols = np.arange(w)
  if flip:
    flipped = rng.random(b) < 0.5
    cols = np.where(flipped[:, None], cols[::-1], cols)
  cols = ox[:, None] + cols  # (B, W)
  rows = np.arange(b)[:, None] * hp + oy[:, None] + np.arange(h)  # (B, H) rows of (B * Hp)
  pixel = rows[:, :, None] * wp + cols[:, None, :]  # (B, H, W) into (B * Hp * Wp)
  return np.take(images.reshape(-1, c), pixel.ravel(), axis=0).reshape(b, h, w, c)


def _check_batching(n: int, batch_size: int, num_devices: int) -> None:
  if num_devices < 1:
    raise ValueError(f"num_devices={num_devices} must be >= 1")
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size} must be >= 1")
  if batch_size % num_devices:
    raise ValueError(f"batch_size={batch_size} is not divisible by num_devices={num_devices}; "
                     f"use a multiple of {num_devices}")
  if n < 1:
    raise ValueError("no images to batch")


def _split_devices(x: Array, num_devices: int) -> Array:
  return x.reshape((num_devices, x.shape[0] // num_devices) + x.shape[1:])


def train_batches(images: Array, labels: Array, info: DatasetInfo, batch_size: int, seed: int,
                  start_step: int = 0, augment: bool = True, num_devices: int = 1,
                  flip: Optional[bool] = None) -> Iterator[Batch]:
  """Infinite, resumable stream of training batches; batch ``s`` depends only on (seed, s).

  Epoch ``e`` visits the images in the order ``default_rng((seed, e)).permutation(N)``;
  step ``s`` takes batch ``s % (N // batch_size)`` of epoch ``s // (N // batch_size)``
  (the remainder of each epoch is dropped); its augmentation draws from
  ``default_rng((seed, s, 1))``.

  Args:
    images: uint8 ``(N, H, W, C)``; labels: int ``(N,)``.
    info: normalisation statistics and augmentation defaults.
    batch_size: global batch B, ``1 <= B <= N`` and divisible by ``num_devices``.
    seed: non-negative int.
    start_step: first step to yield (resuming a run at step K passes K).
    augment: random crop (``info.crop_padding``) and flip.
    num_devices: leading device axis D of the batches.
    flip: horizontal flips; None uses ``info.flip`` (off for digits / mnist).
  Yields:
    ``{"image": float32 (D, B/D, H, W, C), "label": int32 (D, B/D)}``.
  """
  n = len(images)
  _check_batching(n, batch_size, num_devices)
  if len(labels) != n:
    raise ValueError(f"{n} images but {len(labels)} labels")
  if batch_size > n:
    raise ValueError(f"batch_size={batch_size} exceeds the {n} training images")
  if seed < 0 or start_step < 0:
    raise ValueError(f"seed={seed} and start_step={start_step} must be >= 0")
  flip = info.flip if flip is None else bool(flip)
  labels = np.asarray(labels, np.int32)
  steps_per_epoch = n // batch_size

  def gen() -> Iterator[Batch]:
    epoch, perm = -1, None
    step = start_step
    while True:
      e, i = divmod(step, steps_per_epoch)
      if e != epoch:
        epoch, perm = e, np.random.default_rng((seed, e)).permutation(n)
      idx = perm[i * batch_size:(i + 1) * batch_size]
      x = images[idx]
      if augment:
        x = augment_batch(x, np.random.default_rng((seed, step, 1)), info.crop_padding, flip)
      yield {"image": _split_devices(normalize(x, info), num_devices),
             "label": _split_devices(labels[idx], num_devices)}
      step += 1

  return gen()


def eval_batches(images: Array, labels: Array, info: DatasetInfo, batch_size: int,
                 num_devices: int = 1) -> Iterator[Batch]:
  """One ordered pass over a split; the last batch is zero-padded to ``batch_size``.

  Yields:
    ``{"image": float32 (D, B/D, H, W, C), "label": int32 (D, B/D),
    "mask": float32 (D, B/D)}`` with mask 1 for real examples and 0 for padding
    (the masks sum to N over the pass).
  """
  n = len(images)
  _check_batching(n, batch_size, num_devices)
  if len(labels) != n:
    raise ValueError(f"{n} images but {len(labels)} labels")
  labels = np.asarray(labels, np.int32)

  def gen() -> Iterator[Batch]:
    for start in range(0, n, batch_size):
      x, y = images[start:start + batch_size], labels[start:start + batch_size]
      k = len(y)
      mask = np.zeros((batch_size,), np.float32)
      mask[:k] = 1.0
      if k < batch_size:
        x = np.concatenate([x, np.zeros((batch_size - k,) + x.shape[1:], x.dtype)])
        y = np.concatenate([y, np.zeros((batch_size - k,), np.int32)])
      yield {"image": _split_devices(normalize(x, info), num_devices),
             "label": _split_devices(y, num_devices),
             "mask": _split_devices(mask, num_devices)}

  return gen()


# ----------------------------------------------------------------------------- streamed (tfds)


def _stream_info(name: str) -> DatasetInfo:
  info = get_info(name)
  if not info.streamed:
    raise ValueError(f"{name} is an in-memory dataset; use load_splits / train_batches")
  return info


def _to_device_batch(ex: Mapping[str, Array], num_devices: int) -> Batch:
  return {k: _split_devices(np.asarray(v), num_devices) for k, v in ex.items()}


def num_examples(name: str, split: str, data_dir: Optional[str] = None) -> int:
  """Number of examples of a tfds split (prepared locally; DatasetNotFoundError otherwise)."""
  ds = _tfds_dataset(name, split, data_dir, [])
  n = int(ds.cardinality())
  if n < 0:  # unknown cardinality: count
    n = sum(1 for _ in ds)
  return n


def stream_train_batches(name: str, batch_size: int, seed: int, start_step: int = 0,
                         num_devices: int = 1, data_dir: Optional[str] = None,
                         split: str = "train", shuffle_buffer: int = 10_000,
                         flip: Optional[bool] = None) -> Iterator[Batch]:
  """Infinite training stream of a large tfds dataset (imagenette, imagenet2012).

  Images are decoded, random-resized-cropped (area 8-100 %, aspect 3/4-4/3) to
  ``info.image_shape`` and flipped; randomness and order derive from
  ``(seed, epoch, position)`` with stateless ops and a seeded shuffle buffer,
  and ``start_step=K`` skips the first K batches of the same stream, so a resumed
  run sees the same batches (the skip re-reads, but does not decode, the records).

  Yields:
    ``{"image": float32 (D, B/D, 224, 224, 3), "label": int32 (D, B/D)}``.
  """
  info = _stream_info(name)
  tried: List[str] = []
  n = num_examples(name, split, data_dir)
  _check_batching(n, batch_size, num_devices)
  if batch_size > n:
    raise ValueError(f"batch_size={batch_size} exceeds the {n} images of {name}/{split}")
  tf, tfds = _import_tf()
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
    ds = _tfds_dataset(name, split, data_dir, tried,
                       decoders={"image": tfds.decode.SkipDecoding()})
    ds = ds.shuffle(min(shuffle_buffer, n), seed=seed * 1_000_003 + epoch,
                    reshuffle_each_iteration=False)
    ds = ds.enumerate().skip(offset * batch_size)
    ds = ds.map(lambda i, ex: preprocess(epoch, i, ex),
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.batch(batch_size, drop_remainder=True).prefetch(2)

  def gen() -> Iterator[Batch]:
    step = start_step
    while True:
      epoch, offset = divmod(step, steps_per_epoch)
      for ex in tfds.as_numpy(epoch_ds(epoch, offset)):
        yield _to_device_batch(ex, num_devices)
        step += 1

  return gen()


def stream_eval_batches(name: str, batch_size: int, num_devices: int = 1,
                        data_dir: Optional[str] = None,
                        split: Optional[str] = None) -> Iterator[Batch]:
  """One pass over a large tfds split: resize (shorter side 256/224) + center crop.

  Args:
    split: default ``info.eval_split`` ("validation").
  Yields:
    ``{"image": float32 (D, B/D, 224, 224, 3), "label": int32 (D, B/D),
    "mask": float32 (D, B/D)}``; the last batch is zero-padded (mask 0).
  """
  info = _stream_info(name)
  split = split or info.eval_split
  _check_batching(1, batch_size, num_devices)
  tf, tfds = _import_tf()
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

  ds = _tfds_dataset(name, split, data_dir, [],
                     decoders={"image": tfds.decode.SkipDecoding()})
  ds = ds.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(batch_size).prefetch(2)

  def gen() -> Iterator[Batch]:
    for ex in tfds.as_numpy(ds):
      k = len(ex["label"])
      if k < batch_size:
        ex = {key: np.concatenate([v, np.zeros((batch_size - k,) + v.shape[1:], v.dtype)])
              for key, v in ex.items()}
      yield _to_device_batch(ex, num_devices)

  return gen()


# ----------------------------------------------------------------------------- prefetch

_END = object()


class _Raised:
  def __init__(self, exc: BaseException):
    self.exc = exc


def _device_put(batch: Any, axis_name: str, cache: Dict[int, Any]) -> Any:
  """Puts every leaf ``(D, ...)`` on the first D local devices, sharded along axis 0."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax.sharding import Mesh, NamedSharding, PartitionSpec  # pylint: disable=g-import-not-at-top

  def put(x):
    x = np.asarray(x)
    d = x.shape[0] if x.ndim else 0
    if d not in cache:
      devices = jax.local_devices()
      if not 1 <= d <= len(devices):
        raise ValueError(f"batch leaf of shape {x.shape}: leading device axis {d} must be in "
                         f"[1, {len(devices)}] (the local device count)")
      cache[d] = NamedSharding(Mesh(np.asarray(devices[:d]), (axis_name,)),
                               PartitionSpec(axis_name))
    return jax.device_put(x, cache[d])

  return jax.tree.map(put, batch)


def prefetch(iterator: Iterator[Any], size: int = 2, device_put: bool = True,
             axis_name: str = "batch") -> Iterator[Any]:
  """Runs ``iterator`` in a background thread, keeping ``size`` batches ready.

  With ``device_put`` every leaf (leading axis D = device count of the batch) is
  placed on the first D local devices, sharded along that axis (the layout
  ``jax.pmap`` uses), so the step does not wait for host-to-device copies.
  An exception in the worker is re-raised by the consumer's ``next``; closing or
  dropping the returned generator stops the worker.
  """
  if size < 1:
    raise ValueError(f"prefetch size={size} must be >= 1")
  q: "queue.Queue[Any]" = queue.Queue(maxsize=size)
  stop = threading.Event()

  def offer(item) -> bool:
    while not stop.is_set():
      try:
        q.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def work():
    shardings: Dict[int, Any] = {}
    try:
      for item in iterator:
        if device_put:
          item = _device_put(item, axis_name, shardings)
        if not offer(item):
          return
      offer(_END)
    except BaseException as e:  # pylint: disable=broad-except
      offer(_Raised(e))

  thread = threading.Thread(target=work, name="qgnn-prefetch", daemon=True)
  thread.start()

  def gen() -> Iterator[Any]:
    try:
      while True:
        item = q.get()
        if item is _END:
          return
        if isinstance(item, _Raised):
          raise item.exc
        yield item
    finally:
      stop.set()

  return gen()
