"""Checkpoints with orbax-checkpoint (docs/METHOD.md, "Training infrastructure"): periodic,
atomic, keep the last N. (errors.py: the exceptions; trees.py: paths and init_from's merge;
checksums.py: each step's file digests.)

A checkpoint directory holds one sub-folder per step (``<dir>/<step>/state``), each
written atomically by orbax (a temporary folder renamed on commit), so a run
killed mid-save leaves the previous checkpoints intact and a restarted run
resumes from the newest complete one.

Typical use by a training loop::

    manager = make_manager(os.path.join(workdir, "checkpoints"), max_to_keep=3)
    state, step = restore_latest(manager, jax.eval_shape(lambda: state0))
    if state is None:                                   # fresh run
      state, step = state0, 0
      if config.init_from:                              # QAT from an FP run
        raw = restore_from(config.init_from)            # nested dicts of numpy
        params, copied, missing = merge_matching(state.params, raw["params"])
        stats, _, _ = merge_matching(state.batch_stats, raw.get("batch_stats", {}))
        state = state.replace(params=params, batch_stats=stats)
    ...
    save(manager, step, jax.device_get(unreplicate(rstate)))   # periodic / final

``restore_from`` accepts an FP run's checkpoint folder or its workdir (it then
uses ``<workdir>/checkpoints``); without a target it returns the saved tree as
nested dicts / lists of numpy arrays, so an FP state whose tree differs from the
QAT state (extra ``quant_stats`` / LSQ step sizes, another optimiser) can be
copied leaf by leaf with :func:`merge_matching`.

A corrupt or incompatible checkpoint raises :class:`CheckpointError` (one of its two
kinds, :class:`CorruptCheckpointError` / :class:`IncompatibleCheckpointError`) naming the
directory, the step and what did not match, in a few lines (orbax's and TensorStore's own
messages are cut to their first line). :func:`restore` falls back from a corrupt step to
the previous kept one, with a warning.

Divergence never reaches disk: :func:`check_finite` (run on the device before each save)
raises :class:`NonFiniteStateError` naming the latest saved step, which is therefore finite.

Saves are asynchronous (:func:`save` returns while orbax writes; :func:`wait` joins it); a
step folder appears under its final name only when complete.

Checksums: once orbax has finalised a step (the next :func:`save` or :func:`wait` joins it),
process 0 writes ``<step>/checksums.json``, the size and SHA-256 of every file of the step,
atomically. :func:`restore` verifies them before reading: a flipped bit or a changed byte
count makes the step "corrupt" and it falls back like a truncated one. A step without the
file (saved by older code, or killed between orbax's finalisation and the checksums) is read
unverified.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
from typing import Any, Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from qgnn_jax.checkpoint.checksums import CHECKSUMS, verify_checksums, write_checksums
from qgnn_jax.checkpoint.errors import (CheckpointError, CheckpointWriteError,
                                        CorruptCheckpointError, IncompatibleCheckpointError,
                                        NonFiniteStateError, short_error)
from qgnn_jax.checkpoint.trees import Path, _path_str, _shape_dtype, flatten_with_paths

ITEM = "state"
DATA = "data"  # the input iterator's state (JSON), written once (by process 0)
META = "meta"  # the run's bookkeeping at that step (JSON: train seconds, start time, ...)


# ----------------------------------------------------------------------------- manager


def make_manager(directory: str, max_to_keep: int = 3,
                 save_interval_steps: int = 1) -> ocp.CheckpointManager:
  """A CheckpointManager on ``directory`` (made absolute and created).

  Args:
    directory: checkpoint folder (one sub-folder per step).
    max_to_keep: number of most recent checkpoints kept, ``>= 1``.
    save_interval_steps: ``save(..., force=False)`` only writes steps that are
      multiples of this, ``>= 1``.
  """
  if max_to_keep < 1:
    raise ValueError(f"max_to_keep={max_to_keep} must be >= 1")
  if save_interval_steps < 1:
    raise ValueError(f"save_interval_steps={save_interval_steps} must be >= 1")
  directory = os.path.abspath(os.path.expanduser(directory))
  os.makedirs(directory, exist_ok=True)
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                         save_interval_steps=save_interval_steps, create=True)
  return ocp.CheckpointManager(directory, options=options,
                               item_handlers={ITEM: ocp.StandardCheckpointHandler(),
                                              DATA: ocp.JsonCheckpointHandler(),
                                              META: ocp.JsonCheckpointHandler()})


def _sanitize(state: Any) -> Any:
  """numpy scalars (not storable by orbax) -> 0-d arrays of the same dtype."""
  return jax.tree.map(lambda x: np.asarray(x) if isinstance(x, np.generic) else x, state)


def save(manager: ocp.CheckpointManager, step: int, state: Any, force: bool = False,
         data_state: Optional[Dict[str, Any]] = None, meta: Optional[Dict[str, Any]] = None,
         wait_for_it: bool = True) -> bool:
  """Saves ``state`` (a host pytree of arrays) as step ``step``.

  Args:
    manager: from :func:`make_manager`.
    step: training step, ``>= 0``.
    state: pytree (flax struct dataclass, dicts, optax states) of arrays; pass the
      unreplicated state (``jax.device_get(unreplicate(rstate))``).
    force: write even if ``step`` is not a multiple of ``save_interval_steps``.
    data_state: the input iterator's state (a JSON-able dict, e.g.
      ``qgnn_jax.data.iterator_state``), saved beside ``state``; read back with
      :func:`restore_data_state`.
    meta: the run's bookkeeping at this step (a JSON-able dict), read back by :func:`restore`.
    wait_for_it: False returns while orbax still writes (an asynchronous save; the previous
      one is always joined first); :func:`wait` joins it.
  Returns:
    whether a checkpoint was written; a step that already exists is not written
    again (a run resumed from its final checkpoint saves the same state).
  """
  step = int(step)
  if step < 0:
    raise ValueError(f"step={step} must be >= 0")
  wait(manager)
  if step in manager.all_steps():
    return False
  items = {ITEM: ocp.args.StandardSave(_sanitize(state))}
  if data_state is not None:
    items[DATA] = ocp.args.JsonSave(dict(data_state))
  if meta is not None:
    items[META] = ocp.args.JsonSave(dict(meta))
  saved = manager.save(step, args=ocp.args.Composite(**items), force=force)
  if wait_for_it:
    wait(manager)
  return bool(saved)


def wait(manager: ocp.CheckpointManager) -> None:
  """Blocks until the manager's pending asynchronous save is on disk, then writes the
  checksums of every finalised step that has none (process 0)."""
  try:
    manager.wait_until_finished()
  except Exception as e:  # pylint: disable=broad-except  (orbax re-raises its writer's error)
    raise _write_error(manager, e) from e
  if jax.process_index() == 0:
    for step in manager.all_steps():
      step_dir = os.path.join(str(manager.directory), str(int(step)))
      if not os.path.exists(os.path.join(step_dir, CHECKSUMS)):
        write_checksums(step_dir)


def _dir_bytes(directory: str) -> int:
  return sum(os.path.getsize(os.path.join(root, n)) for root, _, names in os.walk(directory)
             for n in names)


def _write_error(manager: ocp.CheckpointManager, e: BaseException) -> CheckpointWriteError:
  """One line for a failed save, after removing its unfinished folder (orbax would remove it
  at the next start; on a full disk the space is needed now)."""
  directory = str(manager.directory)
  unfinished = [n for n in os.listdir(directory) if ".orbax-checkpoint-tmp" in n]
  written = sum(_dir_bytes(os.path.join(directory, n)) for n in unfinished)
  for n in unfinished:
    shutil.rmtree(os.path.join(directory, n), ignore_errors=True)
  steps = sorted(int(n) for n in os.listdir(directory) if n.isdigit())
  kept = (f"the kept checkpoints (steps {steps}) are intact, and the same command resumes "
          f"from step {steps[-1]}" if steps else "no checkpoint was kept yet")
  text = str(e)
  if "os_error_code='28'" in text or "No space left on device" in text:
    need = _dir_bytes(os.path.join(directory, str(steps[-1]))) if steps else written
    st = os.statvfs(directory)
    return CheckpointWriteError(
        f"{directory}: no space left on the device for a checkpoint (one takes "
        f"{'about ' if steps else 'more than '}{need:,} bytes, {st.f_bavail * st.f_frsize:,} "
        f"are free); {kept} once space is freed")
  return CheckpointWriteError(f"{directory}: a checkpoint could not be written "
                              f"({short_error(e)}); {kept}")


# ----------------------------------------------------------------------------- finiteness


@jax.jit
def all_finite(tree: Any) -> jax.Array:
  """Whether every floating-point leaf of ``tree`` is finite: one bool, computed where the
  leaves live (on the device; no host copy of the state)."""
  ok = jnp.ones((), bool)
  for x in jax.tree.leaves(tree):
    if jnp.issubdtype(x.dtype, jnp.inexact):
      ok = ok & jnp.all(jnp.isfinite(x))
  return ok


def check_finite(manager: ocp.CheckpointManager, step: int, state: Any,
                 loss: Optional[Any] = None) -> None:
  """Raises NonFiniteStateError unless ``state`` (params, optimiser state, ...) and ``loss``
  are finite; the message names the latest checkpoint of ``manager`` (finite, since every
  save is checked) or says there is none.

  Args:
    step: the training step the state is at (for the message).
    state: a pytree of (device) arrays, e.g. the unreplicated train state.
    loss: the last training loss (any array), or None.
  """
  if bool(all_finite((state, loss))):
    return
  manager.wait_until_finished()
  latest = manager.latest_step()
  where = (f"the latest finite checkpoint is step {latest} in {manager.directory} (a restart "
           f"resumes from it)" if latest is not None else
           f"no checkpoint was written to {manager.directory} (a restart starts afresh)")
  raise NonFiniteStateError(
      f"training diverged: the state or loss at step {step} holds NaN/Inf and was not saved; "
      f"{where}. Try a lower lr or set grad_clip.")


# ----------------------------------------------------------------------------- restore


def _describe(manager: ocp.CheckpointManager, step: int) -> str:
  return f"checkpoint {manager.directory} step {step}"


def _metadata(manager: ocp.CheckpointManager, step: int) -> Dict[Path, Any]:
  try:
    meta = manager.item_metadata(step)[ITEM]
  except Exception as e:  # pylint: disable=broad-except
    raise CorruptCheckpointError(f"{_describe(manager, step)} is unreadable (corrupt or not an "
                                 f"orbax '{ITEM}' checkpoint): {short_error(e)}") from e
  if meta is None:
    raise CorruptCheckpointError(f"{_describe(manager, step)} has no '{ITEM}' item")
  tree = getattr(meta, "tree", meta)
  return flatten_with_paths(tree)


def check_compatible(saved: Dict[Path, Any], target: Any, where: str) -> None:
  """Raises CheckpointError unless ``target``'s leaves match ``saved`` in path, shape, dtype."""
  want = flatten_with_paths(target)
  problems: List[str] = []
  for p in sorted(set(want) - set(saved)):
    problems.append(f"missing from the checkpoint: {_path_str(p)}")
  for p in sorted(set(saved) - set(want)):
    problems.append(f"not in the target: {_path_str(p)}")
  for p in sorted(set(want) & set(saved)):
    (ws, wd), (ss, sd) = _shape_dtype(want[p]), _shape_dtype(saved[p])
    if ws != ss:
      problems.append(f"{_path_str(p)}: checkpoint shape {ss}, target shape {ws}")
    elif wd is not None and sd is not None and wd != sd:
      problems.append(f"{_path_str(p)}: checkpoint dtype {sd}, target dtype {wd}")
  if problems:
    more = f"\n  ... and {len(problems) - 12} more" if len(problems) > 12 else ""
    raise IncompatibleCheckpointError(
        f"{where} does not match the expected state ({len(problems)} mismatches):\n  "
        + "\n  ".join(problems[:12]) + more)


