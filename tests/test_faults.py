"""Issue 24: faults and bad inputs, each answered by one line that names the fault and the
fix (exit 2 for usage and config, 1 for data and I/O), nothing lost or half-written."""
import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qgnn_jax import checkpoint as ckpt


# ----------------------------------------------------------------------------- checksums


def _tree(seed):
  rng = np.random.default_rng(seed)
  return {"w": rng.normal(size=(64, 64)).astype(np.float32),
          "b": rng.normal(size=(64,)).astype(np.float32), "step": np.asarray(seed, np.int32)}


def _largest_data_file(step_dir):
  files = [f for f in glob.glob(os.path.join(str(step_dir), "**"), recursive=True)
           if os.path.isfile(f) and "/d/" in f]
  return max(files, key=os.path.getsize)


def _flip(path, offset, nbytes=1, bit=None):
  with open(path, "r+b") as f:
    f.seek(offset)
    old = f.read(nbytes)
    f.seek(offset)
    f.write(bytes(b ^ (1 << bit if bit is not None else 0xFF) for b in old))


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("flip", ["one_bit", "16_bytes"])
def test_flipped_bytes_in_the_newest_checkpoint_fall_back(tmp_path, caplog, flip):
  manager = ckpt.make_manager(str(tmp_path / "ck"))
  for step in (1, 2):
    ckpt.save(manager, step, _tree(step), wait_for_it=False)
  ckpt.wait(manager)  # the checksums of step 2 are written once orbax has finalised it
  assert all(os.path.exists(tmp_path / "ck" / s / ckpt.CHECKSUMS) for s in ("1", "2"))
  path = _largest_data_file(tmp_path / "ck" / "2")
  size = os.path.getsize(path)
  if flip == "one_bit":
    _flip(path, size // 2, 1, bit=3)
  else:
    _flip(path, size // 3, 16)
  target = jax.eval_shape(lambda: jax.tree.map(jnp.asarray, _tree(0)))
  got = ckpt.restore(ckpt.make_manager(str(tmp_path / "ck")), target)
  assert got.step == 1 and np.array_equal(got.state["w"], _tree(1)["w"])
  (step, why), = got.skipped
  assert step == 2 and "SHA-256" in why and os.path.relpath(path, tmp_path / "ck" / "2") in why
  warning = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
  assert len(warning) == 1 and "\n" not in warning[0] and "falling back" in warning[0]
  # restore_from (init_from) verifies too: an explicit corrupt step is an error, not data.
  with pytest.raises(ckpt.CorruptCheckpointError, match="SHA-256"):
    ckpt.restore_from(str(tmp_path / "ck"), step=2)


def test_a_truncated_file_and_a_missing_file_are_named(tmp_path):
  manager = ckpt.make_manager(str(tmp_path / "ck"))
  ckpt.save(manager, 1, _tree(1))
  step_dir = str(tmp_path / "ck" / "1")
  assert ckpt.verify_checksums(step_dir) is True
  path = _largest_data_file(step_dir)
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) - 1)
  with pytest.raises(ckpt.CorruptCheckpointError, match=r"bytes, \d+ at save \(truncated"):
    ckpt.verify_checksums(step_dir)
  os.remove(path)
  with pytest.raises(ckpt.CorruptCheckpointError, match="is missing"):
    ckpt.verify_checksums(step_dir)
  os.remove(os.path.join(step_dir, ckpt.CHECKSUMS))  # older checkpoints: read unverified
  assert ckpt.verify_checksums(step_dir) is None


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_an_unverified_corrupt_step_gives_a_readable_reason(tmp_path, caplog):
  """A step without checksums (older code) that TensorStore cannot read: the warning names the
  file and the reason, not a cut-off dump of TensorStore's JSON spec."""
  manager = ckpt.make_manager(str(tmp_path / "ck"))
  for step in (1, 2):
    ckpt.save(manager, step, _tree(step))
  os.remove(tmp_path / "ck" / "2" / ckpt.CHECKSUMS)
  for f in glob.glob(str(tmp_path / "ck" / "2" / "**" / "d" / "*"), recursive=True):
    with open(f, "wb") as fh:
      fh.write(b"garbage")
  target = jax.eval_shape(lambda: jax.tree.map(jnp.asarray, _tree(0)))
  assert ckpt.restore(ckpt.make_manager(str(tmp_path / "ck")), target).step == 1
  warning, = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
  assert "tensorstore_spec" not in warning and "..." not in warning and "{" not in warning
  assert str(tmp_path / "ck" / "2" / "state" / "d") in warning and "size 7" in warning
