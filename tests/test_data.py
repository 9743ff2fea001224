"""Tests of qgnn_jax.data: sources, errors, deterministic resumable batching, prefetch.

The tfds tests run under ``tfds.testing.mock_data`` (policy USE_CODE: examples are
generated from the features declared in tfds' code, so no metadata files and no
network are needed). Each tfds test first creates ``<data_dir>/<name>/``: the
loader only imports TensorFlow when such a folder exists (mock_data itself
ignores the data dir).
"""
import gzip
import struct
import subprocess
import sys

import jax
import numpy as np
import pytest

from qgnn_jax import data


def _write_idx(path, array: np.ndarray, gz: bool) -> None:
  header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(
      f">{array.ndim}I", *array.shape)
  payload = header + array.astype(np.uint8).tobytes()
  if gz:
    with gzip.open(str(path) + ".gz", "wb") as f:
      f.write(payload)
  else:
    with open(path, "wb") as f:
      f.write(payload)


def _fake_idx_dir(directory, n_train=12, n_test=5, gz=True, seed=0):
  rng = np.random.default_rng(seed)
  directory.mkdir(parents=True, exist_ok=True)
  out = {}
  for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
    x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    y = rng.integers(0, 10, n, dtype=np.uint8)
    _write_idx(directory / f"{prefix}-images-idx3-ubyte", x, gz)
    _write_idx(directory / f"{prefix}-labels-idx1-ubyte", y, gz)
    out[split] = (x, y)
  return out


def _toy(n=40, hw=32, c=3, seed=0):
  rng = np.random.default_rng(seed)
  return (rng.integers(0, 256, (n, hw, hw, c), dtype=np.uint8),
          rng.integers(0, 10, n).astype(np.int32))


def test_import_is_light():
  # `import qgnn_jax.data` (and the in-memory path) must not pull in TensorFlow.
  code = ("import sys, qgnn_jax.data as d; d.train_batches; "
          "assert 'tensorflow' not in sys.modules, 'tensorflow imported'")
  subprocess.run([sys.executable, "-c", code], check=True)


def test_digits():
  x, y, info = data.load_arrays("digits", "train")
  xt, yt, _ = data.load_arrays("digits", "test")
  assert x.dtype == np.uint8 and x.shape[1:] == (8, 8, 1) == info.image_shape
  assert y.dtype == np.int32 and len(x) + len(xt) == 1797 and len(yt) == len(xt)
  assert x.max() == 255 and x.min() == 0 and set(np.unique(y)) == set(range(10))
  assert info.num_classes == 10 and not info.flip
  xn = data.normalize(x, info)
  assert xn.dtype == np.float32 and abs(float(xn.mean())) < 0.1 and 0.8 < float(xn.std()) < 1.2


@pytest.mark.parametrize("gz", [True, False])
def test_idx_round_trip(tmp_path, gz):
  written = _fake_idx_dir(tmp_path / "fm", gz=gz)
  for split in ("train", "test"):
    x, y = data.load_idx(str(tmp_path / "fm"), split)
    assert x.dtype == np.uint8 and y.dtype == np.int32
    np.testing.assert_array_equal(x[..., 0], written[split][0])
    np.testing.assert_array_equal(y, written[split][1])


def test_idx_found_via_data_dir_and_env(tmp_path, monkeypatch):
  written = _fake_idx_dir(tmp_path / "fashion_mnist")
  x, y, info = data.load_arrays("fashion_mnist", "train", data_dir=str(tmp_path))
  np.testing.assert_array_equal(y, written["train"][1])
  assert info.image_shape == (28, 28, 1)
  monkeypatch.setenv("QGNN_DATA_DIR", str(tmp_path / "fashion_mnist"))
  x2, _, _ = data.load_arrays("mnist", "test")
  np.testing.assert_array_equal(x2[..., 0], written["test"][0])