def _restore_step(manager: ocp.CheckpointManager, step: int, target: Any) -> Any:
  """Restores one step, against ``target`` (validated first) or raw when None."""
  where = _describe(manager, step)
  try:
    verify_checksums(os.path.join(str(manager.directory), str(int(step))))
  except CorruptCheckpointError as e:
    raise CorruptCheckpointError(f"{where} is corrupt: {e}") from e
  if target is not None:
    check_compatible(_metadata(manager, step), target, where)
  try:
    restored = manager.restore(step, args=ocp.args.Composite(**{
        ITEM: ocp.args.StandardRestore(target)}))[ITEM]
  except Exception as e:  # pylint: disable=broad-except
    raise CorruptCheckpointError(f"{where} could not be restored (corrupt): "
                                 f"{short_error(e)}") from e
  if target is None:
    restored = jax.device_get(restored)
  return restored


def restore_latest(manager: ocp.CheckpointManager, target: Any) -> Tuple[Any, Optional[int]]:
  """Restores the newest checkpoint of ``manager``.

  Args:
    target: pytree with the saved structure whose leaves are arrays or
      ``jax.ShapeDtypeStruct`` (e.g. ``jax.eval_shape(lambda: state)``).
  Returns:
    ``(state, step)``, or ``(None, None)`` when there is no checkpoint yet.
  Raises:
    CheckpointError: the newest checkpoint is corrupt or does not match ``target``
      (delete that step's folder to fall back to the previous one).
  """
  step = manager.latest_step()
  if step is None:
    return None, None
  return _restore_step(manager, step, target), int(step)


