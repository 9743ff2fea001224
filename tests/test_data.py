"""Tests of qgnn_jax.data: sources, errors, deterministic resumable sharded batching, prefetch.

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


def test_idx_truncated_gzip_names_the_file(tmp_path):
  _fake_idx_dir(tmp_path / "fm", n_train=50)
  path = tmp_path / "fm" / "train-images-idx3-ubyte.gz"
  raw = path.read_bytes()
  path.write_bytes(raw[:len(raw) // 2])
  with pytest.raises(ValueError, match=r"train-images-idx3-ubyte\.gz: truncated gzip"):
    data.read_idx(str(path))
  with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz"):
    data.load_arrays("fashion_mnist", "train", data_dir=str(tmp_path / "fm"))
  path.write_bytes(b"not gzip at all")
  with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz: not a valid gzip"):
    data.read_idx(str(path))


def test_missing_dataset_error(tmp_path, monkeypatch):
  monkeypatch.delenv("QGNN_DATA_DIR", raising=False)
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
  (tmp_path / "empty").mkdir()  # an explicit data_dir must exist (tests/test_faults.py)
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


def test_augmentation_keys_do_not_depend_on_the_split():
  keys = data.example_keys(5, 17, np.arange(16))
  assert keys.dtype == np.uint64 and len(set(keys.tolist())) == 16
  np.testing.assert_array_equal(data.example_keys(5, 17, np.arange(8, 16)), keys[8:])
  assert not np.array_equal(data.example_keys(5, 18, np.arange(16)), keys)
  assert not np.array_equal(data.example_keys(6, 17, np.arange(16)), keys)
  x, _ = _toy(16, hw=8, c=1)
  whole = data.augment_batch(x, keys, padding=2, flip=True)
  np.testing.assert_array_equal(data.augment_batch(x[8:], keys[8:], 2, True), whole[8:])
  with pytest.raises(ValueError, match="one per image"):
    data.augment_batch(x, keys[:3], 2, True)


@pytest.mark.parametrize("shards,devices", [(2, 1), (2, 2), (4, 1)])
def test_process_shards_concatenate_to_the_global_batch(shards, devices):
  x, y = _toy(50, hw=8, c=1)
  info = data.get_info("digits")
  one = data.train_batches(x, y, info, 16, seed=2, num_devices=1, flip=True)
  parts = [data.train_batches(x, y, info, 16, seed=2, num_devices=devices, flip=True,
                              shard_index=p, shard_count=shards) for p in range(shards)]
  for _ in range(7):  # 3 steps per epoch: crosses two epoch boundaries
    ref = next(one)
    got = [next(it) for it in parts]
    assert got[0]["image"].shape == (devices, 16 // (shards * devices), 8, 8, 1)
    image = np.concatenate([g["image"].reshape((-1, 8, 8, 1)) for g in got])
    label = np.concatenate([g["label"].reshape(-1) for g in got])
    np.testing.assert_array_equal(image, ref["image"].reshape((-1, 8, 8, 1)))
    np.testing.assert_array_equal(label, ref["label"].reshape(-1))
  with pytest.raises(ValueError, match=r"num_processes=3 x num_devices=2"):
    data.train_batches(x, y, info, 16, seed=0, num_devices=2, shard_index=0, shard_count=3)
  with pytest.raises(ValueError, match=r"shard_index=2 must be in \[0, 2\)"):
    data.train_batches(x, y, info, 16, seed=0, shard_index=2, shard_count=2)


def test_eval_shards_cover_the_split_once():
  x, y = _toy(21, hw=8, c=1)
  info = data.get_info("digits")
  ref = list(data.eval_batches(x, y, info, batch_size=8))
  parts = [list(data.eval_batches(x, y, info, 8, num_devices=2, shard_index=p, shard_count=2))
           for p in range(2)]
  assert len(parts[0]) == len(parts[1]) == len(ref) == 3  # the collectives pair up
  assert sum(float(b["mask"].sum()) for part in parts for b in part) == 21
  for b, (p0, p1) in enumerate(zip(*parts)):
    for k in ("image", "label", "mask"):
      got = np.concatenate([p0[k].reshape((4,) + p0[k].shape[2:]),
                            p1[k].reshape((4,) + p1[k].shape[2:])])
      np.testing.assert_array_equal(got, ref[b][k].reshape(got.shape))


def test_step_sampler_is_a_grain_sampler():
  s = data.StepSampler(10, 4, seed=1, shard_index=1, shard_count=2)
  assert s.steps_per_epoch == 2 and s.shard_size == 2 and "shard_index=1" in repr(s)
  perm0 = np.random.default_rng((1, 0)).permutation(10)
  perm1 = np.random.default_rng((1, 1)).permutation(10)
  np.testing.assert_array_equal(s.batch_indices(0), perm0[2:4])
  np.testing.assert_array_equal(s.batch_indices(1), perm0[6:8])
  np.testing.assert_array_equal(s.batch_indices(2), perm1[2:4])  # the remainder is dropped
  meta = [s[i] for i in range(6)]
  assert [m.record_key for m in meta] == [*perm0[2:4], *perm0[6:8], *perm1[2:4]]
  assert [m.index for m in meta] == list(range(6))
  with pytest.raises(ValueError, match=r"batch_size=11 must be in \[1, 10\]"):
    data.StepSampler(10, 11, seed=0)


def test_iterator_state_resumes_exactly():
  x, y = _toy(50, hw=8, c=1)
  info = data.get_info("digits")
  it = data.train_batches(x, y, info, 16, seed=3)
  stream = [next(it) for _ in range(5)]
  state = data.iterator_state(it, 5)
  assert state == {"next_index": 5}
  with pytest.raises(RuntimeError, match="does not match step 4"):
    data.iterator_state(it, 4)
  more = next(it)
  fresh = data.train_batches(x, y, info, 16, seed=3)
  data.restore_iterator(fresh, state, 5)
  np.testing.assert_array_equal(next(fresh)["image"], more["image"])
  np.testing.assert_array_equal(next(data.train_batches(x, y, info, 16, 3, start_step=2))["image"],
                                stream[2]["image"])
  with pytest.raises(ValueError, match="not at its step 6"):
    data.restore_iterator(fresh, state, 6)
  data.restore_iterator(fresh, None, 6)  # a checkpoint without a data state: nothing to do
  assert data.iterator_state(iter([]), 7) == {"next_index": 7}


def test_device_put_places_batches_on_the_local_devices():
  x, y = _toy(16, hw=8, c=1)
  info = data.get_info("digits")
  n = jax.local_device_count()
  ref = next(data.train_batches(x, y, info, 2 * n, seed=0, num_devices=n))
  it = data.train_batches(x, y, info, 2 * n, seed=0, num_devices=n, device_put=True)
  b = next(it)
  assert isinstance(b["image"], jax.Array) and len(b["image"].sharding.device_set) == n
  np.testing.assert_array_equal(np.asarray(b["image"]), ref["image"])
  assert data.iterator_state(it, 1) == {"next_index": 1}
  with pytest.raises(ValueError, match="batch size 7 is not divisible by the 2 devices"):
    data.shard_batch({"x": np.zeros((7, 3))}, 2)


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
    # Two processes: each decodes its half of every global batch; together the same stream.
    parts = [data.stream_train_batches("imagenette", 2, seed=0, data_dir=data_dir,
                                       shard_index=p, shard_count=2) for p in range(2)]
    for k in range(4):
      got = np.concatenate([next(p)["image"][0] for p in parts])
      np.testing.assert_allclose(got, batches[k]["image"].reshape(got.shape), atol=1e-5)
    evs = [list(data.stream_eval_batches("imagenette", batch_size=4, data_dir=data_dir,
                                         shard_index=p, shard_count=2)) for p in range(2)]
    assert len(evs[0]) == len(evs[1]) == 2
    assert sum(float(b["mask"].sum()) for ev in evs for b in ev) == 6
    np.testing.assert_allclose(np.concatenate([evs[0][1]["image"][0], evs[1][1]["image"][0]]),
                               evals[1]["image"][0], atol=1e-5)
