"""Checkpoints with orbax-checkpoint (SPEC §4): periodic, atomic, keep the last N.

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

A corrupt or incompatible checkpoint raises :class:`CheckpointError` naming the
directory, the step and what did not match.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

ITEM = "state"
DATA = "data"  # the input iterator's state (JSON), written once (by process 0)
Path = Tuple[str, ...]


class CheckpointError(ValueError):
  """A checkpoint is missing, corrupt, or does not match the expected state."""


# ----------------------------------------------------------------------------- tree paths


def _key_str(k: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def flatten_with_paths(tree: Any) -> Dict[Path, Any]:
  """``{("params", "dense", "kernel"): leaf, ...}``.

  Dict keys, dataclass / namedtuple field names and sequence indices all become
  strings, so a flax struct, its orbax-restored nested-dict form and a plain
  dict of the same fields give the same paths.
  """
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {tuple(_key_str(k) for k in path): leaf for path, leaf in leaves}


def _path_str(path: Sequence[str]) -> str:
  return "/".join(path) or "<root>"


def _shape_dtype(x: Any) -> Tuple[Tuple[int, ...], Optional[np.dtype]]:
  """(shape, dtype or None) of an array, ShapeDtypeStruct or orbax ArrayMetadata."""
  shape = tuple(x.shape) if hasattr(x, "shape") else tuple(np.shape(x))
  dtype = getattr(x, "dtype", None)
  return shape, (np.dtype(dtype) if dtype is not None else None)


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
                                              DATA: ocp.JsonCheckpointHandler()})


def _sanitize(state: Any) -> Any:
  """numpy scalars (not storable by orbax) -> 0-d arrays of the same dtype."""
  return jax.tree.map(lambda x: np.asarray(x) if isinstance(x, np.generic) else x, state)


def save(manager: ocp.CheckpointManager, step: int, state: Any, force: bool = False,
         data_state: Optional[Dict[str, Any]] = None) -> bool:
  """Saves ``state`` (a host pytree of arrays) as step ``step`` and waits for it.

  Args:
    manager: from :func:`make_manager`.
    step: training step, ``>= 0``.
    state: pytree (flax struct dataclass, dicts, optax states) of arrays; pass the
      unreplicated state (``jax.device_get(unreplicate(rstate))``).
    force: write even if ``step`` is not a multiple of ``save_interval_steps``.
    data_state: the input iterator's state (a JSON-able dict, e.g.
      ``qgnn_jax.data.iterator_state``), saved beside ``state``; read back with
      :func:`restore_data_state`.
  Returns:
    whether a checkpoint was written; a step that already exists is not written
    again (a run resumed from its final checkpoint saves the same state).
  """
  step = int(step)
  if step < 0:
    raise ValueError(f"step={step} must be >= 0")
  if step in manager.all_steps():
    return False
  items = {ITEM: ocp.args.StandardSave(_sanitize(state))}
  if data_state is not None:
    items[DATA] = ocp.args.JsonSave(dict(data_state))
  saved = manager.save(step, args=ocp.args.Composite(**items), force=force)
  manager.wait_until_finished()
  return bool(saved)


# ----------------------------------------------------------------------------- restore


def _describe(manager: ocp.CheckpointManager, step: int) -> str:
  return f"checkpoint {manager.directory} step {step}"


def _metadata(manager: ocp.CheckpointManager, step: int) -> Dict[Path, Any]:
  try:
    meta = manager.item_metadata(step)[ITEM]
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(f"{_describe(manager, step)} is unreadable (corrupt or not an orbax "
                          f"'{ITEM}' checkpoint): {type(e).__name__}: {e}") from e
  if meta is None:
    raise CheckpointError(f"{_describe(manager, step)} has no '{ITEM}' item")
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
    raise CheckpointError(f"{where} does not match the expected state ({len(problems)} "
                          f"mismatches):\n  " + "\n  ".join(problems[:12]) + more)


def _restore_step(manager: ocp.CheckpointManager, step: int, target: Any) -> Any:
  """Restores one step, against ``target`` (validated first) or raw when None."""
  where = _describe(manager, step)
  if target is not None:
    check_compatible(_metadata(manager, step), target, where)
  try:
    restored = manager.restore(step, args=ocp.args.Composite(**{
        ITEM: ocp.args.StandardRestore(target)}))[ITEM]
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(f"{where} could not be restored (corrupt or incompatible): "
                          f"{type(e).__name__}: {e}") from e
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
  if not os.path.isdir(os.path.join(str(manager.directory), str(int(step)), DATA)):
    return None
  try:
    return dict(manager.restore(int(step), args=ocp.args.Composite(**{
        DATA: ocp.args.JsonRestore()}))[DATA])
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(f"{_describe(manager, step)}: its '{DATA}' item (the input "
                          f"iterator's state) is unreadable: {type(e).__name__}: {e}") from e


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


def merge_matching(target_tree: Any, source_tree: Any) -> Tuple[Any, List[Path], List[Path]]:
  """Copies the leaves of ``source_tree`` whose path and shape match into ``target_tree``.

  Paths are compared as string tuples (see :func:`flatten_with_paths`), so a
  raw restored tree (nested dicts) can fill a flax struct / dict of arrays.
  Copied leaves take the target leaf's dtype (and become jax arrays if the
  target leaf is one); the others keep the target's value.

  Returns:
    ``(merged, copied_paths, missing_paths)``; ``missing_paths`` are the target
    paths with no source leaf of the same shape.
  """
  source = flatten_with_paths(source_tree)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(target_tree)
  out, copied, missing = [], [], []
  for path, leaf in leaves:
    p = tuple(_key_str(k) for k in path)
    src = source.get(p)
    if src is not None and tuple(np.shape(src)) == _shape_dtype(leaf)[0]:
      dtype = _shape_dtype(leaf)[1] or np.asarray(src).dtype
      if isinstance(leaf, jax.Array):
        out.append(jnp.asarray(src, dtype=dtype))
      else:
        out.append(np.asarray(src, dtype=dtype))
      copied.append(p)
    else:
      out.append(leaf)
      missing.append(p)
  return jax.tree_util.tree_unflatten(treedef, out), copied, missing