def restore_data_state(manager: ocp.CheckpointManager, step: int) -> Optional[Dict[str, Any]]:
  """The input iterator's state saved with ``step``, or None (a checkpoint without one).

  Raises:
    CheckpointError: the data item exists but cannot be read.
  """
  return _restore_json(manager, step, DATA)


def _restore_json(manager: ocp.CheckpointManager, step: int, item: str
                  ) -> Optional[Dict[str, Any]]:
  """A JSON item of ``step`` (None when the step has none); CorruptCheckpointError if unreadable."""
  if not os.path.isdir(os.path.join(str(manager.directory), str(int(step)), item)):
    return None
  try:
    return dict(manager.restore(int(step), args=ocp.args.Composite(**{
        item: ocp.args.JsonRestore()}))[item])
  except Exception as e:  # pylint: disable=broad-except
    raise CorruptCheckpointError(f"{_describe(manager, step)}: its '{item}' item is "
                                 f"unreadable: {short_error(e)}") from e


@dataclasses.dataclass
class Restored:
  """What :func:`restore` read: the state, its step, the input iterator's state and the
  run's bookkeeping (None for a checkpoint without them), and the newer steps it skipped
  as corrupt (with why)."""
  state: Any
  step: int
  data_state: Optional[Dict[str, Any]]
  meta: Optional[Dict[str, Any]]
  skipped: List[Tuple[int, str]]


