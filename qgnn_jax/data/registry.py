"""The dataset registry: what each named dataset is (classes, shape, statistics, splits).

Pure data, no I/O: every other module of :mod:`qgnn_jax.data` looks datasets up here.
"""
from __future__ import annotations

import dataclasses
import types
from typing import Mapping, Tuple

SPLITS = ("train", "test", "validation")


class DatasetNotFoundError(FileNotFoundError):
  """A named dataset is not available locally; the message says what was tried."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """Static description of a dataset.

  Attributes:
    name: dataset name as accepted by :func:`qgnn_jax.data.load_arrays` (e.g. ``"cifar10"``).
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


def check_split(split: str) -> None:
  """ValueError naming the valid splits unless ``split`` is one of :data:`SPLITS`."""
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