def test_idx_bad_file(tmp_path):
  (tmp_path / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03" + b"\x00" * 5)
  with pytest.raises(ValueError, match="IDX header"):
    data.read_idx(str(tmp_path / "train-images-idx3-ubyte"))


def test_missing_dataset_error(tmp_path, monkeypatch):
  monkeypatch.delenv("QGNN_DATA_DIR", raising=False)
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
  with pytest.raises(data.DatasetNotFoundError) as e:
    data.load_arrays("mnist", "train", data_dir=str(tmp_path / "empty"))
  msg = str(e.value)
  assert isinstance(e.value, FileNotFoundError)
  assert str(tmp_path / "empty") in msg and "IDX" in msg and "tfds build mnist" in msg
  with pytest.raises(data.DatasetNotFoundError, match="tfds build cifar100"):
    data.load_splits("cifar100")  # honours $TFDS_DATA_DIR
  with pytest.raises(ValueError, match="valid names"):
    data.load_arrays("cifar11", "train")


def test_train_batches_shapes_and_determinism():
  x, y = _toy(50)
  info = data.get_info("cifar10")
  g = data.train_batches(x, y, info, batch_size=8, seed=3, num_devices=2)
  b = next(g)
  assert b["image"].shape == (2, 4, 32, 32, 3) and b["image"].dtype == np.float32
  assert b["label"].shape == (2, 4) and b["label"].dtype == np.int32
  first = [next(data.train_batches(x, y, info, 8, seed=3, num_devices=2)) for _ in range(2)]
  np.testing.assert_array_equal(first[0]["image"], first[1]["image"])
  np.testing.assert_array_equal(first[0]["image"], b["image"])
  other = next(data.train_batches(x, y, info, 8, seed=4, num_devices=2))
  assert not np.array_equal(other["image"], b["image"])
  with pytest.raises(ValueError, match=r"batch_size=9 .*num_devices=2"):
    next(data.train_batches(x, y, info, 9, seed=0, num_devices=2))


def test_train_batches_resume_and_epochs():
  x, y = _toy(50)
  info = data.get_info("cifar10")
  g = data.train_batches(x, y, info, 16, seed=1)  # 3 steps per epoch (drop remainder)
  stream = [next(g) for _ in range(8)]
  resumed = data.train_batches(x, y, info, 16, seed=1, start_step=5)
  for k in range(5, 8):
    r = next(resumed)
    np.testing.assert_array_equal(r["image"], stream[k]["image"])
    np.testing.assert_array_equal(r["label"], stream[k]["label"])
  # Without augmentation, each epoch is a permutation of distinct images.
  plain = data.train_batches(x, y, info, 16, seed=1, augment=False)
  epoch = np.concatenate([next(plain)["image"].reshape(16, -1) for _ in range(3)])
  flat = data.normalize(x, info).reshape(50, -1)
  rows = {r.tobytes() for r in flat}
  assert len({r.tobytes() for r in epoch}) == 48 and all(r.tobytes() in rows for r in epoch)


def test_augmentation_is_crop_and_flip():
  x, _ = _toy(64, hw=8, c=1)
  keys = data.example_keys(0, 0, np.arange(64))
  out = data.augment_batch(x, keys, padding=1, flip=True)
  assert out.shape == x.shape and out.dtype == np.uint8
  padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  crops = lambda i: [padded[i, a:a + 8, b:b + 8] for a in range(3) for b in range(3)]
  for i in range(64):
    cands = crops(i)
    assert any(np.array_equal(out[i], c) or np.array_equal(out[i], c[:, ::-1]) for c in cands)
  noflip = data.augment_batch(x, keys, padding=0, flip=False)
  np.testing.assert_array_equal(noflip, x)


def test_holdout_disjoint_and_seed_independent():
  splits = data.load_splits("digits", val_holdout=100, seed=0)
  (xt, _), (xe, ye) = splits["train"], splits["eval"]
  assert splits["eval_split"] == "validation" and len(xe) == 100 and len(ye) == 100
  full, _, _ = data.load_arrays("digits", "train")
  assert len(xt) + len(xe) == len(full)
  tr, ho = data.holdout_indices(len(full), 100)
  assert not set(tr) & set(ho) and len(set(tr) | set(ho)) == len(full)
  other = data.load_splits("digits", val_holdout=100, seed=7)
  np.testing.assert_array_equal(other["eval"][0], xe)
  assert data.load_splits("digits")["eval_split"] == "test"


def test_eval_batches_mask():
  x, y = _toy(21, hw=8, c=1)
  info = data.get_info("digits")
  batches = list(data.eval_batches(x, y, info, batch_size=8, num_devices=2))
  assert len(batches) == 3
  assert all(b["mask"].shape == b["label"].shape == (2, 4) for b in batches)
  assert sum(float(b["mask"].sum()) for b in batches) == 21
  assert batches[-1]["mask"].reshape(-1).tolist() == [1.0] * 5 + [0.0] * 3
  labels = np.concatenate([b["label"].reshape(-1) for b in batches])[:21]
  np.testing.assert_array_equal(labels, y)


def test_prefetch_device_put_and_errors():
  x, y = _toy(16)
  info = data.get_info("cifar10")
  n = jax.local_device_count()
  src = data.train_batches(x, y, info, 2 * n, seed=0, num_devices=n)
  ref = data.train_batches(x, y, info, 2 * n, seed=0, num_devices=n)
  it = data.prefetch(src, size=2)
  for _ in range(3):
    b, r = next(it), next(ref)
    assert isinstance(b["image"], jax.Array) and len(b["image"].sharding.device_set) == n
    np.testing.assert_array_equal(np.asarray(b["image"]), r["image"])
  it.close()

  def broken():
    yield {"x": np.zeros((1, 2))}
    raise RuntimeError("worker failed")

  it = data.prefetch(broken(), device_put=False)
  assert next(it)["x"].shape == (1, 2)
  with pytest.raises(RuntimeError, match="worker failed"):
    next(it)
  assert list(data.prefetch(iter([1, 2, 3]), device_put=False)) == [1, 2, 3]


# ----------------------------------------------------------------------------- tfds (mocked)


@pytest.fixture
def tfds_mock(tmp_path, monkeypatch):
  tfds = pytest.importorskip("tensorflow_datasets")
  monkeypatch.delenv("QGNN_DATA_DIR", raising=False)

  def mock(names, num_examples):
    for name in names:
      (tmp_path / name).mkdir(exist_ok=True)
    return tfds.testing.mock_data(num_examples=num_examples,
                                  policy=tfds.testing.MockPolicy.USE_CODE)
  return mock, str(tmp_path)


def test_tfds_in_memory_path(tfds_mock):
  mock, data_dir = tfds_mock
  with mock(["cifar10", "mnist"], num_examples=6):
    x, y, info = data.load_arrays("cifar10", "test", data_dir=data_dir)
    assert x.shape == (6, 32, 32, 3) and x.dtype == np.uint8
    assert y.dtype == np.int32 and ((0 <= y) & (y < 10)).all() and info.name == "cifar10"
    # mnist: no IDX files under data_dir, so tfds serves it.
    x, y, _ = data.load_arrays("mnist", "train", data_dir=data_dir)
    assert x.shape == (6, 28, 28, 1)
    splits = data.load_splits("cifar10", data_dir=data_dir)
    assert len(splits["train"][0]) == 6 and splits["eval_split"] == "test"


def test_tfds_not_prepared(tmp_path, tfds_mock):
  del tfds_mock  # only for the importorskip
  (tmp_path / "cifar10").mkdir()  # a folder but no prepared data: tfds says so, no download
  with pytest.raises(data.DatasetNotFoundError, match="cifar10"):
    data.load_arrays("cifar10", "train", data_dir=str(tmp_path))


def test_tfds_streamed_path(tfds_mock):
  mock, data_dir = tfds_mock
  with mock(["imagenette"], num_examples=6):
    with pytest.raises(ValueError, match="stream"):
      data.load_arrays("imagenette", "train", data_dir=data_dir)
    stream = data.stream_train_batches("imagenette", batch_size=2, seed=0, num_devices=2,
                                       data_dir=data_dir)
    batches = [next(stream) for _ in range(4)]  # 3 steps / epoch: crosses an epoch
    assert batches[0]["image"].shape == (2, 1, 224, 224, 3)
    assert batches[0]["image"].dtype == np.float32 and batches[0]["label"].dtype == np.int32
    resumed = next(data.stream_train_batches("imagenette", 2, seed=0, start_step=2,
                                             num_devices=2, data_dir=data_dir))
    np.testing.assert_allclose(resumed["image"], batches[2]["image"], atol=1e-5)
    evals = list(data.stream_eval_batches("imagenette", batch_size=4, data_dir=data_dir))
    assert [b["image"].shape for b in evals] == [(1, 4, 224, 224, 3)] * 2
    assert sum(float(b["mask"].sum()) for b in evals) == 6
