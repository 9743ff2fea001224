"""Tests of qgnn_jax.checkpoint: round trip, keep-last-N, init_from, errors."""
import glob
import os

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from qgnn_jax import checkpoint as ckpt


@flax.struct.dataclass
class _State:
  step: jax.Array
  params: dict
  batch_stats: dict
  quant_stats: dict
  opt_state: object
  rng: jax.Array


def _state(seed: int = 0, width: int = 4, quant: bool = False) -> _State:
  rng = np.random.default_rng(seed)
  params = {"dense": {"kernel": jnp.asarray(rng.normal(size=(3, width)), jnp.float32),
                      "bias": jnp.asarray(rng.normal(size=(width,)), jnp.float32)},
            "head": {"kernel": jnp.asarray(rng.normal(size=(width, 2)), jnp.float32)}}
  if quant:
    params["dense"]["w_step"] = jnp.asarray(0.1, jnp.float32)
  return _State(step=jnp.asarray(seed, jnp.int32), params=params,
                batch_stats={"bn": {"mean": jnp.asarray(rng.normal(size=(width,)), jnp.float32)}},
                quant_stats={"act": {"ema": jnp.ones((), jnp.float32)}} if quant else {},
                opt_state=optax.adamw(1e-3).init(params),
                rng=jax.random.key_data(jax.random.key(seed)))


def _equal(a, b) -> bool:
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return (jax.tree.structure(a) == jax.tree.structure(b) and
          all(np.asarray(x).dtype == np.asarray(y).dtype and np.array_equal(x, y)
              for x, y in zip(la, lb)))


def test_round_trip_exact_and_latest(tmp_path):
  manager = ckpt.make_manager(str(tmp_path / "ck"), max_to_keep=3)
  assert ckpt.restore_latest(manager, jax.eval_shape(lambda: _state(0))) == (None, None)
  for step in (1, 2):
    assert ckpt.save(manager, step, jax.device_get(_state(step)))
  target = jax.eval_shape(lambda: _state(0))
  restored, step = ckpt.restore_latest(manager, target)
  assert step == 2 and isinstance(restored, _State)
  assert _equal(restored, _state(2))
  # A fresh manager on the same folder (a restarted run) sees the same.
  restored2, step2 = ckpt.restore_latest(ckpt.make_manager(str(tmp_path / "ck")), target)
  assert step2 == 2 and _equal(restored2, _state(2))
  # Re-saving an existing step is a no-op.
  assert not ckpt.save(manager, 2, jax.device_get(_state(5)))
  assert _equal(ckpt.restore_latest(manager, target)[0], _state(2))


def test_keep_last_n_and_interval(tmp_path):
  manager = ckpt.make_manager(str(tmp_path), max_to_keep=2, save_interval_steps=2)
  state = jax.device_get(_state(0))
  for step in range(1, 7):
    ckpt.save(manager, step, state)
  assert list(manager.all_steps()) == [4, 6]
  assert ckpt.save(manager, 7, state, force=True)
  assert list(manager.all_steps()) == [6, 7]
  assert sorted(int(n) for n in os.listdir(tmp_path) if n.isdigit()) == [6, 7]


def test_numpy_scalar_leaves_are_saved(tmp_path):
  manager = ckpt.make_manager(str(tmp_path))
  tree = {"step": np.int32(3), "w": np.ones((2,), np.float32)}
  ckpt.save(manager, 0, tree)
  restored, _ = ckpt.restore_latest(manager, {"step": np.zeros((), np.int32),
                                              "w": np.zeros((2,), np.float32)})
  assert int(restored["step"]) == 3 and np.array_equal(restored["w"], np.ones(2))


def test_mismatched_target_raises(tmp_path):
  manager = ckpt.make_manager(str(tmp_path / "ck"))
  ckpt.save(manager, 3, jax.device_get(_state(0, width=4)))
  with pytest.raises(ckpt.CheckpointError) as e:  # shapes differ (orbax alone would not say)
    ckpt.restore_latest(manager, jax.eval_shape(lambda: _state(0, width=5)))
  msg = str(e.value)
  assert str(tmp_path / "ck") in msg and "step 3" in msg
  assert "params/dense/kernel" in msg and "(3, 4)" in msg and "(3, 5)" in msg
  with pytest.raises(ckpt.CheckpointError, match="missing from the checkpoint: params/dense/w_step"):
    ckpt.restore_latest(manager, jax.eval_shape(lambda: _state(0, quant=True)))


# orbax's async reader logs "Event loop is closed" from a worker after the failed read.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_corrupt_checkpoint_raises(tmp_path):
  manager = ckpt.make_manager(str(tmp_path / "ck"))
  ckpt.save(manager, 5, jax.device_get(_state(0)))
  files = [f for f in glob.glob(str(tmp_path / "ck" / "5" / "**"), recursive=True)
           if os.path.isfile(f) and "/d/" in f]
  assert files
  for f in files:
    with open(f, "wb") as fh:
      fh.write(b"garbage")
  with pytest.raises(ckpt.CheckpointError, match=r"step 5"):
    ckpt.restore_latest(ckpt.make_manager(str(tmp_path / "ck")),
                        jax.eval_shape(lambda: _state(0)))
  with pytest.raises(ckpt.CheckpointError, match=r"step 5"):
    ckpt.restore_from(str(tmp_path / "ck"))


def test_restore_from_workdir_and_merge_matching(tmp_path):
  workdir = tmp_path / "fp_run"
  manager = ckpt.make_manager(str(workdir / "checkpoints"))
  fp = jax.device_get(_state(1))
  ckpt.save(manager, 10, fp)
  ckpt.save(manager, 20, jax.device_get(_state(2)))
  raw = ckpt.restore_from(str(workdir), step=10)  # the workdir: finds checkpoints/
  assert isinstance(raw, dict) and isinstance(raw["params"]["dense"]["kernel"], np.ndarray)
  assert np.array_equal(raw["params"]["dense"]["kernel"], fp.params["dense"]["kernel"])
  assert int(ckpt.restore_from(str(workdir / "checkpoints"))["step"]) == 2  # latest
  exact = ckpt.restore_from(str(workdir), jax.eval_shape(lambda: _state(0)), step=10)
  assert _equal(exact, _state(1))
  with pytest.raises(ckpt.CheckpointError, match="available steps"):
    ckpt.restore_from(str(workdir), step=7)

  qat = _state(9, quant=True)  # extra LSQ step param + quant_stats, other optimiser tree
  params, copied, missing = ckpt.merge_matching(qat.params, raw["params"])
  assert sorted(copied) == [("dense", "bias"), ("dense", "kernel"), ("head", "kernel")]
  assert missing == [("dense", "w_step")]
  assert np.array_equal(params["dense"]["kernel"], fp.params["dense"]["kernel"])
  assert isinstance(params["dense"]["kernel"], jax.Array)
  assert float(params["dense"]["w_step"]) == pytest.approx(0.1)
  # Shape mismatch -> not copied; a struct target takes a dict source by field name.
  wide = _state(0, width=5)
  merged, copied, missing = ckpt.merge_matching(wide, jax.device_get(fp))
  assert ("params", "head", "kernel") in missing and ("step",) in copied
  assert ("rng",) in copied and np.array_equal(merged.rng, fp.rng)


def test_restore_from_missing_dir(tmp_path):
  with pytest.raises(ckpt.CheckpointError, match="no checkpoint found"):
    ckpt.restore_from(str(tmp_path))
