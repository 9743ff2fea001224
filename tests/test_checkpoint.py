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


def _corrupt_data_files(step_dir):
  files = [f for f in glob.glob(os.path.join(str(step_dir), "**"), recursive=True)
           if os.path.isfile(f) and "/d/" in f]
  assert files
  for f in files:
    with open(f, "wb") as fh:
      fh.write(b"garbage")


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_corrupt_newest_step_falls_back_with_a_short_warning(tmp_path, caplog):
  manager = ckpt.make_manager(str(tmp_path / "ck"))
  for step in (1, 2):
    ckpt.save(manager, step, jax.device_get(_state(step)), data_state={"next_index": step},
              meta={"train_seconds": 1.5 * step})
  _corrupt_data_files(tmp_path / "ck" / "2")
  target = jax.eval_shape(lambda: _state(0))
  manager = ckpt.make_manager(str(tmp_path / "ck"))
  got = ckpt.restore(manager, target)
  assert got.step == 1 and _equal(got.state, _state(1))
  assert got.data_state == {"next_index": 1} and got.meta == {"train_seconds": 1.5}
  assert [s for s, _ in got.skipped] == [2]
  warning = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
  assert len(warning) == 1 and "step 2" in warning[0] and "falling back" in warning[0]
  assert len(warning[0]) < 800 and warning[0].count("\n") == 0  # no TensorStore dump
  # An explicit step is never swapped for another: the short error instead.
  with pytest.raises(ckpt.CorruptCheckpointError) as e:
    ckpt.restore(manager, target, step=2)
  assert "step 2" in str(e.value) and len(str(e.value)) < 800
  with pytest.raises(ckpt.CheckpointError, match=r"step 3 is not kept .*\[1, 2\]"):
    ckpt.restore(manager, target, step=3)
  # Another model's state is no corruption: an error, not a fallback to older steps.
  with pytest.raises(ckpt.IncompatibleCheckpointError, match="step 1"):
    ckpt.restore(manager, jax.eval_shape(lambda: _state(0, width=5)))
  # Every kept step corrupt: one error listing each.
  _corrupt_data_files(tmp_path / "ck" / "1")
  with pytest.raises(ckpt.CorruptCheckpointError, match="every kept checkpoint") as e:
    ckpt.restore(ckpt.make_manager(str(tmp_path / "ck")), target)
  assert "step 1" in str(e.value) and "step 2" in str(e.value)
  assert ckpt.restore(ckpt.make_manager(str(tmp_path / "empty")), target) is None


def test_steps_after_a_restored_one_are_set_aside(tmp_path):
  manager = ckpt.make_manager(str(tmp_path / "ck"), max_to_keep=5)
  for step in (2, 4, 6):
    ckpt.save(manager, step, jax.device_get(_state(step)))
  os.makedirs(tmp_path / "aside" / "4")  # never overwritten
  assert ckpt.set_aside_steps_after(manager, 2, str(tmp_path / "aside")) == [4, 6]
  assert manager.all_steps() == [2]
  assert sorted(os.listdir(tmp_path / "aside")) == ["4", "4.1", "6"]
  assert ckpt.save(manager, 4, jax.device_get(_state(7)))  # the new trajectory's step 4
  assert _equal(ckpt.restore(manager, jax.eval_shape(lambda: _state(0))).state, _state(7))
  assert ckpt.set_aside_steps_after(manager, 4, str(tmp_path / "aside")) == []


def test_async_save_is_complete_after_wait(tmp_path):
  manager = ckpt.make_manager(str(tmp_path / "ck"))
  assert ckpt.save(manager, 3, jax.device_get(_state(3)), meta={"a": 1}, wait_for_it=False)
  ckpt.wait(manager)
  got = ckpt.restore(ckpt.make_manager(str(tmp_path / "ck")), jax.eval_shape(lambda: _state(0)))
  assert got.step == 3 and _equal(got.state, _state(3)) and got.meta == {"a": 1}


def test_check_finite_refuses_nan_and_names_the_latest_checkpoint(tmp_path):
  manager = ckpt.make_manager(str(tmp_path / "ck"))
  state = _state(1)
  ckpt.check_finite(manager, 1, state, jnp.float32(2.0))  # finite: no error
  with pytest.raises(ckpt.NonFiniteStateError, match="no checkpoint was written"):
    ckpt.check_finite(manager, 1, state, jnp.float32(np.inf))
  ckpt.save(manager, 10, jax.device_get(state))
  bad_params = state.replace(params=jax.tree.map(lambda x: x.at[0].set(np.nan), state.params))
  bad_opt = state.replace(opt_state=jax.tree.map(
      lambda x: x * np.nan if jnp.issubdtype(x.dtype, jnp.floating) else x, state.opt_state))
  for bad in (bad_params, bad_opt):
    with pytest.raises(ckpt.NonFiniteStateError,
                       match=r"step 12 .*not saved; the latest finite checkpoint is step 10"):
      ckpt.check_finite(manager, 12, bad)
  assert not bool(ckpt.all_finite(bad_params)) and bool(ckpt.all_finite(state))