def restore(manager: ocp.CheckpointManager, target: Any, step: Optional[int] = None,
            fallback: bool = True) -> Optional[Restored]:
  """Restores a step of ``manager`` with its data and meta items.

  Args:
    target: pytree of arrays / ``jax.ShapeDtypeStruct`` with the saved structure.
    step: the step to restore (None: the newest). An explicit step is never replaced by
      another.
    fallback: with ``step=None``, a corrupt newest step is skipped with a warning and the
      previous kept step is tried, and so on.
  Returns:
    a :class:`Restored`, or None when the manager holds no checkpoint.
  Raises:
    CheckpointError: ``step`` is not kept (the message lists the kept steps); the newest
      step does not match ``target`` (:class:`IncompatibleCheckpointError`, no fallback:
      an older step would not match either); every kept step is corrupt.
  """
  steps = sorted(manager.all_steps(), reverse=True)
  if step is not None:
    if int(step) not in steps:
      raise CheckpointError(f"step {step} is not kept in {manager.directory}; kept "
                            f"steps: {sorted(steps)}")
    steps = [int(step)]
  if not steps:
    return None
  skipped: List[Tuple[int, str]] = []
  for s in steps:
    try:
      state = _restore_step(manager, s, target)
      data = _restore_json(manager, s, DATA)
      meta = _restore_json(manager, s, META)
    except CorruptCheckpointError as e:
      if step is not None or not fallback:
        raise
      skipped.append((s, str(e)))
      logging.warning("%s; falling back to the previous kept step", e)
      continue
    return Restored(state, int(s), data, meta, skipped)
  raise CorruptCheckpointError(
      f"every kept checkpoint in {manager.directory} is corrupt:\n  "
      + "\n  ".join(why for _, why in skipped)
      + "\nStart again with a new --workdir.")


