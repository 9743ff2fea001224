"""A state tree as {path: leaf}, and an FP run's variables merged into a QAT state by path."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

Path = Tuple[str, ...]


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