def set_aside_steps_after(manager: ocp.CheckpointManager, step: int, dest: str) -> List[int]:
  """Moves the checkpoints newer than ``step`` to ``dest/<step>`` (never overwriting) and
  reloads the manager; returns the moved steps.

  A run resumed from an older step than the newest (a fallback past a corrupt step, or an
  explicit ``restore_step``) would otherwise keep newer steps from another trajectory,
  which its own saves could not replace.
  """
  manager.wait_until_finished()
  newer = sorted(s for s in manager.all_steps() if s > step)
  directory = str(manager.directory)
  if jax.process_index() == 0:  # a multi-process run: process 0 moves, the others wait
    for s in newer:
      os.makedirs(dest, exist_ok=True)
      target, n = os.path.join(dest, str(s)), 1
      while os.path.exists(target):
        target, n = os.path.join(dest, f"{s}.{n}"), n + 1
      os.rename(os.path.join(directory, str(s)), target)
  if newer:
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices("qgnn_jax.checkpoint.set_aside_steps_after")
    manager.reload()
  return newer


def resolve_checkpoint_dir(directory: str) -> str:
  """``directory`` if it holds step folders, else its ``checkpoints/`` sub-folder.

  Raises:
    CheckpointError: neither holds a checkpoint.
  """
  directory = os.path.abspath(os.path.expanduser(directory))
  tried = []
  for d in (directory, os.path.join(directory, "checkpoints")):
    tried.append(d)
    if os.path.isdir(d) and _steps_in(d):
      return d
  raise CheckpointError(f"no checkpoint found in {' or '.join(tried)} (expected step folders "
                        f"written by qgnn_jax.checkpoint.save, e.g. an FP run's workdir)")


def _steps_in(directory: str) -> List[int]:
  return sorted(int(n) for n in os.listdir(directory)
                if n.isdigit() and os.path.isdir(os.path.join(directory, n)))


def restore_from(directory: str, target: Any = None, step: Optional[int] = None) -> Any:
  """Restores another run's checkpoint (``--config.init_from=DIR``).

  Args:
    directory: a checkpoint folder or a run's workdir (its ``checkpoints/`` is used).
    target: None returns the saved tree as nested dicts / lists of numpy arrays
      (for :func:`merge_matching`); otherwise a pytree of arrays /
      ``ShapeDtypeStruct`` that must match the checkpoint exactly.
    step: which step (default: the newest).
  Returns:
    the restored tree.
  Raises:
    CheckpointError: no checkpoint, missing step, corrupt, or mismatched target.
  """
  ckpt_dir = resolve_checkpoint_dir(directory)
  manager = ocp.CheckpointManager(ckpt_dir, item_handlers={ITEM: ocp.StandardCheckpointHandler()})
  try:
    steps = list(manager.all_steps())
    if not steps:
      raise CheckpointError(f"no complete checkpoint in {ckpt_dir}")
    if step is None:
      step = max(steps)
    elif int(step) not in steps:
      raise CheckpointError(f"step {step} is not in {ckpt_dir}; available steps: {sorted(steps)}")
    return _restore_step(manager, int(step), target)
  finally:
    manager.close()
